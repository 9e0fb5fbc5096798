"""Our API extension for model aliases (serve.promotion), served beside /v1/models:

    GET  /v1/aliases                      every alias: {"object": "list", "data": [alias objects]}
    GET  /v1/aliases/{alias}              one alias: {"object": "model.alias", "id", "model", "serving",
                                          "default", "history": [newest first]}
    POST /v1/aliases/{alias}/promote      {"model": "my-adapter", "force": false, "reason": "...",
                                          "min_pass_rate": 0.8}: the alias object with "promotion", the record
    POST /v1/aliases/{alias}/rollback     {"reason": "..."} (optional): the same

With the SDK: `client.post("/aliases/production/promote", body={"model": "my-adapter"}, cast_to=object)`.
`model` is the alias's target (null: unset), `serving` what it serves now (its target, else the server's default
model), `default` whether it is this server's serving alias (--alias). A promotion passes serve.promotion's
gate (the newest eval of both models) unless `force` with a `reason`; a refusal is a 409 whose message quotes the
evaluation's figures, a missing reason a 400 (`param`: "reason"), an unknown model a 404.
Who may call: serve.access's rule; moving an alias is an admin's act while a key or a login is on (the key's
holder, or a user named in --admins), anyone admitted otherwise (a caller on this machine).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from serve.access import AccessPolicy, Caller
from serve.http import APIError, Gate, api_router, read_body
from serve.promotion import PromotionError, Promotions

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
HISTORY_SHOWN = 20  # records in an alias object, newest first


def may_move_aliases(policy: AccessPolicy, who: Caller) -> bool:
    """True when `who` may promote or roll back: an admin while a key or a login is on, else any admitted caller."""
    return who.admin or not (policy.api_key or policy.login)


class PromotionServer:
    """The /v1/aliases routes over the server's Promotions; `serving_alias` is its --alias ('' or None: none)."""

    def __init__(self, promotions: Callable[[], Promotions], access: AccessPolicy | None = None,
                 serving_alias: str | None = None, session_user: Callable[[Request], str | None] | None = None):
        self.promotions, self.serving_alias = promotions, serving_alias
        self.access = access or AccessPolicy()
        self.gate = Gate(self.access, session_user)
        self.router = api_router(self.gate)
        self.router.add_api_route("/aliases", self.list_aliases, methods=["GET"])
        self.router.add_api_route("/aliases/{alias}", self.get_alias, methods=["GET"])
        self.router.add_api_route("/aliases/{alias}/promote", self.promote, methods=["POST"])
        self.router.add_api_route("/aliases/{alias}/rollback", self.rollback, methods=["POST"])

    def alias_object(self, alias: str) -> dict:
        """What the API says of one alias."""
        promotions = self.promotions()
        return {"object": "model.alias", "id": alias, "model": promotions.aliases().get(alias),
                "serving": promotions.current(alias), "default": alias == self.serving_alias,
                "history": [r.to_dict() for r in promotions.history(alias, HISTORY_SHOWN)]}

    async def list_aliases(self, request: Request):
        """GET /v1/aliases: every alias set (and the serving one even while unset)."""
        def objects() -> list[dict]:
            names = list(self.promotions().aliases())
            if self.serving_alias and self.serving_alias not in names:
                names.insert(0, self.serving_alias)
            return [self.alias_object(name) for name in names]

        return {"object": "list", "data": await run_in_threadpool(objects)}

    async def get_alias(self, alias: str, request: Request):
        """GET /v1/aliases/{alias}."""
        return await run_in_threadpool(self.alias_object, alias)

    async def promote(self, alias: str, request: Request):
        """POST /v1/aliases/{alias}/promote."""
        who = self._admin(request)
        body = await self._body(request)
        model, force, reason = body.get("model"), body.get("force", False), body.get("reason")
        floor = body.get("min_pass_rate")
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' is required: the model id (as /v1/models lists it) to promote.", param="model")
        if not isinstance(force, bool):
            raise APIError(400, "'force' must be true or false.", param="force")
        if reason is not None and not isinstance(reason, str):
            raise APIError(400, "'reason' must be a string.", param="reason")
        if floor is not None and (isinstance(floor, bool) or not isinstance(floor, int | float)):
            raise APIError(400, "'min_pass_rate' must be a number from 0 to 1.", param="min_pass_rate")
        record = await run_in_threadpool(self._call, lambda p: p.promote(
            alias, model, who=who.name, force=force, reason=reason, min_pass_rate=floor))
        return {**await run_in_threadpool(self.alias_object, alias), "promotion": record}

    async def rollback(self, alias: str, request: Request):
        """POST /v1/aliases/{alias}/rollback."""
        who = self._admin(request)
        body = await self._body(request)
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise APIError(400, "'reason' must be a string.", param="reason")
        record = await run_in_threadpool(self._call, lambda p: p.rollback(alias, who=who.name, reason=reason))
        return {**await run_in_threadpool(self.alias_object, alias), "promotion": record}

    def _call(self, move: Callable[[Promotions], object]) -> dict:
        try:
            return move(self.promotions()).to_dict()  # type: ignore[attr-defined]
        except PromotionError as error:
            raise APIError(error.status, error.message, param=error.param, code=error.code) from None

    def _admin(self, request: Request) -> Caller:
        who = self.gate.caller(request)
        if not may_move_aliases(self.access, who):
            raise APIError(403, f"Moving a model alias is an admin's act and {who.name!r} is not an admin: call with the "
                                "server's API key, or log in as a user named in --admins.", code="admin_required")
        return who

    async def _body(self, request: Request) -> dict:
        raw = await read_body(request, MAX_BODY_BYTES, lambda: APIError(
            413, f"The request body exceeds {MAX_BODY_BYTES // 1024} KB.", code="request_too_large"))
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as error:
            raise APIError(400, f"The body is not valid JSON: {error}.") from None
        if not isinstance(body, dict):
            raise APIError(400, "The body must be a JSON object.")
        return body
