"""What an operator sees of real node processes: the standard gRPC health check, server reflection,
Prometheus metrics on --metrics-port, and `cluster_client.py status`."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from cluster_client import ClusterStatus
from test.cluster_process import REPO_ROOT, LocalCluster, find_free_port_block
from test.conftest import log_tails, run_script, wait_until

# Short timeouts so that elections and a lost leader take a fraction of a second.
FAST = (
    "--heartbeat-ms",
    "50",
    "--election-timeout-min-ms",
    "300",
    "--election-timeout-max-ms",
    "600",
)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WRITES = 20
# A follower answers the leader's heartbeats every 50 ms here; the leader's view of when it last
# heard from one is a few of those at most, and this bound is generous for a loaded machine.
RECENT_CONTACT_SECONDS = 5.0
_T = TypeVar("_T")


class MetricsCluster(LocalCluster):
    """A local cluster whose nodes also serve metrics, each on a free port of its own."""

    def __init__(self, nodes: int) -> None:
        super().__init__(nodes=nodes, extra_args=FAST)
        first = find_free_port_block(nodes)
        self.metrics_ports = {node_id: first + i for i, node_id in enumerate(self.node_ids)}

    def bootstrap_command(self, node_id: int) -> list[str]:
        port = str(self.metrics_ports[node_id])
        return [*super().bootstrap_command(node_id), "--metrics-port", port]

    def status_command(self, *args: str) -> list[str]:
        where = ["--first-port", str(self.first_port), "--nodes", str(self.nodes)]
        return ["cluster_client.py", *where, "status", *args]


@pytest.fixture(scope="module")
def cluster() -> Iterator[MetricsCluster]:
    """Three nodes with metrics that have elected a leader and served WRITES writes and a read."""
    made = MetricsCluster(3)
    try:
        made.start()

        async def load() -> None:
            async with made.client() as client:
                for i in range(WRITES):
                    await client.propose_mapping(f"key-{i}", f"value-{i}")
                assert await client.get_value("key-0") == "value-0"

                async def caught_up() -> bool:
                    status = await client.status()
                    indices = {(n.last_log_index, n.applied_index) for n in status.nodes}
                    return status.leader_id is not None and len(indices) == 1

                # Every later check sees an idle cluster: all nodes hold and applied everything.
                await wait_until(caught_up, 10, "every node has applied every write")

        asyncio.run(load())
        yield made
    finally:
        made.stop()


async def health_of(address: str, service: str = "") -> int | None:
    """The node's answer to a standard health check, or None when it does not answer."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1
            )
        except grpc.aio.AioRpcError:
            return None
    return int(reply.status)


async def wait_for_health(cluster: LocalCluster, node_id: int, wanted: int, timeout: float) -> None:
    async def check() -> bool:
        return await health_of(cluster.client_address(node_id)) == wanted

    name = health_pb2.HealthCheckResponse.ServingStatus.Name(wanted)
    try:
        await wait_until(check, timeout, f"node {node_id} reports {name}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{log_tails(cluster, [node_id])}") from None


