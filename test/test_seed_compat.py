"""A client built from the seed's proto still works against raft-demo nodes, and seed-encoded
messages decode under the project's schema (and back).

The seed's stubs are compiled from test/seed_proto/ at test time and used from a separate
process: both protos declare the same message names without a package, so one interpreter
cannot load the two schemas side by side.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rpc import raft_pb2
from test.cluster_process import LocalCluster
from test.conftest import REPO, Stubs, log_tails, run_script

SEED_PROTO_DIR = REPO / "test" / "seed_proto"
SEED_CLIENT = SEED_PROTO_DIR / "seed_client.py"
# A package name the project never uses, so nothing can mistake these stubs for rpc/.
STUBS_PACKAGE = "seed_wire"


@pytest.fixture(scope="module")
def seed_stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed's proto compiled into <dir>/seed_wire/; returns <dir>, for PYTHONPATH."""
    out = tmp_path_factory.mktemp("seed-stubs")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{STUBS_PACKAGE}={SEED_PROTO_DIR}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"{STUBS_PACKAGE}/raft.proto",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (out / STUBS_PACKAGE / "raft_pb2.py").exists()
    assert (out / STUBS_PACKAGE / "raft_pb2_grpc.py").exists()
    return out


def seed_client(stubs_dir: Path, *args: str, timeout: float = 40) -> dict[str, Any]:
    """Run the seed-only client with nothing but its own stubs importable; its JSON answer."""
    # cwd and PYTHONPATH exclude the repository, so `rpc` cannot be imported by accident.
    result = run_script(
        [str(SEED_CLIENT), "--stubs", STUBS_PACKAGE, *args],
        timeout=timeout,
        cwd=stubs_dir,
        env_path=str(stubs_dir),
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    assert answer.pop("loaded_project_rpc") is False
    return answer


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    made = LocalCluster(nodes=5)
    try:
        made.start()
        yield made
    finally:
        made.stop()


async def test_seed_client_put_follows_redirects_and_reads_back(
    cluster: LocalCluster, seed_stubs: Path, stubs: Stubs
) -> None:
    leader = await cluster.wait_for_leader(timeout=15)
    follower = next(n for n in cluster.node_ids if n != leader)
    # Start at a follower so the seed's redirect rule (current_leader + nodes) is exercised.
    answer = seed_client(
        seed_stubs,
        "put",
        "--first-port",
        str(cluster.first_port),
        "--nodes",
        str(cluster.nodes),
        "--start-at",
        str(follower + cluster.nodes),
        "seed-colour",
        "teal",
        "seed-never-written",
    )
    assert answer["ok"], f"{answer}\n{log_tails(cluster)}"
    assert answer["redirects"] >= 1
    accepted_by = answer["accepted_by"]
    # Whoever accepted must be the leader, reached through the seed's port arithmetic.
    info = await stubs.leader_info(f"127.0.0.1:{accepted_by}")
    assert info is not None and info.node_id + cluster.nodes == accepted_by
    assert answer["get"] == {"key": "seed-colour", "has_value": True, "value": "teal"}
    assert answer["get_missing"] == {"key": "seed-never-written", "has_value": False, "value": ""}


async def test_seed_client_from_a_random_node(cluster: LocalCluster, seed_stubs: Path) -> None:
    await cluster.wait_for_leader(timeout=15)
    answer = seed_client(
        seed_stubs,
        "put",
        "--first-port",
        str(cluster.first_port),
        "--nodes",
        str(cluster.nodes),
        "seed-shape",
        "circle",
        "seed-also-never-written",
    )
    assert answer["ok"], f"{answer}\n{log_tails(cluster)}"
    assert answer["get"]["value"] == "circle"
    assert answer["get_missing"]["has_value"] is False


def test_seed_encoded_messages_decode_under_the_new_schema(seed_stubs: Path) -> None:
    encoded = seed_client(seed_stubs, "encode")

    entry = raft_pb2.LogEntry.FromString(bytes.fromhex(encoded["LogEntry"]))
    assert (entry.term, entry.index, entry.key, entry.value) == (3, 7, "colour", "blue")
    # The seed had only mappings, so its entries must read as mappings, never as no-ops.
    assert entry.kind == raft_pb2.ENTRY_KIND_MAPPING

    vote = raft_pb2.VoteRequest.FromString(bytes.fromhex(encoded["VoteRequest"]))
    assert (vote.term, vote.requester_id, vote.last_log_index, vote.last_log_term) == (
        5,
        12346,
        9,
        4,
    )

    append = raft_pb2.AppendEntriesRequest.FromString(
        bytes.fromhex(encoded["AppendEntriesRequest"])
    )
    assert (append.term, append.requester_id, append.prev_log_index) == (6, 12347, 7)
    assert (append.prev_log_term, append.leader_commit) == (3, 7)
    assert [(e.term, e.index, e.key, e.value, e.kind) for e in append.log_entries] == [
        (6, 8, "k", "v", raft_pb2.ENTRY_KIND_MAPPING)
    ]


@pytest.mark.parametrize(
    ("name", "message", "seed_sees"),
    [
        (
            "ProposeMappingResponse",
            raft_pb2.ProposeMappingResponse(
                success=False, current_leader=12347, leader_address="127.0.0.1:12352"
            ),
            {"current_leader": 12347, "has_current_leader": True},
        ),
        (
            "ProposeMappingResponse",
            raft_pb2.ProposeMappingResponse(success=True),
            {"success": True, "has_current_leader": False},
        ),
        (
            "AppendEntriesResponse",
            raft_pb2.AppendEntriesResponse(
                term=9, success=True, match_index=40, conflict_term=0, conflict_index=0
            ),
            {"term": 9, "success": True},
        ),
        (
            "RequestVoteResponse",
            raft_pb2.RequestVoteResponse(term=11, vote_granted=True),
            {"term": 11, "vote_granted": True},
        ),
        (
            "GetValueResponse",
            raft_pb2.GetValueResponse(key="k", value=""),
            {"key": "k", "value": ""},
        ),
    ],
)
def test_new_replies_decode_under_the_seed_schema(
    seed_stubs: Path, name: str, message: Any, seed_sees: dict[str, Any]
) -> None:
    # Fields the seed never had (leader_address, match_index, ...) must be skipped, not break it.
    decoded = seed_client(seed_stubs, "decode", name, message.SerializeToString().hex())
    assert decoded == seed_sees
