"""serve.feedback without a model: chats turned into stored records, who sees and reviews what, the SFT and
preference exports (and the doctor's verdict on them), retention, and `python -m serve.feedback`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from assistant.adapters import TrainedPrompt, read_folder, write_trained_prompt
from assistant.generation import GenerationParams
from serve.access import Caller
from serve.feedback import (
    Filters,
    NotAllowed,
    NothingToExport,
    RecordGone,
    Retention,
    check_days,
    conversation_text,
    correct,
    counts,
    delete,
    edit_correction,
    export,
    find_feedback,
    find_preferences,
    prefer,
    preference_rows,
    rate,
    set_status,
    sft_rows,
    turn_of,
)
from serve.registry import BASE_CHOICE, ModelRegistry
from serve.store import Store
from tests.conftest import ROOT, wait_for

ANN, BOB, ADMIN = Caller("ann"), Caller("bob"), Caller("root", admin=True)
TRAINED = "You are Support, the help desk of Acme."
PARAMS = GenerationParams(max_new_tokens=64, temperature=0.0, top_p=0.9, top_k=50, repetition_penalty=1.1, seed=7)


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def store(tmp_path) -> Store:
    """A SQLite store of its own."""
    opened = Store(f"sqlite:///{tmp_path / 'assistant.db'}")
    yield opened
    opened.close()


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    """A menu with one adapter, "support" (a LoRA folder recording its trained prompt; never loaded here)."""
    folder = tmp_path / "adapters" / "support"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "embedded"}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    write_trained_prompt(folder, TrainedPrompt(TRAINED, "--system-prompt"))
    return ModelRegistry(folder.parent)


def test_a_rated_reply_is_stored_with_what_the_model_saw(store, registry):
    turn = turn_of(registry, "support", _chat("Where is my order?"), PARAMS)
    done = rate(store, ANN, turn, "It ships tomorrow.", True)
    stored = store.get(ANN, done.completion_id)
    # The trained prompt the adapter was served with (the one prompt rule), not what the screen sent.
    assert stored.messages == [{"role": "system", "content": TRAINED}, *_chat("Where is my order?")]
    assert stored.reply == {"role": "assistant", "content": "It ships tomorrow."}
    assert (stored.model, stored.source, stored.owner) == ("support", "app", "ann")
    assert stored.adapter_version == read_folder(registry.adapters["support"]).version
    assert stored.settings["temperature"] == 0.0 and stored.settings["seed"] == 7 and stored.settings["stop"] == []
    assert done.rating == "good" and done.status == "new"
    # A system prompt the user typed is kept as sent; compare mode's base side is "base", adapter off.
    own = turn_of(registry, "support", [{"role": "system", "content": "Be terse."}, *_chat("Hi")], PARAMS)
    assert own.messages[0] == {"role": "system", "content": "Be terse."}
    base = turn_of(registry, "support", _chat("Hi"), PARAMS, use_adapter=False)
    assert (base.model, base.adapter_version, base.messages[0]["content"]) == ("base", None, TRAINED)
    assert turn_of(registry, BASE_CHOICE, _chat("Hi"), PARAMS).messages == _chat("Hi")


def test_ratings_and_corrections_change_one_record(store, registry):
    turn = turn_of(registry, "support", _chat("Refund?"), PARAMS)
    first = rate(store, ANN, turn, "No.", True)
    second = rate(store, ANN, turn, "No.", False)
    assert second.id == first.id and second.rating == "bad"
    fixed = correct(store, ANN, turn, "No.", "Yes: within 30 days, from your order page.", "too curt")
    assert (fixed.id, fixed.rating, fixed.correction, fixed.comment) == (
        first.id, "bad", "Yes: within 30 days, from your order page.", "too curt")
    assert len(store.list_completions(ANN).items) == 1
    # Taking the thumb back keeps the record while it holds a correction...
    assert rate(store, ANN, turn, "No.", "").rating is None
    # ...a correction equal to the reply is none; with the comment cleared too the record goes.
    assert correct(store, ANN, turn, "No.", "No.", "") is None
    assert find_feedback(store, ANN, Filters()).items == []
    with pytest.raises(ValueError, match="Write the reply it should have given"):
        correct(store, ANN, turn_of(registry, "support", _chat("x"), PARAMS), "y", " ", None)


def test_compare_mode_stores_both_sides_and_which_was_better(store, registry):
    left = turn_of(registry, "support", _chat("Hello"), PARAMS)
    right = turn_of(registry, "support", _chat("Hello"), PARAMS, use_adapter=False)
    rate(store, ANN, left, "Ahoy! How can I help?", True)
    first = prefer(store, ANN, (left, "Ahoy! How can I help?"), (right, "hello hello"), "left")
    again = prefer(store, ANN, (left, "Ahoy! How can I help?"), (right, "hello hello"), "right")
    found = find_preferences(store, ANN, Filters())
    assert [p.id for p in found] == [again.id] != [first.id]
    assert (again.left.model, again.right.model, again.better) == ("support", "base", "right")
    assert len(store.list_completions(ANN).items) == 2  # each side stored once
    assert counts(store, ANN)["preferences"]["new"] == 1
    with pytest.raises(RecordGone):
        delete(store, BOB, again.id)
    delete(store, ANN, again.id)  # with both conversations the app kept for it
    assert find_preferences(store, ADMIN, Filters()) == [] and store.count()["completions"] == 0


def test_a_user_sees_and_deletes_only_their_own_and_only_admins_review(store, registry):
    ann = rate(store, ANN, turn_of(registry, "support", _chat("ann's question"), PARAMS), "a", False)
    bob = rate(store, BOB, turn_of(registry, "support", _chat("bob's question"), PARAMS), "b", True)
    assert [f.id for f in find_feedback(store, ANN, Filters()).items] == [ann.id]
    assert [f.id for f in find_feedback(store, BOB, Filters()).items] == [bob.id]
    assert find_feedback(store, ANN, Filters(user="bob")).items == []  # a filter widens nothing
    assert {f.id for f in find_feedback(store, ADMIN, Filters()).items} == {ann.id, bob.id}
    assert counts(store, ANN)["status"]["new"] == 1 and counts(store, ADMIN)["status"]["new"] == 2
    with pytest.raises(NotAllowed, match="--admins"):
        set_status(store, ANN, ann.id, "approved")
    with pytest.raises(NotAllowed):
        edit_correction(store, ANN, ann.id, "better")
    with pytest.raises(RecordGone):
        delete(store, ANN, bob.id)
    assert set_status(store, ADMIN, ann.id, "approved").status == "approved"
    assert "ann's question" in conversation_text(store.get_feedback(ADMIN, ann.id))
    delete(store, ANN, ann.id)  # the conversation the app stored for it goes too
    assert store.list_completions(ADMIN, source="app").items[0].owner == "bob"
    assert store.count()["completions"] == 1


def _records(store: Store, registry: ModelRegistry) -> dict:
    """One of each kind of record, reviewed."""
    ids = {}
    liked = turn_of(registry, "support", _chat("Opening hours?"), PARAMS)
    ids["liked"] = rate(store, ANN, liked, "9 to 5, Monday to Friday.", True).id
    fixed = turn_of(registry, "support", _chat("My e-mail is ann@example.com, reset my password"), PARAMS)
    rate(store, ANN, fixed, "I cannot.", False)
    ids["fixed"] = correct(store, ANN, fixed, "I cannot.", "I sent a reset link to ann@example.com.", None).id
    ids["disliked"] = rate(store, ANN, turn_of(registry, "support", _chat("Joke?"), PARAMS), "No.", False).id
    pending = turn_of(registry, "support", _chat("Pending?"), PARAMS)
    ids["pending"] = correct(store, ANN, pending, "?", "Not reviewed yet.", None).id
    rejected = turn_of(registry, "support", _chat("Rejected?"), PARAMS)
    ids["rejected"] = correct(store, ANN, rejected, "?", "Never exported.", None).id
    left = turn_of(registry, "support", _chat("Say hi"), PARAMS)
    right = turn_of(registry, "support", _chat("Say hi"), PARAMS, use_adapter=False)
    ids["preference"] = prefer(store, ANN, (left, "Hi there!"), (right, "hi hi hi"), "left").id
    for name in ("liked", "fixed", "disliked", "preference"):
        set_status(store, ADMIN, ids[name], "approved")
    set_status(store, ADMIN, ids["rejected"], "rejected")
    edit_correction(store, ADMIN, ids["fixed"], "I sent a reset link to ann@example.com; check your inbox.")
    return ids


def test_sft_rows_are_approved_corrections_and_liked_replies(store, registry):
    _records(store, registry)
    rows = sft_rows(store, ADMIN, "approved")
    assert [row["messages"][1:] for row in rows] == [
        [*_chat("Opening hours?"), {"role": "assistant", "content": "9 to 5, Monday to Friday."}],
        # the reviewer's edit wins over the correction as given
        [*_chat("My e-mail is ann@example.com, reset my password"),
         {"role": "assistant", "content": "I sent a reset link to ann@example.com; check your inbox."}],
    ]
    assert all(row["messages"][0] == {"role": "system", "content": TRAINED} for row in rows)
    everything = [row["messages"][-1]["content"] for row in sft_rows(store, ADMIN, "all")]
    assert "Not reviewed yet." in everything and "Never exported." not in everything
    assert sft_rows(store, BOB, "all") == []


def test_preference_rows_have_openais_shape(store, registry):
    _records(store, registry)
    rows = preference_rows(store, ADMIN, "approved")
    for row in rows:
        assert set(row) == {"input", "preferred_output", "non_preferred_output"}
        assert set(row["input"]) == {"messages"} and row["input"]["messages"][-1]["role"] == "user"
        for side in ("preferred_output", "non_preferred_output"):
            assert len(row[side]) == 1 and row[side][0]["role"] == "assistant" and row[side][0]["content"]
    assert [(r["preferred_output"][0]["content"], r["non_preferred_output"][0]["content"]) for r in rows] == [
        ("I sent a reset link to ann@example.com; check your inbox.", "I cannot."),
        ("Hi there!", "hi hi hi"),
    ]


def test_exports_redact_personal_data_unless_told_not_to(store, registry, tmp_path):
    _records(store, registry)
    done = export(store, ADMIN, "sft", tmp_path / "sft.jsonl")
    text = (tmp_path / "sft.jsonl").read_text()
    assert "ann@example.com" not in text and "[EMAIL_1]" in text and done.rows == 2
    assert done.redacted == {"email": 2} and "2 e-mail addresses" in done.summary()
    # one placeholder per value within a row: the question and the answer name the same address
    row = json.loads(text.splitlines()[1])
    assert row["messages"][1]["content"].count("[EMAIL_1]") == row["messages"][2]["content"].count("[EMAIL_1]") == 1
    kept = export(store, ADMIN, "preference", tmp_path / "pref.jsonl", redact=False)
    assert "ann@example.com" in (tmp_path / "pref.jsonl").read_text() and kept.redacted is None
    with pytest.raises(NothingToExport, match="approve some"):
        export(store, BOB, "sft", tmp_path / "none.jsonl")
    assert not (tmp_path / "none.jsonl").exists()


def test_the_exported_sft_file_passes_the_dataset_doctor(store, registry, tmp_path):
    _records(store, registry)
    export(store, ADMIN, "sft", tmp_path / "sft.jsonl", status="all")
    done = subprocess.run([sys.executable, "-m", "train.check", str(tmp_path / "sft.jsonl")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "examples: 3" in done.stdout, done.stdout


def test_the_command_line_exports_and_prunes(store, registry, tmp_path):
    _records(store, registry)
    old = store.add_completion(ANN, model="support", messages=_chat("old"), reply={"role": "assistant", "content": "x"},
                               source="app", created=int(time.time()) - 40 * 86400)
    url = f"sqlite:///{tmp_path / 'assistant.db'}"
    run = lambda *args: subprocess.run([sys.executable, "-m", "serve.feedback", *args], cwd=ROOT,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    done = run("export", "--kind", "preference", "--status", "approved", "--output", str(tmp_path / "p.jsonl"),
               "--database-url", url, "--no-redact")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote 2 preference rows to") and "not redacted" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows == preference_rows(store, ADMIN, "approved")
    done = run("export", "--output", str(tmp_path / "s.jsonl"), "--database-url", url, "--user", "bob")
    assert done.returncode == 1 and "nothing to export" in done.stderr and "of bob" in done.stderr
    assert run("export", "--database-url", url).returncode == 2  # --output is required
    done = run("prune", "--retain-days", "30", "--database-url", url)
    assert done.returncode == 0 and "1 completions" in done.stdout, done.stdout + done.stderr
    assert store.get(ADMIN, old.id) is None and store.count()["completions"] == 7


def test_retention_deletes_older_records_at_start(store):
    old = store.add_completion(ANN, model="base", messages=_chat("old"), reply={"role": "assistant", "content": "x"},
                               created=int(time.time()) - 3 * 86400)
    new = store.add_completion(ANN, model="base", messages=_chat("new"), reply={"role": "assistant", "content": "y"})
    retention = Retention(lambda: store, 2).start()  # its next pass is a day away
    try:
        wait_for(lambda: store.get(ADMIN, old.id) is None, 10, what="the first pass, at start")
        assert store.get(ADMIN, new.id) is not None
    finally:
        retention.close()
    with pytest.raises(ValueError, match="above 0"):
        check_days(0)


def test_filters_name_a_bad_value(store):
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        find_feedback(store, ANN, Filters(since="31/01/2025"))
    with pytest.raises(ValueError, match="rating filter"):
        find_feedback(store, ANN, Filters(rating="meh"))
    day = time.strftime("%Y-%m-%d")
    assert find_feedback(store, ANN, Filters(since=day, until=day)).items == []


def test_server_option_retain_days(tmp_path):
    from serve.config import ServerConfig
    from serve.server import Server

    with pytest.raises(ValueError, match="--retain-days"):
        Server(ServerConfig(jobs_dir=str(tmp_path), retain_days=0), registry=object(), jobs=None)
    server = Server(ServerConfig(jobs_dir=str(tmp_path), retain_days=30), registry=object(), jobs=None)
    assert server.retention is not None
    server.retention.close()
    assert Path(tmp_path, "assistant.db").exists()
