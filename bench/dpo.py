"""`python -m bench.dpo`: does DPO on top of an SFT adapter move it towards the human agent's replies?

On STAR:
1. train.sft trains an adapter on the first `train_rows` training pairs (its defaults).
2. That adapter answers the next `pref_rows` training prompts and the first `valid_rows` validation prompts greedily
   (fp32, as the app serves it); each prompt becomes a preference pair: preferred, the human agent's reply;
   non-preferred, the adapter's own reply (pairs where the two are equal are left out).
3. train.dpo tunes that adapter on the training pairs (--from-adapter: the SFT adapter is DPO's reference), with the
   validation pairs as its --valid-file: its report has reward accuracy and margin on them before and after.
4. The SFT adapter and the DPO adapter are scored by the same function (train.eval.score in bench.score_worker,
   fp32, greedy) on the validation pairs: ROUGE-L of the replies and the perplexity of the reference replies.
   (train.dpo picks its best checkpoint by the validation pairs' DPO loss, so those rows are not fully unseen.)
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    RESULTS,
    cpu_name,
    log,
    machine_load,
    parse_config,
    print_final,
    run_measured,
    table,
    write_results,
)
from bench.quality import fresh, score_run
from bench.train_speed import check

NAME = "dpo"
STAR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "star"


@dataclass
class DPOBenchConfig:
    """Options of `python -m bench.dpo`."""

    data_dir: str = field(default=str(STAR), metadata={"help": "Folder with train.pairs.jsonl and valid.pairs.jsonl."})
    train_rows: int = field(default=500, metadata={"help": "Training pairs the SFT adapter trains on."})
    pref_rows: int = field(default=300, metadata={"help": "Other training prompts turned into preference pairs."})
    valid_rows: int = field(default=100, metadata={"help": "Validation prompts: pairs for the rewards, and ROUGE-L."})
    max_new_tokens: int = field(default=64, metadata={"help": "Length of each reply (the non-preferred ones too)."})
    adapter: str | None = field(default=None, metadata={"help": "The SFT adapter to start from (trained on the first "
                                                               "--train-rows pairs) instead of training one."})
    sft_args: str = field(default="", metadata={"help": "Extra train.sft arguments (quoted), e.g. '--max-steps 4'."})
    dpo_args: str = field(default="", metadata={"help": "Extra train.dpo arguments (quoted), e.g. '--beta 0.2'."})
    work_dir: str = field(default="", metadata={"help": "Folder for data and adapters (default: a temporary one)."})
    timeout: float = field(default=6 * 3600.0, metadata={"help": "Seconds any one step may take."})
    output: str = field(default=str(RESULTS / f"{NAME}.json"), metadata={"help": "Where the results JSON goes."})


def write_jsonl(rows: list[dict], path: Path) -> Path:
    """`rows` as JSON Lines."""
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def preference_pairs(adapter: Path, rows: list[dict], max_new_tokens: int) -> list[dict]:
    """OpenAI preference rows: the human reply preferred over the adapter's own greedy reply to the same prompt."""
    from assistant.generation import GenerationParams, complete_reply
    from assistant.loading import load_chat_model

    chat = load_chat_model(adapter=adapter, precision="fp32")
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0)
    pairs = []
    for row in rows:
        messages = [{"role": "user", "content": row["prompt"]}]
        own = complete_reply(chat, messages, params).strip()
        if own and own != row["response"].strip():
            pairs.append({"input": {"messages": messages},
                          "preferred_output": [{"role": "assistant", "content": row["response"]}],
                          "non_preferred_output": [{"role": "assistant", "content": own}]})
    return pairs


