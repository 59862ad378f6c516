"""`python raft_node.py` as a user and as its peers meet it: flags, errors, the cluster-file form,
clean shutdown, and refusal of bad client input and hostile peer messages."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cluster_config import ClusterConfig
from rpc import raft_pb2
from test.cluster_process import HostCluster, find_free_port_block
from test.conftest import Stubs, leader_of, log_tails, put, run_script, wait_until

FLAGS = (
    "--port",
    "--first-port",
    "--nodes",
    "--id",
    "--cluster",
    "--host",
    "--data-dir",
    "--log-level",
    "--heartbeat-ms",
    "--election-timeout-min-ms",
    "--election-timeout-max-ms",
    "--proposal-timeout-ms",
    "--cluster-token",
    "--config",
    "--log-format",
    "--metrics-port",
    "--tls-cert",
    "--client-cert-auth",
)
# Ids with nothing to do with ports, and client ports below Raft ports: nothing like the seed's
# layout, so the node must take every address from the file.
TOML_IDS = (7, 21, 3)
STRANGER = 999_999
MAX_WIRE = 2**62
MIB = 1024 * 1024


def write_cluster_file(path: Path, first_port: int, ids: tuple[int, ...] = TOML_IDS) -> Path:
    count = len(ids)
    tables = [
        f'[[node]]\nid = {node_id}\nraft = "127.0.0.1:{first_port + count + i}"\n'
        f'client = "127.0.0.1:{first_port + i}"\n'
        for i, node_id in enumerate(ids)
    ]
    path.write_text("\n".join(tables), encoding="utf-8")
    return path


class TomlCluster(HostCluster):
    """A local cluster whose nodes are started in the `--id ID --cluster FILE` form."""

    def __init__(self, directory: Path) -> None:
        cluster_file = write_cluster_file(
            directory / "cluster.toml", find_free_port_block(2 * len(TOML_IDS))
        )
        config = ClusterConfig.from_toml(cluster_file)
        super().__init__(config, {node_id: cluster_file for node_id in config.nodes})
        self.cluster_file = cluster_file


@pytest.fixture(scope="module")
def toml_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TomlCluster]:
    cluster = TomlCluster(tmp_path_factory.mktemp("toml-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# ---- the command line ----------------------------------------------------------------------


def test_help_documents_every_flag() -> None:
    result = run_script(["raft_node.py", "--help"])
    assert result.returncode == 0, result.stderr
    for flag in FLAGS:
        assert flag in result.stdout, f"--help does not mention {flag}"


BadArgs = Callable[[Path, int], list[str]]


def _in_use(tmp: Path, first_port: int) -> list[str]:
    return [
        "--id",
        str(TOML_IDS[0]),
        "--cluster",
        str(write_cluster_file(tmp / "c.toml", first_port)),
    ]


BAD_INVOCATIONS: dict[str, tuple[BadArgs, int | None]] = {
    # name: (arguments given a temp dir and a free port block, port to occupy (offset) or None)
    "unknown flag": (lambda tmp, p: ["--port", str(p), "--first-port", str(p), "--bogus"], None),
    "no identity": (lambda tmp, p: ["--first-port", str(p)], None),
    "bad log level": (
        lambda tmp, p: ["--port", str(p), "--first-port", str(p), "--log-level", "LOUD"],
        None,
    ),
    "port is not a number": (lambda tmp, p: ["--port", "twelve"], None),
    "id without cluster file": (lambda tmp, p: ["--id", "1"], None),
    "missing cluster file": (
        lambda tmp, p: ["--id", "1", "--cluster", str(tmp / "no-such.toml")],
        None,
    ),
    "cluster file is a directory": (lambda tmp, p: ["--id", "1", "--cluster", str(tmp)], None),
    "cluster file is not TOML": (
        lambda tmp, p: ["--id", "1", "--cluster", str(_write(tmp / "bad.toml", "[[node]\nid="))],
        None,
    ),
    "cluster file without nodes": (
        lambda tmp, p: ["--id", "1", "--cluster", str(_write(tmp / "empty.toml", "x = 1\n"))],
        None,
    ),
    "id not in cluster file": (
        lambda tmp, p: ["--id", "99", "--cluster", str(write_cluster_file(tmp / "c.toml", p))],
        None,
    ),
    "port not in seed cluster": (
        lambda tmp, p: ["--port", str(p + 40), "--first-port", str(p), "--nodes", "3"],
        None,
    ),
    "election timeout min above max": (
        lambda tmp, p: [
            "--port",
            str(p),
            "--first-port",
            str(p),
            "--election-timeout-min-ms",
            "900",
            "--election-timeout-max-ms",
            "300",
        ],
        None,
    ),
    # TOML_IDS[0] has client port p and Raft port p + 3 (see write_cluster_file).
    "client port in use": (lambda tmp, p: _in_use(tmp, p), 0),
    "raft port in use": (lambda tmp, p: _in_use(tmp, p), len(TOML_IDS)),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("case", sorted(BAD_INVOCATIONS))
def test_bad_invocation_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    make_args, occupied_offset = BAD_INVOCATIONS[case]
    first_port = find_free_port_block(2 * len(TOML_IDS))
    args = make_args(tmp_path, first_port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        if occupied_offset is not None:
            blocker.bind(("127.0.0.1", first_port + occupied_offset))
            blocker.listen()
        result = run_script(
            ["raft_node.py", *args, "--data-dir", str(tmp_path / "data")], timeout=30
        )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"exit {result.returncode}; stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].strip()


# ---- the --id/--cluster form, and clean shutdown ---------------------------------------------


async def test_cluster_file_form_elects_and_serves(toml_cluster: TomlCluster, stubs: Stubs) -> None:
    leader, _ = await leader_of(toml_cluster)
    assert leader in TOML_IDS
    # A follower that knows the leader redirects with the leader's client address from the file.
    follower = next(n for n in toml_cluster.node_ids if n != leader)
    follower_address = toml_cluster.client_address(follower)

    async def follower_knows_leader() -> bool:
        info = await stubs.leader_info(follower_address)
        return info is not None and info.HasField("leader_id") and info.leader_id == leader

    await wait_until(follower_knows_leader, 10, f"node {follower} follows {leader}")
    reply = await stubs.cluster(follower_address).ProposeMapping(
        raft_pb2.Mapping(key="file-form", value="works"), timeout=6
    )
    assert not reply.success
    assert reply.HasField("current_leader") and reply.current_leader == leader
    assert reply.leader_address == toml_cluster.client_address(leader)
    acknowledged_by = await put(stubs, toml_cluster, "file-form", "works")
    assert await stubs.value(acknowledged_by, "file-form") == "works"

    async def everyone_has_it() -> bool:
        for node_id in toml_cluster.node_ids:
            values = await stubs.values(toml_cluster.client_address(node_id), ["file-form"])
            if values != {"file-form": "works"}:
                return False
        return True

    await wait_until(everyone_has_it, 10, "every node serves file-form=works")
    # The narration announces each election win in the documented form.
    assert any(
        f"[{leader} leader t=" in line and "won the election" in line
        for line in toml_cluster.node_log(leader).splitlines()
    ), log_tails(toml_cluster, [leader])


@pytest.mark.slow
async def test_sigterm_stops_a_node_cleanly(toml_cluster: TomlCluster, stubs: Stubs) -> None:
    leader, _ = await leader_of(toml_cluster)
    await put(stubs, toml_cluster, "before-sigterm", "kept")
    follower = next(n for n in toml_cluster.node_ids if n != leader)
    stopped: list[int] = []
    try:
        for node_id in (follower, leader):
            code = toml_cluster.stop_node(node_id, timeout=10)
            stopped.append(node_id)
            assert code == 0, f"node {node_id} exited with {code}\n" + log_tails(
                toml_cluster, [node_id]
            )
    finally:
        for node_id in stopped:
            toml_cluster.start_node(node_id)
    # A clean stop keeps what was acknowledged.
    leader, address = await leader_of(toml_cluster)
    await wait_until(
        lambda: _has(stubs, address, "before-sigterm", "kept"),
        10,
        "the restarted cluster serves before-sigterm=kept",
    )


async def _has(stubs: Stubs, address: str, key: str, value: str) -> bool:
    return await stubs.values(address, [key]) == {key: value}


# ---- bad client input ----------------------------------------------------------------------


BAD_MAPPINGS = {
    "empty key": ("", "v"),
    "1025-byte key": ("k" * 1025, "v"),
    "key over 1024 bytes in UTF-8 only": ("é" * 513, "v"),
    "value over 1 MiB": ("big", "v" * (MIB + 1)),
    "value over 1 MiB in UTF-8 only": ("big", "é" * (MIB // 2 + 1)),
}


@pytest.mark.parametrize("case", sorted(BAD_MAPPINGS))
async def test_invalid_mapping_is_refused_and_the_node_keeps_serving(
    toml_cluster: TomlCluster, stubs: Stubs, case: str
) -> None:
    key, value = BAD_MAPPINGS[case]
    leader, leader_address = await leader_of(toml_cluster)
    follower = next(n for n in toml_cluster.node_ids if n != leader)
    for address in (leader_address, toml_cluster.client_address(follower)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs.cluster(address).ProposeMapping(
                raft_pb2.Mapping(key=key, value=value), timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details(), "INVALID_ARGUMENT must say what is wrong"
    # Nothing was stored (a key that is itself invalid cannot even be read), and the cluster
    # still takes writes.
    if 0 < len(key.encode("utf-8")) <= 1024:
        assert await stubs.value(leader_address, key) is None
    acknowledged_by = await put(stubs, toml_cluster, f"after {case}", "fine")
    assert await stubs.value(acknowledged_by, f"after {case}") == "fine"


@pytest.mark.parametrize("key", ["", "k" * 1025], ids=["empty key", "1025-byte key"])
async def test_invalid_key_read_is_refused(
    toml_cluster: TomlCluster, stubs: Stubs, key: str
) -> None:
    address = toml_cluster.client_address(toml_cluster.node_ids[0])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.value(address, key)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details()
    assert await stubs.leader_info(address) is not None


async def test_limits_themselves_are_accepted(toml_cluster: TomlCluster, stubs: Stubs) -> None:
    longest_key = "k" * 1024
    largest_value = "v" * MIB
    acknowledged_by = await put(stubs, toml_cluster, longest_key, largest_value)
    assert await stubs.value(acknowledged_by, longest_key) == largest_value


# ---- hostile peer messages -------------------------------------------------------------------

# Each builds a message for a node in term `t`, claiming to come from `member` (another member).
HOSTILE: dict[str, tuple[str, Callable[[int, int], Any]]] = {
    "append with negative prev_log_index": (
        "AppendEntries",
        lambda t, member: raft_pb2.AppendEntriesRequest(
            term=t, requester_id=member, prev_log_index=-1, prev_log_term=0
        ),
    ),
    "append with negative leader_commit": (
        "AppendEntries",
        lambda t, member: raft_pb2.AppendEntriesRequest(
            term=t, requester_id=member, prev_log_index=0, leader_commit=-3
        ),
    ),
    "append from unknown requester": (
        "AppendEntries",
        lambda t, member: raft_pb2.AppendEntriesRequest(
            term=t + 1000, requester_id=STRANGER, prev_log_index=0
        ),
    ),
    "vote request from unknown requester": (
        "RequestVote",
        lambda t, member: raft_pb2.VoteRequest(
            term=t + 1000, requester_id=STRANGER, last_log_index=10**6, last_log_term=t + 1000
        ),
    ),
    "append with term 2**62": (
        "AppendEntries",
        lambda t, member: raft_pb2.AppendEntriesRequest(term=MAX_WIRE, requester_id=member),
    ),
    "vote request with term 2**62": (
        "RequestVote",
        lambda t, member: raft_pb2.VoteRequest(term=MAX_WIRE, requester_id=member),
    ),
    "vote request with largest int64 term": (
        "RequestVote",
        lambda t, member: raft_pb2.VoteRequest(term=2**63 - 1, requester_id=member),
    ),
    "append with negative term": (
        "AppendEntries",
        lambda t, member: raft_pb2.AppendEntriesRequest(term=-5, requester_id=member),
    ),
    "vote request with negative term": (
        "RequestVote",
        lambda t, member: raft_pb2.VoteRequest(term=-1, requester_id=member),
    ),
    "vote request with huge last_log_index": (
        "RequestVote",
        lambda t, member: raft_pb2.VoteRequest(
            term=t + 1000, requester_id=member, last_log_index=2**63 - 1, last_log_term=t
        ),
    ),
    "append with entries that skip indices": (
        "AppendEntries",
        lambda t, member: raft_pb2.AppendEntriesRequest(
            term=t,
            requester_id=member,
            prev_log_index=0,
            log_entries=[raft_pb2.LogEntry(term=t, index=5, key="forged", value="x")],
        ),
    ),
    "append with an entry newer than its term": (
        "AppendEntries",
        lambda t, member: raft_pb2.AppendEntriesRequest(
            term=t,
            requester_id=member,
            prev_log_index=0,
            log_entries=[raft_pb2.LogEntry(term=t + 1000, index=1, key="forged", value="x")],
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_peer_message_is_refused_without_harm(
    toml_cluster: TomlCluster, stubs: Stubs, case: str
) -> None:
    method, build = HOSTILE[case]
    leader, _ = await leader_of(toml_cluster)
    before = await stubs.leader_info(toml_cluster.client_address(leader))
    assert before is not None
    term = before.term
    for target in toml_cluster.node_ids:
        # Claim to be another member: the leader for a follower, a follower for the leader.
        member = leader if target != leader else next(n for n in TOML_IDS if n != leader)
        raft = stubs.raft(toml_cluster.config.node(target).raft_address, toml_cluster.config)
        # The documented answer to a message no correct member sends: INVALID_ARGUMENT, no change.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await getattr(raft, method)(build(term, member), timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    for target in toml_cluster.node_ids:
        assert toml_cluster.is_running(target), log_tails(toml_cluster, [target])
        info = await stubs.leader_info(toml_cluster.client_address(target))
        assert info is not None, f"node {target} stopped answering"
        # Elections may happen meanwhile, but never a jump to the forged term.
        assert info.term < term + 1000, f"node {target} adopted a forged term: {info.term}"
        assert await stubs.value(toml_cluster.client_address(target), "forged") is None
    acknowledged_by = await put(stubs, toml_cluster, f"after {case}", "fine")
    assert await stubs.value(acknowledged_by, f"after {case}") == "fine"
