"""The inference service's state: which model serves, API keys, telemetry, hot swap.

A watcher thread polls the state database. When the active release changes it loads the
new release beside the old one (verifying its files first), points new requests at it,
and lets the old one finish its in-flight requests before freeing it. A release that
fails to load is logged and skipped; the old one keeps serving.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from sqlite_utils import Database

from appliance.paths import AppliancePaths
from appliance.serve.metrics import ServiceMetrics
from appliance.serve.runtime import ModelRuntime, ServiceOptions, ServingConfig
from appliance.store.apikeys import active_key_hashes
from appliance.store.db import open_state_db
from appliance.store.releases import Release, ReleaseStore
from appliance.telemetry.writer import TelemetryWriter

log = logging.getLogger("appliance.serve")


class Service:
    def __init__(
        self, paths: AppliancePaths, options: ServiceOptions, dev_model: Path | None = None
    ) -> None:
        self.paths, self.options, self.dev_model = paths, options, dev_model
        self.store = ReleaseStore(paths)
        self._runtime: ModelRuntime | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failed_release_id: int | None = None
        self.api_key_hashes: tuple[str, ...] = ()
        self.metrics = ServiceMetrics(self._queue_depth, self._busy_slots)
        self.telemetry = TelemetryWriter(
            lambda: open_state_db(paths.state_db), options.telemetry_retention_days * 86400
        )
        self._watcher = threading.Thread(target=self._watch, name="release-watcher", daemon=True)

    # -- what the API uses --------------------------------------------------------------

    def runtime(self) -> ModelRuntime | None:
        return self._runtime

    def start(self) -> None:
        if self.dev_model is not None:
            self._swap(
                ModelRuntime.load(
                    f"dev:{self.dev_model.name}",
                    None,
                    self.dev_model,
                    ServingConfig(),
                    self.options,
                )
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
        if self._runtime is not None:
            self._runtime.close()
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
        if self.dev_model is not None:
            return
        active = self.store.release_by_id(db, self.store.state(db).active_id)
        current = self._runtime.release_id if self._runtime else None
        if active is None or active.id in (current, self._failed_release_id):
            return
        try:
            runtime = self._load_release(active)
        except Exception as exc:
            self._failed_release_id = active.id
            log.error(
                "release %s failed to load; still serving %s: %s",
                active.ref,
                self._runtime.model_id if self._runtime else "nothing",
                exc,
            )
            return
        self._failed_release_id = None
        self._swap(runtime)

    def _load_release(self, release: Release) -> ModelRuntime:
        self.store.verify_installed(release)  # ready only with a verified release
        path = Path(release.path)
        return ModelRuntime.load(
            release.ref,
            release.id,
            path / "model.gguf",
            ServingConfig.from_release_dir(path),
            self.options,
        )

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
