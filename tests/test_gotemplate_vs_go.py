"""train.export.gotemplate renders exactly as Go's own text/template (Ollama's engine) on every template the
export writes and on the renderer's semantics; Go is Debian's golang-go (`.ci/run` installs it)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import NEEDS_GO
from tests.test_ollama import HEADINGS, LLAMA3, ZEPHYR
from train.export.gotemplate import render_go
from train.export.ollama import TEMPLATE_CHECKS, go_template, ollama_data

GO = shutil.which("go")
pytestmark = pytest.mark.skipif(GO is None, reason=NEEDS_GO)

MESSAGES = {"Messages": [{"Role": "system", "Content": "S"}, {"Role": "user", "Content": "a\nb"},
                         {"Role": "assistant", "Content": "c"}, {"Role": "user", "Content": "d"}],
            "System": "S", "Response": ""}
SEMANTICS = [  # each rendered by both engines on MESSAGES
    "a \n\t {{- 1 -}} \n b|a {{-1}} b|{{/* comment */}}x",
    "{{ range $i, $m := .Messages }}{{ $i }}{{ .Role }}{{ $m.Content }};{{ end }}",
    "{{ range .Messages }}{{ if eq .Role \"user\" }}U{{ else if eq .Role \"system\" }}S{{ else }}A{{ end }}{{ end }}",
    "{{ eq .System \"x\" \"S\" }} {{ ne .System \"S\" }} {{ and .System \"\" }}|{{ or \"\" .System }} {{ not .Response }}",
    "{{ len .Messages }} {{ len \"héllo\" }} {{ slice \"abcdef\" 1 3 }} {{ (index .Messages 1).Content }}",
    "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}{{ if $last }}L{{ end }}{{ end }}",
    "{{ $x := 1 }}{{ range .Messages }}{{ $x = 2 }}{{ end }}{{ $x }}{{ with .System }}[{{ . }}]{{ end }}",
    "{{ \"{{\" }} {{ \"tab\\there\\u00e9\\x41\" }} {{ `raw\\n` }} {{ 'a' }} {{ 0x1F }}",
    "{{ range .Missing }}x{{ else }}empty{{ end }}{{ if .Response }}r{{ else }}no response{{ end }}",
    "{{- range .Messages }}\n{{- if eq .Role \"user\" }}\n<u>{{ .Content }}\n{{- end }}\n{{- end }}\n",
]


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Render a list of (template, data) with Go; returns each output or None where Go refused."""
    binary = tmp_path_factory.mktemp("go") / "render"
    subprocess.run([GO, "build", "-o", str(binary), "render.go"], cwd=Path(__file__).parent / "go", check=True,
                   capture_output=True, timeout=300)

    def render(cases: list[tuple[str, dict]]) -> list[str | None]:
        payload = json.dumps([{"template": t, "data": d} for t, d in cases])
        done = subprocess.run([str(binary)], input=payload, capture_output=True, text=True, check=True, timeout=60)
        return [r.get("out") if "err" not in r else None for r in json.loads(done.stdout)]

    return render


@pytest.fixture(scope="module")
def templates():
    import copy

    from assistant.embedded import embedded_model_dir
    from assistant.models import load_tokenizer

    smol = load_tokenizer(str(embedded_model_dir()))
    made = {"smollm2": go_template(smol)}
    for name, jinja in {"llama3": LLAMA3, "zephyr": ZEPHYR, "headings": HEADINGS}.items():
        tokenizer = copy.copy(smol)
        tokenizer.chat_template = jinja
        made[name] = go_template(tokenizer)
    return made


def test_exported_templates_render_as_go_renders_them(go_render, templates):
    cases = [(template, ollama_data(chat, system)) for template in templates.values() for chat in TEMPLATE_CHECKS
             for system in (None, "Be brief.\nReally.")]
    theirs = go_render(cases)
    for (template, data), go_out in zip(cases, theirs, strict=True):
        assert go_out is not None, f"Go refused the exported template:\n{template}"
        assert render_go(template, data) == go_out, (template, data)


@pytest.mark.parametrize("template", SEMANTICS)
def test_renderer_semantics_match_go(go_render, template):
    (go_out,) = go_render([(template, MESSAGES)])
    assert go_out is not None, "Go refused the case: fix the case, not the renderer"
    assert render_go(template, MESSAGES) == go_out
