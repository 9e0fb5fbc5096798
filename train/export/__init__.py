"""`python -m train.export ADAPTER --to merged|gguf|ollama --output-dir DIR`: take an adapter to other runtimes.

- merged: the adapter folded into a standalone model folder (what `train.merge` writes).
- gguf: the adapter as a GGUF LoRA for llama.cpp, beside a copy of the base model's GGUF.
- ollama: the gguf files plus a Modelfile whose TEMPLATE renders chats exactly as the trained chat
  template does (checked by rendering), with the trained system prompt and the end-of-turn stop.

`--verify` loads the exported files in llama.cpp and compares its greedy replies with this project's
runtime token by token; a divergence in the first tokens is an error, not a warning.

`--events-file F` appends progress as JSON lines (train.events' format): a "phase" line as each phase starts
(with "progress", the share of the work done), then "done" (with the summary) or "error": what the app's
export runner (serve.exports) reads. The phases are logged too.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from assistant.adapters import adapter_info, messages_for, read_folder
from assistant.chat_format import TemplateError
from assistant.embedded import is_embedded
from assistant.loading import base_of, generation_defaults_of
from assistant.logs import configure
from train.cli import parse_with_positional
from train.events import EventLog
from train.export.gguf_lora import ExportError, refuse_unsupported, write_lora_gguf
from train.export.roundtrip import TIE_SWING, VERIFY_QUESTIONS
from train.merge import MergeConfig, check_output_dir, merge
from train.records import load_examples

logger = logging.getLogger(__name__)

TARGETS = ("merged", "gguf", "ollama")
EXPORT_RECORD = "export.json"  # marks a folder train.export wrote (so a new export may replace it)
LORA_FILE = "adapter.gguf"
MODELFILE = "Modelfile"
@dataclass
class ExportConfig:
    """Options of `python -m train.export`."""

    adapter: str | None = field(default=None, metadata={"help": "Adapter folder from train.sft (positional)."})
    to: str = field(default="ollama", metadata={"help": "What to write: merged, gguf or ollama."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Folder to write; default: exports/<adapter name>-<to>."}
    )
    base_gguf: str | None = field(
        default=None,
        metadata={
            "help": "The base model as GGUF (gguf, ollama). Default: the embedded model's own Q4_1 file. For "
            "another base, convert it once with llama.cpp: python convert_hf_to_gguf.py BASE_FOLDER --outfile "
            "base.gguf"
        },
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "The adapter's base model: merged into (merged); its tokenizer's stops and sampling "
                          "defaults (ollama), the model verified against (gguf, ollama). Default: the adapter's own "
                          "base. For a base other than the embedded model, give its --base-gguf too."},
    )
    precision: str = field(default="fp32", metadata={"help": "Merged weights' dtype: fp32, bf16 or fp16."})
    verify: bool = field(
        default=False,
        metadata={
            "help": "Compare llama.cpp's greedy replies with ours token by token (gguf, ollama), building "
            "llama.cpp's Python binding from source first if it is not here. Without it: verified when the "
            "binding is already here."
        },
    )
    skip_verify: bool = field(default=False, metadata={"help": "Do not compare with llama.cpp."})
    verify_data: str | None = field(
        default=None,
        metadata={"help": "Chats to verify with (any train.sft format); default: four built-in support questions."},
    )
    verify_prompts: int = field(default=4, metadata={"help": "How many chats of --verify_data to verify with."})
    verify_tokens: int = field(default=64, metadata={"help": "Greedy reply length compared per chat."})
    must_match: int = field(
        default=16, metadata={"help": "Tokens that must match from the start of every reply (fewer: an error)."}
    )
    tie_logits: float = field(
        default=TIE_SWING,
        metadata={"help": "A difference counts as a numerical near tie when the two engines' preferences add up to "
                          "less than this many logits (llama.cpp's 8-bit activations drift more on adapters that "
                          "move activations far from the base's)."},
    )
    threads: int = field(default=2, metadata={"help": "llama.cpp threads while verifying."})
    events_file: str | None = field(
        default=None,
        metadata={"help": "Append progress as JSON lines to this file (phases with the share done, then done or "
                          "error): what the app's exports read."},
    )


def default_output(config: ExportConfig) -> Path:
    """exports/<adapter name>-<target> unless --output-dir is given."""
    return Path(config.output_dir or Path("exports") / f"{Path(config.adapter).resolve().name}-{config.to}")


def export_base(config: ExportConfig) -> str:
    """The base model an export is for, decided once: --base-model, else the adapter's own base as the app
    serves it (assistant.loading.base_of over read_folder(adapter).base). Its GGUF, its stop tokens, its
    sampling defaults, the merge and the verification all follow this one answer."""
    return base_of(config.base_model, config.adapter)


def base_gguf_for(base: str, given: str | None) -> Path:
    """The GGUF of `base` (export_base's answer): the one given, else the embedded model's shipped file."""
    if given:
        return Path(given)
    if is_embedded(base):
        from assistant.embedded import gguf_path

        return gguf_path()
    raise ExportError(
        f"the base model {base!r} has no GGUF here. Convert it once with llama.cpp "
        f"(python convert_hf_to_gguf.py {base} --outfile base.gguf; use the Hub snapshot folder for a Hub id), "
        "then pass --base-gguf base.gguf"
    )


def export(config: ExportConfig) -> dict:
    """Write the export named by config.to; returns its record (also saved as export.json)."""
    if config.to not in TARGETS:
        raise ExportError(f"--to must be one of {', '.join(TARGETS)}, got {config.to!r}")
    _phase(config, "checking", f"checking {config.adapter}", 0.0)
    adapter_info(config.adapter)  # a clear error when the folder is not an adapter
    target = default_output(config)
    base = export_base(config)
    if config.to == "merged":
        _phase(config, "merging", "merging the adapter into its base model (loads the model)", 0.1)
        folder = merge(MergeConfig(config.adapter, str(target), base, config.precision))
        return {"to": "merged", "output_dir": str(folder)}
    # Everything that can be refused is refused before anything is written or loaded.
    check_output_dir(target, EXPORT_RECORD, "train.export")
    refuse_unsupported(config.adapter)
    base_gguf = base_gguf_for(base, config.base_gguf)
    python = _verifier(config)
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        record = _write_gguf_export(config, staging, base, base_gguf, python)
    except BaseException:  # a failed check publishes nothing
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    record["output_dir"] = str(target)
    return record


def _write_gguf_export(config: ExportConfig, staging: Path, base: str, base_gguf: Path, python: str | None) -> dict:
    """The gguf (and ollama) files in `staging`, verified when `python` runs llama.cpp; returns the record."""
    _phase(config, "writing", "copying the base GGUF and writing the LoRA GGUF", 0.2)
    shutil.copy2(base_gguf, staging / base_gguf.name)  # a copy: a link would let an edit reach the original
    write_lora_gguf(config.adapter, base_gguf, staging / LORA_FILE)
    record: dict = {
        "to": config.to,
        "adapter": str(Path(config.adapter).resolve()),
        "base_model": base,
        "base_gguf": base_gguf.name,
        "lora_gguf": LORA_FILE,
    }
    if config.to == "ollama":
        _phase(config, "modelfile", "writing the Modelfile (its template checked by rendering)", 0.5)
        record["modelfile"] = write_ollama(config.adapter, staging, base_gguf.name, base)
    if python:
        _phase(config, "verifying", "comparing llama.cpp's greedy replies with ours", 0.6)
        record["verify"] = verify(config, base, staging / base_gguf.name, staging / LORA_FILE, python)
    else:
        record["verify"] = {"skipped": "llama.cpp's Python binding is not installed here (pass --verify to build it)"}
    (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def write_ollama(adapter: str | Path, folder: Path, base_name: str, base: str) -> str:
    """Write the Modelfile for `adapter` on `base` (export_base's answer) into `folder`: its template proven
    equal to the trained one, the trained system prompt, the base's end-of-turn stops and the sampling
    settings the app serves the adapter with."""
    from assistant.models import load_tokenizer
    from train.export.ollama import TEMPLATE_CHECKS, check_template, go_template, modelfile

    read = read_folder(adapter)
    if not read.has_tokenizer:
        raise ExportError(f"{adapter}: has no tokenizer files; train.sft saves them beside the adapter")
    tokenizer = load_tokenizer(str(adapter))
    template = go_template(tokenizer)
    system = system_prompt(adapter)
    check_template(tokenizer, template, system, list(TEMPLATE_CHECKS) + list(VERIFY_QUESTIONS))
    stops = [tokenizer.decode([t]) for t in _stop_ids(base, tokenizer)]
    parameters = sampling_parameters(generation_defaults_of(base, adapter))
    text = modelfile(f"./{base_name}", f"./{LORA_FILE}", template, system, stops, parameters)
    (folder / MODELFILE).write_text(text, encoding="utf-8")
    return MODELFILE


def system_prompt(adapter: str | Path) -> str | None:
    """The Modelfile's SYSTEM: what the one prompt rule (assistant.adapters.messages_for) adds to a chat that
    brings no system message of its own, as Ollama adds SYSTEM only then (None: nothing)."""
    added = messages_for([], read_folder(adapter).prompt)
    return added[0]["content"] if added else None


OLLAMA_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}


def sampling_parameters(defaults: dict | None = None) -> dict[str, float | int]:
    """Sampling settings in Ollama's names, resolved as the app serves a chat that sets none: `defaults` (the
    adapter's generation_config.json, else its base's: generation_defaults_of) over the app's own defaults.
    Written out in full, since Ollama's own defaults differ (temperature 0.8, top_k 40, repeat_penalty 1.1)."""
    from assistant.generation import GenerationParams

    resolved = GenerationParams.resolve(defaults)
    parameters = {ollama: getattr(resolved, ours) for ours, ollama in OLLAMA_NAMES.items()}
    if (defaults or {}).get("max_new_tokens") is not None:  # the folder caps replies: so does Ollama
        parameters["num_predict"] = resolved.max_new_tokens
    return parameters


def _stop_ids(base: str, tokenizer) -> list[int]:
    """The end-of-turn ids the app stops at on `base` (export_base's answer): its generation config's
    eos ids plus the trained tokenizer's end-of-turn token."""
    from transformers import GenerationConfig

    from assistant.batching import end_of_turn_ids
    from assistant.models import resolve_model_path

    config = GenerationConfig.from_pretrained(resolve_model_path(base))
    return sorted(end_of_turn_ids(config, tokenizer))


def _verifier(config: ExportConfig) -> str | None:
    """The interpreter that runs llama.cpp, or None when verification is off or not available."""
    from train.export.llamacpp import ensure_python, find_python

    if config.skip_verify:
        return None
    if config.verify:
        _phase(config, "llama.cpp", "finding llama.cpp's Python binding (building it takes 10-30 min on 2 cores)", 0.1)
        return ensure_python()
    found = find_python()
    if not found:
        logger.info("llama.cpp's Python binding is not here: not verifying (pass --verify to build it)")
    return found


def verify_chats(config: ExportConfig) -> list[list[dict[str, str]]]:
    """The chats to verify with: the start of each --verify-data chat up to its last user turn, or built-ins."""
    if not config.verify_data:
        return [list(c) for c in VERIFY_QUESTIONS][: config.verify_prompts]

    chats = []
    for example in load_examples(config.verify_data).examples:
        last_user = max((i for i, m in enumerate(example.messages) if m["role"] == "user"), default=None)
        if last_user is not None:
            chats.append(example.messages[: last_user + 1])
        if len(chats) == config.verify_prompts:
            break
    return chats


def verify(config: ExportConfig, base: str, base_gguf: Path, lora_gguf: Path, python: str) -> dict:
    """The llama.cpp round trip of the written files (train.export.roundtrip), ours on `base`."""
    from train.export.roundtrip import round_trip

    return round_trip(config.adapter, base_gguf, lora_gguf, python, verify_chats(config), base_model=base,
                      max_new_tokens=config.verify_tokens, must_match=config.must_match, threads=config.threads,
                      tie_logits=config.tie_logits)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    configure(logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    config = parse_with_positional(
        ExportConfig, argv, "adapter", "python -m train.export ADAPTER --to merged|gguf|ollama --output-dir DIR",
        description=__doc__.splitlines()[0],
    )
    events = EventLog(config.events_file)
    try:
        record = export(config)
    except (OSError, ValueError, RuntimeError) as error:  # ExportError and TemplateError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        events.write("error", message=str(error))
        return 2
    events.write("done", output_dir=record["output_dir"], summary=summary(record))
    print(summary(record))
    return 0


def _phase(config: ExportConfig, phase: str, message: str, progress: float) -> None:
    """A phase starts: logged, and a line of --events-file with the share of the work done before it."""
    logger.info("%s", message)
    EventLog(config.events_file).write("phase", phase=phase, message=message, progress=progress)


def summary(record: dict) -> str:
    """What was written, what was verified and the next step, for the terminal and the UI."""
    folder = record["output_dir"]
    lines = [f"{record['to']} export written to {folder}"]
    checked = record.get("verify") or {}
    if "tokens_matched" in checked:
        lines.append(
            f"llama.cpp {checked['llama_cpp']} round trip over {checked['chats']} chats: greedy replies "
            f"{checked['tokens_matched']}/{checked['tokens_compared']} tokens equal to ours; teacher-forced "
            f"{checked['forced_agree']}/{checked['forced_positions']} positions agree, {checked['near_ties']} near "
            f"ties (< {checked['tie_logits']} logits apart), logits within {checked['max_logit_drift']:.2f}; the adapter "
            f"changes {checked['adapter_changes_replies']} of {checked['chats']} replies"
        )
    elif checked.get("skipped"):
        lines.append(f"not verified: {checked['skipped']}")
    if record["to"] == "ollama":
        lines.append(f"next: cd {folder} && ollama create NAME -f {MODELFILE} && ollama run NAME")
    elif record["to"] == "gguf":
        lines.append(f"next: llama-server -m {folder}/{record['base_gguf']} --lora {folder}/{LORA_FILE}")
    return "\n".join(lines)


__all__ = ["ExportConfig", "ExportError", "TemplateError", "export", "summary"]
