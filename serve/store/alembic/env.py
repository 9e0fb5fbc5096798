"""Alembic's environment for the store: the tables of serve.store.tables, on the connection Store.upgrade
holds (under its migration lock), or on the URL `python -m serve.store` gives."""

from __future__ import annotations

import logging

from alembic import context
from sqlalchemy import create_engine

from serve.store.tables import Base

logger = logging.getLogger(__name__)


def run() -> None:
    """Run the migrations online: on the store's connection, else on a new one to the configured URL."""
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    engine = create_engine(config.attributes["url"])
    try:
        with engine.begin() as conn:
            _migrate(conn)
    finally:
        engine.dispose()


def _migrate(connection) -> None:
    # render_as_batch: SQLite alters a table by copying it; Alembic's batch mode does that for us.
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("the store's migrations run online only: python -m serve.store upgrade --database-url URL")
run()
