"""The disk layer: the `Disk` and `DiskFile` protocols the log and snapshot files are written
through, `RealDisk` (the filesystem, off the event loop) and the crash-modelling `MemoryDisk`."""

from __future__ import annotations

import asyncio
import errno
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import aiofiles
import aiofiles.os

# What replace_file writes before renaming it into place.
TMP_SUFFIX = ".tmp"


class FsyncError(OSError):
    """An fsync failed. What the file then holds on disk is unknown: the kernel may have dropped
    the dirty pages it could not write and report success for the next fsync ("fsyncgate")."""


class DiskFullError(OSError):
    """A write found no space (ENOSPC or EDQUOT); nothing of it counts as durable, and a later
    flush writes it again."""


# Write errors a node recovers from by itself once space returns.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# After a write finds the disk full, flushes fail at once for this long before the next try,
# doubling up to the maximum, so a full disk is not hammered.
DISK_FULL_RETRY_MIN = 0.05
DISK_FULL_RETRY_MAX = 2.0


def is_disk_full(error: BaseException) -> bool:
    return (
        isinstance(error, OSError)
        and not isinstance(error, FsyncError)
        and error.errno in DISK_FULL_ERRNOS
    )


# ---------------------------------------------------------------------------------------------
# The disk interface


class DiskFile(Protocol):
    """A file opened for appending."""

    async def write(self, data: bytes | bytearray) -> None: ...
    async def fsync(self) -> None: ...
    async def write_and_fsync(self, data: bytes | bytearray) -> None:
        """`write` then `fsync`, as one trip off the event loop where the disk can do that."""
        ...

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
    async def listdir(self, path: str) -> list[str]: ...
    async def remove(self, path: str) -> None: ...
    async def read_range(self, path: str, offset: int, size: int) -> bytes: ...


# A large file being written is fsync'd every this many bytes: one fsync of a whole large file
# holds up every other fsync on the disk (the log's, so every write) until it is done.
SYNC_EVERY_BYTES = 8 << 20


async def replace_file(disk: Disk, path: str, data: bytes | Iterable[bytes]) -> None:
    """Make `data` (bytes, or pieces written one after another) the content of `path` atomically
    and durably: written to a temporary file and fsync'd, renamed over `path`, then the directory
    fsync'd. A crash at any point leaves either the old file whole or the new one."""
    tmp = path + TMP_SUFFIX
    f = await disk.open_append(tmp, truncate=True)
    try:
        unsynced = 0
        for piece in (data,) if isinstance(data, bytes) else data:
            await f.write(piece)
            unsynced += len(piece)
            if unsynced >= SYNC_EVERY_BYTES:
                await f.fsync()
                unsynced = 0
        await f.fsync()
    finally:
        await f.close()
    await disk.replace(tmp, path)
    await disk.fsync_dir(os.path.dirname(path))


def _fsync_dir_sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_fsync_dir = aiofiles.os.wrap(_fsync_dir_sync)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        raise FsyncError(e.errno, f"fsync failed: {e.strerror}") from e


def _write_and_fsync(
    fd: int, data: bytes | bytearray, on_fsync: Callable[[float], None] | None = None
) -> None:
    _write_all(fd, data)
    if on_fsync is None:
        _fsync(fd)
        return
    started = time.perf_counter()
    _fsync(fd)
    on_fsync(time.perf_counter() - started)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return  # its waiter was cancelled; the write itself went ahead
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


_Job = tuple[Callable[[], None], "asyncio.Future[None]", asyncio.AbstractEventLoop]


