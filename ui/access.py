"""The one access check of every screen action and of Gradio's /chat: serve.access's rule, as a gr.Error."""

from __future__ import annotations

import logging

import gradio as gr

from serve.access import AccessPolicy

logger = logging.getLogger(__name__)


def admit(access: AccessPolicy | None, request: gr.Request | None, action: str) -> None:
    """Raise gr.Error unless `access` lets this request's caller do `action` (the same rule as /v1: key,
    login, loopback peer with nothing relaying, same origin). `access` None: in-process use, no caller."""
    refusal = access.check_request(request) if access is not None else None
    if refusal:
        logger.info("refused %s: %s", action, refusal.code)
        raise gr.Error(refusal.message)
