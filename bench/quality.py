"""`python -m bench.quality`: reply quality on held-out STAR pairs, train.sft against TRL's SFTTrainer.

Each trainer runs once on the same training rows, as a user runs it (a subprocess whose wall time and
peak RSS are measured): ours with its defaults (plus --ours-args), TRL with LoRA r=16 all-linear, lr
2e-4, batch 8, one epoch. Then every adapter, and the untrained base, is scored by the same function
(train.eval.score, fp32, greedy replies) on validation rows no run trained on: ROUGE-L and BLEU of the
replies against the reference replies, and the perplexity of the reference replies.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    RESULTS,
    bar_chart,
    cpu_name,
    last_json_line,
    log,
    machine_load,
    parse_config,
    print_final,
    run_measured,
    table,
    write_results,
)
from bench.train_speed import base_model_dir, check, pairs_to_messages, trained_report

NAME = "quality"
METHODS = ("lora", "prefix")
# The targets: ours beats TRL's ROUGE-L by this much, at no worse perplexity, within this wall time.
ROUGE_MARGIN = 0.05
WALL_LIMIT_S = 30 * 60


@dataclass
class QualityConfig:
    """Options of `python -m bench.quality`."""

    data_dir: str = field(
        default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "star"),
        metadata={
            "help": "Folder with train.pairs.jsonl and valid.pairs.jsonl ({'prompt', 'response'} rows)."
        },
    )
    train_rows: int = field(default=0, metadata={"help": "First N training pairs to train on (0 = all)."})
    valid_rows: int = field(default=100, metadata={"help": "First N validation pairs to score on (0 = all)."})
    methods: str = field(
        default="lora",
        metadata={"help": "Comma-separated train.sft methods to run with their defaults: lora, prefix."},
    )
    ours_args: str = field(
        default="",
        metadata={
            "help": "Extra train.sft arguments for every run of ours, one shell-quoted string, e.g. "
            "--ours-args='--learning-rate 3e-4 --lora-rank 32' (default: none, our defaults)."
        },
    )
    ours_time_budget: float = field(
        default=0.0, metadata={"help": "Minutes, passed as train.sft --time-budget (0 = not passed)."}
    )
    max_steps: int = field(
        default=0, metadata={"help": "Stop ours and TRL after N optimizer steps (0 = one epoch each)."}
    )
    trl_learning_rate: float = field(default=2e-4, metadata={"help": "TRL's peak learning rate."})
    skip_trl: bool = field(default=False, metadata={"help": "Do not train with TRL (no comparison)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Length cap of each scored greedy reply."})
    work_dir: str | None = field(
        default=None, metadata={"help": "Keep data and adapters here; default: a temporary folder, removed."}
    )
    timeout: float = field(
        default=7200.0, metadata={"help": "Seconds each training or scoring subprocess may run."}
    )
    quick: bool = field(
        default=False,
        metadata={
            "help": "CI smoke run: 8 bench/quick_data rows, 2 valid rows, 2 steps at lr 5e-3 (so the "
            "adapters differ from the base), 8-token replies."
        },
    )
    output: str = field(
        default=str(RESULTS / f"{NAME}.json"), metadata={"help": "Where to write the JSON results."}
    )

    def apply_quick(self) -> None:
        """Shrink everything for --quick."""
        if self.quick:
            self.train_rows, self.valid_rows, self.max_steps, self.max_new_tokens = 8, 2, 2, 8
            # A few STAR rows shipped with the repo, so CI needs nothing beside the checkout.
            self.data_dir = str(Path(__file__).resolve().parent / "quick_data")
            self.trl_learning_rate = 5e-3
            quick_ours = "--learning-rate 5e-3 --probes 1 --probe-tokens 16 --save-steps 2"
            self.ours_args = f"{quick_ours} {self.ours_args}".strip()  # the user's args still win

    def method_list(self) -> list[str]:
        """--methods as a checked list."""
        methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise SystemExit(f"--methods: expected a comma-separated list of {', '.join(METHODS)}")
        return methods


def fresh(folder: Path) -> Path:
    """`folder` cleared of an earlier run in a reused --work-dir (train.sft refuses old checkpoints)."""
    for old in (folder, folder.with_name(folder.name + ".checkpoints")):
        shutil.rmtree(old, ignore_errors=True)
    return folder


def run_ours(config: QualityConfig, method: str, train: Path, out: Path) -> dict:
    """train.sft with its defaults (plus --ours-args) as a user runs it.

    No --valid-file: the rows scored below must stay unseen, also by early stopping and the choice of
    the best checkpoint, so train.sft holds out its default share of the training rows instead.
    """
    cmd = [sys.executable, "-m", "train.sft", str(train)]
    cmd += ["--output-dir", str(fresh(out)), "--method", method]
    if config.max_steps > 0:
        cmd += ["--max-steps", str(config.max_steps)]
    if config.ours_time_budget > 0:
        cmd += ["--time-budget", f"{config.ours_time_budget:g}"]
    cmd += shlex.split(config.ours_args)
    run = run_measured(cmd, timeout=config.timeout)
    check(run, f"train.sft ({method})")
    report = trained_report(out)
    return {
        "trainer": "train.sft",
        "method": method,
        "command": shlex.join(str(c) for c in cmd),
        "steps": report.get("steps"),
        "train_seconds": report.get("train_seconds"),
        "eval_loss": report.get("eval_loss"),
        "base_eval_loss": report.get("base_eval_loss"),  # the untrained model on the same held-out rows
        "summary": run.stdout.strip().splitlines()[-1],
        "wall_s": round(run.wall_s, 1),
        "peak_mb": round(run.peak_mb, 1),
    }


def run_trl(config: QualityConfig, train: Path, out: Path) -> dict:
    """TRL SFTTrainer + LoRA (r=16, alpha 32, all-linear, batch 8, fp32) in bench.trl_worker's tuned mode."""
    cmd = [sys.executable, "-m", "bench.trl_worker", "--mode", "tuned", "--train-file", str(train)]
    cmd += ["--model", str(base_model_dir()), "--output-dir", str(fresh(out))]
    # max_steps 0: one epoch, like train.sft's default.
    cmd += ["--max-steps", str(config.max_steps), "--epochs", "1", "--batch-size", "8"]
    cmd += ["--learning-rate", str(config.trl_learning_rate), "--lora-rank", "16", "--lora-alpha", "32"]
    # train.sft's default token cap; padding-free TRL only checks that no row is longer.
    cmd += ["--max-length", "1024"]
    run = run_measured(cmd, timeout=config.timeout)
    check(run, "TRL")
    result = last_json_line(run.stdout)
    return {
        "trainer": "trl",
        "method": "lora",
        "command": shlex.join(str(c) for c in cmd),
        "steps": result["steps"],
        "train_seconds": result["train_seconds"],
        "eval_loss": None,  # the worker does not evaluate; the reference perplexity below compares
        "train_loss": result.get("train_loss"),
        "wall_s": round(run.wall_s, 1),
        "peak_mb": round(run.peak_mb, 1),
    }


