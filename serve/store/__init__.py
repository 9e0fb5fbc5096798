"""The database of what people and programs asked the models, what they answered, and what people thought
of the answers: stored chat completions, feedback on them, and compare-mode preferences.

    store = Store("sqlite:///jobs/assistant.db")          # or postgresql+psycopg://user:pw@host/db
    who = Caller("ann")                                   # serve.access.caller / request_caller says who
    done = store.add_completion(who, model="base", messages=seen, reply={"role": "assistant", "content": text},
                                source="app", adapter_version=chat.folder.version if chat.folder else None)
    store.add_feedback(who, done.id, rating="bad", correction="a better reply")
    store.list_feedback(Caller("admin", admin=True), status="new", corrected=True)

Every method takes the Caller it acts for: a caller sees and changes only its own records, an admin every
caller's. The schema is Alembic's (serve/store/alembic); `Store(url)` upgrades it to head when it opens.
"""

from serve.store.records import (
    MAX_METADATA_KEY,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE,
    BadCursor,
    Completion,
    Feedback,
    Page,
    Preference,
    StoreError,
    check_metadata,
    metadata_problem,
)
from serve.store.store import UNSET, Store, default_url, new_id
from serve.store.tables import RATINGS, SIDES, SOURCES, STATUSES

__all__ = [
    "MAX_METADATA_KEY", "MAX_METADATA_KEYS", "MAX_METADATA_VALUE", "RATINGS", "SIDES", "SOURCES", "STATUSES",
    "UNSET", "BadCursor", "Completion", "Feedback", "Page", "Preference", "Store", "StoreError", "check_metadata",
    "default_url", "metadata_problem", "new_id",
]
