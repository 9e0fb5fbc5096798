"""train.dpo: its command line, the dataset doctor on preference pairs, and a real run on top of an SFT adapter."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DATA, FAST, ROOT
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


@pytest.mark.slow
def test_dpo_on_top_of_an_sft_adapter_publishes_an_adapter_with_reward_figures(trained_lora, tmp_path):
    from assistant.adapters import find_adapters, folder_signature, read_folder

    untouched = folder_signature(trained_lora)
    out = tmp_path / "adapters" / "dpo"
    events = tmp_path / "events.jsonl"
    done = dpo(str(DATA / "prefs.jsonl"), "--from-adapter", str(trained_lora), "--output-dir", str(out), *FAST,
               "--max-steps", "2", "--save-steps", "2", "--learning-rate", "1e-3", "--events-file", str(events))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"adapter written to {out}: dpo, 2 steps, reward accuracy vs base")
    report = json.loads((out / "training_report.json").read_text())
    pref = report["preference"]
    assert report["training"] == "dpo" and report["from_adapter"] == str(trained_lora) and pref["beta"] == 0.1
    # The reference is the SFT adapter, not the base: before the first step the policy equals it (0.5, 0) while the
    # SFT adapter already scores a non-zero reward against the base model.
    assert pref["before"]["vs_reference"]["reward_accuracy"] == 0.5
    assert pref["before"]["vs_reference"]["reward_margin"] == 0
    assert pref["before"]["vs_base"]["reward_margin"] != 0
    assert pref["after"]["vs_reference"]["reward_margin"] > 0, "DPO moved towards the preferred replies"
    assert pref["after"]["vs_reference"]["reward_accuracy"] > 0.5
    # A normal adapter folder: only the tuned adapter (no "ref" copy), its trained prompt, listed by the app.
    assert not (out / "ref").exists() and read_folder(out).method == "lora"
    assert json.loads((out / "system_prompt.json").read_text()) == json.loads(
        (trained_lora / "system_prompt.json").read_text())
    assert find_adapters(out.parent) == {"dpo": out}
    weights, start = load_file(out / "adapter_model.safetensors"), load_file(trained_lora / "adapter_model.safetensors")
    assert weights.keys() == start.keys() and any(not torch.equal(weights[k], start[k]) for k in weights)
    assert folder_signature(trained_lora) == untouched, "the adapter it starts from is left as it was"
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert lines[-1]["event"] == "done" and any(e.get("phase") == "published" for e in lines)
