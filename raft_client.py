"""Reaching peers' `Raft` service over gRPC: one channel per peer, AppendEntries on one long-lived
stream per follower, timeouts, fast reconnects."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf.message import Message

from cluster_identity import ClusterIdentity
from node_types import PeerUnreachableError
from rpc import raft_pb2, raft_pb2_grpc
from tls import TlsConfig, open_channel

_CHANNEL_OPTIONS = [
    # gRPC's default reconnect backoff grows to minutes; a restarted peer must be reached again within
    # a heartbeat or two, so keep the backoff short.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

# After certificates are renewed, how long a replaced channel may finish the calls it carries.
_RETIRED_GRACE = 10.0
# A follower that answers a stream with UNIMPLEMENTED (a node of an older version) is sent unary
# AppendEntries calls; the stream is tried again after this long, in case it has been upgraded.
_STREAM_RETRY_AFTER = 60.0


class _AppendStream:
    """One open AppendStream call. One request is on it at a time: the reply read next is always
    the answer to the request written last, and a stream that fails mid-exchange is discarded."""

    __slots__ = ("call", "busy", "credentials")

    def __init__(
        self,
        call: grpc.aio.StreamStreamCall[bytes, raft_pb2.AppendEntriesResponse],
        credentials: int,
    ):
        self.call = call
        self.busy = False
        # Which certificates its connection presents (GrpcTransport._credentials when opened).
        self.credentials = credentials


class GrpcTransport:
    """The daemon's `Transport`: a lazily opened channel and stub per peer id. Every call carries
    this node's cluster id (`identity`), which peers of another cluster refuse; with `tls`, every
    channel verifies the peer against its CA and presents this node's own certificate."""

    def __init__(
        self,
        peer_addresses: dict[int, str],
        identity: ClusterIdentity | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        self._identity = identity
        self._addresses = dict(peer_addresses)
        self._tls = tls
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._stubs: dict[int, raft_pb2_grpc.RaftStub] = {}
        self._retired: list[grpc.aio.Channel] = []
        # AppendEntries takes the request already encoded, so that one message sent to several
        # followers is encoded once.
        self._appends: dict[int, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._stream_methods: dict[int, grpc.aio.StreamStreamMultiCallable] = {}
        self._streams: dict[int, _AppendStream] = {}
        self._unary_until: dict[int, float] = {}
        self._encoded_request: raft_pb2.AppendEntriesRequest | None = None
        self._encoded = b""
        # Counts renewals of `tls`; a stream opened before the last one is replaced once idle.
        self._credentials = 0
        self._closing: set[asyncio.Task[None]] = set()

    def update_peers(self, addresses: dict[int, str]) -> None:
        """Learn new peers and changed addresses. A peer that left stays reachable: a leader keeps
        telling a removed follower until it learns that its removal committed."""
        for peer_id, address in addresses.items():
            if self._addresses.get(peer_id) != address:
                self._addresses[peer_id] = address
                self._unary_until.pop(peer_id, None)
                self._drop_stream(peer_id)
                self._forget_channel(peer_id)

    def _forget_channel(self, peer_id: int) -> None:
        """The next call to `peer_id` opens a new channel; the old one is closed with the others,
        never mid-call."""
        self._stubs.pop(peer_id, None)
        self._appends.pop(peer_id, None)
        self._stream_methods.pop(peer_id, None)
        channel = self._channels.pop(peer_id, None)
        if channel is not None:
            self._retired.append(channel)

    def renew_tls(self, tls: TlsConfig) -> None:
        """Present `tls`'s certificate (and trust its CA) on every connection opened from now on:
        each peer's channel is replaced; a call in progress finishes on the old one, which is then
        closed (after a grace period, as it may still carry that call)."""
        self._tls = tls
        self._credentials += 1
        for peer_id in list(self._channels):
            stream = self._streams.get(peer_id)
            if stream is not None and not stream.busy:
                self._drop_stream(peer_id)
            self._forget_channel(peer_id)
        retired, self._retired = self._retired, []
        for channel in retired:
            task = asyncio.ensure_future(channel.close(grace=_RETIRED_GRACE))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _stub(self, peer_id: int) -> raft_pb2_grpc.RaftStub:
        stub = self._stubs.get(peer_id)
        if stub is None:
            address = self._addresses.get(peer_id)
            if address is None:
                raise PeerUnreachableError(f"{peer_id} is not a known peer")
            channel = open_channel(address, _CHANNEL_OPTIONS, self._tls)
            self._channels[peer_id] = channel
            stub = self._stubs[peer_id] = raft_pb2_grpc.RaftStub(channel)
            self._appends[peer_id] = channel.unary_unary(
                "/Raft/AppendEntries",
                request_serializer=None,
                response_deserializer=raft_pb2.AppendEntriesResponse.FromString,
            )
            self._stream_methods[peer_id] = channel.stream_stream(
                "/Raft/AppendStream",
                request_serializer=None,
                response_deserializer=raft_pb2.AppendEntriesResponse.FromString,
            )
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
        self._stub(peer_id)
        # Held, not just compared by id: the request stays alive, so the match cannot be a reuse.
        if request is not self._encoded_request:
            self._encoded = request.SerializeToString()
            self._encoded_request = request
        encoded = self._encoded
        stream = self._streams.get(peer_id)
        if stream is not None and (
            stream.call.done() or (stream.credentials != self._credentials and not stream.busy)
        ):
            # Broken since its last exchange, or opened with certificates since renewed: reopen.
            self._drop_stream(peer_id)
            stream = None
        if stream is None:
            if asyncio.get_running_loop().time() < self._unary_until.get(peer_id, 0.0):
                return await self._append_unary(peer_id, encoded, timeout)
            stream = self._streams[peer_id] = _AppendStream(
                self._stream_methods[peer_id](metadata=self._metadata()), self._credentials
            )
        elif stream.busy:
            # Only when two senders to one follower overlap (at a change of term): the other
            # request keeps the stream, this one goes alone.
            return await self._append_unary(peer_id, encoded, timeout)
        return await self._exchange(peer_id, stream, encoded, timeout)

    async def _exchange(
        self, peer_id: int, stream: _AppendStream, encoded: bytes, timeout: float
    ) -> raft_pb2.AppendEntriesResponse:
        stream.busy = True
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        # A timer that cancels the call is cheaper than a timeout context around two awaits.
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            stream.call.cancel()
            # A write still waiting for the call to start (its connection not yet up) is not woken
            # by cancelling the call: gRPC's client waits for the call's first metadata to go out,
            # which then never happens. Cancel the wait itself too.
            task.cancel()

        timer = loop.call_at(loop.time() + timeout, expire)
        try:
            await stream.call.write(encoded)
            reply = await stream.call.read()
        except asyncio.CancelledError:
            self._drop_stream(peer_id, stream)
            if task.cancelling() > (1 if expired else 0):
                raise  # our caller is being cancelled, not the call
            if expired:
                raise PeerUnreachableError(f"no append reply within {timeout:g} s") from None
            raise PeerUnreachableError("the append stream was closed") from None
        except grpc.aio.AioRpcError as e:
            self._drop_stream(peer_id, stream)
            if e.code() is grpc.StatusCode.UNIMPLEMENTED:
                # Nothing was handled: the follower refused the method before reading a request.
                self._unary_until[peer_id] = loop.time() + _STREAM_RETRY_AFTER
                return await self._append_unary(peer_id, encoded, timeout)
            raise PeerUnreachableError(f"{e.code().name}: {e.details()}") from None
        except asyncio.InvalidStateError as e:
            self._drop_stream(peer_id, stream)
            raise PeerUnreachableError(f"the append stream ended: {e}") from None
        finally:
            timer.cancel()
            if expired:
                task.uncancel()  # our own cancellation, delivered and handled above
        if reply is grpc.aio.EOF:
            self._drop_stream(peer_id, stream)
            raise PeerUnreachableError("the follower ended the append stream")
        stream.busy = False
        result: raft_pb2.AppendEntriesResponse = reply
        return result

    async def _append_unary(
        self, peer_id: int, encoded: bytes, timeout: float
    ) -> raft_pb2.AppendEntriesResponse:
        reply: raft_pb2.AppendEntriesResponse = await self._call(
            self._appends[peer_id], encoded, timeout
        )
        return reply

    def _drop_stream(self, peer_id: int, stream: _AppendStream | None = None) -> None:
        """Forget (and cancel) the peer's stream; with `stream`, only if it is still that one."""
        current = self._streams.get(peer_id)
        if current is not None and (stream is None or current is stream):
            del self._streams[peer_id]
        if stream is None:
            stream = current
        if stream is not None:
            stream.call.cancel()

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

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return None if self._identity is None else self._identity.metadata()

    async def _call(self, method: Any, request: Message | bytes, timeout: float) -> Any:
        try:
            return await method(request, timeout=timeout, metadata=self._metadata())
        except grpc.aio.AioRpcError as e:
            raise PeerUnreachableError(f"{e.code().name}: {e.details()}") from None

    async def close(self) -> None:
        channels, self._channels, self._stubs = self._channels, {}, {}
        self._appends = {}
        self._stream_methods = {}
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.call.cancel()
        retired, self._retired = self._retired, []
        for channel in [*channels.values(), *retired]:
            await channel.close()
        for task in list(self._closing):
            task.cancel()
