"""Chat histories as plain {"role", "content": str} lists, and the Retry / Undo / Edit cuts on them."""

from __future__ import annotations

from typing import Any

Message = dict[str, str]


def text_of(content: Any) -> str:
    """Plain text of a Chatbot message content (a string or Gradio 6's list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "") if content.get("type", "text") == "text" else ""
    if isinstance(content, list | tuple):
        return "\n".join(part for part in (text_of(item) for item in content) if part)
    return ""


def plain(history: list[dict] | None) -> list[Message]:
    """Chatbot value (or a stored/API history) -> [{"role", "content"}] with text contents only."""
    messages = []
    for message in history or []:
        role = message.get("role")
        if role in ("user", "assistant", "system"):
            messages.append({"role": role, "content": text_of(message.get("content"))})
    return messages


def model_messages(system: str | None, history: list[Message]) -> list[Message]:
    """What the screen sends: its system prompt (None: none, so the served model's trained prompt applies,
    assistant.adapters.messages_for) then the conversation without system turns."""
    turns = [m for m in history if m["role"] != "system"]
    # Kept exactly as given (not stripped): a trained system prompt must render to the trained tokens.
    return [{"role": "system", "content": system}, *turns] if system is not None else turns


def last_user_index(history: list[Message]) -> int | None:
    """Index of the last user message, or None when there is none."""
    return next((i for i in range(len(history) - 1, -1, -1) if history[i]["role"] == "user"), None)


def cut_for_retry(history: list[Message], index: int) -> list[Message]:
    """History up to and including the user message at `index`, ready to be answered again."""
    return history[: index + 1]


def cut_for_edit(history: list[Message], index: int, text: str) -> list[Message]:
    """History up to the edited user message at `index`, with its new text."""
    return [*history[:index], {"role": "user", "content": text}]


def cut_for_undo(history: list[Message], index: int) -> list[Message]:
    """History before the user message at `index` (that message and its replies go)."""
    return history[:index]


def index_of(data_index: int | tuple[int, int] | list[int]) -> int:
    """Message index from Gradio's event data (an int, or (message, part) for grouped messages)."""
    return int(data_index[0] if isinstance(data_index, tuple | list) else data_index)
