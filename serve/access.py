"""Who may call the app's programmatic APIs (`/v1` and Gradio's `/chat`).

Without an API key only a caller on this machine is served, and only when nothing can relay strangers
to it: the app is bound to loopback, no `--share` tunnel runs, the request carries no proxy header (a
reverse proxy or the tunnel connects from 127.0.0.1, so every caller would look local) and no browser
says it comes from another site's page (any web page open on this machine can send requests to
127.0.0.1; its Origin gives it away).
With a key, `Authorization: Bearer KEY` is required; with a Gradio login (`--auth-file`), a logged-in
session works too and the keyless rule no longer applies.

Who an admitted caller is (`caller`): the key's holder ("key:" and a short hash of the key, an admin), a
logged-in user by name (an admin when named in --admins), else "local". Stored completions and feedback
belong to that name; one caller never sees another's, an admin sees everyone's.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

# Headers a relaying proxy adds: with any of them the TCP peer is the proxy, not the caller.
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip")
LOCAL = "local"  # the name of a keyless caller on this machine
SET_A_KEY = (
    "set an API key on the server ($ASSISTANT_API_KEY or --api-key-file FILE) and send it as "
    "'Authorization: Bearer <key>'"
)


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer ...` header, if any."""
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def same_origin(headers: Mapping[str, str]) -> bool:
    """False when a browser says the request comes from another site's page (its Origin is not this Host)."""
    origin = headers.get("origin")
    if origin is None:  # not sent by a browser's cross-site fetch
        return True
    return urlsplit(origin).netloc.lower() == (headers.get("host") or "").lower()


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: HTTP status, a message that says the fix, OpenAI error code."""

    status: int
    message: str
    code: str


@dataclass(frozen=True)
class AccessPolicy:
    """The server's side of the rule: its key, where it is bound, whether it is shared or needs a login."""

    api_key: str | None = field(default=None, repr=False)  # never in a repr, so never in a log line
    bind_host: str = "127.0.0.1"
    share: bool = False
    login: bool = False  # --auth-file / $ASSISTANT_AUTH: the API needs the key or a logged-in session
    admins: frozenset[str] = frozenset()  # --admins: user names that see every caller's records

    def check(self, peer: str | None, headers: Mapping[str, str], user: str | None = None) -> Refusal | None:
        """None when the caller may be served, else the refusal; `user` is the request's logged-in Gradio user
        (None when there is none)."""
        headers = {k.lower(): v for k, v in headers.items()}
        token = bearer_token(headers)
        if self.api_key and token and hmac.compare_digest(token.encode(), self.api_key.encode()):
            return None
        # A logged-in session counts only on requests from the app's own pages: a page of another site
        # must not be able to spend a logged-in user's session.
        if self.login and user and same_origin(headers):
            return None
        if self.api_key:
            return Refusal(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' with the "
                                "server's key ($ASSISTANT_API_KEY or --api-key-file).", "invalid_api_key")
        if self.login:
            return Refusal(403, "This app requires a login (--auth-file / $ASSISTANT_AUTH): log in to it, "
                                f"or {SET_A_KEY}.", "api_key_required")
        why = self.not_local(peer, headers)
        if why:
            return Refusal(403, f"Without an API key only callers on this machine are served ({why}): "
                                f"{SET_A_KEY}.", "api_key_required")
        return None

    def check_request(self, request) -> Refusal | None:
        """check() for a Gradio request: its client's address, its headers and its logged-in username."""
        client = getattr(request, "client", None)
        headers = dict(getattr(request, "headers", None) or {})
        return self.check(getattr(client, "host", None), headers, getattr(request, "username", None))

    def not_local(self, peer: str | None, headers: Mapping[str, str]) -> str | None:
        """Why a keyless caller does not count as local (None when it does)."""
        headers = {k.lower(): v for k, v in headers.items()}
        if not is_loopback(self.bind_host):
            return f"the app is bound to {self.bind_host}"
        if self.share:
            return "--share publishes it"
        if not is_loopback(peer):
            return f"the caller is {peer or 'unknown'}"
        relayed = [h for h in PROXY_HEADERS if h in headers]
        if relayed:
            return f"the request came through a proxy ({', '.join(relayed)})"
        if not same_origin(headers):  # a page of some site, open in a browser on this machine
            return f"a web page of {headers.get('origin')} sent it"
        return None


@dataclass(frozen=True)
class Caller:
    """Who a request is: a logged-in user's name, "key:<hash>" for the API key's holder, or "local"."""

    name: str
    admin: bool = False  # sees (and may change) every caller's records

    @property
    def scope(self) -> str | None:
        """Whose records it sees: its own name, or None (everyone's) for an admin."""
        return None if self.admin else self.name


def key_name(key: str) -> str:
    """The name of the key's holder: "key:" and a short hash of the key (never the key)."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def caller(policy: AccessPolicy, headers: Mapping[str, str], user: str | None = None) -> Caller:
    """Who a request that `policy.check` admitted is: the key's holder (an admin), else the logged-in Gradio
    `user` (an admin when in policy.admins), else the local keyless caller "local"."""
    headers = {k.lower(): v for k, v in headers.items()}
    token = bearer_token(headers)
    if policy.api_key and token and hmac.compare_digest(token.encode(), policy.api_key.encode()):
        return Caller(key_name(policy.api_key), admin=True)
    if policy.login and user and same_origin(headers):  # the session check() accepts
        return Caller(user, admin=user in policy.admins)
    return Caller(LOCAL, admin=LOCAL in policy.admins)


def request_caller(policy: AccessPolicy, request) -> Caller:
    """caller() for a Gradio request (gr.Request): its headers and its logged-in username."""
    headers = dict(getattr(request, "headers", None) or {})
    return caller(policy, headers, getattr(request, "username", None))
