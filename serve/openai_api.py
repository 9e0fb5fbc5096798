"""OpenAI-compatible `/v1/chat/completions` and `/v1/models`, served beside the Gradio app.

Built on the same runtime as the chat UI: requests go through `stream_reply`, so requests that
arrive together are generated in one batch, and a client that disconnects stops its generation
(streaming or not). Bodies are size-limited and validated (serve.openai_schema) before any model
work; who may call is serve.access's rule. With `store: true` the completion is kept (serve.store, for the
caller serve.access.caller names) once its reply is complete; serve.stored_api serves it back.

A model alias (serve.promotion, e.g. `production`) is a model id too: /v1/models lists it with `alias_of`, its
model now, and a request for it is served by that model, named once when the request starts (a reply keeps its
model while the alias moves) and named in the reply's `model`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from assistant.adapters import messages_for
from assistant.chat_format import encode_prompt
from assistant.generation import stream_reply
from serve.access import AccessPolicy
from serve.http import APIError, Gate, api_router, read_body
from serve.openai_schema import InvalidRequest, validate_chat
from serve.promotion import BASE_ID
from serve.registry import BASE_CHOICE, ModelRegistry
from serve.store import Store

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024  # default body limit (ServerConfig.max_request_kb)
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class OpenAIServer:
    """The API's routes over a ModelRegistry; model ids are 'base' and the adapter menu names."""

    def __init__(
        self,
        registry: ModelRegistry,
        access: AccessPolicy | None = None,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        session_user: Callable[[Request], str | None] | None = None,
        store: Callable[[], Store] | None = None,
    ):
        # session_user: the logged-in user of a request (default: the Gradio app's login cookie).
        # store: opens (once) and returns the store `store: true` keeps completions in (None: not kept here).
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.store = store
        self.gate = Gate(access or AccessPolicy(), session_user)
        self.router = api_router(self.gate)
        self.router.add_api_route("/models", self.models, methods=["GET"])
        self.router.add_api_route("/chat/completions", self.completions, methods=["POST"])

    def model_ids(self) -> list[str]:
        """Ids a client may pass as `model`: the base model, the adapters, the aliases whose model is one of them."""
        return model_ids(self.registry)

    def _aliases(self) -> dict[str, str]:
        # Alias -> model id; a stand-in registry without aliases (tests, a remote front end) has none.
        return getattr(self.registry, "aliases", {})

    async def models(self, request: Request):
        """GET /v1/models; each adapter's object also says the system prompt it was trained with, its
        generation settings (what this server applies when a request leaves them out) and how it is served
        (device, precision, decode loop and why)."""
        return {"object": "list", "data": await run_in_threadpool(self._model_objects)}

    def _model_objects(self) -> list[dict]:
        created = int(time.time())
        objects, aliases = [], self._aliases()
        for model in self.model_ids():
            target = aliases.get(model, model)
            choice = BASE_CHOICE if target == BASE_ID else target
            item = {"id": model, "object": "model", "created": created, "owned_by": "local"}
            if model in aliases:
                item["alias_of"] = target
            trained = self.registry.trained_prompt(choice)
            if trained is not None and trained.text is not None:
                item["trained_system_prompt"] = trained.text
            item["generation_config"] = self.registry.generation_defaults(choice)
            if hasattr(self.registry, "serving"):  # a stand-in registry (tests, a remote front end) may not say
                item["serving"] = self.registry.serving(choice)
            objects.append(item)
        return objects

    async def completions(self, request: Request):
        """POST /v1/chat/completions, streaming (SSE) or not."""
        body = await read_body(request, self.max_body_bytes, self._too_large)
        call = await run_in_threadpool(self._prepare, body)
        call["who"] = self.gate.caller(request)
        if call["stream"]:
            return StreamingResponse(self._sse(request, call), media_type="text/event-stream")
        reply = await self._complete_while_connected(request, call)
        if call["store"] and not call["disconnected"]:
            choice = reply["choices"][0]
            await run_in_threadpool(self._save, call, choice["message"]["content"], choice["finish_reason"])
        return reply

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"The request body exceeds this server's limit of {self.max_body_bytes // 1024} KB "
            "(the server's --max-request-kb).",
            code="request_too_large",
        )

    def _prepare(self, body: bytes) -> dict:
        """Validate the request and resolve its model; raises APIError."""
        try:
            req = validate_chat(body)
        except InvalidRequest as error:
            raise APIError(400, error.message, param=error.param, code=error.code) from None
        if req.model not in self.model_ids():
            raise self._no_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        if req.store and self.store is None:
            raise APIError(400, "This server keeps no completions: leave 'store' out (or false).", param="store")
        messages = req.plain_messages()
        if messages[-1]["role"] != "user":
            raise APIError(400, "the last message must come from the user", param="messages")
        # An alias names its model once, here: the reply is that model's even if the alias moves meanwhile.
        model = self._aliases().get(req.model, req.model)
        try:
            chat = self.registry.get(BASE_CHOICE if model == BASE_ID else model)
        except LookupError as error:  # removed or broken since it was listed
            raise self._no_model(req.model, str(error)) from None
        messages = messages_for(messages, chat.trained_prompt)  # the one prompt rule
        params = req.generation(chat.generation_defaults)
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
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "model": model,
            "chat": chat,
            "messages": messages,
            "params": params,
            "stop": req.stops(),
            "stream": bool(req.stream),
            "include_usage": bool(req.stream_options and req.stream_options.include_usage),
            "prompt_tokens": prompt_tokens,
            "created": int(time.time()),
            "cancel": threading.Event(),
            "disconnected": False,
            "store": bool(req.store),
            "metadata": dict(req.metadata or {}),
            "settings": {**asdict(params), "stop": req.stops()},
            "adapter_version": folder.version if (folder := getattr(chat, "folder", None)) else None,
        }

    def _no_model(self, model: str, reason: str | None = None) -> APIError:
        unavailable = getattr(self.registry, "unavailable", {}).get(model)  # a listed folder that cannot load
        reason = reason or (unavailable.describe() if unavailable else None)
        if reason is None and model in (aliases := self._aliases()):
            reason = f"it is an alias of {aliases[model]!r}, which is not served; promote another model to it"
        return APIError(
            404,
            f"The model '{model}' does not exist" + (f" or cannot be served ({reason})" if reason else "")
            + f"; available: {', '.join(self.model_ids())}",
            param="model",
            code="model_not_found",
        )

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
        try:
            for piece, reason in self._deltas(call):
                content += piece
                finish = reason or finish
        except Exception as error:  # a failed generation answers as an error object, not a bare 500
            logger.exception("generation failed for %s", call["id"])
            raise APIError(500, f"The reply could not be generated: {error}", kind="server_error") from error
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
            "usage": _usage(call, content),
        }

    async def _complete_while_connected(self, request: Request, call: dict) -> dict:
        """`_complete` in the thread pool; a client that goes away cancels it (its batch row is freed)."""
        work = asyncio.ensure_future(run_in_threadpool(self._complete, call))
        while not (await asyncio.wait({work}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                logger.info("%s: client disconnected, cancelling its reply", call["id"])
                call["disconnected"] = True
                call["cancel"].set()
                break
        return await work

    def _save(self, call: dict, content: str, finish: str) -> None:
        """Keep a complete reply (`store: true`) for the caller who asked; APIError when it cannot be kept."""
        try:
            self.store().add_completion(
                call["who"], id=call["id"], created=call["created"], model=call["model"], messages=call["messages"],
                reply={"role": "assistant", "content": content}, finish_reason=finish, settings=call["settings"],
                usage=_usage(call, content), metadata=call["metadata"], adapter_version=call["adapter_version"],
                source="api",
            )
        except Exception as error:
            logger.exception("could not store %s", call["id"])
            raise APIError(500, f"The reply was generated but could not be stored ({error}); retry, or leave "
                                "'store' out.", kind="server_error") from error

    async def _sse(self, request: Request, call: dict) -> AsyncIterator[str]:
        def event(body: dict) -> str:
            return f"data: {json.dumps(body)}\n\n"

        def chunk(delta: dict, finish: str | None) -> str:
            body = {
                "id": call["id"],
                "object": "chat.completion.chunk",
                "created": call["created"],
                "model": call["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if call["include_usage"]:  # OpenAI: every chunk carries usage (null), the last one the totals
                body["usage"] = None
            return event(body)

        pieces = self._deltas(call)
        content, ended = "", "stop"
        try:
            yield chunk({"role": "assistant", "content": ""}, None)
            while (item := await run_in_threadpool(next, pieces, None)) is not None:
                if await request.is_disconnected():
                    break
                piece, finish = item
                content += piece
                if piece:
                    yield chunk({"content": piece}, None)
                if finish:
                    ended = finish
                    yield chunk({}, finish)
            else:
                if call["include_usage"]:
                    last = {"id": call["id"], "object": "chat.completion.chunk", "created": call["created"],
                            "model": call["model"], "choices": [], "usage": _usage(call, content)}
                    yield event(last)
                if call["store"]:  # the stream is complete: keep it before saying so
                    try:
                        await run_in_threadpool(self._save, call, content, ended)
                    except APIError as error:
                        yield event(error.body())
                        return
                yield "data: [DONE]\n\n"
        except Exception as error:  # headers are sent: the failure goes to the client as an error event
            logger.exception("generation failed for %s", call["id"])
            yield event({"error": {"message": f"The reply could not be generated: {error}",
                                   "type": "server_error", "param": None, "code": None}})
        finally:
            # Disconnect or cancellation: stop this request's row of the batch at its next token.
            call["cancel"].set()
            await asyncio.shield(run_in_threadpool(pieces.close))


def model_ids(registry: ModelRegistry) -> list[str]:
    """The model ids a registry serves: "base", its adapters, and the aliases whose model is one of them."""
    models = [BASE_ID, *registry.adapters]
    aliases = getattr(registry, "aliases", {})  # a stand-in registry without aliases (tests, a remote front end)
    return [*models, *(alias for alias, target in aliases.items() if target in models)]


def _usage(call: dict, content: str) -> dict:
    completion = call.get("completion_tokens")
    if completion is None:  # a stop sequence ended the reply early
        completion = len(call["chat"].tokenizer(content, add_special_tokens=False)["input_ids"])
    return {
        "prompt_tokens": call["prompt_tokens"],
        "completion_tokens": completion,
        "total_tokens": call["prompt_tokens"] + completion,
    }


def _cut_at_stop(text: str, stops: list[str]) -> str | None:
    hits = [text.index(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    return max((n for s in stops for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
