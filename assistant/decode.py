"""The fast decode path: Llama-family models stepped without transformers' per-token machinery.

Decoding the embedded model on a CPU spent ~8 ms of each ~21 ms token in Python: `generate()`'s
per-step bookkeeping, the attention mask and cache objects rebuilt at every step, the attention
dispatch and the module tree (README, Performance). This loop keeps what decides the numbers and drops
the rest: it calls the model's own layers (so int4 weights, LoRA, DoRA and gathered mixed-adapter rows
run the very same code), transformers' own rotary embedding and logits processors, in the order
`generate()` applies them, and keeps each layer's keys/values as two plain tensors. `generate()` stays the reference: greedy replies of both paths are equal token for
token (tests/test_decode.py), and a model this loop does not know (another architecture, a sliding
window, generation settings it does not apply) is served by `generate()`, with the reason logged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

logger = logging.getLogger(__name__)

# Model types whose decoder layer is Llama's: pre-norm attention (q/k/v/o projections, rotary, grouped
# keys/values, no window) and a gated MLP (down(act(gate(x)) * up(x))). Others are served by generate().
LLAMA_LIKE = frozenset({"llama"})
# Generation-config fields that change what generate() does and that this loop does not apply.
UNHANDLED = {
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "begin_suppress_tokens": (None,),
    "suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "min_p": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "top_h": (None,),
    "sequence_bias": (None,),
    "renormalize_logits": (None, False),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "exponential_decay_length_penalty": (None,),
    "watermarking_config": (None,),
    "guidance_scale": (None, 1.0),
}


FAST = "lean step"  # this module's loop
GENERATE = "transformers generate()"  # the reference


@dataclass(frozen=True)
class Decoding:
    """Which loop decodes a model's replies, and why."""

    engine: str  # FAST or GENERATE
    why: str
    attention: str | None = None  # "fp32": the fast loop attends in fp32; None: in the model's dtype

    def describe(self) -> str:
        """E.g. 'decoding: lean step (a Llama model: its own layers, no generate())'."""
        return f"decoding: {self.engine} ({self.why})"

    def as_dict(self) -> dict:
        """For /v1/models."""
        return {"engine": self.engine, "why": self.why, "attention": self.attention}


def _transformers_model(model):
    """The transformers model inside a peft model (itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoding_of(model) -> Decoding:
    """The fast loop where it can decode as generate() would, else generate() with the reason; attention in
    fp32 where this CPU runs it faster than in the model's half precision (measured here, at load)."""
    why = unsupported(model)
    if why is not None:
        return Decoding(GENERATE, f"the lean step does not handle {why}")
    why = "a Llama-family model, stepped without generate()'s per-token work"
    base = _transformers_model(model)
    dtype = base.model.norm.weight.dtype
    if dtype == torch.float32 or base.device.type != "cpu":
        return Decoding(FAST, why)
    half, single = attention_timing(base.config, dtype), attention_timing(base.config, torch.float32)
    if single * FP32_MARGIN < half:
        return Decoding(FAST, f"{why}; attention in fp32, {single:.0f} vs {half:.0f} us a layer in "
                              f"{str(dtype).removeprefix('torch.')} at {TIMED_POSITIONS} positions on this CPU", "fp32")
    return Decoding(FAST, why)


FP32_MARGIN = 1.2  # fp32 attention only when it is clearly faster: it costs twice the cache memory
TIMED_POSITIONS = 256  # a support chat's history is a few hundred tokens


def attention_timing(config, dtype: torch.dtype, repeats: int = 40) -> float:
    """Microseconds of one layer's single-token attention over TIMED_POSITIONS positions in `dtype` (median)."""
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q = torch.randn(1, config.num_attention_heads, 1, dim, dtype=dtype)
    kv = torch.randn(1, config.num_key_value_heads, TIMED_POSITIONS, dim, dtype=dtype)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def unsupported(model) -> str | None:
    """Why `model` (a transformers model, or a peft model around one) cannot take the fast path; None if it can."""
    base = _transformers_model(model)
    config = base.config
    if config.model_type not in LLAMA_LIKE:
        return f"model type {config.model_type!r} is not one it steps (it steps {', '.join(sorted(LLAMA_LIKE))})"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "a sliding attention window"
    if config._attn_implementation != "sdpa":  # eager attention rounds its softmax differently
        return f"attention implementation {config._attn_implementation!r}"
    if not hasattr(base, "model") or not hasattr(base.model, "rotary_emb"):
        return "no decoder stack with a rotary embedding"
    generation = base.generation_config
    for name, neutral in UNHANDLED.items():
        if getattr(generation, name, None) not in neutral:
            return f"generation setting {name}={getattr(generation, name)!r}"
    return None


