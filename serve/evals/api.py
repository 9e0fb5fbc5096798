"""OpenAI's Evals API (our subset), served beside `/v1/chat/completions`, so the `openai` SDK drives it unchanged:

    eval = client.evals.create(name="support", data_source_config={"type": "custom", "item_schema": {...}},
                               testing_criteria=[{"type": "text_similarity", "name": "rouge",
                                                  "evaluation_metric": "rouge_l", "pass_threshold": 0.2,
                                                  "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}])
    run = client.evals.runs.create(eval.id, data_source={"type": "completions", "model": "base",
        "source": {"type": "file_id", "id": file.id},   # a JSONL file uploaded with purpose "evals"
        "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.question}}"}]},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 64}})
    client.evals.runs.retrieve(run.id, eval_id=eval.id).result_counts
    client.evals.runs.output_items.list(run.id, eval_id=eval.id)

Routes: `/v1/evals` (create, list, retrieve, update, delete), `/v1/evals/{id}/runs` (create, list, retrieve,
cancel, delete), `/v1/evals/{id}/runs/{run}/output_items` (list, retrieve). Our extensions: the `perplexity`
criterion (serve.evals.definition), `progress` and `served_model` on a run, and
`GET /v1/evals/{id}/compare?run_a=&run_b=[&criterion=]`: run B against run A item by item (wins, ties, losses,
the mean difference with a bootstrap 95% interval, the items that got worse).
Who may call: serve.access's rule; each caller sees their own evals (an admin: everyone's).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from serve.access import AccessPolicy
from serve.evals.definition import ITEMS_MAX, EvalDefinition, EvalError, RunRequest, check_run, metadata_of
from serve.evals.runner import EvalRunner, check_items
from serve.evals.store import EvalStore, run_object
from serve.files import FileError, FileStore
from serve.http import APIError, Gate, api_router, read_body
from serve.store import Store

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024  # a file_content run carries its items in the body
PAGE_DEFAULT, PAGE_MOST = 20, 100
STORE_PAGE = 500  # completions read per query of a stored_completions source


class EvalsServer:
    """The /v1/evals routes over an EvalStore and its EvalRunner."""

    def __init__(self, store: EvalStore, runner: EvalRunner, models: Callable[[], list[str]],
                 access: AccessPolicy | None = None, *, max_body_bytes: int = MAX_BODY_BYTES):
        # models: the ids a run may name (what /v1/models lists).
        self.store, self.runner, self.models = store, runner, models
        self.max_body_bytes = max_body_bytes
        self.gate = Gate(access or AccessPolicy())
        self.router = api_router(self.gate)
        add = self.router.add_api_route
        add("/evals", self.create_eval, methods=["POST"])
        add("/evals", self.list_evals, methods=["GET"])
        add("/evals/{eval_id}", self.get_eval, methods=["GET"])
        add("/evals/{eval_id}", self.update_eval, methods=["POST"])
        add("/evals/{eval_id}", self.delete_eval, methods=["DELETE"])
        add("/evals/{eval_id}/compare", self.compare, methods=["GET"])
        add("/evals/{eval_id}/runs", self.create_run, methods=["POST"])
        add("/evals/{eval_id}/runs", self.list_runs, methods=["GET"])
        add("/evals/{eval_id}/runs/{run_id}", self.get_run, methods=["GET"])
        add("/evals/{eval_id}/runs/{run_id}", self.delete_run, methods=["DELETE"])
        add("/evals/{eval_id}/runs/{run_id}/cancel", self.cancel_run, methods=["POST"])
        add("/evals/{eval_id}/runs/{run_id}/output_items", self.list_items, methods=["GET"])
        add("/evals/{eval_id}/runs/{run_id}/output_items/{item_id}", self.get_item, methods=["GET"])

    async def _json(self, request: Request) -> object:
        body = await read_body(request, self.max_body_bytes, lambda: APIError(
            413, f"The request body exceeds this server's limit of {self.max_body_bytes // 1024} KB; upload the "
                 "items as a file (purpose \"evals\") and pass its file_id.", code="request_too_large"))
        try:
            return json.loads(body or b"{}")
        except ValueError as error:
            raise APIError(400, f"The body is not valid JSON: {error}", code="invalid_json") from None

    async def _call(self, work, *args):
        try:
            return await run_in_threadpool(work, *args)
        except EvalError as error:
            raise APIError(error.status, str(error), param=error.param, code=error.code) from None

    # -- evals ------------------------------------------------------------------------------------------
    async def create_eval(self, request: Request):
        """POST /v1/evals."""
        body, who = await self._json(request), self.gate.caller(request)
        return (await self._call(self.store.create_eval, who, body)).to_openai()

    async def list_evals(self, request: Request):
        """GET /v1/evals."""
        who = self.gate.caller(request)
        found = [e.to_openai() for e in await self._call(self.store.list_evals, who)]
        return _page(found, request)

    async def get_eval(self, request: Request, eval_id: str):
        """GET /v1/evals/{eval_id}."""
        return (await self._call(self.store.get_eval, self.gate.caller(request), eval_id)).to_openai()

    async def update_eval(self, request: Request, eval_id: str):
        """POST /v1/evals/{eval_id}: a new name or metadata."""
        body, who = await self._json(request), self.gate.caller(request)
        if not isinstance(body, dict):
            raise APIError(400, "The body must be a JSON object.", code="invalid_type")
        name = body.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise APIError(400, "'name' must be a non-empty string.", param="name")

        def update():
            return self.store.update_eval(who, eval_id, name, metadata_of(body.get("metadata")))

        return (await self._call(update)).to_openai()

    async def delete_eval(self, request: Request, eval_id: str):
        """DELETE /v1/evals/{eval_id}."""
        await self._call(self.store.delete_eval, self.gate.caller(request), eval_id)
        return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}

    async def compare(self, request: Request, eval_id: str):
        """GET /v1/evals/{eval_id}/compare?run_a=...&run_b=...[&criterion=...] (our extension)."""
        query = request.query_params
        for param in ("run_a", "run_b"):
            if not query.get(param):
                raise APIError(400, f"'{param}' is required: the id of a completed run of this eval.", param=param)
        return await self._call(self.store.compare_runs, self.gate.caller(request), eval_id, query["run_a"],
                                query["run_b"], query.get("criterion"))

    # -- runs -------------------------------------------------------------------------------------------
    async def create_run(self, request: Request, eval_id: str):
        """POST /v1/evals/{eval_id}/runs: queued at once, run in the background."""
        body, who = await self._json(request), self.gate.caller(request)

        def create():
            found = self.store.get_eval(who, eval_id)
            checked = check_run(body, found.definition, self.models())
            return self.runner.create(who, eval_id, checked, found.definition)

        return run_object(await self._call(create))

    async def list_runs(self, request: Request, eval_id: str):
        """GET /v1/evals/{eval_id}/runs[?status=]."""
        who = self.gate.caller(request)

        def runs():
            self.store.get_eval(who, eval_id)
            return [run_object(r) for r in self.store.list_runs(who, eval_id)]

        found = await self._call(runs)
        status = request.query_params.get("status")
        return _page([r for r in found if status is None or r["status"] == status], request)

    async def get_run(self, request: Request, eval_id: str, run_id: str):
        """GET /v1/evals/{eval_id}/runs/{run_id}: status, result counts, per-criterion results, progress."""
        return run_object(await self._call(self.store.get_run, self.gate.caller(request), eval_id, run_id))

    async def cancel_run(self, request: Request, eval_id: str, run_id: str):
        """POST /v1/evals/{eval_id}/runs/{run_id}/cancel."""
        return run_object(await self._call(self.runner.cancel, self.gate.caller(request), eval_id, run_id))

    async def delete_run(self, request: Request, eval_id: str, run_id: str):
        """DELETE /v1/evals/{eval_id}/runs/{run_id}."""
        await self._call(self.store.delete_run, self.gate.caller(request), eval_id, run_id)
        return {"object": "eval.run.deleted", "deleted": True, "run_id": run_id}

    async def list_items(self, request: Request, eval_id: str, run_id: str):
        """GET .../output_items[?status=pass|fail]: each item's reply and scores."""
        who = self.gate.caller(request)
        status = request.query_params.get("status")
        if status not in (None, "pass", "fail"):
            raise APIError(400, f"'status' must be pass or fail, not {status!r}.", param="status")

        def items():
            self.store.get_run(who, eval_id, run_id)
            return self.store.items(eval_id, run_id)

        found = await self._call(items)
        return _page([i for i in found if status is None or i["status"] == status], request)

    async def get_item(self, request: Request, eval_id: str, run_id: str, item_id: str):
        """GET .../output_items/{item_id}."""
        who = self.gate.caller(request)

        def item():
            self.store.get_run(who, eval_id, run_id)
            for found in self.store.items(eval_id, run_id):
                if found["id"] == item_id:
                    return found
            raise EvalError(f"No output item with id {item_id!r} in run {run_id!r}.", "output_item_id", status=404,
                            code="not_found")

        return await self._call(item)


