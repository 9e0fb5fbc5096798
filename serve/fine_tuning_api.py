"""OpenAI-compatible fine-tuning API (`/v1/files`, `/v1/fine_tuning/jobs`), served beside `/v1/chat/completions`.

The shapes are OpenAI's, so the `openai` SDK drives it unchanged:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="KEY or anything on this machine")
    file = client.files.create(file=open("data.jsonl", "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="base", training_file=file.id,
                                         extra_body={"adapter": {"type": "lora", "max_steps": 60}})

`model` is "base" (the app's base model), a base model name as train.sft's --base-model takes it, or one of the
app's adapters (a fine_tuned_model): the job goes on training that adapter (train.sft --from-adapter) into a new one.
Our own options go in an `adapter` object (OpenAI has no field for them):
`type` "lora" | "prefix", `time_budget_minutes` (0: none), `max_steps` (0: none), `system_prompt` (for rows
without one; text only), `redact` (true: e-mail addresses, phone, card and IBAN numbers and IP addresses become
[EMAIL_1]-style placeholders before training, train.sft --redact). `hyperparameters` (or `method.supervised.hyperparameters`): `n_epochs`, `batch_size`,
`learning_rate_multiplier` (times the method's default learning rate), each a number or "auto".
Their bounds and defaults are the job contract's (serve.job_spec), which the Train tab checks too.

Jobs run in serve.jobs.JobRunner: train.sft as a separate process, one at a time, the dataset doctor first.
A succeeded job's `fine_tuned_model` is an adapter name that `/v1/chat/completions` takes as `model` at once.
Who may call: serve.access's rule, as for the rest of /v1 (training costs minutes of CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException, MultiPartParser

from serve.access import AccessPolicy
from serve.files import FileError
from serve.http import APIError, Gate, api_router, limited_stream, read_body
from serve.job_spec import HYPERPARAMETERS, PARAMS, TRAINING, JobSpec, JobSpecError, job_spec
from serve.jobs import ACTIVE, Job, JobError, JobRunner
from serve.openai_api import MAX_BODY_BYTES
from serve.openai_schema import describe

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # default upload limit (ChatConfig.max_upload_mb)
PAGE_LIMITS = {"jobs": (20, 100), "events": (20, 100), "checkpoints": (10, 100), "files": (10_000, 10_000)}
NEEDS_FILES = (*ACTIVE, "paused")  # jobs that still read their files (a paused one reads them on resume)


# -- request bodies --------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Hyperparameters(_Strict):
    """OpenAI's supervised hyperparameters, as given: serve.job_spec checks them ("auto": the default)."""

    n_epochs: Any = None
    batch_size: Any = None
    learning_rate_multiplier: Any = None


class Supervised(_Strict):
    """`method.supervised`."""

    hyperparameters: Hyperparameters | None = None


class DPOHyperparameters(Hyperparameters):
    """OpenAI's DPO hyperparameters: the supervised ones and `beta`."""

    beta: Any = None


class DPO(_Strict):
    """`method.dpo`."""

    hyperparameters: DPOHyperparameters | None = None


class Method(_Strict):
    """`method`: supervised fine-tuning (train.sft) or preference tuning (train.dpo)."""

    type: str = "supervised"
    supervised: Supervised | None = None
    dpo: DPO | None = None

    @field_validator("type")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in TRAINING:
            raise PydanticCustomError("unsupported", "only {kinds} fine-tuning is supported here, not {kind}",
                                      {"kinds": " or ".join(map(repr, TRAINING)), "kind": repr(value)})
        return value

    def hyperparameters(self) -> tuple[Hyperparameters | None, str]:
        """The hyperparameters under `method.<type>`, and where they sit."""
        inner = getattr(self, self.type)
        return (inner.hyperparameters if inner is not None else None), f"method.{self.type}.hyperparameters"


class AdapterOptions(_Strict):
    """Our extras, as given (serve.job_spec checks them): the adapter method, a time budget, a step cap and the
    system prompt for rows without one."""

    type: Any = None
    time_budget_minutes: Any = None
    max_steps: Any = None
    system_prompt: Any = None
    redact: Any = None


