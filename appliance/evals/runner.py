"""Run an eval spec's cases against a model: in-process on the engine (a staged release that
does not serve yet) or against a running service. The spec's load profile says how many
requests are in flight (`load.clients`); each is timed from the moment it is sent, so a
latency is the release's, not the time a case waited behind the others in the runner."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from appliance.errors import ApplianceError, EvalTargetError, PromptTooLong
from appliance.evals.host import HostMonitor, HostState
from appliance.evals.scorers import SCORERS
from appliance.evals.spec import Case, EvalSpec
from appliance.guard.policy import (
    CHECKED_ROLES,
    CONTENT_FILTER,
    GUARD_FIELD,
    Applied,
    SafetyPolicy,
    Verdict,
    load_policy,
)
from appliance.retrieval.augment import (
    RETRIEVAL_FIELD,
    RETRIEVAL_HEADER,
    Augmented,
    Retriever,
    chat_query,
    retrieves,
    with_passages_in_messages,
    with_passages_in_prompt,
)
from appliance.serve.coldpath import AnyColdPath, ColdAnswer, Kind, first_answer
from appliance.serve.config import (
    ESCALATION_HEADER,
    MANIFEST_HEADER,
    ROUTE_HEADER,
    SamplingParams,
    ServiceOptions,
    ServingConfig,
)
from appliance.serve.policy import RoutingPolicy
from appliance.serve.runtime import ModelRuntime
from appliance.serve.scheduler import Event, Generation

Progress = Callable[[int], None]
log = logging.getLogger("appliance.evals")


@dataclass(frozen=True)
class CaseResult:
    id: str
    suite: str
    tags: tuple[str, ...]
    output: str
    passed: bool
    failures: tuple[str, ...]  # "scorer: reason" for each failing scorer
    latency_ms: float
    ttft_ms: float | None
    completion_tokens: int
    route: str = "hot"  # who answered: the release, or "cold:NAME"
    escalation: str | None = None  # why the policy escalated it (route hot: no cold path could)
    cold_cost: float = 0.0  # what the cold path's tokens cost
    mean_logprob: float | None = None  # the release's confidence, when the policy scores it
    guard: tuple[Applied, ...] = ()  # what the release's safety policy did to the case
    retrieved: tuple[str, ...] | None = None  # passage ids in its prompt (None: no retrieval)


@dataclass
class Routing:
    """Routes the gate's cases as the service routes requests: the release's policy with
    the admin's overrides, and the registered cold paths in fallback order. With none
    registered, the report still says which cases the policy would escalate."""

    policy: RoutingPolicy
    cold_paths: list[AnyColdPath] = field(default_factory=list)

    def before(self, case: Case, generation: Generation, context: int) -> str | None:
        return self.policy.before(_case_text(case), len(generation.prompt_tokens), context, False)

    def after(self, case: Case, output: str, event: Event) -> str | None:
        wants_json = bool({"json_valid", "json_schema"} & set(case.scorers))
        return self.policy.after(output, event.mean_logprob, wants_json)

    def ask_cold(self, spec: EvalSpec, case: Case) -> ColdAnswer | None:
        """The first cold path's answer to the case, as the service would ask it."""
        found = first_answer(self.cold_paths, *_cold_request(spec, case))
        return None if isinstance(found, str) else found


@dataclass(frozen=True)
class RunResult:
    cases: list[CaseResult]
    wall_seconds: float
    cpu_seconds: float  # of the process that ran the model
    host: HostState


def score_case(
    case: Case, output: str, latency_ms: float, ttft_ms: float | None, tokens: int
) -> CaseResult:
    failures = []
    for name in case.scorers:
        try:
            verdict = SCORERS[name](output, case.expected, latency_ms)
        except Exception as exc:  # a scorer's bug fails its case, never the run
            failures.append(f"{name}: error: {type(exc).__name__}: {exc}")
            continue
        if not verdict.passed:
            failures.append(f"{name}: {verdict.reason}")
    return CaseResult(
        case.id,
        case.suite,
        case.tags,
        output,
        not failures,
        tuple(failures),
        latency_ms,
        ttft_ms,
        tokens,
    )


def run_in_process(
    spec: EvalSpec,
    release_dir: Path,
    progress: Progress | None = None,
    routing: Routing | None = None,
) -> RunResult:
    """Load the release's model here (it need not be active) and run every case, with as
    many slots as the spec's load has clients, routed by `routing` when given."""
    serving = ServingConfig.from_release_dir(release_dir)
    with tempfile.TemporaryDirectory(prefix="eval-index-") as work:
        runtime = ModelRuntime.load(
            "eval",
            None,
            release_dir / "model.gguf",
            serving,
            ServiceOptions(slots=spec.load.clients, max_queue=spec.load.clients),
            safety=load_policy(release_dir),
            corpus=(release_dir, Path(work) / "index.sqlite"),
        )
        try:
            return _run_on_runtime(spec, runtime, progress or (lambda _n: None), routing)
        finally:
            runtime.close()


