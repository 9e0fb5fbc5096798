"""Streaming generation: the growing reply, a real Stop, and history trimmed to the context window."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from assistant.adapters import messages_for
from assistant.batching import END, Request, engine_for, stop_ids
from assistant.chat_format import encode_prompt, system_prefix_length
from assistant.loading import MAIN, ChatModel

logger = logging.getLogger(__name__)

UPDATE_INTERVAL_S = 0.1  # the growing reply is yielded at most 10 times a second
POLL_S = 1.0  # how often a waiting reply checks that the engine thread is still alive
STALL_S = 600.0  # no token for this long: the reply fails instead of waiting forever


@dataclass
class GenerationParams:
    """Sampling settings; temperature 0 means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None
    min_new_tokens: int = 0  # no end of turn before this many tokens (benchmarks time exact lengths)

    @classmethod
    def resolve(cls, defaults: dict | None = None, **given) -> GenerationParams:
        """What the caller gave (None: unset), else the model's generation_config.json fields `defaults`
        (an adapter's, else its base's; vLLM's convention), else the app's defaults above."""
        values = asdict(cls())
        defaults = defaults or {}
        for name in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"):
            if defaults.get(name) is not None:
                values[name] = type(values[name])(defaults[name])
        if defaults.get("do_sample") is False:  # Hugging Face's greedy switch
            values["temperature"] = 0.0
        unknown = set(given) - set(values)
        if unknown:
            raise TypeError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in given.items() if v is not None})
        return cls(**values)

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one batched generate call.

        Lengths (max and min new tokens) are per row; the seed is not (it seeds the batch's sampler).
        """
        return (self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.seed)

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `model.generate`."""
        kwargs: dict = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs  # min_new_tokens is applied per row by the batch engine


def fit_history(tokenizer, messages: list[dict[str, str]], budget: int) -> tuple[list[int], int]:
    """Prompt ids within `budget` tokens, dropping the oldest exchanges (never the system prompt)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    dropped = 0
    while True:
        ids = encode_prompt(tokenizer, system + turns)
        if len(ids) <= budget or len(turns) <= 1:
            break
        # Drop whole exchanges so the conversation still starts with a user message.
        cut = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), len(turns) - 1)
        turns, dropped = turns[cut:], dropped + cut
    if len(ids) > budget:
        raise ValueError(
            f"the message is too long: {len(ids)} tokens, the model takes {budget} before its reply; shorten it"
        )
    return ids, dropped


def stream_reply(
    chat: ChatModel,
    messages: list[dict[str, str]],
    params: GenerationParams | None = None,
    *,
    cancel: threading.Event | None = None,
    use_adapter: bool = True,
    on_trim: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """Yield the growing reply text; setting `cancel` (or closing the generator) stops within a token."""
    params = params or GenerationParams.resolve(chat.generation_defaults)
    cancel = cancel or threading.Event()
    messages = messages_for(messages, chat.trained_prompt)  # the one prompt rule
    ids, dropped = fit_history(chat.tokenizer, messages, chat.context_window - params.max_new_tokens)
    if dropped:
        logger.info("history trimmed: %d oldest messages left out to fit the context window", dropped)
        if on_trim:
            on_trim(dropped)
    prefix = system_prefix_length(chat.tokenizer, messages, ids)  # the system prompt dropped history keeps
    tokens: list[int] = []
    shown, shown_at = "", 0.0
    try:
        for token in reply_tokens(chat, ids, params, cancel=cancel, use_adapter=use_adapter, prefix=prefix):
            tokens.append(token)
            # Each update costs the server (UI diff, HTTP chunk) CPU that decoding needs: at most one
            # per UPDATE_INTERVAL_S; tokens arriving faster are shown together.
            if time.monotonic() - shown_at >= UPDATE_INTERVAL_S and (text := _visible(chat, tokens, shown)):
                shown, shown_at = text, time.monotonic()
                yield shown
        if text := _visible(chat, tokens, shown):
            yield text
    finally:
        # Reached on normal end, on Stop and when the consumer goes away (generator closed).
        cancel.set()


def reply_tokens(
    chat: ChatModel,
    ids: list[int],
    params: GenerationParams,
    *,
    cancel: threading.Event | None = None,
    use_adapter: bool = True,
    prefix: int = 0,
) -> Iterator[int]:
    """Token ids of the reply to prompt `ids` from the batch engine, without the end-of-turn token; the first
    `prefix` ids are a system prompt's (chat_format.system_prefix_length): their keys/values are computed once."""
    cancel = cancel or threading.Event()
    engine = engine_for(chat.host)
    request = engine.submit(
        Request(ids, params, cancel, adapter=chat.adapter_name if use_adapter else None,
                group=chat.group if use_adapter else MAIN, stop_ids=stop_ids(chat.model, chat.tokenizer),
                prefix=prefix)
    )
    try:
        while (token := _next_token(engine, request)) is not END:
            if isinstance(token, BaseException):
                raise RuntimeError(f"generation failed: {token}") from token
            yield token
    finally:
        cancel.set()


def _next_token(engine, request: Request):
    """The request's next token, END or an exception; never waits on an engine that is gone or stalled."""
    waited = 0.0
    while True:
        try:
            return request.tokens.get(timeout=POLL_S)
        except queue.Empty:
            waited += POLL_S
            if not engine.thread.is_alive():
                return request.tokens.get_nowait() if not request.tokens.empty() else RuntimeError(
                    f"the generation engine stopped ({engine.failure or 'closed'})"
                )
            if waited >= STALL_S:
                return TimeoutError(f"no token for {STALL_S:.0f} s; the request was cancelled")


def _visible(chat: ChatModel, tokens: list[int], shown: str) -> str | None:
    """The decoded reply when it shows something new and whole (None otherwise)."""
    text = chat.tokenizer.decode(tokens, skip_special_tokens=True)
    # A multi-byte character split across tokens decodes to U+FFFD until its last piece arrives.
    return text if text != shown and not text.endswith("\ufffd") else None


def complete_reply(
    chat: ChatModel, messages: list[dict[str, str]], params: GenerationParams, **kwargs
) -> str:
    """The whole reply, through the same streaming path the app uses."""
    text = ""
    for text in stream_reply(chat, messages, params, **kwargs):  # noqa: B007 - keep the last, longest text
        pass
    return text
