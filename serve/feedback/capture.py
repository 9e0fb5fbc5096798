"""From a chat to stored records: what produced a reply (a Turn), then the rating, correction, comment or
compare-mode preference someone gives it, kept in serve.store for the caller who gave it.

A Turn is taken when a reply starts, from what the screen sends the model: the messages after the one
prompt rule (assistant.adapters.messages_for, so the system prompt actually used), the adapter's name and
folder version, the generation settings and the time. The reply itself is stored only once someone rates
or corrects it: a Turn nobody rates costs no database write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from assistant.adapters import messages_for, read_folder
from assistant.generation import GenerationParams
from serve.access import Caller
from serve.openai_api import BASE_ID
from serve.registry import BASE_CHOICE, ModelRegistry
from serve.remote import RemoteRegistry
from serve.store import Feedback, Preference, Store

logger = logging.getLogger(__name__)

RATING_OF = {True: "good", False: "bad"}  # Gradio's LikeData.liked: True (thumb up), False (down), "" (undone)
NOTHING_TO_SAVE = "Write the reply it should have given, or a comment, first."


class RecordGone(LookupError):
    """A record that is unknown or not the caller's (deleted meanwhile, e.g. from the Data tab)."""


@dataclass
class Turn:
    """What produced one reply: the model, the messages as it saw them, its settings; then what was stored."""

    model: str  # as /v1 names it: the adapter's name, or "base"
    messages: list[dict]  # as the model saw them: the system prompt used included
    settings: dict  # the generation settings (GenerationParams' fields, and "stop")
    adapter_version: str | None  # AdapterFolder.version (None: the base model, or a remote server's)
    context: str  # digest of the conversation before the reply as the screen holds it (matches a rating to it)
    created: int = field(default_factory=lambda: int(time.time()))
    completion_id: str | None = None  # once stored
    feedback_id: str | None = None  # the caller's feedback on it, once given
    preference_id: str | None = None  # compare mode: the preference this turn (the left side) is in


def turn_of(registry: ModelRegistry | RemoteRegistry, choice: str, sent: list[dict], params: GenerationParams, *,
            use_adapter: bool = True, context: list[dict] | None = None) -> Turn:
    """The Turn of a reply to `sent` (the messages the screen sends: its system prompt, if any, then the chat)
    from the menu's `choice`; `use_adapter` False: compare mode's base side."""
    adapter_on = use_adapter and choice != BASE_CHOICE
    # In-process, compare mode's base side is the adapter's model with the adapter switched off, so the
    # adapter's trained prompt applies to both sides; a remote server's base model is a model of its own.
    prompt_of = choice if adapter_on or isinstance(registry, ModelRegistry) else BASE_CHOICE
    return Turn(
        model=choice if adapter_on else BASE_ID,
        messages=[dict(m) for m in messages_for(sent, registry.trained_prompt(prompt_of))],
        settings={**asdict(params), "stop": []},
        adapter_version=version_of(registry, choice if adapter_on else BASE_CHOICE),
        context=digest(context if context is not None else [m for m in sent if m["role"] != "system"]),
    )


def digest(conversation: list[dict]) -> str:
    """A short fingerprint of a conversation's roles and texts (a Turn keeps it, not a second copy)."""
    plain = [[str(m.get("role")), str(m.get("content") or "")] for m in conversation]
    return hashlib.sha256(json.dumps(plain, ensure_ascii=False).encode()).hexdigest()[:32]


def version_of(registry: ModelRegistry | RemoteRegistry, choice: str) -> str | None:
    """The folder version (AdapterFolder.version) of what serves `choice`: its adapter, a merged base model's
    own folder, else None (the embedded or a Hub base model; a remote server's models)."""
    if not isinstance(registry, ModelRegistry):
        return None
    folder = registry.adapters.get(choice) if choice != BASE_CHOICE else None
    if folder is None and registry.base_model and Path(registry.base_model).is_dir():
        merged = read_folder(registry.base_model)
        return merged.version if merged.kind == "merged" else None
    return read_folder(folder).version if folder is not None else None


