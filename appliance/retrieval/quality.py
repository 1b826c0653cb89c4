"""How well retrieval finds the passages a case labels relevant, apart from generation:
precision@k, recall@k and the mean reciprocal rank (MRR) over the spec's retrieval cases."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from appliance.retrieval.index import Index


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