def _run_on_runtime(
    spec: EvalSpec, runtime: ModelRuntime, progress: Progress, routing: Routing | None
) -> RunResult:
    results: dict[str, CaseResult] = {}
    done = threading.Event()
    lock = threading.Lock()
    in_flight = threading.Semaphore(spec.load.clients)
    cases = spec.cases
    # Cold-path calls block: never on the scheduler's thread.
    cold_calls = concurrent.futures.ThreadPoolExecutor(spec.load.clients)
    # process_time reads CLOCK_PROCESS_CPUTIME_ID (ns); psutil's cpu_times counts 10 ms
    # ticks, and a short run on a small model measured 0 CPU-s, so it cost nothing.
    cpu_start, wall_start = time.process_time(), time.monotonic()
    monitor = HostMonitor()

    def finish(result: CaseResult) -> None:
        with lock:
            results[result.id] = result
            if len(results) == len(cases):
                done.set()
        in_flight.release()
        progress(1)

    policy = runtime.safety
    inputs: dict[str, tuple[Applied, ...]] = {}  # case id -> what the input side did
    retrieved: dict[str, tuple[str, ...]] = {}  # case id -> the passages in its prompt

    def answered(case: Case, output: str, latency: float, ttft: float | None, tokens: int):
        """The case scored on what the service would send: the output policy applied."""
        verdict = policy.check_output(output)
        result = score_case(case, verdict.text, latency, ttft, tokens)
        guard = inputs.get(case.id, ()) + verdict.applied
        return replace(result, guard=guard, retrieved=retrieved.get(case.id))

    def escalate(case: Case, reason: str, started: float, hot: CaseResult | Generation) -> None:
        """The cold path's answer, scored; if none answers, the release's: its result, or
        its generation run now when the policy escalated before generating."""
        assert routing is not None
        try:
            found = routing.ask_cold(spec, case)
        except Exception:  # an odd answer must not hang the run: the release answers
            log.exception("eval case %s: the cold path's answer could not be read", case.id)
            found = None
        if found is None and isinstance(hot, Generation):
            generate(case, started, hot, reason)
            return
        if found is None:
            finish(replace(hot, escalation=reason))
            return
        choice = (found.answer.get("choices") or [{}])[0]
        text = choice.get("text") or (choice.get("message") or {}).get("content") or ""
        tokens = int((found.answer.get("usage") or {}).get("completion_tokens") or 0)
        latency = (time.monotonic() - started) * 1000
        scored = answered(case, text, latency, None, tokens)
        finish(replace(scored, route=found.route, escalation=reason, cold_cost=found.cost))

    def generate(
        case: Case, started: float, generation: Generation, escalated: str | None = None
    ) -> None:
        parts, first = [], [None]

        def listener(event: Event) -> None:
            if event.text and first[0] is None:
                first[0] = time.monotonic()
            parts.append(event.text)
            if event.finish_reason is None:
                return
            output, now = "".join(parts), time.monotonic()
            ttft = (first[0] - started) * 1000 if first[0] else None
            latency = (now - started) * 1000
            result = answered(case, output, latency, ttft, event.completion_tokens)
            result = replace(result, mean_logprob=event.mean_logprob)
            reason = escalated or (routing.after(case, output, event) if routing else None)
            if reason is not None and escalated is None and routing.cold_paths:
                cold_calls.submit(escalate, case, reason, started, result)
            else:
                finish(replace(result, escalation=reason))

        runtime.scheduler.submit(generation, listener)

    def submit(case: Case) -> None:
        started = time.monotonic()  # sent now, with a free slot waiting
        case, verdict = guarded_case(policy, case)
        inputs[case.id] = verdict.applied
        if verdict.blocked:  # refused before the model saw it, as the service refuses it
            latency = (time.monotonic() - started) * 1000
            finish(replace(score_case(case, "", latency, None, 0), guard=verdict.applied))
            return
        said = case  # the routing policy judges the case's own words, not the passages
        if _retrieves(runtime.retriever, case):
            assert runtime.retriever is not None
            case, augmented = augmented_case(runtime.retriever, case)
            retrieved[case.id] = tuple(augmented.retrieval.ids)
        generation = _generation(spec, runtime, case, routing)
        context = runtime.engine.context_per_slot
        reason = routing.before(said, generation, context) if routing else None
        if reason is not None and routing.cold_paths:
            cold_calls.submit(escalate, case, reason, started, generation)
        else:
            generate(case, started, generation, reason)

    for case in cases:
        in_flight.acquire()
        submit(case)
    done.wait()
    cold_calls.shutdown()
    cpu = time.process_time() - cpu_start
    wall = time.monotonic() - wall_start
    return RunResult([results[c.id] for c in cases], wall, cpu, monitor.finish())


