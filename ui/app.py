"""The chat web app: streaming chat with Stop/Retry/Undo/Edit/Clear, prompts, adapters and compare mode.

Layout and wiring live here; the event functions are in ui.handlers, the turn logic in ui.chat and
the per-browser Stop in ui.stopping. The chat is the "Chat" tab; a "Train" tab (ui.train_tab) fine-tunes
adapters beside it wherever the app runs fine-tuning jobs (not with --backend-url or --no-training), and
the chat's "Export this adapter" panel (ui.export_panel) zips the chosen adapter for Ollama, llama.cpp or
transformers wherever the adapters are local (not with --backend-url). Every reply has thumbs up/down and
"Correct this reply" (ui.feedback_panel; compare mode also asks which side was better): what is rated is
stored (serve.feedback), and the "Data" tab (ui.data_tab) reviews it, exports it and trains on it.
Histories are plain [{"role", "content"}] lists, kept in the browser's localStorage (gr.BrowserState)
so a reload keeps them and two browsers never share one.

The one public API endpoint, /chat, streams the growing reply text:

    from gradio_client import Client
    job = Client("http://127.0.0.1:7860/").submit("Hello!", api_name="/chat")
    for text in job:  # "Hi", "Hi there", ...; optional: history=[{"role", "content"}...],
        print(text)   # system_prompt="...", adapter="<menu name>", max_new_tokens=256, temperature=0.0

Unset, the system prompt and the generation settings are the served model's own (its trained prompt and
generation_config.json), exactly as on /v1; values are checked with /v1's schema (a bad one is an error
that names it).

It follows the same access rule as /v1 (serve.access): keyless only from this machine, else
`Client(url, headers={"Authorization": "Bearer KEY"})`; with a login (--auth-file), Gradio asks for the login first
and a logged-in client (`auth=(user, password)`) needs no key.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import gradio as gr

from assistant.batching import MAX_BATCH
from assistant.embedded import EMBEDDED
from assistant.generation import GenerationParams
from serve.jobs import JobRunner
from serve.registry import ModelRegistry
from serve.remote import RemoteRegistry
from serve.server import _UNSET, Server
from ui.config import ChatConfig
from ui.data_tab import DataTab
from ui.eval_tab import EvalTab
from ui.export_panel import ExportPanel
from ui.feedback_panel import FeedbackPanel, TurnLog
from ui.handlers import EMPTY_STORE, Handlers, save, status_text, toggle_compare
from ui.inert import SHOWN_AS_TEXT, PolicedBlocks
from ui.promote_panel import PromotePanel
from ui.prompts import CUSTOM_PROMPT
from ui.stopping import StopSignals
from ui.train_tab import TrainTab

STORAGE_KEY = "chat-assistant-history"
CHAT_TAB, TRAIN_TAB, DATA_TAB, EVAL_TAB = "chat", "train", "data", "evaluate"


class AppBlocks(PolicedBlocks):
    """The app's Blocks: launch() also serves its service's OpenAI-compatible API (serve.server.Server.mount)."""

    service: Server

    def launch(self, *args: Any, **kwargs: Any):
        """PolicedBlocks.launch, with /v1 mounted before the server accepts its first request."""
        # In the app's lifespan: uvicorn runs it before it listens, so a client polling /v1/models while
        # the app starts gets an answer, never a 404 from a server whose routes are still being added.
        app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
        theirs = app_kwargs.get("lifespan")

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.service.mount(app)
            if theirs is None:
                yield
            else:
                async with theirs(app) as state:
                    yield state

        app_kwargs["lifespan"] = lifespan
        return super().launch(*args, app_kwargs=app_kwargs, **kwargs)


def build_app(
    config: ChatConfig,
    *,
    defaults: dict | None = None,
    gpu=None,
    server: Server | None = None,
    registry: ModelRegistry | RemoteRegistry | None = None,
    jobs: JobRunner | None | object = _UNSET,
) -> gr.Blocks:
    """The Gradio app for `config`'s server (serve.server.Server; `registry` and `jobs` stand in for its
    own); `defaults` override the sliders' start (e.g. {"max_new_tokens": 12}: they start from the chosen
    model's generation settings); `gpu` wraps generating functions (Spaces). Its `launch` serves the
    OpenAI-compatible API too (AppBlocks)."""
    server = server or Server(config, registry=registry, jobs=jobs)
    registry = server.registry
    turns = TurnLog()  # each reply's Turn, for the feedback it may get
    handlers = Handlers(registry, StopSignals(), gpu or (lambda fn: fn), access=server.access,
                        slider_overrides=defaults, turns=turns)
    store = lambda: server.store  # noqa: E731 - opened on first use
    feedback = FeedbackPanel(turns, store, server.access)
    train = TrainTab(server.jobs, registry, server.access) if server.jobs is not None else None
    data = DataTab(store, server.access, registry, server.jobs)
    # Only in-process adapters have folders to export; a --backend-url client has none.
    export = ExportPanel(registry, server.access) if server.local else None
    # The serving alias (serve.promotion) lives in the local adapters folder; a --backend-url client has none.
    promote = PromotePanel(lambda: server.promotions, server.access, config.alias) if server.local and config.alias \
        else None
    # Evaluations run on the in-process models (a --backend-url client has none here).
    evaluate = EvalTab(lambda: server.evals, server.model_ids, server.model_in_use, server.newest_adapter,
                       config.base_model or EMBEDDED, server.access) if server.local else None
    # AppBlocks, a PolicedBlocks: its server forbids images from other origins (ui.inert).
    with AppBlocks(title="Chat assistant") as demo:
        with gr.Tabs(selected=CHAT_TAB, elem_id="tabs") as tabs:
            with gr.Tab("Chat", id=CHAT_TAB, elem_id="chat-tab"):
                ui = _layout(registry, handlers, export, feedback, promote)
            if train is not None:
                with gr.Tab("Train", id=TRAIN_TAB, elem_id="train-tab"):
                    train.layout()
            with gr.Tab("Data", id=DATA_TAB, elem_id="data-tab") as data_tab:
                data.layout()
            if evaluate is not None:
                with gr.Tab("Evaluate", id=EVAL_TAB, elem_id="eval-tab"):
                    evaluate.layout()
        _wire(demo, ui, handlers)
        feedback.wire(demo, ui.chatbot, ui.base, ui.compare)
        if export is not None:
            export.wire(ui.choice)
        if promote is not None:
            promote.wire(demo, ui.choice)
        if train is not None:
            train.wire(demo, tabs, CHAT_TAB, ui.choice, ui.compare, ui.chatbot, ui.base)
        data.wire(demo, data_tab, tabs, train, TRAIN_TAB)
        if evaluate is not None:
            evaluate.wire(demo)
        gr.api(handlers.api_chat, api_name="chat", api_description=Handlers.api_chat.__doc__)
    # Up to a batch of requests run at once (the runtime generates requests that arrive together in one
    # batch); the others wait in the queue, which shows their position, and beyond max_size are turned away.
    demo.queue(max_size=config.max_queue, default_concurrency_limit=MAX_BATCH)
    _poll_less(demo._queue)
    demo.service = server  # the models, jobs and access rule behind the screens; its API mounts at launch
    demo.registry = registry  # the caller may warm a model or inspect what is loaded
    demo.handlers = handlers  # the screen's event functions (tests drive them as the screen would)
    demo.jobs = server.jobs  # the fine-tuning jobs (None: no training here); the caller closes it on shutdown
    demo.export_panel = export  # None: no local adapters to export
    demo.promote_panel = promote  # None: no local aliases to move
    demo.feedback = feedback  # the chat's thumbs, corrections and compare-mode choices
    demo.data_tab = data  # the Data tab's event functions
    demo.eval_tab = evaluate  # the Evaluate tab's event functions (None: no local models)
    return demo


class _Widgets:
    """The app's components, handed from the layout to the wiring."""

    def __init__(self, **widgets):
        self.__dict__.update(widgets)

    def settings(self) -> list:
        """Inputs every generating event reads, in Settings.of order."""
        return [self.choice, self.compare, self.prompt, self.system, self.temperature, self.top_p, self.top_k,
                self.repetition_penalty, self.max_new_tokens, self.seed]


