"""Attention for packed training rows: each conversation attends within itself, one sdpa call per conversation.

A LoRA step packs its conversations into one row with positions restarting at 0 per conversation.
transformers' sdpa path gives such a row a block-diagonal mask over the whole row, so attention
costs the square of the row's length, most of it masked away. Causal sdpa per conversation costs
the sum of their squares instead, with the same result. Anything else (several rows, padding,
a KV cache, a single conversation) goes to transformers' sdpa unchanged, with its mask.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "packed_sdpa"


def conversation_bounds(position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor):
    """[(start, end), ...] of the conversations in one packed row, or None when this is not one."""
    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    ends = [*starts[1:], query.shape[2]]
    return list(zip(starts, ends, strict=True))


def packed_sdpa(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """sdpa, per conversation when the row is packed (same signature and output as transformers')."""
    bounds = conversation_bounds(position_ids, query, key)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    parts = [
        sdpa_attention_forward(
            module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, is_causal=True, **kwargs
        )[0]
        for s, e in bounds
    ]
    return torch.cat(parts, dim=1), None  # sdpa's layout: (batch, tokens, heads, head_dim)


def use_packed_attention(model) -> None:
    """Switch a transformers model (or peft wrapper) to packed_sdpa; sdpa's mask is still built for fallbacks."""
    AttentionInterface.register(NAME, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
