"""What every `/v1` route shares: OpenAI's error object, the access gate, and one bounded body reader.

Routes are added to `api_router(gate)`, whose route class checks the caller (serve.access) before the
endpoint runs and answers any APIError as OpenAI's error object, so no route can forget either.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from serve.access import AccessPolicy, Caller, caller

logger = logging.getLogger(__name__)

# A body over the limit is still read (and dropped) up to this size, so the client finishes sending and
# reads the 413 instead of a connection reset under its upload; beyond it the connection is closed.
DRAIN_MAX_BYTES = 128 * 1024 * 1024


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

    def body(self) -> dict:
        """OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The JSON error response."""
        return JSONResponse(self.body(), status_code=self.status)


def gradio_user(app, request) -> str | None:
    """The user logged in to the Gradio app (--auth-file) on this request, as Gradio's own /user route finds
    it: the `access-token` cookie of this app, looked up in the app's tokens."""
    cookie_id = getattr(app, "cookie_id", None)
    if cookie_id is None:
        return None
    token = request.cookies.get(f"access-token-{cookie_id}") or request.cookies.get(
        f"access-token-unsecure-{cookie_id}"
    )
    return getattr(app, "tokens", {}).get(token) if token else None


@dataclass(frozen=True)
class Gate:
    """serve.access's rule applied to an HTTP request: its peer, its headers, its logged-in session."""

    policy: AccessPolicy
    session_user: Callable[[Request], str | None] | None = None  # default: the Gradio app's login cookie

    def user(self, request: Request) -> str | None:
        """The request's logged-in user (None: none, or no login configured)."""
        return (self.session_user or (lambda r: gradio_user(r.app, r)))(request) if self.policy.login else None

    def check(self, request: Request) -> None:
        """Raise APIError unless the caller may be served."""
        peer = request.client.host if request.client else None
        refusal = self.policy.check(peer, request.headers, self.user(request))
        if refusal:
            logger.info("refused %s %s from %s: %s", request.method, request.url.path, peer, refusal.code)
            raise APIError(refusal.status, refusal.message, code=refusal.code)

    def caller(self, request: Request) -> Caller:
        """Who an admitted request is (serve.access.caller): whose records it may see."""
        return caller(self.policy, request.headers, self.user(request))


def api_router(gate: Gate | None) -> APIRouter:
    """An APIRouter under /v1 whose every route is gated and answers APIError as OpenAI's error object."""

    class GatedRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def gated(request: Request):
                try:
                    if gate is not None:
                        gate.check(request)
                    return await handler(request)
                except APIError as error:
                    return error.response()

            return gated

    return APIRouter(prefix="/v1", route_class=GatedRoute)


async def read_body(request: Request, limit: int, too_large: Callable[[], APIError]) -> bytes:
    """The whole body, or `too_large()` once it is known to exceed `limit` bytes (before it is parsed)."""
    return b"".join([chunk async for chunk in limited_stream(request, limit, too_large)])


async def limited_stream(request: Request, limit: int, too_large: Callable[[], APIError]) -> AsyncIterator[bytes]:
    """The body's chunks; `too_large()` is raised as soon as it exceeds `limit` bytes, declared or counted."""
    declared = request.headers.get("content-length")
    chunks = request.stream()
    if declared is not None and declared.isdigit() and int(declared) > limit:
        if int(declared) <= DRAIN_MAX_BYTES:
            await _drain(chunks)
        raise too_large()
    size = 0
    async for chunk in chunks:  # a chunked body has no Content-Length: count as it comes
        size += len(chunk)
        if size > limit:
            await _drain(chunks)
            raise too_large()
        yield chunk


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read and drop the rest of a refused body (up to DRAIN_MAX_BYTES) so its client reads the answer."""
    dropped = 0
    try:
        async for chunk in chunks:
            dropped += len(chunk)
            if dropped > DRAIN_MAX_BYTES:
                return
    except Exception:  # the client went away: nothing left to drain
        return