QUEUE_POLL_S = 0.01  # how often Gradio's queue looks for new work while it has none


def _poll_less(queue) -> None:
    """Gradio's queue looks for new work every 1 ms on Linux: ~8% of a core with no one connected, taken from
    decoding on a 2-core machine (a /chat reply of 128 tokens: 6.42 s, 5.78 s at 10 ms). A new message now
    waits at most QUEUE_POLL_S more to start; progress bars update every 50 ms instead of 10."""
    queue.sleep_when_free = QUEUE_POLL_S
    queue.progress_update_sleep_when_free = 5 * QUEUE_POLL_S


def _layout(registry: ModelRegistry, handlers: Handlers, export: ExportPanel | None = None,
            feedback: FeedbackPanel | None = None, promote: PromotePanel | None = None) -> _Widgets:
    choice = registry.default_choice()
    prompt_names, first_prompt = handlers.prompt_menu(choice)
    w: dict = {}
    gr.Markdown("## Chat assistant")
    w["status"] = gr.Markdown(status_text(registry, registry.default_choice()), elem_id="status")
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row(equal_height=True):
                w["chatbot"] = _chatbot("Assistant", "chatbot", visible=True, editable="user")
                w["base"] = _chatbot("Base model (adapter off)", "chatbot-base", visible=False, editable=None)
            with gr.Row():
                w["message"] = gr.Textbox(placeholder="Message (Enter to send)", show_label=False, lines=1,
                                          max_lines=8, scale=6, elem_id="message", autofocus=True)
                w["send_btn"] = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                w["stop_btn"] = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
            with gr.Row():
                w["retry_btn"] = gr.Button("Retry", size="sm", elem_id="retry")
                w["undo_btn"] = gr.Button("Undo", size="sm", elem_id="undo")
                w["clear_btn"] = gr.Button("Clear", size="sm", elem_id="clear")
            if feedback is not None:
                feedback.layout()
        with gr.Column(scale=1):
            w["choice"] = gr.Dropdown(registry.choices, value=registry.default_choice(), label="Adapter",
                                      elem_id="adapter")
            w["compare"] = gr.Checkbox(False, label="Compare with the base model (side by side)",
                                       elem_id="compare")
            if export is not None:
                export.layout()
            if promote is not None:
                promote.layout()
            w["prompt"] = gr.Dropdown(prompt_names, value=first_prompt, label="System prompt", elem_id="prompt")
            w["system"] = gr.Textbox(handlers.prompt_text(first_prompt, choice, ""), lines=4, max_lines=12,
                                     label="System prompt text", elem_id="system")
            w["prompt_note"] = gr.Markdown(visible=False, elem_id="prompt-note")
            # The sliders start from the settings the chosen model is served with (its generation_config.json).
            _sliders(w, handlers.slider_settings(choice))
    # A fixed key keeps the history across restarts too when $ASSISTANT_BROWSER_SECRET pins the secret.
    w["saved"] = gr.BrowserState(EMPTY_STORE, storage_key=STORAGE_KEY,
                                 secret=os.environ.get("ASSISTANT_BROWSER_SECRET"))
    return _Widgets(**w)


