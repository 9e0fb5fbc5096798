"""Ollama export: a Go template derived from the chat template renders chats the same; the Modelfile."""

from __future__ import annotations

import copy

import pytest

from assistant.chat_format import TemplateError, render_chat
from train.export.gotemplate import render_go
from train.export.ollama import (
    TEMPLATE_CHECKS,
    check_template,
    go_template,
    modelfile,
    ollama_render,
    parse_modelfile,
)

SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] }}"
    "{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Llama-3.x's own templates trim message content: not something a Go template can copy.
LLAMA3_TRIM = LLAMA3.replace("message['content']", "message['content'] | trim")
ZEPHYR = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '</s>\\n' }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '</s>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '</s>\\n' }}"
    "{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
)
# Role names that are not the message roles: per-role branches in the Go template.
HEADINGS = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '<s>[INST] ' + content + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content + ' </s>' }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def smol():
    from assistant.embedded import embedded_model_dir
    from assistant.models import load_tokenizer

    return load_tokenizer(str(embedded_model_dir()))


@pytest.fixture(scope="module")
def with_template(smol):
    def make(template: str):
        tokenizer = copy.copy(smol)  # a shallow copy: its own chat_template, the same vocabulary
        tokenizer.chat_template = template
        return tokenizer

    return make


@pytest.fixture(scope="module")
def smol_go(smol) -> str:
    return go_template(smol)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------- go_template


