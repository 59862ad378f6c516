"""A node's watchers: each gets every change to its keys from its start revision on, in revision
order, each once, from the node's own applied state (the window of recent changes first, then
changes as they are applied). A watcher that reads too slowly is cut off rather than let grow."""

from __future__ import annotations

import argparse
import asyncio
from collections import deque
from dataclasses import dataclass

from rpc import raft_pb2
from state_machine import KeyValueStateMachine
from watch_window import DEFAULT_WATCH_WINDOW, Change, CompactedError

# How many watches one node serves at once.
DEFAULT_MAX_WATCHERS = 1000
# How many changes may wait to be sent to one watcher (node flag --watch-queue); a watcher with
# more is cut off. A single entry's changes are always taken when nothing waits, however many.
DEFAULT_WATCH_QUEUE = 4096
# One message carries about this many bytes of changes at most (a change of a 1 MiB value with
# its 1 MiB previous value goes alone): well under gRPC's 4 MiB default for a message received.
MAX_WATCH_MESSAGE_BYTES = 1024 * 1024
# A watcher told of no change for this long is sent the node's revision (an empty message), so
# that resuming elsewhere starts from there, not from an old revision long compacted.
PROGRESS_INTERVAL = 5.0


class TooManyWatchersError(Exception):
    """The node serves as many watches as it may."""


class SlowWatcherError(Exception):
    """The watcher let more changes wait than its queue holds: it was cut off."""

    def __init__(self, resume_revision: int, limit: int) -> None:
        super().__init__(
            f"the watcher fell behind: more than {limit} changes waited to be sent to it; "
            f"resume from revision {resume_revision}"
        )
        self.resume_revision = resume_revision


@dataclass(frozen=True)
class KeyRange:
    """[start, end) of keys (end None: to the last key)."""

    start: str
    end: str | None

    def __contains__(self, key: str) -> bool:
        return self.start <= key and (self.end is None or key < self.end)


class Watcher:
    """One watch: the changes waiting to be sent, and whether it was cut off."""

    def __init__(
        self, hub: WatchHub, keys: KeyRange, start_revision: int, prev_value: bool, queue_limit: int
    ) -> None:
        self.hub = hub
        self.keys = keys
        self.start_revision = start_revision
        self.prev_value = prev_value
        self._queue_limit = queue_limit
        self._queue: deque[Change] = deque()
        self._wake = asyncio.Event()
        # Every matching change up to this revision has been handed to the stream.
        self.sent_through = start_revision - 1
        self.failure: Exception | None = None

    def push(self, changes: list[Change]) -> None:
        if self.failure is not None:
            return
        queue = self._queue
        if queue and len(queue) + len(changes) > self._queue_limit:
            self.fail(SlowWatcherError(self.sent_through + 1, self._queue_limit))
            return
        queue.extend(changes)
        self._wake.set()

    def fail(self, failure: Exception) -> None:
        self.failure = failure
        self._queue.clear()  # never sent: the memory goes back now
        self._wake.set()

    async def wait(self, timeout: float) -> None:
        """Until a change waits, the watcher is cut off, or `timeout` seconds pass."""
        if not self._queue and self.failure is None:
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
        self._wake.clear()

    def next_message(self, progress: bool = False) -> raft_pb2.WatchResponse | None:
        """What waits, as one message (None: nothing to say). With `progress`, an empty message
        when the node's revision moved past the last one sent."""
        queue = self._queue
        if not queue and not (progress and self.hub.revision > self.sent_through):
            return None
        response = raft_pb2.WatchResponse(compact_revision=self.hub.oldest_revision)
        size = 0
        events = response.events
        while queue:
            change = queue[0]
            size += change.size + (len(change.prev_value or "") if self.prev_value else 0)
            if events and size > MAX_WATCH_MESSAGE_BYTES:
                break
            queue.popleft()
            events.append(self._event(change))
        # Whatever is still queued is of a later revision, or of the same one (split): only the
        # revisions before it are complete.
        through = queue[0].revision - 1 if queue else self.hub.revision
        self.sent_through = max(self.sent_through, through)
        response.revision = self.sent_through
        return response

    def created_message(self) -> raft_pb2.WatchResponse:
        queue = self._queue
        through = queue[0].revision - 1 if queue else self.hub.revision
        self.sent_through = max(self.sent_through, through)
        return raft_pb2.WatchResponse(
            created=True, revision=self.sent_through, compact_revision=self.hub.oldest_revision
        )

    def _event(self, change: Change) -> raft_pb2.WatchEvent:
        event = raft_pb2.WatchEvent(
            key=change.key,
            revision=change.revision,
            create_revision=change.create_revision,
            version=change.version,
        )
        if change.value is None:
            event.type = raft_pb2.WATCH_EVENT_DELETE
        else:
            event.value = change.value
        if self.prev_value and change.prev_value is not None:
            event.prev_value = change.prev_value
        return event


