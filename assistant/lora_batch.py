"""Rows of different LoRA adapters decode in one batch at about the cost of one adapter.

peft's mixed-adapter forward (`adapter_names`) runs each adapter's rows through its own small
matmuls, about eight ops per adapter per layer; decoding a small model on a CPU is bound by per-op
overhead, so 8 chats over 4 adapters decoded at 0.64x the tokens/s of 8 chats on one adapter
(bench.concurrency --adapters 8). Here each LoRA layer stacks its adapters' A and B matrices once
(in fp32, ranks zero-padded, the scaling folded into B, row 0 all zeros for the base model) and a batch
gathers each row's pair: two batched matmuls, whatever the number of adapters in the batch.
Layers with a LoRA variant (DoRA, aLoRA, ...) keep peft's own path.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, Linear

_peft_mixed_forward = Linear._mixed_batch_forward


class _Stack:
    """One layer's adapters stacked: A^T (n+1, in, r), scaled B^T (n+1, r, out), row 0 = no adapter."""

    def __init__(self, layer: Linear):
        self.names = tuple(layer.lora_A.keys())
        self.index = {name: i + 1 for i, name in enumerate(self.names)}
        a = [layer.lora_A[n].weight for n in self.names]  # (r, in)
        b = [layer.lora_B[n].weight.float() * layer.scaling[n] for n in self.names]  # (out, r)
        # fp32 whatever the model's dtype: rows then get the same sums alone or in any batch (bf16 sums
        # change with the batch's shape), and the adapters are small.
        rank, dtype = max(w.shape[0] for w in a), torch.float32
        self.a = torch.zeros(len(a) + 1, a[0].shape[1], rank, dtype=dtype, device=a[0].device)
        self.b = torch.zeros(len(b) + 1, rank, b[0].shape[0], dtype=dtype, device=a[0].device)
        for i, (wa, wb) in enumerate(zip(a, b, strict=True), start=1):
            self.a[i, :, : wa.shape[0]] = wa.T
            self.b[i, : wb.shape[1]] = wb.T


def _gathered_forward(self: Linear, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
    variant = any(name in self.lora_variant for name in set(adapter_names))  # DoRA, aLoRA rows: peft's own path
    if self.training or variant or x.dim() != 3 or x.shape[0] != len(adapter_names) or not self.lora_A:
        return _peft_mixed_forward(self, x, *args, adapter_names=adapter_names, **kwargs)
    stack = getattr(self, "_gathered_stack", None)
    if stack is None or stack.names != tuple(self.lora_A.keys()):  # built on first use and after an attach
        with torch.no_grad():
            stack = self._gathered_stack = _Stack(self)
    for key in VARIANT_KWARG_KEYS:  # e.g. alora_offsets: for variants only, never for the base layer
        kwargs.pop(key, None)
    result = self.base_layer(x, *args, **kwargs)
    rows = torch.tensor([stack.index.get(name, 0) for name in adapter_names], device=x.device)
    low = torch.bmm(x.to(stack.a.dtype), stack.a.index_select(0, rows))  # (batch, tokens, r)
    return result + torch.bmm(low, stack.b.index_select(0, rows)).to(result.dtype)


def enable() -> None:
    """Route peft's mixed-adapter batches of LoRA linear layers through the gathered matmuls."""
    Linear._mixed_batch_forward = _gathered_forward
