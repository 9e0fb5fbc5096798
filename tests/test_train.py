"""Real tiny training runs on the embedded model: LoRA, prefix, resume after kill -9, post-save checks."""

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from assistant.chat_format import encode_prompt
from assistant.generation import GenerationParams, complete_reply
from assistant.loading import load_chat_model
from tests.conftest import DATA, FAST, NEEDS_NO_CUDA, ROOT, sft, sft_killed_at
from train.records import load_examples
from train.verify import AdapterCheckError, check_weights, verify_adapter

pytestmark = pytest.mark.slow


def test_lora_run_writes_a_complete_adapter_folder(trained_lora):
    names = {p.name for p in trained_lora.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "training_report.json",
        "loss.png",
        "system_prompt.json",
    } <= names
    report = json.loads((trained_lora / "training_report.json").read_text())
    assert report["method"] == "lora" and report["steps"] == 4 and report["base_model"] == "embedded"
    assert report["eval_loss"] < report["loss_curves"]["eval"][0][1], "eval loss should fall"
    assert report["eval_loss"] < report["base_eval_loss"], "the adapter must beat the untrained model"
    assert report["system_prompt"] == json.loads((trained_lora / "system_prompt.json").read_text())
    assert report["system_prompt"]["source"] == "template default" and report["system_prompt"]["rows"] == 36
    assert report["eval_perplexity"] == pytest.approx(2.718281828 ** report["eval_loss"], rel=1e-3)
    assert report["tokens_per_second"] > 0 and report["data"]["train"]["rows"] == 36
    before = [r["reply"] for r in report["probes"]["before"]["rows"]]
    after = [r["reply"] for r in report["probes"]["after"]["rows"]]
    assert len(before) == 2 and before != after
    assert (trained_lora.parent / f"{trained_lora.name}.checkpoints").is_dir()
    assert not list(trained_lora.parent.glob("**/*partial*")), "no half-written folder left behind"


def test_adapter_round_trips_and_changes_the_reply(trained_lora):
    chat = load_chat_model(adapter=trained_lora, precision="fp32")
    assert chat.method == "lora" and chat.base_model == "embedded"
    prompt = [{"role": "user", "content": "Hi, I want to book a flight with ID 585."}]
    params = GenerationParams(max_new_tokens=16, temperature=0)
    assert complete_reply(chat, prompt, params) != complete_reply(chat, prompt, params, use_adapter=False)
    # The app renders with the adapter's own tokenizer: exactly the trained prefix.
    base = load_chat_model(precision="fp32")
    assert encode_prompt(chat.tokenizer, prompt) == encode_prompt(base.tokenizer, prompt)


def test_prefix_tuning_trains_saves_loads_and_generates(trained_prefix):
    out = trained_prefix
    report = json.loads((out / "training_report.json").read_text())
    assert report["method"] == "prefix" and report["eval_loss"] < report["loss_curves"]["eval"][0][1]
    # Prefix tuning improves on the untrained model (a random prefix used to end far above it).
    assert report["eval_loss"] < report["base_eval_loss"]
    chat = load_chat_model(adapter=out, precision="fp32")
    assert chat.method == "prefix"
    reply = complete_reply(
        chat, [{"role": "user", "content": "Hello"}], GenerationParams(max_new_tokens=8, temperature=0)
    )
    assert reply.strip()


@pytest.mark.slow
def test_dora_trains_and_its_adapter_is_published(tmp_path):
    # The post-save checks reply with the adapter through the serving engine, which used to refuse DoRA.
    out = tmp_path / "dora"
    done = sft(str(DATA / "valid_pairs.jsonl"), "--output-dir", str(out), "--use-dora", "--max-steps", "2",
               "--learning-rate", "1e-3", *FAST)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    report = json.loads((out / "training_report.json").read_text())
    assert report["eval_loss"] < report["base_eval_loss"]


