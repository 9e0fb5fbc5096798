"""Stored completions, their metadata, feedback on them and compare-mode preferences.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUS = "status IN ('new', 'approved', 'rejected')"


def _completion_fk(column: str, table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], ["completions.id"], name=op.f(f"fk_{table}_{column}_completions"),
                                   ondelete="CASCADE")


def upgrade() -> None:
    """Upgrade the schema."""
    op.create_table(
        "completions",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("created", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("reply", sa.JSON(), nullable=False),
        sa.Column("finish_reason", sa.String(length=32), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("usage", sa.JSON(), nullable=True),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("adapter_version", sa.String(length=32), nullable=True),
        sa.Column("source", sa.String(length=8), nullable=False),
        sa.CheckConstraint("source IN ('api', 'app')", name=op.f("ck_completions_source")),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_completions")),
        sa.UniqueConstraint("id", name=op.f("uq_completions_id")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_completions_created"), "completions", ["created"])
    op.create_index(op.f("ix_completions_model"), "completions", ["model"])
    op.create_index("ix_completions_owner_seq", "completions", ["owner", "seq"])

    op.create_table(
        "completion_metadata",
        sa.Column("completion_id", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=512), nullable=False),
        _completion_fk("completion_id", "completion_metadata"),
        sa.PrimaryKeyConstraint("completion_id", "key", name=op.f("pk_completion_metadata")),
    )
    op.create_index("ix_completion_metadata_key_value", "completion_metadata", ["key", "value"])

    op.create_table(
        "feedback",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("completion_id", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("rating", sa.String(length=8), nullable=True),
        sa.Column("correction", sa.Text(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("edited_correction", sa.Text(), nullable=True),
        sa.Column("created", sa.Integer(), nullable=False),
        sa.Column("updated", sa.Integer(), nullable=False),
        sa.CheckConstraint("rating IS NULL OR rating IN ('good', 'bad')", name=op.f("ck_feedback_rating")),
        sa.CheckConstraint(STATUS, name=op.f("ck_feedback_status")),
        _completion_fk("completion_id", "feedback"),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_feedback")),
        sa.UniqueConstraint("completion_id", "owner", name="uq_feedback_completion_id_owner"),
        sa.UniqueConstraint("id", name=op.f("uq_feedback_id")),
        sqlite_autoincrement=True,
    )
    for column in ("completion_id", "created", "owner", "status"):
        op.create_index(op.f(f"ix_feedback_{column}"), "feedback", [column])

    op.create_table(
        "preferences",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("left_id", sa.String(length=64), nullable=False),
        sa.Column("right_id", sa.String(length=64), nullable=False),
        sa.Column("better", sa.String(length=8), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created", sa.Integer(), nullable=False),
        sa.Column("updated", sa.Integer(), nullable=False),
        sa.CheckConstraint("better IN ('left', 'right', 'tie')", name=op.f("ck_preferences_better")),
        sa.CheckConstraint(STATUS, name=op.f("ck_preferences_status")),
        _completion_fk("left_id", "preferences"),
        _completion_fk("right_id", "preferences"),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_preferences")),
        sa.UniqueConstraint("id", name=op.f("uq_preferences_id")),
        sqlite_autoincrement=True,
    )
    for column in ("created", "left_id", "owner", "right_id"):
        op.create_index(op.f(f"ix_preferences_{column}"), "preferences", [column])


def downgrade() -> None:
    """Downgrade the schema."""
    for table in ("preferences", "feedback", "completion_metadata", "completions"):
        op.drop_table(table)
