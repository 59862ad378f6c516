"""Snapshot files (thesis chapter 5): the state machine and the members at one log index, written
atomically with a checksum, the newest valid one loaded at start, and snapshots received in chunks.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

from disk import SYNC_EVERY_BYTES, Disk, DiskFile, replace_file
from membership import Membership
from state_machine import SnapshotState, StateDecoder

logger = logging.getLogger("raft.snapshot")

SNAPSHOT_MAGIC = b"RAFTSNP1"
SNAPSHOT_PREFIX = "snapshot-"
INCOMING_FILE = "snapshot.incoming"
# The newest snapshots kept: the previous one stays until the next is durable, so a damaged
# newest file still leaves an older valid one to start from.
KEEP_SNAPSHOTS = 2

# [magic][u64 last included index][u64 last included term][u64 members length][u64 state length]
# [members JSON][state bytes][u32 CRC32 of everything before it]
_HEADER = struct.Struct(">8sQQQQ")
_TRAILER = struct.Struct(">I")


class SnapshotError(Exception):
    """A snapshot file or transfer that cannot be used; the message names the file and why."""


# A damaged snapshot a node starts without is renamed to its name and this, for the operator to
# look at: out of the way of the newest two kept, and not reported again at the next start.
DAMAGED_SUFFIX = ".damaged"


@dataclass(frozen=True)
class DamagedSnapshot:
    """A snapshot file that did not verify at start: where it is, why, and where it would go."""

    path: str
    reason: str
    aside: str


@dataclass(frozen=True)
class SnapshotMeta:
    """Where a snapshot file is and what it covers; `checksum` is the CRC32 of the whole file."""

    index: int
    term: int
    size: int
    checksum: int
    path: str


@dataclass(frozen=True)
class LoadedSnapshot:
    """A snapshot read back and verified. `state` is the state machine's content: encoded (a view
    of the file's bytes, not a copy) or, for a snapshot decoded as it was received, decoded."""

    meta: SnapshotMeta
    members: Membership
    state: bytes | memoryview | SnapshotState

    @property
    def index(self) -> int:
        return self.meta.index

    @property
    def term(self) -> int:
        return self.meta.term


# Writes of a snapshot file go to the disk in pieces of about this size: each is checksummed on
# the way, and no copy of the whole file is ever made.
_WRITE_BYTES = 1 << 20


class _SnapshotFile:
    """A snapshot file's bytes as an iterable of pieces; once iterated, `checksum` is the CRC32
    of the whole file and `size` its length."""

    def __init__(
        self,
        index: int,
        term: int,
        members: Membership,
        state: Sequence[bytes],
    ) -> None:
        member_doc = members.to_json()
        state_len = sum(len(piece) for piece in state)
        self._header = (
            _HEADER.pack(SNAPSHOT_MAGIC, index, term, len(member_doc), state_len) + member_doc
        )
        self._state = state
        self.size = len(self._header) + state_len + _TRAILER.size
        self.checksum = 0

    def __iter__(self) -> Iterator[bytes]:
        crc = zlib.crc32(self._header)
        batch = [self._header]
        batched = len(self._header)
        for piece in self._state:
            if batched >= _WRITE_BYTES:
                yield _joined(batch)
                batch, batched = [], 0
            crc = zlib.crc32(piece, crc)
            batch.append(piece)
            batched += len(piece)
        trailer = _TRAILER.pack(crc)
        self.checksum = zlib.crc32(trailer, crc)
        batch.append(trailer)
        yield _joined(batch)


def _joined(batch: list[bytes]) -> bytes:
    return batch[0] if len(batch) == 1 else b"".join(batch)


def encode_snapshot(index: int, term: int, members: Membership, state: bytes) -> bytes:
    return b"".join(_SnapshotFile(index, term, members, [state]))


