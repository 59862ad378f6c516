"""Tests of log.py: what survives a restart or a crash, group commit, torn tails and corruption."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import zlib
from pathlib import Path

import pytest

from disk import DiskOp, MemoryDisk
from log import LOG_FILE, STATE_FILE, LogCorruptionError, RaftLog
from rpc.raft_pb2 import ENTRY_KIND_MAPPING, ENTRY_KIND_NOOP, LogEntry

DATA = "/sim/node1"
LOG_PATH = os.path.join(DATA, LOG_FILE)
STATE_PATH = os.path.join(DATA, STATE_FILE)
MAGIC_SIZE = 8
HEADER = struct.Struct(">II")
DEADLINE = 5.0


def make(index: int, term: int = 1, value: str | None = None) -> LogEntry:
    return LogEntry(term=term, index=index, key=f"k{index}", value=value or f"v{index}")


def make_range(first: int, last: int, term: int = 1) -> list[LogEntry]:
    return [make(i, term) for i in range(first, last + 1)]


def all_entries(log: RaftLog) -> list[LogEntry]:
    return [log.entry(i) for i in range(1, log.last_index + 1)]


def record_offsets(data: bytes) -> list[int]:
    """Where each record of a well-formed log file starts, read straight from the format."""
    offsets = []
    pos = MAGIC_SIZE
    while pos < len(data):
        offsets.append(pos)
        length, _ = HEADER.unpack_from(data, pos)
        pos += HEADER.size + length
    return offsets


def record(payload: bytes) -> bytes:
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def log_bytes(entries: list[LogEntry]) -> bytes:
    return b"RAFTLOG1" + b"".join(record(e.SerializeToString()) for e in entries)


def file_size(path: Path) -> int:
    return os.path.getsize(path)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


class Gate:
    """A MemoryDisk hook that holds the first operation matching kind and path until released."""

    def __init__(self, kind: str, path: str) -> None:
        self.kind = kind
        self.path = path
        self.reached = asyncio.Event()
        self.release = asyncio.Event()
        self.used = False

    async def __call__(self, op: DiskOp) -> None:
        if not self.used and op.kind == self.kind and op.path == self.path:
            self.used = True
            self.reached.set()
            await self.release.wait()

    async def wait_reached(self) -> None:
        await asyncio.wait_for(self.reached.wait(), DEADLINE)


async def write_log(path: Path, entries: list[LogEntry]) -> None:
    log = await RaftLog.open(path)
    log.append(entries)
    await log.close()


# ---------------------------------------------------------------------------------------------
# Round trips


async def test_round_trip_keeps_entries_and_hard_state(tmp_path: Path) -> None:
    entries = [
        LogEntry(term=1, index=1, kind=ENTRY_KIND_NOOP),
        LogEntry(term=1, index=2, key="colour", value="blue"),
        LogEntry(term=2, index=3, key="ключ", value="значение ✓", kind=ENTRY_KIND_MAPPING),
        LogEntry(term=4, index=4, key="big", value="x" * 100_000),
    ]
    log = await RaftLog.open(tmp_path / "n")
    log.append(entries[:2])
    log.append(entries[2:])
    log.set_hard_state(4, 12346)
    await log.flush()
    await log.close()

    reopened = await RaftLog.open(tmp_path / "n")
    assert all_entries(reopened) == entries
    assert (reopened.last_index, reopened.last_term) == (4, 4)
    assert [reopened.term_at(i) for i in range(5)] == [0, 1, 1, 2, 4]
    assert (reopened.current_term, reopened.voted_for) == (4, 12346)
    assert reopened.durable_index == 4
    await reopened.close()


async def test_a_fresh_node_starts_empty_and_creates_its_data_dir(tmp_path: Path) -> None:
    log = await RaftLog.open(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b" / LOG_FILE).exists()
    assert (log.current_term, log.voted_for) == (0, None)
    assert (log.last_index, log.last_term, log.durable_index, log.term_at(0)) == (0, 0, 0, 0)
    assert log.entries(1, 10, 1000) == []
    await log.close()


async def test_voted_for_survives_a_restart(tmp_path: Path) -> None:
    # Seed defect 1: the vote was never read back, so a restarted node could vote twice in a term.
    log = await RaftLog.open(tmp_path)
    log.set_hard_state(7, 12347)
    await log.flush()
    await log.close()
    log = await RaftLog.open(tmp_path)
    assert (log.current_term, log.voted_for) == (7, 12347)

    log.set_hard_state(8, None)
    await log.close()
    log = await RaftLog.open(tmp_path)
    assert (log.current_term, log.voted_for) == (8, None)
    await log.close()


# ---------------------------------------------------------------------------------------------
# Durability and group commit (MemoryDisk)


async def test_nothing_is_durable_before_flush_and_everything_is_after() -> None:
    disk = MemoryDisk()
    log = await RaftLog.open(DATA, disk)
    log.append(make_range(1, 3))
    log.set_hard_state(2, 3)
    assert log.durable_index == 0
    disk.crash()

    log = await RaftLog.open(DATA, disk)
    assert (log.last_index, log.current_term, log.voted_for) == (0, 0, None)
    log.append(make_range(1, 3))
    log.set_hard_state(2, 3)
    await log.flush()
    assert log.durable_index == 3
    disk.crash()

    log = await RaftLog.open(DATA, disk)
    assert all_entries(log) == make_range(1, 3)
    assert (log.current_term, log.voted_for) == (2, 3)


async def test_close_finishes_pending_writes_and_is_idempotent() -> None:
    disk = MemoryDisk()
    log = await RaftLog.open(DATA, disk)
    log.append(make_range(1, 2))
    log.set_hard_state(1, 1)
    await asyncio.gather(log.close(), log.close())
    await log.close()
    disk.crash()

    log = await RaftLog.open(DATA, disk)
    assert all_entries(log) == make_range(1, 2)
    assert (log.current_term, log.voted_for) == (1, 1)


async def test_concurrent_flushes_share_one_write_and_one_fsync() -> None:
    disk = MemoryDisk()
    log = await RaftLog.open(DATA, disk)
    before = len(disk.ops)
    callers = 50

    async def propose() -> None:
        log.append([make(log.last_index + 1)])
        await log.flush()

    await asyncio.gather(*(propose() for _ in range(callers)))
    ops = disk.ops[before:]
    fsyncs = [op for op in ops if op.kind == "fsync" and op.path == LOG_PATH]
    writes = [op for op in ops if op.kind == "write" and op.path == LOG_PATH]
    assert 1 <= len(fsyncs) <= 2
    assert len(writes) == len(fsyncs)
    assert log.durable_index == callers

    disk.crash()
    log = await RaftLog.open(DATA, disk)
    assert all_entries(log) == make_range(1, callers)


async def test_a_flush_waits_for_changes_made_while_an_earlier_write_runs() -> None:
    disk = MemoryDisk()
    log = await RaftLog.open(DATA, disk)
    gate = Gate("fsync", LOG_PATH)
    disk.before_op = gate
    log.append(make_range(1, 2))
    first = asyncio.create_task(log.flush())
    await gate.wait_reached()

    log.append(make_range(3, 4))
    log.set_hard_state(1, 2)
    second = asyncio.create_task(log.flush())
    gate.release.set()
    await asyncio.wait_for(asyncio.gather(first, second), DEADLINE)
    assert log.durable_index == 4

    disk.crash()
    log = await RaftLog.open(DATA, disk)
    assert all_entries(log) == make_range(1, 4)
    assert (log.current_term, log.voted_for) == (1, 2)


async def test_a_flush_with_nothing_new_does_no_io() -> None:
    disk = MemoryDisk()
    log = await RaftLog.open(DATA, disk)
    log.append(make_range(1, 2))
    log.set_hard_state(1, 1)
    await log.flush()
    before = list(disk.ops)
    log.set_hard_state(1, 1)  # unchanged
    await log.flush()
    await log.flush()
    assert disk.ops == before


async def test_flush_makes_log_durable_then_replaces_state_and_fsyncs_the_directory() -> None:
    disk = MemoryDisk()
    log = await RaftLog.open(DATA, disk)
    before = len(disk.ops)
    gate = Gate("fsync", LOG_PATH)
    disk.before_op = gate
    log.append(make_range(1, 3))
    log.set_hard_state(2, 5)
    flush = asyncio.create_task(log.flush())
    await gate.wait_reached()
    assert not flush.done()  # must not return while the log fsync is outstanding
    gate.release.set()
    await asyncio.wait_for(flush, DEADLINE)

    tmp = STATE_PATH + ".tmp"
    assert [(op.kind, op.path, op.dest) for op in disk.ops[before:]] == [
        ("write", LOG_PATH, None),
        ("fsync", LOG_PATH, None),
        ("create", tmp, None),
        ("write", tmp, None),
        ("fsync", tmp, None),
        ("replace", tmp, STATE_PATH),
        ("fsync_dir", DATA, None),
    ]


async def test_a_state_rename_is_lost_in_a_crash_before_the_directory_fsync() -> None:
    disk = MemoryDisk()
    log = await RaftLog.open(DATA, disk)
    log.set_hard_state(3, 1)
    await log.flush()
    gate = Gate("fsync_dir", DATA)
    disk.before_op = gate
    log.set_hard_state(4, 2)
    flush = asyncio.create_task(log.flush())
    await gate.wait_reached()
    disk.crash()
    gate.release.set()
    with pytest.raises(OSError):
        await asyncio.wait_for(flush, DEADLINE)

    log = await RaftLog.open(DATA, disk)
    assert (log.current_term, log.voted_for) == (3, 1)


async def test_a_cancelled_flush_caller_does_not_abandon_the_write() -> None:
    disk = MemoryDisk()
    log = await RaftLog.open(DATA, disk)
    gate = Gate("fsync", LOG_PATH)
    disk.before_op = gate
    log.append(make_range(1, 2))
    caller = asyncio.create_task(log.flush())
    await gate.wait_reached()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    gate.release.set()
    await asyncio.wait_for(log.flush(), DEADLINE)
    disk.crash()

    log = await RaftLog.open(DATA, disk)
    assert all_entries(log) == make_range(1, 2)


async def test_after_a_failed_write_every_flush_fails() -> None:
    disk = MemoryDisk()
    log = await RaftLog.open(DATA, disk)

    async def failing_fsync(op: DiskOp) -> None:
        if op.kind == "fsync":
            raise OSError(5, "Input/output error")

    disk.before_op = failing_fsync
    log.append(make_range(1, 1))
    with pytest.raises(OSError, match="Input/output error"):
        await log.flush()
    assert log.durable_index == 0
    disk.before_op = None
    log.append(make_range(2, 2))
    with pytest.raises(OSError, match="earlier write failed"):
        await log.flush()


# ---------------------------------------------------------------------------------------------
# Recovery: torn tails are repaired, anything else is an error


@pytest.mark.parametrize("damage", ["cut header", "cut payload", "bad checksum on last record"])
async def test_a_torn_tail_in_a_real_file_is_cut_off_and_reported(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    await write_log(tmp_path, make_range(1, 5))
    path = tmp_path / LOG_FILE
    data = path.read_bytes()
    last = record_offsets(data)[-1]
    if damage == "cut header":
        path.write_bytes(data[: last + 5])
    elif damage == "cut payload":
        path.write_bytes(data[:-3])
    else:
        flip_byte(path, len(data) - 1)
    dropped = path.stat().st_size - last

    with caplog.at_level(logging.WARNING, logger="raft.log"):
        log = await RaftLog.open(tmp_path)
    assert all_entries(log) == make_range(1, 4)
    assert file_size(path) == last
    warnings = [r.getMessage() for r in caplog.records if r.name == "raft.log"]
    assert len(warnings) == 1
    assert str(path) in warnings[0]
    assert f"offset {last}" in warnings[0]
    assert f"dropped {dropped} bytes" in warnings[0]

    log.append([make(5, term=2)])
    await log.close()
    log = await RaftLog.open(tmp_path)
    assert all_entries(log) == [*make_range(1, 4), make(5, term=2)]
    await log.close()


@pytest.mark.parametrize("zeros", [3, 8, 100])
async def test_zeros_after_the_last_record_are_a_torn_tail(tmp_path: Path, zeros: int) -> None:
    await write_log(tmp_path, make_range(1, 3))
    path = tmp_path / LOG_FILE
    good = path.read_bytes()
    path.write_bytes(good + bytes(zeros))
    log = await RaftLog.open(tmp_path)
    assert all_entries(log) == make_range(1, 3)
    assert path.read_bytes() == good
    await log.close()


async def test_zeros_followed_by_data_are_corruption(tmp_path: Path) -> None:
    await write_log(tmp_path, make_range(1, 3))
    path = tmp_path / LOG_FILE
    good = path.read_bytes()
    path.write_bytes(good + bytes(16) + record(make(4).SerializeToString()))
    with pytest.raises(LogCorruptionError, match=f"offset {len(good)}"):
        await RaftLog.open(tmp_path)


@pytest.mark.parametrize("content", [b"", b"RAF"])
async def test_a_log_file_cut_while_being_created_starts_afresh(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / LOG_FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="raft.log"):
        log = await RaftLog.open(tmp_path)
    assert log.last_index == 0
    assert (tmp_path / LOG_FILE).read_bytes() == b"RAFTLOG1"
    assert len([r for r in caplog.records if r.name == "raft.log"]) == (1 if content else 0)
    log.append([make(1)])
    await log.close()
    log = await RaftLog.open(tmp_path)
    assert all_entries(log) == [make(1)]
    await log.close()


@pytest.mark.parametrize("kept", ["part of a header", "a whole record and part of the next"])
async def test_a_torn_write_left_by_a_crash_is_cut_off(
    kept: str, caplog: pytest.LogCaptureFixture
) -> None:
    disk = MemoryDisk()
    log = await RaftLog.open(DATA, disk)
    log.append(make_range(1, 3))
    await log.flush()
    gate = Gate("fsync", LOG_PATH)
    disk.before_op = gate
    log.append(make_range(4, 5))
    flush = asyncio.create_task(log.flush())
    await gate.wait_reached()

    first_record = HEADER.size + make(4).ByteSize()
    torn = 5 if kept == "part of a header" else first_record + HEADER.size + 2
    disk.crash(torn_bytes=torn)
    gate.release.set()
    with pytest.raises(OSError):
        await asyncio.wait_for(flush, DEADLINE)

    with caplog.at_level(logging.WARNING, logger="raft.log"):
        log = await RaftLog.open(DATA, disk)
    expected = make_range(1, 3) if kept == "part of a header" else make_range(1, 4)
    assert all_entries(log) == expected
    assert any("torn tail" in r.getMessage() for r in caplog.records if r.name == "raft.log")
    assert disk.file_bytes(LOG_PATH) == log_bytes(expected)  # the torn bytes are gone


@pytest.mark.parametrize(
    "damage", ["flipped payload byte", "flipped checksum byte", "length field too short"]
)
async def test_a_bad_record_in_the_middle_is_corruption(tmp_path: Path, damage: str) -> None:
    await write_log(tmp_path, make_range(1, 5))
    path = tmp_path / LOG_FILE
    second = record_offsets(path.read_bytes())[1]
    if damage == "flipped payload byte":
        flip_byte(path, second + HEADER.size + 1)
    elif damage == "flipped checksum byte":
        flip_byte(path, second + 5)
    else:
        data = bytearray(path.read_bytes())
        (length,) = struct.unpack_from(">I", data, second)
        struct.pack_into(">I", data, second, length - 1)
        path.write_bytes(bytes(data))
    damaged = path.read_bytes()

    with pytest.raises(LogCorruptionError) as caught:
        await RaftLog.open(tmp_path)
    assert str(path) in str(caught.value)
    assert f"offset {second}" in str(caught.value)
    assert path.read_bytes() == damaged  # never "repaired" by dropping good entries


@pytest.mark.parametrize(
    ("content", "offset"),
    [
        (b"NOTALOG!" + record(make(1).SerializeToString()), 0),
        (
            b"RAFTLOG1" + record(make(1).SerializeToString()) + record(make(3).SerializeToString()),
            None,
        ),
        (b"RAFTLOG1" + record(b"\xff\xff\xff\xff") + record(make(2).SerializeToString()), 8),
        (b"RAFTLOG1" + record(make(2).SerializeToString()), 8),
    ],
    ids=["wrong magic", "index gap", "payload does not parse", "first index is not 1"],
)
async def test_a_log_file_that_is_not_a_valid_log_is_corruption(
    tmp_path: Path, content: bytes, offset: int | None
) -> None:
    (tmp_path / LOG_FILE).write_bytes(content)
    if offset is None:
        offset = record_offsets(content)[1]
    with pytest.raises(LogCorruptionError) as caught:
        await RaftLog.open(tmp_path)
    assert str(tmp_path / LOG_FILE) in str(caught.value)
    assert f"offset {offset}" in str(caught.value)


@pytest.mark.parametrize("damage", ["flipped byte", "cut short", "not a state file"])
async def test_a_corrupt_state_file_is_an_error(tmp_path: Path, damage: str) -> None:
    log = await RaftLog.open(tmp_path)
    log.set_hard_state(3, 2)
    await log.close()
    path = tmp_path / STATE_FILE
    if damage == "flipped byte":
        flip_byte(path, 10)
    elif damage == "cut short":
        path.write_bytes(path.read_bytes()[:-1])
    else:
        path.write_bytes(b"[3, 2]\n")
    with pytest.raises(LogCorruptionError) as caught:
        await RaftLog.open(tmp_path)
    assert str(path) in str(caught.value)
    assert "offset" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Truncation


async def test_truncate_from_shrinks_the_file_and_the_entries_stay_gone(tmp_path: Path) -> None:
    path = tmp_path / LOG_FILE
    log = await RaftLog.open(tmp_path)
    log.append(make_range(1, 5))
    await log.flush()
    size_after_5 = file_size(path)
    log.append(make_range(6, 10))
    await log.flush()
    assert file_size(path) > size_after_5

    log.truncate_from(6)
    assert (log.last_index, log.durable_index) == (5, 5)
    await log.flush()
    assert file_size(path) == size_after_5
    await log.close()

    log = await RaftLog.open(tmp_path)
    assert all_entries(log) == make_range(1, 5)
    log.append(make_range(6, 7, term=2))
    await log.close()
    log = await RaftLog.open(tmp_path)
    assert all_entries(log) == [*make_range(1, 5), *make_range(6, 7, term=2)]
    await log.close()


async def test_truncations_mixed_with_unflushed_appends_land_correctly(tmp_path: Path) -> None:
    log = await RaftLog.open(tmp_path)
    log.append(make_range(1, 4))
    await log.flush()
    log.append(make_range(5, 8))  # not yet written
    log.truncate_from(7)  # cuts only what is pending
    log.truncate_from(3)  # cuts what is on disk too
    log.append(make_range(3, 5, term=2))
    log.truncate_from(5)
    log.append([make(5, term=3)])
    assert log.durable_index == 2
    await log.close()

    expected = [*make_range(1, 2), *make_range(3, 4, term=2), make(5, term=3)]
    log = await RaftLog.open(tmp_path)
    assert all_entries(log) == expected
    assert (tmp_path / LOG_FILE).read_bytes() == log_bytes(expected)  # no stale bytes left
    await log.close()


# Found by the simulation (seeds 2332, 4065, 4219, 7099, 9699): the truncation and the new records
# once shared one fsync, so a crash could keep the new record written over the cut and the old
# records after it, a log whose terms go 1, 2, 1.
@pytest.mark.parametrize("crash_at_fsync", [1, 2])
async def test_a_crash_while_replacing_a_suffix_never_keeps_old_records_behind_the_new(
    crash_at_fsync: int,
) -> None:
    disk = MemoryDisk()
    log = await RaftLog.open(DATA, disk)
    log.append(make_range(1, 3))
    await log.flush()
    log.truncate_from(2)
    replacement = make(2, term=2)
    assert replacement.ByteSize() == make(2).ByteSize()  # it lands exactly over the old record
    log.append([replacement])
    reached, release = asyncio.Event(), asyncio.Event()
    fsyncs = 0

    async def hold_nth_fsync(op: DiskOp) -> None:
        nonlocal fsyncs
        if op.kind == "fsync" and op.path == LOG_PATH:
            fsyncs += 1
            if fsyncs == crash_at_fsync:
                reached.set()
                await release.wait()

    disk.before_op = hold_nth_fsync
    flush = asyncio.create_task(log.flush())
    await asyncio.wait_for(reached.wait(), DEADLINE)
    # Crash there, keeping every byte of the last write that was not fsync'd.
    disk.crash(torn_bytes=10_000)
    release.set()
    with pytest.raises(OSError):
        await asyncio.wait_for(flush, DEADLINE)
    disk.before_op = None

    log = await RaftLog.open(DATA, disk)
    # Nothing was acknowledged, so the old log, the cut or the new log are all sound; a mix is not.
    assert all_entries(log) in (make_range(1, 3), [make(1)], [make(1), replacement])
    await log.close()


async def test_durable_index_follows_flushes_and_truncations() -> None:
    disk = MemoryDisk()
    log = await RaftLog.open(DATA, disk)
    log.append(make_range(1, 3))
    assert log.durable_index == 0
    await log.flush()
    assert log.durable_index == 3
    log.append(make_range(4, 5))
    assert log.durable_index == 3
    log.truncate_from(2)
    assert log.durable_index == 1
    log.append(make_range(2, 2, term=2))
    await log.flush()
    assert log.durable_index == 2


async def test_a_truncation_during_a_write_lowers_durable_index() -> None:
    disk = MemoryDisk()
    log = await RaftLog.open(DATA, disk)
    gate = Gate("fsync", LOG_PATH)
    disk.before_op = gate
    log.append(make_range(1, 4))
    flush = asyncio.create_task(log.flush())
    await gate.wait_reached()
    log.truncate_from(3)
    log.append([make(3, term=2)])
    gate.release.set()
    await asyncio.wait_for(flush, DEADLINE)
    assert log.durable_index == 2  # entry 3 now is the new, unwritten one
    await log.flush()
    assert log.durable_index == 3
    disk.crash()
    log = await RaftLog.open(DATA, disk)
    assert all_entries(log) == [*make_range(1, 2), make(3, term=2)]


# ---------------------------------------------------------------------------------------------
# Reading and argument errors


async def test_entries_respects_count_and_byte_limits() -> None:
    log = await RaftLog.open(DATA, MemoryDisk())
    entries = [make(i, value="x" * 100) for i in range(1, 11)]
    log.append(entries)
    size = entries[0].ByteSize()
    assert log.entries(1, 100, 10**9) == entries
    assert log.entries(3, 4, 10**9) == entries[2:6]
    assert log.entries(2, 100, 3 * size) == entries[1:4]
    assert log.entries(2, 100, 3 * size - 1) == entries[1:3]
    assert log.entries(5, 100, 1) == [entries[4]]  # always at least one
    assert log.entries(10, 100, 10**9) == [entries[9]]
    assert log.entries(11, 100, 10**9) == []


async def test_the_entries_kept_behind_a_snapshot_are_bounded_by_count_and_by_bytes() -> None:
    """Every entry the log holds is also in memory: large entries are kept in smaller numbers."""
    log = await RaftLog.open(DATA, MemoryDisk())
    log.append([make(i, value="x" * 100) for i in range(1, 21)])
    record = log.bytes_after(19)  # one entry's record
    assert log.keep_point(20, 5, 10**9) == 15
    assert log.keep_point(20, 50, 10**9) == 0  # everything it holds
    assert log.keep_point(20, 50, 3 * record) == 17
    assert log.keep_point(20, 50, 3 * record - 1) == 18
    assert log.keep_point(20, 2, 3 * record) == 18  # the tighter limit wins
    assert log.keep_point(12, 50, 2 * record) == 10  # behind a point inside the log
    assert log.keep_point(20, 0, 10**9) == log.keep_point(20, 50, 0) == 20
    # A snapshot written while a leader's later one replaced the whole log: nothing is kept
    # behind the older point (it is behind the log's start), and asking does not fail.
    log.reset(40, 2)
    assert log.bytes_after(20) == 0
    assert log.keep_point(20, 5, 10**9) <= log.base_index


async def test_argument_errors_leave_the_log_unchanged() -> None:
    log = await RaftLog.open(DATA, MemoryDisk())
    log.append(make_range(1, 3))
    with pytest.raises(ValueError):
        log.append([make(5)])  # gap
    with pytest.raises(ValueError):
        log.append([make(3)])  # overlaps
    with pytest.raises(ValueError):
        log.append([make(4), make(6)])  # not consecutive
    with pytest.raises(ValueError):
        log.append([make(4, term=0)])
    for bad in (0, 5):
        with pytest.raises(ValueError):
            log.truncate_from(bad)
    for bad in (-1, 4):
        with pytest.raises(IndexError):
            log.term_at(bad)
    for bad in (0, 4):
        with pytest.raises(IndexError):
            log.entry(bad)
    assert all_entries(log) == make_range(1, 3)
    log.truncate_from(4)  # nothing to drop, allowed
    assert log.last_index == 3


async def test_hard_state_rejects_going_back_in_term_or_changing_a_vote() -> None:
    log = await RaftLog.open(DATA, MemoryDisk())
    log.set_hard_state(5, None)
    log.set_hard_state(5, 2)
    with pytest.raises(ValueError):
        log.set_hard_state(4, None)
    with pytest.raises(ValueError):
        log.set_hard_state(5, 3)  # a second vote in one term (section 5.2)
    with pytest.raises(ValueError):
        log.set_hard_state(6, 0)
    assert (log.current_term, log.voted_for) == (5, 2)
    log.set_hard_state(6, 3)
    assert (log.current_term, log.voted_for) == (6, 3)


async def test_changes_after_close_are_refused() -> None:
    log = await RaftLog.open(DATA, MemoryDisk())
    await log.close()
    with pytest.raises(RuntimeError):
        log.append([make(1)])
    with pytest.raises(RuntimeError):
        log.set_hard_state(1, 1)
