"""`python -m serve.vllm ADAPTER... [--base-model M] [--print]`: serve LoRA adapters on vLLM.

Checks that every adapter is servable by vLLM's multi-LoRA before a GPU is spent on it, then runs
(or prints) the exact `vllm serve ... --enable-lora --lora-modules name=path` command. The chat UI
fronts the result with `python -m ui --backend-url http://HOST:8000/v1`.

The API key reaches vLLM through its environment ($VLLM_API_KEY, which vLLM reads), never its argv:
a command line shows in `ps` to every user of the machine, and `--print` shows no key.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from assistant.adapters import AdapterFolder, read_folder
from assistant.embedded import EMBEDDED, embedded_model_dir
from assistant.loading import base_of
from serve.access import is_loopback

logger = logging.getLogger(__name__)

# vLLM's --max-lora-rank accepts these values only.
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# Layers vLLM's LoRA kernels cover in Llama-style models (all-linear in peft resolves to these).
VLLM_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "all-linear"}


class NotServable(ValueError):
    """An adapter vLLM cannot serve, with the reason and the fix."""


@dataclass
class VLLMConfig:
    """Options of `python -m serve.vllm`."""

    adapters: list[str] = field(default_factory=list, metadata={"help": "LoRA adapter folders (positional)."})
    base_model: str | None = field(
        default=None, metadata={"help": "Base model; default: the adapters' own base."}
    )
    host: str = field(default="0.0.0.0", metadata={"help": "Address vLLM binds."})
    port: int = field(default=8000, metadata={"help": "Port vLLM listens on."})
    api_key_file: str | None = field(
        default=None,
        metadata={"help": "File holding the bearer key vLLM requires (handed over as $VLLM_API_KEY); unset, "
                          "$VLLM_API_KEY if set, else vLLM serves without a key."},
    )
    max_model_len: int = field(default=4096, metadata={"help": "Context length vLLM allocates for."})
    print_only: bool = field(
        default=False, metadata={"help": "Print the command instead of running it.", "aliases": ["--print"]}
    )


def check_adapter(folder: str | Path) -> AdapterFolder:
    """The adapter folder (assistant.adapters.read_folder), if vLLM's multi-LoRA can serve it; NotServable
    otherwise."""
    adapter = read_folder(folder)
    if adapter.kind is None:
        raise NotServable(adapter.problem)
    if adapter.kind == "merged":
        raise NotServable(
            f"{folder}: a merged model, not an adapter; serve it as vLLM's model (vllm serve {folder}) "
            "or serve the adapter it was merged from"
        )
    if adapter.kind == "prefix":
        raise NotServable(
            f"{folder}: a prefix adapter cannot be served by vLLM, which serves LoRA only; merge it "
            "(python -m train.merge, LoRA only) or retrain with --method lora"
        )
    if adapter.kind == "dora":
        raise NotServable(f"{folder}: vLLM does not serve DoRA adapters; retrain without --use-dora")
    if adapter.problem:  # e.g. no weights
        raise NotServable(adapter.problem)
    info = adapter.config
    rank = int(info.get("r", 0))
    if rank > max(VLLM_RANKS):
        raise NotServable(
            f"{folder}: LoRA rank {rank} exceeds vLLM's maximum {max(VLLM_RANKS)}; retrain with a lower --lora-rank"
        )
    targets = info.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    unknown = sorted(set(targets) - VLLM_MODULES)
    if unknown:
        raise NotServable(
            f"{folder}: vLLM's LoRA does not cover {', '.join(unknown)}; target linear layers only"
        )
    if info.get("modules_to_save"):
        raise NotServable(
            f"{folder}: modules_to_save ({info['modules_to_save']}) is not served by vLLM's LoRA"
        )
    return adapter


def vllm_command(config: VLLMConfig) -> list[str]:
    """The `vllm serve` command line for the checked adapters."""
    if not config.adapters:
        raise NotServable("give at least one LoRA adapter folder")
    folders = [check_adapter(a) for a in config.adapters]
    for adapter, folder in zip(config.adapters, folders, strict=True):
        prompt = folder.prompt
        if prompt is not None and prompt.source not in ("template default", "none"):
            # vLLM renders chats without a system message with the template's default, not this one.
            logger.warning(
                "%s was trained with the system prompt %r: vLLM does not add it, so clients must send it",
                adapter, prompt.text,
            )
    bases = {base_of(config.base_model, a) for a in config.adapters}
    if len(bases) > 1:
        raise NotServable(
            f"the adapters were trained on different base models ({', '.join(sorted(bases))}); "
            "vLLM serves adapters of one base model at a time"
        )
    base = bases.pop()
    model = str(embedded_model_dir()) if base == EMBEDDED else base
    rank = next(r for r in VLLM_RANKS if r >= max(int(f.config.get("r", 8)) for f in folders))
    modules = [f"{Path(a).resolve().name}={Path(a).resolve()}" for a in config.adapters]
    command = [
        "vllm",
        "serve",
        model,
        "--served-model-name",
        "base",
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--max-model-len",
        str(config.max_model_len),
        "--enable-lora",
        "--max-lora-rank",
        str(rank),
        "--max-loras",
        str(len(modules)),
        "--lora-modules",
        *modules,
    ]
    return command


def api_key(config: VLLMConfig) -> str | None:
    """The key vLLM will require: --api-key-file's content, else $VLLM_API_KEY."""
    if config.api_key_file:
        try:
            key = Path(config.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise NotServable(f"--api-key-file {config.api_key_file}: cannot read it ({error.strerror})") from None
        if not key:
            raise NotServable(f"--api-key-file {config.api_key_file} is empty: write the key into it")
        return key
    return os.environ.get("VLLM_API_KEY", "").strip() or None


def shown_command(command: list[str], config: VLLMConfig) -> str:
    """The command as `--print` shows it: runnable, with the key read from where it is kept, not its value."""
    line = shlex.join(command)
    if config.api_key_file:
        return f'VLLM_API_KEY="$(cat {shlex.quote(config.api_key_file)})" {line}'
    return line


def main(argv: list[str] | None = None) -> int:
    """Check the adapters, then run or print the vLLM command."""
    parser = HfArgumentParser(
        VLLMConfig,
        prog="python -m serve.vllm",
        usage="python -m serve.vllm ADAPTER... [--base-model M] [--api-key-file FILE] [--print]",
        allow_abbrev=False,  # `--api-key SECRET` must not quietly become `--api-key-file SECRET`
    )
    args = sys.argv[1:] if argv is None else argv
    if any(a.split("=", 1)[0] == "--api-key" for a in args):
        parser.error("--api-key was removed: a key on the command line shows in `ps`; use $VLLM_API_KEY "
                     "or --api-key-file FILE")
    config, rest = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:  # names only: the value after an unknown option may be a secret
        parser.error(f"unrecognised options: {' '.join(unknown)}")
    config.adapters += rest
    try:
        command = vllm_command(config)
        key = api_key(config)
    except (NotServable, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if key is None and not is_loopback(config.host):
        logger.warning("vLLM will answer anyone who can reach %s:%d: set $VLLM_API_KEY or --api-key-file",
                       config.host, config.port)
    if config.print_only:
        if key and not config.api_key_file:
            print("# vLLM reads its key from $VLLM_API_KEY: set it where this command runs", file=sys.stderr)
        print(shown_command(command, config))
        return 0
    if shutil.which(command[0]) is None:
        print(
            "error: vLLM is not installed here (it needs a CUDA GPU): `pip install vllm` on the GPU machine, "
            "or pass --print to get the command",
            file=sys.stderr,
        )
        return 2
    env = {**os.environ, **({"VLLM_API_KEY": key} if key else {})}
    os.execvpe(command[0], command, env)  # replaces this process: vLLM's own signals and exit code
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
