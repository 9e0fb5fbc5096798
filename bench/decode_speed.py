"""`python -m bench.decode_speed`: time to first token and decode tokens/s, ours vs plain transformers vs llama.cpp.

All three decode the same prompt ids (the tokenizer's chat template), greedily, for exactly N new
tokens (EOS suppressed), on the same number of threads. The memory-bandwidth bound is what our
weights allow: measured copy bandwidth / bytes of weights read per decode step.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    RESULTS,
    ROOT,
    bar_chart,
    cpu_name,
    last_json_line,
    log,
    machine_load,
    median,
    parse_config,
    print_final,
    ratio,
    run_measured,
    table,
    write_results,
)

NAME = "decode_speed"
PROMPT = "Write a short story about a robot who learns to paint, in about two hundred words."


@dataclass
class DecodeSpeedConfig:
    """Options of `python -m bench.decode_speed`."""

    max_new_tokens: int = field(default=128, metadata={"help": "Tokens each engine generates (EOS ignored)."})
    repeats: int = field(default=3, metadata={"help": "Timed generations per engine; medians are reported."})
    threads: int = field(default=2, metadata={"help": "CPU threads for torch and llama.cpp."})
    prompt: str = field(
        default=PROMPT, metadata={"help": "The user message (rendered with the chat template)."}
    )
    skip_llamacpp: bool = field(default=False, metadata={"help": "Do not time llama.cpp."})
    build_llamacpp: bool = field(
        default=True,
        metadata={
            "help": "Build llama-cpp-python from source (train.export.llamacpp: the same build train.export --verify "
            "uses) when it is missing (minutes)."
        },
    )
    build_timeout: float = field(default=3600.0, metadata={"help": "Seconds the llama.cpp build may take."})
    bandwidth_mb: int = field(
        default=512, metadata={"help": "Size of the tensor copied to measure bandwidth."}
    )
    quick: bool = field(
        default=False,
        metadata={
            "help": "CI smoke run: 16 tokens, 1 repeat, never builds llama.cpp (used if already built)."
        },
    )
    output: str = field(
        default=str(RESULTS / f"{NAME}.json"), metadata={"help": "Where to write the JSON results."}
    )

    def apply_quick(self) -> None:
        """Shrink everything for --quick."""
        if self.quick:
            self.max_new_tokens, self.repeats, self.build_llamacpp, self.bandwidth_mb = 16, 1, False, 128


def messages(config: DecodeSpeedConfig) -> list[dict[str, str]]:
    """The one chat every engine answers."""
    return [{"role": "user", "content": config.prompt}]


def forced_params(max_new_tokens: int):
    """GenerationParams for greedy decoding of exactly `max_new_tokens` tokens, as the app's stream_reply takes."""
    from assistant.generation import GenerationParams

    return GenerationParams(
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0
    )


def time_stream(pieces, tokenizer, total: int, start: float) -> dict:
    """Consume a stream of growing (or incremental) texts; TTFT and decode rate after the first chunk.

    Streamers emit text at word boundaries, so the tokens already in the first chunk are counted
    by re-tokenizing it and left out of the decode rate.
    """
    first_t, first_text, text, last_t = None, "", "", start
    for text in pieces:
        now = time.perf_counter()
        if first_t is None and text:
            first_t, first_text = now, text
        last_t = now
    if first_t is None:
        raise RuntimeError("the model produced no text")
    in_first = len(tokenizer(first_text, add_special_tokens=False)["input_ids"])
    decode_s = last_t - first_t
    return {
        "ttft_s": first_t - start,
        "decode_tok_s": (total - in_first) / decode_s if decode_s > 0 else None,
        "tokens_in_first_chunk": in_first,
        "text": text,
    }


def bench_ours(config: DecodeSpeedConfig) -> tuple[dict, dict]:
    """The app's path: load_chat_model() (default precision) + stream_reply, with its decode loop (the fast
    one, assistant/decode.py, where the model allows it) and with transformers' generate() as the loop.

    Both on the one loaded model, runs alternating, so a noisy neighbour slows both alike (a second loaded
    model would also start a second engine thread, whose OpenMP team halves the speed on 2 cores)."""
    from assistant.decode import GENERATE, Decoding
    from assistant.generation import stream_reply
    from assistant.loading import load_chat_model

    chat = load_chat_model()
    loops = {"fast": chat.host.decoding, "generate": Decoding(GENERATE, "bench.decode_speed's reference run")}
    msgs = messages(config)
    runs: dict[str, list] = {name: [] for name in loops}
    for _ in range(config.repeats):
        for name, decoding in loops.items():
            chat.host.decoding = decoding
            for _ in stream_reply(chat, msgs, forced_params(8)):  # warm-up (and the loop's first batch)
                pass
            start = time.perf_counter()
            runs[name].append(time_stream(stream_reply(chat, msgs, forced_params(config.max_new_tokens)),
                                          chat.tokenizer, config.max_new_tokens, start))
    chat.host.decoding = loops["fast"]
    common = {"precision": chat.precision.name, "weight_bytes": weight_bytes(chat.model)}
    return (summarize(runs["fast"], decoding=loops["fast"].engine, **common),
            summarize(runs["generate"], decoding=GENERATE, **common))


