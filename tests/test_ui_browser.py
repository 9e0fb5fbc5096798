"""The chat app in a real browser: streaming, Stop, per-user history, inert HTML, reload."""

from __future__ import annotations

import time

import pytest

from tests.conftest import generations_running, wait_for
from ui.app import STORAGE_KEY

pytestmark = [pytest.mark.browser, pytest.mark.slow]

BOT = "#chatbot [data-testid='bot']"
USER = "#chatbot [data-testid='user']"


def send(page, text: str) -> None:
    """Type a message and press Send."""
    page.fill("#message textarea", text)
    page.click("#send")


def bot_texts(page) -> list[str]:
    """Text of every assistant message shown."""
    return page.locator(BOT).all_inner_texts()


def last_reply(page) -> str:
    """Text of the newest assistant message ('' before there is one)."""
    texts = bot_texts(page)
    return texts[-1] if texts else ""


def stored(page) -> str | None:
    """This browser's saved history (encrypted by gr.BrowserState; re-encrypted on every save)."""
    return page.evaluate(f"localStorage.getItem({STORAGE_KEY!r})")


def finish(page, action, timeout: float = 90.0) -> str:
    """Do `action` and wait until the app saved the resulting history, which it does once the turn
    is over; returns the last reply then shown."""
    before = stored(page)
    action()
    wait_for(lambda: stored(page) != before, timeout, what="the turn to end and be saved")
    return last_reply(page)


def chat(page, text: str) -> str:
    """Send a message and wait for the whole reply."""
    return finish(page, lambda: send(page, text))


def set_max_new_tokens(page, value: int) -> None:
    """Open the settings accordion and type a value into the max-new-tokens slider's box."""
    box = page.locator("#max-new-tokens input[type=number]")
    if not box.is_visible():
        page.get_by_text("Generation settings").click()
    box.fill(str(value))
    box.press("Enter")


