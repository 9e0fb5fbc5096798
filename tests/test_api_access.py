"""Who may call /v1 and /chat: the caller's own address, a bearer key, or a Gradio login (no model loaded)."""

from __future__ import annotations

import hmac
from types import SimpleNamespace

import gradio as gr
import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve.access import LOCAL, AccessPolicy, Caller, caller, key_name
from serve.openai_api import OpenAIServer
from tests.conftest import free_port
from ui.config import ChatConfig
from ui.handlers import Handlers
from ui.stopping import StopSignals

KEY = "sk-test-4f1c"
LOOPBACK, STRANGER = "127.0.0.1", "10.1.2.3"


class FakeRegistry:
    """Enough of a ModelRegistry for the app's layout, /chat and /v1/models; replies are canned."""

    adapters = {"pirate": "adapters/pirate"}
    choices = ["base model", "pirate"]

    def default_choice(self) -> str:
        return "pirate"

    def describe(self, choice) -> str:
        return f"{choice} (fake)"

    def trained_prompt(self, choice):
        return None

    def generation_defaults(self, choice) -> dict:
        return {}

    def get(self, choice):
        return SimpleNamespace(describe=lambda: "fake")

    def stream(self, choice, messages, params, *, cancel, **kwargs):
        yield from ("Red", "Red and blue")


def models(peer: str, policy: AccessPolicy, headers: dict | None = None, session_user=None) -> httpx.Response:
    """GET /v1/models as `peer`, from an API served under `policy`."""
    app = FastAPI()
    app.include_router(OpenAIServer(FakeRegistry(), policy, session_user=session_user).router)
    return TestClient(app, client=(peer, 50000)).get("/v1/models", headers=headers or {})


@pytest.mark.parametrize(
    ("peer", "policy", "headers", "status"),
    [
        (LOOPBACK, AccessPolicy(), {}, 200),
        ("::1", AccessPolicy(bind_host="::1"), {}, 200),
        (STRANGER, AccessPolicy(), {}, 403),
        (LOOPBACK, AccessPolicy(), {"X-Forwarded-For": "203.0.113.9"}, 403),
        (LOOPBACK, AccessPolicy(), {"Forwarded": "for=203.0.113.9"}, 403),
        (LOOPBACK, AccessPolicy(), {"X-Real-IP": "203.0.113.9"}, 403),
        (LOOPBACK, AccessPolicy(share=True), {}, 403),
        (LOOPBACK, AccessPolicy(bind_host="0.0.0.0"), {}, 403),
        (STRANGER, AccessPolicy(api_key=KEY, bind_host="0.0.0.0", share=True), {"Authorization": f"Bearer {KEY}"}, 200),
        (STRANGER, AccessPolicy(api_key=KEY), {"Authorization": "Bearer wrong"}, 401),
        (LOOPBACK, AccessPolicy(api_key=KEY), {}, 401),
        (LOOPBACK, AccessPolicy(api_key=KEY), {"Authorization": f"Basic {KEY}"}, 401),
        (LOOPBACK, AccessPolicy(login=True), {}, 403),
        (LOOPBACK, AccessPolicy(), {"Origin": "https://evil.example", "Host": "127.0.0.1:7860"}, 403),
        (LOOPBACK, AccessPolicy(), {"Origin": "http://127.0.0.1:7860", "Host": "127.0.0.1:7860"}, 200),
    ],
    ids=["loopback", "ipv6-loopback", "stranger", "x-forwarded-for", "forwarded", "x-real-ip", "share",
         "bound-to-all", "key-right", "key-wrong", "key-missing-even-locally", "key-not-bearer", "login-no-session",
         "page-of-another-site", "page-of-the-app"],
)
def test_v1_checks_the_caller_not_the_bind_address(peer, policy, headers, status):
    response = models(peer, policy, headers)
    assert response.status_code == status, response.text
    if status == 403:
        error = response.json()["error"]
        assert error["code"] == "api_key_required" and "ASSISTANT_API_KEY" in error["message"]
    if status == 401:
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_completions_are_refused_before_the_body_is_read():
    app = FastAPI()
    app.include_router(OpenAIServer(FakeRegistry(), AccessPolicy(), max_body_bytes=10).router)
    response = TestClient(app, client=(STRANGER, 50000)).post("/v1/chat/completions", content=b"x" * 100)
    assert response.status_code == 403, "a stranger learns nothing about the limits or the schema"


