"""The Train tab in a real browser: the doctor's report, a real job watched live, then chat with its adapter."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.adapter_replies import replies
from tests.conftest import DATA, free_port, wait_for

# A real train.sft run, kept short: 6 steps with a loss logged at each, one short probe reply.
FAST_JOB = ["--batch-size", "4", "--probes", "1", "--probe-tokens", "8", "--logging-steps", "1",
            "--max-steps", "6", "--generation-rows", "0"]
# The doctor is a process that imports torch and transformers: 7.9 s on an idle machine, over 60 s once in make
# test while the other worker ran a browser bench. A doctor that hangs still fails the wait.
DOCTOR_S = 180
POINTS = "#train-plot [aria-roledescription='point']:not([aria-label*='null'])"  # drawn loss points


class TrainApp:
    """The app with a Train tab over its own adapters and jobs folders."""

    def __init__(self, url: str, demo, runner, browser):
        self.url, self.demo, self.runner, self.browser = url, demo, runner, browser
        self.contexts: list = []

    def open(self):
        """A fresh browser context on the app, showing the Train tab."""
        context = self.browser.new_context()
        self.contexts.append(context)
        page = context.new_page()
        page.goto(self.url)
        page.wait_for_selector("#message textarea")
        page.get_by_role("tab", name="Train").click()
        page.wait_for_selector("#train-progress textarea")
        return page


@pytest.fixture(scope="module")
def train_app(browser, tmp_path_factory):
    """The real app (embedded model) whose jobs train 6 steps; the page looks at its job every 0.5 s."""
    from serve.files import FileStore
    from serve.jobs import JobRunner
    from serve.registry import BASE_CHOICE, ModelRegistry
    from ui import train_tab
    from ui.app import build_app
    from ui.config import ChatConfig

    root = tmp_path_factory.mktemp("train-tab")
    config = ChatConfig(adapters_dir=str(root / "adapters"), jobs_dir=str(root / "jobs"), max_queue=8)
    runner = JobRunner(config.jobs_dir, config.adapters_dir, FileStore(config.jobs_dir), extra_args=FAST_JOB)
    registry = ModelRegistry(config.adapters_dir, default=BASE_CHOICE)
    tick, train_tab.TICK_S = train_tab.TICK_S, 0.5
    try:
        demo = build_app(config, registry=registry, jobs=runner,
                         defaults={"max_new_tokens": 12, "temperature": 0.0})
    finally:
        train_tab.TICK_S = tick
    registry.get(BASE_CHOICE)  # loaded now, not inside a test's timing
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True)
    app = TrainApp(url, demo, runner, browser)
    yield app
    for context in app.contexts:
        context.close()
    runner.close()
    demo.close()


def progress(page) -> str:
    """The job's progress text (job, status, step/rate/ETA, newest message)."""
    return page.input_value("#train-progress textarea")


def status(page) -> str:
    """The status of the job the page shows, from the first line of its progress text ("" before a job)."""
    head = progress(page).split("\n", 1)[0].split(" · ")
    return head[2] if len(head) > 2 else ""


def report(page) -> str:
    """The dataset doctor's report."""
    return page.input_value("#train-report textarea")


def upload(page, path: Path) -> None:
    """Upload a file into the Train tab."""
    page.set_input_files("#train-file input[type=file]", str(path))


def upload_trainable(page) -> None:
    """Upload the small valid data set and wait for the doctor to pass it."""
    upload(page, DATA / "valid_pairs.jsonl")
    wait_for(lambda: "ok: ready to train" in report(page), DOCTOR_S, what="the doctor's report")


@pytest.mark.browser
@pytest.mark.slow
def test_a_malformed_file_shows_the_doctors_errors_and_nothing_starts(train_app):
    page = train_app.open()
    jobs_before, files_before = len(train_app.runner.list()), len(train_app.runner.files.list())
    # A file of the server's data folder first: it can be trained on, so Start opens.
    page.locator("#train-data input").click()
    page.get_by_role("option", name="dialogs.jsonl").click()
    wait_for(lambda: "ok: ready to train" in report(page), 60, what="the report on data/dialogs.jsonl")
    assert "examples: 300 trainable" in report(page) and "[[" in report(page)
    assert page.locator("#train-start").is_enabled()

    upload(page, DATA / "bad" / "invalid_json_line.jsonl")
    wait_for(lambda: "error:" in report(page), DOCTOR_S, what="the doctor's errors")
    assert "invalid_json_line.jsonl:3: invalid JSON" in report(page), report(page)
    assert "ready to train" not in report(page)
    wait_for(page.locator("#train-start").is_disabled, 10, what="Start to be disabled")
    page.locator("#train-start").click(force=True)  # a disabled button: nothing may happen
    time.sleep(2)
    assert len(train_app.runner.list()) == jobs_before, "a job was created from a malformed file"
    assert len(train_app.runner.files.list()) == files_before


