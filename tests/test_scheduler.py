"""The continuous-batching scheduler on the real engine (the tiny model)."""

from __future__ import annotations

import concurrent.futures
import random
import threading
import time

import pytest

from appliance.serve.config import SamplingParams
from appliance.serve.engine import BatchItem, Engine, EngineConfig
from appliance.serve.scheduler import (
    BACKGROUND_PREFILL_CHUNK,
    MIN_PREFILL_CHUNK,
    STALL_FACTOR,
    Generation,
    PrefillPacer,
    Scheduler,
    SchedulerDown,
)


class RecordingEngine(Engine):
    """The real engine; it also keeps, for every decode step, each item's (slot, position)."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.steps: list[list[tuple[int, int]]] = []

    def decode(self, items: list[BatchItem]) -> None:
        self.steps.append([(item.sequence, item.position) for item in items])
        super().decode(items)


def test_reused_slots_keep_every_decode_step_in_slot_order(tiny_gguf):
    """The root cause of a 2x slowdown on distinct prompts: with a KV stream per slot,
    llama.cpp splits a batch into micro-batches of consecutive sequence ids only, so a
    batch in admission order (which slot reuse scrambles) cost one micro-batch per break.
    Every step must list its slots in ascending order, each slot's tokens together."""
    engine = RecordingEngine(EngineConfig(tiny_gguf, slots=4, context_per_slot=256))
    scheduler = Scheduler(engine, max_queue=64)
    words = ["the", "model", "signed", "bundle", "data", "test", "year", "one", "two"]
    done = threading.Semaphore(0)

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(6):  # distinct prompts and lengths: slots free up out of order
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 40)))
            generation = Generation(
                engine.tokenize(prompt),
                SamplingParams(temperature=0),
                max_tokens=rng.randint(1, 12),
                ignore_eos=True,
            )
            finished = threading.Event()
            scheduler.submit(generation, lambda e, f=finished: e.finish_reason and f.set())
            finished.wait(60)
        done.release()

    for seed in range(6):  # more clients than slots
        threading.Thread(target=client, args=(seed,), daemon=True).start()
    for _ in range(6):
        assert done.acquire(timeout=120)
    scheduler.stop()
    engine.close()

    multi = [step for step in engine.steps if len({slot for slot, _ in step}) > 1]
    assert len(multi) > 20, "the load must batch several slots together"
    for step in engine.steps:
        slots = [slot for slot, _ in step]
        assert slots == sorted(slots), f"slots out of order in a step: {slots}"
        for slot in set(slots):
            positions = [p for s, p in step if s == slot]
            assert positions == list(range(positions[0], positions[0] + len(positions)))


