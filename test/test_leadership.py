"""Leadership hand-over on real processes: the TransferLeadership admin call moves leadership to the
node named, and a leader stopped with SIGTERM hands leadership over before it exits."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from rpc import raft_pb2
from test.cluster_process import LocalCluster
from test.conftest import Stubs, leader_of, log_tails, put

MakeCluster = Callable[..., LocalCluster]
# Election timeouts far longer than a hand-over takes: a successor that waited for one would show.
SLOW_ELECTIONS = ["--election-timeout-min-ms", "4000", "--election-timeout-max-ms", "6000"]


async def role_and_term(stubs: Stubs, address: str) -> tuple[str, int]:
    info = await stubs.leader_info(address)
    assert info is not None, f"{address} did not answer GetLeader"
    return str(info.role), int(info.term)


async def test_transfer_leadership_moves_leadership_to_the_named_node(
    make_cluster: MakeCluster, stubs: Stubs
) -> None:
    cluster = make_cluster(nodes=3)
    leader, address = await leader_of(cluster)
    target, other = (n for n in cluster.node_ids if n != leader)
    await put(stubs, cluster, "before", "transfer")

    # A node that does not lead redirects to the one that does.
    redirected = await stubs.cluster(cluster.client_address(other)).TransferLeadership(
        raft_pb2.TransferLeadershipRequest(target_id=target), timeout=10
    )
    assert not redirected.success
    assert redirected.current_leader == leader
    assert redirected.leader_address == address
    # An id that is not a member is refused, with one line.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.cluster(address).TransferLeadership(
            raft_pb2.TransferLeadershipRequest(target_id=7), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a member" in (refused.value.details() or "")
    _, term = await role_and_term(stubs, address)

    moved = await stubs.cluster(address).TransferLeadership(
        raft_pb2.TransferLeadershipRequest(target_id=target), timeout=10
    )

    assert moved.success, log_tails(cluster)
    assert moved.current_leader == target
    assert moved.leader_address == cluster.client_address(target)
    assert await role_and_term(stubs, cluster.client_address(target)) == ("leader", term + 1)
    assert await cluster.wait_for_leader(timeout=10) == target
    assert await stubs.value(cluster.client_address(target), "before") == "transfer"
    assert await put(stubs, cluster, "after", "transfer") == cluster.client_address(target)


@pytest.mark.slow
async def test_a_leader_stopped_with_sigterm_hands_leadership_over_before_it_exits(
    make_cluster: MakeCluster, stubs: Stubs
) -> None:
    cluster = make_cluster(nodes=3, extra_args=SLOW_ELECTIONS)
    leader, address = await leader_of(cluster)
    _, term = await role_and_term(stubs, address)
    await put(stubs, cluster, "before", "restart")

    assert cluster.stop_node(leader) == 0, log_tails(cluster, [leader])

    successor = await cluster.wait_for_leader(timeout=15, exclude=[leader])
    successor_log = cluster.node_log(successor)
    # Taken over at the old leader's request, in the very next term: nobody waited for a timeout.
    assert f"leader {leader} asked me to take over" in successor_log, log_tails(cluster)
    assert f"handed leadership to {successor}" in cluster.node_log(leader), log_tails(cluster)
    assert await role_and_term(stubs, cluster.client_address(successor)) == ("leader", term + 1)
    assert await put(stubs, cluster, "after", "restart") == cluster.client_address(successor)
    assert await stubs.value(cluster.client_address(successor), "before") == "restart"
