"""`python -m bench.evals_api`: base model vs a STAR adapter through the Evals API, as a team would run it.

1. An adapter trained with train.sft's defaults on the first `train_rows` STAR training pairs (or --adapter DIR).
2. The app serves the base model and the adapter; the real `openai` SDK uploads the validation pairs as eval
   items ({"question", "answer"}), creates an eval (ROUGE-L >= `pass_threshold`, fuzzy match >= the same, and the
   answer's perplexity under the model), and runs it against "base" and the adapter, greedy.
3. Pass rates, mean ROUGE-L, wins/ties/losses with the bootstrap 95% interval (GET /v1/evals/{id}/compare), and
   each run's wall time and items per second.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    RESULTS,
    bar_chart,
    cpu_name,
    free_port,
    log,
    machine_load,
    parse_config,
    print_final,
    run_measured,
    table,
    write_results,
)
from bench.quality import fresh
from bench.train_speed import check

NAME = "evals_api"
ADAPTER = "star"


@dataclass
class EvalsBenchConfig:
    """Options of `python -m bench.evals_api`."""

    data_dir: str = field(default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "star"),
                          metadata={"help": "Folder with train.pairs.jsonl and valid.pairs.jsonl."})
    adapter: str | None = field(default=None, metadata={"help": "An adapter folder to evaluate (default: train one)."})
    train_rows: int = field(default=500, metadata={"help": "Training pairs of the adapter trained when --adapter "
                                                           "is not given (train.sft's defaults otherwise)."})
    valid_rows: int = field(default=100, metadata={"help": "Validation pairs evaluated."})
    pass_threshold: float = field(default=0.3, metadata={"help": "ROUGE-L and fuzzy-match score that passes."})
    max_new_tokens: int = field(default=64, metadata={"help": "Reply length (max_completion_tokens)."})
    timeout: float = field(default=7200.0, metadata={"help": "Seconds allowed for training and for each run."})
    output: str = field(default=str(RESULTS / f"{NAME}.json"), metadata={"help": "Where the results JSON goes."})


def criteria(threshold: float) -> list[dict]:
    """The eval's testing criteria."""
    answer, reply = "{{item.answer}}", "{{sample.output_text}}"
    return [
        {"type": "text_similarity", "name": "rouge_l", "evaluation_metric": "rouge_l", "pass_threshold": threshold,
         "input": reply, "reference": answer},
        {"type": "text_similarity", "name": "fuzzy", "evaluation_metric": "fuzzy_match", "pass_threshold": threshold,
         "input": reply, "reference": answer},
        {"type": "perplexity", "name": "perplexity", "reference": answer},
    ]


