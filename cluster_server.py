"""The `Cluster` gRPC service: checks each client request, hands it to the node, and turns the
node's answer (or refusal) into the reply and status code the client expects."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Protocol, TypeVar

import grpc

from backups import Backups
from cluster_config import NodeAddress
from cluster_leases import LeaseServiceNode, LeaseServicer, lease_problem
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
    put_entry,
)
from rpc import raft_pb2, raft_pb2_grpc
from state_machine import (
    ApplyResult,
    CasResult,
    DeleteRangeResult,
    DeleteResult,
    KeyValueStateMachine,
    RangePage,
    SessionExpired,
    range_bounds,
)
from tls import admin_refusal
from watch import (
    DEFAULT_WATCH_QUEUE,
    PROGRESS_INTERVAL,
    KeyRange,
    SlowWatcherError,
    TooManyWatchersError,
    WatchHub,
)
from watch_window import CompactedError

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1024 * 1024
# One ProposeMappings batch is one log entry: bounded so it fits a message to the followers.
MAX_BATCH_MAPPINGS = 1000
MAX_BATCH_BYTES = 2 * 1024 * 1024
# One Batch call holds at most this many ops; the gets among them are answered within this many
# bytes of values (a message to the client stays under 4 MiB), the rest told to ask alone.
MAX_CALL_OPS = 1000
BATCH_REPLY_BUDGET = 3 * 1024 * 1024
# One Range reply carries at most this many keys, and stops adding keys once past this many bytes
# of keys and values (one key and its value are at most 1 MiB + 1 KiB): well under the 4 MiB a
# reply may be. Follow `more`.
MAX_RANGE_LIMIT = 10_000
MAX_RANGE_BYTES = 2 * 1024 * 1024

_Query = TypeVar("_Query")

# The write replies that carry a redirect (success, current_leader, leader_address).
_WriteReply = TypeVar(
    "_WriteReply",
    raft_pb2.ProposeMappingResponse,
    raft_pb2.DeleteResponse,
    raft_pb2.CompareAndSwapResponse,
    raft_pb2.RegisterClientResponse,
    raft_pb2.MembershipResponse,
    raft_pb2.SnapshotChunk,
    raft_pb2.DeleteRangeResponse,
)


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


def key_problem(key: str) -> str | None:
    """Why `key` cannot be stored, or None when it is acceptable."""
    if not key:
        return "key must not be empty"
    size = len(key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        return f"key is {size} bytes in UTF-8; the limit is {MAX_KEY_BYTES} bytes"
    return None


def value_problem(value: str) -> str | None:
    """Why `value` cannot be stored, or None when it is acceptable."""
    # Only strings near the limit can exceed it; skip encoding the common small value.
    if len(value) * 4 <= MAX_VALUE_BYTES:
        return None
    size = len(value.encode("utf-8"))
    if size > MAX_VALUE_BYTES:
        return f"value is {size} bytes in UTF-8; the limit is {MAX_VALUE_BYTES} bytes (1 MiB)"
    return None


def session_problem(session: raft_pb2.Session) -> str | None:
    """Why a write's session is malformed, or None (no session, client_id 0, is fine)."""
    numbers = (session.client_id, session.sequence, session.first_outstanding)
    if any(n < 0 or n >= MAX_WIRE_NUMBER for n in numbers):
        return "session numbers must be non-negative and below 2^62"
    if session.client_id == 0:
        if session.sequence or session.first_outstanding:
            return "a session with a sequence number needs the client_id from RegisterClient"
        return None
    if session.sequence < 1:
        return "a session's sequence numbers start at 1"
    if session.first_outstanding > session.sequence:
        return "first_outstanding cannot be above the request's own sequence number"
    return None


