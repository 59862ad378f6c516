"""The leader's clock for leases: when each lease was last kept alive, and the decision that a lease
expired, proposed as one `LeaseExpire` log entry per tick so that every replica applies it alike.

One `LeaseKeeper` lives in each term of a node's leadership (leader.py) and dies with it. Keepalives
are kept in its memory only, never in the log (as etcd does): a new leader knows none of them, so it
starts every lease's clock afresh when it takes over. Since a keepalive is acknowledged only after a
majority confirmed its leader still led (after the keepalive arrived), a newer leader was elected
after that arrival, and so never expires a lease before its TTL has passed since the last
keepalive any leader acknowledged (docs/coordination.md states the bounds).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol

from node_types import Clock, NodeBasics, wait_until_time
from rpc import raft_pb2
from state_machine import KeyValueStateMachine

# How often the leader looks for leases past their time: a lease expires at most this much late.
LEASE_TICK = 0.25
# One LeaseExpire entry names at most this many leases (the rest go at the next tick).
MAX_EXPIRE_PER_ENTRY = 10_000


class LeaseKeeperNode(NodeBasics, Protocol):
    """What the leader's lease clock needs of its node."""

    clock: Clock
    state_machine: KeyValueStateMachine

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None: ...
    def append_as_leader(self, entry: raft_pb2.LogEntry) -> int: ...
    async def wait_for_change(self) -> None: ...


class LeaseKeeper:
    """One leadership term's view of when each lease expires (on this node's monotonic clock)."""

    def __init__(self, node: LeaseKeeperNode, term: int) -> None:
        self.node = node
        self.term = term
        # When each lease expires unless kept alive. A lease not here yet (granted or learnt
        # since the last tick) gets its full TTL from the moment it is first seen.
        self._deadline: dict[int, float] = {}
        # Leases whose LeaseExpire entry is appended but not yet applied: no keepalive saves them.
        self._expiring: set[int] = set()
        self._task: asyncio.Task[Any] | None = None

    def start(self) -> None:
        """The term's leadership began: every lease's clock starts now (none can have been kept
        alive by an earlier leader after this node was elected)."""
        now = self.node.clock.now()
        for lease in self.node.state_machine.leases.leases.values():
            self._deadline[lease.id] = now + lease.ttl
        self._task = self.node.spawn(self._run(), name="lease-expiry")

    def stop(self) -> None:
        """The term's leadership is over: expire nothing more."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def now(self) -> float:
        return self.node.clock.now()

    def keep_alive(self, lease_id: int, arrived: float) -> int | None:
        """Record a keepalive that arrived at `arrived` (and whose leadership was confirmed
        since): the lease's TTL, or None when it is gone or being expired."""
        lease = self.node.state_machine.leases.get(lease_id)
        if lease is None or lease_id in self._expiring:
            return None
        deadline = arrived + lease.ttl
        if deadline > self._deadline.get(lease_id, float("-inf")):
            self._deadline[lease_id] = deadline
        return lease.ttl

    def remaining(self, lease_id: int) -> float | None:
        """Seconds before this leader expires the lease (None: gone, or being expired)."""
        lease = self.node.state_machine.leases.get(lease_id)
        if lease is None or lease_id in self._expiring:
            return None
        deadline = self._deadline.get(lease_id)
        if deadline is None:
            return float(lease.ttl)
        return max(0.0, deadline - self.now())

    async def _run(self) -> None:
        node = self.node
        while True:
            if not node.state_machine.leases:
                # No lease to watch: no timer either, until one is applied.
                await node.wait_for_change()
                continue
            await wait_until_time(node.clock, asyncio.Event(), node.clock.now() + LEASE_TICK)
            try:
                self.tick()
            except Exception as e:  # one bad tick must not end expiry for the whole term
                node.narrate.warning("could not propose lease expiries: %s", e)

    def tick(self) -> list[int]:
        """Propose the expiry of every lease past its time; the ids proposed."""
        node = self.node
        now = node.clock.now()
        leases = node.state_machine.leases.leases
        deadlines = self._deadline
        expired: list[int] = []
        for lease_id, lease in leases.items():
            deadline = deadlines.get(lease_id)
            if deadline is None:
                deadlines[lease_id] = now + lease.ttl
            elif deadline <= now and lease_id not in self._expiring:
                expired.append(lease_id)
                if len(expired) >= MAX_EXPIRE_PER_ENTRY:
                    break
        if len(deadlines) > len(leases):
            for lease_id in [i for i in deadlines if i not in leases]:
                del deadlines[lease_id]
                self._expiring.discard(lease_id)
        if not expired or not node.is_leader or node.current_term != self.term:
            return []
        entry = raft_pb2.LogEntry(
            kind=raft_pb2.ENTRY_KIND_COMMAND,
            command=raft_pb2.Command(lease_expire=raft_pb2.LeaseExpire(ids=expired)),
        )
        node.append_as_leader(entry)
        self._expiring.update(expired)
        shown = ", ".join(str(i) for i in expired[:5]) + (" ..." if len(expired) > 5 else "")
        node.narrate.info(
            "expiring %d lease%s (%s): not kept alive within their TTL",
            len(expired),
            "" if len(expired) == 1 else "s",
            shown,
        )
        return expired
