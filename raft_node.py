"""One Raft node: roles, terms, votes, replication, commit and apply order; and `main()` for the daemon.

The consensus logic here talks to the outside world only through small interfaces (a `Transport` to
reach peers, a `RaftLog` for durable state, the running event loop's clock and timers, and a seeded
`random.Random`), so the same code runs in the daemon and in tests. References are to the Raft paper
("section 5.x", Figure 2) and to Ongaro's thesis.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import logging
import random
import sys
from collections.abc import Callable, Coroutine, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

from cluster_config import ClusterConfig, ConfigError, NodeAddress
from log import LogCorruptionError, RaftLog
from rpc import raft_pb2, raft_pb2_grpc
from state_machine import KeyValueStateMachine
from task_scheduler import BackgroundTasks

# Terms and indices travel as int64; refusing anything this large keeps `term + 1` from overflowing
# and rejects obviously forged messages.
MAX_WIRE_NUMBER = 2**62
# How much one AppendEntries may carry; values are at most 1 MiB, so one entry always fits.
MAX_ENTRIES_PER_MESSAGE = 1024
MAX_BYTES_PER_MESSAGE = 4 * 1024 * 1024


class Role(enum.Enum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    LEADER = "leader"


class NotLeaderError(Exception):
    """This node is not the leader; nothing was appended. Carries the leader if this node knows it."""

    def __init__(self, leader_id: int | None, leader_address: str | None) -> None:
        super().__init__(
            f"not the leader; leader is {leader_id}"
            if leader_id
            else "not the leader; no leader known"
        )
        self.leader_id = leader_id
        self.leader_address = leader_address


class CommitUnknownError(Exception):
    """The entry was appended but its commit could not be confirmed: it may or may not be applied."""


class UnavailableError(Exception):
    """A read could not be served: leadership could not be confirmed in time."""


class InvalidRequestError(Exception):
    """A peer message that no correct member sends; it is refused and changes nothing."""


class PeerUnreachableError(Exception):
    """A message could not be delivered to a peer, or its reply did not arrive in time."""


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """The node's sense of time: the event loop in the daemon, a pausable simulated clock in tests."""

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer: ...


