"""`python -m train.merge ADAPTER --output-dir DIR`: fold a LoRA adapter into a standalone model folder."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from assistant.adapters import adapter_info, read_folder, write_generation, write_trained_prompt
from assistant.loading import load_chat_model
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


MERGE_RECORD = "merged_from.json"  # marks a folder train.merge wrote (so a new merge may replace it)


def check_output_dir(target: Path, record: str = MERGE_RECORD, writer: str = "train.merge") -> None:
    """Refuse to replace anything but an empty folder or one `writer` wrote (it holds `record`)."""
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / record).is_file())):
        raise ValueError(
            f"--output-dir {target}: exists and was not written by {writer} (no {record}); "
            "choose another --output-dir or move it away"
        )


def merge(config: MergeConfig) -> Path:
    """Merge and save; the folder appears only when complete."""
    target = Path(config.output_dir)
    check_output_dir(target)
    adapter_info(config.adapter)  # a clear error when the folder is not an adapter
    folder = read_folder(config.adapter)
    if folder.method != "lora":
        raise ValueError(
            f"{config.adapter}: only LoRA adapters can be merged; prefix tuning has no weights to fold in"
        )
    if config.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be fp32, bf16 or fp16 for a merged folder, got {config.precision!r}")
    chat = load_chat_model(config.base_model, adapter=config.adapter, precision=config.precision)
    merged = chat.model.merge_and_unload()
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    chat.tokenizer.save_pretrained(staging)
    record = {"adapter": str(Path(config.adapter).resolve()), "base_model": chat.base_model}
    (staging / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    # The merged folder serves as the adapter did: with the system prompt it was trained with and its
    # generation settings (merged into the model's own generation_config.json, whose eos ids stay).
    if folder.prompt is not None:
        write_trained_prompt(staging, folder.prompt)
    if folder.generation:
        write_generation(staging, folder.generation)
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
    try:
        print(f"merged model written to {merge(config)}")
    except (OSError, ValueError) as error:  # not an adapter, not LoRA, a foreign --output-dir
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
