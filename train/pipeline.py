"""The training run behind `train.sft`: data checks, Trainer, adapter folder, report, checks."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from assistant.chat_format import TemplateError
from assistant.models import device, load_base_model, load_tokenizer, pick_precision
from train.features import Features, encode_examples, split_validation
from train.records import DataError, Example, load_examples

logger = logging.getLogger(__name__)


class InputError(ValueError):
    """Data or options that cannot be trained on; raised before any model weight is loaded."""


@dataclass
class PreparedData:
    """Everything known about the data before a model weight is loaded."""

    tokenizer: object
    train: Features
    valid: Features
    probe_rows: list[Example]  # validation rows (training rows when there are none), for probes
    warnings: list[str]


def prepare_data(config) -> PreparedData:
    """Load, validate, split and encode the data, or raise InputError naming file, line and field."""
    try:
        loaded = load_examples(config.data)
        valid_loaded = load_examples(config.valid_file) if config.valid_file else None
    except DataError as error:
        raise InputError(str(error)) from error
    warnings = loaded.warnings + (valid_loaded.warnings if valid_loaded else [])
    if valid_loaded:
        train_rows, valid_rows = loaded.examples, valid_loaded.examples
    else:
        train_rows, valid_rows = split_validation(loaded.examples, config.valid_fraction, config.seed)
    tokenizer = load_tokenizer(config.base_model)
    try:
        train, valid = (
            encode_examples(tokenizer, rows, config.max_length) for rows in (train_rows, valid_rows)
        )
    except TemplateError as error:
        raise InputError(f"{config.base_model}: {error}") from error
    if not train.items:
        raise InputError(
            f"{config.data}: no example has an assistant reply within --max-length {config.max_length}"
        )
    return PreparedData(tokenizer, train, valid, valid_rows or train_rows, warnings)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def checkpoint_to_resume(config) -> str | None:
    """Newest complete checkpoint when resuming; refuse to silently overwrite an earlier run."""
    folder = config.checkpoint_dir
    found = sorted(folder.glob("checkpoint-*"), key=_step) if folder.is_dir() else []
    # A checkpoint is complete once trainer_state.json is written (last).
    complete = [p for p in found if (p / "trainer_state.json").is_file()]
    if config.resume:
        if not complete:
            raise InputError(f"{folder}: no complete checkpoint to resume from; run without --resume")
        for partial in found:  # a kill mid-save leaves a later, partial checkpoint: drop it
            if partial not in complete and _step(partial) > _step(complete[-1]):
                shutil.rmtree(partial)
        logger.info("resuming from %s", complete[-1])
        return str(complete[-1])
    if folder.is_dir() and any(folder.iterdir()):
        if not config.overwrite:
            raise InputError(
                f"{folder}: checkpoints of an earlier run exist; pass --resume to continue it or --overwrite to start over"
            )
        shutil.rmtree(folder)
    return None


def training_precision(config):
    """The precision to train in; bitsandbytes options are refused where they cannot run."""
    requested = "8bit" if config.load_in_8bit else "4bit" if config.load_in_4bit else config.precision
    try:
        return pick_precision(requested, for_training=True)
    except ValueError as error:
        flag = {"8bit": "--load-in-8bit", "4bit": "--load-in-4bit"}.get(requested, "--precision")
        raise InputError(f"{flag}: {error}") from error


def build_model(config, tokenizer):
    """Base model with a fresh LoRA or prefix adapter, plus a copy of the initial trainable weights."""
    from peft import get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training

    from train.attention import use_packed_attention
    from train.dropout import use_fast_dropout
    from train.trainer import peft_config

    precision = training_precision(config)
    model = load_base_model(config.base_model, precision)
    if config.method == "lora":  # LoRA batches are packed rows (train.collate)
        use_packed_attention(model)
    if precision.bits:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = get_peft_model(
        model,
        peft_config(
            config.method,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.target_modules,
            use_dora=config.use_dora,
            virtual_tokens=config.virtual_tokens,
        ),
    )
    use_fast_dropout(model)
    initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return model, precision, initial


def training_arguments(config, train: Features, has_valid: bool, precision):
    """TrainingArguments for this run (eval, checkpoints and early stopping share one cadence)."""
    import math

    from transformers import TrainingArguments

    steps = (
        config.max_steps
        if config.max_steps > 0
        else math.ceil(config.epochs * math.ceil(len(train.items) / config.batch_size) / config.grad_accum)
    )
    save_steps = config.save_steps or max(1, steps // 5)
    interval = "steps" if has_valid else "no"
    return TrainingArguments(
        output_dir=str(config.checkpoint_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.lr,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        use_cpu=device() == "cpu",  # also lets bf16 autocast run on CPUs with bf16 units
        bf16=precision.name == "bf16",
        fp16=precision.name == "fp16",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        eval_strategy=interval,
        eval_steps=save_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        load_best_model_at_end=has_valid,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to=["tensorboard"],
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_pin_memory=False,
        # Prefix tuning pads rows: grouping similar lengths keeps that padding small.
        train_sampling_strategy="random" if config.method == "lora" else "group_by_length",
    )


def publish(staging: Path, target: Path) -> None:
    """Move a complete adapter folder into place; the old one is kept until the new one is there."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def run(config) -> str:
    """Train, save, check and publish the adapter; returns the one-line result."""
    from transformers import EarlyStoppingCallback

    from train.collate import ChatCollator
    from train.report import loss_curves, perplexity, plot_loss, write_report
    from train.trainer import ChatTrainer
    from train.verify import verify_adapter

    started = time.time()
    training_precision(config)  # fail on impossible options before reading any data
    data = prepare_data(config)
    tokenizer, train, valid = data.tokenizer, data.train, data.valid
    logger.info(
        "data: %d train / %d valid examples, %d tokens", len(train.items), len(valid.items), train.tokens
    )
    resume_from = checkpoint_to_resume(config)
    model, precision, initial = build_model(config, tokenizer)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "%s: %d trainable parameters (%.2f%% of %d)", config.method, trainable, 100 * trainable / total, total
    )
    args = training_arguments(config, train, bool(valid.items), precision)
    callbacks = (
        [EarlyStoppingCallback(config.early_stopping_patience)]
        if valid.items and config.early_stopping_patience
        else []
    )
    trainer = ChatTrainer(
        model=model,
        args=args,
        train_dataset=train.items,
        eval_dataset=valid.items or None,
        data_collator=ChatCollator(tokenizer.pad_token_id, packed=config.method == "lora"),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = trainer.evaluate() if valid.items else {}
    train_seconds = result.metrics["train_runtime"] - trainer.eval_seconds + metrics.get("eval_runtime", 0)

    target = Path(config.output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.peft_config["default"].base_model_name_or_path = config.base_model
        # The embedding is frozen; "auto" would look the base model up on the Hub to decide.
        model.save_pretrained(staging, save_embedding_layers=False)
        tokenizer.save_pretrained(staging)
        curves = loss_curves(trainer.state.log_history)
        plot_loss(curves, staging / "loss.png", f"{config.method} on {Path(config.data).name}")
        checks = verify_adapter(
            staging, config.base_model, initial, data.probe_rows[: config.probes], config.probe_tokens
        )
        eval_loss = metrics.get("eval_loss")
        report = {
            "base_model": config.base_model,
            "method": config.method,
            "precision": precision.describe(),
            "config": asdict(config),
            "data": {"train": train.summary(), "valid": valid.summary(), "warnings": data.warnings},
            "steps": trainer.state.global_step,
            "epochs": round(trainer.state.epoch or 0, 3),
            "train_loss": result.metrics.get("train_loss"),
            "eval_loss": eval_loss,
            "eval_perplexity": perplexity(eval_loss),
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "tokens_per_second": round(trainer.train_tokens / max(train_seconds, 1e-9), 1),
            "train_seconds": round(train_seconds, 1),
            "wall_seconds": round(time.time() - started, 1),
            "loss_curves": curves,
            **checks,
        }
        write_report(staging, report)
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    ppl = report["eval_perplexity"]
    return (
        f"adapter written to {target}: {config.method}, {report['steps']} steps, eval loss "
        f"{eval_loss if eval_loss is None else round(eval_loss, 4)}, perplexity {ppl}, "
        f"{report['tokens_per_second']} tokens/s, {report['wall_seconds']} s"
    )
