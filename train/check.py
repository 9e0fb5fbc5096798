"""`python -m train.check FILE`: the dataset doctor. Exit 0 when the file can be trained on, 1 otherwise.

With --json the report is one JSON object on stdout, {"ok": bool, "lines": [the report's lines], "personal_data":
{...}}: what the app (serve.doctor) reads. Personal data (assistant.pii) is a warning per row and field, never an error.
"""

from __future__ import annotations

import collections
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from assistant.adapters import TrainedPrompt
from assistant.chat_format import IGNORE_INDEX, TemplateError
from assistant.embedded import EMBEDDED
from assistant.models import load_tokenizer
from assistant.pii import DEFAULT_REGION, NAMES, NOT_DETECTED, RegionError, check_region, describe, find
from train.cli import parse_with_positional
from train.eval import split_reference
from train.features import (
    Features,
    encode_examples,
    encode_pairs,
    read_system_prompt,
    trained_prompt_of,
    with_system_prompt,
    with_system_prompt_pairs,
)
from train.records import DataError, Example, holds_preferences, load_examples, load_preferences

MAX_SHOWN = 20  # fields with personal data listed one per line; the rest are counted
UNCHECKED = {"checked": False, "counts": {}, "fields": [], "rows": 0, "not_detected": NOT_DETECTED, "seconds": 0.0}


@dataclass
class CheckConfig:
    """Options of `python -m train.check`."""

    data: str | None = field(default=None, metadata={"help": "Dialogue file to check (positional)."})
    base_model: str = field(
        default=EMBEDDED, metadata={"help": "Model whose tokenizer and chat template to use."}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System prompt for rows that have none (TEXT or @FILE), as in train.sft."}
    )
    max_length: int = field(default=1024, metadata={"help": "Tokens per example, as in train.sft."})
    example: int = field(default=0, metadata={"help": "Index of the example to show rendered."})
    kind: str = field(
        default="auto",
        metadata={"help": "What the file must hold: 'sft' (conversations, train.sft), 'preference' (preference pairs, "
                          "train.dpo) or 'auto' (as its first row is).", "choices": ["auto", "sft", "preference"]},
    )
    phone_region: str = field(
        default=DEFAULT_REGION,
        metadata={"help": "Country (ISO 3166 code) whose phone numbers may be written without a country code."},
    )
    eval_items: str | None = field(
        default=None,
        metadata={"help": "Also write the file's conversations, when it can be trained on, as eval items to this JSONL "
                          "file: {\"messages\": the conversation before its last assistant turn, \"reference\": that "
                          "turn} per line (what the app's Evaluate tab runs)."},
    )
    json: bool = field(
        default=False,
        metadata={"help": 'Print the report as one JSON object on stdout: {"ok": bool, "lines": [report lines]} '
                          "(problems are lines starting \"error: \"), plus \"personal_data\": what was found where; "
                          "the exit code is the same."},
    )


@dataclass
class Diagnosis:
    """The doctor's verdict: trainable or not, its report lines, and the personal data it found."""

    ok: bool
    lines: list[str]
    personal_data: dict


def personal_data(examples: list[Example], region: str = DEFAULT_REGION) -> dict:
    """Personal data in the rows as read: counts per kind, and per row and field
    ({"source": "data.jsonl:12", "field": "messages[3].content", "counts": {"email": 1}})."""
    started, total, fields = time.perf_counter(), collections.Counter(), []
    for example in examples:
        per_field: dict[str, collections.Counter] = {}
        for index, message in enumerate(example.messages):
            for finding in find(message["content"], region):
                name = example.field_at(index, finding.start)
                per_field.setdefault(name, collections.Counter())[finding.kind] += 1
        for name, counts in per_field.items():
            fields.append({"source": example.source, "field": name, "counts": dict(counts)})
            total.update(counts)
    return {"checked": True, "counts": dict(total), "fields": fields, "rows": len({f["source"] for f in fields}),
            "not_detected": NOT_DETECTED, "seconds": round(time.perf_counter() - started, 3)}


