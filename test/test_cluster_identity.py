"""Cluster identity: every node knows its cluster's id (derived at bootstrap, kept on disk), every
peer call carries it, and a node refuses calls from another cluster, so two clusters never merge."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cluster_config import ClusterConfig, NodeAddress
from cluster_identity import (
    FILE_NAME,
    ClusterIdentity,
    ClusterIdentityError,
    derive_cluster_id,
)
from rpc import raft_pb2
from test.cluster_process import HostCluster, find_free_port_block
from test.conftest import Stubs, log_tails, run_script, wait_until


def three(first_port: int, ids: tuple[int, ...] = (1, 2, 3)) -> ClusterConfig:
    return ClusterConfig(
        {
            node_id: NodeAddress(
                node_id, f"127.0.0.1:{first_port + i}", f"127.0.0.1:{first_port + 10 + i}"
            )
            for i, node_id in enumerate(ids)
        }
    )


def test_members_and_token_decide_the_id() -> None:
    """Founding members derive one id without talking; other members or tokens give another."""
    a = three(20000)
    assert derive_cluster_id(a) == derive_cluster_id(three(20000))
    assert derive_cluster_id(a) != derive_cluster_id(three(20001))
    assert derive_cluster_id(a) != derive_cluster_id(three(20000, (1, 2, 4)))
    assert derive_cluster_id(a) != derive_cluster_id(a, "another-token")
    assert len(derive_cluster_id(a)) == 16
    # A node that reaches its peers through proxies lists other Raft addresses: the same cluster.
    proxied = ClusterConfig(
        {i: NodeAddress(i, f"127.0.0.1:{30000 + i}", n.client_address) for i, n in a.nodes.items()}
    )
    assert derive_cluster_id(proxied) == derive_cluster_id(a)


async def test_the_id_is_kept_and_a_damaged_file_is_reported(tmp_path: Path) -> None:
    assert (await ClusterIdentity.load(str(tmp_path))).cluster_id is None
    identity = await ClusterIdentity.load(str(tmp_path))
    await identity.keep("0123456789abcdef")
    assert (await ClusterIdentity.load(str(tmp_path))).cluster_id == "0123456789abcdef"

    path = tmp_path / FILE_NAME
    good = path.read_bytes()
    for damaged in (good[:-5], good.replace(b"0123", b"0124"), b"", b"\xff" * 40):
        path.write_bytes(damaged)
        with pytest.raises(ClusterIdentityError, match="damaged"):
            await ClusterIdentity.load(str(tmp_path))


def test_a_node_with_a_damaged_cluster_id_file_does_not_start(tmp_path: Path) -> None:
    port = find_free_port_block(10)
    data = tmp_path / "data"
    data.mkdir()
    (data / FILE_NAME).write_text("raft-demo cluster 0123456789abcdef crc32 00000000\n")
    result = run_script(
        ["raft_node.py", "--port", str(port), "--first-port", str(port), "--data-dir", str(data)]
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and FILE_NAME in lines[0] and "damaged" in lines[0], result.stderr


async def test_two_clusters_whose_member_lists_overlap_never_merge(
    tmp_path: Path, stubs: Stubs
) -> None:
    """Cluster B's file names, as its node 3, an address where cluster A's node 3 runs: the same
    ids, so without cluster ids A's node 3 would take B's leader for its own and mix the logs."""
    ports = find_free_port_block(30)
    config_a = three(ports)
    config_b = three(ports + 3)
    config_b.nodes[3] = config_a.nodes[3]
    files = {}
    for name, config in (("a", config_a), ("b", config_b)):
        path = tmp_path / f"{name}.toml"
        path.write_text(
            "".join(
                f'[[node]]\nid = {n.id}\nraft = "{n.raft_address}"\nclient = "{n.client_address}"\n'
                for n in config.nodes.values()
            )
        )
        files[name] = path
    a = HostCluster(config_a, {i: files["a"] for i in (1, 2, 3)}, data_dir=tmp_path / "a")
    b = HostCluster(config_b, {i: files["b"] for i in (1, 2)}, data_dir=tmp_path / "b")
    try:
        a.start()
        b.start_node(1)
        b.start_node(2)

        async def leads(address: str) -> bool:
            info = await stubs.leader_info(address)
            return info is not None and info.leader_address == address

        async def put_to(config: ClusterConfig, ids: tuple[int, ...], key: str) -> None:
            async def leader() -> str | None:
                for i in ids:
                    if await leads(config.nodes[i].client_address):
                        return config.nodes[i].client_address
                return None

            address = await wait_until(leader, 20, f"a leader among {ids}")
            await stubs.cluster(address).ProposeMapping(
                raft_pb2.Mapping(key=key, value="v"), timeout=10
            )

        # Both clusters elect and serve, each on its own: B's two nodes are a majority of its three.
        await put_to(config_a, (1, 2, 3), "only-in-a")
        await put_to(config_b, (1, 2), "only-in-b")
        refused = f"belongs to cluster {derive_cluster_id(config_b)}"

        async def a3_refused_b() -> bool:
            return any(refused in line for line in a.log_tail(3, 200))

        await wait_until(a3_refused_b, 20, "A's node 3 refuses B's calls, saying why")
        # B keeps calling; A's node 3 stays A's: it has A's write and never B's.
        await put_to(config_b, (1, 2), "only-in-b-2")
        for node_id in (1, 2, 3):
            address = config_a.nodes[node_id].client_address

            async def has_a_write(address: str = address) -> bool:
                return await stubs.value(address, "only-in-a") is not None

            await wait_until(has_a_write, 10, f"A's node {node_id} applies A's write")
            for key in ("only-in-b", "only-in-b-2"):
                assert await stubs.value(address, key) is None, (key, log_tails(a))
        for node_id in (1, 2):
            assert await stubs.value(config_b.nodes[node_id].client_address, "only-in-a") is None

        # A member's call without the id, or with another cluster's, is refused before the node
        # sees it; with A's id the same stub reaches it.
        address = config_a.nodes[3].raft_address
        vote = raft_pb2.VoteRequest(term=1, requester_id=1, pre_vote=True)
        for stub in (stubs.raft(address), stubs.raft(address, config_b)):
            with pytest.raises(grpc.aio.AioRpcError) as refusal:
                await stub.RequestVote(vote, timeout=5)
            assert refusal.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "cluster" in (refusal.value.details() or "")
        reply = await stubs.raft(address, config_a).RequestVote(vote, timeout=5)
        assert not reply.vote_granted  # a member's pre-vote, refused for its stale log: it arrived
    finally:
        b.stop()
        a.stop()