def bench_plain(config: DecodeSpeedConfig, prompt_ids: list[int]) -> dict:
    """What a transformers user writes: fp32 model, generate() in a thread, TextIteratorStreamer."""
    import torch
    from transformers import AutoModelForCausalLM, TextIteratorStreamer

    from assistant.embedded import embedded_model_dir
    from assistant.models import load_tokenizer

    folder = str(embedded_model_dir())
    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = torch.tensor([prompt_ids])

    def once(count: int) -> dict:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            streamer=streamer,
            max_new_tokens=count,
            min_new_tokens=count,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        start = time.perf_counter()
        thread = threading.Thread(target=model.generate, kwargs=kwargs, daemon=True)
        thread.start()
        pieces = _accumulate(streamer)
        result = time_stream(pieces, tokenizer, count, start)
        thread.join()
        return result

    once(8)  # warm-up
    runs = [once(config.max_new_tokens) for _ in range(config.repeats)]
    return summarize(runs, precision="fp32", weight_bytes=weight_bytes(model))


def _accumulate(streamer):
    """Incremental streamer pieces -> growing text (what stream_reply yields)."""
    text = ""
    for piece in streamer:
        if piece:
            text += piece
            yield text


def summarize(runs: list[dict], **extra) -> dict:
    """Medians over the timed runs, plus the last reply's start."""
    return {
        "ttft_s": round(median([r["ttft_s"] for r in runs]), 4),
        "decode_tok_s": round(median([r["decode_tok_s"] for r in runs]), 2),
        "runs": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "text"}
            for r in runs
        ],
        "reply_start": runs[-1]["text"][:80],
        **extra,
    }


def weight_bytes(model) -> int:
    """Bytes of weights read per decode step: every parameter and buffer once (shared ones once).

    The input embedding is a lookup of one row, so it counts only when it is also the LM head.
    Quantized layers decode from their packed buffers; their dense weight serves longer inputs only. Sibling
    layers packed as one (assistant.quant.Int4Slice) read their shared layer's packed buffers, once.
    """
    from assistant.quant import Int4Slice, QuantizedLinear

    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = not isinstance(head, QuantizedLinear) and head.weight.data_ptr() == embedding.data_ptr()
    skip = {embedding.data_ptr()} if not tied else set()
    skip |= {m.weight.data_ptr() for m in model.modules() if isinstance(m, (QuantizedLinear, Int4Slice))}
    shared = {id(m.fused): m.fused for m in model.modules() if isinstance(m, Int4Slice)}.values()
    seen, total = skip, 0
    for tensor in itertools.chain(model.parameters(), model.buffers(), *(layer.buffers() for layer in shared)):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def copy_bandwidth_gbs(megabytes: int, repeats: int = 5) -> float:
    """Memory bandwidth of a large fp32 tensor copy (read + write bytes / s, best of `repeats`), GB/s."""
    import torch

    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def ensure_llamacpp(config: DecodeSpeedConfig) -> tuple[str | None, str | None]:
    """(interpreter that imports llama_cpp, None), building it if allowed; else (None, why not)."""
    from train.export.llamacpp import LlamaCppUnavailable, ensure_python, find_python, venv_dir

    found = find_python()
    if found or not config.build_llamacpp:
        why = f"{venv_dir()} has no llama_cpp built this way; build it: python -m train.export.llamacpp --build"
        return found, None if found else why
    log(f"building llama-cpp-python into {venv_dir()} (compiles from source, minutes)")
    try:
        return ensure_python(config.build_timeout), None
    except LlamaCppUnavailable as error:
        return None, str(error)


def bench_llamacpp(config: DecodeSpeedConfig, prompt_ids: list[int]) -> dict:
    """llama.cpp on the same GGUF file, in a subprocess under the benchmark venv; 'error' set when unavailable."""
    from assistant.embedded import gguf_path

    if config.skip_llamacpp:
        return {"error": "skipped (--skip-llamacpp)"}
    python, reason = ensure_llamacpp(config)
    if reason:
        return {"error": reason}
    gguf = gguf_path()
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        ids_file = Path(tmp) / "prompt_ids.json"
        ids_file.write_text(json.dumps(prompt_ids))
        run = run_measured(
            [
                python,
                ROOT / "bench" / "llamacpp_worker.py",
                "--gguf",
                gguf,
                "--prompt-ids",
                ids_file,
                "--max-new-tokens",
                str(config.max_new_tokens),
                "--threads",
                str(config.threads),
                "--repeats",
                str(config.repeats),
            ],
            timeout=600,
        )
    if run.returncode != 0:
        return {"error": f"llama.cpp worker failed (exit {run.returncode}): {run.tail(5)}"}
    result = last_json_line(run.stdout)
    result["reply_start"] = result.pop("text")[:80]
    result["weight_bytes"] = gguf.stat().st_size
    result["precision"] = gguf.name.split(".")[-2]
    result["peak_mb"] = round(run.peak_mb, 1)
    return result


