"""The inference service's state: which models serve, API keys, telemetry, hot swap,
rollouts.

A watcher thread polls the state database. When the active release changes it loads the
new release beside the old one (verifying its files, then probing the model in a child
process, before this process loads it), points new requests at it, and lets the old one
finish its in-flight requests before freeing it. A release that fails any of that is
logged and skipped: the old one keeps serving, and a service with nothing to serve stays
up, not ready, with the reason in /readyz.

During a rollout (appliance.store.rollouts) the candidate is loaded the same way beside the
stable (active) release. A canary gets its sticky share of requests and is judged each
interval (appliance.serve.rollout.judge); the watcher then advances, promotes or aborts it
through the store, so every decision is audited. A shadow gets copies of stable's requests
when both have nothing queued. A promoted candidate becomes stable without a reload; an
aborted one stops getting requests at once and is freed once its own finish.

The watcher also follows the routing state (appliance.store.routing): the registered
cold-path targets (each a ColdPath with its circuit breaker, and the only addresses the
egress guard lets out) and the fallback switch that sends requests to them.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlite_utils import Database

from appliance.errors import ApplianceError, UsageError
from appliance.evals.spec import Online, load_spec
from appliance.paths import AppliancePaths
from appliance.serve.coldpath import AnyColdPath
from appliance.serve.config import ServiceOptions, ServingConfig
from appliance.serve.egress import Admitted
from appliance.serve.localpath import open_cold_path
from appliance.serve.metrics import ServiceMetrics
from appliance.serve.policy import RoutingPolicy
from appliance.serve.rollout import CANARY, SHADOW, STABLE, Route, bucket, judge, unix_time
from appliance.serve.runtime import ModelRuntime
from appliance.store.apikeys import active_key_hashes, token_matches
from appliance.store.db import open_state_db
from appliance.store.records import Release
from appliance.store.releases import ReleaseStore
from appliance.store.rollouts import (
    Rollout,
    abort_rollout,
    advance_rollout,
    record_check,
    running_rollout,
)
from appliance.store.routing import RoutingState, Target, routing_state, targets
from appliance.telemetry.writer import TelemetryWriter

log = logging.getLogger("appliance.serve")
KEY_RECHECK_SECONDS = 0.25


class Service:
    def __init__(
        self,
        paths: AppliancePaths,
        options: ServiceOptions,
        dev_model: Path | None = None,
        egress: Admitted | None = None,
    ) -> None:
        self.paths, self.options, self.dev_model = paths, options, dev_model
        self.egress = egress or Admitted()  # what the egress guard lets out: the cold paths
        self.store = ReleaseStore(paths)
        self._runtime: ModelRuntime | None = None
        self._candidate: ModelRuntime | None = None  # a rollout's, loaded beside stable
        self._rollout: Rollout | None = None  # the running rollout, once its candidate loaded
        self.online = Online()  # the candidate's online checks, run on every response
        self.mirrored = itertools.count()  # mirrored copies so far (every few replay on stable)
        self._held_because: str | None = None  # why the canary could not advance, once said
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failed_manifest: str | None = None  # the active release that failed to load
        self.load_failure: str | None = None  # why it failed, for /readyz and the log
        self.api_key_hashes: tuple[str, ...] = ()
        self.routing = RoutingState(False, None, None, None)  # the store's switches
        self._cold: list[AnyColdPath] = []  # the cold paths, in fallback order
        self._routed_targets: list[Target] | None = None  # what _cold was opened from
        # The last policy() answer, for as long as its runtime and routing state hold.
        self._policy_memo: tuple[ModelRuntime, RoutingState, RoutingPolicy] | None = None
        self._keys_read_at = 0.0  # time.monotonic() of the last read prompted by a key
        self.metrics = ServiceMetrics(self._queue_depth, self._busy_slots)
        self.telemetry = TelemetryWriter(
            lambda: open_state_db(paths.state_db), options.telemetry_retention_days * 86400
        )
        self._watcher = threading.Thread(target=self._watch, name="release-watcher", daemon=True)
        # Every model this process serves (stable, a rollout's candidate, a hot swap's
        # successor) decodes on this one thread. llama.cpp computes with an OpenMP thread
        # team per calling thread; once two teams exist, libgomp has more threads than
        # cores and stops spinning at ggml's barriers, so each step sleeps and wakes at
        # every barrier: an idle shadow beside stable made stable's steps ~30% slower.
        # One thread also makes two models take turns instead of fighting for the cores.
        self.compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compute")

    # -- what the API uses --------------------------------------------------------------

    def accepts_key(self, token: str) -> bool:
        """Is `token` an active API key? An unknown one prompts a fresh read of the keys (at
        most every KEY_RECHECK_SECONDS), so a key works the moment it is created instead of
        after the next poll. Revocation takes effect at the next poll."""
        if token_matches(token, self.api_key_hashes):
            return True
        with self._lock:
            now = time.monotonic()
            if now - self._keys_read_at < KEY_RECHECK_SECONDS:
                return False
            self._keys_read_at = now
        db = open_state_db(self.paths.state_db)
        try:
            hashes = active_key_hashes(db)
        finally:
            db.close()
        self.api_key_hashes = hashes
        # judge by this read: the watcher may store an older one meanwhile
        return token_matches(token, hashes)

    def runtime(self) -> ModelRuntime | None:
        return self._runtime

    def candidate(self) -> tuple[ModelRuntime, Rollout] | None:
        """The running rollout's candidate, once loaded."""
        candidate, rollout = self._candidate, self._rollout
        return (candidate, rollout) if candidate is not None and rollout is not None else None

    def route(self, sticky: str, requested_model: str | None = None) -> Route | None:
        """Which runtime answers: a client that names a served model gets it; otherwise a
        canary takes its sticky share and a shadow gets a mirror of stable's requests."""
        stable, rollout = self._runtime, self.candidate()
        if stable is None:
            return None
        if rollout is None:
            return Route(stable, STABLE)
        candidate, plan = rollout
        if plan.mode == CANARY:
            if requested_model == candidate.model_id:
                return Route(candidate, CANARY)
            if requested_model != stable.model_id and bucket(plan.id, sticky) < plan.percent:
                return Route(candidate, CANARY)
            return Route(stable, STABLE)
        mirrored = bucket(plan.id, sticky) < plan.percent
        return Route(stable, STABLE, mirror=candidate if mirrored else None)

    def start(self) -> None:
        if self.dev_model is not None:
            model_id = f"dev:{self.dev_model.name}"
            self._load_and_swap(
                model_id,
                None,
                lambda: ModelRuntime.load(
                    model_id, None, self.dev_model, ServingConfig(), self.options, self.compute
                ),
            )
        db = open_state_db(self.paths.state_db)
        try:
            self._poll(db)
        finally:
            db.close()
        self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._watcher.is_alive():
            self._watcher.join()
        for runtime in (self._candidate, self._runtime):
            if runtime is not None:
                runtime.close()
        for cold in self._cold:
            cold.close()
        self.compute.shutdown()
        self.telemetry.close()

    # -- watching the store ----------------------------------------------------------

    def _watch(self) -> None:
        db = open_state_db(self.paths.state_db)
        while not self._stop.wait(self.options.poll_seconds):
            try:
                self._poll(db)
            except Exception:  # a locked DB must not kill the watcher
                log.exception("polling the state database failed")
        db.close()

    def _poll(self, db: Database) -> None:
        self.api_key_hashes = active_key_hashes(db)
        self._follow_routing(db)
        if self.dev_model is not None:
            return
        self._follow_active(db)
        self._follow_rollout(db)

    def policy(self, runtime: ModelRuntime) -> RoutingPolicy:
        """`runtime`'s signed routing policy with the admin's overrides (`route policy set`
        checks them; a hand-edited one that does not apply is ignored, and said)."""
        routing, memo = self.routing, self._policy_memo
        if memo is not None and memo[0] is runtime and memo[1] is routing:
            return memo[2]  # the same runtime and the same poll's state: judged already
        try:
            policy = runtime.policy.with_overrides(routing.policy)
        except UsageError as exc:
            log.warning("routing policy overrides ignored: %s", exc.message)
            policy = runtime.policy
        self._policy_memo = (runtime, routing, policy)
        return policy

    def cold_paths(self) -> list[AnyColdPath]:
        """The registered cold-path targets, in fallback order (their breakers kept)."""
        return self._cold

    def _follow_routing(self, db: Database) -> None:
        self.routing = routing_state(db)
        registered = targets(db)
        if registered == self._routed_targets:
            return
        self._routed_targets = registered
        kept = {cold.target: cold for cold in self._cold}
        self.egress.set({t.address for t in registered if t.address})
        opened = [kept.pop(t, None) or self._open_cold_path(db, t) for t in registered]
        self._cold = [cold for cold in opened if cold is not None]
        for unregistered in kept.values():
            unregistered.close()
        log.info("cold-path targets: %s", [c.target.name for c in self._cold] or "none")

    def _open_cold_path(self, db: Database, target: Target) -> AnyColdPath | None:
        """None, and said in the log, when a release target cannot be verified or loaded:
        retried when the targets change."""
        try:
            return open_cold_path(
                target, self.store, db, self.options, self.compute,
                self.options.request_timeout_seconds,
            )  # fmt: skip
        except Exception as exc:
            log.error("cold path %s cannot serve: %s", target.name, exc)
            return None

    def _follow_active(self, db: Database) -> None:
        active = self.store.release_by_id(db, self.store.state(db).active_id)
        current = self._runtime.manifest_sha256 if self._runtime else None
        if active is None or active.manifest_sha256 == self._failed_manifest:
            return
        if active.manifest_sha256 == current:  # e.g. rolled back to what still serves
            self._failed_manifest = self.load_failure = None
            return
        candidate = self._candidate
        if candidate is not None and candidate.manifest_sha256 == active.manifest_sha256:
            self._candidate, self._rollout = None, None  # promoted: it is loaded already
            candidate.scheduler.yields_to = None  # a promoted shadow yields to no one
            self._swap(candidate)
            return
        self._load_and_swap(active.ref, active.manifest_sha256, lambda: self._load(active))

    def _follow_rollout(self, db: Database) -> None:
        rollout = running_rollout(db)
        if rollout is None or rollout.manifest_sha256 != (
            self._candidate.manifest_sha256 if self._candidate else None
        ):
            self._retire_candidate()
        if rollout is None:
            return
        if self._candidate is None:
            self._load_candidate(db, rollout)
            return
        self._rollout = rollout
        if time.time() - unix_time(rollout.step_started) >= rollout.interval_seconds:
            self._judge(db, rollout)

    def _load_candidate(self, db: Database, rollout: Rollout) -> None:
        """Load the rollout's candidate beside stable; if it cannot load, abort the rollout
        (audited) and keep serving stable alone."""
        try:
            release = self.store.release_by_id(db, rollout.release_id)
            if release is None:
                raise ApplianceError(f"{rollout.candidate} is no longer installed")
            runtime = self._load(release)
            self.online = load_spec(Path(release.path)).online
        except Exception as exc:
            log.error("rollout candidate %s failed to load: %s", rollout.candidate, exc)
            self._abort(rollout, f"the candidate failed to load: {exc}", None)
            return
        if rollout.mode == SHADOW:  # mirrored work runs only while stable is idle
            runtime.scheduler.yields_to = self._stable_busy
        self._candidate, self._rollout = runtime, rollout
        log.info("%s of %s at %g%%", rollout.mode, rollout.candidate, rollout.percent)

    def _judge(self, db: Database, rollout: Rollout) -> None:
        look = judge(db, rollout, self.online, time.time())
        record_check(db, rollout.id, look)
        if look["decision"] == "abort":
            self._rollout = None  # no more canary traffic from this moment
            self._abort(rollout, f"the canary regressed: {look['why']}", look)
        elif look["decision"] == "proceed":
            try:
                advanced = advance_rollout(self.store, rollout.id, look)
            except ApplianceError as exc:  # frozen, or an admin operation holds the lock
                if str(exc) != self._held_because:  # said once, not at every poll
                    log.warning("rollout of %s not advanced: %s", rollout.candidate, exc)
                self._held_because = str(exc)
                return
            self._held_because = None
            log.info("rollout of %s: %s", rollout.candidate, advanced.state)
            self._rollout = advanced if advanced.state == "running" else None

    def _abort(self, rollout: Rollout, reason: str, evidence: dict | None) -> None:
        try:
            abort_rollout(self.store, reason, evidence, rollout_id=rollout.id)
            log.warning("rollout of %s aborted: %s", rollout.candidate, reason)
        except ApplianceError as exc:  # tried again at the next poll
            log.error("could not abort the rollout of %s yet: %s", rollout.candidate, exc)

    def _stable_busy(self) -> bool:
        stable = self._runtime
        return stable is not None and bool(
            stable.scheduler.stats.busy_slots or stable.scheduler.stats.queued
        )

    def _retire_candidate(self) -> None:
        candidate, self._candidate, self._rollout = self._candidate, None, None
        self.online = Online()
        if candidate is not None:
            log.info("unloading rollout candidate %s", candidate.model_id)
            threading.Thread(target=candidate.close, name="unload", daemon=True).start()

    def _load_and_swap(
        self, model_id: str, manifest: str | None, load: Callable[[], ModelRuntime]
    ) -> None:
        """Load a runtime and serve it; on any failure keep what serves and say why."""
        try:
            runtime = load()
        except Exception as exc:
            self._failed_manifest = manifest
            self.load_failure = f"{model_id} failed to load: {exc}"
            log.error(
                "release %s failed to load; still serving %s: %s",
                model_id,
                self._runtime.model_id if self._runtime else "nothing",
                exc,
            )
            return
        self._failed_manifest, self.load_failure = None, None
        self._swap(runtime)

    def _load(self, release: Release) -> ModelRuntime:
        return ModelRuntime.from_release(self.store, release, self.options, self.compute)

    def _swap(self, runtime: ModelRuntime) -> None:
        with self._lock:
            old, self._runtime = self._runtime, runtime
        self.metrics.set_release(runtime.model_id)
        log.info("serving %s", runtime.model_id)
        if old is not None:  # drain and free the old model off the request path
            threading.Thread(target=old.close, name="unload", daemon=True).start()

    def _queue_depth(self) -> float:
        runtime = self._runtime
        return runtime.scheduler.stats.queued if runtime else 0

    def _busy_slots(self) -> float:
        runtime = self._runtime
        return runtime.scheduler.stats.busy_slots if runtime else 0
