"""The fine-tuning job contract: every setting a job may ask, its bounds and its default, checked in one place.

The API (`POST /v1/fine_tuning/jobs`), the Train tab and Python callers of JobRunner.create all build a
JobSpec with `job_spec(...)`, so the same input is refused everywhere with the same message, naming the
setting as OpenAI's `param` (where it sits in a fine-tuning request: "hyperparameters.n_epochs",
"adapter.system_prompt", ...). A value left out, null or blank takes the setting's default; for the
hyperparameters "auto" (OpenAI's word) means the default too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from assistant.adapters import METHODS

logger = logging.getLogger(__name__)

SUFFIX_MAX = 40  # characters of the adapter's name suffix (the name is ft-<suffix>-<6 of the job id>)
SUFFIX_CHARS = re.compile(r"[A-Za-z0-9_-]+")
SYSTEM_PROMPT_MAX = 20_000  # characters
# train.sft and train.check read "@FILE" as a file of the server's; a job only takes the prompt's text.
FILE_PROMPT = "must be the prompt's text; '@FILE' (a file on the server) is not accepted over the API"


@dataclass(frozen=True)
class Rule:
    """A numeric setting's default and bounds."""

    default: float | int
    low: float
    high: float
    whole: bool = False  # a whole number
    above: bool = False  # `low` itself is refused (more than 0 epochs)
    auto: bool = False  # "auto" stands for the default (OpenAI's hyperparameters)
    zero: str | None = None  # what 0 means, when it means something ("none": no cap)

    def describe(self) -> str:
        """The allowed values in words, e.g. "a whole number from 1 to 1024"."""
        kind = "a whole number" if self.whole else "a number"
        low, high = _number(self.low), _number(self.high)
        span = f"above {low} and at most {high}" if self.above else f"from {low} to {high}"
        return f"{kind} {span}" + (f" (0: {self.zero})" if self.zero else "")

    def check(self, value: object) -> float | int:
        """`value` when it is allowed (None, and "auto" where allowed: the default); else a pydantic error."""
        if value is None or (self.auto and value == "auto"):
            return self.default
        number = isinstance(value, int | float) and not isinstance(value, bool)
        whole = isinstance(value, int)  # 5.0 is not a whole number, as OpenAI checks it
        low_ok = number and (value > self.low if self.above else value >= self.low)
        if not (number and low_ok and value <= self.high and (whole or not self.whole)):
            allowed = ("'auto' or " if self.auto else "") + self.describe()
            raise PydanticCustomError("out_of_range", "must be {allowed}, not {value}",
                                      {"allowed": allowed, "value": repr(value)})
        return value if self.whole else float(value)


RULES: dict[str, Rule] = {
    "n_epochs": Rule(1.0, 0, 100, above=True, auto=True),  # a fraction of an epoch is fine for train.sft
    "batch_size": Rule(8, 1, 1024, whole=True, auto=True),
    "learning_rate_multiplier": Rule(1.0, 0, 100, above=True, auto=True),  # times the method's default rate
    "time_budget_minutes": Rule(0.0, 0, 7 * 24 * 60, zero="none"),
    "max_steps": Rule(0, 0, 1_000_000, whole=True, zero="none"),
    "seed": Rule(42, 0, 2**32 - 1, whole=True),
    "beta": Rule(0.1, 0, 10, above=True, auto=True),  # DPO only (train.dpo --beta)
}
TRAINING = ("supervised", "dpo")  # OpenAI's method.type: train.sft or train.dpo
HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")  # OpenAI's; "auto" allowed
# Where each setting sits in a `POST /v1/fine_tuning/jobs` body: the `param` of its errors, on every front end.
PARAMS: dict[str, str] = {
    "method": "adapter.type",
    "training": "method.type",
    "beta": "method.dpo.hyperparameters.beta",
    **{name: f"hyperparameters.{name}" for name in HYPERPARAMETERS},
    "time_budget_minutes": "adapter.time_budget_minutes",
    "max_steps": "adapter.max_steps",
    "seed": "seed",
    "suffix": "suffix",
    "system_prompt": "adapter.system_prompt",
    "redact": "adapter.redact",
}


