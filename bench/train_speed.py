"""`python -m bench.train_speed`: train.sft against TRL's SFTTrainer (defaults, and tuned for this CPU).

Same rows, base model, LoRA shape, steps, batch size and max length for all; every run is a
subprocess (as a user runs it) whose peak RSS is measured; every adapter's eval loss is scored
afterwards by the same function on the same validation rows.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from assistant.adapters import REPORT_FILE, training_report
from bench.common import (
    RESULTS,
    ChildRun,
    bar_chart,
    last_json_line,
    log,
    machine_load,
    parse_config,
    print_final,
    ratio,
    run_measured,
    table,
    write_results,
)

NAME = "train_speed"


@dataclass
class TrainSpeedConfig:
    """Options of `python -m bench.train_speed`."""

    data_dir: str = field(
        default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "star"),
        metadata={
            "help": "Folder with train.pairs.jsonl and valid.pairs.jsonl ({'prompt', 'response'} rows)."
        },
    )
    train_rows: int = field(default=200, metadata={"help": "First N training pairs to train on."})
    valid_rows: int = field(default=50, metadata={"help": "First N validation pairs to score eval loss on."})
    steps: int = field(default=25, metadata={"help": "Optimizer steps for train.sft and tuned TRL."})
    default_steps: int = field(
        default=2,
        metadata={"help": "Steps for TRL with its defaults (bf16 + checkpointing: minutes per step)."},
    )
    skip_default: bool = field(default=False, metadata={"help": "Do not run TRL with its defaults."})
    batch_size: int = field(default=8, metadata={"help": "Examples per optimizer step."})
    max_length: int = field(default=512, metadata={"help": "Token cap per example."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (ours and tuned TRL)."})
    precision: str = field(
        default="auto", metadata={"help": "--precision of train.sft (auto: what a user gets on this machine)."}
    )
    trl_padding_free: bool = field(
        default=True, metadata={"help": "Tuned TRL: padding-free batches (works with sdpa on CPU here)."}
    )
    work_dir: str | None = field(
        default=None, metadata={"help": "Keep data and adapters here; default: a temporary folder, removed."}
    )
    timeout: float = field(default=3600.0, metadata={"help": "Seconds each training subprocess may run."})
    quick: bool = field(
        default=False,
        metadata={
            "help": "CI smoke run: 8 rows, 2 steps of 4, lr 5e-3 (so the probes differ), 4 valid rows, "
            "no default-TRL run."
        },
    )
    output: str = field(
        default=str(RESULTS / f"{NAME}.json"), metadata={"help": "Where to write the JSON results."}
    )

    def apply_quick(self) -> None:
        """Shrink everything for --quick."""
        if self.quick:
            self.train_rows, self.valid_rows, self.steps, self.batch_size = 8, 4, 2, 4
            self.learning_rate, self.skip_default = 5e-3, True
            # A few STAR rows shipped with the repo, so CI needs nothing beside the checkout.
            self.data_dir = str(Path(__file__).resolve().parent / "quick_data")


def pairs_to_messages(source: Path, target: Path, rows: int) -> int:
    """First `rows` {'prompt', 'response'} lines of `source` written as {'messages': [...]} JSONL."""
    written = 0
    with source.open() as inp, target.open("w") as out:
        for line in inp:
            if written >= rows:
                break
            if not line.strip():
                continue
            pair = json.loads(line)
            messages = [
                {"role": "user", "content": pair["prompt"]},
                {"role": "assistant", "content": pair["response"]},
            ]
            out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            written += 1
    return written


def adapter_eval_loss(adapter: str | Path, valid_file: str | Path, max_length: int) -> dict:
    """Mean token cross-entropy over the assistant tokens of `valid_file`, fp32, for any adapter folder."""
    import torch

    from assistant.loading import load_chat_model
    from train.eval import row_nll
    from train.records import load_examples

    torch.manual_seed(0)
    chat = load_chat_model(adapter=adapter, precision="fp32")
    nll, tokens = 0.0, 0
    for example in load_examples(str(valid_file)).examples:
        loss, count = row_nll(chat, example, max_length)
        nll, tokens = nll + loss, tokens + count
    return {"eval_loss": round(nll / max(tokens, 1), 4), "eval_tokens": tokens}


def run_ours(config: TrainSpeedConfig, train: Path, valid: Path, out: Path) -> dict:
    """train.sft as a user runs it; tokens/s and train seconds from its training report."""
    cmd = [
        sys.executable,
        "-m",
        "train.sft",
        str(train),
        "--max-steps",
        str(config.steps),
        "--batch-size",
        str(config.batch_size),
        "--lora-rank",
        str(config.lora_rank),
        "--lora-alpha",
        str(config.lora_alpha),
        "--max-length",
        str(config.max_length),
        "--learning-rate",
        str(config.learning_rate),
        "--valid-file",
        str(valid),
        "--output-dir",
        str(out),
        "--precision",
        config.precision,
    ]
    if config.quick:
        cmd += ["--probes", "1", "--probe-tokens", "16", "--save-steps", str(config.steps)]
    run = run_measured(cmd, timeout=config.timeout)
    check(run, "train.sft")
    report = trained_report(out)
    return {
        # The report gives the rate and the seconds; their product is the tokens the steps processed.
        "tokens": round(report["tokens_per_second"] * report["train_seconds"]),
        "tokens_per_second": report["tokens_per_second"],
        "train_seconds": report["train_seconds"],
        "steps": report["steps"],
        "reported_eval_loss": report["eval_loss"],
        "summary": run.stdout.strip().splitlines()[-1],
        "wall_s": round(run.wall_s, 1),
        "peak_mb": round(run.peak_mb, 1),
    }


def run_trl(config: TrainSpeedConfig, mode: str, train: Path, out: Path) -> dict:
    """One TRL run in its own subprocess (bench.trl_worker)."""
    steps = config.default_steps if mode == "default" else config.steps
    cmd = [
        sys.executable,
        "-m",
        "bench.trl_worker",
        "--mode",
        mode,
        "--train-file",
        str(train),
        "--model",
        str(base_model_dir()),
        "--output-dir",
        str(out),
        "--max-steps",
        str(steps),
        "--batch-size",
        str(config.batch_size),
        "--max-length",
        str(config.max_length),
        "--learning-rate",
        str(config.learning_rate),
        "--lora-rank",
        str(config.lora_rank),
        "--lora-alpha",
        str(config.lora_alpha),
        "--padding-free",
        str(config.trl_padding_free),
    ]
    run = run_measured(cmd, timeout=config.timeout)
    check(run, f"TRL ({mode})")
    result = last_json_line(run.stdout)
    result.update(wall_s=round(run.wall_s, 1), peak_mb=round(run.peak_mb, 1))
    return result


def base_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct safetensors folder (the base both trainers start from)."""
    from assistant.embedded import embedded_model_dir

    return embedded_model_dir()


