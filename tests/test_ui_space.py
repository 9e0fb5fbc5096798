"""Deployment files: the Space front matter, `python -m ui.space export`, app.py's env config, the CLI."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import gradio
import pytest
from huggingface_hub import RepoCard, metadata_load

from assistant.adapters import (
    ADAPTER_CONFIG,
    WEIGHTS,
    read_folder,
    summarize_prompts,
    write_base_name,
    write_trained_prompt,
)
from assistant.embedded import EMBEDDED_HUB_ID
from serve.registry import ModelRegistry
from ui.space import export_space, main, resolve_adapter, space_base_model, write_front_matter

ROOT = Path(__file__).resolve().parent.parent


def fake_adapter(folder: Path, base: str = "embedded") -> Path:
    """An adapter folder as the trainer writes it (weights need not be real to be exported)."""
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "base_model_name_or_path": base, "r": 8, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    (folder / "tokenizer_config.json").write_text("{}")
    write_trained_prompt(folder, summarize_prompts([None], "You help customers of Acme.", "--system-prompt"))
    return folder


def check_space_card(readme: Path, folder: Path) -> dict:
    card = RepoCard.load(readme)
    meta = metadata_load(readme)
    assert meta == card.data.to_dict()
    assert meta["sdk"] == "gradio"
    assert meta["sdk_version"] == gradio.__version__, "the Space must run the gradio version we test"
    assert (folder / meta["app_file"]).is_file()
    assert str(meta["python_version"]) == "3.11"
    assert EMBEDDED_HUB_ID in meta["models"]
    for key in (
        "title",
        "emoji",
        "colorFrom",
        "colorTo",
        "license",
        "short_description",
        "suggested_hardware",
    ):
        assert meta.get(key), f"front matter lacks {key}"
    assert len(meta["short_description"]) <= 60, "the Hub caps short_description at 60 characters"
    return meta


def test_readme_front_matter_is_a_valid_space_config():
    meta = check_space_card(ROOT / "README.md", ROOT)
    assert meta["app_file"] == "app.py" and meta["suggested_hardware"] == "cpu-basic"


def test_front_matter_update_keeps_the_readme_body(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("---\ntitle: old\nsdk: gradio\nsdk_version: 1.0\n---\n\n# Body\n\nText.\n")
    write_front_matter(readme)
    text = readme.read_text()
    assert text.count("---\n") == 2 and text.endswith("# Body\n\nText.\n")
    assert metadata_load(readme)["sdk_version"] == gradio.__version__
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# Only a body\n")
    write_front_matter(plain)
    assert plain.read_text().startswith("---\n") and plain.read_text().endswith("# Only a body\n")


def test_export_writes_a_ready_space_folder(tmp_path):
    adapter = fake_adapter(tmp_path / "adapters" / "support-bot")
    out = export_space(adapter, tmp_path / "space")
    meta = check_space_card(out / "README.md", out)
    assert meta["models"] == [EMBEDDED_HUB_ID] and "support-bot" in meta["title"]
    for path in (
        "app.py",
        "assistant/generation.py",
        "ui/app.py",
        "ui/space.py",
        "prompts/general.txt",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer_config.json",
    ):
        assert (out / path).is_file(), path
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == EMBEDDED_HUB_ID, "a Space has no embedded GGUF package"
    requirements = (out / "requirements.txt").read_text()
    for pin in ("torch==", "transformers==", "peft==", "huggingface_hub=="):
        assert pin in requirements
    assert "gradio" not in requirements, "Spaces install gradio from sdk_version"
    assert not list(out.rglob("__pycache__"))
    # The exported app.py finds the bundled adapter without any environment variable...
    assert resolve_adapter(None, out) == str(out / "adapter")
    # ...and serves it by default with the system prompt it was trained with.
    registry = ModelRegistry(out / "adapters", [resolve_adapter(None, out)])
    assert registry.trained_prompt(registry.default_choice()).text == "You help customers of Acme."
    compile((out / "app.py").read_text(), "app.py", "exec")


def test_the_space_names_its_base_through_assistant_adapters(tmp_path, monkeypatch):
    """export_space rewrites no adapter file itself: assistant.adapters.write_base_name does it."""
    import ui.space

    calls = []
    monkeypatch.setattr(ui.space, "write_base_name", lambda folder, base: calls.append((Path(folder), base)))
    out = export_space(fake_adapter(tmp_path / "bot", base="Qwen/Qwen2.5-0.5B-Instruct"), tmp_path / "space")
    assert calls == [(out / "adapter", "Qwen/Qwen2.5-0.5B-Instruct")]


def test_write_base_name_keeps_the_rest_of_the_config_and_is_read_at_once(tmp_path):
    adapter = fake_adapter(tmp_path / "bot")
    assert read_folder(adapter).named_base == "embedded"
    write_base_name(adapter, EMBEDDED_HUB_ID)
    folder = read_folder(adapter)
    assert folder.named_base == EMBEDDED_HUB_ID and folder.config["r"] == 8 and folder.kind == "lora"
    assert json.loads((adapter / ADAPTER_CONFIG).read_text())["target_modules"] == ["q_proj"]
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        write_base_name(tmp_path, EMBEDDED_HUB_ID)


def test_an_adapter_without_weights_is_not_exported(tmp_path, capsys):
    adapter = fake_adapter(tmp_path / "bot")
    (adapter / WEIGHTS[0]).unlink()
    assert main(["export", str(adapter), "--output-dir", str(tmp_path / "space")]) == 1
    assert "no adapter weights" in capsys.readouterr().err and not (tmp_path / "space").exists()


def test_export_cli_refuses_a_full_folder_and_a_push_without_token(tmp_path, monkeypatch, capsys):
    adapter = fake_adapter(tmp_path / "bot")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export", str(adapter), "--output-dir", str(tmp_path / "full")]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--output-dir", str(tmp_path / "o1")]) == 1
    assert "not an adapter folder" in capsys.readouterr().err

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert main(["export", str(adapter), "--output-dir", str(tmp_path / "o2"), "--push", "me/bot"]) == 1
    assert "token" in capsys.readouterr().err
    assert (tmp_path / "o2" / "app.py").is_file(), "the folder is written before the upload is tried"


def test_space_base_model_maps_embedded_to_its_hub_twin(tmp_path, monkeypatch):
    adapter = fake_adapter(tmp_path / "a", base="embedded")
    other = fake_adapter(tmp_path / "b", base="Qwen/Qwen2.5-0.5B-Instruct")
    assert space_base_model(other) == "Qwen/Qwen2.5-0.5B-Instruct"
    assert space_base_model(adapter, "some/model") == "some/model"
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert space_base_model(adapter) == EMBEDDED_HUB_ID
    assert space_base_model(None) == EMBEDDED_HUB_ID
    # peft records the prepared cache folder when an adapter is made on the loaded embedded model.
    monkeypatch.setenv("ASSISTANT_CACHE", str(tmp_path / "cache"))
    prepared = tmp_path / "cache" / "smollm2-135m-instruct-q4_1"
    prepared.mkdir(parents=True)
    assert space_base_model(fake_adapter(tmp_path / "c", base=str(prepared))) == EMBEDDED_HUB_ID


def test_space_app_reads_its_environment(tmp_path, monkeypatch):
    adapter = fake_adapter(tmp_path / "tuned")
    monkeypatch.setenv("SPACE_ID", "me/chat")
    monkeypatch.setenv("ASSISTANT_ADAPTER", str(adapter))
    monkeypatch.setenv("ASSISTANT_PRECISION", "fp32")
    monkeypatch.setenv("ASSISTANT_ADAPTERS_DIR", str(tmp_path / "no-more-adapters"))
    monkeypatch.setenv("ASSISTANT_JOBS_DIR", str(tmp_path / "jobs"))
    monkeypatch.delenv("ASSISTANT_NO_TRAINING", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    sys.modules.pop("app", None)
    app = importlib.import_module("app")  # builds the demo; loads no model
    config = app.config_from_env()
    assert (config.host, config.port, config.precision) == ("0.0.0.0", 7860, "fp32")
    assert config.adapter == [str(adapter)]
    assert app.demo.registry.choices == ["base model", "tuned"]
    assert not app.demo.registry._models, "importing app.py must not load a model"
    monkeypatch.delenv("SPACE_ID")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    assert app.config_from_env().host == "0.0.0.0"
    monkeypatch.delenv("GRADIO_SERVER_NAME")
    assert app.config_from_env().host == "127.0.0.1"
    # The Space's Train tab runs jobs in ASSISTANT_JOBS_DIR unless ASSISTANT_NO_TRAINING turns it off.
    assert app.demo.jobs is not None and app.demo.jobs.root == (tmp_path / "jobs").resolve()
    assert not app.config_from_env().no_training
    monkeypatch.setenv("ASSISTANT_NO_TRAINING", "1")
    assert app.config_from_env().no_training
    app.demo.jobs.close()


def test_cli_help_lists_the_flags():
    result = subprocess.run(
        [sys.executable, "-m", "ui", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for flag in (
        "--adapter",
        "--base-model",
        "--precision",
        "--host",
        "--port",
        "--adapters-dir",
        "--auth-file",
        "--api-key-file",
        "--backend-key-file",
        "--max-request-kb",
        "--share",
        "--max-queue",
    ):
        assert flag in result.stdout, flag
    assert "auto,fp32,bf16,fp16,int4,8bit,4bit" in result.stdout


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], {"adapter": [], "port": 7860, "host": "127.0.0.1", "precision": "auto", "share": False}),
        (
            ["--adapter", "a", "--adapter", "b", "--port", "9000", "--share"],
            {"adapter": ["a", "b"], "port": 9000, "share": True},
        ),
        (
            ["--adapter", "a", "b", "--precision", "fp32", "--max-queue", "4"],
            {"adapter": ["a", "b"], "precision": "fp32", "max_queue": 4},
        ),
    ],
)
def test_cli_parses_into_the_config(argv, expected):
    from ui.__main__ import parse_config

    config = parse_config(argv)
    for key, value in expected.items():
        assert getattr(config, key) == value, key
