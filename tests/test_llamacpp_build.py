"""llama.cpp's binding is built portably (no -march=native, no AVX-512/AMX) and stamped; a venv built any
other way, such as an older native build with no build.json, is not used but rebuilt. No compiler runs
here: the build's commands are faked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from train.export import llamacpp


def test_the_build_is_portable_on_every_cpu():
    x86 = llamacpp.cmake_args("x86_64")
    assert "-DGGML_NATIVE=OFF" in x86 and not any("NATIVE=ON" in a for a in x86)
    for on in ("AVX", "AVX2", "FMA", "F16C", "BMI2"):
        assert f"-DGGML_{on}=ON" in x86
    for off in ("AVX512", "AVX512_BF16", "AVX512_VNNI", "AMX_TILE", "AMX_INT8", "AMX_BF16"):
        assert f"-DGGML_{off}=OFF" in x86
    assert llamacpp.cmake_args("aarch64") == ["-DGGML_NATIVE=OFF", "-DLLAVA_BUILD=OFF"]


def test_only_a_stamp_of_this_very_build_matches():
    wanted = llamacpp.wanted_stamp()
    assert wanted["llama_cpp_commit"] == llamacpp.LLAMACPP_COMMIT and wanted["cmake_args"] == llamacpp.cmake_args()
    assert llamacpp.stamp_matches({**wanted, "built_at": "any day"})
    assert not llamacpp.stamp_matches(None)  # an old build: no build.json
    assert not llamacpp.stamp_matches({**wanted, "cmake_args": ["-DGGML_NATIVE=ON"]})
    assert not llamacpp.stamp_matches({**wanted, "llama_cpp_commit": "0000000"})


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """The cache in tmp_path, and subprocess.run answering for venv, pip and python the way a build does."""
    monkeypatch.setenv("ASSISTANT_CACHE", str(tmp_path / "cache"))
    calls: list[dict] = []
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        cmd = [str(c) for c in cmd]
        venv = llamacpp.venv_dir()
        if cmd[0] == sys.executable and cmd[1:2] == ["-c"]:  # the project's own python: no llama_cpp
            return subprocess.CompletedProcess(cmd, 1, "", "")
        if cmd[1:3] == ["-m", "venv"]:
            (venv / "bin").mkdir(parents=True)
            (venv / "bin" / "python").write_text("")
        elif cmd[1:3] == ["-m", "pip"]:
            calls.append({"pip": cmd, "cmake_args": kwargs["env"]["CMAKE_ARGS"]})
            (venv / "installed").write_text("")
        elif cmd[1:2] == ["-c"]:  # the venv's python: imports llama_cpp once pip has run
            ok = (venv / "installed").exists()
            return subprocess.CompletedProcess(cmd, 0 if ok else 1, "AVX = 1 | AVX2 = 1 |" if ok else "", "")
        else:
            return real_run(cmd, *args, **kwargs)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(llamacpp.subprocess, "run", run)
    return calls


def test_an_old_native_build_is_replaced_by_the_portable_one(fake_build):
    venv = llamacpp.venv_dir()
    (venv / "bin").mkdir(parents=True)  # built by the old code: imports llama_cpp, no build.json
    (venv / "bin" / "python").write_text("")
    (venv / "installed").write_text("")
    (venv / "native-only").write_text("")
    assert llamacpp.find_python() is None, "a build without this build's stamp is not used"

    python = llamacpp.ensure_python()
    assert python == str(venv / "bin" / "python") and not (venv / "native-only").exists(), "rebuilt from scratch"
    [call] = fake_build
    assert call["cmake_args"] == " ".join(llamacpp.cmake_args()) and "-DGGML_NATIVE=OFF" in call["cmake_args"]
    assert f"llama-cpp-python=={llamacpp.LLAMACPP_VERSION}" in call["pip"]
    stamp = json.loads((venv / "build.json").read_text())
    assert llamacpp.stamp_matches(stamp) and stamp["system_info"].startswith("AVX = 1")
    assert llamacpp.find_python() == python and llamacpp.ensure_python() == python and len(fake_build) == 1


def test_the_build_entry_point(fake_build, capsys):
    assert llamacpp.main([]) == 1
    assert "python -m train.export.llamacpp --build" in capsys.readouterr().err
    assert llamacpp.main(["--build"]) == 0 and len(fake_build) == 1
    assert llamacpp.main([]) == 0 and '"llama_cpp_commit"' in capsys.readouterr().out
    assert llamacpp.main(["--build"]) == 0 and len(fake_build) == 1, "built already: nothing to do"
    assert llamacpp.main(["--build", "--force"]) == 0 and len(fake_build) == 2
