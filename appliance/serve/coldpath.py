"""The cold path: a registered OpenAI-compatible endpoint (appliance.store.routing.Target),
called with bounded retries behind a circuit breaker.

A target that keeps failing is not called again until its cooldown has passed; then one
request tries it (half open) and its outcome closes or reopens the breaker. So an
unhealthy endpoint costs each request nothing while it is open, and the hot path answers
instead (the caller says so).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx

from appliance.errors import ApplianceError
from appliance.store.routing import Target

Kind = Literal["chat", "completion"]
PATHS: dict[Kind, str] = {"chat": "/chat/completions", "completion": "/completions"}


class ColdPathError(ApplianceError):
    """The cold path did not answer (down, refused, timed out, or an error status)."""


class CircuitOpen(ColdPathError):
    """The target failed too often; it is not called until its cooldown has passed."""


class CircuitBreaker:
    """closed -> (failures_to_open failures in a row) -> open -> (cooldown) -> half open:
    one trial call; its success closes the breaker, its failure opens it again."""

    def __init__(
        self,
        failures_to_open: int = 3,
        cooldown_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures_to_open = failures_to_open
        self.cooldown_seconds = cooldown_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False  # a half-open trial call is under way

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            cooled = self.clock() - self._opened_at >= self.cooldown_seconds
            return "half_open" if cooled else "open"

    def allow(self) -> bool:
        """May a call go out now? In half open, only one at a time."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self.clock() - self._opened_at < self.cooldown_seconds or self._trial:
                return False
            self._trial = True
            return True

    def succeeded(self) -> None:
        with self._lock:
            self._failures, self._opened_at, self._trial = 0, None, False

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            if self._trial or self._failures >= self.failures_to_open:
                self._opened_at, self._trial = self.clock(), False


class ColdPath:
    """Calls one target; `retries` more attempts after a failed one, within the breaker."""

    def __init__(
        self,
        target: Target,
        timeout_seconds: float = 60.0,
        retries: int = 1,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.target, self.retries = target, retries
        self.breaker = breaker or CircuitBreaker()
        self._client = httpx.Client(timeout=timeout_seconds, trust_env=False)  # no proxies

    def complete(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        """A whole (not streamed) answer to `body`, asked of the target's model."""
        request = {**body, "model": self.target.model, "stream": False}
        error: ColdPathError = CircuitOpen(f"cold path {self.target.name} is cooling down")
        for _attempt in range(1 + self.retries):
            if not self.breaker.allow():
                raise error
            try:
                answer = self._post(PATHS[kind], request)
            except ColdPathError as exc:
                self.breaker.failed()
                error = exc
                continue
            self.breaker.succeeded()
            return answer
        raise error

    def close(self) -> None:
        self._client.close()

    def _post(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._client.post(
                self.target.url + path, json=request, headers=self._headers()
            )
        except httpx.HTTPError as exc:
            raise ColdPathError(f"cold path {self.target.name}: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise ColdPathError(f"cold path {self.target.name}: HTTP {response.status_code}")
        try:
            answer = response.json()
        except ValueError as exc:
            raise ColdPathError(f"cold path {self.target.name}: not JSON") from exc
        if not isinstance(answer, dict):
            raise ColdPathError(f"cold path {self.target.name}: not a JSON object")
        return answer

    def _headers(self) -> dict[str, str]:
        """Its API key, read from the owner-only file at each call (so a rotated key
        needs no restart)."""
        if not self.target.key_file:
            return {}
        try:
            key = Path(self.target.key_file).read_text().strip()
        except OSError as exc:
            raise ColdPathError(f"cold path {self.target.name}: cannot read its key") from exc
        return {"Authorization": f"Bearer {key}"}


class AnyColdPath(Protocol):
    """A ColdPath (an endpoint) or a LocalRelease (an installed release served here)."""

    target: Target

    def complete(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ColdAnswer:
    target: Target
    answer: dict[str, Any]  # OpenAI-shaped

    @property
    def route(self) -> str:
        return f"cold:{self.target.name}"

    @property
    def tokens(self) -> int:
        """What the cold path was paid for: prompt and completion tokens."""
        return int((self.answer.get("usage") or {}).get("total_tokens") or 0)

    @property
    def cost(self) -> float:
        return self.tokens / 1000 * self.target.cost_per_1k_tokens


def first_answer(
    cold_paths: Sequence[AnyColdPath], kind: Kind, body: dict[str, Any]
) -> ColdAnswer | str:
    """The answer of the first cold path, in fallback order, that gives one; or, when none
    does, why (an open breaker refuses at once). Blocks: call it off the event loop and
    off a scheduler's thread."""
    failures = []
    for cold in cold_paths:
        try:
            return ColdAnswer(cold.target, cold.complete(kind, body))
        except ColdPathError as exc:
            failures.append(exc.message)
    return "; ".join(failures)
