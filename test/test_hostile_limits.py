"""Real nodes under abuse: requests over the size limit are refused without harm, and hundreds of
connections that open streams or never read, or a reader that asks for large values and never takes
them, do not starve a normal client or the heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from rpc import raft_pb2, raft_pb2_grpc
from test.cluster_process import HOST, LocalCluster
from test.conftest import wait_until

FLOOD_CONNECTIONS = 300
# HTTP/2's connection preface: a client that sends it and then nothing, and reads nothing.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    nodes = LocalCluster(3, data_dir=tmp_path / "nodes")
    try:
        nodes.start()
        await nodes.wait_for_leader(30)
        yield nodes
    finally:
        nodes.stop()


async def terms(cluster: LocalCluster) -> set[int]:
    async with cluster.probe(rpc_timeout=5) as probe:
        replies = [await probe.get_leader(n) for n in cluster.node_ids]
    return {r.term for r in replies if r is not None}


async def test_requests_over_the_size_limit_are_refused_without_harm(
    cluster: LocalCluster,
) -> None:
    leader = await cluster.wait_for_leader(30)
    channel = grpc.aio.insecure_channel(
        cluster.client_address(leader), options=[("grpc.max_send_message_length", 64 << 20)]
    )
    try:
        stub = raft_pb2_grpc.ClusterStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as too_big:
            await stub.ProposeMapping(raft_pb2.Mapping(key="k", value="x" * (5 << 20)), timeout=10)
        assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as over_value_limit:
            await stub.ProposeMapping(raft_pb2.Mapping(key="k", value="x" * (2 << 20)), timeout=10)
        assert over_value_limit.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await channel.close()
    async with cluster.client(deadline=10) as client:
        await client.propose_mapping("k", "small")
        assert await client.get_value("k") == "small"
    assert all(cluster.is_running(n) for n in cluster.node_ids)


async def test_a_flood_of_connections_starves_neither_clients_nor_heartbeats(
    cluster: LocalCluster,
) -> None:
    before = await terms(cluster)
    writers: list[asyncio.StreamWriter] = []
    channels: list[grpc.aio.Channel] = []
    calls: list[grpc.aio.StreamStreamCall] = []
    try:
        for i in range(FLOOD_CONNECTIONS):
            node = cluster.node_ids[i % len(cluster.node_ids)]
            address = cluster.address(node)
            port = int((address.client_address if i % 2 else address.raft_address).split(":")[1])
            # Never reads a byte of what the server sends.
            _, writer = await asyncio.open_connection(HOST, port)
            writer.write(PREFACE)
            writers.append(writer)
        for i in range(FLOOD_CONNECTIONS // 3):
            node = cluster.node_ids[i % len(cluster.node_ids)]
            channel = grpc.aio.insecure_channel(cluster.address(node).raft_address)
            channels.append(channel)
            stub = raft_pb2_grpc.RaftStub(channel)
            # Streams opened and left hanging: nothing sent, nothing read.
            for _ in range(3):
                calls.append(stub.AppendStream())
        async with cluster.client(deadline=15) as client:
            for n in range(20):
                await client.propose_mapping(f"flood-{n}", str(n))
                assert await client.get_value(f"flood-{n}") == str(n)
        assert await terms(cluster) == before, "an election happened during the flood"
        assert all(cluster.is_running(n) for n in cluster.node_ids)
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# HTTP/2 frame types and flags (RFC 9113) the stalled reader needs.
DATA, HEADERS, SETTINGS, PING = 0x0, 0x1, 0x4, 0x6
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
BIG_VALUE = 1000 * 1024
STALLED_CONNECTIONS = 2
STALLED_STREAMS = 100  # on each connection, under its limit of 128


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def literal(name: str, value: str) -> bytes:
    """An HPACK header field sent as a literal, neither indexed nor Huffman-coded."""
    assert len(name) < 127 and len(value) < 127
    return bytes([0, len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


class StalledReader:
    """A client speaking HTTP/2 by hand that asks for a value on many streams and announces a
    receive window of 0 bytes per stream, which it never opens: every response stays with the
    server. It acknowledges settings and pings (so keepalive does not drop it) and counts what
    the server manages to send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.data_bytes = 0
        self.headers = 0
        self.ended = 0
        self.task = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, address: str, key: str, streams: int) -> StalledReader:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, 0)
        out = bytearray(PREFACE + frame(SETTINGS, 0, 0, settings))
        request = raft_pb2.Key(key=key).SerializeToString()
        message = b"\0" + struct.pack(">I", len(request)) + request
        block = b"".join(
            literal(n, v)
            for n, v in [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/Cluster/GetValue"),
                (":authority", address),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
        for stream in range(1, 2 * streams, 2):
            out += frame(HEADERS, END_HEADERS, stream, block)
            out += frame(DATA, END_STREAM, stream, message)
        writer.write(bytes(out))
        await writer.drain()
        return cls(reader, writer)

    async def _read(self) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await self.reader.readexactly(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags = head[3], head[4]
                payload = await self.reader.readexactly(length)
                if kind == SETTINGS and not flags & ACK:
                    self.writer.write(frame(SETTINGS, ACK, 0))
                elif kind == PING and not flags & ACK:
                    self.writer.write(frame(PING, ACK, 0, payload))
                elif kind == DATA:
                    self.data_bytes += length
                elif kind == HEADERS:
                    self.headers += 1
                if kind in (DATA, HEADERS) and flags & END_STREAM:
                    self.ended += 1

    async def close(self) -> None:
        self.task.cancel()
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def test_a_reader_that_never_takes_large_responses_starves_nobody(
    cluster: LocalCluster,
) -> None:
    """Responses of about 1 MiB each, on many streams of two connections to one follower, that
    the reader never lets the node send (HTTP/2 flow control): they wait in that node's memory.
    Meanwhile a normal client writes and reads through the same node and the others, and no
    election happens."""
    async with cluster.client(deadline=15) as client:
        await client.propose_mapping("big", "x" * BIG_VALUE)
    leader = await cluster.wait_for_leader(30)
    target = next(n for n in cluster.node_ids if n != leader)
    before = await terms(cluster)
    readers: list[StalledReader] = []
    try:
        for _ in range(STALLED_CONNECTIONS):
            readers.append(
                await StalledReader.open(cluster.client_address(target), "big", STALLED_STREAMS)
            )

        async def answered() -> bool:
            # The node has answered every call (response headers go out whatever the window).
            return all(r.headers >= STALLED_STREAMS for r in readers)

        await wait_until(answered, 30, "the node to answer the stalled reader's calls")
        # ... and holds back every value: the reader's window is shut, so each response (and the
        # memory it takes) waits in the node.
        assert all(r.ended == 0 and r.data_bytes == 0 for r in readers), [
            (r.headers, r.ended, r.data_bytes) for r in readers
        ]
        async with cluster.client(deadline=15) as client:
            for n in range(10):
                await client.propose_mapping(f"slow-{n}", str(n))
                assert await client.get_value(f"slow-{n}") == str(n)
        async with cluster.probe(rpc_timeout=5) as probe:
            assert await probe.get_value(target, "slow-9") == "9"
        assert await terms(cluster) == before, "an election happened while the reader stalled"
        assert all(cluster.is_running(n) for n in cluster.node_ids)
    finally:
        for reader in readers:
            await reader.close()
