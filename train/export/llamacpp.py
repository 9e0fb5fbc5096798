"""llama.cpp's Python binding (llama-cpp-python): found, or built from source into its own venv.

The binding is compiled from source, so it lives in a venv of its own under the cache (shared by
`train.export --verify` and `bench.decode_speed`) and runs our workers as subprocesses: the project's
venv never depends on it, and a crash in native code cannot take the caller down.

The build is portable, not `-march=native`: ggml's x86-64 baseline of AVX2, FMA, F16C and BMI2 (every
x86-64 CPU since Intel Haswell and AMD Zen 1), no AVX-512, no AMX. A native build on an Intel Xeon with
AMX segfaulted on batched evaluation (its AMX matrix kernels). ggml's runtime dispatch
(GGML_CPU_ALL_VARIANTS) needs GGML_BACKEND_DL, whose per-CPU backend libraries llama-cpp-python 0.3.36
neither installs nor loads, so one baseline it is. `build.json` in the venv records the flags and the
llama.cpp commit; a venv built any other way (an older native build) is rebuilt.

    python -m train.export.llamacpp --build     # build it now (10-30 min on 2 cores); .ci/run does
    python -m train.export.llamacpp             # where it is and how it was built
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from assistant.embedded import cache_root

logger = logging.getLogger(__name__)

LLAMACPP_VERSION = "0.3.36"
# The llama.cpp commit llama-cpp-python 0.3.36 vendors (its CHANGELOG: "update llama.cpp to
# ggml-org/llama.cpp@0c1e57098"); the sdist carries no .git, so the build cannot ask.
LLAMACPP_COMMIT = "0c1e57098"
WORKER = Path(__file__).resolve().parent / "llamacpp_worker.py"
X86_BASELINE = ["-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                "-DGGML_BMI2=ON", "-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF",
                "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF", "-DGGML_AMX_TILE=OFF",
                "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
STAMP = "build.json"
BUILD_LOG = "build.log"


class LlamaCppUnavailable(RuntimeError):
    """llama.cpp's binding is neither importable nor buildable here; the message says why."""


def venv_dir() -> Path:
    """Where the binding is built: $ASSISTANT_CACHE (or ~/.cache/chat-assistant)/llama-cpp-python-VERSION."""
    return cache_root() / f"llama-cpp-python-{LLAMACPP_VERSION}"


def cmake_args(machine: str | None = None) -> list[str]:
    """CMAKE_ARGS of the portable build: no -march=native; on x86-64 the AVX2/FMA/F16C baseline.

    LLAVA_BUILD=OFF: the multimodal library (mtmd), which llama_cpp imports only for image chats."""
    machine = (machine or platform.machine()).lower()
    x86 = machine in ("x86_64", "amd64")
    return ["-DGGML_NATIVE=OFF", *(X86_BASELINE if x86 else []), "-DLLAVA_BUILD=OFF"]


def wanted_stamp() -> dict:
    """What build.json must say for the venv's binding to be used: version, llama.cpp commit, flags."""
    return {"llama_cpp_python": LLAMACPP_VERSION, "llama_cpp_commit": LLAMACPP_COMMIT, "cmake_args": cmake_args()}


def read_stamp(venv: Path | None = None) -> dict | None:
    """The venv's build.json, or None when there is none (or it is unreadable)."""
    try:
        return json.loads(((venv or venv_dir()) / STAMP).read_text())
    except (OSError, ValueError):
        return None


def stamp_matches(stamp: dict | None) -> bool:
    """True when `stamp` records the build this code asks for (extra keys, such as the date, do not count)."""
    return stamp is not None and all(stamp.get(key) == value for key, value in wanted_stamp().items())


def find_python() -> str | None:
    """An interpreter that imports llama_cpp: this one (a binding you installed yourself), else the built
    venv's when its build.json matches this build; None when neither does."""
    if _imports(sys.executable):
        return sys.executable
    python = venv_dir() / "bin" / "python"
    if python.exists() and stamp_matches(read_stamp()) and _imports(str(python)):
        return str(python)
    return None


def ensure_python(build_timeout: float = 3600, force: bool = False) -> str:
    """An interpreter that imports llama_cpp, building llama-cpp-python from source when there is none.

    A venv whose build.json differs from this build (no stamp: an older native build) is removed first."""
    found = None if force else find_python()
    if found:
        return found
    return build(build_timeout)


def build(build_timeout: float = 3600) -> str:
    """Build llama-cpp-python portably into a fresh venv_dir() and stamp it; its python."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    if venv.exists():
        logger.info("removing %s (built as %s; this build is %s)", venv, read_stamp(venv) or "no build.json",
                    wanted_stamp())
        shutil.rmtree(venv)
    args = cmake_args()
    logger.info("building llama-cpp-python==%s into %s (llama.cpp %s, %s: 10-30 min on 2 cores)",
                LLAMACPP_VERSION, venv, LLAMACPP_COMMIT, " ".join(args))
    started = time.monotonic()
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        with open(venv / BUILD_LOG, "w") as log:
            done = subprocess.run(
                [str(python), "-m", "pip", "install", "--no-cache-dir", "--no-binary", "llama-cpp-python",
                 f"llama-cpp-python=={LLAMACPP_VERSION}"],
                env={**os.environ, "CMAKE_ARGS": " ".join(args), "FORCE_CMAKE": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=build_timeout,
            )
    except (OSError, subprocess.SubprocessError) as error:
        raise LlamaCppUnavailable(f"building llama-cpp-python failed: {error}") from error
    if done.returncode != 0 or not _imports(str(python)):
        tail = "\n".join((venv / BUILD_LOG).read_text(errors="replace").strip().splitlines()[-5:])
        raise LlamaCppUnavailable(
            f"building llama-cpp-python failed (exit {done.returncode}; it needs a C++ compiler and cmake: "
            f"apt-get install -y cmake g++); log: {venv / BUILD_LOG}\n{tail}"
        )
    stamp = {**wanted_stamp(), "machine": platform.machine(), "system_info": _system_info(str(python)),
             "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_s": round(time.monotonic() - started)}
    (venv / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
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


def _system_info(python: str) -> str | None:
    """llama.cpp's own list of the CPU features it was compiled with (AVX2 = 1 ...)."""
    try:
        run = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    """`python -m train.export.llamacpp [--build [--force]]`: build the binding, or say where it is."""
    parser = argparse.ArgumentParser(prog="python -m train.export.llamacpp",
                                     description="llama.cpp's Python binding for train.export --verify and bench.")
    parser.add_argument("--build", action="store_true",
                        help="Build it when it is missing or was built another way (10-30 min on 2 cores).")
    parser.add_argument("--force", action="store_true", help="With --build: rebuild even when it is here.")
    parser.add_argument("--timeout", type=float, default=3600, help="Seconds the build may take.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.build:
        try:
            python = ensure_python(args.timeout, force=args.force)
        except LlamaCppUnavailable as error:
            print(error, file=sys.stderr)
            return 1
        print(f"llama.cpp's binding: {python}")
        return 0
    python = find_python()
    stamp = read_stamp()
    if python:
        print(f"llama.cpp's binding: {python}")
        if python != sys.executable:
            print(json.dumps(stamp, indent=2))
        return 0
    why = "not built" if stamp is None else f"built another way ({json.dumps(stamp)})"
    print(f"llama.cpp's binding: {venv_dir()} {why}; build it: python -m train.export.llamacpp --build",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
