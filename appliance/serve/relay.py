"""One request's answer: relaying the scheduler's events to the client (one JSON response or
server-sent events), recording its telemetry and metrics with the online checks run on its
text, and a shadow's mirrored copy."""

from __future__ import annotations

import asyncio
import difflib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from appliance.errors import PromptTooLong
from appliance.guard.detectors import scrubbed
from appliance.guard.policy import CONTENT_FILTER, GUARD_FIELD, Applied, merged
from appliance.retrieval.augment import RETRIEVAL_FIELD, Augmented
from appliance.serve.api_errors import ApiError, error_body
from appliance.serve.rollout import MIRRORED, REPLAY, SHADOW, Route
from appliance.serve.runtime import ModelRuntime
from appliance.serve.scheduler import Event, Generation, QueueFull, SchedulerDown, Unloading
from appliance.serve.service import Service
from appliance.telemetry.writer import RequestRecord, RetrievalRecord

REPLAY_EVERY = 5  # one mirrored request in five is also replayed on stable (the noise floor)
HOT = "hot"


@dataclass
class Routed:
    """Which path answered a client's request and why: "hot" (this release), or
    "cold:NAME" for a registered target; the escalation reason, when the policy or the
    fallback sent it to a cold path (with path "hot", the cold path failed and the release
    answered instead); the tokens the cold path was paid for; and what the safety policy
    did to the request and its answer on the way, and the passages retrieval added."""

    path: str = HOT
    escalation: str | None = None
    cold_tokens: int = 0
    failure: str = ""  # why no cold path answered
    guard: list[Applied] = field(default_factory=list)
    retrieval: Augmented | None = None

    def said(self) -> dict[str, Any]:
        """What a response body says of the safety policy's work and of retrieval's."""
        said: dict[str, Any] = {}
        if self.guard:
            said[GUARD_FIELD] = [applied.as_dict() for applied in merged(self.guard)]
        if self.retrieval is not None:
            said[RETRIEVAL_FIELD] = self.retrieval.said()
        return said


# A second opinion on a whole answer (the routing policy's after-generation rules): the
# cold path's response that replaces it, or None to send the release's own.
SecondOpinion = Callable[[str, Event, Routed], Awaitable[Response | None]]


def mirror(
    service: Service,
    shadow: ModelRuntime,
    stable: ModelRuntime,
    prepare: Callable[[ModelRuntime], list[int]],
    generation: Generation,
    kind: str,
    stable_text: str,
    stable_failed: int,
) -> None:
    """Give the shadow a copy of a request stable has answered, only when neither has work
    waiting (stable never waits for it); record how the two answers compare. One copy in
    REPLAY_EVERY also goes to stable itself: how far stable differs from itself on the same
    prompt is the noise floor the shadow's divergence is judged against."""
    if stable.scheduler.stats.queued or shadow.scheduler.stats.queued:
        service.metrics.shadow_dropped.inc()
        return
    targets = [(shadow, SHADOW)]
    if next(service.mirrored) % REPLAY_EVERY == 0:
        targets.append((stable, REPLAY))
    for runtime, role in targets:
        arrived = time.time()
        route = Route(runtime, role)
        listener = _comparing(service, route, kind, arrived, stable_text, stable_failed)
        try:
            copy = runtime.generation(
                prepare(runtime),
                generation.sampling,
                generation.max_tokens,
                generation.stop,
                generation.ignore_eos,
                deadline=time.monotonic() + service.options.request_timeout_seconds,
            )
            runtime.scheduler.submit(replace(copy, background=True), listener)
        except (ApiError, PromptTooLong, SchedulerDown, Unloading, QueueFull):
            service.metrics.shadow_dropped.inc()


def _comparing(
    service: Service,
    route: Route,
    kind: str,
    arrived: float,
    reference: str,
    reference_failed: int,
) -> Callable[[Event], None]:
    """A listener that records a mirrored answer with its similarity to `reference` (stable's
    answer, which failed `reference_failed` online checks: the pair for McNemar's test)."""
    parts: list[str] = []

    def listener(event: Event) -> None:  # on that runtime's scheduler thread
        parts.append(event.text)
        if event.finish_reason is None:
            return
        if event.finish_reason in ("timeout", "cancelled"):  # clients kept it waiting
            service.metrics.shadow_dropped.inc()
            return
        text = "".join(parts)
        status, error = status_for(event)
        similarity = difflib.SequenceMatcher(None, text, reference, autojunk=False).ratio()
        answered = text if status == 200 else None
        record(
            service,
            route,
            kind,
            status,
            arrived,
            event,
            None,
            error,
            text=answered,
            agreement=similarity,
            stable_checks_failed=reference_failed,
        )

    return listener


