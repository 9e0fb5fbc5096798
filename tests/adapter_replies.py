"""An adapter's own reply, computed here in-process from its folder, for tests that must tell the adapter from
the base model: a served reply equal to `Replies.adapter` came from the adapter's weights, and `replies`
refuses a prompt the base model answers the same way (such a test could not tell them apart).

The adapter is loaded with assistant.loading's own loader on a base model of this module's (never the
server's registry, so a registry that serves the wrong weights cannot agree with itself), and replies with
the rules every server applies: assistant.generation.stream_reply renders the messages with the adapter's
trained system prompt when the caller sends none (assistant.adapters.messages_for), and the settings a
caller leaves unset come from the adapter's generation_config.json, else its base model's, else the app's
(GenerationParams.resolve over ChatModel.generation_defaults).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from assistant.generation import GenerationParams, complete_reply
from assistant.loading import ChatModel, Host, base_of, chat_model, load_host

_hosts: dict[tuple[str, str], Host] = {}  # (base, precision) -> a base model of this module's own


@dataclass(frozen=True)
class Replies:
    """Greedy replies to one conversation: the adapter's, and the two ways a server could answer without it."""

    adapter: str  # the adapter's own reply (its weights, its trained prompt, its settings)
    base_weights: str  # the same prompt and settings on the base's weights (compare mode's base column)
    base_model: str  # the base model as served on its own (no trained prompt, the base's own settings)


def adapter_model(folder: str | Path, precision: str = "auto") -> ChatModel:
    """The adapter folder loaded by assistant.loading onto a base model of this module's."""
    base = base_of(None, folder)
    if (base, precision) not in _hosts:
        _hosts[base, precision] = load_host(base, precision)
    return chat_model(_hosts[base, precision], folder)


def params_for(chat: ChatModel, **given) -> GenerationParams:
    """The settings a server decodes `chat` with when a caller sets `given` (None: unset) and leaves the rest."""
    return GenerationParams.resolve(chat.generation_defaults, **given)


def replies(folder: str | Path, messages: list[dict[str, str]], *, precision: str = "auto", **given) -> Replies:
    """The adapter's reply to `messages` with the settings `given` (e.g. temperature=0, max_new_tokens=12;
    greedy, or the comparison means nothing), checked to differ from both base model replies."""
    chat = adapter_model(folder, precision)
    params = params_for(chat, **given)
    assert params.temperature == 0, "only a greedy reply is the adapter's one reply"
    base = chat_model(chat.host, None)
    found = Replies(
        adapter=complete_reply(chat, messages, params),
        base_weights=complete_reply(chat, messages, params, use_adapter=False),
        base_model=complete_reply(base, messages, params_for(base, **given)),
    )
    assert found.adapter.strip(), f"{folder}: the adapter gives an empty reply to {messages}"
    assert found.adapter not in (found.base_weights, found.base_model), (
        f"the base model replies to {messages} as the adapter {folder} does ({found}); choose a prompt "
        "where they differ, or the test cannot tell which one replied")
    return found


def adapter_reply(folder: str | Path, messages: list[dict[str, str]], **given) -> str:
    """`replies(...).adapter`: the reply only the adapter gives."""
    return replies(folder, messages, **given).adapter
