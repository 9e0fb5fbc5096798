"""Rows of different LoRA adapters decode in one batch at about the cost of one adapter.

peft's mixed-adapter forward (`adapter_names`) runs each adapter's rows through its own small
matmuls, about eight ops per adapter per layer; decoding a small model on a CPU is bound by per-op
overhead, so 8 chats over 4 adapters decoded at 0.64x the tokens/s of 8 chats on one adapter
(bench.concurrency --adapters 8). Here each LoRA layer stacks its adapters' A and B matrices (ranks
zero-padded, row 0 all zeros for the base model) and a batch gathers each row's pair: two batched
matmuls, whatever the number of adapters in the batch.

The stack is the only copy of the weights: peft's own lora_A/lora_B parameters become views into it,
so an adapter costs its weights once, in Precision.adapter_dtype: the model's dtype, except bf16 beside
int4 weights where the model computes in fp32 (a CPU without bf16 units; 19.3 -> 11.5 MB per extra
adapter of r 16 on every linear layer, in process). Attaching casts only what is not in the compute dtype
yet (`cast`), never these views; model.to would replace them by copies, which `restack` then stacks anew.
The rows compute in fp32, each its own matmul (bmm), with the scaling applied per row, so a row gets the
same sums alone or in any batch (bf16 sums change with the batch's shape). A batch holds its adapters'
matrices in fp32 while its rows stay the same (a conversion at every step cost mixed batches 0.85 -> 0.77x
of one adapter's speed once the stacks were bf16), and a batch whose rows use one adapter (and the base
model) multiplies that adapter's matrices without copying them per row: 8-row decode steps took 0.72-0.90x
the time of the per-row copies, and a batch of base rows skips the adapters (0.64-0.80x). Layers with a
LoRA variant (DoRA, aLoRA, ...) keep peft's own path.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, Linear

_peft_mixed_forward = Linear._mixed_batch_forward


class _Stack:
    """One layer's adapters stacked: A^T (n+1, in, r), B^T (n+1, r, out), scaling (n+1,); row 0 = no adapter."""

    def __init__(self, layer: Linear, dtype: torch.dtype | None = None):
        self.names = tuple(layer.lora_A.keys())
        self.index = {name: i + 1 for i, name in enumerate(self.names)}
        a = [layer.lora_A[n].weight for n in self.names]  # (r, in)
        b = [layer.lora_B[n].weight for n in self.names]  # (out, r)
        rank, like = max(w.shape[0] for w in a), a[0]
        # A layer with a LoRA variant (DoRA) keeps that adapter's dtype (the compute dtype): peft's own path
        # multiplies in its weights' dtype, and mixes them with the magnitude and base weights.
        variant = [layer.lora_A[n].weight.dtype for n in self.names if n in layer.lora_variant]
        self.dtype = variant[0] if variant else dtype or like.dtype
        self.a = torch.zeros(len(a) + 1, like.shape[1], rank, dtype=self.dtype, device=like.device)
        self.b = torch.zeros(len(b) + 1, rank, b[0].shape[0], dtype=self.dtype, device=like.device)
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

    def holds(self, layer: Linear, dtype: torch.dtype | None) -> bool:
        """True while peft's parameters of `layer` are still this stack's views (a cast of the model replaces
        them with copies) and the stack is what `dtype` asks for."""
        if self.names != tuple(layer.lora_A.keys()) or (dtype is not None and not layer.lora_variant
                                                        and dtype != self.dtype):
            return False
        storage = self.a.untyped_storage().data_ptr()
        return all(layer.lora_A[n].weight.untyped_storage().data_ptr() == storage for n in self.names)

    def rows(self, adapter_names: list[str]) -> _Rows:
        """What a batch with these rows gathers (every layer of every step of a batch asks with the same names)."""
        batch = self._batch
        if batch is None or batch.names != tuple(adapter_names):
            batch = self._batch = _Rows(self, tuple(adapter_names))
        return batch


