"""Ollama Modelfile with a Go chat template derived from, and proven equal to, the trained Jinja template.

Ollama renders chats with a Go text/template (the Modelfile's TEMPLATE), not with the Jinja template the
model was trained with; a wrong template is the usual reason a fine-tune answers differently in Ollama.
`go_template` learns the Jinja template's structure by rendering marker conversations and writes the
equivalent Go template; `check_template` proves the two render the same text (a mismatch is an error);
`train.export.gotemplate.render_go` renders the Go side with Go's semantics.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from assistant.adapters import messages_for
from assistant.chat_format import TemplateError, render_chat
from train.export.gotemplate import SPACE, render_go

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
INSTEAD = "export --to gguf and run llama.cpp with --jinja, or --to merged"

TEMPLATE_CHECKS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "system", "content": "Line one.\nLine two.\n"},
        {"role": "user", "content": "first\nsecond\n\nthird"},
        {"role": "assistant", "content": "a\nb\n"},
        {"role": "user", "content": "\n"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ],
    [{"role": "user", "content": "Braces {{ .Content }} {{- end }} {% raw %} {{ '{{' }} }}{{ {"}],
    [{"role": "user", "content": 'Quotes "double" \'single\' """triple""" \\n back\\slash `tick`'}],
    [{"role": "user", "content": "Unicode: héllo wörld 日本語 🌍 \u200b zero-width, \u00a0 nbsp"}],
    [
        {"role": "system", "content": " "},
        {"role": "user", "content": "  padded  "},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "\t"},
    ],
]

# Markers for learning the template's structure: invisible format characters that no template strips.
_MARK = "\u2062{}\u2063"


# --------------------------------------------------------------------------------------------------
# Deriving the Go template


@dataclass
class _Structure:
    """What a chat template writes around each message."""

    prefix: str  # once, at the very start (e.g. a BOS string)
    default_block: str  # when the first message is not a system message
    wrappers: dict[str, tuple[str, str]]  # role -> (before content, after content)
    generation: str  # appended with add_generation_prompt=True


def go_template(tokenizer) -> str:
    """A Go template (Ollama .Messages form) that renders chats exactly like `tokenizer`'s chat template."""
    structure = _learn_structure(tokenizer)
    template = _emit(structure)
    try:
        check_template(tokenizer, template, None, TEMPLATE_CHECKS)
    except TemplateError as error:
        raise TemplateError(
            f"the chat template renders some messages in a way an Ollama template cannot copy (it depends on "
            f"their content or position): {error}; {INSTEAD}"
        ) from error
    logger.debug("Go template derived and checked on %d conversations", len(TEMPLATE_CHECKS))
    return template


def _render(tokenizer, messages: list[dict[str, str]], generation: bool) -> str:
    try:
        return render_chat(tokenizer, messages, add_generation_prompt=generation)
    except TemplateError:
        raise
    except Exception as error:  # Jinja's raise_exception and friends: the probe is not renderable
        raise TemplateError(
            f"the chat template cannot render {_roles(messages)}: {error}; {INSTEAD}"
        ) from error


def _roles(messages: list[dict[str, str]]) -> str:
    return "a chat of " + "/".join(m["role"] for m in messages)


def _split(text: str, messages: list[dict[str, str]]) -> list[str]:
    """The text between the marker contents of `messages` (len(messages) + 1 pieces)."""
    pieces, start = [], 0
    for message in messages:
        marker = message["content"]
        if text.count(marker) != 1:
            raise TemplateError(
                f"the chat template writes a {message['role']} message's content {text.count(marker)} times "
                f"in {_roles(messages)} (an Ollama template writes each message once, as is); {INSTEAD}"
            )
        at = text.find(marker, start)
        if at < 0:
            raise TemplateError(f"the chat template reorders the messages of {_roles(messages)}; {INSTEAD}")
        pieces.append(text[start:at])
        start = at + len(marker)
    pieces.append(text[start:])
    return pieces


