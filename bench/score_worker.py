"""`python -m bench.score_worker`: score one adapter (or the base) with train.eval.score for bench.quality;
prints one JSON line.

A process per model: each loaded ChatModel keeps its generation engine thread (and that thread's
OpenMP team) until exit, and more teams than cores slow every later model's decoding.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field

from bench.common import parse_config, peak_rss_mb


@dataclass
class ScoreConfig:
    """One scoring run: greedy replies to the validation prompts, reference perplexity, ROUGE-L, BLEU."""

    valid_file: str = field(metadata={"help": "Held-out rows, any train.sft format."})
    adapter: str | None = field(default=None, metadata={"help": "Adapter folder; none: the base model."})
    max_new_tokens: int = field(default=64, metadata={"help": "Length cap of each greedy reply."})
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "Serve with this system prompt (TEXT or @FILE) instead of the adapter's trained one."},
    )
    seed: int = field(default=0, metadata={"help": "torch seed (greedy decoding does not depend on it)."})


def main(argv: list[str] | None = None) -> None:
    """Load, score, print {'perplexity', 'rouge_l', 'bleu', 'rows', 'score_seconds', ...} as JSON."""
    import torch

    from assistant.adapters import TrainedPrompt
    from assistant.loading import load_chat_model
    from train.eval import score
    from train.features import read_system_prompt
    from train.records import load_examples

    logging.basicConfig(level=logging.WARNING)
    config = parse_config(ScoreConfig, argv)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    # Libraries print to stdout; stdout carries only the JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        rows = load_examples(config.valid_file).examples
        chat = load_chat_model(adapter=config.adapter, precision="fp32")
        system = None
        if config.system_prompt is not None:
            system = TrainedPrompt(read_system_prompt(config.system_prompt), "--system-prompt")
        result = score(chat, rows, max_new_tokens=config.max_new_tokens, system=system)
    result["model"] = chat.describe()
    result["score_seconds"] = round(time.perf_counter() - started, 1)
    result["worker_peak_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(result, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
