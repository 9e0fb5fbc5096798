"""Exports to llama.cpp and Ollama: the GGUF LoRA holds the adapter's tensors in llama.cpp's layout, the
Modelfile carries the trained template/prompt/stop, refusals come before any work, and llama.cpp replies
as we do (round trip, where the binding is built)."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from assistant.adapters import (
    ADAPTER_CONFIG,
    WEIGHTS,
    TrainedPrompt,
    adapter_base,
    write_generation,
    write_trained_prompt,
)
from assistant.embedded import EMBEDDED, EMBEDDED_HUB_ID, gguf_path
from tests.conftest import NEEDS_LLAMACPP, ROOT

SYSTEM = "You are the support agent of a travel company. Answer briefly."
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def strong_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter on the embedded model with random A and B (seeded): every layer visibly changes replies,
    so a tensor in the wrong place shows in llama.cpp's logits."""
    import torch
    from peft import LoraConfig, get_peft_model

    from assistant.models import load_base_model, load_tokenizer, pick_precision

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("export") / "strong"
    model = load_base_model(EMBEDDED, pick_precision("fp32"))
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = EMBEDDED_HUB_ID  # as train.sft names it
    peft_model.save_pretrained(folder, save_embedding_layers=False)
    load_tokenizer(EMBEDDED).save_pretrained(folder)
    write_trained_prompt(folder, TrainedPrompt(SYSTEM, "--system-prompt", 10, 0, 1))
    return folder


def _gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    import gguf

    return {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}


@functools.cache
def _base_tensors() -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(gguf_path()).tensors}


def _dequantized(name: str) -> np.ndarray:
    import gguf

    tensor = _base_tensors()[name]
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


def test_gguf_lora_holds_the_adapters_tensors_in_llama_cpp_layout(strong_adapter, tmp_path):
    import gguf
    from safetensors.numpy import load_file

    from assistant.embedded import embedded_model_dir
    from train.export.gguf_lora import write_lora_gguf

    out = write_lora_gguf(strong_adapter, gguf_path(), tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(out)
    fields = {k: reader.fields[k].contents() for k in ("general.type", "general.architecture", "adapter.type",
                                                         "adapter.lora.alpha")}
    assert fields == {"general.type": "adapter", "general.architecture": "llama", "adapter.type": "lora",
                      "adapter.lora.alpha": 16.0}
    written = _gguf_tensors(out)
    peft = load_file(strong_adapter / "adapter_model.safetensors")
    assert len(written) == len(peft) == 2 * len(TARGETS) * 30
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    # llama.cpp's base GGUF stores q and k with their rows reordered for its rotary kernel. Find that
    # order from the base weights themselves (GGUF rows vs the embedded model's rows) and require the
    # LoRA B rows to follow it; every other matrix must be the adapter's, value for value.
    hf = load_file(embedded_model_dir() / "model.safetensors")
    for layer in (0, 17, 29):
        for module, short in names.items():
            part = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            a, b = written[f"blk.{layer}.{short}.weight.lora_a"], written[f"blk.{layer}.{short}.weight.lora_b"]
            np.testing.assert_array_equal(a, peft[f"{key}.lora_A.weight"])
            order = np.arange(b.shape[0])
            if module in ("q_proj", "k_proj"):
                base_rows = _dequantized(f"blk.{layer}.{short}.weight")
                hf_rows = {row.tobytes(): i for i, row in enumerate(hf[f"model.layers.{layer}.{part}.{module}.weight"])}
                order = np.array([hf_rows[row.tobytes()] for row in base_rows.astype(np.float32)])
                assert not np.array_equal(order, np.arange(len(order))), "the base GGUF's q/k rows are reordered"
            np.testing.assert_array_equal(b, peft[f"{key}.lora_B.weight"][order])


def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.export", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_ollama_export_carries_template_prompt_and_stop(strong_adapter, tmp_path):
    from assistant.models import load_tokenizer
    from train.export.ollama import TEMPLATE_CHECKS, check_template, parse_modelfile

    out = tmp_path / "ollama"
    done = _export(str(strong_adapter), "--to", "ollama", "--output-dir", str(out), "--skip-verify")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ollama create NAME -f Modelfile" in done.stdout
    parts = parse_modelfile((out / "Modelfile").read_text())
    assert parts["FROM"] == f"./{gguf_path().name}" and (out / gguf_path().name).is_file()
    assert parts["ADAPTER"] == "./adapter.gguf" and (out / "adapter.gguf").is_file()
    assert parts["SYSTEM"] == SYSTEM
    assert ("stop", '"<|im_end|>"') in parts["PARAMETER"] or ("stop", "<|im_end|>") in parts["PARAMETER"]
    assert ("temperature", "0.7") in parts["PARAMETER"] and ("repeat_penalty", "1.1") in parts["PARAMETER"]
    # The Modelfile's Go template renders chats exactly as the trained Jinja template does.
    check_template(load_tokenizer(str(strong_adapter)), parts["TEMPLATE"], SYSTEM, TEMPLATE_CHECKS)
    record = json.loads((out / "export.json").read_text())
    assert record["to"] == "ollama" and "skipped" in record["verify"]
    # The folder it wrote may be written again; a folder of someone else's is refused.
    assert _export(str(strong_adapter), "--to", "ollama", "--output-dir", str(out), "--skip-verify").returncode == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused = _export(str(strong_adapter), "--to", "gguf", "--output-dir", str(mine), "--skip-verify")
    assert refused.returncode == 2 and "was not written by train.export" in refused.stderr
    assert (mine / "notes.txt").read_text() == "keep me"


def test_prefix_and_dora_adapters_are_refused_before_anything_is_written(trained_prefix, strong_adapter, tmp_path):
    prefix = _export(str(trained_prefix), "--to", "gguf", "--output-dir", str(tmp_path / "p"))
    assert prefix.returncode == 2 and "prefix-tuning" in prefix.stderr and "--method lora" in prefix.stderr
    dora = tmp_path / "dora"
    shutil.copytree(strong_adapter, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    refused = _export(str(dora), "--to", "ollama", "--output-dir", str(tmp_path / "d"))
    assert refused.returncode == 2 and "DoRA" in refused.stderr and "--to merged" in refused.stderr
    assert not (tmp_path / "p").exists() and not (tmp_path / "d").exists()


def test_another_base_needs_its_gguf(strong_adapter, tmp_path):
    other = _named(strong_adapter, tmp_path / "other", "Qwen/Qwen2.5-0.5B")
    refused = _export(str(other), "--to", "gguf", "--output-dir", str(tmp_path / "o"))
    assert refused.returncode == 2 and "convert_hf_to_gguf.py" in refused.stderr and "--base-gguf" in refused.stderr


def _named(adapter: Path, folder: Path, base: str) -> Path:
    """A copy of `adapter` whose adapter_config.json names `base`."""
    shutil.copytree(adapter, folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": base}))
    return folder


def test_base_model_decides_the_exports_base_once(tmp_path):
    """Unit level, on a fake folder: --base-model, else the adapter's own base, and that base's GGUF."""
    from train.export import ExportConfig, base_gguf_for, export_base
    from train.export.gguf_lora import ExportError

    folder = tmp_path / "other"
    folder.mkdir()
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "Qwen/Qwen2.5-0.5B"}))
    (folder / WEIGHTS[0]).write_bytes(b"\0" * 16)
    own = export_base(ExportConfig(str(folder)))
    assert own == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(ExportError, match="--base-gguf"):
        base_gguf_for(own, None)
    given = export_base(ExportConfig(str(folder), base_model="embedded"))
    assert given == EMBEDDED and base_gguf_for(given, None) == gguf_path()
    assert base_gguf_for(own, "/x/base.gguf") == Path("/x/base.gguf")


