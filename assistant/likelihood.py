"""How likely a model finds a conversation's assistant turns: the loss of training, evaluation and the Evals API.

`masked_nll` is the training loss (train.trainer) and the perplexity of train.eval; `reply_nll` scores one
conversation under a served ChatModel (its adapter on or off), as train.eval and the Evals API's perplexity
criterion (serve.evals) do.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from assistant.chat_format import IGNORE_INDEX, encode_chat
from assistant.loading import MAIN, ChatModel


def masked_nll(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Summed next-token cross-entropy over labelled tokens, their count, and the model outputs.

    Only positions whose next token carries a label go through the LM head (`logits_to_keep`).
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    targets = labels[:, 1:]  # position p predicts token p + 1
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
    logits = outputs.logits.float()
    kept = targets[:, keep].to(logits.device)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), kept.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, (kept != IGNORE_INDEX).sum(), outputs


@torch.inference_mode()
def reply_nll(chat: ChatModel, messages: list[dict], *, max_length: int | None = 1024,
              use_adapter: bool = True) -> tuple[float, int]:
    """Summed loss and token count over the assistant turns of `messages` (teacher forcing)."""
    encoded = encode_chat(chat.tokenizer, messages, max_length=max_length)
    device = next(chat.model.parameters()).device
    batch = {
        "input_ids": torch.tensor([encoded.input_ids], device=device),
        "labels": torch.tensor([encoded.labels], device=device),
    }
    # The host's lock: the engine runs batches of several adapters on the same weights on its own thread.
    with chat.lock:
        if chat.host is not None:  # the row of this choice, as the engine runs it (peft's adapter_names)
            model, context, extra = chat.host.runner(chat.group if use_adapter else MAIN,
                                                     [chat.adapter_name if use_adapter else None])
        else:
            model, extra = chat.model, {}
            context = chat.model.disable_adapter() if chat.adapter and not use_adapter else nullcontext()
        with context:
            total, count, _ = masked_nll(model, {**batch, **extra})
    return float(total), int(count)
