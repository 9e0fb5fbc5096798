"""What the store hands out: plain frozen records (never live database rows), pages of them, and the
rules for metadata (OpenAI's limits)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

# OpenAI's limits on `metadata`.
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512

T = TypeVar("T")


class StoreError(Exception):
    """The database cannot be opened, migrated or written; the message names it and the fix."""


class BadCursor(ValueError):
    """An `after` id that is not in the list it pages (unknown, deleted, or someone else's)."""


def metadata_problem(metadata: object) -> str | None:
    """Why `metadata` breaks OpenAI's rules (a dict of at most 16 str keys of <= 64 characters and str values
    of <= 512), else None."""
    if not isinstance(metadata, Mapping):
        return "metadata must be an object of string keys and string values"
    if len(metadata) > MAX_METADATA_KEYS:
        return f"metadata has {len(metadata)} keys; at most {MAX_METADATA_KEYS} are allowed"
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            return f"metadata[{key!r}]: keys and values must be strings"
        if not key or len(key) > MAX_METADATA_KEY:
            return f"metadata key {key[:20]!r}... is {len(key)} characters; keys have 1 to {MAX_METADATA_KEY}"
        if len(value) > MAX_METADATA_VALUE:
            return f"metadata[{key!r}] is {len(value)} characters; values have at most {MAX_METADATA_VALUE}"
    return None


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """`metadata` as a plain dict ({} for None), or ValueError saying which rule it breaks."""
    if metadata is None:
        return {}
    problem = metadata_problem(metadata)
    if problem:
        raise ValueError(problem)
    return dict(metadata)


@dataclass(frozen=True)
class Completion:
    """A stored chat completion."""

    id: str  # "chatcmpl-..."
    created: int  # Unix seconds
    model: str  # the model id as the caller named it ("base", an adapter's name)
    messages: list[dict]  # the request's messages as the model saw them (the system prompt used included)
    reply: dict  # {"role": "assistant", "content": ...}
    finish_reason: str
    settings: dict  # generation settings used: temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, stop
    usage: dict | None  # {"prompt_tokens", "completion_tokens", "total_tokens"}
    metadata: dict[str, str]
    owner: str  # serve.access.Caller.name of who asked
    adapter_version: str | None  # assistant.adapters.AdapterFolder.version of the adapter (None: the base model)
    source: str  # "api" (/v1/chat/completions) or "app" (the chat screen)


@dataclass(frozen=True)
class Feedback:
    """One owner's feedback on one completion (`completion` is that completion, as stored)."""

    id: str  # "fb-..."
    completion_id: str
    owner: str
    rating: str | None  # "good", "bad" or None
    correction: str | None  # the reply it should have given
    comment: str | None
    status: str  # "new", "approved", "rejected"
    edited_correction: str | None  # a reviewer's edit of the correction
    created: int
    updated: int
    completion: Completion = field(repr=False)


@dataclass(frozen=True)
class Preference:
    """Compare mode: two completions of one prompt, and which side was better ("left", "right", "tie")."""

    id: str  # "pref-..."
    left: Completion = field(repr=False)
    right: Completion = field(repr=False)
    better: str
    comment: str | None
    owner: str
    status: str
    created: int
    updated: int


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list, in the list's order; pass `last_id` as `after` for the next one."""

    items: list[T]
    has_more: bool

    @property
    def first_id(self) -> str | None:
        """The id of the page's first item (None: empty)."""
        return _id(self.items[0]) if self.items else None

    @property
    def last_id(self) -> str | None:
        """The id of the page's last item (None: empty)."""
        return _id(self.items[-1]) if self.items else None


def _id(item: object) -> str:
    return item["id"] if isinstance(item, dict) else item.id  # type: ignore[attr-defined]
