"""Adapter folders: which folder is an adapter, of which method, and which system prompt it was trained with.

The one answer for the trainer (what to publish, what it may replace), the app (what to list and
serve) and the exports alike.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
PROMPT_FILE = "system_prompt.json"  # the system prompt the adapter's data was trained under
REPORT_FILE = "training_report.json"  # written by train.sft last, before the folder is published
PARTIAL_MARK = ".partial"  # staging folders of the trainer and of merges carry this in their name


def adapter_info(adapter: str | Path) -> dict:
    """The adapter folder's peft config, with a clear error when the folder is not an adapter."""
    config = Path(adapter) / ADAPTER_CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"{adapter}: not an adapter folder (no {ADAPTER_CONFIG}); train one with train.sft")
    return json.loads(config.read_text())


def adapter_base(folder: str | Path) -> str | None:
    """The base model an adapter folder was trained on ('embedded' for the embedded model).

    adapter_config.json names the embedded model by its Hub twin so that peft, vLLM and the Hub resolve
    it; the adapter was trained on the embedded copy (its training report says so), so that copy is
    what it is served on. An adapter from elsewhere on the Hub twin gets the embedded copy only where the
    Hub's own copy is not at hand (offline, not cached).
    """
    from assistant.embedded import EMBEDDED, EMBEDDED_HUB_ID, is_embedded

    try:
        base = adapter_info(folder).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):  # not an adapter, or a broken config (adapter_problem says)
        return None
    if is_embedded(base):  # older adapters named the embedded model itself
        return EMBEDDED
    if base == EMBEDDED_HUB_ID and (is_embedded(training_report(folder).get("base_model")) or _embedded_stands_in()):
        return EMBEDDED
    return base


def training_report(folder: str | Path) -> dict:
    """The adapter folder's training_report.json ({} when it has none or it cannot be read)."""
    try:
        report = json.loads((Path(folder) / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _embedded_stands_in() -> bool:
    """True when the Hub twin is not cached here but the embedded copy is installed."""
    import importlib.util

    from huggingface_hub import try_to_load_from_cache

    from assistant.embedded import EMBEDDED_HUB_ID, GGUF_PACKAGE

    cached = isinstance(try_to_load_from_cache(EMBEDDED_HUB_ID, "config.json"), str)
    if not cached and importlib.util.find_spec(GGUF_PACKAGE) is not None:
        logger.debug("%s is not cached here: serving the adapter on the embedded copy of it", EMBEDDED_HUB_ID)
        return True
    return False


def method_of(info: dict) -> str:
    """'lora' or 'prefix' from a peft config dict."""
    kind = str(info.get("peft_type", "")).upper()
    return {"LORA": "lora", "PREFIX_TUNING": "prefix"}.get(kind, kind.lower())


WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what peft saves
METHODS = ("lora", "prefix")  # what the app serves


def adapter_problem(folder: str | Path) -> str | None:
    """Why an adapter folder cannot be served, read from its files without loading it (None: it looks fine)."""
    config = Path(folder) / ADAPTER_CONFIG
    try:
        info = json.loads(config.read_text(encoding="utf-8"))
    except OSError as error:
        return f"{config}: cannot be read ({error.strerror or error})"
    except ValueError as error:
        return f"{config}: not valid JSON ({error}); train the adapter again or fix the file"
    if not isinstance(info, dict):
        return f"{config}: not a peft adapter config (a JSON object is expected)"
    method = method_of(info)
    if method not in METHODS:
        return f"{config}: peft_type {info.get('peft_type')!r} is not served here (LORA or PREFIX_TUNING)"
    if not any((Path(folder) / name).is_file() for name in WEIGHTS):
        return f"{folder}: no adapter weights ({' or '.join(WEIGHTS)})"
    return None


def folder_signature(folder: str | Path) -> tuple:
    """Changes when the adapter in `folder` is written again (its config or weights)."""
    stats = []
    for name in (ADAPTER_CONFIG, *WEIGHTS):
        path = Path(folder) / name
        if path.is_file():
            stat = path.stat()
            stats.append((name, stat.st_mtime_ns, stat.st_size))
    return tuple(stats)


def is_listed(folder: Path) -> bool:
    """An adapter the app offers: has a peft config and is neither hidden nor a partial (staging) folder."""
    return (
        not folder.name.startswith(".")
        and PARTIAL_MARK not in folder.name
        and (folder / ADAPTER_CONFIG).is_file()
    )


def find_adapters(folder: str | Path) -> dict[str, Path]:
    """Listed adapter subfolders of `folder`, by folder name."""
    root = Path(folder)
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if is_listed(p)}


def written_by_trainer(folder: Path) -> bool:
    """True for an adapter folder that train.sft published (so a new run may replace it)."""
    return (folder / ADAPTER_CONFIG).is_file() and (folder / REPORT_FILE).is_file()


@dataclass(frozen=True)
class TrainedPrompt:
    """The system prompt an adapter's training rows were rendered with.

    `text` None means the rows were rendered with no system message at all (and the template wrote none).
    """

    text: str | None
    source: str  # "rows" (the rows' own), "--system-prompt", "template default" or "none"
    rows: int = 0  # training rows
    rows_with_own: int = 0  # rows that carried their own system message
    distinct: int = 1  # distinct system prompts over all rows (1: every row was trained with `text`)

    def describe(self) -> str:
        """One line for the doctor and the logs."""
        text = "(no system message)" if self.text is None else repr(_short(self.text))
        mixed = f"; {self.distinct} different prompts, this is the most common" if self.distinct > 1 else ""
        return f"{text} from {self.source}; {self.rows_with_own} of {self.rows} rows carry their own{mixed}"


def summarize_prompts(row_prompts: list[str | None], default: str | None, source: str) -> TrainedPrompt:
    """The prompt to record for rows whose own system prompts are `row_prompts` (None: the row has none).

    Rows without one were rendered with `default` (from `source`: --system-prompt or the template).
    """
    effective = Counter(default if own is None else own for own in row_prompts)
    own = sum(p is not None for p in row_prompts)
    text = effective.most_common(1)[0][0] if effective else default
    if text is None:
        chosen_source = "none"
    elif own == len(row_prompts) or text != default:
        chosen_source = "rows"
    else:
        chosen_source = source
    return TrainedPrompt(text, chosen_source, len(row_prompts), own, max(1, len(effective)))


def write_trained_prompt(folder: Path, prompt: TrainedPrompt) -> None:
    """Record the trained system prompt in an adapter folder."""
    (folder / PROMPT_FILE).write_text(json.dumps(asdict(prompt), indent=2, ensure_ascii=False) + "\n")


def trained_prompt(folder: str | Path | None) -> TrainedPrompt | None:
    """The system prompt recorded in an adapter folder (None for older adapters or a broken record)."""
    if folder is None:
        return None
    path = Path(folder) / PROMPT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return TrainedPrompt(**data)
    except (ValueError, TypeError) as error:  # a hand-edited file must not stop the app
        logger.warning("%s: unreadable trained system prompt (%s); serving without it", path, error)
        return None


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """`messages` with `system` as their system message when they have none (unchanged when None)."""
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
