"""Ranges and revisions on a cluster of real processes: revisions in write replies and on keys,
ranges by prefix and bounds with limits and continuation (linearizable on any node, or stale),
compare-and-swap by revision, delete by prefix, malformed requests, and the command line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from cluster_client import RequestRejectedError
from cluster_ranges import MAX_RANGE_LIMIT
from rpc import raft_pb2
from test.cluster_process import LocalCluster
from test.conftest import run_script


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    made = LocalCluster(nodes=3)
    try:
        made.start()
        yield made
    finally:
        made.stop()


def cli(cluster: LocalCluster, *args: str) -> tuple[int, str, str]:
    where = ["--first-port", str(cluster.first_port), "--nodes", str(cluster.nodes)]
    result = run_script(["cluster_client.py", *where, *args], timeout=30)
    return result.returncode, result.stdout, result.stderr


async def followers(cluster: LocalCluster) -> list[int]:
    leader = await cluster.wait_for_leader(timeout=15)
    return [n for n in cluster.node_ids if n != leader]


async def test_writes_answer_with_their_revision_and_keys_keep_theirs(
    cluster: LocalCluster,
) -> None:
    async with cluster.client() as client:
        first = await client.propose_mapping("rev/a", "1")
        second = await client.propose_mappings({"rev/a": "2", "rev/b": "1"})
        assert 0 < first < second
        a = await client.get_kv("rev/a")
        assert a is not None
        assert (a.value, a.create_revision, a.mod_revision, a.version) == ("2", first, second, 2)
        assert await client.get_kv("rev/missing") is None
        # A delete's and a delete-range's replies carry theirs too.
        stub = client._stub(client.known_leader or "")
        deleted: raft_pb2.DeleteResponse = await stub.DeleteKey(
            raft_pb2.DeleteRequest(key="rev/a"), timeout=5
        )
        assert deleted.success and deleted.existed and deleted.revision > second
        count, revision = await client.delete_prefix("rev/")
        assert count == 1 and revision > deleted.revision
        page = await client.get_range("rev/", prefix=True)
        assert page.kvs == [] and page.revision >= revision


async def test_ranges_by_prefix_and_bounds_in_order_with_limits_and_continuation(
    cluster: LocalCluster,
) -> None:
    keys = {f"rng/{i:03d}": f"v{i}" for i in range(25)}
    async with cluster.client() as client:
        await client.propose_mappings({**keys, "rng0": "after", "rnf": "before"})
        page = await client.get_range("rng/", prefix=True, limit=10)
        assert [kv.key for kv in page.kvs] == sorted(keys)[:10]
        assert (page.more, page.next_key, page.count) == (True, "rng/010", 25)
        rest = await client.get_range("rng/", prefix=True, limit=20, resume_key=page.next_key)
        assert [kv.key for kv in rest.kvs] == sorted(keys)[10:] and not rest.more
        # Every page followed by get_prefix; and a limit across pages.
        assert [kv.value for kv in await client.get_prefix("rng/")] == [
            keys[k] for k in sorted(keys)
        ]
        assert len(await client.get_prefix("rng/", limit=12)) == 12
        # [start, end), keys only, a count alone.
        bounded = await client.get_range("rnf", "rng/002", keys_only=True)
        assert [(kv.key, kv.value) for kv in bounded.kvs] == [
            ("rnf", None),
            ("rng/000", None),
            ("rng/001", None),
        ]
        counted = await client.get_range("rng", "rng1", count_only=True)
        assert (counted.count, counted.kvs) == (26, [])


async def test_a_range_on_a_follower_sees_every_write_acknowledged_before_it(
    cluster: LocalCluster,
) -> None:
    """Linearizable by default on every node (ReadIndex), as GetValue is."""
    nodes = await followers(cluster)
    async with cluster.client() as writer:
        for round_ in range(5):
            await writer.propose_mappings({f"lin/{round_}/{i}": "x" for i in range(3)})
            for node in nodes:
                page = await writer.get_range(
                    "lin/", prefix=True, node=cluster.client_address(node)
                )
                assert len(page.kvs) == 3 * (round_ + 1), f"node {node} after round {round_}"


async def test_a_stale_range_is_answered_without_a_leader(cluster: LocalCluster) -> None:
    """allow_stale: the node's own state at once, even with no majority to confirm a read."""
    leader = await cluster.wait_for_leader(timeout=15)
    async with cluster.client(deadline=2) as client:
        await client.propose_mapping("stale/k", "v")
        # Every node has applied it before the others stop (a linearizable read on each).
        for node in cluster.node_ids:
            await client.get_range("stale/", prefix=True, node=cluster.client_address(node))
        others = [n for n in cluster.node_ids if n != leader]
        for node in others:
            cluster.pause_node(node)
        try:
            at = [cluster.client_address(leader)]
            page = await client.get_range("stale/", prefix=True, stale=True, node=at[0])
            assert [kv.key for kv in page.kvs] == ["stale/k"]
            with pytest.raises(Exception, match="UNAVAILABLE|could not"):
                await client.get_range("stale/", prefix=True, node=at[0])
        finally:
            for node in others:
                cluster.resume_node(node)
    await cluster.wait_for_leader(timeout=15)


