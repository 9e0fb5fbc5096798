"""CPU weight-only quantization for decoding: 4-bit linear layers and an 8-bit LM head.

Decoding reads every weight once per token, so on a CPU its speed is bytes / memory bandwidth.
torch ships CPU kernels that multiply bf16 activations by packed int4 (groups of 32 along the input,
a scale and a zero each) and by per-row int8 weights; these layers hold their weights that way.
The embedded model's linear layers come from a Q4_1 GGUF, which is exactly this format (groups of
32, min + scale), so for it 4-bit is lossless; its tied embedding is Q8_0, hence an 8-bit LM head.
peft's LoRA layers keep working: only their frozen `base_layer` is replaced, the adapter matrices
stay in bf16 and unmerged (merging a small delta into 4-bit weights would round most of it away).

The packed kernels win only for a few rows at a time: per row they cost ~2.5x a bf16 matmul's
(measured: 1 row 36 vs 64 us, 8 rows 99 vs 92 us, 384 rows 4.1 vs 1.7 ms for a 1536x576 layer).
So each layer also keeps a dense weight, used for prompts and batches of more than QUANT_ROWS
rows: decoding up to QUANT_ROWS chats at once reads 95 MB per token instead of 269 MB and prompts
stay as fast as bf16, for ~360 MB of memory instead of 269 MB (embedded model). Eight chats, the
engine's largest batch, stay on the packed kernels: a whole decode step of 8 rows ran at 201-203
tokens/s with them against 145-146 on the bf16 weights (the int8 LM head reads half the bytes; 4 rows:
157-163 either way; AMD EPYC, 2 cores, assistant/decode.py's loop).
On a CPU without bf16 units the model computes in fp32 instead (Precision.compute_dtype): the dense copy
is then fp32 (~540 MB), and the kernels still win at every batch size up to 8 (AVX2 EPYC: 8 rows 74-80
vs 56 tokens/s on the fp32 weights; one row 20-26 vs 14-15). That copy is held in oneDNN's packed layout
(pack_for_onednn), not as `weight`: MKL's GEMM, which F.linear calls in fp32, took as long for 9 rows as
for 30 on that CPU, oneDNN's 1.2-2.3x less for 9-56 rows (about even past ~128).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

GROUP = 32  # input features per int4 scale/zero: Q4_1's block size
QUANT_ROWS = 8  # at most this many rows (tokens x batch) go through the packed kernels: a full batch
ONEDNN_ROWS = 16  # the rows oneDNN lays packed weights out for: a chat's own tokens after a kept system prompt
# Sibling layers that read the same input (a Llama attention's q/k/v, its MLP's gate/up): packed as one.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class QuantizedLinear(nn.Module):
    """Shared forward: packed kernel for a few rows, the dense `weight` (in the compute dtype) for more.

    The packed kernels take bf16 rows and return bf16 sums. The dense path rounds its rows and sums the same
    way, so where the model computes in fp32 (a CPU without bf16 units) a token gets the same sums whether
    its forward ran many rows (a prompt) or few (a decode step, a resumed prompt's tail), up to the order of
    additions; in bf16 both roundings are no-ops.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # frozen; cast to the compute dtype with the model

    onednn: torch.Tensor | None = None  # fp32 compute: the dense weight in oneDNN's layout (no `weight` held then)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).bfloat16()
        if rows.shape[0] > QUANT_ROWS:
            y = self._dense_matmul(rows)
        else:
            y = self._packed_matmul(rows)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _dense_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        if self.onednn is not None:
            return torch.ops.mkldnn._linear_pointwise(rows.float(), self.onednn, None, "none", [], "").bfloat16()
        return nn.functional.linear(rows.to(self.weight.dtype), self.weight).bfloat16()

    def _packed_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __getattr__(self, name: str):
        # Reached only when `weight` is not held (pack_for_onednn): DoRA and peft read it, rarely; a copy.
        if name == "weight" and self.__dict__.get("onednn") is not None:
            return self.__dict__["onednn"].to_dense()
        return super().__getattr__(name)


class Int4Linear(QuantizedLinear):
    """y = x W^T + b with W as packed uint4 in groups of GROUP (asymmetric, min-max)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        groups = weight.reshape(out_features, in_features // GROUP, GROUP)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-12)
        codes = ((groups - low) / scale).round().clamp(0, 15).reshape(out_features, in_features)
        self.register_buffer(
            "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        )
        # The kernel computes (code - 8) * scale + zero, so zero = low + 8 * scale.
        scale_zero = torch.stack([scale.squeeze(-1), (low + 8 * scale).squeeze(-1)], dim=-1).bfloat16()
        self.register_buffer("scale_zero", _bits(scale_zero.transpose(0, 1).contiguous()))
        # The dense copy holds the very weights the kernel multiplies by (its bf16 scales and zeros applied to
        # the codes, exact in fp32), so the two paths differ in rounding only, never in the weights.
        scale, zero = scale_zero.float().unsqueeze(-1).unbind(-2)
        dense = (codes.reshape(groups.shape) - 8) * scale + zero
        self.weight = nn.Parameter(dense.reshape(out_features, in_features), requires_grad=False)

    def _packed_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        scale_zero = self.scale_zero.view(torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, scale_zero)

    _kept: tuple | None = None  # (input, output) of the last shared() call, until its last slice asked

    def shared(self, x: torch.Tensor, last: bool) -> torch.Tensor:
        """forward(x) for its Int4Slices: computed once while they ask with the same input in turn, forgotten
        when the `last` of them has asked (a prompt's outputs are large)."""
        kept = self._kept
        y = kept[1] if kept is not None and kept[0] is x else self(x)  # the same object: never changed in place
        self._kept = None if last else (x, y)
        return y


class Int4Slice(nn.Module):
    """One of sibling layers that read the same input (SIBLINGS): its columns of one packed matmul over all of
    them. One kernel call instead of three (q/k/v) or two (gate/up): 457 vs 566 us a decoder layer for one
    row (AVX2 EPYC, fp32 compute), the sums bit for bit those of separate layers (tests/test_quant.py)."""

    def __init__(self, fused: Int4Linear, start: int, end: int, bias: nn.Parameter | None):
        super().__init__()
        self.in_features, self.out_features, self.start, self.end = fused.in_features, end - start, start, end
        self.__dict__["fused"] = fused  # outside the module tree: the siblings share it, its weights held once
        self.bias = bias
        self.tie()

    def tie(self) -> None:
        """Make `weight` (the dense rows peft's DoRA reads) a view of the fused layer's again, after a cast."""
        self.weight = nn.Parameter(self.fused.weight[self.start : self.end], requires_grad=False)

    def untie(self) -> None:
        """Hold no `weight` (the fused layer's is packed for oneDNN): reading it then copies those rows out."""
        del self.weight
        self.__dict__["untied"] = True

    def __getattr__(self, name: str):
        if name == "weight" and self.__dict__.get("untied"):
            return self.fused.weight[self.start : self.end]
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fused.shared(x, last=self.end == self.fused.out_features)[..., self.start : self.end]
        return y if self.bias is None else y + self.bias


class Int8Linear(QuantizedLinear):
    """y = x W^T + b with W as int8 and one scale per output row (for LM heads, often tied to the embedding)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("codes", (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", _bits(scale))

    def _packed_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(rows, self.codes, self.scale.view(torch.bfloat16))


LINEAR_TYPES = (Int4Linear, Int4Slice, Int8Linear)  # the layers here peft's LoRA Linear may wrap


def _bits(scales: torch.Tensor) -> torch.Tensor:
    """bf16 scales held as their int16 bits, so casting the model to its compute dtype leaves them bf16."""
    return scales.bfloat16().view(torch.int16)


def quantize_for_cpu(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Swap the frozen linear layers for int4 ones and the LM head for an int8 one, in place; the rest -> `dtype`.

    Call it on the fp32 model (the exact weights), after any peft adapter is attached.
    """
    # A peft model's base holds the frozen layers; its prompt encoder (prefix tuning) stays as is.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    swaps, fused = 0, []
    for parent in list(base.modules()):
        if isinstance(parent, nn.ModuleDict):  # peft's lora_A / lora_B: trainable adapter weights
            continue
        for names in SIBLINGS:
            siblings = [getattr(parent, name, None) for name in names]
            if all(isinstance(child, nn.Linear) and child.in_features % GROUP == 0 for child in siblings) and \
                    len({child.in_features for child in siblings}) == 1:
                fused.append(_fuse(parent, names, siblings))
                swaps += len(names)
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if child is head:
                setattr(parent, name, Int8Linear(child))
            elif child.in_features % GROUP == 0:
                setattr(parent, name, Int4Linear(child))
                swaps += 1
    model.to(dtype)  # norms, embeddings, adapter weights, dense weights; integer buffers keep their type
    for layer, slices in fused:  # outside the module tree, so cast here; the slices' weights are views again
        layer.to(dtype)
        for part in slices:
            part.tie()
    packed = dtype == torch.float32 and onednn_works()
    if packed:
        for layer in [m for m in base.modules() if isinstance(m, Int4Linear)] + [layer for layer, _ in fused]:
            pack_for_onednn(layer)
        for _, slices in fused:
            for part in slices:
                part.untie()
    logger.info("int4 weights in %d linear layers (%d packed groups of siblings), int8 LM head, %s compute%s",
                swaps, len(fused), dtype, "; prompts through oneDNN's packed fp32 GEMM" if packed else "")
    return model


def pack_for_onednn(layer: QuantizedLinear) -> None:
    """Hold the layer's fp32 dense weight in oneDNN's layout instead (the same bytes): prompts of 9-56 tokens
    ran 1.2-1.8x faster through it than through MKL's GEMM on an AVX2 EPYC (README, Performance)."""
    layer.onednn = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), ONEDNN_ROWS)
    del layer.weight