class JobRequest(_Strict):
    """A `POST /v1/fine_tuning/jobs` body: its shape here, its settings in serve.job_spec."""

    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    suffix: Any = None
    seed: Any = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    adapter: AdapterOptions | None = None

    def spec(self) -> JobSpec:
        """The job's checked settings; APIError naming the field (as `param`) when one is out of the contract."""
        method = self.method or Method()
        inner, where = method.hyperparameters()
        if inner is not None and self.hyperparameters is not None:
            raise APIError(400, f"Give hyperparameters either at the top level or in {where}, not both.",
                           param="hyperparameters")
        where = where if inner is not None else "hyperparameters"
        hyper = inner or self.hyperparameters or Hyperparameters()
        adapter = self.adapter or AdapterOptions()
        params = {**PARAMS, **{name: f"{where}.{name}" for name in (*HYPERPARAMETERS, "beta")}}
        try:
            return job_spec(params, **hyper.model_dump(), training=method.type, suffix=self.suffix, seed=self.seed,
                            method=adapter.type,
                            time_budget_minutes=adapter.time_budget_minutes, max_steps=adapter.max_steps,
                            system_prompt=adapter.system_prompt, redact=adapter.redact)
        except JobSpecError as error:
            raise APIError(400, str(error), param=error.param, code=error.code) from None


_FIELDS = frozenset(
    name for model in (JobRequest, Hyperparameters, DPOHyperparameters, Method, Supervised, DPO, AdapterOptions)
    for name in model.model_fields
)


# -- objects ---------------------------------------------------------------------------------------------
def event_object(event_id: str, line: dict) -> dict:
    """One line of a job's events (runner status or train.sft --events-file) as a fine_tuning.job.event."""
    kind, level, data, type_ = line.get("event"), line.get("level", "info"), {}, "message"
    if kind == "metrics":
        type_ = "metrics"
        data = {"step": line.get("step"), "total_steps": line.get("max_steps")}
        data |= {k: line[k] for k in ("train_loss", "eval_loss", "learning_rate", "epoch", "tokens_per_s",
                                      "steps_per_s", "eta_s") if line.get(k) is not None}
        if "eval_loss" in data:  # OpenAI's name for it, which its dashboards read
            data["valid_loss"] = data["eval_loss"]
        message = metrics_message(line)
    elif kind == "checkpoint":
        data = {k: line[k] for k in ("step", "train_loss", "eval_loss") if line.get(k) is not None}
        message = f"Checkpoint saved at step {line.get('step')}"
    elif kind == "phase":
        data = {"phase": line.get("phase")}
        text = str(line.get("message") or line.get("phase"))
        message = text[:1].upper() + text[1:]
    elif kind == "done":
        message = f"Training finished: {line.get('summary')}"
    elif kind == "error":
        level, message = "error", f"Training failed: {line.get('message')}"
    else:  # the runner's status lines
        data = {"status": line["status"]} if "status" in line else {}
        message = str(line.get("message", ""))
    return {"object": "fine_tuning.job.event", "id": event_id, "created_at": int(line.get("time", 0)),
            "level": level if level in ("info", "warn", "error") else "info", "message": message,
            "data": data, "type": type_}


def metrics_message(line: dict) -> str:
    """OpenAI's wording: "Step 5/38: training loss=2.31" (or validation loss, or both)."""
    losses = [f"{name} loss={line[key]:.4g}" for key, name in (("train_loss", "training"), ("eval_loss", "validation"))
              if isinstance(line.get(key), int | float)]
    total = f"/{line['max_steps']}" if line.get("max_steps") else ""
    return f"Step {line.get('step')}{total}: " + (", ".join(losses) or "no loss logged")


def checkpoint_object(job: Job, mark: dict) -> dict:
    """A checkpoint line of train.sft as a fine_tuning.job.checkpoint."""
    step = int(mark["step"])
    metrics = {"step": step}
    metrics |= {name: mark[key] for key, name in (("train_loss", "train_loss"), ("eval_loss", "valid_loss"))
                if mark.get(key) is not None}
    return {
        "object": "fine_tuning.job.checkpoint",
        "id": f"ftckpt-{job.id.removeprefix('ftjob-')}-{step}",
        "created_at": int(mark.get("time", 0)),
        # Named like OpenAI's checkpoint models; the app serves the finished adapter, not its checkpoints.
        "fine_tuned_model_checkpoint": f"{job.output_name}:ckpt-step-{step}",
        "step_number": step,
        "metrics": metrics,
        "fine_tuning_job_id": job.id,
    }


