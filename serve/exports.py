"""Adapter exports (`python -m train.export`) run as processes whose progress the caller follows.

serve never imports train: an export is `python -m train.export ADAPTER --to KIND --output-dir DIR
--events-file F` run from the repository, every path absolute. Its phases (train.export's --events-file:
"phase" lines with the share of the work done, then "done" with the summary or "error" with the message)
are read as they come, so a front end shows progress instead of a frozen button, and the result is the
summary, or ExportFailed with train.export's own message.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from serve.processes import ROOT, env, model_arg

logger = logging.getLogger(__name__)

PROGRAM = (sys.executable, "-m", "train.export")
EVENTS = "export_events.jsonl"  # beside the output folder, in the folder the caller gave it
LOG = "export.log"
POLL_S = 0.25


class ExportFailed(RuntimeError):
    """An export that did not finish: train.export's message (or why the process ended)."""


class Export:
    """One running (or finished) `python -m train.export` process."""

    def __init__(self, argv: list[str], output_dir: Path, events: Path, log: Path):
        self.argv, self.output_dir, self.events_path, self.log_path = argv, output_dir, events, log
        self.started = time.monotonic()
        with log.open("w") as out:  # stdout (the summary) and stderr (logs, errors) in one file
            self.process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                            env=env(), start_new_session=True)  # its own group: stop ends all

    def events(self) -> list[dict]:
        """The export's progress lines so far (a torn last line is skipped)."""
        if not self.events_path.is_file():
            return []
        lines = []
        for line in self.events_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    @property
    def done(self) -> bool:
        """Whether the process has ended."""
        return self.process.poll() is not None

    def wait(self, on_phase: Callable[[dict], None] | None = None, poll_s: float = POLL_S) -> str:
        """Follow the export to its end, telling `on_phase` each new phase line (with "elapsed_s"); returns its
        summary, or raises ExportFailed. The process is stopped if the wait itself fails."""
        seen = 0
        try:
            while True:
                finished = self.done  # read before the events: every line written before the exit is seen
                events = self.events()
                for event in events[seen:]:
                    if event.get("event") == "phase" and on_phase is not None:
                        on_phase({**event, "elapsed_s": round(time.monotonic() - self.started, 1)})
                seen = len(events)
                if finished:
                    return self.result()
                time.sleep(poll_s)
        finally:
            self.stop()

    def result(self) -> str:
        """The finished export's summary; ExportFailed with train.export's message when it failed."""
        events = self.events()
        done = [e for e in events if e.get("event") == "done"]
        if self.process.returncode == 0 and done:
            return str(done[-1].get("summary", ""))
        errors = [str(e.get("message")) for e in events if e.get("event") == "error"]
        if errors:
            raise ExportFailed(errors[-1])
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] if self.log_path.is_file() else []
        logger.warning("train.export failed (exit %s); its output is in %s", self.process.returncode, self.log_path)
        raise ExportFailed(f"train.export ended with code {self.process.returncode}"
                           + (f": {tail[0]}" if tail else "") + f" (its output: {self.log_path})")

    def stop(self) -> None:
        """End the process (and its children) if it still runs."""
        if self.done:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class ExportRunner:
    """Starts exports; `program` is how train.export is run (a test may run a stand-in), `extra_args` go to
    every export (e.g. --skip-verify)."""

    extra_args: Sequence[str] = ()

    def __init__(self, program: Sequence[str] = PROGRAM, extra_args: Sequence[str] | None = None):
        self.program = list(program)
        if extra_args is not None:
            self.extra_args = list(extra_args)

    def start(self, adapter: str | Path, to: str, output_dir: str | Path, *, base_model: str | None = None,
              args: Sequence[str] = ()) -> Export:
        """Start exporting `adapter` to `to` (ollama, gguf or merged) into `output_dir`; its progress and log go
        beside that folder. `base_model` (merged): the base to merge into; `args`: more train.export flags."""
        output = Path(output_dir).absolute()
        output.parent.mkdir(parents=True, exist_ok=True)
        events, log = output.parent / EVENTS, output.parent / LOG
        events.unlink(missing_ok=True)
        argv = [*self.program, str(Path(adapter).absolute()), "--to", to, "--output-dir", str(output),
                "--events-file", str(events)]
        if base_model:
            argv += ["--base-model", model_arg(base_model)]
        argv += [*self.extra_args, *args]
        logger.info("exporting %s to %s: %s", adapter, to, output)
        return Export(argv, output, events, log)
