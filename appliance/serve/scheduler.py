"""Continuous batching: one thread drives llama.cpp for every request of one model.

Each step decodes, in one llama_decode call, the last sampled token of every generating
slot plus a chunk of prompt prefill (bounded, so a long prompt never stalls running
streams). New requests join between steps; a finished, cancelled or expired request frees
its slot at once. A free slot keeps its KV cells: a new request goes to the free slot that
already holds the longest prefix of its prompt (a shared system prompt, a repeated eval
prompt, the previous turn of a chat) and prefills only the rest. The queue is bounded:
when it is full, submit() refuses and the API answers 429.
"""

from __future__ import annotations

import codecs
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.serve.config import SamplingParams
from appliance.serve.engine import BatchItem, Engine, Sampler

log = logging.getLogger("appliance.serve")

# A prefix another slot holds is copied when it is at least this many tokens longer than
# what the chosen slot holds itself.
COPY_MIN_TOKENS = 32
# While streams are generating, a step that also prefills a prompt may take at most this
# many times as long as a step that only decodes.
STALL_FACTOR = 4.0
MIN_PREFILL_CHUNK = 64  # see PrefillPacer
YIELD_SECONDS = 0.005  # how long a shadow waits before it looks at the primary again
# A step of mirrored work only (a shadow's copies, stable's replay of one) prefills at most
# this many tokens, so a client's request that arrives mid-step waits for tens of
# milliseconds, not a whole prompt's prefill.
BACKGROUND_PREFILL_CHUNK = 32


class QueueFull(Exception):
    """The request queue is at its limit."""


class Unloading(Exception):
    """The model is being unloaded (a hot swap replaced it): submit to its successor."""


class SchedulerDown(Exception):
    """The decode thread died; this model serves nothing more (see Scheduler.failure)."""


@dataclass(frozen=True)
class Generation:
    prompt_tokens: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    deadline: float = float("inf")  # time.monotonic() by which it must finish
    # Mirrored work no client waits for: it prefills in small chunks and is cancelled as
    # soon as a client's request is admitted beside it.
    background: bool = False
    # Sum each sampled token's log-probability, for a routing policy's confidence rule.
    scores_confidence: bool = False


