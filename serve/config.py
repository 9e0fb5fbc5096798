"""The server's configuration (models, adapters, jobs, access, limits), shared by `python -m ui`, the Space's
app.py and the tests; ui.config adds what only the screens need.

Secrets (API keys, the login) come from environment variables or files, never from the command line:
argv shows in `ps`, in shell history and in logs of whatever started the process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sqlalchemy.engine import make_url

from serve.access import AccessPolicy
from serve.store import default_url

logger = logging.getLogger(__name__)

# Options that took a secret on the command line, and where the secret goes now.
REMOVED_SECRET_FLAGS = {
    "--api-key": "$ASSISTANT_API_KEY or --api-key-file FILE",
    "--auth": "$ASSISTANT_AUTH or --auth-file FILE",
    "--backend-key": "$ASSISTANT_BACKEND_KEY or --backend-key-file FILE",
}


@dataclass
class ServerConfig:
    """The server's options of `python -m ui` (parsed with transformers.HfArgumentParser)."""

    adapter: list[str] = field(
        default_factory=list,
        # "extend" so both `--adapter A --adapter B` and `--adapter A B` give [A, B].
        metadata={"help": "Adapter folder to offer in the adapter menu (repeatable).", "action": "extend"},
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model: 'embedded', a Hub id or a folder; unset, each adapter uses its own "
                          "base and 'base model' is the embedded SmolLM2-135M-Instruct."},
    )
    precision: Literal["auto", "fp32", "bf16", "fp16", "int4", "8bit", "4bit"] = field(
        default="auto",
        metadata={"help": "Weight precision. auto: on a GPU 8-bit (bitsandbytes); on a CPU int4 for the "
                          "embedded model (its weights are 4-bit already), and for others bf16 where the CPU "
                          "has bf16 units, else fp32. int4: 4-bit CPU kernels for any model (lossy unless it "
                          "came from Q4_1), computing in bf16 with bf16 units, else in fp32."}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (0.0.0.0 to serve the network)."})
    port: int = field(default=7860, metadata={"help": "Port to listen on."})
    adapters_dir: str = field(
        default="adapters", metadata={"help": "Folder whose adapter subfolders are listed in the menu."}
    )
    auth_file: str | None = field(
        default=None,
        metadata={"help": "File holding user:password, one login per line, to require a login; unset, "
                          "$ASSISTANT_AUTH if set, else no login. With a login the API (/v1, /chat) needs the API key "
                          "or a logged-in session; --admins names who sees everyone's records."},
    )
    share: bool = field(
        default=False,
        metadata={"help": "Also open a temporary public gradio.live link (the API then needs an API key)."},
    )
    api_key_file: str | None = field(
        default=None,
        metadata={"help": "File holding the bearer key the API (/v1 and /chat) requires; unset, "
                          "$ASSISTANT_API_KEY if set, else the API answers only callers on this machine while "
                          "the app is bound to localhost and not shared."},
    )
    max_request_kb: int = field(
        default=1024, metadata={"help": "Largest request body the OpenAI-compatible API accepts, in KB (413 above)."}
    )
    backend_url: str | None = field(
        default=None,
        metadata={"help": "Front a remote OpenAI-compatible server (e.g. vLLM: http://host:8000/v1) instead of "
                          "loading a model in-process."},
    )
    backend_key_file: str | None = field(
        default=None,
        metadata={"help": "File holding the API key for --backend-url; unset, $ASSISTANT_BACKEND_KEY if set."},
    )
    jobs_dir: str = field(
        default="jobs",
        metadata={"help": "Folder of the fine-tuning jobs and their uploaded files (the Train tab); one app per folder."},
    )
    no_training: bool = field(
        default=False,
        metadata={"help": "Offer no training, e.g. on a public Space: no Train tab, and /v1/files and "
                          "/v1/fine_tuning answer 403."},
    )
    max_upload_mb: float = field(
        default=50, metadata={"help": "Largest training file POST /v1/files accepts, in MB (413 above)."}
    )
    database_url: str | None = field(
        default=None,
        metadata={"help": "Database of stored completions and feedback: sqlite:///PATH, or "
                          "postgresql+psycopg://USER@HOST/DATABASE for a team server (its password in $PGPASSWORD "
                          "or ~/.pgpass, never here: argv shows in `ps`; or the whole URL in "
                          "$ASSISTANT_DATABASE_URL). Unset: $ASSISTANT_DATABASE_URL if set, else "
                          "sqlite:///<jobs-dir>/assistant.db."},
    )
    retain_days: float | None = field(
        default=None,
        metadata={"help": "Delete stored completions, feedback and preferences created more than this many days "
                          "ago, when the server starts and then daily (unset: keep them; `python -m "
                          "serve.feedback prune --retain-days N` does it once)."},
    )
    alias: str = field(
        default="production",
        metadata={"help": "The model alias (python -m serve.promote) whose model the app, /chat and /v1 serve by "
                          "default while it is set (followed without a restart); '' for none."},
    )
    admins: str = field(
        default="",
        metadata={"help": "Comma-separated user names (of the --auth-file login) that see and manage every "
                          "user's stored completions and feedback; the API key's holder always does."},
    )

    def openai_key(self) -> str | None:
        """The API key from --api-key-file or $ASSISTANT_API_KEY."""
        return _secret("--api-key-file", self.api_key_file, "ASSISTANT_API_KEY")

    def backend_key(self) -> str | None:
        """The --backend-url server's key from --backend-key-file or $ASSISTANT_BACKEND_KEY."""
        return _secret("--backend-key-file", self.backend_key_file, "ASSISTANT_BACKEND_KEY")

    def credentials(self) -> list[tuple[str, str]] | None:
        """The logins, (user, password) per line of --auth-file or $ASSISTANT_AUTH; None when the app is open."""
        value = _secret("--auth-file", self.auth_file, "ASSISTANT_AUTH")
        if not value:
            return None
        logins = []
        for number, line in enumerate(value.splitlines(), 1):
            if not line.strip():
                continue
            user, sep, password = line.strip().partition(":")
            if not sep or not user or not password:  # the line itself is a secret: never echo it
                raise ValueError(f"--auth-file / $ASSISTANT_AUTH line {number} must be user:password")
            if user in (name for name, _ in logins):
                raise ValueError(f"--auth-file / $ASSISTANT_AUTH line {number}: user {user!r} is given twice")
            logins.append((user, password))
        return logins

    def access_policy(self) -> AccessPolicy:
        """Who may call /v1, /chat and the screens' actions under this configuration (serve.access)."""
        return AccessPolicy(
            api_key=self.openai_key(), bind_host=self.host, share=self.share, login=self.credentials() is not None,
            admins=frozenset(name.strip() for name in self.admins.split(",") if name.strip()),
        )

    def database(self) -> str:
        """The store's URL: --database-url, else $ASSISTANT_DATABASE_URL, else a SQLite file in --jobs-dir."""
        if self.database_url:
            if make_url(self.database_url).password is not None:
                raise ValueError("--database-url must not hold a password (argv shows in `ps` and shell history): "
                                 "put it in $PGPASSWORD or ~/.pgpass, or give the whole URL in "
                                 "$ASSISTANT_DATABASE_URL")
            return self.database_url
        return os.environ.get("ASSISTANT_DATABASE_URL", "").strip() or default_url(self.jobs_dir)


def removed_secret_flag(argv: list[str]) -> str | None:
    """An error for a secret given on the command line with a removed option, else None."""
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in REMOVED_SECRET_FLAGS:
            return (f"{flag} was removed: a secret on the command line shows in `ps` and shell history; "
                    f"use {REMOVED_SECRET_FLAGS[flag]}")
    return None


def _secret(flag: str, path: str | None, env: str) -> str | None:
    """A secret from the file `path` (given with `flag`), else from $`env`; None when neither is set."""
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ValueError(f"{flag} {path}: cannot read it ({error.strerror or error})") from None
        if not value:
            raise ValueError(f"{flag} {path} is empty: write the secret into it")
        return value
    return os.environ.get(env, "").strip() or None
