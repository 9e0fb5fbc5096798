"""`python -m train.eval DATA [--adapter DIR] [--compare [--against DIR]]`: held-out perplexity, ROUGE-L and BLEU,
base vs adapter; with --compare, row by row: wins, ties, losses and the mean difference with its interval."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from assistant.adapters import TrainedPrompt, messages_for
from assistant.batching import MAX_BATCH
from assistant.generation import GenerationParams, complete_reply
from assistant.likelihood import reply_nll
from assistant.loading import ChatModel, load_chat_model
from assistant.logs import configure
from assistant.scoring import compare, rouge_l
from train.cli import parse_with_positional
from train.features import read_system_prompt
from train.records import Example, load_examples

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
    compare: bool = field(
        default=False,
        metadata={"help": "Pair the adapter's replies with the base model's (or --against's) row by row: wins, ties "
                          "and losses on ROUGE-L, the mean difference with a bootstrap 95% interval, and the rows "
                          "that got worse."},
    )
    against: str | None = field(
        default=None,
        metadata={"help": "With --compare: the adapter folder to compare against (e.g. the one in use) instead of "
                          "the base model; it must share the adapter's base."},
    )
    output: str = field(default="eval_results.json", metadata={"help": "Where to write the JSON results."})


def split_reference(example: Example) -> tuple[list[dict], str]:
    """The conversation before its last assistant turn, and that turn's text as the reference."""
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    return example.messages[:last], example.messages[last]["content"]


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


def row_nll(chat: ChatModel, example: Example, max_length: int, use_adapter: bool = True) -> tuple[float, int]:
    """Summed loss and token count over the assistant turns of one example (teacher forcing)."""
    return reply_nll(chat, example.messages, max_length=max_length, use_adapter=use_adapter)


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
        loss, count = row_nll(chat, example, max_length, use_adapter)
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
        if name == "comparison":
            continue
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
    if config.compare and not config.adapter:
        raise SystemExit("--compare needs --adapter DIR: the model to compare with the base (or --against)")
    if config.against:
        other = load_chat_model(config.base_model, adapter=config.against, precision=config.precision)
        results = {"against": score(other, rows, desc="against", **kwargs)}
    else:
        results = {"base": score(chat, rows, use_adapter=False, desc="base", **kwargs)}
    if config.adapter:
        results["adapter"] = score(chat, rows, desc="adapter", **kwargs)
    if config.compare:
        results["comparison"] = comparison(results["against" if config.against else "base"], results["adapter"],
                                           "against" if config.against else "base")
    return results


def comparison(a: dict, b: dict, name_a: str = "base", name_b: str = "adapter") -> dict:
    """B against A on the same rows (assistant.scoring.compare on ROUGE-L), the worse rows with their replies."""
    result = compare([r["rouge_l"] for r in a["rows"]], [r["rouge_l"] for r in b["rows"]])
    out = result.to_dict()
    out["worse"] = [{**w, "prompt": a["rows"][w["index"]]["prompt"], "reference": a["rows"][w["index"]]["reference"],
                     f"reply_{name_a}": a["rows"][w["index"]]["reply"], f"reply_{name_b}": b["rows"][w["index"]]["reply"]}
                    for w in result.worse]
    return {"metric": "rouge_l", "a": name_a, "b": name_b, "description": result.describe(name_a, name_b, "ROUGE-L"),
            **out}


def main(argv: list[str] | None = None) -> int:
    """Entry point: table to the terminal, JSON to --output."""
    configure(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    config = parse_with_positional(EvalConfig, argv, "data",
                                   "python -m train.eval DATA [--adapter DIR] [--compare [--against DIR]]")
    results = evaluate(config)
    Path(config.output).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(table(results))
    if "comparison" in results:
        print(results["comparison"]["description"])
    print(f"results written to {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
