"""The app's event functions: send, retry, edit, undo, stop, model choice, the /chat API, restore."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import gradio as gr

from assistant.generation import GenerationParams
from serve.access import AccessPolicy
from serve.registry import BASE_CHOICE, ModelRegistry
from ui.chat import Settings, stream_answer, stream_turn
from ui.history import cut_for_edit, cut_for_retry, cut_for_undo, index_of, last_user_index, plain
from ui.prompts import AS_TRAINED, CUSTOM_PROMPT, DEFAULT_PROMPT, list_prompts
from ui.stopping import StopSignals

logger = logging.getLogger(__name__)

EMPTY_STORE = {"chat": [], "base": []}  # what a browser stores before its first message


class Handlers:
    """Event functions; each streaming one registers itself so this browser's Stop can end it."""

    def __init__(self, registry: ModelRegistry, signals: StopSignals, gpu: Callable[[Callable], Callable],
                 access: AccessPolicy | None = None):
        # access: who may call /chat (serve.access); None only for in-process use, where no caller is remote.
        self.registry = registry
        self.signals = signals
        self.access = access
        self.prompts = list_prompts()
        self.default_prompt = self.prompts.get(DEFAULT_PROMPT, "")
        # Spaces' @spaces.GPU must wrap exactly the functions that run the model.
        self.send = gpu(self.send)
        self.retry = gpu(self.retry)
        self.edit = gpu(self.edit)
        self.retry_last = gpu(self.retry_last)
        self._api_reply = gpu(self._api_reply)  # the access check stays outside: a refusal takes no GPU

    def _stream(self, request: gr.Request | None, settings: Settings, history: list, base: list) -> Iterator:
        with self.signals.request(getattr(request, "session_hash", None)) as stopper:
            for chat, side in stream_turn(self.registry, stopper, settings, history, base):
                yield chat, side, status_text(self.registry, settings.choice)

    def send(self, message: str, history: list, base: list, choice: str, compare: bool, system: str,
             temperature: float, top_p: float, top_k: int, repetition_penalty: float, max_new_tokens: int,
             seed: float | None, request: gr.Request) -> Iterator:
        """Append the user's message and stream the reply (both sides in compare mode)."""
        history, base = plain(history), plain(base)
        if not (message or "").strip():
            yield message, history, base, gr.skip()
            return
        settings = Settings.of(choice, compare, system, temperature, top_p, top_k, repetition_penalty,
                               max_new_tokens, seed)
        user = {"role": "user", "content": message}
        base = [*base, user] if settings.compare else base
        for chat, side, status in self._stream(request, settings, [*history, user], base):
            yield "", chat, side, status

    def retry(self, data: gr.RetryData, history: list, base: list, choice: str, compare: bool, system: str,
              temperature: float, top_p: float, top_k: int, repetition_penalty: float, max_new_tokens: int,
              seed: float | None, request: gr.Request) -> Iterator:
        """Answer the chosen user message again (the chatbot's retry icon)."""
        settings = Settings.of(choice, compare, system, temperature, top_p, top_k, repetition_penalty,
                               max_new_tokens, seed)
        index = index_of(data.index)
        yield from self._stream(request, settings, cut_for_retry(plain(history), index),
                                cut_for_retry(plain(base), index) if settings.compare else [])

    def retry_last(self, history: list, base: list, choice: str, compare: bool, system: str,
                   temperature: float, top_p: float, top_k: int, repetition_penalty: float,
                   max_new_tokens: int, seed: float | None, request: gr.Request) -> Iterator:
        """Answer the last user message again (the Retry button)."""
        history, base = plain(history), plain(base)
        index = last_user_index(history)
        if index is None:
            yield history, base, gr.skip()
            return
        settings = Settings.of(choice, compare, system, temperature, top_p, top_k, repetition_penalty,
                               max_new_tokens, seed)
        yield from self._stream(request, settings, cut_for_retry(history, index),
                                cut_for_retry(base, index) if settings.compare else [])

    def edit(self, data: gr.EditData, history: list, base: list, choice: str, compare: bool, system: str,
             temperature: float, top_p: float, top_k: int, repetition_penalty: float, max_new_tokens: int,
             seed: float | None, request: gr.Request) -> Iterator:
        """Replace an edited user message, drop what followed it and answer it."""
        history, base = plain(history), plain(base)
        index, text = index_of(data.index), plain([{"role": "user", "content": data.value}])[0]["content"]
        if history[index]["role"] != "user":  # assistant edits just stand as written
            yield history, base, gr.skip()
            return
        settings = Settings.of(choice, compare, system, temperature, top_p, top_k, repetition_penalty,
                               max_new_tokens, seed)
        yield from self._stream(request, settings, cut_for_edit(history, index, text),
                                cut_for_edit(base, index, text) if settings.compare else [])

    @staticmethod
    def undo(data: gr.UndoData, history: list, base: list) -> tuple[str, list, list]:
        """Drop the chosen user message and what followed; put its text back in the box."""
        index = index_of(data.index)
        history = plain(history)
        return history[index]["content"], cut_for_undo(history, index), cut_for_undo(plain(base), index)

    @staticmethod
    def undo_last(history: list, base: list) -> tuple[str, list, list]:
        """Drop the last exchange (the Undo button)."""
        history = plain(history)
        index = last_user_index(history)
        if index is None:
            return "", history, plain(base)
        return history[index]["content"], cut_for_undo(history, index), cut_for_undo(plain(base), index)

    def stop(self, request: gr.Request) -> None:
        """Set the cancel events of this browser's running replies (other browsers keep going)."""
        stopped = self.signals.stop(request.session_hash)
        logger.info("stop: %d running request(s) of this session", stopped)

    def select_model(self, choice: str) -> str:
        """Load the chosen model now (cached afterwards) and show what serves it."""
        try:
            self.registry.get(choice)
        except Exception as error:
            raise gr.Error(f"could not load {choice}: {error}") from error
        return status_text(self.registry, choice)

    def default_system(self, choice: str | None) -> str:
        """The system prompt a choice is served with unless told otherwise: the adapter's trained one,
        else the app's default prompt."""
        trained = self.registry.trained_prompt(choice)
        return (trained.text or "") if trained else self.default_prompt

    def prompt_menu(self, choice: str | None) -> tuple[list[str], str]:
        """The system prompt menu for a choice, and its preselected entry ("as trained" when recorded)."""
        trained = self.registry.trained_prompt(choice) is not None
        names = [*([AS_TRAINED] if trained else []), *self.prompts, CUSTOM_PROMPT]
        first = DEFAULT_PROMPT if DEFAULT_PROMPT in self.prompts else next(iter(self.prompts), CUSTOM_PROMPT)
        return names, AS_TRAINED if trained else first

    def use_trained_prompt(self, choice: str, name: str, text: str) -> tuple[dict, str]:
        """On a new model choice: preselect the prompt it was trained with (else keep a prompt it offers)."""
        names, first = self.prompt_menu(choice)
        if first != AS_TRAINED and name in names:
            return gr.update(choices=names, value=name), text
        return gr.update(choices=names, value=first), self.prompt_text(first, choice, text)

    def prompt_text(self, name: str, choice: str, current: str) -> str:
        """Text of a prompt menu entry ("custom" keeps the box as it is)."""
        if name == AS_TRAINED:
            return self.default_system(choice)
        return self.prompts.get(name, current)

    def prompt_note(self, choice: str, system: str) -> dict:
        """One line when the system prompt differs from the one the chosen adapter was trained with."""
        trained = self.registry.trained_prompt(choice)
        differs = trained is not None and (system or "").strip() != (trained.text or "").strip()
        note = (f"This adapter was trained with a different system prompt; pick **{AS_TRAINED}** to serve "
                "what it learned." if differs else "")
        return gr.update(value=note, visible=differs)

    def api_chat(self, message: str, history: list[dict] | None = None, system_prompt: str | None = None,
                 adapter: str = "", max_new_tokens: int = 256, temperature: float = 0.0,
                 request: gr.Request = None) -> Iterator[str]:
        """Stream a reply to `message`; yields the growing reply text. `history`: [{"role", "content"}];
        `system_prompt`: default the prompt the adapter was trained with (else the app's default prompt), ""
        for none; `adapter`: a menu name (default: the app's default choice, "base model" for none)."""
        self._admit(request)
        yield from self._api_reply(message, history, system_prompt, adapter, max_new_tokens, temperature, request)

    def _admit(self, request: gr.Request | None) -> None:
        """Refuse an API caller that the access rule keeps out (the same rule as /v1)."""
        refusal = self.access.check_request(request) if self.access else None
        if refusal:
            logger.info("refused /chat: %s", refusal.code)
            raise gr.Error(refusal.message)

    def _api_reply(self, message: str, history: list[dict] | None, system_prompt: str | None, adapter: str,
                   max_new_tokens: int, temperature: float, request: gr.Request | None) -> Iterator[str]:
        params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature)
        choice = adapter or self.registry.default_choice()
        system = self.default_system(choice) if system_prompt is None else system_prompt
        settings = Settings(choice, system, params)
        with self.signals.request(getattr(request, "session_hash", None)) as stopper:
            messages = [*plain(history), {"role": "user", "content": message}]
            yield from stream_answer(self.registry, stopper, settings, messages, on_trim=None)

    def restore(self, stored: dict | None, choice: str) -> tuple[list, dict, bool, str]:
        """On page load: this browser's saved histories (compare mode back on if it was)."""
        stored = stored if isinstance(stored, dict) else EMPTY_STORE
        chat, base = plain(stored.get("chat")), plain(stored.get("base"))
        return chat, gr.update(value=base, visible=bool(base)), bool(base), status_text(self.registry, choice)


def status_text(registry: ModelRegistry, choice: str) -> str:
    """The status line: which model answers, on which device, in which precision."""
    return f"**Model:** {registry.describe(choice)}"


def save(history: list, base: list) -> dict:
    """What goes to this browser's localStorage."""
    return {"chat": plain(history), "base": plain(base)}


def toggle_compare(compare: bool, choice: str, history: list) -> dict:
    """Show or hide the base column; it starts from the current conversation, so both sides share the past."""
    if compare and choice == BASE_CHOICE:
        gr.Warning("Compare mode needs an adapter: pick one in the Adapter menu")
    # Value and visibility in one update: a hidden chatbot may not be mounted to receive a value.
    return gr.update(visible=compare, value=plain(history) if compare else [])