class JobSpecError(ValueError):
    """A job setting outside the contract: `param` where it sits in an OpenAI request; the message says why."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value"):
        super().__init__(message)
        self.status, self.param, self.code = 400, param, code


class JobSpec(BaseModel):
    """Everything a fine-tuning job may ask, each value within its bounds (RULES) or its default."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    method: str = "lora"  # one of assistant.adapters.METHODS
    training: str = "supervised"  # OpenAI's method.type: "supervised" (train.sft) or "dpo" (train.dpo)
    beta: float = RULES["beta"].default  # DPO's beta (read by "dpo" jobs only)
    n_epochs: float = RULES["n_epochs"].default
    batch_size: int = RULES["batch_size"].default
    learning_rate_multiplier: float = RULES["learning_rate_multiplier"].default
    time_budget_minutes: float = RULES["time_budget_minutes"].default  # 0: no budget
    max_steps: int = RULES["max_steps"].default  # 0: no cap
    seed: int = RULES["seed"].default
    suffix: str | None = None  # in the adapter's name
    system_prompt: str | None = None  # for rows without one; text only
    redact: bool = False  # train.sft --redact: personal data becomes typed placeholders before training

    @field_validator(*RULES, mode="before")
    @classmethod
    def _in_range(cls, value: object, info: ValidationInfo) -> float | int:
        return RULES[info.field_name].check(value)

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: object) -> str:
        if value is None:
            return cls.model_fields["method"].default
        if value not in METHODS:
            raise PydanticCustomError("unsupported", "must be one of {methods}, not {value}",
                                      {"methods": ", ".join(METHODS), "value": repr(value)})
        return value

    @field_validator("training", mode="before")
    @classmethod
    def _training(cls, value: object) -> str:
        if value is None:
            return "supervised"
        if value not in TRAINING:
            raise PydanticCustomError("unsupported", "must be one of {kinds}, not {value}",
                                      {"kinds": ", ".join(TRAINING), "value": repr(value)})
        return value

    @field_validator("redact", mode="before")
    @classmethod
    def _flag(cls, value: object) -> bool:
        if value is None:
            return False
        if not isinstance(value, bool):  # "yes" or 1 is no answer to a privacy question
            raise PydanticCustomError("bool_type", "must be true or false, not {value}", {"value": repr(value)[:60]})
        return value

    @field_validator("suffix", mode="before")
    @classmethod
    def _suffix(cls, value: object) -> str | None:
        text = _text(value)
        if text and (len(text) > SUFFIX_MAX or not SUFFIX_CHARS.fullmatch(text)):
            raise PydanticCustomError("invalid_suffix", "must be at most {most} letters, digits, '-' or '_', "
                                      "not {value}", {"most": SUFFIX_MAX, "value": repr(text[:60])})
        return text

    @field_validator("system_prompt", mode="before")
    @classmethod
    def _text_not_file(cls, value: object) -> str | None:
        text = _text(value)
        if text and text.startswith("@"):
            raise PydanticCustomError("file_prompt", FILE_PROMPT)
        if text and len(text) > SYSTEM_PROMPT_MAX:
            raise PydanticCustomError("too_long", "must be at most {most} characters, not {size}",
                                      {"most": SYSTEM_PROMPT_MAX, "size": len(text)})
        return text


def job_spec(params: Mapping[str, str] = PARAMS, **values: object) -> JobSpec:
    """The checked spec of `values` (None or missing: the default), or JobSpecError naming the first bad one.

    `params`: each setting's name in the caller's request (default: where it sits in an OpenAI request)."""
    try:
        spec = JobSpec(**values)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        name = str(first["loc"][0]) if first["loc"] else None
        param = params.get(name, name) if name else None
        text = first["msg"][:1].lower() + first["msg"][1:]
        code = "invalid_type" if first["type"].endswith("_type") else "invalid_value"
        raise JobSpecError(f"Invalid '{param}': {text}.", param, code) from None
    if spec.training == "dpo" and spec.method != "lora":  # train.dpo tunes LoRA adapters
        param = params.get("method", "method")
        raise JobSpecError(f"Invalid '{param}': DPO jobs train LoRA adapters; leave it out or set it to 'lora', "
                           f"not {spec.method!r}.", param)
    # Refused rather than ignored: train.dpo has neither --redact nor --time-budget yet.
    for name, fix in (("redact", "redact the preference file before uploading it"),
                      ("time_budget_minutes", "cap the run with max_steps instead")):
        if spec.training == "dpo" and getattr(spec, name):
            param = params.get(name, name)
            raise JobSpecError(f"Invalid '{param}': not available for DPO jobs yet; {fix}.", param)
    return spec


def _text(value: object) -> str | None:
    """A text setting without its outer blanks (None when blank); a pydantic error when not text."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "must be a string, not {value}", {"value": repr(value)[:60]})
    return value.strip() or None


def _number(value: float) -> str:
    """A bound as written: 4294967295, 100, 0.5."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
