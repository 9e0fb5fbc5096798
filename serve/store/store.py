"""`Store`: stored chat completions, feedback on them and compare-mode preferences, in SQLite or PostgreSQL.

Every read and change is scoped by a `serve.access.Caller`: a caller sees and changes only its own records,
an admin everyone's; an id another caller owns reads as unknown (None / False), never as "forbidden".
Records come back as frozen dataclasses (serve.store.records), never as live database rows.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, delete, event, exists, func, or_, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from serve.access import Caller
from serve.store.records import (
    BadCursor,
    Completion,
    Feedback,
    Page,
    Preference,
    StoreError,
    check_metadata,
)
from serve.store.tables import (
    RATINGS,
    SIDES,
    SOURCES,
    STATUSES,
    CompletionRow,
    FeedbackRow,
    MetadataRow,
    PreferenceRow,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATIONS = Path(__file__).parent / "alembic"
DATABASE_FILE = "assistant.db"  # the default database's name in the app's data folder
BUSY_TIMEOUT_MS = 30_000  # SQLite: how long a writer waits for another's lock before "database is locked"
RETRIES = 8  # a write that still finds the database locked (or a PostgreSQL serialization failure) is retried
MIGRATION_LOCK = 0x61737374  # PostgreSQL advisory lock held while one process upgrades the schema
MAX_LIMIT = 1000
# Alembic's `context` and `op` are module-level proxies: one migration at a time in this process (the
# database's own lock, in upgrade(), keeps other processes out).
_migrating = threading.Lock()


class _Unset:
    """A keyword that was not given (None is a value: "clear it")."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def default_url(data_dir: str | Path) -> str:
    """The default database: a SQLite file in the app's data folder."""
    return f"sqlite:///{Path(data_dir).resolve() / DATABASE_FILE}"


