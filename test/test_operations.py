"""The key-value operations on five real node processes: delete, compare-and-swap, atomic batches,
linearizable reads served by followers, stale reads as an explicit choice, exactly-once retries
through client sessions, and the cluster_client.py commands for them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from cluster_client import Client, ClusterUnavailableError
from rpc import raft_pb2
from test.cluster_process import LocalCluster
from test.conftest import Stubs, log_tails, run_script, wait_until

MakeCluster = Callable[..., LocalCluster]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """One cluster for the tests that leave every node running; DEBUG narration shows who
    served each read."""
    made = LocalCluster(nodes=5, extra_args=["--log-level", "DEBUG"])
    try:
        made.start()
        yield made
    finally:
        made.stop()


async def follower_of(cluster: LocalCluster) -> tuple[int, int]:
    """(leader, a follower) once a leader is agreed on."""
    leader = await cluster.wait_for_leader(timeout=15)
    return leader, next(n for n in cluster.node_ids if n != leader)


async def leader_stub(stubs: Stubs, cluster: LocalCluster) -> tuple[int, Any]:
    leader = await cluster.wait_for_leader(timeout=15)
    return leader, stubs.cluster(cluster.client_address(leader))


# ---- the library -----------------------------------------------------------------------------


async def test_delete_reports_whether_the_key_existed(cluster: LocalCluster) -> None:
    async with cluster.client() as client:
        await client.propose_mapping("doomed", "here")
        assert await client.delete("doomed") is True
        assert await client.get_value("doomed", default=None) is None
        assert await client.delete("doomed") is False


async def test_compare_and_swap_swaps_only_on_the_expected_value(cluster: LocalCluster) -> None:
    async with cluster.client() as client:
        assert await client.compare_and_swap("lock", None, "owner-1") == (True, "owner-1")
        assert await client.compare_and_swap("lock", None, "owner-2") == (False, "owner-1")
        assert await client.compare_and_swap("lock", "owner-9", "owner-2") == (False, "owner-1")
        assert await client.compare_and_swap("lock", "owner-1", "owner-2") == (True, "owner-2")
        assert await client.get_value("lock") == "owner-2"
        await client.delete("lock")
        assert await client.compare_and_swap("lock", "owner-2", "x") == (False, None)


async def test_a_batch_is_applied_whole_and_every_node_serves_it(cluster: LocalCluster) -> None:
    batch = {f"batch-{i}": f"value-{i}" for i in range(10)}
    async with cluster.client() as client:
        await client.propose_mappings(batch)
        for address in cluster.client_addresses:
            # Linearizable on every node: each sees the whole batch at once, without waiting.
            got = {k: await client.get_value(k, node=address) for k in batch}
            assert got == batch, f"{address} served {got}"


async def test_a_linearizable_read_on_a_follower_is_served_by_that_follower(
    cluster: LocalCluster,
) -> None:
    leader, follower = await follower_of(cluster)
    address = cluster.client_address(follower)
    async with cluster.client() as client:
        for i in range(10):
            await client.propose_mapping("follower-read", f"v{i}")
            # Asked right after the write was acknowledged, the follower already answers with it.
            assert await client.get_value("follower-read", node=address) == f"v{i}"
    served = f"[{follower} follower t="
    gave = "gave read index"

    async def narrated() -> bool:
        lines = cluster.node_log(follower).splitlines()
        mine = [line for line in lines if served in line and "served a linearizable read" in line]
        asked = [line for line in cluster.node_log(leader).splitlines() if gave in line]
        return len(mine) >= 10 and any(f"to {follower}" in line for line in asked)

    try:
        await wait_until(narrated, 10, "the follower narrates serving the reads itself")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{log_tails(cluster, [leader, follower])}") from None


async def test_a_retried_cas_whose_first_reply_was_lost_reports_its_original_outcome(
    cluster: LocalCluster, stubs: Stubs
) -> None:
    _, stub = await leader_stub(stubs, cluster)
    registered = await stub.RegisterClient(raft_pb2.RegisterClientRequest(), timeout=6)
    assert registered.success and registered.client_id > 0
    session = raft_pb2.Session(client_id=registered.client_id, sequence=1, first_outstanding=1)
    cas = raft_pb2.CompareAndSwapRequest(key="retried-cas", new_value="mine", session=session)
    # The first attempt is applied, but its reply never reaches the client.
    lost = await stub.CompareAndSwap(cas, timeout=6)
    assert lost.success
    # Meanwhile another client changes the key: a second application would now fail.
    async with cluster.client() as other:
        await other.propose_mapping("retried-cas", "theirs")
    # The client retries the same (client_id, sequence): it gets the original outcome...
    _, stub = await leader_stub(stubs, cluster)
    retried = await stub.CompareAndSwap(cas, timeout=6)
    assert (retried.success, retried.swapped, retried.current_value) == (True, True, "mine")
    # ...and the store was not changed again.
    async with cluster.client() as other:
        assert await other.get_value("retried-cas") == "theirs"
        # A new request (the next sequence number) is applied afresh and does not swap.
        fresh = raft_pb2.CompareAndSwapRequest(
            key="retried-cas",
            new_value="mine",
            session=raft_pb2.Session(
                client_id=registered.client_id, sequence=2, first_outstanding=2
            ),
        )
        answer = await stub.CompareAndSwap(fresh, timeout=6)
        assert (answer.swapped, answer.current_value) == (False, "theirs")


async def test_a_retried_batch_call_reports_each_write_s_original_outcome(
    cluster: LocalCluster, stubs: Stubs
) -> None:
    _, stub = await leader_stub(stubs, cluster)
    registered = await stub.RegisterClient(raft_pb2.RegisterClientRequest(), timeout=6)
    client_id = registered.client_id

    def session(sequence: int) -> raft_pb2.Session:
        return raft_pb2.Session(client_id=client_id, sequence=sequence, first_outstanding=1)

    async with cluster.client() as other:
        await other.propose_mapping("batched-doomed", "here")
    request = raft_pb2.BatchRequest(
        ops=[
            raft_pb2.BatchOp(
                delete=raft_pb2.DeleteRequest(key="batched-doomed", session=session(1))
            ),
            raft_pb2.BatchOp(
                put=raft_pb2.Mapping(key="batched-new", value="1", session=session(2))
            ),
            raft_pb2.BatchOp(get=raft_pb2.Key(key="batched-doomed")),
        ]
    )
    # The first call is applied, but say its reply never reached the client.
    first = await stub.Batch(request, timeout=6)
    assert [r.code for r in first.results] == [0, 0, 0]
    assert first.results[0].delete.existed
    # Meanwhile another client writes both keys again.
    async with cluster.client() as other:
        await other.propose_mappings({"batched-doomed": "back", "batched-new": "2"})
    # The same call again: each write answers as it first did and changes nothing.
    _, stub = await leader_stub(stubs, cluster)
    again = await stub.Batch(request, timeout=6)
    assert [r.code for r in again.results] == [0, 0, 0]
    assert (again.results[0].delete.success, again.results[0].delete.existed) == (True, True)
    assert again.results[1].put.success
    # The read is not a write: it reads afresh, linearizably.
    assert again.results[2].get.value == "back"
    async with cluster.client() as other:
        assert await other.get_value("batched-doomed") == "back"
        assert await other.get_value("batched-new") == "2"


async def test_sixty_four_writers_sharing_a_client_are_acknowledged_and_served_everywhere(
    cluster: LocalCluster,
) -> None:
    written = {f"shared-{i}": f"value-{i}" for i in range(64)}
    async with cluster.client() as client:
        for _ in range(3):
            await asyncio.gather(*(client.propose_mapping(k, v) for k, v in written.items()))
        deleted = await asyncio.gather(*(client.delete(f"shared-{i}") for i in range(0, 64, 2)))
        assert deleted == [True] * 32
        for address in cluster.client_addresses:
            got = await asyncio.gather(
                *(client.get_value(k, default=None, node=address) for k in written)
            )
            assert got == [None if i % 2 == 0 else f"value-{i}" for i in range(64)], address


async def test_a_write_under_an_unknown_session_is_refused_and_not_applied(
    cluster: LocalCluster, stubs: Stubs
) -> None:
    _, stub = await leader_stub(stubs, cluster)
    request = raft_pb2.Mapping(
        key="no-session",
        value="v",
        session=raft_pb2.Session(client_id=10**12, sequence=1, first_outstanding=1),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ProposeMapping(request, timeout=6)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "unknown" in (caught.value.details() or "")
    async with cluster.client() as client:
        assert await client.get_value("no-session", default=None) is None


@pytest.mark.slow
async def test_a_follower_without_a_leader_refuses_a_linearizable_read_but_serves_a_stale_one(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(nodes=5)
    leader, lagging = await follower_of(cluster)
    others = [n for n in cluster.node_ids if n not in (leader, lagging)]
    async with cluster.client() as client:
        await client.propose_mapping("k", "old")
        cluster.kill_node(lagging)
        await client.propose_mapping("k", "new")
    # The leader and two more freeze: the lagging node comes back next to one other node, too
    # few to elect anyone, so nothing can tell it about "new".
    paused = [leader, *others[:2]]
    for node_id in paused:
        cluster.pause_node(node_id)
    try:
        cluster.start_node(lagging)
        address = cluster.client_address(lagging)
        async with cluster.client(deadline=3) as client:
            stale = await wait_until(
                lambda: _answers(client, address), 15, "the restarted node answers a stale read"
            )
            assert stale != ("new",)
            with pytest.raises(ClusterUnavailableError):
                await client.get_value("k", node=address)
    finally:
        for node_id in paused:
            cluster.resume_node(node_id)
    async with cluster.client(deadline=20) as client:
        assert await client.get_value("k", node=cluster.client_address(lagging)) == "new"


async def _answers(client: Client, address: str) -> tuple[str | None] | None:
    try:
        return (await client.get_value("k", default=None, stale=True, node=address),)
    except ClusterUnavailableError:
        return None


# ---- the command line ------------------------------------------------------------------------


def cli(cluster: LocalCluster, *args: str) -> tuple[int, str, str]:
    where = ["--first-port", str(cluster.first_port), "--nodes", str(cluster.nodes)]
    result = run_script(["cluster_client.py", *where, *args], timeout=30)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 1, result.stderr
    return result.returncode, result.stdout, result.stderr


async def test_cli_delete_cas_put_many_and_stale_get(cluster: LocalCluster) -> None:
    await cluster.wait_for_leader(timeout=15)
    assert cli(cluster, "put-many", "cli-a=1", "cli-b=x=y")[:2] == (0, "")
    assert cli(cluster, "get", "cli-b")[:2] == (0, "x=y\n")
    assert cli(cluster, "get", "--stale", "cli-a")[0] == 0

    assert cli(cluster, "delete", "cli-a")[:2] == (0, "")
    code, out, err = cli(cluster, "delete", "cli-a")
    assert (code, out) == (1, "") and "cli-a" in err

    assert cli(cluster, "cas", "--absent", "cli-c", "first") == (0, "first\n", "")
    code, out, err = cli(cluster, "cas", "--absent", "cli-c", "second")
    assert (code, out) == (4, "") and "'first'" in err
    assert cli(cluster, "cas", "cli-c", "first", "second") == (0, "second\n", "")
    code, out, err = cli(cluster, "cas", "cli-c", "first", "third")
    assert (code, out) == (4, "") and "'second'" in err
    code, _, err = cli(cluster, "cas", "never-set", "x", "y")
    assert code == 4 and "not set" in err


async def test_cli_transfer_leader_moves_leadership_to_the_named_node(
    cluster: LocalCluster,
) -> None:
    _, target = await follower_of(cluster)
    assert cli(cluster, "transfer-leader", str(target)) == (0, f"{target}\n", "")
    assert await cluster.wait_for_leader(timeout=15) == target
    code, out, _ = cli(cluster, "leader")
    assert (code, out.split()[0]) == (0, str(target))


@pytest.mark.parametrize(
    "args",
    [
        ["cas", "k", "v"],
        ["cas", "--absent", "k", "old", "new"],
        ["put-many", "no-equals-sign"],
        ["put-many", "k=1", "k=2"],
        ["delete"],
        ["transfer-leader", "x"],
    ],
    ids=["cas arity", "absent with expected", "no =", "key twice", "no key", "bad id"],
)
def test_cli_usage_errors_exit_2_in_one_line(cluster: LocalCluster, args: list[str]) -> None:
    code, out, _ = cli(cluster, *args)
    assert (code, out) == (2, "")


async def test_cli_put_many_with_an_invalid_key_is_rejected_whole(cluster: LocalCluster) -> None:
    await cluster.wait_for_leader(timeout=15)
    code, _, err = cli(cluster, "put-many", "cli-ok=1", "=2")
    assert code == 2 and "key must not be empty" in err
    code, _, _ = cli(cluster, "get", "cli-ok")
    assert code == 1