@pytest.mark.browser
@pytest.mark.slow
def test_train_watch_the_loss_plot_grow_finish_and_chat_with_the_adapter(train_app):
    from ui.app import STORAGE_KEY

    page = train_app.open()
    upload_trainable(page)
    shown = report(page)
    assert "format: pairs (40 rows)" in shown and "tokens:" in shown and "[[" in shown and "]]" in shown
    assert page.locator(POINTS).count() == 0
    page.click("#train-start")

    counts: list[int] = []  # points drawn, each time the number changed while the job ran
    deadline = time.monotonic() + 240
    while status(page) != "succeeded" and time.monotonic() < deadline:
        assert status(page) != "failed", progress(page)
        count = page.locator(POINTS).count()
        if count and (not counts or count != counts[-1]):
            counts.append(count)
        time.sleep(0.2)
    assert status(page) == "succeeded", progress(page)
    job = train_app.runner.list()[0]
    assert job.status == "succeeded" and job.id in progress(page)
    assert "step 6/6" in progress(page)
    metrics = [e for e in train_app.runner.events(job.id) if e.get("event") == "metrics"]
    # One point per series and step (the final evaluation repeats the last step's).
    expected = len({(name, e["step"]) for e in metrics for name in ("train", "eval") if f"{name}_loss" in e})
    wait_for(lambda: page.locator(POINTS).count() == expected, 10, what=f"all {expected} loss points drawn")
    assert len(counts) >= 3 and counts == sorted(counts), f"the plot should grow while training: {counts}"
    assert counts[0] < expected, f"the plot showed nothing until the end: {counts}"

    result = page.input_value("#train-result textarea")
    assert "Eval loss:" in result and "before (base model)" in result and "after" in result, result
    assert "  before: " in result and "  after: " in result, "the probe replies before and after"

    page.click("#train-chat")
    wait_for(page.locator("#message textarea").is_visible, 10, what="the Chat tab")
    adapter = job.fine_tuned_model
    wait_for(lambda: page.input_value("#adapter input") == adapter, 10, what="the new adapter chosen")
    assert page.locator("#compare input").is_checked()
    assert page.locator("#chatbot-base").is_visible()
    wait_for(lambda: adapter in page.inner_text("#status"), 60, what="the adapter to load")
    # The replies the page must show: the adapter's own (loaded here from the folder the job published) and,
    # beside it, the base model's, which differs from it.
    message = "I would like to check my bank balance."  # the base model greets; the adapter asks, as trained
    expected = replies(train_app.runner.adapters_dir / adapter, [{"role": "user", "content": message}],
                       precision=train_app.demo.registry.precision, max_new_tokens=12, temperature=0)
    before = page.evaluate(f"localStorage.getItem({STORAGE_KEY!r})")
    page.fill("#message textarea", message)
    page.click("#send")
    wait_for(lambda: page.evaluate(f"localStorage.getItem({STORAGE_KEY!r})") != before, 90,
             what="both replies, saved once the turn is over")
    shown = [[words(text) for text in page.locator(f"{column} [data-testid='bot']").all_inner_texts()]
             for column in ("#chatbot", "#chatbot-base")]
    assert shown == [[words(expected.adapter)], [words(expected.base_weights)]], (shown, expected)


def words(text: str) -> str:
    """Text as a page shows it, whitespace aside (rendered Markdown reflows it)."""
    return " ".join(text.split())


@pytest.mark.browser
@pytest.mark.slow
def test_reloading_shows_the_running_job_and_stop_and_resume_it(train_app):
    page = train_app.open()
    upload_trainable(page)
    page.click("#train-start")
    runner = train_app.runner
    job_id = wait_for(lambda: next((j.id for j in runner.list() if j.status == "running"), None), 60,
                      what="the job to run")
    page.reload()
    page.get_by_role("tab", name="Train").click()
    wait_for(lambda: job_id in progress(page) and status(page) == "running", 20,
             what="the running job after a reload")
    assert page.locator("#train-stop").is_enabled() and page.locator("#train-resume").is_disabled()

    page.click("#train-stop")
    wait_for(lambda: status(page) == "paused", 60, what="the job to pause")
    assert train_app.runner.get(job_id).pid is None, "the training process still runs after Stop"
    wait_for(page.locator("#train-resume").is_enabled, 10, what="Resume to open")
    page.click("#train-resume")
    wait_for(lambda: runner.get(job_id).status in ("queued", "running"), 20, what="the job to resume")
    wait_for(lambda: status(page) in ("queued", "running"), 20, what="the page to show it")
    train_app.runner.cancel(job_id)
    wait_for(lambda: train_app.runner.get(job_id).status == "cancelled", 60, what="the job to be cancelled")


def test_start_refuses_a_file_the_doctor_rejected(tmp_path):
    import gradio as gr

    from serve.files import FileStore
    from serve.jobs import JobRunner
    from ui.train_tab import TrainTab

    runner = JobRunner(tmp_path / "jobs", tmp_path / "adapters", FileStore(tmp_path / "jobs"), start=False)
    tab = TrainTab(runner, registry=None, access=None)
    bad = DATA / "bad" / "invalid_json_line.jsonl"
    ok, text = tab.doctor(bad, bad.name)
    assert not ok and text == f"error: {bad.name}:3: invalid JSON: Expecting ',' delimiter (column 74)"
    chosen = {"path": str(bad), "name": bad.name, "ok": ok}
    with pytest.raises(gr.Error):
        tab.start(chosen, "lora", 5, None, None, None, None, "", 42, "", False, request=None)
    with pytest.raises(gr.Error):
        tab.start(None, "lora", 5, None, None, None, None, "", 42, "", False, request=None)
    assert runner.list() == [] and runner.files.list() == []
