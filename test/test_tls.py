"""TLS as users and attackers meet it, on real node processes: mutual TLS between peers, client
certificates on the Cluster service, admin calls kept for admin certificates, and bad TLS flags."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

import make_certs
from cluster_client import (
    Client,
    ClusterUnavailableError,
    MembershipRefusedError,
    PermissionDeniedError,
)
from cluster_identity import METADATA_KEY, derive_cluster_id
from rpc import raft_pb2, raft_pb2_grpc
from test.cluster_process import HOST, ClusterTls, LocalCluster, find_free_port_block
from test.conftest import REPO, log_tails
from tls import RenewableServerCredentials, TlsConfig, open_channel

ROGUE_TERM = 10**12
ROGUE_ID = 999
# A client that cannot connect keeps retrying until its deadline; short, as no retry can help.
REFUSED_DEADLINE = 1.5


@dataclass
class Certs:
    """The cluster's certificates, and a second CA's, issued the same names."""

    ours: Path
    theirs: Path

    def config(self, name: str | None, *, theirs: bool = False, trust: str = "ours") -> TlsConfig:
        """A client's TLS settings: `name`'s certificate from our CA or theirs (None: no
        certificate), trusting our CA or theirs."""
        cert = key = None
        if name is not None:
            directory = self.theirs if theirs else self.ours
            cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        ca = (self.ours if trust == "ours" else self.theirs) / "ca.pem"
        return TlsConfig.load(cert, key, ca)

    def flags(self, name: str) -> list[str]:
        return [
            "--tls-cert",
            str(self.ours / f"{name}.pem"),
            "--tls-key",
            str(self.ours / f"{name}.key"),
            "--tls-ca",
            str(self.ours / "ca.pem"),
        ]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ours = tmp_path_factory.mktemp("our-ca")
    theirs = tmp_path_factory.mktemp("their-ca")
    make_certs.make_all(ours, [], HOST)
    make_certs.make_all(theirs, [ROGUE_ID], HOST)
    return Certs(ours, theirs)


@pytest.fixture(scope="module")
def cluster(certs: Certs) -> Iterator[LocalCluster]:
    """Three nodes under TLS with --client-cert-auth and --admin-cert-name admin."""
    made = LocalCluster(nodes=3)
    made.tls = ClusterTls(certs.ours, client_cert_auth=True, admin_names=("admin",))
    try:
        made.start()
        try:
            asyncio.run(made.wait_for_leader(20))
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{log_tails(made)}") from None
        yield made
    finally:
        made.stop()


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str


async def run(args: Sequence[str], timeout: float = 30) -> Ran:
    """Run a program of the repository as a user would; it is killed if it outlives `timeout`."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


def cli(cluster: LocalCluster, *args: str) -> list[str]:
    return ["cluster_client.py", "--endpoints", ",".join(cluster.client_addresses), *args]


def one_line(ran: Ran) -> str:
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {ran.stderr!r}"
    return lines[0]


async def states(cluster: LocalCluster) -> dict[int, tuple[int, int | None]]:
    """Each node's (term, leader it knows)."""
    async with cluster.probe() as probe:
        answers = await asyncio.gather(*(probe.get_leader(n) for n in cluster.node_ids))
    result = {}
    for node_id, answer in zip(cluster.node_ids, answers, strict=True):
        assert answer is not None, f"node {node_id} did not answer\n{log_tails(cluster)}"
        leader = answer.leader_id if answer.HasField("leader_id") else None
        result[node_id] = (answer.term, leader)
    return result


# ---- clients with and without a trusted certificate ----------------------------------------


async def test_a_client_with_a_valid_certificate_writes_and_reads(
    cluster: LocalCluster, certs: Certs
) -> None:
    async with Client.from_endpoints(
        cluster.client_addresses, tls=certs.config("client"), deadline=20
    ) as client:
        await client.propose_mapping("color", "blue")
        assert await client.get_value("color") == "blue"
        # A follower's address, learnt from a redirect, is reached with the same credentials.
        assert await client.get_value("color", node=cluster.client_addresses[0]) == "blue"

    put = await run(cli(cluster, *certs.flags("client"), "put", "shape", "round"))
    assert put.code == 0, put.stderr
    got = await run(cli(cluster, *certs.flags("client"), "get", "shape"))
    assert (got.code, got.stdout) == (0, "round\n"), got.stderr


