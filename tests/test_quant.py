"""CPU int4 serving: exact on Q4_1-shaped weights, adapters untouched, faithful on the embedded model."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from assistant.chat_format import IGNORE_INDEX, encode_chat
from assistant.embedded import embedded_model_dir
from assistant.loading import load_chat_model
from assistant.models import cpu_has_bf16, pick_precision
from assistant.quant import GROUP, QUANT_ROWS, Int4Linear, Int4Slice, Int8Linear, quantize_for_cpu
from tests.conftest import DATA, tiny_llama


def q4_1_linear(out_features: int = 96, in_features: int = 128) -> nn.Linear:
    """A linear layer whose weights are exactly representable in Q4_1 (per group: min + code * scale)."""
    torch.manual_seed(0)
    groups = in_features // GROUP
    codes = torch.randint(0, 16, (out_features, groups, GROUP)).float()
    codes[..., 0], codes[..., 1] = 0, 15  # llama.cpp's Q4_1 puts the group's min and max at codes 0 and 15
    scale = torch.rand(out_features, groups, 1) * 0.01 + 1e-3
    low = torch.randn(out_features, groups, 1) * 0.05
    linear = nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = (low + codes * scale).reshape(out_features, in_features)
    return linear


def test_int4_reproduces_q4_1_weights():
    linear = q4_1_linear()
    x = torch.randn(2, QUANT_ROWS // 2, linear.in_features).bfloat16()  # few rows: the packed kernel
    # The reference: the same bf16 inputs against the exact weights, in fp32.
    expected = x.float() @ linear.weight.T
    got = Int4Linear(linear)(x)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    # Only bf16 rounding of scales and outputs remains (the weights themselves are recovered exactly).
    assert torch.allclose(got.float(), expected, rtol=2e-2, atol=2e-2)


def test_many_rows_take_the_dense_weight(monkeypatch):
    layer = Int4Linear(q4_1_linear())
    many = torch.randn(QUANT_ROWS + 1, layer.in_features)
    monkeypatch.setattr(Int4Linear, "_packed_matmul", lambda *args: pytest.fail("many rows reached the kernel"))
    # Rounded as the kernel rounds: bf16 rows in, bf16 sums out.
    expected = nn.functional.linear(many.bfloat16().float(), layer.weight).bfloat16().float()
    assert torch.equal(layer(many), expected)  # (the packed path agrees with it: test_a_token_gets_the_same_sums...)


def test_int8_head_is_close_to_the_float_head():
    torch.manual_seed(0)
    linear = nn.Linear(64, 1000, bias=False)
    x = torch.randn(QUANT_ROWS, 64).bfloat16()
    got = Int8Linear(linear)(x).float()
    expected = x.float() @ linear.weight.T
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()


def tiny_lora_model() -> nn.Module:
    model = get_peft_model(
        tiny_llama(256).eval(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    return model


def test_quantize_swaps_frozen_layers_and_keeps_the_adapter_live():
    model = tiny_lora_model()
    ids = torch.randint(0, 256, (1, QUANT_ROWS))  # few tokens: the packed kernels
    with torch.inference_mode():
        reference = model(ids).logits
    quantize_for_cpu(model)
    layer = model.base_model.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.base_layer, Int4Linear)
    assert isinstance(layer.mlp.down_proj, Int4Linear)
    assert isinstance(model.base_model.model.lm_head, Int8Linear)
    # The adapter matrices stay float and unmerged.
    assert isinstance(layer.self_attn.q_proj.lora_A["default"], nn.Linear)
    with torch.inference_mode():
        tuned = model(ids).logits.float()
        with model.disable_adapter():
            plain = model(ids).logits.float()
    assert not torch.allclose(tuned, plain, atol=1e-2), "the adapter no longer changes the output"
    # Random weights are not Q4_1-shaped, so this is real 4-bit rounding: close, not exact.
    assert torch.nn.functional.cosine_similarity(tuned.flatten(), reference.flatten(), dim=0) > 0.98


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sibling_layers_run_one_packed_matmul_with_the_sums_of_separate_ones(dtype, monkeypatch):
    """q/k/v and gate/up read the same input: one kernel call each group, bit for bit the separate layers' sums,
    for a decode step (the kernel) and a prompt (the dense weights), with a LoRA adapter on one of them."""
    from peft.tuners.lora import Linear as LoraLinear

    import assistant.quant

    def quantized(siblings) -> nn.Module:
        monkeypatch.setattr(assistant.quant, "SIBLINGS", siblings)
        model = quantize_for_cpu(tiny_llama(256).eval(), dtype)
        config = LoraConfig(r=4, target_modules=["k_proj"], init_lora_weights=False)
        config._register_custom_module(dict.fromkeys(assistant.quant.LINEAR_TYPES, LoraLinear))  # as the Host does
        return get_peft_model(model, config)

    fused, separate = quantized(assistant.quant.SIBLINGS), quantized(())
    attention, mlp = fused.base_model.model.model.layers[0].self_attn, fused.base_model.model.model.layers[0].mlp
    assert isinstance(attention.q_proj, Int4Slice) and isinstance(mlp.up_proj, Int4Slice)
    assert attention.q_proj.fused is attention.k_proj.base_layer.fused is attention.v_proj.fused
    if dtype == torch.bfloat16:  # (in fp32 the fused layer's dense weight is held packed for oneDNN, no views)
        share = attention.v_proj.weight.untyped_storage().data_ptr() == attention.q_proj.fused.weight.untyped_storage().data_ptr()
        assert share, "a slice's dense weights are a second copy beside the packed layer's"
    adapter = {key: value for key, value in fused.state_dict().items() if "lora_" in key}
    separate.load_state_dict(adapter, strict=False)  # the same adapter weights (init_lora_weights=False draws them)
    kernel, calls = torch.ops.aten._weight_int4pack_mm_for_cpu, []
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(1) or kernel(*a))
    for tokens in (1, 3 * QUANT_ROWS):  # a decode step, a prompt
        ids = torch.randint(0, 256, (1, tokens))
        calls.clear()
        with torch.inference_mode():
            ours = fused(ids).logits
            kernel_calls = len(calls)
            theirs = separate(ids).logits
        assert torch.equal(ours, theirs), f"{(ours != theirs).float().mean():.4f} of the logits differ"
        assert kernel_calls == (2 * 4 if tokens == 1 else 0), kernel_calls  # 2 layers: qkv, o, gate+up, down
        assert attention.q_proj.fused._kept is None, "a group keeps its last output after its last slice asked"


def test_a_token_gets_the_same_sums_through_the_dense_and_the_packed_path():
    """In fp32 compute (CPUs without bf16 units); in bf16 the dense copy is bf16-rounded, for bf16 GEMM speed."""
    torch.manual_seed(0)
    layer = Int4Linear(nn.Linear(576, 1536, bias=False))  # random weights: a real 4-bit rounding
    prompt = torch.randn(3 * QUANT_ROWS, 576)  # more rows than QUANT_ROWS: the dense weights
    with torch.inference_mode():
        dense = layer(prompt).float()
        packed = torch.cat([layer(row[None]) for row in prompt]).float()  # one row at a time: the kernel
    # The same weights and the same roundings, so only the order of additions differs: now and then one
    # bf16 step, where the fp32 sums fall either side of a rounding boundary; near zero (sums that cancel)
    # fp32's own error in adding 576 terms, which scales with the terms, not with their sum.
    differ = dense != packed
    assert differ.float().mean() < 0.002, f"{differ.float().mean():.4f} of the sums differ"
    terms = prompt.bfloat16().float().abs() @ layer.weight.abs().T
    step = packed.abs().clamp(min=2**-126) * 2**-7 + terms * 2**-20
    assert ((dense - packed).abs() <= step).all(), "the two paths differ by more than one bf16 step"


def test_where_the_model_computes_in_fp32_prompts_multiply_through_onednn_and_its_weights_are_held_once(monkeypatch):
    """CPUs without bf16 units: each layer's dense fp32 weight is held once, in oneDNN's layout; a prompt's rows
    multiply through it with the plain weights' sums (up to the order of additions); DoRA still reads `weight`."""
    import platform

    import assistant.quant

    assert assistant.quant.onednn_works() or platform.machine() not in ("x86_64", "AMD64"), "x86 torch packs for oneDNN"
    packed = quantize_for_cpu(tiny_llama(256).eval(), torch.float32)
    monkeypatch.setattr(assistant.quant, "onednn_works", lambda: False)
    plain = quantize_for_cpu(tiny_llama(256).eval(), torch.float32)  # the same seeded weights, plain dense copies
    layers = [m for m in packed.modules() if isinstance(m, (Int4Linear, Int4Slice))]
    assert layers and not any("weight" in layer._parameters for layer in layers), "a plain dense copy is held"
    onednn, calls = torch.ops.mkldnn._linear_pointwise, []
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or onednn(*a))
    ids = torch.randint(0, 256, (1, 3 * QUANT_ROWS))  # a prompt: the dense path
    with torch.inference_mode():
        ours, theirs = packed(ids).logits, plain(ids).logits
    assert len(calls) == 2 * 4, calls  # 2 layers: qkv, o, gate+up, down
    torch.testing.assert_close(ours, theirs, rtol=0.02, atol=0.02)  # bf16 rounding of sums that differ in order
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):  # a slice, a whole layer
        assert torch.equal(packed.get_submodule(name).weight, plain.get_submodule(name).weight), name


