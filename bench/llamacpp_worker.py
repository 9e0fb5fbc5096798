"""Times llama.cpp decoding for bench.decode_speed; runs under the llama-cpp-python venv (train.export.llamacpp), prints one JSON line.

Standard library + llama_cpp only (that venv has no transformers), so options are parsed with argparse.
The prompt arrives as token ids rendered by the transformers tokenizer, so every engine reads the same ids.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, help="GGUF model file.")
    parser.add_argument("--prompt-ids", required=True, help="JSON file holding the prompt's token ids.")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Tokens to generate (EOS ignored).")
    parser.add_argument("--threads", type=int, default=2, help="n_threads and n_threads_batch.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed generations; the median is reported.")
    return parser.parse_args(argv)


def generate_once(llm, prompt: list[int], count: int) -> dict:
    """Greedy generation of exactly `count` tokens; times to first token and of the decode after it."""
    llm.reset()  # no KV-cache reuse between runs: every run evaluates the whole prompt
    start = time.perf_counter()
    stamps: list[float] = []
    tokens: list[int] = []
    # Llama.generate never stops on EOS by itself (create_completion does), so the length is forced.
    for token in llm.generate(
        prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
    ):
        stamps.append(time.perf_counter())
        tokens.append(token)
        if len(tokens) >= count:
            break
    decode_s = stamps[-1] - stamps[0]
    return {
        "ttft_s": stamps[0] - start,
        "decode_tok_s": (count - 1) / decode_s if decode_s > 0 else None,
        "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    """Load the GGUF, warm up, time `repeats` runs, print the medians as JSON."""
    args = parse_args(argv)
    import llama_cpp

    with open(args.prompt_ids) as handle:
        prompt = json.load(handle)
    loaded = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=args.gguf,
        n_ctx=max(512, len(prompt) + args.max_new_tokens + 8),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=512,
        verbose=False,
        seed=0,
    )
    load_s = time.perf_counter() - loaded
    generate_once(llm, prompt, min(8, args.max_new_tokens))  # warm-up
    runs = [generate_once(llm, prompt, args.max_new_tokens) for _ in range(args.repeats)]
    last = runs[-1]["tokens"]
    print(
        json.dumps(
            {
                "version": llama_cpp.__version__,
                "load_s": round(load_s, 3),
                "ttft_s": statistics.median(r["ttft_s"] for r in runs),
                "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
                "token_ids": last,
                "text": llm.detokenize(last).decode("utf-8", errors="replace"),
                "n_threads": args.threads,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
