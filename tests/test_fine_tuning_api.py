"""The OpenAI-compatible fine-tuning API (/v1/files, /v1/fine_tuning/jobs), driven by the real `openai` SDK
against the real app: uploads, real train.sft jobs (a few steps), events, checkpoints, pause/resume, cancel,
and chatting with the adapter a job published."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai import BadRequestError, ConflictError, NotFoundError, OpenAI, PermissionDeniedError
from safetensors.torch import load_file

from tests.adapter_replies import adapter_reply
from tests.conftest import DATA, FAST, Server, free_port, wait_for

pytestmark = pytest.mark.slow

STEPS = 6  # checkpoints every step at this length (train.sft saves about 5 times per run)
BAD = DATA / "bad" / "invalid_json_line.jsonl"
BAD_LINE = json.loads((DATA / "bad" / "expected.json").read_text())[BAD.name]["line"]
UPLOAD_LIMIT_MB = 0.25


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Server:
    """The app with its own adapters and jobs folders, the fine-tuning API mounted beside /v1."""
    from serve.registry import BASE_CHOICE, ModelRegistry
    from serve.server import job_runner
    from ui.app import build_app
    from ui.config import ChatConfig

    root = tmp_path_factory.mktemp("fine-tuning")
    config = ChatConfig(adapters_dir=str(root / "adapters"), jobs_dir=str(root / "jobs"), max_upload_mb=UPLOAD_LIMIT_MB)
    registry = ModelRegistry(config.adapters_dir, default=BASE_CHOICE)
    jobs = job_runner(config, registry, train_args=FAST)
    demo = build_app(config, registry=registry, jobs=jobs)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield Server(url.rstrip("/") + "/", demo, registry)
    jobs.close()
    demo.close()


@pytest.fixture(scope="module")
def client(app) -> OpenAI:
    return OpenAI(base_url=app.url + "v1", api_key="unused-on-localhost", max_retries=0)


def wait_status(client: OpenAI, job_id: str, statuses: set[str], timeout: float = 240) -> object:
    """The job once its status is one of `statuses`."""
    return wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in statuses and j,
                    timeout=timeout, interval=0.3, what=f"job {job_id} to be {statuses}")


def all_events(client: OpenAI, job_id: str) -> list:
    """Every event of the job, newest first."""
    return client.fine_tuning.jobs.list_events(job_id, limit=100).data


@pytest.fixture(scope="module")
def trained(client, app) -> dict:
    """One real job: uploaded, created, paused after its first checkpoint, resumed, finished."""
    with (DATA / "valid_pairs.jsonl").open("rb") as data:
        upload = client.files.create(file=data, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="base", training_file=upload.id, suffix="sdk", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "batch_size": "auto",
            "learning_rate_multiplier": 3,  # a few steps must change the probe replies, or train.sft refuses
        }}},
        extra_body={"adapter": {"type": "lora", "max_steps": STEPS}},
    )
    assert job.status == "validating_files" and job.object == "fine_tuning.job"
    wait_for(lambda: any(e.message.startswith("Checkpoint saved") for e in all_events(client, job.id)),
             timeout=180, interval=0.2, what="the first checkpoint")
    client.fine_tuning.jobs.pause(job.id)
    paused = wait_status(client, job.id, {"paused", "succeeded", "failed", "cancelled"})
    newest = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number  # where the job must go on
    resumed = client.fine_tuning.jobs.resume(job.id)
    done = wait_status(client, job.id, {"succeeded", "failed", "cancelled", "paused"})
    return {"upload": upload, "job": done, "paused": paused, "resumed": resumed, "newest_at_pause": newest}


def test_uploads_are_listed_retrieved_and_deleted(client):
    data = (DATA / "valid_pairs.jsonl").read_bytes()
    item = client.files.create(file=("pairs.jsonl", data), purpose="fine-tune")
    assert item.id.startswith("file-") and item.object == "file" and item.purpose == "fine-tune"
    assert item.bytes == len(data) and item.filename == "pairs.jsonl"
    assert client.files.retrieve(item.id).bytes == len(data)
    assert item.id in {f.id for f in client.files.list(purpose="fine-tune")}
    gone = client.files.delete(item.id)
    assert gone.deleted is True and gone.id == item.id
    with pytest.raises(NotFoundError) as missing:
        client.files.retrieve(item.id)
    assert missing.value.body["param"] == "file_id"


def test_a_job_pauses_and_resumes_from_its_checkpoint(client, trained):
    job = trained["job"]
    assert trained["paused"].status == "paused" and trained["paused"].fine_tuned_model is None
    assert trained["resumed"].status == "queued"
    assert job.status == "succeeded", job.error
    messages = [e.message for e in all_events(client, job.id)]
    # train.sft's own words, naming the newest checkpoint saved before the pause
    assert any(m.endswith(f", resumed from checkpoint-{trained['newest_at_pause']}") for m in messages), messages
    steps = [e.data["step"] for e in all_events(client, job.id) if e.type == "metrics"]
    assert max(steps) == STEPS


def test_events_are_openai_events_with_metrics_newest_first(client, trained):
    job = trained["job"]
    events = all_events(client, job.id)
    assert all(e.object == "fine_tuning.job.event" and e.level in {"info", "warn", "error"} for e in events)
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    assert events[0].message.startswith("The job has successfully completed")
    losses = [e for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert losses and all(isinstance(e.data["train_loss"], float) and e.data["total_steps"] == STEPS for e in losses)
    first = min(losses, key=lambda e: e.data["step"])
    assert first.message == f"Step {first.data['step']}/{STEPS}: training loss={first.data['train_loss']:.4g}"
    page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    after = client.fine_tuning.jobs.list_events(job.id, limit=3, after=page.data[-1].id)
    assert [e.id for e in page.data + after.data] == [e.id for e in events[:6]] and page.has_more
    assert len({e.id for e in events}) == len(events)


def test_checkpoints_are_listed(client, trained):
    job = trained["job"]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints, "train.sft saved checkpoints at every step"
    newest = checkpoints[0]
    assert newest.object == "fine_tuning.job.checkpoint" and newest.fine_tuning_job_id == job.id
    assert newest.step_number == STEPS and newest.metrics.step == STEPS and newest.metrics.train_loss > 0
    assert newest.fine_tuned_model_checkpoint.endswith(f":ckpt-step-{STEPS}")


def test_the_fine_tuned_model_chats_at_once(client, trained, app):
    model = trained["job"].fine_tuned_model
    assert model and model.startswith("ft-sdk-")
    assert model in {m.id for m in client.models.list().data}
    messages = [{"role": "user", "content": "Can I book a table?"}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert reply.model == model
    # The folder the job published, loaded here: its reply differs from the base model's.
    own = adapter_reply(app.demo.jobs.adapters_dir / model, messages, precision=app.registry.precision,
                        max_new_tokens=8, temperature=0)
    assert reply.choices[0].message.content == own, "the adapter's own reply"


def test_jobs_are_listed_newest_first_in_pages(client, trained):
    with BAD.open("rb") as bad:
        later = client.fine_tuning.jobs.create(
            model="base", training_file=client.files.create(file=bad, purpose="fine-tune").id)
    newest = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in newest.data] == [later.id] and newest.has_more
    older = client.fine_tuning.jobs.list(limit=1, after=later.id)
    assert [j.id for j in older.data] == [trained["job"].id]
    wait_status(client, later.id, {"failed", "succeeded"}, timeout=60)  # the doctor is done before the next test


def test_a_bad_file_fails_with_its_line_number_and_never_trains(client, app):
    with BAD.open("rb") as bad:
        created = client.fine_tuning.jobs.create(
            model="base", training_file=client.files.create(file=bad, purpose="fine-tune").id)
    job = wait_status(client, created.id, {"failed", "succeeded", "running"}, timeout=60)
    assert job.status == "failed" and job.error.param == "training_file"
    assert f"{BAD.name}:{BAD_LINE}:" in job.error.message, job.error.message
    statuses = {e.data.get("status") for e in all_events(client, job.id)}
    assert "running" not in statuses and "queued" not in statuses, statuses
    assert not (app.demo.jobs.root / job.id / "train.log").exists()


def test_a_bad_validation_file_fails_before_training_too(client, app):
    with (DATA / "valid_pairs.jsonl").open("rb") as good, BAD.open("rb") as bad:
        training = client.files.create(file=good, purpose="fine-tune")
        validation = client.files.create(file=bad, purpose="fine-tune")
    created = client.fine_tuning.jobs.create(model="base", training_file=training.id, validation_file=validation.id)
    job = wait_status(client, created.id, {"failed", "succeeded", "running"}, timeout=90)
    assert job.status == "failed" and job.error.param == "validation_file" and job.error.code == "invalid_validation_file"
    assert f"{BAD.name}:{BAD_LINE}:" in job.error.message, job.error.message
    assert not (app.demo.jobs.root / job.id / "train.log").exists()


def test_a_running_job_is_cancelled_and_publishes_nothing(client, app):
    with (DATA / "valid_pairs.jsonl").open("rb") as data:
        upload = client.files.create(file=data, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="base", training_file=upload.id, suffix="cancel",
                                         extra_body={"adapter": {"max_steps": 500}})
    wait_status(client, job.id, {"running"}, timeout=120)
    with pytest.raises(ConflictError) as in_use:  # the job reads it (and a paused one would on resume)
        client.files.delete(upload.id)
    assert job.id in in_use.value.message and upload.id in {f.id for f in client.files.list()}
    client.fine_tuning.jobs.cancel(job.id)
    cancelled = wait_status(client, job.id, {"cancelled", "succeeded", "failed", "paused"}, timeout=60)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    name = app.demo.jobs.get(job.id).output_name
    assert not (app.demo.jobs.adapters_dir / name).exists()
    assert name not in {m.id for m in client.models.list().data}


def test_malformed_requests_get_400_naming_the_field(app, client):
    url = app.url + "v1/fine_tuning/jobs"
    good = {"model": "base", "training_file": "file-" + "0" * 24}
    cases = [
        ({"model": "base"}, "training_file"),
        ({**good, "hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs"),
        ({**good, "method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2.5}}}},
         "method.supervised.hyperparameters.batch_size"),
        ({**good, "method": {"type": "reinforcement"}}, "method.type"),
        ({**good, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}},
         "method.dpo.hyperparameters.beta"),
        ({**good, "method": {"type": "dpo"}, "adapter": {"type": "prefix"}}, "adapter.type"),
        ({**good, "adapter": {"type": "qlora"}}, "adapter.type"),
        ({**good, "adapter": {"system_prompt": "@/etc/passwd"}}, "adapter.system_prompt"),
        ({**good, "hyperparameters": {"n_epochs": 1},
          "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}}, "hyperparameters"),
        (good, "training_file"),  # no such file
    ]
    for body, param in cases:
        response = httpx.post(url, json=body, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (body, response.text)
    not_json = httpx.post(url, content=b"{nope", timeout=30)
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]
    with pytest.raises(BadRequestError) as unknown:
        client.fine_tuning.jobs.create(model="base", training_file="file-" + "0" * 24)
    assert unknown.value.param == "training_file"
    with pytest.raises(NotFoundError):
        client.fine_tuning.jobs.list_events("ftjob-" + "0" * 24)

    files = app.url + "v1/files"
    wrong_purpose = httpx.post(files, files={"file": ("a.jsonl", b'{"a": 1}\n')}, data={"purpose": "assistants"})
    assert wrong_purpose.status_code == 400 and wrong_purpose.json()["error"]["param"] == "purpose"
    no_file = httpx.post(files, data={"purpose": "fine-tune"}, files={"other": ("a.jsonl", b"x")})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    as_json = httpx.post(files, json={"purpose": "fine-tune"})
    assert as_json.status_code == 400 and as_json.json()["error"]["param"] == "file"
    big = b'{"prompt": "hi", "response": "hello"}\n' * int(UPLOAD_LIMIT_MB * 1024 * 1024 / 30)
    stored = len(client.files.list().data)
    too_big = httpx.post(files, files={"file": ("big.jsonl", big)}, data={"purpose": "fine-tune"})
    assert too_big.status_code == 413 and "--max-upload-mb" in too_big.json()["error"]["message"]
    assert len(client.files.list().data) == stored  # nothing kept of it
    for query, param in (("limit=0", "limit"), ("limit=x", "limit"), ("after=ftjob-nope", "after")):
        listed = httpx.get(f"{url}?{query}")
        assert listed.status_code == 400 and listed.json()["error"]["param"] == param, query


def test_a_caller_from_another_machine_without_a_key_is_refused(app, tmp_path):
    from serve.access import AccessPolicy
    from serve.files import FileStore
    from serve.fine_tuning_api import FineTuningServer
    from serve.jobs import JobRunner

    # uvicorn takes the caller from X-Forwarded-For when the proxy is on loopback: a stranger, as the app sees it.
    relayed = {"X-Forwarded-For": "203.0.113.9"}
    before = len(httpx.get(app.url + "v1/files").json()["data"])
    upload = httpx.post(app.url + "v1/files", headers=relayed, files={"file": ("a.jsonl", b'{"a": 1}\n')},
                        data={"purpose": "fine-tune"})
    assert upload.status_code == 403 and "ASSISTANT_API_KEY" in upload.json()["error"]["message"]
    assert httpx.post(app.url + "v1/fine_tuning/jobs", headers=relayed, json={}).status_code == 403
    assert len(httpx.get(app.url + "v1/files").json()["data"]) == before

    runner = JobRunner(tmp_path / "jobs", tmp_path / "adapters", FileStore(tmp_path / "files"), start=False)
    api = FastAPI()
    api.include_router(FineTuningServer(runner, AccessPolicy()).router)
    stranger = TestClient(api, client=("10.1.2.3", 50000))
    assert stranger.get("/v1/fine_tuning/jobs").status_code == 403
    assert TestClient(api, client=("127.0.0.1", 50000)).get("/v1/fine_tuning/jobs").status_code == 200
    keyed = FastAPI()
    keyed.include_router(FineTuningServer(runner, AccessPolicy(api_key="k3y", bind_host="0.0.0.0")).router)
    with_key = TestClient(keyed, client=("10.1.2.3", 50000))
    assert with_key.get("/v1/files", headers={"Authorization": "Bearer k3y"}).status_code == 200
    assert with_key.get("/v1/files").status_code == 401


def test_no_training_turns_the_api_off(tmp_path):
    from serve.registry import BASE_CHOICE, ModelRegistry
    from ui.app import build_app
    from ui.config import ChatConfig

    config = ChatConfig(adapters_dir=str(tmp_path / "adapters"), jobs_dir=str(tmp_path / "jobs"), no_training=True)
    demo = build_app(config, registry=ModelRegistry(config.adapters_dir, default=BASE_CHOICE))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        assert demo.jobs is None and not (tmp_path / "jobs").exists()
        client = OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
        with pytest.raises(PermissionDeniedError, match="--no-training"):
            client.fine_tuning.jobs.create(model="base", training_file="file-" + "0" * 24)
        with pytest.raises(PermissionDeniedError, match="--no-training"):
            client.files.create(file=("a.jsonl", b'{"a": 1}\n'), purpose="fine-tune")
        assert httpx.get(url + "v1/files/file-x").status_code == 403
        assert client.models.list().data[0].id == "base"  # the rest of /v1 is served
    finally:
        demo.close()


def test_one_server_per_jobs_folder(app, tmp_path):
    """A second runner on a folder whose jobs run would pause and kill them ("recover"): it is refused."""
    from serve.server import job_runner
    from ui.config import ChatConfig

    jobs_dir = str(app.demo.jobs.root)
    assert job_runner(ChatConfig(adapters_dir=str(tmp_path), jobs_dir=jobs_dir)) is None
    other_process = subprocess.run(
        [sys.executable, "-c", "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'a'), fcntl.LOCK_EX | fcntl.LOCK_NB)",
         str(Path(jobs_dir) / ".runner.lock")], capture_output=True, text=True, timeout=30)
    assert other_process.returncode != 0 and "BlockingIOError" in other_process.stderr
    # A closed runner's folder may be taken again (an app restarted in the same process).
    first = job_runner(ChatConfig(adapters_dir=str(tmp_path), jobs_dir=str(tmp_path / "own")))
    first.close()
    second = job_runner(ChatConfig(adapters_dir=str(tmp_path), jobs_dir=str(tmp_path / "own")))
    assert second is not None
    second.close()


def test_a_dpo_job_from_the_sdk_goes_on_from_an_sft_adapter_and_publishes_one_that_is_served(client, trained, app):
    """The SFT job's adapter is the DPO job's start and its reference (TRL keeps a frozen copy, never published)."""
    from assistant.adapters import folder_signature, read_folder

    sft = trained["job"].fine_tuned_model
    adapters = app.demo.jobs.adapters_dir
    untouched = folder_signature(adapters / sft)
    with (DATA / "prefs.jsonl").open("rb") as data:
        upload = client.files.create(file=data, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=sft, training_file=upload.id, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 1, "batch_size": 4,
                                                            "learning_rate_multiplier": 10}}},
        extra_body={"adapter": {"max_steps": 2}},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1
    done = wait_status(client, job.id, {"succeeded", "failed", "cancelled", "paused"}, timeout=900)
    assert done.status == "succeeded", (done.error, app.demo.jobs.log_tail(job.id))
    model = done.fine_tuned_model
    assert model in {m.id for m in client.models.list().data}
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Can I book a table?"}],
                                          max_tokens=6, temperature=0)
    assert reply.model == model and reply.choices[0].message.content
    out = adapters / model
    report = json.loads((out / "training_report.json").read_text())
    pref = report["preference"]
    assert report["training"] == "dpo" and report["from_adapter"] == str(adapters / sft) and pref["beta"] == 0.1
    # The reference is the SFT adapter, not the base: before the first step the policy equals it (0.5, 0) while the
    # SFT adapter already scores a non-zero reward against the base model.
    assert pref["before"]["vs_reference"]["reward_accuracy"] == 0.5 and pref["before"]["vs_reference"]["reward_margin"] == 0
    assert pref["before"]["vs_base"]["reward_margin"] != 0
    assert pref["after"]["vs_reference"]["reward_margin"] > 0, "DPO moved towards the preferred replies"
    # A normal adapter folder: only the tuned adapter (no "ref" copy), the SFT adapter's trained prompt.
    assert not (out / "ref").exists() and read_folder(out).method == "lora"
    assert read_folder(out).prompt == read_folder(adapters / sft).prompt
    weights, start = load_file(out / "adapter_model.safetensors"), load_file(adapters / sft / "adapter_model.safetensors")
    assert weights.keys() == start.keys() and any(not torch.equal(weights[k], start[k]) for k in weights)
    assert folder_signature(adapters / sft) == untouched, "the adapter it starts from is left as it was"
