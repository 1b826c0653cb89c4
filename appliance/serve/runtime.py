"""A loaded model ready to serve: its engine, its scheduler, its chat formatter and the
release's serving config. The service keeps one current runtime and swaps it whole."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.serve.chat import ChatFormatter
from appliance.serve.engine import Engine, EngineConfig, SamplingParams
from appliance.serve.probe import probe_model
from appliance.serve.scheduler import Scheduler

# Every generation response names the signed content that produced it, so a client (the
# eval runner over --url) can tell exactly which release answered.
MANIFEST_HEADER = "x-appliance-manifest-sha256"


@dataclass(frozen=True)
class ServiceOptions:
    slots: int = 8
    max_queue: int = 64
    request_timeout_seconds: float = 300.0
    max_body_bytes: int = 1 << 20
    require_api_key: bool = True
    serve_openapi: bool = False  # /openapi.json (API key required), for fuzzing the API
    poll_seconds: float = 1.0
    telemetry_retention_days: float = 7.0


@dataclass(frozen=True)
class ServingConfig:
    """The release's serving.json (or defaults for a development model)."""

    context_size: int = 2048
    threads: int = 0
    gpu_layers: int = 0
    max_tokens: int = 512
    sampling: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None

    @classmethod
    def from_release_dir(cls, path: Path) -> ServingConfig:
        raw = json.loads((path / "serving.json").read_text())
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)

    def default_sampling(self) -> SamplingParams:
        fields = SamplingParams.__dataclass_fields__
        return SamplingParams(**{k: v for k, v in self.sampling.items() if k in fields})


def probe_release(release_dir: Path) -> None:
    """Load a (staged or installed) release's model once in a child process, with its own
    serving config; raise ModelLoadError if llama.cpp dies on it."""
    serving = ServingConfig.from_release_dir(release_dir)
    probe_model(
        release_dir / "model.gguf", serving.context_size, serving.threads, serving.gpu_layers
    )


@dataclass
class ModelRuntime:
    model_id: str  # what /v1/models lists: the release NAME@VERSION, or dev:<file>
    manifest_sha256: str | None  # the signed content this runtime serves (None: a dev model)
    serving: ServingConfig
    engine: Engine
    scheduler: Scheduler
    chat: ChatFormatter

    @classmethod
    def load(
        cls,
        model_id: str,
        manifest_sha256: str | None,
        model_path: Path,
        serving: ServingConfig,
        options: ServiceOptions,
    ) -> ModelRuntime:
        """Probe the model in a child process (ModelLoadError if llama.cpp dies on it), then
        load it here."""
        probe_model(model_path, serving.context_size, serving.threads, serving.gpu_layers)
        engine = Engine(
            EngineConfig(
                model_path=model_path,
                slots=options.slots,
                context_per_slot=serving.context_size,
                threads=serving.threads,
                gpu_layers=serving.gpu_layers,
            )
        )
        scheduler = Scheduler(engine, options.max_queue)
        template = serving.chat_template or engine.chat_template()
        return cls(
            model_id, manifest_sha256, serving, engine, scheduler, ChatFormatter(engine, template)
        )

    def close(self) -> None:
        """Let in-flight requests finish, then free the model."""
        self.scheduler.stop()
        self.engine.close()
