"""The adapter menu: "base model" plus every adapter folder, each loaded on first use and then cached."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from assistant.adapters import ADAPTER_CONFIG, TrainedPrompt, adapter_info, find_adapters, trained_prompt
from assistant.generation import GenerationParams, stream_reply
from assistant.loading import ChatModel, base_of, load_chat_model
from assistant.models import pick_precision

logger = logging.getLogger(__name__)

BASE_CHOICE = "base model"


def adapter_choices(adapters_dir: str | Path, extra: list[str] | None = None) -> dict[str, Path]:
    """Menu label -> adapter folder: those found in `adapters_dir`, then the `--adapter` ones."""
    choices = find_adapters(adapters_dir)
    for given in extra or []:
        path = Path(given)
        if not (path / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"{given}: not an adapter folder (no {ADAPTER_CONFIG})")
        if any(path.resolve() == known.resolve() for known in choices.values()):
            continue
        # Two folders with the same name (run1/final, run2/final) keep their full path as label.
        label = path.name if path.name not in choices and path.name != BASE_CHOICE else str(path)
        choices[label] = path
    return choices


class ModelRegistry:
    """Loads each menu choice once, on first use, and keeps it for later requests."""

    def __init__(
        self, adapters: dict[str, Path], base_model: str | None = None, precision: str = "auto",
        default: str | None = None,
    ):
        self.adapters = adapters
        self.base_model = base_model
        self.precision = precision
        self.default = default
        self._models: dict[str, ChatModel] = {}
        self._lock = threading.Lock()  # two first requests must not load the same model twice

    @property
    def choices(self) -> list[str]:
        """Menu entries: the base model first, then the adapters."""
        return [BASE_CHOICE, *self.adapters]

    def default_choice(self) -> str:
        """The given default, else the first adapter (what the user trained), else the base model."""
        return self.default or next(iter(self.adapters), BASE_CHOICE)

    def get(self, choice: str | None) -> ChatModel:
        """The loaded ChatModel for a menu choice (loading it now if needed)."""
        choice = choice or self.default_choice()
        if choice != BASE_CHOICE and choice not in self.adapters:
            raise KeyError(f"unknown adapter {choice!r}; choose one of {', '.join(self.choices)}")
        with self._lock:
            if choice not in self._models:
                logger.info("loading %s", choice)
                self._models[choice] = load_chat_model(self.base_model, self.adapters.get(choice), self.precision)
            return self._models[choice]

    def trained_prompt(self, choice: str | None) -> TrainedPrompt | None:
        """The system prompt the chosen adapter was trained with (None: base model or not recorded)."""
        return trained_prompt(self.adapters.get(choice or self.default_choice()))

    def stream(self, choice: str | None, messages: list[dict[str, str]], params: GenerationParams, *,
               cancel: threading.Event, use_adapter: bool = True,
               on_trim: Callable[[int], None] | None = None) -> Iterator[str]:
        """Growing reply of a menu choice (the in-process runtime, batched with concurrent requests)."""
        return stream_reply(self.get(choice), messages, params, cancel=cancel, use_adapter=use_adapter,
                            on_trim=on_trim)

    def describe(self, choice: str | None) -> str:
        """Status line: what serves this choice, with device and precision."""
        choice = choice or self.default_choice()
        chat = self._models.get(choice)
        if chat is not None:
            return chat.describe()
        adapter = self.adapters.get(choice)
        base = base_of(self.base_model, adapter_info(adapter) if adapter else {})
        return f"{choice}: loads on first use ({pick_precision(self.precision, base=base).describe()})"
