"""Eval runs as background jobs: the model answers each item as the API would, the graders score each reply.

One run at a time, oldest first, on its own thread, using the models this server already holds (the registry):
requests go through the batch engine together, as concurrent chats do. A run reports progress (items done,
rate, ETA) in its object while it runs, can be cancelled, and keeps each graded item as it goes. A run that
fails, or whose thread dies, is marked failed with the reason: no caller waits on a dead thread. Runs left
queued or in progress by a stopped server start again when the next one starts.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from assistant.adapters import messages_for
from assistant.batching import MAX_BATCH
from assistant.chat_format import encode_prompt
from assistant.generation import GenerationParams, complete_reply
from assistant.likelihood import reply_nll
from assistant.loading import ChatModel
from assistant.scoring import similarity, string_check
from serve.access import Caller
from serve.evals.definition import (
    Criterion,
    EvalDefinition,
    EvalError,
    RunRequest,
    item_problem,
    lookup,
    render,
)
from serve.evals.store import ACTIVE, EvalStore, new_id

logger = logging.getLogger(__name__)

# The model a run's `model` id names, resolved once when the run starts: (the ChatModel, the name it resolved to).
Resolve = Callable[[str], tuple[ChatModel, str]]
# The items of a run's source, each a dict, checked against the item schema; EvalError naming the line otherwise.
Items = Callable[[Caller, EvalDefinition, RunRequest], list[dict]]
PROGRESS_EVERY_S = 1.0


@dataclass
class _Active:
    eval_id: str
    run_id: str
    cancel: threading.Event
    replies: set[threading.Event] = field(default_factory=set)  # one per reply being generated (the engine
    # sets a reply's event when it ends, so each needs its own)

    def stop(self) -> None:
        """Cancel the run and every reply it is generating."""
        self.cancel.set()
        for event in list(self.replies):
            event.set()


class EvalRunner:
    """Runs queued eval runs one at a time on a background thread."""

    def __init__(self, store: EvalStore, resolve: Resolve, items: Items):
        self.store, self.resolve, self.items = store, resolve, items
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: list[tuple[str, str]] = []
        self._active: _Active | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._requeue_left_over()

    def _requeue_left_over(self) -> None:
        """Runs a stopped server left queued or running start again (their items so far are dropped)."""
        folders = self.store.root.iterdir() if self.store.root.is_dir() else ()
        for folder in sorted(p for p in folders if p.is_dir()):
            for run in self.store.list_runs(None, folder.name):
                if run["status"] in ACTIVE:
                    self.store.clear_items(folder.name, run["id"])
                    self.store.update_run(folder.name, run["id"], status="queued")
                    self._queue.append((folder.name, run["id"]))

    # -- the API's side ---------------------------------------------------------------------------------
    def create(self, who: Caller, eval_id: str, request: RunRequest, definition: EvalDefinition) -> dict:
        """Queue a run; its items are read and checked first, so bad data is refused before any work."""
        items = self.items(who, definition, request)
        now = int(time.time())
        run = {
            "object": "eval.run", "id": new_id("evalrun"), "eval_id": eval_id, "created_at": now, "seq": time.time_ns(),
            "name": request.name, "model": request.model, "status": "queued", "data_source": request.raw,
            "metadata": request.metadata, "error": None, "report_url": "",
            "result_counts": {"total": len(items), "passed": 0, "failed": 0, "errored": 0},
            "per_testing_criteria_results": [{"testing_criteria": c.name, "passed": 0, "failed": 0}
                                             for c in definition.criteria],
            "per_model_usage": [], "progress": {"done": 0, "total": len(items), "items_per_second": None,
                                                "eta_seconds": None},
            "request": {k: v for k, v in asdict(request).items() if k not in ("raw", "source")},
        }
        self.store.create_run(who, eval_id, run, items)
        with self._wake:
            self._queue.append((eval_id, run["id"]))
            self._ensure_thread()
            self._wake.notify_all()
        return run

    def cancel(self, who: Caller, eval_id: str, run_id: str) -> dict:
        """Cancel a queued or running run (a finished one is returned as it is)."""
        with self._wake:
            run = self.store.get_run(who, eval_id, run_id)
            if run["status"] == "queued":
                self._queue = [q for q in self._queue if q != (eval_id, run_id)]
                return self.store.update_run(eval_id, run_id, status="canceled")
            if self._active and (self._active.eval_id, self._active.run_id) == (eval_id, run_id):
                self._active.stop()
        return self.store.get_run(who, eval_id, run_id)

    def wait(self, eval_id: str, run_id: str, timeout: float = 600.0) -> dict:
        """Block until the run ends (tests and commands); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.store.get_run(None, eval_id, run_id)
            if run["status"] not in ACTIVE:
                return run
            with self._wake:
                self._ensure_thread()
            time.sleep(0.1)
        raise TimeoutError(f"eval run {run_id} did not finish within {timeout:.0f} s")

    def close(self) -> None:
        """Stop after the current item; what is not done stays queued for the next start."""
        with self._wake:
            self._closed = True
            if self._active:
                self._active.stop()
            self._wake.notify_all()

    def _ensure_thread(self) -> None:
        """Start the worker (again, if it died: its run was marked failed by the guard below)."""
        if self._queue and not self._closed and (self._thread is None or not self._thread.is_alive()):
            self._thread = threading.Thread(target=self._work, name="eval-runs", daemon=True)
            self._thread.start()

    # -- the worker -------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                eval_id, run_id = self._queue.pop(0)
                self._active = _Active(eval_id, run_id, threading.Event())
            try:
                self._run(self._active)
            except BaseException as error:  # the run fails with the reason; the worker goes on
                logger.exception("eval run %s failed", run_id)
                self.store.update_run(eval_id, run_id, status="failed",
                                      error={"code": "run_failed", "message": f"{type(error).__name__}: {error}"})
            finally:
                with self._wake:
                    self._active = None

    def _run(self, active: _Active) -> None:
        store, eval_id, run_id = self.store, active.eval_id, active.run_id
        run = store.get_run(None, eval_id, run_id)
        if run["status"] != "queued":
            return
        definition = store.eval_of(eval_id).definition
        request = _request_of(run)
        chat, resolved = self.resolve(request.model)
        run = store.update_run(eval_id, run_id, status="in_progress", resolved_model=resolved)
        items = store.source(eval_id, run_id)
        params = GenerationParams.resolve(
            chat.generation_defaults, temperature=request.temperature, top_p=request.top_p,
            max_new_tokens=request.max_completion_tokens, seed=request.seed if request.temperature > 0 else None)
        counts = {"passed": 0, "failed": 0, "errored": 0}
        per = {c.name: {"passed": 0, "failed": 0} for c in definition.criteria}
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        started, shown = time.monotonic(), 0.0
        done = 0

        def one(index: int) -> dict:
            reply = threading.Event()
            active.replies.add(reply)
            try:
                if active.cancel.is_set():
                    return {}
                return self._item(chat, definition, request, params, index, items[index], reply)
            finally:
                active.replies.discard(reply)

        with ThreadPoolExecutor(MAX_BATCH) as pool:  # together, so the engine batches them
            for output in pool.map(one, range(len(items))):
                if active.cancel.is_set():
                    break
                output.update(run_id=run_id, eval_id=eval_id)
                store.add_item(eval_id, run_id, output)
                done += 1
                usage["prompt_tokens"] += output["sample"]["usage"]["prompt_tokens"]
                usage["completion_tokens"] += output["sample"]["usage"]["completion_tokens"]
                if output["sample"]["error"]:
                    counts["errored"] += 1
                else:
                    counts["passed" if all(r["passed"] for r in output["results"]) else "failed"] += 1
                    for result in output["results"]:
                        per[result["name"]]["passed" if result["passed"] else "failed"] += 1
                if time.monotonic() - shown >= PROGRESS_EVERY_S or done == len(items):
                    shown = time.monotonic()
                    rate = done / max(shown - started, 1e-6)
                    store.update_run(eval_id, run_id, **_figures(run, counts, per, usage, resolved, done, len(items),
                                                                rate))
        rate = done / max(time.monotonic() - started, 1e-6)
        status = "completed" if done == len(items) else "canceled"
        store.update_run(eval_id, run_id, status=status, seconds=round(time.monotonic() - started, 2),
                         **_figures(run, counts, per, usage, resolved, done, len(items), rate))

    def _item(self, chat: ChatModel, definition: EvalDefinition, request: RunRequest, params: GenerationParams,
              index: int, item: dict, cancel: threading.Event) -> dict:
        """One output item: the reply to the item's messages and each criterion's result."""
        if request.template is not None:
            messages = [{"role": m["role"], "content": render(m["content"], item)} for m in request.template]
        else:
            messages = [{"role": m.get("role"), "content": m.get("content")} for m in lookup(item, request.item_reference)]
        served = messages_for(messages, chat.trained_prompt)  # the one prompt rule, as the API serves
        prompt_tokens = len(encode_prompt(chat.tokenizer, served))
        error, reply, finish = None, "", "stop"
        try:
            reply = complete_reply(chat, served, params, cancel=cancel)
            tokens = len(chat.tokenizer(reply, add_special_tokens=False)["input_ids"])
            finish = "length" if tokens >= params.max_new_tokens else "stop"
        except Exception as failure:  # one item's failure is counted as errored, the run goes on
            logger.exception("eval item %d failed", index)
            error, tokens = {"code": "generation_failed", "message": str(failure)}, 0
        sample = {"output_text": reply}
        results = [] if error else [_grade(c, chat, served, item, sample) for c in definition.criteria]
        return {
            "object": "eval.run.output_item", "id": new_id("outputitem"), "run_id": "", "eval_id": "",
            "created_at": int(time.time()), "status": "fail" if error else
            ("pass" if all(r["passed"] for r in results) else "fail"),
            "datasource_item_id": index, "datasource_item": item, "results": results,
            "sample": {"input": served, "output": [{"role": "assistant", "content": reply}], "finish_reason": finish,
                       "model": request.model, "error": error, "temperature": params.temperature,
                       "top_p": params.top_p, "max_completion_tokens": params.max_new_tokens, "seed": request.seed,
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                                 "total_tokens": prompt_tokens + tokens, "cached_tokens": 0}},
        }


