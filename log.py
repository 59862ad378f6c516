"""The durable Raft log and hard state (current_term, voted_for), fsync'd with group commit.

All filesystem access goes through the small `Disk` protocol: `RealDisk` (aiofiles) or `MemoryDisk`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiofiles
import aiofiles.os
from aiofiles.threadpool.binary import AsyncBufferedIOBase

from rpc.raft_pb2 import LogEntry

logger = logging.getLogger("raft.log")

LOG_FILE = "log"
STATE_FILE = "state"
LOG_MAGIC = b"RAFTLOG1"
STATE_MAGIC = b"RAFTSTA1"

# A log record is [u32 payload length][u32 CRC32 of payload][payload], big-endian.
_RECORD_HEADER = struct.Struct(">II")
# The state file is [magic][u64 current_term][u64 voted_for, 0 for none][u32 CRC32 of all before it].
_STATE_BODY = struct.Struct(">8sQQ")
_STATE_CRC = struct.Struct(">I")
_STATE_SIZE = _STATE_BODY.size + _STATE_CRC.size


class LogCorruptionError(Exception):
    """A log or state file that cannot be trusted; the message names the file, the offset and why."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# The disk interface


class DiskFile(Protocol):
    """A file opened for appending."""

    async def write(self, data: bytes | bytearray) -> None: ...
    async def fsync(self) -> None: ...
    async def truncate(self, size: int) -> None: ...
    async def close(self) -> None: ...


class Disk(Protocol):
    """The filesystem operations the log needs, and nothing more."""

    async def exists(self, path: str) -> bool: ...
    async def makedirs(self, path: str) -> None: ...
    async def read_all(self, path: str) -> bytes: ...
    async def open_append(self, path: str, *, truncate: bool = False) -> DiskFile:
        """Open for appending, creating the file if missing (and emptying it if truncate)."""
        ...

    async def replace(self, src: str, dst: str) -> None: ...
    async def fsync_dir(self, path: str) -> None: ...


def _fsync_dir_sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_fsync = aiofiles.os.wrap(os.fsync)
_fsync_dir = aiofiles.os.wrap(_fsync_dir_sync)


class _RealFile:
    def __init__(self, f: AsyncBufferedIOBase) -> None:
        self._f = f

    async def write(self, data: bytes | bytearray) -> None:
        await self._f.write(data)
        await self._f.flush()

    async def fsync(self) -> None:
        await _fsync(self._f.fileno())

    async def truncate(self, size: int) -> None:
        await self._f.truncate(size)

    async def close(self) -> None:
        await self._f.close()


class RealDisk:
    """The real filesystem, through aiofiles (each call runs in the event loop's executor)."""

    async def exists(self, path: str) -> bool:
        return await aiofiles.os.path.exists(path)

    async def makedirs(self, path: str) -> None:
        await aiofiles.os.makedirs(path, exist_ok=True)

    async def read_all(self, path: str) -> bytes:
        async with aiofiles.open(path, "rb") as f:
            return await f.read()

    async def open_append(self, path: str, *, truncate: bool = False) -> DiskFile:
        # Always "ab": O_APPEND makes every write land at the end, also after a truncate.
        f = await aiofiles.open(path, "ab")
        if truncate:
            await f.truncate(0)
        return _RealFile(f)

    async def replace(self, src: str, dst: str) -> None:
        await aiofiles.os.replace(src, dst)

    async def fsync_dir(self, path: str) -> None:
        await _fsync_dir(path)


@dataclass(frozen=True)
class DiskOp:
    """One operation a MemoryDisk performed: kind is create, open, write, fsync, truncate, replace
    or fsync_dir; size is the bytes written or the new length; dest is where a replace moved to."""

    kind: str
    path: str
    size: int | None = None
    dest: str | None = None


class _Inode:
    def __init__(self) -> None:
        self.data = bytearray()
        self.synced = b""