def scrape(port: int) -> dict[str, list[Sample]]:
    """The node's /metrics, parsed by prometheus_client's own parser: samples by family name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(families: dict[str, list[Sample]], sample_name: str, **labels: str) -> float:
    for samples in families.values():
        for sample in samples:
            if sample.name == sample_name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                return float(sample.value)
    raise AssertionError(f"no sample {sample_name} {labels}")


async def leader_and_followers(cluster: LocalCluster) -> tuple[int, list[int]]:
    leader = await cluster.wait_for_leader(timeout=15)
    return leader, [n for n in cluster.node_ids if n != leader]


def quiet(status: ClusterStatus) -> tuple[object, ...] | None:
    """What every node reports of itself when the cluster is quiet (all answer, all follow one
    leader in one term, no follower lags), to compare with a later look; None when it is not."""
    nodes = status.nodes
    if status.leader_id is None or not all(n.reachable for n in nodes):
        return None
    if len({n.term for n in nodes}) != 1 or any(n.leader_id != status.leader_id for n in nodes):
        return None
    if any(n.lag != 0 for n in nodes):
        return None
    report = tuple((n.id, n.term, n.commit_index, n.applied_index, n.last_log_index) for n in nodes)
    return status.leader_id, report


async def while_quiet(
    cluster: LocalCluster, check: Callable[[ClusterStatus], Awaitable[_T]]
) -> tuple[ClusterStatus, _T]:
    """Run `check` between two looks at a quiet cluster that find it unchanged (no election, no
    new entry), so that what it saw can be compared exactly with the first look. These nodes use
    short timeouts, and a loaded machine can delay a heartbeat into an election: then it is
    tried again, until a deadline."""
    async with cluster.client() as client:

        async def attempt() -> tuple[ClusterStatus, _T] | None:
            status = await client.status()
            before = quiet(status)
            if before is None:
                return None
            seen = await check(status)
            return (status, seen) if quiet(await client.status()) == before else None

        return await wait_until(attempt, 30, "the cluster stays quiet while it is looked at")


# ---- health checking -----------------------------------------------------------------------


async def test_every_node_reports_serving_on_both_servers_once_a_leader_is_elected(
    cluster: MetricsCluster,
) -> None:
    for node_id in cluster.node_ids:
        await wait_for_health(cluster, node_id, SERVING, 10)
        address = cluster.address(node_id)
        assert await health_of(address.client_address, "Cluster") == SERVING
        assert await health_of(address.raft_address, "Raft") == SERVING
        assert await health_of(address.raft_address, "") == SERVING


async def test_a_health_check_for_a_service_the_server_does_not_offer_is_not_found(
    cluster: MetricsCluster,
) -> None:
    address = cluster.address(cluster.node_ids[0])
    async with grpc.aio.insecure_channel(address.raft_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="Cluster"), timeout=1
            )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# ---- reflection ----------------------------------------------------------------------------


async def reflect(
    address: str, requests: Sequence[reflection_pb2.ServerReflectionRequest]
) -> list[reflection_pb2.ServerReflectionResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter(requests), timeout=5)
        return [response async for response in call]


async def test_reflection_lists_each_servers_services_and_describes_the_cluster_service(
    cluster: MetricsCluster,
) -> None:
    address = cluster.address(cluster.node_ids[0])
    listed, described = await reflect(
        address.client_address,
        [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="Cluster"),
        ],
    )
    services = {s.name for s in listed.list_services_response.service}
    assert services == {
        "Cluster",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    cluster_service = next(s for f in files for s in f.service if s.name == "Cluster")
    methods = {m.name for m in cluster_service.method}
    assert {"ProposeMapping", "GetValue", "Status"} <= methods

    (raft_listed,) = await reflect(
        address.raft_address, [reflection_pb2.ServerReflectionRequest(list_services="")]
    )
    assert "Raft" in {s.name for s in raft_listed.list_services_response.service}


# ---- metrics -------------------------------------------------------------------------------


async def test_metrics_show_the_state_the_writes_and_the_leaders_view_of_its_followers(
    cluster: MetricsCluster,
) -> None:

    async def scrape_all(_: ClusterStatus) -> dict[int, dict[str, list[Sample]]]:
        return {
            n: await asyncio.to_thread(scrape, cluster.metrics_ports[n]) for n in cluster.node_ids
        }

    status, scraped = await while_quiet(cluster, scrape_all)
    assert status.leader_id is not None
    leader = status.leader_id
    followers = [n for n in cluster.node_ids if n != leader]
    on_leader = scraped[leader]
    assert all(name.startswith("raft_demo_") for name in on_leader), sorted(on_leader)

    view = next(n for n in status.nodes if n.id == leader)
    assert value(on_leader, "raft_demo_term") == view.term >= 1
    # A no-op, a client session and the writes: all committed and applied, the cluster now idle.
    assert value(on_leader, "raft_demo_commit_index") == view.commit_index >= WRITES + 2
    assert value(on_leader, "raft_demo_applied_index") == view.commit_index
    assert value(on_leader, "raft_demo_log_entries") == view.last_log_index
    assert value(on_leader, "raft_demo_log_bytes") > 0
    assert value(on_leader, "raft_demo_role", role="leader") == 1
    assert value(on_leader, "raft_demo_role", role="follower") == 0
    assert value(on_leader, "raft_demo_has_leader") == 1
    assert value(on_leader, "raft_demo_elections_started_total") >= 1
    assert value(on_leader, "raft_demo_elections_won_total") >= 1
    assert value(on_leader, "raft_demo_proposal_duration_seconds_count") >= WRITES
    assert value(on_leader, "raft_demo_fsync_duration_seconds_count") > 0
    for follower in followers:
        assert value(on_leader, "raft_demo_peer_lag_entries", peer=str(follower)) == 0
        contact = value(on_leader, "raft_demo_peer_last_contact_seconds", peer=str(follower))
        assert 0 <= contact < RECENT_CONTACT_SECONDS, (follower, contact)

    reads = [value(scraped[n], "raft_demo_read_duration_seconds_count") for n in cluster.node_ids]
    assert sum(reads) >= 1
    on_follower = scraped[followers[0]]
    assert value(on_follower, "raft_demo_role", role="follower") == 1
    assert value(on_follower, "raft_demo_leader_changes_total") >= 1
    assert value(on_follower, "raft_demo_fsync_duration_seconds_count") > 0
    assert (
        "raft_demo_peer_lag_entries" not in on_follower
        or not on_follower["raft_demo_peer_lag_entries"]
    )


def test_a_metrics_port_in_use_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    port = find_free_port_block(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 2))
        taken.listen()
        result = run_script(
            [
                "raft_node.py",
                "--port",
                str(port),
                "--first-port",
                str(port),
                "--nodes",
                "1",
                "--data-dir",
                str(tmp_path),
                "--metrics-port",
                str(port + 2),
            ]
        )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "cannot listen on 127.0.0.1:" in lines[-1] and "for metrics" in lines[-1]
    assert "Traceback" not in result.stderr


# ---- cluster_client.py status --------------------------------------------------------------


async def test_status_prints_a_table_with_every_node_and_one_leader(
    cluster: MetricsCluster,
) -> None:
    async def run_status(_: ClusterStatus) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(run_script, cluster.status_command())

    status, result = await while_quiet(cluster, run_status)
    leader = status.leader_id
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = [cell.strip() for cell in lines[1].split("|")[1:-1]]
    assert header == [
        "ID",
        "RAFT ADDR",
        "CLIENT ADDR",
        "ROLE",
        "TERM",
        "COMMIT",
        "APPLIED",
        "LAG",
        "LAST CONTACT",
    ]
    rows = {
        int(line.split("|")[1]): [c.strip() for c in line.split("|")[2:-1]] for line in lines[3:-1]
    }
    assert sorted(rows) == cluster.node_ids
    assert [n for n, row in rows.items() if row[2] == "leader"] == [leader]
    for node_id, (raft, client, role, term, commit, applied, lag, contact) in rows.items():
        assert role in ("leader", "follower")
        assert (raft, client) == (
            cluster.address(node_id).raft_address,
            cluster.address(node_id).client_address,
        )
        assert int(term) >= 1 and int(commit) >= WRITES + 2 and int(applied) >= WRITES + 2
        assert lag == "0"
        assert (contact == "-") == (node_id == leader)


async def test_status_json_is_one_document_with_every_field(cluster: MetricsCluster) -> None:
    async def run_status(_: ClusterStatus) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(run_script, cluster.status_command("--json"))

    status, result = await while_quiet(cluster, run_status)
    leader = status.leader_id
    followers = [n for n in cluster.node_ids if n != leader]
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["leader"] == leader
    nodes = {n["id"]: n for n in document["nodes"]}
    assert sorted(nodes) == cluster.node_ids
    for node_id, node in nodes.items():
        assert node["reachable"] and node["error"] is None
        assert node["role"] == ("leader" if node_id == leader else "follower")
        assert node["leader_id"] == leader and node["voter"] and not node["learner"]
        assert node["serving"]
        assert node["commit_index"] >= WRITES + 2
        assert node["applied_index"] <= node["commit_index"] <= node["last_log_index"]
        assert node["snapshot_index"] == 0
        assert node["lag"] == 0
        assert (node["last_contact_seconds"] is None) == (node_id == leader)
        assert node["raft_address"] == cluster.address(node_id).raft_address
    for f in followers:
        assert 0 <= nodes[f]["last_contact_seconds"] < RECENT_CONTACT_SECONDS, nodes[f]


async def test_status_watch_refreshes_until_ctrl_c_and_then_exits_0(
    cluster: MetricsCluster,
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *cluster.status_command("--watch", "0.2"),
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        headers = 0
        while headers < 2:
            line = await asyncio.wait_for(process.stdout.readline(), 10)  # type: ignore[union-attr]
            assert line, "status --watch ended on its own"
            headers += line.startswith(b"| ID ")
        process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(process.communicate(), 10)
        assert process.returncode == 0, stderr
        assert b"Traceback" not in stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# ---- a cluster coming up and falling apart ---------------------------------------------------


@pytest.fixture
async def lone_start() -> AsyncIterator[MetricsCluster]:
    made = MetricsCluster(3)
    try:
        yield made
    finally:
        made.stop()


async def test_health_follows_the_leader_and_status_reports_nodes_that_are_down(
    lone_start: MetricsCluster,
) -> None:
    cluster = lone_start
    first, *others = cluster.node_ids
    cluster.start_node(first)
    # Alone it cannot be elected (2 of 3 votes needed): up, but not serving.
    await wait_for_health(cluster, first, NOT_SERVING, 10)

    for node_id in others:
        cluster.start_node(node_id)
    for node_id in cluster.node_ids:
        await wait_for_health(cluster, node_id, SERVING, 15)

    leader, followers = await leader_and_followers(cluster)
    survivor = followers[0]
    for node_id in cluster.node_ids:
        if node_id != survivor:
            cluster.kill_node(node_id)
    # Its leader is gone and no majority is left: once its election timeout passes, it says so.
    await wait_for_health(cluster, survivor, NOT_SERVING, 10)

    result = await asyncio.to_thread(run_script, cluster.status_command("--json"))
    assert result.returncode == 3, result.stderr
    document = json.loads(result.stdout)
    nodes = {n["id"]: n for n in document["nodes"]}
    assert sorted(nodes) == cluster.node_ids
    assert document["leader"] is None
    assert nodes[survivor]["reachable"] and not nodes[survivor]["serving"]
    down = sorted(n for n in cluster.node_ids if n != survivor)
    assert sorted(n for n, node in nodes.items() if not node["reachable"]) == down
    assert all(nodes[n]["error"] for n in down)

    table = await asyncio.to_thread(run_script, cluster.status_command())
    assert table.returncode == 3
    assert "Traceback" not in table.stderr
    for node_id in down:
        assert f"{node_id} is unreachable" in table.stderr
        row = next(line for line in table.stdout.splitlines() if line.startswith(f"| {node_id} "))
        assert "unreachable" in row