def decode_snapshot(path: str, data: bytes) -> LoadedSnapshot:
    """Verify and parse a snapshot file's bytes; SnapshotError says what is wrong."""
    if len(data) < _HEADER.size + _TRAILER.size:
        raise SnapshotError(f"{path}: damaged snapshot: only {len(data)} bytes")
    index, term, members_len = _read_header(path, data, len(data))
    view = memoryview(data)
    body = len(data) - _TRAILER.size
    crc = zlib.crc32(view[:body])
    if crc != _TRAILER.unpack_from(data, body)[0]:
        raise SnapshotError(f"{path}: damaged snapshot: checksum mismatch")
    start = _HEADER.size + members_len
    members = _read_members(path, view[_HEADER.size : start])
    meta = SnapshotMeta(index, term, len(data), zlib.crc32(view[body:], crc), path)
    return LoadedSnapshot(meta, members, view[start:body])


def _read_header(path: str, data: bytes | bytearray, total_size: int) -> tuple[int, int, int]:
    """A snapshot file's index, term and members length, from its first bytes."""
    magic, index, term, members_len, state_len = _HEADER.unpack_from(data, 0)
    if magic != SNAPSHOT_MAGIC:
        raise SnapshotError(f"{path}: damaged snapshot: bad magic {magic!r}")
    if _HEADER.size + members_len + state_len + _TRAILER.size != total_size:
        raise SnapshotError(
            f"{path}: damaged snapshot: {total_size} bytes, the header says "
            f"{_HEADER.size + members_len + state_len + _TRAILER.size}"
        )
    return index, term, members_len


def _read_members(path: str, data: memoryview) -> Membership:
    try:
        return Membership.from_json(data.tobytes())
    except (ValueError, TypeError, IndexError, AttributeError) as e:
        raise SnapshotError(f"{path}: damaged snapshot: members do not parse: {e}") from e


def _name(index: int, term: int) -> str:
    return f"{SNAPSHOT_PREFIX}{index:020d}-{term:020d}"


def _parse_name(name: str) -> tuple[int, int] | None:
    if not name.startswith(SNAPSHOT_PREFIX):
        return None
    parts = name[len(SNAPSHOT_PREFIX) :].split("-")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None  # a temporary file, or not ours
    return int(parts[0]), int(parts[1])


@dataclass
class Incoming:
    """A snapshot being received from a leader, chunk by chunk, into a temporary file. Its
    checksums are computed and its state decoded as the chunks arrive, so that once the last one
    is in, checking and installing it takes no long step."""

    index: int
    term: int
    total_size: int
    checksum: int
    file: DiskFile
    path: str
    offset: int = 0
    # The CRC32 of every byte received, and of the file's body (all but its trailer).
    crc: int = 0
    body_crc: int = 0
    # The header and the members, until all of them are in; then where the state starts.
    head: bytearray = field(default_factory=bytearray)
    state_start: int | None = None
    trailer: bytearray = field(default_factory=bytearray)
    decoder: StateDecoder = field(default_factory=StateDecoder)
    # Why the bytes received cannot be a snapshot, once that is known.
    problem: SnapshotError | ValueError | None = None
    unsynced: int = 0

    def same(self, index: int, term: int, total_size: int, checksum: int) -> bool:
        return (self.index, self.term, self.total_size, self.checksum) == (
            index,
            term,
            total_size,
            checksum,
        )

    async def write(self, data: bytes) -> None:
        """Append the next chunk to the file; checksum and decode it."""
        await self.file.write(data)
        self.unsynced += len(data)
        if self.unsynced >= SYNC_EVERY_BYTES:
            await self.file.fsync()
            self.unsynced = 0
        position, self.offset = self.offset, self.offset + len(data)
        self.crc = zlib.crc32(data, self.crc)
        split = max(0, self.total_size - _TRAILER.size - position)
        view = memoryview(data)
        self.body_crc = zlib.crc32(view[:split], self.body_crc)
        self.trailer += view[split:]
        if self.problem is None:
            try:
                self._take(view[:split])
            except (SnapshotError, ValueError) as e:
                self.problem = e

    def _take(self, body: memoryview) -> None:
        if self.state_start is None:
            # The header and the members are small: gathered whole, then what follows is state.
            self.head += body
            if len(self.head) < _HEADER.size:
                return
            _, _, members_len = _read_header(self.path, self.head, self.total_size)
            if len(self.head) < _HEADER.size + members_len:
                return
            self.state_start = _HEADER.size + members_len
            body = memoryview(bytes(self.head[self.state_start :]))
            del self.head[self.state_start :]
        self.decoder.feed(body)

    def received(self) -> LoadedSnapshot:
        """The snapshot, once every byte is in; SnapshotError if it is damaged or not the one
        announced, ValueError if its state does not decode."""
        path = self.path
        if self.offset != self.total_size or self.crc != self.checksum:
            raise SnapshotError(f"{path}: received snapshot fails its checksum")
        if isinstance(self.problem, SnapshotError):
            raise self.problem
        if self.problem is not None:
            raise ValueError(f"{path}: {self.problem}")
        if self.state_start is None or len(self.trailer) != _TRAILER.size:
            raise SnapshotError(f"{path}: damaged snapshot: only {self.total_size} bytes")
        if _TRAILER.unpack(self.trailer)[0] != self.body_crc:
            raise SnapshotError(f"{path}: damaged snapshot: checksum mismatch")
        index, term, _ = _read_header(path, self.head, self.total_size)
        if (index, term) != (self.index, self.term):
            raise SnapshotError(
                f"{path}: received snapshot covers index {index} term {term}, not "
                f"{self.index} term {self.term} as announced"
            )
        members = _read_members(path, memoryview(self.head)[_HEADER.size :])
        meta = SnapshotMeta(index, term, self.total_size, self.crc, path)
        return LoadedSnapshot(meta, members, self.decoder.result())


