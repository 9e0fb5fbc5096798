"""The training loop: transformers' Trainer with a loss that computes logits only where labels are."""

from __future__ import annotations

import time

import torch
from transformers import Trainer

from assistant.likelihood import masked_nll


def peft_config(
    method: str,
    *,
    rank: int,
    alpha: int,
    dropout: float,
    target_modules: list[str],
    use_dora: bool,
    virtual_tokens: int,
):
    """LoRA or prefix-tuning config for a causal LM."""
    from peft import LoraConfig, PrefixTuningConfig

    if method == "lora":
        targets = "all-linear" if target_modules == ["all-linear"] else target_modules
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            use_dora=use_dora,
        )
    if method == "prefix":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens)
    raise ValueError(f"--method must be lora or prefix, got {method!r}")


class ChatTrainer(Trainer):
    """Trainer whose loss skips the vocabulary projection at positions that carry no label.

    The LM head over a 49k vocabulary is a large share of a small model's compute; prompts and
    system text are masked, so projecting them is wasted work. transformers' `logits_to_keep`
    takes the positions to project.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Our loss divides by the token count of the whole accumulated batch itself.
        self.model_accepts_loss_kwargs = True
        self.train_tokens = 0  # real (non-pad) tokens seen by training steps
        self.eval_seconds = 0.0  # time spent evaluating inside train(), excluded from tokens/s
        self._eval_nll: list | None = None  # [summed loss, labelled tokens] while an evaluation runs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total, count, outputs = masked_nll(model, inputs)
        if self._eval_nll is not None:
            self._eval_nll[0] += float(total)
            self._eval_nll[1] += int(count)
        # Under gradient accumulation the Trainer passes the token count of the whole accumulated batch.
        denominator = num_items_in_batch if num_items_in_batch is not None else count
        loss = total / torch.as_tensor(denominator, device=total.device).clamp(min=1)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        self.train_tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return super().training_step(model, inputs, num_items_in_batch)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The eval loss per labelled token over the whole set.

        The Trainer averages per-batch means weighted by rows per batch: a packed batch is one row, so
        packed (LoRA) and padded (prefix) runs reported different losses for the same model (3.05 vs
        2.62 for the base model on the shipped sample, whose per-token loss is 2.63).
        """
        self._eval_nll = [0.0, 0]
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only=True,
                                             ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
            total, count = self._eval_nll
        finally:
            self._eval_nll = None
        if count:
            output.metrics[f"{metric_key_prefix}_loss"] = total / count
        return output

    def evaluate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.eval_seconds += time.perf_counter() - start
