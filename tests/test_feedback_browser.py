"""Learning from a conversation, in a real browser: chat, thumb down, correct the reply, find it in the Data
tab, approve it, export the SFT rows: the downloaded file holds the correction."""

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


def _admin():
    from serve.access import Caller

    return Caller("local", admin=True)
