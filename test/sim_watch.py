"""The simulation's check of revisions and watches: a reference state machine applies the committed
log once, in order; every node's changes, as a watcher of that node would be sent them, must be the
reference's (each revision once, in order, none skipped, the same keys, values, previous values and
revisions), and at the end every node's keys, revisions and window of recent changes must be the
reference's."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from rpc import raft_pb2
from state_machine import KeyValueStateMachine
from watch_window import Change, CompactedError

Fail = Callable[[str, str], None]


class WatchHistory:
    """The committed history of changes, and the checks of each node's against it."""

    def __init__(self, fail: Fail) -> None:
        self._fail = fail
        self.reference = KeyValueStateMachine()
        self.reference.listener = self
        # revision -> the changes the committed entry at that index made (entries making none are
        # absent), and those revisions in order.
        self.changes: dict[int, list[Change]] = {}
        self._revisions: list[int] = []
        # False once the reference could not follow (an index first seen out of order): the
        # checks then stop rather than report what would only be the reference's own gap.
        self.following = True

    # ---- the reference (a ChangeListener of its own state machine) ------------------------------

    def committed(self, entry: raft_pb2.LogEntry) -> None:
        """An entry applied for the first time anywhere (so committed), in index order."""
        if not self.following:
            return
        if entry.index != self.reference.last_applied + 1:
            self.following = False
            return
        self.reference.apply(entry)

    def changed(self, revision: int, changes: list[Change]) -> None:
        self.changes[revision] = list(changes)
        self._revisions.append(revision)

    def reset(self) -> None:  # the reference is never restored
        pass

    # ---- each node ----------------------------------------------------------------------------

    def watcher(self, node_id: int, machine: KeyValueStateMachine) -> NodeWatcher:
        return NodeWatcher(self, node_id, machine)

    def watched(self, node_id: int, after: int, revision: int, changes: list[Change]) -> None:
        """Node `node_id` sent a watcher `changes` at `revision`, the last it sent being `after`."""
        if not self.following:
            return
        if revision <= after:
            self._fail(
                "watch order",
                f"node {node_id} sent changes of revision {revision} after those of {after}",
            )
            return
        expected = self.changes.get(revision)
        if changes != expected:
            self._fail(
                "watch history",
                f"node {node_id} sent {_show(changes)} at revision {revision}; the committed log "
                f"made {_show(expected or [])}",
            )
            return
        skipped = self._revisions[
            bisect.bisect_right(self._revisions, after) : bisect.bisect_left(
                self._revisions, revision
            )
        ]
        if skipped:
            self._fail(
                "watch completeness",
                f"node {node_id} went from revision {after} to {revision}, never sending the "
                f"changes of revision(s) {skipped[:5]}",
            )

    def check_final(self, machines: Sequence[tuple[int, KeyValueStateMachine]]) -> None:
        """Every node that applied as far as the reference holds its keys with the same revisions,
        and a window whose changes are the reference's from the node's oldest revision on."""
        if not self.following:
            return
        reference = self.reference
        for node_id, machine in machines:
            if machine.last_applied != reference.last_applied:
                continue
            page = machine.range("", None, len(machine) + 1, 1 << 62)
            expected = reference.range("", None, len(reference) + 1, 1 << 62)
            if page.kvs != expected.kvs:
                self._fail(
                    "revisions",
                    f"node {node_id}'s keys and revisions differ from the committed log's "
                    f"({len(page.kvs)} keys against {len(expected.kvs)})",
                )
                return
            oldest = machine.window.oldest_revision
            window = machine.window.since(oldest)
            try:
                wanted = reference.window.since(oldest)
            except CompactedError:
                wanted = [c for r in self._revisions if r >= oldest for c in self.changes[r]]
            if window != wanted:
                self._fail(
                    "watch window",
                    f"node {node_id}'s window from revision {oldest} holds {len(window)} changes; "
                    f"the committed log made {len(wanted)} since then",
                )
                return


class NodeWatcher:
    """What a watcher of one node (from the node's start) is sent, reported to the history: the
    node's state machine's listener."""

    def __init__(self, history: WatchHistory, node_id: int, machine: KeyValueStateMachine) -> None:
        self._history = history
        self._node_id = node_id
        self._machine = machine
        self._last = machine.revision

    def changed(self, revision: int, changes: list[Change]) -> None:
        self._history.watched(self._node_id, self._last, revision, changes)
        self._last = revision

    def reset(self) -> None:
        """A snapshot was installed: a watcher is sent what the new window holds since the last
        revision it was sent (or told, explicitly, that it is compacted)."""
        machine = self._machine
        try:
            missed = machine.window.since(self._last + 1)
        except CompactedError:
            self._last = machine.revision
            return
        by_revision: dict[int, list[Change]] = {}
        for change in missed:
            by_revision.setdefault(change.revision, []).append(change)
        for revision, changes in by_revision.items():
            self.changed(revision, changes)
        self._last = machine.revision


def _show(changes: list[Change]) -> str:
    return ", ".join(
        f"{'put' if c.value is not None else 'delete'} {c.key}" for c in changes[:4]
    ) + ("..." if len(changes) > 4 else "")