def _chatbot(label: str, elem_id: str, *, visible: bool, editable: str | None) -> gr.Chatbot:
    # sanitize_html drops scripts; SHOWN_AS_TEXT escapes raw HTML tags (an <img> or a Markdown image
    # included) so they show as typed, never as elements (ui.inert).
    # Thumbs up/down on every reply (their .like event stores them: ui.feedback_panel).
    return gr.Chatbot(label=label, elem_id=elem_id, visible=visible, height=480, editable=editable,
                      sanitize_html=True, allow_tags=SHOWN_AS_TEXT, render_markdown=True, buttons=["copy", "copy_all"],
                      feedback_options=("Like", "Dislike"))


def _sliders(w: dict, d: GenerationParams) -> None:
    with gr.Accordion("Generation settings", open=False):
        w["temperature"] = gr.Slider(0.0, 2.0, d.temperature, step=0.05, label="Temperature (0: greedy)")
        w["top_p"] = gr.Slider(0.05, 1.0, d.top_p, step=0.05, label="Top-p")
        w["top_k"] = gr.Slider(0, 200, d.top_k, step=1, label="Top-k (0: off)")
        w["repetition_penalty"] = gr.Slider(1.0, 2.0, d.repetition_penalty, step=0.05, label="Repetition penalty")
        w["max_new_tokens"] = gr.Slider(1, 2048, d.max_new_tokens, step=1, label="Max new tokens",
                                        elem_id="max-new-tokens")
        w["seed"] = gr.Number(-1 if d.seed is None else d.seed, precision=0, label="Seed (-1: random)")


