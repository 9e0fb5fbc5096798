"""One job contract (serve.job_spec): the API and the Train tab refuse the same input with the same message before
anything is stored, a typed system prompt never reaches train's commands as "@PATH", jobs run from any folder,
and the Train tab's untouched fields start a job with the contract's defaults."""

from __future__ import annotations

import time

import gradio as gr
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve.access import AccessPolicy
from serve.doctor import DoctorReport, diagnose
from serve.files import FileStore
from serve.fine_tuning_api import FineTuningServer
from serve.job_spec import FILE_PROMPT, RULES, JobSpec, JobSpecError, job_spec
from serve.jobs import PROMPT, TRAIN_EVENTS, JobRunner, read_lines
from tests.conftest import DATA, wait_for
from ui.train_tab import TrainTab

SECRET = "@/some/secret/file"
TAB_SETTINGS = ("method", "time_budget_minutes", "n_epochs", "batch_size", "learning_rate_multiplier", "max_steps",
                "system_prompt", "seed", "suffix", "redact")  # TrainTab.start's parameters after `chosen`, in order


@pytest.fixture
def runner(tmp_path):
    """A runner that trains nothing (no job loop)."""
    jobs = JobRunner(tmp_path / "jobs", tmp_path / "adapters", FileStore(tmp_path / "jobs" / "files"), start=False)
    yield jobs
    jobs.close()


def test_the_contract_has_a_default_and_both_bounds_for_every_number():
    assert job_spec() == JobSpec(method="lora", n_epochs=1.0, batch_size=8, learning_rate_multiplier=1.0,
                                 time_budget_minutes=0.0, max_steps=0, seed=42, suffix=None, system_prompt=None,
                                 redact=False)
    assert job_spec(n_epochs="auto", batch_size=None, suffix="  ", system_prompt="") == job_spec()
    too_big = {"n_epochs": 101, "batch_size": 1025, "learning_rate_multiplier": 101, "time_budget_minutes": 10081,
               "max_steps": 1_000_001, "seed": 2**32}
    too_small = {"n_epochs": 0, "batch_size": 0, "learning_rate_multiplier": 0, "time_budget_minutes": -1,
                 "max_steps": -1, "seed": -1}
    for values in (too_big, too_small):
        for name, value in values.items():
            with pytest.raises(JobSpecError) as refused:
                job_spec(**{name: value})
            assert refused.value.param.endswith(name) and f"not {value!r}" in str(refused.value), refused.value
            assert RULES[name].describe() in str(refused.value)
    for name, value in (("batch_size", 2.0), ("seed", True), ("n_epochs", "1")):  # OpenAI's strict types
        with pytest.raises(JobSpecError):
            job_spec(**{name: value})
    with pytest.raises(JobSpecError, match="must be one of lora, prefix, not 'qlora'"):
        job_spec(method="qlora")
    with pytest.raises(JobSpecError, match="letters, digits"):
        job_spec(suffix="../x")
    with pytest.raises(JobSpecError) as file_prompt:
        job_spec(system_prompt="  " + SECRET)
    assert str(file_prompt.value) == f"Invalid 'adapter.system_prompt': {FILE_PROMPT}."


@pytest.mark.parametrize(
    ("tab", "body"),
    [
        ({"system_prompt": SECRET}, {"adapter": {"system_prompt": SECRET}}),
        ({"n_epochs": 0}, {"hyperparameters": {"n_epochs": 0}}),
        ({"batch_size": 2000}, {"hyperparameters": {"batch_size": 2000}}),
        ({"learning_rate_multiplier": 1000}, {"hyperparameters": {"learning_rate_multiplier": 1000}}),
        ({"max_steps": 2.5}, {"adapter": {"max_steps": 2.5}}),
        ({"time_budget_minutes": -1}, {"adapter": {"time_budget_minutes": -1}}),
        ({"method": "qlora"}, {"adapter": {"type": "qlora"}}),
        ({"seed": -3}, {"seed": -3}),
        ({"suffix": "a b"}, {"suffix": "a b"}),
        ({"redact": "yes"}, {"adapter": {"redact": "yes"}}),
    ],
    ids=["file-prompt", "epochs", "batch", "lr", "steps", "budget", "method", "seed", "suffix", "redact"],
)
def test_the_api_and_the_train_tab_refuse_the_same_input_with_the_same_message(runner, tab, body):
    upload = runner.files.save((DATA / "valid_pairs.jsonl").read_bytes(), "pairs.jsonl", "fine-tune")
    api = FastAPI()
    api.include_router(FineTuningServer(runner, AccessPolicy()).router)
    answer = TestClient(api, client=("127.0.0.1", 50000)).post(
        "/v1/fine_tuning/jobs", json={"model": "base", "training_file": upload.id, **body})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] and error["message"].startswith(f"Invalid '{error['param']}': ")

    settings = {**dict.fromkeys(TAB_SETTINGS), "method": "lora", **tab}
    chosen = {"path": str(DATA / "valid_pairs.jsonl"), "name": "valid_pairs.jsonl", "ok": True}
    with pytest.raises(gr.Error) as refused:
        TrainTab(runner, registry=None, access=None).start(chosen, *settings.values(), request=None)
    assert refused.value.message == error["message"]
    assert runner.list() == [] and [f.id for f in runner.files.list()] == [upload.id], "nothing stored or trained"


