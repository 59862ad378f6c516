"""Tests of snapshots and log compaction on disk: the snapshot file (atomic under crashes at every
disk operation, damage detected, the older one used), the compacted log (reopened, crash-safe) and
the state machine's snapshot (sessions included, so exactly-once survives a restart)."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Awaitable, Callable

import pytest

from log import (
    COMPACT_LOG_MAGIC,
    LOG_FILE,
    DiskOp,
    LogCorruptionError,
    MemoryDisk,
    RaftLog,
    _scan_log,
)
from rpc import raft_pb2
from rpc.raft_pb2 import LogEntry
from snapshot import SnapshotStore, decode_snapshot, encode_snapshot
from state_machine import CasResult, KeyValueStateMachine

DATA = "/data/node1"
MEMBERS = {1: ("h1:7000", "h1:8000"), 2: ("h2:7000", "h2:8000"), 3: ("h3:7000", "h3:8000")}


def make(index: int, term: int = 1) -> LogEntry:
    return LogEntry(term=term, index=index, key=f"k{index}", value=f"v{index}")


def state_at(index: int) -> bytes:
    """The encoded state of a store whose entries 1..index each set k<i> = v<i>."""
    machine = KeyValueStateMachine()
    for i in range(1, index + 1):
        machine.apply(
            LogEntry(term=1, index=i, kind=raft_pb2.ENTRY_KIND_MAPPING, key=f"k{i}", value=f"v{i}")
        )
    return machine.snapshot().encode()


def snapshot_paths(disk: MemoryDisk) -> list[str]:
    return sorted(
        n
        for n in disk._names
        if os.path.basename(n).startswith("snapshot-") and not n.endswith(".tmp")
    )


async def crash_at_each_op(
    prepare: Callable[[MemoryDisk], Awaitable[None]],
    act: Callable[[MemoryDisk], Awaitable[None]],
    check: Callable[[MemoryDisk, int], Awaitable[None]],
) -> int:
    """Run `act` on a disk `prepare`d, once per disk operation it performs, each time losing power
    just before that operation (and once after the last); `check` the disk that remains. Returns
    how many operations `act` performs."""
    base = MemoryDisk()
    await prepare(base)
    counting = copy.deepcopy(base)
    start = len(counting.ops)
    await act(counting)
    total = len(counting.ops) - start
    for k in range(total + 1):
        disk = copy.deepcopy(base)
        disk.before_op = _crash_before(disk, k)
        try:
            await act(disk)
        except OSError:
            pass
        disk.before_op = None
        if k == total:
            disk.crash()
        await check(disk, k)
    return total


def _crash_before(disk: MemoryDisk, k: int) -> Callable[[DiskOp], Awaitable[None]]:
    seen = 0

    async def before(op: DiskOp) -> None:
        nonlocal seen
        if seen == k:
            disk.crash()
        seen += 1

    return before


# ---- the snapshot file --------------------------------------------------------------------------


def test_a_snapshot_file_carries_index_term_members_and_state_under_a_checksum() -> None:
    data = encode_snapshot(7, 3, MEMBERS, b"state")
    loaded = decode_snapshot("f", data)
    assert (loaded.index, loaded.term, loaded.members, loaded.state) == (7, 3, MEMBERS, b"state")
    for offset in (0, 10, len(data) // 2, len(data) - 1):
        damaged = bytearray(data)
        damaged[offset] ^= 0x01
        with pytest.raises(Exception, match="f: damaged snapshot"):
            decode_snapshot("f", bytes(damaged))
    with pytest.raises(Exception, match="damaged snapshot"):
        decode_snapshot("f", data[:-1])


async def test_a_crash_at_any_point_of_writing_a_snapshot_leaves_the_old_one_or_the_new() -> None:
    """Written atomically: temporary file, fsync, rename, directory fsync."""

    async def prepare(disk: MemoryDisk) -> None:
        await disk.makedirs(DATA)
        await SnapshotStore(DATA, disk).write(5, 1, MEMBERS, state_at(5))

    async def act(disk: MemoryDisk) -> None:
        await SnapshotStore(DATA, disk).write(9, 2, MEMBERS, state_at(9))

    found: set[int] = set()

    async def check(disk: MemoryDisk, k: int) -> None:
        loaded = await SnapshotStore(DATA, disk).load_latest()
        assert loaded is not None, f"no snapshot after a crash before operation {k}"
        assert loaded.index in (5, 9)
        machine = KeyValueStateMachine()
        machine.restore(loaded.state)
        assert machine.last_applied == loaded.index
        assert machine.get(f"k{loaded.index}") == f"v{loaded.index}"
        found.add(loaded.index)

    operations = await crash_at_each_op(prepare, act, check)
    assert operations >= 5
    assert found == {5, 9}


async def test_a_damaged_newest_snapshot_is_reported_in_one_line_and_the_older_one_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    disk = MemoryDisk()
    await disk.makedirs(DATA)
    store = SnapshotStore(DATA, disk)
    await store.write(5, 1, MEMBERS, state_at(5))
    newest = await store.write(9, 2, MEMBERS, state_at(9))
    disk._names[newest.path].data[20] ^= 0xFF
    with caplog.at_level(logging.ERROR):
        loaded = await SnapshotStore(DATA, disk).load_latest()
    assert loaded is not None and loaded.index == 5
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and newest.path in errors[0] and "damaged" in errors[0]
    assert "\n" not in errors[0]


async def test_only_the_newest_two_snapshots_are_kept() -> None:
    disk = MemoryDisk()
    await disk.makedirs(DATA)
    store = SnapshotStore(DATA, disk)
    for index in (3, 6, 9, 12):
        await store.write(index, 1, MEMBERS, state_at(index))
    assert [os.path.basename(p).split("-")[1].lstrip("0") for p in snapshot_paths(disk)] == [
        "9",
        "12",
    ]


# ---- the compacted log --------------------------------------------------------------------------


async def compacted_log(disk: MemoryDisk, last: int, snapshot: int, upto: int) -> RaftLog:
    log = await RaftLog.open(DATA, disk)
    log.append([make(i, 1 + i // 10) for i in range(1, last + 1)])
    await log.flush()
    assert log.snapshots is not None
    await log.snapshots.write(snapshot, log.term_at(snapshot), MEMBERS, state_at(snapshot))
    log.compact(upto)
    await log.flush()
    return log


async def test_a_compacted_log_reopens_from_its_snapshot_with_the_entries_after_it() -> None:
    disk = MemoryDisk()
    log = await compacted_log(disk, last=50, snapshot=30, upto=25)
    assert (log.base_index, log.base_term, log.last_index) == (25, 3, 50)
    await log.close()
    disk.crash()
    reopened = await RaftLog.open(DATA, disk)
    assert (reopened.base_index, reopened.base_term, reopened.last_index) == (25, 3, 50)
    assert [reopened.entry(i).value for i in (26, 50)] == ["v26", "v50"]
    assert reopened.term_at(25) == 3
    with pytest.raises(IndexError):
        reopened.term_at(24)
    with pytest.raises(IndexError):
        reopened.entry(25)
    assert reopened.restored is not None and reopened.restored.index == 30
    # The discarded prefix really left the disk.
    data = disk.file_bytes(os.path.join(DATA, LOG_FILE))
    assert data.startswith(COMPACT_LOG_MAGIC)
    assert [e.index for e in _scan_log(LOG_FILE, data).entries] == list(range(26, 51))
    # The log goes on from there: append, truncate, entries by absolute index.
    reopened.truncate_from(40)
    reopened.append([make(40, 9)])
    await reopened.flush()
    assert [e.index for e in reopened.entries(26, 100, 1 << 20)] == list(range(26, 41))
    with pytest.raises(ValueError):
        reopened.truncate_from(25)
    await reopened.close()


async def test_a_crash_at_any_point_of_compaction_reopens_to_the_same_entries() -> None:
    async def prepare(disk: MemoryDisk) -> None:
        log = await RaftLog.open(DATA, disk)
        log.append([make(i) for i in range(1, 31)])
        await log.flush()
        assert log.snapshots is not None
        await log.snapshots.write(20, 1, MEMBERS, state_at(20))
        await log.close()

    async def act(disk: MemoryDisk) -> None:
        log = await RaftLog.open(DATA, disk)
        try:
            log.compact(20)
            await log.flush()
        finally:
            try:
                await log.close()
            except OSError:
                pass

    bases: set[int] = set()

    async def check(disk: MemoryDisk, k: int) -> None:
        log = await RaftLog.open(DATA, disk)
        bases.add(log.base_index)
        assert log.last_index == 30
        assert [log.entry(i).value for i in range(21, 31)] == [f"v{i}" for i in range(21, 31)]
        assert log.restored is not None and log.restored.index == 20
        await log.close()

    assert await crash_at_each_op(prepare, act, check) >= 4
    assert bases == {0, 20}


async def test_a_log_compacted_past_every_valid_snapshot_refuses_to_open() -> None:
    disk = MemoryDisk()
    log = await compacted_log(disk, last=40, snapshot=30, upto=30)
    await log.close()
    for path in snapshot_paths(disk):
        disk._names[path].data[-1] ^= 0xFF
    with pytest.raises(LogCorruptionError, match="no valid snapshot covers"):
        await RaftLog.open(DATA, disk)


async def test_a_snapshot_ahead_of_the_log_resets_the_log_on_open() -> None:
    """A follower that installed a snapshot and crashed before its log was replaced (or whose log
    diverges from it) starts from the snapshot with an empty log after it (Figure 13, rule 7)."""
    disk = MemoryDisk()
    log = await RaftLog.open(DATA, disk)
    log.append([make(i) for i in range(1, 6)])
    await log.flush()
    assert log.snapshots is not None
    await log.snapshots.write(12, 2, MEMBERS, state_at(12))
    await log.close()
    reopened = await RaftLog.open(DATA, disk)
    assert (reopened.base_index, reopened.base_term, reopened.last_index) == (12, 2, 12)
    assert reopened.last_term == 2
    await reopened.close()


# ---- the state machine's snapshot ---------------------------------------------------------------


def command_entry(index: int, command: raft_pb2.Command) -> LogEntry:
    return LogEntry(term=1, index=index, kind=raft_pb2.ENTRY_KIND_COMMAND, command=command)


def test_sessions_survive_a_snapshot_so_a_retried_write_gets_its_original_reply() -> None:
    machine = KeyValueStateMachine()
    register = raft_pb2.Command(register_client=raft_pb2.RegisterClientRequest())
    client = machine.apply(command_entry(1, register))
    assert client == 1
    session = raft_pb2.Session(client_id=1, sequence=1, first_outstanding=1)
    cas = raft_pb2.Command(
        compare_and_swap=raft_pb2.CompareAndSwapRequest(key="lock", new_value="me", session=session)
    )
    assert machine.apply(command_entry(2, cas)) == CasResult(True, "me")
    delete_session = raft_pb2.Session(client_id=1, sequence=2, first_outstanding=1)
    delete = raft_pb2.Command(delete=raft_pb2.DeleteRequest(key="nope", session=delete_session))
    assert machine.apply(command_entry(3, delete)) is False

    restored = KeyValueStateMachine()
    restored.restore(machine.snapshot().encode())
    assert restored.last_applied == 3 and restored.get("lock") == "me"
    assert restored.log_time_ms == machine.log_time_ms
    # Retries of both, after the key changed: the original replies, nothing applied again.
    put = raft_pb2.Command(
        put=raft_pb2.MappingBatch(
            mappings=[raft_pb2.Mapping(key="lock", value="other")],
            session=raft_pb2.Session(client_id=1, sequence=3, first_outstanding=1),
        )
    )
    restored.apply(command_entry(4, put))
    assert restored.apply(command_entry(5, cas)) == CasResult(True, "me")
    assert restored.apply(command_entry(6, delete)) is False
    assert restored.get("lock") == "other"


def test_a_state_that_does_not_decode_is_refused() -> None:
    with pytest.raises(ValueError, match="does not decode"):
        KeyValueStateMachine().restore(b"{not json")