class LoopClock:
    """The daemon's clock: the running event loop's monotonic time and timers."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def call_at(self, when: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_at(when, callback)


class Transport(Protocol):
    """How the node reaches its peers (gRPC in the daemon, in-memory in tests)."""

    async def request_vote(
        self, peer_id: int, request: raft_pb2.VoteRequest, timeout: float
    ) -> raft_pb2.RequestVoteResponse: ...

    async def append_entries(
        self, peer_id: int, request: raft_pb2.AppendEntriesRequest, timeout: float
    ) -> raft_pb2.AppendEntriesResponse: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Timing:
    """Timing settings, in seconds."""

    # 200 ms keeps an idle leader of five near 1% of a core; timeouts of 4 to 8 heartbeats still
    # elect a new leader about a second after the old one dies.
    heartbeat_interval: float = 0.2
    election_timeout_min: float = 0.8
    election_timeout_max: float = 1.6
    proposal_timeout: float = 5.0
    append_timeout: float = 2.0

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= 0:
            raise ConfigError("the heartbeat interval must be positive")
        if not 0 < self.election_timeout_min <= self.election_timeout_max:
            raise ConfigError("the election timeout range must be positive and min <= max")
        if self.heartbeat_interval >= self.election_timeout_min:
            raise ConfigError("the heartbeat interval must be shorter than the election timeout")
        if self.proposal_timeout <= 0:
            raise ConfigError("the proposal timeout must be positive")


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


class _Narrator(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every line with the node's id, role and term, as the seed's narration did."""

    def __init__(self, node: RaftNode) -> None:
        super().__init__(logging.getLogger("raft"), {})
        self.node = node

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        n = self.node
        return f"[{n.node_id} {n.role} t={n.current_term}] {msg}", kwargs


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
    ) -> None:
        self.node_id = node_id
        self.me: NodeAddress = cluster.node(node_id)
        self.peers: dict[int, NodeAddress] = {p.id: p for p in cluster.peers_of(node_id)}
        self.log = log
        self.transport = transport
        self.timing = timing or Timing()
        self.rng = rng or random.Random()
        self.clock: Clock = clock or LoopClock()
        self.state_machine = KeyValueStateMachine()
        self.narrate = _Narrator(self)

        self._role = Role.FOLLOWER
        self.leader_id: int | None = None
        # Volatile state on all servers (Figure 2); last_applied lives in the state machine.
        self.commit_index = 0
        # Candidate state.
        self._votes: set[int] = set()
        # Leader state, reinitialised after each election.
        self.progress: dict[int, Progress] = {}
        self._waiters: dict[int, tuple[int, asyncio.Future[None]]] = {}
        self._read_round = 0
        # Set (and replaced) whenever commit, apply or read confirmations move; readers wait on it.
        self._changed = asyncio.Event()

        self._tasks = BackgroundTasks()
        self._leader_tasks: list[asyncio.Task[Any]] = []
        self._election_timer: Timer | None = None
        self._timer_armed_at = 0.0
        self._self_flush_running = False
        self._stopped = False

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
    def cluster_size(self) -> int:
        return len(self.peers) + 1

    @property
    def quorum(self) -> int:
        return self.cluster_size // 2 + 1

    def leader(self) -> tuple[int | None, str | None]:
        """The leader this node knows of in its current term, and the leader's client address."""
        if self.leader_id is None:
            return None, None
        if self.leader_id == self.node_id:
            return self.node_id, self.me.client_address
        peer = self.peers.get(self.leader_id)
        return self.leader_id, peer.client_address if peer else None

    def get_value(self, key: str) -> str | None:
        """The seed's read: this node's applied state, which may lag the leader's."""
        return self.state_machine.get(key)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Begin as a follower (section 5.2) and wait for a leader or an election timeout."""
        self.narrate.info(
            "starting as follower with %d log entries (last term %d); voted for %s",
            self.log.last_index,
            self.log.last_term,
            self.voted_for if self.voted_for is not None else "nobody",
        )
        self._reset_election_timer()

    async def stop(self) -> None:
        """Stop taking part: cancel timers and background work; fail waiting proposals."""
        if self._stopped:
            return
        self._stopped = True
        self._cancel_election_timer()
        self._fail_waiters("the node is shutting down")
        await self._tasks.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None:
        if self._stopped:
            coro.close()  # a stopped node starts nothing new
            return None
        return self._tasks.spawn(coro, name=name)

    # ---- timers ----------------------------------------------------------------------------

    def _reset_election_timer(self) -> None:
        """Arm the election timer with a fresh random timeout (section 5.2: randomized per wait)."""
        self._cancel_election_timer()
        if self._stopped or self._role is Role.LEADER:
            return
        timeout = self.rng.uniform(
            self.timing.election_timeout_min, self.timing.election_timeout_max
        )
        self._timer_armed_at = self.clock.now()
        self._election_timer = self.clock.call_at(
            self._timer_armed_at + timeout, self._on_election_timeout
        )

    def _cancel_election_timer(self) -> None:
        if self._election_timer is not None:
            self._election_timer.cancel()
            self._election_timer = None

    def _on_election_timeout(self) -> None:
        self._election_timer = None
        if self._stopped or self._role is Role.LEADER:
            return
        waited = self.clock.now() - self._timer_armed_at
        self.narrate.info(
            "heard no leader for %d ms: starting an election for term %d",
            waited * 1000,
            self.current_term + 1,
        )
        self._spawn(self.start_election(), name="election")

    # ---- term and role changes -------------------------------------------------------------

    def _become_follower(self, term: int, leader_id: int | None, why: str) -> None:
        """Adopt `term` (if newer) and follow. Figure 2: any newer term makes a server a follower."""
        was = self._role
        if term > self.current_term:
            self.log.set_hard_state(term, None)
        self._role = Role.FOLLOWER
        self._votes.clear()
        if was is not Role.FOLLOWER:
            self.narrate.info("became follower: %s", why)
        if was is Role.LEADER:
            self._stop_leading()
        self._set_leader(leader_id)
        # Only a leader has no election timer running. A follower that merely adopts a newer term
        # keeps its timer: Figure 2 resets it only for the current leader or a granted vote, and
        # resetting it for every refused candidate would starve the nodes able to win.
        if self._election_timer is None:
            self._reset_election_timer()

    def _step_down_if_newer(self, term: int, source: str) -> bool:
        """Figure 2: a term in a request or reply newer than ours makes us a follower of that term."""
        if term <= self.current_term:
            return False
        self._become_follower(term, None, f"{source} has newer term {term}")
        # No reply waits on this change, but it must reach the disk before this node votes or acts
        # in the new term; every vote and append reply flushes first, so a background flush suffices.
        self._spawn(self.log.flush(), name="flush-term")
        return True

    def _set_leader(self, leader_id: int | None) -> None:
        if leader_id != self.leader_id and leader_id is not None and leader_id != self.node_id:
            self.narrate.info("following leader %d", leader_id)
        self.leader_id = leader_id

    # ---- elections (section 5.2) -----------------------------------------------------------

    async def start_election(self) -> None:
        """Become a candidate: new term, vote for self, make both durable, then ask every peer."""
        if self._stopped or self._role is Role.LEADER:
            return
        self._role = Role.CANDIDATE
        self.leader_id = None
        term = self.current_term + 1
        self.log.set_hard_state(term, self.node_id)
        self._votes = {self.node_id}
        self._reset_election_timer()
        # The new term and the self-vote must be durable before any vote request leaves (seed defect 1).
        await self.log.flush()
        if self._role is not Role.CANDIDATE or self.current_term != term:
            return
        if len(self._votes) >= self.quorum:
            self._become_leader()
            return
        request = raft_pb2.VoteRequest(
            term=term,
            requester_id=self.node_id,
            last_log_index=self.log.last_index,
            last_log_term=self.log.last_term,
        )
        self.narrate.info(
            "asking for votes (my log: last term %d, last index %d)",
            request.last_log_term,
            request.last_log_index,
        )
        for peer_id in self.peers:
            self._spawn(self._ask_for_vote(peer_id, request), name=f"vote-{peer_id}")

    async def _ask_for_vote(self, peer_id: int, request: raft_pb2.VoteRequest) -> None:
        try:
            reply = await self.transport.request_vote(
                peer_id, request, timeout=self.timing.election_timeout_min
            )
        except PeerUnreachableError as e:
            self.narrate.debug("vote request to %d failed: %s", peer_id, e)
            return
        self.handle_vote_reply(peer_id, request, reply)

    def handle_vote_reply(
        self, peer_id: int, request: raft_pb2.VoteRequest, reply: raft_pb2.RequestVoteResponse
    ) -> None:
        if self._step_down_if_newer(reply.term, f"{peer_id}'s vote reply"):
            return
        if self._role is not Role.CANDIDATE or self.current_term != request.term:
            return  # a reply to an election that is over
        if not reply.vote_granted:
            self.narrate.info("%d refused its vote", peer_id)
            return
        self._votes.add(peer_id)
        self.narrate.info(
            "%d granted its vote (%d of %d needed)", peer_id, len(self._votes), self.quorum
        )
        if len(self._votes) >= self.quorum:
            self._become_leader()

    async def handle_request_vote(
        self, request: raft_pb2.VoteRequest
    ) -> raft_pb2.RequestVoteResponse:
        """RequestVote receiver rules (Figure 2); the reply leaves only once term and vote are durable."""
        self._check_peer_message(
            request.requester_id,
            request.term,
            request.last_log_index,
            request.last_log_term,
        )
        candidate = request.requester_id
        self.narrate.debug(
            "vote request from %d: term %d, last log (term %d, index %d)",
            candidate,
            request.term,
            request.last_log_term,
            request.last_log_index,
        )
        self._step_down_if_newer(request.term, f"vote request from {candidate}")
        term = self.current_term
        granted = False
        mine = (self.log.last_term, self.log.last_index)
        theirs = (request.last_log_term, request.last_log_index)
        if request.term < term:
            self.narrate.info(
                "refused vote to %d: its term %d is behind mine", candidate, request.term
            )
        elif self.voted_for not in (None, candidate):
            self.narrate.info(
                "refused vote to %d: already voted for %s in term %d",
                candidate,
                self.voted_for,
                term,
            )
        elif theirs < mine:
            # Section 5.4.1: the later last term wins; with equal last terms, the longer log wins.
            self.narrate.info(
                "refused vote to %d: its log (last term %d, index %d) is behind mine (%d, %d)",
                candidate,
                *theirs,
                *mine,
            )
        else:
            granted = True
            self.log.set_hard_state(term, candidate)
            self.narrate.info(
                "granted vote to %d: its log (last term %d, index %d) is at least as up to date "
                "as mine (%d, %d)",
                candidate,
                *theirs,
                *mine,
            )
            # Granting a vote resets the election timer (Figure 2, rules for followers).
            self._reset_election_timer()
        await self.log.flush()
        return raft_pb2.RequestVoteResponse(term=self.current_term, vote_granted=granted)

    # ---- log replication, follower side (section 5.3) --------------------------------------

    async def handle_append_entries(
        self, request: raft_pb2.AppendEntriesRequest
    ) -> raft_pb2.AppendEntriesResponse:
        """AppendEntries receiver rules (Figure 2); the reply leaves only once the entries are durable."""
        self._check_peer_message(
            request.requester_id,
            request.term,
            request.prev_log_index,
            request.prev_log_term,
            request.leader_commit,
        )
        self._check_entries(request)
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
            self._become_follower(request.term, leader, f"{leader} leads term {request.term}")
        elif self._role is Role.LEADER:
            # Two leaders in one term would break election safety; refuse and say so loudly.
            self.narrate.error("refused append from %d: I lead this term myself", leader)
            return raft_pb2.AppendEntriesResponse(term=self.current_term, success=False)
        term = self.current_term
        self._set_leader(leader)
        self._reset_election_timer()

        prev = request.prev_log_index
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
        if self.log.term_at(prev) != request.prev_log_term:
            conflict_term = self.log.term_at(prev)
            first = prev
            while first > 1 and self.log.term_at(first - 1) == conflict_term:
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

        entries = request.log_entries
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
                self.narrate.info(
                    "truncating my log from index %d: it conflicts with the leader's", index
                )
                self.log.truncate_from(index)
            self.log.append(entries[offset:])
            break
        match_index = prev + len(entries)
        if request.leader_commit > self.commit_index:
            # Only entries known to match the leader's log may be committed here (Figure 2: min).
            new_commit = min(request.leader_commit, match_index)
            if new_commit > self.commit_index:
                self.commit_index = new_commit
                self.narrate.info("commit index now %d (told by the leader)", new_commit)
                self._apply_committed()
        await self.log.flush()
        # The term as it is now: if a newer leader appeared while the entries were being written,
        # the old leader learns of it here instead of counting this reply (section 5.1).
        return raft_pb2.AppendEntriesResponse(
            term=self.current_term, success=True, match_index=match_index
        )

    def _check_peer_message(self, requester_id: int, *numbers: int) -> None:
        if requester_id not in self.peers:
            self.narrate.warning(
                "refused a message from %d: not a member of this cluster", requester_id
            )
            raise InvalidRequestError(f"{requester_id} is not a member of this cluster")
        if any(n < 0 or n >= MAX_WIRE_NUMBER for n in numbers):
            self.narrate.warning(
                "refused a message from %d: a term or index is out of range", requester_id
            )
            raise InvalidRequestError("a term or index is negative or absurdly large")

    def _check_entries(self, request: raft_pb2.AppendEntriesRequest) -> None:
        expected_index = request.prev_log_index + 1
        previous_term = request.prev_log_term
        for entry in request.log_entries:
            # A leader's log has consecutive indices and terms that never decrease (section 5.3).
            if entry.index != expected_index or not previous_term <= entry.term <= request.term:
                self.narrate.warning(
                    "refused append from %d: malformed entries", request.requester_id
                )
                raise InvalidRequestError(
                    "entries must be consecutive from prev_log_index + 1, with non-decreasing "
                    "terms no newer than the leader's"
                )
            expected_index += 1
            previous_term = entry.term
        if request.prev_log_term > request.term:
            raise InvalidRequestError("prev_log_term is newer than the leader's term")

    # ---- leadership (sections 5.3, 5.4) ----------------------------------------------------

    def _become_leader(self) -> None:
        self._role = Role.LEADER
        self.leader_id = self.node_id
        self._cancel_election_timer()
        term = self.current_term
        self.narrate.info(
            "won the election with votes from %s; appending a no-op to commit earlier entries",
            ", ".join(str(v) for v in sorted(self._votes)),
        )
        self._votes.clear()
        self.progress = {p: Progress(next_index=self.log.last_index + 1) for p in self.peers}
        # Section 8: a no-op of the new term lets entries of earlier terms commit without a new write.
        self._append_as_leader(raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_NOOP))
        tasks = [
            self._spawn(self._replicate(peer_id, term), name=f"replicate-{peer_id}")
            for peer_id in self.peers
        ]
        self._leader_tasks = [t for t in tasks if t is not None]

    def _stop_leading(self) -> None:
        self._notify()
        for task in self._leader_tasks:
            task.cancel()
        self._leader_tasks = []
        self.progress = {}
        self._fail_waiters("leadership was lost before the write committed")

    def _fail_waiters(self, why: str) -> None:
        waiters, self._waiters = self._waiters, {}
        for _, future in waiters.values():
            if not future.done():
                future.set_exception(CommitUnknownError(f"{why}; it may or may not be applied"))

    def _append_as_leader(self, entry: raft_pb2.LogEntry) -> int:
        entry.term = self.current_term
        entry.index = self.log.last_index + 1
        self.log.append([entry])
        self._flush_own_log()
        for progress in self.progress.values():
            progress.wake.set()
        return entry.index

    def _flush_own_log(self) -> None:
        """Make the leader's own entries durable; the leader counts itself only for durable entries."""
        if not self._self_flush_running:
            self._self_flush_running = True
            self._spawn(self._flush_own_log_loop(), name="leader-flush")

    async def _flush_own_log_loop(self) -> None:
        try:
            while self.log.durable_index < self.log.last_index:
                await self.log.flush()
                if self._role is Role.LEADER:
                    self._advance_commit()
        finally:
            self._self_flush_running = False

    async def propose_mapping(self, key: str, value: str) -> None:
        """Append a mapping; return once it is committed and applied here. Raises NotLeaderError."""
        if self._role is not Role.LEADER:
            leader_id, address = self.leader()
            if leader_id is not None:
                self.narrate.info("redirecting a client to leader %d", leader_id)
            else:
                self.narrate.info("turning a client away: no leader known")
            raise NotLeaderError(leader_id, address)
        index = self._append_as_leader(
            raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_MAPPING, key=key, value=value)
        )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[index] = (self.current_term, future)
        try:
            async with asyncio.timeout(self.timing.proposal_timeout):
                await asyncio.shield(future)
        except TimeoutError:
            raise CommitUnknownError(
                f"entry {index} did not commit within {self.timing.proposal_timeout:g} s; "
                "it may or may not be applied"
            ) from None
        finally:
            if self._waiters.get(index, (0, None))[1] is future:
                del self._waiters[index]

    async def _replicate(self, peer_id: int, term: int) -> None:
        """Keep one follower's log in step with ours: entries when it lacks them, else heartbeats."""
        progress = self.progress[peer_id]
        while self._role is Role.LEADER and self.current_term == term:
            now = self.clock.now()
            has_entries = progress.next_index <= self.log.last_index
            commit_news = min(self.commit_index, progress.match_index) > progress.told_commit
            commit_news = commit_news or progress.sent_round < self._read_round
            # One expression for both the test and the timer: with `now - last_sent >= interval`
            # rounding could call a timer that fired exactly on time early, and the task would
            # re-arm the same instant forever.
            next_heartbeat = progress.last_sent + self.timing.heartbeat_interval
            heartbeat_due = now >= next_heartbeat
            if now < progress.retry_at or not (has_entries or commit_news or heartbeat_due):
                wait = max(progress.retry_at, next_heartbeat)
                progress.wake.clear()
                # A timer that sets the event is much cheaper than asyncio.wait_for's extra task.
                timer = self.clock.call_at(wait, progress.wake.set)
                try:
                    await progress.wake.wait()
                finally:
                    timer.cancel()
                continue
            await self._send_append(peer_id, term, progress)

    async def _send_append(self, peer_id: int, term: int, progress: Progress) -> None:
        prev = progress.next_index - 1
        entries = self.log.entries(
            progress.next_index, MAX_ENTRIES_PER_MESSAGE, MAX_BYTES_PER_MESSAGE
        )
        request = raft_pb2.AppendEntriesRequest(
            term=term,
            requester_id=self.node_id,
            prev_log_index=prev,
            prev_log_term=self.log.term_at(prev),
            leader_commit=self.commit_index,
            log_entries=entries,
        )
        progress.last_sent = self.clock.now()
        read_round = progress.sent_round = self._read_round
        if entries:
            self.narrate.debug("sending %d entries from %d to %d", len(entries), prev + 1, peer_id)
        try:
            reply = await self.transport.append_entries(
                peer_id, request, timeout=self.timing.append_timeout
            )
        except PeerUnreachableError as e:
            self.narrate.debug("append to %d failed: %s", peer_id, e)
            progress.retry_at = self.clock.now() + self.timing.heartbeat_interval
            return
        if reply.term == term and read_round > progress.acked_round:
            # Any reply of our own term shows the follower still takes us as its leader.
            progress.acked_round = read_round
            self._notify()
        self.handle_append_reply(peer_id, request, reply)

    def handle_append_reply(
        self,
        peer_id: int,
        request: raft_pb2.AppendEntriesRequest,
        reply: raft_pb2.AppendEntriesResponse,
    ) -> None:
        if self._step_down_if_newer(reply.term, f"{peer_id}'s append reply"):
            return
        if self._role is not Role.LEADER or self.current_term != request.term:
            return
        progress = self.progress[peer_id]
        if reply.success:
            # What we sent, not what the reply claims, bounds what the follower holds.
            match = request.prev_log_index + len(request.log_entries)
            if match > progress.match_index:
                progress.match_index = match
            progress.next_index = max(progress.next_index, match + 1)
            progress.told_commit = max(
                progress.told_commit, min(request.leader_commit, progress.match_index)
            )
            self._advance_commit()
            return
        # Back up past the whole conflicting term at once (section 5.3, "the protocol can be
        # optimized"): to after our last entry of that term, or to the follower's first entry of it.
        next_index = reply.conflict_index
        if reply.conflict_term > 0:
            for index in range(min(request.prev_log_index, self.log.last_index), 0, -1):
                t = self.log.term_at(index)
                if t == reply.conflict_term:
                    next_index = index + 1
                    break
                if t < reply.conflict_term:
                    break
        next_index = max(progress.match_index + 1, min(next_index, request.prev_log_index))
        if next_index < 1:
            next_index = 1
        self.narrate.debug(
            "%d rejected entries after %d; retrying from %d",
            peer_id,
            request.prev_log_index,
            next_index,
        )
        progress.next_index = next_index

    def _advance_commit(self) -> None:
        """Commit the highest index durable on a majority, if it is from this term (section 5.4.2)."""
        matches = sorted(
            [self.log.durable_index] + [p.match_index for p in self.progress.values()],
            reverse=True,
        )
        candidate = matches[self.quorum - 1]
        if candidate <= self.commit_index or self.log.term_at(candidate) != self.current_term:
            return
        self.commit_index = candidate
        self.narrate.info(
            "committed up to index %d (durable on %d of %d nodes)",
            candidate,
            sum(1 for m in matches if m >= candidate),
            self.cluster_size,
        )
        self._apply_committed()
        for progress in self.progress.values():
            progress.wake.set()

    # ---- linearizable reads (thesis section 6.4, ReadIndex) --------------------------------

    async def read(self, key: str) -> str | None:
        """A linearizable read on the leader: it reflects every write acknowledged before the call.

        Raises NotLeaderError when this node is not (or stops being) the leader, and
        UnavailableError when it cannot confirm its leadership within the proposal timeout.
        """
        term = self.current_term
        self._check_still_leader(term)
        try:
            async with asyncio.timeout(self.timing.proposal_timeout):
                # Until its no-op commits, a new leader does not know the latest commit index.
                await self._wait_until(lambda: self.log.term_at(self.commit_index) == term, term)
                read_index = self.commit_index
                # A round of heartbeats answered by a majority shows no newer leader existed when
                # the read arrived; reads that arrive together share one round.
                self._read_round += 1
                read_round = self._read_round
                for progress in self.progress.values():
                    progress.wake.set()
                await self._wait_until(lambda: self._confirmed(read_round), term)
                await self._wait_until(lambda: self.last_applied >= read_index, term)
        except TimeoutError:
            raise UnavailableError(
                f"could not confirm leadership within {self.timing.proposal_timeout:g} s"
            ) from None
        return self.state_machine.get(key)

    def _confirmed(self, read_round: int) -> bool:
        acks = 1 + sum(1 for p in self.progress.values() if p.acked_round >= read_round)
        return acks >= self.quorum

    def _check_still_leader(self, term: int) -> None:
        if self._role is not Role.LEADER or self.current_term != term:
            raise NotLeaderError(*self.leader())

    async def _wait_until(self, condition: Callable[[], bool], term: int) -> None:
        while not condition():
            self._check_still_leader(term)
            await self._changed.wait()
        self._check_still_leader(term)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # ---- applying committed entries --------------------------------------------------------

    def _apply_committed(self) -> None:
        """Apply every committed entry not yet applied, exactly once and in index order."""
        self._notify()
        while self.last_applied < self.commit_index:
            entry = self.log.entry(self.last_applied + 1)
            self.state_machine.apply(entry)
            waiter = self._waiters.pop(entry.index, None)
            if waiter is not None:
                term, future = waiter
                if not future.done():
                    if term == entry.term:
                        future.set_result(None)
                    else:
                        future.set_exception(
                            CommitUnknownError("another leader's entry took this index")
                        )


