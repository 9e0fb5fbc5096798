"""Model aliases and their promotions: the one owner of which model a name such as `production` serves.

State lives in the adapters folder, beside the adapters it names (hidden files: the adapter scan lists only
folders, never these):
- `.aliases.json`: {alias: model id}, model ids as /v1/models lists them ("base" or an adapter's name); written
  whole to a temp file, fsynced and swapped in (os.replace), so a reader (every server on this folder, on
  its next scan) never sees half of it;
- `.promotions.jsonl`: one line per move, oldest first: time, action (promote | rollback), alias, model,
  previous, who, reason, forced, and the evaluation it passed (its describe() text and figures).
Every change takes `.promotions.lock` (flock) for its read-check-write, so two promoters never interleave.

The gate (`check_gate`): a candidate replaces the alias's current model only when the newest evaluation of
both (serve.evals, injected as `evidence`) shows its pass rate on the criterion no lower than the current
model's (and not below `min_pass_rate` when given), and the paired comparison is not significantly worse
(the whole 95% interval below zero). `force` with a reason skips it; the reason is recorded. Rollback moves
the alias back to the previous model of its newest promotion not yet rolled back (a stack: rolling back
twice undoes two promotions), without the gate: that model was served before.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serve.evals import EvalStore, Evidence

logger = logging.getLogger(__name__)

BASE_ID = "base"  # the API's id of the base model (no adapter)
DEFAULT_ALIAS = "production"
ALIASES_FILE = ".aliases.json"
HISTORY_FILE = ".promotions.jsonl"
LOCK_FILE = ".promotions.lock"
ALIAS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

EvidenceFn = Callable[[str, str], Evidence | None]  # (candidate, current) -> the newest evaluation of both


class PromotionError(Exception):
    """A promotion or rollback refused: the message says why (with the evaluation's figures) and the fix."""

    def __init__(self, message: str, param: str | None = None, status: int = 409, code: str = "promotion_refused"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Record:
    """One line of the promotions history."""

    time: float
    action: str  # "promote" or "rollback"
    alias: str
    model: str | None  # None: the alias was removed (a rollback of its first promotion)
    previous: str | None  # what the alias pointed to before (None: it was not set)
    who: str
    reason: str | None = None
    forced: bool = False
    evidence: str | None = None  # Evidence.describe() of the evaluation the gate passed
    figures: dict | None = None  # the same evaluation as numbers (figures_of)
    id: str = field(default_factory=lambda: f"promo_{uuid.uuid4().hex[:16]}")

    def to_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)

    def describe(self) -> str:
        """One line: when, what moved where, who, why."""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time))
        verb = "rolled back" if self.action == "rollback" else ("force-promoted" if self.forced else "promoted")
        line = f"{when} {self.who} {verb} {self.alias}: {self.previous or '(unset)'} -> {self.model or '(unset)'}"
        return line + (f" ({self.reason})" if self.reason else "")


def figures_of(evidence: Evidence) -> dict:
    """The evaluation's numbers as a history record keeps them (the per-item list of worse items left out)."""
    comparison = {k: v for k, v in evidence.comparison.to_dict().items() if k != "worse"}
    return {"eval_id": evidence.eval_id, "criterion": evidence.criterion, "candidate": evidence.candidate,
            "current": evidence.current, "candidate_run": evidence.candidate_run, "current_run": evidence.current_run,
            "candidate_pass_rate": evidence.candidate_pass_rate, "current_pass_rate": evidence.current_pass_rate,
            "comparison": comparison}


def how_to_evaluate(candidate: str, current: str) -> str:
    """What to run so the gate has evidence for `candidate` against `current`."""
    return (f"run one eval on both models first (POST /v1/evals/{{eval_id}}/runs, or client.evals.runs.create, once "
            f"with model {candidate!r} and once with model {current!r}), wait for both runs to complete, then promote "
            "again; or promote with force and a reason to skip the gate (--force --reason TEXT; API: \"force\": true "
            "and a \"reason\")")


