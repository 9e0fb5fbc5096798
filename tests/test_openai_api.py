"""The OpenAI-compatible API served by the app itself, driven by the real `openai` SDK."""

import threading

import httpx
import pytest
from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI

from tests.adapter_replies import adapter_reply
from tests.conftest import free_port, generations_running, wait_for

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def client(app_server) -> OpenAI:
    return OpenAI(base_url=app_server.url + "v1", api_key="unused-on-localhost", max_retries=0)


def test_models_lists_base_and_adapters(client):
    assert {m.id for m in client.models.list().data} == {"base", "pirate"}


def test_models_say_how_each_is_served_once_loaded(client):
    client.chat.completions.create(model="pirate", messages=HELLO, max_tokens=2, temperature=0)
    served = {m.id: m.model_extra["serving"] for m in client.models.list().data}
    pirate = served["pirate"]
    assert pirate["loaded"] and pirate["precision"].startswith("cpu")
    # The embedded model is a Llama model: the fast loop serves it, and says why.
    assert pirate["decoding"]["engine"] == "lean step" and "Llama" in pirate["decoding"]["why"], pirate


def test_streamed_reply_arrives_in_several_chunks(client):
    stream = client.chat.completions.create(
        model="base", messages=HELLO, stream=True, max_tokens=24, temperature=0
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces).strip()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_non_streamed_reply_matches_the_schema(client, app_server, lora_adapter):
    reply = client.chat.completions.create(
        model="pirate", messages=HELLO, max_tokens=12, temperature=0, seed=1
    )
    own = adapter_reply(lora_adapter, HELLO, precision=app_server.registry.precision,
                        max_new_tokens=12, temperature=0, seed=1)
    assert reply.choices[0].message.content == own, "the adapter's own reply"
    assert reply.object == "chat.completion" and reply.model == "pirate" and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in {"stop", "length"}
    usage = reply.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stop_sequences_cut_the_reply(client):
    full = client.chat.completions.create(model="base", messages=HELLO, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    stop = text.split()[2]
    cut = client.chat.completions.create(
        model="base", messages=HELLO, max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_two_concurrent_streams_both_finish(client):
    results: dict[int, str] = {}

    def run(i: int) -> None:
        stream = client.chat.completions.create(
            model="base",
            stream=True,
            max_tokens=20,
            temperature=0,
            messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}],
        )
        results[i] = "".join(c.choices[0].delta.content or "" for c in stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in (1, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(results) == {1, 10} and all(text.strip() for text in results.values())


def test_errors_use_openai_error_objects(client, app_server):
    with pytest.raises(NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=HELLO)
    assert missing.value.status_code == 404 and missing.value.code == "model_not_found"
    long = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(BadRequestError) as too_long:
        client.chat.completions.create(model="base", messages=long, max_tokens=16)
    assert too_long.value.code == "context_length_exceeded"
    bad = httpx.post(app_server.url + "v1/chat/completions", content=b"{not json", timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_a_client_that_disconnects_stops_its_generation(client, forced_long_replies):
    steps = forced_long_replies  # a 400-token reply that only the disconnect can end early
    stream = client.chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "Tell a long story."}],
        stream=True,
        max_tokens=400,
        temperature=0,
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    at_close = len(steps)
    wait_for(lambda: generations_running() == 0, timeout=30, what="the server to stop generating")
    assert at_close < 300 and len(steps) - at_close <= 10, f"{len(steps) - at_close} decode steps after disconnect"


def test_wrong_key_gets_401_and_the_right_one_works(app_server, monkeypatch):
    from ui.app import build_app
    from ui.config import ChatConfig

    monkeypatch.setenv("ASSISTANT_API_KEY", "s3cret")
    config = ChatConfig(no_training=True)
    demo = build_app(config, registry=app_server.registry)
    _, url, _ = demo.launch(
        server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True
    )
    try:
        with pytest.raises(AuthenticationError) as denied:
            OpenAI(base_url=url + "v1", api_key="wrong", max_retries=0).models.list()
        assert denied.value.status_code == 401
        models = OpenAI(base_url=url + "v1", api_key="s3cret", max_retries=0).models.list()
        assert "base" in {m.id for m in models.data}
    finally:
        demo.close()


def test_the_api_is_mounted_before_the_server_accepts_a_request(app_server, monkeypatch):
    """A client polling /v1/models while `python -m ui` starts gets the API, never a 404 from a server that
    listens before its routes are added."""
    import socket

    import serve.server
    from ui.app import build_app
    from ui.config import ChatConfig

    port, listening, mount = free_port(), [], serve.server.Server.mount

    def probing_mount(self, app):
        with socket.socket() as probe:
            listening.append(probe.connect_ex(("127.0.0.1", port)) == 0)
        mount(self, app)

    monkeypatch.setattr(serve.server.Server, "mount", probing_mount)
    demo = build_app(ChatConfig(no_training=True), registry=app_server.registry)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        assert listening == [False], "the API was mounted after the server began to accept connections"
        assert httpx.get(url + "v1/models", timeout=30).status_code == 200
    finally:
        demo.close()


def test_without_a_key_a_caller_relayed_by_a_proxy_is_refused(app_server):
    """The served app checks the caller: a local reverse proxy's request is not a local caller's."""
    url = app_server.url + "v1/models"
    assert httpx.get(url, timeout=30).status_code == 200
    # uvicorn itself takes the caller from X-Forwarded-For when the proxy is on loopback; the other two
    # headers reach the app unread, so only its own check refuses them.
    for header in ("X-Forwarded-For", "X-Real-IP", "Forwarded"):
        relayed = httpx.get(url, headers={header: "203.0.113.9"}, timeout=30)
        assert relayed.status_code == 403 and "ASSISTANT_API_KEY" in relayed.json()["error"]["message"], header


def test_malformed_fields_get_400_from_the_served_app(app_server):
    """The issue's 500s, against the real app: each is now a 400 naming its field."""
    url = app_server.url + "v1/chat/completions"
    for field, value in [("temperature", None), ("temperature", "hot"), ("max_tokens", -5), ("max_tokens", "x"),
                         ("stop", 5), ("seed", "7"), ("top_p", 1.5)]:
        response = httpx.post(url, json={"model": "base", "messages": HELLO, "max_tokens": 4, field: value},
                              timeout=60)
        if value is None:  # null means the default
            assert response.status_code == 200, response.text
        else:
            assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


def test_the_ui_streams_through_a_remote_openai_backend(app_server, lora_adapter):
    """`python -m ui --backend-url`: a second app fronting this project's own API; the adapter replies."""
    from gradio_client import Client

    from serve.remote import RemoteRegistry
    from ui.app import build_app
    from ui.config import ChatConfig

    front = build_app(ChatConfig(backend_url=app_server.url + "v1"))
    assert isinstance(front.registry, RemoteRegistry) and front.registry.choices == ["base model", "pirate"]
    _, url, _ = front.launch(
        server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True
    )
    try:
        job = Client(url, verbose=False).submit(
            "Name three colours.", api_name="/chat", max_new_tokens=10, temperature=0, adapter="pirate"
        )
        chunks = list(job)
        assert len(chunks) >= 3 and chunks[-1].startswith(chunks[1]) and len(chunks[-1]) > len(chunks[0])
        own = adapter_reply(lora_adapter, HELLO, precision=app_server.registry.precision,
                            max_new_tokens=10, temperature=0)
        assert chunks[-1] == own, "the adapter's own reply, through both servers"
    finally:
        front.close()
