"""The training run behind `train.sft`: data checks, Trainer, adapter folder, report, checks."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from assistant.adapters import (
    ADAPTER_CONFIG,
    GENERATION_FILE,
    REPORT_FILE,
    AdapterFolder,
    TrainedPrompt,
    read_folder,
    write_generation,
    write_report,
    write_trained_prompt,
    written_by_trainer,
)
from assistant.chat_format import TemplateError
from assistant.embedded import is_embedded, public_name
from assistant.models import device, load_base_model, load_tokenizer, pick_precision
from train.features import (
    Features,
    encode_examples,
    read_system_prompt,
    split_validation,
    trained_prompt_of,
    with_system_prompt,
)
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
    prompt: TrainedPrompt  # the system prompt the rows are trained under, recorded in the adapter
    redacted: dict[str, int] | None = None  # personal data replaced per kind (--redact), None when not asked


def continued(config) -> tuple[object, AdapterFolder | None]:
    """`config` with what --from-adapter fixes (its base model, method and DoRA), and that adapter's folder
    (None without --from-adapter); InputError when the folder cannot be trained further."""
    if not getattr(config, "from_adapter", None):
        return config, None
    folder = read_folder(config.from_adapter)
    if folder.problem or folder.method is None:
        why = folder.problem or "it is a merged model, not an adapter"
        raise InputError(f"--from-adapter {config.from_adapter}: {why}")
    base = folder.base
    # --base-model left at its default takes the adapter's; another one would not match its weights.
    if not is_embedded(config.base_model) and config.base_model != base:
        raise InputError(f"--from-adapter {config.from_adapter}: it was trained on {base}, not on --base-model "
                         f"{config.base_model}; leave --base-model out")
    if (config.method, config.use_dora) != (folder.method, folder.kind == "dora"):
        logger.info("--from-adapter: training its %s weights further", folder.kind)
    return replace(config, base_model=base, method=folder.method, use_dora=folder.kind == "dora"), folder


def prepare_data(config, parent: AdapterFolder | None = None) -> PreparedData:
    """Load, validate, split and encode the data, or raise InputError naming file, line and field.

    `parent`: the adapter --from-adapter continues; rows without a system message then get its trained prompt
    (unless --system-prompt says otherwise), so it goes on learning under the prompt it is served with."""
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
    redacted = None
    if getattr(config, "redact", False):  # before the recorded prompt, the probes and the tokens see the text
        train_rows, valid_rows, redacted = _redact(train_rows, valid_rows, getattr(config, "phone_region", "US"))
    tokenizer = load_tokenizer(config.base_model)
    system, source = system_prompt_for(config, parent)
    prompt = trained_prompt_of(tokenizer, train_rows, system, source)
    # Rows without a system message get --system-prompt; without it the template writes its own default.
    train_rows, valid_rows = with_system_prompt(train_rows, system), with_system_prompt(valid_rows, system)
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
    return PreparedData(tokenizer, train, valid, valid_rows or train_rows, warnings, prompt, redacted)


def system_prompt_for(config, parent: AdapterFolder | None) -> tuple[str | None, str]:
    """The system prompt of rows without one and where it comes from: --system-prompt, else the trained prompt
    of the --from-adapter adapter (so it goes on learning under the prompt it is served with), else none."""
    try:
        system = read_system_prompt(config.system_prompt)
    except OSError as error:
        raise InputError(f"--system-prompt: {error}") from error
    inherited = parent.prompt if parent is not None else None
    if system is None and inherited is not None and inherited.source not in ("template default", "none"):
        return inherited.text, f"--from-adapter {parent.path.name}"
    return system, "--system-prompt"


def _redact(train_rows: list[Example], valid_rows: list[Example], region: str):
    """The rows with personal data replaced (assistant.pii), and the replacements per kind."""
    from assistant.pii import RegionError, check_region, describe, redact_rows

    try:
        check_region(region)
    except RegionError as error:
        raise InputError(str(error)) from error
    train_rows, counts = redact_rows(train_rows, region)
    valid_rows, valid_counts = redact_rows(valid_rows, region)
    counts.update(valid_counts)
    logger.info("--redact: replaced %s", describe(counts) or "nothing (no personal data found)")
    return train_rows, valid_rows, dict(counts)


def check_output_dir(config) -> Path:
    """The adapter folder to write; refuse to replace anything but an adapter train.sft published."""
    target = Path(config.output_dir)
    if target.exists() and not target.is_dir():
        raise InputError(f"--output-dir {target}: is a file; choose a folder name")
    if target.is_dir() and any(target.iterdir()) and not written_by_trainer(target):
        raise InputError(
            f"--output-dir {target}: the folder exists and is not an adapter written by train.sft "
            f"(no {ADAPTER_CONFIG} + {REPORT_FILE}); choose another --output-dir or move it away"
        )
    return target


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def checkpoint_to_resume(config) -> str | None:
    """Newest complete checkpoint when resuming; refuse to silently discard a complete one."""
    folder = config.checkpoint_dir
    found = sorted(folder.glob("checkpoint-*"), key=_step) if folder.is_dir() else []
    # A checkpoint is complete once trainer_state.json is written (last).
    complete = [p for p in found if (p / "trainer_state.json").is_file()]
    if config.resume and complete:
        for partial in found:  # a kill mid-save leaves a later, partial checkpoint: drop it
            if partial not in complete and _step(partial) > _step(complete[-1]):
                shutil.rmtree(partial)
        logger.info("resuming from %s", complete[-1])
        return str(complete[-1])
    if complete and not config.overwrite:
        raise InputError(
            f"{folder}: checkpoints of an earlier run exist; pass --resume to continue it or --overwrite to start over"
        )
    if config.resume:
        logger.warning("%s: no complete checkpoint (the run stopped before its first); starting at step 0", folder)
    # Nothing to resume (or --overwrite): what is left of an earlier run goes.
    shutil.rmtree(folder, ignore_errors=True)
    return None


def training_precision(config):
    """The precision to train in; bitsandbytes options are refused where they cannot run."""
    requested = "8bit" if config.load_in_8bit else "4bit" if config.load_in_4bit else config.precision
    try:
        return pick_precision(requested, for_training=True)
    except ValueError as error:
        flag = {"8bit": "--load-in-8bit", "4bit": "--load-in-4bit"}.get(requested, "--precision")
        raise InputError(f"{flag}: {error}") from error


def build_model(config, tokenizer, train: Features):
    """Base model with a fresh LoRA or prefix adapter, plus a copy of the initial trainable weights."""
    from peft import get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training
    from transformers import set_seed

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
    set_seed(config.seed)  # --seed fixes the adapter's initial weights too: same seed and data, same adapter
    if getattr(config, "from_adapter", None):  # its trained weights, trainable (continued() checked the folder)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, config.from_adapter, is_trainable=True)
        use_fast_dropout(model)
        return model, precision, {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
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
    if config.method == "prefix":
        init_prefix_from_data(model, train)
    use_fast_dropout(model)
    initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return model, precision, initial


def init_prefix_from_data(model, train: Features) -> None:
    """Start the prefix as the base model's own keys/values of the start of a training conversation.

    A random prefix first breaks the model (validation loss far above the base's) and short runs never
    recover; the keys/values of real text (the trained system prompt opens every rendered conversation)
    leave the model's replies as they were, so training starts from the base model's loss.
    """
    import torch
    from peft import initialize_kv_prefix_from_past_key_values

    virtual = model.peft_config["default"].num_virtual_tokens
    ids: list[int] = []
    for item in train.items:  # conversations are short only in toy data; join a few when needed
        ids += item["input_ids"]
        if len(ids) >= virtual:
            break
    if len(ids) < virtual:
        raise InputError(f"--virtual-tokens {virtual}: the training data has only {len(ids)} tokens")
    device = next(model.parameters()).device
    with torch.no_grad(), model.disable_adapter():
        cache = model(input_ids=torch.tensor([ids[:virtual]], device=device), use_cache=True).past_key_values
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    initialize_kv_prefix_from_past_key_values(model, past_key_values=kv)


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
        # Whole steps, rounded down: transformers rounds a ratio up, so a one-step run warmed up for its only
        # step and trained at learning rate 0 (a "Train on these" job on a few records changed nothing).
        warmup_steps=int(config.warmup_ratio * steps),
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


def publish(staging: Path, target: Path, aside: Path) -> None:
    """Move a complete adapter folder into place; the old one waits in `aside` until the new one is there."""
    shutil.rmtree(aside, ignore_errors=True)
    if target.exists():
        target.rename(aside)
    staging.rename(target)
    shutil.rmtree(aside, ignore_errors=True)


def base_eval_loss(trainer, model) -> float | None:
    """Validation loss of the untrained base model (adapter off), measured before training."""
    if trainer.eval_dataset is None:
        return None
    with model.disable_adapter():
        loss = trainer.evaluate(metric_key_prefix="base")["base_loss"]
    logger.info("base model: validation loss %.4f before training", loss)
    return loss


def start_eval_loss(trainer) -> float | None:
    """Validation loss of the adapter --from-adapter continues, before this run trains it further."""
    if trainer.eval_dataset is None:
        return None
    loss = trainer.evaluate(metric_key_prefix="start")["start_loss"]
    logger.info("--from-adapter: validation loss %.4f before this run", loss)
    return loss


def pick_generation(config, chat, rows: list[Example], folder: Path, events) -> dict | None:
    """Choose the generation settings `folder` is served with on `rows` and write them (generation_config.json).

    Returns the choice for the training report (settings and each candidate's score); None when
    --generation-rows is 0. A failure is a warning: the adapter is published without the file and serves
    with its base's defaults.
    """
    from train.sampling import choose_generation

    if config.generation_rows <= 0:
        logger.info("generation settings: not measured (--generation-rows 0); the adapter serves with its base's")
        return None
    count = min(config.generation_rows, len(rows))
    events.phase("generation", f"choosing the generation settings on {count} validation rows")
    logger.info("choosing the generation settings on %d validation rows", count)
    try:
        choice = choose_generation(
            chat, rows, max_rows=config.generation_rows, max_new_tokens=config.probe_tokens, seed=config.seed
        )
        write_generation(folder, choice["settings"])
    except Exception as error:  # the trained adapter matters more than its sampling defaults
        logger.warning("generation settings not chosen (%s); the adapter serves with its base's defaults", error)
        (folder / GENERATION_FILE).unlink(missing_ok=True)
        return {"error": f"{type(error).__name__}: {error}"}
    return choice


def run(config) -> str:
    """Train, save, check and publish the adapter; returns the one-line result."""
    from transformers import EarlyStoppingCallback

    from train.budget import TimeBudget
    from train.collate import ChatCollator
    from train.events import EventLog, TrainingEvents
    from train.report import loss_curves, perplexity, plot_loss
    from train.trainer import ChatTrainer
    from train.verify import verify_adapter

    started = time.time()
    events = EventLog(config.events_file)
    training_precision(config)  # fail on impossible options before reading any data
    target = check_output_dir(config)
    config, parent = continued(config)
    data = prepare_data(config, parent)
    tokenizer, train, valid = data.tokenizer, data.train, data.valid
    logger.info(
        "data: %d train / %d valid examples, %d tokens", len(train.items), len(valid.items), train.tokens
    )
    events.phase("data", f"{len(train.items)} train / {len(valid.items)} valid examples, {train.tokens} tokens")
    logger.info("system prompt trained: %s", data.prompt.describe())
    resume_from = checkpoint_to_resume(config)
    model, precision, initial = build_model(config, tokenizer, train)
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
    eval_started = time.time()
    events.phase("base_eval", "evaluating the base model")
    base_loss = base_eval_loss(trainer, model)
    start_loss = start_eval_loss(trainer) if parent is not None else None
    budget = None
    if config.time_budget > 0:
        budget = TimeBudget(config.time_budget * 60, started, eval_seconds=time.time() - eval_started)
        trainer.add_callback(budget)
    trainer.add_callback(TrainingEvents(events, lambda: trainer.train_tokens, lambda: budget and budget.planned))
    trainer.eval_seconds = 0.0  # the base evaluation is not part of training time
    resumed = f", resumed from {Path(resume_from).name}" if resume_from else ""
    events.phase("training", f"training ({config.method}), base eval loss {base_loss}{resumed}")
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = trainer.evaluate() if valid.items else {}
    events.phase("checks", "saving the adapter and checking it")
    train_seconds = result.metrics["train_runtime"] - trainer.eval_seconds + metrics.get("eval_runtime", 0)

    target.parent.mkdir(parents=True, exist_ok=True)
    # Staged beside the checkpoints, never inside the folder the app lists: a kill leaves nothing there.
    staging = config.checkpoint_dir / "adapter.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        # Named so peft, vLLM and the Hub resolve it (the embedded model by its Hub twin); adapter_base
        # maps the twin back to the embedded copy this adapter was trained on.
        model.peft_config["default"].base_model_name_or_path = public_name(config.base_model)
        # The embedding is frozen; "auto" would look the base model up on the Hub to decide.
        model.save_pretrained(staging, save_embedding_layers=False)
        tokenizer.save_pretrained(staging)
        write_trained_prompt(staging, data.prompt)
        curves = loss_curves(trainer.state.log_history)
        plot_loss(curves, staging / "loss.png", f"{config.method} on {Path(config.data).name}", base_loss)
        verified = verify_adapter(
            staging, config.base_model, initial, data.probe_rows[: config.probes], config.probe_tokens
        )
        generation = pick_generation(config, verified.chat, data.probe_rows, staging, events)
        eval_loss = metrics.get("eval_loss")
        report = {
            "base_model": config.base_model,
            "method": config.method,
            "precision": precision.describe(),
            "config": asdict(config),
            "data": {"train": train.summary(), "valid": valid.summary(), "warnings": data.warnings},
            "system_prompt": asdict(data.prompt),
            "redacted": data.redacted,
            "steps": trainer.state.global_step,
            "epochs": round(trainer.state.epoch or 0, 3),
            "train_loss": result.metrics.get("train_loss"),
            "base_eval_loss": base_loss,
            **({"from_adapter": str(parent.path), "from_adapter_version": parent.version,
                "start_eval_loss": start_loss} if parent is not None else {}),
            "eval_loss": eval_loss,
            "eval_perplexity": perplexity(eval_loss),
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "tokens_per_second": round(trainer.train_tokens / max(train_seconds, 1e-9), 1),
            "train_seconds": round(train_seconds, 1),
            "wall_seconds": round(time.time() - started, 1),
            "loss_curves": curves,
            **verified.report,
            **({"generation": generation} if generation is not None else {}),
        }
        write_report(staging, report)  # written last: a folder with a report is a complete adapter
        publish(staging, target, config.checkpoint_dir / "previous.partial")
        events.phase("published", f"adapter published to {target}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    ppl = report["eval_perplexity"]
    gained = "" if base_loss is None or eval_loss is None else f" (base {round(base_loss, 4)}" + (
        f", before this run {round(start_loss, 4)})" if start_loss is not None else ")")
    return (
        f"adapter written to {target}: {config.method}, {report['steps']} steps, eval loss "
        f"{eval_loss if eval_loss is None else round(eval_loss, 4)}{gained}, perplexity {ppl}, "
        f"{report['tokens_per_second']} tokens/s, {report['wall_seconds']} s"
    )