def trained_report(adapter: Path) -> dict:
    """The training report train.sft published with `adapter` (assistant.adapters reads it)."""
    report = training_report(adapter)
    if not report:
        raise RuntimeError(f"{adapter}: train.sft published no readable {REPORT_FILE}")
    return report


def check(run: ChildRun, what: str) -> None:
    """Raise with the child's last lines when it failed."""
    if run.returncode != 0:
        why = "timed out" if run.timed_out else f"exit code {run.returncode}"
        raise RuntimeError(f"{what} failed ({why}):\n{run.tail()}")


def render(runs: dict[str, dict]) -> str:
    """The readable table."""
    rows = [
        [
            name,
            r.get("steps"),
            r.get("tokens"),
            r.get("train_seconds"),
            r.get("tokens_per_second"),
            r.get("wall_s"),
            r.get("peak_mb"),
            r.get("eval_loss"),
        ]
        for name, r in runs.items()
    ]
    return table(["run", "steps", "tokens", "train s", "tokens/s", "wall s", "peak MB", "eval loss"], rows)


def main(argv: list[str] | None = None) -> int:
    """Run all trainers, print the table and the FINAL JSON line."""
    logging.basicConfig(level=logging.WARNING)
    config = parse_config(TrainSpeedConfig, argv)
    config.apply_quick()
    load = machine_load()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(config.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = Path(config.data_dir)
        train, valid = work / "train.jsonl", work / "valid.jsonl"
        n_train = pairs_to_messages(data / "train.pairs.jsonl", train, config.train_rows)
        n_valid = pairs_to_messages(data / "valid.pairs.jsonl", valid, config.valid_rows)
        log(f"{n_train} train / {n_valid} valid rows in {work}")
        base_model_dir()  # prepare the embedded model once, outside every timed run
        runs: dict[str, dict] = {}
        plan = [("ours (train.sft)", "ours"), ("TRL tuned", "tuned")]
        if not config.skip_default:
            plan.append(("TRL default", "default"))
        for label, kind in plan:
            out = work / f"adapter-{kind}"
            try:
                runs[label] = (
                    run_ours(config, train, valid, out)
                    if kind == "ours"
                    else run_trl(config, kind, train, out)
                )
            except RuntimeError as error:
                if kind != "default":
                    raise
                # TRL's defaults are the reference users start from; their failure is a result, not a crash.
                log(f"{label} failed: {error}")
                runs[label] = {"error": str(error).splitlines()[-1], "tokens_per_second": None}
                continue
            runs[label].update(adapter_eval_loss(out, valid, config.max_length))
            log(f"{label}: {runs[label]}")
    ours, tuned = runs["ours (train.sft)"], runs["TRL tuned"]
    default = runs.get("TRL default", {})
    final = {
        "tokens_per_s_ours": ours["tokens_per_second"],
        "tokens_per_s_trl_tuned": tuned["tokens_per_second"],
        "tokens_per_s_trl_default": default.get("tokens_per_second"),
        "ratio_vs_trl_tuned": ratio(ours["tokens_per_second"], tuned["tokens_per_second"]),
        "ratio_vs_trl_default": ratio(ours["tokens_per_second"], default.get("tokens_per_second")),
        "eval_loss_ours": ours["eval_loss"],
        "eval_loss_trl_tuned": tuned["eval_loss"],
        "eval_loss_trl_default": default.get("eval_loss"),
        "peak_mb_ours": ours["peak_mb"],
        "peak_mb_trl_tuned": tuned["peak_mb"],
        "peak_mb_trl_default": default.get("peak_mb"),
        "wall_s_ours": ours["wall_s"],
        "wall_s_trl_tuned": tuned["wall_s"],
        "wall_s_trl_default": default.get("wall_s"),
        "train_rows": n_train,
        "valid_rows": n_valid,
        "steps": config.steps,
        "precision": config.precision,
        "default_steps": None if config.skip_default else config.default_steps,
        "quick": config.quick,
        "load_avg_1m_start": load,
    }
    write_results(
        Path(config.output).stem,
        {"final": final, "config": vars(config), "runs": runs},
        Path(config.output).parent,
    )
    labels = list(runs)
    bar_chart(
        Path(config.output).with_suffix(".png"),
        labels,
        [runs[k]["tokens_per_second"] for k in labels],
        title=f"LoRA training, {n_train} STAR rows, batch {config.batch_size}",
        ylabel="tokens / s",
    )
    print(render(runs))
    print(
        f"ours vs TRL tuned: {final['ratio_vs_trl_tuned']}x tokens/s; vs TRL default: "
        f"{final['ratio_vs_trl_default']}x"
    )
    print_final(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
