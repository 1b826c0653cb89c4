"""A loaded model ready to serve: its engine, its scheduler, its chat formatter and the
release's serving config. The service keeps one current runtime and swaps it whole."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.serve.chat import ChatFormatter
from appliance.serve.config import ServiceOptions, ServingConfig
from appliance.serve.engine import Engine, EngineConfig
from appliance.serve.probe import probe_model
from appliance.serve.scheduler import Scheduler


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