def score_run(config: QualityConfig, adapter: Path | None, valid: Path) -> dict:
    """train.eval.score of one adapter (None: the base model) in its own process (bench.score_worker)."""
    cmd = [sys.executable, "-m", "bench.score_worker", "--valid-file", str(valid)]
    cmd += ["--max-new-tokens", str(config.max_new_tokens)]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    run = run_measured(cmd, timeout=config.timeout)
    check(run, f"scoring {adapter or 'the base model'}")
    result = last_json_line(run.stdout)
    return {
        "rouge_l": result["rouge_l"],
        "perplexity": result["perplexity"],
        "bleu": result["bleu"],
        "scored_model": result["model"],
        "score_seconds": result["score_seconds"],
        "replies": result["rows"],
    }


def copy_rows(source: Path, target: Path, rows: int) -> int:
    """First `rows` pairs of `source` (0 = all) as {'messages'} JSONL: the one file every trainer reads."""
    return pairs_to_messages(source, target, rows or sys.maxsize)


def value(run: dict | None, key: str):
    """run[key], or None for a run that was skipped."""
    return None if run is None else run[key]


def render(runs: dict[str, dict]) -> str:
    """The readable table."""
    rows = [
        [
            name,
            r.get("steps"),
            None if r.get("wall_s") is None else round(r["wall_s"] / 60, 1),
            f"{r['rouge_l']:.4f}",
            f"{r['perplexity']:.3f}",
            r["bleu"],
        ]
        for name, r in runs.items()
    ]
    return table(["run", "steps", "train min", "ROUGE-L", "ref. perplexity", "BLEU"], rows)


