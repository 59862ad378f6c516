"""Only members speak Raft, on real node processes under mutual TLS: a client's certificate, even one
from the cluster's own CA and carrying the cluster id, is refused on every Raft call; a member's
certificate speaks only for that member; with a CA of the peers' own, clients' certificates never
reach the Raft port; and renewed certificates are taken up on SIGHUP while writes go on."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

import make_certs
from cluster_client import Client
from cluster_identity import METADATA_KEY, derive_cluster_id
from rpc import raft_pb2, raft_pb2_grpc
from test.cluster_process import ClusterTls, LocalCluster
from test.conftest import log_tails
from tls import TlsConfig, open_channel

FORGED_TERM = 10**9
FORGED_KEY = "forged-by-a-client"
NOT_A_MEMBER = 424242
REFUSAL = "names no member of this cluster"
DENIED = grpc.StatusCode.PERMISSION_DENIED


def start(cluster: LocalCluster) -> None:
    cluster.start()
    try:
        asyncio.run(cluster.wait_for_leader(20))
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{log_tails(cluster)}") from None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three nodes under TLS, one CA for peers and clients, as the README shows it."""
    made = LocalCluster(nodes=3)
    made.tls = ClusterTls.create(tmp_path_factory.mktemp("one-ca"), admin_names=("admin",))
    try:
        start(made)
        yield made
    finally:
        made.stop()


def config(cluster: LocalCluster, stem: str, ca: str = "ca") -> TlsConfig:
    """TLS settings presenting `stem`.pem/.key of the cluster's directory, trusting `ca`.pem."""
    assert cluster.tls is not None
    directory = cluster.tls.directory
    return TlsConfig.load(
        directory / f"{stem}.pem", directory / f"{stem}.key", directory / f"{ca}.pem"
    )


def raft_address(cluster: LocalCluster, node_id: int) -> str:
    return cluster.address(node_id).raft_address


async def statuses(cluster: LocalCluster) -> dict[int, tuple[int, int | None, int, int]]:
    """Each node's (term, leader, last log index, commit index)."""
    assert cluster.tls is not None
    result = {}
    for node_id in cluster.node_ids:
        channel = open_channel(cluster.client_address(node_id), [], cluster.tls.client_config())
        try:
            status = await raft_pb2_grpc.ClusterStub(channel).Status(
                raft_pb2.StatusRequest(), timeout=5
            )
        finally:
            await channel.close()
        leader = status.leader_id if status.HasField("leader_id") else None
        result[node_id] = (status.term, leader, status.last_log_index, status.commit_index)
    return result


@dataclass
class Before:
    """The cluster as an attack found it: each node's status, and where its log file stood."""

    statuses: dict[int, tuple[int, int | None, int, int]]
    offsets: dict[int, int]
    started: float

    @property
    def leader(self) -> int:
        leader = next(iter(self.statuses.values()))[1]
        assert leader is not None, self.statuses
        return leader


async def observe(cluster: LocalCluster) -> Before:
    offsets = {n: cluster.log_size(n) for n in cluster.node_ids}
    return Before(await statuses(cluster), offsets, time.monotonic())


async def assert_unchanged(cluster: LocalCluster, before: Before) -> None:
    """Term, leader, log and commit of every node are as the attack found them. On a loaded
    machine the cluster may hold an election of its own meanwhile (a node that heard no leader in
    time says so); then no node may have reached the forged term."""
    after = await statuses(cluster)
    if after == before.statuses:
        return
    own_election = [
        n
        for n in cluster.node_ids
        if "heard no leader" in cluster.node_log_since(n, before.offsets[n])
    ]
    assert own_election, (
        f"changed with no election of the cluster's own: {before.statuses} -> {after}\n"
        + log_tails(cluster)
    )
    assert all(term < FORGED_TERM for term, *_ in after.values()), after


def forged_calls(sender: int, last_index: int) -> list[tuple[str, Any]]:
    """Every Raft call, each claiming to come from `sender` in a far higher term, with an entry."""
    entry = raft_pb2.LogEntry(
        term=FORGED_TERM,
        index=last_index + 1,
        key=FORGED_KEY,
        value="x",
        kind=raft_pb2.ENTRY_KIND_MAPPING,
    )
    append = raft_pb2.AppendEntriesRequest(
        term=FORGED_TERM,
        requester_id=sender,
        prev_log_index=0,
        prev_log_term=0,
        leader_commit=last_index + 1,
        log_entries=[entry],
    )
    vote = raft_pb2.VoteRequest(
        term=FORGED_TERM,
        requester_id=sender,
        last_log_index=FORGED_TERM,
        last_log_term=FORGED_TERM,
    )
    pre_vote = raft_pb2.VoteRequest()
    pre_vote.CopyFrom(vote)
    pre_vote.pre_vote = True
    return [
        ("RequestVote", vote),
        ("pre-vote", pre_vote),
        ("AppendEntries", append),
        ("AppendStream", append),
        ("ReadIndex", raft_pb2.ReadIndexRequest(term=FORGED_TERM, requester_id=sender)),
        ("TimeoutNow", raft_pb2.TimeoutNowRequest(term=FORGED_TERM, requester_id=sender)),
        (
            "InstallSnapshot",
            raft_pb2.InstallSnapshotRequest(
                term=FORGED_TERM,
                requester_id=sender,
                last_included_index=last_index + 10,
                last_included_term=FORGED_TERM,
                total_size=2,
                data=b"{}",
                done=True,
            ),
        ),
    ]


