"""vLLM scale-out: which adapters vLLM can serve, and the exact command it is started with."""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from assistant.adapters import ADAPTER_CONFIG, WEIGHTS, AdapterFolder
from assistant.embedded import embedded_model_dir
from serve.vllm import NotServable, VLLMConfig, check_adapter, vllm_command

ROOT = Path(__file__).parent.parent


def fake_adapter(folder: Path, **config) -> Path:
    """An adapter folder as train.sft writes its config (the weights' content is not read by the checks)."""
    folder.mkdir(parents=True)
    base = {
        "peft_type": "LORA",
        "r": 16,
        "lora_alpha": 32,
        "base_model_name_or_path": "embedded",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "use_dora": False,
        "modules_to_save": None,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**base, **config}))
    (folder / WEIGHTS[0]).write_bytes(b"\0" * 16)
    return folder


def test_a_lora_adapter_gives_the_exact_vllm_command(tmp_path):
    a = fake_adapter(tmp_path / "support")
    b = fake_adapter(tmp_path / "sales", r=24)
    command = vllm_command(VLLMConfig(adapters=[str(a), str(b)], port=8001))
    assert command[:3] == ["vllm", "serve", str(embedded_model_dir())]
    line = shlex.join(command)
    assert "--enable-lora" in command and "--max-lora-rank 32" in line and "--max-loras 2" in line
    assert f"--lora-modules support={a.resolve()} sales={b.resolve()}" in line
    assert "--port 8001" in line and "--served-model-name base" in line


def test_a_prefix_adapter_is_refused_with_the_fix(tmp_path):
    prefix = fake_adapter(tmp_path / "prefix", peft_type="PREFIX_TUNING")
    with pytest.raises(NotServable, match="LoRA only.*merge.*--method lora"):
        check_adapter(prefix)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"r": 1024}, "rank 1024"),
        ({"target_modules": ["lm_head"]}, "lm_head"),
        ({"modules_to_save": ["embed_tokens"]}, "modules_to_save"),
    ],
)
def test_limits_of_vllm_lora_are_checked(tmp_path, config, message):
    with pytest.raises(NotServable, match=message):
        check_adapter(fake_adapter(tmp_path / "a", **config))


def test_the_check_answers_with_the_adapter_folder(tmp_path):
    folder = check_adapter(fake_adapter(tmp_path / "support", r=24))
    assert isinstance(folder, AdapterFolder) and folder.kind == "lora" and folder.config["r"] == 24


def test_an_adapter_without_weights_or_a_merged_model_is_refused(tmp_path):
    empty = fake_adapter(tmp_path / "empty")
    (empty / WEIGHTS[0]).unlink()
    with pytest.raises(NotServable, match="no adapter weights"):
        check_adapter(empty)
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(NotServable, match="merged model"):
        check_adapter(merged)
    with pytest.raises(NotServable, match="no such folder"):
        check_adapter(tmp_path / "missing")


