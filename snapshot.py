"""Snapshot files (thesis chapter 5): the state machine and the members at one log index, written
atomically with a checksum, the newest valid one loaded at start, and snapshots received in chunks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import zlib
from collections import Counter
from dataclasses import dataclass

from log import Disk, DiskFile, RealDisk, replace_file

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
    """A snapshot read back and verified."""

    meta: SnapshotMeta
    members: dict[int, tuple[str, str]]
    state: bytes

    @property
    def index(self) -> int:
        return self.meta.index

    @property
    def term(self) -> int:
        return self.meta.term


def encode_snapshot(
    index: int, term: int, members: dict[int, tuple[str, str]], state: bytes
) -> bytes:
    member_doc = json.dumps({str(k): list(v) for k, v in sorted(members.items())}).encode()
    body = (
        _HEADER.pack(SNAPSHOT_MAGIC, index, term, len(member_doc), len(state)) + member_doc + state
    )
    return body + _TRAILER.pack(zlib.crc32(body))


def decode_snapshot(path: str, data: bytes) -> LoadedSnapshot:
    """Verify and parse a snapshot file's bytes; SnapshotError says what is wrong."""
    if len(data) < _HEADER.size + _TRAILER.size:
        raise SnapshotError(f"{path}: damaged snapshot: only {len(data)} bytes")
    magic, index, term, members_len, state_len = _HEADER.unpack_from(data, 0)
    if magic != SNAPSHOT_MAGIC:
        raise SnapshotError(f"{path}: damaged snapshot: bad magic {magic!r}")
    if _HEADER.size + members_len + state_len + _TRAILER.size != len(data):
        raise SnapshotError(
            f"{path}: damaged snapshot: {len(data)} bytes, the header says "
            f"{_HEADER.size + members_len + state_len + _TRAILER.size}"
        )
    (crc,) = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
    if crc != zlib.crc32(memoryview(data)[: len(data) - _TRAILER.size]):
        raise SnapshotError(f"{path}: damaged snapshot: checksum mismatch")
    start = _HEADER.size
    try:
        doc = json.loads(data[start : start + members_len])
        members = {int(k): (str(v[0]), str(v[1])) for k, v in doc.items()}
    except (ValueError, TypeError, IndexError, AttributeError) as e:
        raise SnapshotError(f"{path}: damaged snapshot: members do not parse: {e}") from e
    state = data[start + members_len : start + members_len + state_len]
    meta = SnapshotMeta(index, term, len(data), zlib.crc32(data), path)
    return LoadedSnapshot(meta, members, state)


def _encode_and_sum(
    index: int, term: int, members: dict[int, tuple[str, str]], state: bytes
) -> tuple[bytes, int]:
    data = encode_snapshot(index, term, members, state)
    return data, zlib.crc32(data)


def _check_and_decode(path: str, data: bytes, checksum: int) -> LoadedSnapshot:
    if zlib.crc32(data) != checksum:
        raise SnapshotError(f"{path}: received snapshot fails its checksum")
    return decode_snapshot(path, data)


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
    """A snapshot being received from a leader, chunk by chunk, into a temporary file."""

    index: int
    term: int
    total_size: int
    checksum: int
    file: DiskFile
    offset: int = 0

    def same(self, index: int, term: int, total_size: int, checksum: int) -> bool:
        return (self.index, self.term, self.total_size, self.checksum) == (
            index,
            term,
            total_size,
            checksum,
        )


class SnapshotStore:
    """The snapshot files of one data directory, through the log's Disk (so crashes are modelled)."""

    def __init__(self, directory: str, disk: Disk) -> None:
        self.directory = directory
        self.disk = disk
        self.latest: SnapshotMeta | None = None
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

    async def load_latest(self) -> LoadedSnapshot | None:
        """The newest snapshot that verifies; each damaged newer one is reported in one line."""
        for index, term, path in await self._names():
            try:
                loaded = decode_snapshot(path, await self.disk.read_all(path))
                if (loaded.index, loaded.term) != (index, term):
                    raise SnapshotError(
                        f"{path}: damaged snapshot: it covers index {loaded.index} term "
                        f"{loaded.term}, not what its name says"
                    )
            except SnapshotError as e:
                logger.error("%s; trying an older snapshot", e)
                continue
            self.latest = loaded.meta
            return loaded
        return None

    async def write(
        self, index: int, term: int, members: dict[int, tuple[str, str]], state: bytes
    ) -> SnapshotMeta:
        """Write a snapshot atomically (temporary file, fsync, rename, directory fsync); then
        remove all but the newest KEEP_SNAPSHOTS."""
        if isinstance(self.disk, RealDisk) and len(state) > 1 << 20:
            # Copying and checksumming a large state takes a while: not on the event loop.
            data, checksum = await asyncio.to_thread(_encode_and_sum, index, term, members, state)
        else:
            data, checksum = _encode_and_sum(index, term, members, state)
        path = os.path.join(self.directory, _name(index, term))
        await replace_file(self.disk, path, data)
        meta = SnapshotMeta(index, term, len(data), checksum, path)
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
        f = await self.disk.open_append(os.path.join(self.directory, INCOMING_FILE), truncate=True)
        return Incoming(index, term, total_size, checksum, f)

    async def abort_incoming(self, incoming: Incoming) -> None:
        await incoming.file.close()

    async def finish_incoming(self, incoming: Incoming) -> LoadedSnapshot:
        """Verify a fully received snapshot and make it this node's newest; SnapshotError if it
        does not match what the leader announced."""
        incoming_path = os.path.join(self.directory, INCOMING_FILE)
        try:
            await incoming.file.fsync()
        finally:
            await incoming.file.close()
        data = await self.disk.read_all(incoming_path)
        if isinstance(self.disk, RealDisk) and len(data) > 1 << 20:
            loaded = await asyncio.to_thread(
                _check_and_decode, incoming_path, data, incoming.checksum
            )
        else:
            loaded = _check_and_decode(incoming_path, data, incoming.checksum)
        if (loaded.index, loaded.term) != (incoming.index, incoming.term):
            raise SnapshotError(
                f"{incoming_path}: received snapshot covers index {loaded.index} term "
                f"{loaded.term}, not {incoming.index} term {incoming.term} as announced"
            )
        path = os.path.join(self.directory, _name(loaded.index, loaded.term))
        await self.disk.replace(incoming_path, path)
        await self.disk.fsync_dir(self.directory)
        meta = SnapshotMeta(loaded.index, loaded.term, len(data), loaded.meta.checksum, path)
        if self.latest is None or meta.index >= self.latest.index:
            self.latest = meta
        await self._prune()
        return LoadedSnapshot(meta, loaded.members, loaded.state)


__all__ = (
    "Incoming",
    "LoadedSnapshot",
    "SnapshotError",
    "SnapshotMeta",
    "SnapshotStore",
    "decode_snapshot",
    "encode_snapshot",
)
