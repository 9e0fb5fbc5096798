"""The OpenAI API's input checks, body limit and disconnect handling, on the router alone (no model).

A fake registry serves the real embedded tokenizer and `stream_reply` is replaced, so these run in seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from assistant.generation import GenerationParams
from serve.openai_api import OpenAIServer
from tests.conftest import free_port, wait_for

HELLO = [{"role": "user", "content": "Name three colours."}]
LOCAL = ("127.0.0.1", 50000)
LIMIT = 4096  # body limit of the test server, bytes


@pytest.fixture(scope="module")
def tokenizer():
    from assistant.models import load_tokenizer

    return load_tokenizer("embedded")


class FakeRegistry:
    """What OpenAIServer reads of a ModelRegistry: the adapter names and a chat per choice."""

    adapters = {"pirate": "adapters/pirate", "broken": "adapters/broken"}

    def __init__(self, tokenizer, generation: dict | None = None):
        self.tokenizer, self.generation = tokenizer, generation or {}

    def get(self, choice):
        if choice == "broken":  # as ModelRegistry raises for a listed adapter that fails to load
            raise LookupError("adapter 'broken' is unavailable: adapters/broken: no adapter weights")
        return SimpleNamespace(tokenizer=self.tokenizer, context_window=2048, trained_prompt=None,
                               generation_defaults=self.generation)


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """Arguments of every stream_reply call; the fake reply is "Red, green and blue."."""
    seen: list[dict] = []

    def fake_stream_reply(chat, messages, params, *, cancel, **kwargs):
        seen.append({"messages": messages, "params": params, "cancel": cancel})
        yield from ("Red", "Red, green", "Red, green and blue.")

    monkeypatch.setattr("serve.openai_api.stream_reply", fake_stream_reply)
    return seen


@pytest.fixture
def app(tokenizer) -> FastAPI:
    api = FastAPI()
    api.include_router(OpenAIServer(FakeRegistry(tokenizer), max_body_bytes=LIMIT).router)
    return api


def own_loop(coroutine) -> None:
    """Run `coroutine` on an event loop of its own thread: a browser test earlier in the session leaves
    Playwright's loop running on the main thread, where asyncio.run refuses to start."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coroutine).result()


def test_unset_parameters_come_from_the_models_generation_config(tokenizer, calls):
    """vLLM's convention: what a request leaves out is the served model's generation_config.json, what it
    sets wins (a greedy adapter with its own repetition penalty, as train.sft writes one)."""
    api = FastAPI()
    greedy = {"do_sample": False, "repetition_penalty": 1.05, "top_k": 20, "max_new_tokens": 99}
    api.include_router(OpenAIServer(FakeRegistry(tokenizer, greedy)).router)
    assert post(api, {"model": "pirate", "messages": HELLO}).status_code == 200
    assert post(api, {"model": "pirate", "messages": HELLO, "temperature": 0.3, "repetition_penalty": 1.2,
                      "top_k": 0, "max_tokens": 5}).status_code == 200
    unset, given = calls[0]["params"], calls[1]["params"]
    assert (unset.temperature, unset.repetition_penalty, unset.top_k, unset.max_new_tokens) == (0.0, 1.05, 20, 99)
    assert (given.temperature, given.repetition_penalty, given.top_k, given.max_new_tokens) == (0.3, 1.2, 0, 5)


def post(app: FastAPI, body) -> httpx.Response:
    return TestClient(app, client=LOCAL).post("/v1/chat/completions", json=body)


MALFORMED = [
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": "high"}, "top_p"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"max_tokens": 10.5}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"n": 2}, "n"),
    ({"n": "1"}, "n"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ["ok", 1]}, "stop[1]"),
    ({"seed": "42"}, "seed"),
    ({"seed": 2**70}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"user": 7}, "user"),
    ({"model": 3}, "model"),
    ({"model": None}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    ({"messages": [*HELLO, {"role": "assistant", "content": "Red."}]}, "messages"),
]