def main(argv: list[str] | None = None) -> int:
    """Run the bench; the last stdout line is the FINAL JSON."""
    logging.basicConfig(level=logging.WARNING)
    config = parse_config(DPOBenchConfig, argv)
    load = machine_load()
    work = Path(config.work_dir or tempfile.mkdtemp(prefix="bench-dpo-"))
    work.mkdir(parents=True, exist_ok=True)
    pairs = [json.loads(line) for line in (Path(config.data_dir) / "train.pairs.jsonl").open()]
    first, others = pairs[: config.train_rows], pairs[config.train_rows: config.train_rows + config.pref_rows]
    if len(others) < config.pref_rows:
        raise SystemExit(f"--train-rows + --pref-rows: train.pairs.jsonl has only {len(pairs)} rows")
    valid_rows = [json.loads(line) for line in (Path(config.data_dir) / "valid.pairs.jsonl").open()][: config.valid_rows]
    valid = write_jsonl(valid_rows, work / "valid.jsonl")
    sft, dpo = fresh(work / "adapters" / "star-sft"), fresh(work / "adapters" / "star-dpo")

    if config.adapter:
        shutil.copytree(config.adapter, sft)
    else:
        cmd = [sys.executable, "-m", "train.sft", str(write_jsonl(first, work / "train.jsonl")), "--output-dir",
               str(sft), *shlex.split(config.sft_args)]
        check(run_measured(cmd, timeout=config.timeout), "train.sft")
    log("the SFT adapter answers the preference prompts")
    train_prefs = write_jsonl(preference_pairs(sft, others, config.max_new_tokens), work / "prefs.train.jsonl")
    valid_prefs = write_jsonl(preference_pairs(sft, valid_rows, config.max_new_tokens), work / "prefs.valid.jsonl")

    cmd = [sys.executable, "-m", "train.dpo", str(train_prefs), "--valid-file", str(valid_prefs), "--from-adapter",
           str(sft), "--output-dir", str(dpo), *shlex.split(config.dpo_args)]
    run = run_measured(cmd, timeout=config.timeout)
    check(run, "train.dpo")
    report = json.loads((dpo / "training_report.json").read_text())
    pref = report["preference"]
    before, after = score_run(config, sft, valid), score_run(config, dpo, valid)
    rows = [["SFT (DPO's start and reference)", before["rouge_l"], before["perplexity"],
             pref["before"]["vs_base"]["reward_accuracy"], pref["before"]["prefers_chosen"]],
            ["DPO on top of it", after["rouge_l"], after["perplexity"], pref["after"]["vs_base"]["reward_accuracy"],
             pref["after"]["prefers_chosen"]]]
    print(table(["adapter", "ROUGE-L", "ref. perplexity", "reward acc. vs base", "prefers human reply"], rows))
    final = {
        "rouge_l_sft": before["rouge_l"], "rouge_l_dpo": after["rouge_l"],
        "perplexity_sft": before["perplexity"], "perplexity_dpo": after["perplexity"],
        "reward_accuracy_before": pref["before"]["vs_base"]["reward_accuracy"],
        "reward_accuracy_after": pref["after"]["vs_base"]["reward_accuracy"],
        "reward_margin_before": pref["before"]["vs_base"]["reward_margin"],
        "reward_margin_after": pref["after"]["vs_base"]["reward_margin"],
        "dpo_reward_accuracy_after": pref["after"]["vs_reference"]["reward_accuracy"],
        "dpo_reward_margin_after": pref["after"]["vs_reference"]["reward_margin"],
        "prefers_human_before": pref["before"]["prefers_chosen"], "prefers_human_after": pref["after"]["prefers_chosen"],
        "beta": report["config"]["beta"], "learning_rate": report["learning_rate"],
        "dpo_steps": report["steps"], "dpo_seconds": report["train_seconds"],
        "train_pairs": report["data"]["train"]["rows"], "valid_pairs": report["data"]["valid"]["rows"],
        "dpo_command": shlex.join(str(c) for c in cmd), "reward_measure": pref["measure"],
        "train_rows": config.train_rows, "pref_rows": config.pref_rows, "valid_rows": config.valid_rows,
        "cpu": cpu_name(), "load_avg_1m_start": load,
    }
    path = write_results(Path(config.output).stem, {"final": final, "sft": before, "dpo": after, "preference": pref},
                         Path(config.output).parent)
    log(f"results in {path}")
    print_final(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
