"""The fast decode path (assistant/decode.py) against transformers' generate(), the reference, on the real
embedded model as it is served. Attending in the model's dtype it gives generate()'s tokens exactly (base,
LoRA, DoRA, mixed padded batches, sampling with a seed, the cache a paused batch keeps); attending in fp32
(what it serves where that is faster) it agrees within the tie rule of the export's llama.cpp round trip.
Prefix tuning stays on generate(), and the fast path is really the one taken."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from assistant import decode
from assistant.batching import end_of_turn_ids
from assistant.chat_format import encode_prompt
from assistant.decode import FAST, GENERATE, Decoding, lean_generate
from assistant.generation import GenerationParams, complete_reply
from assistant.loading import MAIN, chat_model, load_host
from tests.conftest import DATA, tiny_llama
from tests.test_serving import random_adapter
from train.export.roundtrip import MAX_DRIFT, TIE_SWING

# Test conversations: support requests from the data the product trains on, one of several turns, one
# that asks for a long answer (the longest cache), and one that invites repeating itself.
CONVERSATIONS = [
    [{"role": "user", "content": "Hi, I need to check my bank balance, can you help?"}],
    [{"role": "user", "content": "I'd like to book a table for two tonight."},
     {"role": "assistant", "content": "Sure! What time would you like?"},
     {"role": "user", "content": "Around 8 pm, somewhere quiet please."}],
    [{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
    [{"role": "system", "content": "You are a support agent for a bank. Answer briefly."},
     {"role": "user", "content": "My card was stolen. What should I do? What should I do?"}],
]
SETTINGS = {  # the app's greedy default (repetition penalty 1.1) and plain greedy
    "greedy, penalty 1.1": GenerationParams(max_new_tokens=40, temperature=0.0),
    "greedy, no penalty": GenerationParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0),
}


@pytest.fixture(scope="module")
def host(tmp_path_factory, lora_adapter):
    """The embedded model as the app loads it here, with a LoRA, a second LoRA, a DoRA and a prefix adapter."""
    from peft import LoraConfig, PrefixTuningConfig

    root = tmp_path_factory.mktemp("decode-adapters")
    random_adapter(root / "sailor", LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"],
                                               task_type="CAUSAL_LM"), seed=1)
    random_adapter(root / "dora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                                             task_type="CAUSAL_LM"), seed=2)
    random_adapter(root / "prefix", PrefixTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM"), seed=3)
    loaded = load_host("embedded")
    loaded.choices = {"base": chat_model(loaded), "pirate": chat_model(loaded, lora_adapter)}
    loaded.choices.update({name: chat_model(loaded, root / name) for name in ("sailor", "dora", "prefix")})
    return loaded


EXACT = Decoding(FAST, "attention in the model's dtype, as generate() attends", None)
REFERENCE = Decoding(GENERATE, "the reference")


def reply(host, choice: str, messages, params: GenerationParams, decoding: Decoding) -> str:
    """One reply of `choice` through the app's engine, decoded the given way."""
    fast = host.decoding
    host.decoding = decoding
    try:
        return complete_reply(host.choices[choice], messages, params)
    finally:
        host.decoding = fast


def test_the_embedded_model_decodes_on_the_fast_path_and_says_so(host, monkeypatch):
    assert host.decoding.engine == FAST, host.decoding  # a Llama model: a silent fallback fails here
    chat = host.choices["pirate"]
    assert "decoding: lean step" in chat.describe()
    assert host.choices["prefix"].decoding.engine == GENERATE and "prefix" in host.choices["prefix"].describe()

    def refused(*args, **kwargs):
        raise AssertionError("generate() ran although the fast path serves this model")

    monkeypatch.setattr(type(chat.model), "generate", refused)  # the peft model of every LoRA row
    monkeypatch.setattr(type(host.base), "generate", refused)  # the base model's
    assert complete_reply(chat, CONVERSATIONS[0], SETTINGS["greedy, no penalty"])
    assert complete_reply(host.choices["base"], CONVERSATIONS[0], SETTINGS["greedy, no penalty"])


# Every kind of adapter with the app's default; plain greedy (no penalty processor) is the same loop code
# whatever the adapter, so the base and one LoRA cover it. The prefix adapter's rows run on generate().
CASES = [(choice, "greedy, penalty 1.1") for choice in ("base", "pirate", "sailor", "dora", "prefix")] + [
    (choice, "greedy, no penalty") for choice in ("base", "pirate")]


@pytest.mark.parametrize(("choice", "setting"), CASES)
def test_greedy_replies_equal_generates_token_for_token(host, choice, setting):
    params = SETTINGS[setting]
    for messages in CONVERSATIONS:
        fast = reply(host, choice, messages, params, EXACT)
        reference = reply(host, choice, messages, params, REFERENCE)
        assert fast == reference, (choice, messages[-1]["content"])
        assert fast.strip(), (choice, messages[-1]["content"])


