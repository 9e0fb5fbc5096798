"""Each benchmark's --quick mode runs end to end and ends with a sane FINAL JSON line (keeps bench/ from rotting)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

REQUIRED = {
    "train_speed": [
        "tokens_per_s_ours",
        "tokens_per_s_trl_tuned",
        "tokens_per_s_trl_default",
        "ratio_vs_trl_tuned",
        "eval_loss_ours",
        "eval_loss_trl_tuned",
        "peak_mb_ours",
        "peak_mb_trl_tuned",
    ],
    "decode_speed": [
        "decode_tok_s_ours",
        "decode_tok_s_plain",
        "decode_tok_s_llamacpp",
        "ratio_vs_llamacpp",
        "ttft_s_ours",
        "bound_tok_s",
    ],
    "concurrency": ["tok_s_1", "tok_s_4", "tok_s_8", "ratio_8_vs_1", "p95_ttft_s_8", "failures",
                    "api_tok_s_1", "api_tok_s_8", "api_failures"],
}
# Keys that may be null in a quick run: the default-TRL run is skipped, llama.cpp needs its own venv.
OPTIONAL = {"tokens_per_s_trl_default", "decode_tok_s_llamacpp", "ratio_vs_llamacpp"}


def run_quick(name: str, tmp_path: Path, timeout: float) -> tuple[dict, dict, str]:
    """Run `python -m bench.NAME --quick`; the FINAL line, the results file and stdout."""
    output = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    return final, json.loads(output.read_text()), proc.stdout


def check_final(name: str, final: dict) -> None:
    """Every required key present; every present number positive (failures: zero)."""
    for key in REQUIRED[name]:
        assert key in final, f"{name}: FINAL line lacks {key}"
        value = final[key]
        if key.endswith("failures"):
            assert value == 0, final
        elif value is None:
            assert key in OPTIONAL, f"{name}: {key} is null"
        else:
            assert isinstance(value, int | float) and value > 0, f"{name}: {key} = {value!r}"


@pytest.mark.slow
def test_train_speed_quick(tmp_path: Path) -> None:
    final, saved, stdout = run_quick("train_speed", tmp_path, timeout=600)
    check_final("train_speed", final)
    assert saved["final"] == final
    assert "tokens/s" in stdout and final["eval_loss_ours"] < 10
    assert (tmp_path / "train_speed.png").is_file()


@pytest.mark.slow
def test_decode_speed_quick(tmp_path: Path) -> None:
    final, saved, _ = run_quick("decode_speed", tmp_path, timeout=600)
    check_final("decode_speed", final)
    if (ROOT / "bench" / ".venv-llamacpp" / "bin" / "python").exists():
        assert final["decode_tok_s_llamacpp"], saved["final"].get("llamacpp_error")
    else:
        assert final["llamacpp_error"]
    assert final["bound_tok_s"] > 0 and saved["engines"]


@pytest.mark.slow
def test_concurrency_quick(tmp_path: Path) -> None:
    final, saved, _ = run_quick("concurrency", tmp_path, timeout=600)
    check_final("concurrency", final)
    assert set(saved["levels"]) == set(saved["api_levels"]) == {"1", "4", "8"}
