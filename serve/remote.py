"""The UI as a front end to any OpenAI-compatible server (vLLM, this project's own API, ...).

`python -m ui --backend-url URL` uses a RemoteRegistry instead of loading a model in-process: the
menu lists the server's models, replies stream over the OpenAI chat-completions API, Stop closes
the stream (the server then stops generating), and compare mode asks the server's base model. Its trained system prompts are the server's business: the screen sends no
system message for "as trained", so the server applies the one prompt rule itself; a server that says
an adapter's trained prompt and generation settings on its model objects (this project's /v1/models
does) gets them shown on the screen and its sliders.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

from assistant.adapters import TrainedPrompt
from assistant.generation import GenerationParams
from serve.registry import BASE_CHOICE

logger = logging.getLogger(__name__)

BASE_IDS = ("base",)  # what this project's API and `serve.vllm` call the base model


class RemoteModel:
    """What the menu shows for a remote model."""

    def __init__(self, model_id: str, url: str):
        self.model_id, self.url = model_id, url

    def describe(self) -> str:
        """Status line for the UI."""
        return f"{self.model_id} on {self.url} (remote OpenAI-compatible server)"


class RemoteRegistry:
    """Same interface as ModelRegistry, backed by a remote server's models."""

    def __init__(self, url: str, api_key: str | None = None):
        from openai import OpenAI, OpenAIError

        self.url = url.rstrip("/")
        self.client = OpenAI(base_url=self.url, api_key=api_key or "none", max_retries=1)
        try:
            models = self.client.models.list().data
        except OpenAIError as error:
            raise ValueError(f"{self.url}: cannot list the backend's models: {error}") from error
        ids = [m.id for m in models]
        # This project's server says what it serves each model with; others (vLLM) say nothing.
        self.extras = {m.id: dict(m.model_extra or {}) for m in models}
        if not ids:
            raise ValueError(f"{self.url}: the server lists no models")
        self.base_id = next((i for i in ids if i in BASE_IDS), ids[0])
        self.adapters = {i: i for i in ids if i != self.base_id}

    @property
    def choices(self) -> list[str]:
        """Menu entries: the base model first, then the server's adapters."""
        return [BASE_CHOICE, *self.adapters]

    def default_choice(self) -> str:
        """The first adapter, else the base model."""
        return next(iter(self.adapters), BASE_CHOICE)

    def model_id(self, choice: str | None, use_adapter: bool = True) -> str:
        """The server's model id for a menu choice (its base model when the adapter is switched off)."""
        choice = choice or self.default_choice()
        if choice != BASE_CHOICE and choice not in self.adapters:
            raise KeyError(f"unknown model {choice!r}; choose one of {', '.join(self.choices)}")
        return self.adapters[choice] if use_adapter and choice != BASE_CHOICE else self.base_id

    def get(self, choice: str | None) -> RemoteModel:
        """The remote model behind a menu choice."""
        return RemoteModel(self.model_id(choice), self.url)

    def describe(self, choice: str | None) -> str:
        """Status line: which remote model answers."""
        return self.get(choice).describe()

    def trained_prompt(self, choice: str | None) -> TrainedPrompt | None:
        """The prompt the server says the model was trained with (None when it does not say); the server
        applies it itself to a chat that has no system message."""
        text = self.extras.get(self.model_id(choice), {}).get("trained_system_prompt")
        return TrainedPrompt(text, "the server") if isinstance(text, str) else None

    def generation_defaults(self, choice: str | None) -> dict:
        """The generation settings the server says it serves the model with ({} when it does not say)."""
        settings = self.extras.get(self.model_id(choice), {}).get("generation_config")
        return dict(settings) if isinstance(settings, dict) else {}

    def stream(self, choice: str, messages: list[dict[str, str]], params: GenerationParams, *,
               cancel: threading.Event, use_adapter: bool = True,
               on_trim: Callable[[int], None] | None = None) -> Iterator[str]:
        """Yield the growing reply from the server; setting `cancel` closes the stream."""
        from openai import OpenAIError

        try:
            stream = self.client.chat.completions.create(
                model=self.model_id(choice, use_adapter), messages=messages, stream=True,
                temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
                seed=params.seed,
                # vLLM's sampling extensions, which this project's /v1 takes too: the screen's sliders hold.
                extra_body={"top_k": params.top_k, "repetition_penalty": params.repetition_penalty},
            )
        except OpenAIError as error:  # shown to the user like any other generation error
            raise ValueError(f"{self.url}: {error}") from error
        text = ""
        try:
            for chunk in stream:
                if cancel.is_set():
                    break
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    text += delta
                    yield text
        finally:
            stream.close()  # the server sees the disconnect and stops generating
