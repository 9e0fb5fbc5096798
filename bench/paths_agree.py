"""`python -m bench.paths_agree --adapter DIR`: do `/chat`, the chat screen and `/v1` give the same reply?

Serves the adapter in the real app (in this process, on a free localhost port) and sends each held-out
prompt with only the message, the adapter and temperature 0 (no system message, no other parameter)
through Gradio's `/chat` (gradio_client), the chat screen (its Send handler, with the panel as it opens
on the adapter) and `/v1/chat/completions` (the openai SDK). Prints and writes
`bench/results/paths_agree.json`: how many replies agree on all three paths, and the first that differ.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from bench.common import cpu_name, free_port, parse_config

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class PathsConfig:
    """Which adapter, which prompts, how many."""

    adapter: str = field(metadata={"help": "Adapter folder to serve (e.g. one train.sft wrote)."})
    valid_file: str = field(
        default="../shared/data/star/valid.pairs.jsonl",
        metadata={"help": "Held-out rows (prompt/response pairs): each prompt is sent as the only message."},
    )
    rows: int = field(default=100, metadata={"help": "How many prompts to send."})
    output: str = field(default=str(RESULTS / "paths_agree.json"), metadata={"help": "Where to write the result."})


def prompts(path: str, rows: int) -> list[str]:
    """The first `rows` prompts of a pairs file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()][:rows]


def screen_reply(handlers, choice: str, message: str) -> str:
    """The chat screen's reply to `message`: Send with the panel as it opens on `choice`, temperature 0."""
    _, prompt = handlers.prompt_menu(choice)
    s = handlers.slider_settings(choice)
    outputs = list(handlers.send(message, [], [], choice, False, prompt, handlers.prompt_text(prompt, choice, ""),
                                 0.0, s.top_p, s.top_k, s.repetition_penalty, s.max_new_tokens, -1,
                                 SimpleNamespace(session_hash="bench")))
    return outputs[-1][1][-1]["content"]


def main(argv: list[str] | None = None) -> None:
    """Send every prompt through the three paths and count the replies that agree."""
    from gradio_client import Client
    from openai import OpenAI

    from serve.registry import ModelRegistry
    from ui.app import build_app
    from ui.config import ChatConfig

    config = parse_config(PathsConfig, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = Path(tempfile.mkdtemp(prefix="paths-agree-"))
    choice = Path(config.adapter).name
    shutil.copytree(config.adapter, folder / choice)
    demo = build_app(ChatConfig(adapters_dir=str(folder), no_training=True), registry=ModelRegistry(folder))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    chat, v1 = Client(url, verbose=False), OpenAI(base_url=url.rstrip("/") + "/v1", api_key="local")
    agree, differ, started = 0, [], time.monotonic()
    try:
        for n, message in enumerate(prompts(config.valid_file, config.rows), 1):
            replies = {
                "/chat": chat.predict(message, adapter=choice, temperature=0, api_name="/chat"),
                "screen": screen_reply(demo.handlers, choice, message),
                "/v1": v1.chat.completions.create(model=choice, temperature=0, messages=[
                    {"role": "user", "content": message}]).choices[0].message.content,
            }
            if len(set(replies.values())) == 1:
                agree += 1
            else:
                differ.append({"prompt": message, **replies})
            rate = n / (time.monotonic() - started)
            logger.info("%d/%d prompts, %d agree (%.2f prompts/s, ETA %.0f s)", n, config.rows, agree, rate,
                        (config.rows - n) / rate)
    finally:
        demo.close()
        shutil.rmtree(folder, ignore_errors=True)
    result = {"adapter": config.adapter, "rows": config.rows, "agree": agree, "differ": differ[:10],
              "generation_config": demo.registry.generation_defaults(choice), "cpu": cpu_name(),
              "seconds": round(time.monotonic() - started, 1)}
    Path(config.output).parent.mkdir(parents=True, exist_ok=True)
    Path(config.output).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"{agree} of {config.rows} prompts got the same reply through /chat, the chat screen and /v1")


if __name__ == "__main__":
    main()
