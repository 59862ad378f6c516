"""Membership changes on real node processes under a recorded client load: growing from three nodes
to five and back without the old leader, replacing a node whose disk was lost, and a follower that
comes back after its entries were compacted away. Each ends with a linearizable history in which
no acknowledged write is lost."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

import cluster_client
from rpc import raft_pb2
from test.cluster_process import HostCluster
from test.conftest import Stubs, log_tails, wait_until
from test.fault_suite import RecordedLoad
from test.nemesis import REMOVED_NARRATION, Change, MembershipChanges

# Each test starts a real cluster under load and grows, shrinks or replaces its members: 3 to 4 s
# each here, with the cluster's start.
pytestmark = pytest.mark.slow

# Small snapshot thresholds, so that a follower down for a few seconds needs a snapshot.
NODE_FLAGS = ["--snapshot-entries", "100", "--snapshot-keep-entries", "20"]
LEADER_TIMEOUT = 20.0
CATCH_UP_TIMEOUT = 30.0


@dataclass
class Setup:
    cluster: HostCluster
    changes: MembershipChanges
    load: RecordedLoad
    admin: cluster_client.Client

    def explain(self, nodes: list[int] | None = None) -> str:
        return log_tails(self.cluster, nodes)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    """Nodes 1, 2, 3 with a leader, an admin client, and a recorded load already running; every
    process, client and port is released afterwards, whatever the test did."""
    started = time.monotonic()

    def clock() -> float:
        return time.monotonic() - started

    cluster = HostCluster.on_localhost(3, tmp_path / "nodes", NODE_FLAGS)
    admin: cluster_client.Client | None = None
    load: RecordedLoad | None = None
    try:
        cluster.start()
        await cluster.wait_for_leader(LEADER_TIMEOUT)
        admin = cluster.client(deadline=60)
        changes = MembershipChanges(cluster, admin, clock, say=lambda text: print(text, flush=True))
        load = RecordedLoad(cluster, clock, clients=3, keys=4, fresh_writers=1)
        load.start()
        yield Setup(cluster, changes, load, admin)
    finally:
        try:
            if load is not None:
                await load.stop()
            if admin is not None:
                await admin.close()
        finally:
            cluster.stop()


async def acknowledged(setup: Setup, more: int) -> None:
    """Wait until the load has `more` further acknowledged operations: the cluster serves."""
    history = setup.load.history

    def count() -> int:
        return sum(1 for op in history.operations if op.outcome == "ok")

    target = count() + more

    async def reached() -> bool:
        assert setup.load.failed() is None, setup.load.failed()
        return count() >= target

    await wait_until(reached, 30, f"{more} more client operations succeed")


async def voters(setup: Setup) -> list[int]:
    return await setup.changes.voters()


async def own_voters(stubs: Stubs, setup: Setup, node_id: int) -> list[int] | None:
    """The voters in the node's own latest configuration (a stale member list asked of it)."""
    try:
        reply = await stubs.cluster(setup.cluster.client_address(node_id)).ListMembers(
            raft_pb2.ListMembersRequest(allow_stale=True), timeout=2
        )
    except grpc.aio.AioRpcError:
        return None
    return sorted(m.id for m in reply.config.members if m.voter)


async def every_member_lists(stubs: Stubs, setup: Setup, expected: list[int]) -> None:
    for node_id in setup.cluster.node_ids:

        async def agrees(node_id: int = node_id) -> bool:
            return await own_voters(stubs, setup, node_id) == expected

        await wait_until(agrees, 20, f"node {node_id} lists voters {expected}")


async def serves(setup: Setup, node_id: int, expected: dict[str, str]) -> None:
    """Wait until the node's own linearizable reads return every expected value."""

    async def check() -> bool:
        async with setup.cluster.probe(rpc_timeout=3) as probe:
            return not await probe.mismatches(node_id, expected)

    try:
        await wait_until(check, CATCH_UP_TIMEOUT, f"node {node_id} serves {len(expected)} writes")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{setup.explain([node_id])}") from None


def writes_went_on(setup: Setup, change: Change) -> None:
    """While the change was made, writes were acknowledged and none failed (asked once the load
    has stopped, so that every write has its outcome)."""
    assert change.ended is not None
    acked, _ = setup.load.writes(change.started, change.ended)
    assert acked > 0, f"no write was acknowledged during: {change.description}"
    failed = setup.load.unsuccessful_writes(change.started, change.ended)
    assert not failed, (
        f"{len(failed)} writes did not succeed during: {change.description}: "
        + "; ".join(f"{op.describe()} {op.outcome} at {op.invoke:.2f} s" for op in failed)
        + f"; client errors: {setup.load.client_errors[-3:]}"
    )


