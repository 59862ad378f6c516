"""A client that knows only the seed's proto, run in its own process by test/test_seed_compat.py.

It imports stubs compiled from test/seed_proto/raft.proto (never the project's rpc/), talks to
a cluster the way the seed's client did, and prints what it saw as one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import sys
import time
from typing import Any

import grpc


def _load_stubs(package: str) -> tuple[Any, Any]:
    pb2 = importlib.import_module(f"{package}.raft_pb2")
    pb2_grpc = importlib.import_module(f"{package}.raft_pb2_grpc")
    return pb2, pb2_grpc


def seed_put(
    pb2: Any,
    pb2_grpc: Any,
    ports: list[int],
    key: str,
    value: str,
    first: int | None,
    deadline: float,
) -> dict[str, Any]:
    """The seed client's write: start at a random node, follow `current_leader + nodes` redirects,
    and pause briefly whenever no leader is known; give up after `deadline` seconds."""
    nodes = len(ports)
    port = first if first is not None else random.choice(ports) + nodes
    redirects = 0
    waits = 0
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb2_grpc.ClusterStub(channel)
            try:
                response = stub.ProposeMapping(pb2.Mapping(key=key, value=value), timeout=6)
            except grpc.RpcError:
                response = None
        if response is not None and response.success:
            return {"ok": True, "accepted_by": port, "redirects": redirects, "waits": waits}
        if response is not None and response.HasField("current_leader"):
            port = response.current_leader + nodes
            redirects += 1
            continue
        waits += 1
        time.sleep(0.1)
        port = random.choice(ports) + nodes
    return {"ok": False, "redirects": redirects, "waits": waits}


def seed_get(pb2: Any, pb2_grpc: Any, port: int, key: str) -> dict[str, Any]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = pb2_grpc.ClusterStub(channel).GetValue(pb2.Key(key=key), timeout=5)
    return {
        "key": response.key,
        "has_value": response.HasField("value"),
        "value": response.value,
    }


def encode(pb2: Any) -> dict[str, Any]:
    """Seed-encoded messages, hex, for the other side to decode with the project's schema."""
    entry = pb2.LogEntry(term=3, index=7, key="colour", value="blue")
    vote = pb2.VoteRequest(term=5, requester_id=12346, last_log_index=9, last_log_term=4)
    append = pb2.AppendEntriesRequest(
        term=6,
        requester_id=12347,
        prev_log_index=7,
        prev_log_term=3,
        leader_commit=7,
        log_entries=[pb2.LogEntry(term=6, index=8, key="k", value="v")],
    )
    return {
        "LogEntry": entry.SerializeToString().hex(),
        "VoteRequest": vote.SerializeToString().hex(),
        "AppendEntriesRequest": append.SerializeToString().hex(),
    }


def decode(pb2: Any, name: str, data: str) -> dict[str, Any]:
    message = getattr(pb2, name).FromString(bytes.fromhex(data))
    fields: dict[str, Any] = {
        field.name: value for field, value in message.ListFields() if not field.is_repeated
    }
    if name == "ProposeMappingResponse":
        fields["has_current_leader"] = message.HasField("current_leader")
    return fields


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stubs", required=True, help="package holding the seed-compiled stubs")
    sub = parser.add_subparsers(dest="command", required=True)
    put = sub.add_parser("put")
    put.add_argument("--first-port", type=int, required=True)
    put.add_argument("--nodes", type=int, required=True)
    put.add_argument("--start-at", type=int, help="client port to ask first (default: random)")
    put.add_argument("--deadline", type=float, default=20)
    put.add_argument("key")
    put.add_argument("value")
    put.add_argument("missing_key", help="a key never written, read back after the put")
    sub.add_parser("encode")
    dec = sub.add_parser("decode")
    dec.add_argument("message")
    dec.add_argument("hex")
    args = parser.parse_args()

    pb2, pb2_grpc = _load_stubs(args.stubs)
    result: dict[str, Any]
    if args.command == "put":
        ports = list(range(args.first_port, args.first_port + args.nodes))
        result = seed_put(pb2, pb2_grpc, ports, args.key, args.value, args.start_at, args.deadline)
        if result["ok"]:
            result["get"] = seed_get(pb2, pb2_grpc, result["accepted_by"], args.key)
            result["get_missing"] = seed_get(pb2, pb2_grpc, result["accepted_by"], args.missing_key)
    elif args.command == "encode":
        result = encode(pb2)
    else:
        result = decode(pb2, args.message, args.hex)
    # Proof for the test that this process never loaded the project's own schema.
    result["loaded_project_rpc"] = "rpc.raft_pb2" in sys.modules
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
