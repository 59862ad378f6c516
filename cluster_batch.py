"""The `Cluster.Batch` call (mixed into cluster_server.ClusterServicer): several independent
requests in one call, as the project's Client sends what its tasks asked of one node in one
event-loop turn; each op answered as its own call would have been."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

import grpc

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
from node_types import (
    NotLeaderError,
    OverloadedError,
    put_entry,
)
from rpc import raft_pb2
from state_machine import ApplyResult, KeyValueStateMachine, SessionExpired

_Query = TypeVar("_Query")

# One Batch call holds at most this many ops; the gets among them are answered within this many
# bytes of values (a message to the client stays under 4 MiB), the rest told to ask alone.
MAX_CALL_OPS = 1000
BATCH_REPLY_BUDGET = 3 * 1024 * 1024


class BatchReads(Protocol):
    async def linearizable(
        self, query: Callable[[KeyValueStateMachine], _Query], what: str
    ) -> _Query: ...


class BatchNode(Protocol):
    """What a Batch call needs of the node: writes appended together, and reads."""

    async def propose_entries(
        self, entries: list[raft_pb2.LogEntry]
    ) -> list[ApplyResult | Exception]: ...

    @property
    def state_machine(self) -> KeyValueStateMachine: ...

    @property
    def reads(self) -> BatchReads: ...


class BatchServicer:
    """The Batch call of the Cluster service."""

    if TYPE_CHECKING:
        _node: BatchNode

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
                redirect(reply, outcome)
            elif isinstance(outcome, (Exception, SessionExpired, LeaseRefused)):
                code, details = write_failure(outcome)
                result.code = code.value[0]
                result.details = details
            elif which == "delete":
                reply.CopyFrom(delete_reply(outcome))
            else:
                reply.CopyFrom(put_reply(outcome))

    async def _batch_reads(self, reads: list[tuple[raft_pb2.BatchResult, raft_pb2.Key]]) -> None:
        if not reads:
            return

        async def read(key: raft_pb2.Key) -> raft_pb2.GetValueResponse:
            query = functools.partial(get_reply, key=key.key)
            if key.allow_stale:
                return query(self._node.state_machine)
            return await self._node.reads.linearizable(query, f"get {key.key}")

        replies = await asyncio.gather(*(read(key) for _, key in reads), return_exceptions=True)
        budget = BATCH_REPLY_BUDGET
        for (result, _), reply in zip(reads, replies, strict=True):
            if isinstance(reply, BaseException):
                if not isinstance(reply, Exception):
                    raise reply
                code, details = read_failure(reply)
                result.code = code.value[0]
                result.details = details
                continue
            value = reply.value
            budget -= len(value) if value.isascii() else len(value.encode("utf-8"))
            if budget < 0:
                result.resend_alone = True
            else:
                result.get.CopyFrom(reply)


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
        command = raft_pb2.Command(put=without_mapping_sessions(op.put_many))
    else:
        command = raft_pb2.Command(delete=op.delete)
    return raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_COMMAND, command=command)
