"""The chat web app: streaming chat with Stop/Retry/Undo/Edit/Clear, prompts, adapters and compare mode.

Layout and wiring live here; the event functions are in ui.handlers, the turn logic in ui.chat and
the per-browser Stop in ui.stopping. The chat is the "Chat" tab; a "Train" tab (ui.train_tab) fine-tunes
adapters beside it wherever the app runs fine-tuning jobs (not with --backend-url or --no-training), and
the chat's "Export this adapter" panel (ui.export_panel) zips the chosen adapter for Ollama, llama.cpp or
transformers wherever the adapters are local (not with --backend-url).
Histories are plain [{"role", "content"}] lists, kept in the browser's localStorage (gr.BrowserState)
so a reload keeps them and two browsers never share one.

The one public API endpoint, /chat, streams the growing reply text:

    from gradio_client import Client
    job = Client("http://127.0.0.1:7860/").submit("Hello!", api_name="/chat")
    for text in job:  # "Hi", "Hi there", ...; optional: history=[{"role", "content"}...],
        print(text)   # system_prompt="...", adapter="<menu name>", max_new_tokens=256, temperature=0.0

It follows the same access rule as /v1 (serve.access): keyless only from this machine, else
`Client(url, headers={"Authorization": "Bearer KEY"})`; with a login (--auth-file), Gradio asks for the login first
and a logged-in client (`auth=(user, password)`) needs no key.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from assistant.batching import MAX_BATCH
from assistant.generation import GenerationParams
from serve.registry import ModelRegistry
from ui.config import ChatConfig
from ui.export_panel import ExportPanel
from ui.handlers import EMPTY_STORE, Handlers, save, status_text, toggle_compare
from ui.inert import SHOWN_AS_TEXT, PolicedBlocks
from ui.prompts import CUSTOM_PROMPT
from ui.stopping import StopSignals
from ui.train_tab import TrainTab

if TYPE_CHECKING:
    from serve.jobs import JobRunner
    from serve.openai_api import OpenAIServer

logger = logging.getLogger(__name__)

STORAGE_KEY = "chat-assistant-history"
CHAT_TAB, TRAIN_TAB = "chat", "train"


def build_app(
    config: ChatConfig,
    *,
    defaults: GenerationParams | None = None,
    gpu: Callable[[Callable], Callable] | None = None,
    registry: ModelRegistry | None = None,
    jobs: JobRunner | None = None,
) -> gr.Blocks:
    """The Gradio app for `config`; `defaults` set the sliders, `gpu` wraps generating functions (Spaces),
    `jobs` runs the Train tab's fine-tuning jobs (default: job_runner(config))."""
    registry = registry or make_registry(config)
    jobs = jobs if jobs is not None else job_runner(config, registry)
    handlers = Handlers(registry, StopSignals(), gpu or (lambda fn: fn), access=config.access_policy())
    train = TrainTab(jobs, registry, config.access_policy()) if jobs is not None else None
    # Only in-process adapters have folders to export; a --backend-url client has none.
    export = ExportPanel(registry, config.access_policy()) if isinstance(registry, ModelRegistry) else None
    # PolicedBlocks: its server forbids images from other origins (ui.inert).
    with PolicedBlocks(title="Chat assistant") as demo:
        with gr.Tabs(selected=CHAT_TAB, elem_id="tabs") as tabs:
            with gr.Tab("Chat", id=CHAT_TAB, elem_id="chat-tab"):
                ui = _layout(registry, handlers, defaults or GenerationParams(), export)
            if train is not None:
                with gr.Tab("Train", id=TRAIN_TAB, elem_id="train-tab"):
                    train.layout()
        _wire(demo, ui, handlers)
        if export is not None:
            export.wire(ui.choice)
        if train is not None:
            train.wire(demo, tabs, CHAT_TAB, ui.choice, ui.compare, ui.chatbot, ui.base)
        gr.api(handlers.api_chat, api_name="chat", api_description=Handlers.api_chat.__doc__)
    # Up to a batch of requests run at once (the runtime generates requests that arrive together in one
    # batch); the others wait in the queue, which shows their position, and beyond max_size are turned away.
    demo.queue(max_size=config.max_queue, default_concurrency_limit=MAX_BATCH)
    demo.registry = registry  # the caller may warm a model or inspect what is loaded
    demo.jobs = jobs  # the fine-tuning jobs (None: no training here); the caller closes it on shutdown
    demo.export_panel = export  # None: no local adapters to export
    return demo


def job_runner(config: ChatConfig, registry=None, *, extra_args: list[str] | None = None) -> JobRunner | None:
    """The fine-tuning job runner over config's jobs and adapters folders, shared by the Train tab and
    /v1/fine_tuning; None with --backend-url (no models here), --no-training, or when another server
    runs the jobs of that folder. `extra_args` go to every train.sft run (e.g. faster probes in tests)."""
    if config.backend_url or config.no_training:
        return None
    from serve.files import FileStore
    from serve.jobs import JobError, JobRunner

    rescan = getattr(registry, "rescan", None)  # a published adapter is listed before the job reads succeeded
    root = Path(config.jobs_dir)
    try:
        runner = JobRunner(root, config.adapters_dir, FileStore(root / "files"), base_model=config.base_model,
                           extra_args=extra_args, on_published=(lambda name: rescan()) if rescan else None)
    except JobError as taken:  # another server runs the jobs of this folder
        logger.warning("fine-tuning is off: %s; start this app with its own --jobs-dir", taken)
        return None
    atexit.register(runner.close)  # a job still training is paused (resumable), not left running unseen
    return runner


