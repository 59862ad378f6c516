"""The durable Raft log and hard state (current_term, voted_for), fsync'd with group commit; the log
can be compacted behind a snapshot (snapshot.py). All filesystem access goes through the small `Disk`
protocol of disk.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from disk import (
    DISK_FULL_RETRY_MAX,
    DISK_FULL_RETRY_MIN,
    TMP_SUFFIX,
    Disk,
    DiskFile,
    DiskFullError,
    RealDisk,
    is_disk_full,
    replace_file,
)
from rpc.raft_pb2 import LogEntry

if TYPE_CHECKING:
    from snapshot import LoadedSnapshot, SnapshotStore

logger = logging.getLogger("raft.log")

LOG_FILE = "log"
STATE_FILE = "state"
LOG_MAGIC = b"RAFTLOG1"
# A compacted log starts with this magic and a header naming the entry just before its first one:
# [u64 base index][u64 base term][u32 CRC32 of those 16 bytes].
COMPACT_LOG_MAGIC = b"RAFTLOG2"
_BASE_HEADER = struct.Struct(">QQI")
STATE_MAGIC = b"RAFTSTA1"

# A log record is [u32 payload length][u32 CRC32 of payload][payload], big-endian.
_RECORD_HEADER = struct.Struct(">II")
# The state file is [magic][u64 current_term][u64 voted_for, 0 for none][u32 CRC32 of all before it].
_STATE_BODY = struct.Struct(">8sQQ")
_STATE_CRC = struct.Struct(">I")
_STATE_SIZE = _STATE_BODY.size + _STATE_CRC.size


# What an operator can do about a data directory the node cannot trust. A node must not simply
# start empty under its old id: it may have voted or acknowledged entries the cluster counts on.
REMEDY = (
    "restore the data directory from a backup, or empty it and add this node back under a new id "
    "(cluster_client.py member remove, then start it with --join)"
)


class LogCorruptionError(Exception):
    """A file of the data directory that cannot be trusted; the message, one line, names the file,
    the offset (when one is to blame) and why, and what the operator can do."""

    def __init__(self, path: str, offset: int | None, reason: str, remedy: str = REMEDY) -> None:
        where = "" if offset is None else f"corrupt at byte offset {offset}: "
        super().__init__(f"{path}: {where}{reason}; {remedy}")
        self.path = path
        self.offset = offset
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# The log


def _encode_state(current_term: int, voted_for: int | None) -> bytes:
    body = _STATE_BODY.pack(STATE_MAGIC, current_term, voted_for or 0)
    return body + _STATE_CRC.pack(zlib.crc32(body))


# Why a damaged state file stops the node rather than being started afresh.
_STATE_LOST = (
    "the term and vote it holds are unknown, and starting without them could let this node "
    "vote twice in one term (two leaders)"
)


def _decode_state(path: str, data: bytes) -> tuple[int, int | None]:
    if len(data) != _STATE_SIZE:
        raise LogCorruptionError(
            path,
            min(len(data), _STATE_SIZE),
            f"state file is {len(data)} bytes, not {_STATE_SIZE}: {_STATE_LOST}",
        )
    body = data[: _STATE_BODY.size]
    magic, term, voted = _STATE_BODY.unpack(body)
    if magic != STATE_MAGIC:
        raise LogCorruptionError(
            path, 0, f"bad magic {magic!r}, expected {STATE_MAGIC!r}: {_STATE_LOST}"
        )
    (crc,) = _STATE_CRC.unpack_from(data, _STATE_BODY.size)
    if crc != zlib.crc32(body):
        raise LogCorruptionError(path, _STATE_BODY.size, f"checksum mismatch: {_STATE_LOST}")
    return term, (voted or None)


async def _discard_leftovers(disk: Disk, directory: str) -> None:
    """Remove the temporary files `replace_file` leaves when a crash interrupts it: each was never
    renamed into place, so nothing depends on it (a rename that happened leaves no such file)."""
    for name in await disk.listdir(directory):
        if name.endswith(TMP_SUFFIX):
            path = os.path.join(directory, name)
            try:
                await disk.remove(path)
            except FileNotFoundError:
                continue
            logger.warning(
                "%s: discarded a temporary file an interrupted write left behind (it was never "
                "made current)",
                path,
            )


@dataclass
class _Scan:
    entries: list[LogEntry]
    offsets: list[int]
    end: int
    base_index: int = 0
    base_term: int = 0


def _scan_log(path: str, data: bytes) -> _Scan:
    """Parse a log file's bytes; `end` is where the good records stop (a torn tail follows)."""
    base_index, base_term, pos = _read_log_header(path, data)
    entries: list[LogEntry] = []
    offsets: list[int] = []
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
        expected = base_index + len(entries) + 1
        if entry.index != expected:
            raise LogCorruptionError(
                path, pos, f"entry has index {entry.index}, expected {expected}"
            )
        entries.append(entry)
        offsets.append(pos)
        pos = end
    return _Scan(entries, offsets, pos, base_index, base_term)


