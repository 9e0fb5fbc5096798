"""The dataset doctor (`python -m train.check FILE --json`) as a process: one call for the jobs and the Train tab.

serve never imports train: the doctor runs as its own process from the repository, every path handed to it
absolute (the server may run from any folder), and a system prompt only as a file the caller wrote
(`--system-prompt @FILE`), never as text a user typed (train.check would read "@PATH" as a file).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from serve.processes import ROOT, env, model_arg

logger = logging.getLogger(__name__)

TIMEOUT_S = 30 * 60.0  # a doctor still reading after this is stopped; its report says so
SUMMARY = ("format:", "examples:", "tokens:")  # the report's lines a job's status message quotes


@dataclass(frozen=True)
class DoctorReport:
    """The doctor's verdict on one file: trainable or not, and its report lines (problems start "error: ")."""

    ok: bool
    lines: tuple[str, ...]

    def problems(self) -> list[str]:
        """The report's errors, without their "error: " prefix."""
        return [line.removeprefix("error: ") for line in self.lines if line.startswith("error: ")]

    def summary(self) -> list[str]:
        """The format, examples and tokens lines."""
        return [line for line in self.lines if line.startswith(SUMMARY)]

    def text(self, path: str | Path, name: str) -> str:
        """The report as text, naming the file `name` (as its user knows it) instead of `path`."""
        text = "\n".join(self.lines)
        for spelled in {str(Path(path).absolute()), str(path)}:
            text = text.replace(spelled, name)
        return text


def command(data: str | Path, base_model: str, system_prompt_file: str | Path | None = None,
            kind: str = "auto") -> list[str]:
    """The doctor's command line, every path absolute (`kind`: what the file must hold, train.check --kind)."""
    argv = [sys.executable, "-m", "train.check", str(Path(data).absolute()), "--base-model", model_arg(base_model),
            "--json", "--kind", kind]
    if system_prompt_file is not None:
        argv += ["--system-prompt", f"@{Path(system_prompt_file).absolute()}"]
    return argv


def diagnose(data: str | Path, base_model: str, system_prompt_file: str | Path | None = None,
             timeout: float = TIMEOUT_S, kind: str = "auto", items_file: Path | None = None) -> DoctorReport:
    """The doctor's report on `data` for `base_model`'s tokenizer and chat template (`system_prompt_file`: the
    prompt for rows without one; `kind`: "sft", "preference" or "auto", as its first row is; `items_file`: where
    it also writes the conversations as eval items, train.check --eval-items)."""
    argv = command(data, base_model, system_prompt_file, kind)
    if items_file is not None:
        argv += ["--eval-items", str(Path(items_file).absolute())]
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env=env())
    except subprocess.TimeoutExpired:
        return DoctorReport(False, (f"error: the dataset doctor took over {timeout:g} s on {data}; "
                                    "try a smaller file",))
    report = _parse(done.stdout)
    if report is None or report.ok != (done.returncode == 0):
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        logger.warning("the dataset doctor failed on %s (exit %s): %s", data, done.returncode, done.stderr[-2000:])
        return DoctorReport(False, (f"error: the dataset doctor failed: {tail[0]}",))
    return report


def eval_items(data: str | Path, base_model: str, max_rows: int = 0) -> tuple[DoctorReport, list[dict]]:
    """The doctor's report on a held-out file and, when it accepts it, its conversations as eval items
    ({"messages", "reference"}; the first `max_rows`, 0: all)."""
    with tempfile.TemporaryDirectory(prefix="eval-items-") as folder:
        path = Path(folder) / "items.jsonl"
        report = diagnose(data, base_model, kind="sft", items_file=path)
        if not report.ok:
            return report, []
        items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return report, items[:max_rows] if max_rows else items


def _parse(stdout: str) -> DoctorReport | None:
    """train.check --json's one object (its last line of output), or None when there is none."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            found = json.loads(line)
        except ValueError:
            continue
        if isinstance(found, dict) and isinstance(found.get("ok"), bool) and isinstance(found.get("lines"), list):
            return DoctorReport(found["ok"], tuple(str(item) for item in found["lines"]))
    return None
