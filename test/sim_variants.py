"""Deliberately broken variants of the node, for showing that the simulation catches real bugs.

Each variant is a monkeypatch applied only for the duration of `applied(name)` (and only in the process
that applies it); the node's own code is never edited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any
from unittest import mock

import log as log_module
from leader import LeaderTerm
from log import RaftLog
from membership import Membership
from membership_changes import MembershipChanges
from raft_node import NotLeaderError, RaftNode
from reads import Reads
from rpc import raft_pb2
from state_machine import ApplyResult, KeyValueStateMachine


def _forget_vote_on_restart(stack: ExitStack) -> None:
    """(1) voted_for is not persisted: a restarted node remembers its term but not its vote."""
    decode = log_module._decode_state

    def decode_without_vote(path: str, data: bytes) -> tuple[int, int | None]:
        term, _ = decode(path, data)
        return term, None

    stack.enter_context(mock.patch.object(log_module, "_decode_state", decode_without_vote))


def _commit_earlier_terms_by_counting(stack: ExitStack) -> None:
    """(2) An entry from an earlier term counts as committed once a majority holds it (section 5.4.2
    forbids this: only entries of the leader's own term commit by counting replicas)."""

    def advance_commit(self: LeaderTerm) -> None:
        node = self.node
        matches = sorted(
            [node.log.durable_index] + [p.match_index for p in self.progress.values()],
            reverse=True,
        )
        candidate = matches[node.config.quorum - 1]
        if candidate <= node.commit_index:
            return
        node.commit_index = candidate
        node.apply_committed()
        self.wake_all()

    stack.enter_context(mock.patch.object(LeaderTerm, "advance_commit", advance_commit))


def _acknowledge_before_fsync(stack: ExitStack) -> None:
    """(3) A follower acknowledges AppendEntries as soon as the entries are in memory; the fsync
    happens in the background, after the reply has left."""
    handle = RaftNode.handle_append_entries
    pending: set[asyncio.Task[None]] = set()

    async def handle_append_entries(
        self: RaftNode, request: raft_pb2.AppendEntriesRequest
    ) -> raft_pb2.AppendEntriesResponse:
        log = self.log
        real_flush = log.flush

        def flush_later() -> asyncio.Future[None]:
            task = asyncio.get_running_loop().create_task(real_flush())
            pending.add(task)
            task.add_done_callback(_forget(pending))
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

        # The handler runs to its reply without suspending once its flush returns at once, so no
        # other caller of this log's flush can see the substitute.
        log.flush = flush_later  # type: ignore[method-assign,assignment]
        try:
            return await handle(self, request)
        finally:
            del log.flush

    stack.enter_context(mock.patch.object(RaftNode, "handle_append_entries", handle_append_entries))


def _forget(pending: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        pending.discard(task)
        if not task.cancelled():
            task.exception()

    return done


def _overwrite_without_truncating(stack: ExitStack) -> None:
    """(4) A follower replaces its conflicting entries with the leader's but keeps whatever of its
    old log lies beyond them, instead of deleting the conflicting entry and all that follow it."""
    truncate_from = RaftLog.truncate_from
    append = RaftLog.append

    def remembering_truncate(self: RaftLog, index: int) -> None:
        self._kept_suffix = [  # type: ignore[attr-defined]
            self.entry(i) for i in range(index, self.last_index + 1)
        ]
        truncate_from(self, index)

    def append_then_restore(self: RaftLog, entries: Sequence[raft_pb2.LogEntry]) -> None:
        append(self, entries)
        kept: list[raft_pb2.LogEntry] = getattr(self, "_kept_suffix", None) or []
        self._kept_suffix = None  # type: ignore[attr-defined]
        rest = [e for e in kept if e.index > self.last_index]
        if rest:
            append(self, rest)

    stack.enter_context(mock.patch.object(RaftLog, "truncate_from", remembering_truncate))
    stack.enter_context(mock.patch.object(RaftLog, "append", append_then_restore))


def _read_without_confirmation(stack: ExitStack) -> None:
    """(5) A leader answers reads from its own state machine without confirming it still leads, so
    a deposed leader that has not heard of its successor serves stale values."""

    async def leader_read(self: Reads, query: Callable[[KeyValueStateMachine], Any]) -> Any:
        node = self.node
        if not node.is_leader:
            raise NotLeaderError(*node.leader())
        return query(node.state_machine)

    # Every read a leader serves (a get, a range) goes through _leader_read.
    stack.enter_context(mock.patch.object(Reads, "_leader_read", leader_read))


def _no_pre_vote(stack: ExitStack) -> None:
    """(6) No pre-vote: on an election timeout a node raises its term and stands at once, so a node
    cut off from the others drives its term up and, back again, deposes a healthy leader."""

    def start_pre_vote(self: RaftNode) -> None:
        self.spawn(self.start_election(), name="election")

    stack.enter_context(mock.patch.object(RaftNode, "start_pre_vote", start_pre_vote))


def _no_check_quorum(stack: ExitStack) -> None:
    """(7) No check quorum: a leader cut off from the majority goes on leading (and turning
    clients away or leaving them waiting) until it hears of a newer term."""

    async def check_quorum(self: LeaderTerm, term: int) -> None:
        return None

    stack.enter_context(mock.patch.object(LeaderTerm, "check_quorum", check_quorum))


def _compact_past_the_snapshot(stack: ExitStack) -> None:
    """(8) Compaction discards the whole log, also the entries after the snapshot point that no
    snapshot holds (not yet applied, or not even committed), instead of only what the snapshot
    covers (thesis chapter 5)."""
    compact = RaftLog.compact

    def compact_everything(self: RaftLog, index: int) -> None:
        compact(self, max(index, self.last_index))

    stack.enter_context(mock.patch.object(RaftLog, "compact", compact_everything))


def _two_changes_at_once(stack: ExitStack) -> None:
    """(9) A leader appends a membership change while the previous one is not yet committed (or
    before it has committed an entry of its own term), so configurations two changes apart can
    be in use at once, whose majorities need not overlap (thesis section 4.1). The operator asks
    for changes without waiting for each other (see sim_faults.MembershipChanges)."""

    async def change_config(
        self: MembershipChanges, change: Callable[[Membership], Membership], what: str
    ) -> ApplyResult:
        node = self.node
        new = change(node.configs.latest)
        node.narrate.info("%s", what)
        return await node.writes.propose_entry(
            raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_CONFIG, config=new.to_proto())
        )

    stack.enter_context(mock.patch.object(MembershipChanges, "change_config", change_config))


def _removed_leader_counts_itself(stack: ExitStack) -> None:
    """(10) A node a configuration removes still counts in that configuration's majorities, so a
    leader removing itself goes on counting itself (commit, read confirmation, check quorum) until
    it steps down; thesis section 4.2.2 says it must not: with it, an entry can commit on fewer
    than a majority of the new voters."""

    def counts(self: Membership, node_id: int) -> bool:
        return node_id in self.voters or node_id in self.removed

    stack.enter_context(mock.patch.object(Membership, "counts", counts))


VARIANTS: dict[str, Callable[[ExitStack], None]] = {
    "forget-vote": _forget_vote_on_restart,
    "commit-earlier-term": _commit_earlier_terms_by_counting,
    "ack-before-fsync": _acknowledge_before_fsync,
    "overwrite-without-truncate": _overwrite_without_truncating,
    "stale-read": _read_without_confirmation,
    "no-pre-vote": _no_pre_vote,
    "no-check-quorum": _no_check_quorum,
    "compact-past-snapshot": _compact_past_the_snapshot,
    "two-changes-at-once": _two_changes_at_once,
    "removed-leader-counts-itself": _removed_leader_counts_itself,
}


# Variants whose fault shows only when the operator does not wait for one change to finish
# before asking for the next.
OVERLAPPING = {"two-changes-at-once"}


@contextmanager
def applied(name: str | None) -> Iterator[None]:
    """Run the body with the named broken variant in place (None: the node as it is)."""
    with ExitStack() as stack:
        if name is not None:
            if name not in VARIANTS:
                raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
            VARIANTS[name](stack)
        yield


def overlapping(name: str | None) -> bool:
    """Whether the variant needs membership changes issued without waiting for each other."""
    return name in OVERLAPPING


def describe(name: str) -> str:
    """A variant's description, on one line."""
    return " ".join(str(VARIANTS[name].__doc__).split())
