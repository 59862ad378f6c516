"""Real nodes under abuse: requests over the size limit are refused without harm, and hundreds of
connections that open streams or never read do not starve a normal client or the heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from rpc import raft_pb2, raft_pb2_grpc
from test.cluster_process import HOST, LocalCluster

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