def test_int4_precision_rules():
    assert pick_precision("int4").name == "int4"
    with pytest.raises(ValueError, match="int4 is the CPU serving precision"):
        pick_precision("int4", for_training=True)
    auto = pick_precision("auto", base="embedded")
    assert auto.name == "int4"
    # A CPU with bf16 units computes in bf16 around the packed kernels; one without stays in fp32.
    assert auto.compute_dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    # Adapters made on the embedded model may name its cache folder as their base.
    assert pick_precision("auto", base=str(embedded_model_dir())).name == "int4"
    other = pick_precision("auto", base="HuggingFaceTB/SmolLM2-360M-Instruct")
    assert other.name == ("bf16" if cpu_has_bf16() else "fp32")


@pytest.mark.parametrize("bf16_units", [True, False])
def test_int4_computes_in_bf16_only_where_the_cpu_has_bf16_units(bf16_units, monkeypatch):
    import assistant.models

    monkeypatch.setattr(assistant.models, "cpu_has_bf16", lambda: bf16_units)
    precision = pick_precision("int4")
    dtype = torch.bfloat16 if bf16_units else torch.float32
    assert precision.compute_dtype == dtype
    assert ("no bf16 units" in precision.describe()) != bf16_units, precision.describe()
    model = quantize_for_cpu(tiny_llama(), precision.compute_dtype)
    norm = model.model.norm.weight
    assert norm.dtype == dtype, "norms, embeddings and dense weights compute in the chosen dtype"
    ids = torch.tensor([[1, 5, 9]])
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    model.to(torch.float32 if bf16_units else torch.bfloat16)  # attaching an adapter casts the model again
    with torch.inference_mode():
        again = model(ids).logits.float()
    # The packed kernels' bf16 scales survive any cast of the model (a cast scale breaks the kernel).
    assert torch.nn.functional.cosine_similarity(again.flatten(), logits.float().flatten(), dim=0) > 0.99


