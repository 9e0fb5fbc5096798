"""`python -m bench.trl_worker`: one TRL SFTTrainer + LoRA run for bench.train_speed and bench.quality;
prints one JSON line."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field

from bench.common import parse_config, peak_rss_mb


@dataclass
class TRLRunConfig:
    """One TRL run: 'default' keeps SFTConfig's defaults, 'tuned' is set up for this CPU."""

    train_file: str = field(metadata={"help": "Training rows, JSONL of {'messages': [...]}."})
    model: str = field(metadata={"help": "Base model folder (the embedded model's safetensors)."})
    output_dir: str = field(metadata={"help": "Where the adapter is saved."})
    mode: str = field(
        default="tuned",
        metadata={
            "help": "'default': SFTConfig defaults (bf16, gradient checkpointing); 'tuned': fp32, no "
            "checkpointing, padding-free.",
            "choices": ["default", "tuned"],
        },
    )
    max_steps: int = field(default=25, metadata={"help": "Optimizer steps (<= 0: --epochs)."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the data when --max-steps <= 0."})
    batch_size: int = field(default=8, metadata={"help": "Examples per step."})
    max_length: int = field(default=512, metadata={"help": "Token cap per example."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (tuned mode only)."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (train.sft's default)."})
    padding_free: bool = field(
        default=True, metadata={"help": "Tuned mode: concatenate each batch into one row (no pad tokens)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for initialisation and data order."})


def prompt_completion_rows(path: str) -> list[dict]:
    """{'messages'} rows -> TRL's conversational prompt-completion rows (last assistant turn = completion)."""
    rows = []
    with open(path) as handle:
        for line in handle:
            if not line.strip():
                continue
            messages = json.loads(line)["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            rows.append({"prompt": messages[:last], "completion": [messages[last]]})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Train, save the adapter, print {'tokens', 'train_seconds', 'tokens_per_second', ...} as JSON."""
    config = parse_config(TRLRunConfig, argv)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        result = train(config)
    result["worker_wall_s"] = round(time.perf_counter() - started, 2)
    result["worker_peak_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(result))
    return 0


def train(config: TRLRunConfig) -> dict:
    """The TRL run itself."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    class CountingSFTTrainer(SFTTrainer):
        """SFTTrainer that counts the real (non-pad) tokens its training steps process."""

        train_tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            self.train_tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    torch.manual_seed(config.seed)
    rows = prompt_completion_rows(config.train_file)
    common = dict(
        output_dir=config.output_dir,
        # transformers trains for num_train_epochs when max_steps is -1.
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        max_length=config.max_length,
        completion_only_loss=True,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=config.seed,
    )
    padding_free = False
    if config.mode == "default":
        # transformers refuses bf16 without a GPU unless told to run on the CPU: the one change a user must make.
        args = SFTConfig(**common, use_cpu=True)
    else:
        # TRL enforces max_length only when packing; STAR rows are far shorter, checked below.
        padding_free = config.padding_free
        if padding_free:
            common["max_length"] = None
        args = SFTConfig(
            **common,
            bf16=False,
            gradient_checkpointing=False,
            padding_free=padding_free,
            learning_rate=config.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,
            logging_steps=5,
            dataloader_pin_memory=False,
            model_init_kwargs={"dtype": torch.float32},
        )
    peft = LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear",
    )
    trainer = CountingSFTTrainer(
        model=config.model, args=args, train_dataset=Dataset.from_list(rows), peft_config=peft
    )
    if padding_free:
        longest = max(len(ids) for ids in trainer.train_dataset["input_ids"])
        if longest > config.max_length:
            raise SystemExit(
                f"a row has {longest} tokens > --max-length {config.max_length}; use --padding-free false"
            )
    output = trainer.train()
    trainer.save_model(config.output_dir)
    seconds = output.metrics["train_runtime"]
    return {
        "mode": config.mode,
        "steps": trainer.state.global_step,
        "tokens": trainer.train_tokens,
        "train_seconds": round(seconds, 2),
        "tokens_per_second": round(trainer.train_tokens / max(seconds, 1e-9), 1),
        "train_loss": output.metrics.get("train_loss"),
        "bf16": bool(args.bf16),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "padding_free": padding_free,
        "learning_rate": args.learning_rate,
        "use_cpu": bool(args.use_cpu),
    }


if __name__ == "__main__":
    sys.exit(main())
