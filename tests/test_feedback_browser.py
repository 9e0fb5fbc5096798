"""Learning from a conversation, in a real browser: chat, thumb down, correct the reply, find it in the Data
tab, approve it, export the SFT rows: the downloaded file holds the correction. With a login, what a user
rated outlives a restart of the app and stays that user's: another user neither lists nor opens it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for
from tests.test_ui_browser import bot_texts, chat

pytestmark = [pytest.mark.browser, pytest.mark.slow]

QUESTION = "What is the capital of France?"
CORRECTION = "The capital of France is Paris. Write to help@example.com for more."


@pytest.fixture(scope="module")
def feedback_app(tmp_path_factory):
    """The real app (the embedded model, short greedy replies) whose keyless local caller is an admin."""
    from serve.registry import BASE_CHOICE, ModelRegistry
    from ui.app import build_app
    from ui.config import ChatConfig

    root = tmp_path_factory.mktemp("feedback")
    config = ChatConfig(adapters_dir=str(root / "adapters"), jobs_dir=str(root / "jobs"), no_training=True,
                        admins="local")
    demo = build_app(config, defaults={"max_new_tokens": 16, "temperature": 0.0},
                     registry=ModelRegistry(config.adapters_dir, default=BASE_CHOICE))
    demo.registry.get(BASE_CHOICE)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo, url
    demo.close()


@pytest.fixture
def page(browser, feedback_app):
    """A fresh browser context with the app loaded."""
    from ui.app import STORAGE_KEY

    context = browser.new_context(accept_downloads=True)
    opened = context.new_page()
    opened.goto(feedback_app[1])
    opened.wait_for_selector("#message textarea")
    opened.wait_for_function(f"localStorage.getItem({STORAGE_KEY!r}) !== null")
    yield opened
    context.close()


def toast(page, text: str) -> None:
    """Wait for a notice that says `text`."""
    page.get_by_text(text).first.wait_for(timeout=30_000)


def test_thumb_down_correct_review_approve_and_export(page, feedback_app, tmp_path):
    demo, _ = feedback_app
    reply = chat(page, QUESTION)
    assert reply and bot_texts(page) == [reply]

    # Thumb down: the correction panel opens on that reply, the model's text ready to edit.
    page.locator("#chatbot button[aria-label='Dislike']").first.click()
    correction = page.locator("#feedback-correction textarea")
    wait_for(lambda: correction.is_visible() and correction.input_value() != "", 30, what="the correction panel")
    assert page.input_value("#feedback-reply textarea").strip() == reply.strip()
    correction.fill(CORRECTION)
    page.fill("#feedback-comment textarea", "Too short.")
    page.click("#feedback-save")
    toast(page, "Saved: the Data tab lists it for review.")

    # The Data tab lists it; the conversation reads as text; approve it.
    page.get_by_role("tab", name="Data").click()
    table = page.locator("#data-table")
    wait_for(lambda: QUESTION[:30] in table.inner_text(), 30, what="the record in the Data tab")
    assert "local: everyone's records (admin)" in page.input_value("#data-summary textarea")
    page.click("#data-table [data-testid='cell-0-7']")  # the first row's question
    conversation = page.locator("#data-conversation textarea")
    wait_for(lambda: CORRECTION in conversation.input_value(), 30, what="the conversation to open")
    assert QUESTION in conversation.input_value() and "rating: bad" in conversation.input_value()
    page.click("#data-approve")
    wait_for(lambda: "approved" in page.input_value("#data-note textarea"), 30, what="the approval")
    wait_for(lambda: "approved" in table.inner_text(), 30, what="the list to show it approved")

    # Export the approved SFT rows (redacted by default) and download them.
    page.click("#data-export-run")
    wait_for(lambda: "wrote 1 SFT rows" in page.input_value("#data-export-result textarea"), 60, what="the export")
    link = page.locator("#data-export-file a").first
    link.wait_for(timeout=30_000)
    with page.expect_download() as download:
        link.click()
    rows = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
    assert len(rows) == 1
    messages = rows[0]["messages"]
    assert messages[-2] == {"role": "user", "content": QUESTION}
    assert messages[-1] == {"role": "assistant",
                            "content": "The capital of France is Paris. Write to [EMAIL_1] for more."}
    stored = demo.service.store.list_feedback(_admin()).items[0]
    assert (stored.status, stored.rating, stored.comment, stored.completion.source) == ("approved", "bad",
                                                                                       "Too short.", "app")


ANN = ("ann", "pw-ann-7f3c")  # the --auth-file's logins (a file, never argv)
BOB = ("bob", "pw-bob-91d2")  # not an admin
SECOND = "Say hello."


def _serve(root: Path, auth_file: Path, *, warm: bool):
    """The app over `root`'s adapters and jobs folders (its SQLite database), served with the --auth-file's
    logins (ann and bob), as `python -m ui` serves them."""
    from serve.registry import BASE_CHOICE, ModelRegistry
    from ui.app import build_app
    from ui.config import ChatConfig

    config = ChatConfig(adapters_dir=str(root / "adapters"), jobs_dir=str(root / "jobs"), no_training=True,
                        auth_file=str(auth_file))
    demo = build_app(config, defaults={"max_new_tokens": 12, "temperature": 0.0},
                     registry=ModelRegistry(config.adapters_dir, default=BASE_CHOICE))
    if warm:
        demo.registry.get(BASE_CHOICE)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), auth=config.credentials(),
                            prevent_thread_lock=True, quiet=True)
    return demo, url


@pytest.fixture
def log_in(browser):
    """Factory: a fresh browser context (its own cookies) logged in to the app at `url` through its login form."""
    from ui.app import STORAGE_KEY

    contexts = []

    def log_in_(url: str, user: str, password: str):
        contexts.append(browser.new_context())
        page = contexts[-1].new_page()
        page.goto(url)
        page.get_by_label("username").fill(user)
        page.get_by_label("password").fill(password)
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("#message textarea", timeout=60_000)
        page.wait_for_function(f"localStorage.getItem({STORAGE_KEY!r}) !== null")
        return page

    yield log_in_
    for context in contexts:
        context.close()


def _status(page, path: str) -> int:
    """The HTTP status of a GET of `path` from the page, with its login cookie."""
    return page.evaluate("async (path) => (await fetch(path)).status", path)


def _data_tab(page, user: str) -> str:
    """Open the Data tab and wait for its listing; returns the table's text."""
    page.get_by_role("tab", name="Data").click()
    summary = page.locator("#data-summary textarea")
    wait_for(lambda: summary.input_value().startswith(f"{user}: "), 30, what=f"{user}'s listing")
    return page.locator("#data-table").inner_text()


