"""The Data tab: the feedback people gave in the chat (and through the API), reviewed and made into training files.

Filter by rating, correction, adapter, date, user and review status; the counts show at a glance; a row opens
the conversation as text. Everyone sees and deletes their own records; an admin (--admins, the API key's
holder) sees everyone's and approves, rejects or edits a correction (serve.feedback holds these rules, the
API's too). Export writes SFT rows or preference rows (serve.feedback.export: personal data redacted unless
unticked) as a file to download; "Train on these" hands the approved SFT rows, redacted, to the dataset
doctor and, when it accepts them, to a fine-tuning job of the Train tab.
Every action follows the API's rule (ui.access.admit); everything shown from a record is plain text
(Textboxes and a string table), never Markdown or HTML.
"""

from __future__ import annotations

import atexit
import html
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import pandas as pd

from serve.access import LOCAL, AccessPolicy, Caller, request_caller
from serve.feedback import (
    ANY,
    CORRECTED_FILTERS,
    RATING_FILTERS,
    STATUS_FILTERS,
    Filters,
    NotAllowed,
    NothingToExport,
    RecordGone,
    conversation_text,
    correction_of,
    counts,
    counts_text,
    delete,
    edit_correction,
    export,
    find_feedback,
    find_preferences,
    get_record,
    set_status,
)
from serve.job_spec import JobSpecError, job_spec
from serve.jobs import JobRunner
from serve.registry import ModelRegistry
from serve.remote import RemoteRegistry
from serve.store import Feedback, Preference, Store, StoreError
from ui.access import admit
from ui.train_tab import DEFAULT_BUDGET_MINUTES, TrainTab

logger = logging.getLogger(__name__)

COLUMNS = ["id", "when", "user", "model", "rating", "corrected", "status", "question", "reply"]
SHOWN = ("Feedback", "Compare-mode preferences")
KINDS = [("SFT rows (corrections and liked replies)", "sft"),
         ("Preference rows (corrections, compare-mode choices)", "preference")]
EXPORT_STATUSES = [("Approved only", "approved"), ("All but rejected", "all")]
PREVIEW = 80  # characters of a question or a reply in the table
KEEP = 5  # export files kept on disk (older ones were copied into Gradio's cache when handed out)
CHOOSE_A_ROW = "Choose a record in the table first."
BASE = "base"  # the base model, as the menu and the API name it


