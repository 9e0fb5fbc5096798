"""Adapter folders: the one answer to "is this folder servable, of which kind and base, trained with which
system prompt, report and generation settings", and the one prompt rule.

Nothing else opens `adapter_config.json`, `system_prompt.json`, `training_report.json` or an adapter's
`generation_config.json`: the trainer (what to publish, what it may replace), the registry (what to list
and serve), the exports, the vLLM launcher and the screens all ask `read_folder`. A folder is read once
per signature (its files' sizes and times), so a folder the trainer publishes again is read anew.
A merged model folder (`train.export --to merged`) gets the same answers: it is served as its own base,
with the prompt and generation settings it carries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
PROMPT_FILE = "system_prompt.json"  # the system prompt the adapter's data was trained under
REPORT_FILE = "training_report.json"  # written by train.sft last, before the folder is published
GENERATION_FILE = "generation_config.json"  # Hugging Face's convention: the sampling defaults to serve with
MODEL_CONFIG = "config.json"  # a full (merged) model folder
PARTIAL_MARK = ".partial"  # staging folders of the trainer and of merges carry this in their name
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what peft saves
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")  # a full model
KINDS = ("lora", "dora", "prefix", "merged")  # what the app serves
METHODS = ("lora", "prefix")  # what the trainer trains (DoRA is LoRA with --use-dora)
# generation_config.json fields the app serves with (the rest, e.g. eos ids, belong to the model).
SAMPLING_FIELDS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")
_SIGNED = (ADAPTER_CONFIG, *WEIGHTS, PROMPT_FILE, REPORT_FILE, GENERATION_FILE, MODEL_CONFIG, *MODEL_WEIGHTS)


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


@dataclass(frozen=True)
class AdapterFolder:
    """Everything the product knows about one adapter (or merged model) folder, read from its files once."""

    path: Path
    kind: str | None  # "lora", "dora", "prefix", "merged"; None when the folder is neither
    base: str | None  # what it is served on: "embedded", a Hub id or folder (a merged model: itself)
    config: dict = field(default_factory=dict, repr=False)  # adapter_config.json ({} for a merged model)
    prompt: TrainedPrompt | None = None  # the system prompt it was trained with (None: not recorded)
    report: dict = field(default_factory=dict, repr=False)  # training_report.json ({}: none)
    generation: dict = field(default_factory=dict)  # generation_config.json's SAMPLING_FIELDS ({}: none)
    problem: str | None = None  # why it cannot be served (None: it looks fine)
    signature: tuple = ()

    @property
    def method(self) -> str | None:
        """How it attaches: 'lora' (DoRA included), 'prefix', or None (a merged model attaches nothing)."""
        return {"lora": "lora", "dora": "lora", "prefix": "prefix"}.get(self.kind or "")

    @property
    def named_base(self) -> str | None:
        """The base as adapter_config.json names it (the Hub twin for the embedded model)."""
        return self.config.get("base_model_name_or_path")

    @property
    def by_trainer(self) -> bool:
        """True for a folder train.sft published (so a new run may replace it)."""
        return self.kind in ("lora", "dora", "prefix") and any(name == REPORT_FILE for name, *_ in self.signature)

    @property
    def version(self) -> str:
        """A short hash of the folder's signature: changes whenever the folder is written again."""
        return hashlib.sha256(repr(self.signature).encode()).hexdigest()[:12]

    @property
    def has_tokenizer(self) -> bool:
        """The folder carries the tokenizer and chat template it was trained with."""
        return (self.path / "tokenizer_config.json").is_file()

    def tokenizer_digest(self) -> str | None:
        """A hash of the files its tokenizer loads from (None: it carries none): folders whose digests are
        equal load equal tokenizers, so a server keeps one of them (~10 MB each for the embedded model's)."""
        if not self.has_tokenizer:
            return None
        digest = hashlib.sha256()
        for file in sorted(self.path.iterdir()):
            if file.is_file() and any(part in file.name for part in TOKENIZER_NAME_PARTS):
                digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
        return digest.hexdigest()

    def require(self) -> AdapterFolder:
        """Self, or a ValueError naming the folder and why it cannot be served."""
        if self.problem:
            raise ValueError(self.problem)
        return self


# What a tokenizer's files are named (transformers' tokenizer*.json, special_tokens_map.json, added_tokens.json,
# chat_template.jinja/.json, vocab.* and merges.txt of BPE tokenizers, sentencepiece *.model / spiece.model).
TOKENIZER_NAME_PARTS = ("token", "chat_template", "vocab", "merges", ".model", "spiece", ".tiktoken")

