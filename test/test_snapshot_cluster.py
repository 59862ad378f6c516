"""Snapshots on real node processes (small thresholds via the daemon's flags): a follower down long
enough that its next entry was compacted away catches up by InstallSnapshot, and a whole cluster
restarted from its snapshots keeps every acknowledged write and every session's replies."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from cluster_client import Client
from rpc import raft_pb2, raft_pb2_grpc
from test.cluster_process import LocalCluster
from test.conftest import log_tails, wait_until

MakeCluster = Callable[..., LocalCluster]
# Small thresholds so a few hundred writes compact the log several times.
SNAPSHOT_FLAGS = ["--snapshot-entries", "40", "--snapshot-keep-entries", "5"]


async def write_many(client: Client, prefix: str, count: int) -> dict[str, str]:
    written: dict[str, str] = {}
    slots = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        key, value = f"{prefix}-{i}", f"value-{i}"
        async with slots:
            await client.propose_mapping(key, value)
        written[key] = value

    await asyncio.gather(*(one(i) for i in range(count)))
    return written


async def serves_all(cluster: LocalCluster, node_id: int, expected: dict[str, str]) -> bool:
    # GetValue without allow_stale is a linearizable read on the node asked.
    async with cluster.probe(rpc_timeout=3) as probe:
        return not await probe.mismatches(node_id, expected)


def snapshot_files(cluster: LocalCluster, node_id: int) -> list[Path]:
    return sorted(cluster.node_data_dir(node_id).glob("snapshot-*[0-9]"))


async def test_a_follower_behind_the_compacted_log_catches_up_by_snapshot(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(nodes=3, extra_args=SNAPSHOT_FLAGS)
    leader = await cluster.wait_for_leader(timeout=15)
    follower = next(n for n in cluster.node_ids if n != leader)
    async with cluster.client(deadline=20) as client:
        written = await write_many(client, "before", 20)
        cluster.kill_node(follower)
        written |= await write_many(client, "while-down", 300)
    assert snapshot_files(cluster, leader), "the leader took no snapshot"

    cluster.start_node(follower)
    try:
        await wait_until(
            functools.partial(serves_all, cluster, follower, written),
            30,
            f"node {follower} serves all {len(written)} acknowledged writes",
        )
    except AssertionError as e:
        raise AssertionError(f"{e}\n{log_tails(cluster, [leader, follower])}") from None
    narration = cluster.node_log(follower)
    assert "installed snapshot up to index" in narration
    assert "sending snapshot up to index" in cluster.node_log(leader)
    # It installed one snapshot, not one after another.
    assert narration.count("installed snapshot up to index") == 1
    assert snapshot_files(cluster, follower)


@pytest.mark.slow
async def test_a_cluster_restarted_from_snapshots_keeps_acknowledged_writes_and_sessions(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(nodes=3, extra_args=SNAPSHOT_FLAGS)
    leader = await cluster.wait_for_leader(timeout=15)
    async with cluster.client(deadline=20) as client:
        written = await write_many(client, "key", 200)
    # A compare-and-swap whose reply the client "lost": retried after the restart, it must get
    # its original outcome, which only the session state in the snapshot remembers.
    channel = grpc.aio.insecure_channel(cluster.client_address(leader))
    try:
        stub = raft_pb2_grpc.ClusterStub(channel)
        registered = await stub.RegisterClient(raft_pb2.RegisterClientRequest(), timeout=6)
        session = raft_pb2.Session(client_id=registered.client_id, sequence=1, first_outstanding=1)
        cas = raft_pb2.CompareAndSwapRequest(key="cas-key", new_value="mine", session=session)
        first = await stub.CompareAndSwap(cas, timeout=6)
        assert (first.success, first.swapped) == (True, True)
    finally:
        await channel.close()
    async with cluster.client(deadline=20) as client:
        await client.propose_mapping("cas-key", "theirs")
        written |= await write_many(client, "more", 100)
    assert all(snapshot_files(cluster, n) for n in cluster.node_ids)

    for node_id in cluster.node_ids:
        cluster.kill_node(node_id)
    cluster.start()
    leader = await cluster.wait_for_leader(timeout=20)
    for node_id in cluster.node_ids:
        assert "restored state from snapshot up to index" in cluster.node_log(node_id)
        await wait_until(
            functools.partial(serves_all, cluster, node_id, written),
            30,
            f"node {node_id} serves all {len(written)} acknowledged writes after the restart",
        )

    async def retried() -> raft_pb2.CompareAndSwapResponse | None:
        channel = grpc.aio.insecure_channel(cluster.client_address(await cluster.wait_for_leader()))
        try:
            reply: raft_pb2.CompareAndSwapResponse = await raft_pb2_grpc.ClusterStub(
                channel
            ).CompareAndSwap(cas, timeout=6)
            return reply
        except grpc.aio.AioRpcError:
            return None
        finally:
            await channel.close()

    answer = await wait_until(retried, 20, "the leader answers the retried compare-and-swap")
    assert (answer.success, answer.swapped, answer.current_value) == (True, True, "mine")
    async with cluster.client(deadline=20) as client:
        assert await client.get_value("cas-key") == "theirs"
