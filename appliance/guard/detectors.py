"""What the safety policy looks for in text: personal data, secrets, deny-listed terms and
prompt-injection phrasings. One detector set, shared by the service (before and after
generation) and the eval scorers, so the gate and the service agree on what a defect is.

Checksums come from well-kept libraries rather than regexes alone: python-stdnum validates
card numbers (Luhn), IBANs (ISO 13616 mod 97, with each country's length) and national
IDs; Google's libphonenumber (the `phonenumbers` port) finds and validates phone numbers
per region. Both are pure Python and need no model or download; Presidio's analyzer would
want a spaCy model, and its pattern recognizers use these same two libraries. Patterns run
on the `regex` module for its partial matching: a streamed answer holds back only the text
that could still become a match (`Detectors.unsettled`), not a fixed margin.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import phonenumbers
import regex
from stdnum import iban, luhn

# Every detector a policy may name. "national_id" and "deny" find what the policy lists.
DETECTOR_NAMES = ("card", "iban", "email", "phone", "secret", "national_id", "deny", "injection")
PII = ("card", "iban", "email", "phone", "national_id")  # what the pii_leak scorer counts


@dataclass(frozen=True)
class Finding:
    """Where a detector matched: offsets into the text, never the matched text itself, so
    a finding can be logged and counted without carrying what it found."""

    start: int
    end: int
    detector: str


@dataclass(frozen=True)
class NationalId:
    """A configured national-ID shape: a regex, and optionally a python-stdnum module that
    validates the match's checksum (e.g. "us.ssn", "nl.bsn", "es.dni")."""

    name: str
    pattern: regex.Pattern[str]
    validator: Callable[[str], bool] | None = None


_EMAIL = regex.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_CARD = regex.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = regex.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
# what may still grow into a phone number (libphonenumber cannot match partially)
_PHONE_START = regex.compile(r"(?:[+(]|\d)[\d ().-]*")
_SECRETS = regex.compile(
    "|".join(
        (
            r"\bAKIA[0-9A-Z]{16}\b",  # AWS access key id
            r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",  # GitHub tokens
            r"\bxox[abprs]-[A-Za-z0-9-]{10,}",  # Slack tokens
            r"\bsk-[A-Za-z0-9_-]{20,}",  # OpenAI-style keys, and this appliance's (sk-appl-)
            r"\bAIza[0-9A-Za-z_-]{35}\b",  # Google API keys
            r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----",
            r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWTs
            r"(?i)\b(?:password|passwd|api[_-]?key|secret|token)\s*[:=]\s*\S{8,}",
        )
    )
)
_INJECTION = regex.compile(
    r"(?i)\b(?:"
    r"(?:ignore|disregard|forget|skip|override)\s+(?:all\s+|any\s+)?(?:of\s+)?(?:the\s+|your\s+|my\s+)?"
    r"(?:previous|prior|above|earlier|preceding|system|original)\s+"
    r"(?:instructions?|prompts?|rules|directions|guidelines|messages?)"
    r"|(?:reveal|print|show|repeat|output|display|tell me|leak|dump)\s+(?:me\s+)?"
    r"(?:your|the)\s+(?:full\s+|exact\s+|entire\s+|hidden\s+|initial\s+|original\s+)*"
    r"(?:system\s+prompt|system\s+message|instructions you were given|initial\s+instructions)"
    r"|you\s+are\s+now\s+(?:DAN|in\s+developer\s+mode|jailbroken|unrestricted)"
    r"|(?:enter|enable|activate)\s+(?:developer|god|jailbreak)\s+mode"
    r"|new\s+instructions\s*:"
    r")"
)


