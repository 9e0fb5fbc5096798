"""Load a base model plus an optional adapter folder from the trainer, ready to chat."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from assistant.adapters import TrainedPrompt, adapter_info, method_of, trained_prompt
from assistant.embedded import EMBEDDED
from assistant.models import Precision, load_base_model, load_tokenizer, pick_precision

logger = logging.getLogger(__name__)


@dataclass
class ChatModel:
    """A loaded model with the tokenizer (and chat template) it must be served with."""

    model: object
    tokenizer: object
    base_model: str
    precision: Precision
    adapter: str | None = None
    method: str | None = None  # "lora" | "prefix" | None
    # One generation at a time per model: peft's disable_adapter() (compare mode) mutates the model.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    engine: object = field(default=None, repr=False)  # its BatchEngine, started on first reply
    trained_prompt: TrainedPrompt | None = None  # the system prompt the adapter was trained with

    def describe(self) -> str:
        """Human summary for the log and the UI."""
        what = (
            f"{self.base_model} + {self.method} adapter {self.adapter}" if self.adapter else self.base_model
        )
        return f"{what} ({self.precision.describe()})"

    @property
    def context_window(self) -> int:
        """Tokens the model attends over (prompt + reply)."""
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)


def load_chat_model(
    base_model: str | None = None, adapter: str | Path | None = None, precision: str = "auto"
) -> ChatModel:
    """Base model (default: the adapter's base, else the embedded model) plus an optional adapter."""
    # Loading runs torch's parallel ops; a thread that does so keeps an OpenMP thread team for life.
    # With more OpenMP threads alive than CPUs, libgomp stops spin-waiting between ops, which halved the
    # batch engine's decode speed (bench.decode_speed: 27 vs 52 tokens/s on 2 cores). A short-lived
    # thread takes its team with it, so the engine thread's team is the one left.
    result: list = []
    worker = threading.Thread(
        target=lambda: result.append(_capture(_load, base_model, adapter, precision)),
        name="model-load",
        daemon=True,  # Ctrl+C while loading ends the process
    )
    worker.start()
    worker.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _capture(fn, *args):
    try:
        return fn(*args)
    except BaseException as error:  # re-raised in the caller's thread
        return error


def base_of(base_model: str | None, info: dict) -> str:
    """The base a chat model loads: the one given, else its adapter's (peft config `info`), else the embedded."""
    return base_model or info.get("base_model_name_or_path") or EMBEDDED


def _load(base_model: str | None, adapter: str | Path | None, precision: str) -> ChatModel:
    info = adapter_info(adapter) if adapter else {}
    base = base_of(base_model, info)
    chosen = pick_precision(precision, base=base)
    # The adapter folder carries the tokenizer and template it was trained with: serve exactly those.
    has_tokenizer = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(adapter) if has_tokenizer else base)
    model = load_base_model(base, chosen)
    method = None
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        method = method_of(info)
    if chosen.name == "int4":
        from assistant.quant import quantize_for_cpu

        quantize_for_cpu(model)
    model.eval()
    chat = ChatModel(
        model, tokenizer, base, chosen, str(adapter) if adapter else None, method, trained_prompt=trained_prompt(adapter)
    )
    logger.info("chat model ready: %s", chat.describe())
    return chat
