"""llama.cpp's Python binding (llama-cpp-python): found, or built from source into its own venv.

The binding compiles llama.cpp for this CPU, so it lives in a venv of its own under the cache
(shared by `train.export --verify` and `bench.decode_speed`) and runs our workers as subprocesses:
the project's venv never depends on it, and a crash in native code cannot take the caller down.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from assistant.embedded import cache_root

logger = logging.getLogger(__name__)

LLAMACPP_VERSION = "0.3.36"
WORKER = Path(__file__).resolve().parent / "llamacpp_worker.py"


class LlamaCppUnavailable(RuntimeError):
    """llama.cpp's binding is neither importable nor buildable here; the message says why."""


def venv_dir() -> Path:
    """Where the binding is built: $ASSISTANT_CACHE (or ~/.cache/chat-assistant)/llama-cpp-python-VERSION."""
    return cache_root() / f"llama-cpp-python-{LLAMACPP_VERSION}"


def find_python() -> str | None:
    """An interpreter that imports llama_cpp: this one, else the built venv's; None when neither does."""
    for python in (sys.executable, str(venv_dir() / "bin" / "python")):
        if Path(python).exists() and _imports(python):
            return python
    return None


def ensure_python(build_timeout: float = 3600) -> str:
    """An interpreter that imports llama_cpp, building llama-cpp-python from source when there is none."""
    found = find_python()
    if found:
        return found
    venv = venv_dir()
    python = venv / "bin" / "python"
    logger.info("building llama-cpp-python==%s into %s (compiles llama.cpp for this CPU: 5-15 min on 2 cores)",
                LLAMACPP_VERSION, venv)
    started = time.monotonic()
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        build = subprocess.run(
            [str(python), "-m", "pip", "install", "--no-cache-dir", f"llama-cpp-python=={LLAMACPP_VERSION}"],
            env={**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"},
            capture_output=True,
            text=True,
            timeout=build_timeout,
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise LlamaCppUnavailable(f"building llama-cpp-python failed: {error}") from error
    if build.returncode != 0 or not _imports(str(python)):
        tail = "\n".join((build.stderr or build.stdout).strip().splitlines()[-5:])
        raise LlamaCppUnavailable(
            f"building llama-cpp-python failed (exit {build.returncode}; it needs a C++ compiler and cmake):\n{tail}"
        )
    logger.info("llama-cpp-python built in %.0f s", time.monotonic() - started)
    return str(python)


def run_worker(python: str, job: dict, timeout: float = 900) -> dict:
    """Run train/llamacpp_worker.py under `python` on `job` (JSON in, JSON out)."""
    run = subprocess.run(
        [python, str(WORKER)], input=json.dumps(job), capture_output=True, text=True, timeout=timeout
    )
    if run.returncode != 0:
        tail = "\n".join(run.stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"llama.cpp failed (exit {run.returncode}):\n{tail}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _imports(python: str) -> bool:
    try:
        check = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return check.returncode == 0
