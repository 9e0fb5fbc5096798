"""Request bodies of `/v1/chat/completions`, with OpenAI's types and ranges.

Strict types, as OpenAI checks them: "0.5" is not a number, 5.0 is not an integer, true is not a number.
Fields this server does not know are ignored (as vLLM does); ones it knows are checked even when they
only change nothing here (presence/frequency penalties), so a client learns of a typo'd value.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from assistant.generation import GenerationParams
from serve.store.records import metadata_problem

logger = logging.getLogger(__name__)

MAX_STOP = 4  # OpenAI's limit on stop sequences


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    """One part of a message's content; only text is read by these models."""

    type: str
    text: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise PydanticCustomError(
                "unsupported_part", "only text content parts are supported, not '{kind}'", {"kind": value}
            )
        return value


class Message(_Strict):
    """A chat message; `developer` is OpenAI's newer name for `system`."""

    role: Literal["system", "developer", "user", "assistant"]
    # An assistant message may come without content (OpenAI allows it beside tool calls).
    content: str | list[TextPart] | None = Field(default=None, validate_default=True)
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content_required(cls, value, info: ValidationInfo):
        if value is None and info.data.get("role", "assistant") != "assistant":
            raise PydanticCustomError(
                "missing", "content is required in {role} messages", {"role": info.data.get("role")}
            )
        return value

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    """`stream_options`: ask for a last chunk with token usage."""

    include_usage: bool | None = None


class ChatRequest(_Strict):
    """A `/v1/chat/completions` body; None (JSON null) means the server's default."""

    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    # The range torch.manual_seed accepts.
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Checked for range, not applied: the runtime has a repetition penalty, not these two.
    # vLLM's extensions (the app's sampler has them): unset, the model's generation_config.json decides.
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    user: str | None = None
    # Stored completions (serve.store): keep this completion, tagged with `metadata` (OpenAI's limits).
    store: bool | None = None
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        problem = metadata_problem(value) if value is not None else None
        if problem:
            raise PydanticCustomError("invalid_metadata", problem)
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise PydanticCustomError("unsupported", "only n=1 is supported (one choice per request)")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise PydanticCustomError("unsupported", "logprobs are not supported by this server")
        return value

    def generation(self, defaults: dict) -> GenerationParams:
        """Sampling settings: what the request sets, else the model's generation defaults (vLLM's
        `generation_config` convention), else the app's (GenerationParams.resolve)."""
        return GenerationParams.resolve(
            defaults, max_new_tokens=self.max_completion_tokens or self.max_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=self.seed,
        )

    def plain_messages(self) -> list[dict[str, str]]:
        """[{"role", "content"}] with text contents (`developer` read as `system`)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def stops(self) -> list[str]:
        """Stop sequences as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


# Names that may appear in a param path; pydantic's loc also holds union member tags ('str', 'list[str]').
_FIELDS = {name for model in (ChatRequest, Message, TextPart, StreamOptions) for name in model.model_fields}


def param_of(loc: tuple, fields: set[str] | frozenset[str] = frozenset(_FIELDS)) -> str | None:
    """pydantic's error location as OpenAI's `param`: ('messages', 0, 'role') -> 'messages[0].role'.

    `fields`: the names a path may hold (those of the request's models)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in fields:
            path += f".{part}" if path else part
    return path or None


def describe(
    error: ValidationError, fields: set[str] | frozenset[str] = frozenset(_FIELDS)
) -> tuple[str | None, str, str | None]:
    """(param, message, code) for the first malformed field of a request (`fields` as in param_of)."""
    errors = [(param_of(e["loc"], fields), e) for e in error.errors(include_url=False)]
    head = errors[0][0]
    if head is None:  # the body itself: not JSON, or not an object
        kind, msg = errors[0][1]["type"], errors[0][1]["msg"]
        if kind == "json_invalid":
            return None, f"We could not parse the JSON body of your request: {msg}.", None
        return None, "The request body must be a JSON object.", None
    # One bad field gives an error per member of its union (str | list[str]). A type mismatch only says
    # "not this member"; an error inside the member whose type matched says what is wrong (a list that is
    # too long, a bad item), and the deepest says the most. Equal ones are alternatives, joined.
    group = [(p, e) for p, e in errors if p == head or (p or "").startswith((head + ".", head + "["))]
    group = [(p, e) for p, e in group if not e["type"].endswith("_type")] or group
    param, first = max(group, key=lambda item: len(item[1]["loc"]))
    messages = dict.fromkeys(e["msg"] for p, e in group if p == param)
    text = " or ".join(m[0].lower() + m[1:] for m in messages)
    return param, f"Invalid '{param}': {text}.", _code(first["type"])


def validate_chat(body: bytes | dict, renamed: dict[str, str] | None = None) -> ChatRequest:
    """A chat request checked against OpenAI's schema, or ValueError(param, message, code) naming the field
    (`renamed`: param names as the caller knows them, e.g. Gradio /chat's max_new_tokens for max_tokens)."""
    try:
        if isinstance(body, dict):
            return ChatRequest.model_validate(body)
        return ChatRequest.model_validate_json(body)
    except ValidationError as error:
        param, message, code = describe(error)
        for ours, theirs in (renamed or {}).items():
            if param and param.split("[")[0].split(".")[0] == ours:
                message = message.replace(f"'{param}'", f"'{param.replace(ours, theirs, 1)}'")
                param = param.replace(ours, theirs, 1)
        raise InvalidRequest(param, message, code) from None


class InvalidRequest(ValueError):
    """A request that does not follow the schema: the field at fault (`param`), a message, OpenAI's code."""

    def __init__(self, param: str | None, message: str, code: str | None):
        super().__init__(message)
        self.param, self.message, self.code = param, message, code


def _code(kind: str) -> str:
    """OpenAI's error code for a pydantic error type."""
    if kind == "missing":
        return "missing_required_parameter"
    return "invalid_type" if kind.endswith("_type") else "invalid_value"
