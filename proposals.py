"""Writes: a client's proposal is appended by the leader, made durable on its own disk, and
answered once it is applied (or once its outcome can no longer be known)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from disk import DiskFullError
from leader import LeaderTerm
from log import RaftLog
from node_events import EventFeed, entry_summary
from node_status import NodeEvents, NodeObserver
from node_types import (
    MAX_WAITING_PROPOSALS,
    Clock,
    CommitUnknownError,
    NodeBasics,
    NotLeaderError,
    OverloadedError,
    SessionExpiredError,
    Timer,
    Timing,
    put_entry,
)
from rpc import raft_pb2
from state_machine import ApplyResult, KeyValueStateMachine, PutResult, SessionExpired
from transfer import Transfers


class WritesNode(NodeBasics, Protocol):
    """What writes need of their node."""

    log: RaftLog
    clock: Clock
    timing: Timing
    wall_clock: Callable[[], float]
    state_machine: KeyValueStateMachine
    observer: NodeObserver
    events: NodeEvents
    leadership: LeaderTerm | None
    transfers: Transfers
    feed: EventFeed

    def leader(self) -> tuple[int | None, str | None]: ...
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None: ...
    def become_follower(self, term: int, leader_id: int | None, why: str) -> None: ...
    def append_to_log(self, entries: list[raft_pb2.LogEntry]) -> None: ...
    async def pause(self, seconds: float) -> None: ...


class Writes:
    """One node's writes: those it appended as leader and waits to apply, by index."""

    def __init__(self, node: WritesNode) -> None:
        self.node = node
        self._waiters: dict[int, tuple[int, asyncio.Future[ApplyResult]]] = {}
        self._self_flush_running = False
        # When each waiting write gives up, oldest first (they arrive in order and all wait
        # equally long), and the one timer armed for the oldest: a timer per batch, not per write.
        self._deadlines: deque[tuple[float, int, asyncio.Future[ApplyResult]]] = deque()
        self._expiry: Timer | None = None
        self._expiry_at = 0.0

    async def propose_mapping(
        self, key: str, value: str, session: raft_pb2.Session | None = None
    ) -> int:
        """Store one mapping; once it is committed and applied here, return its revision (its
        index; 0 for a retry answered from a session reply kept from before revisions). Raises
        NotLeaderError.

        Without a session it is the seed's MAPPING entry; with one, a COMMAND whose result may be
        SessionExpired, raised here as SessionExpiredError.
        """
        entry = put_entry(key, value, session)
        if entry.kind == raft_pb2.ENTRY_KIND_MAPPING:
            result = await self.propose_entry(entry)
        else:
            result = await self.propose(entry.command)
        if isinstance(result, SessionExpired):
            raise SessionExpiredError(result.reason)
        return result.revision if isinstance(result, PutResult) else 0

    async def propose(self, command: raft_pb2.Command) -> ApplyResult:
        """Append a command; once it is committed and applied here, return what applying it gave.

        Raises NotLeaderError (nothing appended) or CommitUnknownError (outcome unknown).
        """
        node = self.node
        result = await self.propose_entry(
            raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_COMMAND, command=command)
        )
        if isinstance(result, SessionExpired):
            node.narrate.info("refused a client's write: %s", result.reason)
        elif command.WhichOneof("op") == "register_client":
            node.narrate.debug("registered client session %s", result)
        return result

    async def propose_entry(self, entry: raft_pb2.LogEntry) -> ApplyResult:
        self._check_can_append(1)
        return await self._wait_applied([entry], [self.append_as_leader(entry)])[0]

    async def propose_entries(
        self, entries: list[raft_pb2.LogEntry]
    ) -> list[ApplyResult | Exception]:
        """Append several clients' entries at once (one log append, one flush, one wake-up of the
        replicators) and return, in order, what applying each gave or why its outcome is unknown.

        Raises NotLeaderError or OverloadedError before appending anything.
        """
        if not entries:
            return []
        self._check_can_append(len(entries))
        indexes = self.append_many_as_leader(entries)
        # One event for the whole batch, as it was one request: a subscriber's cost stays per
        # batch, not per write.
        outcomes = await asyncio.gather(
            *self._wait_applied(entries, indexes, tell=len(entries) == 1),
            return_exceptions=True,
        )
        node = self.node
        results: list[ApplyResult | Exception] = []
        failed = 0
        for outcome in outcomes:
            if isinstance(outcome, SessionExpired):
                node.narrate.info("refused a client's write: %s", outcome.reason)
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome
            failed += isinstance(outcome, Exception)
            results.append(outcome)
        if len(entries) > 1 and node.feed.active:
            what = f"batch of {len(entries)} writes"
            text = f"a client's {what} at indexes {indexes[0]}-{indexes[-1]}: " + (
                f"{failed} failed" if failed else "committed and applied"
            )
            self._tell(text, what, indexes[-1], len(entries), ok=not failed)
        return results

    def _check_can_append(self, count: int) -> None:
        """Raise why this node cannot take `count` more writes now, if it cannot."""
        node = self.node
        if not node.is_leader:
            leader_id, address = node.leader()
            if leader_id is not None:
                node.narrate.tell(
                    "client",
                    "redirecting a client to leader %d",
                    leader_id,
                    action="redirect",
                    peer=leader_id,
                )
            else:
                node.narrate.tell(
                    "client", "turning a client away: no leader known", action="redirect"
                )
            raise NotLeaderError(leader_id, address)
        node.transfers.refuse_while_transferring()
        if node.log.disk_full:
            raise OverloadedError(
                f"disk full on node {node.node_id}: it takes no writes until space returns"
            )
        if len(self._waiters) + count > MAX_WAITING_PROPOSALS:
            raise OverloadedError(
                f"{len(self._waiters)} writes already wait to commit on node {node.node_id}; "
                "try again later"
            )

    def _wait_applied(
        self, entries: list[raft_pb2.LogEntry], indexes: list[int], tell: bool = True
    ) -> list[Coroutine[Any, Any, ApplyResult]]:
        """One waiter per appended entry. No timeout context, shield or timer of its own: each
        write's deadline joins the queue one timer watches. A caller that is cancelled cancels its
        future, which apply then skips."""
        node = self.node
        loop = asyncio.get_running_loop()
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].done():
            deadlines.popleft()
        deadline = node.clock.now() + node.timing.proposal_timeout
        waiting: list[Coroutine[Any, Any, ApplyResult]] = []
        for entry, index in zip(entries, indexes, strict=True):
            future: asyncio.Future[ApplyResult] = loop.create_future()
            self._waiters[index] = (node.current_term, future)
            deadlines.append((deadline, index, future))
            waiting.append(self._await_one(entry, index, future, tell))
        if self._expiry is None:
            self._arm_expiry()
        return waiting

    async def _await_one(
        self,
        entry: raft_pb2.LogEntry,
        index: int,
        future: asyncio.Future[ApplyResult],
        tell: bool,
    ) -> ApplyResult:
        node = self.node
        # Latency for metrics only: a finer clock than the loop's (whose ticks are milliseconds);
        # no decision depends on it.
        started = time.perf_counter()
        try:
            result = await future
        except Exception as e:
            if tell and node.feed.active:
                self._tell_outcome(entry, index, f"failed: {e}", ok=False)
            raise
        finally:
            waiter = self._waiters.get(index)
            if waiter is not None and waiter[1] is future:
                del self._waiters[index]
        node.observer.proposal_committed(time.perf_counter() - started)
        if tell and node.feed.active:
            self._tell_outcome(entry, index, "committed and applied", ok=True)
        return result

    def _tell_outcome(self, entry: raft_pb2.LogEntry, index: int, outcome: str, ok: bool) -> None:
        what = entry_summary([entry])
        self._tell(f"a client's write ({what}) at index {index}: {outcome}", what, index, 1, ok)

    def _tell(self, text: str, what: str, index: int, count: int, ok: bool) -> None:
        self.node.feed.emit(
            "client", text, action="write", index=index, count=count, ok=ok, detail=what
        )

    def _arm_expiry(self) -> None:
        self._expiry_at = self._deadlines[0][0]
        self._expiry = self.node.clock.call_at(self._expiry_at, self._expire_due)

    def _expire_due(self) -> None:
        """A waiting write's deadline came: it gives up, as does every other whose deadline
        passed; then the timer is armed for the next. The deadline the timer was armed for
        counts as passed, however the clock rounds, so a timer on time is never early."""
        node = self.node
        self._expiry = None
        deadlines = self._deadlines
        due = max(node.clock.now(), self._expiry_at)
        while deadlines and (deadlines[0][0] <= due or deadlines[0][2].done()):
            _, index, future = deadlines.popleft()
            if not future.done():
                future.set_exception(
                    CommitUnknownError(
                        f"entry {index} did not commit within {node.timing.proposal_timeout:g} "
                        "s; it may or may not be applied"
                    )
                )
        if deadlines:
            self._arm_expiry()

    def fail_waiting(self, why: str) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._deadlines.clear()
        waiters, self._waiters = self._waiters, {}
        for _, future in waiters.values():
            if not future.done():
                future.set_exception(CommitUnknownError(f"{why}; it may or may not be applied"))

    def append_as_leader(self, entry: raft_pb2.LogEntry) -> int:
        """Leader: append an entry of this term to the log and let the replicators send it."""
        return self.append_many_as_leader([entry])[0]

    def append_many_as_leader(self, entries: list[raft_pb2.LogEntry]) -> list[int]:
        """Leader: append entries of this term in one go; their indexes, in order."""
        node = self.node
        index = node.log.last_index
        # Log time (sessions expire by it) never goes backwards, even if this clock is behind the
        # previous leader's.
        if index > node.log.base_index:
            previous = node.log.entry(index).leader_time_ms
        else:
            previous = node.state_machine.log_time_ms if index > 0 else 0
        now_ms = max(int(node.wall_clock() * 1000), previous)
        for entry in entries:
            if entry.kind == raft_pb2.ENTRY_KIND_CONFIG:
                node.events.appending_config()
            index += 1
            entry.term = node.current_term
            entry.index = index
            entry.leader_time_ms = now_ms
        node.append_to_log(entries)
        # The followers' messages go out before this node's own write starts (section 10.2.1 of
        # the thesis: the leader may write its log in parallel with replicating it); only once
        # its own fsync is done does the leader count itself towards a majority.
        if node.leadership is not None:
            node.leadership.wake_all()
        self._flush_own_log()
        return [entry.index for entry in entries]

    def _flush_own_log(self) -> None:
        """Make the leader's own entries durable; the leader counts itself only for durable entries."""
        node = self.node
        if not self._self_flush_running:
            self._self_flush_running = True
            node.spawn(self._flush_own_log_loop(), name="leader-flush")

    async def _flush_own_log_loop(self) -> None:
        node = self.node
        full_since: float | None = None
        try:
            while node.log.durable_index < node.log.last_index:
                try:
                    await node.log.flush()
                except DiskFullError as e:
                    now = node.clock.now()
                    if full_since is None:
                        full_since = now
                        node.narrate.error(
                            "%s: refusing writes until space returns (retrying)", e.strerror
                        )
                    if node.is_leader and now - full_since >= node.timing.election_timeout_max:
                        # A leader that can make nothing durable commits nothing: let a node
                        # with a working disk lead (it stands for no election meanwhile).
                        node.become_follower(
                            node.current_term,
                            None,
                            "my disk has been full for an election timeout; a node that can "
                            "write should lead",
                        )
                    await node.pause(node.timing.heartbeat_interval)
                    continue
                if full_since is not None:
                    full_since = None
                    node.narrate.info("my disk has space again: taking writes")
                if node.leadership is not None:
                    node.leadership.advance_commit()
        finally:
            self._self_flush_running = False

    def applied(self, entry: raft_pb2.LogEntry, result: ApplyResult) -> None:
        """The entry at `entry.index` was just applied: answer the write waiting for it, if any."""
        waiter = self._waiters.pop(entry.index, None)
        if waiter is not None:
            term, future = waiter
            if not future.done():
                if term == entry.term:
                    future.set_result(result)
                else:
                    future.set_exception(
                        CommitUnknownError("another leader's entry took this index")
                    )
