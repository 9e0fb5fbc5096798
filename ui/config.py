"""The chat app's configuration: the server's (serve.config) plus what only the screens need."""

from __future__ import annotations

from dataclasses import dataclass, field

from serve.config import ServerConfig


@dataclass
class ChatConfig(ServerConfig):
    """Command-line options of `python -m ui` (parsed with transformers.HfArgumentParser)."""

    max_queue: int = field(default=32, metadata={"help": "Requests that may wait in the queue before refusal."})
