"""Run an eval spec's cases against a model: in-process on the engine (a staged release that
does not serve yet) or against a running service. The spec's load profile says how many
requests are in flight (`load.clients`); each is timed from the moment it is sent, so a
latency is the release's, not the time a case waited behind the others in the runner."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from appliance.errors import ApplianceError, EvalTargetError, PromptTooLong
from appliance.evals.host import HostMonitor, HostState
from appliance.evals.scorers import SCORERS
from appliance.evals.spec import Case, EvalSpec
from appliance.serve.config import MANIFEST_HEADER, SamplingParams, ServiceOptions, ServingConfig
from appliance.serve.runtime import ModelRuntime
from appliance.serve.scheduler import Event, Generation

Progress = Callable[[int], None]


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
    spec: EvalSpec, release_dir: Path, progress: Progress | None = None
) -> RunResult:
    """Load the release's model here (it need not be active) and run every case, with as
    many slots as the spec's load has clients."""
    serving = ServingConfig.from_release_dir(release_dir)
    runtime = ModelRuntime.load(
        "eval",
        None,
        release_dir / "model.gguf",
        serving,
        ServiceOptions(slots=spec.load.clients, max_queue=spec.load.clients),
    )
    try:
        return _run_on_runtime(spec, runtime, progress or (lambda _n: None))
    finally:
        runtime.close()


def _run_on_runtime(spec: EvalSpec, runtime: ModelRuntime, progress: Progress) -> RunResult:
    results: dict[str, CaseResult] = {}
    done = threading.Event()
    lock = threading.Lock()
    in_flight = threading.Semaphore(spec.load.clients)
    cases = spec.cases
    # process_time reads CLOCK_PROCESS_CPUTIME_ID (ns); psutil's cpu_times counts 10 ms
    # ticks, and a short run on a small model measured 0 CPU-s, so it cost nothing.
    cpu_start, wall_start = time.process_time(), time.monotonic()
    monitor = HostMonitor()

    def submit(case: Case) -> None:
        parts, first = [], [None]

        def listener(event: Event) -> None:
            if event.text and first[0] is None:
                first[0] = time.monotonic()
            parts.append(event.text)
            if event.finish_reason is None:
                return
            now = time.monotonic()
            ttft = (first[0] - started) * 1000 if first[0] else None
            result = score_case(
                case, "".join(parts), (now - started) * 1000, ttft, event.completion_tokens
            )
            with lock:
                results[case.id] = result
                if len(results) == len(cases):
                    done.set()
            in_flight.release()
            progress(1)

        generation = _generation(spec, runtime, case)
        started = time.monotonic()  # sent to the engine now, with a free slot waiting
        runtime.scheduler.submit(generation, listener)

    for case in cases:
        in_flight.acquire()
        submit(case)
    done.wait()
    cpu = time.process_time() - cpu_start
    wall = time.monotonic() - wall_start
    return RunResult([results[c.id] for c in cases], wall, cpu, monitor.finish())


def _generation(spec: EvalSpec, runtime: ModelRuntime, case: Case) -> Generation:
    """The same preparation as the API's: template, tokens, context check, caps."""
    messages = list(case.messages) if case.messages is not None else None
    tokens = runtime.prompt_tokens(messages, case.prompt)
    sampling = SamplingParams(temperature=spec.temperature, seed=spec.seed)
    try:
        return runtime.generation(tokens, sampling, spec.max_tokens)
    except PromptTooLong as exc:
        raise ApplianceError(f"eval case {case.id}: {exc.message}") from exc


def run_over_http(
    spec: EvalSpec,
    url: str,
    api_key: str,
    ref: str,
    manifest_sha256: str,
    progress: Progress | None = None,
) -> RunResult:
    """Run against a running service, streaming to time first tokens. The service must
    serve exactly this release: /v1/models must list it with this manifest digest before
    and after the run, and every response must name it; otherwise EvalTargetError.
    The cost is the service process's own CPU time, from its /metrics."""
    progress = progress or (lambda _n: None)
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=600) as http:
        _require_served(http, url, ref, manifest_sha256)
        cpu_before = _service_cpu_seconds(http, url)
        start, monitor = time.monotonic(), HostMonitor()

        def run(case: Case) -> CaseResult:
            result = _http_case(http, spec, case, ref, manifest_sha256)
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
    http: httpx.Client, spec: EvalSpec, case: Case, ref: str, manifest_sha256: str
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
    started, first, parts, tokens = time.monotonic(), None, [], 0
    with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            raise ApplianceError(
                f"eval case {case.id}: the service answered {response.status_code}"
            )
        if response.headers.get(MANIFEST_HEADER) != manifest_sha256:
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
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = (time.monotonic() - started) * 1000
    ttft = (first - started) * 1000 if first else None
    return score_case(case, "".join(parts), latency, ttft, tokens)