def render(engines: dict[str, dict]) -> str:
    """The readable table."""
    rows = [
        [
            name,
            r.get("precision"),
            r.get("ttft_s"),
            r.get("decode_tok_s"),
            None if not r.get("weight_bytes") else round(r["weight_bytes"] / 1e6, 1),
            r.get("error", ""),
        ]
        for name, r in engines.items()
    ]
    return table(["engine", "weights", "TTFT s", "decode tok/s", "weight MB", "note"], rows)


def main(argv: list[str] | None = None) -> int:
    """Time every engine, print the table and the FINAL JSON line."""
    logging.basicConfig(level=logging.WARNING)
    config = parse_config(DecodeSpeedConfig, argv)
    config.apply_quick()
    load = machine_load()
    import torch

    from assistant.chat_format import encode_prompt
    from assistant.models import cpu_has_bf16, load_tokenizer

    torch.set_num_threads(config.threads)
    prompt_ids = encode_prompt(load_tokenizer("embedded"), messages(config))
    log(f"prompt: {len(prompt_ids)} tokens; {config.max_new_tokens} new tokens; {config.threads} threads")
    engines: dict[str, dict] = {}
    # llama.cpp first: its build (if needed) must not overlap the torch timings.
    llama = bench_llamacpp(config, prompt_ids)
    log("timing ours (load_chat_model + stream_reply), its decode loop and generate() alternating")
    engines["ours (stream_reply)"], engines["ours, generate() loop"] = bench_ours(config)
    log("timing plain transformers fp32")
    engines["plain transformers fp32"] = bench_plain(config, prompt_ids)
    engines["llama.cpp"] = llama
    bandwidth = copy_bandwidth_gbs(config.bandwidth_mb)
    ours = engines["ours (stream_reply)"]
    bound = bandwidth * 1e9 / ours["weight_bytes"]
    final = {
        "decode_tok_s_ours": ours["decode_tok_s"],
        "decode_tok_s_plain": engines["plain transformers fp32"]["decode_tok_s"],
        "decode_tok_s_ours_generate": engines["ours, generate() loop"]["decode_tok_s"],
        "ratio_fast_vs_generate_loop": ratio(ours["decode_tok_s"], engines["ours, generate() loop"]["decode_tok_s"]),
        "decoding_ours": ours["decoding"],
        "decode_tok_s_llamacpp": llama.get("decode_tok_s"),
        "ratio_vs_llamacpp": ratio(ours["decode_tok_s"], llama.get("decode_tok_s")),
        "ratio_vs_plain": ratio(ours["decode_tok_s"], engines["plain transformers fp32"]["decode_tok_s"]),
        "ttft_s_ours": ours["ttft_s"],
        "ttft_s_plain": engines["plain transformers fp32"]["ttft_s"],
        "ttft_s_llamacpp": llama.get("ttft_s"),
        "bound_tok_s": round(bound, 1),
        "bandwidth_gb_s": round(bandwidth, 2),
        "weight_mb_ours": round(ours["weight_bytes"] / 1e6, 1),
        "precision_ours": ours["precision"],
        "bound_tok_s_gguf": round(bandwidth * 1e9 / llama["weight_bytes"], 1)
        if llama.get("weight_bytes")
        else None,
        "llamacpp_error": llama.get("error"),
        "max_new_tokens": config.max_new_tokens,
        "prompt_tokens": len(prompt_ids),
        "threads": config.threads,
        "quick": config.quick,
        "cpu": cpu_name(),
        "cpu_bf16": cpu_has_bf16(),
        "load_avg_1m_start": load,
    }
    write_results(
        Path(config.output).stem,
        {"final": final, "config": vars(config), "engines": engines},
        Path(config.output).parent,
    )
    labels = ["ours", "ours, generate()", "plain fp32", "llama.cpp", "bound (ours)"]
    bar_chart(
        Path(config.output).with_suffix(".png"),
        labels,
        [final["decode_tok_s_ours"], final["decode_tok_s_ours_generate"], final["decode_tok_s_plain"],
         final["decode_tok_s_llamacpp"], bound],
        title=f"Decode speed, {config.max_new_tokens} tokens, {config.threads} threads",
        ylabel="tokens / s",
    )
    print(render(engines))
    print(
        f"copy bandwidth {bandwidth:.1f} GB/s / {ours['weight_bytes'] / 1e6:.0f} MB of {ours['precision']} "
        f"weights per token = bound {bound:.1f} tok/s; ours vs llama.cpp: {final['ratio_vs_llamacpp']}x"
    )
    print_final(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
