"""The leader's term, as one object: per-follower progress, the replicators, commit from match
indices, check quorum, heartbeat and read rounds, sending snapshots, departing followers.

A node creates a `LeaderTerm` when it wins an election and drops it when it steps down, so nothing
of one term's leadership survives into the next (Figure 2: "reinitialized after election").
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from cluster_config import NodeAddress
from counters import Counters
from lease_keeper import LeaseKeeper, LeaseKeeperNode
from log import RaftLog
from membership import ConfigHistory, Membership
from node_events import EventFeed
from node_types import (
    MAX_BYTES_PER_MESSAGE,
    MAX_ENTRIES_PER_MESSAGE,
    SNAPSHOT_CHUNK_BYTES,
    Clock,
    NodeBasics,
    PeerUnreachableError,
    SnapshotPolicy,
    Timer,
    Timing,
    Transport,
    size_text,
    wait_until_time,
)
from rpc import raft_pb2
from snapshot import SnapshotMeta


@dataclass
class Progress:
    """What the leader knows about one follower (Figure 2: nextIndex, matchIndex)."""

    next_index: int
    match_index: int = 0
    # The commit index this follower has been told and could act on (capped by what it holds).
    told_commit: int = 0
    last_sent: float = float("-inf")
    retry_at: float = float("-inf")
    # Leadership confirmation for reads (thesis section 6.4): the newest read round this follower
    # has been sent, and the newest it has answered in our term.
    sent_round: int = 0
    acked_round: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Check quorum: when the newest request this follower answered in our term left this node.
    heard_at: float = float("-inf")
    # The snapshot being sent to this follower (it needs entries compacted away), and where next.
    snapshot: SnapshotMeta | None = None
    snapshot_offset: int = 0
    # When this follower last answered a chunk of that snapshot (or the transfer began).
    snapshot_heard: float = float("-inf")


@dataclass
class Transfer:
    """A leadership transfer in progress (thesis section 3.10)."""

    target: int
    term: int


class MembershipSteps(Protocol):
    """What a leader's progress may set off in membership: a promotion, or leaving."""

    def maybe_promote(self, peer_id: int) -> None: ...
    def after_leader_commit(self) -> None: ...


class LeaderNode(LeaseKeeperNode, NodeBasics, Protocol):
    """What the leader's term needs of its node."""

    log: RaftLog
    transport: Transport
    timing: Timing
    clock: Clock
    configs: ConfigHistory
    commit_index: int
    snapshot_policy: SnapshotPolicy | None
    peers: dict[int, NodeAddress]
    feed: EventFeed
    counters: Counters

    @property
    def changes(self) -> MembershipSteps: ...
    @property
    def config(self) -> Membership: ...
    @property
    def cluster_size(self) -> int: ...
    @property
    def stopped(self) -> bool: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None: ...
    def step_down_if_newer(self, term: int, source: str) -> bool: ...
    def become_follower(self, term: int, leader_id: int | None, why: str) -> None: ...
    def apply_committed(self) -> None: ...
    def notify(self) -> None: ...


