"""A background writer: the request path only appends to an in-memory queue."""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from sqlite_utils import Database

log = logging.getLogger("appliance.telemetry")

FLUSH_SECONDS = 0.5
PRUNE_SECONDS = 60.0


@dataclass(frozen=True)
class RequestRecord:
    time: float
    release: str
    endpoint: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_seconds: float | None = None
    ttft_seconds: float | None = None
    latency_seconds: float = 0.0
    error_class: str | None = None
    role: str = "stable"  # stable | canary | shadow
    checks_run: int = 0  # online checks run on the output (a rollout's candidate spec)
    checks_failed: int = 0
    agreement: float | None = None  # shadow: similarity of its answer to stable's (0..1)
    stable_checks_failed: int | None = None  # shadow: online checks stable's answer failed
    route: str = "hot"  # who answered: "hot" (the release) or "cold:NAME"
    escalation: str | None = None  # why it was sent to a cold path (route "hot": it failed)
    cold_tokens: int = 0  # tokens the cold path was paid for
    # what the safety policy did: JSON [{direction, detector, action, count}], never the text
    guard: str | None = None


@dataclass(frozen=True)
class RetrievalRecord:
    time: float
    release: str
    role: str
    endpoint: str
    query: str  # redacted of PII and secret shapes (guard.detectors.scrubbed)
    k: int
    ids: str  # JSON list
    scores: str  # JSON list
    seconds: float
    corpus_sha256: str


Record = RequestRecord | RetrievalRecord
TABLES = {RequestRecord: "requests", RetrievalRecord: "retrievals"}


class TelemetryWriter:
    """Batches records into the state DB from its own thread; keeps `retention_seconds`."""

    def __init__(
        self, open_db: Callable[[], Database], retention_seconds: float, max_pending: int = 100_000
    ) -> None:
        self._open_db = open_db
        self._retention = retention_seconds
        self._pending: queue.Queue[Record] = queue.Queue(max_pending)
        self._stop = threading.Event()
        self.dropped = 0
        self.failure: str | None = None  # why the writer thread died, if it did
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def record(self, record: Record) -> None:
        try:
            self._pending.put_nowait(record)
        except queue.Full:  # never block or fail a request for telemetry's sake
            self.dropped += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # said in /readyz and the log, not lost
            self.failure = f"the telemetry thread died: {type(exc).__name__}: {exc}"
            log.critical("%s", self.failure)

    def _loop(self) -> None:
        db = self._open_db()
        last_prune = 0.0
        while not self._stop.is_set():
            self._stop.wait(FLUSH_SECONDS)
            try:
                self._flush(db)
                if time.monotonic() - last_prune > PRUNE_SECONDS:
                    for table in TABLES.values():
                        db.execute(
                            f"DELETE FROM {table} WHERE time < ?", [time.time() - self._retention]
                        )
                    db.conn.commit()
                    last_prune = time.monotonic()
            except sqlite3.OperationalError as exc:  # a locked database: try again next tick
                log.warning("telemetry not written yet: %s", exc)
        self._flush(db)
        db.close()

    def _flush(self, db: Database) -> None:
        batches: dict[str, list[dict]] = {}
        while True:
            try:
                record = self._pending.get_nowait()
            except queue.Empty:
                break
            batches.setdefault(TABLES[type(record)], []).append(asdict(record))
        if batches:
            with db.atomic():
                for table, rows in batches.items():
                    db[table].insert_all(rows)
