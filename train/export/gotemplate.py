"""A strict renderer of Go's text/template, for the subset Ollama chat templates use.

Ollama renders chats with Go templates; `train.export.ollama` proves the TEMPLATE it writes renders exactly as
the trained Jinja template. Go is not here, so this renders them with Go's semantics (trim markers,
truthiness, `eq` with several arguments, byte-counting `len`/`slice`, block-scoped variables) and raises
ValueError, with the position, on anything outside the subset rather than rendering something else.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SPACE = " \t\r\n"
_KEYWORDS = {"if", "else", "end", "range", "with", "define", "template", "block", "break", "continue"}
_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}


@dataclass
class _Token:
    kind: str  # field var dot str int bool nil ident ( ) | := = ,
    value: Any
    pos: int
    adjacent: bool  # no space before it (a field right after an operand chains onto it)


@dataclass
class _Pipe:
    decl: list[str]
    assign: bool
    cmds: list[list[tuple]]
    pos: int


@dataclass
class _Block:
    kind: str  # if range with
    pipe: _Pipe
    body: list = field(default_factory=list)
    orelse: list = field(default_factory=list)


class _Source:
    """Positions in the template text as line:column, for error messages."""

    def __init__(self, text: str) -> None:
        self.text = text

    def where(self, pos: int) -> str:
        line = self.text.count("\n", 0, pos) + 1
        return f"line {line}, column {pos - (self.text.rfind(chr(10), 0, pos) + 1) + 1} (offset {pos})"

    def error(self, message: str, pos: int) -> ValueError:
        return ValueError(f"Go template: {message} at {self.where(pos)}")


def _lex(src: _Source) -> list:
    """Text pieces (str) and actions (list of tokens, position), with trim markers applied."""
    text, n, items, i, trim_next = src.text, len(src.text), [], 0, False
    while i < n:
        start = text.find("{{", i)
        piece = text[i : start if start >= 0 else n]
        if trim_next:
            piece = piece.lstrip(SPACE)
        if start < 0:
            items.append(piece)
            break
        k = start + 2
        if text.startswith("-", k) and k + 1 < n and text[k + 1] in SPACE:  # "{{- " trims the text before
            piece = piece.rstrip(SPACE)
            k += 2
        items.append(piece)
        if text.startswith("/*", k):  # a comment must open right at the delimiter
            close = text.find("*/", k + 2)
            if close < 0:
                raise src.error("unclosed comment", start)
            k = close + 2
            if text.startswith("}}", k):
                i, trim_next = k + 2, False
            elif text[k : k + 1] and text[k] in SPACE and text.startswith("-}}", k + 1):
                i, trim_next = k + 4, True
            else:
                raise src.error("comment ends before closing delimiter", k)
            continue
        tokens, i, trim_next = _lex_action(src, k, start)
        if not tokens:
            raise src.error("missing value for command", start)
        items.append((tokens, start))
    return items


def _lex_action(src: _Source, k: int, start: int) -> tuple[list[_Token], int, bool]:
    """Tokens of the action whose body starts at `k`, the position after the action, and its -}} trim."""
    text, n, tokens, adjacent = src.text, len(src.text), [], False
    while True:
        if k >= n:
            raise src.error("unclosed action", start)
        if text.startswith("}}", k):
            return tokens, k + 2, False
        char = text[k]
        if char in SPACE:
            end = k
            while end < n and text[end] in SPACE:
                end += 1
            if text.startswith("-}}", end):
                return tokens, end + 3, True
            k, adjacent = end, False
            continue
        pos = k
        if char == '"':
            value, k = _lex_string(src, k)
            tokens.append(_Token("str", value, pos, adjacent))
        elif char == "`":
            close = text.find("`", k + 1)
            if close < 0:
                raise src.error("unterminated raw string", pos)
            tokens.append(_Token("str", text[k + 1 : close], pos, adjacent))
            k = close + 1
        elif char == "'":
            match = re.compile(r"'(\\[^'\n]+|\\'|[^\\'\n])'").match(text, k)
            if not match:
                raise src.error("bad character constant", pos)
            raw = _unescape(src, match.group(1), pos, "'")
            if len(raw) != 1 and len(raw.decode("utf-8", "replace")) != 1:
                raise src.error("bad character constant", pos)
            tokens.append(_Token("int", raw[0] if len(raw) == 1 else ord(raw.decode()), pos, adjacent))
            k = match.end()
        elif char.isdigit() or (char in "+-" and k + 1 < n and text[k + 1].isdigit()):
            match = re.compile(r"[+-]?(0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+|[0-9][0-9_]*)").match(
                text, k
            )
            end = match.end()
            if end < n and (text[end].isalnum() or text[end] in "._"):
                raise src.error(f"unsupported number {text[k : end + 1]!r}... (only integers)", pos)
            tokens.append(_Token("int", int(match.group().replace("_", ""), 0), pos, adjacent))
            k = end
        elif char == ".":
            match = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)").match(text, k)
            if match:
                tokens.append(_Token("field", match.group(1), pos, adjacent))
                k = match.end()
            elif k + 1 < n and text[k + 1].isdigit():
                raise src.error("unsupported number (only integers)", pos)
            else:
                tokens.append(_Token("dot", None, pos, adjacent))
                k += 1
        elif char == "$":
            match = re.compile(r"\$[A-Za-z0-9_]*").match(text, k)
            tokens.append(_Token("var", match.group(), pos, adjacent))
            k = match.end()
        elif char.isalpha() or char == "_":
            match = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").match(text, k)
            word = match.group()
            if word in ("true", "false"):
                tokens.append(_Token("bool", word == "true", pos, adjacent))
            elif word == "nil":
                tokens.append(_Token("nil", None, pos, adjacent))
            else:
                tokens.append(_Token("ident", word, pos, adjacent))
            k = match.end()
        elif text.startswith(":=", k):
            tokens.append(_Token(":=", None, pos, adjacent))
            k += 2
        elif char in "()|=,":
            tokens.append(_Token(char, None, pos, adjacent))
            k += 1
        else:
            raise src.error(f"unexpected {char!r} in action", pos)
        adjacent = True


def _lex_string(src: _Source, k: int) -> tuple[str, int]:
    """A Go interpreted string literal starting at `k`; its value and the position after it."""
    text, end = src.text, k + 1
    while True:
        if end >= len(text) or text[end] == "\n":
            raise src.error("unterminated quoted string", k)
        if text[end] == "\\":
            end += 2
        elif text[end] == '"':
            break
        else:
            end += 1
    return _unescape(src, text[k + 1 : end], k, '"').decode("utf-8", "strict"), end + 1


def _unescape(src: _Source, body: str, pos: int, quote: str) -> bytes:
    """Bytes of a Go string or character literal body with its escapes resolved (Go strings are bytes)."""
    out, i = bytearray(), 0
    while i < len(body):
        if body[i] != "\\":
            out += body[i].encode()
            i += 1
            continue
        code = body[i + 1 : i + 2]
        if code in _ESCAPES:
            out.append(_ESCAPES[code])
            i += 2
        elif code == quote:
            out += quote.encode()
            i += 2
        elif code == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", body[i + 2 : i + 4]):
            out.append(int(body[i + 2 : i + 4], 16))
            i += 4
        elif code in ("u", "U"):
            width = 4 if code == "u" else 8
            digits = body[i + 2 : i + 2 + width]
            if not re.fullmatch(f"[0-9a-fA-F]{{{width}}}", digits) or not (
                int(digits, 16) <= 0x10FFFF and not 0xD800 <= int(digits, 16) <= 0xDFFF
            ):
                raise src.error(f"invalid Unicode escape \\{code}{digits}", pos)
            out += chr(int(digits, 16)).encode()
            i += 2 + width
        elif re.fullmatch(r"[0-3][0-7]{2}", body[i + 1 : i + 4]):
            out.append(int(body[i + 1 : i + 4], 8))
            i += 4
        else:
            raise src.error(f"unknown escape sequence \\{code}", pos)
    return bytes(out)


class _Parser:
    """Builds the node tree: text (str), ("print", _Pipe) and _Block nodes."""

    def __init__(self, src: _Source, items: list) -> None:
        self.src, self.items, self.at = src, items, 0

    def parse(self) -> list:
        nodes, end = self.parse_list()
        if end is not None:
            raise self.src.error(f"unexpected {{{{{end[0][0].value}}}}}", end[1])
        return nodes

    def parse_list(self) -> tuple[list, tuple | None]:
        """Nodes up to an {{else}} or {{end}} (returned as the second item; None at the end of the text)."""
        nodes: list = []
        while self.at < len(self.items):
            item = self.items[self.at]
            self.at += 1
            if isinstance(item, str):
                if item:
                    nodes.append(item)
                continue
            tokens, pos = item
            first = tokens[0]
            if first.kind == "ident" and first.value in ("else", "end"):
                return nodes, item
            if first.kind == "ident" and first.value in ("if", "range", "with"):
                nodes.append(self.block(first.value, tokens[1:], pos))
            elif first.kind == "ident" and first.value in _KEYWORDS:
                raise self.src.error(f"{{{{{first.value}}}}} is not supported", pos)
            else:
                nodes.append(("print", self.pipe(tokens, pos, decl=1)))
        return nodes, None

    def block(self, kind: str, tokens: list[_Token], pos: int) -> _Block:
        """An if/range/with block from its opening action to its {{end}} (an else-if shares that end)."""
        if not tokens:
            raise self.src.error(f"missing value for {kind}", pos)
        node = _Block(kind, self.pipe(tokens, pos, decl=2 if kind == "range" else 1))
        node.body, end = self.parse_list()
        if end is None:
            raise self.src.error(f"unexpected EOF: {{{{{kind}}}}} has no {{{{end}}}}", pos)
        closing, at = end
        if closing[0].value == "else":
            rest = closing[1:]
            if rest and rest[0].kind == "ident" and rest[0].value == "if" and kind == "if":
                node.orelse = [self.block("if", rest[1:], at)]
                return node
            if rest:
                raise self.src.error(
                    f"unexpected {rest[0].value!r} after {{{{else}}}} in {{{{{kind}}}}}", rest[0].pos
                )
            node.orelse, end = self.parse_list()
            if end is None or end[0][0].value != "end":
                raise self.src.error(f"{{{{{kind}}}}} needs {{{{end}}}} after {{{{else}}}}", at)
            closing = end[0]
        if len(closing) > 1:
            raise self.src.error("unexpected text in {{end}}", closing[1].pos)
        return node

    def pipe(self, tokens: list[_Token], pos: int, decl: int) -> _Pipe:
        """A pipeline with an optional `$x :=`, `$x =` or (range) `$i, $m :=` in front."""
        names, assign, i = [], False, 0
        if len(tokens) > 1 and tokens[0].kind == "var":
            if tokens[1].kind in (":=", "="):
                names, assign, i = [tokens[0].value], tokens[1].kind == "=", 2
            elif (
                decl == 2
                and tokens[1].kind == ","
                and len(tokens) > 3
                and tokens[2].kind == "var"
                and tokens[3].kind == ":="
            ):
                names, i = [tokens[0].value, tokens[2].value], 4
        if "$" in names:
            raise self.src.error("cannot declare or assign $", pos)
        cmds, i = self.commands(tokens, i, pos)
        if i != len(tokens):
            raise self.src.error(f"unexpected {tokens[i].kind!r}", tokens[i].pos)
        return _Pipe(names, assign, cmds, pos)

    def commands(self, tokens: list[_Token], i: int, pos: int) -> tuple[list[list[tuple]], int]:
        cmds = []
        while True:
            args = []
            while i < len(tokens) and tokens[i].kind not in ("|", ")"):
                arg, i = self.operand(tokens, i)
                args.append(arg)
            if not args:
                raise self.src.error("missing value for command", tokens[i].pos if i < len(tokens) else pos)
            cmds.append(args)
            if i < len(tokens) and tokens[i].kind == "|":
                i += 1
                continue
            return cmds, i

    def operand(self, tokens: list[_Token], i: int) -> tuple[tuple, int]:
        token = tokens[i]
        i += 1
        if token.kind == "dot":
            node: tuple = ("dot",)
        elif token.kind == "field":
            node = ("field", ("dot",), token.value, token.pos)
        elif token.kind == "var":
            node = ("var", token.value, token.pos)
        elif token.kind in ("str", "int", "bool", "nil"):
            node = ("lit", token.value)
        elif token.kind == "ident":
            if token.value in _KEYWORDS:
                raise self.src.error(f"unexpected keyword {token.value!r}", token.pos)
            if token.value not in _FUNCS:
                raise self.src.error(f"function {token.value!r} not defined", token.pos)
            node = ("func", token.value, token.pos)
        elif token.kind == "(":
            cmds, i = self.commands(tokens, i, token.pos)
            if i >= len(tokens) or tokens[i].kind != ")":
                raise self.src.error("unclosed left paren", token.pos)
            i += 1
            node = ("pipe", _Pipe([], False, cmds, token.pos))
        else:
            raise self.src.error(f"unexpected {token.kind!r}", token.pos)
        while i < len(tokens) and tokens[i].kind == "field" and tokens[i].adjacent:
            if node[0] in ("lit", "func"):
                raise self.src.error(f"unexpected .{tokens[i].value} after a {node[0]}", tokens[i].pos)
            node = ("field", node, tokens[i].value, tokens[i].pos)
            i += 1
        return node, i


def _kind(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "slice"
    if isinstance(value, dict):
        return "map"
    return type(value).__name__


def _truth(value: Any) -> bool:
    """Go's truth: false for nil, false, 0, and empty strings, slices and maps."""
    if value is None or value is False:
        return False
    if isinstance(value, (int, str, list, tuple, dict)):
        return bool(value)
    return True


