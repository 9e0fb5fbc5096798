"""The batch engine on a tiny in-process model: failures reach the callers, fairness, per-row lengths."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from assistant import batching
from assistant.batching import END, Request, engine_for
from assistant.generation import GenerationParams, stream_reply
from assistant.loading import ChatModel, Host
from assistant.models import Precision
from tests.conftest import tiny_llama

PROMPT = [5, 9, 17, 33, 2]


@pytest.fixture
def host() -> Host:
    model = tiny_llama().eval()
    model.generation_config.eos_token_id = None  # rows end only at their budget unless a test says otherwise
    host = Host("tiny", model, SimpleNamespace(pad_token_id=0, eos_token_id=None), Precision("fp32", torch.float32))
    yield host
    if host.engine is not None:
        host.engine.close()


def params(tokens: int, temperature: float = 0.0, min_tokens: int = 0) -> GenerationParams:
    return GenerationParams(max_new_tokens=tokens, temperature=temperature, repetition_penalty=1.0,
                            min_new_tokens=min_tokens)


def drain(request: Request, timeout: float = 30) -> list:
    """Every item the request receives until END or an exception (which ends the list)."""
    items = []
    while True:
        item = request.tokens.get(timeout=timeout)
        if item is END:
            return items
        items.append(item)
        if isinstance(item, BaseException):
            return items


def test_a_batch_that_raises_fails_its_requests_and_the_engine_goes_on(host, monkeypatch):
    runner, calls = host.runner, []

    def failing_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom in the model")
        return runner(*args)

    monkeypatch.setattr(host, "runner", failing_once)
    engine = engine_for(host)
    first = engine.submit(Request(PROMPT, params(4), threading.Event()))
    items = drain(first)
    assert isinstance(items[-1], RuntimeError) and "boom" in str(items[-1])
    second = engine.submit(Request(PROMPT, params(4), threading.Event()))
    assert len(drain(second)) == 4, "the engine serves the next request"
    assert engine.thread.is_alive()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_thread_fails_its_callers_instead_of_leaving_them_waiting(host, monkeypatch):
    def kill_thread(*args):
        raise SystemExit("the engine thread ends")  # not an Exception: nothing in the loop catches it

    monkeypatch.setattr(host, "runner", kill_thread)
    monkeypatch.setattr("assistant.generation.POLL_S", 0.05)
    monkeypatch.setattr("assistant.generation.fit_history", lambda *args: (PROMPT, 0))
    monkeypatch.setattr("assistant.generation.system_prefix_length", lambda *args: 0)  # a tokenizer with no template
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None, decode=lambda ids, **_: "x" * len(ids))
    chat = ChatModel(host.base, tokenizer, "tiny", host.precision, host=host)
    outcome: list = []

    def caller() -> None:
        try:
            list(stream_reply(chat, [{"role": "user", "content": "hi"}], params(3)))
        except RuntimeError as error:
            outcome.append(error)

    waiting = threading.Thread(target=caller, daemon=True)
    waiting.start()
    waiting.join(10)
    assert not waiting.is_alive(), "the caller is still waiting for a dead engine"
    assert outcome and "generation failed" in str(outcome[0])
    host.engine.thread.join(5)
    assert not host.engine.thread.is_alive()
    # The next request gets a new engine thread.
    monkeypatch.undo()
    assert len(drain(engine_for(host).submit(Request(PROMPT, params(3), threading.Event())))) == 3


def test_an_older_request_with_other_settings_never_waits_behind_later_ones(host, monkeypatch):
    monkeypatch.setattr(batching, "SLICE_S", 0.05)
    engine = engine_for(host)
    arrived: dict[str, float] = {}

    def first_token_time(name: str, request: Request) -> threading.Thread:
        def watch():
            request.tokens.get(timeout=60)
            arrived[name] = time.monotonic()
            drain(request, 60)

        thread = threading.Thread(target=watch)
        thread.start()
        return thread

    long = engine.submit(Request(PROMPT, params(120), threading.Event()))
    long.tokens.get(timeout=30)  # the long greedy reply is under way
    other = engine.submit(Request(PROMPT, params(4, temperature=0.7), threading.Event()))  # cannot join
    time.sleep(0.01)
    later = engine.submit(Request(PROMPT, params(4), threading.Event()))  # could join the long one
    watchers = [first_token_time("other", other), first_token_time("later", later)]
    for w in watchers:
        w.join(60)
    assert arrived["other"] < arrived["later"], "a later request went ahead of an older one with other settings"
    assert not long.done or len(long.reply) < 120, "the long reply yielded before it finished"
    drain(long, 60)


def test_min_and_max_tokens_are_per_row(host, monkeypatch):
    runner, batch_sizes = host.runner, []
    monkeypatch.setattr(host, "runner", lambda group, adapters: batch_sizes.append(len(adapters)) or runner(group, adapters))
    engine = engine_for(host)
    with torch.inference_mode():
        first = int(host.base(torch.tensor([PROMPT])).logits[0, -1].argmax())
    stop = frozenset({first})  # the greedy first token ends a reply...
    free = Request(PROMPT, params(10), threading.Event(), stop_ids=stop)
    held = Request(PROMPT, params(10, min_tokens=6), threading.Event(), stop_ids=stop)  # ...unless held back
    short = Request(PROMPT, params(3, min_tokens=3), threading.Event())
    for r in (free, held, short):
        engine.submit(r)
    assert drain(free) == [], "a reply without a minimum ends at its stop token"
    held_tokens = drain(held)
    assert len(held_tokens) >= 6 and first not in held_tokens[:6]
    assert len(drain(short)) == 3
    assert batch_sizes[0] == 3, "the three requests shared one batch"


def test_end_of_turn_ids_leave_out_tokens_a_model_does_not_have(host):
    no_eos = SimpleNamespace(eos_token_id=None)  # a tokenizer without an end-of-sequence token
    assert batching.stop_ids(host.base, no_eos) == frozenset()
    host.base.generation_config.eos_token_id = 3
    assert batching.stop_ids(host.base, no_eos) == frozenset({3})
    request = Request(PROMPT, params(4, min_tokens=2), threading.Event(), stop_ids=batching.stop_ids(host.base, no_eos))
    tokens = drain(engine_for(host).submit(request))
    assert len(tokens) >= 2 and all(isinstance(t, int) for t in tokens), tokens


def slowed(host: Host, pass_s: float, step_s: float) -> None:
    """Every forward over several positions (a prompt pass) takes pass_s more, every decode step step_s more."""
    host.base.model.embed_tokens.register_forward_hook(
        lambda module, args, out: time.sleep(pass_s if args[0].shape[-1] > 1 else step_s))


def test_newcomers_as_many_as_the_running_rows_join_at_once_and_fewer_wait_until_the_batch_decoded_its_pass(host):
    slowed(host, pass_s=0.5, step_s=0.002)  # a batch decodes ~140 steps before it has decoded as long as its pass
    engine = engine_for(host)

    def tokens_when_the_late_one_starts(running: int) -> list[int]:
        first = [engine.submit(Request(PROMPT, params(400), threading.Event())) for _ in range(running)]
        for r in first:
            [r.tokens.get(timeout=30) for _ in range(6)]  # under way
        late = engine.submit(Request(PROMPT[:4], params(3), threading.Event()))
        late.tokens.get(timeout=30)
        made = [len(r.reply) for r in first]
        for r in first:
            r.cancel.set()
        drain(late)
        return made

    # One running row, one newcomer: it joins after MIN_STEPS, not after ~100 steps.
    assert max(tokens_when_the_late_one_starts(1)) < 6 + batching.MIN_STEPS + 10
    # Two running rows, one newcomer: the rows first decode as long as their prompt pass took.
    assert min(tokens_when_the_late_one_starts(2)) >= 40


SYSTEM_IDS = [5, 9, 17, 33, 2, 7]  # a system prompt's tokens, then each chat's own
CHATS = [SYSTEM_IDS + [40, 41, 42, 3], SYSTEM_IDS + [50, 51, 3], SYSTEM_IDS + [60, 3, 61, 62, 63]]


def prompt_rows(host: Host) -> list[int]:
    """Positions each forward pass runs from now on (recorded at the embedding: passes and decode steps alike)."""
    seen: list[int] = []
    host.base.model.embed_tokens.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[-1]))
    return seen


@pytest.mark.parametrize("engine", ["lean", "generate"])
def test_a_system_prompt_runs_through_the_model_once_and_no_reply_depends_on_what_was_kept(host, engine):
    from assistant.decode import GENERATE, Decoding

    if engine == "generate":
        host.decoding = Decoding(GENERATE, "the reference loop")

    def reply(ids: list[int], prefix: int) -> list[int]:
        return drain(engine_for(host).submit(Request(ids, params(6), threading.Event(), prefix=prefix)))

    fresh = [reply(ids, 0) for ids in CHATS]  # nothing kept: every prompt runs whole
    seen = prompt_rows(host)
    assert reply(CHATS[0], len(SYSTEM_IDS)) == fresh[0]
    # The system prompt alone, then the chat's own tokens on its keys/values, then the last as a decode step.
    assert seen[:3] == [6, 3, 1], seen
    seen.clear()
    assert reply(CHATS[1], len(SYSTEM_IDS)) == fresh[1]
    assert seen[0] == 2 and 6 not in seen, "the second chat starts from the kept keys/values"
    assert reply(CHATS[0], len(SYSTEM_IDS)) == fresh[0], "the same reply whether the cache was cold or warm"
    # Chats that arrive together: their own tokens in one pass on the kept keys/values, then one batch.
    engine = engine_for(host)
    seen.clear()
    with engine.cond:  # held: all three are waiting when the engine next looks
        together = [engine.submit(Request(ids, params(6), threading.Event(), prefix=p))
                    for ids, p in zip(CHATS, [6, 0, 6])]
    assert [drain(r) for r in together] == fresh
    assert seen[:2] == [len(CHATS[1]) - 1, 1], f"one pass for the three newcomers, then decode steps: {seen}"
    # What such rows resume from: the keys/values of one whole pass over each context but its last token.
    # (The last has no own tokens before its last one: its keys/values are its system prompt's.)
    rows = [Request(ids, params(6), threading.Event(), prefix=p)
            for ids, p in zip([*CHATS, SYSTEM_IDS + [70]], [6, 0, 6, 6])]
    with torch.inference_mode():
        engine._newcomers_kv(rows, host.tokenizer.pad_token_id, "cpu")
        for r in rows:
            whole = host.base(input_ids=torch.tensor([r.ids[:-1]]), use_cache=True).past_key_values
            for (keys, values), layer in zip(r.kv, whole.layers, strict=True):
                torch.testing.assert_close((keys, values), (layer.keys[0], layer.values[0]))
    host.version += 1  # what an attach does: the kept keys/values may be stale
    seen.clear()
    assert reply(CHATS[2], len(SYSTEM_IDS)) == fresh[2]
    assert seen[0] == 6, "computed again after the model changed"


def test_kept_system_prompts_stay_under_their_limit_and_the_least_recently_used_goes_first():
    def kv(positions: int) -> list:  # one layer: keys and values of 4-byte floats, 8 per position
        return [(torch.zeros(1, positions, 8), torch.zeros(1, positions, 8))]

    cache = batching.PrefixCache(limit=3 * 64 * 5)  # room for three entries of 5 positions (320 bytes each)
    for name in "abc":
        cache.put(name, kv(5))
    assert cache.get("a") is not None  # now the most recently used
    cache.put("d", kv(5))
    assert list(cache.entries) == ["c", "a", "d"] and cache.get("b") is None
    cache.put("e", kv(10))  # two entries' room: the two least recently used make way
    assert list(cache.entries) == ["d", "e"] and cache.size == 320 * 3
    assert cache.put("f", kv(16)) is not None and "f" not in cache.entries, "alone over the limit: not kept"
    assert cache.size == sum(k.nbytes + v.nbytes for kv_, _ in cache.entries.values() for k, v in kv_)
    cache.keep_for(cache.version + 1)
    assert not cache.entries and cache.size == 0
