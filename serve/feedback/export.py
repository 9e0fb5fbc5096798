"""Stored feedback as training files: SFT rows and preference rows, JSONL, personal data redacted.

    SFT (OpenAI's chat format, what train.sft and the dataset doctor read), one row per
      correction:   {"messages": [...the conversation as the model saw it, {"role": "assistant", "content": CORRECTION}]}
      liked reply:  {"messages": [...the conversation, {"role": "assistant", "content": THE MODEL'S REPLY}]}
    preference (OpenAI's preference fine-tuning format), one row per
      correction:   {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": CORRECTION}],
                     "non_preferred_output": [{"role": "assistant", "content": THE MODEL'S REPLY}]}
      compare-mode choice ("left" or "right"; a tie says nothing): the better side's reply preferred, the other's
                     not, the input being the conversation as the left (adapter) side saw it

A reviewer's edit of a correction wins over the correction as given. `status` "approved" exports approved
records only; "all" every record not rejected. Redaction (assistant.pii) replaces e-mail addresses, phone,
card and IBAN numbers and IP addresses with placeholders, one per value within a row.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from assistant.pii import DEFAULT_REGION, Placeholders, check_region, describe, redact_conversation
from serve.access import Caller
from serve.feedback.review import correction_of
from serve.store import Feedback, Preference, Store

logger = logging.getLogger(__name__)

KINDS = ("sft", "preference")
EXPORT_STATUSES = ("approved", "all")  # all: every record not rejected
PAGE = 500


class NothingToExport(ValueError):
    """No record makes a row of the asked kind and status; the message says what would."""


@dataclass(frozen=True)
class Exported:
    """What an export wrote: the file, its rows, and the personal data replaced per kind."""

    path: Path
    rows: int
    kind: str
    redacted: dict[str, int] | None = field(default=None)  # None: not redacted

    def privacy(self) -> str:
        """What redaction replaced: "redacted: 2 e-mail addresses", or "not redacted"."""
        if self.redacted is None:
            return "not redacted"
        return f"redacted: {describe(self.redacted) or 'no personal data found'}"

    def summary(self) -> str:
        """One line: what was written where, and what redaction replaced."""
        what = "SFT rows" if self.kind == "sft" else "preference rows"
        return f"wrote {self.rows} {what} to {self.path} ({self.privacy()})"


def _check(kind: str, status: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: choose sft or preference")
    if status not in EXPORT_STATUSES:
        raise ValueError(f"status {status!r}: choose approved (reviewed records only) or all (every record not rejected)")


def _feedback(store: Store, who: Caller, status: str, user: str | None) -> Iterator[Feedback]:
    after = None
    while True:
        page = store.list_feedback(who, status="approved" if status == "approved" else None, user=user,
                                   order="asc", after=after, limit=PAGE)
        yield from (fb for fb in page.items if fb.status != "rejected")
        if not page.has_more:
            return
        after = page.last_id


def _preferences(store: Store, who: Caller, status: str, user: str | None) -> Iterator[Preference]:
    after = None
    while True:
        page = store.list_preferences(who, status="approved" if status == "approved" else None, user=user,
                                      order="asc", after=after, limit=PAGE)
        yield from (p for p in page.items if p.status != "rejected")
        if not page.has_more:
            return
        after = page.last_id


def _chat(messages: list[dict]) -> list[dict]:
    """Messages as training rows hold them: role and text only."""
    return [{"role": str(m.get("role")), "content": str(m.get("content") or "")} for m in messages]


def _reply(message: dict) -> str:
    return str(message.get("content") or "")


def sft_rows(store: Store, who: Caller, status: str = "approved", user: str | None = None) -> list[dict]:
    """SFT rows from the feedback `who` may see: each correction (the conversation, then the corrected reply)
    and each liked reply without one (the conversation, then the reply), oldest first."""
    _check("sft", status)
    rows = []
    for fb in _feedback(store, who, status, user):
        fix = correction_of(fb)
        reply = fix if fix else (_reply(fb.completion.reply) if fb.rating == "good" else None)
        if reply and reply.strip():
            rows.append({"messages": [*_chat(fb.completion.messages), {"role": "assistant", "content": reply}]})
    return rows


def preference_rows(store: Store, who: Caller, status: str = "approved", user: str | None = None) -> list[dict]:
    """Preference rows from what `who` may see: each correction against the model's reply, then each
    compare-mode choice of a better side, oldest first."""
    _check("preference", status)
    rows = []
    for fb in _feedback(store, who, status, user):
        fix, reply = correction_of(fb), _reply(fb.completion.reply)
        if fix and fix.strip() and fix.strip() != reply.strip():
            rows.append(_preference_row(fb.completion.messages, fix, reply))
    for pref in _preferences(store, who, status, user):
        if pref.better == "tie":
            continue
        better, worse = (pref.left, pref.right) if pref.better == "left" else (pref.right, pref.left)
        if _reply(better.reply).strip() != _reply(worse.reply).strip():
            rows.append(_preference_row(pref.left.messages, _reply(better.reply), _reply(worse.reply)))
    return rows


def _preference_row(messages: list[dict], preferred: str, non_preferred: str) -> dict:
    return {"input": {"messages": _chat(messages)},
            "preferred_output": [{"role": "assistant", "content": preferred}],
            "non_preferred_output": [{"role": "assistant", "content": non_preferred}]}


def redact_row(row: dict, counts: collections.Counter, region: str = DEFAULT_REGION) -> dict:
    """`row` (SFT or preference) with personal data replaced, one placeholder per value across the row."""
    mapping = Placeholders()
    if "messages" in row:
        done = {"messages": redact_conversation(row["messages"], mapping, region)}
    else:
        done = {"input": {**row["input"], "messages": redact_conversation(row["input"]["messages"], mapping, region)},
                "preferred_output": redact_conversation(row["preferred_output"], mapping, region),
                "non_preferred_output": redact_conversation(row["non_preferred_output"], mapping, region)}
    counts.update(mapping.counts)
    return done


def export(store: Store, who: Caller, kind: str, output: str | Path, *, status: str = "approved",
           redact: bool = True, region: str = DEFAULT_REGION, user: str | None = None) -> Exported:
    """Write the `kind` rows ("sft" or "preference") of what `who` may see to `output` as JSONL (replacing it
    whole, never half-written); NothingToExport when no record makes a row."""
    _check(kind, status)
    if redact:
        check_region(region)  # RegionError (a ValueError) names the fix
    rows = (sft_rows if kind == "sft" else preference_rows)(store, who, status, user)
    if not rows:
        made_of = ("corrections or liked replies" if kind == "sft" else
                   "corrections or compare-mode choices of a better side")
        fix = "approve some in the Data tab, or export --status all" if status == "approved" else "rate some replies"
        raise NothingToExport(f"nothing to export: no {'approved ' if status == 'approved' else ''}{made_of}"
                              f"{' of ' + user if user else ''}; {fix}")
    counts: collections.Counter = collections.Counter()
    if redact:
        rows = [redact_row(row, counts, region) for row in rows]
    write_jsonl(rows, Path(output))
    done = Exported(Path(output), len(rows), kind, dict(counts) if redact else None)
    logger.info("%s", done.summary())
    return done


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Write one JSON object a line, through a temporary file beside `path` (a reader never sees half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