async def call(channel: grpc.aio.Channel, name: str, request: Any, metadata: Any) -> Any:
    """One Raft call as a peer would make it; returns the reply or the status code it ended with."""
    stub = raft_pb2_grpc.RaftStub(channel)
    try:
        if name == "AppendStream":
            # The request goes from an iterator, as gRPC's own client sends it: a stream the server
            # ends before reading (a refused certificate) then ends with the server's status, not a
            # failed write of ours.
            async for reply in stub.AppendStream(iter([request]), metadata=metadata, timeout=5):
                return reply
            raise AssertionError("the stream ended without a reply or a status")
        method = {
            "RequestVote": stub.RequestVote,
            "pre-vote": stub.RequestVote,
            "AppendEntries": stub.AppendEntries,
            "ReadIndex": stub.ReadIndex,
            "TimeoutNow": stub.TimeoutNow,
            "InstallSnapshot": stub.InstallSnapshot,
        }[name]
        return await method(request, timeout=5, metadata=metadata)
    except grpc.aio.AioRpcError as e:
        return e.code()


async def forge_everywhere(
    cluster: LocalCluster, tls: TlsConfig, sender_of: Any
) -> dict[tuple[int, str], Any]:
    """Every forged call to every node, over `tls`, each claiming to come from `sender_of(node)`,
    with the cluster's own id; what each got."""
    metadata = ((METADATA_KEY, derive_cluster_id(cluster.config)),)
    before = await statuses(cluster)
    got: dict[tuple[int, str], Any] = {}
    for node_id in cluster.node_ids:
        channel = open_channel(raft_address(cluster, node_id), [], tls)
        try:
            for name, request in forged_calls(sender_of(node_id), before[node_id][2]):
                got[(node_id, name)] = await call(channel, name, request, metadata)
            # Bytes that are no request at all: refused for who sent them, not for the bytes.
            garbage = channel.unary_unary("/Raft/RequestVote", request_serializer=None)
            try:
                await garbage(b"\xff\xff\xff", timeout=5, metadata=metadata)
            except grpc.aio.AioRpcError as e:
                got[(node_id, "garbage")] = e.code()
        finally:
            await channel.close()
    return got


async def writes_flow(cluster: LocalCluster, key: str) -> None:
    """A write is acknowledged and every node serves it through a linearizable read."""
    async with cluster.client(deadline=10) as client:
        await client.propose_mapping(key, "flows")
        for node_id in cluster.node_ids:
            value = await client.get_value(key, node=cluster.client_address(node_id))
            assert value == "flows", f"node {node_id} serves {value!r}"


def refusals_narrated(cluster: LocalCluster, node_id: int, text: str) -> int:
    return sum(1 for line in cluster.node_log(node_id).splitlines() if text in line)


# ---- a client's certificate --------------------------------------------------------------------


