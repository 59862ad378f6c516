"""The `Raft` gRPC service: hands peers' messages (votes, entries, read index, timeout now, snapshot
chunks) to the node, maps refusals to codes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from raft_node import InvalidRequestError, RaftNode
from rpc import raft_pb2, raft_pb2_grpc


class RaftServicer(raft_pb2_grpc.RaftServicer):
    """Thin translation layer; every decision is the node's."""

    def __init__(self, node: RaftNode) -> None:
        self._node = node
        # AppendStream handlers waiting for their next request, so that shutting down need not wait
        # out the server's grace period for streams that never end by themselves.
        self._idle_streams: set[asyncio.Task[Any]] = set()
        self._ending = False

    def end_streams(self) -> None:
        """End every AppendStream once its current request is answered; call before stopping the
        server. The leader sees the stream end, as if this node had gone."""
        self._ending = True
        for task in self._idle_streams:
            task.cancel()

    async def RequestVote(
        self, request: raft_pb2.VoteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> raft_pb2.RequestVoteResponse:
        try:
            return await self._node.handle_request_vote(request)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # unreachable: abort raises

    async def AppendEntries(
        self, request: raft_pb2.AppendEntriesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> raft_pb2.AppendEntriesResponse:
        try:
            return await self._node.handle_append_entries(request)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise

    async def AppendStream(
        self,
        request_iterator: AsyncIterator[raft_pb2.AppendEntriesRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        # One request at a time, answered before the next is read: replies leave in request order,
        # each only once its entries are durable, exactly as the unary call's would.
        task = asyncio.current_task()
        assert task is not None
        while not self._ending:
            self._idle_streams.add(task)
            try:
                request = await context.read()
            except asyncio.CancelledError:
                if self._ending:
                    # Ended normally, so that the server finishes the call instead of waiting for it.
                    task.uncancel()
                    return
                raise
            finally:
                self._idle_streams.discard(task)
            if request is grpc.aio.EOF:
                return
            try:
                reply = await self._node.handle_append_entries(request)
            except InvalidRequestError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                raise
            await context.write(reply)

    async def ReadIndex(
        self, request: raft_pb2.ReadIndexRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> raft_pb2.ReadIndexResponse:
        try:
            return await self._node.handle_read_index(request)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise

    async def TimeoutNow(
        self, request: raft_pb2.TimeoutNowRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> raft_pb2.TimeoutNowResponse:
        try:
            return await self._node.handle_timeout_now(request)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise

    async def InstallSnapshot(
        self,
        request: raft_pb2.InstallSnapshotRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> raft_pb2.InstallSnapshotResponse:
        try:
            return await self._node.handle_install_snapshot(request)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise
