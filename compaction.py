"""Snapshots of this node's state (thesis chapter 5): taking them and compacting the log behind
them, restoring one at start, and receiving a leader's chunk by chunk and installing it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol

from leader import Progress
from log import RaftLog
from membership import ConfigHistory, Membership
from node_events import EventFeed, EventNarrator
from node_status import NodeEvents, NodeObserver
from node_types import Clock, InvalidRequestError, SnapshotPolicy, size_text
from rpc import raft_pb2
from snapshot import Incoming, LoadedSnapshot, SnapshotError
from state_machine import KeyValueStateMachine, SnapshotState, decode_state

# How much encoding of a snapshot's state runs between two turns of the event loop.
_STATE_BYTES_PER_TURN = 256 * 1024
# After a snapshot, a node takes no other for this many times as long as it took.
_SNAPSHOT_REST = 4


class SnapshotNode(Protocol):
    """What snapshots need of their node."""

    log: RaftLog
    clock: Clock
    configs: ConfigHistory
    commit_index: int
    state_machine: KeyValueStateMachine
    observer: NodeObserver
    events: NodeEvents
    snapshot_policy: SnapshotPolicy | None
    feed: EventFeed

    @property
    def narrate(self) -> EventNarrator: ...
    @property
    def last_applied(self) -> int: ...
    @property
    def stopped(self) -> bool: ...
    @property
    def progress(self) -> dict[int, Progress]: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None: ...
    def notify(self) -> None: ...
    def apply_committed(self) -> None: ...
    def rebuild_configs(self, base: Membership, base_index: int) -> None: ...


class Snapshots:
    """One node's snapshots: the one being taken, and the one being received."""

    def __init__(self, node: SnapshotNode) -> None:
        self.node = node
        self._snapshotting = False
        self._incoming: Incoming | None = None
        # Chunks of a leader's snapshot are written one at a time.
        self.install_lock = asyncio.Lock()

    @property
    def receiving(self) -> bool:
        """Whether a leader's snapshot is partly received."""
        return self._incoming is not None

    def restore_at_start(self) -> None:
        """Restore the state machine from the snapshot the log was opened with, if any (once);
        SnapshotError or ValueError if its state does not decode."""
        node = self.node
        restored = node.log.restored
        if restored is None:
            return
        node.log.restored = None
        self.restore(restored, at_start=True)
        node.narrate.info(
            "restored state from snapshot up to index %d (term %d, %s)",
            restored.index,
            restored.term,
            size_text(restored.meta.size),
        )

    def restore(self, loaded: LoadedSnapshot, at_start: bool = False) -> None:
        """Replace the state machine with a snapshot's; the log already starts after it."""
        node = self.node
        node.state_machine.install(_state_of(loaded))
        advanced = loaded.index > node.commit_index
        node.commit_index = max(node.commit_index, loaded.index)
        node.events.snapshot_restored(at_start)
        if advanced and node.feed.active:
            node.feed.emit(
                "commit", f"commit index now {loaded.index} (from a snapshot)", index=loaded.index
            )

    def maybe_snapshot(self) -> None:
        """Snapshot once the log has grown past the policy's thresholds since the last snapshot."""
        node = self.node
        policy = node.snapshot_policy
        if policy is None or self._snapshotting or node.stopped or node.log.snapshots is None:
            return
        latest = node.log.snapshots.latest
        since = latest.index if latest is not None else 0
        index = node.last_applied
        if index - since < policy.entries and node.log.bytes_after(since) < policy.bytes:
            return
        self._snapshotting = True
        # Copying the state is quick; encoding and writing it happen while the node goes on.
        state = node.state_machine.snapshot()
        term = node.log.term_at(index)
        members = node.configs.at(index)
        if node.spawn(self._write_snapshot(state, members, index, term), name="snapshot") is None:
            self._snapshotting = False

    async def _write_snapshot(
        self, state: SnapshotState, members: Membership, index: int, term: int
    ) -> None:
        node = self.node
        node.events.snapshot_writing()
        store = node.log.snapshots
        assert store is not None and node.snapshot_policy is not None
        started = node.clock.now()
        try:
            pieces = await _encode_state(state)
            # A large state's copy and its encoding are each as big as the state: let them go as
            # soon as they are done with, not when this (long) coroutine ends.
            del state
            meta = await store.write(index, term, members, pieces)
            del pieces
            node.narrate.tell(
                "snapshot",
                "took a snapshot up to index %d (term %d, %s)",
                index,
                term,
                size_text(meta.size),
                action="take",
                index=index,
                count=meta.size,
            )
            # Followers being sent a snapshot still need the entries after it (else each install
            # would be followed by another: the snapshot install loop).
            policy = node.snapshot_policy
            point = node.log.keep_point(index, policy.keep_entries, policy.keep_bytes)
            for progress in node.progress.values():
                if progress.snapshot is not None:
                    point = min(point, progress.snapshot.index)
            point = min(point, node.last_applied, node.log.last_index)
            if point > node.log.base_index:
                node.log.compact(point)
                node.configs.compact(point)
                await node.log.flush()
                node.narrate.info("discarded the log up to index %d", point)
            node.observer.snapshot_taken()
        except OSError as e:
            node.narrate.error("could not write a snapshot up to index %d: %s", index, e)
        finally:
            # The next snapshot waits a few times as long as this one took: snapshotting a large
            # state then takes only a share of the node's time, the rest is left for serving.
            rest = _SNAPSHOT_REST * (node.clock.now() - started)
            if rest > 0 and not node.stopped:
                node.clock.call_at(node.clock.now() + rest, self._end_snapshot_rest)
            else:
                self._snapshotting = False

    def _end_snapshot_rest(self) -> None:
        self._snapshotting = False
        self.maybe_snapshot()

    async def receive(
        self, request: raft_pb2.InstallSnapshotRequest
    ) -> raft_pb2.InstallSnapshotResponse:
        node = self.node
        index, term = request.last_included_index, request.last_included_term
        total, checksum = request.total_size, request.checksum
        store = node.log.snapshots
        if store is None:
            raise InvalidRequestError("this node keeps no snapshots")
        if index <= node.commit_index:
            # Everything the snapshot holds is committed here already; the log goes on after it.
            return raft_pb2.InstallSnapshotResponse(next_offset=total, installed=True)
        incoming = self._incoming
        if request.offset == 0 and (
            incoming is None or not incoming.same(index, term, total, checksum) or incoming.offset
        ):
            # Rule 2: create a new snapshot file if first chunk (offset is 0).
            if incoming is not None:
                await store.abort_incoming(incoming)
            if incoming is None or not incoming.same(index, term, total, checksum):
                node.narrate.info(
                    "receiving a snapshot up to index %d (term %d, %s) from %d",
                    index,
                    term,
                    size_text(total),
                    request.requester_id,
                )
            self._incoming = incoming = await store.begin_incoming(index, term, total, checksum)
        if incoming is None or not incoming.same(index, term, total, checksum):
            # A chunk of a snapshot this node is not receiving (it restarted, or the leader moved
            # on to a newer one): ask for that snapshot from the start.
            return raft_pb2.InstallSnapshotResponse(next_offset=0)
        if request.offset != incoming.offset:
            return raft_pb2.InstallSnapshotResponse(next_offset=incoming.offset)
        # Rule 3: write data into the snapshot file at the given offset.
        await incoming.write(request.data)
        if incoming.offset > total or (request.done and incoming.offset != total):
            node.narrate.warning("snapshot transfer from %d went wrong; restarting it", index)
            await store.abort_incoming(incoming)
            self._incoming = None
            return raft_pb2.InstallSnapshotResponse(next_offset=0)
        if not request.done:
            # Rule 4: reply and wait for more data chunks if done is false.
            return raft_pb2.InstallSnapshotResponse(next_offset=incoming.offset)
        self._incoming = None
        try:
            # Its state was decoded chunk by chunk as it came: checked, kept, then installed
            # together with the log's reset, no step of it long.
            loaded = await store.check_incoming(incoming)
            _state_of(loaded)
            if loaded.index <= node.commit_index:
                return raft_pb2.InstallSnapshotResponse(next_offset=total, installed=True)
            loaded = await store.keep_incoming(loaded)
        except (SnapshotError, ValueError) as e:
            node.narrate.warning("%s; asking for it again", e)
            return raft_pb2.InstallSnapshotResponse(next_offset=0)
        if loaded.index <= node.commit_index:
            return raft_pb2.InstallSnapshotResponse(next_offset=total, installed=True)
        # Rules 6 and 7: keep the entries that follow the snapshot if the log has its last entry,
        # else discard the whole log; then reset the state machine from the snapshot.
        kept = node.log.holds(loaded.index, loaded.term)
        node.log.reset(loaded.index, loaded.term)
        node.rebuild_configs(loaded.members, loaded.index)
        self.restore(loaded)
        node.narrate.tell(
            "snapshot",
            "installed snapshot up to index %d (term %d, %s); %s",
            loaded.index,
            loaded.term,
            size_text(loaded.meta.size),
            (
                f"kept my entries after it (up to {node.log.last_index})"
                if kept and node.log.last_index > loaded.index
                else "my log now starts after it"
            ),
            action="install",
            peer=request.requester_id,
            index=loaded.index,
            ok=True,
        )
        node.observer.snapshot_installed()
        node.notify()
        node.apply_committed()
        return raft_pb2.InstallSnapshotResponse(next_offset=total, installed=True)


async def _encode_state(state: SnapshotState) -> list[bytes]:
    """Encode a state machine's snapshot a few keys at a time, letting the node serve in between
    (a thread would not help: encoding holds the interpreter's lock). The pieces are not joined:
    that would copy the whole state once more."""
    pieces = []
    size = 0
    for piece in state.encode_pieces():
        pieces.append(piece)
        size += len(piece)
        if size >= _STATE_BYTES_PER_TURN:
            size = 0
            await asyncio.sleep(0)
    return pieces


def _state_of(loaded: LoadedSnapshot) -> SnapshotState:
    """A snapshot's state, decoded (unless it already is), once known to be the state at the
    snapshot's index; SnapshotError or ValueError if it is not."""
    state = loaded.state
    if not isinstance(state, SnapshotState):
        state = decode_state(state)
    if state.last_applied != loaded.index:
        raise SnapshotError(
            f"{loaded.meta.path}: its state was taken at index {state.last_applied}, "
            f"not {loaded.index}"
        )
    return state
