"""Learning from every conversation: turn chats into stored records, review them, export training files.

    capture    Turn (what produced a reply), turn_of, rate (thumb up/down), correct (the reply it should have
               given, and a comment), prefer (compare mode: which side was better), keep
    review     Filters, find_feedback, find_preferences, counts, set_status / edit_correction (admins only),
               delete, conversation_text
    export     sft_rows, preference_rows, export (JSONL, personal data redacted by default)
    retention  Retention: --retain-days, at start and daily

The chat app (ui/) and the API share these; `python -m serve.feedback export|prune` runs them from the
command line (see its --help).
"""

from serve.feedback.capture import (
    NOTHING_TO_SAVE,
    RecordGone,
    Turn,
    correct,
    digest,
    keep,
    prefer,
    rate,
    turn_of,
    version_of,
)
from serve.feedback.export import (
    EXPORT_STATUSES,
    KINDS,
    Exported,
    NothingToExport,
    export,
    preference_rows,
    sft_rows,
)
from serve.feedback.retention import Retention, check_days
from serve.feedback.review import (
    ADMIN_ONLY,
    ANY,
    CORRECTED_FILTERS,
    RATING_FILTERS,
    STATUS_FILTERS,
    Filters,
    NotAllowed,
    conversation_text,
    correction_of,
    counts,
    counts_text,
    delete,
    edit_correction,
    find_feedback,
    find_preferences,
    get_record,
    record_kind,
    set_status,
)

__all__ = [
    "ADMIN_ONLY", "ANY", "CORRECTED_FILTERS", "EXPORT_STATUSES", "KINDS", "NOTHING_TO_SAVE", "RATING_FILTERS",
    "STATUS_FILTERS", "Exported", "Filters", "NotAllowed", "NothingToExport", "RecordGone", "Retention", "Turn",
    "check_days", "conversation_text", "correct", "digest", "correction_of", "counts", "counts_text", "delete",
    "edit_correction", "export", "find_feedback", "find_preferences", "get_record", "keep", "prefer",
    "preference_rows", "rate", "record_kind", "set_status", "sft_rows", "turn_of", "version_of",
]
