"""Fine-tuning jobs: `train.sft` run as a separate process, one at a time, each job with its own folder.

`<root>/<job id>/` holds `job.json` (the job, as OpenAI's fine-tuning job object plus what resuming
needs), `events.jsonl` (the runner's status messages), `train_events.jsonl` (train.sft's
`--events-file`: phases, metrics with rate and ETA, checkpoints) and `train.log` (its output).
Training never runs inside the serving process, so the app stays responsive; the adapter is
published into the adapters folder, where the app's registry finds it without a restart.

A job's settings are a serve.job_spec.JobSpec (checked before the job exists). A new job is checked by the
dataset doctor (serve.doctor: `python -m train.check`) at once, even while another job trains: bad data fails
the job with the doctor's file/line/field messages and never starts training. Every path handed to a process
is absolute (the server may run from any folder), and the system prompt, text a user typed, reaches the
doctor and the trainer only as `--system-prompt @<job folder>/system_prompt.txt` (never as an argument they
would read as "@PATH").
Jobs survive the server: a job that was running when the server (or its training process) died is
`paused` on the next start, and `resume` continues it from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from assistant.adapters import find_adapters, read_folder, training_report
from assistant.embedded import EMBEDDED
from serve.doctor import DoctorReport, diagnose
from serve.files import FileError, FileStore
from serve.job_spec import JobSpec, job_spec
from serve.processes import ROOT, env, model_arg

logger = logging.getLogger(__name__)

JOB = "job.json"
EVENTS = "events.jsonl"
TRAIN_EVENTS = "train_events.jsonl"
LOG = "train.log"
PROMPT = "system_prompt.txt"  # the job's system prompt, as the file the doctor and the trainer read
ACTIVE = ("validating_files", "queued", "running")  # OpenAI's statuses; plus succeeded, failed, cancelled, paused
POLL_S = 0.5  # how often a running job's process is checked (cancel, pause, exit)


class JobError(ValueError):
    """A request about jobs that cannot be done; `status` is the HTTP status, `param` the field at fault."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass
class Job:
    """One fine-tuning job: what it trains, and where it stands."""

    id: str
    created_at: int
    training_file: str
    model: str = "base"  # "base" (the app's base model), a base model name, or an adapter of the app's to go on from
    validation_file: str | None = None
    suffix: str | None = None
    # The JobSpec's settings (None in a job of an older version: train.sft's default).
    seed: int = 42
    n_epochs: float | None = None
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None  # times the method's default learning rate
    method: str = "lora"
    time_budget_minutes: float = 0.0  # 0: none
    max_steps: int | None = None  # 0 or None: no cap
    system_prompt: str | None = None
    redact: bool = False  # train.sft --redact
    training: str = "supervised"  # OpenAI's method.type: "supervised" (train.sft) or "dpo" (train.dpo)
    beta: float | None = None  # DPO's beta (train.dpo --beta)
    status: str = "validating_files"
    error: dict | None = None  # {"code", "message", "param"}
    fine_tuned_model: str | None = None  # the adapter's name in the app once it succeeded
    output_name: str = ""  # the adapter folder's name in the adapters directory
    finished_at: int | None = None
    trained_tokens: int | None = None
    pid: int | None = None  # the training process while it runs
    resume: bool = False  # the next run continues from the last checkpoint
    stop_as: str | None = None  # "cancelled" or "paused": why the running process is being stopped

    def to_openai(self) -> dict:
        """OpenAI's fine_tuning.job object (our extras under "adapter")."""
        return {
            "object": "fine_tuning.job",
            "id": self.id,
            "created_at": self.created_at,
            "model": self.model,
            "fine_tuned_model": self.fine_tuned_model,
            "finished_at": self.finished_at,
            "status": self.status,
            "error": self.error,
            "training_file": self.training_file,
            "validation_file": self.validation_file,
            "hyperparameters": _openai_hyperparameters(self),
            "method": self.method_object(),
            "adapter": {"type": self.method, "time_budget_minutes": self.time_budget_minutes,
                        "max_steps": self.max_steps or None},
            "suffix": self.suffix,
            "seed": self.seed,
            "trained_tokens": self.trained_tokens,
            "result_files": [],
            "organization_id": "local",
            "estimated_finish": None,
            "integrations": [],
        }

    def method_object(self) -> dict:
        """OpenAI's `method`: {"type": "supervised" | "dpo", <type>: {"hyperparameters": {...}}}."""
        hyper = _openai_hyperparameters(self)
        if self.training == "dpo":
            hyper["beta"] = self.beta if self.beta is not None else "auto"
        return {"type": self.training, self.training: {"hyperparameters": hyper}}


