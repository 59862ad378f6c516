"""Tests of snapshots and log compaction on disk: the snapshot file (atomic under crashes at every
disk operation, damage detected, the older one used), the compacted log (reopened, crash-safe) and
the state machine's snapshot (sessions included, so exactly-once survives a restart)."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from cluster_config import NodeAddress
from disk import DiskOp, MemoryDisk
from log import COMPACT_LOG_MAGIC, LOG_FILE, LogCorruptionError, RaftLog, _scan_log
from membership import Membership
from rpc import raft_pb2
from rpc.raft_pb2 import LogEntry
from snapshot import (
    DAMAGED_SUFFIX,
    Incoming,
    SnapshotError,
    SnapshotStore,
    decode_snapshot,
    encode_snapshot,
)
from state_machine import CasResult, DeleteResult, KeyValueStateMachine, StateDecoder

DATA = "/data/node1"
MEMBERS = Membership(
    {i: NodeAddress(i, f"h{i}:7000", f"h{i}:8000") for i in (1, 2, 3)},
    {4: NodeAddress(4, "h4:7000", "h4:8000")},
    frozenset({5}),
)


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


async def test_a_damaged_newest_snapshot_is_set_aside_in_one_line_and_the_older_one_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Safe because the log still holds every entry after the older snapshot."""
    disk = MemoryDisk()
    log = await RaftLog.open(DATA, disk)
    log.append([make(i) for i in range(1, 13)])
    await log.flush()
    assert log.snapshots is not None
    await log.snapshots.write(5, 1, MEMBERS, state_at(5))
    newest = await log.snapshots.write(9, 1, MEMBERS, state_at(9))
    await log.close()
    disk._names[newest.path].data[20] ^= 0xFF
    with caplog.at_level(logging.WARNING):
        reopened = await RaftLog.open(DATA, disk)
    assert reopened.restored is not None and reopened.restored.index == 5
    assert reopened.last_index == 12
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and newest.path in lines[0] and "damaged" in lines[0], lines
    assert "\n" not in lines[0] and "up to index 5" in lines[0]
    # Set aside: not counted among the newest two kept, and not reported again.
    assert snapshot_paths(disk) == [reopened.restored.meta.path, newest.path + DAMAGED_SUFFIX]
    await reopened.close()
    caplog.clear()
    await (await RaftLog.open(DATA, disk)).close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


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
    (path,) = snapshot_paths(disk)
    disk._names[path].data[-1] ^= 0xFF
    before = {name: disk.file_bytes(name) for name in disk._names}
    with pytest.raises(LogCorruptionError, match="no valid snapshot covers") as caught:
        await RaftLog.open(DATA, disk)
    # The damaged snapshot is named, and nothing was changed or set aside.
    assert str(caught.value).startswith(f"{path}: damaged snapshot: checksum mismatch")
    assert {name: disk.file_bytes(name) for name in disk._names} == before


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
    assert machine.apply(command_entry(2, cas)) == CasResult(True, "me", 2, 2)
    delete_session = raft_pb2.Session(client_id=1, sequence=2, first_outstanding=1)
    delete = raft_pb2.Command(delete=raft_pb2.DeleteRequest(key="nope", session=delete_session))
    assert machine.apply(command_entry(3, delete)) == DeleteResult(False, 3)

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
    assert restored.apply(command_entry(5, cas)) == CasResult(True, "me", 2, 2)
    assert restored.apply(command_entry(6, delete)) == DeleteResult(False, 3)
    assert restored.get("lock") == "other"


def test_a_state_that_does_not_decode_is_refused() -> None:
    with pytest.raises(ValueError, match="does not decode"):
        KeyValueStateMachine().restore(b"{not json")