def personal_data_lines(found: dict) -> list[str]:
    """The report's lines about personal data: one warning per row and field (the first MAX_SHOWN), and the fix."""
    if not found["fields"]:
        return [f"personal data: none found (looked for {', '.join(many for _, many in NAMES.values())}; "
                f"{NOT_DETECTED})"]
    lines = [f"warning: {f['source']} {f['field']}: {describe(f['counts'])}" for f in found["fields"][:MAX_SHOWN]]
    if len(found["fields"]) > MAX_SHOWN:
        lines.append(f"warning: ... and {len(found['fields']) - MAX_SHOWN} more fields with personal data")
    lines.append(
        f"warning: personal data in {found['rows']} row{'s' * (found['rows'] != 1)} ({describe(found['counts'])}): "
        "an adapter trained on it can repeat it; train with --redact to replace each value with a placeholder such "
        f"as [EMAIL_1] ({NOT_DETECTED})"
    )
    return lines


def mark_trained(tokenizer, item: dict) -> str:
    """The rendered example with trained tokens wrapped in [[ ]]."""
    out, run = [], []
    for token, label in zip(item["input_ids"], item["labels"], strict=True):
        if label != IGNORE_INDEX:
            run.append(token)
            continue
        if run:
            out.append(f"[[{tokenizer.decode(run)}]]")
            run = []
        out.append(tokenizer.decode([token]))
    if run:
        out.append(f"[[{tokenizer.decode(run)}]]")
    return "".join(out)


def report(
    config: CheckConfig, features: Features, formats, warnings: list[str], tokenizer, prompt: TrainedPrompt,
    personal: Sequence[str] = (),
) -> list[str]:
    """Lines of the doctor's report."""
    stats = features.length_stats()
    lines = [
        f"file: {config.data}",
        "format: " + ", ".join(f"{name} ({count} rows)" for name, count in formats.most_common()),
        f"examples: {len(features.items)} trainable, {len(features.dropped)} dropped, {len(features.truncated)} truncated",
        f"tokens: {features.tokens} total, {features.trained_tokens} trained; per example min {stats['min']}, "
        f"mean {stats['mean']}, p95 {stats['p95']}, max {stats['max']} (--max-length {config.max_length})",
        f"system prompt trained: {prompt.describe()}",
    ]
    lines += [f"warning: {w}" for w in warnings]
    lines += personal
    lines += [f"truncated: {s}" for s in features.truncated] + [f"dropped: {s}" for s in features.dropped]
    if features.items:
        item = features.items[min(config.example, len(features.items) - 1)]
        lines += [f"example {item['source']} (trained tokens in [[ ]]):", mark_trained(tokenizer, item)]
    return lines


def diagnose(config: CheckConfig, tokenizer=None) -> tuple[bool, list[str]]:
    """(trainable, the doctor's report lines) for `config.data`; problems are lines starting with "error: "."""
    found = examine(config, tokenizer)
    return found.ok, found.lines


def examine(config: CheckConfig, tokenizer=None) -> Diagnosis:
    """The doctor's full verdict on `config.data`."""
    if config.kind == "preference" or (config.kind == "auto" and holds_preferences(config.data)):
        return examine_preferences(config, tokenizer)
    try:
        check_region(config.phone_region)
        loaded = load_examples(config.data)
        found = personal_data(loaded.examples, config.phone_region)
        tokenizer = tokenizer or load_tokenizer(config.base_model)
        system = read_system_prompt(config.system_prompt)
        prompt = trained_prompt_of(tokenizer, loaded.examples, system)
        features = encode_examples(tokenizer, with_system_prompt(loaded.examples, system), config.max_length)
    except (DataError, RegionError, TemplateError, OSError, UnicodeError) as error:
        return Diagnosis(False, [f"error: {error}"], UNCHECKED)
    lines = report(config, features, loaded.formats, loaded.warnings, tokenizer, prompt, personal_data_lines(found))
    if not features.items:
        return Diagnosis(False, [*lines, "error: no example can be trained on"], found)
    return Diagnosis(True, [*lines, "ok: ready to train"], found)


