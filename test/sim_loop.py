"""The simulation's event loop and trace: asyncio on virtual time that jumps from timer to timer,
and a record of every event that is hashed, kept for failure reports, and printed when verbose."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
from collections.abc import Callable
from typing import Any, TextIO


class SimulationStalled(RuntimeError):
    """Nothing was ready to run and no timer was set: every task waits for something that never comes."""


# Loop iterations at one instant beyond which the run counts as a livelock (time never moves on).
LIVELOCK_ITERATIONS = 50_000


class _VirtualSelector:
    """Stands in for the OS selector: there is no I/O, so 'waiting' means jumping to the next timer."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop
        self._still = 0

    def select(self, timeout: float | None) -> list[Any]:
        if timeout is None:
            raise SimulationStalled("nothing is ready to run and no timer is set")
        if timeout > 0:
            self._loop._jump_to_next_timer()
            self._still = 0
        else:
            self._still += 1
            if self._still > LIVELOCK_ITERATIONS:
                raise SimulationStalled(
                    f"livelock: {LIVELOCK_ITERATIONS} loop iterations without time moving on"
                )
        return []

    def close(self) -> None:
        pass


class VirtualTimeLoop(asyncio.BaseEventLoop):
    """An asyncio loop whose clock is simulated: time only moves when every ready callback has run,
    and then straight to the earliest timer. No sockets, no threads, no real sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        self._selector = _VirtualSelector(self)
        # Debug mode (which an environment variable can switch on) measures wall-clock durations.
        self.set_debug(False)

    def time(self) -> float:
        return self._now

    def _jump_to_next_timer(self) -> None:
        scheduled = self._scheduled  # type: ignore[attr-defined]
        if scheduled:
            self._now = max(self._now, scheduled[0]._when)

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass


class Trace:
    """Every event of a run, in order: hashed (the run's fingerprint), the notable ones (all but routine
    network messages) kept for failure reports, and all printed as they happen when verbose."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        verbose: bool,
        out: TextIO | None = None,
    ) -> None:
        self._loop = loop
        self._hash = hashlib.sha256()
        self.verbose = verbose
        self._out = out if out is not None else sys.stdout
        self.notable: list[tuple[float, str]] = []
        self.count = 0
        self._closed = False

    def close(self) -> None:
        """Record nothing more (what follows, shutting the run down, is not part of it)."""
        self._closed = True

    def event(self, source: str, text: str, notable: bool = True) -> None:
        """Record one event; `notable` ones may also appear in a failure report."""
        if self._closed:
            return
        now = self._loop.time()
        line = f"{now:10.6f} {source:<7}{text}"
        self._hash.update(line.encode())
        self._hash.update(b"\n")
        self.count += 1
        if notable:
            self.notable.append((now, line))
        if self.verbose:
            try:
                print(line, file=self._out)
            except BrokenPipeError:
                # The reader went away (e.g. `| head`); the run itself goes on.
                self.verbose = False

    def recent(self, until: float, count: int = 40) -> list[str]:
        """The last `count` notable events at or before simulated time `until`."""
        lines = [line for when, line in self.notable if when <= until]
        return lines[-count:]

    def digest(self) -> str:
        return self._hash.hexdigest()


class TraceHandler(logging.Handler):
    """Puts the nodes' own narration (the `raft` loggers) into the trace, at simulated time."""

    def __init__(self, trace: Trace, on_error: Callable[[str], None] | None = None) -> None:
        super().__init__(logging.INFO)
        self._trace = trace
        self._on_error = on_error

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text = f"{text}: {record.exc_info[1]!r}"
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname}: {text}"
        self._trace.event("node", text)
        if record.levelno >= logging.ERROR and self._on_error is not None:
            self._on_error(text)
