"""The generated rpc/ package is current, and protos/raft.proto keeps the seed's wire contract.

A client or peer built from the seed's proto must keep working, so every seed message, field
number and method path is checked against the table of the seed's protocol below.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

from rpc import raft_pb2

REPO = Path(__file__).resolve().parent.parent
GENERATED = ("raft_pb2.py", "raft_pb2.pyi", "raft_pb2_grpc.py")

# The seed's protocol: message -> field -> (number, wire kind, repeated, explicit presence).
# "int" stands for int32 in the seed; int64 is wire compatible with it for the values Raft uses.
SEED_MESSAGES: dict[str, dict[str, tuple[int, str, bool, bool]]] = {
    "VoteRequest": {
        "term": (1, "int", False, False),
        "requester_id": (2, "int", False, False),
        "last_log_index": (3, "int", False, False),
        "last_log_term": (4, "int", False, False),
    },
    "RequestVoteResponse": {
        "term": (1, "int", False, False),
        "vote_granted": (2, "bool", False, False),
    },
    "LogEntry": {
        "term": (1, "int", False, False),
        "index": (2, "int", False, False),
        "key": (3, "string", False, False),
        "value": (4, "string", False, False),
    },
    "AppendEntriesRequest": {
        "term": (1, "int", False, False),
        "requester_id": (2, "int", False, False),
        "prev_log_index": (3, "int", False, False),
        "prev_log_term": (4, "int", False, False),
        "leader_commit": (5, "int", False, False),
        "log_entries": (6, "LogEntry", True, False),
    },
    "AppendEntriesResponse": {
        "term": (1, "int", False, False),
        "success": (2, "bool", False, False),
    },
    "Mapping": {
        "key": (1, "string", False, False),
        "value": (2, "string", False, False),
    },
    "ProposeMappingResponse": {
        "success": (1, "bool", False, False),
        "current_leader": (2, "int", False, True),
    },
    "Key": {
        "key": (1, "string", False, False),
    },
    "GetValueResponse": {
        "key": (1, "string", False, False),
        "value": (2, "string", False, True),
    },
}

# service -> method -> (request message, response message)
SEED_SERVICES: dict[str, dict[str, tuple[str, str]]] = {
    "Raft": {
        "RequestVote": ("VoteRequest", "RequestVoteResponse"),
        "AppendEntries": ("AppendEntriesRequest", "AppendEntriesResponse"),
    },
    "Cluster": {
        "ProposeMapping": ("Mapping", "ProposeMappingResponse"),
        "GetValue": ("Key", "GetValueResponse"),
    },
}

_INT_TYPES = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64}


def _kind_of(field: FieldDescriptor) -> str:
    if field.type in _INT_TYPES:
        return "int"
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "bool"
    if field.type == FieldDescriptor.TYPE_STRING:
        return "string"
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        message_type = field.message_type
        assert message_type is not None
        return str(message_type.full_name)
    return f"type {field.type}"


def _generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # The documented command, run from the repo root so the generated import paths match rpc/.
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-Irpc=protos",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        "rpc/raft.proto",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"protoc failed: {result.stderr}"


@pytest.mark.parametrize("name", GENERATED)
def test_rpc_is_regenerated_from_protos(tmp_path: Path, name: str) -> None:
    _generate(tmp_path)
    fresh = (tmp_path / "rpc" / name).read_bytes()
    checked_in = (REPO / "rpc" / name).read_bytes()
    assert fresh == checked_in, f"rpc/{name} is stale: regenerate it from protos/raft.proto"


def test_proto_has_no_package() -> None:
    text = (REPO / "protos" / "raft.proto").read_text(encoding="utf-8")
    assert not re.search(r"^\s*package\b", text, re.MULTILINE)
    assert raft_pb2.DESCRIPTOR.package == ""


@pytest.mark.parametrize("message", sorted(SEED_MESSAGES))
def test_seed_message_fields_keep_their_numbers(message: str) -> None:
    descriptor = raft_pb2.DESCRIPTOR.message_types_by_name.get(message)
    assert descriptor is not None, f"message {message} is missing"
    for name, (number, kind, repeated, presence) in SEED_MESSAGES[message].items():
        field = descriptor.fields_by_name.get(name)
        assert field is not None, f"{message}.{name} is missing"
        assert field.number == number, f"{message}.{name} was renumbered"
        assert _kind_of(field) == kind, f"{message}.{name} changed its wire type"
        assert field.is_repeated == repeated, f"{message}.{name} changed cardinality"
        if not repeated:
            assert field.has_presence == presence, f"{message}.{name} changed presence"
    seed_numbers = {number for number, *_ in SEED_MESSAGES[message].values()}
    for field in descriptor.fields:
        if field.name not in SEED_MESSAGES[message]:
            assert field.number not in seed_numbers, f"{message}.{field.name} reuses a seed number"


@pytest.mark.parametrize("service", sorted(SEED_SERVICES))
def test_seed_methods_keep_their_paths_and_types(service: str) -> None:
    descriptor = raft_pb2.DESCRIPTOR.services_by_name.get(service)
    assert descriptor is not None, f"service {service} is missing"
    # Without a package the full name is the bare service name, giving paths like /Raft/RequestVote.
    assert descriptor.full_name == service
    for method, (request, response) in SEED_SERVICES[service].items():
        found = descriptor.methods_by_name.get(method)
        assert found is not None, f"/{service}/{method} is missing"
        assert found.input_type.full_name == request
        assert found.output_type.full_name == response


def test_seed_proto_copy_matches_the_seed_table(tmp_path: Path) -> None:
    # test/seed_proto stands in for the seed's own proto in the compatibility tests, so it has to
    # say exactly what the seed's does: int32 fields, no package, no later additions.
    descriptor_set = tmp_path / "seed.pb"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Itest/seed_proto",
            f"--descriptor_set_out={descriptor_set}",
            "raft.proto",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    (seed,) = files.file
    assert seed.package == ""
    messages = {m.name: m for m in seed.message_type}
    assert set(messages) == set(SEED_MESSAGES)
    for name, fields in SEED_MESSAGES.items():
        found = {f.name: f for f in messages[name].field}
        assert set(found) == set(fields), name
        for field_name, (number, kind, repeated, presence) in fields.items():
            field = found[field_name]
            assert field.number == number
            if kind == "int":
                assert field.type == descriptor_pb2.FieldDescriptorProto.TYPE_INT32
            assert (field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED) == repeated
            assert field.proto3_optional == presence
    services = {
        s.name: {m.name: (m.input_type.lstrip("."), m.output_type.lstrip(".")) for m in s.method}
        for s in seed.service
    }
    assert services == SEED_SERVICES
