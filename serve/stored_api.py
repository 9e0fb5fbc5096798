"""OpenAI's Stored Completions API over serve.store, and our feedback route.

A completion created with `store: true` (POST /v1/chat/completions, streaming or not) is kept with the
messages as the model saw them, its reply, settings, usage and `metadata`. Then, as in OpenAI's API:

    GET    /v1/chat/completions                  list (model, metadata[key]=value, order, after, limit)
    GET    /v1/chat/completions/{id}             one chat.completion (with its metadata)
    GET    /v1/chat/completions/{id}/messages    the request's messages (order, after, limit)
    POST   /v1/chat/completions/{id}             {"metadata": {...}}: replace its metadata
    DELETE /v1/chat/completions/{id}             delete it (and the feedback on it)

and our extension, the feedback that teaches the next adapter:

    POST   /v1/chat/completions/{id}/feedback    {"rating": "good"|"bad", "correction": "...", "comment": "..."}

Each caller (serve.access.caller) sees only its own completions; an admin (the API key's holder, a user in
--admins) sees everyone's. Another caller's id answers 404, as an unknown one does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from serve.access import AccessPolicy
from serve.http import APIError, Gate, api_router, read_body
from serve.openai_schema import describe
from serve.store import BadCursor, Completion, Feedback, Page, Store, StoreError, metadata_problem

logger = logging.getLogger(__name__)

PAGE_DEFAULT, PAGE_MOST = 20, 100  # OpenAI's `limit` default and maximum for these lists
MAX_BODY_BYTES = 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class MetadataUpdate(_Strict):
    """POST /v1/chat/completions/{id}: the new metadata (null: none)."""

    metadata: dict[str, str] | None

    @field_validator("metadata")
    @classmethod
    def _limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        problem = metadata_problem(value) if value is not None else None
        if problem:
            raise PydanticCustomError("invalid_metadata", problem)
        return value


class FeedbackRequest(_Strict):
    """POST /v1/chat/completions/{id}/feedback: each field optional, at least one given."""

    rating: Literal["good", "bad"] | None = None
    correction: str | None = Field(None, min_length=1)  # the reply the model should have given
    comment: str | None = Field(None, min_length=1)

    @field_validator("correction", "comment")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise PydanticCustomError("blank", "it is blank; leave it out instead")
        return value


_FIELDS = set(MetadataUpdate.model_fields) | set(FeedbackRequest.model_fields)


class StoredCompletionsServer:
    """The stored-completion routes over a Store (opened on first use by `store`)."""

    def __init__(
        self,
        store: Callable[[], Store],
        access: AccessPolicy | None = None,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        session_user: Callable[[Request], str | None] | None = None,
    ):
        self._store = store
        self.max_body_bytes = max_body_bytes
        self.gate = Gate(access or AccessPolicy(), session_user)
        self.router = api_router(self.gate)
        route = self.router.add_api_route
        route("/chat/completions", self.list, methods=["GET"])
        route("/chat/completions/{completion_id}", self.retrieve, methods=["GET"])
        route("/chat/completions/{completion_id}", self.update, methods=["POST"])
        route("/chat/completions/{completion_id}", self.delete, methods=["DELETE"])
        route("/chat/completions/{completion_id}/messages", self.messages, methods=["GET"])
        route("/chat/completions/{completion_id}/feedback", self.feedback, methods=["POST"])

    def store(self) -> Store:
        """The store, or a 503 saying why it cannot be opened."""
        try:
            return self._store()
        except StoreError as error:
            raise APIError(503, f"Stored completions are unavailable: {error}", kind="server_error") from None

    async def list(self, request: Request):
        """GET /v1/chat/completions: the caller's stored completions."""
        who, query = self.gate.caller(request), request.query_params
        metadata = {key[len("metadata["):-1]: value for key, value in query.multi_items()
                    if key.startswith("metadata[") and key.endswith("]")}
        order, limit = _order(request), _limit(request)

        def page() -> Page[Completion]:
            return self.store().list_completions(who, model=query.get("model") or None, metadata=metadata,
                                                 order=order, after=query.get("after") or None, limit=limit)

        done = await run_in_threadpool(_paged, page)
        return _list([chat_completion(c) for c in done.items], done)

    async def retrieve(self, request: Request, completion_id: str):
        """GET /v1/chat/completions/{completion_id}."""
        who = self.gate.caller(request)
        return chat_completion(_found(await run_in_threadpool(lambda: self.store().get(who, completion_id)),
                                      completion_id))

    async def messages(self, request: Request, completion_id: str):
        """GET /v1/chat/completions/{completion_id}/messages: the request's messages as the model saw them."""
        who, query = self.gate.caller(request), request.query_params
        order, limit = _order(request), _limit(request)

        def page() -> Page[dict] | None:
            return self.store().messages(who, completion_id, after=query.get("after") or None, limit=limit,
                                         order=order)

        done = _found(await run_in_threadpool(_paged, page), completion_id)
        return _list(done.items, done)

    async def update(self, request: Request, completion_id: str):
        """POST /v1/chat/completions/{completion_id}: replace its metadata."""
        who = self.gate.caller(request)
        body = _parse(MetadataUpdate, await read_body(request, self.max_body_bytes, self._too_large))
        done = await run_in_threadpool(lambda: self.store().update_metadata(who, completion_id, body.metadata))
        return chat_completion(_found(done, completion_id))

    async def delete(self, request: Request, completion_id: str):
        """DELETE /v1/chat/completions/{completion_id}."""
        who = self.gate.caller(request)
        _found(await run_in_threadpool(lambda: self.store().delete(who, completion_id)) or None, completion_id)
        logger.info("%s deleted %s", who.name, completion_id)
        return {"id": completion_id, "object": "chat.completion.deleted", "deleted": True}

    async def feedback(self, request: Request, completion_id: str):
        """POST /v1/chat/completions/{completion_id}/feedback: rate it, correct it, comment on it."""
        who = self.gate.caller(request)
        body = _parse(FeedbackRequest, await read_body(request, self.max_body_bytes, self._too_large))
        if body.rating is None and body.correction is None and body.comment is None:
            raise APIError(400, "Give at least one of 'rating' (\"good\" or \"bad\"), 'correction' (the reply it "
                                "should have given) or 'comment'.", param="rating", code="missing_required_parameter")
        done = await run_in_threadpool(lambda: self.store().add_feedback(
            who, completion_id, rating=body.rating, correction=body.correction, comment=body.comment))
        return feedback_object(_found(done, completion_id))

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body exceeds this server's limit of {self.max_body_bytes // 1024} KB "
                             "(the server's --max-request-kb).", code="request_too_large")


