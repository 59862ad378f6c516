"""The node event stream (Cluster.Events, node_events.py): in-process, every role change and
commit advance of a node is reported in order with consecutive sequence numbers, and a subscriber
that does not read is told how many events it missed while the node goes on committing; against
real processes, `cluster_client.py events` shows elections and commits (also under TLS, and as
JSON), and a malformed request is refused without harm."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from cluster_client import Client
from cluster_config import ClusterConfig, NodeAddress
from disk import MemoryDisk
from log import RaftLog
from node_events import EventFeed, Subscription
from node_types import put_entry
from raft_node import RaftNode, Timing
from rpc import raft_pb2, raft_pb2_grpc
from test.cluster_process import REPO_ROOT, ClusterTls, LocalCluster
from test.conftest import wait_until
from test.memory_transport import InMemoryNetwork

FAST = Timing(
    heartbeat_interval=0.02,
    election_timeout_min=0.15,
    election_timeout_max=0.3,
    proposal_timeout=2.0,
    append_timeout=0.5,
)
FAST_FLAGS = ["--heartbeat-ms", "50", "--election-timeout-min-ms", "300"]
FAST_FLAGS += ["--election-timeout-max-ms", "600"]


def cluster_of(*ids: int) -> ClusterConfig:
    return ClusterConfig({i: NodeAddress(i, f"10.0.0.{i}:7000", f"10.0.0.{i}:8000") for i in ids})


class InProcess:
    """Three RaftNodes on an in-memory network, each watched from before it starts."""

    def __init__(self) -> None:
        self.net = InMemoryNetwork()
        self.nodes: dict[int, RaftNode] = {}
        self.logs: list[RaftLog] = []

    async def start(self, ids: tuple[int, ...], capacity: int | None = None) -> None:
        for node_id in ids:
            log = await RaftLog.open(f"/raft/{node_id}", MemoryDisk())
            self.logs.append(log)
            node = RaftNode(
                node_id, cluster_of(*ids), log, self.net.transport(node_id), FAST,
                random.Random(node_id),
            )  # fmt: skip
            if capacity is not None:
                node.feed = EventFeed(node, capacity)
            self.net.attach(node)
            self.nodes[node_id] = node
        for node in self.nodes.values():
            node.start()

    async def leader(self) -> RaftNode:
        async def found() -> RaftNode | None:
            leaders = [n for n in self.nodes.values() if n.is_leader]
            return leaders[0] if len(leaders) == 1 else None

        return await wait_until(found, 10, "one node leads")

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.stop()
        for log in self.logs:
            await log.close()


@pytest.fixture
async def world() -> AsyncIterator[InProcess]:
    made = InProcess()
    try:
        yield made
    finally:
        await made.close()


async def next_now(subscription: Subscription) -> raft_pb2.NodeEvent | None:
    try:
        return await asyncio.wait_for(subscription.next(), 0.01)
    except TimeoutError:
        return None


async def drain_all(subscription: Subscription) -> list[raft_pb2.NodeEvent]:
    events = []
    while (event := await next_now(subscription)) is not None:
        events.append(event)
    return events


def check_seq(events: list[raft_pb2.NodeEvent]) -> None:
    """seq counts from 1, one per event, a "dropped" event standing for all it counts."""
    assert events and events[0].seq == 1 and events[0].kind == "state"
    for before, event in zip(events, events[1:], strict=False):
        step = event.count if event.kind == "dropped" else 1
        assert event.seq == before.seq + step, (before, event)


async def test_every_role_change_and_commit_advance_is_reported_in_order(
    world: InProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Each event carries the node's state after it, so a role, term or commit index that changed
    without its own event would show up changed on some other kind of event. Commit events are
    also counted against the node's own narration of its commit advances."""
    caplog.set_level(logging.INFO, logger="raft")
    ids = (1, 2, 3)
    await world.start(ids)
    subscriptions = {i: world.nodes[i].feed.subscribe() for i in ids}
    received: dict[int, list[raft_pb2.NodeEvent]] = {i: [] for i in ids}
    leader = await world.leader()
    for i in range(20):
        await leader.propose_mapping(f"k{i}", str(i))
    # A new leader: the old one is cut off, the others elect one of them and commit on.
    world.net.isolate(leader.node_id)
    others = [world.nodes[i] for i in ids if i != leader.node_id]

    async def new_leader() -> RaftNode | None:
        leaders = [n for n in others if n.is_leader]
        return leaders[0] if leaders else None

    second = await wait_until(new_leader, 10, "another node leads")
    for i in range(5):
        await second.propose_mapping(f"after{i}", str(i))
    world.net.heal()

    async def caught_up() -> bool:
        for i in ids:
            received[i] += await drain_all(subscriptions[i])
        leaders = [n for n in world.nodes.values() if n.is_leader]
        return leaders == [second] and all(
            n.current_term == second.current_term and n.last_applied == second.commit_index
            for n in world.nodes.values()
        )

    await wait_until(caught_up, 10, "every node has applied the second leader's writes")
    for i in ids:
        received[i] += await drain_all(subscriptions[i])
    for node_id, events in received.items():
        node = world.nodes[node_id]
        check_seq(events)
        assert not [e for e in events if e.kind == "dropped"]
        for before, event in zip(events, events[1:], strict=False):
            if (event.role, event.term) != (before.role, before.term):
                assert event.kind == "role", (before, event)
            if event.commit_index != before.commit_index:
                assert event.kind == "commit" and event.index == event.commit_index, event
                assert event.commit_index > before.commit_index
            if event.leader_id != before.leader_id or event.HasField("leader_id") != before.HasField("leader_id"):  # fmt: skip
                assert event.kind in ("leader", "role"), (before, event)
        last = events[-1]
        assert (last.role, last.term, last.commit_index, last.applied_index) == (
            node.role,
            node.current_term,
            node.commit_index,
            node.last_applied,
        )
        narrated = [
            r.getMessage()
            for r in caplog.records
            if getattr(r, "node", None) == node_id
            and re.search(r"committed up to index|commit index now", r.getMessage())
        ]
        commits = [e for e in events if e.kind == "commit"]
        assert len(commits) == len(narrated)
        assert [e.text for e in commits] == [m.split("] ", 1)[1] for m in narrated]
        roles = [e.role for e in events if e.kind == "role"]
        assert node_id != leader.node_id or "leader" in roles
        if node_id == second.node_id:
            assert roles[-2:] == ["candidate", "leader"]
    # The first leader saw itself deposed: a role event to follower in the new term.
    deposed = [e for e in received[leader.node_id] if e.kind == "role" and e.role == "follower"]
    assert deposed and deposed[-1].term == second.current_term


