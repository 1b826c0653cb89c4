"""The frozen eval spec of a release: eval/spec.toml and its JSONL golden sets.

It travels inside the signed bundle, so it is read only from a release directory that
was just re-verified (appliance.evals.evaluate.plan_evaluation). Its hash
(appliance.store.gate.spec_hash) covers every signed file but the cards.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from appliance.errors import UsageError
from appliance.evals.scorers import REQUIRED_KEYS, SCORERS
from appliance.retrieval.quality import RetrievalCase


@dataclass(frozen=True)
class Case:
    id: str
    suite: str
    prompt: str | None
    messages: tuple[tuple[str, str], ...] | None
    expected: dict[str, Any]
    scorers: tuple[str, ...]
    tags: tuple[str, ...]
    weight: float = 1.0
    retrieval: bool | None = None  # asks for passages (True), refuses them (False), or as served


@dataclass(frozen=True)
class Suite:
    name: str
    min_pass_rate: float
    cases: tuple[Case, ...]


@dataclass(frozen=True)
class Gates:
    max_defect_rate: dict[str, float] = field(default_factory=dict)
    max_p95_latency_ms: float | None = None
    max_cost_per_success: float | None = None
    cost_per_cpu_hour: float = 0.0
    non_inferiority_margin: float = 0.05
    alpha: float = 0.05


@dataclass(frozen=True)
class Load:
    """The load the gate is judged at: `clients` requests in flight, each timed from the
    moment it is sent. When other processes use more than `max_busy_share` of the host's
    CPU during the run, latency and cost are inconclusive (measured, not judged)."""

    clients: int = 1
    max_busy_share: float = 0.25


@dataclass(frozen=True)
class OnlineCheck:
    """A check every live response must pass: a scorer with its `expected` fixed here (no
    reference answer), e.g. pii_leak, or contains with contains_none."""

    name: str
    scorer: str
    expected: dict[str, Any] = field(default_factory=dict)

    def passes(self, output: str) -> bool:
        return SCORERS[self.scorer](output, self.expected, 0.0).passed


@dataclass(frozen=True)
class Online:
    """How a live canary is judged against the stable release, on the same statistics as
    the offline gate: the candidate aborts when its rate of errors or failed checks is
    significantly (at `alpha`) worse than stable's by more than the margin, or when the
    bootstrap interval of its p95 latency less stable's p95 x (1 + latency_margin), both
    sides resampled, lies wholly above zero (judged once each side has
    serve.rollout.MIN_LATENCY_SAMPLES answers)."""

    checks: tuple[OnlineCheck, ...] = ()
    error_margin: float = 0.02
    check_margin: float = 0.05
    latency_margin: float = 0.25
    divergence_margin: float = 0.05  # a shadow: answers unlike stable's, beyond the noise floor
    alpha: float = 0.05


@dataclass(frozen=True)
class RetrievalSpec:
    """Retrieval judged apart from generation: each case's query against the passages it
    labels relevant, at `k`, with a minimum for each measure (None: reported, not gated)."""

    cases: tuple[RetrievalCase, ...]
    k: int = 3
    min_precision_at_k: float | None = None
    min_recall_at_k: float | None = None
    min_mrr: float | None = None
    # the answers of cases that retrieved: the share of their words the passages hold
    min_groundedness: float | None = None

    def minimums(self) -> dict[str, float]:
        named = {
            "precision_at_k": self.min_precision_at_k,
            "recall_at_k": self.min_recall_at_k,
            "mrr": self.min_mrr,
        }
        return {name: value for name, value in named.items() if value is not None}


@dataclass(frozen=True)
class EvalSpec:
    name: str
    temperature: float
    seed: int
    max_tokens: int
    suites: tuple[Suite, ...]
    gates: Gates
    load: Load = Load()
    online: Online = Online()
    retrieval: RetrievalSpec | None = None

    @property
    def cases(self) -> list[Case]:
        return [case for suite in self.suites for case in suite.cases]


def load_spec(release_dir: Path) -> EvalSpec:
    path = release_dir / "eval" / "spec.toml"
    try:
        raw = tomllib.loads(path.read_text())
        sampling, gates = raw.get("sampling", {}), raw.get("gates", {})
        suites = tuple(_suite(release_dir / "eval", s) for s in raw["suites"])
        spec = EvalSpec(
            name=str(raw["spec"]["name"]),
            temperature=float(sampling.get("temperature", 0.0)),
            seed=int(sampling.get("seed", 0)),
            max_tokens=int(sampling.get("max_tokens", 64)),
            suites=suites,
            gates=Gates(**gates),
            load=Load(**raw.get("load", {})),
            online=_online(raw.get("online", {})),
            retrieval=_retrieval(release_dir / "eval", raw.get("retrieval")),
        )
        if not 1 <= spec.load.clients <= 64:
            raise ValueError(f"load.clients must be 1 to 64, not {spec.load.clients}")
    except (OSError, KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"the eval spec in {release_dir} is invalid: {exc}") from exc
    ids = [case.id for case in spec.cases]
    if len(ids) != len(set(ids)):
        raise UsageError("the eval spec has duplicate case ids")
    return spec


def _online(raw: dict[str, Any]) -> Online:
    checks = []
    for entry in raw.get("checks", []):
        check = OnlineCheck(
            str(entry["name"]), str(entry["scorer"]), dict(entry.get("expected", {}))
        )
        if check.scorer not in SCORERS:
            raise ValueError(f"online check {check.name}: unknown scorer {check.scorer}")
        missing = [k for k in REQUIRED_KEYS[check.scorer] if k not in check.expected]
        if missing:
            raise ValueError(f"online check {check.name}: scorer {check.scorer} needs {missing}")
        checks.append(check)
    margins = {k: v for k, v in raw.items() if k != "checks"}
    unknown = sorted(set(margins) - {f.name for f in fields(Online)})
    if unknown:
        raise ValueError(f"[online] has unknown settings: {', '.join(unknown)}")
    return Online(checks=tuple(checks), **{k: float(v) for k, v in margins.items()})


def _retrieval(eval_dir: Path, raw: dict[str, Any] | None) -> RetrievalSpec | None:
    """[retrieval]: file (JSONL of {"id", "query", "relevant": [passage ids]}), k, and
    min_precision_at_k, min_recall_at_k, min_mrr; min_groundedness (no file needed)."""
    if raw is None:
        return None
    settings = dict(raw)
    listed = settings.pop("file", None)
    lines = (eval_dir / listed).read_text().splitlines() if listed else []
    cases = []
    for line in (json.loads(line) for line in lines if line.strip()):
        relevant = tuple(str(i) for i in line["relevant"])
        if not relevant:
            raise ValueError(f"retrieval case {line['id']} labels no relevant passage")
        cases.append(RetrievalCase(str(line["id"]), str(line["query"]), relevant))
    known = {f.name for f in fields(RetrievalSpec)} - {"cases"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"[retrieval] has unknown settings: {', '.join(unknown)}")
    spec = RetrievalSpec(tuple(cases), **settings)
    if not 1 <= spec.k <= 50:
        raise ValueError(f"retrieval k must be 1 to 50, not {spec.k}")
    return spec


def _suite(eval_dir: Path, raw: dict[str, Any]) -> Suite:
    name = str(raw["name"])
    lines = (eval_dir / raw["file"]).read_text().splitlines()
    cases = tuple(_case(name, json.loads(line)) for line in lines if line.strip())
    return Suite(name, float(raw.get("min_pass_rate", 0.0)), cases)


def _case(suite: str, raw: dict[str, Any]) -> Case:
    unknown = [s for s in raw["scorers"] if s not in SCORERS]
    if unknown:
        raise ValueError(f"case {raw['id']}: unknown scorers {unknown}")
    expected = raw.get("expected", {})
    for name in raw["scorers"]:
        missing = [key for key in REQUIRED_KEYS[name] if key not in expected]
        if missing:
            raise ValueError(f"case {raw['id']}: scorer {name} needs expected {missing}")
    source = raw["input"]
    messages = source.get("messages")
    return Case(
        id=str(raw["id"]),
        suite=suite,
        prompt=source.get("prompt"),
        messages=tuple((m["role"], m["content"]) for m in messages) if messages else None,
        expected=dict(expected),
        scorers=tuple(raw["scorers"]),
        tags=tuple(raw.get("tags", [])),
        weight=float(raw.get("weight", 1.0)),
        retrieval=None if raw.get("retrieval") is None else bool(raw["retrieval"]),
    )
