"""The fault suite's lock workload: clients that take one lock (coordination.py) over and over while
the nemesis works, each recording its critical sections with their fencing tokens and times, and
the check that no two holders were ever inside at once.

A holder counts as inside from the moment `acquire` returned until the earlier of its release and the
end of its lease's validity as the holder itself reckons it: the send time of its last acknowledged
keepalive plus the TTL (`KeptLease.expires_at`). A correct holder stops working then, whether or not it
has heard that the lease expired, and the cluster promises that no lease expires before that moment
(docs/coordination.md). So the check is strict, with no allowance for expired leases:

- every two sections, so cut, are disjoint in time (one's end is at or before the other's start);
- ordered by start, their fencing tokens strictly increase;
- every section started before its lease's validity ran out (a holder never starts already late).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from client_errors import ClientError
from cluster_client import Client
from coordination import Lock

LOCK_NAME = "fault-lock"
# Short enough that a dead or cut-off holder frees the lock within the run's faults.
LOCK_TTL = 3
# How long a holder keeps the lock, in seconds: often across an election, so that a lease expired
# early by a new leader would show as two holders at once.
HOLD = (0.05, 2.0)


@dataclass(frozen=True)
class Section:
    """One holder's time inside the lock (suite clock, seconds) and its fencing token."""

    client: int
    token: int
    lease: int
    start: float
    end: float
    # The holder's own reckoning of when its lease could first expire cut the section short.
    cut: bool


def check_sections(sections: Sequence[Section]) -> list[str]:
    """What is wrong with these sections (see the module's docstring); [] when nothing is."""
    problems: list[str] = []
    ordered = sorted(sections, key=lambda s: (s.start, s.token))
    for section in ordered:
        if section.end < section.start:
            problems.append(f"{_name(section)} ended before it started")
    for earlier, later in zip(ordered, ordered[1:], strict=False):
        if later.start < earlier.end:
            problems.append(f"{_name(earlier)} and {_name(later)} overlap")
        if later.token <= earlier.token:
            problems.append(f"{_name(later)} started after {_name(earlier)} with no higher token")
    return problems


def _name(section: Section) -> str:
    return (
        f"client {section.client}'s section with token {section.token} "
        f"({section.start:.3f}-{section.end:.3f} s)"
    )


@dataclass
class LockWorkload:
    """Clients taking LOCK_NAME in turn; `sections` is what they recorded."""

    clock: Callable[[], float]
    rng: random.Random
    sections: list[Section] = field(default_factory=list)
    # Holders that lost their lease while inside (their sections were cut), and attempts that
    # came to nothing (the lease lost while waiting, the cluster unavailable).
    lost_inside: int = 0
    abandoned: int = 0

    async def client_loop(self, index: int, client: Client, stop: asyncio.Event) -> None:
        rng = random.Random(self.rng.random())
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                async with client.lease(LOCK_TTL) as lease:
                    lock = Lock(client, LOCK_NAME, lease)
                    token = await lock.acquire(f"client {index}")
                    start = self.clock()
                    # On the event loop's clock, which KeptLease.expires_at is on.
                    valid_for = lease.expires_at - loop.time()
                    if valid_for <= 0:
                        # Held, but perhaps no longer: a correct holder does not start.
                        self.abandoned += 1
                        continue
                    hold = rng.uniform(*HOLD)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(hold, max(0.0, valid_for))):
                            await lease.lost.wait()  # a correct holder stops when it loses it
                    now = self.clock()
                    # Cut at the end of the validity the holder knew of when it stopped.
                    left = lease.expires_at - loop.time()
                    cut = left < 0 or lease.lost.is_set()
                    end = now + min(0.0, left)
                    self.sections.append(Section(index, token, lease.id, start, end, cut))
                    self.lost_inside += cut
                    if not lease.lost.is_set():
                        with contextlib.suppress(ClientError):
                            await lock.release()
            except ClientError:
                self.abandoned += 1
                await asyncio.sleep(rng.uniform(0.05, 0.2))

    def report(self) -> list[str]:
        problems = check_sections(self.sections)
        lines = [
            f"lock {LOCK_NAME!r}: {len(self.sections)} critical sections, tokens "
            f"{min((s.token for s in self.sections), default=0)}.."
            f"{max((s.token for s in self.sections), default=0)}; {self.lost_inside} cut short "
            f"by a lost lease, {self.abandoned} attempts abandoned"
        ]
        if problems:
            lines.append(f"MUTUAL EXCLUSION VIOLATED: {len(problems)} problems")
            lines.extend(f"  {p}" for p in problems[:20])
        else:
            lines.append("mutual exclusion: every section disjoint, tokens strictly increasing")
        return lines
