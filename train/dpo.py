"""`python -m train.dpo PREFS`: preference tuning (DPO, TRL's DPOTrainer) of a LoRA adapter on preference pairs.

It starts from the base model (a fresh LoRA) or from an adapter (`--from-adapter`, e.g. train.sft's), which is then
also DPO's reference model: TRL copies the adapter into a frozen "ref" adapter beside the trained one, so the
reference is the starting adapter, not the bare base. The flags, the adapter folder, the events file and the
post-save checks are train.sft's where they apply; the report adds reward accuracy and margin on the validation
pairs before and after (`preference` in training_report.json).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from assistant.adapters import TrainedPrompt, write_report, write_trained_prompt
from assistant.chat_format import TemplateError
from assistant.embedded import public_name
from assistant.logs import configure
from assistant.models import device, load_tokenizer
from train.cli import parse_with_positional
from train.features import (
    Features,
    encode_pairs,
    split_validation,
    trained_prompt_of,
    with_system_prompt_pairs,
)
from train.pipeline import (
    InputError,
    build_model,
    check_output_dir,
    checkpoint_to_resume,
    continued,
    pick_generation,
    publish,
    system_prompt_for,
    training_precision,
)
from train.records import DataError, Example, Preference, load_preferences
from train.sft import SFTConfig, execute

logger = logging.getLogger(__name__)

DEFAULT_BETA = 0.1  # DPO's usual strength of the pull towards the reference model (TRL's default)
# LoRA DPO on the embedded model: a tenth of train.sft's LoRA rate (1e-3), as DPO moves a model that already
# writes replies; bench/dpo.py measures it on STAR (bench/results/dpo.json).
DEFAULT_LR = 1e-4
_SFT_FIELDS = {f.name: f for f in dataclasses.fields(SFTConfig)}


def _as_in_sft(name: str, **changes):
    """train.sft's option `name` (its default and help), so the two commands say the same about a shared flag."""
    sft = _SFT_FIELDS[name]
    metadata = {**sft.metadata, **changes.pop("metadata", {})}
    if sft.default_factory is not dataclasses.MISSING:
        return field(default_factory=changes.pop("default_factory", sft.default_factory), metadata=metadata)
    return field(default=changes.pop("default", sft.default), metadata=metadata)


@dataclass
class DPOConfig:
    """Every option of `python -m train.dpo`; the defaults tune the embedded model on a CPU."""

    data: str | None = field(
        default=None,
        metadata={"help": "Preference pairs (positional): JSONL or a `datasets` folder with OpenAI's input/"
                          "preferred_output/non_preferred_output rows or prompt/chosen/rejected ones."},
    )
    valid_file: str | None = _as_in_sft("valid_file")
    valid_fraction: float = _as_in_sft("valid_fraction")
    output_dir: str = _as_in_sft("output_dir")
    base_model: str = _as_in_sft("base_model")
    from_adapter: str | None = field(
        default=None,
        metadata={"help": "Start from this LoRA/DoRA adapter folder (e.g. train.sft's) instead of a fresh adapter; "
                          "it is also DPO's reference model. Its base model and trained system prompt carry over, "
                          "--output-dir gets the result and the folder itself is left as it was."},
    )
    method: str = field(
        default="lora", metadata={"help": "Parameter-efficient method (DPO trains LoRA adapters).", "choices": ["lora"]}
    )
    beta: float = field(
        default=DEFAULT_BETA,
        metadata={"help": "DPO's beta: how strongly the tuned model is held to the reference (larger: closer)."},
    )
    precision: str = _as_in_sft("precision")
    load_in_8bit: bool = _as_in_sft("load_in_8bit")
    load_in_4bit: bool = _as_in_sft("load_in_4bit")
    system_prompt: str | None = _as_in_sft("system_prompt")
    max_length: int = _as_in_sft(
        "max_length", metadata={"help": "Tokens per conversation (prompt and one reply); longer ones are cut."}
    )
    epochs: float = _as_in_sft("epochs")
    max_steps: int = _as_in_sft("max_steps")
    batch_size: int = _as_in_sft("batch_size", default=4, metadata={"help": "Preference pairs per step per device."})
    grad_accum: int = _as_in_sft("grad_accum")
    learning_rate: float | None = field(
        default=None, metadata={"help": f"Peak learning rate; default {DEFAULT_LR:g} (times --learning-rate-multiplier)."}
    )
    learning_rate_multiplier: float | None = field(
        default=None,
        metadata={"help": f"Peak learning rate as a multiple of the default {DEFAULT_LR:g} (OpenAI's "
                          "learning_rate_multiplier). Not together with --learning-rate."},
    )
    lr_scheduler: str = _as_in_sft("lr_scheduler")
    warmup_ratio: float = _as_in_sft("warmup_ratio", default=0.1)
    weight_decay: float = _as_in_sft("weight_decay")
    max_grad_norm: float = _as_in_sft("max_grad_norm")
    seed: int = _as_in_sft("seed")
    lora_rank: int = _as_in_sft("lora_rank")
    lora_alpha: int = _as_in_sft("lora_alpha")
    lora_dropout: float = _as_in_sft("lora_dropout")
    target_modules: list[str] = _as_in_sft("target_modules")
    use_dora: bool = _as_in_sft("use_dora")
    save_steps: int | None = _as_in_sft("save_steps")
    resume: bool = _as_in_sft("resume")
    overwrite: bool = _as_in_sft("overwrite")
    logging_steps: int = _as_in_sft("logging_steps")
    probe_tokens: int = _as_in_sft("probe_tokens")
    events_file: str | None = _as_in_sft("events_file")
    probes: int = _as_in_sft("probes")
    generation_rows: int = _as_in_sft("generation_rows")

    virtual_tokens = 0  # not an option: build_model asks every config (prefix tuning only)

    @property
    def checkpoint_dir(self) -> Path:
        """Checkpoints and TensorBoard logs live beside the adapter, never inside it."""
        return Path(self.output_dir + ".checkpoints")

    @property
    def lr(self) -> float:
        """Learning rate with the default."""
        return self.learning_rate or DEFAULT_LR * (self.learning_rate_multiplier or 1.0)