class Relay:
    """Relays one request's scheduler events to its client and records its telemetry.

    A streaming request wakes the event loop for every token; a whole-response request
    collects its text on the scheduler thread and wakes the loop once, at the end, so
    the loop does not take CPU from llama.cpp's threads while they decode.
    """

    def __init__(self, service, route: Route, kind: str, arrived: float, streaming: bool) -> None:
        self.service, self.route, self.kind, self.arrived = service, route, kind, arrived
        self.runtime = route.runtime
        self.streaming = streaming
        # A shadow's copy, once answered: stable's text and how many online checks it failed.
        self.on_answer: Callable[[str, int], object] | None = None
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.parts: list[str] = []  # whole responses: text gathered on the scheduler thread
        self.ticket = None
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        self.first_token_at: float | None = None
        self.routed = Routed()
        self.second_opinion: SecondOpinion | None = None

    def listener(self, event: Event) -> None:
        """Called on the scheduler thread."""
        if event.text and self.first_token_at is None:
            self.first_token_at = time.time()
        if self.streaming or event.finish_reason is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        else:
            self.parts.append(event.text)

    async def whole(self, request: Request) -> JSONResponse:
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    self.ticket.cancel()
                    self._finish(499, None, "cancelled")
                    return JSONResponse({}, status_code=499)
                continue
            text = "".join(self.parts) + event.text
            if self.second_opinion is not None and status_for(event)[0] == 200:
                replaced = await self.second_opinion(text, event, self.routed)
                if replaced is not None:
                    self._finish(200, event, None, text)
                    return replaced
            return self._final_response(text, event)

    def _final_response(self, text: str, event: Event) -> JSONResponse:
        status, error = status_for(event)
        finish_reason = event.finish_reason
        if status == 200:
            verdict = self.runtime.safety.check_output(text)
            text = verdict.text
            self.routed.guard.extend(verdict.applied)
            finish_reason = CONTENT_FILTER if verdict.blocked else finish_reason
        self._finish(status, event, error, text)
        if status != 200:
            return JSONResponse(
                error_body(message_for(event), "server_error", error), status_code=status
            )
        if self.kind == "chat.completion":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        body = {
            "id": self.id,
            "object": self.kind,
            "created": int(self.arrived),
            "model": self.runtime.model_id,
            "choices": [choice],
            "usage": usage(event),
        }
        return JSONResponse({**body, **self.routed.said()})

    async def sse(self, include_usage: bool) -> AsyncIterator[bytes]:
        """The answer's chunks as they come, through the output side of the safety policy
        (which holds back a little text, to catch a match split across chunks). A stop
        cancels the generation and ends the stream with finish_reason content_filter."""
        finished = False
        guarded = self.runtime.safety.stream()
        try:
            if self.kind == "chat.completion":
                yield self._chunk({"role": "assistant", "content": ""}, None)
            while True:
                event = await self.events.get()
                released = guarded.feed(event.text) if event.text else ""
                if event.finish_reason is not None and not guarded.stopped:
                    released += guarded.close()
                if released:
                    self.parts.append(released)
                    yield self._chunk(self._delta(released), None)
                if guarded.stopped:
                    self.ticket.cancel()
                    while event.finish_reason is None:  # its last event counts the tokens
                        event = await self.events.get()
                    event = replace(event, finish_reason=CONTENT_FILTER)
                elif event.finish_reason is None:
                    continue
                finished = True
                self.routed.guard.extend(guarded.applied)
                status, error = status_for(event)
                self._finish(status, event, error, "".join(self.parts))
                if status != 200:
                    body = error_body(message_for(event), "server_error", error)
                    yield f"data: {json.dumps(body)}\n\n".encode()
                else:
                    yield self._chunk(
                        {} if self.kind == "chat.completion" else "",
                        event.finish_reason,
                        extra=self.routed.said(),
                    )
                    if include_usage:
                        yield self._chunk(None, None, usage=usage(event))
                yield b"data: [DONE]\n\n"
                return
        finally:
            if not finished:  # the client went away: free the slot now
                self.ticket.cancel()
                self._finish(499, None, "cancelled")

    def _delta(self, text: str) -> Any:
        return {"content": text} if self.kind == "chat.completion" else text

    def _chunk(
        self,
        delta: Any,
        finish_reason: str | None,
        usage: dict | None = None,
        extra: dict | None = None,
    ) -> bytes:
        if delta is None:
            choices = []
        elif self.kind == "chat.completion":
            choices = [
                {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            ]
        else:
            choices = [
                {"index": 0, "text": delta, "finish_reason": finish_reason, "logprobs": None}
            ]
        chunk = {
            "id": self.id,
            "object": f"{self.kind}.chunk" if self.kind == "chat.completion" else self.kind,
            "created": int(self.arrived),
            "model": self.runtime.model_id,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps({**chunk, **(extra or {})})}\n\n".encode()

    def _finish(
        self, status: int, event: Event | None, error: str | None, text: str | None = None
    ) -> None:
        answered = text if status == 200 else None
        failed = record(
            self.service,
            self.route,
            self.kind,
            status,
            self.arrived,
            event,
            self.first_token_at,
            error,
            text=answered,
            routed=self.routed,
        )
        if answered is not None and self.on_answer is not None:
            self.on_answer(answered, failed)


def status_for(event: Event) -> tuple[int, str | None]:
    if event.finish_reason == "timeout":
        return 504, "timeout"
    if event.finish_reason == "error":
        return 500, "engine_error"
    if event.finish_reason == "cancelled":
        return 499, "cancelled"
    return 200, None


def message_for(event: Event) -> str:
    if event.finish_reason == "timeout":
        return "the request ran past its deadline"
    return "generation failed"  # engine details stay in the service log, not the response


def usage(event: Event) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def endpoint_of(kind: str) -> str:
    """The endpoint a response kind answers, as /metrics and telemetry name it."""
    return "chat" if kind == "chat.completion" else "completions"


def record(
    service: Service,
    route: Route,
    kind: str,
    status: int,
    arrived: float,
    event: Event | None = None,
    first_token_at: float | None = None,
    error_class: str | None = None,
    text: str | None = None,
    agreement: float | None = None,
    stable_checks_failed: int | None = None,
    routed: Routed | None = None,
) -> int:
    """Count the request in /metrics and telemetry; run the online checks on its text and
    return how many it failed."""
    routed = routed or Routed()
    applied = merged(routed.guard)
    now = time.time()
    release = route.runtime.model_id
    endpoint = endpoint_of(kind)
    checks = service.online.checks if text is not None else ()
    failed = sum(1 for check in checks if not check.passes(text or ""))
    if route.role not in MIRRORED:
        service.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
        service.metrics.count_route(
            routed.path, routed.escalation, status, now - arrived, routed.cold_tokens
        )
        service.metrics.count_guard(applied)
    service.metrics.by_release.labels(release=release, role=route.role, status=str(status)).inc()
    if failed:
        service.metrics.check_failures.labels(release=release, role=route.role).inc()
    record = RequestRecord(
        time=arrived,
        release=release,
        endpoint=endpoint,
        status=status,
        latency_seconds=now - arrived,
        error_class=error_class,
        role=route.role,
        checks_run=len(checks),
        checks_failed=failed,
        agreement=agreement,
        stable_checks_failed=stable_checks_failed,
        route=routed.path,
        escalation=routed.escalation,
        cold_tokens=routed.cold_tokens,
        guard=json.dumps([a.as_dict() for a in applied]) if applied else None,
    )
    if event is not None:
        service.metrics.prompt_tokens.inc(event.prompt_tokens)
        service.metrics.completion_tokens.inc(event.completion_tokens)
        ttft = first_token_at - arrived if first_token_at else None
        record = replace(
            record,
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            queue_seconds=event.queue_seconds,
            ttft_seconds=ttft,
        )
        if status == 200 and route.role not in MIRRORED:
            service.metrics.latency.observe(now - arrived)
            if ttft is not None:
                service.metrics.ttft.observe(ttft)
    service.telemetry.record(record)
    return failed


def record_retrieval(
    service: Service, route: Route, endpoint: str, query: str, augmented: Augmented
) -> None:
    """One retrieval, in /metrics and as its own telemetry record: its query with every
    PII and secret shape redacted (the raw match never reaches telemetry), what it found,
    and how long it took."""
    found = augmented.retrieval
    service.metrics.count_retrieval(endpoint, len(found.hits), found.seconds)
    service.telemetry.record(
        RetrievalRecord(
            time=time.time(),
            release=route.runtime.model_id,
            role=route.role,
            endpoint=endpoint,
            query=scrubbed(query),
            k=found.k,
            ids=json.dumps(found.ids),
            scores=json.dumps([round(hit.score, 6) for hit in found.hits]),
            seconds=found.seconds,
            corpus_sha256=augmented.corpus_sha256,
        )
    )
