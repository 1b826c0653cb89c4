"""A release's safety policy: policy.toml in the signed bundle (so covered by its signatures
and by the spec hash the gate judges). For each direction, the detectors that run and what
happens on a finding:

    input  (the request's text, before the model sees it):  deny | redact
    output (the answer, whole or streamed):                 redact | mask | stop

Findings are counted by detector, direction and action; the matched text itself is never
kept, logged or recorded. A streamed answer holds back only the text that could still
become a match (at most `max_hold_chars`), so a match split across chunks is caught before
any of it is sent.
"""

from __future__ import annotations

import collections
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex

from appliance.errors import UsageError
from appliance.guard.detectors import (
    DETECTOR_NAMES,
    Detectors,
    Finding,
    NationalId,
    stdnum_validator,
)

POLICY_FILE = "policy.toml"
INPUT, OUTPUT = "input", "output"
ACTIONS = {INPUT: ("deny", "redact"), OUTPUT: ("redact", "mask", "stop")}
BLOCKING = ("deny", "stop")
CONTENT_FILTER = "content_filter"  # OpenAI's finish_reason (and our error code) for a block
# What the policy did, in a response's last event (or a refusal's body): [{direction,
# detector, action, count}], never the text it found.
GUARD_FIELD = "appliance_guard"
DEFAULT_MAX_HOLD_CHARS = 64
# The chat roles whose text the input side reads: not the operator's system or developer
# messages, which are trusted and often quote the very phrasings it looks for.
CHECKED_ROLES = ("user", "assistant", "tool")


@dataclass(frozen=True)
class Applied:
    """What the policy did to one text: counted per (direction, detector, action)."""

    direction: str
    detector: str
    action: str
    count: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("direction", "detector", "action", "count")}


@dataclass(frozen=True)
class Verdict:
    """A text after the policy: `text` is what may be used (redacted or masked, cut where
    an output stopped); `blocked` when an input is denied or an output stopped."""

    text: str
    blocked: bool = False
    applied: tuple[Applied, ...] = ()


@dataclass(frozen=True)
class Side:
    """The detectors of one direction, with the action for each."""

    direction: str
    detectors: Detectors
    action: str
    actions: dict[str, str] = field(default_factory=dict)  # detector -> its own action

    def action_for(self, detector: str) -> str:
        return self.actions.get(detector, self.action)

    def check(self, text: str) -> Verdict:
        return self.apply(text, self.detectors.find(text))

    def apply(self, text: str, findings: list[Finding]) -> Verdict:
        parts, at, applied = [], 0, []
        for finding in findings:
            action = self.action_for(finding.detector)
            applied.append(Applied(self.direction, finding.detector, action))
            parts.append(text[at : finding.start])
            if action in BLOCKING:
                return Verdict("".join(parts), True, merged(applied))
            matched = text[finding.start : finding.end]
            parts.append(redact(finding.detector) if action == "redact" else mask(matched))
            at = finding.end
        parts.append(text[at:])
        return Verdict("".join(parts), False, merged(applied))


def merged(applied: Iterable[Applied]) -> tuple[Applied, ...]:
    """One entry per (direction, detector, action), counts summed, in a stable order."""
    counted: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for a in applied:
        counted[(a.direction, a.detector, a.action)] += a.count
    return tuple(Applied(*key, n) for key, n in sorted(counted.items()))


def redact(detector: str) -> str:
    return f"[REDACTED:{detector}]"  # the same words as detectors.scrubbed


def mask(matched: str) -> str:
    """Every letter and digit as '*' but the last four, separators kept: "**** **** **** 1111"."""
    to_hide = sum(c.isalnum() for c in matched) - 4
    out = []
    for c in matched:
        if c.isalnum():
            out.append("*" if to_hide > 0 else c)
            to_hide -= 1
        else:
            out.append(c)
    return "".join(out)


@dataclass(frozen=True)
class SafetyPolicy:
    input: Side | None = None
    output: Side | None = None
    max_hold_chars: int = DEFAULT_MAX_HOLD_CHARS

    def check_input(self, text: str) -> Verdict:
        return self.input.check(text) if self.input else Verdict(text)

    def check_inputs(self, texts: list[str]) -> tuple[list[str], Verdict]:
        """A request's texts through the input side: each as it may be used, and one
        verdict for the request (blocked when any text is denied; its text unused)."""
        verdicts = [self.check_input(text) for text in texts]
        applied = merged(a for verdict in verdicts for a in verdict.applied)
        blocked = any(verdict.blocked for verdict in verdicts)
        return [verdict.text for verdict in verdicts], Verdict("", blocked, applied)

    def check_output(self, text: str) -> Verdict:
        return self.output.check(text) if self.output else Verdict(text)

    def stream(self) -> GuardedStream:
        return GuardedStream(self.output, self.max_hold_chars)


