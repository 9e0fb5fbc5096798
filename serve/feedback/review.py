"""Reviewing stored feedback: find it, read it, approve, reject, edit the correction, delete; and who may.

Everyone sees and deletes only their own records (serve.store scopes every call by the Caller); an admin
(a user in --admins, the API key's holder) sees everyone's, and only an admin approves, rejects or edits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

from serve.access import Caller
from serve.feedback.capture import RecordGone
from serve.store import STATUSES, UNSET, Feedback, Page, Preference, Store

logger = logging.getLogger(__name__)

ADMIN_ONLY = ("Only an admin approves, rejects or edits records: a user named in the server's --admins "
              "(or the API key's holder). You can read and delete your own.")
ANY = "any"
RATING_FILTERS = (ANY, "good", "bad", "none")  # "none": unrated (a correction or a comment only)
CORRECTED_FILTERS = (ANY, "yes", "no")
STATUS_FILTERS = (ANY, *STATUSES)
DAY_S = 86400
LIST_LIMIT = 200  # records one listing shows, newest first


class NotAllowed(PermissionError):
    """An action the caller may not take; the message says who may."""


@dataclass(frozen=True)
class Filters:
    """What a listing keeps: each "any" / None keeps everything."""

    rating: str = ANY  # good, bad, none (unrated)
    corrected: str = ANY  # yes, no
    adapter: str | None = None  # the model as stored: an adapter's name, or "base"
    status: str = ANY  # new, approved, rejected
    since: str | None = None  # YYYY-MM-DD, from that day on (this server's time zone)
    until: str | None = None  # YYYY-MM-DD, up to and including that day
    user: str | None = None  # whose records (an admin's filter; others see their own anyway)

    def check(self) -> Filters:
        """Self, or ValueError naming the filter at fault and its values."""
        for name, value, allowed in (("rating", self.rating, RATING_FILTERS),
                                     ("corrected", self.corrected, CORRECTED_FILTERS),
                                     ("status", self.status, STATUS_FILTERS)):
            if value not in allowed:
                raise ValueError(f"{name} filter {value!r}: choose one of {', '.join(allowed)}")
        self.window()
        return self

    def window(self) -> tuple[int | None, int | None]:
        """(since, until) as Unix seconds: the start of `since`'s day, the end of `until`'s."""
        since = day_start(self.since, "from") if self.since else None
        until = day_start(self.until, "to") + DAY_S if self.until else None
        return since, until


def day_start(text: str, name: str = "date") -> int:
    """Unix seconds of the start of the day `text` (YYYY-MM-DD) in this server's time zone."""
    try:
        day = datetime.strptime(text.strip()[:10], "%Y-%m-%d")
    except ValueError:
        raise ValueError(f"{name} date {text!r}: write it as YYYY-MM-DD, e.g. 2025-01-31") from None
    return int(time.mktime(day.timetuple()))


def find_feedback(store: Store, who: Caller, filters: Filters, limit: int = LIST_LIMIT) -> Page[Feedback]:
    """The feedback `who` may see that `filters` keep, newest first."""
    filters.check()
    since, until = filters.window()
    return store.list_feedback(
        who, rating={ANY: UNSET, "none": None}.get(filters.rating, filters.rating),
        corrected={ANY: None, "yes": True, "no": False}[filters.corrected], model=filters.adapter or None,
        since=since, until=until, user=filters.user or None, status=None if filters.status == ANY else filters.status,
        limit=limit,
    )


def find_preferences(store: Store, who: Caller, filters: Filters, limit: int = LIST_LIMIT) -> list[Preference]:
    """The compare-mode preferences `who` may see that `filters` keep (rating and correction do not apply)."""
    filters.check()
    since, until = filters.window()
    page = store.list_preferences(who, status=None if filters.status == ANY else filters.status, since=since,
                                  until=until, user=filters.user or None, limit=limit)
    adapter = filters.adapter or None
    return [p for p in page.items if adapter is None or adapter in (p.left.model, p.right.model)]


def counts(store: Store, who: Caller) -> dict[str, dict[str, int]]:
    """Feedback by status, rating and corrected, preferences by status: what `who` may see."""
    return store.feedback_counts(who)


def counts_text(found: dict[str, dict[str, int]]) -> str:
    """The counts as one line of plain text."""
    status = " · ".join(f"{name} {n}" for name, n in found["status"].items())
    rating = " · ".join(f"{'unrated' if name == 'none' else name} {n}" for name, n in found["rating"].items())
    preferences = " · ".join(f"{name} {n}" for name, n in found["preferences"].items())
    return (f"Feedback: {sum(found['status'].values())} ({status}) | ratings: {rating} | corrected "
            f"{found['corrected']['yes']} | compare-mode preferences: {sum(found['preferences'].values())} "
            f"({preferences})")


