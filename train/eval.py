"""`python -m train.eval DATA [--adapter DIR]`: held-out perplexity, ROUGE-L and BLEU, base vs adapter."""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from assistant.adapters import TrainedPrompt, messages_for
from assistant.batching import MAX_BATCH
from assistant.chat_format import encode_chat
from assistant.generation import GenerationParams, complete_reply
from assistant.loading import ChatModel, load_chat_model
from assistant.logs import configure
from train.cli import parse_with_positional
from train.features import read_system_prompt
from train.records import Example, load_examples
from train.trainer import masked_nll

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Options of `python -m train.eval`."""

    data: str | None = field(
        default=None, metadata={"help": "Held-out dialogues (positional), any train.sft format."}
    )
    adapter: str | None = field(
        default=None, metadata={"help": "Adapter folder; the base model is scored beside it."}
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Base model; default: the adapter's, else embedded."}
    )
    max_rows: int = field(default=50, metadata={"help": "Score at most this many rows (0 = all)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Length cap of each greedy reply."})
    max_length: int = field(default=1024, metadata={"help": "Token cap per example for perplexity."})
    precision: str = field(
        default="fp32", metadata={"help": "Weights' precision: fp32 (exact perplexity), bf16, auto."}
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "Serve rows without a system message with this prompt (TEXT or @FILE) instead of "
                          "the one the adapter was trained with."},
    )
    output: str = field(default="eval_results.json", metadata={"help": "Where to write the JSON results."})


def split_reference(example: Example) -> tuple[list[dict], str]:
    """The conversation before its last assistant turn, and that turn's text as the reference."""
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    return example.messages[:last], example.messages[last]["content"]


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imported on first use: it is slow to import

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, reply: str) -> float:
    """ROUGE-L F1 of `reply` against `reference` (stemmed): the reply score of train.eval and train.sampling."""
    return _rouge_scorer().score(reference, reply)["rougeL"].fmeasure


def replies(
    chat: ChatModel,
    contexts: Sequence[list[dict]],
    params: GenerationParams,
    *,
    use_adapter: bool = True,
    desc: str = "replies",
) -> list[str]:
    """The replies to `contexts` as the app serves them (complete_reply: the prompt rule, the batch engine).

    They are requested together, so the engine decodes them in batches as the app would.
    """

    def answer(context: list[dict]) -> str:
        return complete_reply(chat, context, params, use_adapter=use_adapter)

    with ThreadPoolExecutor(MAX_BATCH) as pool:
        return list(tqdm(pool.map(answer, contexts), total=len(contexts), desc=desc, unit="row"))


@torch.inference_mode()
def row_nll(chat: ChatModel, example: Example, max_length: int) -> tuple[float, int]:
    """Summed loss and token count over the assistant turns of one example (teacher forcing)."""
    encoded = encode_chat(chat.tokenizer, example.messages, max_length=max_length)
    device = next(chat.model.parameters()).device
    batch = {
        "input_ids": torch.tensor([encoded.input_ids], device=device),
        "labels": torch.tensor([encoded.labels], device=device),
    }
    total, count, _ = masked_nll(chat.model, batch)
    return float(total), int(count)


def score(
    chat: ChatModel,
    rows: list[Example],
    *,
    use_adapter: bool = True,
    max_new_tokens: int = 64,
    max_length: int = 1024,
    desc: str = "eval",
    system: TrainedPrompt | None = None,
) -> dict:
    """Perplexity over assistant tokens, ROUGE-L F1 and corpus BLEU of greedy replies, per-row replies.

    Rows are served as the app serves them: a row without a system message gets `system`, by default
    the adapter's trained system prompt (the base model, adapter off, gets the same conversation).
    """
    system = system or chat.trained_prompt

    import sacrebleu

    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    text = system.text if system else None
    examples = [replace(e, messages=messages_for(e.messages, text)) for e in rows]
    nll, tokens = 0.0, 0
    for example in tqdm(examples, desc=f"{desc}, perplexity", unit="row"):
        # The model's lock: the generation engine may be inside disable_adapter() on its own thread.
        with chat.lock, chat.model.disable_adapter() if chat.adapter and not use_adapter else nullcontext():
            loss, count = row_nll(chat, example, max_length)
        nll, tokens = nll + loss, tokens + count

    contexts = [split_reference(example)[0] for example in examples]
    answers = replies(chat, contexts, params, use_adapter=use_adapter, desc=f"{desc}, replies")
    results = []
    for example, reply in zip(examples, answers, strict=True):
        context, reference = split_reference(example)
        prompt = next((m["content"] for m in reversed(context) if m["role"] == "user"), "")  # what was asked
        results.append({"source": example.source, "prompt": prompt, "reference": reference, "reply": reply,
                        "rouge_l": round(rouge_l(reference, reply), 4)})
    bleu = sacrebleu.corpus_bleu([r["reply"] for r in results], [[r["reference"] for r in results]]).score
    return {
        "perplexity": round(math.exp(nll / max(tokens, 1)), 3),
        "rouge_l": round(sum(r["rouge_l"] for r in results) / max(len(results), 1), 4),
        "bleu": round(bleu, 2),
        "rows": results,
    }


def table(results: dict[str, dict]) -> str:
    """A readable table: one line per model."""
    lines = [f"{'model':<10} {'perplexity':>11} {'ROUGE-L':>8} {'BLEU':>7}"]
    for name, r in results.items():
        lines.append(f"{name:<10} {r['perplexity']:>11.3f} {r['rouge_l']:>8.4f} {r['bleu']:>7.2f}")
    return "\n".join(lines)


def evaluate(config: EvalConfig) -> dict[str, dict]:
    """Score the base model, and the adapter when one is given, on the same rows."""
    rows = load_examples(config.data).examples
    rows = rows[: config.max_rows] if config.max_rows else rows
    chat = load_chat_model(config.base_model, adapter=config.adapter, precision=config.precision)
    kwargs = {"max_new_tokens": config.max_new_tokens, "max_length": config.max_length}
    if config.system_prompt is not None:
        kwargs["system"] = TrainedPrompt(read_system_prompt(config.system_prompt), "--system-prompt")
    results = {"base": score(chat, rows, use_adapter=False, desc="base", **kwargs)}
    if config.adapter:
        results["adapter"] = score(chat, rows, desc="adapter", **kwargs)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point: table to the terminal, JSON to --output."""
    configure(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    config = parse_with_positional(EvalConfig, argv, "data", "python -m train.eval DATA [--adapter DIR]")
    results = evaluate(config)
    Path(config.output).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(table(results))
    print(f"results written to {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
