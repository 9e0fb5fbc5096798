"""Each benchmark's --quick mode runs end to end and ends with a sane FINAL JSON line (keeps bench/ from rotting)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NEEDS_CHROMIUM

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
                    "api_tok_s_1", "api_tok_s_8", "api_failures", "startup_s_warm", "first_answer_s_warm"],
    # ROUGE-L may be 0 for 8-token replies: test_quality_quick checks its range instead.
    "quality": ["perplexity_ours", "perplexity_trl", "perplexity_base", "wall_s_ours", "wall_s_trl",
                "peak_mb_ours", "peak_mb_trl"],
}
# Keys that may be null in a quick run: the default-TRL run is skipped, llama.cpp needs its own venv.
OPTIONAL = {"tokens_per_s_trl_default", "decode_tok_s_llamacpp", "ratio_vs_llamacpp"}


def run_quick(name: str, tmp_path: Path, timeout: float, *extra: str) -> tuple[dict, dict, str]:
    """Run `python -m bench.NAME --quick`; the FINAL line, the results file and stdout."""
    output = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick", "--output", str(output), *extra],
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
    from train.export.llamacpp import find_python

    if find_python():
        assert final["decode_tok_s_llamacpp"], saved["final"].get("llamacpp_error")
    else:
        assert final["llamacpp_error"]
    assert final["bound_tok_s"] > 0 and saved["engines"]


@pytest.mark.slow
def test_concurrency_quick(tmp_path: Path) -> None:
    final, saved, _ = run_quick("concurrency", tmp_path, timeout=600)
    check_final("concurrency", final)
    assert set(saved["levels"]) == set(saved["api_levels"]) == set(saved["rounds"]) == {"1", "4", "8"}
    assert final["first_answer_s_warm"] > final["startup_s_warm"] > 0, final


@pytest.mark.slow
def test_concurrency_over_adapters_quick(tmp_path: Path) -> None:
    final, saved, _ = run_quick("concurrency", tmp_path, 600, "--adapters", "2")
    assert final["failures"] == 0, final
    for key in ("tok_s_8_chats_1_adapter", "tok_s_8_chats_2_adapters", "ratio_2_adapters_vs_1", "rss_mb_2_adapters"):
        assert isinstance(final[key], int | float) and final[key] > 0, (key, final)
    # Not rss 2 >= rss 1: an attach gives freed heap pages back (a chat's transients), and an adapter of bf16
    # weights (~8 MB) can cost less than what that returns; the full bench measures over 8 adapters.
    assert final["rss_mb_1_adapter"] > 0 and saved["final"] == final


@pytest.mark.slow
@pytest.mark.browser
def test_first_token_quick(tmp_path: Path) -> None:
    if not Path("/usr/bin/chromium").exists():
        pytest.skip(NEEDS_CHROMIUM)
    final, saved, _ = run_quick("first_token", tmp_path, 600)
    assert final["rounds"] == 2 == len(saved["times_s"]) and 0 < final["median_s"] <= final["max_s"] < 60, final


@pytest.mark.slow
def test_quality_quick(tmp_path: Path) -> None:
    final, saved, stdout = run_quick("quality", tmp_path, timeout=900)
    check_final("quality", final)
    assert saved["final"] == final
    runs = saved["runs"]
    assert set(runs) == {"ours", "trl", "base"}
    for name, run in runs.items():
        for key in ("rouge_l", "perplexity", "bleu"):
            assert isinstance(run[key], int | float) and not isinstance(run[key], bool), (name, key, run[key])
        assert 0 <= run["rouge_l"] <= 1 and 0 <= run["bleu"] <= 100, (name, run["rouge_l"], run["bleu"])
        # SmolLM2-135M-Instruct on STAR replies: far from 1 (memorised) and from the vocabulary size (random).
        assert 1.5 < run["perplexity"] < 1000, (name, run["perplexity"])
        assert [type(r["reply"]) for r in run["replies"]] == [str, str], name
    assert runs["ours"]["steps"] == runs["trl"]["steps"] == 2
    # Each adapter was loaded for scoring: 2 steps at lr 5e-3 move the reference perplexity off the base's.
    assert runs["ours"]["perplexity"] != runs["base"]["perplexity"]
    assert runs["trl"]["perplexity"] != runs["base"]["perplexity"]
    assert final["rouge_l_ours_minus_trl"] == round(final["rouge_l_ours"] - final["rouge_l_trl"], 4)
    assert final["cpu"] and "ROUGE-L ours - TRL" in stdout
    assert (tmp_path / "quality.png").is_file()
