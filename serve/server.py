"""The server behind the screens: its models, its fine-tuning jobs, who may call it, and its HTTP API.

`Server(config)` is built once per process by `python -m ui`, the Space's app.py and the tests; the
screens (ui/) ask it for what they show and do, and `mount(app)` adds the OpenAI-compatible routes
(`/v1/models`, `/v1/chat/completions` with the stored completions, `/v1/files`, `/v1/fine_tuning/jobs`) to
the running web app. `store` is the database of stored completions and feedback, opened on first use
(and pruned of what is older than --retain-days, at start and daily).
"""

from __future__ import annotations

import atexit
import logging
import threading
from pathlib import Path

from serve.access import AccessPolicy
from serve.config import ServerConfig
from serve.evals import EvalRunner, EvalsServer, EvalStore, item_source
from serve.feedback import Retention
from serve.files import FileStore
from serve.fine_tuning_api import FineTuningServer, training_off_router
from serve.http import Gate
from serve.jobs import JobError, JobRunner
from serve.openai_api import BASE_ID, OpenAIServer, model_ids
from serve.promotion import Promotions, evidence_from
from serve.promotion_api import PromotionServer
from serve.registry import BASE_CHOICE, ModelRegistry
from serve.remote import RemoteRegistry
from serve.store import Store, StoreError
from serve.stored_api import StoredCompletionsServer

logger = logging.getLogger(__name__)

_UNSET = object()


class Server:
    """One server: `registry` (in-process models, or a remote server's), `jobs` (None: no training here) and
    `access`, the one rule for every API route and every screen action."""

    def __init__(self, config: ServerConfig, *, registry: ModelRegistry | RemoteRegistry | None = None,
                 jobs: JobRunner | None | object = _UNSET, train_args: list[str] | None = None):
        # train_args go to every train.sft run of the job runner (e.g. faster probes in tests).
        self.config = config
        self.access: AccessPolicy = config.access_policy()
        self.registry = registry or make_registry(config)
        self.jobs: JobRunner | None = job_runner(config, self.registry, train_args) if jobs is _UNSET else jobs
        self._store: Store | None = None
        self._store_lock = threading.Lock()
        # --retain-days: older records go now (in the background) and then daily.
        self.retention = Retention(lambda: self.store, config.retain_days) if config.retain_days is not None else None
        if self.retention is not None:
            self.retention.start()
            atexit.register(self.retention.close)
        self._evals: EvalRunner | None = None

    @property
    def evals(self) -> EvalRunner:
        """The eval runs of this server's models (its store under <jobs dir>/evals), started on first use."""
        with self._store_lock:
            if self._evals is None:
                root = Path(self.config.jobs_dir)
                files = self.jobs.files if self.jobs is not None else FileStore(root / "files")
                self._evals = EvalRunner(EvalStore(root / "evals"), self.resolve,
                                         item_source(files, lambda: self.store))
                atexit.register(self._evals.close)
            return self._evals

    @property
    def promotions(self) -> Promotions:
        """The model aliases of this server's adapters folder (serve.promotion), gated by its evals."""
        registry = self.registry
        return Promotions(
            self.config.adapters_dir, models=lambda: [BASE_ID, *registry.adapters],  # models, not aliases
            default=self.model_in_use,
            evidence=evidence_from(self.config.jobs_dir), on_change=getattr(registry, "rescan", None),
        )

    def resolve(self, model: str):
        """The ChatModel an API model id names (an alias resolved now), and the model id it resolved to."""
        target = self.registry.resolve(model)
        return self.registry.get(BASE_CHOICE if target == BASE_ID else target), target

    def model_ids(self) -> list[str]:
        """The ids an API client may pass as `model` (what /v1/models lists)."""
        return model_ids(self.registry)

    def newest_adapter(self) -> str | None:
        """The adapter published last (its folder's modification time): a finished job's, usually."""
        adapters = self.registry.adapters
        return max(adapters, key=lambda name: adapters[name].stat().st_mtime, default=None)

    def model_in_use(self) -> str:
        """The model id served by default: the serving alias's model when it is set."""
        choice = self.registry.default_choice()
        return BASE_ID if choice == BASE_CHOICE else choice

    @property
    def store(self) -> Store:
        """The database of stored completions, feedback and preferences (config.database()), opened and
        upgraded to the newest schema on first use; raises serve.store.StoreError (or ValueError for a
        password on the command line) saying what to fix."""
        with self._store_lock:
            if self._store is None:
                try:
                    url = self.config.database()
                except ValueError as error:  # a password on the command line
                    raise StoreError(str(error)) from None
                self._store = Store(url)
                atexit.register(self._store.close)
            return self._store

    @property
    def local(self) -> bool:
        """True when the models run in this process (so their adapter folders are here to export)."""
        return isinstance(self.registry, ModelRegistry)

    def mount(self, app) -> None:
        """Serve the OpenAI-compatible API from the web app `app` (in-process models only); ui.app.AppBlocks
        calls it from the app's lifespan, before the server listens."""
        if not self.local:
            return
        config, gate = self.config, Gate(self.access)
        body_limit = config.max_request_kb * 1024
        api = OpenAIServer(self.registry, self.access, max_body_bytes=body_limit, store=lambda: self.store)
        app.include_router(api.router)
        app.include_router(EvalsServer(self.evals.store, self.evals, api.model_ids, self.access).router)
        app.include_router(PromotionServer(lambda: self.promotions, self.access, config.alias).router)
        app.include_router(StoredCompletionsServer(lambda: self.store, self.access, max_body_bytes=body_limit).router)
        if self.jobs is None:
            reason = ("Fine-tuning is turned off on this server (it was started with --no-training); start it "
                      "without --no-training to train." if config.no_training else
                      f"Fine-tuning is unavailable on this server: another server process runs the jobs of "
                      f"{config.jobs_dir}; start this one with its own --jobs-dir.")
            app.include_router(training_off_router(reason, gate))
            return
        app.include_router(FineTuningServer(
            self.jobs, self.access,
            max_body_bytes=body_limit,
            max_upload_bytes=int(config.max_upload_mb * 1024 * 1024),
        ).router)


def make_registry(config: ServerConfig) -> ModelRegistry | RemoteRegistry:
    """In-process models, or the models of the remote server given by --backend-url."""
    if config.backend_url:
        return RemoteRegistry(config.backend_url, config.backend_key())
    return ModelRegistry(config.adapters_dir, config.adapter, base_model=config.base_model, precision=config.precision,
                         alias=config.alias or None)


def job_runner(config: ServerConfig, registry=None, train_args: list[str] | None = None) -> JobRunner | None:
    """The fine-tuning job runner over config's jobs and adapters folders, shared by the Train tab and
    /v1/fine_tuning; None with --backend-url (no models here), --no-training, or when another server
    runs the jobs of that folder."""
    if config.backend_url or config.no_training:
        return None
    rescan = getattr(registry, "rescan", None)  # a published adapter is listed before the job reads succeeded
    root = Path(config.jobs_dir)
    try:
        runner = JobRunner(root, config.adapters_dir, FileStore(root / "files"), base_model=config.base_model,
                           extra_args=train_args, on_published=(lambda name: rescan()) if rescan else None)
    except JobError as taken:  # another server runs the jobs of this folder
        logger.warning("fine-tuning is off: %s; start this app with its own --jobs-dir", taken)
        return None
    atexit.register(runner.close)  # a job still training is paused (resumable), not left running unseen
    return runner
