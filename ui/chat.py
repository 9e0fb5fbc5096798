"""One chat turn: stream the reply of the chosen model (and, in compare mode, of its base) into histories."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gradio as gr

from assistant.generation import GenerationParams
from serve.registry import BASE_CHOICE, ModelRegistry
from ui.history import Message, model_messages
from ui.stopping import Stopper

logger = logging.getLogger(__name__)


@dataclass
class Settings:
    """What the side panel chose for a request."""

    choice: str
    system: str
    params: GenerationParams
    compare: bool = False

    @classmethod
    def of(
        cls, choice: str, compare: bool, system: str, temperature: float, top_p: float, top_k: int,
        repetition_penalty: float, max_new_tokens: int, seed: float | None,
    ) -> Settings:
        """Build from the panel's widget values (a negative or empty seed means random)."""
        params = GenerationParams(
            max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
            top_k=int(top_k), repetition_penalty=float(repetition_penalty),
            seed=None if seed is None or seed < 0 else int(seed),
        )
        # Compare mode needs an adapter to switch off; with the base model chosen it is plain chat.
        return cls(choice, system or "", params, bool(compare) and choice != BASE_CHOICE)


def trim_notice(dropped: int) -> None:
    """Tell the browser that old messages did not fit (shown as a toast)."""
    gr.Warning(f"{dropped} oldest messages were left out to fit the context window")


def stream_answer(
    registry: ModelRegistry, stopper: Stopper, settings: Settings, history: list[Message],
    *, use_adapter: bool = True, on_trim: Callable[[int], None] | None = trim_notice,
) -> Iterator[str]:
    """Growing reply to a history that ends with a user message."""
    _load(registry, settings.choice)
    try:
        yield from registry.stream(
            settings.choice, model_messages(settings.system, history), settings.params,
            cancel=stopper.next_event(), use_adapter=use_adapter, on_trim=on_trim,
        )
    except ValueError as error:  # e.g. a single message longer than the context window
        raise gr.Error(str(error)) from error


def stream_turn(
    registry: ModelRegistry, stopper: Stopper, settings: Settings, history: list[Message], base: list[Message]
) -> Iterator[tuple[list[Message], list[Message]]]:
    """Yield (history, base history) while the reply streams; the base side only in compare mode."""
    yield history, base
    history = [*history, {"role": "assistant", "content": ""}]
    for text in stream_answer(registry, stopper, settings, history[:-1]):
        history[-1] = {"role": "assistant", "content": text}
        yield history, base
    # Compare mode answers one after the other: both sides share one model (and its lock).
    if settings.compare and not stopper.stopped.is_set():
        base = [*base, {"role": "assistant", "content": ""}]
        for text in stream_answer(registry, stopper, settings, base[:-1], use_adapter=False, on_trim=None):
            base[-1] = {"role": "assistant", "content": text}
            yield history, base


def _load(registry: ModelRegistry, choice: str):
    try:
        return registry.get(choice)
    except (OSError, KeyError, ValueError) as error:
        logger.exception("could not load %s", choice)
        raise gr.Error(f"could not load {choice}: {error}") from error