def test_an_export_with_base_model_uses_that_base_throughout(strong_adapter, tmp_path, monkeypatch):
    """An adapter naming another base, exported with --base-model embedded: the embedded GGUF, its stop
    tokens and its record; the named base is never looked up."""
    import assistant.models
    from train.export import ExportConfig, export
    from train.export.ollama import parse_modelfile

    other = _named(strong_adapter, tmp_path / "other", "Qwen/Qwen2.5-0.5B")
    looked_up = []
    resolve = assistant.models.resolve_model_path
    monkeypatch.setattr(assistant.models, "resolve_model_path", lambda base: looked_up.append(base) or resolve(base))
    record = export(ExportConfig(str(other), to="ollama", output_dir=str(tmp_path / "o"), base_model="embedded",
                                 skip_verify=True))
    assert record["base_model"] == EMBEDDED and record["base_gguf"] == gguf_path().name
    assert EMBEDDED in looked_up and "Qwen/Qwen2.5-0.5B" not in looked_up, looked_up
    parts = parse_modelfile((tmp_path / "o" / "Modelfile").read_text())
    assert parts["FROM"] == f"./{gguf_path().name}"
    assert ("stop", "<|im_end|>") in parts["PARAMETER"] or ("stop", '"<|im_end|>"') in parts["PARAMETER"]


def test_the_modelfile_carries_the_adapters_generation_settings_and_prompt(strong_adapter, tmp_path):
    from train.export import ExportConfig, export
    from train.export.ollama import parse_modelfile

    tuned = tmp_path / "tuned"
    shutil.copytree(strong_adapter, tuned)
    write_generation(tuned, {"temperature": 0.3, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.25,
                             "max_new_tokens": 99})
    export(ExportConfig(str(tuned), to="ollama", output_dir=str(tmp_path / "o"), skip_verify=True))
    parts = parse_modelfile((tmp_path / "o" / "Modelfile").read_text())
    parameters = dict(p for p in parts["PARAMETER"] if p[0] != "stop")
    assert parameters == {"temperature": "0.3", "top_p": "0.8", "top_k": "20", "repeat_penalty": "1.25",
                          "num_predict": "99"}
    assert parts["SYSTEM"] == SYSTEM


