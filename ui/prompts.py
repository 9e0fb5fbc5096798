"""System prompts: one plain-text file per prompt in prompts/, named by its file stem."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
DEFAULT_PROMPT = "general"
AS_TRAINED = "as trained"  # menu entry: the system prompt the chosen adapter was trained with
CUSTOM_PROMPT = "custom"  # menu entry: the text in the box as the user wrote it


def list_prompts(folder: str | Path = PROMPTS_DIR) -> dict[str, str]:
    """Prompt name (file stem) -> prompt text, sorted by name; empty files are skipped."""
    prompts = {}
    for path in sorted(Path(folder).glob("*.txt")):
        text = path.read_text(encoding="utf-8").strip()
        if text:
            prompts[path.stem] = text
        else:
            logger.warning("%s: empty system prompt file, skipped", path)
    return prompts
