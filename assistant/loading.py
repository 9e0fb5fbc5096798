"""Load a base model once and attach adapter folders from the trainer to it by name, ready to chat.

A `Host` is one base model in memory. Every adapter of that base attaches to it: a LoRA adapter as
a named peft adapter (rows of different LoRA adapters and of the base decode in one batch, through
peft's `adapter_names`), a prefix adapter as a peft wrapper of its own around the same weights. An
extra adapter costs its own weights (a few MB), never another copy of the base. A `ChatModel` is one
servable choice: a host, an adapter on it (or none) and the tokenizer it must be served with.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from assistant.adapters import SAMPLING_FIELDS, AdapterFolder, TrainedPrompt, read_folder
from assistant.decode import GENERATE, Decoding, decoding_of
from assistant.embedded import EMBEDDED, is_embedded
from assistant.models import Precision, load_base_model, load_tokenizer, pick_precision, resolve_model_path

logger = logging.getLogger(__name__)

BASE_ROW = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
MAIN = "main"  # the batch group of base and LoRA rows; each prefix adapter is a group of its own


@dataclass
class Host:
    """One base model in memory with every adapter attached to it so far; one engine thread serves them all."""

    name: str  # the base as the user named it ('embedded', a Hub id or a folder)
    base: object  # the transformers model; LoRA layers are injected into it in place
    tokenizer: object  # the base's own tokenizer
    precision: Precision
    lora: object = None  # the peft model holding every LoRA adapter (None until the first one)
    prefix: dict = field(default_factory=dict)  # adapter name -> its peft prefix-tuning model
    solo: set = field(default_factory=set)  # LoRA adapters peft cannot mix in a batch (DoRA): their rows batch alone
    folders: dict = field(default_factory=dict)  # (resolved folder, its signature) -> adapter name
    # Held while a batch runs and while an adapter attaches (attaching mutates the model).
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    attaching: threading.Event = field(default_factory=threading.Event, repr=False)  # running batches pause
    engine: object = field(default=None, repr=False)  # its BatchEngine, started on first reply
    decoding: Decoding | None = None  # how its replies decode (None: decided from the model)
    tokenizers: dict = field(default_factory=dict, repr=False)  # AdapterFolder.tokenizer_digest() -> tokenizer
    version: int = 0  # bumped by each attach, which may change any layer: keys/values kept from before are stale
    _names: Iterator[int] = field(default_factory=itertools.count, repr=False)

    def __post_init__(self) -> None:
        if self.decoding is None:
            self.decoding = decoding_of(self.base)
            logger.info("decoding %s: %s", self.name, self.decoding.describe())

    def decoding_for(self, group: str) -> Decoding:
        """How a batch group's rows decode: the host's way, except a prefix adapter's (peft builds its
        keys/values, so generate() runs it)."""
        if group in self.prefix:
            return Decoding(GENERATE, "prefix tuning's keys/values come from peft")
        return self.decoding

    def attach(self, folder: str | Path) -> tuple[str, str]:
        """Attach an adapter folder (once) and return (its adapter name, its method)."""
        info = read_folder(folder).require()
        key = (str(Path(folder).resolve()), info.signature)  # a retrained adapter attaches anew
        if key in self.folders:
            name = self.folders[key]
            return name, "prefix" if name in self.prefix else "lora"
        method = info.method
        if method is None:
            raise ValueError(f"{folder}: a {info.kind} folder has nothing to attach; serve it as a base model")
        name = f"adapter{next(self._names)}"  # peft module keys: no dots, nothing like "lora_"; never reused
        self.attaching.set()  # a running batch pauses at its next token and releases the lock
        try:
            with self.lock:
                self.version += 1
                try:
                    _in_short_thread(self._attach, folder, name, method)
                except Exception:
                    self._forget(name)  # a half-added adapter must not linger in the model
                    raise
        finally:
            self.attaching.clear()
            _return_freed_memory()
        self.folders[key] = name
        return name, method

    def tokenizer_of(self, info: AdapterFolder):
        """The tokenizer an adapter folder was trained with (the base's when it carries none), loaded once for
        every folder whose tokenizer files are the same (train.sft saves one into each adapter)."""
        digest = info.tokenizer_digest()
        if digest is None:
            return self.tokenizer
        if digest not in self.tokenizers:
            self.tokenizers.setdefault(digest, load_tokenizer(str(info.path)))  # two first loads: one is kept
        return self.tokenizers[digest]

    def _forget(self, name: str) -> None:
        self.prefix.pop(name, None)
        self.solo.discard(name)
        if self.lora is not None and name in self.lora.peft_config:
            from assistant import lora_batch

            with contextlib.suppress(Exception):  # best effort: the adapter failed to load anyway
                self.lora.delete_adapter(name)
                lora_batch.restack(self.lora, self.precision.adapter_dtype)  # its rows leave the stacks now

    def _attach(self, folder: str | Path, name: str, method: str) -> None:
        from peft import PeftConfig, PeftModel

        config = PeftConfig.from_pretrained(str(folder))
        config.inference_mode = True
        quantized = self.precision.name == "int4"
        from assistant import lora_batch

        if method == "lora":
            lora_batch.enable()  # rows of any number of LoRA adapters in one batch at the cost of one
        if quantized and method == "lora":
            from peft.tuners.lora import Linear as LoraLinear

            from assistant.quant import LINEAR_TYPES

            # peft wraps its own layer types only; ours expose in_features/out_features and a forward.
            config._register_custom_module(dict.fromkeys(LINEAR_TYPES, LoraLinear))
        with warnings.catch_warnings():
            # peft warns about our custom layer types and about a model wrapped by a second peft model.
            warnings.simplefilter("ignore", UserWarning)
            if method == "prefix":
                model = PeftModel.from_pretrained(self.base, str(folder), adapter_name=name, config=config)
                self.prefix[name] = model
            elif self.lora is None:
                self.lora = PeftModel.from_pretrained(self.base, str(folder), adapter_name=name, config=config)
                model = self.lora
            else:
                self.lora.add_adapter(name, config)
                self.lora.load_adapter(str(folder), adapter_name=name)
                model = self.lora
            if method == "lora" and getattr(config, "use_dora", False):
                self.solo.add(name)  # peft refuses DoRA rows in a mixed-adapter batch
        if not self.precision.bits:  # bitsandbytes models cannot be cast; peft casts per layer there
            lora_batch.cast(model, self.precision_dtype)  # the new adapter's weights compute in the base's dtype
        model.eval()
        if self.lora is not None:
            lora_batch.restack(self.lora, self.precision.adapter_dtype)  # the one copy of every LoRA adapter

    @property
    def precision_dtype(self):
        """The dtype the base computes in (Precision.compute_dtype)."""
        return self.precision.compute_dtype

    def runner(self, group: str, adapters: list[str | None]) -> tuple[object, contextlib.AbstractContextManager, dict]:
        """(model, context, generate kwargs) for a batch of `group` whose rows use `adapters` (None: base)."""
        if group in self.prefix:  # a prefix adapter: its own wrapper, with every LoRA layer switched off
            return self.prefix[group], self.lora.disable_adapter() if self.lora else contextlib.nullcontext(), {}
        if group in self.solo:  # a DoRA adapter: the LoRA model with only it active, for the whole batch
            return self.lora, _only_adapter(self.lora, group), {}
        if self.lora is None:
            return self.base, contextlib.nullcontext(), {}
        return self.lora, contextlib.nullcontext(), {"adapter_names": [a or BASE_ROW for a in adapters]}


def _return_freed_memory() -> None:
    """Give the heap pages a load or an attach freed (a file's fp32 weights, the old stacks) back to the system."""
    # glibc keeps freed pages for reuse, so without this the resident memory grows by the load's transients
    # at every attach; elsewhere (no glibc) there is nothing to call.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _only_adapter(model, name: str) -> Iterator[None]:
    """Run the peft `model` with adapter `name` alone active, then restore the adapter that was."""
    before = model.active_adapter
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(before, inference_mode=True)


@dataclass
class ChatModel:
    """One servable choice: a base model (its Host), an adapter on it or none, and the tokenizer to serve with."""

    model: object  # what a forward pass of this choice runs (the peft model for an adapter)
    tokenizer: object
    base_model: str
    precision: Precision
    adapter: str | None = None  # the adapter folder
    method: str | None = None  # "lora" | "prefix" | None
    folder: AdapterFolder | None = None  # what its folder says (an adapter's, or a merged model's own)
    host: Host | None = field(default=None, repr=False)
    adapter_name: str | None = None  # its name on the host

    @property
    def trained_prompt(self) -> TrainedPrompt | None:
        """The system prompt it was trained with (None: a plain base model, or not recorded)."""
        return self.folder.prompt if self.folder else None

    @property
    def generation_defaults(self) -> dict:
        """Sampling settings for what a caller leaves unset: its folder's generation_config.json, else the
        base model's (assistant.generation.GenerationParams.resolve)."""
        if self.folder and self.folder.generation:
            return dict(self.folder.generation)
        return base_generation(self.host.base) if self.host else {}

    @property
    def decoding(self) -> Decoding:
        """How this choice's replies decode (its host decides, by batch group)."""
        return self.host.decoding_for(self.group) if self.host else Decoding(GENERATE, "no host")

    def describe(self) -> str:
        """Human summary for the log and the UI."""
        what = (
            f"{self.base_model} + {self.method} adapter {self.adapter}" if self.adapter else self.base_model
        )
        return f"{what} ({self.precision.describe()}; {self.decoding.describe()})"

    @property
    def group(self) -> str:
        """The batch group of this choice's rows (base and LoRA rows share one; prefix and DoRA batch alone)."""
        alone = self.method == "prefix" or (self.host is not None and self.adapter_name in self.host.solo)
        return self.adapter_name if alone else MAIN

    @property
    def lock(self) -> threading.Lock:
        """Held by whoever runs the host's model (the engine's batches, scoring, attaching)."""
        return self.host.lock

    @property
    def context_window(self) -> int:
        """Tokens the model attends over (prompt + reply)."""
        return int(getattr(self.host.base.config, "max_position_embeddings", 2048) or 2048)


def load_host(base: str, precision: str = "auto") -> Host:
    """A base model in the chosen precision (int4 packed already), with no adapter yet."""
    chosen = pick_precision(precision, base=base)
    return _in_short_thread(_load_host, base, chosen)


def _load_host(base: str, chosen: Precision) -> Host:
    tokenizer = load_tokenizer(base)
    model = load_base_model(base, chosen)
    if chosen.name == "int4":
        from assistant.quant import quantize_for_cpu

        quantize_for_cpu(model, chosen.compute_dtype)
    model.eval()
    _return_freed_memory()  # the file's fp32 weights and the copies quantizing made: 270-460 MB (embedded, int4)
    return Host(base, model, tokenizer, chosen)


def chat_model(host: Host, adapter: str | Path | None = None) -> ChatModel:
    """The choice `adapter` (None: the base model) on `host`, attaching the adapter when it is new."""
    own = read_folder(host.name) if Path(host.name).is_dir() else None  # a merged model carries its own
    if adapter is None or read_folder(adapter).kind == "merged":
        folder = read_folder(adapter) if adapter is not None else own
        return ChatModel(host.base, host.tokenizer, host.name, host.precision,
                         folder=folder if folder and folder.kind == "merged" else None, host=host)
    name, method = host.attach(adapter)
    info = read_folder(adapter)
    # The adapter folder carries the tokenizer and template it was trained with: serve exactly those.
    tokenizer = host.tokenizer_of(info)
    model = host.prefix[name] if method == "prefix" else host.lora
    chat = ChatModel(model, tokenizer, host.name, host.precision, str(adapter), method, info, host, name)
    logger.info("chat model ready: %s", chat.describe())
    return chat


def load_chat_model(
    base_model: str | None = None, adapter: str | Path | None = None, precision: str = "auto"
) -> ChatModel:
    """Base model (default: the adapter's base, else the embedded model) plus an optional adapter."""
    if adapter:
        read_folder(adapter).require()  # a clear error when the folder cannot be served
    return chat_model(load_host(base_of(base_model, adapter), precision), adapter)


def base_of(base_model: str | None, adapter: str | Path | None) -> str:
    """The base a chat model loads: the one given, else its adapter's, else the embedded model."""
    folder = read_folder(adapter) if adapter else None
    if folder and folder.kind == "merged":  # a merged model is its own base
        return str(adapter)
    base = base_model or (folder.base if folder else None) or EMBEDDED
    return EMBEDDED if is_embedded(base) else base


def base_generation_file(base: str) -> dict:
    """base_generation() read from a base model's files without loading it ({} when it is not local)."""
    from transformers import GenerationConfig

    path = Path(resolve_model_path(base)) if is_embedded(base) or Path(base).is_dir() else None
    if path is None or not (path / "generation_config.json").is_file():
        return {}
    diff = GenerationConfig.from_pretrained(str(path)).to_diff_dict()
    return {k: diff[k] for k in SAMPLING_FIELDS if diff.get(k) is not None}


def generation_defaults_of(base: str, adapter: str | Path | None) -> dict:
    """The sampling settings a model is served with where a caller leaves them unset, read from files
    without loading it: the adapter (or merged) folder's generation_config.json, else its base model's
    (`base`, as base_of decides it). The registry and the exports ask this."""
    folder = read_folder(adapter) if adapter else None
    if folder is not None and folder.generation:
        return dict(folder.generation)
    return base_generation_file(base)


def base_generation(model) -> dict:
    """The sampling settings a base model's own generation_config.json sets (only what differs from
    transformers' defaults: an unset field is the app's default, not transformers')."""
    config = getattr(model, "generation_config", None)
    diff = config.to_diff_dict() if config is not None else {}
    return {k: diff[k] for k in SAMPLING_FIELDS if diff.get(k) is not None}


def _in_short_thread(fn, *args):
    """Run `fn` in a thread that ends with it, re-raising its error here.

    Loading runs torch's parallel ops; a thread that does so keeps an OpenMP thread team for life.
    With more OpenMP threads alive than CPUs, libgomp stops spin-waiting between ops, which halved the
    batch engine's decode speed (bench.decode_speed: 27 vs 52 tokens/s on 2 cores). A short-lived
    thread takes its team with it, so the engine thread's team is the one left.
    """
    result: list = []

    def run() -> None:
        try:
            result.append(fn(*args))
        except BaseException as error:  # re-raised in the caller's thread
            result.append(error)

    worker = threading.Thread(target=run, name="model-load", daemon=True)  # Ctrl+C while loading ends the process
    worker.start()
    worker.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]
