"""The Train tab: choose a dialogue file, read the dataset doctor's report, start a fine-tuning job, watch it.

Jobs run in serve.jobs.JobRunner (train.sft as a separate process, one at a time); the doctor's report comes
from serve (a `train.check` process); Start checks its settings with the job contract (serve.job_spec), as the
API does, so both refuse the same input with the same message. The tab only reads the jobs' files: a gr.Timer asks every TICK_S seconds and the page changes only when the job did. Everything
shown from a file, a job or the model (the doctor's example, errors, the log, probe replies) is plain text
in Textboxes, never HTML or Markdown.
Every action follows the API's rule (serve.access): a logged-in user, or a caller on this machine.
"""

from __future__ import annotations

import html
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr
import pandas as pd

from assistant.adapters import METHODS, training_report
from serve.access import AccessPolicy
from serve.job_spec import RULES, SUFFIX_MAX, JobSpec, JobSpecError, job_spec
from serve.jobs import ACTIVE, Job, JobError, JobRunner
from ui.access import admit

if TYPE_CHECKING:
    from serve.registry import ModelRegistry

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"  # the server's own dialogue files, offered beside the upload
DATA_SUFFIXES = (".jsonl", ".json", ".csv")
TICK_S = 2.0  # how often an open page looks at its job
DEFAULT_BUDGET_MINUTES = 5.0  # what the field starts at (blank: the job contract's default, no budget)
BAR_WIDTH = 24
SERIES_COLORS = {"train": "#2563eb", "eval": "#ea580c"}  # the loss plot's two lines
NO_JOB = "No fine-tuning job yet: choose a file above and press Start."