def _wire(demo: gr.Blocks, w: _Widgets, h: Handlers) -> None:
    private = {"api_visibility": "private"}
    histories = [w.chatbot, w.base]
    streamed = [*histories, w.status]
    persist = {"fn": save, "inputs": histories, "outputs": [w.saved], "queue": False, **private}

    generating = [
        w.send_btn.click(h.send, [w.message, *histories, *w.settings()], [w.message, *streamed], **private),
        w.message.submit(h.send, [w.message, *histories, *w.settings()], [w.message, *streamed], **private),
        w.chatbot.retry(h.retry, [*histories, *w.settings()], streamed, **private),
        w.retry_btn.click(h.retry_last, [*histories, *w.settings()], streamed, **private),
        w.chatbot.edit(h.edit, [*histories, *w.settings()], streamed, **private),
    ]
    for event in generating:
        event.then(**persist)
    # Stop sets this session's cancel events (the model halts within a token) and drops queued work.
    w.stop_btn.click(h.stop, None, None, cancels=generating, queue=False, **private).then(**persist)

    w.chatbot.undo(h.undo, histories, [w.message, *histories], **private).then(**persist)
    w.undo_btn.click(h.undo_last, histories, [w.message, *histories], **private).then(**persist)
    for clear in (w.chatbot.clear, w.clear_btn.click):
        clear(lambda: ([], []), None, histories, queue=False, **private).then(**persist)

    w.choice.change(h.select_model, w.choice, w.status, show_progress="minimal", **private)
    # Adapters published while the app runs (the trainer, later fine-tuning jobs) are in the menu on the
    # next page load, and the menu starts on the default model of that moment (a promotion moves it); the
    # registry lists the folder again by itself.
    demo.load(lambda: gr.update(choices=h.registry.choices, value=h.registry.default_choice()), None, w.choice,
              queue=False, **private)
    w.compare.input(toggle_compare, [w.compare, w.choice, w.chatbot], w.base, queue=False, **private).then(**persist)
    # A new adapter brings the system prompt it was trained with; any other prompt shows a one-line note.
    w.choice.change(h.use_trained_prompt, [w.choice, w.prompt, w.system], [w.prompt, w.system], queue=False,
                    **private).then(h.prompt_note, [w.choice, w.system], w.prompt_note, queue=False, **private)
    w.choice.change(h.generation_sliders, w.choice,
                    [w.temperature, w.top_p, w.top_k, w.repetition_penalty, w.max_new_tokens], queue=False, **private)
    w.prompt.input(h.prompt_text, [w.prompt, w.choice, w.system], w.system, queue=False, **private)
    w.system.input(lambda: CUSTOM_PROMPT, None, w.prompt, queue=False, **private)
    w.system.change(h.prompt_note, [w.choice, w.system], w.prompt_note, queue=False, **private)
    demo.load(h.restore, [w.saved, w.choice], [w.chatbot, w.base, w.compare, w.status], queue=False, **private)
