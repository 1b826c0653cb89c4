"""Prometheus metrics for one service instance (its own registry, no module globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from appliance.guard.policy import Applied

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
RETRIEVAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class ServiceMetrics:
    def __init__(self, queue_depth: Callable[[], float], busy_slots: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_cpu_seconds_total and memory: `eval run --url` prices a run from it
        ProcessCollector(registry=r)
        self.requests = Counter(
            "appliance_requests",
            "Requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.by_release = Counter(
            "appliance_release_requests",
            "Requests by release, role (stable, canary, shadow) and HTTP status",
            ["release", "role", "status"],
            registry=r,
        )
        self.check_failures = Counter(
            "appliance_online_check_failures",
            "Responses that failed an online check, by release and role",
            ["release", "role"],
            registry=r,
        )
        self.shadow_dropped = Counter(
            "appliance_shadow_dropped",
            "Mirrored requests dropped because stable or the shadow had work waiting",
            registry=r,
        )
        self.route_requests = Counter(
            "appliance_route_requests",
            "Client requests by the path that answered (hot, cold:NAME), escalation reason "
            "(none, or why it went to a cold path; with route hot, the cold path failed) "
            "and HTTP status",
            ["route", "escalation", "status"],
            registry=r,
        )
        self.cold_tokens = Counter(
            "appliance_cold_tokens",
            "Tokens a cold path was paid for (prompt and completion), by route: times its "
            "price per 1k tokens (route status) is what the route cost",
            ["route"],
            registry=r,
        )
        self.route_latency = Histogram(
            "appliance_route_latency_seconds",
            "Latency of answered client requests by the path that answered",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.guard_findings = Counter(
            "appliance_guard_findings",
            "Findings of the release's safety policy by direction (input, output), detector "
            "and the action taken (deny, redact, mask, stop)",
            ["direction", "detector", "action"],
            registry=r,
        )
        self.retrievals = Counter(
            "appliance_retrievals",
            "Retrievals from the release's corpus by endpoint, and whether any passage matched",
            ["endpoint", "matched"],
            registry=r,
        )
        self.retrieval_seconds = Histogram(
            "appliance_retrieval_seconds",
            "Time to search the corpus and fit the passages to the token budget",
            buckets=RETRIEVAL_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("appliance_prompt_tokens", "Prompt tokens", registry=r)
        self.completion_tokens = Counter(
            "appliance_completion_tokens", "Completion tokens", registry=r
        )
        self.ttft = Histogram(
            "appliance_time_to_first_token_seconds",
            "Time to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "appliance_request_latency_seconds",
            "Request latency",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        Gauge("appliance_queue_depth", "Requests waiting for a slot", registry=r).set_function(
            queue_depth
        )
        Gauge("appliance_busy_slots", "Slots generating or prefilling", registry=r).set_function(
            busy_slots
        )
        self.active_release = Gauge(
            "appliance_active_release", "1 for the release serving", ["release"], registry=r
        )
        self.max_batch = Gauge(
            "appliance_max_sequences_per_step",
            "Most sequences decoded in one llama_decode call",
            registry=r,
        )

    def count_route(
        self, path: str, escalation: str | None, status: int, seconds: float, cold_tokens: int
    ) -> None:
        """A client's request by the path that answered it and why it escalated."""
        if cold_tokens:
            self.cold_tokens.labels(route=path).inc(cold_tokens)
        self.route_requests.labels(
            route=path, escalation=escalation or "none", status=str(status)
        ).inc()
        if status == 200:
            self.route_latency.labels(route=path).observe(seconds)

    def count_guard(self, applied: Iterable[Applied]) -> None:
        """What the safety policy found and did, by direction, detector and action."""
        for a in applied:
            labels = {"direction": a.direction, "detector": a.detector, "action": a.action}
            self.guard_findings.labels(**labels).inc(a.count)

    def count_retrieval(self, endpoint: str, passages: int, seconds: float) -> None:
        self.retrievals.labels(endpoint=endpoint, matched=str(passages > 0).lower()).inc()
        self.retrieval_seconds.observe(seconds)

    def set_release(self, release: str) -> None:
        self.active_release.clear()
        self.active_release.labels(release=release).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