class CopyCountingEngine(RecordingEngine):
    """The real engine; it also counts KV copies from one slot to another."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.copies = 0

    def copy_sequence(self, source: int, target: int) -> None:
        self.copies += 1
        super().copy_sequence(source, target)


def greedy_outputs(engine: Engine, prompts: list[str], max_tokens: int = 10) -> list[str]:
    """Submit every prompt at once; the greedy completions, in order."""
    scheduler = Scheduler(engine, max_queue=64)
    texts = [[] for _ in prompts]
    finished = [threading.Event() for _ in prompts]

    def listener(index: int):
        def on_event(event) -> None:
            texts[index].append(event.text)
            if event.finish_reason:
                finished[index].set()

        return on_event

    generations = [
        Generation(engine.tokenize(p), SamplingParams(temperature=0), max_tokens, ignore_eos=True)
        for p in prompts
    ]
    # All at once, for real: the decode thread admits nothing until every one is queued
    # (else, on a loaded host, the first could finish before the last arrives).
    with scheduler._wake:
        for index, generation in enumerate(generations):
            scheduler.submit(generation, listener(index))
    for event in finished:
        assert event.wait(120)
    scheduler.stop()
    return ["".join(parts) for parts in texts]


def test_a_burst_sharing_a_system_prompt_prefills_it_once_and_copies_it(tiny_gguf):
    """Requests that arrive together with a shared prefix wait for one slot to prefill it,
    then copy its KV cells; each answer is exactly what a slot of its own gives."""
    system = " ".join(["the signed bundle"] * 7)  # about 120 byte tokens
    prompts = [f"{system} {tail}" for tail in ("one", "two", "three", "yes")]
    engine = CopyCountingEngine(EngineConfig(tiny_gguf, slots=4, context_per_slot=256))
    shared = greedy_outputs(engine, prompts)
    prefilled = sum(len(step) for step in engine.steps) - 4 * 9  # minus decoded tokens
    assert engine.copies == 3, "one slot prefills the prefix, three copy it"
    assert prefilled < 2 * len(engine.tokenize(system)), "the prefix was prefilled once"
    engine.close()
    for prompt, answer in zip(prompts, shared, strict=True):
        alone = Engine(EngineConfig(tiny_gguf, slots=1, context_per_slot=256))
        assert greedy_outputs(alone, [prompt]) == [answer]
        alone.close()


@pytest.mark.real_model
def test_a_prefix_cut_outside_the_sliding_window_is_prefilled_again_not_misread(gemma_gguf):
    """Gemma 3 keeps only its window (512 positions, plus a batch) in the windowed layers'
    cache, as llama-server does. After a 1,400-token request, a prompt sharing its first
    ~700 tokens cannot reuse them: the window before position 700 is gone from the cache,
    and llama.cpp would cut there anyway. The slot must be prefilled again and give exactly
    what a fresh slot gives."""
    entries = [f"entry {i} of the audit log is verified." for i in range(125)]
    first = " ".join(entries) + " The first question:"
    second = " ".join(entries[:62]) + " Now a different question about keys:"

    def greedy(engine: Engine, scheduler: Scheduler, text: str) -> str:
        parts, finished = [], threading.Event()

        def listener(event) -> None:
            parts.append(event.text)
            if event.finish_reason:
                finished.set()

        generation = Generation(
            engine.tokenize(text), SamplingParams(temperature=0), 16, ignore_eos=True
        )
        scheduler.submit(generation, listener)
        assert finished.wait(300)
        return "".join(parts)

    outputs = []
    for prompts in ([first, second], [second]):  # a reused slot, then a fresh engine
        engine = Engine(EngineConfig(gemma_gguf, slots=1, context_per_slot=2048))
        scheduler = Scheduler(engine, max_queue=4)
        assert len(engine.tokenize(first)) > 1300 and len(engine.tokenize(second)) < 800
        outputs.append([greedy(engine, scheduler, text) for text in prompts][-1])
        scheduler.stop()
        engine.close()
    assert outputs[0] == outputs[1]


def test_a_long_prompt_is_prefilled_in_chunks_that_keep_running_streams_going():
    pacer = PrefillPacer(batch_tokens=512)
    assert pacer.budget(generating=0) == 512  # nobody waits on a token: the whole batch
    assert pacer.budget(generating=8) == 0  # first learn what a decode-only step costs
    pacer.observe(generating=8, prefill=0, seconds=0.040)  # a decode-only step
    pacer.observe(generating=0, prefill=500, seconds=0.250)  # a prefill-only step
    assert pacer.budget(generating=0) == 512  # nobody waits on a token: full speed
    chunk = pacer.budget(generating=8)
    # 40 ms + chunk x 0.5 ms stays within STALL_FACTOR decode-only steps
    assert MIN_PREFILL_CHUNK < chunk < 512
    assert 0.040 + chunk * 0.0005 <= STALL_FACTOR * 0.040 + 1e-9
    # prefill got costlier (a longer context): the chunk shrinks, never below the minimum
    for _ in range(30):
        pacer.observe(generating=8, prefill=chunk, seconds=0.040 + chunk * 0.010)
    assert pacer.budget(generating=8) == MIN_PREFILL_CHUNK


class FailingEngine(Engine):
    """The real engine, with a fault after it: freeing a slot fails (as a driver bug might)."""

    def forget_sequence(self, sequence: int, from_position: int = 0) -> bool:
        raise RuntimeError("injected fault in forget_sequence")


def test_a_dead_decode_thread_fails_its_requests_and_refuses_new_ones(tiny_gguf):
    engine = FailingEngine(EngineConfig(tiny_gguf, slots=2, context_per_slot=256))
    scheduler = Scheduler(engine, max_queue=4)
    events: list = []
    finished = threading.Event()
    generation = Generation(engine.tokenize("the model"), SamplingParams(), max_tokens=4)
    scheduler.submit(generation, lambda e: e.finish_reason and (events.append(e), finished.set()))
    assert finished.wait(60), "a request must not wait forever on a dead thread"
    assert events[0].finish_reason == "error" and "injected fault" in events[0].error
    assert scheduler.failure and "injected fault" in scheduler.failure
    with pytest.raises(SchedulerDown):
        scheduler.submit(generation, lambda e: None)
    engine.close()


def test_background_work_gives_way_to_a_client_request(tiny_gguf):
    """Stable's replay of a mirrored copy is background work: it prefills in small chunks
    and is cancelled when a client's request arrives, so it never shares a step with one
    (left paused in its slot, it would break the slot order every later step relies on)."""
    engine = RecordingEngine(EngineConfig(tiny_gguf, slots=2, context_per_slot=512))
    scheduler = Scheduler(engine, max_queue=8)
    timeline: list[str] = []  # who got each event, in the scheduler thread's order
    finished = threading.Event()

    def generation(words: int, tokens: int, background: bool) -> Generation:
        prompt = engine.tokenize(" ".join(["signed bundle"] * words))
        sampling = SamplingParams(temperature=0)
        return Generation(prompt, sampling, tokens, ignore_eos=True, background=background)

    finishes: list[str] = []

    def on_background(event) -> None:
        timeline.append("background")
        if event.finish_reason:
            finishes.append(event.finish_reason)
        if len(timeline) == 3:  # mid-generation, a client's request arrives
            scheduler.submit(generation(5, 20, background=False), on_client)

    def on_client(event) -> None:
        timeline.append("client")
        if event.finish_reason:
            finished.set()

    scheduler.submit(generation(10, 100, background=True), on_background)  # ~180 tokens
    assert finished.wait(60)
    scheduler.stop()
    engine.close()

    assert finishes == ["cancelled"]
    first = timeline.index("client")
    assert "background" not in timeline[first + 1 :]
    assert not [step for step in engine.steps if {0, 1} <= {slot for slot, _ in step}]
    background_prefill = [sum(1 for slot, _ in step if slot == 0) for step in engine.steps]
    assert max(background_prefill) == BACKGROUND_PREFILL_CHUNK


class TimedEngine(Engine):
    """The real engine; it also keeps when and on which thread each decode step ran."""

    def __init__(self, config: EngineConfig, spans: list[tuple[float, float, int]]) -> None:
        super().__init__(config)
        self.spans = spans

    def decode(self, items: list[BatchItem]) -> None:
        started = time.perf_counter()
        super().decode(items)
        self.spans.append((started, time.perf_counter(), threading.get_ident()))


def test_two_models_sharing_a_compute_thread_decode_on_it_in_turns(tiny_gguf):
    """llama.cpp computes with an OpenMP thread team per calling thread; a second team
    (a shadow's, even idle) makes libgomp stop spinning at ggml's barriers, which slowed
    the primary's steps by ~30%. Schedulers given one compute thread decode only there,
    so their steps never overlap in time."""
    spans: dict[str, list[tuple[float, float, int]]] = {"primary": [], "shadow": []}
    engines = {
        role: TimedEngine(EngineConfig(tiny_gguf, slots=2, context_per_slot=256), spans[role])
        for role in spans
    }
    compute = concurrent.futures.ThreadPoolExecutor(1)
    primary = Scheduler(engines["primary"], max_queue=8, compute=compute)
    shadow = Scheduler(engines["shadow"], max_queue=8, compute=compute)
    done = threading.Semaphore(0)
    for scheduler in (primary, shadow, primary, shadow):
        prompt = engines["primary"].tokenize("the signed bundle " * 8)
        generation = Generation(prompt, SamplingParams(temperature=0), 60, ignore_eos=True)
        scheduler.submit(generation, lambda e: e.finish_reason and done.release())
    for _ in range(4):
        assert done.acquire(timeout=60)
    for scheduler in (primary, shadow):
        scheduler.stop()
    compute.shutdown()
    for engine in engines.values():
        engine.close()

    assert len(spans["primary"]) > 30 and len(spans["shadow"]) > 30
    threads = {thread for role in spans for _, _, thread in spans[role]}
    assert len(threads) == 1 and threads != {primary._thread.ident}
    for start, end, _ in spans["shadow"]:
        assert not [s for s, e, _ in spans["primary"] if s < end and start < e]
