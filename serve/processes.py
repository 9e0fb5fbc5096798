"""How serve runs train's commands (serve never imports train): from the repository, unbuffered, paths absolute.

The server may run from any folder (`cd /tmp/x && PYTHONPATH=<checkout> python -m ui`); train's commands run
from the repository (so `-m train.*` imports), so every path handed to them is made absolute first.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from assistant.embedded import EMBEDDED

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent  # the repository: train's commands run from here


def env() -> dict[str, str]:
    """The environment of a train process: the server's, its output unbuffered (read as it comes)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def model_arg(base: str) -> str:
    """A --base-model value for a process run from ROOT: a local folder as an absolute path, a name unchanged."""
    return str(Path(base).absolute()) if base != EMBEDDED and Path(base).exists() else base