async def test_clients_without_a_certificate_from_the_ca_get_no_data(
    cluster: LocalCluster, certs: Certs
) -> None:
    async with cluster.client(tls=certs.config("client"), deadline=20) as client:
        await client.propose_mapping("secret", "s3cret")

    async def read(tls: TlsConfig | None) -> str | None | BaseException:
        try:
            async with Client.from_endpoints(
                cluster.client_addresses, tls=tls, deadline=REFUSED_DEADLINE
            ) as client:
                return await client.get_value("secret")
        except ClusterUnavailableError as e:
            return e

    without = {
        "no client certificate": certs.config(None),
        "a certificate from another CA": certs.config("client", theirs=True),
        "plain text": None,
        # The client checks the server too: a node whose certificate its CA did not sign is
        # not spoken to, even with a certificate of that CA to present.
        "trusting another CA": certs.config("client", theirs=True, trust="theirs"),
    }
    results = await asyncio.gather(*(read(tls) for tls in without.values()))
    for what, result in zip(without, results, strict=True):
        assert isinstance(result, ClusterUnavailableError), f"{what}: read {result!r}"
    assert await read(certs.config("client")) == "s3cret"

    plain = await run(cli(cluster, "--timeout", "1", "get", "secret"))
    assert plain.code == 3 and "s3cret" not in plain.stdout, plain
    assert "unavailable" in one_line(plain)


# ---- peers ---------------------------------------------------------------------------------


async def test_a_peer_with_another_cas_certificate_cannot_reach_raft(
    cluster: LocalCluster, certs: Certs
) -> None:
    before = await states(cluster)
    rogue = certs.config(f"node-{ROGUE_ID}", theirs=True)
    failures = []
    for tls in (rogue, None):
        for node_id in cluster.node_ids:
            # Posing as another member, so only the transport can keep it out.
            posing_as = next(n for n in cluster.node_ids if n != node_id)
            vote = raft_pb2.VoteRequest(
                term=ROGUE_TERM,
                requester_id=posing_as,
                last_log_index=ROGUE_TERM,
                last_log_term=ROGUE_TERM,
            )
            append = raft_pb2.AppendEntriesRequest(
                term=ROGUE_TERM, requester_id=posing_as, leader_commit=ROGUE_TERM
            )
            channel = open_channel(f"{HOST}:{node_id}", [], tls)
            try:
                stub = raft_pb2_grpc.RaftStub(channel)
                for method, request in ((stub.RequestVote, vote), (stub.AppendEntries, append)):
                    try:
                        reply = await method(request, timeout=2)
                    except grpc.aio.AioRpcError as e:
                        failures.append(e.code())
                    else:
                        raise AssertionError(f"node {node_id} answered a rogue peer: {reply}")
            finally:
                await channel.close()
    assert failures == [grpc.StatusCode.UNAVAILABLE] * 4 * len(cluster.node_ids)

    after = await states(cluster)
    assert after == before, log_tails(cluster)

    # A peer with a certificate from the cluster's CA (and the cluster's id) is served (a
    # pre-vote changes nothing).
    term, leader = after[cluster.node_ids[0]]
    assert leader is not None
    follower = next(n for n in cluster.node_ids if n != leader)
    channel = open_channel(f"{HOST}:{leader}", [], certs.config(f"node-{follower}"))
    try:
        reply = await raft_pb2_grpc.RaftStub(channel).RequestVote(
            raft_pb2.VoteRequest(term=term, requester_id=follower, pre_vote=True),
            timeout=5,
            metadata=((METADATA_KEY, derive_cluster_id(cluster.config)),),
        )
    finally:
        await channel.close()
    assert reply.term >= term


# ---- admin calls ---------------------------------------------------------------------------


async def test_admin_calls_need_an_admin_certificate(
    cluster: LocalCluster, certs: Certs, tmp_path: Path
) -> None:
    voters = sorted(cluster.node_ids)
    backup = tmp_path / "backup.db"
    async with Client.from_endpoints(
        cluster.client_addresses, tls=certs.config("client"), deadline=20
    ) as client:
        # Listing the members changes nothing: any client let in may.
        assert sorted(m.id for m in (await client.members()).voters) == voters
        for call in (
            client.transfer_leadership(0),
            client.remove_member(voters[0]),
            client.add_member(7, "127.0.0.1:1", "127.0.0.1:2", wait_until_voter=False),
            # A backup holds every key and session: an admin's to take.
            client.save_snapshot(backup),
        ):
            with pytest.raises(PermissionDeniedError, match="admin"):
                await call
        assert os.listdir(tmp_path) == [], "a refused backup left a file behind"
        # Ordinary calls still work for this certificate.
        await client.propose_mapping("after-denial", "yes")

    async with Client.from_endpoints(
        cluster.client_addresses, tls=certs.config("admin"), deadline=20
    ) as admin:
        members = await admin.members()
        assert sorted(m.id for m in members.voters) == voters
        # Past the admin check, the cluster's own rules answer.
        with pytest.raises(MembershipRefusedError):
            await admin.remove_member(999_999)
        saved = await admin.save_snapshot(backup)
        assert saved.keys >= 1 and os.listdir(tmp_path) == [backup.name]

    denied = await asyncio.gather(
        run(cli(cluster, *certs.flags("client"), "transfer-leader", "0")),
        run(cli(cluster, *certs.flags("client"), "member", "remove", str(voters[0]))),
    )
    for ran in denied:
        assert ran.code == 2, ran
        assert "permission denied" in one_line(ran) and "admin" in one_line(ran)

    leader = await cluster.wait_for_leader(20)
    listed = await run(cli(cluster, *certs.flags("client"), "member", "list"))
    assert listed.code == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == len(voters)
    moved = await run(cli(cluster, *certs.flags("admin"), "transfer-leader", "0"))
    assert moved.code == 0, moved.stderr + log_tails(cluster)
    assert int(moved.stdout) in voters and int(moved.stdout) != leader


