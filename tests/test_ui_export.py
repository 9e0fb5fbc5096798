"""The chat tab's "Export this adapter" panel: a zip to download, plain-text results, the Train tab's access rule."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from assistant.embedded import gguf_path
from serve.access import AccessPolicy
from serve.registry import BASE_CHOICE, ModelRegistry
from tests.conftest import wait_for
from ui.export_panel import CHOOSE_AN_ADAPTER, ExportPanel

LOOPBACK, STRANGER = "127.0.0.1", "203.0.113.9"


def request_from(peer: str, headers: dict | None = None):
    """What Gradio hands an event function as its gr.Request."""
    return SimpleNamespace(client=SimpleNamespace(host=peer), headers=headers or {}, username=None,
                           session_hash="s1")


@pytest.fixture
def no_llama_cpp(monkeypatch) -> None:
    """Exports as on a machine without llama.cpp's binding: not verified (tests/test_export.py verifies), and
    seconds faster."""
    monkeypatch.setattr("serve.exports.ExportRunner.extra_args", ("--skip-verify",))  # exports run as processes


@pytest.fixture
def panel(lora_adapter, tmp_path) -> ExportPanel:
    """The panel over a registry listing the "pirate" adapter, under the default rule (this machine only)."""
    return ExportPanel(ModelRegistry(lora_adapter.parent), AccessPolicy(), root=tmp_path / "exports")


def written(panel: ExportPanel) -> list[Path]:
    """Everything under the panel's exports folder."""
    root = panel._root
    return sorted(root.rglob("*")) if root is not None and root.exists() else []


@pytest.mark.slow
def test_export_to_ollama_gives_a_zip_with_the_modelfile_and_both_ggufs(panel, no_llama_cpp):
    text, archive = panel.export("pirate", "ollama", request_from(LOOPBACK))
    assert archive is not None, text
    archive = Path(archive)
    assert archive.name == "pirate-ollama.zip" and archive.is_relative_to(panel._root)
    with zipfile.ZipFile(archive) as zipped:
        names = zipped.namelist()
        assert zipped.testzip() is None
    files = {Path(name).name for name in names}
    assert {"Modelfile", "adapter.gguf", gguf_path().name} <= files, names
    assert all(name.startswith("pirate-ollama/") for name in names), names
    assert "ollama create" in text and "Modelfile" in text and "pirate-ollama.zip" in text, text


def test_the_base_model_has_nothing_to_export(panel):
    assert panel.export(BASE_CHOICE, "ollama", request_from(LOOPBACK)) == (CHOOSE_AN_ADAPTER, None)
    assert "choose an adapter first" in CHOOSE_AN_ADAPTER
    assert written(panel) == []


@pytest.mark.parametrize(
    "request_",
    [request_from(STRANGER), request_from(LOOPBACK, {"x-forwarded-for": STRANGER}), None],
    ids=["stranger", "proxied", "no-request"],
)
def test_a_refused_request_writes_nothing_and_says_why(panel, request_, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("train.export ran for a refused request")

    monkeypatch.setattr(panel.exports, "start", must_not_run)
    text, archive = panel.export("pirate", "ollama", request_)
    assert archive is None
    assert text.startswith("Export refused: Without an API key only callers on this machine are served"), text
    assert written(panel) == []


@pytest.mark.parametrize(
    "error",
    ["ExportError", "TemplateError", "OSError"],
)
def test_a_failed_export_shows_its_message_as_text_and_leaves_nothing(panel, error, monkeypatch):
    message = "pirate <b>cannot</b> go there: LoRA only"  # as typed: the Textbox shows it as text
    # train.export's own main() in its process, its export() failing with `error` (a stand-in for the real one).
    failing = f"""
import sys
from pathlib import Path
import train.export

def fail(config):
    Path(config.output_dir).mkdir(parents=True)  # a half-written export must not stay behind
    raise {{"ExportError": train.export.ExportError, "TemplateError": train.export.TemplateError,
            "OSError": OSError}}[{error!r}]({message!r})

train.export.export = fail
sys.exit(train.export.main(sys.argv[1:]))
"""
    monkeypatch.setattr(panel.exports, "program", [sys.executable, "-c", failing])
    assert panel.export("pirate", "gguf", request_from(LOOPBACK)) == (f"Export failed: {message}", None)
    assert written(panel) == []


@pytest.mark.slow
def test_a_remote_backend_client_has_no_export_panel(app_server):
    from ui.app import build_app
    from ui.config import ChatConfig

    assert app_server.demo.export_panel is not None
    front = build_app(ChatConfig(backend_url=app_server.url + "v1"))
    assert front.export_panel is None
    assert not [b for b in front.blocks.values() if getattr(b, "elem_id", None) == "export"]


@pytest.mark.browser
@pytest.mark.slow
def test_export_in_the_browser_offers_the_zip_for_download(open_page, no_llama_cpp):
    page = open_page()
    page.locator("#adapter input").click()
    page.get_by_role("option", name="pirate").click()
    wait_for(lambda: page.input_value("#adapter input") == "pirate", 10, what="the adapter chosen")
    page.get_by_text("Export this adapter").click()
    page.get_by_label("Ollama (Modelfile + GGUF)").check()
    page.click("#export-run")
    link = page.locator("#export-file a[download='pirate-ollama.zip']")  # the link shows the size
    link.wait_for(timeout=60_000)
    assert page.locator("#export-file").inner_text().replace("\n", "").startswith("Downloadpirate-ollama.zip")
    result = page.input_value("#export-result textarea")
    assert "ollama create" in result and "pirate-ollama.zip" in result, result
    download = page.request.get(link.get_attribute("href"))
    assert download.ok and download.body()[:2] == b"PK", "the link serves the zip"