def record_kind(record_id: str) -> str:
    """"preference" for a compare-mode preference's id ("pref-..."), else "feedback"."""
    return "preference" if record_id.startswith("pref-") else "feedback"


def get_record(store: Store, who: Caller, record_id: str) -> Feedback | Preference:
    """The feedback or preference `record_id`; RecordGone when it is unknown or not `who`'s."""
    found = (store.get_preference(who, record_id) if record_kind(record_id) == "preference"
             else store.get_feedback(who, record_id))
    if found is None:
        raise RecordGone(f"No record {record_id}: it was deleted, or it is not yours. Refresh the list.")
    return found


def set_status(store: Store, who: Caller, record_id: str, status: str) -> Feedback | Preference:
    """Approve, reject (or put back to new) a record: admins only."""
    if not who.admin:
        raise NotAllowed(ADMIN_ONLY)
    done = (store.set_preference_status(who, record_id, status) if record_kind(record_id) == "preference"
            else store.set_feedback_status(who, record_id, status))
    if done is None:
        raise RecordGone(f"No record {record_id}: it was deleted meanwhile. Refresh the list.")
    logger.info("%s set %s to %s", who.name, record_id, status)
    return done


def edit_correction(store: Store, who: Caller, feedback_id: str, text: str | None) -> Feedback:
    """A reviewer's edit of the correction (admins only); blank, or the correction as given, drops the edit."""
    if not who.admin:
        raise NotAllowed(ADMIN_ONLY)
    if record_kind(feedback_id) == "preference":
        raise ValueError("A compare-mode preference has no correction to edit; choose a feedback record.")
    found = get_record(store, who, feedback_id)
    edit = text if text and text.strip() and text.strip() != (found.correction or "").strip() else None
    if edit is not None and edit.strip() == found.completion.reply.get("content", "").strip():
        raise ValueError("The edit is the model's own reply: reject the record instead, or write a better reply.")
    done = store.edit_feedback(who, feedback_id, edited_correction=edit)
    if done is None:
        raise RecordGone(f"No record {feedback_id}: it was deleted meanwhile. Refresh the list.")
    return done


def delete(store: Store, who: Caller, record_id: str) -> None:
    """Delete a record `who` may see (its own; an admin's: anyone's). A conversation the chat app stored for
    the record goes with it (the app keeps a reply only because someone rated it), and with the
    conversation everything about it; a completion stored through the API (`store: true`) stays: the
    API deletes it."""
    found = get_record(store, who, record_id)
    completions = [found.left, found.right] if isinstance(found, Preference) else [found.completion]
    if isinstance(found, Preference):
        store.delete_preference(who, record_id)
    else:
        store.delete_feedback(who, record_id)
    for completion in completions:
        if completion.source == "app":
            store.delete(who, completion.id)
    logger.info("%s deleted %s", who.name, record_id)


def correction_of(feedback: Feedback) -> str | None:
    """The correction a reviewer's edit leaves (the edit wins over the correction as given)."""
    return feedback.edited_correction or feedback.correction


def conversation_text(record: Feedback | Preference) -> str:
    """A record as plain text: who, when, which model, the messages as the model saw them, its reply, and the
    feedback (rating, correction, reviewer's edit, comment) or the preference."""
    if isinstance(record, Preference):
        head = (f"{record.id} · {record.owner} · {_when(record.created)} · {record.status} · better: "
                f"{record.better}")
        sides = [f"--- left: {record.left.model} ---\n{record.left.reply.get('content', '')}",
                 f"--- right: {record.right.model} ---\n{record.right.reply.get('content', '')}"]
        tail = [f"comment: {record.comment}"] if record.comment else []
        return "\n\n".join([head, _messages(record.left.messages), *sides, *tail])
    done = record.completion
    version = f" ({done.adapter_version})" if done.adapter_version else ""
    head = (f"{record.id} · {record.owner} · {_when(record.created)} · {record.status} · {done.model}{version} · "
            f"{done.source} · rating: {record.rating or 'none'}")
    parts = [head, _messages(done.messages), f"--- assistant ({done.model}) ---\n{done.reply.get('content', '')}"]
    if record.correction:
        parts.append(f"--- correction ---\n{record.correction}")
    if record.edited_correction:
        parts.append(f"--- reviewer's edit of the correction ---\n{record.edited_correction}")
    if record.comment:
        parts.append(f"--- comment ---\n{record.comment}")
    return "\n\n".join(parts)


def _messages(messages: list[dict]) -> str:
    return "\n\n".join(f"--- {m.get('role', '?')} ---\n{m.get('content', '')}" for m in messages)


def _when(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))

