"""The `Cluster` service's lease calls (mixed into cluster_server.ClusterServicer): grant and
revoke are log entries; keepalive and time-to-live are answered by the leader alone, from its own
clock (lease_keeper.py), once a round of heartbeats confirmed it still leads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

import grpc

from cluster_requests import read_failure, redirect
from lease_keeper import LeaseKeeper
from leases import MAX_LEASE_TTL, LeaseGranted, LeaseRevoked
from node_types import MAX_WIRE_NUMBER, NotLeaderError, OverloadedError, UnavailableError
from raft_server import Malformed
from rpc import raft_pb2
from state_machine import ApplyResult, KeyValueStateMachine

_T = TypeVar("_T")

# LeaseLeases lists at most this many ids (a reply stays well under 4 MiB).
MAX_LISTED_LEASES = 100_000
# LeaseTimeToLive lists at most this many keys, and stops once past this many characters of them.
MAX_LISTED_KEYS = 10_000
MAX_LISTED_KEY_BYTES = 2 * 1024 * 1024
# Keepalives of one stream being answered at once; the stream reads no further until one is done.
MAX_STREAM_IN_FLIGHT = 1_000


class LeaderReads(Protocol):
    async def leader_query(self, query: Callable[[KeyValueStateMachine], _T]) -> _T: ...


class LeaseLeadership(Protocol):
    """A leadership term, as far as leases go."""

    @property
    def leases(self) -> LeaseKeeper: ...


class LeaseServiceNode(Protocol):
    """What the lease calls need of a node, beyond cluster_server.ClusterNode's writes."""

    @property
    def is_leader(self) -> bool: ...

    @property
    def leadership(self) -> LeaseLeadership | None: ...

    @property
    def reads(self) -> LeaderReads: ...

    @property
    def state_machine(self) -> KeyValueStateMachine: ...

    def leader(self) -> tuple[int | None, str | None]: ...


def _lease_id_problem(lease_id: int) -> str | None:
    if not 0 < lease_id < MAX_WIRE_NUMBER:
        return f"a lease id is a positive number below 2^62, not {lease_id}"
    return None


async def on_leader(node: LeaseServiceNode, act: Callable[[LeaseKeeper, float], _T]) -> _T:
    """`act(keeper, arrived)` on the leader, once it confirmed (by a round of heartbeats begun
    after `arrived`, the call's arrival) that it still leads, and applied up to its commit index.
    NotLeaderError on any other node or when leadership changed meanwhile; UnavailableError or
    OverloadedError when it could not confirm."""
    leadership = node.leadership
    if leadership is None or not node.is_leader:
        raise NotLeaderError(*node.leader())
    keeper = leadership.leases
    arrived = keeper.now()
    await node.reads.leader_query(lambda machine: None)
    if node.leadership is not leadership:
        raise NotLeaderError(*node.leader())
    return act(keeper, arrived)


def _not_found(lease_id: int) -> str:
    return f"lease {lease_id} not found (never granted, revoked or expired)"