def test_a_typed_system_prompt_reaches_the_doctor_and_the_trainer_only_as_the_jobs_file(runner, monkeypatch):
    asked: list[tuple] = []

    def doctor(data, base_model, system_prompt_file=None, timeout=0.0, kind="auto") -> DoctorReport:
        asked.append((data, base_model, system_prompt_file))
        return DoctorReport(True, ("format: pairs (40 rows)",))

    monkeypatch.setattr("serve.jobs.diagnose", doctor)
    upload = runner.files.save((DATA / "valid_pairs.jsonl").read_bytes(), "pairs.jsonl", "fine-tune")
    prompt = "You are a pirate.\n@/not/a/file: this line is text"
    job = runner.create(upload.id, job_spec(system_prompt=prompt, max_steps=3))
    wait_for(lambda: runner.get(job.id).status == "queued", 10, what="the doctor's verdict")
    file = runner.root / job.id / PROMPT
    assert file.read_text(encoding="utf-8") == prompt
    assert asked == [(runner.files.path(upload.id), "embedded", file)]
    command = runner.train_command(runner.get(job.id))
    assert command[command.index("--system-prompt") + 1] == f"@{file}" and file.is_absolute()
    assert not any(prompt in part for part in command), "the typed text is not an argument"
    assert command[command.index("--max-steps") + 1] == "3"
    assert command[command.index("--learning-rate-multiplier") + 1] == "1.0"


def test_redact_and_an_adapter_to_go_on_from_reach_the_trainer(runner, trained_lora, monkeypatch):
    import shutil

    monkeypatch.setattr("serve.jobs.diagnose", lambda *args, **kwargs: DoctorReport(True, ()))
    shutil.copytree(trained_lora, runner.adapters_dir / "support")
    upload = runner.files.save((DATA / "valid_pairs.jsonl").read_bytes(), "pairs.jsonl", "fine-tune")
    api = FastAPI()
    api.include_router(FineTuningServer(runner, AccessPolicy()).router)
    answer = TestClient(api, client=("127.0.0.1", 50000)).post(
        "/v1/fine_tuning/jobs", json={"model": "support", "training_file": upload.id, "adapter": {"redact": True}})
    assert answer.status_code == 200, answer.text
    command = runner.train_command(runner.get(answer.json()["id"]))
    assert "--redact" in command
    assert command[command.index("--from-adapter") + 1] == str((runner.adapters_dir / "support").absolute())
    assert command[command.index("--base-model") + 1] == "embedded", "the adapter's own base"
    plain = runner.train_command(runner.create(upload.id, job_spec()))
    assert "--redact" not in plain and "--from-adapter" not in plain
    # A name that is no adapter of the app's is a base model's name, as before (never a path out of the folder).
    assert "--from-adapter" not in runner.train_command(runner.create(upload.id, job_spec(), model="../support"))


@pytest.mark.slow
def test_a_job_of_a_server_started_in_another_folder_finds_its_files(tmp_path, monkeypatch):
    """Folders given relative to the server's folder (not the repository, where train's commands run)."""
    monkeypatch.chdir(tmp_path)
    runner = JobRunner("jobs", "adapters", FileStore("jobs/files"),
                       extra_args=["--batch-size", "4", "--probes", "1", "--probe-tokens", "4",
                                   "--generation-rows", "0"])
    try:
        upload = runner.files.save((DATA / "valid_pairs.jsonl").read_bytes(), "pairs.jsonl", "fine-tune")
        job = runner.create(upload.id, job_spec(max_steps=2, system_prompt="Be brief."))
        folder = tmp_path / "jobs" / job.id
        loaded = lambda: [e for e in read_lines(folder / TRAIN_EVENTS) if e.get("phase") == "data"]  # noqa: E731
        deadline = time.monotonic() + 240
        while not loaded() and time.monotonic() < deadline:
            assert runner.get(job.id).status != "failed", runner.get(job.id).error
            time.sleep(0.5)
        assert loaded(), runner.log_tail(job.id)
        command = runner.train_command(runner.get(job.id))
        assert str(tmp_path / "jobs" / "files" / upload.id / "pairs.jsonl") in command
        assert str(tmp_path / "adapters" / job.output_name) in command
        assert f"@{folder / PROMPT}" in command
    finally:
        runner.close()


