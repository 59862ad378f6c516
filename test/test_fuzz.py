"""Garbage at every RPC of a live cluster: random bytes and mutated messages sent to each method of
both services on every node while a recorded client workload runs; no node may exit, grow without
bound, answer UNKNOWN/INTERNAL, or lose an acknowledged write.

CI runs 60 s (`RAFT_FUZZ_SECONDS`, `RAFT_FUZZ_SEED` change that); a long run:
`python -m test.test_fuzz --duration 600 [--seed N]`.

What may be sent to the `Raft` service. Raft trusts its peers: a well-formed AppendEntries or
InstallSnapshot from a member id is indistinguishable from its leader's, and its entries, commit
index or snapshot would be believed (authenticating peers is the transport's job). So the main
phase sends peer messages that name no member (or that do not parse at all), and AppendEntries,
AppendStream and InstallSnapshot only with a term that is out of range or older than the
cluster's: every one of those must be refused, whatever the node's state, so the workload must
stay linearizable and live. A short last phase then sends well-formed messages from member ids
with newer terms, but no entries, no commit index and no snapshot that could verify: they may
disturb leadership (liveness is not asserted then), never safety. Admin calls that would really
change the cluster (adding or removing a member) and writes under a real client's session or to
the workload's keys are skipped the same way: a client with access may legitimately do those.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from cluster_identity import METADATA_KEY, derive_cluster_id
from rpc import raft_pb2
from state_machine import prefix_end, range_bounds
from test.cluster_process import LocalCluster
from test.fault_suite import RecordedLoad

DEFAULT_SECONDS = 60.0
# The member-id phase's share of the run, and at most this long.
MEMBER_PHASE_SHARE = 0.15
MEMBER_PHASE_MAX = 30.0
CONCURRENT_CALLS = 6
CALL_TIMEOUT = 5.0
# Codes that mean the server handled the request on purpose. UNKNOWN and INTERNAL mean an unhandled
# exception, UNIMPLEMENTED a method the server forgot.
MEANINGFUL = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.NOT_FOUND,
    # The fuzzer's own deadline: a write or transfer that waits for the cluster.
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
# Resident memory a node may gain while fuzzed. The largest messages sent are about 5 MiB (the
# client limit is 4 MiB); with a few calls in flight per node and gRPC's buffers (several copies of
# a message while it is parsed), transient use stays well under this, and a leak of even a few KiB
# per request (tens of thousands of them) would exceed it.
RSS_GROWTH_LIMIT = 256 << 20
CORE_RACE = "Internal error from Core"

INTERESTING_INTS = [
    0,
    1,
    -1,
    2,
    7,
    1000,
    2**31 - 1,
    2**31,
    2**32,
    2**62 - 1,
    2**62,
    2**63 - 1,
    -(2**63),
    -(2**31),
]
STRING_SIZES = [0, 1, 3, 16, 200, 1025, 5000, 70_000, 1 << 20, (1 << 20) + 1, 3 << 20]
REPEAT_COUNTS = [0, 1, 2, 3, 10, 100, 1001, 5000]


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    input: Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


def all_methods() -> list[Method]:
    """Every RPC of every service in the wire contract, so methods added later are fuzzed too."""
    methods = []
    for service in raft_pb2.DESCRIPTOR.services_by_name.values():
        for m in service.methods:
            methods.append(
                Method(
                    service.full_name,
                    m.name,
                    m.input_type,
                    bool(m.client_streaming),
                    bool(m.server_streaming),
                )
            )
    return methods


# -- making messages ---------------------------------------------------------------------------------


class Maker:
    """Random messages of any type in the contract, and byte-level mutations of them."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.budget = 0

    def integer(self, f: FieldDescriptor) -> int:
        rng = self.rng
        pick = rng.random()
        if pick < 0.5:
            n = rng.choice(INTERESTING_INTS)
        elif pick < 0.8:
            n = rng.randrange(0, 100_000)
        else:
            n = rng.randrange(-(2**63), 2**63)
        if f.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
            return n % 2**32
        if f.type in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
            return n % 2**64
        if f.type in (
            FieldDescriptor.TYPE_INT32,
            FieldDescriptor.TYPE_SINT32,
            FieldDescriptor.TYPE_SFIXED32,
            FieldDescriptor.TYPE_ENUM,
        ):
            return (n + 2**31) % 2**32 - 2**31
        return n

    def _size(self) -> int:
        rng = self.rng
        size = rng.choice(STRING_SIZES) if rng.random() < 0.3 else rng.randrange(0, 40)
        size = min(size, max(self.budget, 0))
        self.budget -= size
        return size

    def text(self) -> str:
        rng = self.rng
        size = self._size()
        piece = "".join(
            chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0xD7FF)]))
            for _ in range(min(size, 64))
        )
        # Long strings repeat a short random piece: cheap to make, as hard to check.
        return (piece * (size // 64 + 1))[:size] if piece else ""

    def blob(self) -> bytes:
        size = self._size()
        return (self.rng.randbytes(min(size, 64)) * (size // 64 + 1))[:size]

    def value(self, f: FieldDescriptor, depth: int) -> Any:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            return self.message(f.message_type, depth + 1)  # type: ignore[arg-type]
        if f.type == FieldDescriptor.TYPE_BOOL:
            return self.rng.random() < 0.5
        if f.type == FieldDescriptor.TYPE_STRING:
            return self.text()
        if f.type == FieldDescriptor.TYPE_BYTES:
            return self.blob()
        if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return self.rng.uniform(-1e9, 1e9)
        return self.integer(f)

    def message(self, descriptor: Descriptor, depth: int = 0) -> Message:
        rng = self.rng
        if depth == 0:
            # Bytes of strings the whole message may hold: mostly small, sometimes over the limits.
            self.budget = rng.choice([1 << 10, 64 << 10, 1 << 20, 5 << 20])
        msg = GetMessageClass(descriptor)()
        if depth > 4:
            return msg
        for f in descriptor.fields:
            if rng.random() < 0.35:
                continue
            if f.is_repeated:
                count = rng.choice(REPEAT_COUNTS) if depth < 2 else rng.randrange(0, 3)
                container = getattr(msg, f.name)
                for _ in range(count):
                    if f.type == FieldDescriptor.TYPE_MESSAGE:
                        container.add().CopyFrom(self.value(f, depth))
                    else:
                        container.append(self.value(f, depth))
                    if self.budget <= 0:
                        break
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, f.name).CopyFrom(self.value(f, depth))
            else:
                setattr(msg, f.name, self.value(f, depth))
        return msg

    def mutate(self, data: bytes) -> bytes:
        rng = self.rng
        out = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 3, 8])):
            how = rng.randrange(5)
            at = rng.randrange(len(out) + 1)
            if how == 0 and out:
                out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
            elif how == 1:
                out[at:at] = rng.randbytes(rng.choice([1, 2, 5, 10]))
            elif how == 2 and out:
                del out[at : at + rng.choice([1, 2, 4, 16])]
            elif how == 3 and out:
                out[at:at] = out[at : at + rng.randrange(1, 64)] * rng.randrange(2, 20)
            else:
                del out[at:]
        return bytes(out)

    def random_bytes(self) -> bytes:
        size = self.rng.choice([0, 1, 2, 5, 20, 100, 1000, 70_000])
        return self.rng.randbytes(size)


