"""Backup files (`cluster_client.py snapshot save`): a cluster's whole replicated state at one log
index in one self-describing, checksummed file, and the check every reader makes before using one.

The layout, all of it readable with `head` and `tail`:

    raft-demo backup\\n                      the magic line: what the file is
    {"format": 1, "cluster_id": ..., ...}\\n  the header: format version, source cluster id, the log
                                             index and term the state is at, when it was taken,
                                             the source's members there, and how the state is
                                             encoded
    <state>                                  the state machine's own snapshot encoding
                                             (state_machine.SnapshotState.encode_pieces), so
                                             whatever the state machine holds is in the backup
    end <N> sha256 <hex>\\n                   N: bytes before this line; their SHA-256

A file that lacks the magic line is foreign, one whose last line is not a whole trailer is cut
short, and one whose bytes do not match the trailer is damaged; each is refused in one line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from membership import Membership
from state_machine import SnapshotState, StateDecoder

MAGIC_LINE = b"raft-demo backup\n"
FORMAT_VERSION = 1
# How the state is encoded: the state machine's snapshot encoding, lines of JSON.
STATE_ENCODING = "raft-demo-state-jsonl"
# The header is small (a member list); a "header" longer than this means the file is not ours.
MAX_HEADER_BYTES = 1 << 20
# The trailer, at most this long: "end " + 20 digits + " sha256 " + 64 hex digits + "\n".
_TRAILER = re.compile(rb"end (\d{1,20}) sha256 ([0-9a-f]{64})\n")
_TRAILER_MAX = 4 + 20 + 8 + 64 + 1
# A backup is read and streamed in pieces of about this size.
CHUNK_BYTES = 1 << 20
TMP_SUFFIX = ".tmp"


class BackupError(Exception):
    """A backup file that cannot be used; the message, one line, names the file and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class BackupMeta:
    """What a backup holds: the state of cluster `cluster_id` at log index `index` (whose entry
    has term `term`), taken at `created_ms` (ms since the Unix epoch), when `members` were its
    configuration."""

    cluster_id: str
    index: int
    term: int
    created_ms: int
    members: Membership

    def header(self) -> bytes:
        created = datetime.fromtimestamp(self.created_ms / 1000, UTC)
        doc = {
            "format": FORMAT_VERSION,
            "cluster_id": self.cluster_id,
            "index": self.index,
            "term": self.term,
            "created": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "created_ms": self.created_ms,
            "members": json.loads(self.members.to_json()),
            "state": STATE_ENCODING,
        }
        return MAGIC_LINE + json.dumps(doc, sort_keys=True).encode() + b"\n"


@dataclass
class Backup:
    """A backup file read back and verified: its header, its size and checksum, and the state's
    encoding (in pieces, never joined) with a summary of what it holds."""

    path: str
    meta: BackupMeta
    size: int
    sha256: str
    state: list[bytes] = field(repr=False)
    keys: int
    sessions: int


class BackupWriter:
    """The bytes of a backup file, piece by piece: `start()`, then `add()` each piece of the
    state's encoding, then `finish()`; the checksum is computed on the way."""

    def __init__(self, meta: BackupMeta) -> None:
        self.meta = meta
        self._hash = hashlib.sha256()
        self._length = 0

    def _take(self, data: bytes) -> bytes:
        self._hash.update(data)
        self._length += len(data)
        return data

    def start(self) -> bytes:
        return self._take(self.meta.header())

    def add(self, piece: bytes) -> bytes:
        return self._take(piece)

    def finish(self) -> bytes:
        return b"end %d sha256 %s\n" % (self._length, self._hash.hexdigest().encode())


async def backup_chunks(
    meta: BackupMeta, state: SnapshotState, chunk_bytes: int = CHUNK_BYTES
) -> AsyncIterator[bytes]:
    """A backup file of `state` in chunks of about `chunk_bytes`, encoded a few keys at a time
    with a turn of the event loop between chunks, so a node streaming a large state keeps
    serving (one json.dumps of the whole state would hold the interpreter)."""
    writer = BackupWriter(meta)
    batch = [writer.start()]
    size = len(batch[0])
    for piece in state.encode_pieces():
        batch.append(writer.add(piece))
        size += len(piece)
        if size >= chunk_bytes:
            yield b"".join(batch)
            batch, size = [], 0
            await asyncio.sleep(0)
    batch.append(writer.finish())
    yield b"".join(batch)


def encode_backup(meta: BackupMeta, state: SnapshotState) -> bytes:
    """A whole backup file at once (for small states and tests)."""
    writer = BackupWriter(meta)
    return writer.start() + b"".join(writer.add(p) for p in state.encode_pieces()) + writer.finish()


