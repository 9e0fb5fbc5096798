"""training_report.json and loss.png for an adapter folder."""

from __future__ import annotations

import math
from pathlib import Path


def loss_curves(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) points for train and eval from the Trainer's log history."""
    curves: dict[str, dict[int, float]] = {"train": {}, "eval": {}}
    for entry in log_history:
        # Keyed by step: the final evaluation repeats the last scheduled one.
        if "loss" in entry:
            curves["train"][entry["step"]] = entry["loss"]
        if "eval_loss" in entry:
            curves["eval"][entry["step"]] = entry["eval_loss"]
    return {name: sorted(points.items()) for name, points in curves.items()}


def plot_loss(
    curves: dict[str, list[tuple[int, float]]], path: Path, title: str, base_loss: float | None = None
) -> None:
    """Write the train/eval loss curves as a PNG, with the untrained model's validation loss for scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker="o" if name == "eval" else None, label=f"{name} loss")
    if base_loss is not None:
        ax.axhline(base_loss, color="gray", linestyle="--", label="base model (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def perplexity(loss: float | None) -> float | None:
    """exp(loss), or None when there is no loss."""
    return None if loss is None else round(math.exp(min(loss, 50.0)), 3)


