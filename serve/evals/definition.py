"""What an eval and an eval run may ask, checked before anything runs: OpenAI's shapes, our subset of them.

An eval (`POST /v1/evals`) names its data (`data_source_config`: `custom` with an `item_schema`, or
`stored_completions`) and its `testing_criteria`:
- `text_similarity` with `evaluation_metric` `rouge_l`, `bleu` or `fuzzy_match` and a `pass_threshold`;
- `string_check` with `operation` `eq`, `ne`, `like` or `ilike`;
- our extension `perplexity`: the reference's perplexity under the model (teacher forcing, lower is better),
  passing at or below `max_perplexity` when one is given.
`input` and `reference` are templates over the item and the sample: `{{item.answer}}`, `{{sample.output_text}}`.

A run (`POST /v1/evals/{id}/runs`) takes a `completions` data source: its items (`file_id` of an uploaded
JSONL file, `file_content`, or `stored_completions`), the messages sent for each (`template` over the item,
or `item_reference` to a list of messages in it), the `model` (any model this server serves) and its
`sampling_params`. Each refusal is an EvalError naming OpenAI's `param` (or the file's line).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from assistant.scoring import METRICS, OPERATIONS

NAME_MAX = 256
CRITERIA_MAX = 20
ITEMS_MAX = 5000  # items in one run: enough for a held-out file, bounded for a CPU
TOKENS_MAX = 4096  # max_completion_tokens
ROLES = ("system", "developer", "user", "assistant")
TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][\w]*(?:\.[\w]+)*)\s*\}\}")
SAMPLE_FIELDS = ("output_text",)
CRITERION_TYPES = ("text_similarity", "string_check", "perplexity")
SCHEMA_TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "array": list,
                "object": dict, "null": type(None)}


class EvalError(ValueError):
    """A request the Evals API refuses: `status`, OpenAI's `param` and `code`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str = "invalid_value"):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass(frozen=True)
class Criterion:
    """One testing criterion, checked."""

    name: str
    type: str
    input: str = ""  # template (text_similarity, string_check)
    reference: str = ""  # template
    metric: str = ""  # text_similarity
    operation: str = ""  # string_check
    pass_threshold: float | None = None  # text_similarity: score >= it passes
    max_perplexity: float | None = None  # perplexity: at or below it passes (None: always passes)
    raw: dict = field(default_factory=dict, compare=False)  # as given, for the eval object

    def to_openai(self) -> dict:
        """The criterion as the eval object lists it."""
        return {**self.raw, "name": self.name, "type": self.type}


@dataclass(frozen=True)
class EvalDefinition:
    """A checked `POST /v1/evals` body."""

    name: str
    source: str  # "custom" or "stored_completions"
    item_schema: dict
    include_sample_schema: bool
    criteria: tuple[Criterion, ...]
    metadata: dict[str, str] | None
    stored_metadata: dict | None = None  # stored_completions: the filter given


@dataclass(frozen=True)
class RunRequest:
    """A checked `POST /v1/evals/{id}/runs` body."""

    name: str
    model: str
    source: dict  # {"type": "file_id", "id"} | {"type": "file_content", "content"} | {"type": "stored_completions", ...}
    template: tuple[dict, ...] | None  # input_messages.template (None: item_reference)
    item_reference: str | None
    temperature: float
    top_p: float
    max_completion_tokens: int
    seed: int
    metadata: dict[str, str] | None
    raw: dict = field(default_factory=dict, compare=False)


# -- helpers --------------------------------------------------------------------------------------------
def _object(value: object, param: str) -> dict:
    if not isinstance(value, dict):
        raise EvalError(f"'{param}' must be an object, not {_show(value)}.", param, code="invalid_type")
    return value


def _string(value: object, param: str, *, required: bool = True, most: int = 20_000) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise EvalError(f"'{param}' must be a non-empty string, not {_show(value)}.", param, code="invalid_type")
    if len(value) > most:
        raise EvalError(f"'{param}' must be at most {most} characters, not {len(value)}.", param)
    return value


def _number(value: object, param: str, low: float, high: float, default: float | None = None) -> float:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise EvalError(f"'{param}' must be a number from {low:g} to {high:g}, not {_show(value)}.", param)
    return float(value)


