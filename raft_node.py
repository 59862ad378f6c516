"""One Raft node's consensus core: role, term, vote, election, a follower's handling of the leader's
messages, commit and apply order, and the configuration bookkeeping. `python raft_node.py` runs one
as a daemon; the process around it lives in node_daemon.py.

A map of the node, in the order a message flows through it:

- access.py        who may talk to the node at all (every peer message is checked there first)
- raft_node.py     this module: RaftNode changes role and term, acts on a leader's
                   AppendEntries, applies committed entries in order and tracks the
                   configurations in the log (thesis 4.1)
- election.py      the rounds of an election: pre-votes and votes asked, counted and answered
- compaction.py    snapshots: taking them and compacting the log, receiving a leader's
- leader.py        the leader's term, created on winning an election and dropped on stepping
                   down: per-follower progress, replication, commit from match indices, check
                   quorum, heartbeat/read rounds, sending snapshots, departing followers
- reads.py         linearizable reads by ReadIndex, on the leader and on followers
- proposals.py     a client's write: appended by the leader, answered once applied
- transfer.py      leadership transfer: sending TimeoutNow, and acting on one received
- node_events.py   what the node does, as events for Cluster.Events subscribers (`feed.active`
                   guards every hook, so a node nobody watches builds none)
- membership_changes.py   adding and removing members, one at a time; promoting learners
- membership.py    configurations and the quorum arithmetic (the only place a majority is counted)
- node_types.py    the shared names: roles, errors, settings, Clock/Timer/Transport protocols
- log.py, disk.py, snapshot.py, state_machine.py   durable log, disk layer, snapshot files, the
                   replicated dict

The consensus logic talks to the outside world only through small interfaces (a `Transport` to
reach peers, a `RaftLog` for durable state, a `Clock` for time and timers, and a seeded
`random.Random`), so the same code runs in the daemon and in tests. References are to the Raft paper
("section 5.x", Figure 2) and to Ongaro's thesis.
"""

from __future__ import annotations

import asyncio
import importlib
import random
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from access import Access
from cluster_config import ClusterConfig, NodeAddress
from compaction import Snapshots
from counters import Counters
from disk import DiskFullError
from election import Election
from leader import LeaderTerm, Progress
from log import RaftLog
from membership import ConfigHistory, Membership
from membership_changes import MembershipChanges
from node_events import EventFeed, EventNarrator
from node_status import NodeEvents, NodeObserver, NodeStatus, status_of
from node_types import (
    HANDOVER_TIMEOUTS,
    MAX_WIRE_NUMBER,
    Clock,
    CommitUnknownError,
    InvalidRequestError,
    LoopClock,
    NotLeaderError,
    OverloadedError,
    PeerUnreachableError,
    Role,
    SessionExpiredError,
    SnapshotPolicy,
    Timer,
    Timing,
    TransferFailedError,
    Transport,
    UnavailableError,
    wait_until_time,
)
from proposals import Writes
from reads import Reads
from rpc import raft_pb2
from state_machine import ApplyResult, KeyValueStateMachine
from task_scheduler import BackgroundTasks
from transfer import Transfers


class _Narrator(EventNarrator):
    """Prefixes every line with the node's id, role and term, as the seed's narration did; lines
    said with `tell` also go to the node's event stream (node_events.py)."""