def busy_machine() -> KeyValueStateMachine:
    """A state machine with sessions holding every kind of reply, deletions, and more keys and
    bytes than one piece of the encoding holds."""
    machine = KeyValueStateMachine()
    register = raft_pb2.Command(register_client=raft_pb2.RegisterClientRequest())
    index = 0

    def apply(command: raft_pb2.Command) -> object:
        nonlocal index
        index += 1
        return machine.apply(command_entry(index, command))

    clients = [apply(register) for _ in range(3)]
    for n, client in enumerate(clients):
        assert isinstance(client, int)
        session = raft_pb2.Session(client_id=client, sequence=1, first_outstanding=1)
        apply(
            raft_pb2.Command(
                compare_and_swap=raft_pb2.CompareAndSwapRequest(
                    key=f"lock-{n}", new_value="me", session=session
                )
            )
        )
        session = raft_pb2.Session(client_id=client, sequence=2, first_outstanding=1)
        apply(raft_pb2.Command(delete=raft_pb2.DeleteRequest(key="nope", session=session)))
    mappings = [raft_pb2.Mapping(key="big", value="é" * 700_000)]
    mappings += [raft_pb2.Mapping(key=f"key-{i:05d}", value=f"value-{i}") for i in range(2500)]
    apply(raft_pb2.Command(put=raft_pb2.MappingBatch(mappings=mappings)))
    for i in range(0, 2500, 7):
        apply(raft_pb2.Command(delete=raft_pb2.DeleteRequest(key=f"key-{i:05d}")))
    return machine


def test_a_state_decoded_as_its_bytes_arrive_is_the_state_encoded() -> None:
    machine = busy_machine()
    encoded = machine.snapshot().encode()
    decoder = StateDecoder()
    # Chunks that end anywhere: inside a line, a key, a multi-byte character.
    for start in range(0, len(encoded), 65_537):
        decoder.feed(memoryview(encoded)[start : start + 65_537])
    restored = KeyValueStateMachine()
    restored.install(decoder.result())
    assert restored.snapshot() == machine.snapshot()
    assert list(restored.snapshot().data) == list(machine.snapshot().data)
    # Sessions came back whole: a retry gets its original reply without applying again.
    session = raft_pb2.Session(client_id=1, sequence=1, first_outstanding=1)
    retry = raft_pb2.Command(
        compare_and_swap=raft_pb2.CompareAndSwapRequest(
            key="lock-0", new_value="x", session=session
        )
    )
    assert restored.apply(command_entry(restored.last_applied + 1, retry)) == CasResult(
        True, "me", 4, 4
    )


def test_a_state_encoded_as_one_json_document_still_restores() -> None:
    """The encoding of snapshots taken before states were written line by line."""
    machine = busy_machine()
    state = machine.snapshot()
    lines = [json.loads(line) for line in state.encode().splitlines()]
    document = lines[0]
    for line in lines[1:]:
        document["sessions"] += line.get("sessions", [])
        document["data"].update(line.get("data", {}))
        document.setdefault("meta", {}).update(line.get("meta", {}))
        document.setdefault("window", []).extend(line.get("window", []))
    restored = KeyValueStateMachine()
    restored.restore(json.dumps(document).encode())
    assert restored.snapshot() == state


@pytest.mark.parametrize(
    "encoded",
    [
        b"",
        b'{"last_applied":1,"log_time_ms":0,"sessions":[]}\n',
        b'{"last_applied":1,"log_time_ms":0,"sessions":[],"data":[]}\n',
        b'{"last_applied":1,"log_time_ms":0,"sessions":[],"data":{}}\n[1]\n',
        b'{"last_applied":1,"log_time_ms":0,"sessions":[],"data":{}}\n{"data":{"k":"v"}\n',
        b'{"last_applied":1,"log_time_ms":0,"sessions":[],"data":{}}\n{"sessions":[[1]]}\n',
    ],
)
def test_a_state_with_a_damaged_line_is_refused(encoded: bytes) -> None:
    with pytest.raises(ValueError, match="does not decode"):
        KeyValueStateMachine().restore(encoded)


