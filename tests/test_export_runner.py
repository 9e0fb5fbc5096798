"""Exports run as processes (serve.exports): their phases come while they run, then the summary or the error."""

from __future__ import annotations

import signal
import sys

import pytest

from serve.access import AccessPolicy
from serve.exports import ExportFailed, ExportRunner
from serve.registry import ModelRegistry
from tests.test_ui_export import LOOPBACK, request_from
from ui.export_panel import ExportPanel

# A stand-in for train.export: two phases a second apart, then done (or, with FAIL, a crash with no event).
STAND_IN = """
import json, sys, time
argv = sys.argv[1:]
events = argv[argv.index("--events-file") + 1]
def write(**line):
    with open(events, "a") as out:
        out.write(json.dumps({"time": time.time(), **line}) + "\\n")
write(event="phase", phase="checking", message="checking", progress=0.0)
time.sleep(1.0)
write(event="phase", phase="writing", message="writing", progress=0.5)
time.sleep(1.0)
if "FAIL" in argv:
    raise SystemExit("it broke")
write(event="done", summary="written to " + argv[argv.index("--output-dir") + 1])
"""


def test_phases_arrive_while_the_export_runs_then_its_summary(tmp_path):
    runner = ExportRunner([sys.executable, "-c", STAND_IN])
    export = runner.start(tmp_path / "adapter", "gguf", tmp_path / "out" / "a-gguf")
    seen: list[tuple[str, bool]] = []
    summary = export.wait(lambda event: seen.append((event["phase"], export.done)), poll_s=0.05)
    assert seen == [("checking", False), ("writing", False)], "each phase is told while the export still runs"
    assert summary == f"written to {tmp_path / 'out' / 'a-gguf'}"

    failing = runner.start(tmp_path / "adapter", "gguf", tmp_path / "out2" / "a-gguf", args=["FAIL"])
    with pytest.raises(ExportFailed, match="ended with code 1: it broke"):
        failing.wait(poll_s=0.05)


def test_a_wait_that_fails_stops_the_export(tmp_path):
    export = ExportRunner([sys.executable, "-c", STAND_IN]).start(tmp_path / "a", "gguf", tmp_path / "out" / "x")

    def broken(event: dict) -> None:
        raise RuntimeError("the page went away")

    with pytest.raises(RuntimeError, match="went away"):
        export.wait(broken, poll_s=0.05)
    assert export.done and export.process.returncode == -signal.SIGTERM, "stopped, not left running"


@pytest.mark.slow
def test_the_panel_shows_train_exports_phases_as_its_progress(lora_adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(ExportRunner, "extra_args", ("--skip-verify",))
    panel = ExportPanel(ModelRegistry(lora_adapter.parent), AccessPolicy(), root=tmp_path / "exports")
    shown: list[tuple[float, str]] = []
    text, archive = panel.export("pirate", "ollama", request_from(LOOPBACK),
                                 progress=lambda share, desc="": shown.append((share, desc)))
    assert archive is not None, text
    phases = [desc.split(" (", 1)[0] for _, desc in shown]
    assert phases[1:4] == ["Checking " + str(lora_adapter), "Copying the base GGUF and writing the LoRA GGUF",
                           "Writing the Modelfile"], shown
    assert all("s so far" in desc for _, desc in shown[1:4])
    assert [share for share, _ in shown] == sorted(share for share, _ in shown), "the bar only moves forward"