@functools.cache
def onednn_works() -> bool:
    """This torch build packs fp32 weights for oneDNN and multiplies by them (x86 builds do)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        draw = torch.Generator().manual_seed(0)  # not the global generator: a seeded caller's draws stay its own
        weight, rows = torch.randn(64, 32, generator=draw), torch.randn(9, 32, generator=draw)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, ONEDNN_ROWS)
        got = torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")
        return bool(torch.allclose(got, rows @ weight.T, atol=1e-4))
    except (RuntimeError, AttributeError, NotImplementedError) as error:
        logger.info("oneDNN's packed GEMM is not available here (%s): prompts use the plain dense weights", error)
        return False


def _fuse(parent: nn.Module, names: tuple[str, ...], siblings: list[nn.Linear]) -> tuple[Int4Linear, list]:
    """Replace sibling linear layers of `parent` by Int4Slices of one packed layer; (that layer, the slices)."""
    whole = nn.Linear(siblings[0].in_features, sum(child.out_features for child in siblings), bias=False)
    whole.weight.data = torch.cat([child.weight.detach().float() for child in siblings])
    layer, slices, start = Int4Linear(whole), [], 0
    for name, child in zip(names, siblings, strict=True):
        slices.append(Int4Slice(layer, start, start + child.out_features, child.bias))
        setattr(parent, name, slices[-1])
        start += child.out_features
    return layer, slices