def test_reply_streams_into_the_page(open_page):
    page = open_page()
    before = stored(page)
    send(page, "Write a short poem about the sea.")
    seen: list[str] = []
    deadline = time.monotonic() + 90
    while stored(page) == before and time.monotonic() < deadline:
        text = last_reply(page)
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        time.sleep(0.05)
    final = last_reply(page)
    assert len(seen) >= 3, f"expected the reply to grow over several observations, saw {seen!r}"
    # Rendered Markdown may reflow a little between chunks, so compare lengths and the opening words.
    assert len(seen[0]) < len(seen[len(seen) // 2]) < len(final), seen
    assert final.startswith(seen[0].split()[0]), (seen[0], final)
    assert "Model:" in page.inner_text("#status") and "cpu" in page.inner_text("#status")


def test_stop_ends_generation_and_its_thread(open_page, forced_long_replies):
    steps = forced_long_replies  # a 400-token reply that only Stop can end early
    page = open_page()
    set_max_new_tokens(page, 400)
    send(page, "Tell me a very long story about a dragon who learns to cook.")
    wait_for(lambda: len(last_reply(page)) > 20, 90, interval=0.05, what="the reply to start")
    assert generations_running(), "the model should still be generating when Stop is pressed"
    page.click("#stop")
    at_stop = len(steps)
    wait_for(lambda: not generations_running(), 5, what="the generation to finish after Stop")
    assert at_stop < 300 and len(steps) - at_stop <= 10, f"{len(steps) - at_stop} decode steps after Stop"
    time.sleep(1.0)  # the last chunks may still be on their way to the page
    stopped_at = last_reply(page)
    time.sleep(2.0)
    assert last_reply(page) == stopped_at, "the reply kept growing after Stop"
    assert len(stopped_at.split()) < 300, "Stop came too late to be a real stop"
    # The app still answers after a Stop.
    set_max_new_tokens(page, 8)
    chat(page, "Say hi.")
    assert len(bot_texts(page)) == 2


def test_two_browsers_never_see_each_others_history(open_page):
    alice, bob = open_page(), open_page()
    chat(alice, "My name is Alice and my secret word is pineapple.")
    assert "pineapple" in " ".join(alice.locator(USER).all_inner_texts())
    assert bob.locator(USER).count() == 0
    chat(bob, "I am Bob and I like trains.")
    alice.reload()
    bob.reload()
    wait_for(
        lambda: alice.locator(USER).count() == 1 and bob.locator(USER).count() == 1,
        20,
        what="each browser to restore its own history",
    )
    assert "pineapple" not in bob.inner_text("#chatbot")
    assert "trains" not in alice.inner_text("#chatbot")


def test_html_in_messages_is_inert(open_page):
    page = open_page()
    chat(
        page,
        'Look: <img src=x onerror=alert(1)> and <script>alert(1)</script> <a href="javascript:alert(1)">x</a>',
    )
    page.wait_for_timeout(500)  # give a broken image time to fire its onerror
    assert page.dialogs == [], f"HTML from a message ran script: {page.dialogs}"
    shown = page.locator("#chatbot")
    assert shown.locator("script").count() == 0
    assert shown.locator("[onerror]").count() == 0
    assert shown.locator("a[href^='javascript']").count() == 0
    assert "Look:" in " ".join(page.locator(USER).all_inner_texts())


def test_reload_keeps_the_history(open_page):
    page = open_page()
    reply = chat(page, "Remember the number 4711.")
    page.reload()
    page.wait_for_selector("#message textarea")
    wait_for(lambda: page.locator(USER).count() == 1, 20, what="the history to come back after reload")
    assert "4711" in page.locator(USER).first.inner_text()
    assert last_reply(page) == reply


def test_retry_undo_edit_clear_and_compare_mode(open_page):
    page = open_page()
    set_max_new_tokens(page, 8)
    first = chat(page, "Name a fruit.")
    assert finish(page, lambda: page.click("#retry")) == first, "greedy retry gives the same reply"
    assert page.locator(USER).count() == 1
    finish(page, lambda: page.click("#undo"))
    assert page.locator(USER).count() == 0 and page.input_value("#message textarea") == "Name a fruit."

    chat(page, "Name a colour.")  # Edit: the chatbot's pencil on a user message, then Submit
    page.locator("#chatbot button[aria-label='Edit']").first.click()
    page.locator("#chatbot textarea").first.fill("Name a fruit.")
    assert finish(page, lambda: page.locator("#chatbot button[aria-label='Submit']").first.click()) == first
    assert page.locator(USER).all_inner_texts() == ["Name a fruit."]
    finish(page, lambda: page.click("#clear"))
    assert page.locator(USER).count() == 0

    page.locator("#adapter input").click()
    page.get_by_role("option", name="pirate").click()
    wait_for(lambda: "lora adapter" in page.inner_text("#status"), 30, what="the adapter to load")
    finish(page, lambda: page.locator("#compare input").check())
    assert page.locator("#chatbot-base").is_visible()
    chat(page, "Name a fruit.")
    base_side = page.locator("#chatbot-base [data-testid='bot']")
    wait_for(lambda: base_side.count() == 1, 10, what="the base model's reply")
    assert base_side.inner_text() == first, "the base column answers as the base model"
    assert last_reply(page) != first, "the adapter column answers with the adapter"

    page.reload()
    wait_for(
        lambda: page.locator("#chatbot-base [data-testid='bot']").count() == 1,
        20,
        what="compare mode to come back after reload",
    )
    finish(page, lambda: page.click("#clear"))
    assert page.locator(USER).count() == 0 and page.locator("#chatbot-base [data-testid='user']").count() == 0


@pytest.fixture
def trained_prompt_page(browser, lora_adapter, tmp_path):
    """The app over an adapters folder holding one adapter with a recorded trained system prompt."""
    import shutil

    from assistant.adapters import summarize_prompts, write_trained_prompt
    from serve.registry import BASE_CHOICE, ModelRegistry
    from tests.conftest import free_port
    from ui.app import build_app
    from ui.config import ChatConfig

    shutil.copytree(lora_adapter, tmp_path / "support")
    write_trained_prompt(tmp_path / "support", summarize_prompts([None], "You answer as a pirate.", "--system-prompt"))
    registry = ModelRegistry(tmp_path, default=BASE_CHOICE)
    demo = build_app(ChatConfig(adapters_dir=str(tmp_path), no_training=True), registry=registry,
                     defaults={"max_new_tokens": 8, "temperature": 0.0})
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    context = browser.new_context()
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#message textarea")
    yield page
    context.close()
    demo.close()


def test_an_adapter_brings_the_system_prompt_it_was_trained_with(trained_prompt_page):
    page = trained_prompt_page
    assert page.input_value("#prompt input") == "general"
    page.locator("#adapter input").click()
    page.get_by_role("option", name="support").click()
    wait_for(lambda: page.input_value("#prompt input") == "as trained", 30, what="the trained prompt to be chosen")
    assert page.input_value("#system textarea") == "You answer as a pirate."
    assert not page.locator("#prompt-note").is_visible()

    page.locator("#prompt input").click()
    page.get_by_role("option", name="customer_support").click()
    wait_for(lambda: "customer" in page.input_value("#system textarea"), 10, what="the other prompt's text")
    note = page.locator("#prompt-note")
    wait_for(note.is_visible, 10, what="the note about the different prompt")
    assert "trained with a different system prompt" in note.inner_text()


class _Bait:
    """A local HTTP server standing in for a third party: it counts every request the page makes to it."""

    def __init__(self):
        import http.server
        import threading

        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="bait-server", daemon=True).start()

    def markup(self, tag: str) -> str:
        """A message mixing raw HTML and Markdown that would each fetch from this server if rendered."""
        return (f'Look: <img src="{self.url}/{tag}-img"> ![x]({self.url}/{tag}-md) <b>bold</b> '
                f'<div style="background-image: url({self.url}/{tag}-css)">boxed</div> and **strong**')


@pytest.fixture
def markup_page(browser):
    """The app over a registry whose model answers every message with markup aimed at a local bait server;
    yields (page, bait)."""
    from serve.registry import BASE_CHOICE, ModelRegistry
    from tests.conftest import free_port
    from ui.app import build_app
    from ui.config import ChatConfig

    bait = _Bait()

    class ScriptedRegistry(ModelRegistry):
        """No model: the reply is the bait's markup, streamed in two pieces."""

        def get(self, choice):
            return None

        def stream(self, choice, messages, params, **kwargs):
            reply = bait.markup("reply")
            yield reply[: len(reply) // 2]
            yield reply

    demo = build_app(ChatConfig(no_training=True), registry=ScriptedRegistry(None, default=BASE_CHOICE))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    context = browser.new_context()
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#message textarea")
    yield page, bait
    context.close()
    demo.close()
    bait.server.shutdown()


def test_markup_in_messages_shows_as_text_and_fetches_nothing(markup_page):
    page, bait = markup_page
    send(page, bait.markup("user"))
    wait_for(lambda: "strong" in last_reply(page) and "boxed" in last_reply(page), 30, what="the scripted reply")
    page.wait_for_timeout(1000)  # images and CSS backgrounds load after layout
    assert bait.hits == [], f"the page fetched from a third-party server: {bait.hits}"
    chat = page.locator("#chatbot")
    remote = chat.locator(f"img[src^='{bait.url}']").count()
    assert remote == 0, "a message became an image element pointing at another server"
    assert chat.locator("[data-testid='user'] b, [data-testid='bot'] b").count() == 0, "raw <b> was rendered"
    for shown in (page.locator(USER).inner_text(), last_reply(page)):
        assert f'<img src="{bait.url}/' in shown and "<b>bold</b>" in shown, shown
    # Markdown itself still renders.
    assert page.locator(BOT).last.locator("strong").inner_text() == "strong"