def chat_completion(completion: Completion) -> dict:
    """A stored completion as OpenAI's chat.completion object, with its metadata and settings; extensions:
    `owner` (whose it is), `source` ("api" or "app"); `system_fingerprint` is the adapter's version."""
    settings = completion.settings
    return {
        "id": completion.id,
        "object": "chat.completion",
        "created": completion.created,
        "model": completion.model,
        "choices": [{"index": 0, "message": dict(completion.reply), "finish_reason": completion.finish_reason,
                     "logprobs": None}],
        "usage": completion.usage,
        "metadata": dict(completion.metadata),
        "system_fingerprint": completion.adapter_version,
        "temperature": settings.get("temperature"),
        "top_p": settings.get("top_p"),
        "seed": settings.get("seed"),
        "owner": completion.owner,
        "source": completion.source,
    }


def feedback_object(feedback: Feedback) -> dict:
    """A feedback record as the API answers it."""
    return {
        "id": feedback.id,
        "object": "chat.completion.feedback",
        "completion_id": feedback.completion_id,
        "rating": feedback.rating,
        "correction": feedback.correction,
        "comment": feedback.comment,
        "status": feedback.status,
        "owner": feedback.owner,
        "created_at": feedback.created,
        "updated_at": feedback.updated,
    }


def _list(data: list[dict], page: Page) -> dict:
    return {"object": "list", "data": data, "first_id": page.first_id, "last_id": page.last_id,
            "has_more": page.has_more}


def _paged(page: Callable[[], Page | None]) -> Page | None:
    """page(), with an unknown `after` as a 400 naming it."""
    try:
        return page()
    except BadCursor as error:
        raise APIError(400, f"Invalid 'after': {error}.", param="after", code="invalid_value") from None


def _found(value, completion_id: str):
    if value is None:
        raise APIError(404, f"No stored chat completion with id '{completion_id}' (completions are stored with "
                            "store: true; list yours with GET /v1/chat/completions).",
                       param="completion_id", code="not_found")
    return value


def _order(request: Request) -> str:
    order = request.query_params.get("order", "asc")
    if order not in ("asc", "desc"):
        raise APIError(400, f"Invalid 'order': {order!r}; use 'asc' or 'desc'.", param="order", code="invalid_value")
    return order


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    try:
        limit = PAGE_DEFAULT if raw is None else int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= PAGE_MOST:
        raise APIError(400, f"Invalid 'limit': {raw!r}; use a whole number from 1 to {PAGE_MOST}.", param="limit",
                       code="invalid_value")
    return limit


def _parse(model: type[_Strict], body: bytes):
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as error:
        param, message, code = describe(error, _FIELDS)
        raise APIError(400, message, param=param, code=code) from None