def walk(msg: Message) -> Iterator[Message]:
    """The message and every message inside it."""
    yield msg
    for f, value in msg.ListFields():
        if f.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        items = value if f.is_repeated else [value]
        for item in items:
            yield from walk(item)


# -- what may be sent ----------------------------------------------------------------------------------


# Peer messages that install a leader's log content when they are accepted.
LOG_CARRYING = {"AppendEntries", "AppendStream", "InstallSnapshot"}
# Writes whose session or key a fuzzer must not borrow from the workload.
MEMBERSHIP_CHANGES = {"AddMember", "RemoveMember"}
MAX_WIRE = 2**62


@dataclass
class Rules:
    members: set[int]
    # The cluster's term when fuzzing began: log-carrying messages in the main phase are older.
    start_term: int
    is_protected_key: Callable[[str], bool]
    # The same keys as ranges [start, end) (end None: to the last key): a delete-range that
    # overlaps one would delete the workload's keys.
    protected_ranges: Sequence[tuple[str, str | None]] = ()

    def allowed(self, method: Method, msg: Message | None) -> bool:
        """Whether a message (None: it does not parse) may be sent in the main phase."""
        if msg is None:
            return True
        if method.service == "Raft":
            requester = getattr(msg, "requester_id", 0)
            if requester in self.members:
                return False
            if method.name in LOG_CARRYING:
                term = getattr(msg, "term", 0)
                return term < 0 or term >= MAX_WIRE or term < self.start_term
            return True
        if method.name in MEMBERSHIP_CHANGES:
            node_id = getattr(msg, "id", 0)
            return (
                node_id <= 0
                or node_id >= MAX_WIRE
                or (method.name == "RemoveMember" and node_id not in self.members)
            )
        if isinstance(msg, raft_pb2.DeleteRangeRequest):
            end = msg.range_end if msg.HasField("range_end") else None
            start, stop = range_bounds(msg.key, msg.prefix, end)
            if any(
                (b is None or start < b) and (stop is None or a < stop)
                for a, b in self.protected_ranges
            ):
                return False
        for inner in walk(msg):
            if inner.DESCRIPTOR.name == "Session" and 0 < getattr(inner, "client_id", 0) < 2**40:
                return False
            key = getattr(inner, "key", None)
            if isinstance(key, str) and self.is_protected_key(key):
                return False
        return True