async def test_a_client_certificate_from_the_clusters_ca_cannot_speak_raft(
    cluster: LocalCluster,
) -> None:
    before = await observe(cluster)
    leader = before.leader
    nodes = cluster.node_ids
    # As the attack goes: the real leader's id, or any member other than the node called.
    sender_of = {n: leader if n != leader else next(m for m in nodes if m != n) for n in nodes}
    for stem in ("client", "admin"):
        got = await forge_everywhere(cluster, config(cluster, stem), sender_of.__getitem__)
        wrong = {call: code for call, code in got.items() if code != DENIED}
        assert not wrong, f"{stem}.pem was not refused: {wrong}"
        assert len(got) == 8 * len(cluster.node_ids)

    await assert_unchanged(cluster, before)
    # One line per 10 s of attack (rate-limited), naming why.
    most = 2 + int((time.monotonic() - before.started) // 10)
    for node_id in cluster.node_ids:
        count = refusals_narrated(cluster, node_id, REFUSAL)
        assert 1 <= count <= most, f"node {node_id} narrated {count} refusals"
    async with cluster.probe() as probe:
        for node_id in cluster.node_ids:
            assert await probe.get_value(node_id, FORGED_KEY) is None
    await writes_flow(cluster, "after-the-client-forgery")


# ---- a member's certificate, speaking for another ----------------------------------------------


async def test_a_members_certificate_speaks_only_for_that_member(cluster: LocalCluster) -> None:
    before = await observe(cluster)
    first, second, third = cluster.node_ids
    impostor = config(cluster, f"node-{second}")
    for sender in (third, NOT_A_MEMBER):
        # Node `second`'s own certificate, claiming to be `sender`, to the nodes that are not it.
        got = await forge_everywhere(cluster, impostor, lambda _node, sender=sender: sender)
        got = {(node, name): code for (node, name), code in got.items() if node != second}
        # A member is let in, so bytes that are no request are answered as such.
        expected = {
            call: grpc.StatusCode.INVALID_ARGUMENT if call[1] == "garbage" else DENIED
            for call in got
        }
        wrong = {call: code for call, code in got.items() if code != expected[call]}
        assert not wrong, f"node {second}'s certificate spoke for {sender}: {wrong}"
    await assert_unchanged(cluster, before)
    assert refusals_narrated(cluster, first, f"it cannot speak for node {third}") >= 1

    # Speaking for itself, the same certificate is heard: a pre-vote, which changes nothing.
    term = (await statuses(cluster))[first][0]
    channel = open_channel(raft_address(cluster, first), [], impostor)
    try:
        reply = await raft_pb2_grpc.RaftStub(channel).RequestVote(
            raft_pb2.VoteRequest(term=term, requester_id=second, pre_vote=True),
            timeout=5,
            metadata=((METADATA_KEY, derive_cluster_id(cluster.config)),),
        )
    finally:
        await channel.close()
    assert reply.term == term and not reply.vote_granted
    await writes_flow(cluster, "after-the-impostor")


async def test_a_certificate_naming_a_node_the_configuration_does_not_list_changes_nothing(
    cluster: LocalCluster,
) -> None:
    """Speaking for itself, such a node passes the certificate check; the node's own rule then
    refuses it while a leader is heard (thesis 4.2.3), with the documented INVALID_ARGUMENT."""
    assert cluster.tls is not None

    authority, _ = make_certs.load_or_make_authority(cluster.tls.directory)
    make_certs.write_node(
        authority, cluster.tls.directory, NOT_A_MEMBER, make_certs.parse_hosts("localhost")
    )
    before = await observe(cluster)
    got = await forge_everywhere(
        cluster, config(cluster, f"node-{NOT_A_MEMBER}"), lambda _node: NOT_A_MEMBER
    )
    wrong = {c: code for c, code in got.items() if code != grpc.StatusCode.INVALID_ARGUMENT}
    assert not wrong, f"a node no configuration lists was heard: {wrong}"
    await assert_unchanged(cluster, before)
    await writes_flow(cluster, "after-the-stranger")


def test_a_node_whose_certificate_does_not_name_it_exits_2_with_one_line(
    cluster: LocalCluster,
) -> None:
    assert cluster.tls is not None
    lone = LocalCluster(nodes=1)
    node_id = lone.node_ids[0]
    try:
        lone.tls = cluster.tls
        # Its "own" files hold another member's certificate, which does not name it.
        other = cluster.tls.directory / f"node-{cluster.node_ids[1]}"
        for suffix in (".pem", ".key"):
            own = cluster.tls.directory / f"node-{node_id}{suffix}"
            own.write_bytes(Path(f"{other}{suffix}").read_bytes())
        lone.start_node(node_id)
        deadline = time.monotonic() + 30
        while lone.is_running(node_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        code = lone.exit_code(node_id)
        log = lone.node_log(node_id)
    finally:
        lone.stop()
    assert code == 2, log
    assert f"does not name node {node_id}" in log and "Traceback" not in log, log
    assert f"urn:raft-demo:node:{node_id}" in log


# ---- separate trust for peers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def peer_ca_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    made = LocalCluster(nodes=3)
    made.tls = ClusterTls.create(tmp_path_factory.mktemp("two-cas"), peer_ca=True)
    try:
        start(made)
        yield made
    finally:
        made.stop()


async def test_with_a_peer_ca_no_certificate_of_the_clients_ca_reaches_the_raft_port(
    peer_ca_cluster: LocalCluster,
) -> None:
    cluster = peer_ca_cluster
    before = await observe(cluster)
    leader = before.leader
    tries = [
        # A client's certificate, trusting either CA.
        config(cluster, "client", ca="ca"),
        config(cluster, "client", ca="peer-ca"),
        # Even a node's certificate for clients: it names the member, but the clients' CA signed it.
        config(cluster, f"node-{leader}", ca="peer-ca"),
    ]
    for tls in tries:
        got = await forge_everywhere(cluster, tls, lambda _node: leader)
        wrong = {call: code for call, code in got.items() if code != grpc.StatusCode.UNAVAILABLE}
        assert not wrong, f"reached the Raft port: {wrong}"
    await assert_unchanged(cluster, before)
    # Peers and clients work end to end, each with their own CA.
    await writes_flow(cluster, "two-cas")
    follower = next(n for n in cluster.node_ids if n != leader)
    cluster.kill_node(follower)
    cluster.restart_node(follower)
    async with cluster.client(deadline=20) as client:
        await client.propose_mapping("after-restart", "yes")
        assert (
            await client.get_value("after-restart", node=cluster.client_address(follower)) == "yes"
        )


# ---- renewal ---------------------------------------------------------------------------------


def presented_certificate(address: str, ca: Path, mine: Path) -> bytes:
    """The certificate (DER) a new TLS connection to `address` is shown; it presents `mine`
    (.pem/.key)."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(mine.with_suffix(".pem"), mine.with_suffix(".key"))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def file_certificate(path: Path) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)


class Writer:
    """Writes one key after another until stopped; counts what was acknowledged and what failed."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.done = 0
        self.failures: list[str] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            try:
                await self.client.propose_mapping(f"renewal-{self.done % 50}", str(self.done))
                self.done += 1
            except Exception as e:  # noqa: BLE001 - every failure is the finding
                self.failures.append(f"{type(e).__name__}: {e}")

    async def more(self, count: int) -> None:
        """Wait until `count` more writes are acknowledged."""
        target = self.done + count
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while self.done < target and not self.failures:
            assert loop.time() < deadline, f"writes stalled at {self.done}"
            await asyncio.sleep(0.02)


async def wait_for_line(cluster: LocalCluster, node_id: int, text: str, offset: int) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while text not in (seen := cluster.node_log_since(node_id, offset)):
        if loop.time() > deadline:
            raise AssertionError(f"node {node_id} never said {text!r}:\n{seen}")
        await asyncio.sleep(0.05)
    return seen


async def test_renewed_certificates_are_taken_up_on_sighup_with_no_failed_write(
    peer_ca_cluster: LocalCluster,
) -> None:
    cluster = peer_ca_cluster
    assert cluster.tls is not None
    directory = cluster.tls.directory
    leader = await cluster.wait_for_leader(20)
    follower = next(n for n in cluster.node_ids if n != leader)
    node = cluster.address(leader)
    peer_ca, client_ca = directory / "peer-ca.pem", directory / "ca.pem"
    as_peer, as_client = directory / f"node-{follower}-peer", directory / "client"

    def presented() -> tuple[bytes, bytes]:
        return (
            presented_certificate(node.raft_address, peer_ca, as_peer),
            presented_certificate(node.client_address, client_ca, as_client),
        )

    def on_file() -> tuple[bytes, bytes]:
        return (
            file_certificate(directory / f"node-{leader}-peer.pem"),
            file_certificate(directory / f"node-{leader}.pem"),
        )

    old = on_file()
    assert presented() == old

    async with cluster.client(deadline=10) as client:
        writer = Writer(client)
        writing = asyncio.create_task(writer.run())
        try:
            await writer.more(10)
            # Renewed files (new keys) for the leader, then SIGHUP.
            cluster.tls.issue_node(leader)
            offset = cluster.log_size(leader)
            cluster.kill_node(leader, signal.SIGHUP)
            said = await wait_for_line(cluster, leader, "certificates read again", offset)
            new = on_file()
            assert new[0] != old[0] and new[1] != old[1]
            assert presented() == new
            await writer.more(10)

            # The leader's connections to its followers are opened anew, with the new certificate:
            # a follower restarted now is reached through them, and serves what is written next.
            cluster.kill_node(follower)
            cluster.restart_node(follower)
            await client.propose_mapping("renewed", "yes")
            assert await client.get_value("renewed", node=cluster.client_address(follower)) == "yes"

            # A broken renewal is refused in one line; the node keeps what it had.
            key_file = directory / f"node-{leader}-peer.key"
            good_key = key_file.read_bytes()
            key_file.write_text("not a key")
            offset = cluster.log_size(leader)
            cluster.kill_node(leader, signal.SIGHUP)
            said += await wait_for_line(cluster, leader, "kept the certificates in use", offset)
            key_file.write_bytes(good_key)
            assert presented() == new
            await writer.more(10)
        finally:
            writer.stop.set()
            await writing
    assert not writer.failures, writer.failures[:5]
    assert cluster.is_running(leader), said
    assert "Traceback" not in said, said
