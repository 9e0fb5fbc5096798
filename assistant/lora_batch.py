"""Rows of different LoRA adapters decode in one batch at about the cost of one adapter.

peft's mixed-adapter forward (`adapter_names`) runs each adapter's rows through its own small
matmuls, about eight ops per adapter per layer; decoding a small model on a CPU is bound by per-op
overhead, so 8 chats over 4 adapters decoded at 0.64x the tokens/s of 8 chats on one adapter
(bench.concurrency --adapters 8). Here each LoRA layer stacks its adapters' A and B matrices (ranks
zero-padded, row 0 all zeros for the base model) and a batch gathers each row's pair: two batched
matmuls, whatever the number of adapters in the batch.

The stack is the only copy of the weights: peft's own lora_A/lora_B parameters become views into it,
so an adapter costs its weights once, in the model's dtype (30.7 -> 11 MB per extra adapter of r 16 on
every linear layer, in process). The rows compute in fp32, each its own matmul (bmm), with the scaling
applied per row, so a row gets the same sums alone or in any batch (bf16 sums change with the batch's
shape). A batch whose rows use one adapter (and the base model) multiplies that adapter's fp32 matrices,
held while such batches run, instead of copying them per row: 8-row decode steps took 0.72-0.90x the
time of the per-row copies, and a batch of base rows skips the adapters (0.64-0.80x). Layers with a LoRA
variant (DoRA, aLoRA, ...) keep peft's own path.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, Linear

_peft_mixed_forward = Linear._mixed_batch_forward


class _Stack:
    """One layer's adapters stacked: A^T (n+1, in, r), B^T (n+1, r, out), scaling (n+1,); row 0 = no adapter."""

    def __init__(self, layer: Linear):
        self.names = tuple(layer.lora_A.keys())
        self.index = {name: i + 1 for i, name in enumerate(self.names)}
        a = [layer.lora_A[n].weight for n in self.names]  # (r, in)
        b = [layer.lora_B[n].weight for n in self.names]  # (out, r)
        rank, like = max(w.shape[0] for w in a), a[0]
        self.a = torch.zeros(len(a) + 1, like.shape[1], rank, dtype=like.dtype, device=like.device)
        self.b = torch.zeros(len(b) + 1, rank, b[0].shape[0], dtype=like.dtype, device=like.device)
        self.scaling = [0.0] + [float(layer.scaling[name]) for name in self.names]
        self.ranks = [0] + [w.shape[0] for w in a]
        self._batch: _Rows | None = None
        for i, (name, wa, wb) in enumerate(zip(self.names, a, b, strict=True), start=1):
            r = wa.shape[0]
            self.a[i, :, :r] = wa.T
            self.b[i, :r] = wb.T
            # peft's parameters become views of the stack: one copy of the weights, not two.
            layer.lora_A[name].weight = torch.nn.Parameter(self.a[i, :, :r].T, requires_grad=False)
            layer.lora_B[name].weight = torch.nn.Parameter(self.b[i, :r].T, requires_grad=False)

    def rows(self, adapter_names: list[str]) -> _Rows:
        """What a batch with these rows gathers (every layer of every step of a batch asks with the same names)."""
        batch = self._batch
        if batch is None or batch.names != tuple(adapter_names):
            batch = self._batch = _Rows(self, tuple(adapter_names))
        return batch


class _Rows:
    """A batch's rows in one layer's stack: indices, scalings (0 for a base row), and the fp32 A and B of the
    batch's adapter when it has just one (expanded over the rows: views, not copies)."""

    def __init__(self, stack: _Stack, names: tuple[str, ...]):
        self.names = names
        index = [stack.index.get(name, 0) for name in names]
        self.rows = torch.tensor(index, device=stack.a.device)
        # (batch, 1, 1): a row's scaling multiplies its rank-r projection; 0 for a base row.
        self.scaling = torch.tensor([stack.scaling[i] for i in index], device=stack.a.device)[:, None, None]
        adapters = set(index) - {0}
        self.base_only = not adapters
        self.a = self.b = None
        if len(adapters) == 1:  # one adapter (beside base rows): its matrices once, not a copy per row
            (i,) = adapters
            # At its own rank, not the stack's padded one: the sums then never depend on which other adapters
            # are attached (a longer reduction changes the order of additions, hence the last bits).
            r = stack.ranks[i]
            self.a = stack.a[i, :, :r].float().expand(len(index), -1, -1)
            self.b = stack.b[i, :r].float().expand(len(index), -1, -1)


def stack(layer: Linear) -> _Stack:
    """The layer's stack of adapters, built anew after an adapter is attached or deleted."""
    current = getattr(layer, "_gathered_stack", None)
    if current is None or current.names != tuple(layer.lora_A.keys()):
        with torch.no_grad():
            current = layer._gathered_stack = _Stack(layer)
    return current


def restack(model: torch.nn.Module) -> None:
    """Stack every LoRA layer of `model` now (after an attach), so peft's separate copies are freed at once."""
    for module in model.modules():
        if isinstance(module, Linear) and module.lora_A:
            stack(module)


def _gathered_forward(self: Linear, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
    variant = any(name in self.lora_variant for name in set(adapter_names))  # DoRA, aLoRA rows: peft's own path
    if self.training or variant or x.dim() != 3 or x.shape[0] != len(adapter_names) or not self.lora_A:
        return _peft_mixed_forward(self, x, *args, adapter_names=adapter_names, **kwargs)
    layer = stack(self)
    for key in VARIANT_KWARG_KEYS:  # e.g. alora_offsets: for variants only, never for the base layer
        kwargs.pop(key, None)
    result = self.base_layer(x, *args, **kwargs)
    batch = layer.rows(adapter_names)
    if batch.base_only:  # no row has an adapter on this layer
        return result
    if batch.a is None:  # rows of several adapters: each row's pair gathered (a copy per row)
        a, b = layer.a.index_select(0, batch.rows).float(), layer.b.index_select(0, batch.rows).float()
    else:
        a, b = batch.a, batch.b
    # fp32, each row its own matmul (bmm): a row's sums are the same alone or in any batch.
    low = torch.bmm(x.float(), a) * batch.scaling  # (batch, tokens, r)
    return result + torch.bmm(low, b).to(result.dtype)


def enable() -> None:
    """Route peft's mixed-adapter batches of LoRA linear layers through the gathered matmuls."""
    Linear._mixed_batch_forward = _gathered_forward