@dataclass
class PreparedPairs:
    """Everything known about the pairs before a model weight is loaded."""

    tokenizer: object
    train: list[Preference]
    valid: list[Preference]
    train_features: Features
    valid_features: Features
    warnings: list[str]
    prompt: TrainedPrompt

    def probe_rows(self) -> list[Example]:
        """Validation prompts (training ones when there are none) with the preferred reply as the reference."""
        return [Example([*p.prompt, {"role": "assistant", "content": p.chosen}], p.source, p.format)
                for p in self.valid or self.train]


def parse_config(argv: list[str]) -> DPOConfig:
    """Parse the command line; PREFS may be given positionally."""
    usage = "python -m train.dpo PREFS [--from-adapter DIR] [--output-dir D] [--beta B] ..."
    config = parse_with_positional(DPOConfig, argv, "data", usage, __doc__.split("\n")[0])
    for flag, value in (("--learning-rate-multiplier", config.learning_rate_multiplier), ("--beta", config.beta)):
        if value is not None and not value > 0:
            _refuse(f"{flag} must be above 0, not {value:g}")
    if config.learning_rate_multiplier is not None and config.learning_rate is not None:
        _refuse("give --learning-rate or --learning-rate-multiplier, not both")
    return config


def _refuse(message: str) -> None:
    """Exit as argparse does on a bad command line (code 2, the message on stderr)."""
    print(f"python -m train.dpo: error: {message}", file=sys.stderr)
    sys.exit(2)


def prepare_pairs(config: DPOConfig, parent) -> PreparedPairs:
    """Load, check, split and encode the pairs, or raise InputError naming file, line and field."""
    try:
        loaded = load_preferences(config.data)
        valid_loaded = load_preferences(config.valid_file) if config.valid_file else None
    except DataError as error:
        raise InputError(str(error)) from error
    warnings = loaded.warnings + (valid_loaded.warnings if valid_loaded else [])
    if valid_loaded:
        train, valid = loaded.pairs, valid_loaded.pairs
    else:
        train, valid = split_validation(loaded.pairs, config.valid_fraction, config.seed)
    tokenizer = load_tokenizer(config.base_model)
    system, source = system_prompt_for(config, parent)  # the one rule, train.sft's
    prompt = trained_prompt_of(tokenizer, [Example(p.prompt, p.source, p.format) for p in train], system, source)
    train, valid = with_system_prompt_pairs(train, system), with_system_prompt_pairs(valid, system)
    try:
        train_features, valid_features = (encode_pairs(tokenizer, pairs, config.max_length) for pairs in (train, valid))
    except TemplateError as error:
        raise InputError(f"{config.base_model}: {error}") from error
    if not train_features.items:
        raise InputError(f"{config.data}: no pair has both replies within --max-length {config.max_length}")
    kept = {item["source"] for item in train_features.items + valid_features.items}
    train, valid = [p for p in train if p.source in kept], [p for p in valid if p.source in kept]
    return PreparedPairs(tokenizer, train, valid, train_features, valid_features, warnings, prompt)