async def history_holds(setup: Setup, also_written: dict[str, str] | None = None) -> None:
    await setup.load.stop()
    verdict = await setup.load.verdict(also_written)
    assert verdict.ok, "\n".join(verdict.lines()) + "\n" + setup.explain()
    assert verdict.fresh_writes > 0


async def test_growing_to_five_then_shrinking_to_three_removes_the_leader_cleanly(
    setup: Setup, stubs: Stubs
) -> None:
    cluster, changes = setup.cluster, setup.changes
    await acknowledged(setup, 50)
    first = await voters(setup)
    assert first == [1, 2, 3]

    # The operator's way: `member add`, then the node started with --join.
    added = await changes.add(announce=True)
    assert await voters(setup) == [*first, added.nodes[0]]
    # The node's own way: --join alone asks the cluster to add it.
    joined = await changes.add(announce=False)
    grown = [*first, added.nodes[0], joined.nodes[0]]
    assert await voters(setup) == grown
    await every_member_lists(stubs, setup, grown)

    leader = await cluster.wait_for_leader(LEADER_TIMEOUT)
    follower = min(n for n in first if n != leader)
    removed = await changes.remove(follower)
    assert removed.exit_code == 0, setup.explain([follower])
    assert await voters(setup) == [n for n in grown if n != follower]

    leader = await cluster.wait_for_leader(LEADER_TIMEOUT)
    deposed = await changes.remove(leader)
    # The leader stepped down once its removal committed, said why, and its process ended.
    assert deposed.exit_code == 0, setup.explain([leader])
    assert REMOVED_NARRATION in cluster.node_log(leader)
    shrunk = [n for n in grown if n not in (follower, leader)]
    assert await voters(setup) == shrunk
    assert await cluster.wait_for_leader(LEADER_TIMEOUT) in shrunk
    await every_member_lists(stubs, setup, shrunk)
    listed = await changes.members()
    assert sorted(listed.removed) == sorted([follower, leader])

    await acknowledged(setup, 50)
    await history_holds(setup)
    # Adding a node cost no availability: writes went on, and none failed, while it caught up.
    writes_went_on(setup, added)
    writes_went_on(setup, joined)


async def test_a_node_whose_disk_was_lost_is_replaced_by_a_fresh_id(setup: Setup) -> None:
    cluster, changes = setup.cluster, setup.changes
    await acknowledged(setup, 100)
    leader = await cluster.wait_for_leader(LEADER_TIMEOUT)
    victim = min(n for n in cluster.node_ids if n != leader)
    lost = cluster.address(victim)

    replaced = await changes.replace(victim)
    newcomer = replaced.nodes[1]
    assert newcomer not in (1, 2, 3)
    expected = sorted({1, 2, 3} - {victim} | {newcomer})
    assert await voters(setup) == expected
    assert victim in (await changes.members()).removed

    # The fresh node, which started from an empty directory, holds everything written so far.
    await serves(setup, newcomer, dict(setup.load.fresh))
    # The lost node's id is gone for good, even at its old addresses.
    with pytest.raises(cluster_client.MembershipRefusedError):
        await setup.admin.add_member(
            victim, lost.raft_address, lost.client_address, wait_until_voter=False
        )

    await acknowledged(setup, 50)
    await history_holds(setup)


async def test_a_follower_down_past_the_compacted_log_catches_up_by_snapshot(
    setup: Setup,
) -> None:
    cluster, changes = setup.cluster, setup.changes
    await acknowledged(setup, 50)
    leader = await cluster.wait_for_leader(LEADER_TIMEOUT)
    victim = min(n for n in cluster.node_ids if n != leader)

    change = await changes.snapshot_catch_up(victim, fill=True)
    assert change.compacted_past, "the others' logs were never compacted past the follower"
    assert change.snapshot_installed, setup.explain()
    senders = [n for n in cluster.node_ids if f"to {victim}" in _sending_lines(cluster, n)]
    assert senders, "no node narrates sending it a snapshot"
    # One install brought it up to date: it did not loop on snapshots.
    assert cluster.node_log(victim).count("installed snapshot up to index") == 1

    await serves(setup, victim, {**setup.load.fresh, **change.written})
    assert await voters(setup) == [1, 2, 3]
    await acknowledged(setup, 50)
    await history_holds(setup, change.written)


def _sending_lines(cluster: HostCluster, node_id: int) -> str:
    return "\n".join(
        line for line in cluster.node_log(node_id).splitlines() if "sending snapshot" in line
    )
