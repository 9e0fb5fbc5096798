"""Requests that arrive together are generated together: one batched `generate` per group.

A worker thread per model takes the first waiting request, gathers whatever arrives within a few
milliseconds with the same sampling settings, left-pads the prompts into one batch and streams each
row's tokens to its own queue. Each row stops on its end-of-turn token or its own cancel event, so
Stop in one browser never ends another's reply.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

logger = logging.getLogger(__name__)

MAX_BATCH = 8  # rows per batched generate call
GATHER_ROUNDS = 5  # at most 5 x gather_s of extra latency for the first request of a burst
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

    @property
    def key(self) -> tuple:
        """Sampling settings + adapter on/off: only equal keys share a batch."""
        return self.params.batch_key(self.use_adapter)


class _RowCancel(StoppingCriteria):
    """Per-row stop: the row's cancel event is set."""

    def __init__(self, batch: list[Request]):
        self.batch = batch

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([r.cancel.is_set() for r in self.batch], device=input_ids.device)


class _RowStreamer(BaseStreamer):
    """Routes each step's new tokens to the requests' queues; ends a row at its stop token or cancel."""

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
            else:
                request.tokens.put(token)

    def end(self) -> None:
        for request in self.batch:
            self._finish(request)

    @staticmethod
    def _finish(request: Request) -> None:
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
        self.thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> Request:
        """Queue a request; its tokens arrive on `request.tokens`, then END."""
        with self.cond:
            self.waiting.append(request)
            self.cond.notify()
        return request

    def _take_batch(self) -> list[Request]:
        with self.cond:
            while not self.waiting:
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
        while True:
            batch = self._take_batch()
            live = [r for r in batch if not r.cancel.is_set()]
            for r in batch:
                if r not in live:
                    _RowStreamer._finish(r)
            if live:
                self._run(live)

    def _run(self, batch: list[Request]) -> None:
        chat = self.chat
        pad = chat.tokenizer.pad_token_id
        width = max(len(r.ids) for r in batch)
        device = next(chat.model.parameters()).device
        # Left padding: every row's next token is at the same (last) position.
        ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in batch], device=device)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in batch], device=device)
        stop_ids = set(_stop_ids(chat))
        streamer = _RowStreamer(batch, stop_ids)
        if len(batch) > 1:
            logger.info("generating %d replies in one batch", len(batch))
        self.running = batch
        try:
            with chat.lock, torch.inference_mode():
                if batch[0].params.seed is not None:
                    torch.manual_seed(batch[0].params.seed)
                adapter_off = chat.adapter and not batch[0].use_adapter
                with chat.model.disable_adapter() if adapter_off else contextlib.nullcontext():
                    chat.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_RowCancel(batch)]),
                        pad_token_id=pad,
                        **batch[0].params.generate_kwargs(),
                    )
        except Exception as error:  # the requests must learn of it, not hang
            logger.exception("generation failed")
            for r in batch:
                if not r.done:
                    r.done = True
                    r.tokens.put(error)
        finally:
            self.running = []
            streamer.end()


def _stop_ids(chat) -> list[int]:
    eos = chat.model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return eos + [chat.tokenizer.eos_token_id]


_engines_lock = threading.Lock()
_engines: list[BatchEngine] = []


def running_generations() -> int:
    """Rows being generated right now, over every model (0 once every Stop has taken effect)."""
    return sum(not request.done for engine in _engines for request in engine.running)


def engine_for(chat) -> BatchEngine:
    """The model's batch engine, started on first use."""
    with _engines_lock:
        if chat.engine is None:
            chat.engine = BatchEngine(chat)
            _engines.append(chat.engine)
        return chat.engine