def test_modelfile_sampling_and_system_follow_the_app_rules(tmp_path):
    """Greedy (do_sample false) is temperature 0; unset fields are the app's defaults; no trained prompt: no SYSTEM."""
    from assistant.generation import GenerationParams
    from train.export import sampling_parameters, system_prompt

    d = GenerationParams()
    assert sampling_parameters({"do_sample": False, "top_k": 5}) == {
        "temperature": 0.0, "top_p": d.top_p, "top_k": 5, "repeat_penalty": d.repetition_penalty}
    assert sampling_parameters({}) == {"temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k,
                                       "repeat_penalty": d.repetition_penalty}
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "embedded"}))
    assert system_prompt(tmp_path) is None  # not recorded
    write_trained_prompt(tmp_path, TrainedPrompt(None, "none", 3, 0, 1))
    assert system_prompt(tmp_path) is None  # trained with no system message
    write_trained_prompt(tmp_path, TrainedPrompt("Be brief.", "--system-prompt", 3, 0, 1))
    assert system_prompt(tmp_path) == "Be brief."


def test_adapter_config_names_the_hub_twin_and_we_serve_the_embedded_copy(trained_lora, monkeypatch):
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(trained_lora)).base_model_name_or_path == EMBEDDED_HUB_ID
    assert adapter_base(trained_lora) == EMBEDDED  # its training report says it was trained on the embedded copy
    # Even with the Hub's own copy cached, an adapter trained on the embedded copy is served on it.
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/config.json")
    assert adapter_base(trained_lora) == EMBEDDED


PEFT_REPLY = """
import sys, torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
text = tokenizer.apply_chat_template([{"role": "user", "content": sys.argv[2]}], tokenize=False, add_generation_prompt=True)
ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
out = model.generate(ids, max_new_tokens=12, do_sample=False)
print(model.peft_config["default"].base_model_name_or_path)
print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
"""


def test_peft_loads_the_adapter_folder_by_its_base_name_and_replies_as_we_do(trained_lora, tmp_path):
    import os

    from assistant.embedded import embedded_model_dir
    from assistant.generation import GenerationParams, complete_reply
    from assistant.loading import load_chat_model

    # A Hub cache holding the Hub twin (the embedded copy's files under its Hub name), offline: what a
    # user with the model downloaded has. peft must find the base from adapter_config.json alone.
    repo = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in embedded_model_dir().iterdir():
        (snapshot / file.name).symlink_to(file)
    question = "Hello, how are you today?"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PEFT_REPLY, str(trained_lora), question], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    base, reply = done.stdout.strip().split("\n", 1)
    assert base == EMBEDDED_HUB_ID
    ours = complete_reply(load_chat_model(adapter=trained_lora, precision="fp32"),
                          [{"role": "user", "content": question}],
                          GenerationParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0))
    assert reply.strip() == ours.strip()


def test_a_hub_twin_adapter_from_elsewhere_uses_the_hub_copy_when_cached(strong_adapter, tmp_path, monkeypatch):
    import huggingface_hub

    folder = tmp_path / "from-elsewhere"
    shutil.copytree(strong_adapter, folder)  # no training report: not trained here
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    assert adapter_base(folder) == EMBEDDED, "offline, the embedded copy stands in"
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/config.json")
    monkeypatch.setattr("assistant.adapters._cache", {})  # a folder is read once per signature: read it anew
    assert adapter_base(folder) == EMBEDDED_HUB_ID


def _binding() -> str | None:
    from train.export.llamacpp import find_python

    return find_python()


needs_llamacpp = pytest.mark.skipif(
    _binding() is None,
    reason=NEEDS_LLAMACPP,
)


@needs_llamacpp
def test_llama_cpp_replies_as_we_do(strong_adapter, tmp_path):
    from train.export import ExportConfig, export

    record = export(ExportConfig(str(strong_adapter), to="gguf", output_dir=str(tmp_path / "g"), verify=True,
                                 verify_tokens=32))
    checked = record["verify"]
    assert checked["chats"] == 4 and checked["adapter_changes_replies"] >= 3
    for row in checked["rows"]:
        assert row["tokenization_matches"] and not row["disagreements"] and not row["llama_cpp_ran_past"]
        assert row["matched"] >= 2 or row["divergence"]["near_tie"]
    assert checked["forced_agree"] + checked["near_ties"] == checked["forced_positions"]
    assert checked["max_logit_drift"] < 1.0
    assert json.loads((tmp_path / "g" / "export.json").read_text())["verify"]["tokens_compared"] > 0


@needs_llamacpp
def test_the_round_trip_catches_a_wrong_tensor_layout(strong_adapter, tmp_path, monkeypatch):
    import train.export.gguf_lora
    from train.export import ExportConfig, export
    from train.export.gguf_lora import ExportError

    monkeypatch.setattr(train.export.gguf_lora, "permute_rows", lambda weight, heads: weight)  # HF row order kept
    with pytest.raises(ExportError, match="does not reply as this app does"):  # one short chat shows it
        export(ExportConfig(str(strong_adapter), to="gguf", output_dir=str(tmp_path / "g"), verify=True,
                            verify_prompts=1, verify_tokens=16))
    assert not (tmp_path / "g").exists(), "a failed verification publishes nothing"