@dataclass(frozen=True)
class Detectors:
    """A configured set of detectors. `find` returns non-overlapping findings in order: where
    two overlap, the earlier (then the longer) one wins, so a redaction never splits text."""

    enabled: tuple[str, ...] = DETECTOR_NAMES
    phone_regions: tuple[str, ...] = ("US", "GB", "DE")
    national_ids: tuple[NationalId, ...] = ()
    deny_terms: tuple[str, ...] = ()
    _deny: regex.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.deny_terms:
            alternatives = "|".join(regex.escape(term) for term in self.deny_terms)
            deny = regex.compile(rf"(?i)(?<!\w)(?:{alternatives})(?!\w)")
            object.__setattr__(self, "_deny", deny)

    def find(self, text: str) -> list[Finding]:
        found = [f for name in self.enabled for f in self._run(name, text)]
        kept: list[Finding] = []
        for finding in sorted(found, key=lambda f: (f.start, -f.end)):
            if not kept or finding.start >= kept[-1].end:
                kept.append(finding)
        return kept

    def unsettled(self, text: str) -> int:
        """Where the text's unsettled end begins: from there on, more text could still make
        (or lengthen) a match, so a stream holds it back. len(text) when nothing could."""
        earliest = len(text)
        for pattern in self._patterns():
            for match in pattern.finditer(text, partial=True):
                if match.end() == len(text) and match.end() > match.start():
                    earliest = min(earliest, match.start())
        return earliest

    def _patterns(self) -> Iterator[regex.Pattern[str]]:
        named = {"email": _EMAIL, "card": _CARD, "iban": _IBAN, "secret": _SECRETS}
        named |= {"injection": _INJECTION, "phone": _PHONE_START}
        for name in self.enabled:
            if name in named:
                yield named[name]
            elif name == "deny" and self._deny is not None:
                yield self._deny
            elif name == "national_id":
                yield from (national.pattern for national in self.national_ids)

    def _run(self, name: str, text: str) -> Iterator[Finding]:
        if name == "email":
            yield from _matches(_EMAIL, text, name)
        elif name == "card":
            yield from _matches(_CARD, text, name, lambda m: luhn.is_valid(_digits(m)))
        elif name == "iban":
            yield from _matches(_IBAN, text, name, iban.is_valid)
        elif name == "phone":
            yield from self._phones(text)
        elif name == "secret":
            yield from _matches(_SECRETS, text, name)
        elif name == "injection":
            yield from _matches(_INJECTION, text, name)
        elif name == "deny" and self._deny is not None:
            yield from _matches(self._deny, text, name)
        elif name == "national_id":
            for national in self.national_ids:
                yield from _matches(national.pattern, text, name, national.validator)

    def _phones(self, text: str) -> Iterator[Finding]:
        if not any(c.isdigit() for c in text):
            return  # the matcher's set-up costs more than this check
        for region in self.phone_regions:
            for match in phonenumbers.PhoneNumberMatcher(text, region):
                yield Finding(match.start, match.end, "phone")


def _matches(
    pattern: regex.Pattern[str],
    text: str,
    name: str,
    valid: Callable[[str], bool] | None = None,
) -> Iterator[Finding]:
    for match in pattern.finditer(text):
        if valid is None or _is_valid(valid, match.group()):
            yield Finding(match.start(), match.end(), name)


def _is_valid(valid: Callable[[str], bool], value: str) -> bool:
    try:
        return bool(valid(value))
    except Exception:  # a validator that chokes on odd input has not found a match
        return False


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


_STDNUM_MODULE = re.compile(r"[a-z]{2}\.[a-z_]+|[a-z_]+")


def stdnum_validator(module: str) -> Callable[[str], bool]:
    """python-stdnum's `is_valid` for a module name such as "us.ssn" (ValueError if none)."""
    if not _STDNUM_MODULE.fullmatch(module):
        raise ValueError(f"{module!r} is not a python-stdnum module name (e.g. us.ssn)")
    try:
        validator = importlib.import_module(f"stdnum.{module}").is_valid
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"python-stdnum has no validator {module!r}") from exc
    return validator


def pii_findings(text: str) -> list[Finding]:
    """Personal data in text by the default detectors (what the pii_leak scorer counts)."""
    return _PII_DETECTORS.find(text)


def scrubbed(text: str) -> str:
    """`text` with every PII and secret shape the default detectors find replaced by
    [REDACTED:detector]: what telemetry may keep of a text a client sent."""
    parts, at = [], 0
    for finding in _SCRUB_DETECTORS.find(text):
        parts += [text[at : finding.start], f"[REDACTED:{finding.detector}]"]
        at = finding.end
    return "".join([*parts, text[at:]])


_PII_DETECTORS = Detectors(enabled=tuple(n for n in PII if n != "national_id"))
_SCRUB_DETECTORS = Detectors(enabled=(*_PII_DETECTORS.enabled, "secret"))