def _eq(*args: Any) -> bool:
    if len(args) < 2:
        raise ValueError("eq: missing argument for comparison")
    first = args[0]
    if _kind(first) in ("slice", "map"):
        raise ValueError(f"eq: invalid type for comparison: {_kind(first)}")
    for other in args[1:]:
        if _kind(first) != _kind(other):
            if first is not None and other is not None:
                raise ValueError(f"eq: incompatible types for comparison: {_kind(first)} and {_kind(other)}")
        elif first == other:
            return True
    return False


def _ne(a: Any, b: Any) -> bool:
    return not _eq(a, b)


def _ordered(name: str, test: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def compare(a: Any, b: Any) -> bool:
        if _kind(a) != _kind(b) or _kind(a) not in ("int", "string"):
            raise ValueError(f"{name}: incompatible types for comparison: {_kind(a)} and {_kind(b)}")
        return test(a, b)

    return compare


def _len(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())  # Go's len of a string counts bytes
    if isinstance(value, (list, tuple, dict)):
        return len(value)
    raise ValueError(f"len of type {_kind(value)}")


def _int(value: Any, what: str) -> int:
    if _kind(value) != "int":
        raise ValueError(f"{what}: cannot index with type {_kind(value)}")
    return value


def _index(item: Any, *indexes: Any) -> Any:
    for index in indexes:
        if isinstance(item, dict):
            if not isinstance(index, str):
                raise ValueError(f"index: map key of type {_kind(index)}")
            item = item.get(index)
        elif isinstance(item, (list, tuple, str)):
            sequence = item.encode() if isinstance(item, str) else item
            at = _int(index, "index")
            if not 0 <= at < len(sequence):
                raise ValueError(f"index: index out of range: {at}")
            item = sequence[at]
        else:
            raise ValueError(f"index of type {_kind(item)}")
    return item


def _slice(item: Any, *indexes: Any) -> Any:
    if not isinstance(item, (list, tuple, str)):
        raise ValueError(f"can't slice item of type {_kind(item)}")
    if len(indexes) > 3 or (len(indexes) == 3 and isinstance(item, str)):
        raise ValueError(f"too many slice indexes: {len(indexes)}")
    sequence = item.encode() if isinstance(item, str) else item  # Go slices strings by byte
    bounds = [_int(index, "slice") for index in indexes]
    low = bounds[0] if bounds else 0
    high = bounds[1] if len(bounds) > 1 else len(sequence)
    cap = bounds[2] if len(bounds) > 2 else len(sequence)
    if not 0 <= low <= high <= cap <= len(sequence):
        raise ValueError(f"index out of range: {bounds}")
    part = sequence[low:high]
    if isinstance(item, str):
        try:
            return part.decode()
        except UnicodeDecodeError as error:
            raise ValueError(f"{bounds} cuts a multi-byte character") from error
    return list(part)


_FUNCS: dict[str, Callable[..., Any] | None] = {
    "eq": _eq,
    "ne": _ne,
    "lt": _ordered("lt", lambda a, b: a < b),
    "le": _ordered("le", lambda a, b: a <= b),
    "gt": _ordered("gt", lambda a, b: a > b),
    "ge": _ordered("ge", lambda a, b: a >= b),
    "not": lambda value: not _truth(value),
    "len": _len,
    "index": _index,
    "slice": _slice,
    "and": None,  # evaluated lazily (short-circuit, as since Go 1.18) in _Renderer.call
    "or": None,
}


class _Renderer:
    """Walks the node tree with Go's scoping: a block's variables end at its {{end}}."""

    def __init__(self, src: _Source, data: Any) -> None:
        self.src, self.out, self.vars = src, [], [["$", data]]

    def walk(self, nodes: list, dot: Any) -> None:
        for node in nodes:
            if isinstance(node, str):
                self.out.append(node)
            elif isinstance(node, tuple):
                value = self.pipe(node[1], dot)
                if not node[1].decl:
                    self.out.append(self.show(value, node[1].pos))
            else:
                self.block(node, dot)

    def block(self, node: _Block, dot: Any) -> None:
        mark = len(self.vars)
        if node.kind == "range":
            self.range(node, dot)
        else:
            value = self.pipe(node.pipe, dot)
            if _truth(value):
                self.walk(node.body, value if node.kind == "with" else dot)
            else:
                self.walk(node.orelse, dot)
        del self.vars[mark:]

    def range(self, node: _Block, dot: Any) -> None:
        pipe = node.pipe
        value = self.pipe(_Pipe([], False, pipe.cmds, pipe.pos), dot)
        if isinstance(value, dict):
            pairs = [(key, value[key]) for key in sorted(value)]
        elif isinstance(value, (list, tuple)):
            pairs = list(enumerate(value))
        elif value is None:
            pairs = []  # Go ranges over a missing (nil) value zero times
        else:
            raise self.src.error(f"range can't iterate over type {_kind(value)}", pipe.pos)
        for key, element in pairs:
            mark = len(self.vars)
            if len(pipe.decl) == 2:
                self.vars += [[pipe.decl[0], key], [pipe.decl[1], element]]
            elif pipe.decl:
                self.vars.append([pipe.decl[0], element])
            self.walk(node.body, element)
            del self.vars[mark:]
        if not pairs:
            self.walk(node.orelse, dot)

    def pipe(self, pipe: _Pipe, dot: Any) -> Any:
        value, piped = None, False
        for cmd in pipe.cmds:
            value, piped = self.command(cmd, dot, value, piped, pipe.pos), True
        if pipe.decl and pipe.assign:
            self.variable(pipe.decl[0], pipe.pos)[1] = value
        elif pipe.decl:
            self.vars.append([pipe.decl[0], value])
        return value

    def command(self, args: list[tuple], dot: Any, last: Any, piped: bool, pos: int) -> Any:
        head = args[0]
        if head[0] == "func":
            rest = [lambda a=a: self.arg(a, dot) for a in args[1:]]
            if piped:
                rest.append(lambda: last)
            return self.call(head[1], rest, head[2])
        if len(args) > 1 or piped:
            raise self.src.error("can't give argument to non-function", pos)
        return self.arg(head, dot)

    def call(self, name: str, thunks: list[Callable[[], Any]], pos: int) -> Any:
        try:
            if name in ("and", "or"):
                if not thunks:
                    raise ValueError(f"wrong number of args for {name}: want at least 1 got 0")
                for thunk in thunks:
                    value = thunk()
                    if _truth(value) == (name == "or"):
                        return value
                return value
            args = [thunk() for thunk in thunks]
            return _FUNCS[name](*args)
        except TypeError as error:
            raise self.src.error(f"wrong number of args for {name}: {error}", pos) from error
        except ValueError as error:
            if str(error).startswith("Go template:"):
                raise
            raise self.src.error(f"error calling {name}: {error}", pos) from error

    def arg(self, node: tuple, dot: Any) -> Any:
        kind = node[0]
        if kind == "dot":
            return dot
        if kind == "lit":
            return node[1]
        if kind == "var":
            return self.variable(node[1], node[2])[1]
        if kind == "pipe":
            return self.pipe(node[1], dot)
        if kind == "func":
            return self.call(node[1], [], node[2])
        base = self.arg(node[1], dot)
        if isinstance(base, dict):
            return base.get(node[2])  # a missing map key is Go's zero value
        raise self.src.error(f"can't evaluate field {node[2]} in type {_kind(base)}", node[3])

    def variable(self, name: str, pos: int) -> list:
        for entry in reversed(self.vars):
            if entry[0] == name:
                return entry
        raise self.src.error(f"undefined variable {name!r}", pos)

    def show(self, value: Any, pos: int) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (str, int)):
            return str(value)
        # Go would print "<no value>" or a Go-syntax dump: never what a chat template means to write
        raise self.src.error(f"cannot print a value of type {_kind(value)}", pos)


def render_go(template: str, data: dict) -> str:
    """Render a Go text/template (the subset Ollama chat templates use); ValueError on anything else."""
    src = _Source(template)
    nodes = _Parser(src, _lex(src)).parse()
    renderer = _Renderer(src, data)
    renderer.walk(nodes, data)
    return "".join(renderer.out)
