"""Greedy replies from llama.cpp for `train.export --verify`; runs under the llama-cpp-python venv.

Standard library + llama_cpp only (that venv has no torch or transformers). Reads one JSON job on
stdin: {"base": GGUF, "lora": GGUF or null, "prompts": [{"text": ..., "ids": [...], "ours": [...]}],
"max_new_tokens", "threads"}; prints one JSON line: per prompt, llama.cpp's own tokenization of the text,
its greedy reply to the given ids (end-of-generation token left out), the token it stopped at (null: it
never stopped) and, along `ours` (our reply and its end-of-turn token), its choice at every position with the logits
of its choice and of ours (teacher forcing: the same prefix on both sides, so no drift piles up).
"""

from __future__ import annotations

import json
import sys


def is_end(llama_cpp, llm, token: int) -> bool:
    """llama.cpp's own end-of-generation test (what makes llama-server and Ollama stop)."""
    model = llm._model
    if hasattr(llama_cpp, "llama_vocab_is_eog") and hasattr(model, "vocab"):
        return bool(llama_cpp.llama_vocab_is_eog(model.vocab, token))
    return bool(llama_cpp.llama_token_is_eog(model.model, token))


def reply(llama_cpp, llm, ids: list[int], max_new_tokens: int, ours: list[int] | None) -> dict:
    """Greedy continuation of `ids` up to its end-of-generation token (left out) or the budget.

    With `ours` (our reply), each step also gives the logits of llama.cpp's pick and of our token there:
    batch and single-token evaluation round differently, so a near tie is judged on these very logits.
    """
    tokens: list[int] = []
    stop = None
    llm.reset()
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if is_end(llama_cpp, llm, token):
            stop = token
            break
        tokens.append(token)
        if len(tokens) >= max_new_tokens:
            break
    steps = []
    for step in range(min(len(tokens) + (stop is not None), len(ours or []))):
        scores = llm.scores[len(ids) - 1 + step]  # logits_all keeps every evaluated position
        steps.append({"choice_logit": float(scores.max()), "ours_logit": float(scores[ours[step]])})
    return {"reply": tokens, "stop_token": stop, "steps": steps}


def forced(llm, ids: list[int], tokens: list[int]) -> list[dict]:
    """llama.cpp's choice at each position of `tokens` after `ids` + the tokens before it (teacher forcing)."""
    llm.reset()
    llm.eval(ids + tokens[:-1])
    rows = []
    for step, token in enumerate(tokens):
        scores = llm.scores[len(ids) - 1 + step]
        best = int(scores.argmax())
        rows.append({"choice": best, "choice_logit": float(scores[best]), "ours_logit": float(scores[token])})
    return rows


def main() -> int:
    """Load base + LoRA, answer every prompt, print the JSON result."""
    import llama_cpp

    job = json.load(sys.stdin)
    longest = max(len(p["ids"]) for p in job["prompts"])
    llm = llama_cpp.Llama(
        model_path=job["base"],
        lora_path=job.get("lora"),
        n_ctx=max(512, longest + job["max_new_tokens"] + 8),
        n_threads=job.get("threads", 2),
        n_threads_batch=job.get("threads", 2),
        n_batch=512,
        logits_all=True,  # the teacher-forced comparison reads every position's logits
        seed=0,
        verbose=False,
    )
    results = []
    for prompt in job["prompts"]:
        own = llm.tokenize(prompt["text"].encode("utf-8"), add_bos=False, special=True)
        ours = prompt.get("ours")
        free = reply(llama_cpp, llm, prompt["ids"], job["max_new_tokens"], ours)
        along = forced(llm, prompt["ids"], ours) if ours is not None else None
        results.append({"tokenized": own, **free, "forced": along})
    print(json.dumps({"version": llama_cpp.__version__, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
