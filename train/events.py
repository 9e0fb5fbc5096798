"""`--events-file`: one JSON line per thing a watcher wants to know, as the run goes.

Lines (each has "event" and "time", Unix seconds):
- phase: {"phase": "data" | "base_eval" | "training" | "checks" | "generation" | "published", "message"}
- metrics: {"step", "max_steps", "epoch", "train_loss" | "eval_loss", "learning_rate", "tokens_per_s",
  "eta_s"} at every logged step and evaluation
- checkpoint: {"step", "path", "train_loss", "eval_loss"} when a checkpoint is complete
- done: {"adapter", "summary"} / error: {"message"} at the end
The fine-tuning jobs of the app (serve.jobs) read these; a line is flushed as soon as it is written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback


class EventLog:
    """Appends event lines to a file (nothing when no file is given)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None

    def write(self, event: str, **fields) -> None:
        """One line: {"event", "time", **fields}."""
        if self.path is None:
            return
        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields}, ensure_ascii=False)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(line + "\n")

    def phase(self, phase: str, message: str) -> None:
        """The run entered a phase."""
        self.write("phase", phase=phase, message=message)


class TrainingEvents(TrainerCallback):
    """Metrics at every log and evaluation, and each complete checkpoint, with rate and ETA."""

    def __init__(self, log: EventLog, train_tokens: Callable[[], int], planned: Callable[[], int | None] = lambda: None):
        # planned: the steps a --time-budget run will take once it has planned them (None: state.max_steps)
        self.log, self.train_tokens, self.planned = log, train_tokens, planned
        self.started: float | None = None
        self.start_step = 0
        self.last: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.start_step = time.time(), state.global_step  # a resumed run counts from here

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        metrics = {key: logs[key] for key in ("loss", "eval_loss", "learning_rate") if key in logs}
        if not metrics or self.started is None:
            return
        if "loss" in metrics:
            metrics["train_loss"] = metrics.pop("loss")
        self.last.update({k: v for k, v in metrics.items() if k in ("train_loss", "eval_loss")})
        elapsed = max(time.time() - self.started, 1e-9)
        done = state.global_step - self.start_step
        rate = done / elapsed if done else None
        max_steps = self.planned() or state.max_steps
        self.log.write(
            "metrics",
            step=state.global_step,
            max_steps=max_steps,
            epoch=round(state.epoch or 0.0, 3),
            tokens_per_s=round(self.train_tokens() / elapsed, 1),
            steps_per_s=None if rate is None else round(rate, 4),
            eta_s=None if not rate else round(max(0, max_steps - state.global_step) / rate, 1),
            **metrics,
        )

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.log.write("checkpoint", step=state.global_step, path=str(path), **self.last)