class RaftNode:
    """The consensus state of one member and the rules of Figure 2 that change it."""

    def __init__(
        self,
        node_id: int,
        cluster: ClusterConfig,
        log: RaftLog,
        transport: Transport,
        timing: Timing | None = None,
        rng: random.Random | None = None,
        clock: Clock | None = None,
        wall_clock: Callable[[], float] | None = None,
        snapshot_policy: SnapshotPolicy | None = None,
        join: bool = False,
    ) -> None:
        """`cluster` is the configuration a fresh cluster starts with; once the log or a snapshot
        holds a configuration, that one is used instead (thesis section 4.1). With `join`, the
        node starts knowing no members and waits for a leader to replicate the cluster's log to it.
        """
        self.node_id = node_id
        self.cluster = cluster
        self.me: NodeAddress = cluster.node(node_id)
        self.log = log
        self.transport = transport
        self.timing = timing or Timing()
        self.rng = rng or random.Random()
        self.clock: Clock = clock or LoopClock()
        # Seconds since the Unix epoch; only stamps log time on entries (sessions expire by it).
        self.wall_clock: Callable[[], float] = wall_clock or time.time
        self.state_machine = KeyValueStateMachine()
        self.narrate = _Narrator(self)
        # What this node does, for Cluster.Events subscribers; `feed.active` guards every hook.
        self.feed = EventFeed(self)
        self.counters = Counters()  # what replication costs, for /metrics and the benchmark
        # None: this node never takes snapshots of its own (it still installs a leader's).
        self.snapshot_policy = snapshot_policy

        self._role = Role.FOLLOWER
        self.leader_id: int | None = None
        # Volatile state on all servers (Figure 2); last_applied lives in the state machine.
        self.commit_index = 0
        # Leader state, created on winning an election and dropped on stepping down.
        self.leadership: LeaderTerm | None = None
        # Set (and replaced) whenever commit, apply or read confirmations move; readers wait on it.
        self._changed = asyncio.Event()

        # When this node last heard from the leader of its term (thesis section 4.2.3).
        self.leader_contact = float("-inf")
        # An election timeout passed since this node last heard from its leader.
        self._leader_silent = False
        self.observer: NodeObserver = NodeObserver()
        self.events: NodeEvents = NodeEvents()

        self._tasks = BackgroundTasks()
        self._election_timer: Timer | None = None
        self._timer_armed_at = 0.0
        self._timer_deadline = 0.0  # when it fires, by the wall clock (for the event stream)
        self._stopped = False

        # The parts of the node with a concern of their own (see the module docstring).
        self.access = Access(self)
        self.election = Election(self)
        self.snapshots = Snapshots(self)
        self.reads = Reads(self)
        self.transfers = Transfers(self)
        self.changes = MembershipChanges(self)
        self.writes = Writes(self)

        # Membership (thesis chapter 4): the configurations in the log, the latest in use.
        self.bootstrap_config = Membership.empty() if join else Membership.bootstrap(cluster)
        self.configs = ConfigHistory(self.bootstrap_config)
        # The other members (voters and learners) of the configuration in use.
        self.peers: dict[int, NodeAddress] = {}
        # Set once this node learns that the configuration removing it committed.
        self.removed = asyncio.Event()
        restored = log.restored
        if restored is not None:
            self.rebuild_configs(restored.members, restored.index)
        else:
            self.rebuild_configs(self.bootstrap_config, 0)

    # ---- small read-only views -------------------------------------------------------------

    @property
    def role(self) -> str:
        return self._role.value

    @property
    def current_term(self) -> int:
        return self.log.current_term

    @property
    def voted_for(self) -> int | None:
        return self.log.voted_for

    @property
    def last_applied(self) -> int:
        return self.state_machine.last_applied

    @property
    def time_scale(self) -> float:
        return self.timing.time_scale

    def log_position(self) -> tuple[int, int, int]:
        """(last index, last term, the last index the newest snapshot covers; 0: none)."""
        latest = self.log.snapshots.latest if self.log.snapshots is not None else None
        return self.log.last_index, self.log.last_term, latest.index if latest is not None else 0

    @property
    def config(self) -> Membership:
        """The configuration in use: the latest in the log, committed or not (thesis 4.1)."""
        return self.configs.latest

    @property
    def cluster_size(self) -> int:
        """The number of voters."""
        return len(self.configs.latest.voters)

    @property
    def quorum(self) -> int:
        return self.configs.latest.quorum

    @property
    def is_voter(self) -> bool:
        return self.configs.latest.is_voter(self.node_id)

    @property
    def may_stand(self) -> bool:
        """Whether this node may stand for election (access.py states the rule)."""
        return self.access.may_stand()

    @property
    def is_leader(self) -> bool:
        return self._role is Role.LEADER

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def progress(self) -> dict[int, Progress]:
        """As leader, what it knows of each follower (Figure 2: nextIndex, matchIndex); else empty."""
        return self.leadership.progress if self.leadership is not None else {}

    def leader_is_recent(self) -> bool:
        """Whether this node heard from a current leader within the minimum election timeout
        (thesis section 4.2.3); a leader counts as hearing from itself."""
        return self.access.leader_is_recent()

    @property
    def election_timer(self) -> tuple[Timer, float] | None:
        """The armed election timer and when it was armed; None while none is (a leader, or a
        node that may not stand). Figure 2's timer rules are about when it is re-armed."""
        if self._election_timer is None:
            return None
        return self._election_timer, self._timer_armed_at

    @property
    def transferring_snapshot(self) -> bool:
        """Whether a snapshot is being received from a leader, or sent to a follower."""
        return self.snapshots.receiving or any(p.snapshot for p in self.progress.values())

    def leader(self) -> tuple[int | None, str | None]:
        """The leader this node knows of in its current term, and the leader's client address."""
        if self.leader_id is None:
            return None, None
        if self.leader_id == self.node_id:
            return self.node_id, self.me.client_address
        peer = self.configs.latest.address(self.leader_id)
        return self.leader_id, peer.client_address if peer else None

    def membership(self) -> tuple[Membership, int, bool]:
        """The configuration in use, the log index it came from (0: the one the cluster started
        with) and whether this node knows it is committed."""
        index = self.configs.latest_index
        return self.configs.latest, index, index <= self.commit_index

    def get_value(self, key: str) -> str | None:
        """The seed's read: this node's applied state, which may lag the leader's."""
        return self.state_machine.get(key)

    @property
    def serving(self) -> bool:
        """Whether this node is in service: a voter, not removed or stopping, that leads or knows
        a leader it has heard from since its last election timeout (what health checks report)."""
        if self._stopped or self.removed.is_set() or not self.is_voter:
            return False
        if self._role is Role.LEADER:
            return True
        return self.leader_id is not None and not self._leader_silent

    def status(self) -> NodeStatus:
        """This node's view of itself and, when it leads, of every other member."""
        return status_of(self)

    # ---- lifecycle -------------------------------------------------------------------------

    def start_from_snapshot(self) -> None:
        """Restore the state machine from the snapshot the log was opened with, if any (once);
        SnapshotError or ValueError if its state does not decode."""
        self.snapshots.restore_at_start()

    def start(self) -> None:
        """Begin as a follower (section 5.2) and wait for a leader or an election timeout."""
        self.start_from_snapshot()
        self.narrate.info(
            "starting as follower with %d log entries (last term %d); voted for %s",
            self.log.last_index,
            self.log.last_term,
            self.voted_for if self.voted_for is not None else "nobody",
        )
        self.reset_election_timer()

    async def stop(self) -> None:
        """Stop taking part: cancel timers and background work; fail waiting proposals."""
        if self._stopped:
            return
        self._stopped = True
        self._cancel_election_timer("stopping")
        self.writes.fail_waiting("the node is shutting down")
        self.observer.state_changed()
        await self._tasks.close()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None:
        if self._stopped:
            coro.close()  # a stopped node starts nothing new
            return None
        return self._tasks.spawn(coro, name=name)

    # ---- timers ----------------------------------------------------------------------------

    def reset_election_timer(self, quietly: bool = False) -> None:
        """Arm the election timer with a fresh random timeout (section 5.2: randomized per wait);
        `quietly`: the event that caused it reports the new deadline itself."""
        self._cancel_election_timer()
        if self._stopped or self._role is Role.LEADER or not self.may_stand:
            return  # a learner or a removed node never stands for election
        timeout = self.rng.uniform(
            self.timing.election_timeout_min, self.timing.election_timeout_max
        )
        self._timer_armed_at = self.clock.now()
        self._election_timer = self.clock.call_at(
            self._timer_armed_at + timeout, self._on_election_timeout
        )
        self._timer_deadline = self.wall_clock() + timeout
        if self.feed.active and not quietly:
            self.feed.timer_armed(timeout, self._timer_deadline)

    def _cancel_election_timer(self, why: str = "") -> None:
        """Stop the election timer; `why` (for the event stream) when none is armed after it."""
        if self._election_timer is not None:
            self._election_timer.cancel()
            self._election_timer = None
            if why and self.feed.active:
                self.feed.emit("timer", f"election timer stopped: {why}", action="stopped")

    def _on_election_timeout(self) -> None:
        self._election_timer = None
        if self._stopped or self._role is Role.LEADER or not self.may_stand:
            return
        if not self._leader_silent:
            self._leader_silent = True
            self.observer.state_changed()
        if self.log.disk_full:
            # It could persist neither its vote nor its entries: it must not lead. Each timeout
            # tries the disk again, so a node alone still notices when space returns.
            self.narrate.info("heard no leader, but my disk is full: not standing for election")
            self.spawn(self._retry_full_disk(), name="retry-disk")
            self.reset_election_timer()
            return
        waited = self.clock.now() - self._timer_armed_at
        self.narrate.tell(
            "pre_vote",
            "heard no leader for %d ms: asking whether a majority would elect me in term %d "
            "(pre-vote)",
            waited * 1000,
            self.current_term + 1,
            action="ask",
            count=self.quorum,
        )
        self.start_pre_vote()

    def _heard_from_leader(self, quietly: bool = False) -> None:
        """The leader of our term just spoke: postpone any election (Figure 2) and note when."""
        self.leader_contact = self.clock.now()
        self.election.pre_vote_term = None
        self.reset_election_timer(quietly)
        if self._leader_silent:
            self._leader_silent = False
            self.observer.state_changed()

    # ---- term and role changes -------------------------------------------------------------

    def become_follower(self, term: int, leader_id: int | None, why: str) -> None:
        """Adopt `term` (if newer) and follow. Figure 2: any newer term makes a server a follower."""
        was = self._role
        newer = term > self.current_term
        if newer:
            self.log.set_hard_state(term, None)
        self._role = Role.FOLLOWER
        self.election.votes.clear()
        if was is not Role.FOLLOWER:
            self.narrate.tell("role", "became follower: %s", why, detail=why)
        elif newer and self.feed.active:
            self.feed.emit("role", f"now in term {term}: {why}", detail=why)
        if was is Role.LEADER:
            self._stop_leading()
        self._set_leader(leader_id)
        if was is not Role.FOLLOWER:
            self.observer.state_changed()
        # Only a leader has no election timer running. A follower that merely adopts a newer term
        # keeps its timer: Figure 2 resets it only for the current leader or a granted vote, and
        # resetting it for every refused candidate would starve the nodes able to win.
        if self._election_timer is None:
            self.reset_election_timer()

    def step_down_if_newer(self, term: int, source: str) -> bool:
        """Figure 2: a term in a request or reply newer than ours makes us a follower of that term."""
        if term <= self.current_term:
            return False
        self.become_follower(term, None, f"{source} has newer term {term}")
        # No reply waits on this change, but it must reach the disk before this node votes or acts
        # in the new term; every vote and append reply flushes first, so a background flush suffices.
        self.spawn(self._retry_full_disk(), name="flush-term")
        return True

    def _set_leader(self, leader_id: int | None) -> None:
        changed = leader_id != self.leader_id
        self.leader_id = leader_id
        if changed:
            if leader_id is not None and leader_id != self.node_id:
                self.narrate.tell("leader", "following leader %d", leader_id, peer=leader_id)
            elif self.feed.active:
                self.feed.emit("leader", "no leader known" if leader_id is None else "I lead")
            self.notify()  # a transfer waits to learn who leads now
            self.observer.state_changed()

    # ---- elections (section 5.2; the rounds of votes are run and answered by Election) -----

    def start_pre_vote(self) -> None:
        """Ask every peer whether it would vote for this node in the next term (thesis 9.6)."""
        self.election.start_pre_vote()

    def handle_pre_vote_reply(
        self, peer_id: int, request: raft_pb2.VoteRequest, reply: raft_pb2.RequestVoteResponse
    ) -> None:
        self.election.handle_pre_vote_reply(peer_id, request, reply)

    def handle_vote_reply(
        self, peer_id: int, request: raft_pb2.VoteRequest, reply: raft_pb2.RequestVoteResponse
    ) -> None:
        self.election.handle_vote_reply(peer_id, request, reply)

    async def handle_request_vote(
        self, request: raft_pb2.VoteRequest
    ) -> raft_pb2.RequestVoteResponse:
        """RequestVote receiver rules (Figure 2, thesis 9.6 and 4.2.3): see Election."""
        return await self.election.handle_request_vote(request)

    async def start_election(self, transfer: bool = False) -> None:
        """Become a candidate: new term, vote for self, make both durable, then ask every peer.

        `transfer`: the leader asked this node to take over (TimeoutNow), so its vote requests say
        so, and voters grant them even though they heard from that leader moments ago."""
        term = self.become_candidate(transfer)
        if term is not None:
            await self.election.ask_for_votes(term, transfer)

    def become_candidate(self, transfer: bool) -> int | None:
        """Take the next term and vote for itself, at once (so nothing can come in between the
        decision to stand and the new term); None if this node may not stand now."""
        if self._stopped or self._role is Role.LEADER or not self.may_stand:
            return None
        self.election.pre_vote_term = None
        self._role = Role.CANDIDATE
        self.leader_id = None
        term = self.current_term + 1
        self.log.set_hard_state(term, self.node_id)
        self.election.votes = {self.node_id}
        if self.feed.active:
            self.feed.candidate(term, transfer)
        self.reset_election_timer()
        self.observer.election_started()
        self.observer.state_changed()
        self.events.standing(term, transfer)
        return term

    # ---- log replication, follower side (section 5.3) --------------------------------------

    async def handle_append_entries(
        self, request: raft_pb2.AppendEntriesRequest
    ) -> raft_pb2.AppendEntriesResponse:
        """AppendEntries receiver rules (Figure 2); the reply leaves only once the entries are durable."""
        self.counters.received_append(len(request.log_entries))
        reply = await self._receive_append(request)
        if self.feed.active:
            armed = self._election_timer is not None
            self.feed.received(request, reply, self._timer_deadline if armed else 0.0)
        return reply

    async def _receive_append(
        self, request: raft_pb2.AppendEntriesRequest
    ) -> raft_pb2.AppendEntriesResponse:
        self.access.check_message(
            request.requester_id,
            request.term,
            request.prev_log_index,
            request.prev_log_term,
            request.leader_commit,
        )
        self.access.check_entries(request)
        self.access.check_unlisted_leader(request.requester_id, request.term)
        leader = request.requester_id
        self.narrate.debug(
            "append from %d: term %d, prev (index %d, term %d), %d entries, leader commit %d",
            leader,
            request.term,
            request.prev_log_index,
            request.prev_log_term,
            len(request.log_entries),
            request.leader_commit,
        )
        if request.term < self.current_term:
            self.narrate.debug("rejected append from %d: stale term %d", leader, request.term)
            return raft_pb2.AppendEntriesResponse(term=self.current_term, success=False)
        if request.term > self.current_term or self._role is Role.CANDIDATE:
            # A candidate that hears from a leader of its own term lost the election (section 5.2).
            self.become_follower(request.term, leader, f"{leader} leads term {request.term}")
        elif self._role is Role.LEADER:
            # Two leaders in one term would break election safety; refuse and say so loudly.
            self.narrate.error("refused append from %d: I lead this term myself", leader)
            return raft_pb2.AppendEntriesResponse(term=self.current_term, success=False)
        term = self.current_term
        self._set_leader(leader)
        self._heard_from_leader(quietly=True)

        prev = request.prev_log_index
        prev_term = request.prev_log_term
        entries = list(request.log_entries)
        base = self.log.base_index
        if prev < base:
            # Entries up to the snapshot point are committed, so they match the leader's (Log
            # Matching); only the ones after it need checking.
            entries = [e for e in entries if e.index > base]
            skipped = len(request.log_entries) - len(entries)
            if prev + skipped < base:
                return await self._append_reply(True, prev + len(request.log_entries), request)
            prev, prev_term = base, self.log.base_term
        if prev > self.log.last_index:
            reply = raft_pb2.AppendEntriesResponse(
                term=term, success=False, conflict_term=0, conflict_index=self.log.last_index + 1
            )
            self.narrate.debug(
                "log too short for prev index %d; asking from %d", prev, reply.conflict_index
            )
            await self.log.flush()
            reply.term = self.current_term
            return reply
        if self.log.term_at(prev) != prev_term:
            conflict_term = self.log.term_at(prev)
            first = prev
            while first - 1 > self.log.base_index and self.log.term_at(first - 1) == conflict_term:
                first -= 1
            self.narrate.debug(
                "log mismatch at %d (mine has term %d); asking from %d", prev, conflict_term, first
            )
            await self.log.flush()
            return raft_pb2.AppendEntriesResponse(
                term=self.current_term,
                success=False,
                conflict_term=conflict_term,
                conflict_index=first,
            )

        for offset, entry in enumerate(entries):
            index = entry.index
            if index <= self.log.last_index:
                if self.log.term_at(index) == entry.term:
                    continue  # already have it (a repeated or reordered message)
                if index <= self.commit_index:
                    self.narrate.error(
                        "refused append from %d: it conflicts with committed entry %d",
                        leader,
                        index,
                    )
                    return raft_pb2.AppendEntriesResponse(term=term, success=False)
                self.narrate.tell(
                    "append",
                    "truncating my log from index %d: it conflicts with the leader's",
                    index,
                    action="truncate",
                    index=index,
                )
                self._truncate_log(index)
            self.append_to_log(entries[offset:])
            break
        return await self._append_reply(True, prev + len(entries), request)

    async def _append_reply(
        self, success: bool, match_index: int, request: raft_pb2.AppendEntriesRequest
    ) -> raft_pb2.AppendEntriesResponse:
        if request.leader_commit > self.commit_index:
            # Only entries known to match the leader's log may be committed here (Figure 2: min).
            new_commit = min(request.leader_commit, match_index)
            if new_commit > self.commit_index:
                self.commit_index = new_commit
                self.narrate.tell(
                    "commit",
                    "commit index now %d (told by the leader)",
                    new_commit,
                    index=new_commit,
                )
                self.apply_committed()
        await self.log.flush()
        # The term as it is now: if a newer leader appeared while the entries were being written,
        # the old leader learns of it here instead of counting this reply (section 5.1).
        return raft_pb2.AppendEntriesResponse(
            term=self.current_term, success=success, match_index=match_index
        )

    # ---- leadership (sections 5.3, 5.4) ----------------------------------------------------

    def become_leader(self) -> None:
        self.events.elected()
        self._role = Role.LEADER
        self.leader_id = self.node_id
        term = self.current_term
        self.narrate.tell(
            "role",
            "won the election with votes from %s; appending a no-op to commit earlier entries",
            ", ".join(str(v) for v in sorted(self.election.votes)),
            count=len(self.election.votes),
        )
        self._cancel_election_timer("I lead")
        if self.feed.active:
            self.feed.emit("leader", f"I lead term {term}", peer=self.node_id)
        self.election.votes.clear()
        leadership = self.leadership = LeaderTerm(self, term)
        leadership.sync_progress()
        # Section 8: a no-op of the new term lets entries of earlier terms commit without a new write.
        self.append_as_leader(raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_NOOP))
        leadership.start()
        self._leader_silent = False
        self.observer.election_won()
        self.observer.state_changed()
        self.events.leading()

    def _stop_leading(self) -> None:
        leadership, self.leadership = self.leadership, None
        if leadership is not None:
            leadership.stop()
        self.notify()
        self.writes.fail_waiting("leadership was lost before the write committed")

    # ---- writes (proposals.py appends them as leader and answers them once applied) --------

    async def propose_mapping(
        self, key: str, value: str, session: raft_pb2.Session | None = None
    ) -> int:
        """Store one mapping; once committed and applied here, its revision (see proposals.py)."""
        return await self.writes.propose_mapping(key, value, session)

    async def propose(self, command: raft_pb2.Command) -> ApplyResult:
        """Append a command; what applying it gave, once applied here (see proposals.py)."""
        return await self.writes.propose(command)

    async def propose_entries(
        self, entries: list[raft_pb2.LogEntry]
    ) -> list[ApplyResult | Exception]:
        """Append several clients' entries at once; each one's outcome (see proposals.py)."""
        return await self.writes.propose_entries(entries)

    def append_as_leader(self, entry: raft_pb2.LogEntry) -> int:
        """Leader: append an entry of this term to the log and let the replicators send it."""
        return self.writes.append_as_leader(entry)

    async def pause(self, seconds: float) -> None:
        """Wait `seconds` on this node's clock (the simulation's, in the simulation)."""
        await wait_until_time(self.clock, asyncio.Event(), self.clock.now() + seconds)

    async def _retry_full_disk(self) -> None:
        try:
            await self.log.flush()
        except DiskFullError:
            pass

    def handle_append_reply(
        self,
        peer_id: int,
        request: raft_pb2.AppendEntriesRequest,
        reply: raft_pb2.AppendEntriesResponse,
    ) -> None:
        """Count a follower's answer to AppendEntries (the leader's term does, in leader.py)."""
        if self.leadership is not None:
            self.leadership.handle_append_reply(peer_id, request, reply)
        else:
            self.step_down_if_newer(reply.term, f"{peer_id}'s append reply")

    # ---- leadership transfer (thesis section 3.10; transfer.py hands over, this follows) ----

    async def transfer_leadership(self, target_id: int | None = None) -> int:
        """Hand leadership to `target_id` (None or 0: the most up-to-date other node); return the
        id of the node that leads afterwards. See transfer.Transfers.transfer_leadership."""
        return await self.transfers.transfer_leadership(target_id)

    async def handle_timeout_now(
        self, request: raft_pb2.TimeoutNowRequest
    ) -> raft_pb2.TimeoutNowResponse:
        """The leader hands leadership over: see transfer.Transfers.handle_timeout_now."""
        return await self.transfers.handle_timeout_now(request)

    # ---- linearizable reads (thesis section 6.4, ReadIndex) --------------------------------

    async def read(self, key: str) -> str | None:
        """A linearizable read on the leader (reads.py); NotLeaderError elsewhere."""
        return await self.reads.read(key)

    async def linearizable_read(self, key: str) -> str | None:
        """A linearizable read on any node, by ReadIndex (reads.py)."""
        return await self.reads.linearizable_read(key)

    async def handle_read_index(
        self, request: raft_pb2.ReadIndexRequest
    ) -> raft_pb2.ReadIndexResponse:
        """A follower asks this leader for a read index (reads.py)."""
        return await self.reads.handle_read_index(request)

    def check_still_leader(self, term: int) -> None:
        if self._role is not Role.LEADER or self.current_term != term:
            raise NotLeaderError(*self.leader())

    async def wait_until(self, condition: Callable[[], bool], term: int) -> None:
        """Leader: wait until `condition` holds; NotLeaderError once this node no longer leads
        `term`."""
        while not condition():
            self.check_still_leader(term)
            await self._changed.wait()
        self.check_still_leader(term)

    async def wait_for_change(self) -> None:
        """Wait until commit, apply, read confirmations or the known leader next move."""
        await self._changed.wait()

    def notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # ---- applying committed entries --------------------------------------------------------

    def apply_committed(self) -> None:
        """Apply every committed entry not yet applied, exactly once and in index order."""
        self.notify()
        if self.last_applied < self.commit_index:
            self._apply_entries()
            self.snapshots.maybe_snapshot()
            self.check_removed()

    def _apply_entries(self) -> None:
        first = self.last_applied + 1
        while self.last_applied < self.commit_index:
            entry = self.log.entry(self.last_applied + 1)
            self.writes.applied(entry, self.state_machine.apply(entry))
        if self.feed.active:
            self.feed.applied(first, self.last_applied)

    # ---- membership (thesis chapter 4, one server at a time) -------------------------------

    def other_voters(self) -> list[int]:
        return [i for i in self.configs.latest.voters if i != self.node_id]

    def append_to_log(self, entries: list[raft_pb2.LogEntry]) -> None:
        """Append to the log; a configuration among the entries is in use from now on (4.1)."""
        self.log.append(entries)
        if self.feed.active:
            self.feed.appended(entries)
        before = self.configs.latest
        for entry in entries:
            if entry.kind == raft_pb2.ENTRY_KIND_CONFIG:
                self.configs.append(entry.index, Membership.from_proto(entry.config))
        if self.configs.latest is not before:
            self._config_changed(before)
        self.events.log_changed()

    def _truncate_log(self, index: int) -> None:
        """Drop entries from `index` on; a configuration among them is no longer in use."""
        self.log.truncate_from(index)
        before = self.configs.latest
        self.configs.truncate_from(index)
        if self.configs.latest is not before:
            self._config_changed(before)
        self.events.log_changed()

    def rebuild_configs(self, base: Membership, base_index: int) -> None:
        """Recompute the configurations from a snapshot's (or the bootstrap one) and the log."""
        before = self.configs.latest
        self.configs.reset(base, base_index)
        for index in range(max(base_index, self.log.base_index) + 1, self.log.last_index + 1):
            entry = self.log.entry(index)
            if entry.kind == raft_pb2.ENTRY_KIND_CONFIG:
                self.configs.append(index, Membership.from_proto(entry.config))
        self._config_changed(before)
        self.events.log_changed()

    def _config_changed(self, before: Membership) -> None:
        config = self.configs.latest
        self.peers = {i: n for i, n in config.members.items() if i != self.node_id}
        self.transport.update_peers({i: n.raft_address for i, n in self.peers.items()})
        if config is before:
            self.events.config_changed()
            return
        index = self.configs.latest_index
        self.narrate.tell(
            "membership",
            "configuration now: %s (from index %d%s)",
            config.describe(),
            index,
            ", not yet committed" if index > self.commit_index else "",
            action="change",
            index=index,
        )
        if self.leadership is not None:
            self.leadership.config_changed()
        elif not self.may_stand:
            if self._role is Role.CANDIDATE:
                self.become_follower(self.current_term, None, "I no longer vote")
            self._cancel_election_timer("I do not vote")
        elif self._election_timer is None and self._timer_armed_at and not self._stopped:
            # Promoted to voter (after start): from now on this node may stand for election.
            self.reset_election_timer()
        self.observer.state_changed()
        self.events.config_changed()

    def check_removed(self) -> None:
        """A node learns it was removed once the configuration removing it is committed."""
        if self.removed.is_set() or self._role is Role.LEADER:
            return
        if self.node_id not in self.configs.at(self.commit_index).removed:
            return
        self.narrate.tell(
            "membership",
            "removed from the cluster (the change committed by index %d): no longer taking part",
            self.commit_index,
            action="removed",
        )
        self._cancel_election_timer("removed from the cluster")
        self.removed.set()
        self.observer.state_changed()

    # ---- membership changes (membership_changes.py makes them as leader) -------------------

    async def list_members(self) -> tuple[Membership, int, bool]:
        """The leader's configuration in use; NotLeaderError elsewhere."""
        return await self.changes.list_members()

    async def add_member(
        self, node: NodeAddress, wait_until_voter: bool = True
    ) -> tuple[Membership, int, bool]:
        """Add `node` as a learner, to be promoted to voter once it has caught up; see
        membership_changes.MembershipChanges.add_member."""
        return await self.changes.add_member(node, wait_until_voter)

    async def remove_member(self, node_id: int) -> tuple[Membership, int, bool]:
        """Remove a member for good; see membership_changes.MembershipChanges.remove_member."""
        return await self.changes.remove_member(node_id)

    # ---- receiving a snapshot (thesis chapter 5; compaction.py writes and installs it) ------

    async def handle_install_snapshot(
        self, request: raft_pb2.InstallSnapshotRequest
    ) -> raft_pb2.InstallSnapshotResponse:
        """InstallSnapshot receiver rules (thesis Figure 5.3, paper Figure 13): chunks are written
        in order to a temporary file; after the last, the snapshot is verified and installed."""
        self.access.check_message(
            request.requester_id,
            request.term,
            request.last_included_index,
            request.last_included_term,
            request.offset,
            request.total_size,
        )
        self.access.check_unlisted_leader(request.requester_id, request.term)
        leader = request.requester_id
        if request.term < self.current_term:
            # Rule 1: reply immediately if term < currentTerm.
            return raft_pb2.InstallSnapshotResponse(term=self.current_term)
        if request.term > self.current_term or self._role is Role.CANDIDATE:
            self.become_follower(request.term, leader, f"{leader} leads term {request.term}")
        elif self._role is Role.LEADER:
            self.narrate.error("refused a snapshot from %d: I lead this term myself", leader)
            return raft_pb2.InstallSnapshotResponse(term=self.current_term)
        self._set_leader(leader)
        self._heard_from_leader()
        async with self.snapshots.install_lock:
            reply = await self.snapshots.receive(request)
        await self.log.flush()
        reply.term = self.current_term
        return reply


if __name__ == "__main__":
    # The process around the node (flags, servers, signals) lives in node_daemon.py, which imports
    # this module by name; run as a script, this file only hands over to it.
    sys.exit(importlib.import_module("node_daemon").main())


__all__ = (
    "HANDOVER_TIMEOUTS",
    "MAX_WIRE_NUMBER",
    "CommitUnknownError",
    "Clock",
    "InvalidRequestError",
    "LoopClock",
    "NotLeaderError",
    "OverloadedError",
    "PeerUnreachableError",
    "Progress",
    "RaftNode",
    "Role",
    "SessionExpiredError",
    "SnapshotPolicy",
    "Timer",
    "Timing",
    "TransferFailedError",
    "Transport",
    "UnavailableError",
    "wait_until_time",
)