def as_dataset(pairs: list[Preference]):
    """TRL's conversational preference dataset: prompt messages, and each reply as one assistant message."""
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
         "rejected": [{"role": "assistant", "content": p.rejected}]}
        for p in pairs
    ])


def dpo_arguments(config: DPOConfig, train_rows: int, has_valid: bool, precision):
    """TRL's DPOConfig for this run (eval and checkpoints share one cadence, as in train.sft)."""
    import math

    from trl import DPOConfig as TRLDPOConfig

    steps = (config.max_steps if config.max_steps > 0
             else math.ceil(config.epochs * math.ceil(train_rows / config.batch_size) / config.grad_accum))
    save_steps = config.save_steps or max(1, steps // 5)
    return TRLDPOConfig(
        output_dir=str(config.checkpoint_dir),
        beta=config.beta,
        max_length=config.max_length,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.lr,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=int(config.warmup_ratio * steps),  # whole steps, rounded down (see train.pipeline)
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        use_cpu=device() == "cpu",
        bf16=precision.name == "bf16",
        fp16=precision.name == "fp16",
        # A 135M model's activations are small; recomputing them would only cost time.
        gradient_checkpointing=False,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_valid else "no",
        eval_steps=save_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        load_best_model_at_end=has_valid,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to=["tensorboard"],
        dataloader_pin_memory=False,
    )


def _sequence_logps(model, inputs):
    """Summed log-probabilities of each pair's chosen and rejected reply under `model` as it stands."""
    import torch

    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    with torch.no_grad():
        # TRL's fused LM head (installed by DPOTrainer) returns per-token log-probs, 0 where labels are -100.
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                    use_cache=False, fused_lm_head=True)
    seq = inputs["completion_mask"].size(1) - 1
    return out.log_probs[:, -seq:].sum(dim=1).float().chunk(2, dim=0)


def preference_scores(trainer, beta: float) -> dict | None:
    """Reward accuracy and margin of the model as it stands on the validation pairs, against two references.

    `vs_base`: DPO's implicit reward beta * (log p_model - log p_base) with the base model (adapter off) as the
    reference, the same yardstick before and after tuning. `vs_reference`: the same against DPO's own reference
    (the starting adapter): what DPO optimises, 0.5 and 0 by construction before the first step. `prefers_chosen`:
    share of pairs whose preferred reply the model itself finds likelier. Ties count half in every accuracy.
    """
    import torch

    if trainer.eval_dataset is None:
        return None
    model = trainer.model
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {"policy": [], "base": [], "reference": []}
    try:
        for batch in trainer.get_eval_dataloader():
            inputs = trainer._prepare_inputs(batch)
            parts["policy"].append(_sequence_logps(model, inputs))
            with model.disable_adapter():
                parts["base"].append(_sequence_logps(model, inputs))
            parts["reference"].append(tuple(t.float() for t in trainer.compute_ref_log_probs(model, inputs)))
    finally:
        model.train(was_training)
    joined = {name: [torch.cat([p[i] for p in got]).cpu() for i in (0, 1)] for name, got in parts.items()}
    (chosen, rejected) = joined["policy"]

    def rewards(reference: str) -> dict:
        ref_chosen, ref_rejected = joined[reference]
        margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        return {"reward_accuracy": _accuracy(margin), "reward_margin": round(float(margin.mean()), 4),
                "chosen_reward": round(float(beta * (chosen - ref_chosen).mean()), 4),
                "rejected_reward": round(float(beta * (rejected - ref_rejected).mean()), 4)}

    return {"pairs": len(chosen), "vs_base": rewards("base"), "vs_reference": rewards("reference"),
            "prefers_chosen": _accuracy(chosen - rejected),
            "logp_chosen": round(float(chosen.mean()), 3), "logp_rejected": round(float(rejected.mean()), 3)}


def _accuracy(margin) -> float:
    """Share of positive margins, ties counted half (a model equal to its reference scores 0.5, chance)."""
    return round(float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean()), 4)