def batch_problem(batch: raft_pb2.MappingBatch) -> str | None:
    """Why a ProposeMappings batch cannot be applied, or None when it is acceptable."""
    count = len(batch.mappings)
    if count == 0:
        return "a batch needs at least one mapping"
    if count > MAX_BATCH_MAPPINGS:
        return f"a batch holds {count} mappings; the limit is {MAX_BATCH_MAPPINGS}"
    size = 0
    for mapping in batch.mappings:
        problem = (
            key_problem(mapping.key) or value_problem(mapping.value) or lease_problem(mapping.lease)
        )
        if problem is not None:
            return f"mapping for {mapping.key[:40]!r}: {problem}"
        size += len(mapping.key.encode("utf-8")) + len(mapping.value.encode("utf-8"))
    if size > MAX_BATCH_BYTES:
        return f"a batch holds {size} bytes of keys and values; the limit is {MAX_BATCH_BYTES}"
    return None


def range_problem(key: str, range_end: str | None, prefix: bool) -> str | None:
    """Why a request's range of keys is malformed, or None when it is acceptable."""
    if prefix and range_end is not None:
        return "give a prefix or a range_end, not both"
    for name, text in (("key", key), ("range_end", range_end or "")):
        size = len(text.encode("utf-8"))
        if size > MAX_KEY_BYTES:
            return f"{name} is {size} bytes in UTF-8; the limit is {MAX_KEY_BYTES} bytes"
    if not key and not prefix and range_end is None:
        return "key must not be empty (give a prefix, or a range_end)"
    if range_end and range_end <= key:
        return f"range_end {range_end[:40]!r} must come after key {key[:40]!r}"
    return None


def _optional(
    message: raft_pb2.RangeRequest | raft_pb2.DeleteRangeRequest | raft_pb2.WatchRequest, name: str
) -> str | None:
    return getattr(message, name) if message.HasField(name) else None


def _redirect(response: _WriteReply, e: NotLeaderError) -> _WriteReply:
    response.success = False
    if e.leader_id is not None:
        response.current_leader = e.leader_id
    if e.leader_address:
        response.leader_address = e.leader_address
    return response