_cache: dict[str, AdapterFolder] = {}
_cache_lock = threading.Lock()


def read_folder(folder: str | Path) -> AdapterFolder:
    """The AdapterFolder of `folder`, read again only when its files changed."""
    path = Path(folder)
    key, signature = str(path.resolve()), folder_signature(path)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None and cached.signature == signature and cached.path == path:
        # The base of an adapter from elsewhere on the embedded model's Hub twin depends on the Hub cache,
        # not on the folder's files: decided anew (a cheap file check) so a later download is followed.
        base = _base(cached.named_base, cached.report) if cached.method else cached.base
        return cached if base == cached.base else replace(cached, base=base)
    read = _read(path, signature)
    with _cache_lock:
        _cache[key] = read
    return read


def _read(path: Path, signature: tuple) -> AdapterFolder:
    if not path.is_dir():
        return AdapterFolder(path, None, None, problem=f"{path}: no such folder", signature=signature)
    prompt, report, generation = _prompt(path), _json_object(path / REPORT_FILE), _generation(path)
    if not (path / ADAPTER_CONFIG).is_file():
        if (path / MODEL_CONFIG).is_file():
            weights = any((path / name).is_file() for name in MODEL_WEIGHTS)
            problem = None if weights else f"{path}: a model folder without weights ({' or '.join(MODEL_WEIGHTS)})"
            return AdapterFolder(path, "merged", str(path), {}, prompt, report, generation, problem, signature)
        return AdapterFolder(path, None, None, problem=(
            f"{path}: not an adapter folder (no {ADAPTER_CONFIG}); train one with train.sft"), signature=signature)
    config_file = path / ADAPTER_CONFIG
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except OSError as error:
        problem = f"{config_file}: cannot be read ({error.strerror or error})"
        return AdapterFolder(path, None, None, problem=problem, signature=signature)
    except ValueError as error:
        problem = f"{config_file}: not valid JSON ({error}); train the adapter again or fix the file"
        return AdapterFolder(path, None, None, problem=problem, signature=signature)
    if not isinstance(config, dict):
        problem = f"{config_file}: not a peft adapter config (a JSON object is expected)"
        return AdapterFolder(path, None, None, problem=problem, signature=signature)
    kind, problem = _kind(config), None
    if kind is None:
        problem = f"{config_file}: peft_type {config.get('peft_type')!r} is not served here (LORA or PREFIX_TUNING)"
    elif not any((path / name).is_file() for name in WEIGHTS):
        problem = f"{path}: no adapter weights ({' or '.join(WEIGHTS)})"
    base = _base(config.get("base_model_name_or_path"), report)
    return AdapterFolder(path, kind, base, config, prompt, report, generation, problem, signature)


def _kind(config: dict) -> str | None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "LORA":
        return "dora" if config.get("use_dora") else "lora"
    return "prefix" if peft_type == "PREFIX_TUNING" else None


def _base(named: str | None, report: dict) -> str | None:
    """The base an adapter is served on.

    adapter_config.json names the embedded model by its Hub twin so that peft, vLLM and the Hub resolve
    it; the adapter was trained on the embedded copy (its training report says so), so that copy is
    what it is served on. An adapter from elsewhere on the Hub twin gets the embedded copy only where the
    Hub's own copy is not at hand (offline, not cached).
    """
    from assistant.embedded import EMBEDDED, EMBEDDED_HUB_ID, is_embedded

    if not isinstance(named, str) or not named:
        return None
    if is_embedded(named):  # older adapters named the embedded model itself
        return EMBEDDED
    if named == EMBEDDED_HUB_ID and (is_embedded(report.get("base_model")) or _embedded_stands_in()):
        return EMBEDDED
    return named


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


def _json_object(path: Path) -> dict:
    """A JSON object file ({} when it is missing or unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _prompt(folder: Path) -> TrainedPrompt | None:
    path = folder / PROMPT_FILE
    if not path.is_file():
        return None
    try:
        return TrainedPrompt(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as error:  # a hand-edited file must not stop the app
        logger.warning("%s: unreadable trained system prompt (%s); serving without it", path, error)
        return None


def _generation(folder: Path) -> dict:
    data = _json_object(folder / GENERATION_FILE)
    return {k: data[k] for k in SAMPLING_FIELDS if data.get(k) is not None}


def folder_signature(folder: str | Path) -> tuple:
    """Changes when anything the product reads from `folder` is written again."""
    stats = []
    for name in _SIGNED:
        path = Path(folder) / name
        if path.is_file():
            stat = path.stat()
            stats.append((name, stat.st_mtime_ns, stat.st_size))
    return tuple(stats)


# -- shortcuts over read_folder --------------------------------------------------------------------------
def adapter_info(adapter: str | Path) -> dict:
    """The adapter folder's peft config, with a clear error when the folder is not an adapter."""
    folder = read_folder(adapter)
    if not folder.config:
        raise FileNotFoundError(f"{adapter}: not an adapter folder (no {ADAPTER_CONFIG}); train one with train.sft")
    return folder.config


