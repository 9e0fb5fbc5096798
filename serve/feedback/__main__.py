"""`python -m serve.feedback`: stored feedback from the command line.

    python -m serve.feedback export --kind sft --status approved --output feedback.jsonl [--no-redact]
    python -m serve.feedback export --kind preference --status all --output preferences.jsonl
    python -m serve.feedback prune --retain-days 90

Both read the app's database (--database-url, else $ASSISTANT_DATABASE_URL, else <jobs-dir>/assistant.db) as
its owner: every user's records (export --user NAME: one user's). Exit 0 when done, 1 when nothing could be
done (the message says why and the fix), 2 for a bad command line.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser

from assistant.logs import configure
from assistant.pii import DEFAULT_REGION
from serve.access import Caller
from serve.config import ServerConfig
from serve.feedback.export import NothingToExport, export
from serve.feedback.retention import check_days
from serve.store import Store, StoreError

logger = logging.getLogger(__name__)

PROG = "python -m serve.feedback"
OWNER = Caller("cli", admin=True)  # the command line reads the database directly: it sees every record
DATABASE_HELP = ("Database of stored completions and feedback, as the app's --database-url (sqlite:///PATH or "
                 "postgresql+psycopg://USER@HOST/DATABASE, the password in $PGPASSWORD or ~/.pgpass). Unset: "
                 "$ASSISTANT_DATABASE_URL if set, else sqlite:///<jobs-dir>/assistant.db.")
JOBS_HELP = "The app's --jobs-dir: where the default database is."


@dataclass
class ExportConfig:
    """Options of `python -m serve.feedback export`."""

    output: str | None = field(default=None, metadata={"help": "JSONL file to write (replaced whole). Required."})
    kind: Literal["sft", "preference"] = field(
        default="sft",
        metadata={"help": "sft: OpenAI chat rows {\"messages\": [...]} of corrections (the corrected reply) and liked "
                          "replies, for train.sft; preference: OpenAI preference rows {\"input\", "
                          "\"preferred_output\", \"non_preferred_output\"} of corrections and compare-mode choices."},
    )
    status: Literal["approved", "all"] = field(
        default="approved",
        metadata={"help": "approved: only records an admin approved in the Data tab; all: every record not rejected."},
    )
    redact: bool = field(
        default=True,
        metadata={"help": "Replace e-mail addresses, phone, card and IBAN numbers and IP addresses with placeholders "
                          "([EMAIL_1]...); --no-redact keeps them (names are never detected)."},
    )
    phone_region: str = field(
        default=DEFAULT_REGION,
        metadata={"help": "Country (ISO 3166 code) whose phone numbers may be written without a country code."},
    )
    user: str | None = field(default=None, metadata={"help": "Only this user's records (unset: everyone's)."})
    database_url: str | None = field(default=None, metadata={"help": DATABASE_HELP})
    jobs_dir: str = field(default="jobs", metadata={"help": JOBS_HELP})


@dataclass
class PruneConfig:
    """Options of `python -m serve.feedback prune`."""

    retain_days: float | None = field(
        default=None,
        metadata={"help": "Delete completions (with their feedback and preferences) created more than this many "
                          "days ago. Required; above 0."},
    )
    database_url: str | None = field(default=None, metadata={"help": DATABASE_HELP})
    jobs_dir: str = field(default="jobs", metadata={"help": JOBS_HELP})


ACTIONS = {"export": ExportConfig, "prune": PruneConfig}
USAGE = (f"usage: {PROG} export --output FILE [--kind sft|preference] [--status approved|all] [--no-redact]\n"
         f"       {PROG} prune --retain-days N\n"
         f"({PROG} ACTION --help: the options of each)")


def parse(argv: list[str]) -> ExportConfig | PruneConfig:
    """The action's config from `argv` (its first word the action); exits 2 with the usage on a bad line."""
    if not argv or argv[0] not in ACTIONS:
        if argv and argv[0] in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        print(f"{USAGE}\nerror: give an action: export or prune", file=sys.stderr)
        sys.exit(2)
    action, rest = argv[0], argv[1:]
    parser = HfArgumentParser(ACTIONS[action], prog=f"{PROG} {action}", allow_abbrev=False,
                              description=(ACTIONS[action].__doc__ or "").strip())
    config, unknown = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    if action == "export" and not config.output:
        parser.error("--output FILE is required: where to write the rows")
    if action == "prune" and config.retain_days is None:
        parser.error("--retain-days N is required: records older than N days are deleted")
    return config


def open_store(config: ExportConfig | PruneConfig) -> Store:
    """The database the app of `config`'s --database-url / --jobs-dir uses."""
    return Store(ServerConfig(database_url=config.database_url, jobs_dir=config.jobs_dir).database())


def main(argv: list[str] | None = None) -> int:
    """Run one action; returns the exit status."""
    configure(logging.WARNING)
    config = parse(sys.argv[1:] if argv is None else list(argv))
    try:
        if isinstance(config, PruneConfig):
            days = check_days(config.retain_days)
            store = open_store(config)
            try:
                deleted = store.delete_older_than(days)
            finally:
                store.close()
            print(f"deleted records older than {days:g} days from {store.label}: {deleted['completions']} "
                  f"completions, {deleted['feedback']} feedback, {deleted['preferences']} preferences")
            return 0
        store = open_store(config)
        try:
            done = export(store, OWNER, config.kind, config.output, status=config.status, redact=config.redact,
                          region=config.phone_region, user=config.user)
        finally:
            store.close()
        print(done.summary())
        return 0
    except (StoreError, NothingToExport, ValueError, OSError) as error:  # RegionError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
