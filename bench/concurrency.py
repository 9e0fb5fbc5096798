"""`python -m bench.concurrency`: aggregate tokens/s and time to first chunk with 1, 4 and 8 simultaneous chats.

Starts the app (`python -m ui`) on a free 127.0.0.1 port, sends N chats at once through
gradio_client to its `/chat` endpoint, and stops the server at the end. Every request has a
deadline; a request past it is cancelled and counted as a failure.

`--adapters N` measures serving many adapters of one base instead: N LoRA adapters (train.sft's
default shape, random weights) in the app's adapters folder; the server's resident memory with 1
and with all N attached, and the aggregate tokens/s of 8 chats spread over 4 adapters against 8
chats on one adapter, through the OpenAI API.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    RESULTS,
    ROOT,
    bar_chart,
    cpu_name,
    free_port,
    log,
    machine_load,
    median,
    parse_config,
    percentile,
    print_final,
    ratio,
    table,
    write_results,
)

NAME = "concurrency"
MESSAGES = [
    "Tell me about the ocean.",
    "Describe a busy train station in the morning.",
    "What makes a good cup of coffee?",
    "Explain how a bicycle works.",
    "Write a few sentences about autumn in a small town.",
    "Why do people keep houseplants?",
    "Describe your ideal weekend.",
    "What is interesting about the moon?",
]


@dataclass
class ConcurrencyConfig:
    """Options of `python -m bench.concurrency`."""

    levels: list[int] = field(
        default_factory=lambda: [1, 4, 8], metadata={"help": "Numbers of simultaneous chats to measure."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "max_new_tokens of every chat request."})
    request_timeout: float = field(
        default=300.0, metadata={"help": "Seconds one request may take before it fails."}
    )
    startup_timeout: float = field(
        default=300.0, metadata={"help": "Seconds the app may take to start serving."}
    )
    url: str | None = field(
        default=None,
        metadata={"help": "Benchmark an app already running at this URL instead of starting one."},
    )
    precision: str = field(default="auto", metadata={"help": "--precision of the app it starts."})
    adapters: int = field(
        default=0,
        metadata={"help": "Measure N LoRA adapters on one base (memory with 1 and N attached, 8 chats over "
                          "4 adapters vs 1) instead of the chat levels; 0: the chat levels."},
    )
    quick: bool = field(default=False, metadata={"help": "CI smoke run: 8 new tokens per request."})
    output: str = field(
        default=str(RESULTS / f"{NAME}.json"), metadata={"help": "Where to write the JSON results."}
    )

    def apply_quick(self) -> None:
        """Shrink everything for --quick."""
        if self.quick:
            self.max_new_tokens = 8


class AppServer:
    """`python -m ui` in its own process group, on 127.0.0.1, with no adapters listed (the base model serves)."""

    def __init__(self, startup_timeout: float, precision: str = "auto", adapters: int = 0):
        self.port, self.precision, self.adapters = free_port(), precision, adapters
        self.url = f"http://127.0.0.1:{self.port}/"
        self.startup_timeout = startup_timeout
        self.folder = tempfile.TemporaryDirectory(prefix="bench-app-")
        self.log_path = Path(self.folder.name) / "server.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> AppServer:
        adapters = Path(self.folder.name) / "adapters"
        adapters.mkdir()
        if self.adapters:
            write_adapters(adapters, self.adapters)
        env = {
            **os.environ,
            "GRADIO_ANALYTICS_ENABLED": "False",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        with self.log_path.open("w") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ui",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--adapters-dir",
                    str(adapters),
                    "--precision",
                    self.precision,
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError(
            f"the app did not serve {self.url} within {self.startup_timeout:.0f} s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        """Last lines of the server's output."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.folder.cleanup()


