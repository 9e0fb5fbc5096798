""""Evaluate against the model in use": one eval over a team's held-out dialogues, one run per model, compared.

The held-out file is read by the dataset doctor (serve.doctor.eval_items: any format train.sft takes), so each item
is a conversation up to its last assistant turn (`messages`) and that turn (`reference`). Both models answer the
same items through the Evals runner; the candidate is compared with the model in use on ROUGE-L per item.
"""

from __future__ import annotations

from serve.access import Caller
from serve.evals.definition import check_run
from serve.evals.runner import EvalRunner

HELD_OUT_SCHEMA = {"type": "object", "properties": {"messages": {"type": "array"}, "reference": {"type": "string"}},
                   "required": ["messages", "reference"]}
PASS_THRESHOLD = 0.3  # ROUGE-L of a reply that says much of what the agent said


def criteria(threshold: float = PASS_THRESHOLD) -> list[dict]:
    """ROUGE-L against the reference reply (the gate's criterion) and the reference's perplexity."""
    return [
        {"type": "text_similarity", "name": "rouge_l", "evaluation_metric": "rouge_l", "pass_threshold": threshold,
         "input": "{{sample.output_text}}", "reference": "{{item.reference}}"},
        {"type": "perplexity", "name": "perplexity", "reference": "{{item.reference}}"},
    ]


def evaluate_against(runner: EvalRunner, who: Caller, items: list[dict], candidate: str, current: str,
                     models: list[str], *, name: str, max_tokens: int = 64) -> dict:
    """Create the eval and queue a greedy run of `current`, then of `candidate`: {"eval_id", "run_a", "run_b"}."""
    found = runner.store.create_eval(who, {"name": name, "testing_criteria": criteria(),
                                           "data_source_config": {"type": "custom", "item_schema": HELD_OUT_SCHEMA}})
    runs = {}
    for model in (current, candidate):
        request = check_run({"name": model, "data_source": {
            "type": "completions", "model": model,
            "source": {"type": "file_content", "content": [{"item": item} for item in items]},
            "input_messages": {"type": "item_reference", "item_reference": "item.messages"},
            "sampling_params": {"temperature": 0, "max_completion_tokens": max_tokens}}}, found.definition, models)
        runs[model] = runner.create(who, found.id, request, found.definition)["id"]
    return {"eval_id": found.id, "run_a": runs[current], "run_b": runs[candidate]}