# -- the routes ------------------------------------------------------------------------------------------
class FineTuningServer:
    """`/v1/files` and `/v1/fine_tuning/jobs` over one JobRunner (its FileStore holds the uploads)."""

    def __init__(
        self,
        jobs: JobRunner,
        access: AccessPolicy | None = None,
        *,
        session_user: Callable[[Request], str | None] | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
    ):
        self.jobs, self.files = jobs, jobs.files
        self.max_body_bytes, self.max_upload_bytes = max_body_bytes, max_upload_bytes
        self.router = api_router(Gate(access or AccessPolicy(), session_user))
        routes = [
            ("/files", self.upload, "POST"), ("/files", self.list_files, "GET"),
            ("/files/{file_id}", self.get_file, "GET"), ("/files/{file_id}", self.delete_file, "DELETE"),
            ("/fine_tuning/jobs", self.create_job, "POST"), ("/fine_tuning/jobs", self.list_jobs, "GET"),
            ("/fine_tuning/jobs/{job_id}", self.get_job, "GET"),
            ("/fine_tuning/jobs/{job_id}/cancel", self.cancel_job, "POST"),
            ("/fine_tuning/jobs/{job_id}/pause", self.pause_job, "POST"),
            ("/fine_tuning/jobs/{job_id}/resume", self.resume_job, "POST"),
            ("/fine_tuning/jobs/{job_id}/events", self.job_events, "GET"),
            ("/fine_tuning/jobs/{job_id}/checkpoints", self.job_checkpoints, "GET"),
        ]
        for path, endpoint, method in routes:
            self.router.add_api_route(path, endpoint, methods=[method])

    # -- files -----------------------------------------------------------------------------------------
    async def upload(self, request: Request):
        """POST /v1/files (multipart: file, purpose)."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(400, "Upload the file as multipart/form-data with the fields 'file' and 'purpose' "
                                "(e.g. client.files.create(file=open('data.jsonl', 'rb'), purpose='fine-tune')).",
                           param="file")
        parser = MultiPartParser(request.headers, limited_stream(request, self.max_upload_bytes, self._upload_too_large),
                                 max_files=1, max_fields=8)
        try:
            form = await parser.parse()
        except MultiPartException as error:
            raise APIError(400, f"The multipart body could not be read: {error}", param="file") from None
        try:
            upload, purpose = form.get("file"), form.get("purpose")
            if upload is None or isinstance(upload, str):
                raise APIError(400, "Missing required parameter: 'file' (the training file, sent as a file part).",
                               param="file", code="missing_required_parameter")
            if not isinstance(purpose, str) or not purpose:
                raise APIError(400, "Missing required parameter: 'purpose' (use 'fine-tune').", param="purpose",
                               code="missing_required_parameter")
            data = await upload.read()
        finally:
            await form.close()
        item = await run_in_threadpool(_files_call, self.files.save, data, upload.filename or "upload.jsonl", purpose)
        logger.info("stored %s (%s, %d bytes)", item.id, item.filename, item.bytes)
        return item.to_dict()

    async def list_files(self, request: Request):
        """GET /v1/files (purpose, order, after, limit)."""
        items = [f.to_dict() for f in await run_in_threadpool(self.files.list)]
        purpose = request.query_params.get("purpose")
        if purpose:
            items = [f for f in items if f["purpose"] == purpose]
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise APIError(400, f"Invalid 'order': {order!r}; use 'asc' or 'desc'.", param="order")
        if order == "asc":
            items.reverse()
        return _page(items, request, "files")

    async def get_file(self, request: Request, file_id: str):
        """GET /v1/files/{file_id}."""
        return (await run_in_threadpool(_files_call, self.files.get, file_id)).to_dict()

    async def delete_file(self, request: Request, file_id: str):
        """DELETE /v1/files/{file_id}; refused while a job that has not finished still reads the file."""

        def delete() -> None:
            with self.jobs.lock:  # no job may start using the file between the check and the removal
                _files_call(self.files.get, file_id)
                users = [j for j in self.jobs.list() if j.status in NEEDS_FILES
                         and file_id in (j.training_file, j.validation_file)]
                if users:
                    raise APIError(409, f"File {file_id} is used by fine-tuning job {users[0].id} "
                                        f"({users[0].status}); cancel that job first, then delete the file.",
                                   param="file_id", code="file_in_use")
                _files_call(self.files.delete, file_id)

        await run_in_threadpool(delete)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- jobs ------------------------------------------------------------------------------------------
    async def create_job(self, request: Request):
        """POST /v1/fine_tuning/jobs."""
        body = await read_body(request, self.max_body_bytes, self._body_too_large)
        try:
            req = JobRequest.model_validate_json(body)
        except ValidationError as error:
            param, message, code = describe(error, _FIELDS)
            raise APIError(400, message, param=param, code=code) from None
        job = await run_in_threadpool(_jobs_call, self.jobs.create, req.training_file, req.spec(), model=req.model,
                                      validation_file=req.validation_file)
        logger.info("created %s on %s (%s)", job.id, job.training_file, job.method)
        return job.to_openai()

    async def list_jobs(self, request: Request):
        """GET /v1/fine_tuning/jobs (after, limit), newest first."""
        return _page([j.to_openai() for j in await run_in_threadpool(self.jobs.list)], request, "jobs")

    async def get_job(self, request: Request, job_id: str):
        """GET /v1/fine_tuning/jobs/{job_id}."""
        return (await run_in_threadpool(_jobs_call, self.jobs.get, job_id)).to_openai()

    async def cancel_job(self, request: Request, job_id: str):
        """POST /v1/fine_tuning/jobs/{job_id}/cancel."""
        return (await run_in_threadpool(_jobs_call, self.jobs.cancel, job_id)).to_openai()

    async def pause_job(self, request: Request, job_id: str):
        """POST /v1/fine_tuning/jobs/{job_id}/pause: stop it, keeping its checkpoints to resume from."""
        return (await run_in_threadpool(_jobs_call, self.jobs.pause, job_id)).to_openai()

    async def resume_job(self, request: Request, job_id: str):
        """POST /v1/fine_tuning/jobs/{job_id}/resume: continue a paused job from its last checkpoint."""
        return (await run_in_threadpool(_jobs_call, self.jobs.resume, job_id)).to_openai()

    async def job_events(self, request: Request, job_id: str):
        """GET /v1/fine_tuning/jobs/{job_id}/events (after, limit), newest first."""
        lines = await run_in_threadpool(_jobs_call, self.jobs.events, job_id)
        tag = job_id.removeprefix("ftjob-")
        counts = {"runner": 0, "train": 0}
        events = []
        for line in lines:  # ids count each file's lines: the files only grow, so an id never changes
            source = line.get("source", "runner")
            counts[source] = counts.get(source, 0) + 1
            events.append(event_object(f"ftevent-{tag}-{source[0]}{counts[source]}", line))
        return _page(events[::-1], request, "events")

    async def job_checkpoints(self, request: Request, job_id: str):
        """GET /v1/fine_tuning/jobs/{job_id}/checkpoints (after, limit), newest first."""

        def checkpoints() -> list[dict]:
            job = _jobs_call(self.jobs.get, job_id)
            return [checkpoint_object(job, mark) for mark in self.jobs.checkpoints(job_id)]

        return _page(await run_in_threadpool(checkpoints), request, "checkpoints")

    # -- helpers ---------------------------------------------------------------------------------------
    def _upload_too_large(self) -> APIError:
        return APIError(413, f"The upload exceeds this server's limit of {_megabytes(self.max_upload_bytes)} MB "
                             "(the server's --max-upload-mb); split the file or raise the limit.",
                        param="file", code="file_too_large")

    def _body_too_large(self) -> APIError:
        return APIError(413, f"The request body exceeds this server's limit of {self.max_body_bytes // 1024} KB "
                             "(the server's --max-request-kb).", code="request_too_large")


def training_off_router(reason: str, gate: Gate | None = None) -> APIRouter:
    """Routes that answer every /v1/files and /v1/fine_tuning request (of a caller `gate` lets in) with 403
    and `reason`."""
    router = api_router(gate)

    async def off(request: Request):
        raise APIError(403, reason, code="training_disabled")

    for path in ("/files", "/files/{rest:path}", "/fine_tuning/{rest:path}"):
        router.add_api_route(path, off, methods=["GET", "POST", "DELETE"])
    return router


def _files_call(fn: Callable, *args):
    try:
        return fn(*args)
    except FileError as error:
        raise APIError(error.status, str(error), param=error.param,
                       code="file_not_found" if error.status == 404 else None) from None


def _jobs_call(fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except JobError as error:
        raise APIError(error.status, str(error), param=error.param, code=error.code) from None


def _page(items: list[dict], request: Request, kind: str) -> dict:
    """OpenAI's list object over `items` (already in order): `after` an id of the list, `limit` how many."""
    default, most = PAGE_LIMITS[kind]
    raw = request.query_params.get("limit")
    try:
        limit = default if raw is None else int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= most:
        raise APIError(400, f"Invalid 'limit': {raw!r}; use a whole number from 1 to {most}.", param="limit",
                       code="invalid_value")
    after = request.query_params.get("after")
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise APIError(400, f"Invalid 'after': no {kind[:-1]} with id {after!r} in this list; pass the id of "
                                "the last item of the previous page.", param="after", code="invalid_value")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "has_more": len(items) > limit,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


def _megabytes(size: int) -> str:
    return f"{size / 1024 / 1024:g}"
