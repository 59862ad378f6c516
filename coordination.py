"""Locks and elections on leases, revisions and watches (docs/coordination.md), built only on the
client library (`Client`), as any user of the store could build them.

A contender for NAME creates the key `NAME/<lease id>` with its lease, only if absent (compare-and-
swap at mod revision 0). Contenders are ordered by their keys' create revisions: the lowest holds
the lock (or leads the election). A waiter watches only the deletion of the key just before its own
and looks again, so a release wakes one waiter, not all. A holder whose process dies stops keeping
its lease alive: the lease expires, its key goes, and the next waiter takes over. The holder's key's
create revision is its fencing token: each later holder's is higher.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from client_errors import LeaseNotFoundError
from client_kv import KeyValue
from client_leases import KeptLease
from cluster_client import Client

_T = TypeVar("_T")


@dataclass(frozen=True)
class Holder:
    """Who holds a lock or leads an election: its key, value and create revision."""

    key: str
    value: str
    revision: int


async def _unless_lost(lease: KeptLease, work: Awaitable[_T]) -> _T:
    """`work`'s result, or LeaseNotFoundError as soon as the lease is lost."""
    task = asyncio.ensure_future(work)
    lost = asyncio.ensure_future(lease.lost.wait())
    try:
        await asyncio.wait([task, lost], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        lease.check()
        raise AssertionError("the lease's lost event was set without a reason")
    finally:
        task.cancel()
        lost.cancel()


class _Contender:
    """A key under a prefix, waiting for its turn (lowest create revision)."""

    def __init__(self, client: Client, name: str, lease: KeptLease) -> None:
        if not name or name.endswith("/"):
            raise ValueError(f"a lock or election name must not be empty or end with '/': {name!r}")
        self.client = client
        self.prefix = name + "/"
        self.lease = lease
        self.key = f"{self.prefix}{lease.id}"
        self.revision = 0  # this key's create revision, once it exists

    async def _enter(self, value: str) -> None:
        """Create this contender's key (only if absent: a retried call finds its own)."""
        client = self.client
        outcome = await client.compare_and_swap_revision(self.key, 0, value, lease=self.lease.id)
        if outcome.swapped:
            self.revision = outcome.mod_revision
            return
        mine = await client.get_kv(self.key)
        if mine is None:
            raise LeaseNotFoundError(f"lease {self.lease.id} lost its key {self.key!r}")
        self.revision = mine.create_revision

    async def _wait_turn(self) -> None:
        """Until this key has the lowest create revision under the prefix."""
        client = self.client
        while True:
            page = await client.get_range(self.prefix, prefix=True, keys_only=True)
            ahead = [kv for kv in page.kvs if kv.create_revision < self.revision]
            if self.key not in {kv.key for kv in page.kvs}:
                raise LeaseNotFoundError(
                    f"the key {self.key!r} is gone: lease {self.lease.id} expired or was revoked"
                )
            if not ahead and not page.more:
                return
            if not ahead:
                # More keys than a page: look at all of them (rare: 10,000 contenders).
                kvs = await client.get_prefix(self.prefix, keys_only=True)
                ahead = [kv for kv in kvs if kv.create_revision < self.revision]
                if not ahead:
                    return
            before = max(ahead, key=lambda kv: kv.create_revision)
            await self._wait_deleted(before, page.revision)

    async def _wait_deleted(self, before: KeyValue, revision: int) -> None:
        # From the revision the range was read at: a deletion in between is not missed.
        async for event in self.client.watch(before.key, start_revision=revision + 1):
            if event.type == "delete" or event.create_revision != before.create_revision:
                return

    async def _leave(self) -> None:
        await self.client.delete(self.key)


class Lock(_Contender):
    """A lock named `name`, held under `lease` (kept alive by the caller, e.g. `Client.lease`).
    `acquire` waits for it and returns the fencing token; `release` lets it go."""

    async def acquire(self, value: str = "") -> int:
        """Wait until this lease holds the lock; its fencing token (higher than every earlier
        holder's). LeaseNotFoundError when the lease is lost first (nothing is held then)."""

        async def take() -> int:
            await self._enter(value)
            await self._wait_turn()
            return self.revision

        return await _unless_lost(self.lease, take())

    @property
    def token(self) -> int:
        return self.revision

    async def release(self) -> None:
        await self._leave()


@contextlib.asynccontextmanager
async def hold_lock(client: Client, name: str, ttl: int = 10) -> AsyncIterator[Lock]:
    """Hold lock `name` for the block, under a lease of `ttl` seconds kept alive meanwhile (its
    token: `.token`). If the lease is lost, `lock.lease.lost` is set: another may hold it now."""
    async with client.lease(ttl) as lease:
        lock = Lock(client, name, lease)
        await lock.acquire()
        try:
            yield lock
        finally:
            if not lease.lost.is_set():
                with contextlib.suppress(Exception):
                    await lock.release()


class Election(_Contender):
    """An election named `name`, campaigned for under `lease`: the leader is the campaigner with
    the lowest create revision; its value is what observers see."""

    async def campaign(self, value: str) -> int:
        """Wait until this lease leads; its create revision (a fencing token as for a lock)."""

        async def run() -> int:
            await self._enter(value)
            await self._wait_turn()
            return self.revision

        return await _unless_lost(self.lease, run())

    async def proclaim(self, value: str) -> None:
        """As leader, change the value observers see."""
        mine = await self.client.get_kv(self.key)
        if mine is None:
            raise LeaseNotFoundError(f"the key {self.key!r} is gone: not leading")
        outcome = await self.client.compare_and_swap_revision(
            self.key, mine.mod_revision, value, lease=self.lease.id
        )
        if not outcome.swapped:
            raise LeaseNotFoundError(f"the key {self.key!r} changed under us: not leading")

    async def resign(self) -> None:
        await self._leave()


async def leader(client: Client, name: str) -> Holder | None:
    """Who leads election `name` (or holds lock `name`) now, or None."""
    kvs = await client.get_prefix(name + "/")
    if not kvs:
        return None
    first = min(kvs, key=lambda kv: kv.create_revision)
    return Holder(first.key, first.value or "", first.create_revision)


async def observe(client: Client, name: str) -> AsyncIterator[Holder | None]:
    """The leader of election `name` now, then each time it (or its value) changes; None while
    there is none. Never ends by itself."""
    prefix = name + "/"
    page = await client.get_range(prefix, prefix=True)
    contenders = {kv.key: (kv.create_revision, kv.value or "") for kv in page.kvs}
    while page.more and page.next_key is not None:
        page = await client.get_range(prefix, prefix=True, resume_key=page.next_key)
        contenders.update((kv.key, (kv.create_revision, kv.value or "")) for kv in page.kvs)

    def current() -> Holder | None:
        if not contenders:
            return None
        key, (revision, value) = min(contenders.items(), key=lambda item: item[1][0])
        return Holder(key, value, revision)

    shown = current()
    yield shown
    async for event in client.watch(prefix, prefix=True, start_revision=page.revision + 1):
        if event.type == "delete":
            contenders.pop(event.key, None)
        else:
            contenders[event.key] = (event.create_revision, event.value or "")
        now = current()
        if now != shown:
            shown = now
            yield shown
