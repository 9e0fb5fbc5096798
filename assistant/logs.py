"""Logging set-up for the entry points (library modules only call logging.getLogger(__name__))."""

import logging

# Libraries that log at import or per call in ways a user cannot act on.
_QUIET = {"bitsandbytes": logging.ERROR, "absl": logging.WARNING, "httpx": logging.WARNING}


def configure(level: int = logging.INFO) -> None:
    """One format for every entry point, with known-noisy loggers turned down."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name, quiet in _QUIET.items():
        logging.getLogger(name).setLevel(quiet)
