"""The store's tables (SQLAlchemy ORM); Alembic's migrations (serve/store/alembic/versions) create them.

A change here needs a migration: `python -m serve.store revision -m "what changed"` writes one from the
difference between these tables and a database at head (tests/test_store.py checks that none is missing).
"""

from __future__ import annotations

import logging

from sqlalchemy import (
    JSON,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

logger = logging.getLogger(__name__)

# Constraint names Alembic can find again (SQLite's batch migrations need them).
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

RATINGS = ("good", "bad")
STATUSES = ("new", "approved", "rejected")
SOURCES = ("api", "app")
SIDES = ("left", "right", "tie")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    """The store's tables."""

    metadata = MetaData(naming_convention=NAMING)


class CompletionRow(Base):
    """One stored chat completion: what the model saw, what it answered, with which settings, for whom."""

    __tablename__ = "completions"
    __table_args__ = (
        CheckConstraint(_one_of("source", SOURCES), name="source"),
        Index("ix_completions_owner_seq", "owner", "seq"),
        {"sqlite_autoincrement": True},  # a deleted last row's number is never reused: pages stay in order
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # the list order
    id: Mapped[str] = mapped_column(String(64), unique=True)  # "chatcmpl-..."
    created: Mapped[int] = mapped_column(Integer, index=True)  # Unix seconds
    model: Mapped[str] = mapped_column(String(255), index=True)
    messages: Mapped[list] = mapped_column(JSON)  # as the model saw them: the system prompt used included
    reply: Mapped[dict] = mapped_column(JSON)  # {"role": "assistant", "content": ...}
    finish_reason: Mapped[str] = mapped_column(String(32))
    settings: Mapped[dict] = mapped_column(JSON)  # the generation settings used (sampling, stop, seed)
    usage: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    owner: Mapped[str] = mapped_column(String(255))
    adapter_version: Mapped[str | None] = mapped_column(String(32), nullable=True)  # AdapterFolder.version
    source: Mapped[str] = mapped_column(String(8))  # "api" or "app"

    tags: Mapped[list[MetadataRow]] = relationship(
        back_populates="completion", cascade="all, delete-orphan", passive_deletes=True, lazy="selectin",
        order_by="MetadataRow.key",
    )


class MetadataRow(Base):
    """One key of a completion's metadata (a row each, so lists filter on them with an index)."""

    __tablename__ = "completion_metadata"
    __table_args__ = (Index("ix_completion_metadata_key_value", "key", "value"),)

    completion_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("completions.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(512))

    completion: Mapped[CompletionRow] = relationship(back_populates="tags")


class FeedbackRow(Base):
    """One person's feedback on one completion: a rating, a better reply, a comment, and its review."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("completion_id", "owner", name="uq_feedback_completion_id_owner"),
        CheckConstraint(f"rating IS NULL OR {_one_of('rating', RATINGS)}", name="rating"),
        CheckConstraint(_one_of("status", STATUSES), name="status"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)  # "fb-..."
    completion_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("completions.id", ondelete="CASCADE"), index=True
    )
    owner: Mapped[str] = mapped_column(String(255), index=True)
    rating: Mapped[str | None] = mapped_column(String(8), nullable=True)  # "good", "bad" or none
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)  # the reply it should have given
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # "new", "approved", "rejected"
    edited_correction: Mapped[str | None] = mapped_column(Text, nullable=True)  # a reviewer's edit
    created: Mapped[int] = mapped_column(Integer, index=True)
    updated: Mapped[int] = mapped_column(Integer)

    completion: Mapped[CompletionRow] = relationship(lazy="joined", innerjoin=True)


class PreferenceRow(Base):
    """Compare mode: two completions of one prompt side by side, and which side was better."""

    __tablename__ = "preferences"
    __table_args__ = (
        CheckConstraint(_one_of("better", SIDES), name="better"),
        CheckConstraint(_one_of("status", STATUSES), name="status"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)  # "pref-..."
    left_id: Mapped[str] = mapped_column(String(64), ForeignKey("completions.id", ondelete="CASCADE"), index=True)
    right_id: Mapped[str] = mapped_column(String(64), ForeignKey("completions.id", ondelete="CASCADE"), index=True)
    better: Mapped[str] = mapped_column(String(8))  # "left", "right" or "tie"
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    owner: Mapped[str] = mapped_column(String(255), index=True)
    status: Mapped[str] = mapped_column(String(16))
    created: Mapped[int] = mapped_column(Integer, index=True)
    updated: Mapped[int] = mapped_column(Integer)

    left: Mapped[CompletionRow] = relationship(foreign_keys=[left_id], lazy="joined", innerjoin=True)
    right: Mapped[CompletionRow] = relationship(foreign_keys=[right_id], lazy="joined", innerjoin=True)
