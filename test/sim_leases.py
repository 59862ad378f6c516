"""The simulation's leases: a client that grants leases, puts a key with each, keeps some alive for a
while through the faults and then abandons them; and two checks of the bounds docs/coordination.md
states, on the simulated clock every node shares:

- never early: no lease's LeaseExpire is applied (anywhere, for the first time) before its TTL has
  passed since the send of its last acknowledged keepalive (or of its grant);
- never much late: once the faults stop and a stable leader is in place, every lease nobody keeps
  alive is gone within its TTL, a tick and a second of slack.

Its keys (lease/...) are apart from the linearizability clients' keys, so the checker need not model
expiry.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

from lease_keeper import LEASE_TICK
from leases import LeaseGranted
from rpc import raft_pb2
from state_machine import KeyValueStateMachine
from test.sim_network import LEASE_KEY_PREFIX, ClientOp, ClientReply

LEASE_TTL = 2
# How many keepalives (every TTL/3) a lease gets before it is abandoned.
KEEP_ROUNDS = (0, 6)
CLIENT_NUMBER = 1000
CLIENT_TIMEOUT = 1.0
# After the stable leader is in place: the time an abandoned lease may still take to go.
SLACK = 1.0


@dataclass
class _Lease:
    id: int
    # When the grant or the last acknowledged keepalive was sent: the lease lives at least its
    # TTL from then.
    valid_from: float
    expired_at: float | None = None


class LeaseRecord:
    """What the lease client saw acknowledged, and the check of every expiry against it."""

    def __init__(self, now: Callable[[], float], fail: Callable[[str, str], None]) -> None:
        self._now = now
        self._fail = fail
        self.leases: dict[int, _Lease] = {}
        self.expired = 0
        self.keepalives = 0

    def granted(self, lease_id: int, sent: float) -> None:
        self.leases[lease_id] = _Lease(lease_id, sent)

    def kept(self, lease_id: int, sent: float) -> None:
        lease = self.leases[lease_id]
        self.keepalives += 1
        lease.valid_from = max(lease.valid_from, sent)
        if lease.expired_at is not None and lease.expired_at < sent + LEASE_TTL:
            self._fail(
                "lease expired early",
                f"lease {lease_id} expired at {lease.expired_at:.3f} s, yet a keepalive sent at "
                f"{sent:.3f} s was acknowledged (TTL {LEASE_TTL} s)",
            )

    def first_applied(self, entry: raft_pb2.LogEntry) -> None:
        """An entry's first application anywhere (so: committed)."""
        if entry.kind != raft_pb2.ENTRY_KIND_COMMAND:
            return
        if entry.command.WhichOneof("op") != "lease_expire":
            return
        now = self._now()
        for lease_id in entry.command.lease_expire.ids:
            lease = self.leases.get(lease_id)
            if lease is None:
                continue  # its grant's reply never reached the client
            lease.expired_at = now
            self.expired += 1
            if now < lease.valid_from + LEASE_TTL:
                self._fail(
                    "lease expired early",
                    f"lease {lease_id} expired at {now:.3f} s, {now - lease.valid_from:.3f} s "
                    f"after the send of its last acknowledged keepalive (TTL {LEASE_TTL} s)",
                )

    def check_final(self, machine: KeyValueStateMachine, leader_from: float) -> None:
        """Every lease is abandoned by now: each must be gone from the leader's state."""
        now = self._now()
        for lease in self.leases.values():
            if lease.id not in machine.leases:
                continue
            since = max(lease.valid_from, leader_from)
            if now - since > LEASE_TTL + LEASE_TICK + SLACK:
                self._fail(
                    "lease outlived its bound",
                    f"lease {lease.id} (last kept alive from {lease.valid_from:.3f} s) still "
                    f"exists at {now:.3f} s with a stable leader since {leader_from:.3f} s",
                )

    @staticmethod
    def settle_time() -> float:
        """How long after a stable leader is in place every abandoned lease must be gone."""
        return LEASE_TTL + LEASE_TICK + SLACK


class LeaseClient:
    """Grants a lease, puts a key with it, keeps it alive a random number of rounds, abandons it;
    again while the simulation issues operations. Its own random numbers, so the other clients'
    choices stay as they were."""

    def __init__(
        self,
        record: LeaseRecord,
        loop: asyncio.AbstractEventLoop,
        call: Callable[[int, int, ClientOp, asyncio.Future[ClientReply]], None],
        members: Callable[[], list[int]],
        seed: int,
        issuing: Callable[[], bool],
    ) -> None:
        self.record = record
        self.loop = loop
        self._call = call
        self._members = members
        self.rng = random.Random(seed * 7919 + 17)
        self._issuing = issuing
        self.leader: int | None = None

    async def _send(self, op: ClientOp) -> ClientReply | None:
        target = self.leader if self.leader is not None else self.rng.choice(self._members())
        future: asyncio.Future[ClientReply] = self.loop.create_future()
        self._call(CLIENT_NUMBER, target, op, future)
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT):
                reply = await future
        except TimeoutError:
            self.leader = None
            return None
        if reply.status == "not-leader":
            self.leader = reply.leader
        elif reply.status != "ok":
            self.leader = None
        else:
            self.leader = target
        return reply

    async def run(self) -> None:
        number = 0
        while self._issuing():
            sent = self.loop.time()
            reply = await self._send(ClientOp("lease-grant", ttl=LEASE_TTL))
            if reply is None or reply.status != "ok":
                await asyncio.sleep(self.rng.uniform(0.05, 0.3))
                continue
            assert isinstance(reply.result, LeaseGranted)
            lease_id = reply.result.id
            self.record.granted(lease_id, sent)
            number += 1
            await self._send(
                ClientOp("lease-put", f"{LEASE_KEY_PREFIX}{number}", "v", lease=lease_id)
            )
            for _ in range(self.rng.randint(*KEEP_ROUNDS)):
                await asyncio.sleep(LEASE_TTL / 3)
                if not self._issuing():
                    return
                sent = self.loop.time()
                reply = await self._send(ClientOp("keepalive", lease=lease_id))
                if reply is not None and reply.status == "gone":
                    break
                if reply is not None and reply.status == "ok":
                    self.record.kept(lease_id, sent)
