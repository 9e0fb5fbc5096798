"""How a reply is scored against a reference, and how two models' scores on the same items compare.

The one owner of reply scores: train.eval, train.sampling, the Evals API's graders (serve.evals) and the
promotion gate all score with these functions, so a "ROUGE-L of 0.31" means the same everywhere.

Metrics (OpenAI's `text_similarity` names; each a score from 0 to 1, higher is better):
- `rouge_l`: ROUGE-L F1 with stemming (rouge_score);
- `bleu`: sentence BLEU with exponential smoothing (sacrebleu), divided by 100;
- `fuzzy_match`: difflib's similarity ratio of the two texts.
`string_check` operations: `eq`, `ne`, `like` (the input contains the reference), `ilike` (the same,
ignoring case), as OpenAI's graders define them.

`compare` pairs two models' per-item scores: wins, ties and losses, the mean difference with a bootstrap 95%
interval, and the items that got worse.
"""

from __future__ import annotations

import difflib
import functools
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

METRICS = ("rouge_l", "bleu", "fuzzy_match")
OPERATIONS = ("eq", "ne", "like", "ilike")
TIE = 1e-9  # score differences this small are ties
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0  # a rerun on the same scores gives the same interval


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imported on first use: it is slow to import

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, reply: str) -> float:
    """ROUGE-L F1 of `reply` against `reference` (stemmed)."""
    return _rouge_scorer().score(reference, reply)["rougeL"].fmeasure


def bleu(reference: str, reply: str) -> float:
    """Sentence BLEU of `reply` against `reference`, from 0 to 1 (sacrebleu, exponential smoothing)."""
    import sacrebleu  # imported on first use: it is slow to import

    return sacrebleu.sentence_bleu(reply, [reference]).score / 100.0


def fuzzy_match(reference: str, reply: str) -> float:
    """difflib's similarity ratio of the two texts, from 0 to 1."""
    return difflib.SequenceMatcher(None, reference, reply, autojunk=False).ratio()


SIMILARITY = {"rouge_l": rouge_l, "bleu": bleu, "fuzzy_match": fuzzy_match}


def similarity(metric: str, reference: str, reply: str) -> float:
    """The `metric` (one of METRICS) of `reply` against `reference`."""
    if metric not in SIMILARITY:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return SIMILARITY[metric](reference, reply)


def string_check(operation: str, text: str, reference: str) -> bool:
    """OpenAI's string_check: `eq`, `ne`, `like` (contains), `ilike` (contains, ignoring case)."""
    if operation == "eq":
        return text == reference
    if operation == "ne":
        return text != reference
    if operation == "like":
        return reference in text
    if operation == "ilike":
        return reference.lower() in text.lower()
    raise ValueError(f"unknown operation {operation!r}; choose one of {', '.join(OPERATIONS)}")


@dataclass
class Comparison:
    """Model B against model A on the same items (B minus A: positive means B is better)."""

    items: int
    wins: int  # items where B scored higher
    ties: int
    losses: int
    mean_a: float
    mean_b: float
    mean_difference: float
    interval: tuple[float, float]  # bootstrap 95% interval of the mean difference
    worse: list[dict] = field(default_factory=list)  # the items B lost, worst first: {"index", "a", "b", "difference"}

    @property
    def significantly_worse(self) -> bool:
        """True when the whole interval lies below zero: B is worse beyond the noise of these items."""
        return self.interval[1] < 0

    def to_dict(self) -> dict:
        """JSON-ready."""
        out = asdict(self)
        out["interval"] = list(self.interval)
        out["significantly_worse"] = self.significantly_worse
        return out

    def describe(self, a: str = "A", b: str = "B", metric: str = "score") -> str:
        """One line, e.g. 'adapter vs base on 100 items: 61 wins, 9 ties, 30 losses; mean rouge_l 0.31 vs 0.22
        (difference +0.09, 95% interval +0.05 to +0.13)'."""
        low, high = self.interval
        return (f"{b} vs {a} on {self.items} items: {self.wins} wins, {self.ties} ties, {self.losses} losses; "
                f"mean {metric} {self.mean_b:.4f} vs {self.mean_a:.4f} (difference {self.mean_difference:+.4f}, "
                f"95% interval {low:+.4f} to {high:+.4f})")


def compare(a: Sequence[float], b: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES,
            seed: int = BOOTSTRAP_SEED, worst: int = 20) -> Comparison:
    """Pair B's scores with A's item by item (the same items, in the same order)."""
    if len(a) != len(b):
        raise ValueError(f"the two models scored different numbers of items ({len(a)} and {len(b)})")
    if not a:
        raise ValueError("no items to compare")
    differences = [y - x for x, y in zip(a, b, strict=True)]
    n = len(differences)
    rng = random.Random(seed)
    means = sorted(sum(differences[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    low, high = means[int(0.025 * (samples - 1))], means[int(0.975 * (samples - 1))]
    worse = sorted((i for i, d in enumerate(differences) if d < -TIE), key=lambda i: differences[i])[:worst]
    return Comparison(
        items=n,
        wins=sum(d > TIE for d in differences),
        ties=sum(abs(d) <= TIE for d in differences),
        losses=sum(d < -TIE for d in differences),
        mean_a=round(sum(a) / n, 6),
        mean_b=round(sum(b) / n, 6),
        mean_difference=round(sum(differences) / n, 6),
        interval=(round(low, 6), round(high, 6)),
        worse=[{"index": i, "a": round(a[i], 6), "b": round(b[i], 6), "difference": round(differences[i], 6)}
               for i in worse],
    )
