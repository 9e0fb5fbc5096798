"""Fixtures for the chat app tests: the real app served in-process, and Debian chromium via Playwright."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# No analytics calls from the in-process server (there is no network here anyway).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data"
# Tiny real training runs: small batches, short probe replies, no choice of generation settings (a run that
# tests it passes its own --generation-rows).
FAST = ["--batch-size", "4", "--probes", "2", "--probe-tokens", "12", "--logging-steps", "1", "--generation-rows", "0"]
CHROMIUM = Path("/usr/bin/chromium")
INSTALL_CHROMIUM = "apt-get install -y chromium"  # what .ci/run does on a fresh machine
RUN = "; to run them: "


def needs(why: str, command: str) -> str:
    """A skip reason that carries the command making the skipped tests run: 'WHY; to run them: COMMAND'.

    `make test` ends with a block that groups the skipped tests by reason and prints each command."""
    return f"{why}{RUN}{command}"


# Every skip in the suite, each with what makes its tests run (.ci/run does the installs and the build).
NEEDS_CHROMIUM = needs(f"Browser tests, the only tests of what a user sees: no Debian chromium at {CHROMIUM}",
                       INSTALL_CHROMIUM)
NEEDS_PLAYWRIGHT = needs("Browser tests, the only tests of what a user sees: playwright is not installed",
                         ".venv/bin/pip install -r requirements-dev.txt")
NEEDS_GO = needs("Go template checks (our renderer against Go's own text/template): Go is not installed",
                 "apt-get install -y golang-go")
NEEDS_LLAMACPP = needs("llama.cpp round trips (the export's --verify): llama.cpp's Python binding is not built",
                       "apt-get install -y cmake g++ && .venv/bin/python -m train.export.llamacpp --build")
NEEDS_CUDA = needs("GPU tests (8-bit serving, QLoRA training): torch sees no CUDA device",
                   "make test on a machine with an NVIDIA GPU (requirements.txt's torch from PyPI is a CUDA build)")
NEEDS_NO_CUDA = needs("CPU-only checks (GPU options refused clearly without CUDA): this machine has CUDA",
                      "CUDA_VISIBLE_DEVICES= .venv/bin/python -m pytest -q tests/test_train.py")
NEEDS_DATASETS = needs("Hugging Face dataset folders: the datasets package is not installed",
                       ".venv/bin/pip install -r requirements.txt")
NEEDS_POSTGRES = needs("Store tests on PostgreSQL (SQLite runs them anyway): no PostgreSQL server binaries at "
                       "/usr/lib/postgresql/*/bin/initdb", "apt-get install -y postgresql")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def tiny_llama(vocab_size: int = 128, max_positions: int = 128):
    """A 2-layer Llama with seeded random weights, built in-process for fast unit tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def free_port() -> int:
    """A localhost TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def generations_running() -> int:
    """Replies the model is generating right now, in this process (the app server runs in it too)."""
    try:  # the batching runtime: one engine thread per model, one row per reply
        from assistant.batching import running_generations
    except ImportError:  # the thread-per-reply runtime: stream_reply's `_generate` threads
        return sum(t.is_alive() and "_generate" in t.name for t in threading.enumerate())
    return running_generations()


def wait_for(condition, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    """Poll `condition` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def sft(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python -m train.sft` the way a user does."""
    cmd = [sys.executable, "-m", "train.sft", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def sft_killed_at(marker: Path, *args: str, timeout: float = 900) -> bool:
    """Run `python -m train.sft` and SIGKILL it as soon as `marker` exists; True when it got that far."""
    proc = subprocess.Popen([sys.executable, "-m", "train.sft", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return marker.exists()


def _train(folder: Path, *args: str) -> Path:
    done = sft(str(DATA / "valid_pairs.jsonl"), "--output-dir", str(folder), *FAST, *args)  # its own args win
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == done.stdout.strip().splitlines()[-1], "stdout is the one result line"
    assert done.stdout.startswith(f"adapter written to {folder}")
    return folder


@pytest.fixture(scope="session")
def trained_lora(tmp_path_factory) -> Path:
    """A LoRA adapter from a real 4-step train.sft run on the embedded model, its generation settings chosen
    on 2 validation rows."""
    return _train(tmp_path_factory.mktemp("runs") / "lora", "--max-steps", "4", "--learning-rate", "1e-3",
                  "--generation-rows", "2")


@pytest.fixture(scope="session")
def trained_prefix(tmp_path_factory) -> Path:
    """A prefix-tuning adapter from a real 3-step train.sft run on the embedded model."""
    return _train(
        tmp_path_factory.mktemp("runs") / "prefix",
        "--method",
        "prefix",
        "--max-steps",
        "3",
        "--virtual-tokens",
        "8",
        "--learning-rate",
        "3e-2",
    )


@dataclass
class Server:
    """The running app: its URL, Blocks and model registry."""

    url: str
    demo: object
    registry: object


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter folder ("pirate") on the embedded model with random B weights, so it changes replies."""
    import torch
    from peft import LoraConfig, get_peft_model

    from assistant.models import load_base_model, load_tokenizer, pick_precision

    torch.manual_seed(0)
    model = get_peft_model(
        load_base_model("embedded", pick_precision("fp32")),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op adapter); make it matter
                param.normal_(0.0, 0.5)
    folder = tmp_path_factory.mktemp("adapters") / "pirate"
    model.save_pretrained(folder)
    load_tokenizer("embedded").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def app_server(lora_adapter, tmp_path_factory) -> Server:
    """The real app on a free localhost port: the embedded model (chosen) plus the test adapter in the
    menu, short greedy replies."""
    from serve.registry import BASE_CHOICE, ModelRegistry
    from ui.app import build_app
    from ui.config import ChatConfig

    # Its own jobs folder: the repository's jobs/ is for a developer's app (one server per jobs folder).
    config = ChatConfig(adapters_dir=str(lora_adapter.parent), max_queue=8,
                        jobs_dir=str(tmp_path_factory.mktemp("jobs")))
    registry = ModelRegistry(config.adapters_dir, default=BASE_CHOICE)
    demo = build_app(config, defaults={"max_new_tokens": 24, "temperature": 0.0}, registry=registry)
    demo.registry.get(demo.registry.default_choice())  # load now, not inside the first test's timing
    port = free_port()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield Server(url.rstrip("/") + "/", demo, demo.registry)
    demo.close()


@pytest.fixture
def forced_long_replies(monkeypatch) -> list[int]:
    """Replies that cannot end by themselves before their token budget (their end-of-turn tokens are ruled
    out), so only a Stop, a cancel or a disconnect ends one early. Returns the decode steps counted so far
    (one item per step of any batch): a cancellation test compares them before and after it cancels."""
    from assistant import batching

    def never_end(self, input_ids, scores):
        for row, request in enumerate(self.batch):
            if request.stop_ids:
                scores[row, list(request.stop_ids)] = -float("inf")
        return scores

    steps: list[int] = []
    step = batching._RowStop.__call__

    def counted(self, input_ids, scores, **kwargs):
        steps.append(1)
        return step(self, input_ids, scores, **kwargs)

    monkeypatch.setattr(batching._MinTokens, "__call__", never_end)
    monkeypatch.setattr(batching._RowStop, "__call__", counted)
    return steps


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium driven by Playwright (skipped where it is not installed)."""
    if not CHROMIUM.exists():
        pytest.skip(NEEDS_CHROMIUM)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(NEEDS_PLAYWRIGHT)

    # Playwright's own browser downloads are never used; keep it from looking for them.
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser, app_server):
    """Factory: a fresh browser context (its own localStorage: one "user") with the app loaded.

    Each page gets `.dialogs`, the JavaScript dialogs (alert, confirm...) it raised.
    """
    from ui.app import STORAGE_KEY

    contexts = []

    def open_() -> object:
        context = browser.new_context()
        contexts.append(context)
        page = context.new_page()
        page.dialogs = []

        def on_dialog(dialog):
            page.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.goto(app_server.url)
        page.wait_for_selector("#message textarea")
        # The app is ready once gr.BrowserState has written this browser's (empty) history.
        page.wait_for_function(f"localStorage.getItem({STORAGE_KEY!r}) !== null")
        return page

    yield open_
    for context in contexts:
        context.close()


def skip_reason(report) -> str:
    """The reason a skipped test (or module) gave, without pytest's "Skipped: " prefix."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr
    return str(reason).removeprefix("Skipped: ")


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """A closing block naming every group of skipped tests and the command that makes it run: "N skipped"
    alone reads like nothing is wrong, yet the browser tests, the llama.cpp round trips and the Go checks
    are the only tests of what a user sees, of what Ollama runs and of the templates it renders."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    groups: dict[str, list] = {}
    for report in skipped:
        groups.setdefault(skip_reason(report), []).append(report)
    tests = "test was" if len(skipped) == 1 else "tests were"
    terminalreporter.write_sep("=", f"{len(skipped)} {tests} skipped: run each command below, then make test",
                               yellow=True, bold=True)
    write = terminalreporter.write_line
    for reason, reports in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        why, _, command = reason.partition(RUN)
        files = sorted({report.nodeid.split("::")[0] for report in reports})
        count = f"{len(reports)} test" + ("" if len(reports) == 1 else "s")
        write(why, bold=True)
        write(f"    {count} in {', '.join(files)}")
        if command:
            write(f"    to run them: {command}", yellow=True, bold=True)
        else:
            write("    no command given: skip with tests.conftest.needs(why, command)", red=True, bold=True)