def left_padded(host, conversations) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's batch of several conversations: prompts aligned on the right."""
    prompts = [encode_prompt(host.tokenizer, messages) for messages in conversations]
    width = max(len(p) for p in prompts)
    pad = host.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled with a seed"])
def test_a_padded_batch_of_mixed_adapters_decodes_as_generate_does(host, sample):
    """Rows of different lengths and adapters in one batch (the engine's mixed LoRA batches): the same tokens,
    and with sampling the same draws from the same seed (the logits processors run in generate()'s order)."""
    rows = [CONVERSATIONS[0], CONVERSATIONS[1], CONVERSATIONS[2]]
    names = [host.choices["pirate"].adapter_name, None, host.choices["sailor"].adapter_name]
    ids, mask = left_padded(host, rows)
    model, _, extra = host.runner(MAIN, names)
    params = GenerationParams(max_new_tokens=24, temperature=0.8 if sample else 0.0).generate_kwargs()
    args = dict(input_ids=ids, attention_mask=mask, pad_token_id=host.tokenizer.pad_token_id,
                return_dict_in_generate=True, **extra, **params)
    with torch.inference_mode():
        torch.manual_seed(7)
        reference = model.generate(**args).sequences[:, ids.shape[1]:]
        torch.manual_seed(7)
        fast = lean_generate(model, **args).sequences[:, ids.shape[1]:]
    assert fast.tolist() == reference.tolist()
    assert len({tuple(row) for row in fast.tolist()}) == 3, "each row its own reply"


def test_the_keys_and_values_a_paused_batch_keeps_are_generates(host):
    """A paused row goes on from the cache it kept (BatchEngine._kept_kv): the fast loop's must be the same."""
    ids, mask = left_padded(host, CONVERSATIONS[:2])
    params = GenerationParams(max_new_tokens=6, temperature=0.0).generate_kwargs()
    model, _, extra = host.runner(MAIN, [host.choices["pirate"].adapter_name, None])
    args = dict(input_ids=ids, attention_mask=mask, pad_token_id=host.tokenizer.pad_token_id,
                return_dict_in_generate=True, **extra, **params)
    with torch.inference_mode():
        reference = model.generate(**args).past_key_values
        fast = lean_generate(model, **args).past_key_values
    assert len(fast.layers) == len(reference.layers)
    for ours, theirs in zip(fast.layers, reference.layers, strict=True):
        assert ours.keys.shape == theirs.keys.shape
        mask_keys = mask.bool()[:, None, :, None].expand(-1, ours.keys.shape[1], -1, ours.keys.shape[3])
        width = mask.shape[1]  # padded positions hold nothing anybody reads
        assert torch.equal(ours.keys[:, :, :width][mask_keys], theirs.keys[:, :, :width][mask_keys])
        assert torch.equal(ours.keys[:, :, width:], theirs.keys[:, :, width:])
        assert torch.equal(ours.values[:, :, width:], theirs.values[:, :, width:])


def test_a_model_it_does_not_know_is_served_by_generate_with_the_reason():
    from assistant.loading import Host
    from assistant.models import Precision

    eager = tiny_llama()
    eager.config._attn_implementation = "eager"
    host = Host("tiny-eager", eager, None, Precision("fp32", torch.float32))
    assert host.decoding.engine == GENERATE and "attention implementation 'eager'" in host.decoding.why
    assert decode.decoding_of(tiny_llama()).engine == FAST
    banned = tiny_llama()
    banned.generation_config.no_repeat_ngram_size = 3  # a setting generate() applies and the loop does not
    assert decode.unsupported(banned) == "generation setting no_repeat_ngram_size=3"


def test_stop_tokens_end_rows_as_generate_does(host):
    """A row that ends early is padded while the others go on, and the batch ends when all have ended."""
    short = [{"role": "user", "content": "What is the capital of France?"}]  # 7 tokens, in every precision
    ids, mask = left_padded(host, [short, CONVERSATIONS[2]])
    eos = sorted(end_of_turn_ids(host.base.generation_config, host.tokenizer))
    model, _, extra = host.runner(MAIN, [None, None])  # base rows (LoRA layers are in the model now)
    args = dict(input_ids=ids, attention_mask=mask, pad_token_id=host.tokenizer.pad_token_id,
                return_dict_in_generate=True, **extra,
                **GenerationParams(max_new_tokens=80, temperature=0.0).generate_kwargs())
    with torch.inference_mode():
        reference = model.generate(**args).sequences
        fast = lean_generate(model, **args).sequences
    assert fast.tolist() == reference.tolist()
    ended, going = fast[:, ids.shape[1]:].tolist()
    assert ended[-1] in eos and going[-1] not in eos, "one row ended on its own, the other went on"