def parse(method: Method, data: bytes) -> Message | None:
    try:
        return GetMessageClass(method.input)().FromString(data)
    except (DecodeError, RuntimeError, ValueError):
        return None


def member_message(method: Method, rng: random.Random, members: list[int], term: int) -> Message:
    """A well-formed peer message from a member with a newer term: it may move terms and votes,
    but carries no entries, commit index or verifiable snapshot."""
    requester = rng.choice(members)
    newer = term + rng.randrange(0, 50)
    small = lambda: rng.randrange(0, 1000)  # noqa: E731
    if method.name == "RequestVote":
        return raft_pb2.VoteRequest(
            term=newer,
            requester_id=requester,
            last_log_index=small(),
            last_log_term=rng.randrange(0, newer + 1),
            pre_vote=rng.random() < 0.5,
            leadership_transfer=rng.random() < 0.3,
        )
    if method.name in ("AppendEntries", "AppendStream"):
        return raft_pb2.AppendEntriesRequest(
            term=newer, requester_id=requester, prev_log_index=small(), prev_log_term=term
        )
    if method.name == "InstallSnapshot":
        return raft_pb2.InstallSnapshotRequest(
            term=newer,
            requester_id=requester,
            last_included_index=small(),
            last_included_term=term,
            offset=0,
            total_size=100,
            data=rng.randbytes(100),
            done=True,
            checksum=rng.randrange(2**32),
        )
    cls = GetMessageClass(method.input)
    msg = cls()
    for name, value in (("term", newer), ("requester_id", requester)):
        if name in method.input.fields_by_name:
            setattr(msg, name, value)
    return msg


# -- sending -------------------------------------------------------------------------------------------


def _identity(data: bytes) -> bytes:
    return data


@dataclass
class Tally:
    requests: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)

    def record(
        self, method: Method, code: grpc.StatusCode, details: str, kind: str, written: int = 1
    ) -> None:
        self.requests[method.path] += 1
        if code == grpc.StatusCode.INTERNAL and details == CORE_RACE and written >= 1:
            # gRPC's own client, not the node: a message written into a stream the server has
            # just ended (with a meaningful code) sometimes turns that code into this one; a bare
            # gRPC server that aborts after one message shows it too. A stream is ended before
            # its first message is read when it lacks the cluster's id, so one write suffices.
            self.codes["INTERNAL (stream written after the server ended it)"] += 1
            return
        self.codes[code.name] += 1
        if code not in MEANINGFUL and len(self.bad) < 50:
            self.bad.append(f"{method.path} ({kind}): {code.name}: {details[:200]}")

    def report(self) -> str:
        lines = ["requests per RPC:"]
        lines += [f"  {path:32} {n}" for path, n in sorted(self.requests.items())]
        lines.append("status codes: " + ", ".join(f"{c} {n}" for c, n in self.codes.most_common()))
        return "\n".join(lines)