# ---- bad flags -----------------------------------------------------------------------------


async def test_bad_tls_flags_exit_2_with_one_line(
    certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("bad-flags")
    garbage = tmp / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    port = find_free_port_block(2)
    node = ["raft_node.py", "--port", str(port), "--first-port", str(port), "--nodes", "1"]
    node += ["--data-dir", str(tmp / "data")]
    ours = certs.ours
    cert, key, ca = str(ours / "client.pem"), str(ours / "client.key"), str(ours / "ca.pem")
    cases: dict[str, tuple[list[str], str | None]] = {
        # name: (arguments, what the one line must name)
        "only --tls-cert": ([*node, "--tls-cert", cert], "--tls-key"),
        "missing CA file": (
            [*node, "--tls-cert", cert, "--tls-key", key, "--tls-ca", str(tmp / "no-ca.pem")],
            "no-ca.pem",
        ),
        "key not matching the cert": (
            [*node, "--tls-cert", cert, "--tls-key", str(ours / "admin.key"), "--tls-ca", ca],
            "admin.key",
        ),
        "malformed key": (
            [*node, "--tls-cert", cert, "--tls-key", str(garbage), "--tls-ca", ca],
            "garbage.pem",
        ),
        "malformed certificate": (
            [*node, "--tls-cert", str(garbage), "--tls-key", key, "--tls-ca", ca],
            "garbage.pem",
        ),
        "admin names without client certificates": (
            [*node, "--tls-cert", cert, "--tls-key", key, "--tls-ca", ca]
            + ["--admin-cert-name", "admin"],
            "--client-cert-auth",
        ),
        "client cert auth without TLS": ([*node, "--client-cert-auth"], "TLS"),
        "cli: certificate without key": (
            ["cluster_client.py", "--tls-cert", cert, "--tls-ca", ca, "get", "k"],
            "--tls-key",
        ),
        "cli: malformed CA": (
            ["cluster_client.py", "--tls-ca", str(garbage), "get", "k"],
            "garbage.pem",
        ),
    }
    results = await asyncio.gather(*(run(args) for args, _ in cases.values()))
    for (name, (_, named)), ran in zip(cases.items(), results, strict=True):
        assert ran.code == 2, f"{name}: exit {ran.code}, {ran.stderr!r}"
        line = one_line(ran)
        assert "Traceback" not in ran.stderr
        if named is not None:
            assert named in line, f"{name}: {line!r} does not name {named}"


# ---- server names --------------------------------------------------------------------------


async def test_a_server_name_other_than_the_host_dialled_is_used_only_when_asked(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    directory = tmp_path_factory.mktemp("named-only")
    authority, _ = make_certs.load_or_make_authority(directory)
    # Named only by a DNS name that does not resolve here: reached at 127.0.0.1 all the same.
    make_certs.write_node(authority, directory, 7, make_certs.parse_hosts("raft-node"))
    served = TlsConfig.load(directory / "node-7.pem", directory / "node-7.key")
    server = grpc.aio.server()
    # The bare servicer answers UNIMPLEMENTED to everything: enough to tell a call that got through.
    raft_pb2_grpc.add_ClusterServicer_to_server(raft_pb2_grpc.ClusterServicer(), server)
    port = server.add_secure_port(
        f"{HOST}:0", RenewableServerCredentials(served, require_client_auth=False).credentials
    )
    await server.start()
    try:
        codes = []
        for name in (None, "raft-node"):
            tls = TlsConfig.load(ca=directory / "ca.pem", server_name=name)
            channel = open_channel(f"{HOST}:{port}", [], tls)
            try:
                await raft_pb2_grpc.ClusterStub(channel).GetLeader(
                    raft_pb2.LeaderRequest(), timeout=5
                )
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())
            finally:
                await channel.close()
    finally:
        await server.stop(None)
    assert codes == [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED]
