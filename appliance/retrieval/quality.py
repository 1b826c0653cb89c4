"""How well retrieval finds the passages a case labels relevant, apart from generation:
precision@k, recall@k and the mean reciprocal rank (MRR) over the spec's retrieval cases."""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from appliance.retrieval.index import STOPWORDS, Index

_WORD = re.compile(r"\w{3,}")


@dataclass(frozen=True)
class RetrievalCase:
    id: str
    query: str
    relevant: tuple[str, ...]  # passage ids


def judge_retrieval(index: Index, cases: list[RetrievalCase], k: int) -> dict:
    """Each case's top k against its labelled passages, and the means over the cases."""
    per_case, latencies = [], []
    for case in cases:
        found = index.search(case.query, k)
        latencies.append(found.seconds * 1000)
        relevant = set(case.relevant)
        hits = [i for i in found.ids if i in relevant]
        first = next((rank for rank, i in enumerate(found.ids, 1) if i in relevant), None)
        per_case.append(
            {
                "id": case.id,
                "retrieved": found.ids,
                "relevant": list(case.relevant),
                "precision": len(hits) / k,
                "recall": len(hits) / len(relevant),
                "reciprocal_rank": 1 / first if first else 0.0,
            }
        )

    def mean(key: str) -> float:
        return statistics.fmean(c[key] for c in per_case) if per_case else 0.0

    return {
        "k": k,
        "cases": len(per_case),
        "precision_at_k": mean("precision"),
        "recall_at_k": mean("recall"),
        "mrr": mean("reciprocal_rank"),
        "latency_ms": {
            "p50": statistics.median(latencies) if latencies else None,
            "max": max(latencies) if latencies else None,
        },
        "per_case": per_case,
    }


def content_words(text: str) -> set[str]:
    """The words that carry meaning: three letters or more, no stopword, lowercased."""
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def groundedness(answer: str, passages: Iterable[str]) -> float | None:
    """The share of the answer's content words that the passages hold: 1.0 when it says
    only what they say, 0.0 when it ignores them; None for an answer with no such word."""
    said = content_words(answer)
    if not said:
        return None
    source = content_words(" ".join(passages))
    return len(said & source) / len(said)


def judge_groundedness(
    answers: Iterable[tuple[str, str, list[str]]],
    passages: dict[str, str],
    minimum: float | None,
) -> dict[str, Any] | None:
    """Groundedness over the cases that retrieved: (case id, answer, passage ids) each; the
    passages' texts by id. None when no case retrieved a passage."""
    per_case = []
    for case_id, answer, ids in answers:
        if not ids:  # nothing matched: nothing to be grounded in (counted apart)
            per_case.append({"id": case_id, "retrieved": [], "groundedness": None})
            continue
        score = groundedness(answer, [passages.get(i, "") for i in ids])
        per_case.append({"id": case_id, "retrieved": ids, "groundedness": score})
    scored = [c["groundedness"] for c in per_case if c["groundedness"] is not None]
    if not scored:
        return None
    return {
        "cases": len(scored),
        "without_passages": sum(1 for c in per_case if not c["retrieved"]),
        "groundedness": statistics.fmean(scored),
        "minimum": minimum,
        "per_case": per_case,
    }
