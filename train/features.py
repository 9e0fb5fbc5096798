"""Records -> chat-formatted token ids with label masks, plus the statistics the doctor and report show."""

from __future__ import annotations

import logging
import random
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from assistant.adapters import TrainedPrompt, messages_for, summarize_prompts
from assistant.chat_format import encode_chat, template_default_system
from train.records import Example, Preference

logger = logging.getLogger(__name__)


@dataclass
class Features:
    """Encoded examples ready for the collator, and what happened to the rest."""

    items: list[dict] = field(default_factory=list)  # {"input_ids", "labels", "source"}
    truncated: list[str] = field(default_factory=list)  # sources cut to max_length
    dropped: list[str] = field(default_factory=list)  # sources with no trained token left after cutting

    @property
    def tokens(self) -> int:
        """Total tokens the model reads per epoch."""
        return sum(len(item["input_ids"]) for item in self.items)

    @property
    def trained_tokens(self) -> int:
        """Total tokens that carry a loss per epoch."""
        return sum(sum(label != -100 for label in item["labels"]) for item in self.items)

    def length_stats(self) -> dict[str, float]:
        """min / mean / p95 / max token length."""
        lengths = sorted(len(item["input_ids"]) for item in self.items) or [0]
        return {
            "min": lengths[0],
            "mean": round(statistics.fmean(lengths), 1),
            "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
            "max": lengths[-1],
        }

    def summary(self) -> dict:
        """Numbers for training_report.json."""
        return {
            "rows": len(self.items),
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "length": self.length_stats(),
            "truncated": len(self.truncated),
            "dropped": len(self.dropped),
        }


def encode_examples(tokenizer, examples: list[Example], max_length: int) -> Features:
    """Encode every example; warn (with its file:line) about each truncated or dropped one."""
    features = Features()
    for example in examples:
        encoded = encode_chat(tokenizer, example.messages, max_length=max_length)
        if encoded.trained_tokens == 0:
            features.dropped.append(example.source)
            logger.warning(
                "%s: dropped, no assistant token fits in --max-length %d", example.source, max_length
            )
            continue
        if encoded.truncated:
            features.truncated.append(example.source)
            logger.warning("%s: truncated to --max-length %d tokens", example.source, max_length)
        features.items.append(
            {"input_ids": encoded.input_ids, "labels": encoded.labels, "source": example.source}
        )
    return features


def encode_pairs(tokenizer, pairs: list[Preference], max_length: int) -> Features:
    """Encode each preference pair's preferred conversation (`input_ids`, `labels`), its non-preferred reply's
    (`rejected_ids`, `rejected_labels`); a pair is dropped when either reply has no token within `max_length`."""
    features = Features()
    for pair in pairs:
        chosen, rejected = (
            encode_chat(tokenizer, [*pair.prompt, {"role": "assistant", "content": reply}], max_length=max_length)
            for reply in (pair.chosen, pair.rejected)
        )
        if not chosen.trained_tokens or not rejected.trained_tokens:
            features.dropped.append(pair.source)
            logger.warning("%s: dropped, a reply has no token within --max-length %d", pair.source, max_length)
            continue
        if chosen.truncated or rejected.truncated:
            features.truncated.append(pair.source)
            logger.warning("%s: truncated to --max-length %d tokens", pair.source, max_length)
        features.items.append({"input_ids": chosen.input_ids, "labels": chosen.labels, "source": pair.source,
                               "rejected_ids": rejected.input_ids, "rejected_labels": rejected.labels})
    return features


def with_system_prompt_pairs(pairs: list[Preference], system: str | None) -> list[Preference]:
    """Pairs with `system` as the system message of every prompt that has none (unchanged when None)."""
    return [replace(p, prompt=messages_for(p.prompt, system)) for p in pairs]


def read_system_prompt(value: str | None) -> str | None:
    """--system-prompt: the text itself, or @FILE for a file's text (None when not given)."""
    if value is None:
        return None
    if value.startswith("@"):
        return Path(value[1:]).read_text(encoding="utf-8").strip()
    return value


def with_system_prompt(examples: list[Example], system: str | None) -> list[Example]:
    """Examples with `system` as the system message of every row that has none (unchanged when None)."""
    return [replace(e, messages=messages_for(e.messages, system)) for e in examples]


def trained_prompt_of(tokenizer, rows: list[Example], system: str | None,
                      source: str = "--system-prompt") -> TrainedPrompt:
    """The system prompt `rows` are trained under: their own, else `system` (from `source`), else the template's
    default."""
    own = [m[0]["content"] if m and m[0]["role"] == "system" else None for m in (r.messages for r in rows)]
    if system is not None:
        return summarize_prompts(own, system, source)
    return summarize_prompts(own, template_default_system(tokenizer), "template default")


def split_validation(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out a deterministic random `fraction` (at least 1 row, at most 200) for validation."""
    if len(examples) < 2 or fraction <= 0:
        return examples, []
    count = min(200, max(1, round(len(examples) * fraction)))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    train = [e for i, e in enumerate(examples) if i not in held]
    valid = [e for i, e in enumerate(examples) if i in held]
    return train, valid