def _grade(criterion: Criterion, chat: ChatModel, served: list[dict], item: dict, sample: dict) -> dict:
    """One criterion's result on one item: {name, type, score, passed}."""
    reference = render(criterion.reference, item, sample)
    if criterion.type == "perplexity":
        total, count = reply_nll(chat, [*served, {"role": "assistant", "content": reference}])
        perplexity = math.exp(total / max(count, 1))
        passed = criterion.max_perplexity is None or perplexity <= criterion.max_perplexity
        return {"name": criterion.name, "type": criterion.type, "score": round(perplexity, 4), "passed": passed}
    text = render(criterion.input, item, sample)
    if criterion.type == "text_similarity":
        score = similarity(criterion.metric, reference, text)
        return {"name": criterion.name, "type": criterion.type, "score": round(score, 6),
                "passed": score >= criterion.pass_threshold}
    passed = string_check(criterion.operation, text, reference)
    return {"name": criterion.name, "type": criterion.type, "score": 1.0 if passed else 0.0, "passed": passed}


def _figures(run: dict, counts: dict, per: dict, usage: dict, resolved: str, done: int, total: int,
             rate: float) -> dict:
    """The run object's counts, per-criterion results, usage and progress."""
    return {
        "result_counts": {"total": total, **counts},
        "per_testing_criteria_results": [{"testing_criteria": name, **figures} for name, figures in per.items()],
        "per_model_usage": [{"model_name": resolved, "invocation_count": done, "cached_tokens": 0,
                             "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                             "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}],
        "progress": {"done": done, "total": total, "items_per_second": round(rate, 3),
                     "eta_seconds": round((total - done) / rate, 1) if rate > 0 else None},
    }


def _request_of(run: dict) -> RunRequest:
    """The run's checked request, as stored when it was created."""
    stored = dict(run["request"])
    stored["template"] = tuple(stored["template"]) if stored["template"] is not None else None
    return RunRequest(**stored, source=run["data_source"]["source"], raw=run["data_source"])


def check_items(items: list[object], definition: EvalDefinition, where: Callable[[int], str],
                param: str) -> list[dict]:
    """Each item fits the eval's item schema; EvalError naming the first one that does not (by `where(i)`)."""
    for index, item in enumerate(items):
        problem = item_problem(item, definition.item_schema)
        if problem:
            raise EvalError(f"{where(index)}: {problem}.", param)
    return list(items)
