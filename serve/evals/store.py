"""Where evals, their runs and the runs' output items are kept: one folder per eval under the jobs folder.

`<root>/<eval id>/eval.json` is the eval as created (re-checked when read); each run has
`<root>/<eval id>/runs/<run id>/run.json` (its request, status, counts, progress) and `items.jsonl` (one output
item per line, appended as items are graded, so a run's finished items survive a server stop). Files are
written whole and swapped in (os.replace), so a reader never sees half a run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from assistant.scoring import Comparison, compare
from serve.access import Caller
from serve.evals.definition import EvalDefinition, EvalError, check_eval
from serve.evals.evidence import Evidence

logger = logging.getLogger(__name__)

EVAL = "eval.json"
RUN = "run.json"
ITEMS = "items.jsonl"
SOURCE = "source.json"  # the run's items, read and checked when it was created
PRIVATE = ("owner", "owner_admin", "request", "seq", "resolved_model")  # kept on disk, not in the API's run object
ACTIVE = ("queued", "in_progress")  # OpenAI's run statuses; then completed, failed, canceled


def new_id(prefix: str) -> str:
    """An id like OpenAI's: "eval_" or "evalrun_" and 32 hex digits."""
    return f"{prefix}_{uuid.uuid4().hex}"


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.write_text(json.dumps(data, ensure_ascii=False, indent=1))
    os.replace(temporary, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Eval:
    """A stored eval: its OpenAI object, the checked definition, and whose it is."""

    data: dict
    definition: EvalDefinition

    @property
    def id(self) -> str:
        """The eval's id."""
        return self.data["id"]

    def to_openai(self) -> dict:
        """OpenAI's eval object."""
        return {k: v for k, v in self.data.items() if k != "owner"}


class EvalStore:
    """Evals, runs and output items on disk; each caller sees their own (an admin: everyone's)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)  # made by the first eval (a server that never evaluates leaves no folder)
        self.lock = threading.RLock()  # one writer at a time for a run's files

    # -- evals ------------------------------------------------------------------------------------------
    def create_eval(self, who: Caller, body: dict) -> Eval:
        """Check and keep a new eval; EvalError when the body is refused."""
        definition = check_eval(body)
        if definition.source == "custom":
            config = {"type": "custom", "schema": {"type": "object", "properties": {
                "item": definition.item_schema,
                **({"sample": {"type": "object", "properties": {"output_text": {"type": "string"}}}}
                   if definition.include_sample_schema else {})}, "required": ["item"]}}
        else:
            config = {"type": "stored_completions", "metadata": definition.stored_metadata,
                      "schema": {"type": "object", "properties": {"item": definition.item_schema}}}
        data = {"object": "eval", "id": new_id("eval"), "created_at": int(time.time()), "name": definition.name,
                "metadata": definition.metadata, "data_source_config": config,
                "testing_criteria": [c.to_openai() for c in definition.criteria], "owner": who.name,
                "request": body}
        folder = self.root / data["id"]
        folder.mkdir(parents=True)
        _write_json(folder / EVAL, data)
        return Eval(data, definition)

    def get_eval(self, who: Caller, eval_id: str) -> Eval:
        """The eval, or EvalError 404 when it is unknown or not `who`'s."""
        data = _read_json(self.root / eval_id / EVAL) if _safe(eval_id) else None
        if data is None or not _visible(who, data):
            raise EvalError(f"No eval with id {eval_id!r}.", "eval_id", status=404, code="not_found")
        return Eval(data, check_eval(data["request"]))

    def list_evals(self, who: Caller) -> list[Eval]:
        """`who`'s evals, oldest first."""
        found = []
        for folder in self.root.iterdir() if self.root.is_dir() else ():
            data = _read_json(folder / EVAL)
            if data and _visible(who, data):
                found.append(Eval(data, check_eval(data["request"])))
        return sorted(found, key=lambda e: (e.data["created_at"], e.id))

    def update_eval(self, who: Caller, eval_id: str, name: str | None, metadata: dict | None) -> Eval:
        """Rename an eval or replace its metadata."""
        with self.lock:
            found = self.get_eval(who, eval_id)
            data = dict(found.data)
            if name is not None:
                data["name"] = name
            if metadata is not None:
                data["metadata"] = metadata
            _write_json(self.root / eval_id / EVAL, data)
            return Eval(data, found.definition)

    def delete_eval(self, who: Caller, eval_id: str) -> None:
        """Remove an eval with its runs (EvalError 409 while one of them runs)."""
        with self.lock:
            self.get_eval(who, eval_id)
            if any(r["status"] in ACTIVE for r in self.list_runs(who, eval_id)):
                raise EvalError(f"Eval {eval_id} has a run in progress; cancel it first.", "eval_id", status=409,
                                code="run_in_progress")
            shutil.rmtree(self.root / eval_id)

    # -- runs -------------------------------------------------------------------------------------------
    def create_run(self, who: Caller, eval_id: str, run: dict, items: list[dict]) -> dict:
        """Keep a new run (status queued) of `eval_id` and its data source's `items`; `run` is its object so far."""
        with self.lock:
            self.get_eval(who, eval_id)
            folder = self.root / eval_id / "runs" / run["id"]
            folder.mkdir(parents=True)
            (folder / ITEMS).touch()
            _write_json(folder / SOURCE, {"items": items})
            _write_json(folder / RUN, {**run, "owner": who.name, "owner_admin": who.admin})
            return run

    def source(self, eval_id: str, run_id: str) -> list[dict]:
        """The items a run answers, as read when it was created."""
        return (_read_json(self.run_path(eval_id, run_id) / SOURCE) or {"items": []})["items"]

    def run_path(self, eval_id: str, run_id: str) -> Path:
        """The run's folder."""
        return self.root / eval_id / "runs" / run_id

    def get_run(self, who: Caller | None, eval_id: str, run_id: str) -> dict:
        """The run's stored object (with its owner); `who` None: the runner's own read. EvalError 404."""
        data = _read_json(self.run_path(eval_id, run_id) / RUN) if _safe(eval_id) and _safe(run_id) else None
        if data is None or (who is not None and not _visible(who, data)):
            raise EvalError(f"No run with id {run_id!r} in eval {eval_id!r}.", "run_id", status=404,
                            code="not_found")
        return data

    def list_runs(self, who: Caller | None, eval_id: str) -> list[dict]:
        """The eval's runs, oldest first."""
        folder = self.root / eval_id / "runs"
        runs = [data for path in (folder.iterdir() if folder.is_dir() else ())
                if (data := _read_json(path / RUN)) and (who is None or _visible(who, data))]
        return sorted(runs, key=lambda r: (r["created_at"], r.get("seq", 0), r["id"]))

    def save_run(self, data: dict) -> None:
        """Write a run's object back."""
        with self.lock:
            _write_json(self.run_path(data["eval_id"], data["id"]) / RUN, data)

    def update_run(self, eval_id: str, run_id: str, **changes) -> dict:
        """Change fields of a run's object and write it back."""
        with self.lock:
            data = self.get_run(None, eval_id, run_id)
            data.update(changes)
            self.save_run(data)
            return data

    def delete_run(self, who: Caller, eval_id: str, run_id: str) -> None:
        """Remove a run that is not running (EvalError 409 while it runs)."""
        with self.lock:
            data = self.get_run(who, eval_id, run_id)
            if data["status"] in ACTIVE:
                raise EvalError(f"Run {run_id} is {data['status']}; cancel it first.", "run_id", status=409,
                                code="run_in_progress")
            shutil.rmtree(self.run_path(eval_id, run_id))

    def clear_items(self, eval_id: str, run_id: str) -> None:
        """Drop a run's output items (it runs again from the start)."""
        with self.lock:
            (self.run_path(eval_id, run_id) / ITEMS).write_text("")

    def add_item(self, eval_id: str, run_id: str, item: dict) -> None:
        """Append one output item."""
        with self.lock, (self.run_path(eval_id, run_id) / ITEMS).open("a", encoding="utf-8") as out:
            out.write(json.dumps(item, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())

    def items(self, eval_id: str, run_id: str) -> list[dict]:
        """The run's output items in the order of its data source."""
        path = self.run_path(eval_id, run_id) / ITEMS
        out = []
        for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else ():
            try:
                out.append(json.loads(line))
            except ValueError:  # a torn last line from a kill mid-write
                continue
        return sorted(out, key=lambda i: i["datasource_item_id"])

    # -- comparisons ------------------------------------------------------------------------------------
    def compare_runs(self, who: Caller | None, eval_id: str, run_a: str, run_b: str,
                     criterion: str | None = None) -> dict:
        """Run B against run A item by item on one criterion's score (default: the eval's first)."""
        return self._compared(who, eval_id, run_a, run_b, criterion)[0]

    def _compared(self, who: Caller | None, eval_id: str, run_a: str, run_b: str,
                  criterion: str | None) -> tuple[dict, Comparison]:
        """compare_runs' figures, and the Comparison they come from (scores signed so that higher wins)."""
        found = self.get_eval(who, eval_id) if who is not None else self.eval_of(eval_id)
        names = [c.name for c in found.definition.criteria]
        criterion = criterion or names[0]
        if criterion not in names:
            raise EvalError(f"Eval {eval_id} has no testing criterion {criterion!r}; it has {', '.join(names)}.",
                            "criterion")
        runs = {}
        for param, run_id in (("run_a", run_a), ("run_b", run_b)):
            run = self.get_run(who, eval_id, run_id)
            if run["status"] != "completed":
                raise EvalError(f"Run {run_id} is {run['status']}; only completed runs compare.", param, status=409)
            runs[param] = run
        scored_a, scored_b = (self._scores(eval_id, r, criterion) for r in (run_a, run_b))
        shared = sorted(scored_a.keys() & scored_b.keys())
        if not shared:
            raise EvalError(f"Runs {run_a} and {run_b} have no graded item in common.", "run_b", status=409)
        lower_better = next(c for c in found.definition.criteria if c.name == criterion).type == "perplexity"
        sign = -1.0 if lower_better else 1.0  # a lower perplexity is a win
        result = compare([sign * scored_a[i][0] for i in shared], [sign * scored_b[i][0] for i in shared])
        worse = [{**w, "datasource_item_id": shared[w["index"]], "item": scored_b[shared[w["index"]]][2],
                  "a": sign * w["a"], "b": sign * w["b"], "difference": sign * w["difference"],
                  "reply_a": scored_a[shared[w["index"]]][1], "reply_b": scored_b[shared[w["index"]]][1]}
                 for w in result.worse]
        body = result.to_dict()
        body.update(worse=worse, mean_a=sign * result.mean_a, mean_b=sign * result.mean_b,
                    mean_difference=sign * result.mean_difference,
                    interval=sorted([sign * result.interval[0], sign * result.interval[1]]),
                    per_item=[{"datasource_item_id": i, "a": scored_a[i][0], "b": scored_b[i][0]} for i in shared])
        return {"object": "eval.comparison", "eval_id": eval_id, "criterion": criterion,
                "lower_is_better": lower_better, "run_a": run_a, "run_b": run_b,
                "model_a": runs["run_a"]["model"], "model_b": runs["run_b"]["model"],
                "pass_rate_a": _pass_rate(runs["run_a"], criterion), "pass_rate_b": _pass_rate(runs["run_b"], criterion),
                "description": result.describe(runs["run_a"]["model"], runs["run_b"]["model"], criterion),
                **body}, result

    def _scores(self, eval_id: str, run_id: str, criterion: str) -> dict[int, tuple[float, str, dict]]:
        scores = {}
        for item in self.items(eval_id, run_id):
            for result in item["results"]:
                if result["name"] == criterion and result.get("score") is not None:
                    reply = (item["sample"]["output"] or [{}])[0].get("content") or ""
                    scores[item["datasource_item_id"]] = (float(result["score"]), reply, item["datasource_item"])
        return scores

    def eval_of(self, eval_id: str) -> Eval:
        """The eval, whoever owns it (the runner's and the gate's read); EvalError 404 when unknown."""
        data = _read_json(self.root / eval_id / EVAL) if _safe(eval_id) else None
        if data is None:
            raise EvalError(f"No eval with id {eval_id!r}.", "eval_id", status=404, code="not_found")
        return Eval(data, check_eval(data["request"]))

    def evidence(self, candidate: str, current: str, criterion: str | None = None) -> Evidence | None:
        """The newest eval with completed runs of both models (each model's newest run): the promotion gate's
        figures; None when no eval has both."""
        folders = self.root.iterdir() if self.root.is_dir() else ()
        for found in sorted((self.eval_of(p.name) for p in folders if (p / EVAL).is_file()),
                            key=lambda e: e.data["created_at"], reverse=True):
            done = [r for r in self.list_runs(None, found.id) if r["status"] == "completed"]
            newest = {}
            for run in done:  # oldest first, so the newest run of each model wins
                newest[run.get("resolved_model") or run["model"]] = run
                newest[run["model"]] = run
            if candidate in newest and current in newest and newest[candidate]["id"] != newest[current]["id"]:
                name = criterion or found.definition.criteria[0].name
                figures, comparison = self._compared(None, found.id, newest[current]["id"], newest[candidate]["id"],
                                                     name)
                return Evidence(
                    eval_id=found.id, criterion=name, candidate=candidate, current=current,
                    candidate_run=newest[candidate]["id"], current_run=newest[current]["id"],
                    candidate_pass_rate=figures["pass_rate_b"], current_pass_rate=figures["pass_rate_a"],
                    comparison=comparison,
                )
        return None


def run_object(run: dict) -> dict:
    """OpenAI's eval.run object of a stored run (our extras: progress, resolved_model as `served_model`)."""
    out = {k: v for k, v in run.items() if k not in PRIVATE}
    out["served_model"] = run.get("resolved_model")
    return out


def _pass_rate(run: dict, criterion: str) -> float:
    for result in run.get("per_testing_criteria_results") or []:
        if result["testing_criteria"] == criterion:
            graded = result["passed"] + result["failed"]
            return round(result["passed"] / graded, 6) if graded else 0.0
    return 0.0


def _visible(who: Caller, data: dict) -> bool:
    return who.admin or data.get("owner") == who.name


def _safe(name: str) -> bool:
    """An id that is a plain folder name (never a path)."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")