async def test_compare_and_swap_by_revision_makes_read_modify_write_safe(
    cluster: LocalCluster,
) -> None:
    """Increments from several clients at once, each a read and a swap at the revision it read:
    none is lost."""
    async with cluster.client() as setup:
        await setup.propose_mapping("counter", "0")

    async def increment(times: int) -> None:
        async with cluster.client() as client:
            done = 0
            while done < times:
                kv = await client.get_kv("counter")
                assert kv is not None and kv.value is not None
                outcome = await client.compare_and_swap_revision(
                    "counter", kv.mod_revision, str(int(kv.value) + 1)
                )
                if outcome.swapped:
                    done += 1
                else:
                    assert outcome.mod_revision > kv.mod_revision

    await asyncio.gather(*(increment(5) for _ in range(3)))
    async with cluster.client() as client:
        assert await client.get_value("counter") == "15"
        absent = await client.compare_and_swap_revision("counter-new", 0, "made")
        assert absent.swapped and absent.mod_revision == absent.revision
        again = await client.compare_and_swap_revision("counter-new", 0, "twice")
        assert not again.swapped and again.value == "made"


@pytest.mark.parametrize(
    ("request_fields", "problem"),
    [
        ({"key": "a", "limit": -1}, "limit must be"),
        ({"key": "a", "limit": MAX_RANGE_LIMIT + 1}, "limit must be"),
        ({"key": "a", "prefix": True, "range_end": "b"}, "not both"),
        ({"key": "b", "range_end": "a"}, "must come after"),
        ({"key": ""}, "key must not be empty"),
        ({"key": "k" * 2000, "prefix": True}, "the limit is 1024"),
    ],
)
async def test_a_malformed_range_is_invalid_argument(
    cluster: LocalCluster, request_fields: dict[str, Any], problem: str
) -> None:
    async with cluster.client() as client:
        stub = client._stub(cluster.client_addresses[0])
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Range(raft_pb2.RangeRequest(**request_fields), timeout=5)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert problem in (raised.value.details() or "")
        if "limit" not in request_fields:
            # The same keys are refused to a delete-range, which the client says so.
            with pytest.raises(RequestRejectedError, match=problem):
                await client.delete_range(**request_fields)


async def test_the_command_line_gets_and_deletes_by_prefix(cluster: LocalCluster) -> None:
    await cluster.wait_for_leader(timeout=15)
    code, _, err = cli(cluster, "put-many", "cfg/b=2", "cfg/a=1", "cfg/c=3", "cfgx=9")
    assert code == 0, err
    code, out, err = cli(cluster, "get", "--prefix", "cfg/")
    assert (code, out) == (0, "cfg/a\t1\ncfg/b\t2\ncfg/c\t3\n"), err
    code, out, err = cli(cluster, "get", "--prefix", "cfg/", "--limit", "2", "--json")
    assert code == 0, err
    kvs = json.loads(out)["kvs"]
    assert [(kv["key"], kv["value"], kv["version"]) for kv in kvs] == [
        ("cfg/a", "1", 1),
        ("cfg/b", "2", 1),
    ]
    assert kvs[0]["create_revision"] == kvs[0]["mod_revision"] > 0
    code, out, err = cli(cluster, "get", "cfg/a", "--json")
    assert code == 0 and json.loads(out)["mod_revision"] == kvs[0]["mod_revision"], err
    code, out, err = cli(cluster, "cas", "--rev", str(kvs[0]["mod_revision"]), "cfg/a", "new")
    assert (code, out) == (0, "new\n"), err
    code, out, err = cli(cluster, "cas", "--rev", str(kvs[0]["mod_revision"]), "cfg/a", "again")
    assert code == 4 and "mod revision" in err
    code, out, err = cli(cluster, "delete", "--prefix", "cfg/")
    assert (code, out) == (0, "3\n"), err
    code, out, err = cli(cluster, "get", "--prefix", "cfg")
    assert (code, out) == (0, "cfgx\t9\n"), err
    code, _, err = cli(cluster, "get", "--limit", "2", "cfgx")
    assert code == 2 and "--limit" in err
