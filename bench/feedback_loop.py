"""`python -m bench.feedback_loop`: does learning from use make the assistant better on a team's own dialogues?

The loop of issue "Learn from every conversation", on STAR, as a support team would run it:
1. train.sft trains an adapter on the first `train_rows` training pairs (its defaults).
2. The app serves it; `feedback_rows` other training prompts go through the `openai` SDK with `store: true`
   (8 at a time), and each stored reply gets the human agent's reply as its correction through
   `POST /v1/chat/completions/{id}/feedback`.
3. An admin approves them in the Data tab and presses "Train on these" from that adapter: the Data tab's own
   functions (ui.data_tab.DataTab.approve and .train: the export, redacted, the dataset doctor, a fine-tuning job
   with the job contract's defaults that goes on training the adapter).
4. The adapter before and the job's adapter after are scored by the same function (train.eval.score in
   bench.score_worker, fp32, greedy) on held-out validation pairs: ROUGE-L of the replies and the perplexity of
   the reference replies.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from bench.common import (
    RESULTS,
    bar_chart,
    cpu_name,
    free_port,
    log,
    machine_load,
    parse_config,
    print_final,
    run_measured,
    table,
    write_results,
)
from bench.quality import fresh, score_run
from bench.train_speed import check

NAME = "feedback_loop"
STAR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "star"
ADAPTER = "star-500"
METADATA = {"bench": NAME}


@dataclass
class FeedbackLoopConfig:
    """Options of `python -m bench.feedback_loop`."""

    data_dir: str = field(default=str(STAR), metadata={"help": "Folder with train.pairs.jsonl and valid.pairs.jsonl."})
    train_rows: int = field(default=500, metadata={"help": "Training pairs the first adapter trains on."})
    feedback_rows: int = field(
        default=200, metadata={"help": "Other training prompts sent with store: true, each corrected."}
    )
    valid_rows: int = field(default=100, metadata={"help": "Validation pairs scored before and after."})
    max_new_tokens: int = field(default=64, metadata={"help": "Reply length of the stored chats and of the scoring."})
    train_args: str = field(default="", metadata={"help": "Extra train.sft arguments for the first adapter."})
    adapter: str | None = field(default=None, metadata={"help": "Start from this adapter folder (trained on the first "
                                                               "--train-rows pairs) instead of training one."})
    work_dir: str | None = field(default=None, metadata={"help": "Folder for data, adapters and jobs (default: temp)."})
    timeout: float = field(default=7200.0, metadata={"help": "Seconds allowed for each training run and scoring."})
    output: str = field(default=str(RESULTS / f"{NAME}.json"), metadata={"help": "Where the results JSON goes."})


def write_rows(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def local_admin() -> SimpleNamespace:
    """A request as Gradio hands it to the Data tab: this machine's keyless caller ("local", an admin here)."""
    return SimpleNamespace(client=SimpleNamespace(host="127.0.0.1"), headers={}, username=None,
                           session_hash="bench-feedback-loop")


