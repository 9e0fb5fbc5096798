"""Base model and tokenizer loading: the embedded default, a Hub id or a local folder, on CPU or CUDA."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from assistant.embedded import EMBEDDED, embedded_model_dir, is_embedded

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int4", "8bit", "4bit")
# int4: torch's CPU kernels (assistant.quant), for serving; 8bit/4bit: bitsandbytes on CUDA.


def resolve_model_path(name: str) -> str:
    """Map the user-facing model name to what `from_pretrained` takes ('embedded' -> cached folder)."""
    return str(embedded_model_dir()) if name == EMBEDDED else name


def device() -> str:
    """'cuda' when a GPU is usable, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 matrix units (AVX512-BF16 or AMX)."""
    return bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()) and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def training_dtype() -> torch.dtype:
    """bf16/fp16 on a GPU; fp32 on a CPU (bf16 emulated on a CPU trains ~10x slower)."""
    if device() == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass
class Precision:
    """How the weights are held: a torch dtype, optionally bitsandbytes-quantized (CUDA only)."""

    name: str
    dtype: torch.dtype  # the dtype the weights load in
    bits: int | None = None
    compute: torch.dtype | None = None  # the dtype the model computes in, when not `dtype` (int4)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations, norms and adapter weights are held in."""
        return self.compute or self.dtype

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype attached LoRA adapters' weights are held in: bf16 beside int4 weights (their rows are
        multiplied in fp32 either way, assistant.lora_batch), else the compute dtype."""
        return torch.bfloat16 if self.name == "int4" else self.compute_dtype

    def describe(self) -> str:
        """One line for logs and the UI, e.g. 'cpu, fp32'."""
        if self.name == "int4":
            why = "" if self.compute_dtype == torch.bfloat16 else " (this CPU has no bf16 units)"
            return f"{device()}, int4 weights, {_DTYPE_NAMES[self.compute_dtype]} compute{why}"
        return f"{device()}, {self.name}"


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def pick_precision(requested: str = "auto", *, for_training: bool = False, base: str | None = None) -> Precision:
    """Resolve 'auto' for this hardware and base model; refuse what cannot run here."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    on_gpu = device() == "cuda"
    if requested == "auto":
        requested = _auto_precision(on_gpu, for_training, base)
    if requested == "int4":
        if on_gpu or for_training:
            raise ValueError("int4 is the CPU serving precision; on a GPU or for training use 8bit, 4bit or bf16")
        # Loaded in fp32 (the exact weights), then assistant.quant packs them. The rest computes in bf16 where
        # the CPU multiplies bf16 natively; elsewhere bf16 matmuls are emulated (3-5x slower than fp32 for a
        # prompt's rows, measured on an AVX2 EPYC), so there it stays fp32 around the packed kernels.
        return Precision("int4", torch.float32, compute=torch.bfloat16 if cpu_has_bf16() else torch.float32)
    if requested in ("8bit", "4bit"):
        if not on_gpu:
            raise ValueError(
                f"{requested} loading needs a CUDA GPU with bitsandbytes; on this CPU use --precision fp32 or bf16"
            )
        return Precision(requested, training_dtype(), 8 if requested == "8bit" else 4)
    return Precision(
        requested, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]
    )


def _auto_precision(on_gpu: bool, for_training: bool, base: str | None) -> str:
    if for_training:
        return _DTYPE_NAMES[training_dtype()]
    if on_gpu:
        return "8bit"
    # Decoding is memory-bound, so fewer bytes per token is faster. bitsandbytes 8-bit does load on a CPU but
    # decodes at ~1 token/s, so it is never picked there.
    # The embedded weights are Q4_1 already, so int4 loses nothing there: 2x bf16 with bf16 units
    # (bench.decode_speed), and 1.6-2.2x fp32 on an AVX2-only CPU with fp32 compute, at the same first token.
    # For other models int4 is a lossy choice the user makes with --precision int4.
    if is_embedded(base):
        return "int4"
    # bf16 halves the bytes per token where the CPU multiplies it natively (2x: 26 vs 13 tokens/s).
    return "bf16" if cpu_has_bf16() else "fp32"


def load_tokenizer(name_or_path: str):
    """Tokenizer with a pad token (the end-of-turn token when the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(f"{name_or_path}: the tokenizer has no chat template; use an instruct/chat model")
    return tokenizer


def load_base_model(name: str, precision: Precision):
    """Causal LM in the given precision, on the GPU when there is one."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": precision.dtype}
    if precision.bits:
        from transformers import BitsAndBytesConfig

        from assistant.optional import require_bitsandbytes

        require_bitsandbytes()  # held back until now (assistant.optional)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=precision.bits == 8,
            load_in_4bit=precision.bits == 4,
            bnb_4bit_compute_dtype=precision.dtype,
            bnb_4bit_quant_type="nf4",
        )
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name), **kwargs)
    if not precision.bits and device() == "cuda":
        model.to("cuda")
    logger.info("loaded %s (%s)", name, precision.describe())
    return model
