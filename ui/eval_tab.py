"""The "Evaluate" tab: is a candidate better than the model in use, on the team's own held-out dialogues?

The held-out file (any format train.sft takes) is read by the dataset doctor into conversations and reference
replies; both models answer every item through the Evals runner (serve.evals, the same runs the API makes), and
the tab shows their pass rates, mean ROUGE-L and reference perplexity, wins/ties/losses with the bootstrap 95%
interval of the mean difference, a plot, and the items that got worse. Model output and file text are shown as
plain text in tables, never as HTML. Every action follows the API's rule (serve.access).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import pandas as pd

from serve.access import LOCAL, AccessPolicy, Caller, request_caller
from serve.doctor import eval_items
from serve.evals import EvalError, EvalRunner
from serve.evals.held_out import evaluate_against
from serve.evals.store import ACTIVE
from ui.access import admit

logger = logging.getLogger(__name__)

TICK_S = 1.0
DEFAULT_ROWS = 100
SUMMARY = ["model", "runs", "pass rate (ROUGE-L ≥ 0.3)", "mean ROUGE-L", "reference perplexity", "items/s"]
WORSE = ["item", "user asked", "reference", "model in use", "candidate", "ROUGE-L in use", "ROUGE-L candidate"]


class EvalTab:
    """The tab's components and event functions over the server's EvalRunner."""

    def __init__(self, runner: Callable[[], EvalRunner], models: Callable[[], list[str]], in_use: Callable[[], str],
                 newest: Callable[[], str | None], base_model: str, access: AccessPolicy | None):
        # runner: the server's EvalRunner (opened on first use); models: the API's model ids; in_use: the id of the
        # model served by default (the production alias's target when one is set); newest: the adapter published
        # last (after a training job: the one to evaluate).
        self.runner, self.models, self.in_use, self.newest = runner, models, in_use, newest
        self.base_model, self.access = base_model, access

    def layout(self) -> None:
        """The tab's components (call inside a gr.Tab)."""
        gr.Markdown("Compare a candidate with the model in use on your own held-out dialogues: both answer "
                    "every conversation, and each reply is scored against the agent's real one.")
        with gr.Row():
            self.candidate = gr.Dropdown([], label="Candidate", elem_id="eval-candidate")
            self.against = gr.Dropdown([], label="Against (the model in use)", elem_id="eval-against")
            self.rows = gr.Number(DEFAULT_ROWS, label="Rows (0: all)", precision=0, minimum=0, elem_id="eval-rows")
        self.upload = gr.File(label="Held-out dialogues (.jsonl, .json, .csv: any format train.sft takes)",
                              type="filepath", file_types=[".jsonl", ".json", ".csv"], elem_id="eval-file")
        self.start_btn = gr.Button("Evaluate against the model in use", variant="primary", elem_id="eval-start")
        self.status = gr.Textbox(label="Evaluation", lines=2, interactive=False, elem_id="eval-status")
        self.summary = gr.Dataframe(pd.DataFrame(columns=SUMMARY), label="Results", interactive=False,
                                    elem_id="eval-summary")
        self.plot = gr.Plot(label="Per item: candidate minus model in use (ROUGE-L)", elem_id="eval-plot")
        self.worse = gr.Dataframe(pd.DataFrame(columns=WORSE), label="Items that got worse", interactive=False,
                                  wrap=True, elem_id="eval-worse")
        self.state = gr.State(None)  # {"eval_id", "run_a", "run_b"}
        self.timer = gr.Timer(TICK_S, active=False)

    def wire(self, demo: gr.Blocks) -> None:
        """Connect the tab's events."""
        quick = {"api_visibility": "private", "queue": False}
        shown = [self.status, self.summary, self.plot, self.worse, self.timer]
        demo.load(self.menus, None, [self.candidate, self.against], **quick)
        started = self.start_btn.click(self.start, [self.candidate, self.against, self.upload, self.rows],
                                       self.state, api_visibility="private")
        started.success(self.show, self.state, shown, **quick)
        self.timer.tick(self.show, self.state, shown, show_progress="hidden", **quick)

    def caller(self, request: gr.Request | None) -> Caller:
        """Who this request is (the rule of the API); gr.Error when it may not act at all."""
        admit(self.access, request, "an evaluation")
        return request_caller(self.access, request) if self.access is not None else Caller(LOCAL)

    def menus(self) -> tuple:
        """The model menus: the adapter published last as the candidate, the model in use against it."""
        models, in_use, newest = self.models(), self.in_use(), self.newest()
        candidate = newest if newest and newest != in_use else next((m for m in models if m != in_use), in_use)
        return gr.update(choices=models, value=candidate), gr.update(choices=models, value=in_use)

    def start(self, candidate: str | None, against: str | None, path: str | None, rows: float | None,
              request: gr.Request) -> dict:
        """Read the held-out file with the doctor, then queue a run of each model; gr.Error saying what to fix."""
        who = self.caller(request)
        if not candidate or not against:
            raise gr.Error("Choose the candidate and the model to compare it with.")
        if candidate == against:
            raise gr.Error("The candidate and the model in use are the same model: choose another candidate.")
        if not path:
            raise gr.Error("Upload a held-out dialogue file first.")
        report, items = eval_items(path, self.base_model, int(rows or 0))
        if not report.ok:
            raise gr.Error("The dataset doctor refused the file:\n" + "\n".join(report.problems()[:5]))
        try:
            return evaluate_against(self.runner(), who, items, candidate, against, self.models(),
                                    name=f"{candidate} vs {against} on {Path(path).name}")
        except EvalError as error:
            raise gr.Error(str(error)) from None

    def show(self, state: dict | None) -> tuple:
        """Progress while the runs go; then the comparison (the timer stops)."""
        if not state:
            return "", gr.update(), gr.update(), gr.update(), gr.Timer(active=False)
        store = self.runner().store
        runs = [store.get_run(None, state["eval_id"], state[key]) for key in ("run_a", "run_b")]
        if any(run["status"] in ACTIVE for run in runs):
            lines = [f"{run['model']}: {run['status']}, {run['progress']['done']}/{run['progress']['total']} items"
                     + (f", {run['progress']['items_per_second']} items/s, ETA {run['progress']['eta_seconds']} s"
                        if run["status"] == "in_progress" and run["progress"]["eta_seconds"] is not None else "")
                     for run in runs]
            return "\n".join(lines), gr.update(), gr.update(), gr.update(), gr.Timer(active=True)
        failed = [run for run in runs if run["status"] != "completed"]
        if failed:
            return ("\n".join(f"{run['model']}: {run['status']} {(run.get('error') or {}).get('message', '')}"
                              for run in failed), gr.update(), gr.update(), gr.update(), gr.Timer(active=False))
        compared = store.compare_runs(None, state["eval_id"], state["run_a"], state["run_b"], "rouge_l")
        return (compared["description"], summary_table(store, state, runs), plot(compared),
                worse_table(compared), gr.Timer(active=False))