def run(client, eval_id: str, model: str, file_id: str, config: EvalsBenchConfig) -> dict:
    """One eval run to its end, with its progress logged; the run object and its wall time."""
    started = time.perf_counter()
    created = client.evals.runs.create(eval_id, name=model, data_source={
        "type": "completions", "model": model, "source": {"type": "file_id", "id": file_id},
        "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.question}}"}]},
        "sampling_params": {"temperature": 0, "max_completion_tokens": config.max_new_tokens}})
    shown = 0
    while (found := client.evals.runs.retrieve(created.id, eval_id=eval_id)).status in ("queued", "in_progress"):
        progress = found.model_extra.get("progress") or {}
        if progress.get("done", 0) >= shown + 20:
            shown = progress["done"]
            log(f"  {model}: {shown}/{progress['total']} items, {progress['items_per_second']} items/s, "
                f"ETA {progress['eta_seconds']} s")
        if time.perf_counter() - started > config.timeout:
            raise TimeoutError(f"run {created.id} still {found.status}")
        time.sleep(1)
    if found.status != "completed":
        raise RuntimeError(f"run {created.id} {found.status}: {found.error}")
    seconds = time.perf_counter() - started
    items = client.evals.runs.output_items.list(created.id, eval_id=eval_id, limit=100)
    scores = {name: [] for name in ("rouge_l", "fuzzy", "perplexity")}
    for item in items:  # the SDK pages through all of them
        for result in item.results:
            scores[result.name].append(result.score)
    per = {r.testing_criteria: round(r.passed / max(r.passed + r.failed, 1), 4)
           for r in found.per_testing_criteria_results}
    return {"id": created.id, "seconds": round(seconds, 1), "items_per_second": round(found.result_counts.total / seconds, 3),
            "passed": found.result_counts.passed, "total": found.result_counts.total, "pass_rates": per,
            "mean": {k: round(sum(v) / max(len(v), 1), 4) for k, v in scores.items()}}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    config = parse_config(EvalsBenchConfig, argv)
    load = machine_load()
    work = Path(tempfile.mkdtemp(prefix="bench-evals-"))
    adapters = work / "adapters"
    adapter = fresh(adapters / ADAPTER)
    if config.adapter:
        shutil.copytree(config.adapter, adapter, dirs_exist_ok=True)
    else:
        pairs = [json.loads(line) for line in (Path(config.data_dir) / "train.pairs.jsonl").open()][: config.train_rows]
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        check(run_measured([sys.executable, "-m", "train.sft", str(data), "--output-dir", str(adapter)],
                           timeout=config.timeout), "train.sft")
    valid = [json.loads(line) for line in (Path(config.data_dir) / "valid.pairs.jsonl").open()][: config.valid_rows]
    items = work / "items.jsonl"
    items.write_text("".join(json.dumps({"item": {"question": v["prompt"], "answer": v["response"]}}) + "\n"
                             for v in valid))

    from openai import OpenAI

    from serve.registry import BASE_CHOICE, ModelRegistry
    from ui.app import build_app
    from ui.config import ChatConfig

    demo = build_app(ChatConfig(adapters_dir=str(adapters), jobs_dir=str(fresh(work / "jobs"))),
                     registry=ModelRegistry(str(adapters), default=BASE_CHOICE))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key="local", max_retries=2)
        file_id = client.files.create(file=items.open("rb"), purpose="evals").id
        created = client.evals.create(
            name=f"STAR validation ({len(valid)} pairs)", testing_criteria=criteria(config.pass_threshold),
            data_source_config={"type": "custom", "item_schema": {
                "type": "object", "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
                "required": ["question", "answer"]}})
        runs = {model: run(client, created.id, model, file_id, config) for model in ("base", ADAPTER)}
        compared = client.get(f"/evals/{created.id}/compare", cast_to=object, options={"params": {
            "run_a": runs["base"]["id"], "run_b": runs[ADAPTER]["id"], "criterion": "rouge_l"}})
    finally:
        demo.close()
    rows = [[m, r["pass_rates"]["rouge_l"], r["pass_rates"]["fuzzy"], r["mean"]["rouge_l"], r["mean"]["perplexity"],
             r["seconds"], r["items_per_second"]] for m, r in runs.items()]
    print(table(["model", "pass ROUGE-L", "pass fuzzy", "mean ROUGE-L", "ref. perplexity", "wall s", "items/s"], rows))
    log(compared["description"])
    final = {
        "pass_rate_rouge_l_base": runs["base"]["pass_rates"]["rouge_l"],
        "pass_rate_rouge_l_adapter": runs[ADAPTER]["pass_rates"]["rouge_l"],
        "mean_rouge_l_base": runs["base"]["mean"]["rouge_l"], "mean_rouge_l_adapter": runs[ADAPTER]["mean"]["rouge_l"],
        "wins": compared["wins"], "ties": compared["ties"], "losses": compared["losses"],
        "mean_difference": compared["mean_difference"], "interval": compared["interval"],
        "adapter_passes_more": runs[ADAPTER]["passed"] > runs["base"]["passed"],
        "seconds_base": runs["base"]["seconds"], "seconds_adapter": runs[ADAPTER]["seconds"],
        "items_per_second_base": runs["base"]["items_per_second"],
        "items_per_second_adapter": runs[ADAPTER]["items_per_second"],
        "valid_rows": len(valid), "pass_threshold": config.pass_threshold, "cpu": cpu_name(),
        "load_avg_1m_start": load,
    }
    out = Path(config.output)
    bar_chart(out.with_name(f"{out.stem}_outcomes.png"), ["wins", "ties", "losses"],
              [compared["wins"], compared["ties"], compared["losses"]],
              title=f"{ADAPTER} vs base, ROUGE-L per item ({len(valid)} STAR pairs)", ylabel="items")
    worse = compared["worse"][:5]
    path = write_results(out.stem, {"final": final, "config": vars(config), "runs": runs,
                                    "comparison": {k: v for k, v in compared.items() if k not in ("per_item", "worse")},
                                    "worst_items": worse}, out.parent)
    log(f"results: {path}")
    shutil.rmtree(work, ignore_errors=True)
    print_final(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