def examine_preferences(config: CheckConfig, tokenizer=None) -> Diagnosis:
    """The doctor's verdict on a file of preference pairs (train.dpo's data)."""
    try:
        check_region(config.phone_region)
        loaded = load_preferences(config.data)
        found = personal_data([pair.scan_example() for pair in loaded.pairs], config.phone_region)
        tokenizer = tokenizer or load_tokenizer(config.base_model)
        system = read_system_prompt(config.system_prompt)
        prompts = [Example(pair.prompt, pair.source, pair.format) for pair in loaded.pairs]
        prompt = trained_prompt_of(tokenizer, prompts, system)
        features = encode_pairs(tokenizer, with_system_prompt_pairs(loaded.pairs, system), config.max_length)
    except (DataError, RegionError, TemplateError, OSError, UnicodeError) as error:
        return Diagnosis(False, [f"error: {error}"], UNCHECKED)
    stats = features.length_stats()
    rejected = sum(len(item["rejected_ids"]) for item in features.items)
    lines = [
        f"file: {config.data}",
        "format: " + ", ".join(f"{name} ({count} rows)" for name, count in loaded.formats.most_common())
        + " (preference pairs, for python -m train.dpo)",
        f"examples: {len(features.items)} trainable pairs, {len(features.dropped)} dropped, "
        f"{len(features.truncated)} truncated",
        f"tokens: {features.tokens} preferred + {rejected} non-preferred; preferred conversation per pair min "
        f"{stats['min']}, mean {stats['mean']}, p95 {stats['p95']}, max {stats['max']} (--max-length {config.max_length})",
        f"system prompt trained: {prompt.describe()}",
        *[f"warning: {w}" for w in loaded.warnings],
        *personal_data_lines(found),
        *[f"truncated: {s}" for s in features.truncated], *[f"dropped: {s}" for s in features.dropped],
    ]
    if features.items:
        item = features.items[min(config.example, len(features.items) - 1)]
        rejected_item = {"input_ids": item["rejected_ids"], "labels": item["rejected_labels"]}
        lines += [f"example {item['source']}, preferred (its reply in [[ ]]):", mark_trained(tokenizer, item),
                  "non-preferred:", mark_trained(tokenizer, rejected_item)]
    if not features.items:
        return Diagnosis(False, [*lines, "error: no pair can be trained on"], found)
    return Diagnosis(True, [*lines, "ok: ready to train (python -m train.dpo)"], found)


def write_eval_items(data: str, output: str) -> int:
    """Each conversation of `data` as an eval item (train.eval.split_reference's context and reference)."""
    examples = load_examples(data).examples
    with open(output, "w", encoding="utf-8") as out:
        for example in examples:
            context, reference = split_reference(example)
            out.write(json.dumps({"messages": context, "reference": reference}, ensure_ascii=False) + "\n")
    return len(examples)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 when the file can be trained on."""
    argv = sys.argv[1:] if argv is None else argv
    config = parse_with_positional(CheckConfig, argv, "data", "python -m train.check FILE [--base-model M] [--json]")
    if config.json:
        with contextlib.redirect_stdout(sys.stderr):  # libraries may print; stdout carries only the object
            found = examine(config)
        print(json.dumps({"ok": found.ok, "lines": found.lines, "personal_data": found.personal_data},
                         ensure_ascii=False))
        if found.ok and config.eval_items:
            write_eval_items(config.data, config.eval_items)
        return 0 if found.ok else 1
    ok, lines = diagnose(config)
    for line in lines:  # the report on stdout, its problems on stderr
        print(line, file=sys.stderr if line.startswith("error: ") else sys.stdout)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