class GuardedStream:
    """An answer's chunks through the output side. `feed` returns what may be sent now: it
    holds back the unsettled end (text that could still become a match, or lengthen one:
    Detectors.unsettled), at most `max_hold` characters of it; `close` releases the rest.
    A match counts as whole once SETTLE_CHARS characters follow it (a separator and a digit
    could still lengthen a card number, a dot and letters an e-mail domain). After a stop,
    nothing more is sent."""

    SETTLE_CHARS = 4

    def __init__(self, side: Side | None, max_hold: int) -> None:
        self.side, self.max_hold = side, max_hold
        self.pending = ""
        self.stopped = False
        self._applied: list[Applied] = []

    @property
    def applied(self) -> tuple[Applied, ...]:
        return merged(self._applied)

    def feed(self, text: str) -> str:
        if self.side is None:
            return text
        self.pending += text
        return self._release(final=False)

    def close(self) -> str:
        return self._release(final=True) if self.side is not None else ""

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        text, detectors = self.pending, self.side.detectors
        boundary = len(text)
        if not final:
            boundary = max(detectors.unsettled(text), len(text) - self.max_hold)
        settled = []
        for finding in detectors.find(text):
            if finding.start >= boundary:
                break
            if not final and finding.end + self.SETTLE_CHARS > min(boundary, len(text)):
                boundary = finding.start  # it may still grow: hold it whole
                break
            settled.append(finding)
        verdict = self.side.apply(text[:boundary], settled)
        self._applied.extend(verdict.applied)
        self.pending = text[boundary:]
        if verdict.blocked:
            self.stopped, self.pending = True, ""
        return verdict.text


# -- reading policy.toml ---------------------------------------------------------------------


def load_policy(release_dir: Path) -> SafetyPolicy | None:
    """The policy a release signed, or None when it has none. Read only from a release
    directory that was verified (the store's, or a build's inputs)."""
    path = release_dir / POLICY_FILE
    if not path.is_file():
        return None
    return parse_policy(path.read_text(), str(path))


def parse_policy(text: str, where: str = POLICY_FILE) -> SafetyPolicy:
    """Parse and check a policy; UsageError naming the first problem."""
    try:
        raw = tomllib.loads(text)
        return _policy(raw)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{where} is not valid TOML: {exc}") from exc
    except (KeyError, ValueError, TypeError) as exc:
        raise UsageError(f"{where}: {exc}") from exc


def _policy(raw: dict[str, Any]) -> SafetyPolicy:
    _only(raw, ("max_hold_chars", "detectors", INPUT, OUTPUT), "the policy")
    settings = dict(raw.get("detectors", {}))
    _only(settings, ("phone_regions", "deny", "national_ids"), "[detectors]")
    nationals = tuple(
        _national(name, dict(entry)) for name, entry in settings.get("national_ids", {}).items()
    )
    deny = tuple(str(term) for term in settings.get("deny", ()))
    if not all(term.strip() for term in deny):
        raise ValueError("[detectors] deny has an empty term, which would match everywhere")
    base = Detectors(
        phone_regions=tuple(str(r) for r in settings.get("phone_regions", ("US", "GB", "DE"))),
        national_ids=nationals,
        deny_terms=deny,
    )
    hold = raw.get("max_hold_chars", DEFAULT_MAX_HOLD_CHARS)
    if not isinstance(hold, int) or not 0 <= hold <= 4096:
        raise ValueError("max_hold_chars must be an integer from 0 to 4096")
    return SafetyPolicy(
        input=_side(INPUT, raw.get(INPUT), base),
        output=_side(OUTPUT, raw.get(OUTPUT), base),
        max_hold_chars=hold,
    )


def _side(direction: str, raw: dict[str, Any] | None, base: Detectors) -> Side | None:
    if raw is None:
        return None
    _only(raw, ("detectors", "action", "actions"), f"[{direction}]")
    names = tuple(str(n) for n in raw.get("detectors", ()))
    for name in names:
        if name not in DETECTOR_NAMES:
            raise ValueError(
                f"[{direction}] unknown detector {name!r} ({', '.join(DETECTOR_NAMES)})"
            )
    if "national_id" in names and not base.national_ids:
        raise ValueError(f"[{direction}] national_id needs [detectors.national_ids]")
    if "deny" in names and not base.deny_terms:
        raise ValueError(f"[{direction}] deny needs [detectors] deny = [terms]")
    allowed = ACTIONS[direction]
    action = str(raw.get("action", allowed[-1] if direction == INPUT else allowed[0]))
    actions = {str(k): str(v) for k, v in raw.get("actions", {}).items()}
    for detector, chosen in [("*", action), *actions.items()]:
        if chosen not in allowed:
            raise ValueError(f"[{direction}] action {chosen!r} must be one of {', '.join(allowed)}")
        if detector != "*" and detector not in names:
            raise ValueError(f"[{direction}.actions] {detector!r} is not among its detectors")
    detectors = Detectors(names, base.phone_regions, base.national_ids, base.deny_terms)
    return Side(direction, detectors, action, actions)


def _national(name: str, raw: dict[str, Any]) -> NationalId:
    _only(raw, ("pattern", "validator"), f"[detectors.national_ids.{name}]")
    validator = raw.get("validator")
    try:
        pattern = regex.compile(str(raw["pattern"]))
    except regex.error as exc:
        raise ValueError(f"[detectors.national_ids.{name}] pattern: {exc}") from exc
    return NationalId(name, pattern, stdnum_validator(str(validator)) if validator else None)


def _only(raw: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    if not isinstance(raw, dict):
        raise TypeError(f"{where} must be a table")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{where} has unknown keys: {', '.join(unknown)}")
