"""CUDA-only checks: 8-bit serving and QLoRA training (skipped without a GPU)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from assistant.generation import GenerationParams, complete_reply
from assistant.loading import load_chat_model
from tests.conftest import NEEDS_CUDA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)]

ROOT = Path(__file__).parent.parent


def test_the_app_loads_the_base_in_8_bit_on_cuda_and_answers():
    chat = load_chat_model()
    assert chat.precision.name == "8bit" and "cuda" in chat.describe()
    assert torch.cuda.memory_allocated() < 400 * 2**20  # 135M parameters in int8 plus overheads
    reply = complete_reply(chat, [{"role": "user", "content": "Hi!"}], GenerationParams(max_new_tokens=16))
    assert reply.strip()


def test_qlora_training_runs_on_cuda(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.sft",
            str(ROOT / "tests/data/valid_pairs.jsonl"),
            "--load-in-4bit",
            "--output-dir",
            str(tmp_path / "qlora"),
            "--max-steps",
            "3",
            "--learning-rate",
            "1e-3",
            "--probes",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
