"""What a node says about itself over HTTP: /readyz and /metrics (both need no key).

The controller never logs in to a node for this; it reads what HAProxy's health check
reads, plus the counters Prometheus would scrape.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from appliance.errors import CanaryFailed, CanaryInconclusive, NodeNotSettled, UsageError

TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Counts:
    """The node's request counters, summed over endpoints."""

    requests: float
    server_errors: float  # 5xx answers
    busy_slots: float
    queue_depth: float


@dataclass(frozen=True)
class NodeView:
    url: str
    ready: bool
    release: str | None
    reason: str | None  # why not ready, or a release that failed to load
    rollout: dict[str, Any] | None
    counts: Counts | None  # None when /metrics did not answer

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["counts"] = self.counts.__dict__ if self.counts else None
        return out


def node_url(url: str) -> str:
    """A node's base URL: http(s) to an IP address, never a host name (a lookup is a packet
    out, as for a cold-path target)."""
    try:
        parsed = httpx.URL(url)
        ipaddress.ip_address(parsed.host)
    except (httpx.InvalidURL, ValueError) as exc:
        raise UsageError(f"a node is addressed as http://IP:PORT, not {url!r}") from exc
    if parsed.scheme not in ("http", "https") or parsed.path not in ("", "/"):
        raise UsageError(f"a node is addressed as http://IP:PORT, not {url!r}")
    return url.rstrip("/")


def read_node(url: str) -> NodeView:
    """The node's readiness and figures; an unreachable node is not ready, with the reason."""
    url = node_url(url)
    with httpx.Client(base_url=url, timeout=TIMEOUT_SECONDS) as client:
        try:
            ready = client.get("/readyz")
            body = ready.json()
        except (httpx.HTTPError, ValueError) as exc:
            return NodeView(url, False, None, f"/readyz: {exc}", None, None)
        try:
            counts = parse_counts(client.get("/metrics").text)
        except httpx.HTTPError:
            counts = None
    return NodeView(
        url,
        ready.status_code == 200,
        body.get("release"),
        body.get("reason") or body.get("failed_to_load"),
        body.get("rollout"),
        counts,
    )


def parse_counts(metrics: str) -> Counts:
    requests = errors = busy = queue = 0.0
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "appliance_requests_total":
                requests += sample.value
                if sample.labels.get("status", "").startswith("5"):
                    errors += sample.value
            elif sample.name == "appliance_busy_slots":
                busy += sample.value
            elif sample.name == "appliance_queue_depth":
                queue += sample.value
    return Counts(requests, errors, busy, queue)


def wait_ready(url: str, release: str, seconds: float) -> NodeView:
    """Wait until the node is ready and serves `release` (NAME@VERSION)."""
    deadline = time.monotonic() + seconds
    while True:
        view = read_node(url)
        if view.ready and view.release == release:
            return view
        if time.monotonic() >= deadline:
            now = f"serves {view.release}" if view.ready else f"is not ready ({view.reason})"
            raise NodeNotSettled(f"{url} {now} after {seconds:g} s, not {release}")
        time.sleep(0.5)


@dataclass(frozen=True)
class Watch:
    requests: int
    server_errors: int
    error_rate: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def watch_canary(url: str, seconds: float, max_error_rate: float, min_requests: int) -> Watch:
    """Watch a canary node for `seconds`: it must stay ready, answer at least `min_requests`
    requests, and fail (5xx) no more than `max_error_rate` of them."""
    before = after = _counts_of_ready(url)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:  # readiness checked every second
        time.sleep(min(1.0, left))
        after = _counts_of_ready(url)
    requests = int(after.requests - before.requests)
    errors = int(after.server_errors - before.server_errors)
    watch = Watch(requests, errors, errors / requests if requests else 0.0)
    if requests and watch.error_rate > max_error_rate:
        raise CanaryFailed(
            f"{url} failed {errors} of {requests} requests during the canary watch "
            f"({watch.error_rate:.1%} > {max_error_rate:.1%})"
        )
    if requests < min_requests:
        raise CanaryInconclusive(
            f"{url} answered {requests} requests in {seconds:g} s; the canary needs "
            f"{min_requests} to judge"
        )
    return watch


def _counts_of_ready(url: str) -> Counts:
    view = read_node(url)
    if not view.ready or view.counts is None:
        raise CanaryFailed(f"{url} lost readiness during the canary watch: {view.reason}")
    return view.counts
