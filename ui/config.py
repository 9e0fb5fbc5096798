"""The chat app's one configuration, shared by `python -m ui`, the Space's app.py and the tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ChatConfig:
    """Command-line options of `python -m ui` (parsed with transformers.HfArgumentParser)."""

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
        metadata={"help": "Weight precision. auto: on a GPU 8-bit (bitsandbytes); on a CPU with bf16 units "
                          "int4 for the embedded model (its weights are 4-bit already), bf16 for others, "
                          "else fp32. int4: 4-bit CPU kernels for any model (lossy unless it came from Q4_1)."}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (0.0.0.0 to serve the network)."})
    port: int = field(default=7860, metadata={"help": "Port to listen on."})
    adapters_dir: str = field(
        default="adapters", metadata={"help": "Folder whose adapter subfolders are listed in the menu."}
    )
    auth: str | None = field(
        default=None,
        metadata={"help": "Require a login, given as user:pass; unset, $ASSISTANT_AUTH if set, else no login."},
    )
    share: bool = field(default=False, metadata={"help": "Also open a temporary public gradio.live link."})
    api_key: str | None = field(
        default=None,
        metadata={"help": "Bearer key the OpenAI-compatible API (/v1) requires; unset, $ASSISTANT_API_KEY if "
                          "set, else the API answers only when the app is bound to localhost."},
    )
    backend_url: str | None = field(
        default=None,
        metadata={"help": "Front a remote OpenAI-compatible server (e.g. vLLM: http://host:8000/v1) instead of "
                          "loading a model in-process."},
    )
    backend_key: str | None = field(default=None, metadata={"help": "API key for --backend-url."})
    max_queue: int = field(default=32, metadata={"help": "Requests that may wait in the queue before refusal."})

    def openai_key(self) -> str | None:
        """The API key from --api-key or $ASSISTANT_API_KEY."""
        return self.api_key or os.environ.get("ASSISTANT_API_KEY") or None

    def credentials(self) -> tuple[str, str] | None:
        """(user, password) from --auth or $ASSISTANT_AUTH, or None when the app is open."""
        value = self.auth or os.environ.get("ASSISTANT_AUTH")
        if not value:
            return None
        user, sep, password = value.partition(":")
        if not sep or not user or not password:
            raise ValueError("--auth / ASSISTANT_AUTH must look like user:password")
        return user, password