def make_registry(config: ChatConfig):
    """In-process models, or the models of the remote server given by --backend-url."""
    if config.backend_url:
        from serve.remote import RemoteRegistry

        return RemoteRegistry(config.backend_url, config.backend_key())
    return ModelRegistry(config.adapters_dir, config.adapter, base_model=config.base_model, precision=config.precision)


def mount_openai_api(demo: gr.Blocks, config: ChatConfig) -> None:
    """Serve /v1/chat/completions, /v1/models and the fine-tuning API (/v1/files, /v1/fine_tuning) from the
    running app (in-process models only)."""
    if not isinstance(demo.registry, ModelRegistry):  # type: ignore[attr-defined]
        return
    demo.app.include_router(openai_server(demo, config).router)
    from serve.fine_tuning_api import FineTuningServer, training_off_router

    jobs = getattr(demo, "jobs", None)
    if jobs is None:
        reason = ("Fine-tuning is turned off on this server (it was started with --no-training); start it "
                  "without --no-training to train." if config.no_training else
                  f"Fine-tuning is unavailable on this server: another server process runs the jobs of "
                  f"{config.jobs_dir}; start this one with its own --jobs-dir.")
        demo.app.include_router(training_off_router(reason))
        return
    demo.app.include_router(FineTuningServer(
        jobs,
        config.access_policy(),
        session_user=lambda request: gradio_user(demo.app, request),
        max_body_bytes=config.max_request_kb * 1024,
        max_upload_bytes=int(config.max_upload_mb * 1024 * 1024),
    ).router)


def openai_server(demo: gr.Blocks, config: ChatConfig) -> OpenAIServer:
    """The OpenAI API over the launched `demo`'s models, under `config`'s access rule and body limit."""
    from serve.openai_api import OpenAIServer

    return OpenAIServer(
        demo.registry,  # type: ignore[attr-defined]
        config.access_policy(),
        max_body_bytes=config.max_request_kb * 1024,
        session_user=lambda request: gradio_user(demo.app, request),
    )


def gradio_user(app, request) -> str | None:
    """The user logged in to the Gradio app (--auth-file) on this request, as Gradio's own /user route finds
    it: the `access-token` cookie of this app, looked up in the app's tokens."""
    cookie_id = getattr(app, "cookie_id", None)
    if cookie_id is None:
        return None
    token = request.cookies.get(f"access-token-{cookie_id}") or request.cookies.get(
        f"access-token-unsecure-{cookie_id}"
    )
    return getattr(app, "tokens", {}).get(token) if token else None


class _Widgets:
    """The app's components, handed from the layout to the wiring."""

    def __init__(self, **widgets):
        self.__dict__.update(widgets)

    def settings(self) -> list:
        """Inputs every generating event reads, in Settings.of order."""
        return [self.choice, self.compare, self.system, self.temperature, self.top_p, self.top_k,
                self.repetition_penalty, self.max_new_tokens, self.seed]


def _layout(registry: ModelRegistry, handlers: Handlers, defaults: GenerationParams,
            export: ExportPanel | None = None) -> _Widgets:
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
        with gr.Column(scale=1):
            w["choice"] = gr.Dropdown(registry.choices, value=registry.default_choice(), label="Adapter",
                                      elem_id="adapter")
            w["compare"] = gr.Checkbox(False, label="Compare with the base model (side by side)",
                                       elem_id="compare")
            if export is not None:
                export.layout()
            w["prompt"] = gr.Dropdown(prompt_names, value=first_prompt, label="System prompt", elem_id="prompt")
            w["system"] = gr.Textbox(handlers.prompt_text(first_prompt, choice, ""), lines=4, max_lines=12,
                                     label="System prompt text", elem_id="system")
            w["prompt_note"] = gr.Markdown(visible=False, elem_id="prompt-note")
            _sliders(w, defaults)
    # A fixed key keeps the history across restarts too when $ASSISTANT_BROWSER_SECRET pins the secret.
    w["saved"] = gr.BrowserState(EMPTY_STORE, storage_key=STORAGE_KEY,
                                 secret=os.environ.get("ASSISTANT_BROWSER_SECRET"))
    return _Widgets(**w)


def _chatbot(label: str, elem_id: str, *, visible: bool, editable: str | None) -> gr.Chatbot:
    # sanitize_html drops scripts; SHOWN_AS_TEXT escapes raw HTML tags (an <img> or a Markdown image
    # included) so they show as typed, never as elements (ui.inert).
    return gr.Chatbot(label=label, elem_id=elem_id, visible=visible, height=480, editable=editable,
                      sanitize_html=True, allow_tags=SHOWN_AS_TEXT, render_markdown=True, buttons=["copy", "copy_all"],
                      feedback_options=None)


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
    # next page load; the registry lists the folder again by itself.
    demo.load(lambda: gr.update(choices=h.registry.choices), None, w.choice, queue=False, **private)
    w.compare.input(toggle_compare, [w.compare, w.choice, w.chatbot], w.base, queue=False, **private).then(**persist)
    # A new adapter brings the system prompt it was trained with; any other prompt shows a one-line note.
    w.choice.change(h.use_trained_prompt, [w.choice, w.prompt, w.system], [w.prompt, w.system], queue=False,
                    **private).then(h.prompt_note, [w.choice, w.system], w.prompt_note, queue=False, **private)
    w.prompt.input(h.prompt_text, [w.prompt, w.choice, w.system], w.system, queue=False, **private)
    w.system.input(lambda: CUSTOM_PROMPT, None, w.prompt, queue=False, **private)
    w.system.change(h.prompt_note, [w.choice, w.system], w.prompt_note, queue=False, **private)
    demo.load(h.restore, [w.saved, w.choice], [w.chatbot, w.base, w.compare, w.status], queue=False, **private)