def test_valid_pairs_replies_equal(host):
    """Ten customer-support questions of the test data, the app's default greedy settings."""
    import json

    questions = [json.loads(line)["prompt"] for line in Path(DATA / "valid_pairs.jsonl").read_text().splitlines()[:10]]
    params = GenerationParams(max_new_tokens=24, temperature=0.0)
    for question in questions:
        messages = [{"role": "user", "content": question}]
        assert reply(host, "pirate", messages, params, EXACT) == reply(host, "pirate", messages, params, REFERENCE), question


def greedy_logits(host, choice: str, prompt: list[int], attention: str) -> tuple[list[int], torch.Tensor]:
    """generate()'s greedy reply to `prompt` and its logits at each step; with `attention` the fast loop's
    logits on that same reply, fed one token at a time as it decodes."""
    chat = host.choices[choice]
    model, context, extra = host.runner(chat.group, [chat.adapter_name])
    with torch.inference_mode(), context:
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=32, do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=host.tokenizer.pad_token_id, output_logits=True,
                             return_dict_in_generate=True, **extra)
        reply_ids = out.sequences[0, len(prompt):].tolist()
        reference = torch.cat([step.float() for step in out.logits])
        stepper = decode._Stepper(model, extra.get("adapter_names"), attention)
        fast, done = [], 0
        for ids in [prompt] + [[t] for t in reply_ids[:-1]]:
            fast.append(stepper(torch.tensor([ids]), torch.arange(done, done + len(ids))[None], None))
            done += len(ids)
    return reply_ids, reference, torch.cat(fast)


@pytest.mark.parametrize("choice", ["base", "sailor", "dora"])
def test_fp32_attention_agrees_with_generate_within_the_tie_rule(host, choice):
    """Along generate()'s own greedy reply: at every position the fast loop (fp32 attention) picks generate()'s
    token, or the two prefer each other's by less than TIE_SWING logits in all (a coin toss that bf16
    rounding decides), and its logit for generate()'s token is within MAX_DRIFT."""
    swings = []
    for messages in CONVERSATIONS:
        _, ref, fast = greedy_logits(host, choice, encode_prompt(host.tokenizer, messages), "fp32")
        theirs, ours = ref.argmax(-1), fast.argmax(-1)
        rows = torch.arange(len(theirs))
        swing = (ref[rows, theirs] - ref[rows, ours]) + (fast[rows, ours] - fast[rows, theirs])
        drift = (ref[rows, theirs] - fast[rows, theirs]).abs()
        assert float(swing.max()) < TIE_SWING, (choice, messages[-1]["content"], swing.max())
        assert float(drift.max()) < MAX_DRIFT, (choice, messages[-1]["content"], drift.max())
        swings.append(float(swing.max()))
    # Exact agreement is the rule, near ties the exception: a loop that attends wrongly fails above.
    assert sorted(swings)[len(swings) // 2] < TIE_SWING / 2, swings


def test_the_served_loop_attends_in_the_dtype_it_chose(host, monkeypatch):
    """Where fp32 attention was measured faster at load it is what replies run (and the Model line says so)."""
    chosen = host.decoding.attention
    if chosen == "fp32":
        assert "attention in fp32" in host.choices["base"].describe()
    seen = set()
    attend = decode.F.scaled_dot_product_attention

    def watched(q, *args, **kwargs):
        seen.add(q.dtype)
        return attend(q, *args, **kwargs)

    monkeypatch.setattr(decode.F, "scaled_dot_product_attention", watched)
    complete_reply(host.choices["pirate"], CONVERSATIONS[0], GenerationParams(max_new_tokens=4, temperature=0.0))
    expected = torch.float32 if chosen == "fp32" else host.base.model.norm.weight.dtype
    assert seen == {expected}, (chosen, seen)


def test_fp32_attention_is_chosen_only_when_measured_faster(monkeypatch):
    model = tiny_llama().to(torch.bfloat16)
    monkeypatch.setattr(decode, "attention_timing", lambda config, dtype: 100.0 if dtype == torch.bfloat16 else 20.0)
    faster = decode.decoding_of(model)
    assert faster.attention == "fp32" and "attention in fp32, 20 vs 100 us" in faster.why
    monkeypatch.setattr(decode, "attention_timing", lambda config, dtype: 100.0 if dtype == torch.bfloat16 else 90.0)
    assert decode.decoding_of(model).attention is None
    assert decode.decoding_of(tiny_llama()).attention is None  # an fp32 model attends in fp32 anyway
