"""A peft LoRA adapter as a GGUF LoRA file for llama.cpp and Ollama, beside the base model's own GGUF.

The file is what llama.cpp's `convert_lora_to_gguf.py` writes: llama.cpp's tensor names
(`blk.N.attn_q.weight.lora_a` / `.lora_b`), `general.type = adapter`, `adapter.type = lora` and
`adapter.lora.alpha`. llama.cpp applies `W x + (alpha / r) * B A x`, so peft's scaling carries over as is.
Everything is checked against the base GGUF (architecture, tensor names, shapes) before a byte is written.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from assistant.adapters import adapter_info, method_of

logger = logging.getLogger(__name__)

LORA_WEIGHTS = "adapter_model.safetensors"
# convert_hf_to_gguf.py permutes the rows of q and k for these architectures (rotary layout); the
# LoRA B matrices (whose rows are the output features) must follow, or the adapter lands on the wrong rows.
PERMUTED_QK = ("llama",)


class ExportError(ValueError):
    """The adapter cannot be exported as asked; the message says what to do instead."""


@dataclass(frozen=True)
class BaseGGUF:
    """What the LoRA file must match in the base model's GGUF."""

    path: Path
    arch: str
    blocks: int
    heads: int
    kv_heads: int
    shapes: dict[str, tuple[int, ...]]  # tensor name -> numpy shape (rows, columns)


def read_base(path: str | Path) -> BaseGGUF:
    """Architecture, head counts and tensor shapes of a base model GGUF."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: base model GGUF not found")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as error:
        raise ExportError(f"{path}: not a readable GGUF file ({error})") from error

    def field(key: str):
        found = reader.fields.get(key)
        return None if found is None else found.contents()

    if field("general.type") not in (None, "model"):
        raise ExportError(f"{path}: general.type is {field('general.type')!r}, not a base model")
    arch = field("general.architecture")
    heads = field(f"{arch}.attention.head_count")
    return BaseGGUF(
        path=path,
        arch=arch,
        blocks=int(field(f"{arch}.block_count")),
        heads=int(heads),
        kv_heads=int(field(f"{arch}.attention.head_count_kv") or heads),
        # GGUF lists dimensions fastest first; numpy (and torch) list rows first.
        shapes={t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors},
    )


def refuse_unsupported(adapter: str | Path, info: dict | None = None) -> None:
    """Raise ExportError for adapters llama.cpp cannot apply, saying what to do instead."""
    info = adapter_info(adapter) if info is None else info
    method = method_of(info)
    if method == "prefix":
        raise ExportError(
            f"{adapter}: a prefix-tuning adapter has no weights llama.cpp or Ollama can apply (they load LoRA "
            "only). Retrain with `python -m train.sft DATA --method lora`, or keep serving it with this app."
        )
    if method != "lora":
        raise ExportError(f"{adapter}: peft_type {info.get('peft_type')!r} cannot be exported; LoRA only")
    if info.get("use_dora"):
        raise ExportError(
            f"{adapter}: a DoRA adapter scales each weight by a learned magnitude that llama.cpp cannot apply. "
            "Export --to merged and convert that folder with llama.cpp's convert_hf_to_gguf.py, or retrain "
            "without DoRA."
        )
    if info.get("modules_to_save") or info.get("lora_bias") or info.get("bias") not in (None, "none"):
        raise ExportError(
            f"{adapter}: the adapter trains full weights or biases besides LoRA matrices (modules_to_save/"
            "bias), which a GGUF LoRA cannot carry; export --to merged instead"
        )


def lora_tensors(adapter: str | Path, base: BaseGGUF) -> tuple[dict[str, np.ndarray], float]:
    """llama.cpp-named float32 LoRA tensors of `adapter` and the alpha to record, checked against `base`."""
    import gguf
    from safetensors.numpy import load_file

    info = adapter_info(adapter)
    refuse_unsupported(adapter, info)
    weights_file = Path(adapter) / LORA_WEIGHTS
    if not weights_file.is_file():
        raise ExportError(f"{adapter}: no {LORA_WEIGHTS} (an adapter saved by older peft as .bin: load and save it again)")
    if info.get("rank_pattern") or info.get("alpha_pattern"):  # llama.cpp has one alpha per file
        raise ExportError(f"{adapter}: rank_pattern/alpha_pattern give modules different scalings; export --to merged")
    arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == base.arch), None)
    if arch is None:
        raise ExportError(f"{base.path}: architecture {base.arch!r} is unknown to the gguf package")
    names = gguf.get_tensor_name_map(arch, base.blocks)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(weights_file).items():
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ExportError(f"{weights_file}: tensor {key!r} is not a LoRA A/B matrix; export --to merged instead")
        target = names.get_name(module)
        if target is None:
            raise ExportError(f"{weights_file}: {module!r} has no llama.cpp name for architecture {base.arch!r}")
        pairs.setdefault(f"{target}.weight", {})[part[0]] = value.astype(np.float32)
    tensors: dict[str, np.ndarray] = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise ExportError(f"{weights_file}: {name} has lora_{''.join(pair)} only; the adapter file is incomplete")
        a, b = pair["A"], pair["B"]
        if name not in base.shapes:
            raise ExportError(f"{base.path}: has no tensor {name}; is this GGUF the adapter's base model?")
        rows, cols = base.shapes[name]
        if a.shape[1] != cols or b.shape[0] != rows or a.shape[0] != b.shape[1]:
            raise ExportError(
                f"{name}: LoRA A {a.shape} / B {b.shape} do not fit the base GGUF's {(rows, cols)}; "
                "the adapter was trained on another base model"
            )
        if base.arch in PERMUTED_QK and name.endswith(("attn_q.weight", "attn_k.weight")):
            b = permute_rows(b, base.heads if "attn_q" in name else base.kv_heads)
        tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if not tensors:
        raise ExportError(f"{weights_file}: holds no LoRA matrices")
    # llama.cpp scales by alpha / r with r read from each tensor: record the alpha that gives peft's scaling.
    r, alpha = int(info["r"]), float(info["lora_alpha"])
    return tensors, alpha * math.sqrt(r) if info.get("use_rslora") else alpha  # rsLoRA: alpha / sqrt(r)


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows in llama.cpp's rotary layout, as convert_hf_to_gguf.py's LlamaModel.permute writes q and k."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_lora_gguf(adapter: str | Path, base_gguf: str | Path, output: str | Path) -> Path:
    """Write `adapter` as a GGUF LoRA for `base_gguf`; the file appears only when complete."""
    import gguf

    base = read_base(base_gguf)
    tensors, alpha = lora_tensors(adapter, base)
    output = Path(output)
    staging = output.with_name(f".{output.name}.partial")
    writer = gguf.GGUFWriter(staging, arch=base.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(Path(adapter).resolve().name)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    staging.replace(output)
    logger.info("GGUF LoRA written: %s (%d tensors, alpha %g)", output, len(tensors), alpha)
    return output

