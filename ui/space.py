"""Hugging Face Space support: the README front matter, the base model a Space serves, and
`python -m ui.space export ADAPTER --output-dir DIR [--push REPO_ID]` to publish an adapter.

The exported folder is self-contained: app.py, the assistant/, serve/ and ui/ packages, prompts/, the adapter
(in adapter/, which app.py picks up) and requirements.txt. Spaces cannot install the embedded GGUF
package, so an adapter trained on the embedded model is served on its Hub twin, EMBEDDED_HUB_ID.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import re
import shutil
import sys
from pathlib import Path

import yaml

from assistant.adapters import ADAPTER_CONFIG, is_listed, read_folder, write_base_name
from assistant.embedded import EMBEDDED_HUB_ID, GGUF_PACKAGE, is_embedded, public_name
from assistant.loading import base_of

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
ADAPTER_DIR = "adapter"  # where an exported Space keeps its adapter; app.py loads it when present
CODE = ("app.py", "assistant", "serve", "ui", "prompts")
# Runtime packages a Space needs (Spaces install gradio itself, at sdk_version).
SPACE_PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "sentencepiece",
                  "huggingface_hub", "bitsandbytes")
FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n+", re.DOTALL)


def front_matter(**overrides) -> dict:
    """Space configuration (README YAML) for this app; keys as in the Spaces config reference."""
    import gradio

    meta = {
        "title": "Chat assistant",
        "emoji": "💬",
        "colorFrom": "indigo",
        "colorTo": "blue",
        "sdk": "gradio",
        "sdk_version": gradio.__version__,
        "app_file": "app.py",
        "python_version": "3.11",
        "suggested_hardware": "cpu-basic",
        "models": [EMBEDDED_HUB_ID],
        "license": "mit",
        "short_description": "A small ChatGPT adapted to your own dialogues",
    }
    meta.update(overrides)
    return meta


def render_front_matter(meta: dict) -> str:
    """The `---` YAML block that opens a Space's README.md."""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"


def write_front_matter(readme: str | Path, meta: dict | None = None) -> Path:
    """Insert or replace the front matter of `readme`, keeping its body (created if missing)."""
    readme = Path(readme)
    body = readme.read_text(encoding="utf-8") if readme.is_file() else "# Chat assistant\n"
    readme.write_text(render_front_matter(meta or front_matter()) + FRONT_MATTER.sub("", body, count=1),
                      encoding="utf-8")
    return readme


def space_base_model(adapter: str | Path | None = None, requested: str | None = None) -> str:
    """Base model to serve: `requested`, else the adapter's base (assistant.loading.base_of), with 'embedded'
    swapped for its Hub twin when the GGUF package is not installed (as on a Space)."""
    base = base_of(requested, adapter)
    if is_embedded(base) and importlib.util.find_spec(GGUF_PACKAGE) is None:
        return EMBEDDED_HUB_ID
    return base


def resolve_adapter(value: str | None, here: Path = ROOT) -> str | None:
    """An adapter folder from a path or a Hub id (downloaded), else the bundled adapter/ if any."""
    if value:
        if Path(value).exists():
            return value
        from huggingface_hub import snapshot_download

        logger.info("downloading adapter %s from the Hub", value)
        return snapshot_download(repo_id=value)
    bundled = here / ADAPTER_DIR
    return str(bundled) if is_listed(bundled) else None


def space_requirements(source: Path = ROOT / "requirements.txt") -> str:
    """requirements.txt for a Space: the project's own pins of the runtime packages."""
    wanted = {name.replace("_", "-") for name in SPACE_PACKAGES}
    lines = [
        line.strip() for line in source.read_text().splitlines()
        if re.split(r"[=<>~! ;\[]", line.strip(), maxsplit=1)[0].lower().replace("_", "-") in wanted
    ]
    return "\n".join(lines) + "\n"


def export_space(adapter: str | Path, output_dir: str | Path, *, title: str | None = None) -> Path:
    """Write a ready-to-push Space folder serving `adapter`; returns the folder."""
    adapter, out = Path(adapter), Path(output_dir)
    folder = read_folder(adapter)
    if not folder.config:
        raise FileNotFoundError(folder.problem or f"{adapter}: not an adapter folder (no {ADAPTER_CONFIG})")
    folder.require()  # e.g. no weights: a Space could not serve it
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: folder exists and is not empty; choose a new --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    _copy_code(out)
    shutil.copytree(adapter, out / ADAPTER_DIR, ignore=shutil.ignore_patterns("checkpoint-*", "*.checkpoints"))
    # The Space cannot install the GGUF package, so always name the Hub twin of the embedded model.
    base = public_name(base_of(None, adapter))
    write_base_name(out / ADAPTER_DIR, base)
    (out / "requirements.txt").write_text(space_requirements())
    meta = front_matter(title=title or f"{adapter.resolve().name} chat", models=[base])
    (out / "README.md").write_text(
        render_front_matter(meta)
        + f"# {meta['title']}\n\nChat with the `{adapter.resolve().name}` adapter on `{base}`.\n"
        "Exported with `python -m ui.space export`; the adapter is in `adapter/`.\n",
        encoding="utf-8",
    )
    logger.info("Space folder written: %s", out)
    return out


def _copy_code(out: Path) -> None:
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in CODE:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, out / name, ignore=skip)
        else:
            shutil.copy2(source, out / name)


def push_space(folder: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Create (or reuse) the Space `repo_id` and upload `folder` to it; returns the Space URL."""
    from huggingface_hub import HfApi, get_token

    if not get_token():
        raise PermissionError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="space",
                          commit_message="Upload chat assistant Space")
    except Exception as error:  # network, auth and naming errors all end the same way for the user
        raise ConnectionError(f"could not upload to the Space {repo_id}: {error}") from error
    return f"https://huggingface.co/spaces/{repo_id}"


def main(argv: list[str] | None = None) -> int:
    """Command line: `export` an adapter as a Space folder, or refresh the README `front-matter`."""
    parser = argparse.ArgumentParser(prog="python -m ui.space", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="Write a Space folder serving ADAPTER (and push it).")
    export.add_argument("adapter", help=f"Adapter folder (with {ADAPTER_CONFIG}).")
    export.add_argument("--output-dir", required=True, help="New folder to write the Space into.")
    export.add_argument("--push", metavar="REPO_ID", help="Also upload to this Space (user/name); needs a token.")
    export.add_argument("--title", help="Space title (default: '<adapter name> chat').")
    export.add_argument("--private", action="store_true", help="Create the Space private.")
    readme = commands.add_parser("front-matter", help="Insert or update the Space YAML block of a README.")
    readme.add_argument("readme", nargs="?", default=str(ROOT / "README.md"), help="README to update.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "front-matter":
            print(f"front matter written: {write_front_matter(args.readme)}")
            return 0
        folder = export_space(args.adapter, args.output_dir, title=args.title)
        print(f"Space folder ready: {folder}")
        if args.push:
            print(f"Space uploaded: {push_space(folder, args.push, private=args.private)}")
    except (OSError, ValueError) as error:  # ConnectionError, PermissionError and FileExistsError included
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
