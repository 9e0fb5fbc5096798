"""The runtime the app is built on, with the real embedded model: trimming, Stop, compare mode, adapters."""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import fields

import pytest

from assistant.adapters import find_adapters
from assistant.batching import END, Request, engine_for, stop_ids
from assistant.chat_format import encode_prompt
from assistant.generation import (
    UPDATE_INTERVAL_S,
    GenerationParams,
    complete_reply,
    fit_history,
    stream_reply,
)
from assistant.loading import ChatModel, load_chat_model
from serve.registry import BASE_CHOICE, ModelRegistry
from tests.conftest import generations_running, wait_for

pytestmark = pytest.mark.slow

GREEDY = GenerationParams(max_new_tokens=24, temperature=0.0)
SYSTEM = {"role": "system", "content": "You are Captain Zebulon, a pirate who loves maps."}


@pytest.fixture(scope="module")
def chat() -> ChatModel:
    return load_chat_model()


def exchanges(n: int) -> list[dict[str, str]]:
    turns = []
    for i in range(n):
        turns += [
            {"role": "user", "content": f"Question number {i}: tell me about island {i}."},
            {"role": "assistant", "content": f"Island {i} has sandy beaches and tall palm trees. " * 3},
        ]
    return turns


def reply(chat: ChatModel, messages, **kwargs) -> str:
    texts = list(stream_reply(chat, messages, GREEDY, **kwargs))
    return texts[-1] if texts else ""


def test_trimming_keeps_the_system_prompt(chat):
    messages = [SYSTEM, *exchanges(6), {"role": "user", "content": "Which island was last?"}]
    full, _ = fit_history(chat.tokenizer, messages, budget=10_000)
    ids, dropped = fit_history(chat.tokenizer, messages, budget=len(full) // 2)
    prompt = chat.tokenizer.decode(ids)
    assert dropped > 0 and dropped % 2 == 0, "whole exchanges are dropped"
    assert len(ids) <= len(full) // 2
    assert "Captain Zebulon" in prompt, "the system prompt survives trimming"
    assert "Which island was last?" in prompt
    assert "Question number 0" not in prompt, "the oldest exchange goes first"


def test_stream_reply_reports_trimming(chat):
    class SmallWindow(ChatModel):
        @property
        def context_window(self) -> int:
            return 160

    small = SmallWindow(**{f.name: getattr(chat, f.name) for f in fields(chat)})
    trimmed: list[int] = []
    stream = stream_reply(
        small,
        [SYSTEM, *exchanges(4), {"role": "user", "content": "Hi"}],
        GenerationParams(max_new_tokens=4, temperature=0.0),
        on_trim=trimmed.append,
    )
    text = list(stream)[-1]
    assert trimmed and trimmed[0] >= 2 and text


def test_stop_ends_generation_within_a_token(chat):
    steps: list[int] = []
    hook = chat.model.register_forward_hook(lambda *_: steps.append(1))  # one forward pass per new token
    cancel = threading.Event()
    try:
        stream = stream_reply(
            chat,
            [{"role": "user", "content": "Tell me a long story about a fox."}],
            forced(300),  # the reply cannot end by itself before 300 tokens: only Stop ends it
            cancel=cancel,
        )
        for chunks, _ in enumerate(stream, 1):
            if chunks == 5:
                cancel.set()
                at_stop = len(steps)
    finally:
        hook.remove()
    assert at_stop < 300
    assert len(steps) - at_stop <= 2, f"{len(steps) - at_stop} tokens were generated after Stop"


def test_closing_the_stream_stops_the_generation(chat):
    stream = stream_reply(
        chat,
        [{"role": "user", "content": "Count from one to five hundred."}],
        forced(300),  # the reply cannot end by itself: only closing the stream ends it
    )
    steps: list[int] = []
    hook = chat.model.register_forward_hook(lambda *_: steps.append(1))
    try:
        next(stream)
        assert generations_running()
        stream.close()  # what Gradio does when a browser goes away
        at_close = len(steps)
        wait_for(lambda: not generations_running(), 5, what="the generation to end after close()")
        time.sleep(0.3)
    finally:
        hook.remove()
    assert at_close < 300 and len(steps) - at_close <= 2, f"{len(steps) - at_close} forward passes after close()"


def test_compare_mode_gives_base_and_adapter_replies(chat, lora_adapter):
    tuned = load_chat_model(adapter=lora_adapter)
    assert tuned.adapter and tuned.method == "lora"
    messages = [{"role": "user", "content": "Write one sentence about a cat."}]
    with_adapter = reply(tuned, messages, use_adapter=True)
    without = reply(tuned, messages, use_adapter=False)
    assert with_adapter != without, "the adapter should change the greedy reply"
    assert without == reply(chat, messages), "adapter switched off is the plain base model"


def test_adapter_picker_lists_adapter_folders(tmp_path, lora_adapter):
    shutil.copytree(lora_adapter, tmp_path / "alpha")
    (tmp_path / "not-an-adapter").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert list(find_adapters(tmp_path)) == ["alpha"]
    assert find_adapters(tmp_path / "missing") == {}

    registry = ModelRegistry(tmp_path, [str(lora_adapter)])
    assert registry.choices == [BASE_CHOICE, "alpha", "pirate"]
    with pytest.raises(FileNotFoundError):
        ModelRegistry(tmp_path, [str(tmp_path / "not-an-adapter")])


def test_registry_loads_lazily_and_caches(lora_adapter):
    registry = ModelRegistry(extra=[lora_adapter])
    assert "loads on first use" in registry.describe("pirate")
    first = registry.get("pirate")
    assert registry.get("pirate") is first
    assert first.adapter and "lora adapter" in registry.describe("pirate")
    assert "cpu" in registry.describe("pirate")
    with pytest.raises(LookupError):
        registry.get("nope")


def forced(tokens: int) -> GenerationParams:
    """Greedy, exactly `tokens` tokens (no early end of turn)."""
    return GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0)