def write_adapters(folder: Path, n: int) -> None:
    """N LoRA adapters of train.sft's default shape (r 16, every linear layer) with random weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    from assistant.models import load_base_model, load_tokenizer, pick_precision

    tokenizer = load_tokenizer("embedded")
    for i in range(n):
        torch.manual_seed(i)
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(load_base_model("embedded", pick_precision("fp32")), config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.01)
        model.save_pretrained(folder / f"adapter{i}")
        tokenizer.save_pretrained(folder / f"adapter{i}")


def resident_mb(pid: int) -> float:
    """Resident memory of a process, MB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class Outcome:
    """One request's result."""

    message: str
    ttft_s: float | None = None
    end_s: float | None = None
    reply: str = ""
    error: str | None = None
    model: str = "base"  # the model id an API chat asks for


def one_chat(client, message: str, config: ConcurrencyConfig, t0: float, outcome: Outcome) -> None:
    """One chat through `/chat` (gradio_client): poll its streamed outputs until done or the deadline."""
    job = client.submit(message, api_name="/chat", max_new_tokens=config.max_new_tokens, temperature=0.0)
    deadline = t0 + config.request_timeout
    while not job.done():
        outputs = job.outputs()
        if outcome.ttft_s is None and outputs and outputs[-1]:
            outcome.ttft_s = time.perf_counter() - t0
        if time.perf_counter() > deadline:
            job.cancel()
            outcome.error = f"timed out after {config.request_timeout:.0f} s"
            return
        time.sleep(0.005)
    outcome.end_s = time.perf_counter() - t0
    outputs = job.outputs()
    outcome.reply = str(job.result(timeout=30) if not outputs else outputs[-1])
    if outcome.ttft_s is None and outcome.reply:
        outcome.ttft_s = outcome.end_s  # the whole reply arrived in one chunk


def one_api_chat(client, message: str, config: ConcurrencyConfig, t0: float, outcome: Outcome) -> None:
    """The same chat through the OpenAI-compatible API (streamed, `openai` SDK); `outcome.model` picks the model."""
    stream = client.chat.completions.create(
        model=outcome.model,
        messages=[{"role": "user", "content": message}],
        stream=True,
        max_tokens=config.max_new_tokens,
        temperature=0.0,
        timeout=config.request_timeout,
    )
    for chunk in stream:
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            outcome.ttft_s = outcome.ttft_s or time.perf_counter() - t0
            outcome.reply += piece
    outcome.end_s = time.perf_counter() - t0


def timed_chat(
    send, client, message: str, config: ConcurrencyConfig, barrier, start: list[float], outcome
) -> None:
    """Send one chat with `send` when every thread is ready; any client error is a failed request, reported."""
    barrier.wait()
    try:
        send(client, message, config, start[0], outcome)
        if outcome.error is None and not outcome.reply:
            outcome.error = "empty reply"
    except Exception as error:  # any client error is a failed request, reported
        outcome.error = f"{type(error).__name__}: {error}"


def _clients(url: str, n: int, api: bool) -> list:
    if api:
        from openai import OpenAI

        return [OpenAI(base_url=url.rstrip("/") + "/v1", api_key="local", max_retries=0) for _ in range(n)]
    from gradio_client import Client

    return [Client(url, verbose=False) for _ in range(n)]