@pytest.mark.parametrize(("fields", "param"), MALFORMED, ids=[p + ":" + json.dumps(f)[:40] for f, p in MALFORMED])
def test_every_malformed_field_gets_a_400_naming_it(app, calls, fields, param):
    response = post(app, {"model": "base", "messages": HELLO, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param.split("[")[0] in error["message"] or param == "messages", error["message"]
    assert not calls, "nothing is generated for a malformed request"


def test_a_union_field_error_says_what_is_wrong_with_the_form_the_client_meant(app, calls):
    too_many = post(app, {"model": "base", "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}).json()["error"]
    assert "at most 4" in too_many["message"] and "string" not in too_many["message"]
    neither = post(app, {"model": "base", "messages": HELLO, "stop": 5}).json()["error"]
    assert "string" in neither["message"] and "array" in neither["message"]


@pytest.mark.parametrize(("body", "message"), [(b"{not json", "could not parse"), (b"[1, 2]", "JSON object"),
                                               (b"", "could not parse")])
def test_a_body_that_is_not_a_json_object_gets_a_400(app, calls, body, message):
    response = TestClient(app, client=LOCAL).post("/v1/chat/completions", content=body)
    assert response.status_code == 400 and message in response.json()["error"]["message"]
    assert response.json()["error"]["param"] is None


def test_well_formed_requests_with_nulls_and_unknown_fields_are_served(app, calls):
    nulls = {k: None for k in ("temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "stop", "seed",
                               "stream", "stream_options", "presence_penalty", "frequency_penalty", "logprobs",
                               "top_logprobs", "user")}
    response = post(app, {"model": "base", "messages": HELLO, **nulls, "tools": [], "some_future_field": {"x": 1}})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Red, green and blue."
    params = calls[0]["params"]
    assert params == GenerationParams.resolve({}), "unset: the model's generation settings (here the app's)"

    parts = [{"role": "developer", "content": "Be brief."}, {"role": "assistant", "content": None},
             {"role": "user", "content": [{"type": "text", "text": "Name "}, {"type": "text", "text": "colours."}]}]
    response = post(app, {"model": "pirate", "messages": parts, "temperature": 0, "top_p": 0.5, "n": 1,
                          "max_completion_tokens": 7, "max_tokens": 99, "seed": 3, "stop": "blue",
                          "presence_penalty": -2, "frequency_penalty": 2, "logprobs": False, "user": "ann"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Red, green and "
    call = calls[1]
    assert call["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": ""},
                                {"role": "user", "content": "Name colours."}]
    assert (call["params"].temperature, call["params"].top_p, call["params"].max_new_tokens, call["params"].seed) \
        == (0, 0.5, 7, 3)


def test_stream_options_include_usage_sends_a_last_usage_chunk(app, calls):
    body = {"model": "base", "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    response = post(app, body)
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0
    assert all(json.loads(e)["usage"] is None for e in events[:-2])


def test_unknown_model_and_too_long_requests_keep_their_openai_errors(app, calls):
    missing = post(app, {"model": "gpt-9", "messages": HELLO})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    broken = post(app, {"model": "broken", "messages": HELLO})
    assert broken.status_code == 404 and "no adapter weights" in broken.json()["error"]["message"]
    too_long = post(app, {"model": "base", "messages": HELLO, "max_tokens": 100_000})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"


def _asgi_post(app: FastAPI, chunks: list[bytes], headers: list[tuple[bytes, bytes]], receive_log: list):
    """POST the chunks to the app at the ASGI level; returns (status, body) and logs every receive."""
    sent: list[dict] = []
    pending = list(chunks)

    async def receive():
        receive_log.append(time.monotonic())
        if pending:
            return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "headers": [(b"host", b"testserver"), *headers], "client": LOCAL,
             "server": ("testserver", 80)}
    own_loop(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


def test_a_body_over_the_limit_is_refused_from_its_content_length_before_it_is_parsed(app, calls, monkeypatch):
    receives: list = []
    status, body = _asgi_post(app, [b"x" * 100] * 2, [(b"content-length", str(LIMIT + 1).encode())], receives)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert body["error"]["type"] == "invalid_request_error" and "KB" in body["error"]["message"]
    assert calls == [], "no model work"
    assert len(receives) == 2, "the rest is read and dropped, so the client finishes sending and reads the 413"
    monkeypatch.setattr("serve.http.DRAIN_MAX_BYTES", LIMIT)
    receives.clear()
    status, _ = _asgi_post(app, [b"x" * 100] * 2, [(b"content-length", str(LIMIT + 1).encode())], receives)
    assert status == 413 and receives == [], "a body too large even to drain is refused on the header alone"


def test_a_chunked_body_over_the_limit_is_refused_while_it_is_read(app, calls):
    receives: list = []
    chunks = [b" " * 1024] * 100  # 100 KB of (valid) JSON whitespace, no Content-Length
    status, body = _asgi_post(app, chunks, [(b"transfer-encoding", b"chunked")], receives)
    assert status == 413 and body["error"]["code"] == "request_too_large" and calls == []
    ok = json.dumps({"model": "base", "messages": HELLO}).encode()
    status, _ = _asgi_post(app, [ok[:10], ok[10:]], [(b"transfer-encoding", b"chunked")], [])
    assert status == 200, "a chunked body under the limit is served"


def test_a_client_sending_a_large_body_reads_the_413_not_a_broken_pipe(app, calls):
    """Over a real socket, with the standard library's client (which sends the whole body before it reads):
    an 8 MB message gets the error object, not a connection reset under its upload."""
    import urllib.error
    import urllib.request

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 10)
        big = json.dumps({"model": "base", "messages": [{"role": "user", "content": "x" * 8_000_000}]}).encode()
        for _ in range(3):  # every time, not by luck of timing
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=big,
                                             headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 413
            assert json.loads(refused.value.read())["error"]["code"] == "request_too_large"
        assert calls == []
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def endless(monkeypatch) -> dict:
    """stream_reply replaced by a reply that grows until its cancel event is set (at most 5 s)."""
    state: dict = {"started": threading.Event()}

    def fake_stream_reply(chat, messages, params, *, cancel, **kwargs):
        state["cancel"] = cancel
        state["started"].set()
        text, deadline = "", time.monotonic() + 5
        while not cancel.wait(0.01) and time.monotonic() < deadline:
            text += "x"
            yield text
        state["stopped_at"] = time.monotonic() if cancel.is_set() else None

    monkeypatch.setattr("serve.openai_api.stream_reply", fake_stream_reply)
    return state


def test_a_non_streaming_request_is_cancelled_when_its_client_disconnects(app, endless):
    """ASGI level: the client sends its body, then the server receives http.disconnect."""
    body = json.dumps({"model": "base", "messages": HELLO}).encode()
    gone: dict = {}

    async def receive():
        if "body" not in gone:
            gone["body"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        if endless["started"].is_set() and time.monotonic() >= gone.setdefault("at", time.monotonic() + 0.3):
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)  # nothing to receive yet

    async def send(message):
        pass

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
             "client": LOCAL, "server": ("testserver", 80)}
    own_loop(app(scope, receive, send))
    assert endless["stopped_at"] is not None, "the reply ran to its end: nothing cancelled it"
    assert endless["stopped_at"] - gone["at"] < 1.0


def test_a_non_streaming_request_is_cancelled_when_a_real_client_times_out(app, endless):
    """Through uvicorn: an httpx client gives up after 0.5 s and closes its connection."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=10, what="uvicorn to start")
        url = f"http://127.0.0.1:{server.config.port}/v1/chat/completions"
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json={"model": "base", "messages": HELLO}, timeout=0.5)
        gave_up = time.monotonic()
        wait_for(lambda: "stopped_at" in endless, timeout=10, what="the reply to end")
        assert endless["stopped_at"] is not None, "the reply ran to its end: nothing cancelled it"
        assert endless["stopped_at"] - gave_up < 1.0
    finally:
        server.should_exit = True
        thread.join(timeout=10)