class _MemoryFile:
    def __init__(self, disk: MemoryDisk, path: str, inode: _Inode) -> None:
        self._disk = disk
        self._path = path
        self._inode = inode
        self._generation = disk.generation
        self._closed = False

    async def _begin(self, op: DiskOp) -> None:
        self._check()
        await self._disk._before(op)
        self._check()

    def _check(self) -> None:
        if self._closed:
            raise ValueError(f"{self._path}: I/O on a closed file")
        if self._generation != self._disk.generation:
            raise OSError(f"{self._path}: file handle from before a crash")

    async def write(self, data: bytes | bytearray) -> None:
        op = DiskOp("write", self._path, len(data))
        await self._begin(op)
        offset = len(self._inode.data)
        self._inode.data += data
        self._disk._last_unsynced = (self._inode, offset, bytes(data))
        self._disk.ops.append(op)

    async def fsync(self) -> None:
        op = DiskOp("fsync", self._path)
        await self._begin(op)
        self._inode.synced = bytes(self._inode.data)
        last = self._disk._last_unsynced
        if last is not None and last[0] is self._inode:
            self._disk._last_unsynced = None
        self._disk.ops.append(op)

    async def truncate(self, size: int) -> None:
        op = DiskOp("truncate", self._path, size)
        await self._begin(op)
        self._truncate_now(size)
        self._disk.ops.append(op)

    def _truncate_now(self, size: int) -> None:
        data = self._inode.data
        if size < len(data):
            del data[size:]
        else:
            data.extend(bytes(size - len(data)))
        last = self._disk._last_unsynced
        if last is not None and last[0] is self._inode:
            self._disk._last_unsynced = None

    async def close(self) -> None:
        self._closed = True


class MemoryDisk:
    """An in-memory filesystem that loses exactly what a real one may lose in a crash.

    Written bytes survive `crash()` only once their file is fsync'd; a new name (a created file, a
    rename) survives only once its directory is fsync'd. Directories themselves are durable at once.
    `ops` records every operation in order. `before_op`, if set, is awaited before each operation is
    performed, so a test or a simulation can pause the disk at a chosen point. No threads, no clock.
    """

    def __init__(self) -> None:
        self.ops: list[DiskOp] = []
        self.before_op: Callable[[DiskOp], Awaitable[None]] | None = None
        self.generation = 0
        self._dirs: set[str] = {os.sep}
        self._names: dict[str, _Inode] = {}
        self._durable_names: dict[str, _Inode] = {}
        self._last_unsynced: tuple[_Inode, int, bytes] | None = None

    async def _before(self, op: DiskOp) -> None:
        # Real I/O suspends the caller; so does this, so that concurrent tasks interleave.
        generation = self.generation
        await asyncio.sleep(0)
        if self.before_op is not None:
            await self.before_op(op)
        if generation != self.generation:
            raise OSError(f"{op.path}: the disk crashed during this {op.kind}")

    @staticmethod
    def _norm(path: str) -> str:
        return os.path.normpath(os.path.abspath(path))

    def _parent_must_exist(self, path: str) -> None:
        if os.path.dirname(path) not in self._dirs:
            raise FileNotFoundError(f"no such directory: {os.path.dirname(path)}")

    async def exists(self, path: str) -> bool:
        path = self._norm(path)
        return path in self._names or path in self._dirs

    async def makedirs(self, path: str) -> None:
        path = self._norm(path)
        while path not in self._dirs:
            if path in self._names:
                raise FileExistsError(f"a file is in the way: {path}")
            self._dirs.add(path)
            path = os.path.dirname(path)

    async def read_all(self, path: str) -> bytes:
        path = self._norm(path)
        if path not in self._names:
            raise FileNotFoundError(f"no such file: {path}")
        return bytes(self._names[path].data)

    async def open_append(self, path: str, *, truncate: bool = False) -> DiskFile:
        path = self._norm(path)
        self._parent_must_exist(path)
        await self._before(DiskOp("open" if path in self._names else "create", path))
        self._parent_must_exist(path)
        inode = self._names.get(path)
        if inode is None:
            inode = self._names[path] = _Inode()
            self.ops.append(DiskOp("create", path))
        else:
            self.ops.append(DiskOp("open", path))
        f = _MemoryFile(self, path, inode)
        if truncate and inode.data:
            f._truncate_now(0)
            self.ops.append(DiskOp("truncate", path, 0))
        return f

    async def replace(self, src: str, dst: str) -> None:
        src, dst = self._norm(src), self._norm(dst)
        op = DiskOp("replace", src, dest=dst)
        await self._before(op)
        if src not in self._names:
            raise FileNotFoundError(f"no such file: {src}")
        self._parent_must_exist(dst)
        self._names[dst] = self._names.pop(src)
        self.ops.append(op)

    async def fsync_dir(self, path: str) -> None:
        path = self._norm(path)
        op = DiskOp("fsync_dir", path)
        await self._before(op)
        if path not in self._dirs:
            raise FileNotFoundError(f"no such directory: {path}")
        for name in [n for n in self._durable_names if os.path.dirname(n) == path]:
            del self._durable_names[name]
        for name, inode in self._names.items():
            if os.path.dirname(name) == path:
                self._durable_names[name] = inode
        self.ops.append(op)

    def crash(self, torn_bytes: int = 0) -> None:
        """Lose everything not made durable; open handles become unusable.

        With torn_bytes, the first torn_bytes of the last unsynced write survive (a torn record),
        provided that write began within the file's durable content.
        """
        inodes = {id(i): i for i in [*self._names.values(), *self._durable_names.values()]}
        for inode in inodes.values():
            inode.data = bytearray(inode.synced)
        if torn_bytes > 0 and self._last_unsynced is not None:
            inode, offset, data = self._last_unsynced
            piece = data[:torn_bytes]
            if offset <= len(inode.data):
                inode.data[offset : offset + len(piece)] = piece
                inode.synced = bytes(inode.data)
        self._names = dict(self._durable_names)
        self._last_unsynced = None
        self.generation += 1

    def file_bytes(self, path: str) -> bytes:
        """The current (not necessarily durable) content of a file, for tests and tools."""
        return bytes(self._names[self._norm(path)].data)


