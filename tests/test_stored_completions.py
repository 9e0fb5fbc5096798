"""OpenAI's Stored Completions API (serve.stored_api) and our feedback route, driven by the real `openai` SDK
against the app; who sees what, with the API key, a logged-in user and a local caller."""

from __future__ import annotations

import shutil
import threading
import uuid

import pytest
import uvicorn
from fastapi import FastAPI
from openai import BadRequestError, NotFoundError, OpenAI
from openai.types.chat import ChatCompletion

from assistant.adapters import read_folder, summarize_prompts, write_trained_prompt
from serve.access import AccessPolicy, Caller, key_name
from serve.openai_api import OpenAIServer
from serve.stored_api import StoredCompletionsServer
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Name three colours."}]
PROMPT = "You are a terse tutor. Answer in one sentence."
KEY = "team-key-1"
RUN = uuid.uuid4().hex[:8]  # this module's records, whatever else the session's app has stored


@pytest.fixture(scope="module")
def client(app_server) -> OpenAI:
    """The app's API as a local keyless caller ("local")."""
    return OpenAI(base_url=app_server.url + "v1", api_key="unused-on-localhost", max_retries=0)


@pytest.fixture(scope="module")
def store(app_server):
    """The app's own store (a SQLite file in its jobs folder)."""
    return app_server.demo.service.store


@pytest.fixture(scope="module")
def tutor(app_server, lora_adapter):
    """An adapter trained with a system prompt, listed in the app's menu for this module only."""
    folder = lora_adapter.parent / "tutor"
    shutil.copytree(lora_adapter, folder)
    write_trained_prompt(folder, summarize_prompts([None], PROMPT, "--system-prompt"))
    app_server.registry.rescan()
    yield folder
    shutil.rmtree(folder)
    app_server.registry.rescan()


def create(client: OpenAI, case: str, **kwargs) -> ChatCompletion:
    """A short greedy completion stored with this module's metadata."""
    values = {"model": "base", "messages": HELLO, "max_tokens": 6, "temperature": 0, "store": True,
              "metadata": {"run": RUN, "case": case}} | kwargs
    return client.chat.completions.create(**values)


def feedback(client: OpenAI, completion_id: str, body: dict) -> dict:
    """POST /v1/chat/completions/{id}/feedback (no SDK method: our extension)."""
    return client.post(f"/chat/completions/{completion_id}/feedback", body=body, cast_to=object)  # the JSON


# -- create, retrieve, messages ----------------------------------------------------------------------------
def test_a_stored_completion_comes_back_as_created(client, store, tutor):
    made = create(client, "create", model="tutor", seed=3)
    raw = client.chat.completions.with_raw_response.retrieve(made.id).http_response.json()
    got = ChatCompletion.model_validate(raw)  # the SDK's own type, validated (not just constructed)
    assert got.id == made.id and got.model == "tutor" and got.created == made.created
    assert got.choices[0].message.content == made.choices[0].message.content
    assert got.choices[0].finish_reason == made.choices[0].finish_reason
    assert got.usage == made.usage
    assert got.metadata == {"run": RUN, "case": "create"}
    assert got.system_fingerprint == read_folder(tutor).version, "the adapter's version as it was served"
    assert (raw["seed"], raw["temperature"], raw["owner"], raw["source"]) == (3, 0.0, "local", "api")
    messages = client.chat.completions.messages.list(made.id)
    assert [(m.role, m.content) for m in messages.data] == [("system", PROMPT), ("user", HELLO[0]["content"])], (
        "the messages as the model saw them: the adapter's trained prompt included"
    )
    assert [m.id for m in messages.data] == [f"{made.id}-0", f"{made.id}-1"] and messages.has_more is False
    later = client.chat.completions.messages.list(made.id, after=f"{made.id}-0", limit=1, order="asc")
    assert [m.content for m in later.data] == [HELLO[0]["content"]]
    stored = store.get(Caller("local"), made.id)
    assert stored.settings["max_new_tokens"] == 6 and stored.settings["stop"] == []