def test_the_key_is_compared_in_constant_time(monkeypatch):
    compared, original = [], hmac.compare_digest

    def recording(a, b):
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr("serve.access.hmac.compare_digest", recording)
    assert models(STRANGER, AccessPolicy(api_key=KEY), {"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert models(STRANGER, AccessPolicy(api_key=KEY), {"Authorization": "Bearer ünïcode".encode("latin-1")}).status_code == 401
    assert len(compared) == 2


def test_with_a_login_a_session_from_the_apps_own_pages_may_call_the_api():
    policy = AccessPolicy(login=True, bind_host="0.0.0.0")
    user = lambda request: "ann" if request.cookies.get("session") == "ok" else None  # noqa: E731
    assert models(STRANGER, policy, session_user=user).status_code == 403
    assert models(STRANGER, policy, {"Cookie": "session=ok"}, session_user=user).status_code == 200
    same = {"Cookie": "session=ok", "Origin": "http://testserver"}
    assert models(STRANGER, policy, same, session_user=user).status_code == 200
    other_site = {"Cookie": "session=ok", "Origin": "https://evil.example"}
    assert models(STRANGER, policy, other_site, session_user=user).status_code == 403
    assert models(STRANGER, AccessPolicy(), {"Cookie": "session=ok"}, session_user=user).status_code == 403, (
        "without a login configured a session means nothing"
    )


def test_a_gradio_login_opens_v1_and_nothing_else_does(monkeypatch):
    """The real Gradio login route sets the cookie that serve.http.gradio_user finds in Gradio's tokens."""
    from serve.openai_api import OpenAIServer

    monkeypatch.setenv("ASSISTANT_AUTH", "ann:pw-1")
    monkeypatch.delenv("ASSISTANT_API_KEY", raising=False)
    config = ChatConfig(no_training=True)
    with gr.Blocks() as demo:
        gr.Markdown("login test")
    demo.registry = FakeRegistry()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), auth=config.credentials(),
                            prevent_thread_lock=True, quiet=True)
    demo.app.include_router(OpenAIServer(demo.registry, config.access_policy()).router)
    try:
        with httpx.Client(base_url=url) as client:
            assert client.get("v1/models").status_code == 403, "a local caller without a login is refused"
            assert client.post("login", data={"username": "ann", "password": "wrong"}).status_code == 400
            assert client.get("v1/models").status_code == 403
            assert client.post("login", data={"username": "ann", "password": "pw-1"}).status_code == 200
            assert client.get("v1/models").status_code == 200
    finally:
        demo.close()


def chat_request(peer: str | None, headers: dict | None = None, username: str | None = None):
    """What Gradio hands /chat as `request`."""
    return SimpleNamespace(client=SimpleNamespace(host=peer), headers=headers or {}, username=username,
                           session_hash="s1")


@pytest.mark.parametrize(
    ("policy", "request_", "served"),
    [
        (AccessPolicy(), chat_request(LOOPBACK), True),
        (AccessPolicy(), chat_request(STRANGER), False),
        (AccessPolicy(), chat_request(LOOPBACK, {"x-forwarded-for": "203.0.113.9"}), False),
        (AccessPolicy(), None, False),
        (AccessPolicy(share=True), chat_request(LOOPBACK), False),
        (AccessPolicy(api_key=KEY), chat_request(STRANGER, {"authorization": f"Bearer {KEY}"}), True),
        (AccessPolicy(api_key=KEY), chat_request(LOOPBACK, {"authorization": "Bearer nope"}), False),
        (AccessPolicy(login=True), chat_request(STRANGER, username="ann"), True),
        (AccessPolicy(login=True), chat_request(LOOPBACK), False),
    ],
    ids=["loopback", "stranger", "proxied", "no-request", "share", "key-right", "key-wrong", "logged-in",
         "login-required"],
)
def test_chat_endpoint_follows_the_same_rule(policy, request_, served):
    handlers = Handlers(FakeRegistry(), StopSignals(), lambda fn: fn, access=policy)
    reply = handlers.api_chat("Name two colours.", request=request_)
    if served:
        assert list(reply)[-1] == "Red and blue"
    else:
        with pytest.raises(gr.Error, match="API key|login"):
            next(reply)


