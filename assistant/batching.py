"""Requests that arrive together are generated together: one batched `generate` per group, per base model.

One worker thread per base model (its `Host`) takes the oldest waiting request, gathers whatever
arrives within a few milliseconds that can share its batch, left-pads the prompts into one batch and
streams each row's tokens to its own queue. Rows of the base model and of any LoRA adapters of it share
a batch (peft's `adapter_names`); a prefix adapter's rows batch on their own. Each row stops on its
end-of-turn token, its own token budget, its own minimum length or its own cancel event, so Stop in
one browser never ends another's reply.

A request that arrives while a batch runs joins it: the batch pauses after its current token, its
rows keep their keys/values, the newcomers' prompts are run through the model, and all of them go on
as one batch. The newcomer does not wait for the longest reply to finish (measured with 8 chats
through the app: every first token within 0.8 s instead of up to 4.5 s). Prefix-tuned models, whose
cache peft builds itself, run their rows' prompts and replies through the model again instead.
A request that cannot join (other sampling settings, another prefix adapter) never waits behind later
ones: once it is the oldest, the running batch yields after SLICE_S and goes to the back of the line.

Every chat of an adapter with one system prompt starts with the same tokens (Request.prefix), so their
keys/values are computed once, by themselves, and kept (PrefixCache): a new chat's prompt pass runs only
its own tokens (with oneDNN's packed weights, assistant/quant.py: the default prompt's first token
248-331 -> 164-248 ms, customer_support's 426-585 -> 191-256 ms, in process on an AVX2 EPYC). Computed
alone and the same way whether or not they were kept, they never make a reply depend on which chats came
first; and such a row always runs as [system prompt][the rest][its last token as the first decode step],
alone or joining a batch. Newcomers' rests run in one pass together, padded, not one pass each.
An error inside a batch fails that batch's requests (they receive the exception) and the engine goes on.
"""

from __future__ import annotations

import atexit
import functools
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from assistant.decode import FAST, lean_generate
from assistant.loading import MAIN

logger = logging.getLogger(__name__)

MAX_BATCH = 8  # rows per batched generate call
GATHER_S = 0.01  # a burst's requests arriving this close together start in one batch
GATHER_ROUNDS = 3  # at most 3 x GATHER_S of extra latency, and only while a burst is still arriving
MIN_STEPS = 4  # tokens a batch makes before it pauses for newcomers: progress between joins
SLICE_S = 1.0  # a batch runs at least this long before it yields to an older request it cannot take
END = None  # pushed to a request's queue when its reply is complete
PREFIX_CACHE_MB = 128  # keys/values of system prompts kept per base model (the embedded model's: 46 KB a token)


@dataclass
class Request:
    """One reply to generate: prompt ids in, token ids out through `tokens` (then END, or an exception)."""

    ids: list[int]
    params: object  # assistant.generation.GenerationParams (not imported: it imports this module)
    cancel: threading.Event
    adapter: str | None = None  # the adapter's name on the host; None: the base model
    group: str = MAIN  # rows batch only within a group (base + LoRA rows, or one prefix adapter's)
    stop_ids: frozenset[int] = frozenset()  # end-of-turn tokens of the tokenizer it is served with
    tokens: queue.Queue = field(default_factory=queue.Queue)
    done: bool = False
    reply: list[int] = field(default_factory=list)  # tokens sent so far
    kv: list | None = None  # per layer (keys, values) of context[:-1], kept while paused for newcomers
    prefix: int = 0  # leading ids every chat with its system prompt starts with: their keys/values are kept
    queued: float = field(default_factory=time.monotonic)  # its place in line: the oldest goes first

    @property
    def key(self) -> tuple:
        """Sampling settings + batch group: only equal keys share a batch."""
        return (*self.params.batch_key(), self.group)

    @property
    def context(self) -> list[int]:
        """What the next generate call continues: the prompt and the reply so far."""
        return self.ids + self.reply

    @property
    def budget(self) -> int:
        """New tokens this request may still take."""
        return self.params.max_new_tokens - len(self.reply)