class DataTab:
    """The tab's components and event functions over the server's store (and its job runner, for training)."""

    def __init__(self, store: Callable[[], Store], access: AccessPolicy | None,
                 registry: ModelRegistry | RemoteRegistry, runner: JobRunner | None = None):
        # access None only for in-process use, where no caller is remote (as the other tabs take it).
        self.store, self.access, self.registry, self.runner = store, access, registry, runner
        self._root: Path | None = None
        self._root_lock = threading.Lock()

    # -- layout --------------------------------------------------------------------------------------
    def layout(self) -> None:
        """The tab's components (call inside a gr.Tab)."""
        self.summary = gr.Textbox(label="At a glance", lines=2, interactive=False, elem_id="data-summary")
        with gr.Row():
            self.show = gr.Radio(list(SHOWN), value=SHOWN[0], label="Show", elem_id="data-show")
            self.rating = gr.Dropdown(list(RATING_FILTERS), value=ANY, label="Rating", elem_id="data-rating")
            self.corrected = gr.Dropdown(list(CORRECTED_FILTERS), value=ANY, label="Corrected",
                                         elem_id="data-corrected")
            self.status = gr.Dropdown(list(STATUS_FILTERS), value=ANY, label="Status", elem_id="data-status")
            self.adapter = gr.Dropdown(self.models(), value=ANY, label="Adapter", allow_custom_value=True,
                                       elem_id="data-adapter")
        with gr.Row():
            self.since = gr.DateTime(include_time=False, type="string", label="From (YYYY-MM-DD)",
                                     elem_id="data-since")
            self.until = gr.DateTime(include_time=False, type="string", label="To (YYYY-MM-DD)", elem_id="data-until")
            self.user = gr.Textbox(label="User (admins)", visible=False, elem_id="data-user")
            self.refresh_btn = gr.Button("Refresh", size="sm", elem_id="data-refresh")
        self.table = gr.Dataframe(_table([]), headers=COLUMNS, datatype="str", interactive=False, wrap=True,
                                  max_height=420, label="Records (newest first; choose one to read it)",
                                  elem_id="data-table")
        self.chosen = gr.State(None)  # the id of the record the page shows
        self.started = gr.State(None)  # the job "Train on these" started last (where there is no Train tab)
        with gr.Row():
            with gr.Column(scale=3):
                self.conversation = gr.Textbox(label="Conversation", lines=12, max_lines=40, interactive=False,
                                               elem_id="data-conversation")
            with gr.Column(scale=2):
                self.edit = gr.Textbox(label="Correction (an admin's edit is what the exports use)", lines=6,
                                       max_lines=20, interactive=False, elem_id="data-edit")
                with gr.Row():
                    self.approve_btn = gr.Button("Approve", variant="primary", size="sm", visible=False,
                                                 elem_id="data-approve")
                    self.reject_btn = gr.Button("Reject", size="sm", visible=False, elem_id="data-reject")
                    self.save_edit_btn = gr.Button("Save edit", size="sm", visible=False, elem_id="data-save-edit")
                    self.delete_btn = gr.Button("Delete", variant="stop", size="sm", elem_id="data-delete")
                self.note = gr.Textbox(label="Done", lines=1, interactive=False, elem_id="data-note")
        with gr.Accordion("Export and train", open=True, elem_id="data-export"):
            with gr.Row():
                self.kind = gr.Radio(KINDS, value="sft", label="Rows", elem_id="data-kind")
                self.export_status = gr.Radio(EXPORT_STATUSES, value="approved", label="Records",
                                              elem_id="data-export-status")
                self.redact = gr.Checkbox(True, label="Redact personal data (e-mail addresses, phone, card and "
                                                      "IBAN numbers, IP addresses; names are not detected)",
                                          elem_id="data-redact")
            with gr.Row():
                self.export_btn = gr.Button("Export", elem_id="data-export-run")
                self.start_from = gr.Dropdown(self.starts(), value=BASE, label="Train from (an adapter goes on "
                                              "learning from its weights; the base model starts afresh)",
                                              visible=self.runner is not None, elem_id="data-train-from")
                self.train_btn = gr.Button("Train on these (approved SFT rows, redacted)", variant="primary",
                                           visible=self.runner is not None, elem_id="data-train")
            self.export_result = gr.Textbox(label="Result", lines=3, max_lines=20, interactive=False,
                                            elem_id="data-export-result")
            self.file = gr.File(label="Download", interactive=False, elem_id="data-export-file")

    def wire(self, demo: gr.Blocks, tab: gr.Tab, tabs: gr.Tabs | None = None, train: TrainTab | None = None,
             train_tab: str | None = None) -> None:
        """Connect the tab's events; `tab` is its gr.Tab (opening it refreshes); with `tabs`, the TrainTab `train`
        and its tab's id `train_tab`, "Train on these" then shows the new job in the Train tab."""
        quick = {"api_visibility": "private"}
        filters = [self.show, self.rating, self.corrected, self.status, self.adapter, self.since, self.until,
                   self.user]
        listed = [self.summary, self.table]
        for event in (tab.select, self.refresh_btn.click, self.show.change, self.rating.change,
                      self.corrected.change, self.status.change, self.adapter.change, self.since.change,
                      self.until.change, self.user.submit):
            event(self.list, filters, listed, **quick)
        demo.load(self.roles, None, [self.approve_btn, self.reject_btn, self.save_edit_btn, self.edit, self.user],
                  **quick)
        demo.load(lambda: gr.update(choices=self.models()), None, self.adapter, queue=False, **quick)
        demo.load(lambda: gr.update(choices=self.starts()), None, self.start_from, queue=False, **quick)
        shown = [self.chosen, self.conversation, self.edit]
        self.table.select(self.open, self.table, shown, **quick)
        for button, action in ((self.approve_btn, self.approve), (self.reject_btn, self.reject),
                               (self.save_edit_btn, self.save_edit)):
            button.click(action, [self.chosen, self.edit], [self.note, *shown], **quick).success(
                self.list, filters, listed, **quick)
        self.delete_btn.click(self.remove, self.chosen, [self.note, *shown], **quick).success(
            self.list, filters, listed, **quick)
        self.export_btn.click(self.export, [self.kind, self.export_status, self.redact],
                              [self.export_result, self.file], concurrency_limit=1, **quick)
        if self.runner is not None:
            watch = train is not None and tabs is not None and train_tab is not None
            started = self.train_btn.click(self.train, self.start_from,
                                           [self.export_result, train.job_id if watch else self.started],
                                           concurrency_limit=1, **quick)
            if watch:
                started.success(lambda: gr.update(selected=train_tab), None, tabs, queue=False, **quick).then(
                    train.show, train.job_id, train.shown, queue=False, **quick)

    # -- who -----------------------------------------------------------------------------------------
    def caller(self, request: gr.Request | None) -> Caller:
        """Who this request is (the rule of the API); gr.Error when it may not act at all."""
        admit(self.access, request, "a Data tab action")
        return request_caller(self.access, request) if self.access is not None else Caller(LOCAL)

    def roles(self, request: gr.Request) -> tuple:
        """On page load: the review buttons, the correction edit and the user filter for admins only."""
        try:
            admin = self.caller(request).admin
        except gr.Error:
            admin = False
        shown = gr.update(visible=admin)
        return shown, shown, shown, gr.update(interactive=admin), shown

    def models(self) -> list[str]:
        """The adapter filter's choices: any, the base model, the menu's adapters."""
        return [ANY, *self.starts()]

    def starts(self) -> list[str]:
        """What "Train on these" may start from: the base model, or an adapter of the menu to go on training."""
        return [BASE, *self.registry.adapters]

    # -- listing -------------------------------------------------------------------------------------
    def list(self, show: str, rating: str, corrected: str, status: str, adapter: str | None, since: str | None,
             until: str | None, user: str | None, request: gr.Request) -> tuple[str, pd.DataFrame]:
        """The counts, and the records the filters keep (newest first)."""
        who = self.caller(request)
        filters = Filters(rating=rating or ANY, corrected=corrected or ANY, status=status or ANY,
                          adapter=None if adapter in (None, "", ANY) else adapter, since=since or None,
                          until=until or None, user=((user or "").strip() or None) if who.admin else None)
        try:
            found = self._store(lambda store: counts(store, who))
            if show == SHOWN[1]:
                rows = [_preference_row(p) for p in self._store(lambda store: find_preferences(store, who, filters))]
            else:
                rows = [_feedback_row(f) for f in self._store(lambda store: find_feedback(store, who, filters)).items]
        except ValueError as error:  # a filter's value
            raise _error(str(error)) from None
        scope = "everyone's records (admin)" if who.admin else "your records"
        return f"{who.name}: {scope}\n{counts_text(found)}", _table(rows)

    def open(self, table: pd.DataFrame, event: gr.SelectData, request: gr.Request) -> tuple:
        """A chosen row: its conversation as text, and its correction in the edit box."""
        who = self.caller(request)
        row = event.index[0] if isinstance(event.index, list | tuple) else event.index
        if table is None or not 0 <= int(row) < len(table) or not str(table.iloc[int(row), 0]).strip():
            return None, "", ""
        return self._shown(who, str(table.iloc[int(row), 0]))

    def _shown(self, who: Caller, record_id: str) -> tuple:
        record = self._store(lambda store: get_record(store, who, record_id))
        edit = (correction_of(record) or "") if isinstance(record, Feedback) else ""
        return record_id, conversation_text(record), edit

    # -- actions -------------------------------------------------------------------------------------
    def approve(self, record_id: str | None, edit: str, request: gr.Request) -> tuple:
        """Approve the chosen record (admins)."""
        return self._review(record_id, "approved", request)

    def reject(self, record_id: str | None, edit: str, request: gr.Request) -> tuple:
        """Reject the chosen record (admins): no export uses it."""
        return self._review(record_id, "rejected", request)

    def _review(self, record_id: str | None, status: str, request: gr.Request) -> tuple:
        who = self.caller(request)
        if not record_id:
            raise gr.Error(CHOOSE_A_ROW)
        self._store(lambda store: set_status(store, who, record_id, status))
        return (f"{record_id}: {status}", *self._shown(who, record_id))

    def save_edit(self, record_id: str | None, edit: str, request: gr.Request) -> tuple:
        """Save an admin's edit of the chosen record's correction (blank: back to the correction as given)."""
        who = self.caller(request)
        if not record_id:
            raise gr.Error(CHOOSE_A_ROW)
        try:
            self._store(lambda store: edit_correction(store, who, record_id, edit))
        except ValueError as error:
            raise _error(str(error)) from None
        return (f"{record_id}: correction saved", *self._shown(who, record_id))

    def remove(self, record_id: str | None, request: gr.Request) -> tuple:
        """Delete the chosen record (and the conversation the chat app stored for it)."""
        who = self.caller(request)
        if not record_id:
            raise gr.Error(CHOOSE_A_ROW)
        self._store(lambda store: delete(store, who, record_id))
        return f"{record_id}: deleted", None, "", ""

    def export(self, kind: str, status: str, redact: bool, request: gr.Request) -> tuple[str, str | None]:
        """Write the rows to a file to download: (what was written, the file or None)."""
        who = self.caller(request)
        if kind not in {value for _, value in KINDS} or status not in {value for _, value in EXPORT_STATUSES}:
            return "Choose the rows and the records to export.", None
        path = self._exports_root() / f"feedback-{kind}-{status}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        try:
            done = self._store(lambda store: export(store, who, kind, path, status=status, redact=bool(redact)))
        except (NothingToExport, ValueError, OSError) as error:
            return f"Nothing exported: {error}", None
        return done.summary().replace(str(path), path.name), str(path)

    def train(self, start: str | None, request: gr.Request) -> tuple:
        """Export the approved SFT rows (redacted), have the dataset doctor check them, then start a fine-tuning
        job on them from `start` (the base model, or an adapter it goes on training); the Train tab shows it."""
        who = self.caller(request)
        if self.runner is None:
            raise gr.Error("Fine-tuning is off on this server.")
        start = start or BASE
        if start not in self.starts():
            raise _error(f"Train from: {start!r} is not the base model nor an adapter of this app; choose one "
                         "from the list")
        name = f"feedback-sft-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        path = self._exports_root() / name
        try:
            done = self._store(lambda store: export(store, who, "sft", path, status="approved", redact=True))
        except (NothingToExport, ValueError, OSError) as error:
            raise _error(f"Nothing to train on: {error}") from None
        report = self.runner.doctor(path, start)
        if not report.ok:
            raise _error(f"The dataset doctor rejects the exported rows:\n{report.text(path, name)}")
        try:
            # The rows are redacted already; the job redacts too, so its report says what it found (nothing).
            spec = job_spec(suffix="feedback", time_budget_minutes=DEFAULT_BUDGET_MINUTES, redact=True)
            stored = self.runner.files.save(path.read_bytes(), name, "fine-tune")
            job = self.runner.create(stored.id, spec, model=start)
        except (OSError, ValueError, JobSpecError) as error:  # FileError and JobError are ValueErrors
            raise _error(str(error)) from error
        logger.info("fine-tuning job %s started from the Data tab on %d rows", job.id, done.rows)
        start_text = "the base model" if start == BASE else f"adapter {start}"
        text = (f"Started {job.id} on {done.rows} approved SFT rows ({name}, {done.privacy()}) from {start_text}; "
                f"the Train tab shows it (adapter {job.output_name} when it succeeds).")
        return text, job.id

    # -- helpers -------------------------------------------------------------------------------------
    def _store(self, work: Callable[[Store], object]):
        """`work(store)`, its refusals and failures as error toasts naming the fix."""
        try:
            return work(self.store())
        except StoreError as error:
            raise _error(f"The stored feedback is unavailable: {error}") from None
        except (NotAllowed, RecordGone) as error:
            raise _error(str(error)) from None

    def _exports_root(self) -> Path:
        """This app's folder of export files (made on first use, removed at exit), the oldest beyond KEEP gone."""
        with self._root_lock:
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix="chat-assistant-feedback-"))
                atexit.register(shutil.rmtree, self._root, ignore_errors=True)
            self._root.mkdir(parents=True, exist_ok=True)
            older = sorted((p for p in self._root.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime)
            for stale in older[: max(0, len(older) - KEEP + 1)]:
                stale.unlink(missing_ok=True)
            return self._root


def _preview(text: str) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= PREVIEW else text[: PREVIEW - 1] + "…"


def _question(messages: list[dict]) -> str:
    return next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")


def _when(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def _feedback_row(record: Feedback) -> list[str]:
    done = record.completion
    corrected = "edited" if record.edited_correction else ("yes" if record.correction else "")
    return [record.id, _when(record.created), record.owner, done.model, record.rating or "", corrected,
            record.status, _preview(_question(done.messages)),
            _preview(correction_of(record) or done.reply.get("content", ""))]


def _preference_row(record: Preference) -> list[str]:
    winner = {"left": record.left, "right": record.right}.get(record.better)
    return [record.id, _when(record.created), record.owner, f"{record.left.model} vs {record.right.model}",
            f"{record.better} better" if record.better != "tie" else "tie", "", record.status,
            _preview(_question(record.left.messages)), _preview(winner.reply.get("content", "") if winner else "")]


def _table(rows: list[list[str]]) -> pd.DataFrame:
    """The table's value: string columns always (an empty one too), so the page shows text, nothing else."""
    return pd.DataFrame(rows, columns=COLUMNS, dtype="str")


def _error(message: str) -> gr.Error:
    """An error toast; Gradio renders its message as HTML, and this one may quote a record."""
    return gr.Error(html.escape(message, quote=False))