def run_level(
    url: str, n: int, config: ConcurrencyConfig, count_tokens, api: bool = False, models: list[str] | None = None
) -> dict:
    """N simultaneous chats; aggregate tokens/s over the round's wall time and TTFT percentiles.

    `models`: the API model ids the chats ask for, in turn (default: the base model).
    """
    clients = _clients(url, n, api)
    outcomes = [Outcome(MESSAGES[i % len(MESSAGES)], model=(models or ["base"])[i % len(models or ["base"])])
                for i in range(n)]
    start: list[float] = [0.0]
    barrier = threading.Barrier(n + 1)
    threads = [
        threading.Thread(
            target=timed_chat,
            args=(
                one_api_chat if api else one_chat,
                clients[i],
                outcomes[i].message,
                config,
                barrier,
                start,
                outcomes[i],
            ),
            daemon=True,
        )
        for i in range(n)
    ]
    for thread in threads:
        thread.start()
    start[0] = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join(timeout=config.request_timeout + 60)
    wall = time.perf_counter() - start[0]
    ok = [o for o in outcomes if o.error is None]
    tokens = sum(count_tokens(o.reply) for o in ok)
    ends = [o.end_s for o in ok if o.end_s is not None]
    span = max(ends) if ends else wall
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    for client in clients:
        try:
            client.close()
        except Exception:  # closing is best effort
            pass
    return {
        "chats": n,
        "tokens": tokens,
        "wall_s": round(span, 3),
        "tok_s": round(tokens / span, 2) if span > 0 and tokens else None,
        "p50_ttft_s": round(median(ttfts), 3) if ttfts else None,
        "p95_ttft_s": round(percentile(ttfts, 95), 3) if ttfts else None,
        "failures": n - len(ok),
        "errors": [o.error for o in outcomes if o.error],
        "replies": [
            {"message": o.message, "tokens": count_tokens(o.reply), "ttft_s": o.ttft_s, "end_s": o.end_s}
            for o in outcomes
        ],
    }


def render(levels: dict[int, dict]) -> str:
    """The readable table."""
    rows = [
        [n, r["tokens"], r["wall_s"], r["tok_s"], r["p50_ttft_s"], r["p95_ttft_s"], r["failures"]]
        for n, r in levels.items()
    ]
    return table(["chats", "tokens", "wall s", "tok/s", "p50 TTFT s", "p95 TTFT s", "failures"], rows)


def measure(url: str, config: ConcurrencyConfig, api: bool = False) -> dict[int, dict]:
    """Warm the app with one chat, then run every level (through /chat, or the OpenAI API with `api`)."""
    from assistant.models import load_tokenizer

    tokenizer = load_tokenizer("embedded")

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    warm = run_level(url, 1, config, count_tokens, api)
    log(f"warm-up: {warm['tokens']} tokens, errors {warm['errors']}")
    results = {}
    for n in config.levels:
        log(f"{n} simultaneous chat(s){' through the OpenAI API' if api else ''}")
        results[n] = run_level(url, n, config, count_tokens, api)
        log(
            f"  {results[n]['tok_s']} tok/s, p95 TTFT {results[n]['p95_ttft_s']} s, errors {results[n]['errors']}"
        )
    return results


