"""train.dpo: its command line, the dataset doctor on preference pairs, and a real run on top of an SFT adapter."""

import subprocess
import sys

import pytest

from tests.conftest import DATA, ROOT
from train.check import CheckConfig, examine


def dpo(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    """Run `python -m train.dpo` the way a user does."""
    return subprocess.run([sys.executable, "-m", "train.dpo", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_defaults_and_refusals_of_the_command_line(capsys):
    from train.dpo import parse_config

    config = parse_config(["p.jsonl"])
    assert (config.beta, config.lr, config.method) == (0.1, 1e-4, "lora")
    assert parse_config(["p.jsonl", "--learning-rate-multiplier", "3"]).lr == pytest.approx(3e-4)
    for argv in (["--beta", "0"], ["--learning-rate", "1e-4", "--learning-rate-multiplier", "2"]):
        with pytest.raises(SystemExit) as refused:
            parse_config(["p.jsonl", *argv])
        assert refused.value.code == 2 and "python -m train.dpo: error: " in capsys.readouterr().err


def test_the_doctor_reads_preference_pairs_and_refuses_conversations_as_them():
    found = examine(CheckConfig(data=str(DATA / "prefs.jsonl")))
    assert found.ok, found.lines
    assert found.lines[1] == ("format: openai_preference (20 rows), prompt_chosen_rejected (20 rows) "
                              "(preference pairs, for python -m train.dpo)")
    assert found.lines[2] == "examples: 40 trainable pairs, 0 dropped, 0 truncated"
    assert found.lines[-1] == "ok: ready to train (python -m train.dpo)"
    wrong = examine(CheckConfig(data=str(DATA / "valid_pairs.jsonl"), kind="preference"))
    assert not wrong.ok and wrong.lines[0].startswith(f"error: {DATA / 'valid_pairs.jsonl'}:1: not a preference row")
    assert examine(CheckConfig(data=str(DATA / "valid_pairs.jsonl"))).ok, "auto: conversations stay train.sft's"


# A real run on top of an SFT adapter, through a job: tests/test_fine_tuning_api.py (the DPO job test).