def test_a_streamed_completion_is_stored_once_it_is_complete(client):
    chunks = list(create(client, "stream", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    got = client.chat.completions.retrieve(chunks[0].id)
    assert got.choices[0].message.content == text and text
    assert got.usage.total_tokens == chunks[-1].usage.total_tokens


def test_a_completion_without_store_is_not_kept(client, store):
    before = store.count()["completions"]
    plain = client.chat.completions.create(model="base", messages=HELLO, max_tokens=4, temperature=0,
                                           metadata={"run": RUN})
    with pytest.raises(NotFoundError):
        client.chat.completions.retrieve(plain.id)
    assert store.count()["completions"] == before


def test_bad_store_fields_name_the_parameter(client):
    for body, param in (({"store": "yes"}, "store"), ({"metadata": {"k" * 65: "v"}}, "metadata"),
                        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata")):
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(model="base", messages=HELLO, max_tokens=4, extra_body=body)
        assert refused.value.param == param


# -- list, update, delete ------------------------------------------------------------------------------
def test_lists_filter_by_metadata_and_model_and_page(client):
    made = [create(client, "page", messages=[{"role": "user", "content": f"Say {n}."}]) for n in range(3)]
    ids = [m.id for m in made]
    first = client.chat.completions.list(metadata={"run": RUN, "case": "page"}, limit=2)
    assert [c.id for c in first.data] == ids[:2] and first.has_more is True
    rest = client.chat.completions.list(metadata={"run": RUN, "case": "page"}, limit=2, after=ids[1])
    assert [c.id for c in rest.data] == ids[2:] and rest.has_more is False
    every = client.chat.completions.list(metadata={"run": RUN, "case": "page"}, limit=1)
    assert [c.id for c in every] == ids, "the SDK's auto-pagination follows has_more and last_id"
    newest = client.chat.completions.list(metadata={"run": RUN, "case": "page"}, order="desc", model="base")
    assert [c.id for c in newest.data] == ids[::-1]
    assert client.chat.completions.list(metadata={"run": RUN}, model="pirate").data == []
    raw = client.chat.completions.with_raw_response.list(metadata={"run": RUN, "case": "page"}, limit=2)
    page = raw.http_response.json()
    assert (page["object"], page["first_id"], page["last_id"]) == ("list", ids[0], ids[1])
    for kwargs, param in (({"limit": 0}, "limit"), ({"order": "up"}, "order"), ({"after": "chatcmpl-nope"}, "after")):
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.list(**kwargs)
        assert refused.value.param == param


def test_metadata_is_updated_and_a_completion_deleted(client):
    made = create(client, "update")
    updated = client.chat.completions.update(made.id, metadata={"run": RUN, "case": "updated", "lang": "en"})
    assert updated.id == made.id and updated.metadata["lang"] == "en"
    assert [c.id for c in client.chat.completions.list(metadata={"run": RUN, "case": "updated"})] == [made.id]
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.update(made.id, metadata={"k": "v" * 513})
    assert refused.value.param == "metadata"
    gone = client.chat.completions.delete(made.id)
    assert (gone.id, gone.object, gone.deleted) == (made.id, "chat.completion.deleted", True)
    for call in (client.chat.completions.retrieve, client.chat.completions.delete,
                 client.chat.completions.messages.list):
        with pytest.raises(NotFoundError) as missing:
            call(made.id)
        assert missing.value.param == "completion_id"


# -- feedback --------------------------------------------------------------------------------------------
def test_feedback_is_kept_and_bad_feedback_names_the_field(client, store):
    made = create(client, "feedback")
    rated = feedback(client, made.id, {"rating": "bad"})
    assert (rated["object"], rated["completion_id"], rated["rating"], rated["status"]) == (
        "chat.completion.feedback", made.id, "bad", "new")
    fixed = feedback(client, made.id, {"correction": "Red, green and blue.", "comment": "list them"})
    assert fixed["id"] == rated["id"] and fixed["rating"] == "bad" and fixed["correction"] == "Red, green and blue."
    kept = store.list_feedback(Caller("local"), corrected=True, model="base").items
    assert [f.id for f in kept if f.completion_id == made.id] == [rated["id"]]
    for body, param in (({}, "rating"), ({"rating": "meh"}, "rating"), ({"rating": None, "comment": None}, "rating"),
                        ({"correction": ""}, "correction"), ({"correction": "   "}, "correction"),
                        ({"comment": 5}, "comment")):
        with pytest.raises(BadRequestError) as refused:
            feedback(client, made.id, body)
        assert refused.value.param == param, body
    with pytest.raises(NotFoundError) as missing:
        feedback(client, "chatcmpl-unknown", {"rating": "good"})
    assert missing.value.param == "completion_id"


# -- who sees what -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def team(app_server, store):
    """The same models and store served with a key and a login (a cookie names the user; "root" is an admin):
    a base URL for clients of each identity."""
    policy = AccessPolicy(api_key=KEY, login=True, admins=frozenset({"root"}))
    user = lambda request: request.cookies.get("user")  # noqa: E731 - stands in for Gradio's login cookie
    app = FastAPI()
    app.include_router(OpenAIServer(app_server.registry, policy, session_user=user, store=lambda: store).router)
    app.include_router(StoredCompletionsServer(lambda: store, policy, session_user=user).router)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=30, what="the team API to start")
    yield f"http://127.0.0.1:{server.config.port}/v1"
    server.should_exit = True
    thread.join(timeout=30)


def as_user(base_url: str, name: str) -> OpenAI:
    """A client logged in as `name` (no key)."""
    return OpenAI(base_url=base_url, api_key="not-the-key", default_headers={"Cookie": f"user={name}"}, max_retries=0)


def test_one_callers_completions_are_invisible_to_another(team, client, store):
    ann, bob, root = as_user(team, "ann"), as_user(team, "bob"), as_user(team, "root")
    key_holder = OpenAI(base_url=team, api_key=KEY, max_retries=0)
    anns = create(ann, "team")
    local = create(client, "team")  # the keyless local caller of the app itself
    assert store.get(Caller("ann"), anns.id).owner == "ann"
    keys = store.add_completion(Caller(key_name(KEY), admin=True), model="base", messages=HELLO,
                                reply={"role": "assistant", "content": "Red."}, metadata={"run": RUN, "case": "team"})

    def listed(who: OpenAI) -> set[str]:
        return {c.id for c in who.chat.completions.list(metadata={"run": RUN, "case": "team"})}

    assert listed(ann) == {anns.id} and listed(bob) == set()
    assert listed(client) == {local.id}
    assert listed(root) == listed(key_holder) == {anns.id, local.id, keys.id}, "admins see everyone's"
    for action in (lambda: bob.chat.completions.retrieve(anns.id),
                   lambda: bob.chat.completions.messages.list(anns.id),
                   lambda: bob.chat.completions.update(anns.id, metadata={"x": "y"}),
                   lambda: bob.chat.completions.delete(anns.id),
                   lambda: feedback(bob, anns.id, {"rating": "bad"}),
                   lambda: ann.chat.completions.retrieve(local.id)):
        with pytest.raises(NotFoundError):
            action()
    assert store.get(Caller("ann"), anns.id).metadata == {"run": RUN, "case": "team"}, "bob changed nothing"
    assert feedback(ann, anns.id, {"rating": "good"})["owner"] == "ann"
    assert feedback(root, anns.id, {"comment": "reviewed"})["owner"] == "root"
    assert root.chat.completions.retrieve(anns.id).id == anns.id
    assert key_holder.chat.completions.delete(anns.id).deleted
    assert listed(ann) == set()
