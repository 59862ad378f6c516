"""The `Cluster` gRPC service: checks each client request, hands it to the node, and turns the
node's answer (or refusal) into the reply and status code the client expects."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Protocol, TypeVar

import grpc

from backups import Backups
from cluster_batch import BatchServicer
from cluster_config import NodeAddress
from cluster_leases import LeaseServiceNode, LeaseServicer
from cluster_ranges import RangeServicer
from cluster_requests import (
    batch_problem,
    delete_reply,
    get_reply,
    key_problem,
    lease_problem,
    put_reply,
    read_failure,
    redirect,
    session_problem,
    value_problem,
    without_mapping_sessions,
    write_failure,
)
from leases import LeaseRefused
from membership import (
    MAX_NODE_ID,
    ChangeInProgressError,
    Membership,
    MembershipError,
    check_new_member,
)
from node_events import SEND_PACE, EventFeed, EventNarrator, TooManySubscribersError
from node_status import NodeStatus
from node_types import (
    MAX_WIRE_NUMBER,
    CommitUnknownError,
    NotLeaderError,
    OverloadedError,
    SessionExpiredError,
    TransferFailedError,
    UnavailableError,
)
from rpc import raft_pb2, raft_pb2_grpc
from state_machine import (
    ApplyResult,
    CasResult,
    KeyValueStateMachine,
    SessionExpired,
)
from tls import admin_refusal
from watch import (
    DEFAULT_WATCH_QUEUE,
    WatchHub,
)

_Query = TypeVar("_Query")


class LinearizableReads(Protocol):
    """The node's read path (reads.py), for reads other than a single key's."""

    async def linearizable(
        self, query: Callable[[KeyValueStateMachine], _Query], what: str
    ) -> _Query: ...

    async def leader_query(self, query: Callable[[KeyValueStateMachine], _Query]) -> _Query: ...


class ClusterNode(LeaseServiceNode, Protocol):
    """What this service needs from a node: its identity, whom it follows, and the store."""

    @property
    def node_id(self) -> int: ...

    @property
    def narrate(self) -> EventNarrator: ...

    @property
    def role(self) -> str: ...

    @property
    def current_term(self) -> int: ...

    def leader(self) -> tuple[int | None, str | None]: ...

    async def propose_mapping(
        self, key: str, value: str, session: raft_pb2.Session | None = None
    ) -> int: ...

    async def propose(self, command: raft_pb2.Command) -> ApplyResult: ...

    async def propose_entries(
        self, entries: list[raft_pb2.LogEntry]
    ) -> list[ApplyResult | Exception]: ...

    def get_value(self, key: str) -> str | None: ...

    async def linearizable_read(self, key: str) -> str | None: ...

    async def transfer_leadership(self, target_id: int | None = None) -> int: ...

    # Each membership call answers (configuration, the log index it came from, committed).
    def membership(self) -> tuple[Membership, int, bool]: ...

    async def list_members(self) -> tuple[Membership, int, bool]: ...

    async def add_member(
        self, node: NodeAddress, wait_until_voter: bool
    ) -> tuple[Membership, int, bool]: ...

    async def remove_member(self, node_id: int) -> tuple[Membership, int, bool]: ...

    def status(self) -> NodeStatus: ...

    # What the node does, as it happens (node_events.py).
    feed: EventFeed

    # The store itself, for stale reads and watches; and the read path, for linearizable ranges.
    @property
    def state_machine(self) -> KeyValueStateMachine: ...

    @property
    def reads(self) -> LinearizableReads: ...


class ClusterServicer(LeaseServicer, RangeServicer, BatchServicer, raft_pb2_grpc.ClusterServicer):
    """Serves the key-value operations, client registration, GetLeader and the admin calls
    (leadership transfer, membership, backups) for one node. With `admin_names`, the admin calls
    are served only to clients whose verified certificate bears one of those names. Without
    `backups`, SaveSnapshot is UNIMPLEMENTED. Leases: cluster_leases.py."""

    _node: ClusterNode
    _session_problem = staticmethod(session_problem)

    def __init__(
        self,
        node: ClusterNode,
        admin_names: Collection[str] = (),
        backups: Backups | None = None,
        watch_queue: int = DEFAULT_WATCH_QUEUE,
    ) -> None:
        self._node = node
        self._admin_names = frozenset(admin_names)
        self._backups = backups
        self._watches = WatchHub(node.state_machine, queue_limit=watch_queue)

    async def _admin_only(self, context: grpc.aio.ServicerContext) -> None:
        refusal = admin_refusal(context, self._admin_names)
        if refusal is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)

    async def _check(self, context: grpc.aio.ServicerContext, *problems: str | None) -> None:
        for problem in problems:
            if problem is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)

    async def _propose(
        self, command: raft_pb2.Command, context: grpc.aio.ServicerContext
    ) -> ApplyResult:
        """The command's result; raises NotLeaderError; aborts on an unknown outcome or session."""
        try:
            result = await self._node.propose(command)
        except (OverloadedError, CommitUnknownError) as e:
            await context.abort(*write_failure(e))
        if isinstance(result, SessionExpired | LeaseRefused):
            await context.abort(*write_failure(result))
        return result

    async def ProposeMapping(
        self, request: raft_pb2.Mapping, context: grpc.aio.ServicerContext
    ) -> raft_pb2.ProposeMappingResponse:
        await self._check(
            context,
            key_problem(request.key),
            value_problem(request.value),
            session_problem(request.session),
            lease_problem(request.lease),
        )
        if request.lease:
            # Only a command carries a lease (the seed's MAPPING entry has no room for one).
            batch = raft_pb2.MappingBatch(
                mappings=[
                    raft_pb2.Mapping(key=request.key, value=request.value, lease=request.lease)
                ],
                session=request.session,
            )
            try:
                result = await self._propose(raft_pb2.Command(put=batch), context)
            except NotLeaderError as e:
                return redirect(raft_pb2.ProposeMappingResponse(), e)
            return put_reply(result)
        try:
            if request.session.client_id:
                revision = await self._node.propose_mapping(
                    request.key, request.value, request.session
                )
            else:
                revision = await self._node.propose_mapping(request.key, request.value)
        except NotLeaderError as e:
            return redirect(raft_pb2.ProposeMappingResponse(), e)
        except (OverloadedError, CommitUnknownError) as e:
            await context.abort(*write_failure(e))
        except SessionExpiredError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return raft_pb2.ProposeMappingResponse(success=True, revision=revision)

    async def ProposeMappings(
        self, request: raft_pb2.MappingBatch, context: grpc.aio.ServicerContext
    ) -> raft_pb2.ProposeMappingResponse:
        await self._check(context, batch_problem(request), session_problem(request.session))
        batch = without_mapping_sessions(request)
        try:
            result = await self._propose(raft_pb2.Command(put=batch), context)
        except NotLeaderError as e:
            return redirect(raft_pb2.ProposeMappingResponse(), e)
        return put_reply(result)

    async def DeleteKey(
        self, request: raft_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.DeleteResponse:
        await self._check(context, key_problem(request.key), session_problem(request.session))
        try:
            result = await self._propose(raft_pb2.Command(delete=request), context)
        except NotLeaderError as e:
            return redirect(raft_pb2.DeleteResponse(), e)
        return delete_reply(result)

    async def CompareAndSwap(
        self, request: raft_pb2.CompareAndSwapRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.CompareAndSwapResponse:
        await self._check(
            context,
            key_problem(request.key),
            value_problem(request.new_value),
            value_problem(request.expected_value),
            session_problem(request.session),
            lease_problem(request.lease),
            (
                "expected_mod_revision must be 0 (absent) or a revision"
                if not 0 <= request.expected_mod_revision < MAX_WIRE_NUMBER
                else None
            ),
        )
        try:
            result = await self._propose(raft_pb2.Command(compare_and_swap=request), context)
        except NotLeaderError as e:
            return redirect(raft_pb2.CompareAndSwapResponse(), e)
        assert isinstance(result, CasResult)
        response = raft_pb2.CompareAndSwapResponse(
            success=True,
            swapped=result.swapped,
            revision=result.revision,
            mod_revision=result.mod_revision,
        )
        if result.value is not None:
            response.current_value = result.value
        return response

    async def RegisterClient(
        self, request: raft_pb2.RegisterClientRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.RegisterClientResponse:
        try:
            client_id = await self._propose(
                raft_pb2.Command(register_client=raft_pb2.RegisterClientRequest()), context
            )
        except NotLeaderError as e:
            return redirect(raft_pb2.RegisterClientResponse(), e)
        assert isinstance(client_id, int)
        return raft_pb2.RegisterClientResponse(success=True, client_id=client_id)

    async def GetValue(
        self, request: raft_pb2.Key, context: grpc.aio.ServicerContext
    ) -> raft_pb2.GetValueResponse:
        await self._check(context, key_problem(request.key))
        key = request.key
        return await self._read(
            request.allow_stale, functools.partial(get_reply, key=key), f"get {key}", context
        )

    async def _read(
        self,
        stale: bool,
        query: Callable[[KeyValueStateMachine], _Query],
        what: str,
        context: grpc.aio.ServicerContext,
    ) -> _Query:
        """`query` on this node's state: at once when `stale`, else once the state reflects every
        write acknowledged before the call (ReadIndex, reads.py)."""
        if stale:
            return query(self._node.state_machine)
        try:
            return await self._node.reads.linearizable(query, what)
        except (OverloadedError, UnavailableError) as e:
            await context.abort(*read_failure(e))
        raise AssertionError("abort returned")  # pragma: no cover

    async def TransferLeadership(
        self, request: raft_pb2.TransferLeadershipRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.TransferLeadershipResponse:
        """Admin: hand leadership to `target_id` (0: the most up-to-date other node). success once
        that node (with 0, any other node) leads; a redirect when this node does not lead, or when
        another node took over (ask it again); UNAVAILABLE when the transfer was abandoned."""
        await self._admin_only(context)
        target = request.target_id
        if target < 0 or target >= MAX_WIRE_NUMBER:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{target} is not a node id")
        node = self._node
        try:
            new_leader = await node.transfer_leadership(target or None)
        except NotLeaderError as e:
            response = raft_pb2.TransferLeadershipResponse(success=False)
            if e.leader_id is not None:
                response.current_leader = e.leader_id
            if e.leader_address:
                response.leader_address = e.leader_address
            return response
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except TransferFailedError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        leader_id, leader_address = node.leader()
        response = raft_pb2.TransferLeadershipResponse(
            success=new_leader == target or (target == 0 and new_leader != node.node_id),
            current_leader=new_leader,
        )
        if leader_id == new_leader and leader_address:
            response.leader_address = leader_address
        return response

    async def GetLeader(
        self, request: raft_pb2.LeaderRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.LeaderResponse:
        node = self._node
        response = raft_pb2.LeaderResponse(
            node_id=node.node_id, role=node.role, term=node.current_term
        )
        leader_id, leader_address = node.leader()
        if leader_id is not None:
            response.leader_id = leader_id
        if leader_address:
            response.leader_address = leader_address
        return response

    # ---- membership (thesis chapter 4) ----------------------------------------------------------

    def _membership_reply(
        self, answer: tuple[Membership, int, bool]
    ) -> raft_pb2.MembershipResponse:
        membership, index, committed = answer
        response = raft_pb2.MembershipResponse(
            success=True, config=membership.to_proto(), config_index=index, committed=committed
        )
        # Tells the client which member leads (as this node knows it), for `member list`.
        leader_id, leader_address = self._node.leader()
        if leader_id is not None:
            response.current_leader = leader_id
        if leader_address:
            response.leader_address = leader_address
        return response

    async def _change(
        self,
        change: Awaitable[tuple[Membership, int, bool]],
        context: grpc.aio.ServicerContext,
    ) -> raft_pb2.MembershipResponse:
        """Run a membership change on the node and turn its refusals into status codes."""
        try:
            answer = await change
        except NotLeaderError as e:
            return redirect(raft_pb2.MembershipResponse(), e)
        except MembershipError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except ChangeInProgressError as e:
            # Nothing was appended; the same request succeeds once the other change commits.
            await context.abort(grpc.StatusCode.ABORTED, str(e))
        except CommitUnknownError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return self._membership_reply(answer)

    async def ListMembers(
        self, request: raft_pb2.ListMembersRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.MembershipResponse:
        """Admin: the leader's latest configuration (a redirect elsewhere); with allow_stale,
        this node's own, which may lag or not be committed yet. Open to every client the
        service lets in, like GetLeader: it changes nothing (and `status` needs it)."""
        if request.allow_stale:
            return self._membership_reply(self._node.membership())
        try:
            answer = await self._node.list_members()
        except NotLeaderError as e:
            return redirect(raft_pb2.MembershipResponse(), e)
        except UnavailableError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return self._membership_reply(answer)

    async def AddMember(
        self, request: raft_pb2.AddMemberRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.MembershipResponse:
        """Admin: add a node as a learner (promoted to voter once caught up). Answers once the
        learner, or with wait_until_voter its promotion, has committed."""
        await self._admin_only(context)
        node = NodeAddress(request.id, request.raft_address, request.client_address)
        try:
            check_new_member(node)
        except MembershipError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return await self._change(self._node.add_member(node, request.wait_until_voter), context)

    async def RemoveMember(
        self, request: raft_pb2.RemoveMemberRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.MembershipResponse:
        """Admin: remove a voter or learner for good; answers once the change has committed."""
        await self._admin_only(context)
        if not 0 < request.id < MAX_NODE_ID:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node id must be a positive integer below 2^62, not {request.id}",
            )
        return await self._change(self._node.remove_member(request.id), context)

    async def Status(
        self, request: raft_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.StatusResponse:
        """Admin: this node's own view of itself (and, on the leader, of each other member);
        every node answers, whatever its role."""
        return status_to_proto(self._node.status())

    async def SaveSnapshot(
        self, request: raft_pb2.SaveSnapshotRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[raft_pb2.SnapshotChunk]:
        """Admin: a backup of the whole store, taken by the leader at its applied index once a
        read index round confirmed it leads (backups.py), streamed as a backup file in chunks.
        A node that does not lead answers one message: a redirect."""
        await self._admin_only(context)
        if self._backups is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node takes no backups")
        backups = self._backups
        assert backups is not None
        try:
            with backups.slot():
                try:
                    point = await backups.take()
                except NotLeaderError as e:
                    yield redirect(raft_pb2.SnapshotChunk(), e)
                    return
                except UnavailableError as e:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
                meta = point.meta
                yield raft_pb2.SnapshotChunk(
                    success=True, index=meta.index, term=meta.term, cluster_id=meta.cluster_id
                )
                async for data in backups.chunks(point):
                    yield raft_pb2.SnapshotChunk(data=data)
        except OverloadedError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))

    async def Events(
        self, request: raft_pb2.EventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[raft_pb2.NodeEvents]:
        """What this node does, as it happens, until the caller goes away, in batches of what
        accumulated; the first event is the node as it stands. Every node answers. A caller that
        reads too slowly is told how many events it missed (node_events.py); the node never waits
        for it."""
        try:
            subscription = self._node.feed.subscribe()
        except TooManySubscribersError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        try:
            while True:
                yield raft_pb2.NodeEvents(events=await subscription.next_batch())
                await asyncio.sleep(SEND_PACE)
        finally:
            subscription.close()


def status_to_proto(status: NodeStatus) -> raft_pb2.StatusResponse:
    response = raft_pb2.StatusResponse(
        node_id=status.node_id,
        raft_address=status.raft_address,
        client_address=status.client_address,
        role=status.role,
        term=status.term,
        commit_index=status.commit_index,
        applied_index=status.applied_index,
        last_log_index=status.last_log_index,
        snapshot_index=status.snapshot_index,
        voter=status.voter,
        learner=status.learner,
        config=status.config.to_proto(),
        config_index=status.config_index,
        serving=status.serving,
        time_scale=status.time_scale,
    )
    if status.leader_id is not None:
        response.leader_id = status.leader_id
    if status.leader_contact is not None:
        response.leader_contact_seconds = status.leader_contact
    for peer in status.peers:
        made = response.peers.add(
            id=peer.id, voter=peer.voter, match_index=peer.match_index, lag=peer.lag
        )
        if peer.last_contact is not None:
            made.last_contact_seconds = peer.last_contact
    return response
