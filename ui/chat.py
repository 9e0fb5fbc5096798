"""One chat turn: stream the reply of the chosen model (and, in compare mode, of its base) into histories."""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gradio as gr

from assistant.generation import GenerationParams
from serve.registry import BASE_CHOICE, ModelRegistry
from ui.history import Message, model_messages
from ui.prompts import AS_TRAINED
from ui.stopping import Stopper

logger = logging.getLogger(__name__)


@dataclass
class Settings:
    """What the side panel chose for a request."""

    choice: str
    system: str | None  # the system message to send; None: none (the model's trained prompt applies)
    params: GenerationParams
    compare: bool = False

    @classmethod
    def of(
        cls, choice: str, compare: bool, prompt: str, system: str, temperature: float, top_p: float, top_k: int,
        repetition_penalty: float, max_new_tokens: int, seed: float | None,
    ) -> Settings:
        """Build from the panel's widget values (a negative or empty seed means random). With the prompt menu
        on "as trained" (or an empty box) no system message is sent: wherever the model is served, in this
        process or behind --backend-url, the one prompt rule then gives it the prompt it was trained with."""
        params = GenerationParams(
            max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
            top_k=int(top_k), repetition_penalty=float(repetition_penalty),
            seed=None if seed is None or seed < 0 else int(seed),
        )
        # Compare mode needs an adapter to switch off; with the base model chosen it is plain chat.
        own = None if prompt == AS_TRAINED or not (system or "").strip() else system
        return cls(choice, own, params, bool(compare) and choice != BASE_CHOICE)


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
    if not settings.compare:
        for text in stream_answer(registry, stopper, settings, history[:-1]):
            history[-1] = {"role": "assistant", "content": text}
            yield history, base
        return
    # Compare mode streams both sides at once: the engine decodes the adapter's row and the base model's
    # row in one batch (they share the base model's weights).
    base = [*base, {"role": "assistant", "content": ""}]
    sides = [
        stream_answer(registry, stopper, settings, history[:-1]),
        stream_answer(registry, stopper, settings, base[:-1], use_adapter=False, on_trim=None),
    ]
    for side, text in together(sides, on_abandon=stopper.stop):
        if side == 0:
            history[-1] = {"role": "assistant", "content": text}
        else:
            base[-1] = {"role": "assistant", "content": text}
        yield history, base


def together(streams: list[Iterator[str]], on_abandon: Callable[[], None]) -> Iterator[tuple[int, str]]:
    """(index, text) from several streams as their updates come, each consumed in its own thread.

    An error in any stream is raised here; `on_abandon` runs when the caller stops listening early
    (it must make the streams end, e.g. by setting their cancel events).
    """
    updates: queue.Queue = queue.Queue()
    finished = object()

    def pump(index: int, stream: Iterator[str]) -> None:
        try:
            for text in stream:
                updates.put((index, text))
        except BaseException as error:  # raised in the caller's thread
            updates.put((index, error))
        finally:
            updates.put((index, finished))

    for index, stream in enumerate(streams):
        # The request's context (Gradio's notices) goes with each stream.
        threading.Thread(target=contextvars.copy_context().run, args=(pump, index, stream), daemon=True).start()
    running = len(streams)
    try:
        while running:
            index, item = updates.get()
            if item is finished:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        if running:
            on_abandon()


def _load(registry: ModelRegistry, choice: str):
    try:
        return registry.get(choice)
    except (OSError, LookupError, ValueError) as error:  # LookupError: unknown or unavailable adapter
        logger.exception("could not load %s", choice)
        raise gr.Error(f"could not load {choice}: {error}") from error
