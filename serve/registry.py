"""The model menu: "base model" plus every adapter folder, served from one base model in memory per base.

The adapters folder is listed again at most every SCAN_S seconds, so an adapter that the trainer
publishes appears without a restart (hidden and `*.partial*` staging folders never do), and one
that is published again into the same folder is attached anew. A folder that cannot be served (a
broken `adapter_config.json`, missing weights, a failed load) is listed as unavailable with its
reason; every other choice keeps working, and a failed load is not retried until the folder changes.

Aliases (serve.promotion) are read from the same folder on the same scan: a choice (or API model id) that is an
alias names its target at the moment it is resolved, so a request keeps the model it began with while the alias
moves, and the serving alias (`production` by default), when set, is the default choice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from assistant.adapters import TrainedPrompt, find_adapters, read_folder
from assistant.generation import GenerationParams, stream_reply
from assistant.loading import ChatModel, Host, base_of, chat_model, generation_defaults_of, load_host
from assistant.models import pick_precision
from serve.promotion import BASE_ID, DEFAULT_ALIAS, read_aliases

logger = logging.getLogger(__name__)

BASE_CHOICE = "base model"
SCAN_S = 1.0  # the adapters folder is listed again at most this often


class ChoiceError(LookupError):
    """A menu choice that cannot be served: unknown, or unavailable (with the reason)."""

    def __init__(self, message: str, unavailable: bool = False):
        super().__init__(message)
        self.unavailable = unavailable

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class Unavailable:
    """An adapter folder that is listed but cannot be served, and why."""

    folder: Path
    reason: str

    def describe(self) -> str:
        """'<folder>: <reason>'."""
        return f"{self.folder}: {self.reason}"


class ModelRegistry:
    """Loads each base model once, attaches each adapter on first use, and keeps them for later requests."""

    def __init__(
        self,
        adapters_dir: str | Path | None = None,
        extra: Iterable[str | Path] = (),
        *,
        base_model: str | None = None,
        precision: str = "auto",
        default: str | None = None,
        alias: str | None = DEFAULT_ALIAS,
    ):
        # alias: the alias (serve.promotion) whose model is the default choice when it is set; None: none.
        self.alias = alias
        self._aliases: dict[str, str] = {}
        self.adapters_dir = Path(adapters_dir) if adapters_dir else None
        self.extra = [Path(e) for e in extra]
        for folder in self.extra:  # a typo on the command line stops the start, with the reason
            if read_folder(folder).kind is None:
                raise FileNotFoundError(read_folder(folder).problem)
        self.base_model = base_model
        self.precision = precision
        self._lock = threading.Lock()  # guards the dicts below; never held while a model loads
        self._loading: dict[str, threading.Lock] = defaultdict(threading.Lock)  # one per base and per choice
        self._hosts: dict[str, Host] = {}
        self._models: dict[str, tuple[tuple, ChatModel]] = {}  # choice -> (folder signature, model)
        self._failed: dict[Path, tuple[tuple, str]] = {}  # folder -> (its signature, why it failed)
        self._listed: dict[str, Path] = {}
        self._unavailable: dict[str, Unavailable] = {}
        self._scanned_at = -SCAN_S
        self._scan()
        # The first adapter given on the command line is the default choice, else the given default.
        self.default = next((label for label, f in self._all_folders().items() if f in self.extra[:1]), default)

    # -- the menu ------------------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, Path]:
        """Menu label -> adapter folder, for every adapter that can be served."""
        self._scan()
        return dict(self._listed)

    @property
    def unavailable(self) -> dict[str, Unavailable]:
        """Menu label -> why that adapter folder cannot be served."""
        self._scan()
        return dict(self._unavailable)

    @property
    def choices(self) -> list[str]:
        """Menu entries: the base model first, then the adapters that can be served."""
        return [BASE_CHOICE, *self.adapters]

    def rescan(self) -> None:
        """List the adapters folder again now (a fine-tuning job has just published an adapter)."""
        self._scan(force=True)

    @property
    def aliases(self) -> dict[str, str]:
        """Alias -> model id ("base" or an adapter's name) from the adapters folder's alias file, as last scanned;
        an alias that an adapter folder of the same name hides is left out (the adapter wins)."""
        self._scan()
        return dict(self._aliases)

    def resolve(self, model: str) -> str:
        """The model id an API model id names now: an alias's target, else the id itself."""
        return self.aliases.get(model, model)

    def choice_of(self, model: str) -> str:
        """The menu choice of an API model id (an alias resolved now): "base" is the base model."""
        target = self.resolve(model)
        return BASE_CHOICE if target == BASE_ID else target

    def default_choice(self) -> str:
        """The serving alias's model when it is set and can be served, else the default adapter (first
        --adapter), else the first adapter listed, else the base model."""
        adapters = self.adapters
        target = self._aliases.get(self.alias) if self.alias else None
        if target is not None:
            choice = BASE_CHOICE if target == BASE_ID else target
            if choice == BASE_CHOICE or choice in adapters:
                return choice
        if self.default in adapters or self.default == BASE_CHOICE:
            return self.default
        return next(iter(adapters), BASE_CHOICE)

    def _all_folders(self) -> dict[str, Path]:
        """Label -> folder over the adapters folder and the --adapter ones (same names: full path)."""
        folders = find_adapters(self.adapters_dir) if self.adapters_dir else {}
        for path in self.extra:
            if any(path.resolve() == known.resolve() for known in folders.values()):
                continue
            label = path.name if path.name not in folders and path.name != BASE_CHOICE else str(path)
            folders[label] = path
        return folders

    def _scan(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._scanned_at < SCAN_S:
            return
        listed, unavailable = {}, {}
        for label, folder in self._all_folders().items():
            info = read_folder(folder)
            problem = info.problem
            failed = self._failed.get(folder)
            if problem is None and failed and failed[0] == info.signature:
                problem = failed[1]  # remembered until the folder changes
            if problem is None:
                listed[label] = folder
            else:
                unavailable[label] = Unavailable(folder, problem)
        found = read_aliases(self.adapters_dir)
        aliases = {a: t for a, t in found.items() if a not in listed and a not in unavailable and a not in (BASE_CHOICE, BASE_ID)}
        with self._lock:
            if unavailable.keys() != self._unavailable.keys():
                for label, item in unavailable.items():
                    logger.warning("adapter %r is unavailable: %s", label, item.describe())
            if aliases != self._aliases:
                logger.info("aliases: %s", ", ".join(f"{a} -> {t}" for a, t in aliases.items()) or "none")
                for alias in found.keys() - aliases.keys():
                    logger.warning("alias %r is hidden by the adapter folder of the same name", alias)
            self._listed, self._unavailable, self._aliases, self._scanned_at = listed, unavailable, aliases, now

    # -- models --------------------------------------------------------------------------------------
    def get(self, choice: str | None) -> ChatModel:
        """The ChatModel for a menu choice (or an alias: its model now), loading its base and attaching its
        adapter if needed."""
        asked, choice = choice, self._choice(choice)
        try:
            folder = self._folder(choice)
        except ChoiceError as error:
            if asked and asked != choice and asked != BASE_CHOICE:  # an alias whose model is gone
                raise ChoiceError(f"alias {asked!r} points to {choice!r}, which cannot be served ({error}); promote "
                                  "another model to it or roll it back (python -m serve.promote)",
                                  error.unavailable) from None
            raise
        signature = read_folder(folder).signature if folder else ()
        with self._loading[choice]:  # two first requests must not load the same choice twice
            cached = self._models.get(choice)
            if cached and cached[0] == signature:
                return cached[1]
            if cached:
                logger.info("%s changed on disk; attaching it again", folder)
            try:
                base = base_of(self.base_model, folder)
                chat = chat_model(self._host(base), folder)
            except Exception as error:
                if folder is None:
                    raise
                logger.exception("could not load adapter %s", folder)
                with self._lock:
                    self._failed[folder] = (signature, f"could not be loaded: {error}")
                self._scan(force=True)
                raise ChoiceError(f"adapter {choice!r} is unavailable: {folder}: {error}", unavailable=True) from error
            with self._lock:
                self._models[choice] = (signature, chat)
            return chat

    def _choice(self, choice: str | None) -> str:
        """A menu choice: the default one for None, an alias's model for an alias, else `choice` itself."""
        if not choice:
            return self.default_choice()
        if choice == BASE_CHOICE or choice in self.adapters:
            return choice
        target = self._aliases.get(choice)
        if target is None:
            return choice
        return BASE_CHOICE if target == BASE_ID else target

    def _folder(self, choice: str) -> Path | None:
        """The adapter folder of a choice (None: the base model); ChoiceError if it cannot be served."""
        if choice == BASE_CHOICE:
            return None
        if choice in self.adapters:
            return self._listed[choice]
        self._scan(force=True)  # published a moment ago?
        if choice in self._listed:
            return self._listed[choice]
        if choice in self._unavailable:
            raise ChoiceError(
                f"adapter {choice!r} is unavailable: {self._unavailable[choice].describe()}", unavailable=True
            )
        raise ChoiceError(f"unknown adapter {choice!r}; choose one of {', '.join(self.choices)}")

    def _host(self, base: str) -> Host:
        """The one in-memory copy of a base model, loaded on first use."""
        with self._loading[f"base:{base}"]:
            if base not in self._hosts:
                logger.info("loading base model %s", base)
                self._hosts[base] = load_host(base, self.precision)
            return self._hosts[base]

    def trained_prompt(self, choice: str | None) -> TrainedPrompt | None:
        """The system prompt the chosen adapter was trained with (None: base model or not recorded)."""
        folder = self.adapters.get(self._choice(choice))
        if folder is None and self.base_model and Path(self.base_model).is_dir():  # a merged model as base
            return read_folder(self.base_model).prompt
        return read_folder(folder).prompt if folder else None

    def generation_defaults(self, choice: str | None) -> dict:
        """The sampling settings a choice is served with when a caller leaves them unset (its folder's
        generation_config.json, else its base model's), without loading it when it is not loaded yet."""
        choice = self._choice(choice)
        cached = self._models.get(choice)
        if cached is not None:
            return cached[1].generation_defaults
        folder = self.adapters.get(choice)
        return generation_defaults_of(base_of(self.base_model, folder), folder)

    def _precision_of(self, choice: str) -> str:
        """The device and precision a choice that is not loaded yet will load in."""
        return pick_precision(self.precision, base=base_of(self.base_model, self.adapters.get(choice))).describe()

    def serving(self, choice: str | None) -> dict:
        """How a choice is served: device and precision, and once it is loaded its decode loop and why
        (/v1/models says it)."""
        choice = self._choice(choice)
        cached = self._models.get(choice)
        if cached is None:
            return {"precision": self._precision_of(choice), "loaded": False}
        chat = cached[1]
        return {"precision": chat.precision.describe(), "loaded": True, "decoding": chat.decoding.as_dict()}

    def stream(self, choice: str | None, messages: list[dict[str, str]], params: GenerationParams, *,
               cancel: threading.Event, use_adapter: bool = True,
               on_trim: Callable[[int], None] | None = None) -> Iterator[str]:
        """Growing reply of a menu choice (the in-process runtime, batched with concurrent requests)."""
        return stream_reply(self.get(choice), messages, params, cancel=cancel, use_adapter=use_adapter,
                            on_trim=on_trim)

    def describe(self, choice: str | None) -> str:
        """Status line: what serves this choice, with device and precision (and what cannot be served)."""
        choice = self._choice(choice)
        cached = self._models.get(choice)
        if cached is not None:
            line = cached[1].describe()
        elif choice in self._unavailable:
            line = f"{choice}: unavailable"
        else:
            line = f"{choice}: loads on first use ({self._precision_of(choice)})"
        broken = self.unavailable
        if broken:
            line += "  \n**Unavailable:** " + "; ".join(f"`{label}` ({u.describe()})" for label, u in broken.items())
        return line
