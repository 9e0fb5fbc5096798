"""`python -m bench.concurrency`: aggregate tokens/s and time to first chunk with 1, 4 and 8 simultaneous chats.

Starts the app (`python -m ui`) on a free 127.0.0.1 port, sends N chats at once through
gradio_client to its `/chat` endpoint, then through the OpenAI API, and stops the server at the end.
Every request has a deadline; a request past it is cancelled and counted as a failure. Each level
runs `--rounds` times, the levels taking turns, and reports its median round (the machine here is
shared: one round swings by a third). Start-up is timed too: launch -> page served -> first token of
a first chat, warm (the model cache filled) and, with `--cold_start`, from an empty cache; "served" is
when the page and `/v1/models` both answer.

`--adapters N` measures serving many adapters of one base instead: N LoRA adapters (train.sft's
default shape, random weights) in the app's adapters folder; the server's resident memory with 1
and with all N attached, and the aggregate tokens/s of 8 chats spread over 4 adapters against 8
chats on one adapter, through the OpenAI API.

`--store` measures what keeping completions costs: 8 simultaneous streamed chats through the OpenAI
API (greedy, the same messages) with `store: true` (and `metadata={"bench": "store"}`) against the
same 8 without it. The arms alternate over `--store_rounds` rounds each, the order flipping every
round (no store, store; store, no store; ...), so drift in machine load hits both alike. Each arm
reports the MEDIAN of its rounds' aggregate tokens/s, not the best: on a shared machine the best
round is whichever happened to land in a quiet moment, a matter of chance that favours one arm or
the other, while the median is what a user typically gets (the best is recorded as well). TTFT
percentiles pool every chat of the arm's rounds. The app gets a fresh SQLite store in its temp
folder; afterwards the stored completions are listed through the SDK and must number exactly the
store arm's completed chats (plus the warm-up's), or the bench fails: the no-store arm stored
nothing. The issue's target: the store arm within 5% of the other (`store_target_met`).
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
    fmt,
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
STORE_CHATS = 8  # simultaneous chats of --store's rounds (the "8 concurrent chats")
STORE_METADATA = {"bench": "store"}  # the store arm's metadata, listed back to count what was kept
STORE_TARGET = 0.95  # the store arm's tokens/s must be within 5% of the no-store arm's


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
    store: bool = field(
        default=False,
        metadata={"help": "Measure storing completions instead of the chat levels: 8 streamed API chats with "
                          "`store: true` against 8 without, alternating over --store_rounds rounds each; "
                          "results in concurrency_store.json."},
    )
    store_rounds: int = field(
        default=5, metadata={"help": "Rounds of each arm with --store (the median round counts)."}
    )
    rounds: int = field(
        default=3,
        metadata={"help": "Rounds of every chat level (the levels take turns; each level reports its median "
                          "round's tokens/s and TTFT percentiles over all its rounds' chats), and of each arm "
                          "with --adapters."},
    )
    cold_start: bool = field(
        default=True,
        metadata={"help": "Also time a second start, with an empty model cache (the embedded model converted from "
                          "its GGUF again, as on a fresh machine), beside the levels' app's warm start."},
    )
    quick: bool = field(
        default=False, metadata={"help": "CI smoke run: 8 new tokens per request, 1 round per level (2 per arm "
                                         "with --store), no cold start."}
    )
    output: str = field(
        default=str(RESULTS / f"{NAME}.json"), metadata={"help": "Where to write the JSON results."}
    )

    def apply_quick(self) -> None:
        """Shrink everything for --quick."""
        if self.quick:
            self.max_new_tokens = 8
            self.store_rounds = min(self.store_rounds, 2)
            self.rounds, self.cold_start = 1, False


class AppServer:
    """`python -m ui` in its own process group, on 127.0.0.1, with no adapters listed (the base model serves).

    Its jobs folder, and with it the SQLite store of `store: true` completions, is in its temp folder: the
    bench writes nothing into the repository (or into a database $ASSISTANT_DATABASE_URL names).
    """

    def __init__(self, startup_timeout: float, precision: str = "auto", adapters: int = 0, cache: Path | None = None):
        self.port, self.precision, self.adapters, self.cache = free_port(), precision, adapters, cache
        self.launched = 0.0  # perf_counter() at launch
        self.startup_s: float | None = None  # launch -> the page and /v1 are served
        self.url = f"http://127.0.0.1:{self.port}/"
        self.startup_timeout = startup_timeout
        self.folder = tempfile.TemporaryDirectory(prefix="bench-app-")
        self.log_path = Path(self.folder.name) / "server.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> AppServer:
        adapters = Path(self.folder.name) / "adapters"
        adapters.mkdir()
        jobs = Path(self.folder.name) / "jobs"
        if self.adapters:
            write_adapters(adapters, self.adapters)
        env = {
            **{k: v for k, v in os.environ.items() if k != "ASSISTANT_DATABASE_URL"},
            "GRADIO_ANALYTICS_ENABLED": "False",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **({"ASSISTANT_CACHE": str(self.cache)} if self.cache else {}),
        }
        self.launched = time.perf_counter()
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
                    "--jobs-dir",
                    str(jobs),
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
            try:  # ready once the page and the OpenAI API both answer (the API is mounted before the server listens)
                with urllib.request.urlopen(self.url, timeout=5) as page, \
                        urllib.request.urlopen(self.url + "v1/models", timeout=5) as api:
                    if page.status == api.status == 200:
                        self.startup_s = time.perf_counter() - self.launched
                        return
            except OSError:  # refused: not listening yet
                pass
            time.sleep(0.2)
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
    store_metadata: dict[str, str] | None = None  # an API chat with this: `store: true` with this metadata


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
    """The same chat through the OpenAI-compatible API (streamed, `openai` SDK); `outcome.model` picks the model.

    With `outcome.store_metadata` the completion is stored (`store: true`) with that metadata; the stream
    ends only once it is kept, so its time counts.
    """
    stored = {} if outcome.store_metadata is None else {"store": True, "metadata": outcome.store_metadata}
    stream = client.chat.completions.create(
        model=outcome.model,
        messages=[{"role": "user", "content": message}],
        stream=True,
        max_tokens=config.max_new_tokens,
        temperature=0.0,
        timeout=config.request_timeout,
        **stored,
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
    url: str,
    n: int,
    config: ConcurrencyConfig,
    count_tokens,
    api: bool = False,
    models: list[str] | None = None,
    store_metadata: dict[str, str] | None = None,
) -> dict:
    """N simultaneous chats; aggregate tokens/s over the round's wall time and TTFT percentiles.

    `models`: the API model ids the chats ask for, in turn (default: the base model).
    `store_metadata`: API chats are stored (`store: true`) with this metadata (default: not stored).
    """
    clients = _clients(url, n, api)
    outcomes = [Outcome(MESSAGES[i % len(MESSAGES)], model=(models or ["base"])[i % len(models or ["base"])],
                        store_metadata=store_metadata)
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
        [n, r["tok_s"], r["best_tok_s"], r["p50_ttft_s"], r["p95_ttft_s"], r["failures"]]
        for n, r in levels.items()
    ]
    return table(["chats", "median tok/s", "best tok/s", "p50 TTFT s", "p95 TTFT s", "failures"], rows)


def token_counter():
    """Tokens of a reply, counted with the embedded model's tokenizer."""
    from assistant.models import load_tokenizer

    tokenizer = load_tokenizer("embedded")
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def measure(url: str, config: ConcurrencyConfig, api: bool = False) -> tuple[dict[int, dict], dict[int, list]]:
    """Warm the app with one chat, then run every level `config.rounds` times, the levels taking turns
    (through /chat, or the OpenAI API with `api`). Returns each level's summary (its median round's tokens/s,
    TTFT percentiles over every chat of its rounds) and its rounds."""
    count_tokens = token_counter()
    warm = run_level(url, 1, config, count_tokens, api)
    log(f"warm-up: {warm['tokens']} tokens, errors {warm['errors']}")
    rounds: dict[int, list] = {n: [] for n in config.levels}
    for i in range(config.rounds):
        for n in config.levels:
            result = run_level(url, n, config, count_tokens, api)
            rounds[n].append({"round": i + 1, **result})
            log(f"round {i + 1}, {n} simultaneous chat(s){' through the OpenAI API' if api else ''}: "
                f"{result['tok_s']} tok/s, p95 TTFT {result['p95_ttft_s']} s, errors {result['errors']}")
    return {n: {"chats": n, **_arm_summary(runs)} for n, runs in rounds.items()}, rounds


