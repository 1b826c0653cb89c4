"""A cold path that is another installed release on this host: a larger GGUF the service
keeps loaded beside the active one (on the same compute thread: the two take turns on the
cores), asked in-process with no network at all.

It answers as a ColdPath does (an OpenAI-shaped response, ColdPathError when it cannot),
behind the same kind of circuit breaker, so the API and the eval gate treat the two alike.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from dataclasses import replace
from typing import Any

from sqlite_utils import Database

from appliance.errors import PromptTooLong
from appliance.serve.coldpath import CircuitBreaker, ColdPath, ColdPathError, Kind
from appliance.serve.config import ServiceOptions
from appliance.serve.runtime import ModelRuntime
from appliance.serve.scheduler import Event, QueueFull, SchedulerDown, Unloading
from appliance.store.releases import ReleaseStore
from appliance.store.routing import Target

ASKED_SAMPLING = ("temperature", "top_p", "seed")  # what a forwarded request may set


def open_cold_path(
    target: Target,
    store: ReleaseStore,
    db: Database,
    options: ServiceOptions,
    compute: concurrent.futures.Executor | None = None,
    timeout_seconds: float = 60.0,
) -> ColdPath | LocalRelease:
    """An endpoint's client, or the target's release verified and loaded here."""
    if not target.release:
        return ColdPath(target, timeout_seconds)
    release = store.release(db, target.release)
    runtime = ModelRuntime.from_release(store, release, options, compute)
    return LocalRelease(target, runtime, timeout_seconds)


class LocalRelease:
    def __init__(
        self, target: Target, runtime: ModelRuntime, timeout_seconds: float = 60.0
    ) -> None:
        self.target, self.runtime, self.timeout_seconds = target, runtime, timeout_seconds
        self.breaker = CircuitBreaker()

    def complete(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        """The release's whole answer to `body` (blocks until it is generated)."""
        if not self.breaker.allow():
            raise ColdPathError(f"cold path {self.target.name} is cooling down")
        try:
            text, final = self._generate(kind, body)
        except ColdPathError:
            self.breaker.failed()
            raise
        self.breaker.succeeded()
        return _response(kind, self.runtime.model_id, text, final)

    def close(self) -> None:
        self.runtime.close()

    def _generate(self, kind: Kind, body: dict[str, Any]) -> tuple[str, Event]:
        runtime, name = self.runtime, self.target.name
        if kind == "chat":
            messages = [(m["role"], _text(m.get("content"))) for m in body["messages"]]
            tokens = runtime.prompt_tokens(messages=messages)
        else:
            tokens = runtime.prompt_tokens(prompt=body.get("prompt") or "")
        defaults = runtime.serving.default_sampling()
        asked = {k: body[k] for k in ASKED_SAMPLING if body.get(k) is not None}
        sampling = replace(defaults, **asked)
        stop = body.get("stop") or ()
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        deadline = time.monotonic() + self.timeout_seconds
        parts, done, final = [], threading.Event(), []

        def listener(event: Event) -> None:
            parts.append(event.text)
            if event.finish_reason is not None:
                final.append(event)
                done.set()

        try:
            generation = runtime.generation(
                tokens,
                sampling,
                limit or runtime.serving.max_tokens,
                stop=(stop,) if isinstance(stop, str) else tuple(stop),
                deadline=deadline,
            )
            ticket = runtime.scheduler.submit(generation, listener)
        except (PromptTooLong, QueueFull, SchedulerDown, Unloading) as exc:
            raise ColdPathError(f"cold path {name}: {type(exc).__name__}") from exc
        if not done.wait(self.timeout_seconds + 1):
            ticket.cancel()
            raise ColdPathError(f"cold path {name}: no answer in {self.timeout_seconds:g} s")
        if final[0].finish_reason not in ("stop", "length"):
            raise ColdPathError(f"cold path {name}: generation ended ({final[0].finish_reason})")
        return "".join(parts), final[0]


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def _response(kind: Kind, model: str, text: str, final: Event) -> dict[str, Any]:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "text": text}
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return {
        "id": prefix + uuid.uuid4().hex,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{**choice, "finish_reason": final.finish_reason, "logprobs": None}],
        "usage": {
            "prompt_tokens": final.prompt_tokens,
            "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens,
        },
    }