class _Writer:
    """A thread of its own that performs one file's appends and fsyncs in order. Cheaper per group
    commit than the loop's executor (a C queue instead of a pool's locks and chained futures), and
    a large snapshot write elsewhere never queues in front of it."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def run(self, job: Callable[[], None]) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._jobs.put((job, future, loop))
        return future

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, future, loop = item
            error: BaseException | None = None
            try:
                job()
            except BaseException as e:  # handed to the waiter, as an executor would
                error = e
            try:
                loop.call_soon_threadsafe(_settle, future, error)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more

    def stop(self) -> None:
        """End the thread once the jobs already queued are done."""
        self._jobs.put(None)


class _RealFile:
    """An unbuffered file descriptor opened with O_APPEND. Appends with fsync (the log's group
    commit) go to a writer thread of this file's own: one thread hop per commit, not one per step;
    the rarer operations run in the loop's executor."""

    def __init__(self, fd: int, name: str, on_fsync: Callable[[float], None] | None = None) -> None:
        self._fd = fd
        self._name = name
        self._writer: _Writer | None = None
        self._on_fsync = on_fsync

    async def _run(self, fn: Callable[..., None], *args: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, fn, self._fd, *args)

    # The caller leaves `data` alone until the write returns (the log hands over its buffer).
    async def write(self, data: bytes | bytearray) -> None:
        await self._run(_write_all, data)

    async def fsync(self) -> None:
        await self._run(_fsync)

    async def write_and_fsync(self, data: bytes | bytearray) -> None:
        if self._writer is None:
            self._writer = _Writer(f"writer {self._name}")
        fd, on_fsync = self._fd, self._on_fsync
        await self._writer.run(lambda: _write_and_fsync(fd, data, on_fsync))

    async def truncate(self, size: int) -> None:
        await self._run(os.ftruncate, size)

    async def close(self) -> None:
        # Every write was awaited before close, so no job of the writer still uses the descriptor.
        if self._writer is not None:
            self._writer.stop()
            self._writer = None
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class RealDisk:
    """The real filesystem; each call runs in the event loop's executor (through aiofiles, or
    directly for an open log file).

    `on_fsync`, if given, is told how many seconds each group commit's fsync took, from the
    log's writer thread (so it must be thread-safe)."""

    def __init__(self, on_fsync: Callable[[float], None] | None = None) -> None:
        self._on_fsync = on_fsync

    async def exists(self, path: str) -> bool:
        return await aiofiles.os.path.exists(path)

    async def makedirs(self, path: str) -> None:
        await aiofiles.os.makedirs(path, exist_ok=True)

    async def read_all(self, path: str) -> bytes:
        async with aiofiles.open(path, "rb") as f:
            return await f.read()

    async def open_append(self, path: str, *, truncate: bool = False) -> DiskFile:
        # O_APPEND makes every write land at the end, also after a truncate.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        if truncate:
            flags |= os.O_TRUNC
        fd = await asyncio.get_running_loop().run_in_executor(None, os.open, path, flags, 0o644)
        return _RealFile(fd, os.path.basename(path), self._on_fsync)

    async def replace(self, src: str, dst: str) -> None:
        await aiofiles.os.replace(src, dst)

    async def fsync_dir(self, path: str) -> None:
        await _fsync_dir(path)

    async def listdir(self, path: str) -> list[str]:
        return await aiofiles.os.listdir(path)

    async def remove(self, path: str) -> None:
        await aiofiles.os.remove(path)

    async def read_range(self, path: str, offset: int, size: int) -> bytes:
        async with aiofiles.open(path, "rb") as f:
            await f.seek(offset)
            return await f.read(size)


@dataclass(frozen=True)
class DiskOp:
    """One operation a MemoryDisk performed: kind is create, open, write, fsync, truncate, replace,
    remove or fsync_dir; size is the bytes written or the new length; dest is where a replace moved to.
    """

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

    async def write_and_fsync(self, data: bytes | bytearray) -> None:
        # Two operations, as on a real disk: a crash can come between the write and the fsync.
        await self.write(data)
        await self.fsync()

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

    async def listdir(self, path: str) -> list[str]:
        path = self._norm(path)
        if path not in self._dirs:
            raise FileNotFoundError(f"no such directory: {path}")
        names = [n for n in [*self._names, *self._dirs] if n != path and os.path.dirname(n) == path]
        return sorted(os.path.basename(n) for n in names)

    async def remove(self, path: str) -> None:
        path = self._norm(path)
        op = DiskOp("remove", path)
        await self._before(op)
        if path not in self._names:
            raise FileNotFoundError(f"no such file: {path}")
        # Like a rename, the removal itself survives a crash only once the directory is fsync'd.
        del self._names[path]
        self.ops.append(op)

    async def read_range(self, path: str, offset: int, size: int) -> bytes:
        path = self._norm(path)
        if path not in self._names:
            raise FileNotFoundError(f"no such file: {path}")
        return bytes(self._names[path].data[offset : offset + size])

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