class Fuzzer:
    def __init__(self, cluster: LocalCluster, rng: random.Random, rules: Rules) -> None:
        self.cluster = cluster
        self.cluster_id = derive_cluster_id(cluster.config)
        self.rng = rng
        self.maker = Maker(rng)
        self.rules = rules
        self.methods = all_methods()
        self.tally = Tally()
        self._channels: dict[str, grpc.aio.Channel] = {}
        options = [
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.enable_http_proxy", 0),
        ]
        for node_id in cluster.node_ids:
            address = cluster.address(node_id)
            for target in (address.raft_address, address.client_address):
                self._channels[target] = grpc.aio.insecure_channel(target, options=options)

    def _channel(self, node_id: int, method: Method) -> grpc.aio.Channel:
        address = self.cluster.address(node_id)
        target = address.raft_address if method.service == "Raft" else address.client_address
        return self._channels[target]

    def _draw(self, method: Method) -> tuple[bytes, str]:
        """Bytes for one main-phase request and what kind they are."""
        for _ in range(50):
            pick = self.rng.random()
            if pick < 0.15:
                data, kind = self.maker.random_bytes(), "random bytes"
            else:
                data = self.maker.message(method.input).SerializeToString()
                kind = "random fields"
                if pick < 0.55:
                    data, kind = self.maker.mutate(data), "mutated"
            if self.rules.allowed(method, parse(method, data)):
                return data, kind
        return b"", "empty"

    def _metadata(self, method: Method) -> tuple[tuple[str, str], ...]:
        """A peer call carries the cluster's id, so that the node's own checks see it; now and
        then none or a forged one, which the cluster check must refuse."""
        if method.service != "Raft":
            return ()
        pick = self.rng.random()
        if pick < 0.05:
            return ()
        if pick < 0.1:
            return ((METADATA_KEY, self.maker.random_bytes()[:40].hex()),)
        return ((METADATA_KEY, self.cluster_id),)

    async def call(self, node_id: int, method: Method, requests: list[bytes], kind: str) -> None:
        channel = self._channel(node_id, method)
        metadata = self._metadata(method)
        code, details = grpc.StatusCode.OK, ""
        written = 0
        try:
            if method.client_streaming or method.server_streaming:
                stream = channel.stream_stream(
                    method.path, request_serializer=_identity, response_deserializer=_identity
                )
                # Written one by one, not from an iterator: gRPC's client reports INTERNAL when
                # its iterator feeder writes into a call the server has already ended.
                call = stream(timeout=CALL_TIMEOUT, metadata=metadata)
                for data in requests:
                    if call.done():
                        break
                    written += 1
                    try:
                        await call.write(data)
                    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        break
                if not call.done():
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        await call.done_writing()
                async for _ in call:
                    pass
            else:
                unary = channel.unary_unary(
                    method.path, request_serializer=_identity, response_deserializer=_identity
                )
                await unary(requests[0], timeout=CALL_TIMEOUT, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), e.details() or ""
        self.tally.record(method, code, details, kind, written)

    async def main_phase(self, until: float) -> None:
        async def worker() -> None:
            while time.monotonic() < until:
                method = self.rng.choice(self.methods)
                node_id = self.rng.choice(self.cluster.node_ids)
                count = self.rng.randrange(1, 4) if method.client_streaming else 1
                drawn = [self._draw(method) for _ in range(count)]
                await self.call(node_id, method, [d for d, _ in drawn], drawn[0][1])

        await asyncio.gather(*(worker() for _ in range(CONCURRENT_CALLS)))

    async def member_phase(self, until: float, term: Callable[[], int]) -> None:
        raft_methods = [m for m in self.methods if m.service == "Raft"]
        members = sorted(self.rules.members)

        async def worker() -> None:
            while time.monotonic() < until:
                method = self.rng.choice(raft_methods)
                node_id = self.rng.choice(self.cluster.node_ids)
                msg = member_message(method, self.rng, members, term())
                await self.call(node_id, method, [msg.SerializeToString()], "member id")
                # Spread out: this phase checks that nodes survive forged peers, not a flood.
                await asyncio.sleep(self.rng.uniform(0.0, 0.05))

        await asyncio.gather(*(worker() for _ in range(2)))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