def test_resume_continues_a_run_killed_with_sigkill(tmp_path):
    out = tmp_path / "resumed"
    args = [
        str(DATA / "valid_pairs.jsonl"),
        "--output-dir",
        str(out),
        "--max-steps",
        "8",
        "--save-steps",
        "2",
        "--learning-rate",
        "1e-3",
        *FAST,
    ]
    state = tmp_path / "resumed.checkpoints" / "checkpoint-4" / "trainer_state.json"
    assert sft_killed_at(state, *args), "the run never reached its second checkpoint"
    assert not out.exists(), "a killed run must not leave an adapter where the app would load it"

    refused = sft(*args)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    done = sft(*args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr and "checkpoint-" in done.stderr
    report = json.loads((out / "training_report.json").read_text())
    assert report["steps"] == 8
    resumed_at = int(done.stderr.split("resuming from")[1].split("checkpoint-")[1].split()[0])
    assert resumed_at >= 4


def test_post_save_checks_fail_on_sabotaged_adapters(trained_lora, tmp_path):
    probes = load_examples(DATA / "valid_pairs.jsonl").examples[:2]
    saved = load_file(trained_lora / "adapter_model.safetensors")
    untrained = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in saved.items()}

    empty = tmp_path / "empty"
    shutil.copytree(trained_lora, empty)
    (empty / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterCheckError, match="empty"):
        check_weights(empty, untrained)

    unchanged = tmp_path / "unchanged"
    shutil.copytree(trained_lora, unchanged)
    save_file(untrained, unchanged / "adapter_model.safetensors")
    with pytest.raises(AdapterCheckError, match="no trainable weight changed"):
        verify_adapter(unchanged, "embedded", untrained, probes)

    broken = tmp_path / "broken"
    shutil.copytree(trained_lora, broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    config["r"] = 3  # shapes no longer match the saved tensors
    (broken / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterCheckError, match="does not load back"):
        verify_adapter(broken, "embedded", untrained, probes)

    # Replies equal to the base model's: weights that changed, by nothing visible (lora_A changed, lora_B still
    # zero, so every layer adds exactly 0; a tiny lora_B is not invisible where fp32 sums round to bf16 rows).
    invisible = tmp_path / "invisible"
    shutil.copytree(trained_lora, invisible)
    nothing = {k: torch.zeros_like(v) if "lora_B" in k else 2 * v for k, v in saved.items()}
    save_file(nothing, invisible / "adapter_model.safetensors")
    with pytest.raises(AdapterCheckError, match="equal the base model's"):
        verify_adapter(invisible, "embedded", untrained, probes, probe_tokens=12)


@pytest.mark.parametrize(
    "name", ["invalid_json_line.jsonl", "chat_unknown_role.jsonl", "json_array_not_jsonl.jsonl"]
)
def test_bad_data_fails_fast_naming_file_and_line(tmp_path, name):
    expected = json.loads((DATA / "bad" / "expected.json").read_text())[name]
    started = time.time()
    done = sft(str(DATA / "bad" / name), "--output-dir", str(tmp_path / "never"))
    assert done.returncode == 2
    assert f"{name}:{expected['line']}:" in done.stderr
    assert "loaded embedded" not in done.stderr, "the check must run before any model is loaded"
    assert not (tmp_path / "never.checkpoints").exists()
    assert time.time() - started < 60


def test_help_documents_the_command_line_contract():
    done = subprocess.run(
        [sys.executable, "-m", "train.sft", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    for flag in [
        "--valid-file",
        "--output-dir",
        "--method",
        "--base-model",
        "--max-steps",
        "--epochs",
        "--resume",
        "--lora-rank",
        "--use-dora",
        "--virtual-tokens",
        "--load-in-4bit",
        "--system-prompt",
        "--time-budget",
        "--generation-rows",
    ]:
        assert flag in done.stdout


def test_dataset_doctor_reports_and_marks_trained_tokens():
    done = subprocess.run(
        [sys.executable, "-m", "train.check", str(DATA / "valid_chat.jsonl")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "messages (10 rows)" in done.stdout and "[[" in done.stdout and "p95" in done.stdout
    assert "system prompt trained: " in done.stdout and "rows carry their own" in done.stdout
    pirate = subprocess.run(
        [sys.executable, "-m", "train.check", str(DATA / "valid_pairs.jsonl"), "--system-prompt", "Talk like a pirate."],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert "system prompt trained: 'Talk like a pirate.' from --system-prompt; 0 of 40 rows" in pirate.stdout
    assert "<|im_start|>system\nTalk like a pirate.<|im_end|>" in pirate.stdout, "the example shows it rendered"
    bad = subprocess.run(
        [sys.executable, "-m", "train.check", str(DATA / "bad" / "empty_file.jsonl")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "empty_file.jsonl" in bad.stderr


def test_bitsandbytes_options_fail_clearly_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip(NEEDS_NO_CUDA)
    done = sft(str(DATA / "valid_pairs.jsonl"), "--load-in-8bit", "--output-dir", str(tmp_path / "never"))
    assert done.returncode == 2 and "--load-in-8bit" in done.stderr and "CUDA" in done.stderr


def test_accelerate_launch_runs_the_same_script(tmp_path):
    """What multi-GPU users run (`accelerate launch -m train.sft ...`), single-process on this CPU."""
    out = tmp_path / "accelerated"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "train.sft",
        str(DATA / "valid_pairs.jsonl"),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--learning-rate",
        "1e-3",
        *FAST,
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "training_report.json").read_text())["steps"] == 2


def test_from_adapter_goes_on_training_that_adapter(trained_lora, tmp_path):
    from assistant.adapters import folder_signature

    parent = json.loads((trained_lora / "training_report.json").read_text())
    untouched = folder_signature(trained_lora)
    out = tmp_path / "continued"
    done = sft(str(DATA / "valid_pairs.jsonl"), "--output-dir", str(out), *FAST, "--max-steps", "2",
               "--learning-rate", "1e-3", "--from-adapter", str(trained_lora))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "before this run" in done.stdout
    report = json.loads((out / "training_report.json").read_text())
    # It starts from the adapter's weights: on the same held-out rows, its loss before this run is the
    # adapter's own, far below the untrained base's.
    assert report["start_eval_loss"] == pytest.approx(parent["eval_loss"], rel=1e-3)
    assert report["start_eval_loss"] < report["base_eval_loss"] - 0.1
    assert (report["from_adapter"], report["method"], report["base_model"]) == (str(trained_lora), "lora", "embedded")
    weights = load_file(out / "adapter_model.safetensors")
    before = load_file(trained_lora / "adapter_model.safetensors")
    assert weights.keys() == before.keys() and any(not torch.equal(weights[k], before[k]) for k in weights)
    assert folder_signature(trained_lora) == untouched, "the adapter it continues is left as it was"


def test_from_adapter_refuses_another_base_model_before_loading_anything(trained_lora, tmp_path):
    done = sft(str(DATA / "valid_pairs.jsonl"), "--output-dir", str(tmp_path / "x"), "--from-adapter",
               str(trained_lora), "--base-model", str(tmp_path / "other-model"), timeout=120)
    assert done.returncode == 2
    assert f"--from-adapter {trained_lora}: it was trained on embedded, not on --base-model" in done.stderr
    merged = sft(str(DATA / "valid_pairs.jsonl"), "--output-dir", str(tmp_path / "y"), "--from-adapter",
                 str(tmp_path), timeout=120)
    assert merged.returncode == 2 and f"--from-adapter {tmp_path}:" in merged.stderr