def guarded_case(policy: SafetyPolicy, case: Case) -> tuple[Case, Verdict]:
    """The case as the release's input policy lets it through to the model (the same texts
    the service checks), and the policy's verdict on it."""
    if case.messages is None:
        texts, verdict = policy.check_inputs([case.prompt or ""])
        return replace(case, prompt=texts[0]), verdict
    checked = [i for i, (role, _text) in enumerate(case.messages) if role in CHECKED_ROLES]
    texts, verdict = policy.check_inputs([case.messages[i][1] for i in checked])
    messages = list(case.messages)
    for i, text in zip(checked, texts, strict=True):
        messages[i] = (messages[i][0], text)
    return replace(case, messages=tuple(messages)), verdict


def _retrieves(retriever: Retriever | None, case: Case) -> bool:
    """Whether the service would give the case passages: the release's settings for its
    endpoint, and the case's own ask (as a client's x-appliance-retrieval header)."""
    try:
        return retrieves(retriever, _endpoint(case), _asked(case))
    except ApplianceError as exc:
        raise ApplianceError(f"eval case {case.id}: {exc.message}") from exc


def augmented_case(retriever: Retriever, case: Case) -> tuple[Case, Augmented]:
    """The case with the passages its query finds, placed as the service places them."""
    if case.messages is None:
        augmented = retriever.fetch(case.prompt or "")
        prompt = with_passages_in_prompt(case.prompt or "", augmented.block)
        return replace(case, prompt=prompt), augmented
    messages = list(case.messages)
    augmented = retriever.fetch(chat_query(messages))
    placed = with_passages_in_messages(messages, augmented.block)
    return replace(case, messages=tuple(placed)), augmented


def _endpoint(case: Case) -> str:
    return "completions" if case.messages is None else "chat"


def _asked(case: Case) -> str | None:
    return None if case.retrieval is None else ("on" if case.retrieval else "off")


def _generation(
    spec: EvalSpec, runtime: ModelRuntime, case: Case, routing: Routing | None = None
) -> Generation:
    """The same preparation as the API's: template, tokens, context check, caps."""
    messages = list(case.messages) if case.messages is not None else None
    tokens = runtime.prompt_tokens(messages, case.prompt)
    sampling = SamplingParams(temperature=spec.temperature, seed=spec.seed)
    try:
        scores = routing is not None and routing.policy.judges_confidence
        return runtime.generation(tokens, sampling, spec.max_tokens, scores_confidence=scores)
    except PromptTooLong as exc:
        raise ApplianceError(f"eval case {case.id}: {exc.message}") from exc


def _case_text(case: Case) -> str:
    if case.messages is not None:
        return "\n".join(content for _role, content in case.messages)
    return case.prompt or ""


def _cold_request(spec: EvalSpec, case: Case) -> tuple[Kind, dict]:
    body: dict = {"max_tokens": spec.max_tokens, "temperature": spec.temperature, "seed": spec.seed}
    if case.messages is not None:
        return "chat", {**body, "messages": [{"role": r, "content": c} for r, c in case.messages]}
    return "completion", {**body, "prompt": case.prompt or ""}


def run_over_http(
    spec: EvalSpec,
    url: str,
    api_key: str,
    ref: str,
    manifest_sha256: str,
    progress: Progress | None = None,
    prices: dict[str, float] | None = None,
) -> RunResult:
    """Run against a running service, streaming to time first tokens; `prices` are the
    cold routes' costs per thousand tokens, for cost per success by route. The service must
    serve exactly this release: /v1/models must list it with this manifest digest before
    and after the run, and every response must name it; otherwise EvalTargetError.
    The cost is the service process's own CPU time, from its /metrics."""
    progress, prices = progress or (lambda _n: None), prices or {}
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=600) as http:
        _require_served(http, url, ref, manifest_sha256)
        cpu_before = _service_cpu_seconds(http, url)
        start, monitor = time.monotonic(), HostMonitor()

        def run(case: Case) -> CaseResult:
            result = _http_case(http, spec, case, ref, manifest_sha256, prices)
            progress(1)
            return result

        with concurrent.futures.ThreadPoolExecutor(spec.load.clients) as pool:
            results = list(pool.map(run, spec.cases))
        wall = time.monotonic() - start
        cpu = _service_cpu_seconds(http, url) - cpu_before
        host = monitor.finish(measured_elsewhere=cpu)
        _require_served(http, url, ref, manifest_sha256)
    return RunResult(results, wall, cpu, host)


