"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), plus health, readiness, metrics.

Handlers are thin: validate, render the prompt, submit to the current runtime's
scheduler, and relay its events as one JSON response or as server-sent events. Every
error is OpenAI's error JSON with a 4xx status; a 500 never carries internal details.

Before any of that, an ASGI gate checks the API key from the headers alone (no body is read
for a caller without a key) and caps the body size, chunked bodies included (413).
Rendering and tokenizing run in a worker thread, so a large prompt never stalls the event
loop (and with it /healthz).
"""

from __future__ import annotations

import asyncio
import difflib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance import __version__
from appliance.errors import ChatTemplateError
from appliance.serve.config import MANIFEST_HEADER, SamplingParams
from appliance.serve.rollout import SESSION_HEADER, SHADOW, Route
from appliance.serve.runtime import ModelRuntime
from appliance.serve.scheduler import Event, Generation, QueueFull, SchedulerDown, Unloading
from appliance.serve.service import Service
from appliance.telemetry.writer import RequestRecord

MAX_TOKENS_LIMIT = 1_000_000
RELEASE_HEADER, ROLE_HEADER = "x-appliance-release", "x-appliance-role"


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.code, self.param, self.headers = code, param, headers or {}


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- request bodies ------------------------------------------------------------------


def _encodable(text: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"), which no UTF-8 tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text holds a lone surrogate; send valid Unicode") from exc
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1000)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-1, le=2**63 - 1)
    stop: Text | list[Annotated[Text, Field(max_length=64)]] | None = Field(None, max_length=4)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False  # a llama.cpp extension, used by benchmarks


class ChatRequest(GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)


class CompletionRequest(GenerationParams):
    prompt: Text | list[Text] = Field(min_length=0)


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
    _install_error_handlers(app)

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
        messages = [(m.role, m.text()) for m in body.messages]

        def prepare(current: ModelRuntime) -> list[int]:
            try:
                return current.chat.tokens(messages)
            except ChatTemplateError as exc:
                raise ApiError(400, str(exc)) from exc

        return await _serve(service, route, prepare, body, request, "chat.completion")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "exactly one prompt per request is supported", param="prompt")

        def prepare(current: ModelRuntime) -> list[int]:
            return current.engine.tokenize(prompts[0])

        return await _serve(service, route, prepare, body, request, "text_completion")

    return app


async def _serve(
    service: Service,
    route: Callable[[Request, str | None], Route],
    prepare: Callable[[ModelRuntime], list[int]],
    body: GenerationParams,
    request: Request,
    kind: str,
) -> Response:
    """Tokenize for the model that answers (in a worker thread: a huge prompt must not
    stall the event loop) and generate. A hot swap may retire that model meanwhile; then
    the request starts over on the model that replaced it, whose tokens may differ."""
    for _attempt in range(3):
        chosen = route(request, body.model)
        tokens = await run_in_threadpool(prepare, chosen.runtime)
        try:
            return await _generate(service, chosen, body, tokens, request, kind, prepare)
        except Unloading:
            continue
    raise ApiError(503, "the model is being replaced; try again", "server_error", "not_ready")


async def _generate(
    service: Service,
    route: Route,
    body: GenerationParams,
    tokens: list[int],
    request: Request,
    kind: str,
    prepare: Callable[[ModelRuntime], list[int]],
) -> Response:
    arrived = time.time()
    runtime = route.runtime
    _check_model(service, body.model)
    room = runtime.engine.context_per_slot - len(tokens)
    if room < 1:
        raise ApiError(
            400,
            f"the prompt is {len(tokens)} tokens; this model's context holds "
            f"{runtime.engine.context_per_slot}",
            code="context_length_exceeded",
            param="messages" if kind == "chat.completion" else "prompt",
        )
    asked = body.max_completion_tokens or body.max_tokens or runtime.serving.max_tokens
    generation = Generation(
        prompt_tokens=tokens,
        sampling=_sampling(runtime, body),
        max_tokens=min(asked, runtime.serving.max_tokens, room),
        stop=tuple([body.stop] if isinstance(body.stop, str) else body.stop or ()),
        ignore_eos=body.ignore_eos,
        deadline=time.monotonic() + service.options.request_timeout_seconds,
    )
    relay = _Relay(service, route, kind, arrived, streaming=body.stream)
    if route.mirror is not None:
        shadow = route.mirror
        relay.on_answer = lambda text: asyncio.get_running_loop().run_in_executor(
            None, _mirror, service, shadow, runtime, prepare, generation, kind, text
        )
    try:
        relay.ticket = runtime.scheduler.submit(generation, relay.listener)
    except SchedulerDown as exc:
        _record(service, route, kind, 503, arrived, error_class="not_ready")
        raise ApiError(503, str(exc), "server_error", "not_ready") from exc
    except QueueFull as exc:
        _record(service, route, kind, 429, arrived, error_class="queue_full")
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


def _mirror(
    service: Service,
    shadow: ModelRuntime,
    stable: ModelRuntime,
    prepare: Callable[[ModelRuntime], list[int]],
    generation: Generation,
    kind: str,
    stable_text: str,
) -> None:
    """Give the shadow a copy of a request stable has answered, only when neither has work
    waiting (stable never waits for it); record how the two answers compare."""
    if stable.scheduler.stats.queued or shadow.scheduler.stats.queued:
        service.metrics.shadow_dropped.inc()
        return
    arrived, parts = time.time(), []

    def compare(event: Event) -> None:  # on the shadow's scheduler thread
        parts.append(event.text)
        if event.finish_reason is None:
            return
        text = "".join(parts)
        status, error = _status_for(event)
        similarity = difflib.SequenceMatcher(None, text, stable_text, autojunk=False).ratio()
        answered = text if status == 200 else None
        _record(
            service,
            Route(shadow, SHADOW),
            kind,
            status,
            arrived,
            event,
            None,
            error,
            text=answered,
            agreement=similarity,
        )

    try:
        tokens = prepare(shadow)
        room = shadow.engine.context_per_slot - len(tokens)
        copy = replace(
            generation,
            prompt_tokens=tokens,
            max_tokens=min(generation.max_tokens, room),
            deadline=time.monotonic() + service.options.request_timeout_seconds,
        )
        if room < 1:
            raise ApiError(400, "the prompt does not fit the shadow's context")
        shadow.scheduler.submit(copy, compare)
    except (ApiError, SchedulerDown, Unloading, QueueFull):
        service.metrics.shadow_dropped.inc()


class _Relay:
    """Relays one request's scheduler events to its client and records its telemetry.

    A streaming request wakes the event loop for every token; a whole-response request
    collects its text on the scheduler thread and wakes the loop once, at the end, so
    the loop does not take CPU from llama.cpp's threads while they decode.
    """

    def __init__(self, service, route: Route, kind: str, arrived: float, streaming: bool) -> None:
        self.service, self.route, self.kind, self.arrived = service, route, kind, arrived
        self.runtime = route.runtime
        self.streaming = streaming
        self.on_answer: Callable[[str], object] | None = None  # a shadow's copy, once answered
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.parts: list[str] = []  # whole responses: text gathered on the scheduler thread
        self.ticket = None
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        self.first_token_at: float | None = None

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
            return self._final_response("".join(self.parts) + event.text, event)

    def _final_response(self, text: str, event: Event) -> JSONResponse:
        status, error = _status_for(event)
        self._finish(status, event, error, text)
        if status != 200:
            return JSONResponse(
                error_body(_message_for(event), "server_error", error), status_code=status
            )
        if self.kind == "chat.completion":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": event.finish_reason,
                "logprobs": None,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "finish_reason": event.finish_reason,
                "logprobs": None,
            }
        return JSONResponse(
            {
                "id": self.id,
                "object": self.kind,
                "created": int(self.arrived),
                "model": self.runtime.model_id,
                "choices": [choice],
                "usage": _usage(event),
            }
        )

    async def sse(self, include_usage: bool) -> AsyncIterator[bytes]:
        finished = False
        try:
            if self.kind == "chat.completion":
                yield self._chunk({"role": "assistant", "content": ""}, None)
            while True:
                event = await self.events.get()
                if event.text:
                    self.parts.append(event.text)
                    yield self._chunk(self._delta(event.text), None)
                if event.finish_reason is None:
                    continue
                finished = True
                status, error = _status_for(event)
                self._finish(status, event, error, "".join(self.parts))
                if status != 200:
                    body = error_body(_message_for(event), "server_error", error)
                    yield f"data: {json.dumps(body)}\n\n".encode()
                else:
                    yield self._chunk(
                        {} if self.kind == "chat.completion" else "", event.finish_reason
                    )
                    if include_usage:
                        yield self._chunk(None, None, usage=_usage(event))
                yield b"data: [DONE]\n\n"
                return
        finally:
            if not finished:  # the client went away: free the slot now
                self.ticket.cancel()
                self._finish(499, None, "cancelled")

    def _delta(self, text: str) -> Any:
        return {"content": text} if self.kind == "chat.completion" else text

    def _chunk(self, delta: Any, finish_reason: str | None, usage: dict | None = None) -> bytes:
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
        return f"data: {json.dumps(chunk)}\n\n".encode()

    def _finish(
        self, status: int, event: Event | None, error: str | None, text: str | None = None
    ) -> None:
        answered = text if status == 200 else None
        _record(
            self.service,
            self.route,
            self.kind,
            status,
            self.arrived,
            event,
            self.first_token_at,
            error,
            text=answered,
        )
        if answered is not None and self.on_answer is not None:
            self.on_answer(answered)


def _status_for(event: Event) -> tuple[int, str | None]:
    if event.finish_reason == "timeout":
        return 504, "timeout"
    if event.finish_reason == "error":
        return 500, "engine_error"
    if event.finish_reason == "cancelled":
        return 499, "cancelled"
    return 200, None


def _message_for(event: Event) -> str:
    if event.finish_reason == "timeout":
        return "the request ran past its deadline"
    return "generation failed"  # engine details stay in the service log, not the response


def _usage(event: Event) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def _record(
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
) -> None:
    """Count the request in /metrics and telemetry; run the online checks on its text."""
    now = time.time()
    release = route.runtime.model_id
    endpoint = "chat" if kind == "chat.completion" else "completions"
    checks = service.online.checks if text is not None else ()
    failed = sum(1 for check in checks if not check.passes(text or ""))
    if route.role != SHADOW:
        service.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
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
        if status == 200 and route.role != SHADOW:
            service.metrics.latency.observe(now - arrived)
            if ttft is not None:
                service.metrics.ttft.observe(ttft)
    service.telemetry.record(record)


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


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.message, exc.kind, exc.code, exc.param),
            status_code=exc.status,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = (
            f"{where}: {first.get('msg', 'invalid request')}"
            if where
            else first.get("msg", "invalid request body")
        )
        return JSONResponse(
            error_body(message, "invalid_request_error", "invalid_body", where or None),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code
        )

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, _exc: Exception) -> JSONResponse:
        return JSONResponse(error_body("internal error", "server_error"), status_code=500)


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
            return await _send_error(
                send,
                401,
                "invalid or missing API key (Authorization: Bearer KEY)",
                "invalid_api_key",
            )
        limit = self.service.options.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _send_error(
                send, 413, f"request body over {limit} bytes", "body_too_large"
            )
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await _send_error(
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


async def _send_error(send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(message, "invalid_request_error", code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})