def adapter_base(folder: str | Path) -> str | None:
    """The base model an adapter folder is served on ('embedded' for the embedded model)."""
    return read_folder(folder).base


def adapter_problem(folder: str | Path) -> str | None:
    """Why a folder cannot be served, read from its files without loading it (None: it looks fine)."""
    return read_folder(folder).problem


def trained_prompt(folder: str | Path | None) -> TrainedPrompt | None:
    """The system prompt recorded in an adapter folder (None for older adapters or a broken record)."""
    return read_folder(folder).prompt if folder is not None else None


def training_report(folder: str | Path) -> dict:
    """The adapter folder's training_report.json ({} when it has none or it cannot be read)."""
    return read_folder(folder).report


def method_of(info: dict) -> str:
    """'lora' or 'prefix' from a peft config dict."""
    kind = str(info.get("peft_type", "")).upper()
    return {"LORA": "lora", "PREFIX_TUNING": "prefix"}.get(kind, kind.lower())


def is_listed(folder: Path) -> bool:
    """A folder the app offers: an adapter or merged model, neither hidden nor a partial (staging) folder."""
    return (
        not folder.name.startswith(".")
        and PARTIAL_MARK not in folder.name
        and ((folder / ADAPTER_CONFIG).is_file() or (folder / MODEL_CONFIG).is_file())
    )


def find_adapters(folder: str | Path) -> dict[str, Path]:
    """Listed adapter (and merged model) subfolders of `folder`, by folder name."""
    root = Path(folder)
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and is_listed(p)}


def written_by_trainer(folder: Path) -> bool:
    """True for an adapter folder that train.sft published (so a new run may replace it)."""
    return read_folder(folder).by_trainer


# -- writing (the trainer) -------------------------------------------------------------------------------
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


def write_report(folder: Path, report: dict) -> None:
    """Write training_report.json (stable key order, readable)."""
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def write_base_name(folder: str | Path, base: str) -> None:
    """Name `base` as the model an adapter folder loads on (adapter_config.json's base_model_name_or_path,
    what peft, vLLM and the Hub read), keeping the rest of its config; e.g. a Space names the embedded
    model's Hub twin, since "embedded" means nothing where the GGUF package cannot be installed."""
    folder = Path(folder)
    config = dict(read_folder(folder).config)
    if not config:
        raise FileNotFoundError(f"{folder}: not an adapter folder (no {ADAPTER_CONFIG}); train one with train.sft")
    config["base_model_name_or_path"] = base
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def write_generation(folder: Path, settings: dict) -> None:
    """Record the sampling defaults to serve the folder with, as Hugging Face's generation_config.json.

    A model's own file there (a merged folder's: eos, bos and pad ids) keeps its other fields; its sampling
    fields are replaced by `settings` as a whole (the folder serves with these, not a mix with the base's).
    """
    unknown = set(settings) - set(SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"not generation settings the app serves with: {', '.join(sorted(unknown))}")
    path = Path(folder) / GENERATION_FILE
    # "_from_model_config": the file no longer merely repeats the model's config.json.
    kept = {k: v for k, v in _json_object(path).items() if k not in SAMPLING_FIELDS and k != "_from_model_config"}
    path.write_text(json.dumps({**kept, **settings}, indent=2, sort_keys=True) + "\n")


# -- the prompt rule -------------------------------------------------------------------------------------
def messages_for(messages: list[dict[str, str]], trained: TrainedPrompt | str | None) -> list[dict[str, str]]:
    """The one prompt rule: the messages a model renders for a caller's `messages`.

    The caller's own system message when it sent one (kept exactly as sent); else the prompt the model
    was trained with (`trained`: the folder's TrainedPrompt or its text); else none. Every path that
    serves or scores a model (the chat screen, /chat, /v1, train.eval, the exports, the bench scorer)
    calls this, so what a user chats with is what was trained and measured.
    """
    text = trained.text if isinstance(trained, TrainedPrompt) else trained
    if text is None or any(m["role"] == "system" for m in messages):
        return list(messages)
    return [{"role": "system", "content": text}, *messages]


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
