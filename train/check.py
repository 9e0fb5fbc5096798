"""`python -m train.check FILE`: the dataset doctor. Exit 0 when the file can be trained on, 1 otherwise.

With --json the report is one JSON object on stdout, {"ok": bool, "lines": [the report's lines]}: what the
app (serve.doctor) reads.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field

from assistant.adapters import TrainedPrompt
from assistant.chat_format import IGNORE_INDEX, TemplateError
from assistant.embedded import EMBEDDED
from assistant.models import load_tokenizer
from train.cli import parse_with_positional
from train.features import (
    Features,
    encode_examples,
    read_system_prompt,
    trained_prompt_of,
    with_system_prompt,
)
from train.records import DataError, load_examples


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
    json: bool = field(
        default=False,
        metadata={"help": 'Print the report as one JSON object on stdout: {"ok": bool, "lines": [report lines]} '
                          "(problems are lines starting \"error: \"); the exit code is the same."},
    )


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
    config: CheckConfig, features: Features, formats, warnings: list[str], tokenizer, prompt: TrainedPrompt
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
    lines += [f"truncated: {s}" for s in features.truncated] + [f"dropped: {s}" for s in features.dropped]
    if features.items:
        item = features.items[min(config.example, len(features.items) - 1)]
        lines += [f"example {item['source']} (trained tokens in [[ ]]):", mark_trained(tokenizer, item)]
    return lines


def diagnose(config: CheckConfig, tokenizer=None) -> tuple[bool, list[str]]:
    """(trainable, the doctor's report lines) for `config.data`; problems are lines starting with "error: "."""
    try:
        loaded = load_examples(config.data)
        tokenizer = tokenizer or load_tokenizer(config.base_model)
        system = read_system_prompt(config.system_prompt)
        prompt = trained_prompt_of(tokenizer, loaded.examples, system)
        features = encode_examples(tokenizer, with_system_prompt(loaded.examples, system), config.max_length)
    except (DataError, TemplateError, OSError, UnicodeError) as error:
        return False, [f"error: {error}"]
    lines = report(config, features, loaded.formats, loaded.warnings, tokenizer, prompt)
    if not features.items:
        return False, [*lines, "error: no example can be trained on"]
    return True, [*lines, "ok: ready to train"]


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 when the file can be trained on."""
    argv = sys.argv[1:] if argv is None else argv
    config = parse_with_positional(CheckConfig, argv, "data", "python -m train.check FILE [--base-model M] [--json]")
    if config.json:
        with contextlib.redirect_stdout(sys.stderr):  # libraries may print; stdout carries only the object
            ok, lines = diagnose(config)
        print(json.dumps({"ok": ok, "lines": lines}, ensure_ascii=False))
        return 0 if ok else 1
    ok, lines = diagnose(config)
    for line in lines:  # the report on stdout, its problems on stderr
        print(line, file=sys.stderr if line.startswith("error: ") else sys.stdout)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