def _service_cpu_seconds(http: httpx.Client, url: str) -> float:
    """The service process's CPU seconds, from the standard process collector's counter."""
    try:
        response = http.get("/metrics")
        response.raise_for_status()
        for family in text_string_to_metric_families(response.text):
            if family.name == "process_cpu_seconds":
                return float(family.samples[0].value)
    except (httpx.HTTPError, ValueError, IndexError) as exc:
        raise EvalTargetError(f"cannot read the service's CPU time at {url}: {exc}") from exc
    raise EvalTargetError(f"{url}/metrics exports no process_cpu_seconds_total")


def _require_served(http: httpx.Client, url: str, ref: str, manifest_sha256: str) -> None:
    try:
        response = http.get("/v1/models")
        response.raise_for_status()
        models = response.json()["data"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise EvalTargetError(f"cannot list the models served at {url}: {exc}") from exc
    served = {m.get("id"): m.get("manifest_sha256") for m in models if isinstance(m, dict)}
    if served.get(ref) != manifest_sha256:
        listed = ", ".join(f"{k} ({str(v)[:12]})" for k, v in served.items()) or "nothing"
        raise EvalTargetError(
            f"the service at {url} serves {listed}, not {ref} ({manifest_sha256[:12]}): "
            "a report must measure the exact release it gates (activate it there, or run "
            "the eval in-process without --url)"
        )


def _http_case(
    http: httpx.Client,
    spec: EvalSpec,
    case: Case,
    ref: str,
    manifest_sha256: str,
    prices: dict[str, float],
) -> CaseResult:
    body: dict = {
        "model": ref,
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,
        "seed": spec.seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if case.messages is not None:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": r, "content": c} for r, c in case.messages]
    else:
        path, body["prompt"] = "/v1/completions", case.prompt or ""
    started, first, parts, used, guard, said = time.monotonic(), None, [], {}, [], None
    asked = _asked(case)
    headers = {RETRIEVAL_HEADER: asked} if asked else {}
    with http.stream("POST", path, json=body, headers=headers) as response:
        if response.status_code == 400:
            refused = _content_filtered(response)
            if refused is not None:  # the release's input policy denied it: scored as such
                latency = (time.monotonic() - started) * 1000
                return replace(score_case(case, "", latency, None, 0), guard=refused)
        if response.status_code != 200:
            raise ApplianceError(
                f"eval case {case.id}: the service answered {response.status_code}"
            )
        route = response.headers.get(ROUTE_HEADER, "hot")
        # a cold path's answer names no release: the service routed it (its route says so)
        if (
            not route.startswith("cold:")
            and response.headers.get(MANIFEST_HEADER) != manifest_sha256
        ):
            raise EvalTargetError(
                f"eval case {case.id} was answered by other content than {ref} "
                f"({response.headers.get(MANIFEST_HEADER, 'unnamed')[:12]}): the service "
                "switched releases during the run; run it again"
            )
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if text and first is None:
                    first = time.monotonic()
                parts.append(text)
            used = chunk.get("usage") or used
            guard = chunk.get(GUARD_FIELD) or guard
            said = chunk.get(RETRIEVAL_FIELD) or said
    latency = (time.monotonic() - started) * 1000
    ttft = (first - started) * 1000 if first else None
    result = score_case(case, "".join(parts), latency, ttft, used.get("completion_tokens", 0))
    cold_cost = used.get("total_tokens", 0) / 1000 * prices.get(route, 0.0)
    escalation = response.headers.get(ESCALATION_HEADER)
    applied = tuple(Applied(**a) for a in guard)
    retrieved = tuple(said["ids"]) if said is not None else None
    return replace(
        result,
        route=route,
        escalation=escalation,
        cold_cost=cold_cost,
        guard=applied,
        retrieved=retrieved,
    )


def _content_filtered(response: httpx.Response) -> tuple[Applied, ...] | None:
    """What the input policy did, when a 400 says it refused the request; else None."""
    try:
        body = json.loads(response.read())
        if body["error"]["code"] != CONTENT_FILTER:
            return None
        return tuple(Applied(**a) for a in body.get(GUARD_FIELD, []))
    except (ValueError, KeyError, TypeError):
        return None