def store_and_correct(url: str, rows: list[dict], config: FeedbackLoopConfig) -> dict:
    """Each prompt through the SDK with store: true, then its correction: the human agent's reply."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "v1", api_key="local", max_retries=2, timeout=config.timeout)
    started, done = time.perf_counter(), []

    def one(row: dict) -> dict:
        made = client.chat.completions.create(model=ADAPTER, messages=[{"role": "user", "content": row["prompt"]}],
                                              store=True, metadata=METADATA, temperature=0,
                                              max_tokens=config.max_new_tokens)
        reply = made.choices[0].message.content or ""
        body = {"rating": "good"} if reply.strip() == row["response"].strip() else {
            "rating": "bad", "correction": row["response"]}
        client.post(f"/chat/completions/{made.id}/feedback", body=body, cast_to=object)
        done.append(made.id)
        if len(done) % 20 == 0:
            rate = len(done) / (time.perf_counter() - started)
            log(f"  {len(done)}/{len(rows)} stored and corrected, {rate:.2f}/s, "
                f"ETA {(len(rows) - len(done)) / rate:.0f} s")
        return {"id": made.id, "reply": reply, **body}

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, rows))
    listed = client.chat.completions.list(metadata=METADATA, limit=100)
    stored = sum(1 for _ in listed)  # the SDK pages through all of them
    client.close()
    return {"sent": len(rows), "stored": stored, "corrected": sum("correction" in r for r in results),
            "seconds": round(time.perf_counter() - started, 1)}


def train_on_these(demo, config: FeedbackLoopConfig) -> dict:
    """Approve every new record in the Data tab, press "Train on these" from the adapter, wait for the job."""
    from serve.feedback import Filters, find_feedback

    request = local_admin()
    who = demo.data_tab.caller(request)
    pending = find_feedback(demo.service.store, who, Filters(status="new"), limit=1000).items  # the store's page cap
    for record in pending:
        demo.data_tab.approve(record.id, "", request)
    text, job_id = demo.data_tab.train(ADAPTER, request)
    log(text)
    started, seen = time.monotonic(), 0
    while (job := demo.jobs.get(job_id)).status not in ("succeeded", "failed", "cancelled"):
        events = demo.jobs.events(job_id)
        for event in events[seen:]:
            if event.get("message"):
                log(f"  job: {event['message']}")
            elif event.get("eta_s") is not None:
                log(f"  job: step {event.get('step')}, ETA {event['eta_s']:.0f} s")
        seen = len(events)
        if time.monotonic() - started > config.timeout:
            raise TimeoutError(f"job {job_id} still {job.status} after {config.timeout:.0f} s")
        time.sleep(5)
    if job.status != "succeeded":
        raise RuntimeError(f"job {job_id} {job.status}: {job.error}\n{demo.jobs.log_tail(job_id)}")
    return {"approved": len(pending), "job": job_id, "adapter": job.fine_tuned_model, "started": text,
            "seconds": round(time.monotonic() - started, 1), "listed": job.fine_tuned_model in demo.registry.adapters}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    config = parse_config(FeedbackLoopConfig, argv)
    load = machine_load()
    work = Path(config.work_dir or tempfile.mkdtemp(prefix="bench-feedback-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    pairs = [json.loads(line) for line in (Path(config.data_dir) / "train.pairs.jsonl").open()]
    first, others = pairs[: config.train_rows], pairs[config.train_rows: config.train_rows + config.feedback_rows]
    if len(others) < config.feedback_rows:
        raise SystemExit(f"--train-rows + --feedback-rows: train.pairs.jsonl has only {len(pairs)} rows")
    valid = write_rows([json.loads(line) for line in (Path(config.data_dir) / "valid.pairs.jsonl").open()]
                       [: config.valid_rows], work / "valid.jsonl")
    adapters = work / "adapters"
    adapter = fresh(adapters / ADAPTER)

    # 1. The adapter in use (train.sft holds out its default share: the scored rows stay unseen).
    if config.adapter:
        shutil.copytree(config.adapter, adapter)
    else:
        cmd = [sys.executable, "-m", "train.sft", str(write_rows(first, work / "train.jsonl")), "--output-dir",
               str(adapter), *shlex.split(config.train_args)]
        check(run_measured(cmd, timeout=config.timeout), "train.sft")
    before = score_run(config, adapter, valid)
    log(f"before: ROUGE-L {before['rouge_l']}, perplexity {before['perplexity']}")

    # 2. and 3. The app serves it; stored chats, corrections, the Data tab.
    from serve.registry import ModelRegistry
    from ui.app import build_app
    from ui.config import ChatConfig

    app_config = ChatConfig(adapters_dir=str(adapters), jobs_dir=str(fresh(work / "jobs")), admins="local")
    demo = build_app(app_config, defaults={"max_new_tokens": config.max_new_tokens, "temperature": 0.0},
                     registry=ModelRegistry(str(adapters), default=ADAPTER))
    demo.registry.get(ADAPTER)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        stored = store_and_correct(url.rstrip("/") + "/", others, config)
        log(f"stored {stored['stored']}, corrected {stored['corrected']} in {stored['seconds']} s")
        trained = train_on_these(demo, config)
    finally:
        if demo.jobs is not None:
            demo.jobs.close()
        demo.close()
    after = score_run(config, adapters / trained["adapter"], valid)
    log(f"after: ROUGE-L {after['rouge_l']}, perplexity {after['perplexity']}")

    report = json.loads((adapters / trained["adapter"] / "training_report.json").read_text())
    rows = [["before: " + ADAPTER, before["rouge_l"], before["perplexity"], before["bleu"]],
            ["after: " + trained["adapter"], after["rouge_l"], after["perplexity"], after["bleu"]]]
    print(table(["adapter", "ROUGE-L", "ref. perplexity", "BLEU"], rows))
    final = {
        "rouge_l_before": before["rouge_l"], "rouge_l_after": after["rouge_l"],
        "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
        "rouge_l_improved": after["rouge_l"] > before["rouge_l"],
        "perplexity_improved": after["perplexity"] < before["perplexity"],
        "stored": stored["stored"], "corrected": stored["corrected"], "approved": trained["approved"],
        "job_steps": report.get("steps"), "job_start_eval_loss": report.get("start_eval_loss"),
        "job_eval_loss": report.get("eval_loss"), "new_adapter_listed": trained["listed"],
        "train_rows": config.train_rows, "feedback_rows": config.feedback_rows, "valid_rows": config.valid_rows,
        "cpu": cpu_name(), "load_avg_1m_start": load,
    }
    out = Path(config.output)
    for metric, label, scale in (("rouge_l", "ROUGE-L x100 (higher is better)", 100),
                                 ("perplexity", "reference perplexity (lower is better)", 1)):
        bar_chart(out.with_name(f"{out.stem}_{metric}.png"), ["before", "after"],
                  [scale * before[metric], scale * after[metric]],
                  title=f"{ADAPTER}, then {config.feedback_rows} corrections learned", ylabel=label)
    path = write_results(out.stem, {"final": final, "config": vars(config), "before": before, "after": after,
                                    "stored": stored, "trained": trained, "job_report_steps": report.get("steps")},
                         out.parent)
    log(f"results: {path}")
    print_final(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