def _page(objects: list[dict], request: Request) -> dict:
    """OpenAI's list page: `order` (asc, the default here, or desc), `after` (an id), `limit`."""
    query = request.query_params
    order = query.get("order", "asc")
    if order not in ("asc", "desc"):
        raise APIError(400, f"'order' must be asc or desc, not {order!r}.", param="order")
    try:
        limit = int(query.get("limit", PAGE_DEFAULT))
    except ValueError:
        limit = -1
    if not 1 <= limit <= PAGE_MOST:
        raise APIError(400, f"'limit' must be a whole number from 1 to {PAGE_MOST}.", param="limit")
    objects = objects[::-1] if order == "desc" else objects
    after = query.get("after")
    if after:
        ids = [o["id"] for o in objects]
        if after not in ids:
            raise APIError(400, f"No object with id {after!r} to list after; pass the last id of the previous page.",
                           param="after")
        objects = objects[ids.index(after) + 1:]
    data = objects[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(objects) > limit}


def item_source(files: FileStore, store: Callable[[], Store] | None) -> Callable:
    """The items of a run's source: an uploaded JSONL file, the request's content, or the caller's stored
    completions; each checked against the eval's item schema, refused by file and line."""

    def items(who, definition: EvalDefinition, request: RunRequest) -> list[dict]:
        source = request.source
        if source["type"] == "file_content":
            return [row["item"] for row in source["content"]]
        if source["type"] == "file_id":
            return _file_items(files, source["id"], definition)
        if store is None:
            raise EvalError("This server keeps no completions to evaluate.", "data_source.source.type")
        wanted, found, after = min(source.get("limit") or ITEMS_MAX, ITEMS_MAX), [], None
        while len(found) < wanted:  # newest first, a store page at a time
            page = store().list_completions(who, model=source.get("model"), metadata=source.get("metadata"),
                                            order="desc", after=after, limit=STORE_PAGE)
            found += [{"input": c.messages, "output": (c.reply or {}).get("content", ""), "model": c.model}
                      for c in page.items
                      if (source.get("created_after") is None or c.created >= source["created_after"])
                      and (source.get("created_before") is None or c.created < source["created_before"])]
            if not page.has_more:
                break
            after = page.items[-1].id
        found = found[:wanted]
        if not found:
            raise EvalError("No stored completion matches this source (model, metadata, dates); store some with "
                            "store: true first.", "data_source.source")
        return check_items(found, definition, lambda i: f"stored completion {found[i]}", "data_source.source")

    return items


def _file_items(files: FileStore, file_id: str, definition: EvalDefinition) -> list[dict]:
    param = "data_source.source.id"
    try:
        path, name = files.path(file_id), files.get(file_id).filename
    except FileError as error:
        raise EvalError(str(error), param, status=404, code="not_found") from None
    items, lines = [], path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise EvalError(f"{name} ({file_id}) line {number}: not JSON ({error.msg}).", param) from None
        # OpenAI's lines are {"item": {...}}; a bare object is taken as the item.
        item = row["item"] if isinstance(row, dict) and set(row) <= {"item", "sample"} and "item" in row else row
        items.append((number, item))
        if len(items) > ITEMS_MAX:
            raise EvalError(f"{name} ({file_id}) has more than {ITEMS_MAX} items; split it.", param)
    if not items:
        raise EvalError(f"{name} ({file_id}) holds no items.", param)
    return check_items([item for _, item in items], definition,
                       lambda i: f"{name} ({file_id}) line {items[i][0]}", param)