def first_answer_s(server: AppServer) -> float:
    """Seconds from launching the app to the first token of its first chat (OpenAI API, greedy)."""
    outcome = Outcome(MESSAGES[0])
    (client,) = _clients(server.url, 1, api=True)
    try:
        one_api_chat(client, outcome.message, ConcurrencyConfig(max_new_tokens=8), server.launched, outcome)
    finally:
        client.close()
    if outcome.ttft_s is None:
        raise RuntimeError(f"the app's first chat gave no text:\n{server.log_tail()}")
    return outcome.ttft_s


def startup(server: AppServer, kind: str) -> dict:
    """A just-started app's start-up: launch -> page and /v1 served, launch -> first token of a first chat."""
    result = {f"startup_s_{kind}": round(server.startup_s, 2), f"first_answer_s_{kind}": round(first_answer_s(server), 2)}
    log(f"start-up ({kind}): {result}")
    return result


def cold_startup(config: ConcurrencyConfig) -> dict:
    """startup() of an app with an empty model cache: the embedded model is converted from its GGUF again."""
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache, \
            AppServer(config.startup_timeout, config.precision, cache=Path(cache)) as cold:
        return startup(cold, "cold")


def measure_adapters(server: AppServer, config: ConcurrencyConfig) -> dict:
    """Memory with 1 and N adapters attached; 8 chats over 4 adapters vs 8 on one (OpenAI API, greedy)."""
    count_tokens = token_counter()
    names = [f"adapter{i}" for i in range(config.adapters)]
    started_mb = resident_mb(server.proc.pid)  # the default choice (adapter0) is loaded at start
    run_level(server.url, 1, config, count_tokens, api=True, models=names[:1])  # warm
    one_mb = resident_mb(server.proc.pid)
    for name in names[1:]:
        run_level(server.url, 1, config, count_tokens, api=True, models=[name])
    all_mb = resident_mb(server.proc.pid)
    spread = names[: min(4, len(names))]
    rounds = {"one adapter": [], f"{len(spread)} adapters": []}
    for _ in range(max(2, config.rounds)):  # alternate, so drift in machine load hits both alike
        rounds["one adapter"].append(run_level(server.url, 8, config, count_tokens, api=True, models=names[:1]))
        rounds[f"{len(spread)} adapters"].append(run_level(server.url, 8, config, count_tokens, api=True, models=spread))
    summary = {k: _arm_summary(runs) for k, runs in rounds.items()}  # the median round, as --store reports
    for key, result in summary.items():
        log(f"8 chats, {key}: {result['tok_s']} tok/s, p95 TTFT {result['p95_ttft_s']} s, failures {result['failures']}")
    one, mixed = summary["one adapter"], summary[f"{len(spread)} adapters"]
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