def new_id(prefix: str) -> str:
    """A fresh id: "chatcmpl-<24 hex>", "fb-...", "pref-..."."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Store:
    """The database of stored completions, feedback and preferences; one per process (it holds a pool).

    `url`: `sqlite:///PATH` (a file: WAL, a busy timeout and retries let several threads and processes
    write at once) or `postgresql+psycopg://user:password@host/db` for a team server. The schema is
    upgraded to Alembic's head when the store opens, under a lock, so processes that start together do
    not race.
    """

    def __init__(self, url: str, *, migrate: bool = True, pool_size: int = 8):
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise StoreError(f"--database-url {url!r} is not a database URL; use sqlite:///PATH or "
                             "postgresql+psycopg://USER:PASSWORD@HOST/DATABASE") from None
        self.url: URL = _with_driver(parsed)
        self.label = self.url.render_as_string(hide_password=True)  # for messages and logs: never the password
        self.engine = self._create_engine(pool_size)
        # Writes on SQLite take the write lock when they begin (BEGIN IMMEDIATE), so two writers queue on
        # the busy timeout instead of failing when a read turns into a write.
        self._writer = self.engine.execution_options(store_write=True)
        if migrate:
            try:
                self.upgrade()
            except StoreError:
                self.engine.dispose()
                raise

    # -- opening ---------------------------------------------------------------------------------------
    @property
    def sqlite(self) -> bool:
        """True for a SQLite file."""
        return self.url.get_backend_name() == "sqlite"

    def _create_engine(self, pool_size: int) -> Engine:
        backend = self.url.get_backend_name()
        if backend == "sqlite":
            path = self.url.database
            if not path or path == ":memory:" or path.startswith("file:"):
                raise StoreError(f"--database-url {self.label}: the store needs a SQLite file "
                                 "(sqlite:///PATH); an in-memory database would be empty in each connection")
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StoreError(f"--database-url {self.label}: cannot create its folder ({error.strerror or error})"
                                 "; choose a writable path") from None
            engine = create_engine(self.url, pool_size=pool_size, max_overflow=pool_size,
                                   connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})
            event.listen(engine, "connect", _sqlite_connect)
            event.listen(engine, "begin", _sqlite_begin)
            return engine
        if backend == "postgresql":
            return create_engine(self.url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
        raise StoreError(f"--database-url {self.label}: {backend} is not supported; use sqlite:///PATH or "
                         "postgresql+psycopg://USER:PASSWORD@HOST/DATABASE")

    def alembic_config(self) -> Config:
        """Alembic's configuration for this database (its scripts are serve/store/alembic)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["url"] = self.url
        return config

    def head(self) -> str:
        """The newest migration's revision."""
        return ScriptDirectory.from_config(self.alembic_config()).get_current_head()

    def revision(self) -> str | None:
        """The database's current revision (None: no schema yet)."""
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def upgrade(self) -> None:
        """Bring the schema to head (Alembic), holding a lock so one process migrates at a time."""
        config = self.alembic_config()
        try:
            with _migrating, self._writer.begin() as conn:  # SQLite: BEGIN IMMEDIATE is the lock
                if not self.sqlite:
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
        except CommandError as error:  # e.g. a revision this code does not have: a newer app migrated it
            raise StoreError(f"--database-url {self.label}: cannot upgrade its schema ({error}); a newer version "
                             "of the app may have migrated it: run that version, or use another database") from None
        except DBAPIError as error:
            fix = ("check that its folder is writable and no other program holds it locked" if self.sqlite else
                   "check that the server runs and the URL, user and password are right")
            raise StoreError(f"--database-url {self.label}: cannot open or upgrade the database "
                             f"({_reason(error)}); {fix}") from None
        logger.info("store %s at revision %s", self.label, self.head())

    def close(self) -> None:
        """Close the pool's connections."""
        self.engine.dispose()

    # -- transactions ----------------------------------------------------------------------------------
    def _read(self, work: Callable[[Session], T]) -> T:
        with Session(self.engine) as session, session.begin():
            return work(session)

    def _write(self, work: Callable[[Session], T], *, retry_conflict: bool = False) -> T:
        """`work` in one write transaction, retried while the database is busy (and, with retry_conflict,
        when a concurrent insert broke a unique constraint)."""
        for attempt in range(RETRIES):
            try:
                with Session(self._writer) as session, session.begin():
                    return work(session)
            except DBAPIError as error:
                if attempt == RETRIES - 1 or not (_busy(error) or (retry_conflict and isinstance(error, IntegrityError))):
                    raise
                logger.info("store busy (%s); retrying", _reason(error))
                time.sleep(min(2.0, 0.02 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    # -- completions ---------------------------------------------------------------------------------
    def add_completion(
        self,
        who: Caller,
        *,
        model: str,
        messages: list[dict],
        reply: dict,
        finish_reason: str = "stop",
        settings: Mapping[str, Any] | None = None,
        usage: Mapping[str, int] | None = None,
        metadata: Mapping[str, str] | None = None,
        adapter_version: str | None = None,
        source: str = "api",
        id: str | None = None,
        created: int | None = None,
    ) -> Completion:
        """Store a completion owned by `who`: `messages` as the model saw them (the system prompt used
        included, see assistant.adapters.messages_for), `reply` the assistant message."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, not {source!r}")
        tags = check_metadata(metadata)
        row = CompletionRow(
            id=id or new_id("chatcmpl"), created=int(time.time() if created is None else created), model=model,
            messages=[dict(m) for m in messages], reply=dict(reply), finish_reason=finish_reason,
            settings=dict(settings or {}), usage=dict(usage) if usage is not None else None, owner=who.name,
            adapter_version=adapter_version, source=source,
            tags=[MetadataRow(key=k, value=v) for k, v in tags.items()],
        )

        def add(session: Session) -> Completion:
            session.add(row)
            session.flush()
            return _completion(row)

        return self._write(add)

    def get(self, who: Caller, completion_id: str) -> Completion | None:
        """The completion, or None when it is unknown or not `who`'s."""
        return self._read(lambda s: _maybe(_completion, _visible(s, who, completion_id)))

    def list_completions(
        self,
        who: Caller,
        *,
        model: str | None = None,
        metadata: Mapping[str, str] | None = None,
        source: str | None = None,
        order: str = "asc",
        after: str | None = None,
        limit: int = 20,
    ) -> Page[Completion]:
        """`who`'s completions (an admin's: everyone's) oldest first (order "desc": newest first), those of
        `model` / `source` / with every key=value of `metadata` only; `after`: the last id of the page before."""
        _check_page(order, limit)

        def page(session: Session) -> Page[Completion]:
            query = select(CompletionRow)
            if who.scope is not None:
                query = query.where(CompletionRow.owner == who.scope)
            if model is not None:
                query = query.where(CompletionRow.model == model)
            if source is not None:
                query = query.where(CompletionRow.source == source)
            for key, value in (metadata or {}).items():
                query = query.where(exists().where(MetadataRow.completion_id == CompletionRow.id,
                                                   MetadataRow.key == key, MetadataRow.value == value))
            if after:
                row = _visible(session, who, after)
                if row is None:
                    raise BadCursor(f"no stored completion with id {after!r} to list after; pass the last id "
                                    "of the previous page")
                query = query.where(CompletionRow.seq > row.seq if order == "asc" else CompletionRow.seq < row.seq)
            by = CompletionRow.seq.asc() if order == "asc" else CompletionRow.seq.desc()
            rows = session.scalars(query.order_by(by).limit(limit + 1)).all()
            return Page([_completion(r) for r in rows[:limit]], has_more=len(rows) > limit)

        return self._read(page)

    def messages(
        self, who: Caller, completion_id: str, *, after: str | None = None, limit: int = 20, order: str = "asc"
    ) -> Page[dict] | None:
        """The request messages of a completion as the model saw them, each with an id "<completion>-<n>"
        (OpenAI's GET /chat/completions/{id}/messages); None when the completion is unknown or not `who`'s."""
        _check_page(order, limit)
        completion = self.get(who, completion_id)
        if completion is None:
            return None
        items = [{"id": f"{completion.id}-{n}", "role": m.get("role"), "content": m.get("content"),
                  "name": m.get("name"), "content_parts": None} for n, m in enumerate(completion.messages)]
        if order == "desc":
            items.reverse()
        if after:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise BadCursor(f"no message with id {after!r} in {completion_id}; pass the last id of the "
                                "previous page")
            items = items[ids.index(after) + 1:]
        return Page(items[:limit], has_more=len(items) > limit)

    def update_metadata(self, who: Caller, completion_id: str, metadata: Mapping[str, str] | None) -> Completion | None:
        """Replace a completion's metadata (None: clear it); None when it is unknown or not `who`'s."""
        tags = check_metadata(metadata)

        def update(session: Session) -> Completion | None:
            row = _visible(session, who, completion_id)
            if row is None:
                return None
            row.tags = []
            session.flush()  # the old keys go before the new ones come (same primary keys)
            row.tags = [MetadataRow(key=k, value=v) for k, v in tags.items()]
            session.flush()
            return _completion(row)

        return self._write(update)

    def delete(self, who: Caller, completion_id: str) -> bool:
        """Delete a completion with its feedback and preferences; False when it is unknown or not `who`'s."""

        def remove(session: Session) -> bool:
            row = _visible(session, who, completion_id)
            if row is None:
                return False
            _delete_completions(session, [row.id])
            return True

        return self._write(remove)

    # -- feedback ------------------------------------------------------------------------------------
    def add_feedback(
        self,
        who: Caller,
        completion_id: str,
        *,
        rating: str | None = None,
        correction: str | None = None,
        comment: str | None = None,
    ) -> Feedback | None:
        """`who`'s feedback on a completion it may see: one record per completion and person, so a second
        call changes the first (the fields it gives; its review starts again as "new"). None when the
        completion is unknown or not `who`'s. ValueError when nothing is given or the rating is not
        "good" or "bad"."""
        _check_rating(rating)
        if rating is None and correction is None and comment is None:
            raise ValueError("give at least one of rating, correction or comment")

        def add(session: Session) -> Feedback | None:
            if _visible(session, who, completion_id) is None:
                return None
            now = int(time.time())
            row = session.scalars(select(FeedbackRow).where(FeedbackRow.completion_id == completion_id,
                                                            FeedbackRow.owner == who.name)).first()
            if row is None:
                row = FeedbackRow(id=new_id("fb"), completion_id=completion_id, owner=who.name, created=now)
                session.add(row)
            for name, value in (("rating", rating), ("correction", correction), ("comment", comment)):
                if value is not None:
                    setattr(row, name, value)
            row.status, row.updated = "new", now
            session.flush()
            return _feedback(row)

        return self._write(add, retry_conflict=True)  # two first ratings at once: the second updates the first

    def get_feedback(self, who: Caller, feedback_id: str) -> Feedback | None:
        """One feedback record, or None when it is unknown or not `who`'s."""
        return self._read(lambda s: _maybe(_feedback, _feedback_row(s, who, feedback_id)))

    def list_feedback(
        self,
        who: Caller,
        *,
        rating: str | None = UNSET,
        corrected: bool | None = None,
        model: str | None = None,
        adapter_version: str | None = None,
        since: int | None = None,
        until: int | None = None,
        user: str | None = None,
        status: str | None = None,
        order: str = "desc",
        after: str | None = None,
        limit: int = 50,
    ) -> Page[Feedback]:
        """Feedback `who` may see, newest first: `rating` "good", "bad" or None (unrated); `corrected` with
        (True) or without (False) a correction; of completions of `model` / `adapter_version`; created
        from `since` to before `until` (Unix seconds); by `user`; in review `status`."""
        _check_page(order, limit)
        if rating is not UNSET:
            _check_rating(rating)
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")

        def page(session: Session) -> Page[Feedback]:
            query = select(FeedbackRow).join(FeedbackRow.completion)
            if who.scope is not None:
                query = query.where(FeedbackRow.owner == who.scope)
            if rating is not UNSET:
                query = query.where(FeedbackRow.rating.is_(None) if rating is None else FeedbackRow.rating == rating)
            if corrected is not None:
                has = or_(FeedbackRow.correction.is_not(None), FeedbackRow.edited_correction.is_not(None))
                query = query.where(has if corrected else ~has)
            if model is not None:
                query = query.where(CompletionRow.model == model)
            if adapter_version is not None:
                query = query.where(CompletionRow.adapter_version == adapter_version)
            if since is not None:
                query = query.where(FeedbackRow.created >= since)
            if until is not None:
                query = query.where(FeedbackRow.created < until)
            if user is not None:
                query = query.where(FeedbackRow.owner == user)
            if status is not None:
                query = query.where(FeedbackRow.status == status)
            if after:
                row = _feedback_row(session, who, after)
                if row is None:
                    raise BadCursor(f"no feedback with id {after!r} to list after; pass the last id of the "
                                    "previous page")
                query = query.where(FeedbackRow.seq > row.seq if order == "asc" else FeedbackRow.seq < row.seq)
            by = FeedbackRow.seq.asc() if order == "asc" else FeedbackRow.seq.desc()
            rows = session.scalars(query.order_by(by).limit(limit + 1)).unique().all()
            return Page([_feedback(r) for r in rows[:limit]], has_more=len(rows) > limit)

        return self._read(page)

    def feedback_counts(self, who: Caller) -> dict[str, dict[str, int]]:
        """What `who` may see at a glance: feedback by review status, by rating ("none": unrated) and
        corrected or not; compare-mode preferences by status."""

        def counts(session: Session) -> dict[str, dict[str, int]]:
            def grouped(column, table) -> dict:
                query = select(column, func.count()).select_from(table).group_by(column)
                if who.scope is not None:
                    query = query.where(table.owner == who.scope)
                return {key: n for key, n in session.execute(query).all()}

            by_status, by_rating = grouped(FeedbackRow.status, FeedbackRow), grouped(FeedbackRow.rating, FeedbackRow)
            has = or_(FeedbackRow.correction.is_not(None), FeedbackRow.edited_correction.is_not(None))
            query = select(func.count()).select_from(FeedbackRow).where(has)
            if who.scope is not None:
                query = query.where(FeedbackRow.owner == who.scope)
            corrected = session.scalar(query) or 0
            preferences = grouped(PreferenceRow.status, PreferenceRow)
            return {
                "status": {status: by_status.get(status, 0) for status in STATUSES},
                "rating": {**{rating: by_rating.get(rating, 0) for rating in RATINGS}, "none": by_rating.get(None, 0)},
                "corrected": {"yes": corrected, "no": sum(by_status.values()) - corrected},
                "preferences": {status: preferences.get(status, 0) for status in STATUSES},
            }

        return self._read(counts)

    def set_feedback_status(self, who: Caller, feedback_id: str, status: str) -> Feedback | None:
        """Review a feedback record: "new", "approved" or "rejected"; None when unknown or not `who`'s."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
        return self.edit_feedback(who, feedback_id, status=status)

    def edit_feedback(
        self,
        who: Caller,
        feedback_id: str,
        *,
        rating: str | None = UNSET,
        correction: str | None = UNSET,
        comment: str | None = UNSET,
        edited_correction: str | None = UNSET,
        status: str = UNSET,
    ) -> Feedback | None:
        """Change the given fields (None clears one); None when the record is unknown or not `who`'s."""
        if rating is not UNSET:
            _check_rating(rating)
        if status is not UNSET and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
        changes = {name: value for name, value in (("rating", rating), ("correction", correction),
                                                   ("comment", comment), ("edited_correction", edited_correction),
                                                   ("status", status)) if value is not UNSET}

        def edit(session: Session) -> Feedback | None:
            row = _feedback_row(session, who, feedback_id)
            if row is None:
                return None
            for name, value in changes.items():
                setattr(row, name, value)
            row.updated = int(time.time())
            session.flush()
            return _feedback(row)

        return self._write(edit)

    def delete_feedback(self, who: Caller, feedback_id: str) -> bool:
        """Delete a feedback record; False when it is unknown or not `who`'s."""

        def remove(session: Session) -> bool:
            row = _feedback_row(session, who, feedback_id)
            if row is None:
                return False
            session.delete(row)
            return True

        return self._write(remove)

    # -- compare-mode preferences --------------------------------------------------------------------
    def add_preference(
        self, who: Caller, left_id: str, right_id: str, better: str, *, comment: str | None = None
    ) -> Preference | None:
        """Record which of two completions `who` may see was better ("left", "right" or "tie"); None when
        either is unknown or not `who`'s."""
        if better not in SIDES:
            raise ValueError(f"better must be one of {', '.join(SIDES)}, not {better!r}")
        if left_id == right_id:
            raise ValueError("a preference compares two different completions")

        def add(session: Session) -> Preference | None:
            if _visible(session, who, left_id) is None or _visible(session, who, right_id) is None:
                return None
            now = int(time.time())
            row = PreferenceRow(id=new_id("pref"), left_id=left_id, right_id=right_id, better=better,
                                comment=comment, owner=who.name, status="new", created=now, updated=now)
            session.add(row)
            session.flush()
            session.refresh(row)
            return _preference(row)

        return self._write(add)

    def get_preference(self, who: Caller, preference_id: str) -> Preference | None:
        """One preference, or None when it is unknown or not `who`'s."""
        return self._read(lambda s: _maybe(_preference, _preference_row(s, who, preference_id)))

    def list_preferences(
        self,
        who: Caller,
        *,
        status: str | None = None,
        since: int | None = None,
        until: int | None = None,
        user: str | None = None,
        order: str = "desc",
        after: str | None = None,
        limit: int = 50,
    ) -> Page[Preference]:
        """Preferences `who` may see, newest first (filters as in list_feedback)."""
        _check_page(order, limit)

        def page(session: Session) -> Page[Preference]:
            query = select(PreferenceRow)
            if who.scope is not None:
                query = query.where(PreferenceRow.owner == who.scope)
            for column, value in ((PreferenceRow.status, status), (PreferenceRow.owner, user)):
                if value is not None:
                    query = query.where(column == value)
            if since is not None:
                query = query.where(PreferenceRow.created >= since)
            if until is not None:
                query = query.where(PreferenceRow.created < until)
            if after:
                row = _preference_row(session, who, after)
                if row is None:
                    raise BadCursor(f"no preference with id {after!r} to list after; pass the last id of the "
                                    "previous page")
                query = query.where(PreferenceRow.seq > row.seq if order == "asc" else PreferenceRow.seq < row.seq)
            by = PreferenceRow.seq.asc() if order == "asc" else PreferenceRow.seq.desc()
            rows = session.scalars(query.order_by(by).limit(limit + 1)).unique().all()
            return Page([_preference(r) for r in rows[:limit]], has_more=len(rows) > limit)

        return self._read(page)

    def set_preference_status(self, who: Caller, preference_id: str, status: str) -> Preference | None:
        """Review a preference: "new", "approved" or "rejected"; None when unknown or not `who`'s."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")

        def edit(session: Session) -> Preference | None:
            row = _preference_row(session, who, preference_id)
            if row is None:
                return None
            row.status, row.updated = status, int(time.time())
            session.flush()
            return _preference(row)

        return self._write(edit)

    def delete_preference(self, who: Caller, preference_id: str) -> bool:
        """Delete a preference; False when it is unknown or not `who`'s."""

        def remove(session: Session) -> bool:
            row = _preference_row(session, who, preference_id)
            if row is None:
                return False
            session.delete(row)
            return True

        return self._write(remove)

    # -- retention -----------------------------------------------------------------------------------
    def delete_older_than(self, days: float) -> dict[str, int]:
        """Delete completions created more than `days` ago, with their feedback and preferences; returns
        how many of each went."""
        if days < 0:
            raise ValueError(f"days must be 0 or more, not {days}")
        cutoff = int(time.time() - days * 86400)

        def remove(session: Session) -> dict[str, int]:
            ids = list(session.scalars(select(CompletionRow.id).where(CompletionRow.created < cutoff)))
            return _delete_completions(session, ids)

        counts = self._write(remove)
        logger.info("deleted records older than %g days: %s", days, counts)
        return counts

    def delete_user(self, owner: str) -> dict[str, int]:
        """Delete everything of one owner (a Caller's name): its completions (with everyone's feedback and
        preferences on them), and its feedback and preferences on others' completions."""

        def remove(session: Session) -> dict[str, int]:
            ids = list(session.scalars(select(CompletionRow.id).where(CompletionRow.owner == owner)))
            counts = _delete_completions(session, ids)
            counts["feedback"] += session.execute(delete(FeedbackRow).where(FeedbackRow.owner == owner)).rowcount
            counts["preferences"] += session.execute(
                delete(PreferenceRow).where(PreferenceRow.owner == owner)).rowcount
            return counts

        counts = self._write(remove)
        logger.info("deleted the records of %s: %s", owner, counts)
        return counts

    def count(self) -> dict[str, int]:
        """How many completions, feedback records and preferences the store holds (all owners)."""
        def counts(session: Session) -> dict[str, int]:
            return {name: session.scalar(select(func.count()).select_from(table)) or 0
                    for name, table in (("completions", CompletionRow), ("feedback", FeedbackRow),
                                        ("preferences", PreferenceRow))}

        return self._read(counts)


# -- helpers -------------------------------------------------------------------------------------------
def _with_driver(url: URL) -> URL:
    """postgresql:// means psycopg 3 here (the driver this project installs), not SQLAlchemy's psycopg2."""
    if url.drivername in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg")
    return url


def _sqlite_connect(dbapi_connection, record) -> None:
    """Every SQLite connection: wait for locks, write-ahead log, foreign keys on; SQLAlchemy begins."""
    dbapi_connection.isolation_level = None  # the driver emits no BEGIN of its own: _sqlite_begin does
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_begin(conn) -> None:
    """BEGIN IMMEDIATE for a write (it queues for the write lock now), a deferred BEGIN for a read."""
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("store_write") else "BEGIN")


def _busy(error: DBAPIError) -> bool:
    """SQLite's "database is locked"/"busy", or PostgreSQL's serialization failure or deadlock."""
    message = str(error.orig).lower()
    code = getattr(error.orig, "sqlstate", None)
    return "database is locked" in message or "database is busy" in message or code in ("40001", "40P01")


def _reason(error: DBAPIError) -> str:
    return str(error.orig).strip().splitlines()[0] if error.orig else str(error)


def _check_page(order: str, limit: int) -> None:
    if order not in ("asc", "desc"):
        raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
    if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be a whole number from 1 to {MAX_LIMIT}, not {limit!r}")


def _check_rating(rating: str | None) -> None:
    if rating is not None and rating not in RATINGS:
        raise ValueError(f"rating must be 'good' or 'bad', not {rating!r}")


def _visible(session: Session, who: Caller, completion_id: str) -> CompletionRow | None:
    query = select(CompletionRow).where(CompletionRow.id == completion_id)
    if who.scope is not None:
        query = query.where(CompletionRow.owner == who.scope)
    return session.scalars(query).first()


def _feedback_row(session: Session, who: Caller, feedback_id: str) -> FeedbackRow | None:
    query = select(FeedbackRow).where(FeedbackRow.id == feedback_id)
    if who.scope is not None:
        query = query.where(FeedbackRow.owner == who.scope)
    return session.scalars(query).unique().first()


def _preference_row(session: Session, who: Caller, preference_id: str) -> PreferenceRow | None:
    query = select(PreferenceRow).where(PreferenceRow.id == preference_id)
    if who.scope is not None:
        query = query.where(PreferenceRow.owner == who.scope)
    return session.scalars(query).unique().first()


def _delete_completions(session: Session, ids: list[str]) -> dict[str, int]:
    """Delete completions and what points at them (explicitly: counted, and whatever the foreign keys do)."""
    counts = {"completions": 0, "feedback": 0, "preferences": 0}
    for start in range(0, len(ids), 500):  # bounded IN lists
        chunk = ids[start:start + 500]
        counts["feedback"] += session.execute(
            delete(FeedbackRow).where(FeedbackRow.completion_id.in_(chunk))).rowcount
        counts["preferences"] += session.execute(delete(PreferenceRow).where(
            or_(PreferenceRow.left_id.in_(chunk), PreferenceRow.right_id.in_(chunk)))).rowcount
        session.execute(delete(MetadataRow).where(MetadataRow.completion_id.in_(chunk)))
        counts["completions"] += session.execute(delete(CompletionRow).where(CompletionRow.id.in_(chunk))).rowcount
    return counts


def _maybe(convert: Callable[[Any], T], row: Any) -> T | None:
    return None if row is None else convert(row)


def _completion(row: CompletionRow) -> Completion:
    return Completion(
        id=row.id, created=row.created, model=row.model, messages=list(row.messages), reply=dict(row.reply),
        finish_reason=row.finish_reason, settings=dict(row.settings or {}),
        usage=dict(row.usage) if row.usage is not None else None, metadata={t.key: t.value for t in row.tags},
        owner=row.owner, adapter_version=row.adapter_version, source=row.source,
    )


def _feedback(row: FeedbackRow) -> Feedback:
    return Feedback(
        id=row.id, completion_id=row.completion_id, owner=row.owner, rating=row.rating, correction=row.correction,
        comment=row.comment, status=row.status, edited_correction=row.edited_correction, created=row.created,
        updated=row.updated, completion=_completion(row.completion),
    )


def _preference(row: PreferenceRow) -> Preference:
    return Preference(
        id=row.id, left=_completion(row.left), right=_completion(row.right), better=row.better, comment=row.comment,
        owner=row.owner, status=row.status, created=row.created, updated=row.updated,
    )
