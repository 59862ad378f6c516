"""The client library's leases: the part of `Client` (cluster_client.py) that grants, keeps alive
and revokes leases, in one call each or kept alive in the background (`async with
client.lease(ttl) as lease:`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from client_errors import (
    ClientCore,
    ClientError,
    ClusterUnavailableError,
    Done,
    LeaseNotFoundError,
    Next,
)
from rpc import raft_pb2, raft_pb2_grpc

_T = TypeVar("_T")


@dataclass(frozen=True)
class LeaseGrant:
    """A lease just granted: its id, its TTL in seconds, and the grant's revision."""

    id: int
    ttl: int
    revision: int


@dataclass(frozen=True)
class LeaseInfo:
    """A lease as its leader sees it: seconds before it expires unless kept alive, its TTL, and
    (when asked for) the keys attached to it, in order."""

    id: int
    remaining: float
    granted_ttl: int
    keys: list[str]


@dataclass
class KeptLease:
    """A lease the client keeps alive in the background (`Client.lease`). `lost` is set, and
    `reason` says why, once it may be gone: the leader said so, or no keepalive was acknowledged
    within its TTL. Its keys then vanish (or already have); nothing renews it."""

    id: int
    ttl: int
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str | None = None
    # This client's clock (the event loop's) when the lease expires at the earliest, counted from
    # when the last acknowledged keepalive was sent.
    expires_at: float = 0.0

    def check(self) -> None:
        """Raise LeaseNotFoundError when the lease is lost."""
        if self.lost.is_set():
            raise LeaseNotFoundError(f"lease {self.id} was lost: {self.reason}")


class LeaseMethods(ClientCore):
    """Leases, mixed into `Client`."""

    async def grant_lease(self, ttl: int, *, lease_id: int = 0) -> LeaseGrant:
        """A new lease that lives `ttl` seconds unless kept alive (id `lease_id`, or 0: the
        cluster picks one). Exactly-once, as every write."""

        def request(session: raft_pb2.Session | None) -> raft_pb2.LeaseGrantRequest:
            return raft_pb2.LeaseGrantRequest(ttl=ttl, id=lease_id, session=session)

        def outcome(response: Any) -> LeaseGrant:
            return LeaseGrant(int(response.id), int(response.ttl), int(response.revision))

        return await self._write(f"grant a {ttl} s lease", "LeaseGrant", request, outcome)

    async def revoke_lease(self, lease_id: int) -> int:
        """End the lease now: every key attached to it is deleted, in one revision; how many.
        LeaseNotFoundError when it is already gone."""

        def request(session: raft_pb2.Session | None) -> raft_pb2.LeaseRevokeRequest:
            return raft_pb2.LeaseRevokeRequest(id=lease_id, session=session)

        return await self._write(
            f"revoke lease {lease_id}", "LeaseRevoke", request, lambda r: int(r.deleted)
        )

    async def _leader_call(
        self, what: str, method: str, request: Any, deadline: float | None = None
    ) -> Any:
        """A call only the leader answers (after confirming it leads), following redirects."""

        async def attempt(
            address: str, stub: raft_pb2_grpc.ClusterStub, seconds: float
        ) -> Done[Any] | Next:
            response = await getattr(stub, method)(request, timeout=seconds)
            if response.success:
                self._leader = address
                return Done(response)
            leader_id = response.current_leader if response.HasField("current_leader") else None
            return self._redirect(address, leader_id, response.leader_address)

        return await self._retry(what, self._read_attempt_timeout, attempt, deadline=deadline)

    async def keep_alive(self, lease_id: int, *, deadline: float | None = None) -> int:
        """One keepalive: the lease lives its TTL (returned, seconds) from now on, as the leader
        counts. LeaseNotFoundError when it is gone (its keys are, or are being, deleted)."""
        response = await self._leader_call(
            f"keep lease {lease_id} alive",
            "LeaseKeepAlive",
            raft_pb2.LeaseKeepAliveRequest(id=lease_id),
            deadline,
        )
        return int(response.ttl)

    async def lease_time_to_live(self, lease_id: int, *, keys: bool = False) -> LeaseInfo:
        """How long the lease has left unless kept alive (and with `keys`, its keys);
        LeaseNotFoundError when it is gone."""
        response = await self._leader_call(
            f"look up lease {lease_id}",
            "LeaseTimeToLive",
            raft_pb2.LeaseTimeToLiveRequest(id=lease_id, keys=keys),
        )
        return LeaseInfo(lease_id, response.remaining, response.granted_ttl, list(response.keys))

    async def leases(self) -> list[int]:
        """The ids of the leases that exist, in order (at most 100,000)."""
        response = await self._leader_call(
            "list leases", "LeaseLeases", raft_pb2.LeaseLeasesRequest()
        )
        return list(response.ids)

    @contextlib.asynccontextmanager
    async def lease(self, ttl: int) -> AsyncIterator[KeptLease]:
        """A new lease, kept alive every ttl/3 seconds while the block runs and revoked when it
        ends. When it is lost (see KeptLease), `lost` is set and keepalives stop; the block is
        not interrupted: watch `lost` (or call `check()`) where that matters."""
        loop = asyncio.get_running_loop()
        # Counted from before the grant was sent: the leader's clock for it cannot start earlier.
        sent = loop.time()
        grant = await self.grant_lease(ttl)
        kept = KeptLease(grant.id, grant.ttl, expires_at=sent + grant.ttl)
        keeper = asyncio.create_task(self._keep(kept), name=f"keep-lease-{grant.id}")
        try:
            yield kept
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            if not kept.lost.is_set():
                with contextlib.suppress(ClientError):
                    await self.revoke_lease(kept.id)

    async def _keep(self, kept: KeptLease) -> None:
        loop = asyncio.get_running_loop()
        interval = kept.ttl / 3
        while True:
            await asyncio.sleep(max(0.0, min(interval, kept.expires_at - loop.time())))
            sent = loop.time()
            left = kept.expires_at - sent
            try:
                if left <= 0:
                    raise ClusterUnavailableError("no keepalive was acknowledged within its TTL")
                ttl = await self.keep_alive(kept.id, deadline=left)
            except ClientError as e:
                kept.reason = str(e)
                kept.lost.set()
                return
            kept.expires_at = sent + ttl