async def test_a_subscriber_that_does_not_read_is_told_how_many_events_it_missed(
    world: InProcess,
) -> None:
    ids = (1, 2, 3)
    await world.start(ids, capacity=30)
    leader = await world.leader()
    idle = leader.feed.subscribe()
    for i in range(40):
        await leader.propose_mapping(f"k{i}", str(i))  # the node goes on committing
    assert leader.commit_index >= 41
    for node in world.nodes.values():
        await node.stop()  # no more heartbeats: what is queued now is all there will be
    events = await drain_all(idle)
    check_seq(events)
    dropped = [e for e in events if e.kind == "dropped"]
    assert len(dropped) == 1, [e.kind for e in events]
    marker = dropped[0]
    delivered = [e for e in events if e.kind != "dropped"]
    # Every number given out is either delivered or counted as dropped.
    assert marker.count == events[-1].seq - len(delivered) > 0
    assert marker.seq == delivered[29].seq + marker.count  # it came right after the full queue
    idle.close()
    assert not leader.feed.active


async def test_a_batch_of_client_writes_is_one_append_and_one_client_event(
    world: InProcess,
) -> None:
    """What a subscriber costs grows with the batches a node handles, not with the writes in them."""
    ids = (1, 2, 3)
    await world.start(ids)
    leader = await world.leader()
    subscription = leader.feed.subscribe()
    await drain_all(subscription)
    entries = [put_entry(f"k{i}", str(i)) for i in range(10)]
    outcomes = await leader.propose_entries(entries)
    assert [getattr(o, "revision", None) for o in outcomes] == [e.index for e in entries]
    await leader.propose_mapping("alone", "1")
    events = await drain_all(subscription)
    appends = [e for e in events if e.kind == "append"]
    clients = [e for e in events if e.kind == "client"]
    assert [(e.count, e.index) for e in appends] == [
        (10, entries[0].index),
        (1, entries[-1].index + 1),
    ]
    assert [(e.count, e.detail, e.ok) for e in clients] == [
        (10, "batch of 10 writes", True),
        (1, "mapping alone", True),
    ], [e.text for e in clients]
    assert (
        f"indexes {entries[0].index}-{entries[-1].index}: committed and applied" in clients[0].text
    )
    subscription.close()


async def test_a_node_nobody_watches_builds_no_events(world: InProcess) -> None:
    ids = (1, 2, 3)
    await world.start(ids)
    leader = await world.leader()
    built = 0
    real_build = EventFeed.build

    def counting(self: EventFeed, *args: object, **kwargs: object) -> raft_pb2.NodeEvent:
        nonlocal built
        built += 1
        return real_build(self, *args, **kwargs)  # type: ignore[arg-type]

    EventFeed.build = counting  # type: ignore[method-assign]
    try:
        for i in range(10):
            await leader.propose_mapping(f"k{i}", str(i))
        assert built == 0
        subscription = leader.feed.subscribe()
        await leader.propose_mapping("watched", "1")
        assert built > 1
        subscription.close()
    finally:
        EventFeed.build = real_build  # type: ignore[method-assign]


# ---- real processes ------------------------------------------------------------------------------