# -- the run ----------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class FuzzResult:
    seed: int
    duration: float
    tally: Tally
    problems: list[str]
    rss: dict[int, tuple[int, int]]
    verdict_lines: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        lines = [f"fuzz: seed {self.seed}, {self.duration:g} s", self.tally.report()]
        for node_id, (base, peak) in sorted(self.rss.items()):
            lines.append(
                f"node {node_id}: RSS {base / 2**20:.0f} MiB at start, peak {peak / 2**20:.0f} MiB"
            )
        lines += self.verdict_lines
        lines += [f"PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)


async def run_fuzz(duration: float, seed: int, work_dir: Path) -> FuzzResult:
    rng = random.Random(seed)
    started = time.monotonic()

    def clock() -> float:
        return time.monotonic() - started

    problems: list[str] = []
    rss: dict[int, tuple[int, int]] = {}
    verdict_lines: list[str] = []
    cluster = LocalCluster(3, data_dir=work_dir / "nodes")
    fuzzer: Fuzzer | None = None
    load: RecordedLoad | None = None
    try:
        cluster.start()
        await cluster.wait_for_leader(30)
        load = RecordedLoad(cluster, clock, clients=3, keys=4, fresh_writers=1, seed=seed)
        load.start()
        async with cluster.probe() as probe:
            terms = [r.term for n in cluster.node_ids if (r := await probe.get_leader(n))]
        start_term = max(terms, default=1)
        rules = Rules(
            set(cluster.node_ids),
            start_term,
            lambda key: key in load.keys or key.startswith("fresh-"),
            [(k, k + "\0") for k in load.keys] + [("fresh-", prefix_end("fresh-"))],
        )
        fuzzer = Fuzzer(cluster, rng, rules)
        for node_id in cluster.node_ids:
            pid = cluster.pid(node_id)
            size = rss_bytes(pid) if pid is not None else None
            rss[node_id] = (size or 0, size or 0)

        async def watch_memory(until: float) -> None:
            while time.monotonic() < until:
                for node_id in cluster.node_ids:
                    pid = cluster.pid(node_id)
                    size = rss_bytes(pid) if pid is not None else None
                    if size is not None:
                        base, peak = rss[node_id]
                        rss[node_id] = (base, max(peak, size))
                await asyncio.sleep(0.5)

        member_phase = min(duration * MEMBER_PHASE_SHARE, MEMBER_PHASE_MAX)
        main_end = time.monotonic() + duration - member_phase
        end = time.monotonic() + duration
        watcher = asyncio.ensure_future(watch_memory(end))
        await fuzzer.main_phase(main_end)

        current = [start_term]

        async def refresh_term() -> None:
            async with cluster.probe() as probe:
                while time.monotonic() < end:
                    for n in cluster.node_ids:
                        r = await probe.get_leader(n)
                        if r is not None:
                            current[0] = max(current[0], r.term)
                    await asyncio.sleep(0.5)

        refresher = asyncio.ensure_future(refresh_term())
        await fuzzer.member_phase(end, lambda: current[0])
        await asyncio.gather(watcher, refresher)

        await load.stop()
        exited = [n for n in cluster.node_ids if not cluster.is_running(n)]
        for node_id in exited:
            problems.append(
                f"node {node_id} exited with code {cluster.exit_code(node_id)}: "
                + " | ".join(cluster.log_tail(node_id, 5))
            )
        for node_id, (base, peak) in rss.items():
            if peak - base > RSS_GROWTH_LIMIT:
                problems.append(
                    f"node {node_id} grew from {base >> 20} MiB to {peak >> 20} MiB resident"
                )
        problems += fuzzer.tally.bad
        missing = [m.path for m in fuzzer.methods if fuzzer.tally.requests[m.path] == 0]
        if missing:
            problems.append(f"never fuzzed: {', '.join(missing)}")
        if not exited:
            verdict = await load.verdict()
            verdict_lines = verdict.lines()
            if not verdict.ok:
                problems.append("the workload's history is not linearizable or lost a write")
        if load.client_errors:
            problems.append(f"client errors: {load.client_errors[:3]}")
        return FuzzResult(seed, duration, fuzzer.tally, problems, rss, verdict_lines)
    finally:
        try:
            if load is not None:
                await load.stop()
            if fuzzer is not None:
                await fuzzer.close()
        finally:
            cluster.stop()


def _duration() -> float:
    return float(os.environ.get("RAFT_FUZZ_SECONDS", DEFAULT_SECONDS))


def _seed() -> int:
    raw = os.environ.get("RAFT_FUZZ_SEED")
    return int(raw) if raw else random.randrange(2**32)


@pytest.mark.slow
@pytest.mark.timeout(_duration() + 600)
async def test_nodes_shrug_off_garbage_at_every_rpc(tmp_path: Path) -> None:
    """Random and mutated requests at every RPC of both services on every node, under a recorded
    workload: no node exits or balloons, every refusal has a meaningful code, and the history
    stays linearizable with no acknowledged write lost."""
    seed = _seed()
    replay = f"replay: RAFT_FUZZ_SEED={seed} python -m pytest test/test_fuzz.py"
    # Printed first, so that a run that hangs (and is ended by the timeout) still shows it.
    print(f"fuzz seed {seed} ({replay})", flush=True)
    result = await run_fuzz(_duration(), seed, tmp_path)
    print(result.report(), flush=True)
    assert result.ok, f"{result.report()}\n{replay}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m test.test_fuzz",
        description="Fuzz every RPC of a live three-node cluster under a recorded workload.",
    )
    parser.add_argument("--duration", type=float, default=DEFAULT_SECONDS, help="seconds (60)")
    parser.add_argument("--seed", type=int, help="the seed (default: random, printed)")
    args = parser.parse_args(argv)
    if not args.duration > 0:
        parser.error("--duration must be a positive number of seconds")
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"fuzz seed {seed}", flush=True)
    with tempfile.TemporaryDirectory(prefix="raft-demo-fuzz-") as work:
        result = asyncio.run(run_fuzz(args.duration, seed, Path(work)))
    print(result.report(), flush=True)
    print("PASS" if result.ok else "FAIL", flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
