"""A loaded model ready to serve: its engine, its scheduler, its chat formatter and the
release's serving config. The service keeps one current runtime and swaps it whole."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import PromptTooLong
from appliance.guard.policy import SafetyPolicy, load_policy
from appliance.retrieval.augment import Retriever
from appliance.serve.chat import ChatFormatter
from appliance.serve.config import SamplingParams, ServiceOptions, ServingConfig
from appliance.serve.engine import Engine, EngineConfig
from appliance.serve.policy import RoutingPolicy
from appliance.serve.probe import probe_model
from appliance.serve.scheduler import Generation, Scheduler
from appliance.store.records import Release
from appliance.store.releases import ReleaseStore


@dataclass
class ModelRuntime:
    model_id: str  # what /v1/models lists: the release NAME@VERSION, or dev:<file>
    manifest_sha256: str | None  # the signed content this runtime serves (None: a dev model)
    serving: ServingConfig
    engine: Engine
    scheduler: Scheduler
    chat: ChatFormatter
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)  # as the release signed it
    safety: SafetyPolicy = field(default_factory=SafetyPolicy)  # its policy.toml (none: off)
    retriever: Retriever | None = None  # its corpus, where its settings retrieve

    @classmethod
    def load(
        cls,
        model_id: str,
        manifest_sha256: str | None,
        model_path: Path,
        serving: ServingConfig,
        options: ServiceOptions,
        compute: concurrent.futures.Executor | None = None,
        safety: SafetyPolicy | None = None,
        corpus: tuple[Path, Path] | None = None,
    ) -> ModelRuntime:
        """Probe the model in a child process (ModelLoadError if llama.cpp dies on it), then
        load it here; its decode steps run on `compute` (see Scheduler). `corpus` is the
        verified release's directory and where its index lives (built there if missing)."""
        policy = serving.routing_policy()  # a release whose policy is unreadable serves nothing
        settings = serving.retrieval_settings()
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
        scheduler = Scheduler(engine, options.max_queue, compute)
        template = serving.chat_template or engine.chat_template()
        chat = ChatFormatter(engine, template)
        safety = safety or SafetyPolicy()
        retriever = None
        if corpus is not None:
            retriever = Retriever.open(
                *corpus,
                settings,
                lambda text: engine.tokenize(text, add_special=False),
                engine.piece,
            )
        return cls(
            model_id, manifest_sha256, serving, engine, scheduler, chat, policy, safety, retriever
        )

    @classmethod
    def from_release(
        cls,
        store: ReleaseStore,
        release: Release,
        options: ServiceOptions,
        compute: concurrent.futures.Executor | None = None,
    ) -> ModelRuntime:
        """Verify an installed release against the trust store, then load it."""
        store.verify_installed(release)  # ready only with a verified release
        path = Path(release.path)
        return cls.load(
            release.ref,
            release.manifest_sha256,
            path / "model.gguf",
            ServingConfig.from_release_dir(path),
            options,
            compute,
            load_policy(path),
            (path, store.paths.corpus_index(release.manifest_sha256)),
        )

    # -- preparing a generation: one path for the API, a shadow's copy and the eval runner --

    def prompt_tokens(
        self, messages: list[tuple[str, str]] | None = None, prompt: str | None = None
    ) -> list[int]:
        """Render chat messages with the release's template (only its markup may produce
        control tokens), or tokenize a plain prompt as text."""
        if messages is not None:
            return self.chat.tokens(messages)
        return self.engine.tokenize(prompt or "")

    def generation(
        self,
        tokens: list[int],
        sampling: SamplingParams,
        max_tokens: int,
        stop: tuple[str, ...] = (),
        ignore_eos: bool = False,
        deadline: float = float("inf"),
        scores_confidence: bool = False,
    ) -> Generation:
        """A request for this model: refused when the prompt fills the context, its
        max_tokens capped by the release's serving config and the room left."""
        room = self.engine.context_per_slot - len(tokens)
        if room < 1:
            raise PromptTooLong(len(tokens), self.engine.context_per_slot)
        capped = min(max_tokens, self.serving.max_tokens, room)
        return Generation(
            tokens,
            sampling,
            capped,
            stop,
            ignore_eos,
            deadline,
            scores_confidence=scores_confidence,
        )

    def close(self) -> None:
        """Let in-flight requests finish, then free the model."""
        self.scheduler.stop()
        self.engine.close()
        if self.retriever is not None:
            self.retriever.close()
