"""Keep stored completions, feedback and preferences only so long: `--retain-days N` deletes what is older
when the server starts and then once a day (`python -m serve.feedback prune --retain-days N` does it once)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from serve.store import Store, StoreError

logger = logging.getLogger(__name__)

DAY_S = 86400.0


def check_days(days: float, option: str = "--retain-days") -> float:
    """`days` when it keeps something, else ValueError naming the option and the fix."""
    if not days > 0:  # also NaN
        raise ValueError(f"{option} {days}: give a number of days above 0 (0 would delete every record)")
    return float(days)


class Retention:
    """Deletes records older than `days` at once and then every `every_s` seconds, in a daemon thread."""

    def __init__(self, store: Callable[[], Store], days: float, every_s: float = DAY_S):
        self.store, self.days, self.every_s = store, check_days(days), every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)

    def start(self) -> Retention:
        """Start the thread (its first pass runs now); returns self."""
        self._thread.start()
        return self

    def run_once(self) -> dict[str, int] | None:
        """One pass: what was deleted, or None when the store cannot be opened (logged; the next pass retries)."""
        try:
            return self.store().delete_older_than(self.days)
        except StoreError as error:
            logger.warning("could not delete records older than %g days: %s", self.days, error)
        except Exception:  # a database error: the thread lives on, the next pass retries
            logger.exception("could not delete records older than %g days", self.days)
        return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.every_s)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
