"""What an evaluation says about a candidate against the model in use: the promotion gate's input."""

from __future__ import annotations

from dataclasses import dataclass

from assistant.scoring import Comparison


@dataclass(frozen=True)
class Evidence:
    """The newest eval with a completed run of both models (same items): pass rates and the paired comparison."""

    eval_id: str
    criterion: str  # the testing criterion both figures are about
    candidate: str
    current: str
    candidate_run: str
    current_run: str
    candidate_pass_rate: float  # passed / items graded, 0..1
    current_pass_rate: float
    comparison: Comparison  # candidate (B) vs current (A) on the criterion's per-item score

    def describe(self) -> str:
        """The figures in one paragraph, as a refusal or a promotion record quotes them."""
        return (f"eval {self.eval_id}, criterion {self.criterion!r}: pass rate {self.candidate_pass_rate:.1%} "
                f"({self.candidate}, run {self.candidate_run}) vs {self.current_pass_rate:.1%} "
                f"({self.current}, run {self.current_run}); "
                + self.comparison.describe(self.current, self.candidate, self.criterion))