def stored_completions(url: str, metadata: dict[str, str] | None = None) -> list:
    """Every stored completion the app lists (through the SDK, every page), or those with this metadata."""
    (client,) = _clients(url, 1, api=True)
    try:
        return list(client.chat.completions.list(limit=100, **({"metadata": metadata} if metadata else {})))
    finally:
        client.close()


def _arm_summary(runs: list[dict]) -> dict:
    """One arm's rounds: median and best tokens/s, TTFT percentiles over all its chats, failures."""
    rates = [r["tok_s"] for r in runs if r["tok_s"]]
    ttfts = [c["ttft_s"] for r in runs for c in r["replies"] if c["end_s"] is not None and c["ttft_s"] is not None]
    return {
        "tok_s": round(median(rates), 2) if rates else None,
        "best_tok_s": max(rates) if rates else None,
        "p50_ttft_s": round(median(ttfts), 3) if ttfts else None,
        "p95_ttft_s": round(percentile(ttfts, 95), 3) if ttfts else None,
        "failures": sum(r["failures"] for r in runs),
        "ok_chats": sum(r["chats"] - r["failures"] for r in runs),
    }


def measure_store(url: str, config: ConcurrencyConfig) -> dict:
    """8 streamed API chats with and without `store: true`, alternating; then count what was stored."""
    count_tokens = token_counter()
    warm_metadata = {"bench": "warm-up"}  # warms the batch of 8 and the store's write path, listed apart
    warm = run_level(url, STORE_CHATS, config, count_tokens, api=True, store_metadata=warm_metadata)
    log(f"warm-up: {warm['tokens']} tokens, errors {warm['errors']}")
    rounds: dict[str, list[dict]] = {"no store": [], "store": []}
    for i in range(config.store_rounds):
        for arm in ("no store", "store") if i % 2 == 0 else ("store", "no store"):
            result = run_level(url, STORE_CHATS, config, count_tokens, api=True,
                               store_metadata=STORE_METADATA if arm == "store" else None)
            rounds[arm].append({"round": i + 1, **result})
            log(f"round {i + 1}, {arm}: {result['tok_s']} tok/s, p95 TTFT {result['p95_ttft_s']} s, "
                f"errors {result['errors']}")
    plain, kept = _arm_summary(rounds["no store"]), _arm_summary(rounds["store"])
    # The store arm really stored, every completed chat of it; the no-store arm nothing.
    tagged = stored_completions(url, STORE_METADATA)
    everything = stored_completions(url)
    warm_ok = warm["chats"] - warm["failures"]
    if len(tagged) != kept["ok_chats"]:
        raise RuntimeError(f"the store arm completed {kept['ok_chats']} chats with store: true but the app lists "
                           f"{len(tagged)} stored completions with metadata {STORE_METADATA}")
    if len(everything) != kept["ok_chats"] + warm_ok:
        raise RuntimeError(f"the app lists {len(everything)} stored completions in all, expected "
                           f"{kept['ok_chats']} (store arm) + {warm_ok} (warm-up): the no-store arm stored some")
    empty = [c.id for c in tagged if not (c.choices and c.choices[0].message.content)]
    if empty:
        raise RuntimeError(f"stored completions without a reply: {empty}")
    log(f"stored: {len(tagged)} completions with {STORE_METADATA}, {len(everything)} in all (warm-up: {warm_ok})")
    return {"no store": plain, "store": kept, "stored_completions": len(tagged),
            "stored_completions_all": len(everything), "rounds": rounds}