def test_the_served_chat_endpoint_refuses_a_relayed_caller(monkeypatch):
    """Through Gradio itself: /chat sees the caller's headers, so a proxied request is refused."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from ui.app import build_app

    monkeypatch.delenv("ASSISTANT_API_KEY", raising=False)
    monkeypatch.delenv("ASSISTANT_AUTH", raising=False)
    demo = build_app(ChatConfig(no_training=True), registry=FakeRegistry())
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        assert Client(url, verbose=False).predict("Hi", api_name="/chat") == "Red and blue"
        relayed = Client(url, verbose=False, headers={"X-Forwarded-For": "203.0.113.9"})
        with pytest.raises(AppError, match="API key"):
            relayed.predict("Hi", api_name="/chat")
    finally:
        demo.close()


def test_the_train_tab_follows_the_same_rule(tmp_path):
    """Training costs minutes of CPU: the Train tab refuses a stranger before storing or creating anything."""
    from serve.files import FileStore
    from serve.jobs import JobRunner
    from ui.train_tab import TrainTab

    files = FileStore(tmp_path / "jobs" / "files")
    runner = JobRunner(tmp_path / "jobs", tmp_path / "adapters", files, start=False)
    try:
        tab = TrainTab(runner, FakeRegistry(), AccessPolicy())
        chosen = {"ok": True, "path": str(tmp_path / "x.jsonl"), "name": "x.jsonl"}
        for action in (lambda r: tab.start(chosen, "lora", 0, None, None, None, 2, "", 42, "", False, r),
                       lambda r: tab.stop("ftjob-" + "0" * 24, r), lambda r: tab.resume("ftjob-" + "0" * 24, r)):
            with pytest.raises(gr.Error, match="only callers on this machine"):
                action(chat_request(STRANGER))
        assert not files.list() and not runner.list()
    finally:
        runner.close()


def test_who_a_caller_is_names_the_key_holder_a_logged_in_user_or_local():
    policy = AccessPolicy(api_key=KEY, login=True, admins=frozenset({"root"}))
    holder = caller(policy, {"Authorization": f"Bearer {KEY}"}, user="ann")
    assert holder == Caller(key_name(KEY), admin=True) and KEY not in holder.name and holder.name.startswith("key:")
    assert caller(policy, {"Authorization": "Bearer wrong"}, user="ann") == Caller("ann", admin=False)
    assert caller(policy, {}, user="root") == Caller("root", admin=True) and caller(policy, {}, "root").scope is None
    assert caller(policy, {"Origin": "https://evil.example", "Host": "h"}, user="ann").name == LOCAL, (
        "a session spent by another site's page is nobody's"
    )
    assert caller(AccessPolicy(), {"Authorization": f"Bearer {KEY}"}, user="ann") == Caller(LOCAL), (
        "a key the server does not have, or a login it does not require, names no one"
    )
    assert Caller("ann").scope == "ann"


def test_admins_and_the_database_come_from_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv("ASSISTANT_DATABASE_URL", raising=False)
    config = ChatConfig(jobs_dir=str(tmp_path / "jobs"), admins=" ann, bob ,,")
    assert config.access_policy().admins == frozenset({"ann", "bob"})
    assert config.database() == f"sqlite:///{(tmp_path / 'jobs').resolve()}/assistant.db"
    monkeypatch.setenv("ASSISTANT_DATABASE_URL", "postgresql+psycopg://team:pw@db/assistant")
    assert config.database() == "postgresql+psycopg://team:pw@db/assistant"
    assert ChatConfig(database_url="postgresql://team@db/x").database() == "postgresql://team@db/x"
    with pytest.raises(ValueError, match="PGPASSWORD"):
        ChatConfig(database_url="postgresql://team:pw@db/x").database()


def test_an_idle_app_looks_for_work_at_most_every_10_ms(monkeypatch):
    """Gradio's queue loop polled every 1 ms when free (~8% of a core idle, taken from decoding on 2 cores)."""
    import asyncio

    from gradio import queueing

    from ui.app import build_app

    queue = build_app(ChatConfig(no_training=True), registry=FakeRegistry())._queue
    real_sleep, naps = asyncio.sleep, []

    async def counted_sleep(delay, *args, **kwargs):
        naps.append(delay)
        return await real_sleep(delay, *args, **kwargs)

    async def idle_for(seconds: float) -> None:
        loop = asyncio.create_task(queue.start_processing())  # Gradio's own loop, with no event waiting
        await real_sleep(seconds)
        queue.stopped = True
        await loop

    monkeypatch.setattr(queueing.asyncio, "sleep", counted_sleep)
    asyncio.run(idle_for(0.5))
    assert 0 < len(naps) <= 60, f"{len(naps)} looks in 0.5 s"
