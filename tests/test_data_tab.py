"""The chat's feedback and the Data tab, driven as the screen calls them (no model, no browser): two
logged-in users and an admin, what each sees and may do, the export and "Train on these"."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from assistant.adapters import TrainedPrompt, write_trained_prompt
from serve.access import AccessPolicy, Caller
from serve.doctor import DoctorReport
from serve.registry import ModelRegistry
from serve.store import Store
from ui.data_tab import SHOWN, DataTab
from ui.feedback_panel import NO_TURN, FeedbackPanel, TurnLog
from ui.handlers import Handlers
from ui.stopping import StopSignals

POLICY = AccessPolicy(login=True, admins=frozenset({"root"}))
ROOT = Caller("root", admin=True)
TRAINED = "You are Support."
REPLIES = {"Where is my order?": "It ships tomorrow.", "Opening hours?": "9 to 5.", "Hi": "Hello!"}


class ScriptedRegistry(ModelRegistry):
    """The menu of a real adapters folder; replies come from REPLIES instead of a model."""

    def get(self, choice):
        return SimpleNamespace(describe=lambda: "scripted")

    def describe(self, choice):
        return "scripted"

    def stream(self, choice, messages, params, *, cancel, use_adapter=True, on_trim=None):
        reply = REPLIES[messages[-1]["content"]]
        yield reply[:3]
        yield reply if use_adapter else reply.lower()


def browser(user: str, session: str | None = None):
    """A logged-in user's page, as Gradio hands its request to an event."""
    return SimpleNamespace(client=SimpleNamespace(host="203.0.113.7"), headers={}, username=user,
                           session_hash=session or f"page-of-{user}")


@pytest.fixture
def app(tmp_path):
    """The screen's handlers, feedback panel and Data tab over one store."""
    folder = tmp_path / "adapters" / "support"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "embedded"}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    write_trained_prompt(folder, TrainedPrompt(TRAINED, "--system-prompt"))
    registry = ScriptedRegistry(folder.parent)
    store = Store(f"sqlite:///{tmp_path / 'assistant.db'}")
    turns = TurnLog()
    handlers = Handlers(registry, StopSignals(), lambda fn: fn, access=POLICY, turns=turns)
    yield SimpleNamespace(handlers=handlers, feedback=FeedbackPanel(turns, lambda: store, POLICY),
                          data=DataTab(lambda: store, POLICY, registry), store=store, registry=registry)
    store.close()


def send(app, request, message: str, history: list | None = None, compare: bool = False) -> tuple[list, list]:
    """Send a message as the screen does (the adapter "support", its trained prompt); (chat, base) after it."""
    outputs = list(app.handlers.send(message, history or [], list(history or []) if compare else [], "support",
                                     compare, "as trained", "", 0.0, 1.0, 0, 1.0, 32, -1, request))
    return outputs[-1][1], outputs[-1][2]


def like(index: int, liked: bool | str) -> gr.LikeData:
    return gr.LikeData(None, {"index": index, "value": ["..."], "liked": liked})


def listing(app, request, show: str = SHOWN[0]):
    summary, table = app.data.list(show, "any", "any", "any", "any", None, None, "", request)
    return summary, table


def test_a_thumb_down_and_a_correction_are_stored_for_who_gave_them(app):
    ann = browser("ann")
    chat, _ = send(app, ann, "Where is my order?")
    target, opened, reply, correction, comment = app.feedback.like_chat(like(1, False), chat, ann)
    assert target == {"side": "chat", "index": 1} and opened["open"] is True
    assert reply == correction == "It ships tomorrow." and comment == ""
    app.feedback.save(target, chat, [], "It ships on Monday, with tracking by e-mail.", "too vague", ann)
    (stored,) = app.store.list_feedback(ROOT).items
    assert (stored.owner, stored.rating, stored.correction, stored.comment) == (
        "ann", "bad", "It ships on Monday, with tracking by e-mail.", "too vague")
    assert stored.completion.messages[0] == {"role": "system", "content": TRAINED}
    assert (stored.completion.model, stored.completion.source) == ("support", "app")
    # The panel shows the correction when the same reply is rated again.
    assert app.feedback.like_chat(like(1, True), chat, ann)[3] == "It ships on Monday, with tracking by e-mail."
    # A reply this page did not generate (another page's, or one from before a reload) cannot be rated.
    with pytest.raises(gr.Error, match="before the page was"):
        app.feedback.like_chat(like(1, False), chat, browser("ann", "reloaded"))
    assert "before the page was" in NO_TURN