# ---------------------------------------------------------------------------------------------
# The log


def _encode_state(current_term: int, voted_for: int | None) -> bytes:
    body = _STATE_BODY.pack(STATE_MAGIC, current_term, voted_for or 0)
    return body + _STATE_CRC.pack(zlib.crc32(body))


def _decode_state(path: str, data: bytes) -> tuple[int, int | None]:
    if len(data) != _STATE_SIZE:
        raise LogCorruptionError(
            path, min(len(data), _STATE_SIZE), f"state file is {len(data)} bytes, not {_STATE_SIZE}"
        )
    body = data[: _STATE_BODY.size]
    magic, term, voted = _STATE_BODY.unpack(body)
    if magic != STATE_MAGIC:
        raise LogCorruptionError(path, 0, f"bad magic {magic!r}, expected {STATE_MAGIC!r}")
    (crc,) = _STATE_CRC.unpack_from(data, _STATE_BODY.size)
    if crc != zlib.crc32(body):
        raise LogCorruptionError(path, _STATE_BODY.size, "checksum mismatch")
    return term, (voted or None)


@dataclass
class _Scan:
    entries: list[LogEntry]
    offsets: list[int]
    end: int


def _scan_log(path: str, data: bytes) -> _Scan:
    """Parse a log file's bytes; `end` is where the good records stop (a torn tail follows)."""
    if data[: len(LOG_MAGIC)] != LOG_MAGIC:
        raise LogCorruptionError(path, 0, f"bad magic {data[:8]!r}, expected {LOG_MAGIC!r}")
    entries: list[LogEntry] = []
    offsets: list[int] = []
    pos = len(LOG_MAGIC)
    size = len(data)
    header = _RECORD_HEADER.size
    while pos < size:
        if size - pos < header:
            break
        length, crc = _RECORD_HEADER.unpack_from(data, pos)
        if length == 0 and data.count(0, pos) == size - pos:
            # No record is empty, so zeros to EOF are space a crash left unwritten (some
            # filesystems extend a file before its data lands): a torn tail, not a record.
            break
        end = pos + header + length
        if end > size:
            break
        payload = data[pos + header : end]
        if zlib.crc32(payload) != crc:
            if end == size:
                break
            raise LogCorruptionError(
                path, pos, f"checksum mismatch in a {length}-byte record followed by more data"
            )
        try:
            entry = LogEntry.FromString(payload)
        except Exception as e:  # protobuf's DecodeError, whose module ships no type stubs
            raise LogCorruptionError(path, pos, f"record does not parse as a LogEntry: {e}") from e
        expected = len(entries) + 1
        if entry.index != expected:
            raise LogCorruptionError(
                path, pos, f"entry has index {entry.index}, expected {expected}"
            )
        entries.append(entry)
        offsets.append(pos)
        pos = end
    return _Scan(entries, offsets, pos)


