"""The window of recent changes a node keeps for watchers: every put and delete the state machine
applied, in revision order, back to the oldest it still holds. Bounded in events and in bytes;
part of the state machine's snapshot, so a node restored from one still serves it."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

# How many changes a node keeps by default (node flag --watch-window).
DEFAULT_WATCH_WINDOW = 10_000
# However many changes the window may hold, it holds no more than this many bytes of keys and
# values (10,000 values of 1 MiB would otherwise be 10 GB, in memory and in every snapshot).
WATCH_WINDOW_MAX_BYTES = 16 * 1024 * 1024


class Change(NamedTuple):
    """One key changed by one applied entry. A delete has value None, create_revision 0 and
    version 0; prev_value is the key's value before (None: it did not exist)."""

    revision: int
    key: str
    value: str | None
    prev_value: str | None
    create_revision: int
    version: int

    @property
    def size(self) -> int:
        return len(self.key) + (len(self.value) if self.value is not None else 0)


class CompactedError(Exception):
    """The changes from a revision are no longer held: the oldest revision still served is
    `oldest`."""

    def __init__(self, asked: int, oldest: int) -> None:
        super().__init__(
            f"revision {asked} has been compacted: the oldest revision this node still serves "
            f"is {oldest}"
        )
        self.asked = asked
        self.oldest = oldest


class ChangeWindow:
    """The most recent changes, oldest first. Every change with a revision above `compacted` is
    held; those at or below it may have been dropped."""

    def __init__(
        self, limit: int = DEFAULT_WATCH_WINDOW, max_bytes: int = WATCH_WINDOW_MAX_BYTES
    ) -> None:
        if limit < 0 or max_bytes < 0:
            raise ValueError("a watch window cannot be negative")
        self._changes: deque[Change] = deque()
        self._bytes = 0
        self._limit = limit
        self._max_bytes = max_bytes
        self.compacted = 0

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"a watch window holds 0 or more changes, not {limit}")
        self._limit = limit
        self._trim()

    def __len__(self) -> int:
        return len(self._changes)

    def __iter__(self) -> Iterator[Change]:
        return iter(self._changes)

    @property
    def oldest_revision(self) -> int:
        """The oldest revision a watch may start from."""
        return self.compacted + 1

    def add(self, changes: Iterable[Change]) -> None:
        # On every write's path: kept to plain operations.
        append = self._changes.append
        size = self._bytes
        for change in changes:
            append(change)
            value = change[2]
            size += len(change[1]) + (len(value) if value is not None else 0)
        self._bytes = size
        # Trimmed a few at a time (up to an eighth over the limit), not at every change.
        if len(self._changes) > self._limit + (self._limit >> 3) or size > self._max_bytes:
            self._trim()

    def since(self, revision: int) -> list[Change]:
        """Every change from `revision` on, in order; CompactedError if some may be gone."""
        if revision <= self.compacted:
            raise CompactedError(revision, self.oldest_revision)
        changes = self._changes
        # Recent revisions are what watchers ask for: walk back from the newest end.
        start = len(changes)
        while start > 0 and changes[start - 1].revision >= revision:
            start -= 1
        return [changes[i] for i in range(start, len(changes))]

    def _trim(self) -> None:
        changes = self._changes
        while changes and (len(changes) > self._limit or self._bytes > self._max_bytes):
            dropped = changes.popleft()
            self._bytes -= dropped.size
            self.compacted = dropped.revision  # changes are held in revision order

    def reset(self, changes: Iterable[Change], compacted: int) -> None:
        """Replace the whole window (from a snapshot)."""
        self._changes = deque(changes)
        self._bytes = sum(c.size for c in self._changes)
        self.compacted = compacted
        self._trim()

    def copy(self) -> list[Change]:
        return list(self._changes)


def encode_change(change: Change) -> list[Any]:
    return list(change)


def decode_change(doc: Any) -> Change:
    revision, key, value, prev_value, create_revision, version = doc
    if not isinstance(key, str) or not all(
        v is None or isinstance(v, str) for v in (value, prev_value)
    ):
        raise ValueError("a change's key and values must be strings")
    return Change(int(revision), key, value, prev_value, int(create_revision), int(version))
