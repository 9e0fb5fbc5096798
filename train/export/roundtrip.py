"""The llama.cpp round trip of an export: its greedy replies against this runtime's, token by token.

Two comparisons per chat. Free-running: both sides answer greedily and the first divergence is
reported (position, both tokens). Teacher-forced: llama.cpp reads our reply and says what it would pick
at every position, so one early difference cannot hide (or cause) everything after it.

llama.cpp multiplies Q4_1 weights with 8-bit-quantized activations, so its logits sit a little off ours
(measured on the embedded model: at most 0.49 logits for the default trained adapter, 0.62 for a random
strong one, 1.28 for an extreme one whose B ~ N(0, 0.5) doubles activations: `--tie-logits` loosens the check).
That flips coin-tosses, so a difference is a near tie, not an error, when the two engines' preferences
add up to less than TIE_SWING logits; and every logit we compare must be within MAX_DRIFT. A wrong tensor
layout, a missing adapter, another template or stop token moves logits by whole units (a q/k row-order
bug: 4.9 logits) and fails.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from assistant.adapters import messages_for
from assistant.batching import stop_ids
from assistant.chat_format import encode_prompt, render_chat
from assistant.generation import GenerationParams, reply_tokens
from assistant.loading import ChatModel, load_chat_model
from train.export.gguf_lora import ExportError

logger = logging.getLogger(__name__)

TIE_SWING = 1.0  # our preference + llama.cpp's for the other token below this: numerical noise
MAX_DRIFT = 1.5  # the most llama.cpp's logit for our token may differ from ours
VERIFY_QUESTIONS = (  # support-style chats; what is compared is the runtime, so any text will do
    [{"role": "user", "content": "Hi, I need to change my booking for Friday."}],
    [{"role": "user", "content": "What will the weather be like in Los Angeles tomorrow?"}],
    [{"role": "user", "content": "Can you help me find an apartment with two bedrooms?"}],
    [
        {"role": "user", "content": "I'd like to order a pizza."},
        {"role": "assistant", "content": "Sure! What size would you like?"},
        {"role": "user", "content": "A large one with mushrooms, please."},
    ],
)


def round_trip(
    adapter: str | Path,
    base_gguf: Path,
    lora_gguf: Path,
    python: str,
    chats: list[list[dict[str, str]]],
    *,
    max_new_tokens: int = 64,
    must_match: int = 16,
    threads: int = 2,
    tie_logits: float = TIE_SWING,
    base_model: str | None = None,
) -> dict:
    """Compare llama.cpp on (base_gguf + lora_gguf) with this runtime on `adapter` (on `base_model`, default
    its own base); ExportError on a mismatch."""
    # Imported here: `python -m train.export.llamacpp` must not find its module loaded by this package.
    from train.export.llamacpp import run_worker

    started = time.monotonic()
    # fp32 on the embedded model computes with exactly the GGUF's (de-quantized) weights.
    chat = load_chat_model(base_model, adapter=adapter, precision="fp32")
    greedy = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    prompts, logits = [], []
    for messages in chats:
        messages = messages_for(messages, chat.trained_prompt)  # the one prompt rule, as the Modelfile's SYSTEM
        ids = encode_prompt(chat.tokenizer, messages)
        ours = list(reply_tokens(chat, ids, greedy))
        logits.append(_our_logits(chat, ids, ours))
        if len(ours) < max_new_tokens:  # it stopped: the end-of-turn token it stopped at is compared too
            ours.append(int(logits[-1][len(ours)].argmax()))
        prompts.append({"text": render_chat(chat.tokenizer, messages, add_generation_prompt=True), "ids": ids,
                        "ours": ours})
    job = {"base": str(base_gguf), "lora": str(lora_gguf), "prompts": prompts,
           "max_new_tokens": max_new_tokens, "threads": threads}
    theirs = run_worker(python, job)
    plain = run_worker(python, {**job, "lora": None, "prompts": [{**p, "ours": None} for p in prompts]})
    stops = stop_ids(chat.model, chat.tokenizer)
    rows = [
        compare(chat.tokenizer, p, row_logits, their, base, stops=stops, tie_logits=tie_logits)
        for p, row_logits, their, base in zip(prompts, logits, theirs["results"], plain["results"], strict=True)
    ]
    result = {
        "llama_cpp": theirs["version"],
        "chats": len(rows),
        "tokens_compared": sum(r["compared"] for r in rows),
        "tokens_matched": sum(r["matched"] for r in rows),
        "forced_positions": sum(r["forced_positions"] for r in rows),
        "forced_agree": sum(r["forced_agree"] for r in rows),
        "near_ties": sum(len(r["near_ties"]) for r in rows),
        "tie_logits": tie_logits,
        "max_logit_drift": max(r["max_logit_drift"] for r in rows),
        "adapter_changes_replies": sum(r["adapter_changed_reply"] for r in rows),
        "seconds": round(time.monotonic() - started, 1),
        "rows": rows,
    }
    problems = [p for n, row in enumerate(rows, 1) for p in problems_of(n, row, must_match)]
    if not result["adapter_changes_replies"]:
        problems.append("llama.cpp gives the same replies with and without the LoRA file: the adapter did not apply")
    if problems:
        raise ExportError("llama.cpp does not reply as this app does:\n- " + "\n- ".join(problems))
    return result


def _our_logits(chat: ChatModel, ids: list[int], reply: list[int]) -> torch.Tensor:
    """Our logits after the prompt and after each prefix of `reply` (teacher forcing, like llama.cpp's side)."""
    with chat.lock, torch.inference_mode():  # the host's model is the engine's too: take turns
        out = chat.model(input_ids=torch.tensor([ids + reply])).logits[0, len(ids) - 1 :]
    return out.float()


def compare(tokenizer, prompt: dict, ours_logits: torch.Tensor, theirs: dict, plain: dict, *,
            stops: frozenset[int], tie_logits: float = TIE_SWING) -> dict:
    """One chat: tokenization, first free-running divergence, teacher-forced agreement and the stop.

    `prompt["ours"]` is our reply with the end-of-turn token it stopped at (absent when it ran out of budget).
    """
    ours, reply, stop = prompt["ours"], theirs["reply"], theirs["stop_token"]
    theirs_full = [*reply, *([stop] if stop is not None else [])]
    same = lambda a, b: a == b or (a in stops and b in stops)  # noqa: E731 - any end-of-turn token ends it
    matched = next((i for i, (a, b) in enumerate(zip(ours, theirs_full, strict=False)) if not same(a, b)),
                   min(len(ours), len(theirs_full)))
    disagree, ties, drift = [], [], 0.0
    for step, (row, want) in enumerate(zip(theirs["forced"], ours, strict=True)):
        drift = max(drift, abs(row["ours_logit"] - float(ours_logits[step, want])))
        if same(row["choice"], want):
            continue
        entry = _gap(tokenizer, ours_logits[step], want, row["choice"], row["choice_logit"] - row["ours_logit"], step,
                     tie_logits)
        (ties if entry["near_tie"] else disagree).append(entry)
    row = {
        "prompt_tokens": len(prompt["ids"]),
        "tokenization_matches": theirs["tokenized"] == prompt["ids"],
        "compared": max(len(ours), len(theirs_full)),
        "matched": matched,
        "forced_positions": len(ours),
        "forced_agree": len(ours) - len(disagree) - len(ties),
        "near_ties": ties,
        "disagreements": disagree,
        "max_logit_drift": round(drift, 4),
        "ours_stopped": bool(ours) and ours[-1] in stops,
        "llama_cpp_stop_token": None if stop is None else tokenizer.decode([stop]),
        # An end-of-turn token inside llama.cpp's reply: it wrote it and went on (the GGUF does not mark it EOG).
        "llama_cpp_ran_past": [tokenizer.decode([t]) for t in reply if t in stops],
        "adapter_changed_reply": plain["reply"] != reply,
        "reply": tokenizer.decode(ours, skip_special_tokens=True),
    }
    if matched < row["compared"]:
        step, mine = matched, ours[matched] if matched < len(ours) else None
        there = theirs_full[matched] if matched < len(theirs_full) else None
        near = mine is not None and there is not None and step < len(theirs["steps"]) and _gap(
            tokenizer, ours_logits[step], mine, there,
            theirs["steps"][step]["choice_logit"] - theirs["steps"][step]["ours_logit"], step, tie_logits)["near_tie"]
        row["divergence"] = {"position": step, "ours": _token(tokenizer, mine), "llama_cpp": _token(tokenizer, there),
                             "near_tie": near}
    return row


def _gap(tokenizer, logits: torch.Tensor, want: int, pick: int, theirs_gap: float, step: int,
         tie_logits: float) -> dict:
    """A difference at `step`: how much each engine prefers its own token, and whether that is a near tie."""
    ours_gap = float(logits[want] - logits[pick])
    return {"position": step, "ours": _token(tokenizer, want), "llama_cpp": _token(tokenizer, pick),
            "ours_gap": round(ours_gap, 4), "llama_cpp_gap": round(theirs_gap, 4),
            "near_tie": ours_gap + theirs_gap < tie_logits}


def problems_of(n: int, row: dict, must_match: int) -> list[str]:
    """What is wrong with chat `n`'s row (nothing when llama.cpp answers as we do)."""
    problems = []
    if not row["tokenization_matches"]:
        problems.append(f"chat {n}: llama.cpp tokenizes the rendered prompt differently from the trained tokenizer")
    if row["llama_cpp_ran_past"]:
        problems.append(f"chat {n}: llama.cpp wrote {row['llama_cpp_ran_past'][0]!r} and went on; the base GGUF does "
                        "not treat it as end of generation")
    divergence = row.get("divergence")
    if divergence and divergence["position"] < must_match and not divergence["near_tie"]:
        problems.append(
            f"chat {n}: replies differ at token {divergence['position']}: ours {divergence['ours']}, "
            f"llama.cpp {divergence['llama_cpp']}"
        )
    for wrong in row["disagreements"]:
        problems.append(
            f"chat {n}, token {wrong['position']} (teacher-forced): ours {wrong['ours']}, llama.cpp "
            f"{wrong['llama_cpp']} (preferred by {wrong['llama_cpp_gap']:.2f} logits; ours by {wrong['ours_gap']:.2f})"
        )
    if row["max_logit_drift"] > MAX_DRIFT:
        problems.append(f"chat {n}: llama.cpp's logits differ from ours by up to {row['max_logit_drift']:.2f} "
                        f"(noise stays below {MAX_DRIFT}): the exported weights do not compute what ours do")
    return problems


def _token(tokenizer, token: int | None) -> str:
    return "nothing (the reply ran out of tokens)" if token is None else f"{tokenizer.decode([token])!r} (id {token})"
