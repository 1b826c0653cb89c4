"""The routing policy: when a request leaves the small model for a cold path.

The release signs it (`[routing]` in bundle.toml, carried in serving.json: the small
model's owners know its limits) and an admin may override any key of it in the store
(`appliance route policy set`, audited). Plain data and pure functions, no llama.cpp: the
service, the eval gate and `route calibrate` judge requests with the same rules.

Before generation, a request escalates when its prompt does not fit the small model's
context, is longer than `max_prompt_tokens`, matches a category rule, or its client asks
(`x-appliance-escalate: true`) and the policy lets clients ask. After generation (whole
responses: a streamed answer has already reached its client), it escalates on a refusal,
on an answer that is not the JSON object the request asked for, or on low confidence: a
mean token log-probability under `min_mean_logprob`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from appliance.errors import UsageError

# Escalation reasons, as headers, telemetry and /metrics name them.
FALLBACK, INCIDENT, CLIENT = "fallback", "incident", "client"
CONTEXT, PROMPT_TOKENS = "context", "prompt_tokens"
REFUSAL, INVALID_JSON, LOW_CONFIDENCE = "refusal", "invalid_json", "low_confidence"
CATEGORY_PREFIX = "category:"
CATEGORY_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


@dataclass(frozen=True)
class RoutingPolicy:
    max_prompt_tokens: int = 0  # 0: only the small model's context limits the prompt
    categories: dict[str, str] = field(default_factory=dict)  # name -> regular expression
    client_may_escalate: bool = False
    refusal_patterns: tuple[str, ...] = ()  # regular expressions, searched in the answer
    validate_json: bool = True  # a request that asks for a JSON object must get one
    min_mean_logprob: float | None = None  # None: confidence is not judged

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "[routing]") -> RoutingPolicy:
        """A policy from its TOML/JSON form; UsageError names what is wrong."""
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise UsageError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        values = {**asdict(cls()), **raw}
        limit = values["max_prompt_tokens"]
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise UsageError(f"{where}: max_prompt_tokens must be an integer >= 0")
        for key in ("client_may_escalate", "validate_json"):
            if not isinstance(values[key], bool):
                raise UsageError(f"{where}: {key} must be true or false")
        threshold = values["min_mean_logprob"]
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold > 0
        ):
            raise UsageError(f"{where}: min_mean_logprob must be a number <= 0 (a log-probability)")
        categories = values["categories"]
        if not isinstance(categories, dict):
            raise UsageError(f"{where}: categories must map a name to a regular expression")
        for name, pattern in categories.items():
            if not CATEGORY_NAME.match(str(name)):
                raise UsageError(f"{where}: category name {name!r}: a-z, 0-9, - and _ only")
            _compile(pattern, f"{where}: category {name}")
        patterns = values["refusal_patterns"]
        if not isinstance(patterns, list | tuple):
            raise UsageError(f"{where}: refusal_patterns must be a list of regular expressions")
        for pattern in patterns:
            _compile(pattern, f"{where}: refusal pattern")
        return cls(
            max_prompt_tokens=limit,
            categories=dict(categories),
            client_may_escalate=values["client_may_escalate"],
            refusal_patterns=tuple(patterns),
            validate_json=values["validate_json"],
            min_mean_logprob=None if threshold is None else float(threshold),
        )

    def with_overrides(self, overrides: dict[str, Any]) -> RoutingPolicy:
        """This policy with an admin's overrides (each key replaces the signed value)."""
        return RoutingPolicy.from_dict({**self.as_dict(), **overrides}, "routing override")

    def as_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["refusal_patterns"] = list(self.refusal_patterns)
        return raw

    @property
    def judges_confidence(self) -> bool:
        return self.min_mean_logprob is not None

    def before(self, text: str, prompt_tokens: int, context: int, client_asks: bool) -> str | None:
        """Why this request should not go to the small model, or None."""
        if prompt_tokens >= context:
            return CONTEXT
        if self.max_prompt_tokens and prompt_tokens > self.max_prompt_tokens:
            return PROMPT_TOKENS
        for name, pattern in self.categories.items():
            if re.search(pattern, text):
                return CATEGORY_PREFIX + name
        if client_asks and self.client_may_escalate:
            return CLIENT
        return None

    def after(self, answer: str, mean_logprob: float | None, wants_json: bool) -> str | None:
        """Why the small model's answer should be replaced by a cold path's, or None."""
        if any(re.search(pattern, answer) for pattern in self.refusal_patterns):
            return REFUSAL
        if wants_json and self.validate_json and not _is_json_object(answer):
            return INVALID_JSON
        if (
            self.min_mean_logprob is not None
            and mean_logprob is not None
            and mean_logprob < self.min_mean_logprob
        ):
            return LOW_CONFIDENCE
        return None


def parse_override(key: str, value: str) -> dict[str, Any]:
    """`route policy set KEY VALUE`: VALUE is JSON (a bare word is taken as a string)."""
    if key not in RoutingPolicy.__dataclass_fields__:
        known = ", ".join(RoutingPolicy.__dataclass_fields__)
        raise UsageError(f"unknown policy key {key!r} (one of: {known})")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    RoutingPolicy.from_dict({key: parsed}, "routing override")
    return {key: parsed}


def _compile(pattern: object, what: str) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise UsageError(f"{what} must be a non-empty regular expression")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from exc


def _is_json_object(answer: str) -> bool:
    try:
        return isinstance(json.loads(answer), dict)
    except ValueError:
        return False