def test_compare_mode_rates_each_side_and_which_was_better(app):
    ann = browser("ann")
    chat, base = send(app, ann, "Hi", compare=True)
    app.feedback.like_base(like(1, False), base, ann)
    app.feedback.choose("left", chat, base, ann)
    (pref,) = app.store.list_preferences(ROOT).items
    assert (pref.better, pref.left.reply["content"], pref.right.reply["content"]) == ("left", "Hello!", "hello!")
    assert (pref.left.model, pref.right.model) == ("support", "base")
    _, table = listing(app, ann, SHOWN[1])
    assert list(table["id"]) == [pref.id]


def test_a_user_sees_only_their_own_records_and_only_an_admin_reviews(app, tmp_path):
    ann, bob, root = browser("ann"), browser("bob"), browser("root")
    chat, _ = send(app, ann, "Where is my order?")
    app.feedback.like_chat(like(1, False), chat, ann)
    app.feedback.save({"side": "chat", "index": 1}, chat, [], "It ships on Monday.", "", ann)
    bob_chat, _ = send(app, bob, "Opening hours?")
    app.feedback.like_chat(like(1, True), bob_chat, bob)
    ann_rows, bob_rows, all_rows = (listing(app, r)[1] for r in (ann, bob, root))
    assert list(ann_rows["user"]) == ["ann"] and list(bob_rows["user"]) == ["bob"]
    assert sorted(all_rows["user"]) == ["ann", "bob"]
    assert "ann: your records" in listing(app, ann)[0] and "everyone's records (admin)" in listing(app, root)[0]
    # A user filter from a non-admin widens nothing.
    assert list(app.data.list(SHOWN[0], "any", "any", "any", "any", None, None, "bob", ann)[1]["user"]) == ["ann"]
    ann_id, bob_id = ann_rows["id"][0], bob_rows["id"][0]
    # The review buttons show for the admin only; the server refuses the others all the same.
    assert [u["visible"] for u in app.data.roles(ann)[:3]] == [False] * 3
    assert [u["visible"] for u in app.data.roles(root)[:3]] == [True] * 3
    with pytest.raises(gr.Error, match="Only an admin"):
        app.data.approve(ann_id, "", ann)
    with pytest.raises(gr.Error, match="deleted, or it is not yours"):
        app.data.remove(bob_id, ann)
    chosen, text, edit = app.data.open(ann_rows, gr.SelectData(None, {"index": [0, 2], "value": "ann"}), root)
    assert chosen == ann_id and "Where is my order?" in text and edit == "It ships on Monday."
    assert app.data.approve(ann_id, "", root)[0] == f"{ann_id}: approved"
    app.data.save_edit(ann_id, "It ships on Monday; you get a tracking e-mail.", root)
    summary, path = app.data.export("sft", "approved", True, root)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert [row["messages"][-1]["content"] for row in rows] == ["It ships on Monday; you get a tracking e-mail."]
    assert summary.startswith("wrote 1 SFT rows to feedback-sft-approved-")
    assert app.data.export("sft", "approved", True, bob) == (
        "Nothing exported: nothing to export: no approved corrections or liked replies; approve some in the "
        "Data tab, or export --status all", None)
    app.data.remove(bob_id, bob)
    assert list(listing(app, root)[1]["user"]) == ["ann"]