class ClusterServicer(LeaseServicer, raft_pb2_grpc.ClusterServicer):
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
        except OverloadedError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except CommitUnknownError as e:
            # The entry may still commit later; UNAVAILABLE tells the client the outcome is unknown.
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        if isinstance(result, SessionExpired):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, result.reason)
        if isinstance(result, LeaseRefused):
            await context.abort(_lease_status(result), result.reason)
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
                return _redirect(raft_pb2.ProposeMappingResponse(), e)
            return _put_reply(result)
        try:
            if request.session.client_id:
                revision = await self._node.propose_mapping(
                    request.key, request.value, request.session
                )
            else:
                revision = await self._node.propose_mapping(request.key, request.value)
        except NotLeaderError as e:
            return _redirect(raft_pb2.ProposeMappingResponse(), e)
        except OverloadedError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except CommitUnknownError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except SessionExpiredError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return raft_pb2.ProposeMappingResponse(success=True, revision=revision)

    async def ProposeMappings(
        self, request: raft_pb2.MappingBatch, context: grpc.aio.ServicerContext
    ) -> raft_pb2.ProposeMappingResponse:
        await self._check(context, batch_problem(request), session_problem(request.session))
        batch = _without_mapping_sessions(request)
        try:
            result = await self._propose(raft_pb2.Command(put=batch), context)
        except NotLeaderError as e:
            return _redirect(raft_pb2.ProposeMappingResponse(), e)
        return _put_reply(result)

    async def DeleteKey(
        self, request: raft_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.DeleteResponse:
        await self._check(context, key_problem(request.key), session_problem(request.session))
        try:
            result = await self._propose(raft_pb2.Command(delete=request), context)
        except NotLeaderError as e:
            return _redirect(raft_pb2.DeleteResponse(), e)
        return _delete_reply(result)

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
            return _redirect(raft_pb2.CompareAndSwapResponse(), e)
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
            return _redirect(raft_pb2.RegisterClientResponse(), e)
        assert isinstance(client_id, int)
        return raft_pb2.RegisterClientResponse(success=True, client_id=client_id)

    async def GetValue(
        self, request: raft_pb2.Key, context: grpc.aio.ServicerContext
    ) -> raft_pb2.GetValueResponse:
        await self._check(context, key_problem(request.key))
        key = request.key
        return await self._read(
            request.allow_stale, functools.partial(_get_reply, key=key), f"get {key}", context
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
        except OverloadedError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except UnavailableError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        raise AssertionError("abort returned")  # pragma: no cover

    async def Range(
        self, request: raft_pb2.RangeRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.RangeResponse:
        """The keys of a prefix or a range in order, a page at a time; linearizable unless
        allow_stale. A page stops at `limit` keys, MAX_RANGE_LIMIT, or about MAX_RANGE_BYTES."""
        range_end = _optional(request, "range_end")
        resume_key = _optional(request, "resume_key")
        limit = request.limit
        await self._check(
            context,
            range_problem(request.key, range_end, request.prefix),
            (
                f"limit must be 0 (as many as fit) to {MAX_RANGE_LIMIT}, not {limit}"
                if not 0 <= limit <= MAX_RANGE_LIMIT
                else None
            ),
            key_problem(resume_key) if resume_key is not None else None,
        )
        start, end = range_bounds(request.key, request.prefix, range_end)
        if request.count_only:

            def count(machine: KeyValueStateMachine) -> raft_pb2.RangeResponse:
                return raft_pb2.RangeResponse(
                    count=machine.count(start, end), revision=machine.revision
                )

            return await self._read(request.allow_stale, count, "count a range", context)
        keys_only = request.keys_only

        def page(machine: KeyValueStateMachine) -> RangePage:
            return machine.range(
                start, end, limit or MAX_RANGE_LIMIT, MAX_RANGE_BYTES, keys_only, resume_key
            )

        found = await self._read(request.allow_stale, page, "range", context)
        response = raft_pb2.RangeResponse(
            more=found.more, count=found.count, revision=found.revision
        )
        if found.next_key is not None:
            response.next_key = found.next_key
        kvs = response.kvs
        for kv in found.kvs:
            kvs.add(
                key=kv.key,
                value=kv.value or "",
                create_revision=kv.create_revision,
                mod_revision=kv.mod_revision,
                version=kv.version,
            )
        return response

    async def DeleteRange(
        self, request: raft_pb2.DeleteRangeRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.DeleteRangeResponse:
        """Every key of a prefix or a range deleted in one entry; how many, and its revision."""
        await self._check(
            context,
            range_problem(request.key, _optional(request, "range_end"), request.prefix),
            session_problem(request.session),
        )
        try:
            result = await self._propose(raft_pb2.Command(delete_range=request), context)
        except NotLeaderError as e:
            return _redirect(raft_pb2.DeleteRangeResponse(), e)
        assert isinstance(result, DeleteRangeResult)
        return raft_pb2.DeleteRangeResponse(
            success=True, deleted=result.deleted, revision=result.revision
        )

    async def Watch(
        self, request: raft_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[raft_pb2.WatchResponse]:
        """Every change to the keys from start_revision on, from this node's applied state, until
        the caller goes away. OUT_OF_RANGE when the start is older than the window this node
        keeps; RESOURCE_EXHAUSTED when the caller reads too slowly (or too many watch)."""
        range_end = _optional(request, "range_end")
        start_revision = request.start_revision
        await self._check(
            context,
            range_problem(request.key, range_end, request.prefix),
            (
                "start_revision must be 0 (from now) or a revision"
                if not 0 <= start_revision < MAX_WIRE_NUMBER
                else None
            ),
        )
        start, end = range_bounds(request.key, request.prefix, range_end)
        node = self._node
        try:
            watcher = self._watches.watch(KeyRange(start, end), start_revision, request.prev_value)
        except CompactedError as e:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(e))
        except TooManyWatchersError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        what = f"watch of {start!r}..{end!r}" if end != start + "\0" else f"watch of {start!r}"
        node.narrate.debug(
            "%s from revision %d started (%d watching)",
            what,
            watcher.start_revision,
            len(self._watches),
        )
        ending = "the watcher went away"
        try:
            yield watcher.created_message()
            while True:
                await watcher.wait(PROGRESS_INTERVAL)
                if watcher.failure is not None:
                    ending = str(watcher.failure)
                    if isinstance(watcher.failure, SlowWatcherError):
                        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, ending)
                    await context.abort(grpc.StatusCode.OUT_OF_RANGE, ending)
                response = watcher.next_message(progress=True)
                if response is not None:
                    yield response
        finally:
            self._watches.remove(watcher)
            node.narrate.debug("%s ended: %s", what, ending)

    async def Batch(
        self, request: raft_pb2.BatchRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.BatchResponse:
        """Several independent requests: each answered as its own call would have been. The
        writes are appended to the log together (one append, one flush, one message per
        follower); the reads share the node's read rounds."""
        ops = request.ops
        if len(ops) > MAX_CALL_OPS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a batch holds {len(ops)} ops; the limit is {MAX_CALL_OPS}",
            )
        results = [raft_pb2.BatchResult() for _ in ops]
        writes: list[tuple[raft_pb2.BatchResult, str, raft_pb2.LogEntry]] = []
        reads: list[tuple[raft_pb2.BatchResult, raft_pb2.Key]] = []
        for op, result in zip(ops, results, strict=True):
            which = op.WhichOneof("op")
            problem = _op_problem(op, which)
            if problem is not None:
                result.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                result.details = problem
            elif which == "get":
                reads.append((result, op.get))
            else:
                assert which is not None
                writes.append((result, which, _op_entry(op, which)))
        await asyncio.gather(self._batch_writes(writes), self._batch_reads(reads))
        return raft_pb2.BatchResponse(results=results)

    async def _batch_writes(
        self, writes: list[tuple[raft_pb2.BatchResult, str, raft_pb2.LogEntry]]
    ) -> None:
        if not writes:
            return
        outcomes: list[ApplyResult | Exception]
        try:
            outcomes = await self._node.propose_entries([entry for _, _, entry in writes])
        except (NotLeaderError, OverloadedError) as e:
            outcomes = [e] * len(writes)
        for (result, which, _), outcome in zip(writes, outcomes, strict=True):
            reply = getattr(result, which)
            if isinstance(outcome, NotLeaderError):
                _redirect(reply, outcome)
            elif isinstance(outcome, (Exception, SessionExpired, LeaseRefused)):
                code, details = _write_failure(outcome)
                result.code = code.value[0]
                result.details = details
            elif which == "delete":
                reply.CopyFrom(_delete_reply(outcome))
            else:
                reply.CopyFrom(_put_reply(outcome))

    async def _batch_reads(self, reads: list[tuple[raft_pb2.BatchResult, raft_pb2.Key]]) -> None:
        if not reads:
            return

        async def read(key: raft_pb2.Key) -> raft_pb2.GetValueResponse:
            query = functools.partial(_get_reply, key=key.key)
            if key.allow_stale:
                return query(self._node.state_machine)
            return await self._node.reads.linearizable(query, f"get {key.key}")

        replies = await asyncio.gather(*(read(key) for _, key in reads), return_exceptions=True)
        budget = BATCH_REPLY_BUDGET
        for (result, _), reply in zip(reads, replies, strict=True):
            if isinstance(reply, BaseException):
                if not isinstance(reply, Exception):
                    raise reply
                code, details = _read_failure(reply)
                result.code = code.value[0]
                result.details = details
                continue
            value = reply.value
            budget -= len(value) if value.isascii() else len(value.encode("utf-8"))
            if budget < 0:
                result.resend_alone = True
            else:
                result.get.CopyFrom(reply)

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
            return _redirect(raft_pb2.MembershipResponse(), e)
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
            return _redirect(raft_pb2.MembershipResponse(), e)
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
                    yield _redirect(raft_pb2.SnapshotChunk(), e)
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


def _op_problem(op: raft_pb2.BatchOp, which: str | None) -> str | None:
    """Why one op of a Batch call cannot be done, or None: the checks of its own call."""
    if which == "put":
        return (
            key_problem(op.put.key)
            or value_problem(op.put.value)
            or session_problem(op.put.session)
            or lease_problem(op.put.lease)
        )
    if which == "put_many":
        return batch_problem(op.put_many) or session_problem(op.put_many.session)
    if which == "delete":
        return key_problem(op.delete.key) or session_problem(op.delete.session)
    if which == "get":
        return key_problem(op.get.key)
    return "an op needs one of put, put_many, delete or get"


def _op_entry(op: raft_pb2.BatchOp, which: str) -> raft_pb2.LogEntry:
    """The log entry of one write op, as its own call would have appended it."""
    if which == "put":
        return put_entry(op.put.key, op.put.value, op.put.session, op.put.lease)
    if which == "put_many":
        command = raft_pb2.Command(put=_without_mapping_sessions(op.put_many))
    else:
        command = raft_pb2.Command(delete=op.delete)
    return raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_COMMAND, command=command)


def _without_mapping_sessions(batch: raft_pb2.MappingBatch) -> raft_pb2.MappingBatch:
    """A mapping's own session means nothing in a batch; it is not worth a place in the log."""
    if not any(m.HasField("session") for m in batch.mappings):
        return batch
    return raft_pb2.MappingBatch(
        mappings=[
            raft_pb2.Mapping(key=m.key, value=m.value, lease=m.lease) for m in batch.mappings
        ],
        session=batch.session,
    )


def _write_failure(
    outcome: Exception | SessionExpired | LeaseRefused,
) -> tuple[grpc.StatusCode, str]:
    """The status a write's own call ends with when it was not done (or not known to be)."""
    if isinstance(outcome, LeaseRefused):
        return _lease_status(outcome), outcome.reason
    if isinstance(outcome, SessionExpired):
        return grpc.StatusCode.FAILED_PRECONDITION, outcome.reason
    if isinstance(outcome, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(outcome)
    if isinstance(outcome, CommitUnknownError):
        return grpc.StatusCode.UNAVAILABLE, str(outcome)
    return grpc.StatusCode.UNKNOWN, f"{type(outcome).__name__}: {outcome}"


def _lease_status(refused: LeaseRefused) -> grpc.StatusCode:
    code = getattr(grpc.StatusCode, refused.status, None)
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.FAILED_PRECONDITION


def _read_failure(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status a linearizable read's own call ends with when it could not be served."""
    if isinstance(error, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    return grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {error}"


def _put_reply(outcome: ApplyResult) -> raft_pb2.ProposeMappingResponse:
    """A put's (or a batch's) success reply, with the revision it produced."""
    return raft_pb2.ProposeMappingResponse(success=True, revision=getattr(outcome, "revision", 0))


def _delete_reply(outcome: ApplyResult) -> raft_pb2.DeleteResponse:
    if isinstance(outcome, DeleteResult):
        return raft_pb2.DeleteResponse(
            success=True, existed=outcome.existed, revision=outcome.revision
        )
    # A reply a session kept from before revisions: whether the key existed, alone.
    return raft_pb2.DeleteResponse(success=True, existed=bool(outcome))


def _get_reply(machine: KeyValueStateMachine, key: str) -> raft_pb2.GetValueResponse:
    """GetValue's answer from this state: the value with its revisions, or none."""
    value = machine.get(key)
    if value is None:
        return raft_pb2.GetValueResponse(key=key, revision=machine.revision)
    create, mod, version = machine.revisions(key)
    return raft_pb2.GetValueResponse(
        key=key,
        value=value,
        create_revision=create,
        mod_revision=mod,
        version=version,
        revision=machine.revision,
    )