class _RowStop(StoppingCriteria):
    """Per-row stop (finished or cancelled); every row stops when the batch pauses.

    A batch pauses for newcomers that can join it, for an older request it cannot take (after
    SLICE_S) and for an adapter being attached. A join costs a prompt pass (the newcomers'; every
    row's for prefix-tuned models), so a batch first decodes for at least as long as its own prompt
    pass took: under a steady stream of arrivals at most half the time goes to prompt passes. Unless
    the newcomers are at least as many as its rows (BatchEngine.pause_for).
    """

    def __init__(self, batch: list[Request], engine: BatchEngine):
        self.batch, self.engine, self.steps = batch, engine, 0
        self.started, self.first_step_at = time.monotonic(), None
        self.reason: str | None = None  # why the batch paused: "join", "yield" or "attach"

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        self.steps += 1
        now = time.monotonic()
        self.first_step_at = self.first_step_at or now
        if self.engine.host.attaching.is_set():
            self.reason = "attach"
        elif self.steps >= MIN_STEPS and self.reason is None:
            decoded_long_enough = now - self.first_step_at >= self.first_step_at - self.started
            self.reason = self.engine.pause_for(self.batch, now - self.started, decoded_long_enough)
        return torch.tensor(
            [self.reason is not None or r.done or r.cancel.is_set() for r in self.batch], device=input_ids.device
        )


class _MinTokens(LogitsProcessor):
    """Each row's own minimum length: its end-of-turn tokens are ruled out until it has that many."""

    def __init__(self, batch: list[Request]):
        self.batch = batch

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, r in enumerate(self.batch):
            if len(r.reply) < r.params.min_new_tokens and r.stop_ids:
                scores[row, list(r.stop_ids)] = -float("inf")
        return scores


class _RowStreamer(BaseStreamer):
    """Routes each step's new tokens to the requests' queues; ends a row at its stop token, budget or cancel."""

    def __init__(self, batch: list[Request]):
        self.batch, self.prompt_seen = batch, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt itself
            self.prompt_seen = True
            return
        for request, token in zip(self.batch, value.reshape(-1).tolist(), strict=True):
            if request.done:
                continue
            if token in request.stop_ids or request.cancel.is_set():
                _finish(request)
                continue
            request.reply.append(token)
            request.tokens.put(token)
            if request.budget <= 0:
                _finish(request)

    def end(self) -> None:
        """Nothing: rows still open when generate() returns paused (see BatchEngine._run)."""


def _finish(request: Request, error: BaseException | None = None) -> None:
    """Close a request: END, or the error that ended its batch."""
    request.kv = None
    if not request.done:
        request.done = True
        request.tokens.put(END if error is None else error)