@dataclass
class Event:
    """What a request's listener receives: text deltas, then one final event."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled", "timeout", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_seconds: float = 0.0
    error: str = ""
    mean_logprob: float | None = None  # when the generation scores its confidence


Listener = Callable[[Event], None]


@dataclass
class _Active:
    generation: Generation
    listener: Listener
    cancelled: threading.Event
    enqueued_at: float
    slot: int = -1
    sampler: Sampler | None = None
    prefilled: int = 0  # prompt tokens already in the slot's KV cells
    decoded: list[int] = field(default_factory=list)  # every token now in the KV cells
    pending_token: int | None = None  # sampled, not yet decoded
    generated: int = 0
    logprob_sum: float = 0.0  # of the tokens sampled so far (end of generation included)
    sampled: int = 0
    started_at: float = 0.0
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    text: str = ""  # generated text not yet sent (held back while it may start a stop string)

    @property
    def position(self) -> int:
        return len(self.generation.prompt_tokens) + self.generated


@dataclass
class Ticket:
    """A submitted request: cancel() frees its slot at the next step."""

    cancelled: threading.Event

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class SchedulerStats:
    queued: int = 0
    busy_slots: int = 0
    steps: int = 0
    max_sequences_in_step: int = 0


class PrefillPacer:
    """How many prompt tokens one step may prefill beside the streams it decodes.

    A step costs about (a decode-only step for that many streams) + (prefill tokens x cost
    per token). Both are learned from the steps themselves (moving averages), and the
    prefill chunk is sized so that a step stays within STALL_FACTOR decode-only steps: a
    1,500-token prompt then spreads over many steps instead of stopping every running
    stream for ~0.9 s per 512-token chunk. With nothing generating, a prompt gets the
    whole batch. A chunk is never under MIN_PREFILL_CHUNK, and here the floor is what
    binds: at ~1,000 tokens of context a token of prefill costs ~2-3 ms on 2 cores, so a
    64-token chunk beside 7 streams is a ~230 ms step (~6 decode-only steps). 128 would
    prefill ~20% faster (16 clients of long and short prompts, in-process: 58 s against
    74 s) at the price of ~300-390 ms steps, so running streams would pause longer."""

    SMOOTHING = 0.2

    def __init__(self, batch_tokens: int) -> None:
        self.batch_tokens = batch_tokens
        self.decode_seconds: dict[int, float] = {}  # streams decoded -> a step's seconds
        self.seconds_per_prefill_token: float | None = None

    def budget(self, generating: int) -> int:
        """Prefill tokens allowed in a step that decodes `generating` streams."""
        room = self.batch_tokens - generating
        if generating == 0:
            return room
        decode = self._decode_estimate(generating)
        if decode is None:
            return 0  # one decode-only step first, to learn what a step costs here
        if not self.seconds_per_prefill_token:
            return MIN_PREFILL_CHUNK
        allowed = (STALL_FACTOR - 1) * decode / self.seconds_per_prefill_token
        return max(MIN_PREFILL_CHUNK, min(room, int(allowed)))

    def observe(self, generating: int, prefill: int, seconds: float) -> None:
        if prefill == 0:
            self.decode_seconds[generating] = _average(self.decode_seconds.get(generating), seconds)
            return
        decode = self._decode_estimate(generating) if generating else 0.0
        # a few prompt tokens say little about the cost per token: fixed costs dominate
        if decode is None or prefill < MIN_PREFILL_CHUNK:
            return
        per_token = max(seconds - decode, 0.0) / prefill
        self.seconds_per_prefill_token = _average(self.seconds_per_prefill_token, per_token)

    def _decode_estimate(self, generating: int) -> float | None:
        if not self.decode_seconds:
            return None
        nearest = min(self.decode_seconds, key=lambda n: abs(n - generating))
        return self.decode_seconds[nearest]


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + PrefillPacer.SMOOTHING * (new - old)


class Scheduler:
    def __init__(
        self, engine: Engine, max_queue: int, compute: concurrent.futures.Executor | None = None
    ) -> None:
        self.engine = engine
        self.slots = engine.config.slots
        self.max_queue = max_queue
        self.stats = SchedulerStats()
        self._queue: collections.deque[_Active] = collections.deque()
        self._active: dict[int, _Active] = {}
        self._cached: dict[int, list[int]] = {}  # free slot -> tokens its KV cells hold
        self._pacer = PrefillPacer(engine.config.batch_tokens)
        self._wake = threading.Condition()
        self._stopping = False
        self.failure: str | None = None  # why the decode thread died, if it did
        # A shadow's scheduler steps only while this says the primary is idle, so mirrored
        # work runs on CPU the primary is not using (set by the service, read each step).
        self.yields_to: Callable[[], bool] | None = None
        # Where llama.cpp computes this scheduler's steps (None: on the scheduler thread).
        # Every model of a service shares one compute thread; see the Service.
        self.compute = compute
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    def submit(self, generation: Generation, listener: Listener) -> Ticket:
        active = _Active(generation, listener, threading.Event(), time.monotonic())
        with self._wake:
            if self.failure is not None:
                raise SchedulerDown(self.failure)
            if self._stopping:
                raise Unloading("the model is being unloaded")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._queue.append(active)
            self.stats.queued = len(self._queue)
            self._wake.notify()
        return Ticket(active.cancelled)

    @property
    def in_flight(self) -> int:
        with self._wake:
            return len(self._queue) + len(self._active)

    def stop(self) -> None:
        """Finish what is running, refuse new work, then stop the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    # -- the decode loop (scheduler thread only) ----------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # said in /readyz and the log, not lost
            self._die(f"the decode thread died: {type(exc).__name__}: {exc}")

    def _die(self, failure: str) -> None:
        """End every request with an error and refuse new ones; /readyz reports it."""
        log.critical("%s; this model serves nothing more", failure)
        with self._wake:
            self.failure = failure
            pending = [*self._queue, *self._active.values()]
            self._queue.clear()
            self._active.clear()
        for active in pending:
            self._emit(active, Event(finish_reason="error", error=failure))

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._active and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._queue and not self._active:
                    return
                self._admit()
            self._drop_cancelled()
            if self.yields_to is not None and self.yields_to() and not self._stopping:
                time.sleep(YIELD_SECONDS)  # a shadow: the primary has work, so wait
                continue
            if self._active:
                self._step()

    def _admit(self) -> None:
        deferred: list[_Active] = []
        while len(self._active) < self.slots and self._queue:
            active = self._queue.popleft()
            if self._prefix_coming(active.generation.prompt_tokens):
                deferred.append(active)
                continue
            try:
                active.slot, active.prefilled = self._claim_slot(active.generation.prompt_tokens)
            except BaseException:
                self._queue.extendleft(reversed([*deferred, active]))  # owed answers: _die
                raise
            active.decoded = active.generation.prompt_tokens[: active.prefilled]
            active.sampler = Sampler(active.generation.sampling)
            active.started_at = time.monotonic()
            self._active[active.slot] = active
        self._queue.extendleft(reversed(deferred))
        self.stats.queued = len(self._queue)
        self.stats.busy_slots = len(self._active)
        if any(not a.generation.background for a in self._active.values()):
            for active in self._active.values():
                if active.generation.background:  # gives way to a client's request at once:
                    active.cancelled.set()  # pausing it would leave a gap in the slot order

    def _claim_slot(self, prompt: list[int]) -> tuple[int, int]:
        """The free slot sharing the longest prefix with `prompt`, and how much to keep.

        When another slot holds a much longer prefix of it (a shared system prompt that
        this slot has not seen), that slot's cells are copied over instead of prefilling
        the prefix again: a copy of a slot's KV stream costs milliseconds, a prefill of a
        few hundred tokens a second on a small CPU."""
        free = [s for s in range(self.slots) if s not in self._active]
        reuse = {s: _common_prefix(self._cached.get(s, []), prompt) for s in free}
        # The longest reusable prefix; on a tie the lowest slot, so that busy slots stay
        # contiguous (see _in_slot_order).
        slot = max(free, key=lambda s: (reuse[s], -s))
        keep = reuse[slot]
        donor, shared = self._best_donor(prompt, exclude=slot)
        if donor is not None and shared - keep >= COPY_MIN_TOKENS:
            self.engine.copy_sequence(donor, slot)
            keep = shared
        keep = min(keep, len(prompt) - 1)  # the last prompt token is decoded for logits
        if not self.engine.forget_sequence(slot, keep):
            self.engine.forget_sequence(slot)
            keep = 0
        self._cached.pop(slot, None)
        return slot, keep

    def _held_tokens(self) -> dict[int, list[int]]:
        """Each slot's tokens now in its KV cells, busy slots and free ones."""
        held = dict(self._cached)
        held.update({slot: active.decoded for slot, active in self._active.items()})
        return held

    def _best_donor(self, prompt: list[int], exclude: int) -> tuple[int | None, int]:
        shared = {
            slot: _common_prefix(tokens, prompt)
            for slot, tokens in self._held_tokens().items()
            if slot != exclude
        }
        if not shared:
            return None, 0
        donor = max(shared, key=lambda s: shared[s])
        return donor, shared[donor]

    def _prefix_coming(self, prompt: list[int]) -> bool:
        """Is a busy slot prefilling a prefix of this prompt, long enough to copy later,
        that no slot holds yet? Then this request waits a step or two and copies it,
        rather than prefilling the same tokens beside it (a burst of requests that share
        a system prompt)."""
        _donor, held = self._best_donor(prompt, exclude=-1)
        for active in self._active.values():
            coming = _common_prefix(active.generation.prompt_tokens, prompt)
            if active.prefilled < coming and coming - held >= COPY_MIN_TOKENS:
                return True
        return False

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for active in list(self._active.values()):
            if active.cancelled.is_set():
                self._finish(active, "cancelled")
            elif now > active.generation.deadline:
                self._finish(active, "timeout")

    def _step(self) -> None:
        planned: dict[int, list[BatchItem]] = {}  # slot -> its tokens in this step
        for active in self._active.values():  # generating slots first: one token each
            if active.pending_token is not None:
                item = BatchItem(active.pending_token, active.position - 1, active.slot, True)
                planned[active.slot] = [item]
                active.decoded.append(active.pending_token)
        generating = len(planned)
        budget = self._pacer.budget(generating)
        if all(a.generation.background for a in self._active.values()):
            budget = min(budget, BACKGROUND_PREFILL_CHUNK)  # a client may arrive and wait
        # then prompt prefill, in chunks, the shortest rest first: a short prompt starts
        # streaming at once instead of waiting behind a long one that is paced
        waiting = sorted(
            self._active.values(), key=lambda a: len(a.generation.prompt_tokens) - a.prefilled
        )
        for active in waiting:
            prompt = active.generation.prompt_tokens
            if active.pending_token is not None or active.prefilled >= len(prompt) or budget <= 0:
                continue
            chunk = prompt[active.prefilled : active.prefilled + budget]
            planned[active.slot] = [
                BatchItem(token, position, active.slot, position == len(prompt) - 1)
                for position, token in enumerate(chunk, start=active.prefilled)
            ]
            active.decoded.extend(chunk)
            active.prefilled += len(chunk)
            budget -= len(chunk)
        items, samplers = self._in_slot_order(planned)
        started = time.perf_counter()
        try:
            if self.compute is None:
                self.engine.decode(items)
            else:
                self.compute.submit(self.engine.decode, items).result()
        except Exception as exc:  # a decode failure ends these requests, not the service
            for active in list(self._active.values()):
                self._finish(active, "error", error=str(exc))
            return
        self.stats.steps += 1
        self.stats.max_sequences_in_step = max(self.stats.max_sequences_in_step, len(samplers))
        for active, index in samplers:
            token = active.sampler.sample(self.engine, index)
            if active.generation.scores_confidence:
                active.logprob_sum += self.engine.logprob(index, token)
                active.sampled += 1
            self._accept(active, token)
        self._pacer.observe(generating, len(items) - generating, time.perf_counter() - started)

    def _in_slot_order(
        self, planned: dict[int, list[BatchItem]]
    ) -> tuple[list[BatchItem], list[tuple[_Active, int]]]:
        """The batch, one slot after another in ascending order, and where each sampling
        slot's logits are. With a KV stream per slot, llama.cpp splits a batch into
        micro-batches of consecutive sequence ids only (split_equal, sequential): slots out
        of order, as admission order leaves them, cost one extra micro-batch per break, so
        every decode step got slower as slots were reused (62 -> 88 ms for 8 tokens)."""
        items: list[BatchItem] = []
        samplers: list[tuple[_Active, int]] = []
        for slot in sorted(planned):
            for item in planned[slot]:
                if item.wants_logits:
                    samplers.append((self._active[slot], len(items)))
                items.append(item)
        return items, samplers

    def _accept(self, active: _Active, token: int) -> None:
        generation = active.generation
        if self.engine.is_end_of_generation(token) and not generation.ignore_eos:
            active.text += active.decoder.decode(b"", final=True)
            self._finish(active, "stop")
            return
        active.generated += 1
        active.text += active.decoder.decode(self.engine.piece(token))
        stop_at = _find_stop(active.text, generation.stop)
        if stop_at is not None:
            active.text = active.text[:stop_at]
            self._finish(active, "stop")
            return
        out_of_room = active.position >= self.engine.context_per_slot
        if active.generated >= generation.max_tokens or out_of_room:
            active.text += active.decoder.decode(b"", final=True)
            self._finish(active, "length")
            return
        keep = _held_back(active.text, generation.stop)
        if len(active.text) > keep:
            self._emit(active, Event(text=active.text[: len(active.text) - keep]))
            active.text = active.text[len(active.text) - keep :]
        active.pending_token = token

    def _finish(self, active: _Active, reason: str, error: str = "") -> None:
        if reason == "error":
            self.engine.forget_sequence(active.slot)
        else:  # keep the KV cells for a later request with the same prefix
            self._cached[active.slot] = active.decoded
        active.sampler.close()
        del self._active[active.slot]
        self.stats.busy_slots = len(self._active)
        self._emit(
            active,
            Event(
                text=active.text if reason in ("stop", "length") else "",
                finish_reason=reason,
                prompt_tokens=len(active.generation.prompt_tokens),
                completion_tokens=active.generated,
                queue_seconds=active.started_at - active.enqueued_at,
                error=error,
                mean_logprob=active.logprob_sum / active.sampled if active.sampled else None,
            ),
        )

    @staticmethod
    def _emit(active: _Active, event: Event) -> None:
        try:
            active.listener(event)
        except Exception:  # a listener whose client went away must not stop the loop
            active.cancelled.set()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could still begin a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                longest = max(longest, n)
                break
    return longest