def check_gate(candidate: str, current: str, evidence: EvidenceFn | None,
               min_pass_rate: float | None = None) -> Evidence:
    """The evaluation that lets `candidate` replace `current`; PromotionError (quoting its figures) otherwise."""
    found = None
    if evidence is not None:
        try:
            found = evidence(candidate, current)
        except ValueError as error:  # e.g. serve.evals.EvalError: the eval has no such criterion
            raise PromotionError(f"Cannot read the evaluation of {candidate!r} against {current!r}: {error}",
                                 "criterion", status=400, code="invalid_value") from None
    if found is None:
        raise PromotionError(f"No evaluation compares {candidate!r} with the current model {current!r}: "
                             + how_to_evaluate(candidate, current) + ".", "model", code="evaluation_required")
    figures = found.describe()
    if min_pass_rate is not None and found.candidate_pass_rate < min_pass_rate:
        raise PromotionError(f"Refused: {candidate!r} passes {found.candidate_pass_rate:.1%} of the items, below the "
                             f"required {min_pass_rate:.1%}. Evidence: {figures}", "model")
    if found.candidate_pass_rate < found.current_pass_rate:
        raise PromotionError(f"Refused: {candidate!r} passes fewer items than the current model {current!r} "
                             f"({found.candidate_pass_rate:.1%} vs {found.current_pass_rate:.1%}). Evidence: {figures}",
                             "model")
    if found.comparison.significantly_worse:
        low, high = found.comparison.interval
        raise PromotionError(f"Refused: {candidate!r} scores worse than the current model {current!r} beyond the "
                             f"noise (95% interval of the difference {low:+.4f} to {high:+.4f}, all below zero). "
                             f"Evidence: {figures}", "model")
    return found


def evidence_from(jobs_dir: str | Path, criterion: str | None = None) -> EvidenceFn:
    """The gate's evidence: the newest eval with completed runs of both models, as serve.evals keeps them under
    <jobs_dir>/evals (the server's --jobs-dir); `criterion` None: each eval's first testing criterion."""
    store = EvalStore(Path(jobs_dir) / "evals")
    return lambda candidate, current: store.evidence(candidate, current, criterion)


def read_aliases(folder: str | Path | None) -> dict[str, str]:
    """Alias -> model id from `folder`'s alias file ({} when there is none, or it cannot be read: logged)."""
    if folder is None:
        return {}
    path = Path(folder) / ALIASES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        logger.warning("%s cannot be read (%s); no alias is served until it is fixed or promoted again", path, error)
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        logger.warning("%s is not a JSON object of alias names to model names; ignored", path)
        return {}
    return data


