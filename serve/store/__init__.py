"""The database of what people and programs asked the models, what they answered, and what people thought
of the answers: stored chat completions, feedback on them, and compare-mode preferences.

    store = Store("sqlite:///jobs/assistant.db")          # or postgresql+psycopg://user:pw@host/db
    who = Caller("ann")                                   # serve.access.caller / request_caller says who
    done = store.add_completion(who, model="base", messages=seen, reply={"role": "assistant", "content": text},
                                source="app", adapter_version=chat.folder.version if chat.folder else None)
    store.add_feedback(who, done.id, rating="bad", correction="a better reply")
    store.list_feedback(Caller("admin", admin=True), status="new", corrected=True)

Every method takes the Caller it acts for: a caller sees and changes only its own records, an admin every
caller's (an id that is unknown or not the caller's gives None / False, never an error). The methods:

    completions   add_completion, get, list_completions (model, metadata, source, order, after, limit -> Page),
                  messages (after, limit, order -> Page of OpenAI store messages), update_metadata, delete
    feedback      add_feedback (one per person and completion: a second call changes the first),
                  get_feedback, list_feedback (rating, corrected, model, adapter_version, since, until, user,
                  status, order, after, limit; each Feedback carries its Completion), edit_feedback,
                  set_feedback_status ("new", "approved", "rejected"), delete_feedback, feedback_counts
    compare mode  add_preference (left, right, better: "left" | "right" | "tie"), get_preference, list_preferences,
                  set_preference_status, delete_preference
    retention     delete_older_than(days), delete_user(owner), count()

Lists page by id: pass a Page's `last_id` as `after`; an `after` that is not in the list raises BadCursor.
Bad values (metadata over OpenAI's limits, an unknown rating or status) raise ValueError naming them.
The schema is Alembic's (serve/store/alembic); `Store(url)` upgrades it to head when it opens, and
raises StoreError (naming the URL without its password, and the fix) when it cannot.
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
