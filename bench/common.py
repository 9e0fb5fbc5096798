"""Helpers shared by the benchmarks: config parsing, timing, peak memory, subprocesses, tables, JSON and plots."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

T = TypeVar("T")


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Parse the command line into the benchmark's config dataclass with transformers.HfArgumentParser."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls, description=description or cls.__doc__)
    (config,) = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    return config


def log(message: str) -> None:
    """Progress for the person watching; stderr, so stdout keeps only the table and the JSON line."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def machine_load() -> float:
    """1-minute load average; logs a warning when other work competes for the cores (timings get noisy)."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load > 0.5:
        log(
            f"warning: load average {load:.2f} on {cores} cores before starting: other processes compete, "
            "timings will be low and noisy (llama.cpp's spinning threads suffer most)"
        )
    return round(load, 2)


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform's guess elsewhere): results differ by machine."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def free_port() -> int:
    """A 127.0.0.1 TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stopwatch:
    """`with Stopwatch() as sw: ...` then `sw.seconds` (perf_counter based)."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class ChildRun:
    """What one measured subprocess did."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_mb: float
    timed_out: bool = False

    def tail(self, lines: int = 15) -> str:
        """Last lines of stderr (then stdout), for error messages."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return "\n".join(text[-lines:])


def run_measured(
    cmd: Sequence[str],
    *,
    timeout: float,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    echo: bool = True,
) -> ChildRun:
    """Run `cmd`, returning its output, wall time and its own peak RSS (os.wait4 rusage of that child).

    stderr is copied to our stderr line by line when `echo` (progress stays visible); the child
    runs in its own process group so a timeout ends it and everything it started.
    """
    log("$ " + " ".join(str(c) for c in cmd))
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out: list[str] = []
    err: list[str] = []

    def pump(stream, sink: list[str], show: bool) -> None:
        for line in stream:
            sink.append(line)
            if show:
                sys.stderr.write("    " + line)
                sys.stderr.flush()

    pumps = [
        threading.Thread(target=pump, args=(proc.stdout, out, False), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, err, echo), daemon=True),
    ]
    for thread in pumps:
        thread.start()
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        # wait4 on this pid gives the rusage of this child alone (RUSAGE_CHILDREN would be a max over all).
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for thread in pumps:
        thread.join(timeout=10)
    return ChildRun(
        returncode=proc.returncode,
        stdout="".join(out),
        stderr="".join(err),
        wall_s=time.perf_counter() - start,
        peak_mb=usage.ru_maxrss / 1024,
        timed_out=timed_out.is_set(),
    )


def last_json_line(text: str) -> dict[str, Any]:
    """The last stdout line that parses as a JSON object (workers print one)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON line in the output")


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats rounded, None as 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width text table; first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def write_results(name: str, data: dict[str, Any], folder: Path = RESULTS) -> Path:
    """Write bench/results/<name>.json and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def print_final(data: dict[str, Any]) -> None:
    """The FINAL line: one JSON object, always the last line on stdout."""
    print(json.dumps(data, separators=(",", ":")), flush=True)


def bar_chart(
    path: Path, labels: Sequence[str], values: Sequence[float | None], *, title: str, ylabel: str
) -> Path | None:
    """A labelled bar chart PNG (missing values drawn as 'n/a'); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(1.8 + 1.5 * len(labels), 4))
    heights = [v or 0.0 for v in values]
    bars = ax.bar(labels, heights, color=["#2b7bba" if i == 0 else "#9aa5b1" for i in range(len(labels))])
    for bar, value in zip(bars, values):
        text = "n/a" if value is None else f"{value:,.1f}"
        ax.annotate(
            text,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator rounded to 3 places, or None when either is missing or zero."""
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)