def test_train_on_these_asks_the_doctor_first_then_starts_a_job(app):
    root = browser("root")
    chat, _ = send(app, root, "Where is my order?")
    app.feedback.like_chat(like(1, False), chat, root)
    app.feedback.save({"side": "chat", "index": 1}, chat, [], "Write to help@acme.example: we reply within a day.",
                      "", root)
    app.data.approve(listing(app, root)[1]["id"][0], "", root)
    asked, created = [], []
    verdict = {"ok": False}
    app.data.runner = SimpleNamespace(
        doctor=lambda path, model: asked.append((Path(path).read_text(), model)) or DoctorReport(verdict["ok"],
                                                                                              ("error: no",)),
        files=SimpleNamespace(save=lambda data, name, purpose: SimpleNamespace(id="file-1", data=data)),
        create=lambda file_id, spec, model: created.append((file_id, spec, model)) or SimpleNamespace(id="ftjob-1",
                                                                                      output_name="ft-feedback-1"),
    )
    with pytest.raises(gr.Error, match="dataset doctor rejects"):
        app.data.train("support", root)
    assert created == [] and "[EMAIL_1]" in asked[0][0] and "help@acme.example" not in asked[0][0]
    assert asked[0][1] == "support", "the doctor checks for the model the job trains"
    verdict["ok"] = True
    with pytest.raises(gr.Error, match="not the base model nor an adapter"):
        app.data.train("../elsewhere", root)
    text, job_id = app.data.train("support", root)
    assert job_id == "ftjob-1" and created[0][0] == "file-1" and created[0][1].suffix == "feedback"
    assert created[0][2] == "support", "the job goes on training the chosen adapter"
    assert text.startswith("Started ftjob-1 on 1 approved SFT rows (feedback-sft-") and "redacted: 1 e-mail" in text
    assert "from adapter support" in text
    assert app.data.train("base", root)[0].count("from the base model") == 1 and created[1][2] == "base"


@pytest.mark.slow
def test_train_on_these_goes_on_training_the_adapter_and_lists_the_new_one(tmp_path, trained_lora):
    """The whole loop with the real trainer: corrections approved in the Data tab train a job that goes on from
    the adapter the replies came from; the new adapter is listed in the menu."""
    import shutil

    from serve.files import FileStore
    from serve.jobs import JobRunner
    from tests.conftest import FAST, wait_for

    adapters = tmp_path / "adapters"
    shutil.copytree(trained_lora, adapters / "support")
    registry = ScriptedRegistry(adapters)
    store = Store(f"sqlite:///{tmp_path / 'assistant.db'}")
    turns = TurnLog()
    handlers = Handlers(registry, StopSignals(), lambda fn: fn, access=POLICY, turns=turns)
    feedback = FeedbackPanel(turns, lambda: store, POLICY)
    runner = JobRunner(tmp_path / "jobs", adapters, FileStore(tmp_path / "jobs" / "files"), extra_args=FAST)
    data = DataTab(lambda: store, POLICY, registry, runner=runner)
    root = browser("root")
    app = SimpleNamespace(handlers=handlers, data=data)
    try:
        for question, better in (("Where is my order?", "It left our warehouse today; write to help@acme.example."),
                                 ("Opening hours?", "We are open from 9 am to 5 pm, Monday to Friday."),
                                 ("Hi", "Hello! How can I help you with your order today?")):
            chat, _ = send(app, root, question)
            feedback.like_chat(like(1, False), chat, root)
            feedback.save({"side": "chat", "index": 1}, chat, [], better, "", root)
        for record_id in listing(app, root)[1]["id"]:
            data.approve(record_id, "", root)
        text, job_id = data.train("support", root)
        assert "3 approved SFT rows" in text and "from adapter support" in text
        job = wait_for(lambda: (j := runner.get(job_id)).status in ("succeeded", "failed", "cancelled") and j, 900,
                       what="the fine-tuning job")
        assert job.status == "succeeded", (job.error, runner.log_tail(job_id))
        assert job.fine_tuned_model in ModelRegistry(adapters).adapters, "the new adapter is listed"
        report = json.loads((adapters / job.fine_tuned_model / "training_report.json").read_text())
        assert report["from_adapter"] == str((adapters / "support").absolute())
        trained = runner.files.path(job.training_file).read_text()
        assert "[EMAIL_1]" in trained and "help@acme.example" not in trained, "what is trained is redacted"
    finally:
        runner.close()
        store.close()
