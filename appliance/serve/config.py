"""The service's settings and a release's serving config: plain data, no llama.cpp, so the
CLI and the load probe can read them without loading the engine."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.retrieval.augment import RetrievalSettings
from appliance.serve.policy import RoutingPolicy

# Every generation response names the signed content that produced it, so a client (the
# eval runner over --url) can tell exactly which release answered.
MANIFEST_HEADER = "x-appliance-manifest-sha256"
# Which path answered ("hot", or "cold:NAME"), and why a request went to a cold path.
ROUTE_HEADER, ESCALATION_HEADER = "x-appliance-route", "x-appliance-escalation"


@dataclass(frozen=True)
class ServiceOptions:
    """How the service runs. Its defaults are the only serving defaults: `appliance serve`,
    the demo and the console read them from here."""

    host: str = "127.0.0.1"  # loopback unless the operator says otherwise
    port: int = 8080
    slots: int = 8
    max_queue: int = 64
    request_timeout_seconds: float = 300.0
    read_timeout_seconds: float = 20.0  # a whole request, from its first byte
    idle_timeout_seconds: float = 15.0  # an open connection with no request under way
    max_body_bytes: int = 1 << 20
    require_api_key: bool = True
    serve_openapi: bool = False  # /openapi.json (API key required), for fuzzing the API
    poll_seconds: float = 1.0
    telemetry_retention_days: float = 7.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int = -1


@dataclass(frozen=True)
class ServingConfig:
    """The release's serving.json (or defaults for a development model)."""

    context_size: int = 2048
    threads: int = 0
    gpu_layers: int = 0
    max_tokens: int = 512
    sampling: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    routing: dict[str, Any] = field(default_factory=dict)  # the signed routing policy
    retrieval: dict[str, Any] = field(default_factory=dict)  # RetrievalSettings (none: off)

    @classmethod
    def from_release_dir(cls, path: Path) -> ServingConfig:
        raw = json.loads((path / "serving.json").read_text())
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)

    def routing_policy(self) -> RoutingPolicy:
        return RoutingPolicy.from_dict(self.routing, "serving.json [routing]")

    def retrieval_settings(self) -> RetrievalSettings:
        return RetrievalSettings.from_dict(self.retrieval, "serving.json [retrieval]")

    def default_sampling(self) -> SamplingParams:
        fields = SamplingParams.__dataclass_fields__
        return SamplingParams(**{k: v for k, v in self.sampling.items() if k in fields})
