"""The chat tab's "Export this adapter" panel: the chosen adapter as a zip for Ollama, llama.cpp or transformers.

The work is train.export's, run as its own process by serve.exports (the same files `python -m train.export`
writes, verified with llama.cpp where its binding is already built here; the UI never builds it); its phases
show as the progress of the Export button while it runs. Each export goes into a fresh folder under a temp
folder this app owns (never the adapters folder the menu lists), is zipped for download, and the temp folder
is removed when the app exits. Exports hand out the adapter's weights, so they follow the Train tab's rule
(serve.access): a logged-in user, or a caller on this machine. What is shown (train.export's summary, its
errors, adapter names) is plain text in a Textbox, never Markdown or HTML.
"""

from __future__ import annotations

import atexit
import logging
import re
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from serve.access import AccessPolicy
from serve.exports import ExportRunner
from serve.registry import BASE_CHOICE
from ui.access import admit

if TYPE_CHECKING:
    from serve.registry import ModelRegistry

logger = logging.getLogger(__name__)

FORMATS = [  # (label, train.export's --to)
    ("Ollama (Modelfile + GGUF)", "ollama"),
    ("llama.cpp (GGUF LoRA)", "gguf"),
    ("Merged model (safetensors)", "merged"),
]
TAKES = {"ollama": "about 15 s, 35 s with the llama.cpp check", "gguf": "about 15 s, 35 s with the llama.cpp check",
         "merged": "20-30 s: it loads the model"}
CHOOSE_AN_ADAPTER = "The base model has no adapter to export: choose an adapter first (the Adapter menu above)."
KEEP = 3  # exports kept on disk; older ones go (their zips were copied into Gradio's cache when handed out)
# Weights are stored, not deflated: deflating a merged fp32 model (540 MB) takes about a minute on two cores
# for a zip half its size, and quantized GGUF barely shrinks at all.
STORED_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt")
# Gradio swaps a parameter whose default is a gr.Progress for a fresh tracker on every event; called
# directly (tests), this one reports to no page.
_PROGRESS = gr.Progress()


class ExportPanel:
    """The panel's components and its export function over the app's model registry."""

    def __init__(self, registry: ModelRegistry, access: AccessPolicy | None, root: str | Path | None = None,
                 exports: ExportRunner | None = None):
        # access None only for in-process use, where no caller is remote (as Handlers and TrainTab take it).
        self.registry, self.access = registry, access
        self.exports = exports or ExportRunner()  # runs train.export as a process
        self._root = Path(root) if root else None  # None: a temp folder, made on the first export
        self._root_lock = threading.Lock()

    # -- layout --------------------------------------------------------------------------------------
    def layout(self) -> None:
        """The collapsed accordion (call inside the chat tab's right column, under the Adapter menu)."""
        with gr.Accordion("Export this adapter", open=False, elem_id="export"):
            self.format = gr.Radio(FORMATS, value="ollama", label="Format", elem_id="export-format")
            self.button = gr.Button("Export", elem_id="export-run")
            self.result = gr.Textbox(label="Export result", lines=4, max_lines=12, interactive=False,
                                     elem_id="export-result")
            self.file = gr.File(label="Download", interactive=False, elem_id="export-file")

    def wire(self, choice: gr.Dropdown) -> None:
        """Connect Export to the chat's Adapter menu `choice`."""
        # One export at a time: each takes both cores for seconds (merged: loads a whole model).
        self.button.click(self.export, [choice, self.format], [self.result, self.file], concurrency_limit=1,
                          api_visibility="private")
        # A download shown under another adapter's name would be misleading.
        choice.change(lambda: ("", None), None, [self.result, self.file], queue=False, api_visibility="private")

    # -- the export ----------------------------------------------------------------------------------
    def export(self, choice: str | None, to: str, request: gr.Request | None,
               progress: gr.Progress = _PROGRESS) -> tuple[str, str | None]:
        """Export the chosen adapter to `to` (ollama, gguf or merged): (what happened as text, the zip or None)."""
        try:  # checked before anything is read or written
            admit(self.access, request, "an adapter export")
        except gr.Error as refused:
            return f"Export refused: {refused.message}", None
        if to not in {value for _, value in FORMATS}:  # only the Radio's values, never anything else the page might send
            return f"Choose a format: {', '.join(label for label, _ in FORMATS)}.", None
        choice = choice or self.registry.default_choice()
        if choice == BASE_CHOICE:
            return CHOOSE_AN_ADAPTER, None
        folder = self.registry.adapters.get(choice)
        if folder is None:
            broken = self.registry.unavailable.get(choice)
            why = broken.describe() if broken else "it is no longer in the adapters folder"
            return f"Cannot export {choice}: {why}", None
        name = _safe_name(folder.name)
        progress(0.1, desc=f"Exporting {name} ({TAKES[to]})")
        work: Path | None = None
        try:
            work = Path(tempfile.mkdtemp(prefix=f"{name}-{to}-", dir=self._exports_root()))
            return self._export(folder, to, work, f"{name}-{to}", progress)
        except (OSError, ValueError, RuntimeError) as error:  # ExportFailed (train.export's message): RuntimeError
            logger.info("export of %s to %s failed: %s", folder, to, error)
            failed = f"Export failed: {error}"
        except Exception as error:  # a bug: logged with its traceback, the page gets one line
            logger.exception("export of %s to %s failed", folder, to)
            failed = f"Export failed unexpectedly ({type(error).__name__}: {error}); the server log has the details."
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        return failed, None

    def _export(self, folder: Path, to: str, work: Path, stem: str, progress: gr.Progress) -> tuple[str, str]:
        # --verify left off: checked with llama.cpp when its binding is already built here, never built from
        # the UI (an hour of compiling).
        running = self.exports.start(folder, to, work / stem, base_model=getattr(self.registry, "base_model", None))

        def phase(event: dict) -> None:  # train.export's phases, as the button's progress bar
            share, message = float(event.get("progress") or 0.0), str(event.get("message", ""))
            progress(0.1 + 0.75 * share, desc=f"{message[:1].upper()}{message[1:]} "
                                              f"({event.get('elapsed_s', 0):.0f} s so far; {TAKES[to]} in all)")

        summary = running.wait(phase)  # ExportFailed (a RuntimeError): train.export's message
        progress(0.85, desc="Zipping")
        archive = zip_folder(work / stem, work / f"{stem}.zip")
        logger.info("exported %s to %s: %s", folder, to, archive)
        progress(1.0, desc="Done")
        return f"{summary}\nDownload: {archive.name} (unzip it; it holds the {stem} folder).", str(archive)

    def _exports_root(self) -> Path:
        """This app's exports folder (made on first use, removed at exit), the oldest exports beyond KEEP removed."""
        with self._root_lock:
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix="chat-assistant-exports-"))
                atexit.register(shutil.rmtree, self._root, ignore_errors=True)
            self._root.mkdir(parents=True, exist_ok=True)
            older = sorted((p for p in self._root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
            for stale in older[: max(0, len(older) - KEEP + 1)]:  # room for the one about to be made
                shutil.rmtree(stale, ignore_errors=True)
            return self._root


def zip_folder(folder: Path, archive: Path) -> Path:
    """`folder` zipped into `archive` under its own name (weights stored, the rest deflated)."""
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                kind = zipfile.ZIP_STORED if path.suffix in STORED_SUFFIXES else zipfile.ZIP_DEFLATED
                zipped.write(path, Path(folder.name) / path.relative_to(folder), compress_type=kind)
    return archive


def _safe_name(name: str) -> str:
    """A folder name as a file-name stem: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "adapter"
