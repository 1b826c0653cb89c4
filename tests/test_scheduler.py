"""The continuous-batching scheduler on the real engine (the tiny model)."""

from __future__ import annotations

import random
import threading

from appliance.serve.config import SamplingParams
from appliance.serve.engine import BatchItem, Engine, EngineConfig
from appliance.serve.scheduler import Generation, Scheduler


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