def _read_log_header(path: str, data: bytes) -> tuple[int, int, int]:
    """(base index, base term, where the records start) of a log file."""
    magic = data[: len(LOG_MAGIC)]
    if magic == LOG_MAGIC:
        return 0, 0, len(LOG_MAGIC)
    if magic != COMPACT_LOG_MAGIC:
        raise LogCorruptionError(path, 0, f"bad magic {magic!r}, expected {LOG_MAGIC!r}")
    start = len(COMPACT_LOG_MAGIC)
    if len(data) < start + _BASE_HEADER.size:
        # A compacted log is renamed into place only once complete and fsync'd: never torn.
        raise LogCorruptionError(path, start, "compacted log header is cut short")
    base_index, base_term, crc = _BASE_HEADER.unpack_from(data, start)
    if crc != zlib.crc32(data[start : start + 16]):
        raise LogCorruptionError(path, start, "checksum mismatch in the compacted log header")
    return base_index, base_term, start + _BASE_HEADER.size


def _log_header(base_index: int, base_term: int) -> bytes:
    if base_index == 0:
        return LOG_MAGIC
    fields = struct.pack(">QQ", base_index, base_term)
    return COMPACT_LOG_MAGIC + fields + struct.pack(">I", zlib.crc32(fields))


def _encode_records(header: bytes, entries: list[LogEntry]) -> list[bytes]:
    """A log file's bytes: the header, then one record per entry, in pieces of about 1 MB."""
    pieces = []
    out = bytearray(header)
    pack = _RECORD_HEADER.pack
    for e in entries:
        payload = e.SerializeToString()
        out += pack(len(payload), zlib.crc32(payload))
        out += payload
        if len(out) >= 1 << 20:
            pieces.append(bytes(out))
            out.clear()
    pieces.append(bytes(out))
    return pieces


