"""OpenAI-compatible `/v1/chat/completions` and `/v1/models`, served beside the Gradio app.

Built on the same runtime as the chat UI: requests go through `stream_reply`, so requests that
arrive together are generated in one batch, and a client that disconnects stops its generation.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from assistant.adapters import with_system
from assistant.chat_format import encode_prompt
from assistant.generation import GenerationParams, stream_reply
from serve.registry import BASE_CHOICE, ModelRegistry

logger = logging.getLogger(__name__)

BASE_ID = "base"
ROLES = {"system", "user", "assistant"}


class APIError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        """The JSON error response."""
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OpenAIServer:
    """The API's routes over a ModelRegistry; model ids are 'base' and the adapter menu names."""

    def __init__(self, registry: ModelRegistry, api_key: str | None, bind_host: str):
        self.registry, self.api_key, self.bind_host = registry, api_key, bind_host
        self.router = APIRouter(prefix="/v1")
        self.router.add_api_route("/models", self.models, methods=["GET"])
        self.router.add_api_route("/chat/completions", self.completions, methods=["POST"])

    def model_ids(self) -> list[str]:
        """Ids a client may pass as `model`."""
        return [BASE_ID, *self.registry.adapters]

    def _authorize(self, request: Request) -> None:
        if self.api_key:
            if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
                raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        elif not is_loopback(self.bind_host):
            raise APIError(
                403,
                "the API is served beyond localhost only with --api-key (or ASSISTANT_API_KEY)",
                code="api_key_required",
            )

    async def models(self, request: Request):
        """GET /v1/models."""
        try:
            self._authorize(request)
        except APIError as error:
            return error.response()
        created = int(time.time())
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "local"} for m in self.model_ids()
        ]
        return {"object": "list", "data": data}

    async def completions(self, request: Request):
        """POST /v1/chat/completions, streaming (SSE) or not."""
        try:
            self._authorize(request)
            body = await _json_body(request)
            call = await run_in_threadpool(self._prepare, body)
        except APIError as error:
            return error.response()
        if body.get("stream"):
            return StreamingResponse(self._sse(request, call), media_type="text/event-stream")
        return await run_in_threadpool(self._complete, call)

    def _prepare(self, body: dict) -> dict:
        """Validate the request and resolve its model; raises APIError."""
        model = body.get("model")
        if model not in self.model_ids():
            raise APIError(
                404,
                f"The model '{model}' does not exist; available: {', '.join(self.model_ids())}",
                param="model",
                code="model_not_found",
            )
        messages = _messages(body.get("messages"))
        if body.get("n", 1) != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        chat = self.registry.get(BASE_CHOICE if model == BASE_ID else model)
        if chat.trained_prompt:  # a chat without a system message gets the one the adapter was trained with
            messages = with_system(messages, chat.trained_prompt.text)
        params = GenerationParams(
            max_new_tokens=int(body.get("max_completion_tokens") or body.get("max_tokens") or 256),
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            top_k=0,  # OpenAI has no top-k: 0 turns it off
            repetition_penalty=1.0,
            seed=body.get("seed"),
        )
        prompt_tokens = len(encode_prompt(chat.tokenizer, messages))
        if prompt_tokens + params.max_new_tokens > chat.context_window:
            raise APIError(
                400,
                f"This model's maximum context length is {chat.context_window} tokens. However, you requested "
                f"{prompt_tokens + params.max_new_tokens} tokens ({prompt_tokens} in the messages, "
                f"{params.max_new_tokens} in the completion).",
                param="messages",
                code="context_length_exceeded",
            )
        stop = body.get("stop") or []
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "model": model,
            "chat": chat,
            "messages": messages,
            "params": params,
            "stop": [stop] if isinstance(stop, str) else list(stop),
            "prompt_tokens": prompt_tokens,
            "created": int(time.time()),
            "cancel": threading.Event(),
        }

    def _deltas(self, call: dict) -> Iterator[tuple[str, str | None]]:
        """(new text, finish_reason) pieces; stop sequences end the reply (and its generation)."""
        sent, text = "", ""
        for text in stream_reply(call["chat"], call["messages"], call["params"], cancel=call["cancel"]):
            cut = _cut_at_stop(text, call["stop"])
            if cut is not None:
                call["cancel"].set()
                yield cut[len(sent) :], "stop"
                return
            # Hold back a tail that could be the start of a stop sequence.
            safe = len(text) - _held_back(text, call["stop"])
            if safe > len(sent):
                yield text[len(sent) : safe], None
                sent = text[:safe]
        tokens = len(call["chat"].tokenizer(text, add_special_tokens=False)["input_ids"])
        call["completion_tokens"] = tokens
        yield text[len(sent) :], "length" if tokens >= call["params"].max_new_tokens else "stop"

    def _complete(self, call: dict) -> dict:
        content, finish = "", "stop"
        for piece, reason in self._deltas(call):
            content += piece
            finish = reason or finish
        completion = call.get("completion_tokens") or len(call["chat"].tokenizer(content)["input_ids"])
        return {
            "id": call["id"],
            "object": "chat.completion",
            "created": call["created"],
            "model": call["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": call["prompt_tokens"],
                "completion_tokens": completion,
                "total_tokens": call["prompt_tokens"] + completion,
            },
        }

    async def _sse(self, request: Request, call: dict) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None) -> str:
            body = {
                "id": call["id"],
                "object": "chat.completion.chunk",
                "created": call["created"],
                "model": call["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(body)}\n\n"

        pieces = self._deltas(call)
        try:
            yield chunk({"role": "assistant", "content": ""}, None)
            while (item := await run_in_threadpool(next, pieces, None)) is not None:
                if await request.is_disconnected():
                    break
                piece, finish = item
                if piece:
                    yield chunk({"content": piece}, None)
                if finish:
                    yield chunk({}, finish)
            yield "data: [DONE]\n\n"
        finally:
            # Disconnect or cancellation: stop this request's row of the batch at its next token.
            call["cancel"].set()
            await asyncio.shield(run_in_threadpool(pieces.close))


async def _json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"We could not parse the JSON body of your request: {error}") from error
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _messages(raw) -> list[dict[str, str]]:
    """OpenAI messages -> plain role/content dicts (text parts joined)."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise APIError(
                400, f"messages[{i}].role must be system, user or assistant", param=f"messages[{i}].role"
            )
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(
                p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must come from the user", param="messages")
    return out


def _cut_at_stop(text: str, stops: list[str]) -> str | None:
    hits = [text.index(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    return max((n for s in stops for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