def measure_adapters(server: AppServer, config: ConcurrencyConfig) -> dict:
    """Memory with 1 and N adapters attached; 8 chats over 4 adapters vs 8 on one (OpenAI API, greedy)."""
    from assistant.models import load_tokenizer

    tokenizer = load_tokenizer("embedded")

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    names = [f"adapter{i}" for i in range(config.adapters)]
    started_mb = resident_mb(server.proc.pid)  # the default choice (adapter0) is loaded at start
    run_level(server.url, 1, config, count_tokens, api=True, models=names[:1])  # warm
    one_mb = resident_mb(server.proc.pid)
    for name in names[1:]:
        run_level(server.url, 1, config, count_tokens, api=True, models=[name])
    all_mb = resident_mb(server.proc.pid)
    spread = names[: min(4, len(names))]
    rounds = {"one adapter": [], f"{len(spread)} adapters": []}
    for _ in range(2):  # alternate, so drift in machine load hits both alike
        rounds["one adapter"].append(run_level(server.url, 8, config, count_tokens, api=True, models=names[:1]))
        rounds[f"{len(spread)} adapters"].append(run_level(server.url, 8, config, count_tokens, api=True, models=spread))
    best = {k: max(runs, key=lambda r: r["tok_s"] or 0) for k, runs in rounds.items()}
    for key, result in best.items():
        log(f"8 chats, {key}: {result['tok_s']} tok/s, p95 TTFT {result['p95_ttft_s']} s, errors {result['errors']}")
    one, mixed = best["one adapter"], best[f"{len(spread)} adapters"]
    return {
        "adapters": config.adapters,
        "rss_mb_at_start": round(started_mb, 1),
        "rss_mb_1_adapter": round(one_mb, 1),
        f"rss_mb_{config.adapters}_adapters": round(all_mb, 1),
        "mb_per_extra_adapter": round((all_mb - one_mb) / max(1, config.adapters - 1), 1),
        "tok_s_8_chats_1_adapter": one["tok_s"],
        f"tok_s_8_chats_{len(spread)}_adapters": mixed["tok_s"],
        f"ratio_{len(spread)}_adapters_vs_1": ratio(mixed["tok_s"], one["tok_s"]),
        "failures": one["failures"] + mixed["failures"],
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    """Start the app, measure every level, stop the app, print the table and the FINAL JSON line."""
    logging.basicConfig(level=logging.WARNING)
    config = parse_config(ConcurrencyConfig, argv)
    config.apply_quick()
    load = machine_load()
    if config.adapters:
        with AppServer(config.startup_timeout, config.precision, config.adapters) as server:
            log(f"app serving {config.adapters} adapters at {server.url}")
            result = measure_adapters(server, config)
        final = {k: v for k, v in result.items() if k != "rounds"}
        final.update(max_new_tokens=config.max_new_tokens, precision=config.precision, quick=config.quick,
                     load_avg_1m_start=load, cpu=cpu_name())
        output = Path(config.output)
        if output == RESULTS / f"{NAME}.json":  # the default: keep the chat levels' results
            output = output.with_name(f"{NAME}_adapters.json")
        write_results(output.stem, {"final": final, "config": vars(config), "rounds": result["rounds"]},
                      output.parent)
        print_final(final)
        return 0
    if config.url:
        levels, api_levels = measure(config.url, config), measure(config.url, config, api=True)
    else:
        with AppServer(config.startup_timeout, config.precision) as server:
            log(f"app serving at {server.url}")
            levels, api_levels = measure(server.url, config), measure(server.url, config, api=True)
    top = max(config.levels)
    final = {
        **{f"tok_s_{n}": r["tok_s"] for n, r in levels.items()},
        f"ratio_{top}_vs_1": ratio(levels[top]["tok_s"], levels.get(1, {}).get("tok_s")),
        **{f"p95_ttft_s_{n}": r["p95_ttft_s"] for n, r in levels.items()},
        **{f"p50_ttft_s_{n}": r["p50_ttft_s"] for n, r in levels.items()},
        "failures": sum(r["failures"] for r in levels.values()),
        **{f"api_tok_s_{n}": r["tok_s"] for n, r in api_levels.items()},
        f"api_ratio_{top}_vs_1": ratio(api_levels[top]["tok_s"], api_levels.get(1, {}).get("tok_s")),
        **{f"api_p95_ttft_s_{n}": r["p95_ttft_s"] for n, r in api_levels.items()},
        "api_failures": sum(r["failures"] for r in api_levels.values()),
        "max_new_tokens": config.max_new_tokens,
        "precision": config.precision,
        "quick": config.quick,
        "load_avg_1m_start": load,
    }
    write_results(
        Path(config.output).stem,
        {
            "final": final,
            "config": vars(config),
            "levels": {str(n): r for n, r in levels.items()},
            "api_levels": {str(n): r for n, r in api_levels.items()},
        },
        Path(config.output).parent,
    )
    bar_chart(
        Path(config.output).with_suffix(".png"),
        [f"{n} chat(s)" for n in levels],
        [r["tok_s"] for r in levels.values()],
        title="Aggregate decode tokens/s of the app",
        ylabel="tokens / s",
    )
    print("through the app's /chat endpoint (gradio_client):")
    print(render(levels))
    print("through the OpenAI-compatible API (openai SDK):")
    print(render(api_levels))
    print_final(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
