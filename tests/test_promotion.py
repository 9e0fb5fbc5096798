"""Model aliases: the gate, forced promotions, rollback, and a server that follows them without a restart
(stand-in adapter folders and chat models: no model weights are loaded)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from assistant.scoring import compare
from serve import registry as registry_module
from serve.access import AccessPolicy
from serve.evals import Evidence
from serve.openai_api import OpenAIServer
from serve.promotion import ALIASES_FILE, HISTORY_FILE, PromotionError, Promotions
from serve.promotion_api import PromotionServer
from serve.registry import BASE_CHOICE, ModelRegistry
from tests.conftest import ROOT, free_port, wait_for

LOCAL = ("127.0.0.1", 50000)
KEY = "sk-test-7d2e"
HELLO = [{"role": "user", "content": "Hello!"}]


def fake_adapter(folder: Path) -> Path:
    """A folder the registry lists as a LoRA adapter (its weights are never loaded here)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "embedded", "r": 4, "target_modules": ["q_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


@pytest.fixture
def adapters(tmp_path, monkeypatch) -> Path:
    """An adapters folder with `old` and `new`; every registry lists it again on each look."""
    monkeypatch.setattr(registry_module, "SCAN_S", 0.0)
    root = tmp_path / "adapters"
    for name in ("old", "new"):
        fake_adapter(root / name)
    return root


def evidence(candidate_rate: float, current_rate: float, current_scores: list[float], candidate_scores: list[float]):
    """A stand-in for serve.evals' evidence: one eval of both models with these pass rates and per-item scores."""
    def newest(candidate: str, current: str) -> Evidence:
        return Evidence("eval_1", "rouge", candidate, current, "run_b", "run_a", candidate_rate, current_rate,
                        compare(current_scores, candidate_scores))
    return newest


WINNER = evidence(0.8, 0.6, [0.2, 0.3, 0.4, 0.5] * 5, [0.4, 0.5, 0.6, 0.7] * 5)
LOSER = evidence(0.4, 0.6, [0.4, 0.5, 0.6, 0.7] * 5, [0.2, 0.3, 0.4, 0.5] * 5)
# The same pass rate, but every item scores lower: worse beyond the interval.
WORSE_BEYOND_NOISE = evidence(0.6, 0.6, [0.4, 0.5, 0.6, 0.7] * 5, [0.35, 0.45, 0.55, 0.65] * 5)


def promotions(folder: Path, gate=None, default: str = "old") -> Promotions:
    """The aliases of `folder` over its two models, `default` served while an alias is unset."""
    return Promotions(folder, models=lambda: ["base", "old", "new"], default=lambda: default, evidence=gate)


def aliases_on_disk(folder: Path) -> dict:
    path = folder / ALIASES_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def never_asked(candidate: str, current: str):
    raise AssertionError("the gate was consulted")


@pytest.mark.parametrize(("gate", "says"), [
    (LOSER, "passes fewer items than the current model 'old' (40.0% vs 60.0%)"),
    (WORSE_BEYOND_NOISE, "worse than the current model 'old' beyond the noise"),
    (None, "No evaluation compares 'new' with the current model 'old': run one eval on both models first"),
], ids=["lower-pass-rate", "significantly-worse", "no-evaluation"])
def test_the_gate_refuses_a_candidate_that_loses_quoting_the_evaluation(tmp_path, gate, says):
    aliases = promotions(tmp_path, gate)
    aliases.promote("production", "old", who="ops")  # pins the model served by default: no gate needed
    with pytest.raises(PromotionError) as refused:
        aliases.promote("production", "new", who="ops")
    assert says in refused.value.message and refused.value.param == "model" and refused.value.status == 409
    if gate is not None:  # the evaluation's own figures, as Evidence.describe() writes them
        assert gate("new", "old").describe() in refused.value.message
    assert aliases_on_disk(tmp_path) == {"production": "old"}, "a refused promotion moved the alias"
    assert [r.model for r in aliases.history("production")] == ["old"]


def test_the_gate_refuses_a_candidate_below_the_required_pass_rate(tmp_path):
    aliases = promotions(tmp_path, WINNER)
    with pytest.raises(PromotionError, match=r"passes 80.0% of the items, below the required 90.0%"):
        aliases.promote("production", "new", who="ops", min_pass_rate=0.9)
    assert aliases_on_disk(tmp_path) == {}


def test_a_winner_is_promoted_with_its_evidence_recorded(tmp_path):
    aliases = promotions(tmp_path, WINNER)
    record = aliases.promote("production", "new", who="alice", reason="better on support")
    assert aliases_on_disk(tmp_path) == {"production": "new"}
    assert (record.model, record.previous, record.who, record.forced) == ("new", None, "alice", False)
    kept = json.loads((tmp_path / HISTORY_FILE).read_text().splitlines()[-1])
    assert kept["evidence"] == WINNER("new", "old").describe()
    assert kept["figures"]["candidate_pass_rate"] == 0.8 and kept["figures"]["current_pass_rate"] == 0.6
    assert kept["figures"]["comparison"]["significantly_worse"] is False
    assert kept["reason"] == "better on support" and kept["action"] == "promote"


def test_a_forced_promotion_needs_a_reason_and_is_recorded(tmp_path):
    aliases = promotions(tmp_path, never_asked)
    for reason in (None, "  "):
        with pytest.raises(PromotionError) as refused:
            aliases.promote("production", "new", who="ops", force=True, reason=reason)
        assert refused.value.param == "reason" and refused.value.status == 400
    assert aliases_on_disk(tmp_path) == {}
    record = aliases.promote("production", "new", who="ops", force=True, reason="hotfix for ticket 42")
    assert aliases_on_disk(tmp_path) == {"production": "new"}
    (kept,) = aliases.history("production")
    assert kept == record and kept.forced and kept.reason == "hotfix for ticket 42" and kept.evidence is None


def test_rollback_restores_the_previous_model_one_promotion_at_a_time(tmp_path):
    aliases = promotions(tmp_path, WINNER)
    aliases.promote("production", "old", who="ops")
    aliases.promote("production", "new", who="ops")
    back = aliases.rollback("production", who="ops")
    assert aliases_on_disk(tmp_path) == {"production": "old"} and (back.previous, back.model) == ("new", "old")
    aliases.rollback("production", who="ops")  # undoes the first promotion too: the alias is unset again
    assert aliases_on_disk(tmp_path) == {}
    with pytest.raises(PromotionError, match="no promotion to roll back"):
        aliases.rollback("production", who="ops")
    assert [r.action for r in aliases.history("production")] == ["rollback", "rollback", "promote", "promote"]


def promote_command(*args: str) -> subprocess.CompletedProcess:
    """`python -m serve.promote` as a user runs it, in its own process."""
    return subprocess.run([sys.executable, "-m", "serve.promote", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_the_default_model_and_v1_models_follow_the_command_without_a_restart(adapters, tmp_path):
    from ui.app import build_app
    from ui.config import ChatConfig

    registry = ModelRegistry(adapters, default=BASE_CHOICE)
    api = FastAPI()
    api.include_router(OpenAIServer(registry).router)
    client = TestClient(api, client=LOCAL)
    demo = build_app(ChatConfig(adapters_dir=str(adapters), jobs_dir=str(tmp_path / "jobs")), registry=registry,
                     jobs=None)
    menu = next(fn.fn for fn in demo.fns.values() if any(t[1] == "load" for t in fn.targets)
                and any(getattr(o, "elem_id", None) == "adapter" for o in fn.outputs))
    assert registry.default_choice() == BASE_CHOICE and menu()["value"] == BASE_CHOICE
    assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {"base", "old", "new"}

    done = promote_command("new", "--adapters-dir", str(adapters), "--jobs-dir", str(tmp_path / "jobs"), "--force",
                           "--reason", "ship it")
    assert done.returncode == 0, done.stderr
    assert "force-promoted production: (unset) -> new (ship it)" in done.stdout
    assert registry.default_choice() == "new" and menu()["value"] == "new", "the app's default did not follow"
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed["production"]["alias_of"] == "new" and "alias_of" not in listed["new"]

    from serve.promote import main

    assert main(["--rollback", "--adapters-dir", str(adapters)]) == 0
    assert registry.default_choice() == BASE_CHOICE and menu()["value"] == BASE_CHOICE
    assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {"base", "old", "new"}


def test_the_command_refuses_a_loser_with_the_figures_and_exit_1(adapters, capsys, monkeypatch):
    from serve import promote

    monkeypatch.setattr(promote, "evidence_for", lambda config: LOSER)  # the evals' figures, stood in
    assert promote.main(["new", "--adapters-dir", str(adapters)]) == 0  # pins the default model (listed first)
    assert promote.main(["old", "--adapters-dir", str(adapters)]) == 1
    err = capsys.readouterr().err
    assert "passes fewer items" in err and LOSER("old", "new").describe() in err
    assert aliases_on_disk(adapters) == {"production": "new"}


@pytest.fixture
def served(adapters, monkeypatch):
    """The API over a real registry whose chat models are stand-ins: each reply starts, sets `started`, waits for
    `release`, then ends with the name of the model that finishes it."""
    from assistant.models import load_tokenizer

    tokenizer = load_tokenizer("embedded")
    state = {"started": threading.Event(), "release": threading.Event()}

    def stand_in(host, folder):
        return SimpleNamespace(name=folder.name if folder else "base", tokenizer=tokenizer, context_window=2048,
                               trained_prompt=None, generation_defaults={}, folder=None)

    def reply(chat, messages, params, *, cancel, **kwargs):
        state["started"].set()
        yield "written by"
        state["release"].wait(30)
        yield f"written by {chat.name}"  # which model finishes the reply

    monkeypatch.setattr(registry_module, "load_host", lambda base, precision: object())
    monkeypatch.setattr(registry_module, "chat_model", stand_in)
    monkeypatch.setattr("serve.openai_api.stream_reply", reply)
    registry = ModelRegistry(adapters)
    api = FastAPI()
    api.include_router(OpenAIServer(registry).router)
    yield api, registry, state


def test_a_reply_started_before_a_promotion_finishes_on_the_model_it_began_with(served, adapters):
    import uvicorn
    from openai import OpenAI

    api, registry, state = served
    aliases = promotions(adapters, WINNER)
    aliases.promote("production", "old", who="ops")
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=free_port(), log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    try:
        wait_for(lambda: server.started, timeout=10, what="uvicorn to start")
        client = OpenAI(base_url=f"http://127.0.0.1:{server.config.port}/v1", api_key="unused", max_retries=0)
        chunks: list = []
        streaming = threading.Thread(target=lambda: chunks.extend(client.chat.completions.create(
            model="production", messages=HELLO, stream=True, max_tokens=8)))
        streaming.start()
        assert state["started"].wait(30), "the streamed reply never started"
        aliases.promote("production", "new", who="ops")  # while that reply streams
        time.sleep(0.05)
        assert registry.default_choice() == "new"
        state["release"].set()
        streaming.join(30)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "written by old"
        assert {c.model for c in chunks} == {"old"}, "the reply names the model that wrote it"
        after = client.chat.completions.create(model="production", messages=HELLO, max_tokens=8)
        assert after.choices[0].message.content == "written by new" and after.model == "new"
    finally:
        state["release"].set()
        server.should_exit = True


def api_over(folder: Path, policy: AccessPolicy, user: str | None = None, gate=WINNER) -> TestClient:
    app = FastAPI()
    app.include_router(PromotionServer(lambda: promotions(folder, gate), policy, "production",
                                       session_user=lambda request: user).router)
    return TestClient(app, client=LOCAL)


def test_moving_an_alias_is_an_admins_act_when_logins_or_keys_are_on(tmp_path):
    from ui.promote_panel import PromotePanel

    body = {"model": "new"}
    login = AccessPolicy(login=True, admins=frozenset({"alice"}))
    refused = api_over(tmp_path, login, user="bob").post("/v1/aliases/production/promote", json=body)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_required"
    assert "'bob' is not an admin" in refused.json()["error"]["message"]
    assert api_over(tmp_path, login, user="bob").get("/v1/aliases/production").status_code == 200, "reading is not"
    panel = PromotePanel(lambda: promotions(tmp_path, WINNER), login, "production")
    bob = SimpleNamespace(client=SimpleNamespace(host="10.0.0.9"), headers={}, username="bob")
    assert panel.promote("new", False, "", bob)[0].startswith("Refused: moving a model alias is an admin's act")
    assert panel.rollback("", bob)[0].startswith("Refused")
    assert aliases_on_disk(tmp_path) == {}

    alice = SimpleNamespace(client=SimpleNamespace(host="10.0.0.9"), headers={}, username="alice")
    said, state = panel.promote("new", False, "", alice)  # an admin, through the gate
    assert "alice promoted production: (unset) -> new" in said and "Evidence: eval eval_1" in said
    assert state.startswith("production -> new")
    assert api_over(tmp_path, login, user="alice").post("/v1/aliases/production/rollback").status_code == 200
    assert aliases_on_disk(tmp_path) == {}

    keyed = api_over(tmp_path, AccessPolicy(api_key=KEY))
    assert keyed.post("/v1/aliases/production/promote", json=body).status_code == 401
    moved = keyed.post("/v1/aliases/production/promote", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert moved.status_code == 200 and moved.json()["promotion"]["who"].startswith("key:")
    assert aliases_on_disk(tmp_path) == {"production": "new"}


def test_the_api_refuses_a_loser_with_the_figures_and_shows_the_history(tmp_path):
    from openai import BadRequestError, ConflictError, OpenAI

    client = OpenAI(base_url="http://testserver/v1", api_key="unused", max_retries=0,
                    http_client=api_over(tmp_path, AccessPolicy(), gate=LOSER))  # the README's calls, as written
    with pytest.raises(ConflictError) as refused:
        client.post("/aliases/production/promote", body={"model": "new"}, cast_to=object)
    assert refused.value.param == "model" and refused.value.code == "promotion_refused"
    assert LOSER("new", "old").describe() in refused.value.message
    with pytest.raises(BadRequestError) as no_reason:
        client.post("/aliases/production/promote", body={"model": "new", "force": True}, cast_to=object)
    assert no_reason.value.param == "reason"
    forced = client.post("/aliases/production/promote", body={"model": "new", "force": True, "reason": "ok'd"},
                         cast_to=object)
    assert forced["model"] == "new" and forced["serving"] == "new" and forced["promotion"]["forced"] is True
    shown = client.get("/aliases", cast_to=object)["data"]
    assert [(a["id"], a["model"], a["default"]) for a in shown] == [("production", "new", True)]
    assert shown[0]["history"][0]["reason"] == "ok'd"
    assert client.post("/aliases/production/rollback", body={}, cast_to=object)["serving"] == "old"
