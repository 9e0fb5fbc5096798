"""What a run leaves behind: published adapters only, never a half-checked one; seeds; merge; eval; budgets."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from assistant.adapters import find_adapters
from assistant.generation import GenerationParams, complete_reply
from assistant.loading import load_chat_model
from serve.registry import BASE_CHOICE, ModelRegistry
from tests.conftest import DATA, FAST, ROOT, sft, sft_killed_at
from train.pipeline import InputError, checkpoint_to_resume


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file in a folder, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_hidden_and_partial_folders_are_never_listed(tmp_path, lora_adapter):
    for name in ("good", ".good.partial-123", "run.partial", ".hidden"):
        shutil.copytree(lora_adapter, tmp_path / name)
    (tmp_path / "notes").mkdir()
    assert list(find_adapters(tmp_path)) == ["good"]
    assert ModelRegistry(tmp_path).choices == [BASE_CHOICE, "good"]


@pytest.mark.slow
def test_a_run_killed_during_its_post_save_checks_publishes_nothing(tmp_path, trained_lora):
    adapters = tmp_path / "adapters"
    previous = adapters / "support"
    shutil.copytree(trained_lora, previous)
    before = digest(previous)
    args = [str(DATA / "valid_pairs.jsonl"), "--output-dir", str(previous), "--max-steps", "2",
            "--learning-rate", "1e-3", *FAST]
    # loss.png is written just before the post-save checks load the staged adapter back.
    staged = adapters / "support.checkpoints" / "adapter.partial" / "loss.png"
    assert sft_killed_at(staged, *args), "the run never reached its post-save checks"
    assert sorted(p.name for p in adapters.iterdir()) == ["support", "support.checkpoints"]
    assert list(find_adapters(adapters)) == ["support"]
    assert digest(previous) == before, "the published adapter must stay exactly as it was"


def test_output_dir_refuses_a_folder_it_did_not_write(tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    done = sft(str(DATA / "valid_pairs.jsonl"), "--output-dir", str(mine))
    assert done.returncode == 2 and "not an adapter written by train.sft" in done.stderr
    assert "loaded embedded" not in done.stderr, "refused before any model is loaded"
    assert (mine / "chapter1.tex").read_text() == "years of work"

    merged = subprocess.run([sys.executable, "-m", "train.merge", str(DATA), "--output-dir", str(mine)],
                            cwd=ROOT, capture_output=True, text=True)
    assert merged.returncode == 2 and "was not written by train.merge" in merged.stderr
    assert (mine / "chapter1.tex").read_text() == "years of work"


def resume_config(tmp_path, resume: bool, overwrite: bool = False) -> SimpleNamespace:
    return SimpleNamespace(checkpoint_dir=tmp_path / "run.checkpoints", resume=resume, overwrite=overwrite)


def test_a_run_killed_before_its_first_checkpoint_starts_cleanly(tmp_path):
    leftovers = tmp_path / "run.checkpoints"
    (leftovers / "runs").mkdir(parents=True)  # TensorBoard logs of a run killed at step 1
    (leftovers / "checkpoint-2").mkdir()  # killed while writing its first checkpoint
    assert checkpoint_to_resume(resume_config(tmp_path, resume=True)) is None  # --resume: from step 0
    assert not leftovers.exists()
    (leftovers / "runs").mkdir(parents=True)
    assert checkpoint_to_resume(resume_config(tmp_path, resume=False)) is None  # no contradictory advice
    assert not leftovers.exists()

    (leftovers / "checkpoint-2").mkdir(parents=True)
    (leftovers / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(InputError, match="--resume"):
        checkpoint_to_resume(resume_config(tmp_path, resume=False))
    assert checkpoint_to_resume(resume_config(tmp_path, resume=True)).endswith("checkpoint-2")


@pytest.mark.slow
def test_the_same_seed_gives_identical_adapter_files(tmp_path, trained_lora):
    # The trained_lora fixture's own command line, run again into another folder.
    again = tmp_path / "again"
    done = sft(str(DATA / "valid_pairs.jsonl"), "--output-dir", str(again), "--max-steps", "4",
               "--learning-rate", "1e-3", *FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = "adapter_model.safetensors"
    assert (again / weights).read_bytes() == (trained_lora / weights).read_bytes()


@pytest.mark.slow
def test_the_merged_model_replies_like_the_adapter(tmp_path, trained_lora):
    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "train.merge", str(trained_lora), "--output-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "system_prompt.json").read_text() == (trained_lora / "system_prompt.json").read_text()
    chat = [{"role": "user", "content": "Hi, I want to book a flight with ID 585."}]
    params = GenerationParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
    adapter = load_chat_model(adapter=trained_lora, precision="fp32")
    merged = load_chat_model(str(out), precision="fp32")
    expected = complete_reply(adapter, chat, params)
    assert complete_reply(merged, chat, params) == expected
    assert expected != complete_reply(adapter, chat, params, use_adapter=False), "the adapter changes replies"
    # Run again into the folder it wrote: a merged model may be replaced by a new merge.
    again = subprocess.run([sys.executable, "-m", "train.merge", str(trained_lora), "--output-dir", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.slow
def test_eval_scores_the_base_model_and_the_adapter_and_compares_them_row_by_row(tmp_path, trained_lora):
    out = tmp_path / "eval.json"
    done = subprocess.run(
        [sys.executable, "-m", "train.eval", str(DATA / "valid_pairs.jsonl"), "--adapter", str(trained_lora),
         "--max-rows", "3", "--max-new-tokens", "8", "--output", str(out), "--compare"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"base", "adapter", "comparison"} and "perplexity" in done.stdout
    compared = results.pop("comparison")
    assert compared["description"] in done.stdout and compared["items"] == 3
    assert compared["wins"] + compared["ties"] + compared["losses"] == 3
    base_rows, adapter_rows = results["base"]["rows"], results["adapter"]["rows"]
    assert compared["wins"] == sum(b["rouge_l"] > a["rouge_l"] for a, b in zip(base_rows, adapter_rows, strict=True))
    assert compared["mean_difference"] == pytest.approx(
        sum(b["rouge_l"] - a["rouge_l"] for a, b in zip(base_rows, adapter_rows, strict=True)) / 3, abs=1e-4)
    assert compared["interval"][0] <= compared["mean_difference"] <= compared["interval"][1]
    assert len(compared["worse"]) == compared["losses"]
    for scores in results.values():
        assert len(scores["rows"]) == 3 and 0 <= scores["rouge_l"] <= 1
        assert all(row["reply"] for row in scores["rows"])
    # These rows are the adapter's training data: it must fit them better than the base model does.
    assert results["adapter"]["perplexity"] < results["base"]["perplexity"]


def test_a_time_budget_plans_the_steps_and_ends_the_schedule_on_them(monkeypatch):
    from transformers import TrainerControl, TrainerState, TrainingArguments, get_scheduler

    from train import budget

    clock = [1000.0]
    monkeypatch.setattr(budget.time, "time", lambda: clock[0])
    args = TrainingArguments(output_dir="unused", learning_rate=1e-3, lr_scheduler_type="cosine",
                             warmup_steps=0.1, report_to=[])
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=100, num_training_steps=1000)
    state, control = TrainerState(max_steps=1000), TrainerControl()
    # 60 s budget started 10 s ago; each evaluation takes 1 s; steps take 2 s.
    callback = budget.TimeBudget(60.0, started=clock[0] - 10, eval_seconds=1.0)
    for step in range(1, 1 + 1 + budget.MEASURED_STEPS):  # the first step ends at t=1000, then 2 s a step
        clock[0] = 1000.0 + 2.0 * (step - 1)
        state.global_step = step
        scheduler.step()
        callback.on_step_end(args, state, control, lr_scheduler=scheduler, optimizer=optimizer)
    # Spent: 10 s + 4 steps * 2 s = 18 s; left 60 * 0.95 - 18 - 7 evaluations' worth = 32 s -> 16 more steps.
    assert callback.planned == 5 + 16 and state.max_steps == 21 and state.eval_steps == 4
    assert not control.should_training_stop
    while state.global_step < callback.planned:
        state.global_step += 1
        scheduler.step()
        callback.on_step_end(args, state, control, lr_scheduler=scheduler, optimizer=optimizer)
    assert control.should_training_stop and control.should_evaluate and control.should_save
    # The schedule was stretched over the 21 planned steps: cosine ends at zero there, not at step 1000.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_a_prefix_starts_from_the_base_models_loss():
    from assistant.likelihood import masked_nll
    from train.collate import ChatCollator
    from train.pipeline import build_model, prepare_data
    from train.sft import SFTConfig

    config = SFTConfig(data=str(DATA / "valid_pairs.jsonl"), method="prefix", virtual_tokens=20)
    data = prepare_data(config)
    model, _, _ = build_model(config, data.tokenizer, data.train)
    batch = ChatCollator(data.tokenizer.pad_token_id, packed=False)(data.valid.items)
    with torch.no_grad():
        total, count, _ = masked_nll(model, batch)
        with model.disable_adapter():
            base_total, _, _ = masked_nll(model, batch)
    loss, base = float(total / count), float(base_total / count)
    # A random prefix starts far above the base (7.06 vs ~2.7 measured); real keys/values start near it.
    assert math.isfinite(loss) and abs(loss - base) < 0.1 * base, (loss, base)


def test_the_seed_sets_the_adapters_initial_weights():
    from train.pipeline import build_model, prepare_data
    from train.sft import SFTConfig

    config = SFTConfig(data=str(DATA / "valid_pairs.jsonl"))
    data = prepare_data(config)

    def initial(seed: int, draws_before: int) -> dict[str, torch.Tensor]:
        config.seed = seed
        torch.manual_seed(0)
        torch.rand(draws_before)  # whatever the process drew before must not matter
        return build_model(config, data.tokenizer, data.train)[2]

    first, again, other = initial(1, 0), initial(1, 7), initial(2, 0)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
