"""`python -m serve.store`: the store's schema from the command line.

    python -m serve.store upgrade --database-url URL   # bring a database to head (the app does it at start)
    python -m serve.store current --database-url URL   # its revision, and head's
    python -m serve.store revision -m "what changed"   # a new migration from serve/store/tables.py's changes
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from alembic import command

from serve.store.records import StoreError
from serve.store.store import Store, default_url

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Run one schema command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m serve.store", description="The store's schema (Alembic).")
    parser.add_argument("action", choices=("upgrade", "current", "revision"))
    parser.add_argument("--database-url", default=default_url("jobs"),
                        help="The database (default: the app's, sqlite:///jobs/assistant.db).")
    parser.add_argument("-m", "--message", help="revision: what the new migration changes.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.action == "revision":
            if not args.message:
                parser.error("revision needs -m 'what changed'")
            with tempfile.TemporaryDirectory() as scratch:  # compare the tables with a database at head
                store = Store(default_url(Path(scratch)))
                config = store.alembic_config()
                with store.engine.begin() as conn:
                    config.attributes["connection"] = conn
                    script = command.revision(config, message=args.message, autogenerate=True)
                store.close()
            print(f"wrote {script.path}: read it (SQLite's view of the change), then "  # type: ignore[union-attr]
                  "`.venv/bin/python -m ruff check --fix` it")
            return 0
        store = Store(args.database_url, migrate=args.action == "upgrade")
        print(f"{store.label}: revision {store.revision() or '(empty)'}; head {store.head()}")
        store.close()
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