def test_a_users_feedback_survives_a_restart_and_stays_hers(log_in, tmp_path, monkeypatch):
    """ann rates two replies and corrects one; after a restart (a new app over the same database file) she
    finds and opens them in the Data tab; bob, logged in too, lists none of them and opens none by id."""
    from serve.access import Caller

    for name in ("ASSISTANT_AUTH", "ASSISTANT_API_KEY", "ASSISTANT_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    auth = tmp_path / "auth"
    auth.write_text(":".join(ANN) + "\n" + ":".join(BOB) + "\n")
    root = tmp_path / "app"
    demo, url = _serve(root, auth, warm=True)
    try:  # ann chats twice: a thumb up on the second reply, a thumb down and a correction on the first
        page = log_in(url, *ANN)
        first = chat(page, QUESTION)
        second = chat(page, SECOND)
        assert first and second and bot_texts(page) == [first, second]
        page.locator("#chatbot button[aria-label='Like']").nth(1).click()
        wait_for(lambda: demo.service.store.list_feedback(Caller(ANN[0])).items, 30, what="the thumb up stored")
        page.locator("#chatbot button[aria-label='Dislike']").first.click()
        correction = page.locator("#feedback-correction textarea")
        wait_for(lambda: correction.is_visible() and correction.input_value() != "", 30, what="the correction panel")
        assert page.input_value("#feedback-reply textarea").strip() == first.strip()
        correction.fill(CORRECTION)
        page.click("#feedback-save")
        toast(page, "Saved: the Data tab lists it for review.")
    finally:  # the restart: this server and its database connections go
        demo.close()
        demo.service.store.close()

    demo, url = _serve(root, auth, warm=False)  # a new app over the same folders: the same database file
    try:
        # ann sees both records, the thumb down with her correction; she opens it.
        page = log_in(url, *ANN)
        table = _data_tab(page, ANN[0])
        summary = page.input_value("#data-summary textarea")
        assert summary.startswith("ann: your records\nFeedback: 2 ") and "corrected 1" in summary, summary
        assert QUESTION[:30] in table and SECOND in table and CORRECTION in table, table
        page.locator("#data-table [data-testid^='cell-']", has_text=QUESTION[:30]).first.click()  # its question
        conversation = page.locator("#data-conversation textarea")
        wait_for(lambda: CORRECTION in conversation.input_value(), 30, what="ann's record to open")
        assert QUESTION in conversation.input_value() and "rating: bad" in conversation.input_value()
        records = {f.rating: f for f in demo.service.store.list_feedback(Caller(ANN[0])).items}
        assert records.keys() == {"bad", "good"} and records["bad"].correction == CORRECTION
        assert {f.owner for f in records.values()} == {ANN[0]}
        opened = [f"v1/chat/completions/{f.completion_id}" for f in records.values()]
        assert [_status(page, path) for path in opened] == [200, 200], "ann opens her own records by id"

        # bob (not an admin) lists none of them and cannot open them.
        page = log_in(url, *BOB)
        table = _data_tab(page, BOB[0])
        summary = page.input_value("#data-summary textarea")
        assert summary.startswith("bob: your records\nFeedback: 0 "), summary
        assert ANN[0] not in table and QUESTION[:30] not in table and SECOND not in table, table
        assert not page.locator("#data-user").is_visible(), "no user filter for a user who is not an admin"
        assert [_status(page, path) for path in opened] == [404, 404], "another's record answers 404"
    finally:
        demo.close()
        demo.service.store.close()


def _admin():
    from serve.access import Caller

    return Caller("local", admin=True)