class LeaderTerm:
    """One term of this node's leadership (sections 5.3, 5.4; thesis 6.4 for read rounds)."""

    def __init__(self, node: LeaderNode, term: int) -> None:
        self.node = node
        self.term = term
        self.progress: dict[int, Progress] = {}
        # Replication tasks by follower; followers a configuration removed, kept until they learn
        # that their removal committed (by the index of the removing configuration).
        self._replicators: dict[int, asyncio.Task[Any]] = {}
        self.departing: dict[int, int] = {}
        # The configuration removing this leader committed: it is handing over and leaving.
        self.leaving = False
        self.transfer: Transfer | None = None
        # Leadership confirmation for reads: the newest round of heartbeats asked for, whether
        # any follower has been sent it yet (until then, a new read joins it), and the reads
        # waiting for each round to be confirmed, woken together when it is.
        self.read_round = 0
        self._round_out = True
        self._round_waiters: dict[int, list[asyncio.Future[bool]]] = {}
        # The commit index followers are now due to be told, even by a message of its own: each
        # advance becomes due a commit_notice_delay after it happened, unless a message carrying
        # entries told it meanwhile (as one does, under steady writes, with no notice of its own).
        # The advances not yet due, oldest first, and the one timer armed for the oldest.
        self._announced_commit = 0
        self._commits: deque[tuple[float, int]] = deque()
        self._commit_notice: Timer | None = None
        self._notice_at = 0.0
        self._last_append: (
            tuple[tuple[int, int, int, int], raft_pb2.AppendEntriesRequest] | None
        ) = None
        self._quorum_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        # When each lease expires, by this term's clock (lease_keeper.py).
        self.leases = LeaseKeeper(node, term)

    def start(self) -> None:
        """Watch that a majority still answers (check quorum), and the leases' time."""
        task = self.node.spawn(self.check_quorum(self.term), name="check-quorum")
        self._tasks = [task] if task is not None else []
        self.leases.start()

    def stop(self) -> None:
        """The term's leadership is over: stop every task and snapshot transfer it started."""
        self.transfer = None
        self.leases.stop()
        if self._commit_notice is not None:
            self._commit_notice.cancel()
            self._commit_notice = None
        for task in self._tasks + list(self._replicators.values()):
            task.cancel()
        self._tasks = []
        self._replicators = {}
        for progress in self.progress.values():
            self.end_snapshot_transfer(progress)
        self.progress = {}
        self.departing = {}
        waiting, self._round_waiters = self._round_waiters, {}
        for waiters in waiting.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(False)

    def config_changed(self) -> None:
        """The configuration in use changed: replicate to its members; count its majority."""
        self.sync_progress()
        self._quorum_wake.set()
        self._settle_rounds()

    def wake_all(self) -> None:
        """Every replicator looks again now (new entries, commit news or a read round)."""
        for progress in self.progress.values():
            progress.wake.set()

    def start_read_round(self) -> int:
        """Ask every follower for a heartbeat now; reads that arrive before any follower has been
        sent the round share it (its messages all leave after they arrived)."""
        if self._round_out:
            self._round_out = False
            self.read_round += 1
            self.node.counters.read_rounds += 1
            self.wake_all()
        return self.read_round

    def wait_confirmed(self, read_round: int) -> asyncio.Future[bool]:
        """A future that becomes True once `confirmed(read_round)`, or False when this term's
        leadership ends first. The round is checked once per reply, not once per read waiting."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        waiters = self._round_waiters.get(read_round)
        if waiters is not None:
            waiters.append(waiter)
        elif self.confirmed(read_round):
            waiter.set_result(True)
        else:
            self._round_waiters[read_round] = [waiter]
        return waiter

    def _settle_rounds(self) -> None:
        """Wake the reads of every round a majority has now confirmed."""
        for read_round in [r for r in self._round_waiters if self.confirmed(r)]:
            for waiter in self._round_waiters.pop(read_round):
                if not waiter.done():  # not given up
                    waiter.set_result(True)

    def confirmed(self, read_round: int) -> bool:
        """Whether a majority (counting this node) answered `read_round` or a later one."""
        acked = [i for i, p in self.progress.items() if p.acked_round >= read_round]
        return self.node.config.has_majority([self.node.node_id, *acked])

    def sync_progress(self) -> None:
        """Leader: replicate to every other member of the configuration in use; keep sending to a
        removed follower until it has been told its removal committed."""
        node = self.node
        term = node.current_term
        now = node.clock.now()
        for peer_id in node.peers:
            self.departing.pop(peer_id, None)
            if peer_id not in self.progress:
                # A new follower, or the votes just won: count as heard from, for check quorum.
                self.progress[peer_id] = Progress(next_index=node.log.last_index + 1, heard_at=now)
                task = node.spawn(self._replicate(peer_id, term), name=f"replicate-{peer_id}")
                if task is not None:
                    self._replicators[peer_id] = task
        for peer_id in list(self.progress):
            if peer_id not in node.peers and peer_id not in self.departing:
                self.departing[peer_id] = node.configs.latest_index

    def stop_replicating(self, peer_id: int) -> None:
        progress = self.progress.pop(peer_id, None)
        self.departing.pop(peer_id, None)
        if progress is not None:
            self.end_snapshot_transfer(progress)
        task = self._replicators.pop(peer_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def check_quorum(self, term: int) -> None:
        """Step down once a majority (counting this node) has not answered for an election timeout,
        so a leader cut off from the others stops taking writes and reads that cannot succeed."""
        node = self.node
        window = node.timing.election_timeout_max
        while node.is_leader and node.current_term == term:
            heard = self._majority_heard_at()
            # One expression for the test and the timer, so a timer firing on time is never early.
            deadline = heard + window
            if node.clock.now() >= deadline:
                answered = node.config.count(
                    [node.node_id]
                    + [
                        i
                        for i, p in self.progress.items()
                        if p.heard_at > node.clock.now() - window
                    ]
                )
                node.become_follower(
                    term,
                    None,
                    f"only {answered} of {node.cluster_size} nodes (counting me) answered in the "
                    f"last {window * 1000:.0f} ms; I may be cut off from the majority (check quorum)",
                )
                return
            # A new configuration has another majority: the loop looks again at once.
            self._quorum_wake = asyncio.Event()
            await wait_until_time(node.clock, self._quorum_wake, deadline)

    def _majority_heard_at(self) -> float:
        """The latest time by which a majority of the voters, counting this node if it votes, had
        answered us."""
        node = self.node
        heard = {i: p.heard_at for i, p in self.progress.items()}
        heard[node.node_id] = node.clock.now()
        majority = node.config.majority_value(heard)
        return majority if majority is not None else float("-inf")

    async def _replicate(self, peer_id: int, term: int) -> None:
        """Keep one follower's log in step with ours: entries when it lacks them, else heartbeats."""
        node = self.node
        progress = self.progress[peer_id]
        while (
            node.is_leader and node.current_term == term and self.progress.get(peer_id) is progress
        ):
            now = node.clock.now()
            if peer_id in self.departing and self._gave_up_on_departing(peer_id, progress, now):
                return
            has_entries = progress.next_index <= node.log.last_index
            commit_news = min(self._announced_commit, progress.match_index) > progress.told_commit
            commit_news = commit_news or progress.sent_round < self.read_round
            # One expression for both the test and the timer: with `now - last_sent >= interval`
            # rounding could call a timer that fired exactly on time early, and the task would
            # re-arm the same instant forever.
            next_heartbeat = progress.last_sent + node.timing.heartbeat_interval
            heartbeat_due = now >= next_heartbeat
            if now < progress.retry_at or not (has_entries or commit_news or heartbeat_due):
                wait = max(progress.retry_at, next_heartbeat)
                progress.wake.clear()
                await wait_until_time(node.clock, progress.wake, wait)
                continue
            await self._send_append(peer_id, term, progress)

    async def _send_append(self, peer_id: int, term: int, progress: Progress) -> None:
        node = self.node
        prev = progress.next_index - 1
        if prev < node.log.base_index:
            await self._send_snapshot_chunk(peer_id, term, progress)
            return
        entries = node.log.entries(
            progress.next_index, MAX_ENTRIES_PER_MESSAGE, MAX_BYTES_PER_MESSAGE
        )
        # Followers in step get the same message: built (and, by the transport, encoded) once.
        # Within a term the leader's log only grows, so these numbers determine its content.
        key = (term, prev, entries[-1].index if entries else prev, node.commit_index)
        if self._last_append is not None and self._last_append[0] == key:
            request = self._last_append[1]
        else:
            request = raft_pb2.AppendEntriesRequest(
                term=term,
                requester_id=node.node_id,
                prev_log_index=prev,
                prev_log_term=node.log.term_at(prev),
                leader_commit=node.commit_index,
                log_entries=entries,
            )
            self._last_append = (key, request)
        sent_at = progress.last_sent = node.clock.now()
        read_round = progress.sent_round = self.read_round
        self._round_out = True
        if entries:
            node.narrate.debug("sending %d entries from %d to %d", len(entries), prev + 1, peer_id)
        counters = node.counters
        counters.sent_append(len(entries))
        try:
            reply = await node.transport.append_entries(
                peer_id, request, timeout=node.timing.append_timeout
            )
        except PeerUnreachableError as e:
            node.narrate.debug("append to %d failed: %s", peer_id, e)
            progress.retry_at = node.clock.now() + node.timing.heartbeat_interval
            return
        counters.messages_received += 1
        if node.feed.active:
            self._tell_sent(peer_id, request, reply)
        if reply.term == term:
            # The follower heard from us after `sent_at`; that is what check quorum counts.
            progress.heard_at = max(progress.heard_at, sent_at)
        if reply.term == term and read_round > progress.acked_round:
            # Any reply of our own term shows the follower still takes us as its leader.
            progress.acked_round = read_round
            if self._round_waiters:
                self._settle_rounds()
            node.notify()
        self.handle_append_reply(peer_id, request, reply)

    def _tell_sent(
        self,
        peer_id: int,
        request: raft_pb2.AppendEntriesRequest,
        reply: raft_pb2.AppendEntriesResponse,
    ) -> None:
        count = len(request.log_entries)
        what = (
            f"{count} {'entry' if count == 1 else 'entries'} after index {request.prev_log_index}"
            if count
            else "heartbeat"
        )
        self.node.feed.emit(
            "replicate",
            f"{what} to {peer_id}: {'ok' if reply.success else 'refused'}",
            action="send",
            peer=peer_id,
            index=request.prev_log_index + 1,
            count=count,
            ok=reply.success,
        )

    def handle_append_reply(
        self,
        peer_id: int,
        request: raft_pb2.AppendEntriesRequest,
        reply: raft_pb2.AppendEntriesResponse,
    ) -> None:
        node = self.node
        if node.step_down_if_newer(reply.term, f"{peer_id}'s append reply"):
            return
        if not node.is_leader or node.current_term != request.term:
            return
        progress = self.progress.get(peer_id)
        if progress is None:
            return  # no longer a member
        if reply.success:
            # What we sent, not what the reply claims, bounds what the follower holds.
            match = request.prev_log_index + len(request.log_entries)
            if match > progress.match_index:
                progress.match_index = match
            progress.next_index = max(progress.next_index, match + 1)
            progress.told_commit = max(
                progress.told_commit, min(request.leader_commit, progress.match_index)
            )
            self.advance_commit()
            self.after_follower_progress(peer_id, progress)
            return
        # Back up past the whole conflicting term at once (section 5.3, "the protocol can be
        # optimized"): to after our last entry of that term, or to the follower's first entry of it.
        next_index = reply.conflict_index
        if reply.conflict_term > 0:
            lowest = node.log.base_index
            for index in range(min(request.prev_log_index, node.log.last_index), lowest, -1):
                t = node.log.term_at(index)
                if t == reply.conflict_term:
                    next_index = index + 1
                    break
                if t < reply.conflict_term:
                    break
        next_index = max(progress.match_index + 1, min(next_index, request.prev_log_index))
        if next_index < 1:
            next_index = 1
        node.narrate.debug(
            "%d rejected entries after %d; retrying from %d",
            peer_id,
            request.prev_log_index,
            next_index,
        )
        progress.next_index = next_index

    def advance_commit(self) -> None:
        """Commit the highest index durable on a majority, if it is from this term (section 5.4.2).

        The majority is of the voters of the configuration in use; a leader that is removing
        itself does not count itself (thesis section 4.2.2)."""
        node = self.node
        matches = {i: p.match_index for i, p in self.progress.items()}
        matches[node.node_id] = node.log.durable_index
        candidate = node.config.majority_value(matches)
        if candidate is None:
            return
        if candidate <= node.commit_index or node.log.term_at(candidate) != node.current_term:
            return
        node.commit_index = candidate
        if node.feed.active or node.narrate.isEnabledFor(logging.INFO):
            # Counting the nodes that hold it costs a pass over them: only for a line said.
            node.narrate.tell(
                "commit",
                "committed up to index %d (durable on %d of %d nodes)",
                candidate,
                node.config.count(i for i, m in matches.items() if m >= candidate),
                node.cluster_size,
                index=candidate,
            )
        node.apply_committed()
        self._commits.append((node.clock.now(), candidate))
        if self._commit_notice is None:
            self._arm_commit_notice()
        node.changes.after_leader_commit()

    def _arm_commit_notice(self) -> None:
        node = self.node
        self._notice_at = self._commits[0][0] + node.timing.commit_notice_delay
        self._commit_notice = node.clock.call_at(self._notice_at, self._announce_commit)

    def _announce_commit(self) -> None:
        """Followers not yet told a commit index that advanced a commit_notice_delay ago get a
        message that says it (the time the timer was armed for counts as reached)."""
        node = self.node
        self._commit_notice = None
        if not node.is_leader or node.stopped:
            return
        due = max(node.clock.now(), self._notice_at) - node.timing.commit_notice_delay
        commits = self._commits
        announced = self._announced_commit
        while commits and commits[0][0] <= due:
            announced = max(announced, commits.popleft()[1])
        if announced > self._announced_commit:
            self._announced_commit = announced
            self.wake_all()
        if commits:
            self._arm_commit_notice()

    def after_follower_progress(self, peer_id: int, progress: Progress) -> None:
        """Leader: a follower holds more of the log than before."""
        node = self.node
        if self.transfer is not None and self.transfer.target == peer_id:
            node.notify()  # the transfer waits for its target to catch up
        removal = self.departing.get(peer_id)
        if removal is not None and progress.told_commit >= removal:
            node.narrate.info("%d knows its removal committed: no longer sending to it", peer_id)
            self.stop_replicating(peer_id)
            return
        if peer_id in node.configs.latest.learners:
            node.changes.maybe_promote(peer_id)

    def _gave_up_on_departing(self, peer_id: int, progress: Progress, now: float) -> bool:
        """Stop telling a removed follower about its removal once that has committed, if it would
        need a whole snapshot to learn it or has not answered for an election timeout: it must
        not hold back log compaction or cost the leader work for good."""
        node = self.node
        if self.departing[peer_id] > node.commit_index:
            return False
        needs_snapshot = progress.next_index - 1 < node.log.base_index
        silent = now - progress.heard_at > node.timing.election_timeout_max
        if not (needs_snapshot or silent):
            return False
        node.narrate.info(
            "stopped sending to removed node %d: %s",
            peer_id,
            "it would need a snapshot" if needs_snapshot else "it does not answer",
        )
        self.stop_replicating(peer_id)
        return True

    async def _send_snapshot_chunk(self, peer_id: int, term: int, progress: Progress) -> None:
        """Send a follower whose next entry is compacted away one chunk of the newest snapshot;
        one chunk in flight per follower, the next once it answers (thesis section 5.3)."""
        node = self.node
        store = node.log.snapshots
        latest = store.latest if store is not None else None
        if store is None or latest is None:
            node.narrate.error("%d needs entries I no longer have, and I have no snapshot", peer_id)
            progress.retry_at = node.clock.now() + node.timing.heartbeat_interval
            return
        meta = progress.snapshot
        if meta is None:
            # The file stays until this transfer ends, even if newer snapshots are taken meanwhile.
            meta = progress.snapshot = latest
            store.pin(meta)
            progress.snapshot_offset = 0
            progress.snapshot_heard = node.clock.now()
            node.narrate.tell(
                "snapshot",
                "sending snapshot up to index %d (%s) to %d",
                meta.index,
                size_text(meta.size),
                peer_id,
                action="send",
                peer=peer_id,
                index=meta.index,
            )
        offset = progress.snapshot_offset
        policy = node.snapshot_policy
        chunk = policy.chunk_bytes if policy is not None else SNAPSHOT_CHUNK_BYTES
        try:
            data = await store.read_chunk(meta, offset, chunk)
        except OSError as e:
            node.narrate.error("could not read the snapshot for %d: %s", peer_id, e)
            self.end_snapshot_transfer(progress)
            progress.retry_at = node.clock.now() + node.timing.heartbeat_interval
            return
        request = raft_pb2.InstallSnapshotRequest(
            term=term,
            requester_id=node.node_id,
            last_included_index=meta.index,
            last_included_term=meta.term,
            offset=offset,
            total_size=meta.size,
            data=data,
            done=offset + len(data) >= meta.size,
            checksum=meta.checksum,
        )
        sent_at = progress.last_sent = node.clock.now()
        read_round = progress.sent_round = self.read_round
        self._round_out = True
        if node.feed.active:
            node.feed.emit(
                "snapshot",
                f"snapshot chunk to {peer_id}: {len(data)} bytes at offset {offset} of {meta.size}",
                action="send",
                peer=peer_id,
                index=meta.index,
                count=len(data),
            )
        try:
            reply = await node.transport.install_snapshot(
                peer_id, request, timeout=node.timing.append_timeout
            )
        except PeerUnreachableError as e:
            node.narrate.debug("snapshot chunk to %d failed: %s", peer_id, e)
            now = node.clock.now()
            progress.retry_at = now + node.timing.heartbeat_interval
            if progress.snapshot is meta and now - progress.snapshot_heard > (
                node.timing.election_timeout_max
            ):
                # A follower that stays away must not keep the log and this file from being
                # compacted; the transfer starts afresh, with the newest snapshot, once it answers.
                node.narrate.info("stopped sending a snapshot to %d: it does not answer", peer_id)
                self.end_snapshot_transfer(progress)
            return
        if node.step_down_if_newer(reply.term, f"{peer_id}'s snapshot reply"):
            return
        if not node.is_leader or node.current_term != term or reply.term != term:
            return
        progress.heard_at = max(progress.heard_at, sent_at)
        if read_round > progress.acked_round:
            progress.acked_round = read_round
            self._settle_rounds()
            node.notify()
        if progress.snapshot is not meta:
            return
        progress.snapshot_heard = node.clock.now()
        if reply.installed:
            self.end_snapshot_transfer(progress)
            progress.match_index = max(progress.match_index, meta.index)
            progress.next_index = max(progress.next_index, meta.index + 1)
            node.narrate.tell(
                "snapshot",
                "%d installed my snapshot up to index %d",
                peer_id,
                meta.index,
                action="sent",
                peer=peer_id,
                index=meta.index,
                ok=True,
            )
            self.advance_commit()
            self.after_follower_progress(peer_id, progress)
            return
        progress.snapshot_offset = reply.next_offset if 0 <= reply.next_offset < meta.size else 0

    def end_snapshot_transfer(self, progress: Progress) -> None:
        node = self.node
        if progress.snapshot is not None and node.log.snapshots is not None:
            node.log.snapshots.unpin(progress.snapshot)
        progress.snapshot = None
