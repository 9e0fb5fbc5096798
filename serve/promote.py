"""`python -m serve.promote`: move a model alias (serve.promotion) from the command line.

    python -m serve.promote MODEL [--alias production] [--adapters-dir D] [--jobs-dir J] [--criterion NAME]
                                  [--min-pass-rate 0.8]           # through the gate
    python -m serve.promote MODEL --force --reason TEXT           # past the gate, the reason recorded
    python -m serve.promote --rollback [--alias production]       # back to the model before the last promotion
    python -m serve.promote [--alias production]                  # what the alias serves, and its history

MODEL is a model id as /v1/models lists it ("base" or an adapter's name in --adapters-dir). The gate reads the
newest eval with completed runs of MODEL and of the alias's current model from <jobs-dir>/evals (the server's
--jobs-dir). A server on the same adapters folder follows within a second, without a restart. Exit 0 when done,
1 when refused (the message says why, with the evaluation's figures, and the fix), 2 for a bad command line.
"""

from __future__ import annotations

import getpass
import logging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from assistant.logs import configure
from serve.promotion import BASE_ID, DEFAULT_ALIAS, EvidenceFn, PromotionError, Promotions, evidence_from
from serve.registry import BASE_CHOICE, ModelRegistry

logger = logging.getLogger(__name__)

PROG = "python -m serve.promote"
HISTORY_SHOWN = 10


@dataclass
class PromoteConfig:
    """Options of `python -m serve.promote`."""

    model: str | None = field(
        default=None,
        metadata={"help": "The model to promote ('base' or an adapter's name), also given as the first word."},
    )
    alias: str = field(default=DEFAULT_ALIAS, metadata={"help": "The alias to move (the app serves --alias's)."})
    adapters_dir: str = field(
        default="adapters", metadata={"help": "The server's --adapters-dir: its adapters, aliases and history."}
    )
    jobs_dir: str = field(
        default="jobs", metadata={"help": "The server's --jobs-dir: where its evals (the gate's evidence) are."}
    )
    criterion: str | None = field(
        default=None, metadata={"help": "The eval's testing criterion the gate reads (unset: the eval's first)."}
    )
    min_pass_rate: float | None = field(
        default=None, metadata={"help": "Also refuse a candidate whose pass rate is below this (0 to 1)."}
    )
    force: bool = field(default=False, metadata={"help": "Skip the gate; needs --reason, which is recorded."})
    reason: str | None = field(default=None, metadata={"help": "Why (required with --force; recorded)."})
    rollback: bool = field(
        default=False, metadata={"help": "Move the alias back to the model it served before its last promotion."}
    )


def parse(argv: list[str]) -> PromoteConfig:
    """The config from `argv` (MODEL as its first plain word); exits 2 with the reason on a bad line."""
    parser = HfArgumentParser(PromoteConfig, prog=PROG, allow_abbrev=False,
                              usage=f"{PROG} [MODEL] [options]", description=(__doc__ or "").strip().split("\n\n")[0])
    config, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    words = [a for a in rest if not a.startswith("-")]
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    if len(words) > 1 or (words and config.model):
        parser.error(f"give one model to promote, not {' '.join(filter(None, [config.model, *words]))}")
    config.model = config.model or (words[0] if words else None)
    if config.rollback and config.model:
        parser.error("--rollback takes no MODEL: it moves the alias back to the model before its last promotion")
    if config.force and not (config.reason or "").strip():
        parser.error("--force needs --reason TEXT: why the gate is skipped (it is recorded in the history)")
    return config


def evidence_for(config: PromoteConfig) -> EvidenceFn:
    """The gate's evidence for the command: the evals of the server's --jobs-dir (serve.evals)."""
    return evidence_from(config.jobs_dir, config.criterion)


def promotions_for(config: PromoteConfig) -> Promotions:
    """The aliases of --adapters-dir, with the models a server on that folder lists and serves by default."""
    registry = ModelRegistry(config.adapters_dir, alias=config.alias)  # lists folders; loads no model
    return Promotions(
        config.adapters_dir, models=lambda: [BASE_ID, *registry.adapters],
        default=lambda: BASE_ID if (choice := registry.default_choice()) == BASE_CHOICE else choice,
        evidence=evidence_for(config),
    )


def main(argv: list[str] | None = None) -> int:
    """Promote, roll back or show one alias; returns the exit status."""
    configure(logging.WARNING)
    config = parse(sys.argv[1:] if argv is None else list(argv))
    promotions = promotions_for(config)
    who = f"cli:{getpass.getuser()}"
    try:
        if config.rollback:
            record = promotions.rollback(config.alias, who=who, reason=config.reason)
        elif config.model:
            record = promotions.promote(config.alias, config.model, who=who, force=config.force,
                                        reason=config.reason, min_pass_rate=config.min_pass_rate)
        else:
            target = promotions.aliases().get(config.alias)
            print(f"{config.alias} -> {target or '(unset)'}; serving {promotions.current(config.alias)}")
            for record in promotions.history(config.alias, HISTORY_SHOWN):
                print(f"  {record.describe()}")
            return 0
    except PromotionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(record.describe())
    if record.evidence:
        print(f"evidence: {record.evidence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