def _strip_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise TemplateError(
            f"the chat template's {what} is not the same in every turn ({text!r} does not start "
            f"with {prefix!r}); {INSTEAD}"
        )
    return text[len(prefix) :]


def _strip_suffix(text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise TemplateError(f"{what} ({text!r} does not end with {suffix!r}); {INSTEAD}")
    return text[: len(text) - len(suffix)]


def _learn_structure(tokenizer) -> _Structure:
    """Prefix, per-role wrappers, default system block and generation prompt of the chat template."""
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    chat = [{"role": r, "content": _MARK.format(f"{r[0].upper()}{i}")} for i, r in enumerate(roles)]
    plain = _render(tokenizer, chat, False)
    with_prompt = _render(tokenizer, chat, True)
    generation = _strip_prefix(with_prompt, plain, "text before the generation prompt")
    p = _split(plain, chat)
    if p[2] != p[4] or p[3] != p[5]:
        raise TemplateError(
            f"the chat template writes the text between turns differently in later turns; {INSTEAD}"
        )
    after_user = p[6]
    before_assistant = _strip_prefix(p[2], after_user, "end of a user turn")
    after_assistant = _split(_render(tokenizer, chat[:5], False), chat[:5])[5]
    before_user = _strip_prefix(p[3], after_assistant, "end of an assistant turn")
    after_system = _strip_suffix(
        p[1],
        before_user,
        "the chat template does not write the system message as a turn of its own (it folds it into the "
        "first user turn, Llama-2 style), which an Ollama .Messages template cannot express",
    )

    no_system = chat[1:4]
    head_user = _strip_suffix(
        _split(_render(tokenizer, no_system, False), no_system)[0],
        before_user,
        "the chat template writes the first user turn differently from later ones",
    )
    head_system = p[0]
    if head_system.startswith(head_user):  # no default system block: what comes first is the fixed prefix
        prefix, default_block = head_user, ""
    else:  # a default system block: a system message in mid-chat tells where the prefix ends
        mid_chat = _mid_chat_before_system(tokenizer, chat, after_assistant)
        if mid_chat is not None and head_system.endswith(mid_chat):
            prefix = head_system[: len(head_system) - len(mid_chat)]
        else:
            prefix = ""
        default_block = _strip_prefix(head_user, prefix, "text at the very start")
    before_system = head_system[len(prefix) :]
    structure = _Structure(
        prefix=prefix,
        default_block=default_block,
        wrappers={
            "system": (before_system, after_system),
            "user": (before_user, after_user),
            "assistant": (before_assistant, after_assistant),
        },
        generation=generation,
    )
    logger.debug("chat template structure: %r", structure)
    return structure


def _mid_chat_before_system(tokenizer, chat: list[dict[str, str]], after_assistant: str) -> str | None:
    """The text the template writes before a system message in mid-chat (None: it cannot render one)."""
    probe = [chat[1], chat[2], chat[0], chat[3]]
    try:
        between = _split(_render(tokenizer, probe, False), probe)[2]
    except TemplateError:
        return None
    return between[len(after_assistant) :] if between.startswith(after_assistant) else None


def _emit(s: _Structure) -> str:
    """The Go template text for a learned structure."""
    out = [_literal(s.prefix), "{{ range $i, $m := .Messages }}"]
    if s.default_block:
        out.append('{{ if and (eq $i 0) (ne $m.Role "system") }}' + _literal(s.default_block) + "{{ end }}")
    generic = _role_generic(s.wrappers)
    if generic:
        head, tail, after = generic
        out.append(_literal(head) + "{{ $m.Role }}" + _literal(tail) + "{{ $m.Content }}" + _literal(after))
    else:
        for n, role in enumerate(ROLES):
            before, after = s.wrappers[role]
            out.append(("{{ if" if n == 0 else "{{ else if") + f' eq $m.Role "{role}" }}}}')
            out.append(_literal(before) + "{{ $m.Content }}" + _literal(after))
        out.append("{{ end }}")
    out.append("{{ end }}" + _literal(s.generation))
    return "".join(out)


def _role_generic(wrappers: dict[str, tuple[str, str]]) -> tuple[str, str, str] | None:
    """(head, tail, after) when every role is written as head + role + tail + content + after."""
    afters = {after for _, after in wrappers.values()}
    if len(afters) != 1:
        return None
    before_user = wrappers["user"][0]
    for found in re.finditer("user", before_user):
        head, tail = before_user[: found.start()], before_user[found.end() :]
        if all(wrappers[role][0] == head + role + tail for role in ROLES):
            return head, tail, afters.pop()
    return None


def _literal(text: str) -> str:
    """`text` as Go template source: literal except what Go or the Modelfile parser would misread."""
    out, i = [], 0
    while i < len(text):
        run = re.match(r"\{+", text[i:])
        if run and (len(run.group()) > 1 or i + len(run.group()) == len(text)):
            # "{{" would open an action, and a trailing "{" would join the "{{" of the next one
            out.append("{{ " + _go_quote(run.group()) + " }}")
            i += len(run.group())
        elif text.startswith('"""', i):
            out.append("{{ " + _go_quote('"""') + " }}")  # a Modelfile's """ string cannot hold """
            i += 3
        elif not (text[i].isprintable() or text[i] in "\n\t"):
            out.append("{{ " + _go_quote(text[i]) + " }}")  # Ollama's Modelfile parser drops these
            i += 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _go_quote(text: str) -> str:
    """A Go interpreted string literal of `text` (printable ASCII only, so it survives any Modelfile)."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif " " <= char <= "~":
            out.append(char)
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


# --------------------------------------------------------------------------------------------------
# Proving the templates equal


def ollama_render(template: str, messages: list[dict[str, str]], system: str | None) -> str:
    """The text Ollama sends to the model for `messages` with Modelfile SYSTEM `system`."""
    return render_go(template, ollama_data(messages, system))


def ollama_data(messages: list[dict[str, str]], system: str | None) -> dict:
    """What Ollama's chat handler hands its template for `messages` with Modelfile SYSTEM `system`."""
    if system and messages and messages[0]["role"] != "system":
        # Ollama's chat handler: the Modelfile's SYSTEM (when not empty) leads a chat that has none
        messages = [{"role": "system", "content": system}, *messages]
    collated: list[dict[str, str]] = []
    for message in messages:
        # Ollama's template.collate: consecutive messages of one role become one, joined by a blank line
        if collated and collated[-1]["Role"] == message["role"] and message["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + message["content"]
        else:
            collated.append({"Role": message["role"], "Content": message["content"]})
    joined = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": joined, "Messages": collated, "Response": ""}


def check_template(tokenizer, template: str, system: str | None, conversations: list[list[dict]]) -> None:
    """Raise TemplateError unless Ollama renders each conversation exactly like the Jinja template."""
    for index, conversation in enumerate(conversations):
        jinja = render_chat(tokenizer, messages_for(conversation, system), add_generation_prompt=True)
        go = ollama_render(template, conversation, system)
        if jinja == go:
            continue
        at = next((i for i, (a, b) in enumerate(zip(jinja, go)) if a != b), min(len(jinja), len(go)))
        raise TemplateError(
            f"conversation {index}: the Ollama template renders differently from the chat template at "
            f"character {at}: chat template {jinja[max(0, at - 40) : at + 40]!r}, Ollama "
            f"{go[max(0, at - 40) : at + 40]!r}"
        )


# --------------------------------------------------------------------------------------------------
# The Modelfile


def _check_text(part: str, text: str) -> None:
    if '"""' in text:
        raise ValueError(f'{part} contains """, which an Ollama Modelfile string cannot hold')
    bad = sorted({c for c in text if not (c.isprintable() or c in "\n\t")})
    if bad:
        raise ValueError(f"{part} contains characters Ollama's Modelfile parser drops: {bad!r}")


def _path(part: str, name: str) -> str:
    if not name or any(c in name for c in '"\n\r'):
        raise ValueError(f"{part} path {name!r} cannot be written into a Modelfile")
    path = name if name.startswith(("./", "../", "/", "~")) else f"./{name}"
    return f'"{path}"' if path != path.strip() else path


def modelfile(
    base: str,
    adapter: str | None,
    template: str,
    system: str | None,
    stops: list[str],
    parameters: dict[str, float | int],
) -> str:
    """The Modelfile text: FROM, ADAPTER, TEMPLATE, SYSTEM, stop strings and parameters."""
    lines = [f"FROM {_path('FROM', base)}"]
    if adapter is not None:
        lines.append(f"ADAPTER {_path('ADAPTER', adapter)}")
    _check_text("TEMPLATE", template)
    lines.append(f'TEMPLATE """{template}"""')
    if system is not None:
        _check_text("SYSTEM", system)
        lines.append(f'SYSTEM """{system}"""')
    for stop in stops:
        if not stop or any(c in stop for c in '"\n\r') or not stop.isprintable():
            raise ValueError(f"stop string {stop!r} cannot be written as a Modelfile PARAMETER")
        lines.append(f'PARAMETER stop "{stop}"')
    for name, value in parameters.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"parameter name {name!r} is not a Modelfile parameter name")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            raise ValueError(f"parameter {name} = {value!r}: a number is needed")
        lines.append(f"PARAMETER {name} {text}")
    return "\n".join(lines) + "\n"


def _unquote(text: str) -> tuple[str, bool]:
    """Ollama's parser.unquote: (value, complete)."""
    if text.startswith('"""'):
        return (text[3:-3], True) if len(text) >= 6 and text.endswith('"""') else ("", False)
    if text.startswith('"'):
        return (text[1:-1], True) if len(text) >= 2 and text.endswith('"') else ("", False)
    return text, True


def parse_modelfile(text: str) -> dict:
    """FROM, ADAPTER, TEMPLATE, SYSTEM and PARAMETER [(name, value)] of a Modelfile, read as Ollama does."""
    result: dict = {"FROM": None, "ADAPTER": None, "TEMPLATE": None, "SYSTEM": None, "PARAMETER": []}
    i, n = 0, len(text)
    while i < n:
        if text[i] in SPACE:
            i += 1
            continue
        line = text.count("\n", 0, i) + 1
        if text[i] == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        word = re.compile(r"[A-Za-z]+").match(text, i)
        if not word or word.end() >= n or text[word.end()] not in " \t":
            raise ValueError(f"Modelfile line {line}: expected a command followed by a space")
        command, i = word.group().upper(), word.end() + 1
        if command not in result:
            raise ValueError(f"Modelfile line {line}: {command} is not one of {', '.join(result)}")
        name = None
        if command == "PARAMETER":
            match = re.compile(r"[A-Za-z0-9_]+(?=[ \t])").match(text, i)
            if not match:
                raise ValueError(f"Modelfile line {line}: PARAMETER needs a name and a value")
            name, i = match.group(), match.end() + 1
        value, pieces = None, []
        while value is None:
            # like Ollama: a value ends at the first line end where it is complete (a quoted one is closed)
            end = min((e for e in (text.find("\n", i), text.find("\r", i)) if e >= 0), default=n)
            pieces.append("".join(c for c in text[i:end] if c.isprintable() or c in "\t"))
            unquoted, complete = _unquote("".join(pieces).strip())
            if complete:
                value = unquoted
            elif end >= n:
                raise ValueError(f"Modelfile line {line}: unterminated {command} string")
            else:
                pieces.append(text[end])
            i = end + 1
        if command == "PARAMETER":
            result["PARAMETER"].append((name, value))
        elif result[command] is not None:
            raise ValueError(f"Modelfile line {line}: a second {command}")
        else:
            result[command] = value
    if result["FROM"] is None:
        raise ValueError("Modelfile has no FROM line")
    return result
