"""The `Cluster` service's ranges and watches (mixed into cluster_server.ClusterServicer): keys in
order a page at a time, a range deleted in one entry, and every change from a revision on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

import grpc

from cluster_requests import key_problem, optional, range_problem, redirect, session_problem
from node_events import EventNarrator
from node_types import MAX_WIRE_NUMBER, NotLeaderError
from rpc import raft_pb2
from state_machine import (
    ApplyResult,
    DeleteRangeResult,
    KeyValueStateMachine,
    RangePage,
    range_bounds,
)
from watch import PROGRESS_INTERVAL, KeyRange, SlowWatcherError, TooManyWatchersError, WatchHub
from watch_window import CompactedError

_Query = TypeVar("_Query")

# One Range reply carries at most this many keys, and stops adding keys once past this many bytes
# of keys and values (one key and its value are at most 1 MiB + 1 KiB): well under the 4 MiB a
# reply may be. Follow `more`.
MAX_RANGE_LIMIT = 10_000
MAX_RANGE_BYTES = 2 * 1024 * 1024


class RangeNode(Protocol):
    @property
    def narrate(self) -> EventNarrator: ...


class RangeServicer:
    """The Range, DeleteRange and Watch calls of the Cluster service."""

    if TYPE_CHECKING:
        _node: RangeNode
        _watches: WatchHub

        async def _check(
            self, context: grpc.aio.ServicerContext, *problems: str | None
        ) -> None: ...

        async def _propose(
            self, command: raft_pb2.Command, context: grpc.aio.ServicerContext
        ) -> ApplyResult: ...

        async def _read(
            self,
            stale: bool,
            query: Callable[[KeyValueStateMachine], _Query],
            what: str,
            context: grpc.aio.ServicerContext,
        ) -> _Query: ...

    async def Range(
        self, request: raft_pb2.RangeRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.RangeResponse:
        """The keys of a prefix or a range in order, a page at a time; linearizable unless
        allow_stale. A page stops at `limit` keys, MAX_RANGE_LIMIT, or about MAX_RANGE_BYTES."""
        range_end = optional(request, "range_end")
        resume_key = optional(request, "resume_key")
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
            range_problem(request.key, optional(request, "range_end"), request.prefix),
            session_problem(request.session),
        )
        try:
            result = await self._propose(raft_pb2.Command(delete_range=request), context)
        except NotLeaderError as e:
            return redirect(raft_pb2.DeleteRangeResponse(), e)
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
        range_end = optional(request, "range_end")
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
