"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), plus health, readiness, metrics.

Handlers are thin: validate (schemas.py), send the request to a cold path while the
fallback is on (coldpath.py), else pick the runtime that answers (a rollout's route),
prepare the generation the way every caller does (ModelRuntime.prompt_tokens and
.generation, shared with the eval runner), submit it to that runtime's scheduler, and relay
its events (relay.py). Every error is OpenAI's error JSON (api_errors.py).

Before any of that, an ASGI gate checks the API key from the headers alone (no body is read
for a caller without a key) and caps the body size, chunked bodies included (413).
Rendering and tokenizing run in a worker thread, so a large prompt never stalls the event
loop (and with it /healthz).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from appliance import __version__
from appliance.errors import ChatTemplateError, PromptTooLong, UsageError
from appliance.guard.policy import (
    CHECKED_ROLES,
    CONTENT_FILTER,
    GUARD_FIELD,
    SafetyPolicy,
)
from appliance.retrieval.augment import (
    RETRIEVAL_FIELD,
    RETRIEVAL_HEADER,
    chat_query,
    retrieves,
    with_passages_in_messages,
    with_passages_in_prompt,
)
from appliance.serve.api_errors import ApiError, install_error_handlers, send_error
from appliance.serve.coldpath import first_answer
from appliance.serve.config import (
    ESCALATION_HEADER,
    MANIFEST_HEADER,
    ROUTE_HEADER,
    SamplingParams,
)
from appliance.serve.policy import FALLBACK, INCIDENT, RoutingPolicy
from appliance.serve.relay import (
    HOT,
    Relay,
    Routed,
    endpoint_of,
    mirror,
    record,
    record_retrieval,
)
from appliance.serve.rollout import SESSION_HEADER, SHADOW, Route
from appliance.serve.runtime import ModelRuntime
from appliance.serve.scheduler import Event, QueueFull, SchedulerDown, Unloading
from appliance.serve.schemas import ChatMessage, ChatRequest, CompletionRequest, GenerationParams
from appliance.serve.service import Service

RELEASE_HEADER, ROLE_HEADER = "x-appliance-release", "x-appliance-role"
# Why the hot path answered a request that should have gone to a cold path.
ESCALATION_FAILED_HEADER = "x-appliance-escalation-failed"
ESCALATE_HEADER = "x-appliance-escalate"  # a client's ask, if the policy allows clients to
# What a cold path is asked: the OpenAI fields, not our llama.cpp extensions.
NOT_FORWARDED = {"model", "stream", "stream_options", "ignore_eos", "top_k", "min_p"}


# -- the app ---------------------------------------------------------------------------


def create_app(service: Service) -> FastAPI:
    openapi = service.options.serve_openapi
    app = FastAPI(
        title="Custom SLM Appliance",
        version=__version__,
        description="OpenAI-compatible inference on the active signed release.",
        docs_url=None,  # the interactive docs load scripts from a public CDN: never
        redoc_url=None,
        openapi_url="/openapi.json" if openapi else None,
    )
    app.add_middleware(Gate, service=service)
    install_error_handlers(app)

    def runtime() -> ModelRuntime:
        return route(None, None).runtime

    def route(request: Request | None, requested_model: str | None) -> Route:
        chosen = service.route(_sticky(request), requested_model)
        if chosen is None:
            raise ApiError(
                503,
                service.load_failure or "no verified release is loaded yet",
                "server_error",
                "not_ready",
                headers={"Retry-After": "5"},
            )
        return chosen

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        current, failure = service.runtime(), service.load_failure
        if current is None:
            body = {"status": "not_ready", "reason": failure or "loading the active release"}
            return JSONResponse(body, status_code=503)
        died = current.scheduler.failure or service.telemetry.failure
        if died:
            return JSONResponse({"status": "not_ready", "reason": died}, status_code=503)
        body = {"status": "ready", "release": current.model_id}
        rollout = service.candidate()
        if rollout is not None:
            body["rollout"] = {
                "candidate": rollout[0].model_id,
                "mode": rollout[1].mode,
                "percent": rollout[1].percent,
            }
        if failure:  # still serving the previous release
            body["failed_to_load"] = failure
        return JSONResponse(body)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        current = service.runtime()
        if current is not None:
            service.metrics.max_batch.set(current.scheduler.stats.max_sequences_in_step)
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        served = [(runtime(), "stable")]
        rollout = service.candidate()
        if rollout is not None and rollout[1].mode != SHADOW:  # a shadow answers no one
            served.append((rollout[0], rollout[1].mode))
        return {
            "object": "list",
            "data": [
                {
                    "id": current.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "appliance",
                    "manifest_sha256": current.manifest_sha256,
                    "role": role,
                }
                for current, role in served
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await _serve(service, route, _ChatAsked(body), request, "chat.completion")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if not isinstance(body.prompt, str) and len(body.prompt) != 1:
            raise ApiError(400, "exactly one prompt per request is supported", param="prompt")
        return await _serve(service, route, _PromptAsked(body), request, "text_completion")

    return app


class _ChatAsked:
    """A chat request's texts that the safety policy reads (CHECKED_ROLES), and the request
    rebuilt with those texts redacted."""

    def __init__(self, body: ChatRequest) -> None:
        self.body = body

    def texts(self) -> list[str]:
        return [m.text() for m in self.body.messages if m.role in CHECKED_ROLES]

    def with_texts(self, texts: list[str]) -> _ChatAsked:
        replaced = iter(texts)
        messages = [
            m.model_copy(update={"content": next(replaced)}) if m.role in CHECKED_ROLES else m
            for m in self.body.messages
        ]
        return _ChatAsked(self.body.model_copy(update={"messages": messages}))

    def prepare(self, current: ModelRuntime) -> list[int]:
        try:
            return current.prompt_tokens(messages=self._pairs())
        except ChatTemplateError as exc:
            raise ApiError(400, str(exc)) from exc

    def text(self) -> str:
        return "\n".join(m.text() for m in self.body.messages)

    def query(self) -> str:
        return chat_query(self._pairs())

    def with_passages(self, block: str) -> _ChatAsked:
        pairs = with_passages_in_messages(self._pairs(), block)
        messages = [ChatMessage(role=role, content=text) for role, text in pairs]
        return _ChatAsked(self.body.model_copy(update={"messages": messages}))

    def _pairs(self) -> list[tuple[str, str]]:
        return [(m.role, m.text()) for m in self.body.messages]


class _PromptAsked:
    """A completion request's one prompt, as the safety policy reads and redacts it."""

    def __init__(self, body: CompletionRequest) -> None:
        self.body = body

    def texts(self) -> list[str]:
        return [self.text()]

    def with_texts(self, texts: list[str]) -> _PromptAsked:
        return _PromptAsked(self.body.model_copy(update={"prompt": texts[0]}))

    def prepare(self, current: ModelRuntime) -> list[int]:
        return current.prompt_tokens(prompt=self.text())

    def text(self) -> str:
        prompt = self.body.prompt
        return prompt if isinstance(prompt, str) else prompt[0]

    def query(self) -> str:
        return self.text()

    def with_passages(self, block: str) -> _PromptAsked:
        return self.with_texts([with_passages_in_prompt(self.text(), block)])


Asked = _ChatAsked | _PromptAsked


def _guard_input(
    service: Service, chosen: Route, asked: Asked, kind: str, routed: Routed, arrived: float
) -> Asked:
    """The request as the release's safety policy lets it through: redacted where it says
    so, refused (400, code content_filter) where it denies; what it did goes to `routed`."""
    texts, verdict = chosen.runtime.safety.check_inputs(asked.texts())
    routed.guard = list(verdict.applied)
    if verdict.blocked:
        record(service, chosen, kind, 400, arrived, error_class=CONTENT_FILTER, routed=routed)
        denied = sorted({a.detector for a in routed.guard if a.action == "deny"})
        raise ApiError(
            400,
            f"the request was refused by the release's safety policy ({', '.join(denied)})",
            code=CONTENT_FILTER,
            extra={GUARD_FIELD: [applied.as_dict() for applied in routed.guard]},
        )
    return asked.with_texts(texts) if routed.guard else asked


def _named_passages(response: Response, routed: Routed) -> Response:
    """A response to a request that retrieved names the passages in a header too (a
    streaming client reads it before the first token)."""
    if routed.retrieval is not None:
        response.headers[RETRIEVAL_HEADER] = routed.retrieval.header()
    return response


def _retrieves(runtime: ModelRuntime, kind: str, request: Request) -> bool:
    """Whether this request gets passages (the release's settings and the client's
    x-appliance-retrieval header); 400 for a header that asks for what it cannot have."""
    header = request.headers.get(RETRIEVAL_HEADER)
    asked = header.strip().lower() if header is not None else None
    try:
        return retrieves(runtime.retriever, endpoint_of(kind), asked)
    except UsageError as exc:
        raise ApiError(400, exc.message, code="retrieval_unavailable") from exc


def _retrieve(service: Service, chosen: Route, asked: Asked, kind: str, routed: Routed) -> Asked:
    """The request with the passages its query finds (as the input policy let it through),
    the search recorded in telemetry on its own."""
    assert chosen.runtime.retriever is not None
    query = asked.query()
    routed.retrieval = chosen.runtime.retriever.fetch(query)
    record_retrieval(service, chosen, endpoint_of(kind), query, routed.retrieval)
    return asked.with_passages(routed.retrieval.block)


async def _serve(
    service: Service,
    route: Callable[[Request, str | None], Route],
    asked: Asked,
    request: Request,
    kind: str,
) -> Response:
    """Check the request against the safety policy of the release that answers, tokenize
    for its model (in a worker thread: a huge prompt must not stall the event loop) and
    generate. A hot swap may retire that model meanwhile; then the request starts over on
    the model that replaced it, whose tokens (and policy) may differ.

    With a cold path registered, the fallback switch (an admin's, or an incident's) sends
    every request there, and the routing policy (the release's, with an admin's overrides)
    the requests it judges beyond the release: before generation by its text and the
    prompt's length, after it by the answer. If no cold path answers, the release answers
    and a header says why. A cold path gets the request as the safety policy let it
    through, and its answer passes the same policy."""
    arrived = time.time()
    for _attempt in range(3):
        routed = Routed()
        chosen = route(request, asked.body.model)
        checked = asked
        if chosen.runtime.safety.input is not None:  # in a worker: a huge prompt takes time
            checked = await run_in_threadpool(
                _guard_input, service, chosen, asked, kind, routed, arrived
            )
        said = checked  # the routing policy judges the client's words, not the passages
        if _retrieves(chosen.runtime, kind, request):
            checked = await run_in_threadpool(_retrieve, service, chosen, checked, kind, routed)
        body = checked.body
        if service.routing.fallback and service.cold_paths():
            reason = INCIDENT if service.routing.incident else FALLBACK
            answered = await _escalate(service, chosen, body, kind, reason, routed, arrived)
            if answered is not None:
                return _named_passages(answered, routed)
        tokens = await run_in_threadpool(checked.prepare, chosen.runtime)
        policy = service.policy(chosen.runtime) if service.cold_paths() else None
        if policy is not None and routed.escalation is None:
            reason = policy.before(
                said.text(),
                len(tokens),
                chosen.runtime.engine.context_per_slot,
                request.headers.get(ESCALATE_HEADER, "").lower() in ("1", "true", "yes"),
            )
            if reason is not None:
                answered = await _escalate(service, chosen, body, kind, reason, routed, arrived)
                if answered is not None:
                    return _named_passages(answered, routed)
            if routed.escalation is not None:
                policy = None  # the cold path failed: judge the release's answer no further
        try:
            response = await _generate(
                service, chosen, body, tokens, request, kind, checked.prepare, routed, policy
            )
        except Unloading:
            continue
        if ROUTE_HEADER not in response.headers:  # else a cold path replaced the answer
            response.headers[ROUTE_HEADER] = HOT
            if routed.escalation is not None:
                response.headers[ESCALATION_HEADER] = routed.escalation
                response.headers[ESCALATION_FAILED_HEADER] = routed.failure[:200]
        return _named_passages(response, routed)
    raise ApiError(503, "the model is being replaced; try again", "server_error", "not_ready")


async def _escalate(
    service: Service,
    hot: Route,
    body: GenerationParams,
    kind: str,
    reason: str,
    routed: Routed,
    arrived: float,
) -> Response | None:
    """The answer of the first cold path (in fallback order) that gives one, recorded in
    telemetry under `hot`'s release; None when none does (`routed` then says why). The
    breakers skip an unhealthy target at once."""
    asked = body.model_dump(exclude_none=True, exclude=NOT_FORWARDED)
    routed.escalation = reason
    cold_kind = "chat" if kind == "chat.completion" else "completion"
    found = await run_in_threadpool(first_answer, service.cold_paths(), cold_kind, asked)
    if isinstance(found, str):
        routed.failure = found
        return None
    routed.path, routed.cold_tokens = found.route, found.tokens
    answer = _guard_answer(hot.runtime.safety, found.answer, kind, routed)
    record(service, hot, kind, 200, arrived, routed=routed)
    headers = {ROUTE_HEADER: routed.path, ESCALATION_HEADER: reason}
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _as_events(answer, kind, usage)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    return JSONResponse(answer, headers=headers)


def _guard_answer(
    policy: SafetyPolicy, answer: dict[str, Any], kind: str, routed: Routed
) -> dict[str, Any]:
    """A cold path's answer through the release's output policy, like its own answers, and
    what the policy and retrieval did, said the same way."""
    if policy.output is not None:
        choices = []
        for choice in answer.get("choices") or []:
            choice = dict(choice)
            if kind == "chat.completion":
                message = dict(choice.get("message") or {})
                verdict = policy.check_output(message.get("content") or "")
                choice["message"] = {**message, "content": verdict.text}
            else:
                verdict = policy.check_output(choice.get("text") or "")
                choice["text"] = verdict.text
            if verdict.blocked:
                choice["finish_reason"] = CONTENT_FILTER
            routed.guard.extend(verdict.applied)
            choices.append(choice)
        answer = {**answer, "choices": choices}
    return {**answer, **routed.said()}


async def _as_events(answer: dict[str, Any], kind: str, include_usage: bool):
    """A whole cold-path answer as a stream: its text in one chunk, then the end (and the
    usage, when the client asked for it and the cold path gave it)."""
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
    for choice in answer.get("choices") or []:
        if kind == "chat.completion":
            text = (choice.get("message") or {}).get("content") or ""
            parts = [{"delta": {"role": "assistant", "content": text}}, {"delta": {}}]
        else:
            parts = [{"text": choice.get("text") or ""}, {"text": ""}]
        finish = choice.get("finish_reason") or "stop"
        for part, reason in zip(parts, (None, finish), strict=True):
            chosen = {**part, "index": 0, "finish_reason": reason}
            event = {**_envelope(answer), "object": chunk_kind, "choices": [chosen]}
            if reason is not None:
                event |= {f: answer[f] for f in (GUARD_FIELD, RETRIEVAL_FIELD) if f in answer}
            yield f"data: {json.dumps(event)}\n\n"
    if include_usage and answer.get("usage"):
        event = {**_envelope(answer), "object": chunk_kind, "choices": [], "usage": answer["usage"]}
        yield f"data: {json.dumps(event)}\n\n"
    yield "data: [DONE]\n\n"


def _envelope(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: answer[k] for k in ("id", "created", "model") if k in answer}


async def _generate(
    service: Service,
    route: Route,
    body: GenerationParams,
    tokens: list[int],
    request: Request,
    kind: str,
    prepare: Callable[[ModelRuntime], list[int]],
    routed: Routed,
    policy: RoutingPolicy | None,
) -> Response:
    """Generate on `route`'s release. With a `policy` (a cold path is registered), a whole
    answer is judged by its after-generation rules and may be replaced by a cold path's."""
    arrived = time.time()
    runtime = route.runtime
    _check_model(service, body.model)
    asked = body.max_completion_tokens or body.max_tokens or runtime.serving.max_tokens
    try:
        generation = runtime.generation(
            tokens,
            _sampling(runtime, body),
            asked,
            stop=tuple([body.stop] if isinstance(body.stop, str) else body.stop or ()),
            ignore_eos=body.ignore_eos,
            deadline=time.monotonic() + service.options.request_timeout_seconds,
            scores_confidence=policy is not None and policy.judges_confidence,
        )
    except PromptTooLong as exc:
        raise ApiError(
            400,
            exc.message,
            code="context_length_exceeded",
            param="messages" if kind == "chat.completion" else "prompt",
        ) from exc
    relay = Relay(service, route, kind, arrived, streaming=body.stream)
    relay.routed = routed
    if policy is not None and not body.stream:
        wants_json = body.response_format is not None and body.response_format.wants_json

        async def second_opinion(text: str, event: Event, routed: Routed) -> Response | None:
            reason = policy.after(text, event.mean_logprob, wants_json)
            if reason is None:
                return None
            return await _escalate(service, route, body, kind, reason, routed, arrived)

        relay.second_opinion = second_opinion
    if route.mirror is not None:
        shadow = route.mirror
        relay.on_answer = lambda text, failed: asyncio.get_running_loop().run_in_executor(
            None, mirror, service, shadow, runtime, prepare, generation, kind, text, failed
        )
    try:
        relay.ticket = runtime.scheduler.submit(generation, relay.listener)
    except SchedulerDown as exc:
        record(service, route, kind, 503, arrived, error_class="not_ready")
        raise ApiError(503, str(exc), "server_error", "not_ready") from exc
    except QueueFull as exc:
        record(service, route, kind, 429, arrived, error_class="queue_full")
        raise ApiError(
            429,
            f"the service is busy: {exc}",
            "rate_limit_error",
            "queue_full",
            headers={"Retry-After": "1"},
        ) from exc
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            relay.sse(include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", **_served_by(route)},
        )
    response = await relay.whole(request)
    if ROUTE_HEADER not in response.headers:
        response.headers.update(_served_by(route))
    return response


def _served_by(route: Route) -> dict[str, str]:
    """Name the release and its role, and the signed content that answers (a development
    model has none)."""
    runtime = route.runtime
    named = {RELEASE_HEADER: runtime.model_id, ROLE_HEADER: route.role}
    return {**named, MANIFEST_HEADER: runtime.manifest_sha256} if runtime.manifest_sha256 else named


def _sticky(request: Request | None) -> str:
    """What keeps a client on one release during a canary: its session header, else its API
    key; with neither, each request falls where it falls."""
    if request is None:
        return ""
    session = request.headers.get(SESSION_HEADER) or request.headers.get("authorization")
    return session or uuid.uuid4().hex


def _check_model(service: Service, requested: str | None) -> None:
    stable, rollout = service.runtime(), service.candidate()
    served = [stable.model_id] if stable else []
    if rollout is not None and rollout[1].mode != SHADOW:
        served.append(rollout[0].model_id)
    if requested and requested not in served:
        raise ApiError(
            404,
            f"model {requested!r} is not served here; GET /v1/models lists {served}",
            code="model_not_found",
            param="model",
        )


def _sampling(runtime: ModelRuntime, body: GenerationParams) -> SamplingParams:
    defaults = runtime.serving.default_sampling()
    chosen = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "min_p", "seed")}
    return SamplingParams(
        **{k: v if v is not None else getattr(defaults, k) for k, v in chosen.items()}
    )


class Gate:
    """ASGI middleware in front of every route: the API key first, judged from the headers
    alone, so no body of a caller without a key is read or parsed; then the body, read
    whole up to max_body_bytes (413 beyond it, whether declared or chunked)."""

    def __init__(self, app, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _needs_key(scope["path"]) and not self._authorized(scope):
            return await send_error(
                send,
                401,
                "invalid or missing API key (Authorization: Bearer KEY)",
                "invalid_api_key",
            )
        limit = self.service.options.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await send_error(send, 413, f"request body over {limit} bytes", "body_too_large")
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await send_error(
                    send, 413, f"request body over {limit} bytes", "body_too_large"
                )
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:  # later calls wait for a disconnect, as the app expects
                return await receive()
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        if not self.service.options.require_api_key:
            return True
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and self.service.accepts_key(token.strip())


def _needs_key(path: str) -> bool:
    return path.startswith("/v1/") or path == "/openapi.json"