class Promotions:
    """The aliases of one adapters folder, moved through the gate; what the command, the API and the app call.

    `models` lists the model ids that can be served now ("base" and the listed adapters); `default` is the model
    served when an alias is unset; `evidence` is the gate's input (evidence_from); `on_change` runs after each
    move (a server in this process lists the folder again at once instead of on its next scan)."""

    def __init__(self, folder: str | Path, *, models: Callable[[], Collection[str]], default: Callable[[], str],
                 evidence: EvidenceFn | None = None, on_change: Callable[[], None] | None = None):
        self.folder = Path(folder)
        self.models, self.default, self.evidence, self.on_change = models, default, evidence, on_change

    # -- reading ----------------------------------------------------------------------------------------
    def aliases(self) -> dict[str, str]:
        """Alias -> model id, as the alias file says now."""
        return read_aliases(self.folder)

    def history(self, alias: str | None = None, limit: int | None = None) -> list[Record]:
        """The moves of `alias` (None: of every alias), newest first; torn or foreign lines are skipped."""
        path = self.folder / HISTORY_FILE
        records = []
        for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else ():
            try:
                records.append(Record(**json.loads(line)))
            except (ValueError, TypeError):  # a torn last line from a kill mid-write
                continue
        records = [r for r in reversed(records) if alias is None or r.alias == alias]
        return records[:limit] if limit is not None else records

    def current(self, alias: str) -> str:
        """The model `alias` serves now: its target when that can be served, else the default model."""
        target = self.aliases().get(alias)
        return target if target is not None and target in self.models() else self.default()

    # -- moving -----------------------------------------------------------------------------------------
    def promote(self, alias: str, model: str, *, who: str, force: bool = False, reason: str | None = None,
                min_pass_rate: float | None = None) -> Record:
        """Point `alias` at `model` if the gate lets it (or `force` with a reason); PromotionError otherwise."""
        reason = (reason or "").strip() or None
        if force and not reason:
            raise PromotionError("A forced promotion needs a reason (it is recorded in the history): give one "
                                 "with --reason TEXT (API: \"reason\").", "reason", status=400, code="missing_reason")
        self._check_alias(alias)
        if min_pass_rate is not None and not 0.0 <= min_pass_rate <= 1.0:
            raise PromotionError(f"min_pass_rate must be between 0 and 1, not {min_pass_rate}.", "min_pass_rate",
                                 status=400, code="invalid_value")
        models = list(self.models())
        if model not in models:
            raise PromotionError(f"No model {model!r} is served from {self.folder}: choose one of {', '.join(models)}.",
                                 "model", status=404, code="model_not_found")
        with self._locked():
            aliases = self.aliases()
            previous = aliases.get(alias)
            current = previous if previous in models else self.default()
            found = None
            if model == previous:
                raise PromotionError(f"{alias!r} already serves {model!r}; nothing to promote.", "model")
            if force:
                logger.warning("%s force-promotes %s to %s without the gate: %s", who, alias, model, reason)
            elif model != current:  # pinning the model already served by default changes nothing served
                found = check_gate(model, current, self.evidence, min_pass_rate)
            record = Record(time.time(), "promote", alias, model, previous, who, reason, force,
                            found.describe() if found else None, figures_of(found) if found else None)
            self._write(record, {**aliases, alias: model})
        logger.info("%s", record.describe())
        return record

    def rollback(self, alias: str, *, who: str, reason: str | None = None) -> Record:
        """Point `alias` back at the model it served before its newest promotion not yet rolled back."""
        self._check_alias(alias)
        with self._locked():
            undone, target = 0, None
            for record in self.history(alias):
                if record.action == "rollback":
                    undone += 1
                elif undone:
                    undone -= 1
                else:
                    target = record
                    break
            if target is None:
                raise PromotionError(f"{alias!r} has no promotion to roll back (its history is in "
                                     f"{self.folder / HISTORY_FILE}).", "alias", code="nothing_to_roll_back")
            back = target.previous
            if back is not None and back not in self.models():
                raise PromotionError(f"Cannot roll {alias!r} back to {back!r}: it is no longer served from "
                                     f"{self.folder}. Promote another model instead.", "alias")
            aliases = self.aliases()
            record = Record(time.time(), "rollback", alias, back, aliases.get(alias), who,
                            (reason or "").strip() or f"undoes {target.id}")
            rest = {k: v for k, v in aliases.items() if k != alias}
            self._write(record, rest if back is None else {**rest, alias: back})
        logger.info("%s", record.describe())
        return record

    # -- files ------------------------------------------------------------------------------------------
    def _check_alias(self, alias: str) -> None:
        if not ALIAS_NAME.fullmatch(alias or "") or alias == BASE_ID:
            raise PromotionError(f"{alias!r} is not an alias name: use letters, digits, '.', '_' or '-' (not "
                                 f"starting with '.' or '-', at most 64), other than {BASE_ID!r}.", "alias",
                                 status=400, code="invalid_value")
        if (self.folder / alias).is_dir():
            raise PromotionError(f"{alias!r} is the name of a folder in {self.folder}: an alias must not hide a "
                                 "model of the same name; choose another alias name.", "alias", status=400,
                                 code="invalid_value")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This folder's promotion lock, across threads and processes (flock on a fresh open file each time)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, record: Record, aliases: dict[str, str]) -> None:
        # The history first: a crash between the two leaves a record whose rollback is harmless, never a moved
        # alias without the record a rollback needs.
        with open(self.folder / HISTORY_FILE, "a", encoding="utf-8") as history:
            history.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
            history.flush()
            os.fsync(history.fileno())
        path = self.folder / ALIASES_FILE
        temporary = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(temporary, "w", encoding="utf-8") as out:
            json.dump(aliases, out, indent=1, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        directory = os.open(self.folder, os.O_RDONLY)
        try:  # the rename itself survives a power cut only once the folder is synced
            os.fsync(directory)
        finally:
            os.close(directory)
        if self.on_change is not None:
            self.on_change()
