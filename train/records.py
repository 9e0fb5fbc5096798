"""Pipeline stage 1, file -> records: load a dialogue file and validate every row before any model loads."""

from __future__ import annotations

import collections
import csv
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MAX_SHOWN = 20  # problems printed in full; the rest are counted so a huge bad file stays readable
BOM = b"\xef\xbb\xbf"
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", **CHAT_ROLES}
# Keys that identify a format; a row holding keys of two formats has no single meaning.
MARKERS = {
    "pairs": ("prompt", "response"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
}
CSV_COLUMNS = {"pairs": {"prompt", "response"}, "alpaca": {"instruction", "output"}}
# Preference (DPO) rows: OpenAI's fine-tuning format, and TRL's explicit-prompt one (text or messages).
PREFERENCE_MARKERS = {
    "openai_preference": ("preferred_output", "non_preferred_output"),
    "prompt_chosen_rejected": ("chosen", "rejected"),
}
PREFERENCE_NEED = ("'input'/'preferred_output'/'non_preferred_output' (OpenAI's preference rows) or "
                   "'prompt'/'chosen'/'rejected'")
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class Example:
    """One chat example and where it came from."""

    messages: list[dict[str, str]]
    source: str
    format: str
    fields: list[tuple[int, int, str]] = field(default_factory=list, compare=False, repr=False)  # (message, from, field)

    def field_at(self, message: int, offset: int = 0) -> str:
        """The row's field (as its file names it) that `messages[message]`'s text at `offset` was read from."""
        names = [name for index, start, name in self.fields if index == message and start <= offset]
        return names[-1] if names else f"messages[{message}].content"


class DataError(ValueError):
    """Input that cannot be trained on; str() lists one problem per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = self.problems[:MAX_SHOWN]
        if len(self.problems) > MAX_SHOWN:
            lines.append(f"... and {len(self.problems) - MAX_SHOWN} more problems")
        super().__init__("\n".join(lines))


@dataclass
class LoadResult:
    """Examples that loaded, warnings about them, and how many rows each format gave."""

    examples: list[Example]
    warnings: list[str] = field(default_factory=list)
    formats: collections.Counter = field(default_factory=collections.Counter)


def _type_name(value: Any) -> str:
    """Name a JSON value's type the way a user who wrote the file would."""
    return {type(None): "null", dict: "object", str: "string"}.get(type(value), type(value).__name__)


def _keys(mapping: dict) -> str:
    """List a row's keys for messages, so a misspelt key is easy to spot."""
    return ", ".join(map(str, mapping)) or "none"


class _Row:
    """Checks the fields of one row, collecting problems and warnings prefixed with its source."""

    def __init__(self, row: dict, source: str, long_chars: int) -> None:
        self.row, self.source, self.long_chars = row, source, long_chars
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def error(self, message: str) -> None:
        """Record a problem for this row."""
        self.problems.append(f"{self.source}: {message}")

    def text(self, value: Any, name: str, *, optional: bool = False) -> str | None:
        """Return value as clean text, or None after recording why it is not usable."""
        if not isinstance(value, str):  # no coercion: str([...]) would train on the repr of a list
            self.error(f"field '{name}' must be a string, got {_type_name(value)}")
            return None
        if not value.strip():
            if not optional:
                self.error(f"field '{name}' is empty")
            return None
        # Tokenisers see '\r' as its own token; Windows files must train like Unix ones.
        value = value.replace("\r\n", "\n").replace("\r", "\n")
        if len(value) > self.long_chars:
            self.warnings.append(
                f"{self.source}: field '{name}' is {len(value):,} characters (over {self.long_chars:,}); "
                "it will be truncated to the maximum sequence length at tokenisation"
            )
        return value

    def required(self, mapping: dict, key: str, name: str | None = None) -> str | None:
        """Read a required text field."""
        if key not in mapping:
            self.error(f"missing field '{name or key}' (found keys: {_keys(mapping)})")
            return None
        return self.text(mapping[key], name or key)

    def optional(self, key: str) -> str | None:
        """Read an optional text field; empty means absent."""
        return self.text(self.row[key], key, optional=True) if key in self.row else None


def _pairs(row: _Row) -> list[dict[str, str]] | None:
    """prompt/response/system -> [system?, user, assistant]."""
    system, prompt = row.optional("system"), row.required(row.row, "prompt")
    response = row.required(row.row, "response")
    if prompt is None or response is None:
        return None
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _alpaca(row: _Row) -> list[dict[str, str]] | None:
    """instruction/input/output -> [user, assistant]; input is appended to the instruction."""
    instruction, extra = row.required(row.row, "instruction"), row.optional("input")
    output = row.required(row.row, "output")
    if instruction is None or output is None:
        return None
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _turns(row: _Row, key: str, role_key: str, content_key: str, roles: dict, *, turns: Any = None,
           need_assistant: bool = True) -> list[dict[str, str]] | None:
    """Validate a list of turns (OpenAI messages or ShareGPT conversations) into chat messages.

    `turns`: the list when it is not `row.row[key]` (a preference row's `input.messages`, `key` then names it)."""
    turns, before = (row.row[key] if turns is None else turns), len(row.problems)
    if not isinstance(turns, list):
        row.error(f"field '{key}' must be a list, got {_type_name(turns)}")
        return None
    messages, seen_roles = [], []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            row.error(f"field '{where}' must be an object, got {_type_name(turn)}")
            continue
        raw_role = turn.get(role_key)
        role = roles.get(raw_role) if isinstance(raw_role, str) else None
        if role_key not in turn:
            row.error(f"missing field '{where}.{role_key}'")
        elif role is None:
            row.error(f"field '{where}.{role_key}' must be one of {', '.join(roles)}, got {raw_role!r}")
        elif role == "system" and i > 0:  # a mid-chat system turn has no place in the chat template
            row.error(f"field '{where}.{role_key}': a system message is only allowed first")
        seen_roles.append(role)
        content = row.required(turn, content_key, f"{where}.{content_key}")
        if role and content is not None:
            messages.append({"role": role, "content": content})
    if need_assistant and "assistant" not in seen_roles:  # only assistant tokens carry loss: nothing to learn
        row.error(f"field '{key}' has no assistant message, so there is nothing to learn from")
    return messages if len(row.problems) == before else None


def _fields(format_: str, row: dict, messages: list[dict[str, str]]) -> list[tuple[int, int, str]]:
    """(message, from offset, field): where in the row each message's text was read, for messages naming it."""
    if format_ == "messages":
        return [(i, 0, f"messages[{i}].content") for i in range(len(messages))]
    if format_ == "sharegpt":
        return [(i, 0, f"conversations[{i}].value") for i in range(len(messages))]
    if format_ == "pairs":
        names = ["system"] * (messages[0]["role"] == "system") + ["prompt", "response"]
        return [(i, 0, name) for i, name in enumerate(names)]
    instruction = row["instruction"].replace("\r\n", "\n").replace("\r", "\n")  # as _Row.text cleans it
    spans = [(0, 0, "instruction"), (1, 0, "output")]
    return spans + [(0, len(instruction) + 2, "input")] * (messages[0]["content"] != instruction)


BUILDERS = {
    "pairs": _pairs,
    "messages": lambda row: _turns(row, "messages", "role", "content", CHAT_ROLES),
    "sharegpt": lambda row: _turns(row, "conversations", "from", "value", SHAREGPT_ROLES),
    "alpaca": _alpaca,
}


def _parse_row(value: Any, source: str, long_chars: int, result: LoadResult, problems: list[str]) -> None:
    """Detect the row's format, validate it, and add the example or its problems."""
    if not isinstance(value, dict):
        kind = _type_name(value)
        kind = kind if kind == "null" else ("an " if kind[0] in "aeiou" else "a ") + kind
        problems.append(f"{source}: expected a JSON object, got {kind}")
        return
    row = _Row(value, source, long_chars)
    found = [name for name, keys in MARKERS.items() if any(k in value for k in keys)]
    keys = _keys(value)
    if is_preference_row(value):  # a row that train.sft would misread as a prompt without a response
        row.error(f"a preference row (found keys: {keys}): train preference pairs with python -m train.dpo; "
                  "train.sft needs one reply per row")
    elif len(found) > 1:
        row.error(f"ambiguous row: has keys of formats {' and '.join(found)} (found keys: {keys}); use one")
    elif not found:
        row.error(
            "missing field: need 'prompt'/'response', 'messages', 'conversations' or "
            f"'instruction'/'output' (found keys: {keys})"
        )
    else:
        messages = BUILDERS[found[0]](row)
        if messages and not row.problems:
            result.examples.append(Example(messages, source, found[0], _fields(found[0], value, messages)))
            result.formats[found[0]] += 1
    problems.extend(row.problems)
    result.warnings.extend(row.warnings)


def _decode_lines(data: bytes, name: str, problems: list[str]) -> list[str | None]:
    """Split bytes into physical lines decoded as strict UTF-8; None marks a line that failed."""
    offset = len(BOM) if data.startswith(BOM) else 0  # offsets count the BOM so editors agree with us
    lines: list[str | None] = []
    for lineno, raw in enumerate(data[offset:].split(b"\n"), 1):
        try:
            lines.append(raw.removesuffix(b"\r").decode("utf-8"))
        except UnicodeDecodeError as e:  # never decode with replacement: it would train on '\ufffd'
            lines.append(None)
            problems.append(
                f"{name}:{lineno}: not valid UTF-8: byte 0x{raw[e.start]:02X} at byte offset {offset + e.start} "
                f"(column {e.start + 1}); re-save the file as UTF-8"
            )
        offset += len(raw) + 1
    return lines


def _jsonl_rows(name: str, data: bytes, problems: list[str]) -> Iterator[tuple[str, Any]]:
    """Yield (source, parsed value) for each non-blank line of a JSON Lines file."""
    lines = _decode_lines(data, name, problems)
    first = next((i for i, line in enumerate(lines) if line is None or line.strip()), None)
    if first is not None and lines[first] is not None and lines[first].lstrip().startswith("["):
        problems.append(
            f"{name}:{first + 1}: the file is a JSON array, not JSON Lines (one object per line); "
            "write each example as one JSON object on its own line"
        )
        return
    for lineno, line in enumerate(lines, 1):
        if line is None or not line.strip():
            continue
        try:
            yield f"{name}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            last = lineno == len(lines) and not data.endswith(b"\n")
            hint = "; the file is probably truncated (its last line has no newline)" if last else ""
            problems.append(f"{name}:{lineno}: invalid JSON: {e.msg} (column {e.colno}){hint}")


def _csv_rows(name: str, data: bytes, problems: list[str]) -> Iterator[tuple[str, Any]]:
    """Yield (source, row dict) for each record of a CSV file with a known header."""
    lines = _decode_lines(data, name, problems)
    if any(line is None for line in lines):
        return
    reader = csv.reader(io.StringIO("\n".join(line or "" for line in lines)))
    try:
        header = [h.strip().lower() for h in next(reader, [])]
        if header and sum(cols <= set(header) for cols in CSV_COLUMNS.values()) != 1:
            problems.append(
                f"{name}:1: CSV header needs columns prompt,response (optional system) or "
                f"instruction,output (optional input); found: {', '.join(header)}"
            )
            return
        start = reader.line_num + 1  # the reader reports a record's last line; we want its first
        for cells in reader:
            lineno, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                problems.append(f"{name}:{lineno}: has {len(cells)} cells but the header has {len(header)}")
                continue
            yield f"{name}:{lineno}", dict(zip(header, cells, strict=True))
    except csv.Error as e:
        problems.append(f"{name}:{reader.line_num}: invalid CSV: {e}")


def _line_of(problem: str, name: str) -> int:
    """The line (or row) number a problem names, 0 for whole-file problems."""
    match = re.match(r":(?:row )?(\d+):", problem[len(name) :])
    return int(match.group(1)) if match else 0


def _dataset_rows(path: Path, name: str, problems: list[str]) -> Iterator[tuple[str, Any]]:
    """Yield (source, row dict) for each row of a saved datasets folder (its train split if a dict)."""
    import datasets  # heavy import, needed only for folders

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # any load failure is the user's data problem, reported like the others
        problems.append(f"{name}: cannot load the datasets folder: {e}")
        return
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            problems.append(f"{name}: DatasetDict has no 'train' split (splits: {', '.join(ds)})")
            return
        ds = ds["train"]
    for i, row in enumerate(ds):
        # Arrow fills a column a row lacks with null, so null here means "absent", not a bad value.
        yield f"{name}:row {i}", {k: v for k, v in row.items() if v is not None}


def _rows(path: Path, name: str, problems: list[str]) -> Iterator[tuple[str, Any]]:
    """Pick the reader for the path: datasets folder, CSV, or JSON Lines for anything else."""
    if path.is_dir():
        if any((path / marker).is_file() for marker in DATASET_MARKERS) or (path / "train").is_dir():
            return _dataset_rows(path, name, problems)
        problems.append(f"{name}: is a folder but not one saved by datasets (no dataset_info.json)")
        return iter(())
    try:
        data = path.read_bytes()
    except OSError as e:
        problems.append(f"{name}: cannot read: {e.strerror}")
        return iter(())
    return (_csv_rows if path.suffix.lower() == ".csv" else _jsonl_rows)(name, data, problems)


def load_examples(path: str | os.PathLike, *, long_field_chars: int = 20_000) -> LoadResult:
    """Load every example in path, or raise DataError listing every problem found."""
    name, file = os.fspath(path), Path(path)
    if not file.exists():
        raise DataError([f"{name}: no such file"])
    result, problems = LoadResult(examples=[]), []
    for source, value in _rows(file, name, problems):
        _parse_row(value, source, long_field_chars, result, problems)
    for warning in result.warnings:
        logger.warning(warning)
    if not result.examples and not problems:
        problems.append(f"{name}: has no examples (the file is empty or has only blank lines)")
    if problems:
        # Decoding reports all bad lines before rows are parsed; list everything in file order.
        raise DataError(sorted(problems, key=lambda p: _line_of(p, name)))
    logger.info("%s: %d examples (%s)", name, len(result.examples), dict(result.formats))
    return result


# -- preference pairs (train.dpo) ----------------------------------------------------------------------------
@dataclass
class Preference:
    """One preference pair: a conversation up to a user turn, the preferred reply and the non-preferred one."""

    prompt: list[dict[str, str]]  # system?, user, (assistant, user)*: the reply comes next
    chosen: str
    rejected: str
    source: str
    format: str
    names: tuple[str, str, str] = ("input.messages", "preferred_output[0].content",
                                   "non_preferred_output[0].content")  # prompt list, chosen, rejected as the row names them
    text_prompt: bool = False  # the prompt came as text ('system'/'prompt' fields), not as a list of messages

    def scan_example(self) -> Example:
        """The pair as one Example (prompt turns, then both replies) whose fields name the row's, for the doctor."""
        messages = [*self.prompt, {"role": "assistant", "content": self.chosen},
                    {"role": "assistant", "content": self.rejected}]
        last = len(self.prompt)
        if self.text_prompt:  # [system?, user] read from the fields 'system' and 'prompt'
            fields = [(i, 0, "system" if m["role"] == "system" else "prompt") for i, m in enumerate(self.prompt)]
        else:
            fields = [(i, 0, f"{self.names[0]}[{i}].content") for i in range(last)]
        return Example(messages, self.source, self.format, fields + [(last, 0, self.names[1]),
                                                                     (last + 1, 0, self.names[2])])


@dataclass
class PreferenceResult:
    """Pairs that loaded, warnings about them, and how many rows each format gave."""

    pairs: list[Preference]
    warnings: list[str] = field(default_factory=list)
    formats: collections.Counter = field(default_factory=collections.Counter)


def is_preference_row(value: Any) -> bool:
    """True for a row in one of the preference formats (it holds a marker key of one)."""
    return isinstance(value, dict) and any(k in value for keys in PREFERENCE_MARKERS.values() for k in keys)


def _reply(row: _Row, key: str) -> tuple[str | None, str]:
    """A preference row's reply: text, or a list of exactly one assistant message; (text, the field it is in)."""
    value = row.row[key]
    if isinstance(value, str):
        return row.text(value, key), key
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        got = f"a list of {len(value)}" if isinstance(value, list) else _type_name(value)
        row.error(f"field '{key}' must be a list of one assistant message "
                  f'([{{"role": "assistant", "content": "..."}}]), got {got}')
        return None, key
    message, where = value[0], f"{key}[0]"
    if message.get("role") != "assistant":
        row.error(f"field '{where}.role' must be 'assistant', got {message.get('role')!r}")
        return None, f"{where}.content"
    return row.required(message, "content", f"{where}.content"), f"{where}.content"


def _prompt_turns(row: _Row, turns: Any, key: str) -> list[dict[str, str]] | None:
    """The conversation a preference pair answers: chat turns ending with a user turn."""
    messages = _turns(row, key, "role", "content", CHAT_ROLES, turns=turns, need_assistant=False)
    if messages is not None and (not messages or messages[-1]["role"] != "user"):
        last = f"ends with an {messages[-1]['role']} message" if messages else "is empty"
        row.error(f"field '{key}' {last}; the conversation must end with the user message the replies answer")
        return None
    return messages


def _openai_preference(row: _Row) -> Preference | None:
    """OpenAI's {"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}."""
    for key in ("input", "preferred_output", "non_preferred_output"):
        if key not in row.row:
            row.error(f"missing field '{key}' (found keys: {_keys(row.row)})")
    if row.problems:
        return None
    given = row.row["input"]
    prompt = None
    if not isinstance(given, dict):
        row.error(f"field 'input' must be an object with 'messages', got {_type_name(given)}")
    elif "messages" not in given:
        row.error(f"missing field 'input.messages' (found keys: {_keys(given)})")
    else:
        prompt = _prompt_turns(row, given["messages"], "input.messages")
    chosen, chosen_field = _reply(row, "preferred_output")
    rejected, rejected_field = _reply(row, "non_preferred_output")
    return _pair(row, prompt, chosen, rejected, "openai_preference", ("input.messages", chosen_field, rejected_field))


def _prompt_chosen_rejected(row: _Row) -> Preference | None:
    """{"prompt", "chosen", "rejected"} (optional "system"): text, or TRL's conversational lists."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in row.row:
            row.error(f"missing field '{key}' (found keys: {_keys(row.row)})")
    if row.problems:
        return None
    given, prompt = row.row["prompt"], None
    if isinstance(given, list):
        prompt = _prompt_turns(row, given, "prompt")
        if prompt is not None and "system" in row.row:
            row.error("field 'system' is only read with a text 'prompt'; put the system message in the 'prompt' list")
    else:
        text, system = row.text(given, "prompt"), row.optional("system")
        if text is not None:
            prompt = [{"role": "system", "content": system}] * bool(system) + [{"role": "user", "content": text}]
    chosen, chosen_field = _reply(row, "chosen")
    rejected, rejected_field = _reply(row, "rejected")
    pair = _pair(row, prompt, chosen, rejected, "prompt_chosen_rejected", ("prompt", chosen_field, rejected_field))
    if pair is not None:
        pair.text_prompt = not isinstance(given, list)
    return pair


def _pair(row: _Row, prompt, chosen, rejected, format_: str, names: tuple[str, str, str]) -> Preference | None:
    """The pair when every part is usable; a pair of equal replies is refused (its DPO loss has no gradient)."""
    if prompt is None or chosen is None or rejected is None or row.problems:
        return None
    if chosen.strip() == rejected.strip():
        row.error(f"fields '{names[1]}' and '{names[2]}' are the same reply; a pair teaches a preference only when "
                  "they differ")
        return None
    return Preference(prompt, chosen, rejected, row.source, format_, names)


def load_preferences(path: str | os.PathLike, *, long_field_chars: int = 20_000) -> PreferenceResult:
    """Load every preference pair in path (JSONL or a `datasets` folder), or raise DataError listing every problem."""
    name, file = os.fspath(path), Path(path)
    if not file.exists():
        raise DataError([f"{name}: no such file"])
    result, problems = PreferenceResult(pairs=[]), []
    for source, value in _rows(file, name, problems):
        if not isinstance(value, dict):
            kind = _type_name(value)
            problems.append(f"{source}: expected a JSON object, got {kind}")
            continue
        row = _Row(value, source, long_field_chars)
        openai = any(k in value for k in PREFERENCE_MARKERS["openai_preference"])
        if not is_preference_row(value):
            row.error(f"not a preference row: need {PREFERENCE_NEED} (found keys: {_keys(value)})")
        elif openai and any(k in value for k in ("chosen", "rejected")):
            row.error(f"ambiguous row: has keys of both preference formats (found keys: {_keys(value)}); use one")
        else:
            pair = (_openai_preference if openai else _prompt_chosen_rejected)(row)
            if pair is not None:
                result.pairs.append(pair)
                result.formats[pair.format] += 1
        problems.extend(row.problems)
        result.warnings.extend(row.warnings)
    for warning in result.warnings:
        logger.warning(warning)
    if not result.pairs and not problems:
        problems.append(f"{name}: has no preference pairs (the file is empty or has only blank lines)")
    if problems:
        raise DataError(sorted(problems, key=lambda p: _line_of(p, name)))
    logger.info("%s: %d preference pairs (%s)", name, len(result.pairs), dict(result.formats))
    return result


def holds_preferences(path: str | os.PathLike) -> bool:
    """True when the file's first row (JSON object) is a preference row: what the doctor checks it as."""
    file, problems = Path(path), []
    if not file.exists():
        return False
    for _, value in _rows(file, os.fspath(path), problems):
        if isinstance(value, dict):
            return is_preference_row(value)
    return False
