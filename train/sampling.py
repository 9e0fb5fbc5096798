"""The generation settings an adapter is served with, chosen by the trainer on validation rows.

Candidates: greedy decoding and sampling at the app's default temperature (GenerationParams, what the chat
screen's slider starts at), each with repetition penalty 1.0, 1.05 and 1.1. Every candidate answers the
same rows through the serving path (train.eval.replies: the trained system prompt by `messages_for`, the
batch engine) and is scored by the mean ROUGE-L F1 of its replies against the rows' reference replies
(assistant.scoring.rouge_l). The winner is returned as generation_config.json fields (SAMPLING_FIELDS); the
settings measured are `GenerationParams.resolve(fields)`, exactly what the server applies to a request
that leaves them unset. train.sft writes the winner into the adapter folder (--generation-rows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from assistant.generation import GenerationParams
from assistant.loading import ChatModel
from assistant.scoring import rouge_l
from train.eval import replies, split_reference
from train.records import Example

logger = logging.getLogger(__name__)

REPETITION_PENALTIES = (1.0, 1.05, 1.1)
REPLY_TOKENS = 48  # length cap of each reply: enough to tell the candidates apart, cheap on a CPU
SEED = 0  # sampling candidates draw from a fixed seed, so a rerun measures the same

# Replies of one candidate to the rows' conversations (the default: the app's serving path).
Reply = Callable[[ChatModel, list[list[dict]], GenerationParams], list[str]]
Score = Callable[[str, str], float]  # (reference, reply) -> score, higher is better


def candidates(
    temperature: float = GenerationParams.temperature, penalties: Sequence[float] = REPETITION_PENALTIES
) -> list[dict]:
    """generation_config fields (SAMPLING_FIELDS) of each candidate: greedy first, then sampling."""
    app = GenerationParams()
    greedy = [{"do_sample": False, "repetition_penalty": p} for p in penalties]
    if temperature <= 0:  # sampling at temperature 0 is greedy decoding
        return greedy
    sampled = [
        {"do_sample": True, "temperature": temperature, "top_p": app.top_p, "top_k": app.top_k, "repetition_penalty": p}
        for p in penalties
    ]
    return greedy + sampled


def describe(settings: dict) -> str:
    """One short line for the log: 'greedy, repetition penalty 1.05' or 'sampling at 0.7, ...'."""
    how = f"sampling at temperature {settings['temperature']:g}" if settings.get("do_sample") else "greedy"
    return f"{how}, repetition penalty {settings.get('repetition_penalty', 1.0):g}"


def _serve(chat: ChatModel, contexts: list[list[dict]], params: GenerationParams) -> list[str]:
    return replies(chat, contexts, params, desc="generation settings")


def choose_generation(
    chat: ChatModel,
    rows: Sequence[Example],
    temperature: float = GenerationParams.temperature,
    *,
    max_rows: int | None = None,
    max_new_tokens: int = REPLY_TOKENS,
    seed: int = SEED,
    penalties: Sequence[float] = REPETITION_PENALTIES,
    reply: Reply = _serve,
    score: Score = rouge_l,
) -> dict:
    """Measure every candidate on `rows` (the first `max_rows` with a reference: train.sft --generation-rows)
    and return the report of the choice:

    {"settings": the winner's generation_config fields, "candidates": [{"settings", "rouge_l"}, ...] in
    the order tried, "rows": rows used, "max_new_tokens": reply length}. Rows need a final assistant
    reply (the reference). `reply` and `score` are the serving path and ROUGE-L unless a test fakes them.
    """
    used = [row for row in rows if any(m["role"] == "assistant" for m in row.messages)][:max_rows]
    if not used:
        raise ValueError("no row with an assistant reply to measure generation settings on")
    split = [split_reference(row) for row in used]
    contexts, references = [context for context, _ in split], [reference for _, reference in split]
    tried = candidates(temperature, penalties)
    measured = []
    for number, settings in enumerate(tried, 1):
        params = GenerationParams.resolve(settings, max_new_tokens=max_new_tokens, seed=seed)
        answers = reply(chat, contexts, params)
        mean = sum(score(ref, answer) for ref, answer in zip(references, answers, strict=True)) / len(used)
        measured.append({"settings": settings, "rouge_l": round(mean, 4)})
        logger.info("generation settings %d/%d: %s: ROUGE-L %.4f on %d rows",
                    number, len(tried), describe(settings), mean, len(used))
    best = max(measured, key=lambda m: m["rouge_l"])  # the first of equals: greedy, the lower penalty
    logger.info("generation settings chosen: %s (ROUGE-L %.4f)", describe(best["settings"]), best["rouge_l"])
    return {"settings": dict(best["settings"]), "candidates": measured, "rows": len(used),
            "max_new_tokens": max_new_tokens}
