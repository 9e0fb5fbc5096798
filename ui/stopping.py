"""Stop buttons that really stop: per-browser-session cancel events handed to stream_reply."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Stopper:
    """One request's stop flag; hands out a fresh cancel event for each reply it streams."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self._events: list[threading.Event] = []  # every reply's (compare mode streams two at once)
        self._lock = threading.Lock()

    def next_event(self) -> threading.Event:
        """Cancel event for the next reply (stream_reply sets it when done, so it cannot be reused)."""
        event = threading.Event()
        with self._lock:
            self._events.append(event)
            if self.stopped.is_set():
                event.set()
        return event

    def stop(self) -> None:
        """Stop the reply being generated and any later one of this request."""
        with self._lock:
            self.stopped.set()
            for event in self._events:
                event.set()


class StopSignals:
    """Running requests by browser session, so Stop ends that browser's generation and no other."""

    def __init__(self) -> None:
        self._running: dict[str, set[Stopper]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def request(self, session: str | None) -> Iterator[Stopper]:
        """Register a request of `session` for as long as it streams."""
        stopper, key = Stopper(), session or ""
        with self._lock:
            self._running.setdefault(key, set()).add(stopper)
        try:
            yield stopper
        finally:
            with self._lock:
                self._running.get(key, set()).discard(stopper)
                if not self._running.get(key):
                    self._running.pop(key, None)

    def stop(self, session: str | None) -> int:
        """Stop every running request of `session`; returns how many there were."""
        with self._lock:
            stoppers = list(self._running.get(session or "", ()))
        for stopper in stoppers:
            stopper.stop()
        return len(stoppers)
