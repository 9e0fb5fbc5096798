"""Command-line parsing shared by the train entry points: one config dataclass, one positional path."""

from __future__ import annotations

from transformers import HfArgumentParser


def parse_with_positional(config_class, argv: list[str], positional: str, usage: str, description: str = ""):
    """Parse `argv` into `config_class`; one bare argument fills the field `positional` (also --positional)."""
    parser = HfArgumentParser(
        config_class, prog=usage.split(" [")[0].rsplit(" ", 1)[0], usage=usage, description=description
    )
    config, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    bare = [a for a in rest if not a.startswith("-")]
    if len(bare) != len(rest) or len(bare) > 1 or (bare and getattr(config, positional)):
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if bare:
        setattr(config, positional, bare[0])
    if not getattr(config, positional):
        parser.error(f"{positional.upper()} is required: {usage}")
    return config
