"""The host's state while an eval runs: was it quiet enough to judge latency and cost?

Latency and CPU cost measured while other processes compete for the cores say more about
the neighbours than about the release. The runner records what the rest of the host used
(all CPU time spent on the host, less what the measured processes spent), the load
average and the memory left; a spec's `load.max_busy_share` says when that is too much.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil


@dataclass(frozen=True)
class HostState:
    cores: int
    wall_seconds: float
    other_cpu_seconds: float  # CPU the rest of the host used during the run
    busy_share: float  # other_cpu_seconds / (wall_seconds x cores)
    load_1m: float
    memory_available_mib: float  # the lower of the readings at the start and the end

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _busy_cpu_seconds() -> float:
    """CPU time the whole host has spent not idle (steal counts: a neighbour VM had it)."""
    times = psutil.cpu_times()
    not_busy = ("idle", "iowait", "guest", "guest_nice")  # guest time is also in user time
    return sum(times) - sum(getattr(times, name, 0.0) for name in not_busy)


# The kernel counts CPU time in 10 ms ticks: a window much shorter than a second is noise.
MIN_WINDOW_SECONDS = 1.0


class HostMonitor:
    """Started before the measured work, read once after it (over at least
    MIN_WINDOW_SECONDS: a shorter run is followed by a quiet wait that completes the window)."""

    def __init__(self) -> None:
        self._busy = _busy_cpu_seconds()
        self._own = time.process_time()
        self._wall = time.monotonic()
        self._memory = psutil.virtual_memory().available

    def finish(self, measured_elsewhere: float = 0.0) -> HostState:
        """The state over the run. `measured_elsewhere`: CPU seconds a measured process
        other than this one spent (the service, over --url)."""
        time.sleep(max(0.0, MIN_WINDOW_SECONDS - (time.monotonic() - self._wall)))
        wall = time.monotonic() - self._wall
        measured = time.process_time() - self._own + measured_elsewhere
        other = max(0.0, _busy_cpu_seconds() - self._busy - measured)
        cores = psutil.cpu_count() or 1
        memory = min(self._memory, psutil.virtual_memory().available)
        return HostState(
            cores=cores,
            wall_seconds=wall,
            other_cpu_seconds=other,
            busy_share=min(1.0, other / (wall * cores)) if wall > 0 else 0.0,
            load_1m=os.getloadavg()[0],
            memory_available_mib=memory / (1 << 20),
        )
