"""The app's event functions: send, retry, edit, undo, stop, model choice, the /chat API, restore."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import gradio as gr

from assistant.generation import GenerationParams
from serve.access import AccessPolicy
from serve.feedback import turn_of
from serve.openai_schema import InvalidRequest, validate_chat
from serve.registry import BASE_CHOICE, ModelRegistry
from ui.access import admit
from ui.chat import Settings, stream_answer, stream_turn
from ui.feedback_panel import TurnLog
from ui.history import (
    cut_for_edit,
    cut_for_retry,
    cut_for_undo,
    index_of,
    last_user_index,
    model_messages,
    plain,
)
from ui.prompts import AS_TRAINED, CUSTOM_PROMPT, DEFAULT_PROMPT, list_prompts
from ui.stopping import StopSignals

logger = logging.getLogger(__name__)

EMPTY_STORE = {"chat": [], "base": []}  # what a browser stores before its first message
CHAT_PARAMS = {"max_tokens": "max_new_tokens"}  # /v1's field names as Gradio's /chat calls them


class Handlers:
    """Event functions; each streaming one registers itself so this browser's Stop can end it."""

    def __init__(self, registry: ModelRegistry, signals: StopSignals, gpu: Callable[[Callable], Callable],
                 access: AccessPolicy | None = None, slider_overrides: dict | None = None,
                 turns: TurnLog | None = None):
        # access: who may call /chat (serve.access); None only for in-process use, where no caller is remote.
        # turns: where each reply's Turn is recorded for the feedback panel (None: not recorded).
        self.registry = registry
        self.signals = signals
        self.access = access
        self.slider_overrides = dict(slider_overrides or {})  # the sliders' start where not the model's own
        self.turns = turns
        self.prompts = list_prompts()
        self.default_prompt = self.prompts.get(DEFAULT_PROMPT, "")
        # Spaces' @spaces.GPU must wrap exactly the functions that run the model (on ZeroGPU they run in
        # another process: what they record there is lost, so the Turns are recorded outside them).
        self._generate = gpu(self._generate)
        self._api_reply = gpu(self._api_reply)  # the access check stays outside: a refusal takes no GPU

    def _stream(self, request: gr.Request | None, settings: Settings, history: list, base: list) -> Iterator:
        self._record(getattr(request, "session_hash", None), settings, history, base)
        yield from self._generate(request, settings, history, base)

    def _generate(self, request: gr.Request | None, settings: Settings, history: list, base: list) -> Iterator:
        with self.signals.request(getattr(request, "session_hash", None)) as stopper:
            for chat, side in stream_turn(self.registry, stopper, settings, history, base):
                yield chat, side, status_text(self.registry, settings.choice)

    def _record(self, session: str | None, settings: Settings, history: list, base: list) -> None:
        """Record the Turn of the reply about to be generated on each side (what the model will see)."""
        if self.turns is None or not session:
            return
        sides = [("chat", history, True)] + ([("base", base, False)] if settings.compare else [])
        for side, before, use_adapter in sides:
            try:
                turn = turn_of(self.registry, settings.choice, model_messages(settings.system, before),
                               settings.params, use_adapter=use_adapter, context=before)
            except Exception:  # the chat goes on; only rating this reply will say it cannot
                logger.exception("could not record the turn of a reply of %s", settings.choice)
                continue
            self.turns.put(session, side, len(before), turn)

    def send(self, message: str, history: list, base: list, choice: str, compare: bool, prompt: str,
             system: str, temperature: float, top_p: float, top_k: int, repetition_penalty: float, max_new_tokens: int,
             seed: float | None, request: gr.Request) -> Iterator:
        """Append the user's message and stream the reply (both sides in compare mode)."""
        history, base = plain(history), plain(base)
        if not (message or "").strip():
            yield message, history, base, gr.skip()
            return
        settings = Settings.of(choice, compare, prompt, system, temperature, top_p, top_k, repetition_penalty,
                               max_new_tokens, seed)
        user = {"role": "user", "content": message}
        base = [*base, user] if settings.compare else base
        for chat, side, status in self._stream(request, settings, [*history, user], base):
            yield "", chat, side, status

    def retry(self, data: gr.RetryData, history: list, base: list, choice: str, compare: bool, prompt: str,
              system: str, temperature: float, top_p: float, top_k: int, repetition_penalty: float, max_new_tokens: int,
              seed: float | None, request: gr.Request) -> Iterator:
        """Answer the chosen user message again (the chatbot's retry icon)."""
        settings = Settings.of(choice, compare, prompt, system, temperature, top_p, top_k, repetition_penalty,
                               max_new_tokens, seed)
        index = index_of(data.index)
        yield from self._stream(request, settings, cut_for_retry(plain(history), index),
                                cut_for_retry(plain(base), index) if settings.compare else [])

    def retry_last(self, history: list, base: list, choice: str, compare: bool, prompt: str, system: str,
                   temperature: float, top_p: float, top_k: int, repetition_penalty: float,
                   max_new_tokens: int, seed: float | None, request: gr.Request) -> Iterator:
        """Answer the last user message again (the Retry button)."""
        history, base = plain(history), plain(base)
        index = last_user_index(history)
        if index is None:
            yield history, base, gr.skip()
            return
        settings = Settings.of(choice, compare, prompt, system, temperature, top_p, top_k, repetition_penalty,
                               max_new_tokens, seed)
        yield from self._stream(request, settings, cut_for_retry(history, index),
                                cut_for_retry(base, index) if settings.compare else [])

    def edit(self, data: gr.EditData, history: list, base: list, choice: str, compare: bool, prompt: str,
             system: str, temperature: float, top_p: float, top_k: int, repetition_penalty: float, max_new_tokens: int,
             seed: float | None, request: gr.Request) -> Iterator:
        """Replace an edited user message, drop what followed it and answer it."""
        history, base = plain(history), plain(base)
        index, text = index_of(data.index), plain([{"role": "user", "content": data.value}])[0]["content"]
        if history[index]["role"] != "user":  # assistant edits just stand as written
            yield history, base, gr.skip()
            return
        settings = Settings.of(choice, compare, prompt, system, temperature, top_p, top_k, repetition_penalty,
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

    def slider_settings(self, choice: str | None) -> GenerationParams:
        """What the sliders show for a choice: the settings it is served with (its generation_config.json,
        else its base model's, else the app's), where the app was not told to start them elsewhere."""
        return GenerationParams.resolve(self.registry.generation_defaults(choice), **self.slider_overrides)

    def generation_sliders(self, choice: str) -> tuple:
        """On a new model choice: the sampling sliders move to the settings it is served with; the reply length
        stays where the user put it unless the model sets one of its own."""
        d = self.slider_settings(choice)
        own_length = "max_new_tokens" in self.registry.generation_defaults(choice)
        return d.temperature, d.top_p, d.top_k, d.repetition_penalty, d.max_new_tokens if own_length else gr.skip()

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
                 adapter: str = "", max_new_tokens: int | None = None, temperature: float | None = None,
                 request: gr.Request = None) -> Iterator[str]:
        """Stream a reply to `message`; yields the growing reply text. `history`: [{"role", "content"}];
        `system_prompt`: unset, the prompt the adapter was trained with (the same rule as /v1); `adapter`: a
        menu name (default: the app's default choice, "base model" for none); `max_new_tokens`, `temperature`:
        unset, the model's generation settings. Checked with /v1's own schema: a bad value is an error naming it."""
        admit(self.access, request, "/chat")
        choice = adapter or self.registry.default_choice()
        messages = [*([{"role": "system", "content": system_prompt}] if system_prompt is not None else []),
                    *[m for m in (history or []) if isinstance(m, dict)], {"role": "user", "content": message}]
        body = {"model": choice, "messages": messages, "max_tokens": max_new_tokens, "temperature": temperature}
        try:
            req = validate_chat(body, renamed=CHAT_PARAMS)
        except InvalidRequest as error:
            raise gr.Error(error.message) from None
        params = req.generation(self.registry.generation_defaults(choice))
        yield from self._api_reply(choice, req.plain_messages(), params, request)

    def _api_reply(self, choice: str, messages: list[dict], params: GenerationParams,
                   request: gr.Request | None) -> Iterator[str]:
        settings = Settings(choice, None, params)
        with self.signals.request(getattr(request, "session_hash", None)) as stopper:
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