class BatchEngine:
    """The single generation thread of one base model (Host) and every adapter on it."""

    def __init__(self, host, max_batch: int = MAX_BATCH, gather_s: float = GATHER_S):
        self.host, self.max_batch, self.gather_s = host, max_batch, gather_s
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # rows of the generate call in progress, if any
        self.cond = threading.Condition()
        self.closed = False  # set at interpreter exit: the thread ends between batches
        self.failure: BaseException | None = None  # what ended the thread, if anything did
        self.prefixes = PrefixCache(PREFIX_CACHE_MB << 20)
        self.thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        """The thread still serves requests."""
        return self.thread.is_alive() and not self.closed

    def submit(self, request: Request) -> Request:
        """Queue a request; its tokens arrive on `request.tokens`, then END (or an exception)."""
        with self.cond:
            if not self.alive:
                raise RuntimeError(f"the generation engine has stopped ({self.failure or 'closed'}); restart the app")
            self.waiting.append(request)
            self.cond.notify()
        return request

    def pause_for(self, batch: list[Request], ran_s: float, decoded_long_enough: bool) -> str | None:
        """'join' when the oldest waiting request can join this batch, 'yield' when it cannot and the batch
        has had its slice, else None.

        A join waits until the batch `decoded_long_enough`, unless the newcomers are at least as many as its
        rows: their one prompt pass then delays fewer chats than it starts, and each such join at least doubles
        the batch, so it can come only a few times in a row (8 chats through /chat waited 0.9 s for one).
        """
        with self.cond:
            if not self.waiting:
                return None
            oldest = min(self.waiting, key=lambda r: r.queued)
            if oldest.key != batch[0].key:
                return "yield" if ran_s >= SLICE_S else None
            rows = sum(not r.done for r in batch)
            newcomers = min(sum(r.key == oldest.key for r in self.waiting), self.max_batch - rows)
            return "join" if newcomers > 0 and (decoded_long_enough or newcomers >= rows) else None

    def close(self, timeout: float = 10.0) -> None:
        """End the engine thread once its current batch is done (waiting requests are not started)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout)

    def _take_batch(self) -> list[Request] | None:
        with self.cond:
            while not self.waiting:
                if self.closed:
                    return None
                self.cond.wait()
            seen = len(self.waiting)
        # Requests sent together start together: wait while a burst is still arriving (a few ms, bounded).
        for _ in range(GATHER_ROUNDS):
            time.sleep(self.gather_s)
            with self.cond:
                if len(self.waiting) == seen or len(self.waiting) >= self.max_batch:
                    break
                seen = len(self.waiting)
        with self.cond:
            key = min(self.waiting, key=lambda r: r.queued).key
            batch = sorted((r for r in self.waiting if r.key == key), key=lambda r: r.queued)[: self.max_batch]
            self.waiting = [r for r in self.waiting if r not in batch]
        return batch

    def _loop(self) -> None:
        try:
            while (batch := self._take_batch()) is not None:
                try:
                    live = [r for r in batch if not r.cancel.is_set()]
                    for r in batch:
                        if r not in live:
                            _finish(r)
                    if live:
                        self._run(live)
                except Exception as error:  # a bug outside generate(): fail this batch, serve the next
                    logger.exception("the generation engine failed a batch")
                    for r in batch:
                        _finish(r, error)
        except BaseException as error:  # the thread is ending: nobody may wait for it
            self.failure = error
            raise
        finally:
            with self.cond:
                self.closed, orphans, self.waiting = True, self.waiting, []
            for r in orphans:
                _finish(r, RuntimeError("the generation engine stopped"))

    def _run(self, batch: list[Request]) -> None:
        host = self.host
        pad = host.tokenizer.pad_token_id
        device = next(host.base.parameters()).device
        # Left padding: every row's next token is at the same (last) position.
        ids, mask = _left_padded([r.context for r in batch], pad, device)
        reuse = batch[0].group == MAIN  # peft's prefix tuning builds its own cache
        if len(batch) > 1:
            logger.info("generating %d replies in one batch", len(batch))
        self.running = batch
        output, stop, error = None, _RowStop(batch, self), None
        while host.attaching.is_set():  # an adapter is attaching: let it have the model first (< 1 s)
            time.sleep(0.005)
        try:
            with host.lock, torch.inference_mode():
                if batch[0].params.seed is not None:
                    torch.manual_seed(batch[0].params.seed)
                model, context, extra = host.runner(batch[0].group, [r.adapter for r in batch])
                decoding = host.decoding_for(batch[0].group)
                generate = (functools.partial(lean_generate, model, attention=decoding.attention)
                            if decoding.engine == FAST else model.generate)
                with context:
                    output = generate(
                        input_ids=ids,
                        attention_mask=mask,
                        past_key_values=self._past(batch, pad, device) if reuse else None,
                        return_dict_in_generate=True,
                        streamer=_RowStreamer(batch),
                        stopping_criteria=StoppingCriteriaList([stop]),
                        logits_processor=LogitsProcessorList([_MinTokens(batch)]),
                        pad_token_id=pad,
                        **extra,
                        **_budgeted(batch[0].params.generate_kwargs(), batch),
                    )
        except Exception as caught:  # the requests must learn of it, not hang
            logger.exception("generation failed")
            error = caught
        finally:
            # Rows still open paused: they go on in a later batch, with what they have.
            paused = [] if error else [r for r in batch if not r.done and not r.cancel.is_set() and r.budget > 0]
            for row, r in enumerate(batch):
                r.kv = self._kept_kv(output, row, r) if reuse and r in paused and output is not None else None
                if r not in paused:
                    _finish(r, error)
                elif stop.reason == "yield":
                    r.queued = time.monotonic()  # behind the older request it yielded to
            with self.cond:
                self.waiting = paused + self.waiting
            self.running = []

    @staticmethod
    def _kept_kv(output, row: int, request: Request) -> list | None:
        """A paused row's keys/values, or None (its context is then run again) if the cache is not plain."""
        try:
            return _row_kv(output.past_key_values, row, len(request.context) - 1)
        except (AttributeError, IndexError, TypeError):  # e.g. a model whose cache has no per-layer tensors
            logger.warning("could not keep the cache of a paused reply; its context will be run again")
            return None

    def _past(self, batch: list[Request], pad: int, device) -> DynamicCache | None:
        """The keys/values a batch starts from; None: every prompt runs whole in generate()'s first step.

        A row with a system prompt always runs as [system prompt alone][the rest][its last token, as the first
        decode step], alone or in a batch: its greedy reply is the same whichever rows it was batched with.
        """
        if any(r.kv is not None or r.prefix for r in batch):
            return self._batch_cache(batch, pad, device)
        return None

    def _prefix_kv(self, request: Request, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of the request's system prompt (its first `prefix` ids), run alone once and then kept.

        Alone, so they are the same whichever chats asked first: a reply never depends on what the cache held.
        """
        head = request.ids[: request.prefix]
        key = (request.adapter, tuple(head))
        self.prefixes.keep_for(self.host.version)  # an attach may have changed any layer
        kv = self.prefixes.get(key)
        if kv is None:
            model, _, extra = self.host.runner(MAIN, [request.adapter])
            out = model(input_ids=torch.tensor([head], device=device), past_key_values=DynamicCache(),
                        use_cache=True, logits_to_keep=1, **extra)
            kv = self.prefixes.put(key, _row_kv(out.past_key_values, 0, len(head)))
        return kv

    def _batch_cache(self, batch: list[Request], pad: int, device) -> DynamicCache:
        """One cache for a resumed batch: paused rows' keys/values, then the newcomers' (_newcomers_kv)."""
        new = [r for r in batch if r.kv is None]
        if new:
            self._newcomers_kv(new, pad, device)
        return DynamicCache(ddp_cache_data=_stacked([r.kv for r in batch], max(len(r.context) - 1 for r in batch)))

    def _newcomers_kv(self, new: list[Request], pad: int, device) -> None:
        """Each newcomer's keys/values of context[:-1]: its system prompt's (kept), then one pass for all of them.

        The pass runs every newcomer's own tokens at once, on the kept keys/values: row by row it laid out 8 chats
        that arrived together as 8 passes of a few tokens. A row is [padding][system prompt][padding][the rest],
        the padding masked out, each part numbered from where it starts in the row's own context.
        """
        heads = [self._prefix_kv(r, device) if r.prefix else None for r in new]
        rests = [r.context[r.prefix : -1] for r in new]
        if all(heads) and not any(rests):
            for r, head in zip(new, heads, strict=True):
                r.kv = head
            return
        held = max(r.prefix for r in new)
        ids, own = _left_padded(rests, pad, device, width=1)  # width 1 at least: a row may have no own tokens
        heads_mask = torch.tensor([[0] * (held - r.prefix) + [1] * r.prefix for r in new], device=device)
        model, _, extra = self.host.runner(MAIN, [r.adapter for r in new])
        out = model(
            input_ids=ids,
            attention_mask=torch.cat((heads_mask, own), 1),
            position_ids=(own.cumsum(-1) - 1).clamp(min=0) + torch.tensor([[r.prefix] for r in new], device=device),
            # A new cache of new tensors: updates concatenate, so the kept keys/values stay as they are.
            past_key_values=DynamicCache(ddp_cache_data=_stacked(heads, held)) if held else DynamicCache(),
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        for row, (r, head, rest) in enumerate(zip(new, heads, rests, strict=True)):
            kv = _row_kv(out.past_key_values, row, len(rest))
            r.kv = kv if head is None else [
                (torch.cat((head_keys, keys), 1), torch.cat((head_values, values), 1))
                for (head_keys, head_values), (keys, values) in zip(head, kv, strict=True)
            ]


class PrefixCache:
    """Keys/values of system prompts by (adapter, ids), least recently used dropped past `limit` bytes."""

    def __init__(self, limit: int):
        self.limit, self.size, self.hits, self.misses, self.version = limit, 0, 0, 0, 0
        self.entries: OrderedDict[tuple, tuple[list, int]] = OrderedDict()  # key -> (keys/values, their bytes)

    def keep_for(self, version: int) -> None:
        """Drop every entry if the host's version is not the one they were computed at."""
        if version != self.version:
            self.entries.clear()
            self.size, self.version = 0, version

    def get(self, key: tuple) -> list | None:
        """The kept keys/values, or None."""
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return entry[0]

    def put(self, key: tuple, kv: list) -> list:
        """Keep `kv` (unless it alone is over the limit), dropping the least recently used; returns it."""
        size = sum(k.nbytes + v.nbytes for k, v in kv)
        if size <= self.limit:
            while self.entries and self.size + size > self.limit:
                self.size -= self.entries.popitem(last=False)[1][1]
            self.entries[key], self.size = (kv, size), self.size + size
        return kv


def _left_padded(contexts: list[list[int]], pad: int, device, width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of rows aligned on the right (at least `width` wide)."""
    width = max(width, *map(len, contexts))
    ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts], device=device)
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=device)
    return ids, mask


def _row_kv(cache, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One row's keys/values over its last `length` positions (its real tokens), copied out of a batch cache."""
    if any(layer.keys.shape[2] < length for layer in cache.layers):  # e.g. a sliding-window cache
        raise IndexError(f"the cache holds fewer than {length} positions")
    return [  # from shape - length, not -length: a row with no positions gets none, not all
        (layer.keys[row, :, layer.keys.shape[2] - length :].clone(),
         layer.values[row, :, layer.values.shape[2] - length :].clone())
        for layer in cache.layers
    ]


def _stacked(kvs: list[list | None], length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rows' keys/values per layer, each row left-padded with zeros to `length` positions (None: padding only)."""
    like = next(kv for kv in kvs if kv is not None)
    kvs = [kv if kv is not None else [(k[:, :0], v[:, :0]) for k, v in like] for kv in kvs]
    return [
        tuple(torch.stack([F.pad(row[i], (0, 0, length - row[i].shape[1], 0)) for row in per_row]) for i in (0, 1))
        for per_row in zip(*kvs, strict=True)  # one layer: (keys, values) of each row
    ]


def _budgeted(kwargs: dict, batch: list[Request]) -> dict:
    """generate() limits for a batch whose rows have spent different parts of their budgets."""
    kwargs["max_new_tokens"] = max(r.budget for r in batch)  # each row also stops at its own budget
    return kwargs


def stop_ids(model, tokenizer) -> frozenset[int]:
    """End-of-turn tokens: the model's generation config's and the tokenizer's."""
    return end_of_turn_ids(model.generation_config, tokenizer)


def end_of_turn_ids(generation_config, tokenizer) -> frozenset[int]:
    """End-of-turn tokens from a generation config and a tokenizer (what every reply stops at)."""
    eos = generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return frozenset(t for t in [*eos, tokenizer.eos_token_id] if t is not None)


_engines_lock = threading.Lock()
_engines: list[BatchEngine] = []


def running_generations() -> int:
    """Rows being generated right now, over every model (0 once every Stop has taken effect)."""
    rows = [
        r for engine in _engines for r in [*engine.running, *engine.waiting] if r.reply or r in engine.running
    ]
    return sum(not r.done for r in rows)


@atexit.register
def _close_engines() -> None:
    # A thread that ran torch ops still alive when the interpreter tears down aborts the process
    # ("terminate called without an active exception", exit code 134) in about 1 run of 3, after
    # train.sft or train.eval finished their work: end the engine threads first.
    with _engines_lock:
        engines = list(_engines)
    for engine in engines:
        engine.close()


def engine_for(host) -> BatchEngine:
    """The base model's batch engine, started on first use (a new one if the last one stopped)."""
    with _engines_lock:
        if host.engine is None or not host.engine.thread.is_alive():
            host.engine = BatchEngine(host)
            _engines.append(host.engine)
        return host.engine