class EventsProcess:
    """`cluster_client.py events` running, its stdout lines collected as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    @classmethod
    async def start(cls, args: list[str]) -> EventsProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "cluster_client.py",
            *args,
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def until(self, pattern: str, timeout: float = 20) -> str:
        """Read lines until one matches `pattern`; that line."""
        stdout = self.process.stdout
        assert stdout is not None
        for line in self.lines:
            if re.search(pattern, line):
                return line
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} in {self.lines[-20:]}")
            raw = await asyncio.wait_for(stdout.readline(), remaining)
            assert raw, f"events ended on its own: {self.lines[-20:]}"
            line = raw.decode().rstrip("\n")
            self.lines.append(line)
            if re.search(pattern, line):
                return line

    async def interrupt(self) -> bytes:
        """Ctrl-C; returns stderr once it exited (with 0)."""
        self.process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(self.process.communicate(), 20)
        assert self.process.returncode == 0, stderr
        assert b"Traceback" not in stderr
        return stderr

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


LINE = r"^\d\d:\d\d:\d\d\.\d\d\d \[\d+ (follower|candidate|leader) t=\d+\] "


@pytest.mark.slow
async def test_events_shows_an_election_and_commits_of_a_five_node_cluster(
    tmp_path: Path,
) -> None:
    with LocalCluster(nodes=5, data_dir=tmp_path, extra_args=FAST_FLAGS) as cluster:
        cluster.start()
        leader = await cluster.wait_for_leader(20)
        where = ["--first-port", str(cluster.first_port), "--nodes", "5"]
        watcher = await EventsProcess.start([*where, "events"])
        try:
            for node_id in cluster.node_ids:
                await watcher.until(rf"\[{node_id} \w+ t=\d+\] \w+ in term \d+, leader {leader}")
            async with cluster.client() as client:
                new_leader = await client.transfer_leadership(0)
                await client.propose_mapping("color", "blue")
            assert new_leader != leader
            await watcher.until(rf"\[{new_leader} candidate t=\d+\] asking for votes")
            await watcher.until(rf"granted vote to {new_leader}")
            await watcher.until(rf"\[{new_leader} leader t=\d+\] won the election")
            await watcher.until(rf"\[{new_leader} leader t=\d+\] committed up to index")
            await watcher.until(r"\[\d+ follower t=\d+\] commit index now \d+")
            assert all(re.match(LINE, line) for line in watcher.lines), watcher.lines[:5]
            await watcher.interrupt()
        finally:
            await watcher.close()


@pytest.mark.slow
async def test_events_under_tls_as_json_from_one_node(tmp_path: Path) -> None:
    with LocalCluster(nodes=3, data_dir=tmp_path / "data", extra_args=FAST_FLAGS) as cluster:
        cluster.tls = ClusterTls.create(tmp_path / "certs")
        cluster.start()
        leader = await cluster.wait_for_leader(20)
        where = ["--first-port", str(cluster.first_port), "--nodes", "3"]
        watcher = await EventsProcess.start(
            [*where, *cluster.tls.client_args(), "events", "--node", str(leader), "--json"]
        )
        try:
            await watcher.until('"kind": "state"')
            async with cluster.client(tls=cluster.tls.client_config()) as client:
                await client.propose_mapping("color", "blue")
            await watcher.until(
                r'"kind": "client", "text": "a client\'s write \(command put color\)'
            )
            events = [json.loads(line) for line in watcher.lines]
            assert "commit" in [e["kind"] for e in events]
            assert events[0]["kind"] == "state" and events[0]["seq"] == 1
            assert {e["node_id"] for e in events} == {leader}
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            appended = [e for e in events if e["kind"] == "append" and "color" in e["detail"]]
            assert appended and "color" in appended[-1]["detail"]
            assert appended[-1]["entry_terms"] == [appended[-1]["term"]]
            assert all(e["role"] == "leader" and e["leader_id"] == leader for e in events)
            await watcher.interrupt()
        finally:
            await watcher.close()


async def test_events_refuses_a_malformed_request_and_reports_an_unknown_node(
    tmp_path: Path,
) -> None:
    """Garbage sent to Events is INVALID_ARGUMENT, the node serves on; a --node that names no
    node is one line and exit 2."""
    with LocalCluster(nodes=1, data_dir=tmp_path, extra_args=FAST_FLAGS) as cluster:
        cluster.start()
        await cluster.wait_for_leader(20)
        address = cluster.client_address(cluster.node_ids[0])
        async with grpc.aio.insecure_channel(address) as channel:
            raw = channel.unary_stream(
                "/Cluster/Events",
                request_serializer=lambda b: b,
                response_deserializer=raft_pb2.NodeEvents.FromString,
            )
            for garbage in (b"\xff\xff\xff", b"\x0a\x05abc", b"\x08"):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in raw(garbage, timeout=5):
                        pass
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            stream = raft_pb2_grpc.ClusterStub(channel).Events(raft_pb2.EventsRequest())
            first = (await stream.read()).events[0]
            assert first.kind == "state" and first.seq == 1 and first.role == "leader"
            stream.cancel()
        async with Client.from_endpoints([address]) as client:
            assert (await client.status()).leader_id == cluster.node_ids[0]
        where = ["--first-port", str(cluster.first_port), "--nodes", "1"]
        result = await asyncio.create_subprocess_exec(
            sys.executable,
            "cluster_client.py",
            *where,
            "events",
            "--node",
            "nowhere",
            cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(result.communicate(), 20)
        assert result.returncode == 2 and len(err.decode().splitlines()) == 1, err