class SnapshotStore:
    """The snapshot files of one data directory, through the log's Disk (so crashes are modelled)."""

    def __init__(self, directory: str, disk: Disk) -> None:
        self.directory = directory
        self.disk = disk
        self.latest: SnapshotMeta | None = None
        # The newer snapshots `load_latest` passed over because they did not verify.
        self.damaged: list[DamagedSnapshot] = []
        # Files being sent to followers, by path (how many transfers): never pruned meanwhile, so a
        # transfer need not restart each time a newer snapshot is taken.
        self._pins: Counter[str] = Counter()

    def pin(self, meta: SnapshotMeta) -> None:
        self._pins[meta.path] += 1

    def unpin(self, meta: SnapshotMeta) -> None:
        self._pins[meta.path] -= 1
        if self._pins[meta.path] <= 0:
            del self._pins[meta.path]

    @classmethod
    async def open(cls, directory: str, disk: Disk) -> SnapshotStore:
        return cls(directory, disk)

    async def _names(self) -> list[tuple[int, int, str]]:
        found = []
        for name in await self.disk.listdir(self.directory):
            parsed = _parse_name(name)
            if parsed is not None:
                found.append((parsed[0], parsed[1], os.path.join(self.directory, name)))
        return sorted(found, reverse=True)

    async def any_snapshot(self) -> bool:
        """Whether the directory holds a snapshot file, valid or not."""
        return bool(await self._names())

    async def load_latest(self) -> LoadedSnapshot | None:
        """The newest snapshot that verifies. Each damaged newer one is listed in `damaged` (and
        left alone: whether starting without it is safe depends on the log, see RaftLog.open)."""
        self.damaged = []
        for index, term, path in await self._names():
            try:
                loaded = decode_snapshot(path, await self.disk.read_all(path))
                if (loaded.index, loaded.term) != (index, term):
                    raise SnapshotError(
                        f"{path}: damaged snapshot: it covers index {loaded.index} term "
                        f"{loaded.term}, not what its name says"
                    )
            except SnapshotError as e:
                reason = str(e).removeprefix(f"{path}: ")
                self.damaged.append(DamagedSnapshot(path, reason, path + DAMAGED_SUFFIX))
                continue
            self.latest = loaded.meta
            return loaded
        return None

    async def set_aside(self, damaged: DamagedSnapshot) -> None:
        """Rename a damaged snapshot out of the way, durably."""
        await self.disk.replace(damaged.path, damaged.aside)
        await self.disk.fsync_dir(self.directory)

    async def discard_incoming(self) -> None:
        """Remove a snapshot a crash interrupted while it was being received: it was never made
        current (it would have been renamed), and a leader sends it again if it is still needed."""
        path = os.path.join(self.directory, INCOMING_FILE)
        try:
            await self.disk.remove(path)
        except FileNotFoundError:
            return
        logger.warning(
            "%s: discarded a snapshot whose transfer a stop interrupted (it was never made "
            "current; the leader sends it again if it is still needed)",
            path,
        )

    async def write(
        self,
        index: int,
        term: int,
        members: Membership,
        state: bytes | Sequence[bytes],
    ) -> SnapshotMeta:
        """Write a snapshot atomically (temporary file, fsync, rename, directory fsync); then
        remove all but the newest KEEP_SNAPSHOTS. The state may come as a list of pieces, which
        are written one after another (a large state is never copied into one buffer)."""
        pieces = [state] if isinstance(state, bytes) else state
        path = os.path.join(self.directory, _name(index, term))
        snapshot = _SnapshotFile(index, term, members, pieces)
        await replace_file(self.disk, path, snapshot)
        meta = SnapshotMeta(index, term, snapshot.size, snapshot.checksum, path)
        if self.latest is None or index >= self.latest.index:
            self.latest = meta
        await self._prune()
        return meta

    async def _prune(self) -> None:
        names = await self._names()
        for _, _, path in names[KEEP_SNAPSHOTS:]:
            if (self.latest is not None and path == self.latest.path) or path in self._pins:
                continue
            try:
                await self.disk.remove(path)
            except FileNotFoundError:
                pass

    async def read_chunk(self, meta: SnapshotMeta, offset: int, size: int) -> bytes:
        """Bytes of a snapshot file; OSError if it has been removed since."""
        return await self.disk.read_range(meta.path, offset, size)

    # ---- receiving ---------------------------------------------------------------------------

    async def begin_incoming(
        self, index: int, term: int, total_size: int, checksum: int
    ) -> Incoming:
        path = os.path.join(self.directory, INCOMING_FILE)
        f = await self.disk.open_append(path, truncate=True)
        return Incoming(index, term, total_size, checksum, f, path)

    async def abort_incoming(self, incoming: Incoming) -> None:
        await incoming.file.close()

    async def check_incoming(self, incoming: Incoming) -> LoadedSnapshot:
        """Make a fully received snapshot durable in its temporary file and verify it (it was
        checksummed and decoded as it arrived); SnapshotError if it is damaged or not what the
        leader announced, ValueError if its state does not decode. It becomes this node's
        snapshot only by `keep_incoming`."""
        try:
            await incoming.file.fsync()
        finally:
            await incoming.file.close()
        return incoming.received()

    async def keep_incoming(self, loaded: LoadedSnapshot) -> LoadedSnapshot:
        """Make a snapshot that `check_incoming` verified this node's newest, durably."""
        incoming_path = os.path.join(self.directory, INCOMING_FILE)
        path = os.path.join(self.directory, _name(loaded.index, loaded.term))
        await self.disk.replace(incoming_path, path)
        await self.disk.fsync_dir(self.directory)
        meta = replace(loaded.meta, path=path)
        if self.latest is None or meta.index >= self.latest.index:
            self.latest = meta
        await self._prune()
        return replace(loaded, meta=meta)


__all__ = (
    "DAMAGED_SUFFIX",
    "DamagedSnapshot",
    "Incoming",
    "LoadedSnapshot",
    "SnapshotError",
    "SnapshotMeta",
    "SnapshotStore",
    "decode_snapshot",
    "encode_snapshot",
)