@dataclass
class _Layer:
    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class _Cache:
    """What a paused batch keeps (BatchEngine._kept_kv): each layer's keys/values over the positions run so far."""

    layers: list[_Layer]


@dataclass
class LeanOutput:
    """generate()'s output as the engine reads it."""

    past_key_values: _Cache
    sequences: torch.Tensor  # the prompts and the new tokens (rows that ended early padded)


def _call(module, x: torch.Tensor, names: list[str] | None) -> torch.Tensor:
    """One layer; peft's layers also get the batch's adapter per row (what peft's forward hooks pass them)."""
    if names is not None and isinstance(module, BaseTunerLayer):
        return module(x, adapter_names=names)
    return module(x)


class _Stepper:
    """One batch's forward passes, each layer's keys/values kept between them."""

    def __init__(self, model, adapter_names: list[str] | None, attention: str | None = None):
        base = _transformers_model(model)
        self.attention_dtype = torch.float32 if attention == "fp32" else None  # None: the layers' own
        self.decoder, self.head, self.names = base.model, base.lm_head, adapter_names
        config = base.config
        self.heads_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # Keys/values grow by concatenation, as DynamicCache does: attention over a contiguous tensor is what
        # generate() runs (a slice of a preallocated buffer was 20% slower per call at 170 positions).
        self.keys: list[torch.Tensor | None] = [None] * len(self.decoder.layers)
        self.values: list[torch.Tensor | None] = [None] * len(self.decoder.layers)
        self.filled = 0  # positions run so far

    def load(self, cache) -> None:
        """Start from a DynamicCache's keys/values (a resumed batch's)."""
        dtype = self.attention_dtype
        for i, layer in enumerate(cache.layers):
            self.keys[i], self.values[i] = (layer.keys.to(dtype or layer.keys.dtype),
                                            layer.values.to(dtype or layer.values.dtype))
            self.filled = layer.keys.shape[2]

    def kept(self) -> _Cache:
        """Every layer's keys/values so far, for rows that pause."""
        return _Cache([_Layer(k, v) for k, v in zip(self.keys, self.values, strict=True)])

    def _attend(self, q, keys, values, mask, scale: float) -> torch.Tensor:
        """Scaled dot-product attention as transformers' sdpa_attention_forward runs it on a CPU (its kernel
        choice decides the rounding): grouped heads without a mask; with one, a single query packed per
        key/value head, several against repeated keys/values."""
        rows, heads, new, dim = q.shape
        if mask is None:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=new > 1, scale=scale, enable_gqa=True)
        groups = heads // self.heads_kv
        if new == 1:
            out = F.scaled_dot_product_attention(q.reshape(rows, self.heads_kv, groups, dim), keys, values,
                                                 attn_mask=mask, scale=scale)
            return out.reshape(rows, heads, new, dim)
        keys, values = repeat_kv(keys, groups), repeat_kv(values, groups)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Logits (fp32) at the last position of `ids`; `valid` (rows x positions so far): None when no row
        is padded."""
        names, decoder = self.names, self.decoder
        rows, new = ids.shape
        start, end = self.filled, self.filled + new
        hidden = _call(decoder.embed_tokens, ids, names)
        cos, sin = decoder.rotary_emb(hidden, positions)
        mask = None
        if valid is not None or (start and new > 1):  # padded rows, or new positions after cached ones
            keys = torch.arange(end, device=ids.device)
            mask = (keys[None, :] <= keys[start:end, None])[None]  # causal: (1, new, end)
            if valid is not None:  # and never a padded key
                mask = mask & valid[:, None, :end].bool()
            mask = mask[:, None]
        for i, layer in enumerate(decoder.layers):
            attention = layer.self_attn
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            q = _call(attention.q_proj, hidden, names).view(rows, new, -1, self.head_dim).transpose(1, 2)
            k = _call(attention.k_proj, hidden, names).view(rows, new, -1, self.head_dim).transpose(1, 2)
            v = _call(attention.v_proj, hidden, names).view(rows, new, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if self.attention_dtype is not None:
                q, k, v = q.to(self.attention_dtype), k.to(self.attention_dtype), v.to(self.attention_dtype)
            if self.keys[i] is not None:
                k, v = torch.cat([self.keys[i], k], dim=-2), torch.cat([self.values[i], v], dim=-2)
            self.keys[i], self.values[i] = k, v
            out = self._attend(q, k, v, mask, attention.scaling).to(hidden.dtype)
            hidden = residual + _call(attention.o_proj, out.transpose(1, 2).reshape(rows, new, -1), names)
            residual = hidden
            hidden = layer.post_attention_layernorm(hidden)
            mlp = layer.mlp
            gated = mlp.act_fn(_call(mlp.gate_proj, hidden, names)) * _call(mlp.up_proj, hidden, names)
            hidden = residual + _call(mlp.down_proj, gated, names)
        self.filled = end
        last = decoder.norm(hidden[:, -1:])
        return _call(self.head, last, names)[:, -1].to(copy=True, dtype=torch.float32)


def processors(params: dict, mask: torch.Tensor, custom: LogitsProcessorList) -> LogitsProcessorList:
    """The logits processors generate() builds for these settings, in its order (penalty, custom, warpers)."""
    chain = LogitsProcessorList()
    penalty = params.get("repetition_penalty")
    if penalty is not None and penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(float(penalty), prompt_ignore_length=mask.int().argmax(dim=1)))
    chain.extend(custom)
    if params.get("do_sample"):
        if params.get("temperature") is not None and params["temperature"] != 1.0:
            chain.append(TemperatureLogitsWarper(params["temperature"]))
        if params.get("top_k") is not None and params["top_k"] != 0:
            chain.append(TopKLogitsWarper(top_k=params["top_k"], min_tokens_to_keep=1))
        if params.get("top_p") is not None and params["top_p"] < 1.0:
            chain.append(TopPLogitsWarper(top_p=params["top_p"], min_tokens_to_keep=1))
    return chain


def lean_generate(
    model,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    past_key_values=None,
    streamer=None,
    stopping_criteria=(),
    logits_processor=(),
    pad_token_id: int,
    max_new_tokens: int,
    adapter_names: list[str] | None = None,
    attention: str | None = None,
    return_dict_in_generate: bool = True,
    **params,
) -> LeanOutput:
    """generate()'s contract as the batch engine uses it (left-padded rows, an optional cache of all but the
    last token, a streamer, per-row stopping criteria), decoded by `_Stepper`; `attention` "fp32" attends
    in fp32 (the same tokens as generate() but where its bf16 rounding decides a near tie)."""
    del return_dict_in_generate  # always a dict-like output
    rows = input_ids.shape[0]
    stepper = _Stepper(model, adapter_names, attention)
    chain = processors(params, attention_mask, LogitsProcessorList(logits_processor))
    eos = _transformers_model(model).generation_config.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
    # Positions as generate() numbers left-padded rows: from 0 at each row's first real token.
    positions = attention_mask.long().cumsum(-1) - 1
    positions.masked_fill_(attention_mask == 0, 1)
    valid = None if bool(attention_mask.all()) else attention_mask.clone()
    if past_key_values is not None:
        stepper.load(past_key_values)
    ids, sequence = input_ids[:, stepper.filled :], input_ids
    step_positions = positions[:, stepper.filled :]
    if streamer is not None:
        streamer.put(input_ids.cpu())
    unfinished = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = stepper(ids, step_positions, valid)
        scores = chain(sequence, logits)
        if params.get("do_sample"):
            tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        tokens = torch.where(unfinished, tokens, pad_token_id)
        sequence = torch.cat([sequence, tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(tokens.cpu())
        stop = torch.isin(tokens, eos)
        for criterion in stopping_criteria:
            stop = stop | criterion(sequence, scores)
        unfinished = unfinished & ~stop
        if not bool(unfinished.any()):
            break
        ids, step_positions = tokens[:, None], step_positions[:, -1:] + 1
        if valid is not None:
            valid = torch.cat([valid, valid.new_ones(rows, 1)], dim=-1)
    if streamer is not None:
        streamer.end()
    return LeanOutput(stepper.kept(), sequence)