def verdicts(final: dict) -> str:
    """The targets, one line each."""

    def yes(flag: bool | None) -> str:
        return "n/a" if flag is None else ("yes" if flag else "NO")

    delta = final["rouge_l_ours_minus_trl"]
    lines = [
        f"ROUGE-L ours - TRL: {'n/a' if delta is None else f'{delta:+.4f}'} "
        f"(target >= +{ROUGE_MARGIN}: {yes(final['rouge_l_target_met'])})",
        f"reference perplexity ours {final['perplexity_ours']} vs TRL {final['perplexity_trl']} "
        f"(target ours <= TRL: {yes(final['perplexity_target_met'])})",
        f"ours' training wall time {final['wall_s_ours'] / 60:.1f} min "
        f"(target <= {WALL_LIMIT_S // 60} min: {yes(final['wall_target_met'])})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Train ours and TRL, score them and the base, print the table and the FINAL JSON line."""
    logging.basicConfig(level=logging.WARNING)
    config = parse_config(QualityConfig, argv)
    config.apply_quick()
    methods = config.method_list()
    load = machine_load()
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        work = Path(config.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = Path(config.data_dir)
        train, valid = work / "train.jsonl", work / "valid.jsonl"
        n_train = copy_rows(data / "train.pairs.jsonl", train, config.train_rows)
        n_valid = copy_rows(data / "valid.pairs.jsonl", valid, config.valid_rows)
        log(f"{n_train} train / {n_valid} valid rows in {work}")
        base_model_dir()  # prepare the embedded model once, outside every timed run
        runs: dict[str, dict] = {}
        adapters: dict[str, Path] = {}
        for method in methods:
            label = "ours" if method == "lora" else f"ours-{method}"
            adapters[label] = work / f"adapter-{label}"
            runs[label] = run_ours(config, method, train, adapters[label])
            log(f"{label}: {runs[label]['summary']}")
        if not config.skip_trl:
            adapters["trl"] = work / "adapter-trl"
            runs["trl"] = run_trl(config, train, adapters["trl"])
            log(f"trl: {runs['trl']['steps']} steps in {runs['trl']['wall_s']} s")
        runs["base"] = {"trainer": None, "steps": None, "wall_s": None, "peak_mb": None}
        for label in runs:
            runs[label].update(score_run(config, adapters.get(label), valid))
            scored = runs[label]
            log(f"{label}: ROUGE-L {scored['rouge_l']}, reference perplexity {scored['perplexity']}")
    ours_label = next(iter(runs))  # the first method listed is the one held to the targets
    ours, trl, base = runs[ours_label], runs.get("trl"), runs["base"]
    delta = None if trl is None else round(ours["rouge_l"] - trl["rouge_l"], 4)
    final = {
        "ours_run": ours_label,
        "rouge_l_ours": ours["rouge_l"],
        "rouge_l_trl": value(trl, "rouge_l"),
        "rouge_l_base": base["rouge_l"],
        "rouge_l_ours_minus_trl": delta,
        "rouge_l_target_met": None if delta is None else delta >= ROUGE_MARGIN,
        "perplexity_ours": ours["perplexity"],
        "perplexity_trl": value(trl, "perplexity"),
        "perplexity_base": base["perplexity"],
        "perplexity_target_met": None if trl is None else ours["perplexity"] <= trl["perplexity"],
        "bleu_ours": ours["bleu"],
        "bleu_trl": value(trl, "bleu"),
        "bleu_base": base["bleu"],
        "wall_s_ours": ours["wall_s"],
        "wall_s_trl": value(trl, "wall_s"),
        "wall_target_met": ours["wall_s"] <= WALL_LIMIT_S,
        "peak_mb_ours": ours["peak_mb"],
        "peak_mb_trl": value(trl, "peak_mb"),
        "steps_ours": ours["steps"],
        "steps_trl": value(trl, "steps"),
        "eval_loss_ours": ours["eval_loss"],
        "train_rows": n_train,
        "valid_rows": n_valid,
        "max_new_tokens": config.max_new_tokens,
        "ours_args": config.ours_args,
        "quick": config.quick,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
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
        [100 * runs[k]["rouge_l"] for k in labels],  # x100: the chart labels bars with one decimal
        title=f"Replies to {n_valid} held-out STAR prompts, {n_train} training rows",
        ylabel="ROUGE-L F1 x 100",
    )
    print(render(runs))
    print(verdicts(final))
    print_final(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
