"""Leases on clusters of real processes: keys vanish when their lease expires and watchers see each
as a delete; a kept-alive lease outlives many TTLs; revoke deletes the keys; a put with an unknown
lease is refused on every write path; keepalives answered only by the leader; a leader's death
neither expires a kept-alive lease nor saves an abandoned one beyond the stated bound; the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from backup_file import read_backup
from client_kv import WatchEvent
from cluster_client import (
    Client,
    ClientError,
    LeaseInfo,
    LeaseNotFoundError,
    RequestRejectedError,
)
from lease_keeper import LEASE_TICK
from node_types import Timing
from rpc import raft_pb2, raft_pb2_grpc
from state_machine import decode_state
from test.cluster_process import CHANNEL_OPTIONS, LocalCluster
from test.conftest import run_script, wait_until


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    made = LocalCluster(nodes=3)
    try:
        made.start()
        yield made
    finally:
        made.stop()


@contextlib.asynccontextmanager
async def stub_for(address: str) -> AsyncIterator[raft_pb2_grpc.ClusterStub]:
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    try:
        yield raft_pb2_grpc.ClusterStub(channel)
    finally:
        await channel.close()


def cli(cluster: LocalCluster, *args: str) -> tuple[int, str, str]:
    where = ["--first-port", str(cluster.first_port), "--nodes", str(cluster.nodes)]
    result = run_script(["cluster_client.py", *where, *args], timeout=30)
    return result.returncode, result.stdout, result.stderr


async def deletes(client: Client, prefix: str, count: int, into: list[tuple[float, str]]) -> None:
    """Record (when, key) for the next `count` deletes under `prefix`."""
    events: AsyncIterator[WatchEvent] = client.watch(prefix, prefix=True)
    async for event in events:
        if event.type == "delete":
            into.append((time.monotonic(), event.key))
            if len(into) == count:
                return


async def test_keys_vanish_when_their_lease_expires_and_watchers_see_deletes(
    cluster: LocalCluster,
) -> None:
    async with cluster.client() as client:
        seen: list[tuple[float, str]] = []
        watcher = asyncio.create_task(deletes(client, "exp/", 2, seen))
        await asyncio.sleep(0)
        await client.propose_mapping("exp/marker", "watch in place")
        granted = await client.grant_lease(1)
        assert granted.ttl == 1 and granted.id > 0
        started = time.monotonic()
        await client.propose_mapping("exp/a", "1", lease=granted.id)
        await client.propose_mappings({"exp/b": "2", "exp/c": "3"}, lease=granted.id)
        await client.propose_mapping("exp/b", "again")  # re-put without a lease: leaves it
        info = await client.lease_time_to_live(granted.id, keys=True)
        assert info.keys == ["exp/a", "exp/c"] and 0 < info.remaining <= 1
        async with asyncio.timeout(10):
            await watcher
        assert sorted(key for _, key in seen) == ["exp/a", "exp/c"]
        # Never before its TTL (counted from before the grant was even asked for).
        assert min(when for when, _ in seen) - started >= 1.0
        assert await client.get_value("exp/a", default=None) is None
        assert await client.get_value("exp/b") == "again"
        with pytest.raises(LeaseNotFoundError):
            await client.keep_alive(granted.id)
        with pytest.raises(LeaseNotFoundError):
            await client.lease_time_to_live(granted.id)
        assert granted.id not in await client.leases()


async def test_a_kept_alive_lease_outlives_many_ttls_and_is_revoked_on_leaving(
    cluster: LocalCluster,
) -> None:
    async with cluster.client() as client:
        async with client.lease(1) as lease:
            await client.propose_mapping("kept/k", "v", lease=lease.id)
            deadline = time.monotonic() + 3.5
            while time.monotonic() < deadline:
                assert await client.get_value("kept/k", default=None) == "v"
                await asyncio.sleep(0.2)
            assert not lease.lost.is_set()
        assert await client.get_value("kept/k", default=None) is None
        with pytest.raises(LeaseNotFoundError):
            await client.lease_time_to_live(lease.id)


async def test_revoke_deletes_every_key_of_the_lease_at_once(cluster: LocalCluster) -> None:
    async with cluster.client() as client:
        lease = (await client.grant_lease(60)).id
        await client.propose_mappings({"rev/a": "1", "rev/b": "2"}, lease=lease)
        await client.propose_mapping("rev/c", "3")
        assert await client.revoke_lease(lease) == 2
        assert [kv.key for kv in await client.get_prefix("rev/")] == ["rev/c"]
        with pytest.raises(LeaseNotFoundError):
            await client.revoke_lease(lease)


async def test_a_write_with_an_unknown_lease_is_refused_on_every_path(
    cluster: LocalCluster,
) -> None:
    async with cluster.client() as client, cluster.client(batching=False) as unbatched:
        for writer in (client, unbatched):
            with pytest.raises(LeaseNotFoundError, match="lease 999999 not found"):
                await writer.propose_mapping("bad/a", "1", lease=999999)
            with pytest.raises(LeaseNotFoundError):
                await writer.propose_mappings({"bad/b": "1"}, lease=999999)
            with pytest.raises(LeaseNotFoundError):
                await writer.compare_and_swap_revision("bad/c", 0, "1", lease=999999)
            # The session is still good for the next write.
            await writer.propose_mapping("bad/ok", "1")
        assert [kv.key for kv in await client.get_prefix("bad/")] == ["bad/ok"]
        leader = await cluster.wait_for_leader()
        async with stub_for(cluster.client_address(leader)) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ProposeMapping(raft_pb2.Mapping(key="bad/d", value="1", lease=424242))
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            for request in (
                raft_pb2.LeaseGrantRequest(ttl=0),
                raft_pb2.LeaseGrantRequest(ttl=5, id=-3),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.LeaseGrant(request)
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.LeaseKeepAlive(raft_pb2.LeaseKeepAliveRequest(id=0))
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                call = stub.LeaseKeepAliveStream(iter([raft_pb2.LeaseKeepAliveRequest(id=-1)]))
                async for _ in call:
                    pass
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # An id asked for that is in use: refused, and the lease stays as it was.
        taken = (await client.grant_lease(60)).id
        with pytest.raises(RequestRejectedError, match="already exists"):
            await client.grant_lease(5, lease_id=taken)
        assert (await client.lease_time_to_live(taken)).granted_ttl == 60
        await client.revoke_lease(taken)


async def test_only_the_leader_answers_keepalives_and_a_stream_keeps_many(
    cluster: LocalCluster,
) -> None:
    async with cluster.client() as client:
        ids = [(await client.grant_lease(30)).id for _ in range(5)]
        leader = await cluster.wait_for_leader()
        follower = next(n for n in cluster.node_ids if n != leader)
        async with stub_for(cluster.client_address(follower)) as stub:
            reply = await stub.LeaseKeepAlive(raft_pb2.LeaseKeepAliveRequest(id=ids[0]))
            assert not reply.success and reply.current_leader == leader
        async with stub_for(cluster.client_address(leader)) as stub:
            call = stub.LeaseKeepAliveStream(
                iter([raft_pb2.LeaseKeepAliveRequest(id=i) for i in [*ids, 777777]])
            )
            replies = [r async for r in call]
        assert [(r.success, r.id, r.ttl) for r in replies] == [
            *((True, i, 30) for i in ids),
            (True, 777777, 0),
        ]
        for lease_id in ids:
            await client.revoke_lease(lease_id)


async def test_a_keepalive_stream_of_bytes_that_parse_as_nothing_is_refused(
    cluster: LocalCluster,
) -> None:
    leader = await cluster.wait_for_leader()
    address = cluster.client_address(leader)
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stream = channel.stream_stream(
            "/Cluster/LeaseKeepAliveStream",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        call = stream(timeout=10)
        # A field number 1 tagged as a 64-bit fixed value, cut short: no protobuf parser takes it.
        await call.write(b"\x09\x01")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse" in (caught.value.details() or "")
    async with cluster.client() as client:
        await client.propose_mapping("after-garbage", "fine")  # the node serves on


@pytest.mark.slow
async def test_a_leader_s_death_keeps_a_kept_lease_and_expires_an_abandoned_one_in_bound(
    cluster: LocalCluster,
) -> None:
    ttl = 2
    # The kept lease's TTL leaves its keepalives time to find the new leader: the old one's death
    # goes unnoticed for up to an election timeout, and the election takes a little more.
    kept_ttl = 5
    timing = Timing()
    async with cluster.client() as client:
        seen: list[tuple[float, str]] = []
        watcher = asyncio.create_task(deletes(client, "death/", 1, seen))
        await client.propose_mapping("death/marker", "watch in place")
        abandoned = (await client.grant_lease(ttl)).id
        await client.propose_mapping("death/abandoned", "1", lease=abandoned)
        last_sent = time.monotonic()
        await client.keep_alive(abandoned)
        async with client.lease(kept_ttl) as kept:
            await client.propose_mapping("death/kept", "1", lease=kept.id)
            leader = await cluster.wait_for_leader()
            cluster.kill_node(leader)
            killed = time.monotonic()
            try:
                async with asyncio.timeout(20):
                    await watcher
                gone_at, key = seen[0]
                assert key == "death/abandoned"
                # Never early; late by at most an election, a TTL and a tick (plus slack for
                # this machine: the commit, the watch's delivery, a loaded scheduler).
                assert gone_at - last_sent >= ttl
                bound = killed + timing.election_timeout_max + ttl + LEASE_TICK
                assert gone_at <= bound + 2.0, (gone_at - killed, bound - killed)
                # The kept lease lives on through the new leader, past its TTL.
                end = time.monotonic() + kept_ttl
                while time.monotonic() < end:
                    assert await client.get_value("death/kept", default=None) == "1"
                    await asyncio.sleep(0.2)
                assert not kept.lost.is_set(), kept.reason
            finally:
                cluster.start_node(leader)
        assert await client.get_value("death/kept", default=None) is None


async def test_the_command_line_grants_puts_with_keeps_alive_shows_and_revokes(
    cluster: LocalCluster,
) -> None:
    code, out, err = cli(cluster, "grant", "60")
    assert code == 0, err
    lease = out.strip()
    assert cli(cluster, "put", "cli/a", "1", "--lease", lease)[0] == 0
    code, out, _ = cli(cluster, "keepalive", lease)
    assert code == 0 and out.strip() == f"lease {lease} kept alive: TTL 60 s"
    code, out, _ = cli(cluster, "lease", lease)
    first, *keys = out.splitlines()
    assert code == 0 and first.startswith(f"lease {lease}: TTL 60 s, ") and keys == ["cli/a"]
    assert lease in cli(cluster, "leases")[1].split()
    assert cli(cluster, "revoke", lease)[1].strip() == "1"
    code, _, err = cli(cluster, "keepalive", lease)
    assert code == 1 and "lease gone" in err
    code, _, err = cli(cluster, "put", "cli/b", "1", "--lease", lease)
    assert code == 1 and f"lease {lease} not found" in err
    assert cli(cluster, "grant", "0")[0] == 2


async def test_a_restarted_cluster_still_holds_its_leases(cluster: LocalCluster) -> None:
    async with cluster.client() as client:
        lease = (await client.grant_lease(600)).id
        await client.propose_mapping("restart/k", "v", lease=lease)
    for node_id in cluster.node_ids:
        cluster.restart_node(node_id)
    async with cluster.client() as client:
        info = await wait_until(
            lambda: _time_to_live(client, lease), timeout=20, what="the lease after restart"
        )
        assert info.keys == ["restart/k"]
        await client.revoke_lease(lease)


async def _time_to_live(client: Client, lease: int) -> LeaseInfo | None:
    with contextlib.suppress(ClientError):
        return await client.lease_time_to_live(lease, keys=True)
    return None


async def test_a_backup_carries_the_leases_and_their_keys(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    async with cluster.client() as client:
        lease = (await client.grant_lease(300)).id
        await client.propose_mappings({"backup/a": "1", "backup/b": "2"}, lease=lease)
        path = tmp_path / "leases.db"
        await client.save_snapshot(path, timeout=30)
        await client.revoke_lease(lease)
    state = decode_state(b"".join(read_backup(str(path)).state))
    assert (lease, 300, ["backup/a", "backup/b"]) in state.leases
