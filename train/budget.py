"""`--time-budget`: plan the number of steps from the measured speed of the first ones."""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback, get_scheduler

logger = logging.getLogger(__name__)

MEASURED_STEPS = 4  # steps timed before planning (the first one, with its warm-up costs, is not counted)
EVALS = 5  # evaluations (and checkpoints) in a planned run; the best one is kept
RESERVE = 0.05  # share of the budget kept for saving and the post-save checks


class TimeBudget(TrainerCallback):
    """Ends training inside `seconds` counted from `started`, with the schedule fitted to the planned steps.

    After MEASURED_STEPS steps it plans how many steps fit in what is left once evaluations (timed on
    the base model before training), the post-save checks and the reserve are paid for, then shortens the run, stretches
    the learning-rate schedule over the planned steps and evaluates EVALS times along it.
    """

    def __init__(self, seconds: float, started: float, *, eval_seconds: float):
        self.seconds, self.started, self.eval_seconds = seconds, started, eval_seconds
        self.first_step_done: float | None = None
        self.planned: int | None = None

    def on_step_end(self, args, state, control, lr_scheduler=None, optimizer=None, **kwargs):
        if self.planned is not None:
            if state.global_step >= self.planned:  # the last step is evaluated too: it may be the best
                control.should_training_stop = control.should_evaluate = control.should_save = True
            return control
        now = time.time()
        if self.first_step_done is None:
            self.first_step_done, self.first_step = now, state.global_step
            return control
        timed = state.global_step - self.first_step
        if timed < MEASURED_STEPS:
            return control
        per_step = (now - self.first_step_done) / timed
        # Evaluations along the run, the final one, and the post-save checks (about one more).
        left = self.seconds * (1 - RESERVE) - (now - self.started) - (EVALS + 2) * self.eval_seconds
        self.planned = max(state.global_step, min(state.max_steps, state.global_step + int(left / per_step)))
        logger.info(
            "time budget %.0f min: %.2f s/step, planning %d steps (of at most %d)",
            self.seconds / 60, per_step, self.planned, state.max_steps,
        )
        state.max_steps = self.planned
        state.eval_steps = state.save_steps = max(1, self.planned // EVALS)
        if lr_scheduler is not None and optimizer is not None:
            stretch_schedule(lr_scheduler, optimizer, args, self.planned)
        return self.on_step_end(args, state, control)


def stretch_schedule(scheduler, optimizer, args, steps: int) -> None:
    """Make a running LambdaLR schedule end at `steps` (warm-up and shape as configured)."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the scheduler
    saved = [group["lr"] for group in optimizer.param_groups]
    fresh = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(steps), num_training_steps=steps
    )
    inner.lr_lambdas = fresh.lr_lambdas
    for group, lr in zip(optimizer.param_groups, saved, strict=True):  # the fresh scheduler reset them
        group["lr"] = lr