def _openai_hyperparameters(job: Job) -> dict:
    """The job's hyperparameters as OpenAI writes them ("auto" for a default)."""
    return {
        "n_epochs": job.n_epochs if job.n_epochs is not None else "auto",
        "batch_size": job.batch_size if job.batch_size is not None else "auto",
        "learning_rate_multiplier": job.learning_rate_multiplier or "auto",
    }


def read_lines(path: Path) -> list[dict]:
    """The JSON lines of a file (a torn last line, from a kill mid-write, is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class JobRunner:
    """Creates, validates, runs, stops and resumes fine-tuning jobs; one trains at a time, oldest first."""

    def __init__(
        self,
        root: str | Path,
        adapters_dir: str | Path,
        files: FileStore,
        *,
        base_model: str | None = None,
        extra_args: list[str] | None = None,
        on_published: Callable[[str], None] | None = None,
        start: bool = True,
    ):
        # Absolute: the processes run from the repository, the server from wherever it was started.
        self.root, self.adapters_dir, self.files = Path(root).absolute(), Path(adapters_dir).absolute(), files
        self.base_model = base_model  # the app's --base-model: what "base" means
        self.extra_args = list(extra_args or [])  # e.g. faster probes in tests
        self.on_published = on_published  # told the adapter's name when a job succeeds
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        self.closed = False
        self.root.mkdir(parents=True, exist_ok=True)
        _claim(self.root.resolve(), self)  # before _recover: it pauses (and stops) what looks running
        self._recover()
        self.thread = threading.Thread(target=self._loop, name="fine-tuning-jobs", daemon=True)
        if start:
            self.thread.start()

    # -- requests ------------------------------------------------------------------------------------
    def create(self, training_file: str, spec: JobSpec | None = None, *, model: str = "base",
               validation_file: str | None = None, **settings) -> Job:
        """A new job training `spec` (Python callers may give its settings instead: job_spec(**settings) checks
        them); the doctor checks its data at once, then it waits for its turn."""
        if spec is not None and settings:
            raise TypeError("give a JobSpec or its settings, not both")
        spec = spec if spec is not None else job_spec(**settings)  # JobSpecError: a ValueError with `param`
        for param, file_id in (("training_file", training_file), ("validation_file", validation_file)):
            if file_id is not None:
                try:
                    self.files.get(file_id)
                except FileError as error:
                    raise JobError(str(error), 400, param, "invalid_file") from None
        job_id = f"ftjob-{uuid.uuid4().hex[:24]}"
        name = f"ft-{_slug(spec.suffix) if spec.suffix else 'assistant'}-{job_id[-6:]}"
        job = Job(job_id, int(time.time()), training_file, model=model, validation_file=validation_file,
                  output_name=name, **spec.model_dump())
        (self.root / job.id).mkdir(parents=True)
        self._prompt_file(job)
        self._save(job)
        self._event(job, f"Created fine-tuning job {job.id}")
        threading.Thread(target=self._validate, args=(job.id,), name=f"validate-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job:
        """The job, or JobError 404."""
        path = self.root / job_id / JOB
        if not re.fullmatch(r"ftjob-[0-9a-f]{24}", job_id or "") or not path.is_file():
            raise JobError(f"No such fine-tuning job: {job_id}", 404, "fine_tuning_job_id", "job_not_found")
        with self.lock:
            return Job(**json.loads(path.read_text()))

    def list(self) -> list[Job]:
        """Every job, newest first."""
        ids = [p.name for p in self.root.iterdir() if (p / JOB).is_file()] if self.root.is_dir() else []
        return sorted((self.get(i) for i in ids), key=lambda j: (j.created_at, j.id), reverse=True)

    def cancel(self, job_id: str) -> Job:
        """Cancel a job that has not finished (its checkpoints stay; nothing is published)."""
        return self._stop(job_id, "cancelled", allowed=(*ACTIVE, "paused"))

    def pause(self, job_id: str) -> Job:
        """Stop a running or waiting job so that `resume` continues it from its last checkpoint."""
        return self._stop(job_id, "paused", allowed=ACTIVE)

    def resume(self, job_id: str) -> Job:
        """Put a paused job back in line; it continues from its last checkpoint."""
        with self.lock:
            job = self.get(job_id)
            if job.status != "paused":
                raise JobError(f"job {job_id} is {job.status}; only a paused job can be resumed", 400, None,
                               "invalid_job_status")
            job.status, job.resume, job.error = "queued", True, None
            self._save(job)
            self._event(job, "Resumed: the job continues from its last checkpoint when its turn comes")
            self.wake.notify_all()
            return job

    def events(self, job_id: str) -> list[dict]:
        """The runner's messages and the trainer's events, oldest first."""
        self.get(job_id)
        folder = self.root / job_id
        merged = [{**e, "source": "runner"} for e in read_lines(folder / EVENTS)]
        merged += [{**e, "source": "train"} for e in read_lines(folder / TRAIN_EVENTS)]
        return sorted(merged, key=lambda e: e.get("time", 0))

    def checkpoints(self, job_id: str) -> list[dict]:
        """The checkpoints the trainer completed, newest first (those still on disk)."""
        marks = [e for e in read_lines(self.root / job_id / TRAIN_EVENTS) if e.get("event") == "checkpoint"]
        return sorted((m for m in marks if Path(m["path"]).exists()), key=lambda m: m["step"], reverse=True)

    def doctor(self, path: str | Path, model: str = "base") -> DoctorReport:
        """The dataset doctor's report on a file, for the base model `model` trains ("base": the app's)."""
        return diagnose(path, self.base_for(model))

    def log_tail(self, job_id: str, lines: int = 40) -> str:
        """The last lines of the training process's output."""
        path = self.root / job_id / LOG
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def close(self, timeout: float = 10.0) -> None:
        """Stop the runner; a job still training is paused (resumable) rather than left running unseen."""
        with self.lock:
            self.closed = True
            running = [j for j in self.list() if j.status == "running"]
            for job in running:
                self._stop(job.id, "paused", allowed=("running",))
            self.wake.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # -- the work ------------------------------------------------------------------------------------
    def _validate(self, job_id: str) -> None:
        job = self.get(job_id)
        files = [("training_file", job.training_file)] + ([("validation_file", job.validation_file)]
                                                           if job.validation_file else [])
        summary: list[str] = []
        for param, file_id in files:  # the validation file too: a bad one would only fail after training
            what = param.replace("_", " ")
            self._event(job, f"Validating the {what}")
            report = diagnose(self.files.path(file_id), self.base_for(job.model), self._prompt_file(job),
                              kind="preference" if job.training == "dpo" else "sft")
            with self.lock:
                job = self.get(job_id)
                if job.status != "validating_files":  # cancelled meanwhile
                    return
                if not report.ok:
                    message = "; ".join(report.problems()) or "the dataset doctor failed"
                    job.status, job.finished_at = "failed", int(time.time())
                    job.error = {"code": f"invalid_{param}", "message": message, "param": param}
                    self._save(job)
                    self._event(job, f"{what.capitalize()} is invalid: {message}", level="error")
                    return
            if not summary:
                summary = report.summary()
        with self.lock:
            job = self.get(job_id)
            if job.status != "validating_files":
                return
            job.status = "queued"
            self._save(job)
            self._event(job, "Training file is valid: " + " · ".join(summary))
            self.wake.notify_all()

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.closed and not (queued := [j for j in self.list() if j.status == "queued"]):
                    self.wake.wait(timeout=5.0)
                if self.closed:
                    return
                job = min(queued, key=lambda j: (j.created_at, j.id))
            try:
                self._train(job)
            except Exception as error:  # the runner must go on with the next job
                logger.exception("fine-tuning job %s failed to run", job.id)
                self._finish(job.id, "failed", {"code": "runner_error", "message": str(error), "param": None})

    def train_command(self, job: Job) -> list[str]:
        """train.sft's (train.dpo's for a DPO job) command line for `job`: every path absolute, the system prompt as
        the job's file."""
        folder = self.root / job.id
        dpo = job.training == "dpo"
        command = [
            sys.executable, "-m", "train.dpo" if dpo else "train.sft", str(self.files.path(job.training_file).absolute()),
            "--output-dir", str(self.adapters_dir / job.output_name),
            "--events-file", str(folder / TRAIN_EVENTS),
            "--method", job.method, "--seed", str(job.seed), "--base-model", self.base_for(job.model),
        ]
        command += ["--beta", str(job.beta)] if dpo and job.beta is not None else []
        if job.validation_file:
            command += ["--valid-file", str(self.files.path(job.validation_file).absolute())]
        parent = self.adapter_for(job.model)
        if parent is not None:  # fine-tuning a fine-tuned model: training goes on from its weights
            command += ["--from-adapter", str(parent.absolute())]
        prompt = self._prompt_file(job)
        options = {"--epochs": job.n_epochs, "--batch-size": job.batch_size, "--max-steps": job.max_steps or None,
                   "--time-budget": job.time_budget_minutes or None,
                   "--learning-rate-multiplier": job.learning_rate_multiplier,
                   "--system-prompt": f"@{prompt}" if prompt else None}
        command += [str(a) for flag, value in options.items() if value is not None for a in (flag, value)]
        command += ["--redact"] if job.redact else []
        command += ["--resume"] if job.resume else []
        return command + self.extra_args

    def _train(self, job: Job) -> None:
        folder = self.root / job.id
        command = self.train_command(job)
        with self.lock:
            job = self.get(job.id)
            if job.status != "queued":
                return
            with (folder / LOG).open("a") as log:
                process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env(),
                                           start_new_session=True)  # its own group: a stop ends all of it
            job.status, job.pid = "running", process.pid
            self._save(job)
            self._event(job, "Fine-tuning job started" + (" (resumed from its last checkpoint)" if job.resume else ""))
        while process.poll() is None:
            time.sleep(POLL_S)
        with self.lock:
            job = self.get(job.id)
            job.pid = None
            if job.stop_as:
                self._finish(job.id, job.stop_as, None, job)
            elif process.returncode < 0:  # killed by a signal nobody here sent (OOM killer, kill -9)
                self._finish(job.id, "paused", None, job)
                self._event(job, f"Interrupted: the training process was killed (signal {-process.returncode})",
                            level="warn")
            elif process.returncode == 0:
                tokens = training_report(self.adapters_dir / job.output_name).get("data", {}).get("train", {}).get("tokens")
                job.fine_tuned_model, job.trained_tokens = job.output_name, tokens
                self._finish(job.id, "succeeded", None, job)
                if self.on_published:
                    self.on_published(job.output_name)
            else:
                self._finish(job.id, "failed", {"code": "training_failed", "param": None,
                                                "message": self._failure(job.id, process.returncode)}, job)

    def _finish(self, job_id: str, status: str, error: dict | None, job: Job | None = None) -> None:
        with self.lock:
            job = job or self.get(job_id)
            job.status, job.error, job.stop_as, job.pid = status, error, None, None
            job.finished_at = int(time.time()) if status != "paused" else None
            job.resume = status == "paused"
            self._save(job)
            message = {
                "succeeded": f"The job has successfully completed: model {job.fine_tuned_model} is ready to chat",
                "failed": f"The job failed: {error and error['message']}",
                "cancelled": "The job was cancelled",
                "paused": "The job was paused; resume it to continue from its last checkpoint",
            }[status]
            self._event(job, message, level="error" if status == "failed" else "info")

    def _stop(self, job_id: str, status: str, allowed: tuple[str, ...]) -> Job:
        with self.lock:
            job = self.get(job_id)
            if job.status not in allowed:
                raise JobError(f"job {job_id} is {job.status}: it cannot be {status}", 400, None, "invalid_job_status")
            if job.status == "running" and job.pid:
                job.stop_as = status
                self._save(job)
                _terminate(job.pid)  # the job loop sees the exit and records the status
                self._event(job, f"Stopping the training process ({status})")
            else:
                self._finish(job.id, status, None, job)
            return self.get(job_id)

    def _recover(self) -> None:
        """After a restart: a job that was running is paused (resumable), one being validated is validated again."""
        for job in self.list():
            if job.status == "running":
                if job.pid:
                    _terminate(job.pid)  # a training process that outlived its server: nobody watches it now
                job.stop_as = None
                self._save(job)
                self._finish(job.id, "paused", None, job)
                self._event(job, "Interrupted: the server stopped while the job ran", level="warn")
            elif job.status == "validating_files":
                threading.Thread(target=self._validate, args=(job.id,), daemon=True).start()

    # -- helpers -------------------------------------------------------------------------------------
    def base_for(self, model: str) -> str:
        """The base model a job's `model` names ("base": the app's --base-model, else the embedded one; an adapter
        of the app's: the base it was trained on); a local folder as an absolute path (the processes run from the
        repository, not from the server's folder)."""
        parent = self.adapter_for(model)
        if parent is not None:
            return model_arg(read_folder(parent).base or EMBEDDED)
        return model_arg((self.base_model or EMBEDDED) if model == "base" else model)

    def adapter_for(self, model: str) -> Path | None:
        """The folder of the adapter a job's `model` names when it is one of the app's adapters (LoRA, DoRA or
        prefix: a job on it goes on training it, as OpenAI fine-tunes a fine-tuned model); None otherwise."""
        folder = find_adapters(self.adapters_dir).get(model) if model != "base" else None
        return folder if folder is not None and read_folder(folder).method is not None else None

    def _prompt_file(self, job: Job) -> Path | None:
        """The job's system prompt as a file of its own folder (written when missing); None when it has none."""
        if not job.system_prompt:
            return None
        path = self.root / job.id / PROMPT
        if not path.is_file() or path.read_text(encoding="utf-8") != job.system_prompt:
            path.write_text(job.system_prompt, encoding="utf-8")
        return path

    def _failure(self, job_id: str, code: int) -> str:
        errors = [e["message"] for e in read_lines(self.root / job_id / TRAIN_EVENTS) if e.get("event") == "error"]
        if errors:
            return errors[-1]
        tail = [line for line in self.log_tail(job_id, 200).splitlines() if line.startswith("error:")]
        return tail[-1].removeprefix("error: ") if tail else f"train.sft exited with code {code}; see its log"

    def _save(self, job: Job) -> None:
        path = self.root / job.id / JOB
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(asdict(job), indent=2, ensure_ascii=False) + "\n")
        partial.replace(path)  # never a half-written job.json, even on a kill

    def _event(self, job: Job, message: str, level: str = "info") -> None:
        line = {"event": "status", "time": round(time.time(), 3), "level": level, "status": job.status,
                "message": message}
        with (self.root / job.id / EVENTS).open("a", encoding="utf-8") as out:
            out.write(json.dumps(line, ensure_ascii=False) + "\n")


# Jobs folders this process runs: folder -> (its locked .runner.lock, the runner). The lock is held until the
# process exits: a second server on the same folder would pause ("recover") and kill the first one's jobs.
_CLAIMED: dict[Path, tuple[int | None, JobRunner]] = {}


def _claim(root: Path, runner: JobRunner) -> None:
    """Make `runner` the one runner of `root` in this machine's processes; JobError when another one is."""
    held = _CLAIMED.get(root)
    if held:
        if not held[1].closed:
            raise JobError(f"another app of this process runs the jobs of {root}", 409, None, "jobs_dir_taken")
        _CLAIMED[root] = (held[0], runner)  # the lock file stays held by this process
        return
    fd: int | None = os.open(root / ".runner.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no flock (Windows): one server per folder is then up to the user
        pass
    except OSError:
        os.close(fd)
        raise JobError(f"another server process runs the jobs of {root}", 409, None, "jobs_dir_taken") from None
    _CLAIMED[root] = (fd, runner)


def _terminate(pid: int) -> None:
    """End a training process and its children (its own process group); nothing if it is gone."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40] or "assistant"
