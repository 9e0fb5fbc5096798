"""Fine-tuning jobs with the real trainer: the doctor stops bad data, jobs survive a killed server and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve.files import FileStore
from serve.jobs import LOG, JobRunner, read_lines
from serve.registry import ModelRegistry
from tests.conftest import DATA, ROOT, wait_for

pytestmark = pytest.mark.slow

FAST = ["--batch-size", "4", "--probes", "1", "--probe-tokens", "8", "--logging-steps", "1", "--save-steps", "2",
        "--generation-rows", "0"]


def upload(files: FileStore, path: Path) -> str:
    return files.save(path.read_bytes(), path.name, "fine-tune").id


def test_bad_data_fails_the_job_with_the_line_and_never_trains(tmp_path):
    files = FileStore(tmp_path / "jobs" / "files")
    runner = JobRunner(tmp_path / "jobs", tmp_path / "adapters", files, extra_args=FAST)
    try:
        bad = upload(files, DATA / "bad" / "invalid_json_line.jsonl")
        job = runner.create(bad, max_steps=2)
        assert job.status == "validating_files"
        job = wait_for(lambda: (j := runner.get(job.id)).status not in ("validating_files", "queued") and j, 60,
                       what="the doctor's verdict")
        assert job.status == "failed" and job.error["param"] == "training_file"
        assert "invalid_json_line.jsonl:" in job.error["message"] and "line" in job.error["message"].lower()
        assert not (tmp_path / "jobs" / job.id / LOG).exists(), "training never started"
        assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())
    finally:
        runner.close()


SERVER = """
import sys, time
from pathlib import Path
from serve.files import FileStore
from serve.jobs import JobRunner
root, data = Path(sys.argv[1]), Path(sys.argv[2])
files = FileStore(root / "jobs" / "files")
runner = JobRunner(root / "jobs", root / "adapters", files, extra_args=sys.argv[3:])
job = runner.create(files.save(data.read_bytes(), data.name, "fine-tune").id, max_steps=12, suffix="support")
print(job.id, flush=True)
time.sleep(600)
"""


def test_a_job_survives_a_killed_server_and_resumes_from_its_checkpoint(tmp_path):
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path), str(DATA / "valid_pairs.jsonl"), *FAST],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    job_id = server.stdout.readline().strip()
    folder = tmp_path / "jobs" / job_id
    checkpoints = lambda: [e for e in read_lines(folder / "train_events.jsonl") if e["event"] == "checkpoint"]  # noqa: E731
    try:  # two checkpoints, so that resuming from the newest differs from resuming from an older one
        wait_for(lambda: len(checkpoints()) >= 2, 600, interval=0.5, what="two checkpoints")
    finally:
        server.send_signal(signal.SIGKILL)  # the server dies; its training process lives on, unwatched
        server.wait()
    trainer_pid = json.loads((folder / "job.json").read_text())["pid"]
    os.kill(trainer_pid, 0)  # still alive

    files = FileStore(tmp_path / "jobs" / "files")
    registry = ModelRegistry(tmp_path / "adapters")
    runner = JobRunner(tmp_path / "jobs", tmp_path / "adapters", files, extra_args=FAST)
    try:
        job = runner.get(job_id)
        assert job.status == "paused" and job.resume, job
        messages = [e["message"] for e in runner.events(job_id) if e["source"] == "runner"]
        assert any("Interrupted" in m for m in messages), messages
        wait_for(lambda: not _alive(trainer_pid), 10, what="the orphaned training process to end")
        # The complete checkpoints on disk (trainer_state.json is written last): the newest is the one to resume.
        saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "adapters" / f"{job.output_name}.checkpoints")
                       .glob("checkpoint-*") if (p / "trainer_state.json").is_file())
        assert len(saved) >= 2, saved
        newest = saved[-1]
        runner.resume(job_id)
        job = wait_for(lambda: (j := runner.get(job_id)).status in ("succeeded", "failed") and j, 600, interval=0.5,
                       what="the resumed job to finish")
        assert job.status == "succeeded", (job.error, runner.log_tail(job_id))
        phases = [e["message"] for e in runner.events(job_id) if e.get("event") == "phase" and e["phase"] == "training"]
        assert any(p.endswith(f", resumed from checkpoint-{newest}") for p in phases), (saved, phases)
        metrics = [e for e in runner.events(job_id) if e.get("event") == "metrics"]
        assert metrics[-1]["step"] == 12 and all("tokens_per_s" in m and "eta_s" in m for m in metrics)
        # Published where the app looks, under the job's name: listed without a restart.
        assert job.fine_tuned_model == job.output_name and job.output_name.startswith("ft-support-")
        wait_for(lambda: job.fine_tuned_model in registry.choices, 5, what="the registry to list the adapter")
    finally:
        runner.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its dead parent's reaper) counts as gone.
    status = Path(f"/proc/{pid}/stat")
    return status.is_file() and status.read_text().split()[2] != "Z"


def test_a_killed_training_process_pauses_its_job(tmp_path):
    files = FileStore(tmp_path / "jobs" / "files")
    runner = JobRunner(tmp_path / "jobs", tmp_path / "adapters", files, extra_args=FAST)
    try:
        job = runner.create(upload(files, DATA / "valid_pairs.jsonl"), max_steps=40)
        pid = wait_for(lambda: runner.get(job.id).pid, 120, interval=0.2, what="the training process")
        time.sleep(1.0)
        os.killpg(pid, signal.SIGKILL)  # e.g. the OOM killer
        job = wait_for(lambda: (j := runner.get(job.id)).status != "running" and j, 30, what="the runner to notice")
        assert job.status == "paused" and job.resume
        assert "killed" in runner.events(job.id)[-1]["message"]
    finally:
        runner.close()
