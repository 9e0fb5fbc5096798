"""Requests that arrive together are generated together: one batched `generate` per group.

A worker thread per model takes the first waiting request, gathers whatever arrives within a few
milliseconds with the same sampling settings, left-pads the prompts into one batch and streams each
row's tokens to its own queue. Each row stops on its end-of-turn token, its own token budget or its
own cancel event, so Stop in one browser never ends another's reply.

A request that arrives while a batch runs joins it: the batch pauses after its current token, its
rows keep their keys/values, the newcomers' prompts are run through the model, and all of them go on
as one batch. The newcomer does not wait for the longest reply to finish (measured with 8 chats
through the app: every first token within 0.8 s instead of up to 4.5 s). Prefix-tuned models, whose
cache peft builds itself, run their rows' prompts and replies through the model again instead.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

logger = logging.getLogger(__name__)

MAX_BATCH = 8  # rows per batched generate call
GATHER_ROUNDS = 5  # at most 5 x gather_s of extra latency for the first request of a burst
MIN_STEPS = 4  # tokens a batch makes before it pauses for newcomers: progress between joins
END = None  # pushed to a request's queue when its reply is complete


@dataclass
class Request:
    """One reply to generate: prompt ids in, token ids out through `tokens`."""

    ids: list[int]
    params: object  # assistant.generation.GenerationParams (not imported: it imports this module)
    use_adapter: bool
    cancel: threading.Event
    tokens: queue.Queue = field(default_factory=queue.Queue)
    done: bool = False
    reply: list[int] = field(default_factory=list)  # tokens sent so far
    kv: list | None = None  # per layer (keys, values) of context[:-1], kept while paused for newcomers

    @property
    def key(self) -> tuple:
        """Sampling settings + adapter on/off: only equal keys share a batch."""
        return self.params.batch_key(self.use_adapter)

    @property
    def context(self) -> list[int]:
        """What the next generate call continues: the prompt and the reply so far."""
        return self.ids + self.reply

    @property
    def budget(self) -> int:
        """New tokens this request may still take."""
        return self.params.max_new_tokens - len(self.reply)


class _RowStop(StoppingCriteria):
    """Per-row stop (finished or cancelled); every row stops when the batch pauses for newcomers.

    A pause costs a prompt pass (the newcomers'; every row's for prefix-tuned models), so a batch first
    decodes for at least as long as its own prompt pass took: under a steady stream of arrivals at most
    half the time goes to prompt passes.
    """

    def __init__(self, batch: list[Request], engine: BatchEngine):
        self.batch, self.engine, self.steps = batch, engine, 0
        self.started, self.first_step_at = time.monotonic(), None

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        self.steps += 1
        now = time.monotonic()
        self.first_step_at = self.first_step_at or now
        decoded_long_enough = now - self.first_step_at >= self.first_step_at - self.started
        pause = self.steps >= MIN_STEPS and decoded_long_enough and self.engine.joiners_waiting(self.batch)
        return torch.tensor(
            [pause or r.done or r.cancel.is_set() for r in self.batch], device=input_ids.device
        )


class _RowStreamer(BaseStreamer):
    """Routes each step's new tokens to the requests' queues; ends a row at its stop token, budget or cancel."""

    def __init__(self, batch: list[Request], stop_ids: set[int]):
        self.batch, self.stop_ids, self.prompt_seen = batch, stop_ids, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt itself
            self.prompt_seen = True
            return
        for request, token in zip(self.batch, value.reshape(-1).tolist(), strict=True):
            if request.done:
                continue
            if token in self.stop_ids or request.cancel.is_set():
                self._finish(request)
                continue
            request.reply.append(token)
            request.tokens.put(token)
            if request.budget <= 0:
                self._finish(request)

    def end(self) -> None:
        """Nothing: rows still open when generate() returns paused for newcomers (see BatchEngine._run)."""

    @staticmethod
    def _finish(request: Request) -> None:
        request.kv = None
        if not request.done:
            request.done = True
            request.tokens.put(END)


class BatchEngine:
    """The single generation thread of one ChatModel."""

    def __init__(self, chat, max_batch: int = MAX_BATCH, gather_s: float = 0.03):
        self.chat, self.max_batch, self.gather_s = chat, max_batch, gather_s
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # rows of the generate call in progress, if any
        self.cond = threading.Condition()
        self.closed = False  # set at interpreter exit: the thread ends between batches
        self.thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> Request:
        """Queue a request; its tokens arrive on `request.tokens`, then END."""
        with self.cond:
            self.waiting.append(request)
            self.cond.notify()
        return request

    def joiners_waiting(self, batch: list[Request]) -> bool:
        """A waiting request could join this batch (same settings, room left)."""
        with self.cond:
            open_rows = sum(not r.done for r in batch)
            return open_rows < self.max_batch and any(r.key == batch[0].key for r in self.waiting)

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
        # Let requests sent together arrive together: wait while a burst is still arriving (bounded).
        seen = 0
        for _ in range(GATHER_ROUNDS):
            time.sleep(self.gather_s)
            with self.cond:
                if len(self.waiting) == seen or len(self.waiting) >= self.max_batch:
                    break
                seen = len(self.waiting)
        with self.cond:
            key = self.waiting[0].key
            batch = [r for r in self.waiting if r.key == key][: self.max_batch]
            self.waiting = [r for r in self.waiting if r not in batch]
        return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            live = [r for r in batch if not r.cancel.is_set()]
            for r in batch:
                if r not in live:
                    _RowStreamer._finish(r)
            if live:
                self._run(live)

    def _run(self, batch: list[Request]) -> None:
        chat = self.chat
        pad = chat.tokenizer.pad_token_id
        device = next(chat.model.parameters()).device
        # Left padding: every row's next token is at the same (last) position.
        ids, mask = _left_padded([r.context for r in batch], pad, device)
        reuse = chat.method != "prefix"  # peft's prefix tuning builds its own cache
        if len(batch) > 1:
            logger.info("generating %d replies in one batch", len(batch))
        self.running = batch
        output = None
        try:
            with chat.lock, torch.inference_mode():
                if batch[0].params.seed is not None:
                    torch.manual_seed(batch[0].params.seed)
                adapter_off = chat.adapter and not batch[0].use_adapter
                with chat.model.disable_adapter() if adapter_off else contextlib.nullcontext():
                    resumed = reuse and any(r.kv for r in batch)
                    output = chat.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        past_key_values=self._batch_cache(batch, pad, device) if resumed else None,
                        return_dict_in_generate=True,
                        streamer=_RowStreamer(batch, set(_stop_ids(chat))),
                        stopping_criteria=StoppingCriteriaList([_RowStop(batch, self)]),
                        pad_token_id=pad,
                        **_budgeted(batch[0].params.generate_kwargs(), batch),
                    )
        except Exception as error:  # the requests must learn of it, not hang
            logger.exception("generation failed")
            for r in batch:
                if not r.done:
                    r.done = True
                    r.tokens.put(error)
        finally:
            # Rows still open paused for newcomers: they go first in the next batch, with what they have.
            paused = [r for r in batch if not r.done and not r.cancel.is_set() and r.budget > 0]
            for row, r in enumerate(batch):
                r.kv = self._kept_kv(output, row, r) if reuse and r in paused and output is not None else None
                if r not in paused:
                    _RowStreamer._finish(r)
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

    def _batch_cache(self, batch: list[Request], pad: int, device) -> DynamicCache:
        """One cache for a resumed batch: paused rows' keys/values, the newcomers' from a prompt pass."""
        new = [r for r in batch if r.kv is None]
        if new:
            contexts = [r.context[:-1] for r in new]
            ids, mask = _left_padded(contexts, pad, device)
            out = self.chat.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),  # as generate() numbers padded rows
                past_key_values=DynamicCache(),
                use_cache=True,
                logits_to_keep=1,
            )
            for row, (r, context) in enumerate(zip(new, contexts, strict=True)):
                r.kv = _row_kv(out.past_key_values, row, len(context))
        length = max(len(r.context) - 1 for r in batch)
        layers = []
        for per_row in zip(*(r.kv for r in batch), strict=True):  # one layer: (keys, values) of each row
            keys, values = (
                torch.stack([F.pad(t[i], (0, 0, length - t[i].shape[1], 0)) for t in per_row]) for i in (0, 1)
            )
            layers.append((keys, values))
        return DynamicCache(ddp_cache_data=layers)


def _left_padded(contexts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of rows aligned on the right."""
    width = max(len(c) for c in contexts)
    ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts], device=device)
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=device)
    return ids, mask


def _row_kv(cache, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One row's keys/values over its last `length` positions (its real tokens), copied out of a batch cache."""
    if any(layer.keys.shape[2] < length for layer in cache.layers):  # e.g. a sliding-window cache
        raise IndexError(f"the cache holds fewer than {length} positions")
    return [
        (layer.keys[row, :, -length:].clone(), layer.values[row, :, -length:].clone())
        for layer in cache.layers
    ]


def _budgeted(kwargs: dict, batch: list[Request]) -> dict:
    """generate() limits for a batch whose rows have spent different parts of their budgets."""
    spent = [len(r.reply) for r in batch]
    kwargs["max_new_tokens"] = max(r.budget for r in batch)  # each row also stops at its own budget
    if "min_new_tokens" in kwargs:
        kwargs["min_new_tokens"] = max(0, kwargs["min_new_tokens"] - max(spent))
    return kwargs


def _stop_ids(chat) -> list[int]:
    eos = chat.model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return eos + [chat.tokenizer.eos_token_id]


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


def engine_for(chat) -> BatchEngine:
    """The model's batch engine, started on first use."""
    with _engines_lock:
        if chat.engine is None:
            chat.engine = BatchEngine(chat)
            _engines.append(chat.engine)
        return chat.engine