def run(config: DPOConfig) -> str:
    """Tune, save, check and publish the adapter; returns the one-line result."""
    from trl import DPOTrainer

    from train.events import EventLog, TrainingEvents
    from train.report import loss_curves, plot_loss
    from train.verify import verify_adapter

    started = time.time()
    events = EventLog(config.events_file)
    training_precision(config)  # fail on impossible options before reading any data
    target = check_output_dir(config)
    config, parent = continued(config)
    if config.method != "lora":
        raise InputError(f"--from-adapter {config.from_adapter}: a {parent.kind} adapter; train.dpo tunes LoRA (or "
                         "DoRA) adapters, so start from one of those or from the base model")
    data = prepare_pairs(config, parent)
    logger.info("data: %d train / %d valid preference pairs", len(data.train), len(data.valid))
    events.phase("data", f"{len(data.train)} train / {len(data.valid)} valid preference pairs, "
                         f"{data.train_features.tokens} preferred tokens")
    logger.info("system prompt trained: %s", data.prompt.describe())
    resume_from = checkpoint_to_resume(config)
    model, precision, initial = build_model(config, data.tokenizer, data.train_features)
    args = dpo_arguments(config, len(data.train), bool(data.valid), precision)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=as_dataset(data.train),
        eval_dataset=as_dataset(data.valid) if data.valid else None,
        processing_class=data.tokenizer,
    )
    if parent is not None and "ref" not in model.peft_config:  # what makes the reference the starting adapter
        raise RuntimeError("TRL's DPOTrainer added no 'ref' adapter: the reference would be the bare base model")
    events.phase("base_eval", "scoring the validation pairs before tuning")
    before = preference_scores(trainer, config.beta)
    trainer.add_callback(TrainingEvents(events, lambda: trainer._total_train_tokens))
    resumed = f", resumed from {Path(resume_from).name}" if resume_from else ""
    events.phase("training", f"DPO (beta {config.beta:g}) from {parent.path.name if parent else 'the base model'}"
                             f"{resumed}")
    result = trainer.train(resume_from_checkpoint=resume_from)
    after = preference_scores(trainer, config.beta)
    metrics = trainer.evaluate() if data.valid else {}
    events.phase("checks", "saving the adapter and checking it")

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = config.checkpoint_dir / "adapter.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.peft_config["default"].base_model_name_or_path = public_name(config.base_model)
        # Only the tuned adapter: the frozen "ref" copy is DPO's reference, not part of the result.
        model.save_pretrained(staging, save_embedding_layers=False, selected_adapters=["default"])
        data.tokenizer.save_pretrained(staging)
        write_trained_prompt(staging, data.prompt)
        curves = loss_curves(trainer.state.log_history)
        plot_loss(curves, staging / "loss.png", f"DPO on {Path(config.data).name}")
        probe_rows = data.probe_rows()
        verified = verify_adapter(staging, config.base_model, initial, probe_rows[: config.probes],
                                  config.probe_tokens)
        generation = pick_generation(config, verified.chat, probe_rows, staging, events)
        report = {
            "base_model": config.base_model,
            "method": config.method,
            "training": "dpo",
            "learning_rate": config.lr,
            "precision": precision.describe(),
            "config": asdict(config),
            "data": {"train": data.train_features.summary(), "valid": data.valid_features.summary(),
                     "warnings": data.warnings},
            "system_prompt": asdict(data.prompt),
            "steps": trainer.state.global_step,
            "epochs": round(trainer.state.epoch or 0, 3),
            "train_loss": result.metrics.get("train_loss"),
            **({"from_adapter": str(parent.path), "from_adapter_version": parent.version} if parent else {}),
            "eval_loss": metrics.get("eval_loss"),
            "preference": {
                "beta": config.beta,
                "reference": f"the --from-adapter adapter {parent.path}" if parent else "the base model",
                "measure": "validation pairs; reward = beta * (log p_model(reply) - log p_ref(reply)), accuracy = "
                           "share of pairs whose preferred reply gets the larger reward (ties half). vs_base: ref is "
                           "the base model (before: the starting model's implicit reward); vs_reference: ref is "
                           "DPO's reference (0.5/0 before by construction); prefers_chosen: the model's own "
                           "likelihood ranks the preferred reply first",
                "before": before,
                "after": after,
            },
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "train_seconds": round(result.metrics["train_runtime"], 1),
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
    return f"adapter written to {target}: dpo, {report['steps']} steps, " + _gain(before, after) + \
        f", {report['wall_seconds']} s"


def _gain(before: dict | None, after: dict | None) -> str:
    """The result line's reward figures."""
    if not before or not after:
        return "no validation pairs"
    b, a = before["vs_base"], after["vs_base"]
    return (f"reward accuracy vs base {b['reward_accuracy']} -> {a['reward_accuracy']}, margin {b['reward_margin']} "
            f"-> {a['reward_margin']} (vs its reference: {after['vs_reference']['reward_accuracy']})")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    configure(logging.INFO)
    return execute(parse_config(sys.argv[1:] if argv is None else argv), run)


if __name__ == "__main__":
    sys.exit(main())