# ---- the daemon --------------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(
        prog="raft_node.py",
        description="Run one node of a raft-demo cluster: a Raft-replicated key-value store.",
        epilog=(
            "Examples: `python raft_node.py --port 12345` (the seed's scheme: five nodes on "
            "127.0.0.1, Raft ports 12345-12349, client ports 12350-12354); "
            "`python raft_node.py --id 2 --cluster cluster.toml` (any hosts). "
            "Exit codes: 0 clean stop, 1 damaged data directory, 2 bad arguments or address in use."
        ),
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--port", type=int, help="seed scheme: this node's Raft port, which is also its id"
    )
    who.add_argument("--id", type=int, help="this node's id in the --cluster file")
    parser.add_argument(
        "--first-port", type=int, default=12345, help="seed scheme: the first Raft port (12345)"
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=5,
        help="seed scheme: number of nodes (5); client port = Raft port + nodes",
    )
    parser.add_argument(
        "--cluster",
        metavar="FILE",
        help="TOML file with a [[node]] table per member: id, raft = 'host:port', client = 'host:port'",
    )
    parser.add_argument(
        "--host",
        help="address to bind both services to (default: the host in this node's own addresses)",
    )
    parser.add_argument("--data-dir", help="where the log and hard state live (default data/<id>)")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="INFO narrates each event; DEBUG adds every message (INFO)",
    )
    parser.add_argument(
        "--heartbeat-ms", type=int, default=200, help="leader heartbeat interval (200)"
    )
    parser.add_argument(
        "--election-timeout-min-ms",
        type=int,
        default=800,
        help="shortest election timeout; each wait draws afresh from [min, max] (800)",
    )
    parser.add_argument(
        "--election-timeout-max-ms", type=int, default=1600, help="longest election timeout (1600)"
    )
    parser.add_argument(
        "--proposal-timeout-ms",
        type=int,
        default=5000,
        help="how long a leader waits for a write to commit before answering UNAVAILABLE (5000)",
    )
    args = parser.parse_args(argv)
    if args.id is not None and args.cluster is None:
        parser.error("--id needs --cluster FILE")
    if args.port is not None and args.cluster is not None:
        parser.error("--port uses the seed's port scheme; use --id with --cluster")
    return args


