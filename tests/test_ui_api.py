"""The /chat API endpoint, driven by gradio_client against the running app."""

from __future__ import annotations

import pytest

from tests.conftest import generations_running, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(app_server):
    from gradio_client import Client

    return Client(app_server.url, verbose=False)


def test_chat_endpoint_streams_the_growing_reply(client):
    job = client.submit("Name three colours.", api_name="/chat", max_new_tokens=24)
    chunks = [chunk for chunk in job]
    assert len(chunks) >= 3, f"expected a streamed reply in several chunks, got {chunks!r}"
    for shorter, longer in zip(chunks, chunks[1:], strict=False):
        assert longer.startswith(shorter), "each chunk is the reply so far"
    assert chunks[-1].strip() and job.outputs()[-1] == chunks[-1]


def test_chat_endpoint_takes_history_and_system_prompt(client):
    history = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada!"}]
    reply = client.predict(
        "What is my name?",
        history=history,
        system_prompt="Answer in one short sentence.",
        adapter="base model",
        max_new_tokens=16,
        api_name="/chat",
    )
    assert isinstance(reply, str) and reply.strip()


def test_cancelled_api_job_ends_its_generation(client, forced_long_replies):
    steps = forced_long_replies  # a 400-token reply that only the cancel can end early
    job = client.submit("Tell me a long story about the moon.", api_name="/chat", max_new_tokens=400)
    wait_for(lambda: len(job.outputs()) >= 2, 60, what="the reply to start streaming")
    job.cancel()
    at_cancel = len(steps)
    wait_for(lambda: not generations_running(), 15, what="the generation to end after cancel")
    assert at_cancel < 300 and len(steps) - at_cancel <= 10, f"{len(steps) - at_cancel} decode steps after cancel"
