"""bundle.toml: what a release is made of, as written by the person who builds it."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import UsageError
from appliance.guard.policy import parse_policy
from appliance.retrieval.augment import RetrievalSettings
from appliance.retrieval.corpus import passages_of
from appliance.serve.policy import RoutingPolicy
from appliance.trust.manifest import MAX_SEQUENCE, NAME_PATTERN, VERSION_PATTERN

EMBEDDED_MODELS = ("gemma3-270m-q4_k_m",)
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K")
_GOLDEN_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\.jsonl$")
_CORPUS_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\.(md|jsonl)$")
_SERVING_DEFAULTS: dict[str, Any] = {
    "context_size": 2048,
    "threads": 0,  # 0: as many as the host has cores
    "gpu_layers": 0,
    "max_tokens": 512,
    "sampling": {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "seed": -1},
}


@dataclass(frozen=True)
class BundleSpec:
    source: Path  # the bundle.toml itself
    name: str
    version: str
    sequence: int
    min_sequence: int
    model_path: Path | None  # None: the embedded default named in `embedded`
    embedded: str | None
    quantize: str | None
    model_card: Path
    data_card: Path
    eval_spec: Path
    golden_sets: tuple[Path, ...]
    serving: dict[str, Any] = field(default_factory=dict)
    chat_template: Path | None = None
    routing: dict[str, Any] = field(default_factory=dict)  # the routing policy, as written
    safety_policy: Path | None = None  # policy.toml: detectors and actions (appliance.guard)
    corpus: tuple[Path, ...] = ()  # documents for retrieval, signed as corpus/<file name>
    retrieval: dict[str, Any] = field(default_factory=dict)  # how the service retrieves


def load_bundle_spec(path: Path) -> BundleSpec:
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from exc
    try:
        return _parse(path, raw)
    except KeyError as exc:
        raise UsageError(f"{path}: missing required key {exc.args[0]!r}") from exc
    except (TypeError, AttributeError, ValueError) as exc:
        raise UsageError(f"{path}: a value has the wrong type ({exc})") from exc


def _parse(path: Path, raw: dict[str, Any]) -> BundleSpec:
    base = path.parent
    release, model, cards, evals = raw["release"], raw["model"], raw["cards"], raw["eval"]
    name, version = str(release["name"]), str(release["version"])
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"{path}: release name {name!r} must match {NAME_PATTERN.pattern}")
    if not VERSION_PATTERN.fullmatch(version):
        raise UsageError(f"{path}: version {version!r} must match {VERSION_PATTERN.pattern}")
    sequence = _int(release["sequence"], "release.sequence", minimum=1)
    min_sequence = _int(release.get("min_sequence", 0), "release.min_sequence", minimum=0)
    if min_sequence > sequence:
        raise UsageError(f"{path}: min_sequence must not exceed sequence")
    embedded = model.get("embedded")
    if (embedded is None) == (model.get("path") is None):
        raise UsageError(f"{path}: [model] needs exactly one of 'path' or 'embedded'")
    if embedded is not None and embedded not in EMBEDDED_MODELS:
        raise UsageError(
            f"{path}: unknown embedded model {embedded!r} ({', '.join(EMBEDDED_MODELS)})"
        )
    quantize = model.get("quantize")
    if quantize is not None and quantize not in QUANT_TYPES:
        raise UsageError(f"{path}: quantize must be one of {', '.join(QUANT_TYPES)}")
    serving_raw = dict(raw.get("serving", {}))
    template = serving_raw.pop("chat_template", None)
    golden = _named_files(path, evals["golden"], _GOLDEN_NAME, "golden set")
    retrieval_raw = dict(raw.get("retrieval", {}))
    corpus = _named_files(path, retrieval_raw.pop("corpus", []), _CORPUS_NAME, "corpus")
    passages_of(list(corpus))  # a corpus that does not parse is refused at build time
    retrieval = RetrievalSettings.from_dict(retrieval_raw, f"{path}: [retrieval]")
    if retrieval.endpoints and not corpus:
        raise UsageError(f"{path}: [retrieval] names endpoints but lists no corpus")
    safety = raw.get("safety", {})
    safety_policy = _existing(base, safety["policy"]) if "policy" in safety else None
    if safety_policy is not None:
        parse_policy(safety_policy.read_text(), str(safety_policy))  # refused at build time
    return BundleSpec(
        source=path,
        name=name,
        version=version,
        sequence=sequence,
        min_sequence=min_sequence,
        model_path=_existing(base, model["path"]) if embedded is None else None,
        embedded=embedded,
        quantize=quantize,
        model_card=_existing(base, cards["model"]),
        data_card=_existing(base, cards["data"]),
        eval_spec=_existing(base, evals["spec"]),
        golden_sets=golden,
        serving=_merge(_SERVING_DEFAULTS, serving_raw),
        chat_template=_existing(base, template) if template else None,
        routing=RoutingPolicy.from_dict(raw.get("routing", {}), f"{path}: [routing]").as_dict(),
        safety_policy=safety_policy,
        corpus=corpus,
        retrieval=retrieval.as_dict(),
    )


def _named_files(
    path: Path, listed: list[str], pattern: re.Pattern[str], what: str
) -> tuple[Path, ...]:
    """Files bundle.toml lists, each existing, with a name the bundle allows, none twice."""
    files = tuple(_existing(path.parent, f) for f in listed)
    for f in files:
        if not pattern.fullmatch(f.name):
            raise UsageError(f"{path}: {what} file name {f.name!r} must match {pattern.pattern}")
    if len({f.name for f in files}) != len(files):
        raise UsageError(f"{path}: two {what} files share a file name")
    return files


def _existing(base: Path, relative: str) -> Path:
    candidate = (base / relative).resolve()
    if not candidate.is_file():
        raise UsageError(f"file named in bundle.toml does not exist: {candidate}")
    return candidate


def _int(value: object, what: str, minimum: int) -> int:
    """An integer from minimum to MAX_SEQUENCE (what SQLite stores; TOML parses bigger)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{what} must be an integer")
    if not minimum <= value <= MAX_SEQUENCE:
        raise UsageError(f"{what} must be from {minimum} to {MAX_SEQUENCE}")
    return value


def _merge(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise UsageError(f"unknown [serving] keys: {', '.join(sorted(unknown))}")
    merged = dict(defaults)
    for key, value in overrides.items():
        merged[key] = _merge(defaults[key], value) if isinstance(value, dict) else value
    return merged