def test_smollm2_template_renders_like_the_chat_template_with_its_default_system_block(smol, smol_go):
    check_template(smol, smol_go, None, TEMPLATE_CHECKS)
    check_template(smol, smol_go, "You are a support agent.\nBe brief.", TEMPLATE_CHECKS)
    assert ollama_render(smol_go, user("Hi"), None) == (
        f"<|im_start|>system\n{SMOL_DEFAULT}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ollama_render(smol_go, user("Hi"), "Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_go(smol_go, {"Messages": [], "System": ""}) == "<|im_start|>assistant\n"


@pytest.mark.parametrize("template", [LLAMA3, ZEPHYR, HEADINGS], ids=["llama3", "zephyr", "headings"])
def test_other_templates_render_like_the_chat_template(with_template, template):
    tokenizer = with_template(template)
    go = go_template(tokenizer)
    for system in (None, "Answer in French."):
        check_template(tokenizer, go, system, TEMPLATE_CHECKS)
    chat = [*user("Hi"), {"role": "assistant", "content": "Hello"}, *user("Bye")]
    assert ollama_render(go, chat, None) == render_chat(tokenizer, chat, add_generation_prompt=True)


def test_llama3_template_keeps_the_bos_prefix_once(with_template):
    go = go_template(with_template(LLAMA3))
    text = ollama_render(go, [*user("a"), {"role": "assistant", "content": "b"}, *user("c")], "S")
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>")
    assert text.count("<|begin_of_text|>") == 1


def test_llama2_style_system_folded_into_the_user_turn_is_refused(with_template):
    with pytest.raises(TemplateError, match=r"folds it into the first user turn.*--jinja, or --to merged"):
        go_template(with_template(LLAMA2))


def test_content_dependent_template_is_refused(with_template):
    with pytest.raises(TemplateError, match=r"conversation \d+: .*character \d+.*--to merged"):
        go_template(with_template(LLAMA3_TRIM))


def test_check_template_names_the_first_difference(smol, smol_go):
    broken = smol_go.replace("{{ $m.Content }}<|im_end|>\n", "{{ $m.Content }}<|im_end|>", 1)
    assert broken != smol_go
    jinja = render_chat(smol, TEMPLATE_CHECKS[0], add_generation_prompt=True)
    at = next(
        i for i, (a, b) in enumerate(zip(jinja, ollama_render(broken, TEMPLATE_CHECKS[0], None))) if a != b
    )
    with pytest.raises(TemplateError) as error:
        check_template(smol, broken, None, TEMPLATE_CHECKS)
    message = str(error.value)
    assert "conversation 0" in message and f"character {at}" in message
    assert repr(jinja[at - 40 : at + 40]) in message


def test_check_template_catches_a_missing_default_system_block(smol, smol_go):
    without_default = smol_go.replace(SMOL_DEFAULT, "")
    with pytest.raises(TemplateError, match="conversation 0"):
        check_template(smol, without_default, None, TEMPLATE_CHECKS)


def test_literal_braces_in_a_template_are_escaped(with_template):
    template = (
        "{% for message in messages %}{{ '{{' + message['role'] + '{' }}{{ message['content'] + '}}\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '{{assistant{' }}{% endif %}"
    )
    tokenizer = with_template(template)
    go = go_template(tokenizer)
    assert '{{ "{{" }}' in go
    check_template(tokenizer, go, None, TEMPLATE_CHECKS)


def test_template_text_a_modelfile_cannot_hold_is_written_as_go_strings(with_template):
    # '"""' would end the Modelfile's TEMPLATE string and Ollama's parser drops a zero-width space
    template = (
        "{% for message in messages %}"
        "{{ '\u200b\"\"\"' + message['role'] + ': ' + message['content'] + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    tokenizer = with_template(template)
    go = go_template(tokenizer)
    assert '"""' not in go and "\u200b" not in go
    check_template(
        tokenizer, parse_modelfile(modelfile("b", None, go, None, [], {}))["TEMPLATE"], None, TEMPLATE_CHECKS
    )


# ---------------------------------------------------------------------------------------------- render_go


def test_trim_markers_trim_all_adjacent_whitespace():
    assert render_go("a \n\t {{- 1 -}} \n b", {}) == "a1b"
    assert render_go("a {{ 1 }} b", {}) == "a 1 b"
    assert render_go("a {{-1}} b", {}) == "a -1 b"  # "{{-1" is the number -1, not a trim marker
    assert render_go("x\n{{- /* note\nmore */ -}}\ny{{/* c */}}z", {}) == "xyz"


def test_range_with_index_and_element():
    data = {"Messages": [{"Role": "user", "Content": "hi"}, {"Role": "assistant", "Content": "yo"}]}
    template = "{{ range $i, $m := .Messages }}{{ $i }}:{{ $m.Role }}={{ .Content }};{{ end }}"
    assert render_go(template, data) == "0:user=hi;1:assistant=yo;"
    assert render_go("{{ range .Messages }}[{{ .Role }}]{{ else }}none{{ end }}", data) == "[user][assistant]"
    assert render_go("{{ range .Messages }}x{{ else }}none{{ end }}", {"Messages": []}) == "none"
    assert (
        render_go("{{ range $m := .Messages }}{{ $m.Content }}{{ $.Top }}{{ end }}", {**data, "Top": "!"})
        == "hi!yo!"
    )


def test_if_else_if_else():
    template = '{{ if eq .R "a" }}A{{ else if eq .R "b" }}B{{ else if .X }}X{{ else }}Z{{ end }}'
    assert [
        render_go(template, {"R": r, "X": x}) for r, x in [("a", 0), ("b", 0), ("c", 1), ("c", 0)]
    ] == list("ABXZ")


def test_truthiness_and_logic():
    template = "{{ if . }}T{{ else }}F{{ end }}"
    assert (
        "".join(render_go(template, v) for v in ["", "x", 0, 3, [], [0], {}, None, False, True])
        == "FTFTFTFFFT"
    )
    assert (
        render_go('{{ and 1 "" 2 }}|{{ and 1 2 }}|{{ or 0 "" "x" }}|{{ or 0 "" }}|{{ not 0 }}', {})
        == "|2|x||true"
    )
    # `and` stops at the first empty argument: .Missing.Field (a field of nil) is never evaluated
    assert render_go("{{ if and .Missing .Missing.Field }}x{{ else }}y{{ end }}", {}) == "y"
    assert render_go("{{ if or .A (not .B) }}y{{ end }}", {"A": "", "B": ""}) == "y"


def test_eq_with_several_arguments_is_any_and_ne_lt():
    assert (
        render_go(
            '{{ eq .R "x" "y" "user" }} {{ eq .R "x" }} {{ ne 1 2 }} {{ lt 1 2 }} {{ ge 1 2 }}', {"R": "user"}
        )
        == "true false true true false"
    )
    with pytest.raises(ValueError, match="incompatible types"):
        render_go('{{ eq 1 "1" }}', {})


def test_len_slice_index():
    data = {"Messages": ["a", "b", "c"], "S": "héllo"}
    assert render_go("{{ len .Messages }} {{ len .S }} {{ len (slice .Messages 1) }}", data) == "3 6 2"
    assert (
        render_go("{{ index .Messages 2 }}{{ index (slice .Messages 0 2) 1 }}{{ slice .S 0 1 }}", data)
        == "cbh"
    )
    assert render_go('{{ index . "Key" }}{{ (index .L 0).Role }}', {"Key": "k", "L": [{"Role": "r"}]}) == "kr"
    last = "{{ range $i, $_ := .Messages }}{{ if eq (len (slice $.Messages $i)) 1 }}last={{ . }}{{ end }}"
    last += "{{ end }}"
    assert render_go(last, data) == "last=c"
    with pytest.raises(ValueError, match="out of range"):
        render_go("{{ index .Messages 3 }}", data)


def test_string_literals_and_escapes():
    assert render_go(r'{{ "a\tb\n\"q\" \\ \x41\u00e9\U0001F30D\101" }}', {}) == 'a\tb\n"q" \\ Aé🌍A'
    assert render_go("{{ `raw\\n{{` }}{{ 'a' }}{{ 0x10 }}", {}) == "raw\\n{{9716"
    assert render_go('{{ "{{" }} .Content }}', {}) == "{{ .Content }}"
    assert render_go("{{ true }} {{ false }}", {}) == "true false"


def test_variables_declare_assign_and_scope():
    template = (
        '{{ $x := "a" }}{{ range .L }}{{ $x = . }}{{ $y := 1 }}{{ end }}{{ $x }}{{ with .W }}{{ . }}{{ end }}'
    )
    assert render_go(template, {"L": ["b", "c"], "W": "w"}) == "cw"
    with pytest.raises(ValueError, match=r"undefined variable '\$y'"):
        render_go("{{ range .L }}{{ $y := 1 }}{{ end }}{{ $y }}", {"L": [1]})


@pytest.mark.parametrize(
    "template, problem",
    [
        ("ab{{ json .X }}", "function 'json' not defined"),
        ("{{ if .A }}x", "no {{end}}"),
        ("{{ end }}", "unexpected {{end}}"),
        ("x{{ .A ", "unclosed action"),
        ('{{ "abc }}', "unterminated quoted string"),
        ("{{ .A | printf }}", "function 'printf' not defined"),
        ('{{ template "x" }}', "not supported"),
        ("{{ 1.5 }}", "only integers"),
        ("{{ .A # }}", "unexpected '#'"),
        ("{{ .Missing }}", "cannot print a value of type nil"),
        ("{{ .L.Role }}", "can't evaluate field Role in type slice"),
        ('{{ "\\q" }}', "unknown escape"),
        ("{{ /* c */ }}", "unexpected '/'"),
        ("{{}}", "missing value"),
    ],
)
def test_unknown_or_bad_syntax_raises_naming_the_position(template, problem):
    with pytest.raises(ValueError, match=r"line 1, column \d+") as error:
        render_go(template, {"A": "a", "L": [1]})
    assert problem in str(error.value)


def test_error_position_is_line_and_column():
    with pytest.raises(ValueError, match=r"line 2, column 4 \(offset 6\)"):
        render_go("ab\n{{ nope }}", {})


# ---------------------------------------------------------------------------------------------- ollama_render


def test_ollama_prepends_a_non_empty_system_and_collates_like_ollama():
    template = "{{ range .Messages }}<{{ .Role }}>{{ .Content }}{{ end }}|{{ .System }}"
    assert ollama_render(template, user("u"), "S") == "<system>S<user>u|S"
    assert (
        ollama_render(template, [{"role": "system", "content": "mine"}, *user("u")], "S")
        == "<system>mine<user>u|mine"
    )
    assert ollama_render(template, user("u"), "") == "<user>u|"  # Ollama skips an empty SYSTEM
    assert ollama_render(template, [*user("a"), *user("b")], None) == "<user>a\n\nb|"


# ---------------------------------------------------------------------------------------------- Modelfile


def test_modelfile_round_trip(smol_go):
    system = 'You are "Bob".\n  Keep answers short. '
    text = modelfile(
        "base.gguf",
        "./adapter.gguf",
        smol_go,
        system,
        ["<|im_end|>", "<|endoftext|>"],
        {"temperature": 0.7, "num_ctx": 4096},
    )
    assert text.splitlines()[:2] == ["FROM ./base.gguf", "ADAPTER ./adapter.gguf"]
    assert 'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\n' in text
    assert "PARAMETER temperature 0.7\nPARAMETER num_ctx 4096\n" in text
    assert parse_modelfile(text) == {
        "FROM": "./base.gguf",
        "ADAPTER": "./adapter.gguf",
        "TEMPLATE": smol_go,
        "SYSTEM": system,
        "PARAMETER": [
            ("stop", "<|im_end|>"),
            ("stop", "<|endoftext|>"),
            ("temperature", "0.7"),
            ("num_ctx", "4096"),
        ],
    }


def test_modelfile_without_adapter_or_system():
    parsed = parse_modelfile(modelfile("m.gguf", None, '{{ "x" }}"', None, [], {}))
    assert parsed == {
        "FROM": "./m.gguf",
        "ADAPTER": None,
        "TEMPLATE": '{{ "x" }}"',
        "SYSTEM": None,
        "PARAMETER": [],
    }


def test_triple_quotes_are_refused_naming_the_part(smol_go):
    with pytest.raises(ValueError, match='SYSTEM contains """'):
        modelfile("b", None, smol_go, 'Say """hi"""', [], {})
    with pytest.raises(ValueError, match="TEMPLATE contains"):
        modelfile("b", None, 'x"""y', None, [], {})
    with pytest.raises(ValueError, match="stop string"):
        modelfile("b", None, "t", None, ['a"b'], {})


def test_parse_modelfile_reads_ollama_syntax():
    text = '# comment\nfrom llama3\nPARAMETER stop "a b"\nsystem """multi\nline"""\nTEMPLATE {{ .Prompt }}\n'
    assert parse_modelfile(text) == {
        "FROM": "llama3",
        "ADAPTER": None,
        "TEMPLATE": "{{ .Prompt }}",
        "SYSTEM": "multi\nline",
        "PARAMETER": [("stop", "a b")],
    }
    with pytest.raises(ValueError, match="unterminated"):
        parse_modelfile('FROM x\nSYSTEM """open\n')
    with pytest.raises(ValueError, match="no FROM"):
        parse_modelfile("SYSTEM hi\n")