class _Rows:
    """A batch's rows in one layer's stack: scalings (0 for a base row) and the fp32 A and B the rows multiply,
    converted once per batch composition (a row joining or leaving), never at every step."""

    def __init__(self, stack: _Stack, names: tuple[str, ...]):
        self.names = names
        index = [stack.index.get(name, 0) for name in names]
        # (batch, 1, 1): a row's scaling multiplies its rank-r projection; 0 for a base row.
        self.scaling = torch.tensor([stack.scaling[i] for i in index], device=stack.a.device)[:, None, None]
        adapters = sorted(set(index) - {0})
        self.base_only = not adapters
        self.a = self.b = None  # (batch, in, r), (batch, r, out): one adapter's, expanded over the rows
        self.used_a = self.used_b = self.local = None  # several adapters: theirs (and the zero row), each row's
        if len(adapters) == 1:  # one adapter (beside base rows): its matrices once, not a copy per row
            (i,) = adapters
            # At its own rank, not the stack's padded one: the sums then never depend on which other adapters
            # are attached (a longer reduction changes the order of additions, hence the last bits).
            r = stack.ranks[i]
            self.a = stack.a[i, :, :r].float().expand(len(index), -1, -1)
            self.b = stack.b[i, :r].float().expand(len(index), -1, -1)
        elif adapters:  # each step gathers each row's pair from the batch's adapters, already in fp32
            used = [0, *adapters]
            picked = torch.tensor(used, device=stack.a.device)
            self.used_a, self.used_b = stack.a.index_select(0, picked).float(), stack.b.index_select(0, picked).float()
            self.local = torch.tensor([used.index(i) for i in index], device=stack.a.device)


def stack(layer: Linear) -> _Stack:
    """The layer's stack of adapters, built anew (in the same dtype) after an adapter is attached or deleted."""
    current = getattr(layer, "_gathered_stack", None)
    if current is None or current.names != tuple(layer.lora_A.keys()):
        with torch.no_grad():
            current = layer._gathered_stack = _Stack(layer, None if current is None else current.dtype)
    return current


def restack(model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
    """Stack every LoRA layer of `model` now, its weights in `dtype` (None: peft's), so peft's separate copies
    are freed at once: after an adapter is attached or deleted, and after the model was cast (which copies)."""
    for module in model.modules():
        if isinstance(module, Linear) and module.lora_A:
            current = getattr(module, "_gathered_stack", None)
            if current is None or not current.holds(module, dtype):
                with torch.no_grad():
                    module._gathered_stack = _Stack(module, dtype)


def cast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """model.to(dtype) for its floating parameters and buffers, except the LoRA weights stacks hold: those stay
    in their stack's dtype, and casting them would copy every attached adapter at each attach."""
    stacks = [getattr(layer, "_gathered_stack", None) for layer in model.modules() if isinstance(layer, Linear)]
    held = {weights.untyped_storage().data_ptr() for stack in stacks if stack for weights in (stack.a, stack.b)}
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for name, tensor in tensors.items():
                    if tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                        continue
                    if tensor.untyped_storage().data_ptr() in held:
                        continue
                    if isinstance(tensor, torch.nn.Parameter):
                        tensor.data = tensor.data.to(dtype)  # the same Parameter: ties and peft's references hold
                    else:
                        tensors[name] = tensor.to(dtype)


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
        a, b = batch.used_a.index_select(0, batch.local), batch.used_b.index_select(0, batch.local)
    else:
        a, b = batch.a, batch.b
    # fp32, each row its own matmul (bmm): a row's sums are the same alone or in any batch.
    low = torch.bmm(x.float(), a) * batch.scaling  # (batch, tokens, r)
    return result + torch.bmm(low, b).to(result.dtype)


def enable() -> None:
    """Route peft's mixed-adapter batches of LoRA linear layers through the gathered matmuls."""
    Linear._mixed_batch_forward = _gathered_forward
