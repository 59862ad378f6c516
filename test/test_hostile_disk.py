"""A disk that fills up or fails an fsync, in process: the log never counts what it could not make
durable, a full disk is retried until space returns, a leader on a full disk lets another lead, and
a failed fsync stops the log for good."""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import AsyncIterator

import pytest

import log as log_module
from cluster_config import ClusterConfig, NodeAddress
from disk import DiskFullError, DiskOp, FsyncError, MemoryDisk
from log import RaftLog
from raft_node import OverloadedError, RaftNode, Timing
from rpc import raft_pb2
from test.memory_transport import InMemoryNetwork

DEADLINE = 10.0
FAST = Timing(
    heartbeat_interval=0.05,
    election_timeout_min=0.3,
    election_timeout_max=0.6,
    proposal_timeout=2.0,
)


class FillableDisk(MemoryDisk):
    """A MemoryDisk whose writes fail with ENOSPC while `full`, and whose fsyncs fail with EIO
    while `fsync_fails`."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False
        self.fsync_fails = False
        self.refused = 0

        async def gate(op: DiskOp) -> None:
            if self.full and op.kind in ("write", "create"):
                self.refused += 1
                raise OSError(errno.ENOSPC, "No space left on device")
            if self.fsync_fails and op.kind == "fsync":
                raise FsyncError(errno.EIO, "fsync failed: Input/output error")

        self.before_op = gate


def entry(index: int, term: int = 1) -> raft_pb2.LogEntry:
    return raft_pb2.LogEntry(term=term, index=index, key=f"k{index}", value="v")


async def wait_for(check: object, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not check():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


async def test_a_full_disk_counts_nothing_durable_and_recovers_when_space_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first wait after a full disk is 50 ms; a whole second here, so that "the next flush
    # comes within the backoff" holds on a loaded machine too.
    monkeypatch.setattr(log_module, "DISK_FULL_RETRY_MIN", 1.0)
    disk = FillableDisk()
    log = await RaftLog.open("/data/1", disk)
    log.append([entry(1)])
    await log.flush()
    disk.full = True
    log.append([entry(2), entry(3)])
    log.set_hard_state(2, 1)
    with pytest.raises(DiskFullError, match="disk full"):
        await log.flush()
    assert log.durable_index == 1 and log.disk_full
    # Within the backoff the disk is not tried again.
    tried = disk.refused
    with pytest.raises(DiskFullError):
        await log.flush()
    assert disk.refused == tried

    disk.full = False

    async def flushed() -> bool:
        try:
            await log.flush()
        except DiskFullError:
            return False
        return True

    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not await flushed():
        assert loop.time() < deadline, "the log never wrote again once the disk had space"
        await asyncio.sleep(0.02)
    assert log.durable_index == 3 and not log.disk_full
    disk.crash()
    reopened = await RaftLog.open("/data/1", disk)
    assert reopened.last_index == 3 and reopened.current_term == 2 and reopened.voted_for == 1
    await reopened.close()


async def test_a_failed_fsync_breaks_the_log_for_good() -> None:
    disk = FillableDisk()
    log = await RaftLog.open("/data/1", disk)
    disk.fsync_fails = True
    log.append([entry(1)])
    with pytest.raises(FsyncError):
        await log.flush()
    assert log.broken.is_set() and log.durable_index == 0
    # Even once fsync works again, the page cache may have lost the data: no retry trusts it.
    disk.fsync_fails = False
    with pytest.raises(OSError, match="cannot be made durable"):
        await log.flush()


@pytest.fixture
async def three() -> AsyncIterator[tuple[dict[int, RaftNode], dict[int, FillableDisk]]]:
    cluster = ClusterConfig(
        {i: NodeAddress(i, f"10.0.0.{i}:8000", f"10.0.0.{i}:9000") for i in (1, 2, 3)}
    )
    net = InMemoryNetwork()
    disks = {i: FillableDisk() for i in (1, 2, 3)}
    nodes: dict[int, RaftNode] = {}
    try:
        for i in (1, 2, 3):
            log = await RaftLog.open(f"/data/{i}", disks[i])
            nodes[i] = RaftNode(i, cluster, log, net.transport(i), FAST, random.Random(i))
            net.attach(nodes[i])
            nodes[i].start()
        yield nodes, disks
    finally:
        for node in nodes.values():
            await node.stop()
        for node in nodes.values():
            disks[node.node_id].full = False
            try:
                await node.log.close()
            except OSError:
                pass


def leader_of(nodes: dict[int, RaftNode]) -> RaftNode | None:
    leaders = [n for n in nodes.values() if n.role == "leader"]
    return leaders[0] if len(leaders) == 1 else None


async def test_a_leader_whose_disk_fills_refuses_writes_steps_down_and_catches_up_later(
    three: tuple[dict[int, RaftNode], dict[int, FillableDisk]],
) -> None:
    nodes, disks = three
    await wait_for(lambda: leader_of(nodes) is not None, "a leader is elected")
    first = leader_of(nodes)
    assert first is not None
    await first.propose_mapping("a", "1")

    disks[first.node_id].full = True
    # The write that finds the disk full still commits once durable on both followers (a
    # majority without the leader, which counts itself only for entries on its own disk).
    await first.propose_mapping("b", "2")
    assert first.log.durable_index < first.log.last_index
    with pytest.raises(OverloadedError, match=f"disk full on node {first.node_id}"):
        await first.propose_mapping("c", "3")

    # It lets a node that can write lead, and does not take leadership back while full.
    await wait_for(
        lambda: (n := leader_of(nodes)) is not None and n is not first, "another node leads"
    )
    second = leader_of(nodes)
    assert second is not None
    await second.propose_mapping("d", "4")
    assert first.role != "leader"

    disks[first.node_id].full = False
    await second.propose_mapping("e", "5")
    await wait_for(
        lambda: first.get_value("e") == "5" and not first.log.disk_full,
        "the node whose disk was full has caught up",
    )
    assert [first.get_value(k) for k in "abcd"] == ["1", "2", None, "4"]