def render_store(result: dict) -> str:
    """The readable tables of --store: every round, then each arm's summary."""
    per_round = [
        [r["round"], arm, r["tokens"], r["wall_s"], r["tok_s"], r["p95_ttft_s"], r["failures"]]
        for arm, runs in result["rounds"].items()
        for r in runs
    ]
    per_round.sort(key=lambda row: row[0])
    arms = [
        [arm, len(result["rounds"][arm]), s["tok_s"], s["best_tok_s"], s["p50_ttft_s"], s["p95_ttft_s"], s["failures"]]
        for arm, s in ((arm, result[arm]) for arm in ("no store", "store"))
    ]
    return "\n\n".join([
        table(["round", "arm", "tokens", "wall s", "tok/s", "p95 TTFT s", "failures"], per_round),
        table(["arm", "rounds", "median tok/s", "best tok/s", "p50 TTFT s", "p95 TTFT s", "failures"], arms),
    ])


def main_store(config: ConcurrencyConfig, load: float) -> int:
    """--store: start the app (a fresh store in its temp folder), measure both arms, write and print."""
    with AppServer(config.startup_timeout, config.precision) as server:
        log(f"app serving at {server.url}; {STORE_CHATS} chats with and without store, "
            f"{config.store_rounds} rounds each")
        result = measure_store(server.url, config)
    plain, kept = result["no store"], result["store"]
    store_ratio = ratio(kept["tok_s"], plain["tok_s"])
    final = {
        "tok_s_no_store": plain["tok_s"],
        "tok_s_store": kept["tok_s"],
        "ratio_store_vs_no_store": store_ratio,
        "store_target_met": store_ratio is not None and store_ratio >= STORE_TARGET,
        "p95_ttft_s_no_store": plain["p95_ttft_s"],
        "p95_ttft_s_store": kept["p95_ttft_s"],
        "p50_ttft_s_no_store": plain["p50_ttft_s"],
        "p50_ttft_s_store": kept["p50_ttft_s"],
        "best_tok_s_no_store": plain["best_tok_s"],
        "best_tok_s_store": kept["best_tok_s"],
        "failures": plain["failures"] + kept["failures"],
        "stored_completions": result["stored_completions"],
        "chats": STORE_CHATS,
        "rounds_per_arm": config.store_rounds,
        "statistic": "median over rounds",
        "max_new_tokens": config.max_new_tokens,
        "precision": config.precision,
        "quick": config.quick,
        "load_avg_1m_start": load,
        "cpu": cpu_name(),
    }
    output = Path(config.output)
    if output == RESULTS / f"{NAME}.json":  # the default: keep the chat levels' results
        output = output.with_name(f"{NAME}_store.json")
    write_results(
        output.stem,
        {"final": final, "config": vars(config), "arms": {"no store": plain, "store": kept},
         "rounds": result["rounds"]},
        output.parent,
    )
    print(f"{STORE_CHATS} simultaneous streamed chats through the OpenAI API, with and without store: true:")
    print(render_store(result))
    print(f"store / no store: {fmt(store_ratio, 3)} (target >= {STORE_TARGET}: "
          f"{'met' if final['store_target_met'] else 'NOT met'})")
    print_final(final)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Start the app, measure every level, stop the app, print the table and the FINAL JSON line."""
    logging.basicConfig(level=logging.WARNING)
    config = parse_config(ConcurrencyConfig, argv)
    config.apply_quick()
    if config.store and (config.adapters or config.url):
        sys.exit("error: --store starts its own app with a fresh store (to count what it kept): "
                 "leave out --adapters and --url")
    if config.store_rounds < 1:
        sys.exit("error: --store_rounds must be at least 1")
    load = machine_load()
    if config.store:
        return main_store(config, load)
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
    started = {}
    if config.url:
        (levels, rounds), (api_levels, api_rounds) = measure(config.url, config), measure(config.url, config, api=True)
    else:
        with AppServer(config.startup_timeout, config.precision) as server:
            log(f"app serving at {server.url}")
            started = startup(server, "warm")  # the levels' app (its model cache filled), before anything runs on it
            (levels, rounds), (api_levels, api_rounds) = measure(server.url, config), measure(server.url, config, api=True)
        if config.cold_start:
            started.update(cold_startup(config))
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
        **started,
        "rounds": config.rounds,
        "statistic": "tokens/s: median round; TTFT: percentiles over every round's chats",
        "cpu": cpu_name(),
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
            "rounds": {str(n): r for n, r in rounds.items()},
            "api_rounds": {str(n): r for n, r in api_rounds.items()},
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