def held_out_nll(chat) -> float:
    """Mean next-token loss on the assistant tokens of a few real support dialogues."""
    rows = [json.loads(line) for line in (DATA / "valid_chat.jsonl").read_text().splitlines()[:4]]
    total, count = 0.0, 0
    with torch.inference_mode():
        for row in rows:
            encoded = encode_chat(chat.tokenizer, row["messages"])
            logits = chat.model(torch.tensor([encoded.input_ids])).logits[0, :-1].float()
            target = torch.tensor(encoded.labels[1:])
            keep = target != IGNORE_INDEX
            total += nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def test_int4_is_as_faithful_as_bf16_on_the_embedded_model():
    exact = held_out_nll(load_chat_model(precision="fp32"))
    int4 = held_out_nll(load_chat_model(precision="int4"))
    bf16 = held_out_nll(load_chat_model(precision="bf16"))
    # The embedded weights are Q4_1, so 4-bit storage adds no error beyond bf16 compute's.
    assert abs(int4 - exact) <= max(0.01, 2 * abs(bf16 - exact)), (exact, int4, bf16)


@pytest.mark.slow
def test_int4_replies_decode_every_quantized_layer_through_the_packed_kernel(monkeypatch):
    from assistant.generation import GenerationParams, complete_reply, fit_history

    chat = load_chat_model(precision="int4")
    layers = {m.packed.data_ptr(): name for name, m in chat.model.named_modules() if isinstance(m, Int4Linear)}
    # q/k/v and gate/up: one packed layer each, which their slices share
    layers |= {m.fused.packed.data_ptr(): name for name, m in chat.model.named_modules() if isinstance(m, Int4Slice)}
    assert len(layers) == 30 * 4, f"int4 loading packed {len(layers)} layers, not 4 in each of 30 decoder layers"
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
    calls: dict[str, int] = dict.fromkeys(layers.values(), 0)

    def counting_kernel(rows, packed, *args):
        calls[layers[packed.data_ptr()]] += 1
        return kernel(rows, packed, *args)

    forwards: list[torch.Tensor] = []  # input ids of each forward pass of the reply (whichever loop decodes)
    hook = chat.model.get_input_embeddings().register_forward_pre_hook(lambda module, args: forwards.append(args[0]))
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", counting_kernel)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    try:
        reply = complete_reply(chat, messages, GenerationParams(max_new_tokens=8, temperature=0.0))
    finally:
        hook.remove()
    # The prompt runs through the dense weights (many rows); each new token through the packed kernel.
    decode_steps = [ids for ids in forwards if ids.numel() <= QUANT_ROWS]
    assert len(decode_steps) >= 4, [tuple(ids.shape) for ids in forwards]
    assert set(calls.values()) == {len(decode_steps)}, f"{len(layers)} int4 layers, {len(decode_steps)} steps: {calls}"

    # The reply is what bf16 would say: each token int4 chose is among bf16's three likeliest there.
    assert "Paris" in reply, reply
    prompt, _ = fit_history(chat.tokenizer, messages, 1024)
    steps = torch.cat([ids.flatten() for ids in decode_steps])
    # The system prompt (the template's own) is kept, so the prompt's last token runs as the first decode step.
    assert int(steps[0]) == prompt[-1], "the last prompt token is the first decode step's input"
    chosen = steps[1:]
    bf16 = load_chat_model(precision="bf16")
    with torch.inference_mode():
        logits = bf16.model(torch.tensor([prompt + chosen.tolist()])).logits[0, len(prompt) - 1 : -1]
    top3 = logits.topk(3).indices
    assert all(token in top3[i] for i, token in enumerate(chosen.tolist())), (chosen, top3)
