"""Batches without padding waste: one packed row for LoRA, length-grouped padded rows for prefix tuning."""

from __future__ import annotations

import torch

from assistant.chat_format import IGNORE_INDEX


class ChatCollator:
    """Turn encoded examples into a model batch.

    Packed (padding-free): all sequences in one row, positions restarting per sequence, so
    transformers builds a block-diagonal causal mask and no compute goes to pad tokens.
    Prefix tuning prepends virtual key/values, which disables that packed-mask path, so it gets
    right-padded rows with an attention mask instead.
    """

    def __init__(self, pad_token_id: int, packed: bool = True):
        self.pad_token_id = pad_token_id
        self.packed = packed

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return self._packed(items) if self.packed else self._padded(items)

    def _packed(self, items: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for item in items:
            ids += item["input_ids"]
            # The first token of each sequence never has a predecessor in it: mask its label
            # so no loss crosses from one conversation into the next.
            labels += [IGNORE_INDEX] + item["labels"][1:]
            positions += range(len(item["input_ids"]))
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
        }

    def _padded(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), self.pad_token_id)
        labels = torch.full((len(items), width), IGNORE_INDEX)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