class TrainTab:
    """The tab's components and event functions over one JobRunner."""

    def __init__(self, runner: JobRunner, registry: ModelRegistry, access: AccessPolicy | None,
                 data_dir: str | Path = DATA_DIR):
        self.runner, self.registry, self.access = runner, registry, access
        self.data_dir = Path(data_dir)

    # -- layout --------------------------------------------------------------------------------------
    def layout(self) -> None:
        """The tab's components (call inside a gr.Tab)."""
        with gr.Row():
            with gr.Column(scale=2):
                self.upload = gr.File(label="Upload a dialogue file (.jsonl, .json, .csv)", type="filepath",
                                      file_types=list(DATA_SUFFIXES), elem_id="train-file")
                self.pick = gr.Dropdown(self.data_files(), value=None, elem_id="train-data",
                                        label="…or use a file of the server's data folder")
                self.report = gr.Textbox(label="Dataset doctor", lines=10, max_lines=30, interactive=False,
                                         placeholder="The report on the chosen file shows here.",
                                         elem_id="train-report")
            with gr.Column(scale=1):
                # The fields start at the job contract's defaults; its bounds are checked by Start (the API's
                # check and message), not by Gradio (which would refuse with words of its own).
                default = JobSpec.model_fields["method"].default
                self.method = gr.Radio(list(METHODS), value=default, label="Method", elem_id="train-method")
                self.budget = _number_field("time_budget_minutes", "Time budget, minutes", "train-budget",
                                            DEFAULT_BUDGET_MINUTES)
                self.redact = gr.Checkbox(JobSpec.model_fields["redact"].default, elem_id="train-redact",
                                          label="Redact personal data (e-mail, phone, card and IBAN numbers, IP "
                                                "addresses become [EMAIL_1]-style placeholders; names are not "
                                                "detected)")
                with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
                    self.epochs = _number_field("n_epochs", "Epochs", "train-epochs")
                    self.batch_size = _number_field("batch_size", "Batch size", "train-batch-size")
                    self.lr_multiplier = _number_field("learning_rate_multiplier", "Learning-rate multiplier",
                                                       "train-lr-multiplier")
                    self.max_steps = _number_field("max_steps", "Max steps", "train-max-steps")
                    self.system = gr.Textbox(label="System prompt of rows without one (blank: template's)",
                                             lines=2, elem_id="train-system")
                    self.seed = _number_field("seed", "Seed", "train-seed")
                    self.suffix = gr.Textbox(label="Name suffix of the adapter (letters, digits, - and _)",
                                             max_length=SUFFIX_MAX, elem_id="train-suffix")
                self.start_btn = gr.Button("Start", variant="primary", interactive=False,
                                           elem_id="train-start")
        self.progress = gr.Textbox(NO_JOB, label="Job", lines=3, max_lines=4, interactive=False,
                                   elem_id="train-progress")
        with gr.Row():
            self.stop_btn = gr.Button("Stop (keeps the last checkpoint)", variant="stop", interactive=False,
                                      elem_id="train-stop")
            self.resume_btn = gr.Button("Resume", interactive=False, elem_id="train-resume")
        self.plot = gr.LinePlot(_losses([]), x="step", y="loss", color="series", color_map=SERIES_COLORS,
                                label="Loss", x_title="step", y_title="loss", height=340,
                                elem_id="train-plot")
        self.result = gr.Textbox(label="Result", lines=8, max_lines=40, interactive=False,
                                 elem_id="train-result")
        self.chat_btn = gr.Button("Chat with it", variant="primary", visible=False, elem_id="train-chat")
        with gr.Accordion("Training log", open=False):
            self.log = gr.Textbox(show_label=False, lines=12, max_lines=12, interactive=False,
                                  elem_id="train-log")
        self.chosen = gr.State(None)  # {"path", "name", "ok"}: the file the report is about (server side)
        self.job_id = gr.State(None)  # the job this page shows
        self.seen = gr.State(None)  # what the page shows of it last, so an unchanged job changes nothing
        self.timer = gr.Timer(TICK_S)

    def wire(self, demo: gr.Blocks, tabs: gr.Tabs, chat_tab: str, choice: gr.Dropdown, compare: gr.Checkbox,
             chatbot: gr.Chatbot, base: gr.Chatbot) -> None:
        """Connect the tab's events; `tabs`, `chat_tab` and the chat's widgets are for "Chat with it"."""
        quick = {"api_visibility": "private", "queue": False}  # file reads only: no queue
        checked = [self.chosen, self.report, self.start_btn]
        self.upload.upload(self.choose_upload, self.upload, [*checked, self.pick], api_visibility="private")
        self.upload.clear(lambda: (None, "", gr.update(interactive=False)), None, checked, **quick)
        self.pick.input(self.choose_data_file, self.pick, [*checked, self.upload], api_visibility="private")
        # What show() and refresh() fill (the Data tab's "Train on these" shows its job with them too).
        self.shown = shown = [self.progress, self.plot, self.log, self.result, self.stop_btn, self.resume_btn,
                 self.chat_btn, self.seen, self.job_id]
        settings = [self.method, self.budget, self.epochs, self.batch_size, self.lr_multiplier,
                    self.max_steps, self.system, self.seed, self.suffix, self.redact]
        started = self.start_btn.click(self.start, [self.chosen, *settings], self.job_id,
                                       api_visibility="private")
        started.success(self.show, self.job_id, shown, **quick)
        for button, action in ((self.stop_btn, self.stop), (self.resume_btn, self.resume)):
            button.click(action, self.job_id, None, **quick).then(self.show, self.job_id, shown, **quick)
        # Cheap: the job's files are read, and nothing is sent to the page unless they changed.
        self.timer.tick(self.refresh, [self.job_id, self.seen], shown, show_progress="hidden", **quick)
        # A reload shows the job that runs (or waits), else the newest.
        demo.load(lambda: self.show(None), None, shown, **quick)
        demo.load(lambda: gr.update(choices=self.data_files()), None, self.pick, **quick)
        self.chat_tab = chat_tab
        self.chat_btn.click(self.chat_with, [self.job_id, chatbot], [tabs, choice, compare, base], **quick)

    # -- choosing the file ---------------------------------------------------------------------------
    def data_files(self) -> list[str]:
        """Names of the dialogue files in the server's data folder."""
        if not self.data_dir.is_dir():
            return []
        files = (p for p in self.data_dir.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        return sorted(p.name for p in files)

    def choose_upload(self, path: str | None, request: gr.Request) -> tuple:
        """An uploaded file: the doctor's report, and Start only when it can be trained on."""
        admit(self.access, request, "a Train tab action")
        if not path:
            return None, "", gr.update(interactive=False), gr.skip()
        return (*self._checked(Path(path), Path(path).name), None)

    def choose_data_file(self, name: str | None, request: gr.Request) -> tuple:
        """A file of the data folder: the doctor's report, and Start only when it can be trained on."""
        admit(self.access, request, "a Train tab action")
        if not name or name not in self.data_files():  # only names listed here, never a path from the page
            return None, "", gr.update(interactive=False), gr.skip()
        return (*self._checked(self.data_dir / name, name), None)

    def _checked(self, path: Path, name: str) -> tuple:
        ok, text = self.doctor(path, name)
        return {"path": str(path), "name": name, "ok": ok}, text, gr.update(interactive=ok)

    def doctor(self, path: Path, name: str) -> tuple[bool, str]:
        """(trainable, report): the dataset doctor's report on `path` (serve runs it), naming it `name`."""
        report = self.runner.doctor(path)
        return report.ok, report.text(path, name)

    # -- the job -------------------------------------------------------------------------------------
    def start(self, chosen: dict | None, method: str, budget: float | None, epochs: float | None,
              batch_size: float | None, lr_multiplier: float | None, max_steps: float | None, system: str,
              seed: float | None, suffix: str, redact: bool, request: gr.Request) -> str:
        """Check the settings (the job contract, as the API does), store the chosen file and create a job on it;
        returns the job's id."""
        admit(self.access, request, "a Train tab action")
        try:  # before anything is stored: the same check, and the same message, as the API's
            spec = job_spec(method=method, time_budget_minutes=budget, n_epochs=epochs, batch_size=batch_size,
                            learning_rate_multiplier=lr_multiplier, max_steps=max_steps, system_prompt=system,
                            seed=seed, suffix=suffix, redact=redact)
        except JobSpecError as error:
            raise _error(str(error)) from None
        if not chosen or not chosen.get("ok"):
            raise gr.Error("Choose a file the dataset doctor accepts first.")
        try:
            data = Path(chosen["path"]).read_bytes()
            stored = self.runner.files.save(data, chosen["name"], "fine-tune")
            job = self.runner.create(stored.id, spec)
        except (OSError, ValueError) as error:  # FileError and JobError are ValueErrors
            raise _error(str(error)) from error
        logger.info("fine-tuning job %s started from the Train tab on %s", job.id, chosen["name"])
        return job.id

    def stop(self, job_id: str | None, request: gr.Request) -> None:
        """Pause the job: the training process ends, its last checkpoint stays for Resume."""
        admit(self.access, request, "a Train tab action")
        self._act(self.runner.pause, job_id)

    def resume(self, job_id: str | None, request: gr.Request) -> None:
        """Put a paused job back in line; it continues from its last checkpoint."""
        admit(self.access, request, "a Train tab action")
        self._act(self.runner.resume, job_id)

    def _act(self, action, job_id: str | None) -> None:
        if not job_id:
            raise gr.Error("There is no job to act on.")
        try:
            action(job_id)
        except JobError as error:
            raise _error(str(error)) from error

    def current_job(self) -> str | None:
        """The job a freshly loaded page shows: the one running or waiting, else the newest."""
        jobs = self.runner.list()  # newest first
        shown = next((j for j in jobs if j.status in ACTIVE), jobs[0] if jobs else None)
        return shown.id if shown else None

    def show(self, job_id: str | None) -> tuple:
        """Everything about the job, whether or not it changed since the page last looked."""
        return self.refresh(job_id, None)

    def refresh(self, job_id: str | None, seen: list | None) -> tuple:
        """The job's progress line, loss plot, log tail, result and buttons, what the page has seen of it and
        its id (a page with none takes the current job: one started elsewhere shows up); all skipped when
        nothing changed."""
        job = self._job(job_id or self.current_job())
        if job is None:
            idle = (NO_JOB, _losses([]), "", "", gr.update(interactive=False), gr.update(interactive=False),
                    gr.update(visible=False))
            return (*idle, ["none"], None) if seen != ["none"] else (*[gr.skip()] * 7, seen, None)
        events = self.runner.events(job.id)
        log = self.runner.root / job.id / "train.log"
        signature = [job.id, job.status, len(events), log.stat().st_size if log.is_file() else 0]
        if signature == seen:
            return (*[gr.skip()] * 7, seen, job.id)
        succeeded = job.status == "succeeded"
        return (
            progress_text(job, events),
            _losses(events),
            self.runner.log_tail(job.id, 60),
            self.result_text(job),
            gr.update(interactive=job.status in ACTIVE),
            gr.update(interactive=job.status == "paused"),
            gr.update(visible=succeeded),
            signature,
            job.id,
        )

    def _job(self, job_id: str | None) -> Job | None:
        try:
            return self.runner.get(job_id) if job_id else None
        except JobError:  # its folder was removed
            return None

    def result_text(self, job: Job) -> str:
        """What the finished job gives: the report of its adapter, or why it did not finish."""
        if job.status == "failed":
            return f"Failed: {(job.error or {}).get('message', 'unknown error')}"
        if job.status == "cancelled":
            return "Cancelled."
        if job.status != "succeeded":
            return ""
        report = training_report(self.runner.adapters_dir / job.output_name)
        if not report:
            return f"Adapter {job.fine_tuned_model} is ready (its training report could not be read)."
        text = report_text(job.fine_tuned_model or job.output_name, report)
        try:  # probe rows name the stored copy of the file; the user knows it by its name
            stored = self.runner.files.path(job.training_file)
            return text.replace(str(stored), stored.name)
        except ValueError:  # the file was deleted since
            return text

    def chat_with(self, job_id: str | None, history: list) -> tuple:
        """Open the chat on the job's adapter, side by side with the base model."""
        from ui.handlers import toggle_compare

        job = self._job(job_id)
        if job is None or not job.fine_tuned_model:
            raise gr.Error("This job has no adapter to chat with.")
        name = job.fine_tuned_model
        deadline = time.monotonic() + 5.0  # the registry lists its folder again at most once a second
        while name not in (choices := self.registry.choices) and time.monotonic() < deadline:
            time.sleep(0.25)
        if name not in choices:
            raise _error(f"The adapter {name} is not in the adapter menu (see the log for why).")
        return (gr.update(selected=self.chat_tab), gr.update(choices=choices, value=name), True,
                toggle_compare(True, name, history))


def progress_text(job: Job, events: list[dict]) -> str:
    """Three lines: the job, a progress bar with step, rate and ETA, and the newest message."""
    head = f"{job.id} · {job.method} · {job.status}"
    head += f" · adapter {job.fine_tuned_model}" if job.fine_tuned_model else ""
    metrics = [e for e in events if e.get("event") == "metrics" and e.get("step") is not None]
    if metrics:
        last = metrics[-1]
        step, total = int(last["step"]), int(last.get("max_steps") or 0)
        share = min(1.0, step / total) if total > 0 else 0.0
        filled = round(share * BAR_WIDTH)
        bar = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {share:.0%}"
        parts = [f"step {step}/{total or '?'}", bar]
        if last.get("steps_per_s"):
            parts.append(f"{last['steps_per_s']:.2f} steps/s")
        if last.get("tokens_per_s"):
            parts.append(f"{last['tokens_per_s']:.0f} tokens/s")
        if last.get("eta_s") is not None and job.status == "running":
            parts.append(f"ETA {_duration(last['eta_s'])}")
        line = " · ".join(parts)
    else:
        line = "step 0/? (training has not started)" if job.status in ACTIVE else "no training steps logged"
    messages = [e for e in events if e.get("message") and e.get("event") in ("status", "phase", "error")]
    return "\n".join([head, line, messages[-1]["message"] if messages else ""])


def report_text(name: str, report: dict) -> str:
    """The adapter's training report as plain text: losses before and after, and the probe replies."""
    before, after = report.get("base_eval_loss"), report.get("eval_loss")
    lines = [
        f"Adapter {name} ({report.get('method', '?')}): {report.get('steps', '?')} steps, "
        f"{report.get('epochs', '?')} epochs, trained in {report.get('train_seconds', '?')} s "
        f"({report.get('wall_seconds', '?')} s in all), {report.get('tokens_per_second', '?')} tokens/s",
        f"Eval loss: {_loss(before)} before (base model) -> {_loss(after)} after"
        + (f" ({after - before:+.4f})" if isinstance(before, float) and isinstance(after, float) else ""),
        f"Eval perplexity after: {report.get('eval_perplexity')}; "
        f"final train loss: {_loss(report.get('train_loss'))}",
    ]
    probes = report.get("probes") or {}
    rows_before = (probes.get("before") or {}).get("rows") or []
    rows_after = (probes.get("after") or {}).get("rows") or []
    if rows_after:
        lines += ["", "Probe replies (validation rows, greedy), before -> after training:"]
    for old, new in zip(rows_before, rows_after, strict=False):
        lines += [
            f"[{new.get('source', '?')}] {new.get('prompt', '')}",
            f"  expected: {new.get('reference', '')}",
            f"  before:   {old.get('reply', '')}",
            f"  after:    {new.get('reply', '')}",
        ]
    return "\n".join(lines)


def _losses(events: list[dict]) -> pd.DataFrame:
    """Train and eval loss by step from the metrics events (a resumed step counts once, its newest value)."""
    points: dict[tuple[str, int], float] = {}
    for event in events:
        if event.get("event") != "metrics" or event.get("step") is None:
            continue
        for series in ("train", "eval"):
            value = event.get(f"{series}_loss")
            if isinstance(value, int | float) and math.isfinite(value):
                points[(series, int(event["step"]))] = float(value)
    ordered = sorted(points.items(), key=lambda point: (point[0][1], point[0][0]))
    # The page builds the chart from the value it has when it first draws (the axis types, the colour of
    # each series) and later only swaps the data: so the columns are typed even when empty, and both series
    # are always there, as a first row without a loss (not drawn) if they have no point yet.
    ordered = [((series, 0), math.nan) for series in SERIES_COLORS] + ordered
    return pd.DataFrame({
        "step": pd.Series([step for (_, step), _ in ordered], dtype="int64"),
        "loss": pd.Series([loss for _, loss in ordered], dtype="float64"),
        "series": pd.Series([series for (series, _), _ in ordered], dtype="str"),
    })


def _error(message: str) -> gr.Error:
    """An error toast; Gradio renders its message as HTML, and this one may quote a file name or a job (quotes
    need no escaping in text, so a message reads as the API's)."""
    return gr.Error(html.escape(message, quote=False))


def _number_field(name: str, label: str, elem_id: str, value: float | None = None) -> gr.Number:
    """A number field for the job setting `name`: it starts at the contract's default (or `value`) and says the
    default and the bounds."""
    rule = RULES[name]
    label += "" if rule.zero else f" (default {rule.default:g})"  # what 0 means is in the bounds' words
    return gr.Number(rule.default if value is None else value, label=label, info=rule.describe(), elem_id=elem_id)


def _loss(value) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
