"""bitsandbytes is imported only for 8/4-bit loading: a CPU start loads no CUDA quantization library and
prints none of its warnings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

WARNING = "Failed to load CPU gemm_4bit_forward"  # what bitsandbytes prints when imported on a CPU


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter from the repository root (no logging configured, as in a script)."""
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_loading_a_lora_adapter_on_the_cpu_never_imports_bitsandbytes(lora_adapter):
    done = run_python(
        "import sys\n"
        "from assistant.loading import load_chat_model\n"
        "chat = load_chat_model(adapter=sys.argv[1], precision='fp32')\n"
        "assert chat.method == 'lora', chat.describe()\n"
        "print(sorted(n for n, m in sys.modules.items() if n.split('.')[0] == 'bitsandbytes' and m is not None))\n",
        str(lora_adapter),
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
    assert WARNING not in done.stderr, done.stderr[-3000:]


def test_bitsandbytes_comes_back_when_8_or_4_bit_is_asked_for():
    # peft and transformers cached "not installed" while it was held back; 8/4-bit loading needs them to see it.
    done = run_python(
        "import assistant, peft, transformers.integrations.bitsandbytes as integration\n"
        "from peft.import_utils import is_bnb_4bit_available, is_bnb_available\n"
        "from transformers.utils.import_utils import is_bitsandbytes_available\n"
        "assert not is_bnb_available() and not is_bitsandbytes_available()\n"
        "from assistant.optional import require_bitsandbytes\n"
        "bnb = require_bitsandbytes()\n"
        "assert is_bnb_available() and is_bnb_4bit_available() and is_bitsandbytes_available()\n"
        "from peft.tuners.lora.bnb import Linear8bitLt\n"
        "import peft.helpers\n"
        "assert peft.helpers.bnb is bnb and integration.bnb is bnb\n"
        "print('ok')\n"
    )
    assert done.stdout.strip() == "ok", done.stdout
