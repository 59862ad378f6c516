"""Reaching peers' `Raft` service over gRPC: one channel per peer, timeouts, fast reconnects."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import Message

from raft_node import PeerUnreachableError
from rpc import raft_pb2, raft_pb2_grpc

_CHANNEL_OPTIONS = [
    # gRPC's default reconnect backoff grows to minutes; a restarted peer must be reached again within
    # a heartbeat or two, so keep the backoff short.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


class GrpcTransport:
    """The daemon's `Transport`: a lazily opened channel and stub per peer id."""

    def __init__(self, peer_addresses: dict[int, str]) -> None:
        self._addresses = dict(peer_addresses)
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._stubs: dict[int, raft_pb2_grpc.RaftStub] = {}

    def _stub(self, peer_id: int) -> raft_pb2_grpc.RaftStub:
        stub = self._stubs.get(peer_id)
        if stub is None:
            address = self._addresses.get(peer_id)
            if address is None:
                raise PeerUnreachableError(f"{peer_id} is not a known peer")
            channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            self._channels[peer_id] = channel
            stub = self._stubs[peer_id] = raft_pb2_grpc.RaftStub(channel)
        return stub

    async def request_vote(
        self, peer_id: int, request: raft_pb2.VoteRequest, timeout: float
    ) -> raft_pb2.RequestVoteResponse:
        reply: raft_pb2.RequestVoteResponse = await self._call(
            self._stub(peer_id).RequestVote, request, timeout
        )
        return reply

    async def append_entries(
        self, peer_id: int, request: raft_pb2.AppendEntriesRequest, timeout: float
    ) -> raft_pb2.AppendEntriesResponse:
        reply: raft_pb2.AppendEntriesResponse = await self._call(
            self._stub(peer_id).AppendEntries, request, timeout
        )
        return reply

    async def read_index(
        self, peer_id: int, request: raft_pb2.ReadIndexRequest, timeout: float
    ) -> raft_pb2.ReadIndexResponse:
        reply: raft_pb2.ReadIndexResponse = await self._call(
            self._stub(peer_id).ReadIndex, request, timeout
        )
        return reply

    async def timeout_now(
        self, peer_id: int, request: raft_pb2.TimeoutNowRequest, timeout: float
    ) -> raft_pb2.TimeoutNowResponse:
        reply: raft_pb2.TimeoutNowResponse = await self._call(
            self._stub(peer_id).TimeoutNow, request, timeout
        )
        return reply

    async def install_snapshot(
        self, peer_id: int, request: raft_pb2.InstallSnapshotRequest, timeout: float
    ) -> raft_pb2.InstallSnapshotResponse:
        reply: raft_pb2.InstallSnapshotResponse = await self._call(
            self._stub(peer_id).InstallSnapshot, request, timeout
        )
        return reply

    @staticmethod
    async def _call(method: Any, request: Message, timeout: float) -> Any:
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise PeerUnreachableError(f"{e.code().name}: {e.details()}") from None

    async def close(self) -> None:
        channels, self._channels, self._stubs = self._channels, {}, {}
        for channel in channels.values():
            await channel.close()