def _whole(value: object, param: str, low: int, high: int, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise EvalError(f"'{param}' must be a whole number from {low} to {high}, not {_show(value)}.", param)
    return value


def _show(value: object) -> str:
    return repr(value)[:60]


def metadata_of(value: object, param: str = "metadata") -> dict[str, str] | None:
    """OpenAI's metadata: at most 16 string pairs (keys up to 64 characters, values up to 512)."""
    if value is None:
        return None
    data = _object(value, param)
    if len(data) > 16 or any(not isinstance(k, str) or len(k) > 64 or not isinstance(v, str) or len(v) > 512
                             for k, v in data.items()):
        raise EvalError(f"'{param}' must hold at most 16 string pairs, keys up to 64 characters and values up "
                        "to 512.", param)
    return dict(data)


def variables(template: str) -> list[str]:
    """The `{{...}}` names a template refers to, e.g. ["item.question", "sample.output_text"]."""
    return TEMPLATE.findall(template)


def _check_variables(template: str, param: str, schema: dict, *, sample: bool) -> None:
    for name in variables(template):
        namespace, _, rest = name.partition(".")
        if namespace == "sample":
            if not sample:
                raise EvalError(f"'{param}' refers to {{{{{name}}}}}, but the run's messages cannot: the sample "
                                "is the reply they produce.", param)
            if rest not in SAMPLE_FIELDS:
                raise EvalError(f"'{param}' refers to {{{{{name}}}}}; the sample has "
                                f"{', '.join('sample.' + f for f in SAMPLE_FIELDS)}.", param)
        elif namespace == "item":
            first = rest.split(".")[0]
            known = schema.get("properties") or {}
            if known and first not in known:
                raise EvalError(f"'{param}' refers to {{{{{name}}}}}, which the item schema does not define; it "
                                f"defines {', '.join(sorted(known))}.", param)
        else:
            raise EvalError(f"'{param}' refers to {{{{{name}}}}}: templates may use item.* and sample.* only.", param)


def check_schema(schema: object, param: str) -> dict:
    """An item schema we can check items against: a JSON schema object of properties and required names."""
    schema = _object(schema, param)
    if schema.get("type", "object") != "object":
        raise EvalError(f"'{param}.type' must be \"object\": each item is a JSON object.", f"{param}.type")
    properties = schema.get("properties", {})
    _object(properties, f"{param}.properties")
    for name, spec in properties.items():
        spec = _object(spec, f"{param}.properties.{name}")
        kinds = spec.get("type")
        for kind in kinds if isinstance(kinds, list) else [kinds] if kinds is not None else []:
            if kind not in SCHEMA_TYPES:
                raise EvalError(f"'{param}.properties.{name}.type' must be one of {', '.join(SCHEMA_TYPES)}, not "
                                f"{_show(kind)}.", f"{param}.properties.{name}.type")
    required = schema.get("required", [])
    if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
        raise EvalError(f"'{param}.required' must be a list of property names.", f"{param}.required")
    missing = [r for r in required if properties and r not in properties]
    if missing:
        raise EvalError(f"'{param}.required' names {', '.join(missing)}, which the schema's properties do not "
                        "define.", f"{param}.required")
    return schema


def item_problem(item: object, schema: dict) -> str | None:
    """Why an item does not fit the item schema (None: it fits): the first missing or mistyped property."""
    if not isinstance(item, dict):
        return f"the item must be a JSON object, not {_show(item)}"
    for name in schema.get("required", []):
        if name not in item:
            return f"the item has no {name!r}, which the eval's item schema requires"
    for name, spec in (schema.get("properties") or {}).items():
        kinds = spec.get("type") if isinstance(spec, dict) else None
        if name not in item or kinds is None:
            continue
        kinds = kinds if isinstance(kinds, list) else [kinds]
        value = item[name]
        if not any(isinstance(value, SCHEMA_TYPES[k]) and not (k in ("number", "integer") and isinstance(value, bool))
                   for k in kinds):
            return f"the item's {name!r} must be {' or '.join(kinds)}, not {_show(value)}"
    return None


# -- evals ----------------------------------------------------------------------------------------------
def check_eval(body: object) -> EvalDefinition:
    """The checked definition of a `POST /v1/evals` body; EvalError naming the first bad field."""
    body = _object(body, "body")
    config = _object(body.get("data_source_config"), "data_source_config")
    kind = config.get("type")
    stored_metadata = None
    if kind == "custom":
        schema = check_schema(config.get("item_schema"), "data_source_config.item_schema")
        include_sample = config.get("include_sample_schema", False)
        if not isinstance(include_sample, bool):
            raise EvalError("'data_source_config.include_sample_schema' must be true or false.",
                            "data_source_config.include_sample_schema", code="invalid_type")
    elif kind in ("stored_completions", "logs"):
        # A stored completion as an item: the conversation the model saw, its reply, and the agent's correction.
        schema = {"type": "object", "properties": {"input": {"type": "array"}, "output": {"type": "string"},
                                                   "reference": {"type": ["string", "null"]},
                                                   "model": {"type": "string"}}, "required": ["input"]}
        include_sample = True
        stored_metadata = metadata_of(config.get("metadata"), "data_source_config.metadata")
    else:
        raise EvalError(f"'data_source_config.type' must be custom or stored_completions, not {_show(kind)}.",
                        "data_source_config.type")
    criteria_in = body.get("testing_criteria")
    if not isinstance(criteria_in, list) or not criteria_in:
        raise EvalError("'testing_criteria' must be a non-empty list of graders.", "testing_criteria")
    if len(criteria_in) > CRITERIA_MAX:
        raise EvalError(f"'testing_criteria' may hold at most {CRITERIA_MAX} graders.", "testing_criteria")
    criteria = [check_criterion(c, f"testing_criteria[{i}]", schema) for i, c in enumerate(criteria_in)]
    names = [c.name for c in criteria]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise EvalError(f"'testing_criteria[{i}].name' {name!r} is used twice; each grader needs its own name.",
                            f"testing_criteria[{i}].name")
    name = body.get("name")
    return EvalDefinition(
        name=_string(name, "name", most=NAME_MAX) if name is not None else "eval",
        source="custom" if kind == "custom" else "stored_completions",
        item_schema=schema,
        include_sample_schema=include_sample,
        criteria=tuple(criteria),
        metadata=metadata_of(body.get("metadata")),
        stored_metadata=stored_metadata,
    )


def check_criterion(raw: object, param: str, schema: dict) -> Criterion:
    """One testing criterion, checked against the item schema."""
    raw = _object(raw, param)
    kind = raw.get("type")
    if kind not in CRITERION_TYPES:
        raise EvalError(f"'{param}.type' must be one of {', '.join(CRITERION_TYPES)} on this server, not "
                        f"{_show(kind)}.", f"{param}.type")
    name = _string(raw.get("name"), f"{param}.name", most=NAME_MAX)
    reference = _string(raw.get("reference"), f"{param}.reference")
    _check_variables(reference, f"{param}.reference", schema, sample=True)
    if kind == "perplexity":
        if variables(reference) and any(v.startswith("sample.") for v in variables(reference)):
            raise EvalError(f"'{param}.reference' must come from the item: the model's own reply has no reference "
                            "perplexity to measure.", f"{param}.reference")
        limit = raw.get("max_perplexity")
        return Criterion(name, kind, reference=reference, raw=dict(raw),
                         max_perplexity=None if limit is None else _number(limit, f"{param}.max_perplexity", 1, 1e9))
    text = _string(raw.get("input"), f"{param}.input")
    _check_variables(text, f"{param}.input", schema, sample=True)
    if kind == "text_similarity":
        metric = raw.get("evaluation_metric")
        if metric not in METRICS:
            raise EvalError(f"'{param}.evaluation_metric' must be one of {', '.join(METRICS)} on this server, not "
                            f"{_show(metric)}.", f"{param}.evaluation_metric")
        threshold = _number(raw.get("pass_threshold"), f"{param}.pass_threshold", 0, 1)
        return Criterion(name, kind, input=text, reference=reference, metric=metric, pass_threshold=threshold,
                         raw=dict(raw))
    operation = raw.get("operation")
    if operation not in OPERATIONS:
        raise EvalError(f"'{param}.operation' must be one of {', '.join(OPERATIONS)}, not {_show(operation)}.",
                        f"{param}.operation")
    return Criterion(name, kind, input=text, reference=reference, operation=operation, raw=dict(raw))


# -- runs -----------------------------------------------------------------------------------------------
def check_run(body: object, definition: EvalDefinition, models: list[str]) -> RunRequest:
    """The checked `POST /v1/evals/{id}/runs` body; `models`: the ids this server serves."""
    body = _object(body, "body")
    source = _object(body.get("data_source"), "data_source")
    if source.get("type") != "completions":
        raise EvalError(f"'data_source.type' must be \"completions\" on this server (the model answers each item), "
                        f"not {_show(source.get('type'))}.", "data_source.type")
    model = source.get("model")
    if not isinstance(model, str) or model not in models:
        raise EvalError(f"'data_source.model' must be one of the models this server serves ({', '.join(models)}), "
                        f"not {_show(model)}.", "data_source.model", status=404 if isinstance(model, str) else 400,
                        code="model_not_found" if isinstance(model, str) else "invalid_value")
    items = _object(source.get("source"), "data_source.source")
    kind = items.get("type")
    if kind == "file_id":
        _string(items.get("id"), "data_source.source.id")
    elif kind == "file_content":
        content = items.get("content")
        if not isinstance(content, list) or not content:
            raise EvalError("'data_source.source.content' must be a non-empty list of {\"item\": {...}}.",
                            "data_source.source.content")
        if len(content) > ITEMS_MAX:
            raise EvalError(f"'data_source.source.content' may hold at most {ITEMS_MAX} items.",
                            "data_source.source.content")
        for i, row in enumerate(content):
            problem = item_problem(row.get("item") if isinstance(row, dict) else None, definition.item_schema)
            if problem:
                raise EvalError(f"'data_source.source.content[{i}].item': {problem}.",
                                f"data_source.source.content[{i}].item")
    elif kind == "stored_completions":
        metadata_of(items.get("metadata"), "data_source.source.metadata")
        for key in ("created_after", "created_before"):
            if items.get(key) is not None:
                _whole(items.get(key), f"data_source.source.{key}", 0, 2**40, 0)
        _whole(items.get("limit"), "data_source.source.limit", 1, ITEMS_MAX, ITEMS_MAX)
    else:
        raise EvalError(f"'data_source.source.type' must be file_id, file_content or stored_completions, not "
                        f"{_show(kind)}.", "data_source.source.type")
    template, reference = _input_messages(source.get("input_messages"), definition)
    sampling = source.get("sampling_params") or {}
    _object(sampling, "data_source.sampling_params")
    name = body.get("name")
    return RunRequest(
        name=_string(name, "name", most=NAME_MAX) if name is not None else model,
        model=model,
        source=dict(items),
        template=template,
        item_reference=reference,
        temperature=_number(sampling.get("temperature"), "data_source.sampling_params.temperature", 0, 2, 0.0),
        top_p=_number(sampling.get("top_p"), "data_source.sampling_params.top_p", 0, 1, 1.0),
        max_completion_tokens=_whole(sampling.get("max_completion_tokens"),
                                     "data_source.sampling_params.max_completion_tokens", 1, TOKENS_MAX, 256),
        seed=_whole(sampling.get("seed"), "data_source.sampling_params.seed", 0, 2**32 - 1, 42),
        metadata=metadata_of(body.get("metadata")),
        raw=dict(source),
    )


def _input_messages(value: object, definition: EvalDefinition) -> tuple[tuple[dict, ...] | None, str | None]:
    """The run's messages: a template (each message's role and content) or a reference to the item's messages."""
    param = "data_source.input_messages"
    if value is None:
        if definition.source == "stored_completions":
            return None, "item.input"  # the conversation the model saw
        raise EvalError(f"'{param}' is required: a template over the item, or an item_reference.", param)
    value = _object(value, param)
    if value.get("type") == "item_reference":
        reference = _string(value.get("item_reference"), f"{param}.item_reference")
        if not reference.startswith("item.") or not re.fullmatch(r"item(\.\w+)+", reference):
            raise EvalError(f"'{param}.item_reference' must name a list of messages in the item, e.g. "
                            f"\"item.messages\", not {_show(reference)}.", f"{param}.item_reference")
        return None, reference
    if value.get("type") != "template":
        raise EvalError(f"'{param}.type' must be template or item_reference, not {_show(value.get('type'))}.",
                        f"{param}.type")
    template = value.get("template")
    if not isinstance(template, list) or not template:
        raise EvalError(f"'{param}.template' must be a non-empty list of messages.", f"{param}.template")
    messages = []
    for i, message in enumerate(template):
        at = f"{param}.template[{i}]"
        message = _object(message, at)
        role = message.get("role")
        if role not in ROLES:
            raise EvalError(f"'{at}.role' must be one of {', '.join(ROLES)}, not {_show(role)}.", f"{at}.role")
        content = message.get("content")
        if isinstance(content, dict) and content.get("type") in ("input_text", "output_text"):
            content = content.get("text")
        content = _string(content, f"{at}.content")
        _check_variables(content, f"{at}.content", definition.item_schema, sample=False)
        messages.append({"role": "system" if role == "developer" else role, "content": content})
    if messages[-1]["role"] != "user":
        raise EvalError(f"'{param}.template' must end with a user message: the model answers it.", f"{param}.template")
    return tuple(messages), None


def render(template: str, item: Mapping, sample: Mapping | None = None) -> str:
    """A template with its `{{item.x}}` / `{{sample.output_text}}` filled in (text as is; others as JSON)."""

    def value(match: re.Match) -> str:
        namespace, *path = match.group(1).split(".")
        current: object = {"item": item, "sample": sample or {}}.get(namespace, {})
        for key in path:
            current = current.get(key) if isinstance(current, Mapping) else None
        if current is None:
            return ""
        return current if isinstance(current, str) else json.dumps(current, ensure_ascii=False)

    return TEMPLATE.sub(value, template)


def lookup(item: Mapping, reference: str) -> object:
    """The value at "item.a.b" in an item (None when absent)."""
    current: object = item
    for key in reference.split(".")[1:]:
        current = current.get(key) if isinstance(current, Mapping) else None
    return current