def keep(store: Store, who: Caller, turn: Turn, reply: str) -> str:
    """The stored completion of `turn` with `reply` (stored now unless it already is); returns its id."""
    if turn.completion_id:
        stored = store.get(who, turn.completion_id)
        if stored is not None and stored.reply.get("content") == reply:
            return stored.id
        if stored is not None:  # rated while it was still streaming: the whole reply replaces the partial one
            store.delete(who, stored.id)
        turn.completion_id = turn.feedback_id = turn.preference_id = None
    done = store.add_completion(
        who, model=turn.model, messages=turn.messages, reply={"role": "assistant", "content": reply},
        settings=turn.settings, adapter_version=turn.adapter_version, source="app", created=turn.created,
    )
    turn.completion_id = done.id
    return done.id


def rate(store: Store, who: Caller, turn: Turn, reply: str, liked: bool | str | None) -> Feedback | None:
    """A thumb up (`liked` True) or down (False) on the reply, or taken back ("" / None: the record goes
    unless it holds a correction or a comment); returns the feedback now stored (None: none)."""
    rating = RATING_OF.get(liked) if isinstance(liked, bool) else None
    if rating is None and liked not in ("", None):
        raise ValueError(f"a rating is a thumb up or down, not {liked!r}")
    if rating is None:
        return _clear(store, who, turn, rating=None)
    return _remember(turn, store.add_feedback(who, keep(store, who, turn, reply), rating=rating))


def correct(store: Store, who: Caller, turn: Turn, reply: str, correction: str | None,
            comment: str | None) -> Feedback | None:
    """The reply it should have given (kept as the preferred reply; the model's stays the non-preferred one)
    and a comment; a correction that is blank or the reply unchanged counts as none. Both empty clear what
    was given before (ValueError when there was nothing)."""
    fix = correction if correction and correction.strip() and correction.strip() != reply.strip() else None
    note = comment.strip() if comment and comment.strip() else None
    if fix is None and note is None:
        if not _own(store, who, turn):
            raise ValueError(NOTHING_TO_SAVE)
        return _clear(store, who, turn, correction=None, comment=None)
    completion_id = keep(store, who, turn, reply)
    done = _remember(turn, store.add_feedback(who, completion_id, correction=fix, comment=note))
    cleared = {name: None for name, value in (("correction", fix), ("comment", note))
               if value is None and getattr(done, name) is not None}
    return store.edit_feedback(who, done.id, **cleared) if cleared else done


def prefer(store: Store, who: Caller, left: tuple[Turn, str], right: tuple[Turn, str], better: str,
           comment: str | None = None) -> Preference:
    """Compare mode: which side's reply was better ("left", "right" or "tie"); a second choice on the same
    pair replaces the first."""
    (left_turn, left_reply), (right_turn, right_reply) = left, right
    left_id, right_id = keep(store, who, left_turn, left_reply), keep(store, who, right_turn, right_reply)
    if left_turn.preference_id:
        store.delete_preference(who, left_turn.preference_id)
    done = store.add_preference(who, left_id, right_id, better, comment=(comment or "").strip() or None)
    if done is None:  # both were stored for `who` a moment ago: only a concurrent delete gets here
        raise RecordGone("the replies were deleted meanwhile; send the message again")
    left_turn.preference_id = done.id
    return done


def _own(store: Store, who: Caller, turn: Turn) -> Feedback | None:
    found = store.get_feedback(who, turn.feedback_id) if turn.feedback_id else None
    if found is None or found.completion_id != turn.completion_id:
        turn.feedback_id = None
        return None
    return found


def _remember(turn: Turn, feedback: Feedback | None) -> Feedback:
    if feedback is None:  # keep() stored the completion for this caller a moment ago
        raise RecordGone("the reply was deleted meanwhile; send the message again")
    turn.feedback_id = feedback.id
    return feedback


def _clear(store: Store, who: Caller, turn: Turn, **fields) -> Feedback | None:
    """Clear `fields` of the caller's feedback on `turn`; a record left with nothing in it is deleted."""
    own = _own(store, who, turn)
    if own is None:
        return None
    left = {name: getattr(own, name) for name in ("rating", "correction", "comment") if name not in fields}
    if not any(value is not None for value in left.values()):
        store.delete_feedback(who, own.id)
        turn.feedback_id = None
        return None
    return store.edit_feedback(who, own.id, **fields, status="new")
