"""Evaluations the OpenAI way: evals and their runs over the served models, graded, compared, kept on disk.

definition (what an eval and a run may ask) -> store (evals, runs, output items, comparisons, the promotion
gate's evidence) -> runner (runs as background jobs) -> api (the /v1/evals routes).
"""

from serve.evals.api import EvalsServer, item_source
from serve.evals.definition import EvalError
from serve.evals.evidence import Evidence
from serve.evals.runner import EvalRunner
from serve.evals.store import EvalStore

__all__ = ["EvalError", "EvalRunner", "EvalStore", "EvalsServer", "Evidence", "item_source"]