class RaftLog:
    """The log entries and hard state of one node (Raft paper, Figure 2, "persistent state").

    Changes apply in memory at once; `flush()` makes them durable. The log keeps the LogEntry
    objects it is given and hands out the same objects: callers must not mutate them.
    """

    def __init__(self, disk: Disk, data_dir: str, log_file: DiskFile, size: int) -> None:
        self._disk = disk
        self._data_dir = data_dir
        self._log_path = os.path.join(data_dir, LOG_FILE)
        self._state_path = os.path.join(data_dir, STATE_FILE)
        self._file = log_file
        self._current_term = 0
        self._voted_for: int | None = None
        self._entries: list[LogEntry] = []
        self._offsets: list[int] = []  # byte offset of each entry's record; entry i at [i - 1]
        self._end = size  # byte length of the log file once everything pending is written
        self._durable_index = 0
        # Pending log changes, always reduced to: cut the file to _pending_cut, then append.
        self._disk_size = size  # the file's length once the writes already under way are done
        self._pending_cut: int | None = None
        self._pending_buf = bytearray()
        self._hard_state_dirty = False
        # Group commit: every change bumps _change_seq; a flush waits until _synced_seq covers it.
        self._change_seq = 0
        self._synced_seq = 0
        self._flush_task: asyncio.Task[None] | None = None
        self._low_water = 0  # durable_index to adopt when the write under way completes
        self._failure: BaseException | None = None
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, data_dir: str | os.PathLike[str], disk: Disk | None = None) -> RaftLog:
        """Create data_dir if needed, load hard state and entries, and repair a torn tail."""
        disk = disk if disk is not None else RealDisk()
        directory, parent = _directory_and_parent(data_dir)
        if not await disk.exists(directory):
            await disk.makedirs(directory)
            # The new directory's own name must survive a crash too.
            await disk.fsync_dir(parent)
        state_path = os.path.join(directory, STATE_FILE)
        term, voted_for = 0, None
        if await disk.exists(state_path):
            term, voted_for = _decode_state(state_path, await disk.read_all(state_path))

        log_path = os.path.join(directory, LOG_FILE)
        data = await disk.read_all(log_path) if await disk.exists(log_path) else b""
        if len(data) < len(LOG_MAGIC) and LOG_MAGIC.startswith(data):
            # Missing, or a crash cut it while it was being created: start it afresh.
            if data:
                logger.warning(
                    "%s: torn header at offset 0: dropped %d bytes, rewriting it",
                    log_path,
                    len(data),
                )
            scan = _Scan([], [], len(LOG_MAGIC))
            f = await disk.open_append(log_path, truncate=True)
            try:
                await f.write(LOG_MAGIC)
                await f.fsync()
                await disk.fsync_dir(directory)
            except BaseException:
                await f.close()
                raise
        else:
            scan = _scan_log(log_path, data)
            f = await disk.open_append(log_path)
            try:
                if scan.end < len(data):
                    logger.warning(
                        "%s: torn tail at offset %d: dropped %d bytes after entry %d",
                        log_path,
                        scan.end,
                        len(data) - scan.end,
                        len(scan.entries),
                    )
                    await f.truncate(scan.end)
                    await f.fsync()
            except BaseException:
                await f.close()
                raise

        log = cls(disk, directory, f, scan.end)
        log._current_term = term
        log._voted_for = voted_for
        log._entries = scan.entries
        log._offsets = scan.offsets
        log._durable_index = len(scan.entries)
        log._low_water = len(scan.entries)
        return log

    # -- hard state ---------------------------------------------------------------------------

    @property
    def data_dir(self) -> str:
        return self._data_dir

    @property
    def current_term(self) -> int:
        return self._current_term

    @property
    def voted_for(self) -> int | None:
        return self._voted_for

    def set_hard_state(self, current_term: int, voted_for: int | None) -> None:
        """Change the term and vote in memory at once; the next flush() makes them durable.

        ValueError if the term goes down, or the vote of a term changes once cast.
        """
        self._check_open()
        if voted_for is not None and voted_for < 1:
            raise ValueError(f"voted_for must be a positive node id or None, not {voted_for}")
        if current_term < self._current_term:
            raise ValueError(
                f"current_term cannot go back from {self._current_term} to {current_term}"
            )
        if (
            current_term == self._current_term
            and self._voted_for is not None
            and voted_for != self._voted_for
        ):
            # Section 5.2: at most one vote per term.
            raise ValueError(
                f"already voted for {self._voted_for} in term {current_term}, cannot change to {voted_for}"
            )
        if (current_term, voted_for) == (self._current_term, self._voted_for):
            return
        self._current_term = current_term
        self._voted_for = voted_for
        self._hard_state_dirty = True
        self._change_seq += 1

    # -- entries ------------------------------------------------------------------------------

    @property
    def last_index(self) -> int:
        return len(self._entries)

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else 0

    @property
    def durable_index(self) -> int:
        """The highest index whose entry is known to be on disk (fsync'd)."""
        return self._durable_index

    def term_at(self, index: int) -> int:
        if index == 0:
            return 0
        if index < 0 or index > len(self._entries):
            raise IndexError(f"no entry at index {index} (last index is {len(self._entries)})")
        return self._entries[index - 1].term

    def entry(self, index: int) -> LogEntry:
        if index < 1 or index > len(self._entries):
            raise IndexError(f"no entry at index {index} (last index is {len(self._entries)})")
        return self._entries[index - 1]

    def _payload_size(self, index: int) -> int:
        start = self._offsets[index - 1]
        end = self._offsets[index] if index < len(self._offsets) else self._end
        return end - start - _RECORD_HEADER.size

    def entries(self, start: int, max_count: int, max_bytes: int) -> list[LogEntry]:
        """Entries from start on: at most max_count, within max_bytes of serialized size, but at
        least one when start <= last_index."""
        if start < 1:
            raise IndexError(f"entries start at index 1, not {start}")
        if max_count < 1:
            raise ValueError(f"max_count must be at least 1, not {max_count}")
        last = min(len(self._entries), start + max_count - 1)
        if start > last:
            return []
        stop = start + 1
        total = self._payload_size(start)
        while stop <= last:
            total += self._payload_size(stop)
            if total > max_bytes:
                break
            stop += 1
        return self._entries[start - 1 : stop - 1]

    def append(self, entries: Sequence[LogEntry]) -> None:
        """Add entries at the end (in memory now, durable after the next flush()).

        ValueError unless their indices run consecutively from last_index + 1 and terms are >= 1.
        """
        self._check_open()
        if not entries:
            return
        first = len(self._entries) + 1
        for i, e in enumerate(entries):
            if e.index != first + i:
                raise ValueError(
                    f"entry at position {i} has index {e.index}, expected {first + i} "
                    f"(entries must continue from last index {first - 1} consecutively)"
                )
            if e.term < 1:
                raise ValueError(f"entry {e.index} has term {e.term}; terms start at 1")
        pack = _RECORD_HEADER.pack
        crc32 = zlib.crc32
        buf = self._pending_buf
        offsets = self._offsets
        offset = self._end
        for e in entries:
            payload = e.SerializeToString()
            buf += pack(len(payload), crc32(payload))
            buf += payload
            offsets.append(offset)
            offset += _RECORD_HEADER.size + len(payload)
        self._entries.extend(entries)
        self._end = offset
        self._change_seq += 1

    def truncate_from(self, index: int) -> None:
        """Drop the entries index..last_index; the next flush() shrinks the file to match."""
        self._check_open()
        last = len(self._entries)
        if index < 1 or index > last + 1:
            raise ValueError(f"cannot truncate from index {index}: must be within 1..{last + 1}")
        if index == last + 1:
            return
        size = self._offsets[index - 1]
        del self._entries[index - 1 :]
        del self._offsets[index - 1 :]
        self._end = size
        base = self._pending_cut if self._pending_cut is not None else self._disk_size
        if size >= base:
            del self._pending_buf[size - base :]
        else:
            self._pending_cut = size
            self._pending_buf.clear()
        self._durable_index = min(self._durable_index, index - 1)
        self._low_water = min(self._low_water, index - 1)
        self._change_seq += 1

    # -- durability ---------------------------------------------------------------------------

    async def flush(self) -> None:
        """Return once every change made before the call is written and fsync'd.

        Concurrent callers share one write and one fsync. If a write ever fails, this log can no
        longer be made durable: that flush and every later one raise.
        """
        target = self._change_seq
        while self._synced_seq < target:
            self._check_failed()
            task = self._flush_task
            if task is None:
                task = asyncio.get_running_loop().create_task(self._write_pending())
                task.add_done_callback(_consume_exception)
                self._flush_task = task
            # Shielded: a cancelled caller must not abandon a write halfway.
            await asyncio.shield(task)

    def _check_failed(self) -> None:
        if self._failure is not None:
            raise OSError(
                f"{self._log_path}: an earlier write failed ({self._failure}); "
                "the log cannot be made durable"
            ) from self._failure

    async def _write_pending(self) -> None:
        # Take everything pending now; changes made while this write runs wait for the next one.
        seq = self._change_seq
        cut, buf = self._pending_cut, self._pending_buf
        self._pending_cut = None
        self._pending_buf = bytearray()
        self._disk_size = (cut if cut is not None else self._disk_size) + len(buf)
        self._low_water = len(self._entries)
        hard_state = (self._current_term, self._voted_for) if self._hard_state_dirty else None
        self._hard_state_dirty = False
        try:
            if cut is not None:
                await self._file.truncate(cut)
                # The cut must be durable before new records land where the old ones were: else a
                # crash can keep the new record and lose the truncate, leaving a stale suffix.
                await self._file.fsync()
            if buf:
                await self._file.write(buf)
                await self._file.fsync()
            self._durable_index = self._low_water
            if hard_state is not None:
                await self._write_state(*hard_state)
            self._synced_seq = seq
        except BaseException as e:
            self._failure = e
            raise
        finally:
            self._flush_task = None

    async def _write_state(self, current_term: int, voted_for: int | None) -> None:
        tmp = self._state_path + ".tmp"
        f = await self._disk.open_append(tmp, truncate=True)
        try:
            await f.write(_encode_state(current_term, voted_for))
            await f.fsync()
        finally:
            await f.close()
        await self._disk.replace(tmp, self._state_path)
        await self._disk.fsync_dir(self._data_dir)

    async def close(self) -> None:
        """Finish every pending write and close the files. Safe to call more than once."""
        self._closing = True
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._close())
            self._close_task.add_done_callback(_consume_exception)
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        try:
            if self._failure is None:
                await self.flush()
        finally:
            task = self._flush_task
            if task is not None:
                await asyncio.wait([task])
            await self._file.close()

    def _check_open(self) -> None:
        if self._closing:
            raise RuntimeError(f"{self._log_path}: the log is closed")


def _directory_and_parent(data_dir: str | os.PathLike[str]) -> tuple[str, str]:
    directory = os.path.normpath(os.fspath(data_dir))
    return directory, os.path.dirname(directory) or os.curdir


def _consume_exception(task: asyncio.Task[None]) -> None:
    # The error reaches every flush() caller; this only stops asyncio reporting it a second time.
    if not task.cancelled():
        task.exception()