def read_backup(path: str) -> Backup:
    """Read and verify a backup file: BackupError, naming the file and the reason, if it is not a
    backup, of an unknown format version, cut short, or damaged. Reads it in pieces."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return _read(path, f, size)
    except OSError as e:
        raise BackupError(path, f"cannot read it: {e.strerror or e}") from None


def _read(path: str, f: Any, size: int) -> Backup:
    start = f.read(len(MAGIC_LINE))
    if start != MAGIC_LINE:
        if start and MAGIC_LINE.startswith(start):
            raise BackupError(path, f"truncated: only {size} bytes, not even a header")
        raise BackupError(
            path, "not a raft-demo backup file (it does not start with its magic line)"
        )
    header_line: bytes = f.readline(MAX_HEADER_BYTES)
    trailer = _trailer(f, size)
    if trailer is None or not header_line.endswith(b"\n"):
        # A newer format may end otherwise: name the version when the header says another.
        version = _version_of(header_line)
        if version is not None and version != FORMAT_VERSION:
            raise BackupError(path, _unknown_version(version))
        raise BackupError(
            path, f"truncated: {size} bytes, and it does not end with its checksum line"
        )
    body_length, expected = int(trailer.group(1)), trailer.group(2).decode()
    if body_length + len(trailer.group(0)) != size:
        raise BackupError(
            path, f"damaged: {size} bytes, but its checksum line covers {body_length}"
        )
    # The checksum first: what a damaged header says (a version, an index) is not to be believed.
    digest = hashlib.sha256(MAGIC_LINE + header_line)
    state_start = len(MAGIC_LINE) + len(header_line)
    decoder = StateDecoder()
    pieces: list[bytes] = []
    f.seek(state_start)
    remaining = body_length - state_start
    if remaining < 0:
        raise BackupError(path, "damaged: its header runs into its checksum line")
    while remaining > 0:
        piece = f.read(min(CHUNK_BYTES, remaining))
        if not piece:
            raise BackupError(path, "truncated while it was being read")
        remaining -= len(piece)
        digest.update(piece)
        pieces.append(piece)
    if digest.hexdigest() != expected:
        raise BackupError(path, "damaged: its SHA-256 checksum does not match its contents")
    meta = _parse_header(path, header_line)
    try:
        for piece in pieces:
            decoder.feed(piece)
        state = decoder.result()
    except ValueError as e:
        raise BackupError(path, f"damaged: {e}") from None
    if state.last_applied != meta.index:
        raise BackupError(
            path,
            f"damaged: its state was taken at index {state.last_applied}, the header says "
            f"{meta.index}",
        )
    return Backup(
        path, meta, size, expected, pieces, keys=len(state.data), sessions=len(state.sessions)
    )


def _trailer(f: Any, size: int) -> re.Match[bytes] | None:
    f.seek(max(0, size - _TRAILER_MAX))
    tail: bytes = f.read()
    cut = tail.rfind(b"\n", 0, len(tail) - 1)
    return _TRAILER.fullmatch(tail[cut + 1 :])


def _version_of(header_line: bytes) -> int | None:
    try:
        doc = json.loads(header_line)
    except ValueError:
        return None
    version = doc.get("format") if isinstance(doc, dict) else None
    return version if isinstance(version, int) else None


def _unknown_version(version: int) -> str:
    return (
        f"backup format version {version}, which this version of raft-demo cannot read "
        f"(it reads version {FORMAT_VERSION})"
    )


def _parse_header(path: str, line: bytes) -> BackupMeta:
    try:
        doc = json.loads(line)
    except ValueError:
        raise BackupError(path, "damaged: its header is not JSON") from None
    if not isinstance(doc, dict):
        raise BackupError(path, "damaged: its header is not a JSON object")
    if doc.get("format") != FORMAT_VERSION:
        raise BackupError(path, _unknown_version(doc.get("format")))  # type: ignore[arg-type]
    if doc.get("state") != STATE_ENCODING:
        raise BackupError(path, f"its state is encoded as {doc.get('state')!r}, unknown here")
    try:
        cluster_id = doc["cluster_id"]
        index, term, created_ms = doc["index"], doc["term"], doc["created_ms"]
        if not isinstance(cluster_id, str) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0
            for n in (index, term, created_ms)
        ):
            raise ValueError("a field has the wrong type")
        members = Membership.from_json(json.dumps(doc["members"]).encode())
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BackupError(path, f"damaged: its header does not parse ({e})") from None
    return BackupMeta(cluster_id, index, term, created_ms, members)


async def write_backup_file(path: str, chunks: AsyncIterator[bytes]) -> Backup:
    """Write a backup arriving in `chunks` to `path` atomically: into a temporary file beside it,
    fsync'd, read back and verified (a file this returns for is one a restore accepts), then
    renamed over `path` and the directory fsync'd. On any failure `path` is left as it was and
    the temporary file removed; BackupError if what arrived is not a valid backup."""
    directory = os.path.dirname(path) or os.curdir
    tmp = f"{path}.{os.getpid()}{TMP_SUFFIX}"
    try:
        f = await asyncio.to_thread(open, tmp, "wb")
    except OSError as e:
        # Named as the file asked for: the temporary one beside it is a detail.
        raise OSError(e.errno, e.strerror, path) from None
    try:
        try:
            async for chunk in chunks:
                await asyncio.to_thread(f.write, chunk)
            f.flush()
            await asyncio.to_thread(os.fsync, f.fileno())
        finally:
            f.close()
        try:
            backup = await asyncio.to_thread(read_backup, tmp)
        except BackupError as e:
            raise BackupError(path, f"the backup received does not verify: {e.reason}") from None
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)
    backup.path = path
    return backup


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def now_ms() -> int:
    return int(time.time() * 1000)


def describe(backup: Backup) -> Iterator[str]:
    """Lines that say what a backup holds, for the command line."""
    meta = backup.meta
    created = datetime.fromtimestamp(meta.created_ms / 1000, UTC).isoformat(timespec="seconds")
    yield (
        f"{backup.path}: cluster {meta.cluster_id} at index {meta.index} (term {meta.term}), "
        f"taken {created.replace('+00:00', 'Z')}"
    )
    yield (
        f"{backup.keys} keys, {backup.sessions} client sessions, {backup.size} bytes; "
        f"members then: {meta.members.describe()}; sha256 {backup.sha256}"
    )
