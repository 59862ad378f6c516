"""Leases under the fault suite: a few leases kept alive through the whole run and a few abandoned
at once, each with a key of its own. The watchers' record of when each key was deleted is checked
against the client's own reckoning of each lease: a kept lease's key is never deleted while the
keepalives the leader acknowledged still cover it, and an abandoned lease's key is deleted, never
before its TTL has passed since the grant was sent (docs/coordination.md states the bound)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from dataclasses import dataclass, field

from cluster_client import Client, KeptLease

# Seconds a lease lives unless kept alive: longer than most single faults, so a kept lease is
# usually kept through them, and short enough that an abandoned one ends early in the run.
PROBE_TTL = 4
KEPT = 2
ABANDONED = 2
# How often the kept leases' reckoning is sampled.
SAMPLE_EVERY = 0.05


@dataclass
class _Kept:
    key: str
    lease: KeptLease
    # (loop time, the lease's reckoned expiry then), in time order.
    samples: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class _Abandoned:
    key: str
    lease_id: int
    # Loop time just before the grant was sent: the lease cannot end before this plus its TTL.
    sent: float


class LeaseProbe:
    """Leases with keys, started before the load and checked after it."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._stack = contextlib.AsyncExitStack()
        self._kept: list[_Kept] = []
        self._abandoned: list[_Abandoned] = []
        self._sampler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._client
        for i in range(ABANDONED):
            key = f"lease-abandoned-{i}"
            sent = loop.time()
            grant = await client.grant_lease(PROBE_TTL)
            await client.propose_mapping(key, "abandoned", lease=grant.id)
            self._abandoned.append(_Abandoned(key, grant.id, sent))
        for i in range(KEPT):
            kept = await self._stack.enter_async_context(client.lease(PROBE_TTL))
            key = f"lease-kept-{i}"
            await client.propose_mapping(key, "kept", lease=kept.id)
            self._kept.append(_Kept(key, kept))
        self._sampler = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            for kept in self._kept:
                kept.samples.append((now, kept.lease.expires_at))
            await asyncio.sleep(SAMPLE_EVERY)

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        await self._stack.aclose()

    def check(self, deleted_at: dict[str, float]) -> tuple[str, list[str]]:
        """(a summary line, the problems) given when a watcher was first sent each probe key's
        delete (loop time), if it was."""
        problems: list[str] = []
        lost = 0
        for kept in self._kept:
            lost += kept.lease.lost.is_set()
            when = deleted_at.get(kept.key)
            if when is None:
                continue
            # What the client reckoned then (a later keepalive only moves it further out).
            times = [t for t, _ in kept.samples]
            i = bisect.bisect_right(times, when) - 1
            covered_until = kept.samples[i][1] if i >= 0 else 0.0
            if when < covered_until:
                problems.append(
                    f"{kept.key} (lease {kept.lease.id}) was deleted {covered_until - when:.2f} s "
                    "before its acknowledged keepalives ran out: the lease expired early"
                )
        late: list[float] = []
        for abandoned in self._abandoned:
            when = deleted_at.get(abandoned.key)
            earliest = abandoned.sent + PROBE_TTL
            if when is None:
                problems.append(
                    f"{abandoned.key} (lease {abandoned.lease_id}, abandoned) was never deleted"
                )
            elif when < earliest:
                problems.append(
                    f"{abandoned.key} (lease {abandoned.lease_id}, abandoned) was deleted "
                    f"{earliest - when:.2f} s before its TTL had passed"
                )
            else:
                late.append(when - earliest)
        summary = (
            f"{len(self._kept)} kept alive ({lost} lost to faults longer than their "
            f"{PROBE_TTL} s TTL), {len(self._abandoned)} abandoned"
            + (f" and expired {min(late):.2f} to {max(late):.2f} s after their TTL" if late else "")
        )
        return summary, problems