async def test_a_snapshot_written_from_pieces_is_one_file_under_one_checksum() -> None:
    """A large state is handed over in pieces and written in pieces, never joined into one
    buffer; the file is byte for byte the one its whole state would make."""
    pieces = list(busy_machine().snapshot().encode_pieces())
    disk = MemoryDisk()
    await disk.makedirs(DATA)
    start = len(disk.ops)
    meta = await SnapshotStore(DATA, disk).write(9, 2, MEMBERS, pieces)
    whole = encode_snapshot(9, 2, MEMBERS, b"".join(pieces))
    assert disk.file_bytes(meta.path) == whole
    assert (meta.size, meta.checksum) == (len(whole), zlib.crc32(whole))
    assert sum(1 for op in disk.ops[start:] if op.kind == "write") > 1
    loaded = await SnapshotStore(DATA, disk).load_latest()
    assert loaded is not None and (loaded.index, loaded.term, loaded.meta) == (9, 2, meta)


async def test_a_received_snapshot_becomes_the_newest_only_once_verified_and_kept() -> None:
    """Received in chunks of any size (the header split too), checksummed and decoded as they
    arrive; a damaged one is refused, a good one is kept only when asked to."""
    disk = MemoryDisk()
    await disk.makedirs(DATA)
    store = SnapshotStore(DATA, disk)
    older = await store.write(5, 1, MEMBERS, state_at(5))
    machine = busy_machine()
    data = encode_snapshot(9, 2, MEMBERS, machine.snapshot().encode())

    async def receive(data: bytes, announced: bytes = data) -> Incoming:
        incoming = await store.begin_incoming(9, 2, len(announced), zlib.crc32(announced))
        for size in (3, 30, 100, 1 << 16, 1 << 20, 1 << 20, 1 << 20, 1 << 20):
            await incoming.write(data[incoming.offset : incoming.offset + size])
        assert incoming.offset == len(data)
        return incoming

    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x01
    with pytest.raises(SnapshotError, match="fails its checksum"):
        await store.check_incoming(await receive(bytes(damaged)))
    # Damaged at its leader, so the checksum the leader announced matches it.
    with pytest.raises(SnapshotError, match="damaged snapshot: checksum mismatch"):
        await store.check_incoming(await receive(bytes(damaged), bytes(damaged)))
    loaded = await store.check_incoming(await receive(data))
    assert loaded.state == machine.snapshot() and loaded.members == MEMBERS
    # Verified, not yet kept: a restart would still start from the older snapshot.
    assert store.latest == older
    assert (await SnapshotStore(DATA, disk).load_latest()).index == 5  # type: ignore[union-attr]
    kept = await store.keep_incoming(loaded)
    disk.crash()
    assert store.latest == kept.meta and kept.meta.checksum == zlib.crc32(data)
    reopened = await SnapshotStore(DATA, disk).load_latest()
    assert reopened is not None and (reopened.index, reopened.meta) == (9, kept.meta)
    assert reopened.state == machine.snapshot().encode()


async def test_a_compaction_keeping_megabytes_of_entries_reopens_to_the_same_entries(
    tmp_path: Path,
) -> None:
    """On the real disk, with entries appended while the compacted file is being written."""
    data_dir = tmp_path / "node"
    log = await RaftLog.open(data_dir)
    value = "v" * 100_000
    log.append([LogEntry(term=1, index=i, key=f"k{i}", value=value) for i in range(1, 61)])
    await log.flush()
    assert log.snapshots is not None
    await log.snapshots.write(20, 1, MEMBERS, state_at(20))
    log.compact(20)
    rewriting = asyncio.create_task(log.flush())
    await asyncio.sleep(0)
    log.append([make(61)])
    log.truncate_from(61)
    log.append([make(61, 2), make(62, 2)])
    await rewriting
    await log.flush()
    # Cut where the rewritten file holds an entry kept: the cut lands on that entry's record.
    log.truncate_from(50)
    log.append([make(50, 3)])
    await log.flush()
    await log.close()
    reopened = await RaftLog.open(data_dir)
    assert (reopened.base_index, reopened.last_index) == (20, 50)
    assert [reopened.entry(i).value for i in range(21, 50)] == [value] * 29
    assert [reopened.term_at(i) for i in (49, 50)] == [1, 3]
    await reopened.close()