def _fail(code: int, message: str) -> NoReturn:
    print(f"raft_node.py: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)-5s %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # gRPC's own chatter stays out of the narration unless it is a real problem.
    logging.getLogger("grpc").setLevel(logging.WARNING)


async def _serve(
    args: argparse.Namespace, cluster: ClusterConfig, node_id: int, timing: Timing
) -> int:
    import grpc

    import cluster_server
    import raft_server
    from raft_client import GrpcTransport

    me = cluster.node(node_id)
    data_dir = Path(args.data_dir or Path("data") / str(node_id))
    lock = _lock_data_dir(data_dir)
    try:
        log = await RaftLog.open(data_dir)
    except LogCorruptionError as e:
        _fail(1, str(e))
    transport = GrpcTransport({p.id: p.raft_address for p in cluster.peers_of(node_id)})
    node = RaftNode(node_id, cluster, log, transport, timing)

    servers: list[grpc.aio.Server] = []
    try:
        services: list[tuple[str, Callable[[grpc.aio.Server], None], int]] = [
            (
                me.raft_address,
                lambda s: raft_pb2_grpc.add_RaftServicer_to_server(
                    raft_server.RaftServicer(node), s
                ),
                64 * 1024 * 1024,
            ),
            (
                me.client_address,
                lambda s: raft_pb2_grpc.add_ClusterServicer_to_server(
                    cluster_server.ClusterServicer(node), s
                ),
                4 * 1024 * 1024,
            ),
        ]
        for address, add_services, limit in services:
            server = grpc.aio.server(
                options=[
                    # Without this, gRPC lets a second process share a port that is in use.
                    ("grpc.so_reuseport", 0),
                    ("grpc.max_receive_message_length", limit),
                    ("grpc.max_send_message_length", limit),
                ]
            )
            add_services(server)
            bind = _bind_address(address, args.host)
            problem = _cannot_bind(bind)
            if problem is None:
                try:
                    if server.add_insecure_port(bind) == 0:
                        problem = "gRPC could not bind it"
                except RuntimeError as e:
                    problem = str(e)
            if problem is not None:
                _fail(2, f"cannot listen on {bind}: {problem}")
            await server.start()
            servers.append(server)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        node.narrate.info(
            "serving Raft on %s and clients on %s; data in %s",
            me.raft_address,
            me.client_address,
            data_dir,
        )
        node.start()
        await stop.wait()
        node.narrate.info("stopping: finishing disk writes")
    finally:
        await node.stop()
        for server in servers:
            await server.stop(grace=0.5)
        await transport.close()
        await log.close()
        lock.close()
    return 0


def _bind_address(address: str, host: str | None) -> str:
    from cluster_config import parse_host_port

    own_host, port = parse_host_port(address)
    host = host or own_host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _cannot_bind(bind: str) -> str | None:
    """Why `bind` cannot be listened on, checked with a plain socket so the user gets one clear line."""
    import socket

    from cluster_config import parse_host_port

    host, port = parse_host_port(bind)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return e.strerror or str(e)
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # Same reuse rule as the gRPC server: a port still in TIME_WAIT is fine, one in use is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as e:
            return e.strerror or str(e)
    return None


def _lock_data_dir(data_dir: Path) -> Any:
    """Hold an exclusive lock on the data directory so two nodes never share one."""
    import fcntl

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = open(data_dir / "LOCK", "a")
    except OSError as e:
        _fail(2, f"cannot use data directory {data_dir}: {e.strerror}")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        _fail(2, f"data directory {data_dir} is in use by another node")
    return lock


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.port is not None:
            cluster = ClusterConfig.seed_scheme(args.first_port, args.nodes)
            node_id = args.port
        else:
            cluster = ClusterConfig.from_toml(args.cluster)
            node_id = args.id
        cluster.node(node_id)
        timing = Timing(
            heartbeat_interval=args.heartbeat_ms / 1000,
            election_timeout_min=args.election_timeout_min_ms / 1000,
            election_timeout_max=args.election_timeout_max_ms / 1000,
            proposal_timeout=args.proposal_timeout_ms / 1000,
        )
    except ConfigError as e:
        _fail(2, str(e))
    _setup_logging(args.log_level)
    import uvloop

    return uvloop.run(_serve(args, cluster, node_id, timing))


if __name__ == "__main__":
    # Run through the importable module, so the servers that import `raft_node` share its classes.
    import raft_node

    sys.exit(raft_node.main())


__all__ = (
    "CommitUnknownError",
    "Clock",
    "InvalidRequestError",
    "LoopClock",
    "NotLeaderError",
    "PeerUnreachableError",
    "RaftNode",
    "Role",
    "Timing",
    "Transport",
    "UnavailableError",
    "main",
)
