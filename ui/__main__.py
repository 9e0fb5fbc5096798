"""`python -m ui`: serve the chat app (see `python -m ui --help`)."""

from __future__ import annotations

import logging
import signal
import sys

from transformers import HfArgumentParser

from assistant.logs import configure
from serve.config import removed_secret_flag
from serve.store import StoreError
from ui.config import ChatConfig

logger = logging.getLogger(__name__)


def parse_config(argv: list[str] | None = None) -> ChatConfig:
    """ChatConfig from command-line arguments."""
    # No abbreviations: `--api-key SECRET` must not quietly become `--api-key-file SECRET`.
    parser = HfArgumentParser(ChatConfig, prog="python -m ui", allow_abbrev=False,
                              description="Chat with the base model or your adapters in a web app.")
    removed = removed_secret_flag(sys.argv[1:] if argv is None else argv)
    if removed:
        parser.error(removed)
    config, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:  # names only: the value after a mistyped option may be a secret
        unknown = [a.split("=", 1)[0] for a in rest if a.startswith("-")] or ["(a value without an option)"]
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return config


def main(argv: list[str] | None = None) -> None:
    """Build the app, load the default model, serve it and print its URL."""
    configure(logging.INFO)
    config = parse_config(argv)
    from ui.app import build_app  # after parsing, so --help answers without importing gradio and torch

    try:
        auth = config.credentials()
        demo = build_app(config)
        if demo.service.local:  # open (and upgrade) the store now: a wrong --database-url stops the start
            logger.info("stored completions in %s", demo.service.store.label)
    except (OSError, ValueError, StoreError) as error:
        sys.exit(f"error: {error}")
    # Warm the default choice so the first message does not wait for loading (and errors show now).
    registry = demo.registry  # type: ignore[attr-defined]
    try:
        logger.info("ready: %s", registry.get(registry.default_choice()).describe())
    except (OSError, ValueError) as error:
        sys.exit(f"error: could not load the model: {error}")
    _, local_url, share_url = demo.launch(
        server_name=config.host, server_port=config.port, auth=auth, share=config.share,
        prevent_thread_lock=True, quiet=True,
    )
    # `kill` / docker stop send SIGTERM, which skips atexit: exit through it, so a fine-tuning job that is
    # training is paused (resumable) instead of left running with no server watching it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    print(f"Chat app running on {local_url}" + (f" (public: {share_url})" if share_url else ""), flush=True)
    demo.block_thread()


if __name__ == "__main__":
    main()