class RaftLog:
    """The log entries and hard state of one node (Raft paper, Figure 2, "persistent state").

    Changes apply in memory at once; `flush()` makes them durable. The log keeps the LogEntry
    objects it is given and hands out the same objects: callers must not mutate them. Indices are
    absolute: after compaction the log holds base_index + 1 .. last_index, and term_at(base_index)
    is the term of the last entry a snapshot covers (thesis chapter 5).
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
        # Byte offset of each entry's record; entry i at [i - base_index - 1].
        self._offsets: list[int] = []
        self._base_index = 0
        self._base_term = 0
        # Set by compact() and reset(): the next write replaces the file with the entries kept.
        self._rewrite = False
        self.snapshots: SnapshotStore | None = None
        # The snapshot the log was opened with, for the node to restore its state machine from.
        self.restored: LoadedSnapshot | None = None
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
        # Set once a write fails for good (anything but a full disk); the node then stops.
        self.broken = asyncio.Event()
        # While the disk is full: the error, when the next write may be tried, and the wait after.
        self._disk_full: OSError | None = None
        self._retry_at = 0.0
        self._retry_wait = DISK_FULL_RETRY_MIN
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        # fsyncs of the log and state files since opening (a count for /metrics).
        self.fsyncs = 0

    @classmethod
    async def open(cls, data_dir: str | os.PathLike[str], disk: Disk | None = None) -> RaftLog:
        """Create data_dir if needed, load hard state, the newest valid snapshot and the entries
        after it, and repair what a crash may leave (a torn tail, temporary files). Every check
        comes before any repair, so a node that refuses to start has changed nothing on disk.
        LogCorruptionError if a file cannot be trusted, or no valid snapshot covers what the log
        has discarded."""
        from snapshot import SnapshotStore

        disk = disk if disk is not None else RealDisk()
        directory, parent = _directory_and_parent(data_dir)
        if not await disk.exists(directory):
            await disk.makedirs(directory)
            # The new directory's own name must survive a crash too.
            await disk.fsync_dir(parent)
        state_path = os.path.join(directory, STATE_FILE)
        term, voted_for = 0, None
        has_state = await disk.exists(state_path)
        if has_state:
            term, voted_for = _decode_state(state_path, await disk.read_all(state_path))

        log_path = os.path.join(directory, LOG_FILE)
        data = await disk.read_all(log_path) if await disk.exists(log_path) else b""
        store = await SnapshotStore.open(directory, disk)
        fresh = len(data) < len(LOG_MAGIC) and LOG_MAGIC.startswith(data)
        if fresh:
            # The header is written and made durable before anything else in the directory, so
            # only a crash while the log was first created leaves it missing or cut short.
            if has_state or await store.any_snapshot():
                raise LogCorruptionError(
                    log_path,
                    len(data),
                    f"the log is {'cut to ' + str(len(data)) + ' bytes' if data else 'missing'}, "
                    "yet this node has written a term and vote or a snapshot since creating it: "
                    "entries it acknowledged are gone",
                )
            scan = _Scan([], [], len(LOG_MAGIC))
        else:
            scan = _scan_log(log_path, data)
        loaded = await store.load_latest()
        if scan.base_index > 0 and (loaded is None or loaded.index < scan.base_index):
            if store.damaged:
                # The damaged snapshot is the one that held those entries: name it.
                damaged = store.damaged[0]
                newest = (
                    f"the newest valid one ends at entry {loaded.index}"
                    if loaded
                    else "no other one is valid"
                )
                raise LogCorruptionError(
                    damaged.path,
                    None,
                    f"{damaged.reason}, and the log starts after entry {scan.base_index}, which "
                    f"no valid snapshot covers ({newest}): refusing to start without those entries",
                )
            raise LogCorruptionError(
                log_path,
                None,
                f"the log starts after entry {scan.base_index} but no snapshot covers the "
                "entries before it: refusing to start without them",
            )

        # Every file checked: now the repairs, each narrated.
        await _discard_leftovers(disk, directory)
        await store.discard_incoming()
        for damaged in store.damaged:
            await store.set_aside(damaged)
            logger.warning(
                "%s: %s; set it aside as %s and %s",
                damaged.path,
                damaged.reason,
                os.path.basename(damaged.aside),
                (
                    f"started from the older snapshot up to index {loaded.index} (the log "
                    "holds every entry after it)"
                    if loaded is not None
                    else "started from the log alone (it holds every entry from the first)"
                ),
            )
        if fresh:
            if data:
                logger.warning(
                    "%s: torn header at offset 0: dropped %d bytes, rewriting it",
                    log_path,
                    len(data),
                )
            f = await disk.open_append(log_path, truncate=True)
            try:
                await f.write(LOG_MAGIC)
                await f.fsync()
                await disk.fsync_dir(directory)
            except BaseException:
                await f.close()
                raise
        else:
            f = await disk.open_append(log_path)
            try:
                if scan.end < len(data):
                    logger.warning(
                        "%s: torn tail at offset %d: dropped %d bytes after entry %d",
                        log_path,
                        scan.end,
                        len(data) - scan.end,
                        scan.base_index + len(scan.entries),
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
        log._base_index = scan.base_index
        log._base_term = scan.base_term
        log._durable_index = log.last_index
        log._low_water = log.last_index
        try:
            log.snapshots = store
            log.restored = loaded
            if (
                loaded is not None
                and loaded.index >= log.base_index
                and not log.holds(loaded.index, loaded.term)
            ):
                # A snapshot installed from a leader, or taken ahead of this log's fsync: the
                # log's entries do not continue it, so they go (thesis Figure 13, rule 7).
                log.reset(loaded.index, loaded.term)
                await log.flush()
        except BaseException:
            await f.close()
            raise
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
        return self._base_index + len(self._entries)

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self._base_term

    @property
    def base_index(self) -> int:
        """The last index a snapshot covers and the log no longer holds (0: nothing compacted)."""
        return self._base_index

    @property
    def base_term(self) -> int:
        return self._base_term

    def holds(self, index: int, term: int) -> bool:
        """Whether the log has (or its base is) the entry at index with that term."""
        return self._base_index <= index <= self.last_index and self.term_at(index) == term

    @property
    def durable_index(self) -> int:
        """The highest index whose entry is known to be on disk (fsync'd)."""
        return self._durable_index

    def term_at(self, index: int) -> int:
        base = self._base_index
        if index == base:
            return self._base_term
        if index < base or index > self.last_index:
            raise IndexError(
                f"no entry at index {index} (the log holds {base + 1}..{self.last_index})"
            )
        return self._entries[index - base - 1].term

    def entry(self, index: int) -> LogEntry:
        base = self._base_index
        if index <= base or index > self.last_index:
            raise IndexError(
                f"no entry at index {index} (the log holds {base + 1}..{self.last_index})"
            )
        return self._entries[index - base - 1]

    def _payload_size(self, index: int) -> int:
        i = index - self._base_index - 1
        start = self._offsets[i]
        end = self._offsets[i + 1] if i + 1 < len(self._offsets) else self._end
        return end - start - _RECORD_HEADER.size

    def bytes_after(self, index: int) -> int:
        """About how many bytes the records after `index` take in the log file."""
        i = max(index - self._base_index, 0)
        # Also 0 for a log reset to a later snapshot while the caller held an older index.
        if index >= self.last_index or i >= len(self._offsets):
            return 0
        return self._end - self._offsets[i]

    def keep_point(self, index: int, keep_entries: int, keep_bytes: int) -> int:
        """Where to compact the log so that it keeps, behind `index`, as many entries as it holds
        but at most `keep_entries` of them, whose records take at most `keep_bytes`."""
        low = max(index - keep_entries, self._base_index)
        high = max(index, low)
        kept_after = self.bytes_after(index)
        # The bytes kept behind `index` shrink as the point moves up: find the lowest that fits.
        while low < high:
            middle = (low + high) // 2
            if self.bytes_after(middle) - kept_after <= keep_bytes:
                high = middle
            else:
                low = middle + 1
        return low

    def entries(self, start: int, max_count: int, max_bytes: int) -> list[LogEntry]:
        """Entries from start on: at most max_count, within max_bytes of serialized size, but at
        least one when start <= last_index."""
        if start <= self._base_index:
            raise IndexError(f"entries start at index {self._base_index + 1}, not {start}")
        if max_count < 1:
            raise ValueError(f"max_count must be at least 1, not {max_count}")
        last = min(self.last_index, start + max_count - 1)
        if start > last:
            return []
        stop = start + 1
        total = self._payload_size(start)
        while stop <= last:
            total += self._payload_size(stop)
            if total > max_bytes:
                break
            stop += 1
        base = self._base_index
        return self._entries[start - base - 1 : stop - base - 1]

    def append(self, entries: Sequence[LogEntry]) -> None:
        """Add entries at the end (in memory now, durable after the next flush()).

        ValueError unless their indices run consecutively from last_index + 1 and terms are >= 1.
        """
        self._check_open()
        if not entries:
            return
        first = self.last_index + 1
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
        last = self.last_index
        first = self._base_index + 1
        if index < first or index > last + 1:
            raise ValueError(
                f"cannot truncate from index {index}: must be within {first}..{last + 1}"
            )
        if index == last + 1:
            return
        i = index - first
        size = self._offsets[i]
        del self._entries[i:]
        del self._offsets[i:]
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

    # -- compaction (thesis chapter 5) --------------------------------------------------------

    def compact(self, index: int) -> None:
        """Discard the entries up to `index`, which a durable snapshot must already cover; the
        next flush() replaces the file with one holding only the rest."""
        self._check_open()
        if index <= self._base_index:
            return
        if index > self.last_index:
            raise ValueError(f"cannot compact up to {index}: the last index is {self.last_index}")
        term = self.term_at(index)
        drop = index - self._base_index
        del self._entries[:drop]
        del self._offsets[:drop]
        self._base_index, self._base_term = index, term
        self._schedule_rewrite()

    def reset(self, index: int, term: int) -> None:
        """Make the log empty after a snapshot ending at (index, term): the entries that continue
        it are kept (thesis Figure 13, rule 6), every other entry goes (rule 7)."""
        self._check_open()
        if self.holds(index, term):
            self.compact(index)
            return
        self._entries.clear()
        self._offsets.clear()
        self._base_index, self._base_term = index, term
        self._durable_index = min(self._durable_index, index)
        self._low_water = min(self._low_water, index)
        self._schedule_rewrite()

    def _schedule_rewrite(self) -> None:
        self._rewrite = True
        self._durable_index = max(self._durable_index, self._base_index)
        self._durable_index = min(self._durable_index, self.last_index)
        self._change_seq += 1

    def _plan_rewrite(self) -> tuple[bytes, list[LogEntry]]:
        """Lay the file out afresh: the header, then the records of the entries kept, each as
        long as before (so offsets only shift). Returns the header and those entries, to be
        encoded by `_encode_records`."""
        header = _log_header(self._base_index, self._base_term)
        shift = len(header) - (self._offsets[0] if self._offsets else self._end)
        self._offsets = [offset + shift for offset in self._offsets]
        self._end += shift
        return header, list(self._entries)

    async def _rewrite_file(self, header: bytes, kept: list[LogEntry], size: int) -> None:
        if isinstance(self._disk, RealDisk) and size > 1 << 20:
            # Encoding many entries takes a while: in a thread, which shares the interpreter with
            # the event loop in short turns (no single step of it is long).
            pieces = await asyncio.to_thread(_encode_records, header, kept)
        else:
            pieces = _encode_records(header, kept)
        written = sum(len(piece) for piece in pieces)
        if written != size:
            raise RuntimeError(f"{self._log_path}: rewriting {written} bytes, not {size}")
        # The old file stays whole until the new one is durable under its name: a crash at any
        # point leaves one or the other, and a snapshot covers what either lacks.
        await replace_file(self._disk, self._log_path, pieces)
        old, self._file = self._file, await self._disk.open_append(self._log_path)
        await old.close()

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
        full = self._disk_full
        if full is not None and asyncio.get_running_loop().time() < self._retry_at:
            raise DiskFullError(full.errno, self._full_message(full)) from full

    def _full_message(self, error: OSError) -> str:
        return f"disk full writing {self._data_dir}: {error.strerror or error}"

    @property
    def disk_full(self) -> bool:
        """Whether the last write found the disk full (and none has succeeded since)."""
        return self._disk_full is not None

    @property
    def failure(self) -> BaseException | None:
        """The error that broke this log for good, if one did."""
        return self._failure

    async def _write_pending(self) -> None:
        # Take everything pending now; changes made while this write runs wait for the next one.
        seq = self._change_seq
        rewrite: tuple[bytes, list[LogEntry], int] | None = None
        if self._rewrite:
            self._rewrite = False
            rewrite = (*self._plan_rewrite(), self._end)
            cut, buf = None, bytearray()
            self._disk_size = self._end
        else:
            cut, buf = self._pending_cut, self._pending_buf
            self._disk_size = (cut if cut is not None else self._disk_size) + len(buf)
        self._pending_cut = None
        self._pending_buf = bytearray()
        self._low_water = self.last_index
        hard_state = (self._current_term, self._voted_for) if self._hard_state_dirty else None
        self._hard_state_dirty = False
        log_written = False
        try:
            if rewrite is not None:
                await self._rewrite_file(*rewrite)
            if cut is not None:
                await self._file.truncate(cut)
                # The cut must be durable before new records land where the old ones were: else a
                # crash can keep the new record and lose the truncate, leaving a stale suffix.
                await self._file.fsync()
                self.fsyncs += 1
            if buf:
                await self._file.write_and_fsync(buf)
                self.fsyncs += 1
            log_written = True
            self._durable_index = self._low_water
            if hard_state is not None:
                await self._write_state(*hard_state)
            self._synced_seq = seq
            if self._disk_full is not None:
                logger.warning("%s: the disk has space again; writing resumed", self._data_dir)
            self._disk_full = None
            self._retry_wait = DISK_FULL_RETRY_MIN
        except BaseException as e:
            if not is_disk_full(e):
                # Anything else, a failed fsync above all, leaves the file's content on disk
                # unknown: this log stops, and the node with it (see FsyncError).
                self._failure = e
                self.broken.set()
                raise
            assert isinstance(e, OSError)
            # A failed append may have left part of its records at the end of the file. The file
            # is therefore written afresh from memory (a new file renamed over it) at the next
            # try: the entries are all in memory, and the old file stays whole until then.
            if not log_written:
                self._rewrite = True
            if hard_state is not None:
                self._hard_state_dirty = True
            self._disk_full = e
            self._retry_at = asyncio.get_running_loop().time() + self._retry_wait
            self._retry_wait = min(self._retry_wait * 2, DISK_FULL_RETRY_MAX)
            raise DiskFullError(e.errno, self._full_message(e)) from e
        finally:
            self._flush_task = None

    async def _write_state(self, current_term: int, voted_for: int | None) -> None:
        await replace_file(self._disk, self._state_path, _encode_state(current_term, voted_for))
        self.fsyncs += 2  # the new file's, then its directory's

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


__all__ = (
    "COMPACT_LOG_MAGIC",
    "LOG_FILE",
    "LOG_MAGIC",
    "REMEDY",
    "STATE_FILE",
    "STATE_MAGIC",
    "LogCorruptionError",
    "RaftLog",
    # Still importable from here, where they lived before the disk layer had a module of its own.
    "DiskFullError",
    "RealDisk",
)
