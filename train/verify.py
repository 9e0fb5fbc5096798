"""Post-save checks on a freshly written adapter folder; each failure names what is wrong."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from assistant.loading import ChatModel, load_chat_model
from train.records import Example

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"


class AdapterCheckError(RuntimeError):
    """A written adapter failed a post-save check."""


@dataclass
class Verified:
    """An adapter folder that passed its post-save checks."""

    report: dict  # what the checks found, for training_report.json
    chat: ChatModel  # the adapter loaded back as the app serves it (later measurements reuse it)


def check_weights(folder: Path, initial: dict[str, torch.Tensor]) -> float:
    """The adapter file is non-empty and its weights moved from `initial`; returns the changed fraction."""
    from safetensors.torch import load_file

    path = folder / ADAPTER_FILE
    if not path.is_file() or path.stat().st_size == 0:
        raise AdapterCheckError(f"{path}: adapter file is missing or empty")
    saved = load_file(path)
    missing = sorted(set(initial) - set(saved))
    if missing:
        raise AdapterCheckError(f"{path}: {len(missing)} trained tensors missing, e.g. {missing[0]}")
    changed = sum(not torch.equal(saved[k].float(), initial[k].float()) for k in initial)
    if changed == 0:
        raise AdapterCheckError(
            f"{path}: no trainable weight changed during training; raise the learning rate or steps"
        )
    return changed / max(1, len(initial))


def verify_adapter(
    folder: Path,
    base_model: str,
    initial: dict[str, torch.Tensor],
    probes: list[Example],
    probe_tokens: int = 48,
) -> Verified:
    """Run every post-save check; the report holds the probe rows scored before (base) and after (adapter)."""
    from train.eval import score

    changed = check_weights(folder, initial)
    try:
        # The precision the app will serve in, so "replies differ" holds where users look.
        chat = load_chat_model(base_model, adapter=folder)
    except Exception as error:  # any failure to load back is a broken adapter
        raise AdapterCheckError(f"{folder}: the adapter does not load back: {error}") from error
    if not probes:  # --probes 0: the weights check above is the only one
        logger.info("adapter checks passed: %.0f%% of trained tensors changed (no probes asked)", 100 * changed)
        return Verified({"changed_tensor_fraction": round(changed, 4), "probes": None}, chat)
    before = score(chat, probes, use_adapter=False, max_new_tokens=probe_tokens, desc="probes, base")
    after = score(chat, probes, max_new_tokens=probe_tokens, desc="probes, adapter")
    if [r["reply"] for r in before["rows"]] == [r["reply"] for r in after["rows"]]:
        raise AdapterCheckError(
            f"{folder}: the adapter's replies to {len(probes)} probe prompts equal the base model's; "
            "it learned nothing visible (train longer or with a higher learning rate)"
        )
    logger.info("adapter checks passed: %.0f%% of trained tensors changed, replies differ", 100 * changed)
    return Verified({"changed_tensor_fraction": round(changed, 4), "probes": {"before": before, "after": after}}, chat)