def test_base_model_overrides_the_adapters_own(tmp_path):
    a = fake_adapter(tmp_path / "a", base_model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct")
    command = vllm_command(VLLMConfig(adapters=[str(a)], base_model="my/base"))
    assert command[:3] == ["vllm", "serve", "my/base"]


def test_adapters_of_different_bases_are_refused(tmp_path):
    a = fake_adapter(tmp_path / "a")
    b = fake_adapter(tmp_path / "b", base_model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(NotServable, match="different base models"):
        vllm_command(VLLMConfig(adapters=[str(a), str(b)]))


@pytest.mark.slow
def test_cli_accepts_a_trained_lora_and_rejects_a_trained_prefix(trained_lora, trained_prefix):
    """On real adapters from the trainer, through the command line a user types."""
    runs = {"lora": trained_lora, "prefix": trained_prefix}
    cli = [sys.executable, "-m", "serve.vllm"]
    ok = subprocess.run([*cli, str(runs["lora"]), "--print"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("vllm serve ") and "--enable-lora" in ok.stdout
    refused = subprocess.run([*cli, str(runs["prefix"]), "--print"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "LoRA only" in refused.stderr
    if shutil.which("vllm") is None:
        missing = subprocess.run([*cli, str(runs["lora"])], cwd=ROOT, capture_output=True, text=True)
        assert missing.returncode == 2 and "not installed" in missing.stderr


def test_an_adapter_trained_with_its_own_system_prompt_is_flagged(tmp_path, caplog):
    from assistant.adapters import summarize_prompts, write_trained_prompt

    plain = fake_adapter(tmp_path / "plain")
    write_trained_prompt(plain, summarize_prompts([None], "SmolLM default", "template default"))
    pirate = fake_adapter(tmp_path / "pirate")
    write_trained_prompt(pirate, summarize_prompts([None], "Talk like a pirate.", "--system-prompt"))
    with caplog.at_level("WARNING", logger="serve.vllm"):
        vllm_command(VLLMConfig(adapters=[str(plain), str(pirate)]))
    flagged = [r.getMessage() for r in caplog.records]
    assert len(flagged) == 1 and "Talk like a pirate." in flagged[0] and "clients must send it" in flagged[0]


@pytest.mark.parametrize("source", ["file", "env"])
def test_print_shows_no_key(tmp_path, monkeypatch, capsys, source):
    from serve.vllm import main

    adapter = fake_adapter(tmp_path / "support")
    args = [str(adapter), "--print"]
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    if source == "file":
        (tmp_path / "key").write_text("sk-vllm-secret\n")
        args += ["--api-key-file", str(tmp_path / "key")]
    else:
        monkeypatch.setenv("VLLM_API_KEY", "sk-vllm-secret")
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.startswith(("vllm serve ", "VLLM_API_KEY=")) and "--enable-lora" in out
    assert "sk-vllm-secret" not in out + err and "--api-key" not in out
    if source == "file":  # still runnable as printed: the key is read from its file
        assert out.startswith(f'VLLM_API_KEY="$(cat {tmp_path / "key"})" vllm serve ')


def test_the_key_reaches_vllm_through_its_environment_not_its_argv(tmp_path, monkeypatch):
    import serve.vllm

    adapter = fake_adapter(tmp_path / "support")
    (tmp_path / "key").write_text("sk-vllm-secret")
    started = {}
    monkeypatch.setattr(serve.vllm.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(serve.vllm.os, "execvpe", lambda file, argv, env: started.update(argv=argv, env=env))
    assert serve.vllm.main([str(adapter), "--api-key-file", str(tmp_path / "key")]) == 0
    assert started["env"]["VLLM_API_KEY"] == "sk-vllm-secret"
    assert not any("sk-vllm-secret" in a for a in started["argv"]) and "--api-key" not in started["argv"]


@pytest.mark.parametrize("argv", [["--api-key", "sk-typed"], ["--api-key=sk-typed"], ["--api-k", "sk-typed"]])
def test_a_key_on_the_command_line_is_refused_without_echoing_it(tmp_path, capsys, argv):
    from serve.vllm import main

    with pytest.raises(SystemExit) as exited:
        main([str(fake_adapter(tmp_path / "a")), *argv, "--print"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "sk-typed" not in err and "--api-k" in err
    if argv[0].startswith("--api-key"):
        assert "removed" in err and "$VLLM_API_KEY or --api-key-file" in err


def test_the_compose_file_requires_a_key_instead_of_shipping_one():
    import yaml

    text = (ROOT / "deploy" / "docker-compose.vllm.yml").read_text()
    services = yaml.safe_load(text)["services"]
    assert "change-me" not in text
    assert any(e.startswith("VLLM_API_KEY=${VLLM_API_KEY:?") for e in services["vllm"]["environment"])
    assert any(e.startswith("ASSISTANT_BACKEND_KEY=${VLLM_API_KEY:?") for e in services["ui"]["environment"])
    for service in services.values():  # no key on a command line, where `ps` shows it
        assert "key" not in str(service.get("command", "")).lower()
