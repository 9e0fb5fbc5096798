"""`python -m ui`: serve the chat app (see `python -m ui --help`)."""

from __future__ import annotations

import logging
import sys

from transformers import HfArgumentParser

from assistant.logs import configure
from ui.config import ChatConfig

logger = logging.getLogger(__name__)


def parse_config(argv: list[str] | None = None) -> ChatConfig:
    """ChatConfig from command-line arguments."""
    parser = HfArgumentParser(ChatConfig, prog="python -m ui", description="Chat with the base model or your adapters in a web app.")
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    return config


def main(argv: list[str] | None = None) -> None:
    """Build the app, load the default model, serve it and print its URL."""
    configure(logging.INFO)
    config = parse_config(argv)
    from ui.app import (  # after parsing, so --help answers without importing gradio and torch
        build_app,
        mount_openai_api,
    )

    try:
        auth = config.credentials()
        demo = build_app(config)
    except (OSError, ValueError) as error:
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
    mount_openai_api(demo, config)
    print(f"Chat app running on {local_url}" + (f" (public: {share_url})" if share_url else ""), flush=True)
    demo.block_thread()


if __name__ == "__main__":
    main()