class WatchHub:
    """Every watcher of one node's state machine; told of each change as it is applied."""

    def __init__(
        self,
        machine: KeyValueStateMachine,
        max_watchers: int = DEFAULT_MAX_WATCHERS,
        queue_limit: int = DEFAULT_WATCH_QUEUE,
    ) -> None:
        self._machine = machine
        self._max_watchers = max_watchers
        self._queue_limit = queue_limit
        # Watchers by the keys they watch: many watching the same prefix match each change once.
        self._groups: dict[KeyRange, set[Watcher]] = {}
        self._count = 0
        # The last revision whose changes were handed to the watchers (entries that change no key
        # are not told, so this may lag the store's revision).
        self._handed = machine.revision
        machine.listener = self

    @property
    def revision(self) -> int:
        """Every change up to this revision has been handed to the watchers it matches: changes
        reach them as they are applied."""
        return self._machine.revision

    @property
    def oldest_revision(self) -> int:
        return self._machine.window.oldest_revision

    def __len__(self) -> int:
        return self._count

    def watch(self, keys: KeyRange, start_revision: int, prev_value: bool) -> Watcher:
        """A new watcher of `keys` from `start_revision` (0: the next change on), its backlog
        from the window already queued. CompactedError when the window no longer reaches back
        that far; TooManyWatchersError when the node serves as many as it may."""
        if self._count >= self._max_watchers:
            raise TooManyWatchersError(
                f"this node already serves {self._count} watches, the most it may"
            )
        current = self._machine.revision
        start = start_revision or current + 1
        watcher = Watcher(self, keys, start, prev_value, self._queue_limit)
        if start <= current:
            backlog = [c for c in self._machine.window.since(start) if c.key in keys]
            if backlog:
                watcher.push(backlog)
        self._groups.setdefault(keys, set()).add(watcher)
        self._count += 1
        return watcher

    def remove(self, watcher: Watcher) -> None:
        group = self._groups.get(watcher.keys)
        if group is not None and watcher in group:
            group.discard(watcher)
            self._count -= 1
            if not group:
                del self._groups[watcher.keys]

    def changed(self, revision: int, changes: list[Change]) -> None:
        self._handed = revision
        for keys, watchers in self._groups.items():
            matching = [c for c in changes if c.key in keys]
            if matching:
                for watcher in watchers:
                    if revision >= watcher.start_revision:
                        watcher.push(matching)

    def reset(self) -> None:
        """A snapshot replaced the state: send each watcher the changes it has not been handed
        yet from the new window, or cut it off if the window no longer holds them."""
        before, self._handed = self._handed, self._machine.revision
        window = self._machine.window
        for watchers in self._groups.values():
            for watcher in watchers:
                need = max(before + 1, watcher.start_revision)
                if need > self._handed:
                    continue
                try:
                    missed = window.since(need)
                except CompactedError as e:
                    watcher.fail(e)
                    continue
                matching = [c for c in missed if c.key in watcher.keys]
                if matching:
                    watcher.push(matching)


def add_watch_flags(parser: argparse.ArgumentParser) -> None:
    """The node's flags for watches (--watch-window, --watch-queue)."""
    parser.add_argument(
        "--watch-window",
        type=_count,
        default=DEFAULT_WATCH_WINDOW,
        metavar="N",
        help="recent changes kept (and kept in snapshots) for watches to start from; a watch "
        f"from an older revision is refused as compacted ({DEFAULT_WATCH_WINDOW})",
    )
    parser.add_argument(
        "--watch-queue",
        type=_count,
        default=DEFAULT_WATCH_QUEUE,
        metavar="N",
        help="changes that may wait to be sent to one watcher; a watcher that lets more wait is "
        f"cut off, told where to resume ({DEFAULT_WATCH_QUEUE})",
    )


def _count(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return number
