"""The `Raft` gRPC service: hands peers' messages (votes, entries, read index, timeout now, snapshot
chunks) to the node, maps refusals to codes."""

from __future__ import annotations

from typing import Any

import grpc

from raft_node import InvalidRequestError, RaftNode
from rpc import raft_pb2, raft_pb2_grpc


class RaftServicer(raft_pb2_grpc.RaftServicer):
    """Thin translation layer; every decision is the node's."""

    def __init__(self, node: RaftNode) -> None:
        self._node = node

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