def submit(chat: ChatModel, text: str, max_new_tokens: int) -> Request:
    ids = encode_prompt(chat.tokenizer, [{"role": "user", "content": text}])
    return engine_for(chat.host).submit(
        Request(ids, forced(max_new_tokens), threading.Event(), stop_ids=stop_ids(chat.model, chat.tokenizer))
    )


def drain(request: Request) -> list[int]:
    tokens = []
    while (token := request.tokens.get(timeout=120)) is not END:
        assert not isinstance(token, BaseException), token
        tokens.append(token)
    return tokens


def test_rows_of_one_batch_keep_their_own_lengths(chat):
    short, long = submit(chat, "Tell me about maps.", 6), submit(chat, "Tell me about ships.", 14)
    assert (len(drain(short)), len(drain(long))) == (6, 14)


def test_a_late_request_joins_the_running_batch(chat):
    first = submit(chat, "Write a long story about a lighthouse keeper.", 120)
    head = [first.tokens.get(timeout=60) for _ in range(8)]  # the first reply is under way
    late = submit(chat, "Name a colour.", 5)
    assert len(drain(late)) == 5
    # The late reply ended while the long one was still streaming: it did not wait for it.
    assert not first.done
    rest = drain(first)
    assert len(head) + len(rest) == 120
    text = chat.tokenizer.decode(head + rest)
    assert len(text.split()) > 40, text  # one coherent reply went on across the pause


def test_updates_come_at_most_ten_times_a_second_and_end_with_the_whole_reply(chat):
    params = forced(40)
    messages = [{"role": "user", "content": "Describe a harbour at dawn."}]
    times, texts = [], []
    for text in stream_reply(chat, messages, params):
        times.append(time.monotonic())
        texts.append(text)
    assert len(texts) >= 2 and all(a != b and b.startswith(a[:-1]) for a, b in zip(texts, texts[1:]))
    gaps = [b - a for a, b in zip(times, times[1:])][:-1]  # the last update comes at the end, whenever
    assert all(gap >= UPDATE_INTERVAL_S * 0.9 for gap in gaps), gaps
    assert texts[-1] == complete_reply(chat, messages, params)


def test_a_joined_batch_continues_exactly_where_each_reply_was():
    """Paused rows keep their keys/values and newcomers get theirs: greedy replies equal their solo runs (fp32)."""
    exact = load_chat_model(precision="fp32")
    story, colour = "Write a long story about a lighthouse keeper.", "Name a colour."
    solo_story, solo_colour = drain(submit(exact, story, 40)), drain(submit(exact, colour, 8))
    first = submit(exact, story, 40)
    head = [first.tokens.get(timeout=60) for _ in range(8)]
    assert drain(submit(exact, colour, 8)) == solo_colour
    assert not first.done  # the colour reply was generated inside the story's batch
    assert head + drain(first) == solo_story


def test_a_kept_system_prompt_gives_the_reply_a_whole_prompt_pass_gives(monkeypatch):
    """stream_reply marks the system prompt (chat_format.system_prefix_length): the engine runs it once and later
    chats start from its keys/values, with the greedy replies of whole prompts (fp32)."""
    exact = load_chat_model(precision="fp32")
    chats = [[SYSTEM, {"role": "user", "content": text}] for text in ("Where is the treasure?", "Name a colour.")]
    monkeypatch.setattr("assistant.generation.system_prefix_length", lambda *args: 0)
    whole = [reply(exact, messages) for messages in chats]
    monkeypatch.undo()
    kept = engine_for(exact.host).prefixes
    before = kept.hits + kept.misses
    assert [reply(exact, messages) for messages in chats] == whole
    assert kept.hits + kept.misses == before + 2 and kept.hits >= 1, "the system prompt's keys/values were reused"


EXIT_SCRIPT = """
import atexit, os, threading

@atexit.register  # registered first, so it runs after every handler the imports below register
def engine_threads_ended():
    alive = [t.name for t in threading.enumerate() if t.name == "batch-engine" and t.is_alive()]
    if alive:
        print("alive at exit:", alive, flush=True)
        os._exit(3)

from assistant.generation import GenerationParams, complete_reply
from assistant.loading import load_chat_model
chat = load_chat_model(precision="fp32")
print(complete_reply(chat, [{"role": "user", "content": "hi"}], GenerationParams(max_new_tokens=2, temperature=0)))
"""


def test_a_process_that_generated_ends_its_engine_thread_at_exit():
    """A torch thread still alive at interpreter teardown aborted ~1 exit in 3 (code 134) after the work was done."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-500:] + done.stderr[-2000:]
