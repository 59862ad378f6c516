"""Runs `raft_node.py` with an event-loop lag probe: `python -m test.loop_lag <raft_node args>`.

Each stall of the node's event loop longer than the threshold is logged as one line
("event loop stalled for N ms"), for test/snapshot_benchmark.py to report.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

_log = logging.getLogger("raft.loop")

# How often the probe wakes, and the lag it reports (env RAFT_DEMO_LOOP_LAG_MS overrides).
PROBE_INTERVAL = 0.01
DEFAULT_THRESHOLD_MS = 50.0
STALL_LINE = re.compile(
    r"^(\d\d:\d\d:\d\d\.\d\d\d) .*event loop stalled for (\d+) ms "
    r"\((\d+) ms of it on the CPU; the process used (\d+) ms\)"
)


@dataclass(frozen=True)
class Stall:
    """One stall a node logged: how long, and the CPU time its loop's thread and the whole
    process used meanwhile (all in ms)."""

    ms: float
    loop_cpu_ms: float
    process_cpu_ms: float


async def watch_loop_lag(threshold: float, interval: float = PROBE_INTERVAL) -> None:
    """Sleep `interval` again and again; a wake-up later than `threshold` seconds past its due
    time means something held the loop that long. The CPU time the loop's thread used meanwhile
    tells work done on the loop from waiting (for a core, or for the interpreter's lock, which
    another thread of the process may hold while it uses the CPU)."""
    while True:
        due = time.perf_counter() + interval
        cpu, process_cpu = time.thread_time(), time.process_time()
        await asyncio.sleep(interval)
        lag = time.perf_counter() - due
        if lag > threshold:
            _log.warning(
                "event loop stalled for %d ms (%d ms of it on the CPU; the process used %d ms)",
                lag * 1000,
                (time.thread_time() - cpu) * 1000,
                (time.process_time() - process_cpu) * 1000,
            )


def stalls(text: str, start: datetime, end: datetime) -> list[Stall]:
    """The stalls a node logged between two times of the same day."""
    found = []
    for line in text.splitlines():
        match = STALL_LINE.match(line)
        if match:
            at = datetime.strptime(match.group(1), "%H:%M:%S.%f")
            if start <= at <= end:
                found.append(Stall(*(float(match.group(i)) for i in (2, 3, 4))))
    return found


def main() -> int:
    import node_daemon
    import raft_node

    threshold = float(os.environ.get("RAFT_DEMO_LOOP_LAG_MS", DEFAULT_THRESHOLD_MS)) / 1000
    start = raft_node.RaftNode.start
    probes: list[asyncio.Task[Any]] = []

    def start_with_probe(self: raft_node.RaftNode) -> None:
        start(self)
        probes.append(asyncio.get_running_loop().create_task(watch_loop_lag(threshold)))

    raft_node.RaftNode.start = start_with_probe  # type: ignore[method-assign]
    return node_daemon.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())


__all__ = ("Stall", "main", "stalls", "watch_loop_lag")