def test_the_train_tabs_untouched_fields_start_a_job_with_the_contracts_defaults(runner, monkeypatch):
    monkeypatch.setattr("serve.jobs.diagnose", lambda *args, **kwargs: DoctorReport(True, ()))
    tab = TrainTab(runner, registry=None, access=None)
    with gr.Blocks():
        tab.layout()
    fields = [tab.method, tab.budget, tab.epochs, tab.batch_size, tab.lr_multiplier, tab.max_steps, tab.system,
              tab.seed, tab.suffix, tab.redact]
    # A Number that starts blank shows 0 once the Advanced fold opens, and the page sends that 0.
    shown = {name: field.value for name, field in zip(TAB_SETTINGS, fields, strict=True)}
    assert all(value is not None for name, value in shown.items() if name not in ("system_prompt", "suffix")), shown
    sent = [field.preprocess(field.value) for field in fields]
    chosen = {"path": str(DATA / "valid_pairs.jsonl"), "name": "valid_pairs.jsonl", "ok": True}
    job = runner.get(tab.start(chosen, *sent, request=None))
    defaults = job_spec()
    assert (job.n_epochs, job.batch_size, job.learning_rate_multiplier, job.max_steps, job.seed) == (
        defaults.n_epochs, defaults.batch_size, defaults.learning_rate_multiplier, defaults.max_steps, defaults.seed)
    for name in ("n_epochs", "batch_size", "learning_rate_multiplier", "seed"):
        assert f"default {RULES[name].default:g}" in fields[TAB_SETTINGS.index(name)].label


def test_the_doctor_runs_as_a_process_and_reads_the_prompt_only_from_the_file_it_is_given(runner, tmp_path):
    bad = DATA / "bad" / "invalid_json_line.jsonl"
    report = runner.doctor(bad)
    assert not report.ok and report.problems() == [f"{bad}:3: invalid JSON: Expecting ',' delimiter (column 74)"]
    assert report.text(bad, bad.name) == f"error: {bad.name}:3: invalid JSON: Expecting ',' delimiter (column 74)"
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Be brief.", encoding="utf-8")
    good = diagnose(DATA / "valid_pairs.jsonl", "embedded", prompt)
    assert good.ok and good.lines[-1] == "ok: ready to train" and good.summary()[0] == "format: pairs (40 rows)"
    assert any(line.startswith("system prompt trained: 'Be brief.' from --system-prompt") for line in good.lines)


def test_train_sft_takes_a_learning_rate_multiplier_but_not_with_a_learning_rate(capsys):
    from train.sft import parse_config

    assert parse_config(["d.jsonl", "--learning-rate-multiplier", "3"]).lr == pytest.approx(3e-3)
    assert parse_config(["d.jsonl", "--method", "prefix", "--learning-rate-multiplier", "0.5"]).lr == pytest.approx(5e-2)
    assert parse_config(["d.jsonl"]).lr == pytest.approx(1e-3)
    for argv in (["--learning-rate", "1e-4", "--learning-rate-multiplier", "2"], ["--learning-rate-multiplier", "0"]):
        with pytest.raises(SystemExit) as refused:
            parse_config(["d.jsonl", *argv])
        assert refused.value.code == 2 and "--learning-rate-multiplier" in capsys.readouterr().err


def test_a_dpo_job_runs_train_dpo_with_its_beta_and_the_doctor_checks_preference_pairs(runner, monkeypatch):
    kinds: list[str] = []

    def doctor(data, base_model, system_prompt_file=None, timeout=0.0, kind="auto") -> DoctorReport:
        kinds.append(kind)
        return DoctorReport(True, ())

    monkeypatch.setattr("serve.jobs.diagnose", doctor)
    upload = runner.files.save((DATA / "prefs.jsonl").read_bytes(), "prefs.jsonl", "fine-tune")
    api = FastAPI()
    api.include_router(FineTuningServer(runner, AccessPolicy()).router)
    body = {"model": "base", "training_file": upload.id,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}}}
    answer = TestClient(api, client=("127.0.0.1", 50000)).post("/v1/fine_tuning/jobs", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["method"] == {"type": "dpo", "dpo": {"hyperparameters": {
        "beta": 0.25, "n_epochs": 2.0, "batch_size": 8, "learning_rate_multiplier": 1.0}}}
    job = runner.get(answer.json()["id"])
    wait_for(lambda: runner.get(job.id).status == "queued", 10, what="the doctor's verdict")
    assert kinds == ["preference"], "a DPO job's file must hold preference pairs"
    command = runner.train_command(job)
    assert command[1:3] == ["-m", "train.dpo"] and command[command.index("--beta") + 1] == "0.25"
    assert command[command.index("--epochs") + 1] == "2.0"
    plain = runner.create(upload.id, job_spec())
    supervised = runner.train_command(plain)
    assert supervised[1:3] == ["-m", "train.sft"] and "--beta" not in supervised
    assert runner.get(plain.id).to_openai()["method"]["type"] == "supervised"
    wait_for(lambda: kinds[1:] == ["sft"], 10, what="the supervised job's doctor")
    for values, param in (({"method": "prefix"}, "adapter.type"), ({"redact": True}, "adapter.redact"),
                          ({"time_budget_minutes": 5}, "adapter.time_budget_minutes"),
                          ({"beta": 0}, "method.dpo.hyperparameters.beta")):
        with pytest.raises(JobSpecError) as refused:
            job_spec(training="dpo", **values)
        assert refused.value.param == param, refused.value
    with pytest.raises(JobSpecError, match="must be one of supervised, dpo, not 'ppo'"):
        job_spec(training="ppo")