class LeaseServicer:
    """The lease calls of the Cluster service."""

    if TYPE_CHECKING:
        _node: LeaseServiceNode

        async def _check(
            self, context: grpc.aio.ServicerContext, *problems: str | None
        ) -> None: ...

        async def _propose(
            self, command: raft_pb2.Command, context: grpc.aio.ServicerContext
        ) -> ApplyResult: ...

        @staticmethod
        def _session_problem(session: raft_pb2.Session) -> str | None: ...

    async def LeaseGrant(
        self, request: raft_pb2.LeaseGrantRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.LeaseGrantResponse:
        await self._check(
            context,
            (
                f"ttl must be 1 to {MAX_LEASE_TTL} seconds, not {request.ttl}"
                if not 1 <= request.ttl <= MAX_LEASE_TTL
                else None
            ),
            None if request.id == 0 else _lease_id_problem(request.id),
            self._session_problem(request.session),
        )
        try:
            result = await self._propose(raft_pb2.Command(lease_grant=request), context)
        except NotLeaderError as e:
            return redirect(raft_pb2.LeaseGrantResponse(), e)
        assert isinstance(result, LeaseGranted)
        return raft_pb2.LeaseGrantResponse(
            success=True, id=result.id, ttl=result.ttl, revision=result.revision
        )

    async def LeaseRevoke(
        self, request: raft_pb2.LeaseRevokeRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.LeaseRevokeResponse:
        await self._check(
            context, _lease_id_problem(request.id), self._session_problem(request.session)
        )
        try:
            result = await self._propose(raft_pb2.Command(lease_revoke=request), context)
        except NotLeaderError as e:
            return redirect(raft_pb2.LeaseRevokeResponse(), e)
        assert isinstance(result, LeaseRevoked)
        return raft_pb2.LeaseRevokeResponse(
            success=True, deleted=result.deleted, revision=result.revision
        )

    async def _on_leader(
        self, act: Callable[[LeaseKeeper, float], _T], context: grpc.aio.ServicerContext
    ) -> _T:
        """`on_leader`, its refusals other than NotLeaderError turned into status codes."""
        try:
            return await on_leader(self._node, act)
        except (OverloadedError, UnavailableError) as e:
            await context.abort(*read_failure(e))
        raise AssertionError("abort returned")  # pragma: no cover

    async def LeaseKeepAlive(
        self, request: raft_pb2.LeaseKeepAliveRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.LeaseKeepAliveResponse:
        """Leader only: the lease lives its TTL from now; NOT_FOUND when it is gone."""
        await self._check(context, _lease_id_problem(request.id))
        lease_id = request.id
        try:
            ttl = await self._on_leader(
                lambda keeper, arrived: keeper.keep_alive(lease_id, arrived), context
            )
        except NotLeaderError as e:
            return redirect(raft_pb2.LeaseKeepAliveResponse(), e)
        if ttl is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, _not_found(lease_id))
        return raft_pb2.LeaseKeepAliveResponse(success=True, id=lease_id, ttl=ttl)

    async def LeaseKeepAliveStream(
        self,
        requests: AsyncIterator[raft_pb2.LeaseKeepAliveRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[raft_pb2.LeaseKeepAliveResponse]:
        """Keepalives on one stream: a reply per request, in order (ttl 0: the lease is gone).
        Those in flight together share the leader's confirmation rounds. A node that does not
        lead answers one message, a redirect, and ends the stream."""
        pending: asyncio.Queue[asyncio.Task[raft_pb2.LeaseKeepAliveResponse] | None] = (
            asyncio.Queue(MAX_STREAM_IN_FLIGHT)
        )

        async def answer(lease_id: int) -> raft_pb2.LeaseKeepAliveResponse:
            try:
                ttl = await self._on_leader(
                    lambda keeper, arrived: keeper.keep_alive(lease_id, arrived), context
                )
            except NotLeaderError as e:
                return redirect(raft_pb2.LeaseKeepAliveResponse(id=lease_id), e)
            return raft_pb2.LeaseKeepAliveResponse(success=True, id=lease_id, ttl=ttl or 0)

        async def read() -> None:
            try:
                async for request in requests:
                    if isinstance(request, Malformed):
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                    problem = _lease_id_problem(request.id)
                    if problem is not None:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
                    await pending.put(asyncio.ensure_future(answer(request.id)))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await pending.get()) is not None:
                reply = await task
                yield reply
                if not reply.success:
                    return
            await reader  # raises what ended the reading, if anything did
        finally:
            reader.cancel()
            while not pending.empty():
                left = pending.get_nowait()
                if left is not None:
                    left.cancel()

    async def LeaseTimeToLive(
        self, request: raft_pb2.LeaseTimeToLiveRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.LeaseTimeToLiveResponse:
        """Leader only: the seconds left before the leader expires the lease, and its keys."""
        await self._check(context, _lease_id_problem(request.id))
        lease_id = request.id
        machine = self._node.state_machine

        def look(keeper: LeaseKeeper, arrived: float) -> raft_pb2.LeaseTimeToLiveResponse | None:
            remaining = keeper.remaining(lease_id)
            lease = machine.leases.get(lease_id)
            if remaining is None or lease is None:
                return None
            reply = raft_pb2.LeaseTimeToLiveResponse(
                success=True, id=lease_id, remaining=remaining, granted_ttl=lease.ttl
            )
            if request.keys:
                size = 0
                for key in sorted(lease.keys):
                    size += len(key)
                    if len(reply.keys) >= MAX_LISTED_KEYS or size > MAX_LISTED_KEY_BYTES:
                        break
                    reply.keys.append(key)
            return reply

        try:
            found = await self._on_leader(look, context)
        except NotLeaderError as e:
            return redirect(raft_pb2.LeaseTimeToLiveResponse(), e)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, _not_found(lease_id))
        assert found is not None
        return found

    async def LeaseLeases(
        self, request: raft_pb2.LeaseLeasesRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.LeaseLeasesResponse:
        """Leader only: the ids of the leases that exist (the first MAX_LISTED_LEASES, in order)."""

        def ids(keeper: LeaseKeeper, arrived: float) -> list[int]:
            return sorted(self._node.state_machine.leases.leases)[:MAX_LISTED_LEASES]

        try:
            found = await self._on_leader(ids, context)
        except NotLeaderError as e:
            return redirect(raft_pb2.LeaseLeasesResponse(), e)
        return raft_pb2.LeaseLeasesResponse(success=True, ids=found)