def summary_table(store, state: dict, runs: list[dict]) -> pd.DataFrame:
    """One row per model: its pass rate, mean ROUGE-L, reference perplexity and speed."""
    rows = []
    for key, run in zip(("run_a", "run_b"), runs, strict=True):
        items = store.items(state["eval_id"], state[key])
        scores = {name: [r["score"] for i in items for r in i["results"] if r["name"] == name]
                  for name in ("rouge_l", "perplexity")}
        per = {r["testing_criteria"]: r for r in run["per_testing_criteria_results"]}
        graded = per["rouge_l"]["passed"] + per["rouge_l"]["failed"]
        rows.append([run["model"], run["id"], f"{per['rouge_l']['passed'] / max(graded, 1):.1%}",
                     round(sum(scores["rouge_l"]) / max(len(scores["rouge_l"]), 1), 4),
                     round(sum(scores["perplexity"]) / max(len(scores["perplexity"]), 1), 3),
                     run["progress"]["items_per_second"]])
    return pd.DataFrame(rows, columns=SUMMARY)


def worse_table(compared: dict) -> pd.DataFrame:
    """The items where the candidate scored lower, worst first (plain text)."""
    rows = []
    for worse in compared["worse"]:
        messages = worse["item"].get("messages") or []
        asked = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        rows.append([worse["datasource_item_id"], asked, worse["item"].get("reference", ""), worse["reply_a"],
                     worse["reply_b"], round(worse["a"], 3), round(worse["b"], 3)])
    return pd.DataFrame(rows, columns=WORSE)


def plot(compared: dict):
    """Wins/ties/losses, and the per-item differences with the mean and its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1, 2]})
    counts = [compared["wins"], compared["ties"], compared["losses"]]
    left.bar(["wins", "ties", "losses"], counts, color=["#2e8b57", "#9aa5b1", "#c0392b"])
    for x, count in enumerate(counts):
        left.annotate(str(count), (x, count), ha="center", va="bottom", fontsize=9)
    left.set_title(f"{compared['model_b']} vs {compared['model_a']}")
    differences = [p["b"] - p["a"] for p in compared["per_item"]]
    right.hist(differences, bins=min(30, max(5, len(differences) // 3)), color="#2b7bba")
    low, high = compared["interval"]
    right.axvspan(low, high, color="#f1c40f", alpha=0.35, label=f"95% interval [{low:+.3f}, {high:+.3f}]")
    right.axvline(compared["mean_difference"], color="black", label=f"mean {compared['mean_difference']:+.3f}")
    right.axvline(0, color="#777", linestyle=":")
    right.set_xlabel("ROUGE-L difference per item (positive: the candidate is better)")
    right.legend(fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig
