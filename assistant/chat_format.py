"""The one place chats become text and token ids, for training and serving alike.

Both sides render with the tokenizer's own chat template. Training labels come from rendering
prefixes of the conversation: the tokens between "history + generation prompt" and "history +
this assistant turn" are the ones the model learns, end-of-turn token included. The app renders
exactly that "history + generation prompt" prefix, so it serves what was trained.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from jinja2 import TemplateError as JinjaTemplateError

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The chat template does not render a conversation as a prefix of its continuation."""


def render_chat(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    """Render messages with the tokenizer's chat template (the only renderer in the project)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids the model continues to answer the last user message."""
    return _ids(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=True))


def template_default_system(tokenizer) -> str | None:
    """The system text the chat template writes into a chat that has no system message (None: it writes none).

    Found by rendering a chat with a marker system message and without one; returned only when a chat
    with this text as its system message renders exactly like the chat without one.
    """
    marker, user = "\u2062SYSTEM\u2062", [{"role": "user", "content": "\u2063"}]
    bare = render_chat(tokenizer, user)
    head, found, tail = render_chat(tokenizer, [{"role": "system", "content": marker}, *user]).partition(marker)
    if not found or len(head) + len(tail) > len(bare) or not (bare.startswith(head) and bare.endswith(tail)):
        return None
    text = bare[len(head) : len(bare) - len(tail)]
    return text if render_chat(tokenizer, [{"role": "system", "content": text}, *user]) == bare else None


def system_prefix_length(tokenizer, messages: list[dict[str, str]], ids: list[int]) -> int:
    """How many leading `ids` are the system message rendered alone (the template's own default where the chat
    has none): what every chat with that system prompt starts with. 0 where they are not a token prefix."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    head = _system_head(tokenizer, system)
    return len(head) if head and len(head) < len(ids) and tuple(ids[: len(head)]) == head else 0


@functools.lru_cache(maxsize=64)
def _system_head(tokenizer, system: str | None) -> tuple[int, ...]:
    """Token ids of a chat holding only this system message (None: the template's default one); () if none."""
    if system is None:
        system = template_default_system(tokenizer)
        if system is None:
            return ()
    try:
        return tuple(_ids(tokenizer, render_chat(tokenizer, [{"role": "system", "content": system}])))
    except (JinjaTemplateError, ValueError):  # a template that refuses a chat without a user turn
        return ()


def _ids(tokenizer, text: str) -> list[int]:
    # The template already wrote every special token; adding BOS again would shift the prefixes.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class EncodedChat:
    """Token ids and labels (IGNORE_INDEX where no loss is taken) of one training example."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        """How many positions carry a label."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode_chat(tokenizer, messages: list[dict[str, str]], *, max_length: int | None = None) -> EncodedChat:
    """Ids and labels for a chat: loss on every assistant turn, end-of-turn token included."""
    full = _ids(tokenizer, render_chat(tokenizer, messages))
    labels = [IGNORE_INDEX] * len(full)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _checked_prefix(tokenizer, messages[:turn], full, turn, add_generation_prompt=True)
        end = _checked_prefix(tokenizer, messages[: turn + 1], full, turn, add_generation_prompt=False)
        labels[start:end] = full[start:end]
    truncated = max_length is not None and len(full) > max_length
    if truncated:
        full, labels = full[:max_length], labels[:max_length]
    return EncodedChat(full, labels, truncated)


def _checked_prefix(tokenizer, head: list[dict[str, str]], full: list[int], turn: int, **kw) -> int:
    """Length of the rendered `head`, which must be a token prefix of the whole rendered chat."""
    ids = _ids(tokenizer, render_chat(tokenizer, head, **kw))
    if full[: len(ids)] != ids:
        what = "the generation prompt before" if kw.get("add_generation_prompt") else "the end of"
        raise TemplateError(
            f"chat template is not prefix-preserving at turn {turn} ({what} messages[{turn}]): rendering "
            f"the conversation up to there does not give a prefix of the whole conversation, so the "
            f"trained tokens would differ from what the app renders; use a template that only appends"
        )
    return len(ids)
