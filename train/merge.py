"""`python -m train.merge ADAPTER --output-dir DIR`: fold a LoRA adapter into a standalone model folder."""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from assistant.loading import adapter_info, load_chat_model, method_of
from assistant.logs import configure
from train.cli import parse_with_positional


@dataclass
class MergeConfig:
    """Options of `python -m train.merge`."""

    adapter: str | None = field(
        default=None, metadata={"help": "LoRA adapter folder from train.sft (positional)."}
    )
    output_dir: str = field(
        default="merged", metadata={"help": "Folder for the merged model and its tokenizer."}
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Base model; default: the adapter's own base."}
    )
    precision: str = field(
        default="fp32", metadata={"help": "Weights' dtype in the merged folder: fp32, bf16 or fp16."}
    )


def merge(config: MergeConfig) -> Path:
    """Merge and save; the folder appears only when complete."""
    if method_of(adapter_info(config.adapter)) != "lora":
        raise ValueError(
            f"{config.adapter}: only LoRA adapters can be merged; prefix tuning has no weights to fold in"
        )
    if config.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be fp32, bf16 or fp16 for a merged folder, got {config.precision!r}")
    chat = load_chat_model(config.base_model, adapter=config.adapter, precision=config.precision)
    merged = chat.model.merge_and_unload()
    target = Path(config.output_dir)
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    chat.tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    configure(logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    config = parse_with_positional(
        MergeConfig, argv, "adapter", "python -m train.merge ADAPTER --output-dir DIR"
    )
    print(f"merged model written to {merge(config)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
