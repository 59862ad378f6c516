"""One Raft node: roles, terms, votes, replication, commit and apply order.

`python raft_node.py` runs one as a daemon; the process around it lives in node_daemon.py.

The consensus logic here talks to the outside world only through small interfaces (a `Transport` to
reach peers, a `RaftLog` for durable state, the running event loop's clock and timers, and a seeded
`random.Random`), so the same code runs in the daemon and in tests. References are to the Raft paper
("section 5.x", Figure 2) and to Ongaro's thesis.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import sys
import time
from collections.abc import Callable, Coroutine, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cluster_config import ClusterConfig, ConfigError, NodeAddress
from disk import DiskFullError
from log import RaftLog
from membership import (
    ChangeInProgressError,
    ConfigHistory,
    Membership,
    MembershipError,
)
from node_status import NodeObserver, NodeStatus, PeerStatus
from rpc import raft_pb2
from snapshot import Incoming, LoadedSnapshot, SnapshotError, SnapshotMeta
from state_machine import (
    ApplyResult,
    KeyValueStateMachine,
    SessionExpired,
    SnapshotState,
    decode_state,
)
from task_scheduler import BackgroundTasks

# Terms and indices travel as int64; refusing anything this large keeps `term + 1` from overflowing
# and rejects obviously forged messages.
MAX_WIRE_NUMBER = 2**62
# A leader stopped by SIGTERM/SIGINT hands leadership over for at most this many election timeouts.
HANDOVER_TIMEOUTS = 2
# How much one AppendEntries may carry; values are at most 1 MiB, so one entry always fits.
# Client requests a node lets wait at once; more are refused (OverloadedError) so memory stays
# bounded whatever clients send.
MAX_WAITING_PROPOSALS = 2048
MAX_WAITING_READS = 2048
MAX_ENTRIES_PER_MESSAGE = 1024
MAX_BYTES_PER_MESSAGE = 4 * 1024 * 1024
# InstallSnapshot sends one chunk of this size at a time per follower (stop-and-wait flow control).
SNAPSHOT_CHUNK_BYTES = 1024 * 1024
# An admin call adding a node waits at most this long for it to catch up and become a voter.
PROMOTION_WAIT = 60.0


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


class OverloadedError(Exception):
    """Too many requests already wait on this node (or its disk is full): nothing was done."""


class PeerUnreachableError(Exception):
    """A message could not be delivered to a peer, or its reply did not arrive in time."""


class TransferFailedError(Exception):
    """Leadership could not be handed over in time; the transfer was abandoned (thesis 3.10)."""


class SessionExpiredError(Exception):
    """The cluster no longer knows the write's client session; the write was not applied now."""


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


async def wait_until_time(clock: Clock, event: asyncio.Event, when: float) -> None:
    """Wait until `event` is set or `clock` reaches `when`, whichever comes first (and then the
    event is set). A timer that sets the event is much cheaper than asyncio.wait_for's extra task.
    """
    timer = clock.call_at(when, event.set)
    try:
        await event.wait()
    finally:
        timer.cancel()


class Transport(Protocol):
    """How the node reaches its peers (gRPC in the daemon, in-memory in tests)."""

    async def request_vote(
        self, peer_id: int, request: raft_pb2.VoteRequest, timeout: float
    ) -> raft_pb2.RequestVoteResponse: ...

    async def append_entries(
        self, peer_id: int, request: raft_pb2.AppendEntriesRequest, timeout: float
    ) -> raft_pb2.AppendEntriesResponse: ...

    async def read_index(
        self, peer_id: int, request: raft_pb2.ReadIndexRequest, timeout: float
    ) -> raft_pb2.ReadIndexResponse: ...

    async def timeout_now(
        self, peer_id: int, request: raft_pb2.TimeoutNowRequest, timeout: float
    ) -> raft_pb2.TimeoutNowResponse: ...

    async def install_snapshot(
        self, peer_id: int, request: raft_pb2.InstallSnapshotRequest, timeout: float
    ) -> raft_pb2.InstallSnapshotResponse: ...

    def update_peers(self, addresses: dict[int, str]) -> None:
        """Learn (or change) the Raft addresses of peers; called when the membership changes."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class SnapshotPolicy:
    """When a node snapshots its state and compacts its log (thesis section 5.1)."""

    # Snapshot once this many entries, or this many bytes of log records, follow the last snapshot.
    # Every entry the log holds is also in memory: the byte threshold bounds that too (a lower one
    # costs large states a snapshot more often: 16 MiB took a fifth off 100-put batches).
    entries: int = 10_000
    bytes: int = 64 * 1024 * 1024
    # Entries kept behind the snapshot point, so a follower a little behind catches up from the log
    # instead of needing the whole snapshot: at most this many, whose records take at most
    # keep_bytes (large entries, such as batches, are not worth keeping in memory in their
    # thousands).
    keep_entries: int = 1_000
    keep_bytes: int = 4 * 1024 * 1024
    # InstallSnapshot sends the file in chunks of this size, one in flight per follower.
    chunk_bytes: int = SNAPSHOT_CHUNK_BYTES

    def __post_init__(self) -> None:
        if self.entries < 1 or self.bytes < 1 or self.chunk_bytes < 1:
            raise ConfigError("the snapshot thresholds must be positive")
        if self.keep_entries < 0 or self.keep_bytes < 0:
            raise ConfigError("the entries kept behind a snapshot cannot be negative")


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
    # A new commit index rides the next AppendEntries; only when none has gone out this long after
    # the commit does the leader send one just to tell it. Under a steady stream of writes that
    # halves the messages per write; followers' stale reads may lag by this much more.
    commit_notice_delay: float = 0.01

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= 0:
            raise ConfigError("the heartbeat interval must be positive")
        if not 0 < self.election_timeout_min <= self.election_timeout_max:
            raise ConfigError("the election timeout range must be positive and min <= max")
        if self.heartbeat_interval >= self.election_timeout_min:
            raise ConfigError("the heartbeat interval must be shorter than the election timeout")
        if self.proposal_timeout <= 0:
            raise ConfigError("the proposal timeout must be positive")
        if self.commit_notice_delay < 0:
            raise ConfigError("the commit notice delay cannot be negative")


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
class _Transfer:
    """A leadership transfer in progress (thesis section 3.10)."""

    target: int
    term: int


class _Narrator(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every line with the node's id, role and term, as the seed's narration did."""

    def __init__(self, node: RaftNode) -> None:
        super().__init__(logging.getLogger("raft"), {})
        self.node = node

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        n = self.node
        # The same fields ride on the record, so a structured log format need not parse the prefix.
        fields = {"node": n.node_id, "role": n.role, "term": n.current_term}
        kwargs["extra"] = {**(kwargs.get("extra") or {}), **fields}
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
        # None: this node never takes snapshots of its own (it still installs a leader's).
        self.snapshot_policy = snapshot_policy
        self._snapshotting = False
        self._incoming: Incoming | None = None
        self._install_lock = asyncio.Lock()

        self._role = Role.FOLLOWER
        self.leader_id: int | None = None
        # Volatile state on all servers (Figure 2); last_applied lives in the state machine.
        self.commit_index = 0
        # Candidate state.
        self._votes: set[int] = set()
        # Leader state, reinitialised after each election.
        self.progress: dict[int, Progress] = {}
        self._waiters: dict[int, tuple[int, asyncio.Future[ApplyResult]]] = {}
        self._read_round = 0
        # The commit index followers are now due to be told, even by a message of its own; it
        # catches up with commit_index a commit_notice_delay after each advance.
        self._announced_commit = 0
        self._commit_notice: Timer | None = None
        self._last_append: (
            tuple[tuple[int, int, int, int], raft_pb2.AppendEntriesRequest] | None
        ) = None
        # A follower's reads waiting for the next ReadIndex request, and whether one is out.
        self._next_read_index: asyncio.Future[int] | None = None
        self._read_index_sending = False
        self._reads_waiting = 0
        # Set (and replaced) whenever commit, apply or read confirmations move; readers wait on it.
        self._changed = asyncio.Event()

        # Leadership (thesis sections 9.6, 4.2.3, 3.10): when this node last heard from the leader
        # of its term, the term it is collecting pre-votes for and who granted them, and a
        # leadership transfer in progress.
        self._leader_contact = float("-inf")
        self._pre_vote_term: int | None = None
        self._pre_votes: set[int] = set()
        self._transfer: _Transfer | None = None
        # An election timeout passed since this node last heard from its leader.
        self._leader_silent = False
        self.observer: NodeObserver = NodeObserver()

        self._tasks = BackgroundTasks()
        self._leader_tasks: list[asyncio.Task[Any]] = []
        self._election_timer: Timer | None = None
        self._timer_armed_at = 0.0
        self._self_flush_running = False
        self._stopped = False

        # Membership (thesis chapter 4): the configurations in the log, the latest in use.
        self._bootstrap = Membership.empty() if join else Membership.bootstrap(cluster)
        self.configs = ConfigHistory(self._bootstrap)
        # The other members (voters and learners) of the configuration in use.
        self.peers: dict[int, NodeAddress] = {}
        # Leader: replication tasks by follower; followers a configuration removed, kept until
        # they learn that their removal committed (by the index of the removing configuration).
        self._replicators: dict[int, asyncio.Task[Any]] = {}
        self._departing: dict[int, int] = {}
        self._leaving = False
        self._unlisted_leader_noted: tuple[int, int] | None = None
        self._quorum_wake = asyncio.Event()
        # Set once this node learns that the configuration removing it committed.
        self.removed = asyncio.Event()
        restored = log.restored
        if restored is not None:
            self._rebuild_configs(restored.members, restored.index)
        else:
            self._rebuild_configs(self._bootstrap, 0)

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
        """Whether this node may stand for election: a voter, or a voter of the committed
        configuration that an uncommitted one removes. The latter's vote does not count, but it
        may be the only node able to commit its own removal (thesis 4.2.2: a leader being removed
        leads until then), so it must be able to lead."""
        return self.is_voter or self.configs.at(self.commit_index).is_voter(self.node_id)

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
        now = self.clock.now()
        config = self.configs.latest
        last_index = self.log.last_index
        peers: list[PeerStatus] = []
        for peer_id, progress in sorted(self.progress.items()):
            heard = progress.heard_at
            peers.append(
                PeerStatus(
                    id=peer_id,
                    voter=config.is_voter(peer_id),
                    match_index=progress.match_index,
                    lag=max(last_index - progress.match_index, 0),
                    last_contact=now - heard if heard > float("-inf") else None,
                )
            )
        following = self._role is not Role.LEADER and self.leader_id is not None
        latest = self.log.snapshots.latest if self.log.snapshots is not None else None
        return NodeStatus(
            node_id=self.node_id,
            raft_address=self.me.raft_address,
            client_address=self.me.client_address,
            role=self.role,
            term=self.current_term,
            leader_id=self.leader_id,
            commit_index=self.commit_index,
            applied_index=self.last_applied,
            last_log_index=last_index,
            snapshot_index=latest.index if latest is not None else 0,
            voter=config.is_voter(self.node_id),
            learner=self.node_id in config.learners,
            leader_contact=(
                now - self._leader_contact
                if following and self._leader_contact > float("-inf")
                else None
            ),
            config=config,
            config_index=self.configs.latest_index,
            serving=self.serving,
            peers=tuple(peers),
        )

    # ---- lifecycle -------------------------------------------------------------------------

    def start_from_snapshot(self) -> None:
        """Restore the state machine from the snapshot the log was opened with, if any (once);
        SnapshotError or ValueError if its state does not decode."""
        restored = self.log.restored
        if restored is None:
            return
        self.log.restored = None
        self._restore(restored)
        self.narrate.info(
            "restored state from snapshot up to index %d (term %d, %s)",
            restored.index,
            restored.term,
            _size(restored.meta.size),
        )

    def start(self) -> None:
        """Begin as a follower (section 5.2) and wait for a leader or an election timeout."""
        self.start_from_snapshot()
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
        self.observer.state_changed()
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
        if self._stopped or self._role is Role.LEADER or not self.may_stand:
            return  # a learner or a removed node never stands for election
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
        if self._stopped or self._role is Role.LEADER or not self.may_stand:
            return
        if not self._leader_silent:
            self._leader_silent = True
            self.observer.state_changed()
        if self.log.disk_full:
            # It could persist neither its vote nor its entries: it must not lead. Each timeout
            # tries the disk again, so a node alone still notices when space returns.
            self.narrate.info("heard no leader, but my disk is full: not standing for election")
            self._spawn(self._retry_full_disk(), name="retry-disk")
            self._reset_election_timer()
            return
        waited = self.clock.now() - self._timer_armed_at
        self.narrate.info(
            "heard no leader for %d ms: asking whether a majority would elect me in term %d "
            "(pre-vote)",
            waited * 1000,
            self.current_term + 1,
        )
        self.start_pre_vote()

    def _heard_from_leader(self) -> None:
        """The leader of our term just spoke: postpone any election (Figure 2) and note when."""
        self._leader_contact = self.clock.now()
        self._pre_vote_term = None
        self._reset_election_timer()
        if self._leader_silent:
            self._leader_silent = False
            self.observer.state_changed()

    def _leader_is_recent(self) -> bool:
        """Whether this node heard from a current leader within the minimum election timeout
        (thesis section 4.2.3); a leader counts as hearing from itself."""
        if self._role is Role.LEADER:
            return True
        return (
            self.leader_id is not None
            and self.clock.now() - self._leader_contact < self.timing.election_timeout_min
        )

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
        if was is not Role.FOLLOWER:
            self.observer.state_changed()
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
        self._spawn(self._retry_full_disk(), name="flush-term")
        return True

    def _set_leader(self, leader_id: int | None) -> None:
        if leader_id != self.leader_id and leader_id is not None and leader_id != self.node_id:
            self.narrate.info("following leader %d", leader_id)
        changed = leader_id != self.leader_id
        self.leader_id = leader_id
        if changed:
            self._notify()  # a transfer waits to learn who leads now
            self.observer.state_changed()

    # ---- elections (section 5.2) -----------------------------------------------------------

    def start_pre_vote(self) -> None:
        """Ask every peer whether it would vote for this node in the next term (thesis section 9.6),
        changing nothing here: only with a majority of yeses does the real election start."""
        if self._stopped or self._role is Role.LEADER or not self.may_stand:
            return
        term = self.current_term + 1
        self._pre_vote_term = term
        self._pre_votes = {self.node_id}
        # Failing this round, the next timeout tries again.
        self._reset_election_timer()
        if len(self._pre_votes) >= self.quorum:
            self._win_pre_vote(term)
            return
        request = raft_pb2.VoteRequest(
            term=term,
            requester_id=self.node_id,
            last_log_index=self.log.last_index,
            last_log_term=self.log.last_term,
            pre_vote=True,
        )
        for peer_id in self._other_voters():
            self._spawn(self._ask_for_vote(peer_id, request), name=f"pre-vote-{peer_id}")

    def handle_pre_vote_reply(
        self, peer_id: int, request: raft_pb2.VoteRequest, reply: raft_pb2.RequestVoteResponse
    ) -> None:
        """Count a pre-vote. A grant carries the term asked about, which nobody holds yet, so it
        changes no term; a refusal carries the voter's own term, and a newer one is a real term
        this node missed (it catches up, as Figure 2 says for any reply)."""
        if not reply.vote_granted:
            if self._step_down_if_newer(reply.term, f"{peer_id}'s pre-vote reply"):
                return
            if self._pre_vote_term == request.term:
                self.narrate.info("%d would not vote for me in term %d", peer_id, request.term)
            return
        if (
            self._role is Role.LEADER
            or self._pre_vote_term != request.term
            or self.current_term + 1 != request.term
            or not self.config.is_voter(peer_id)
        ):
            return  # a reply to a pre-vote that is over, or from a node that does not vote
        self._pre_votes.add(peer_id)
        self.narrate.info(
            "%d would vote for me in term %d (%d of %d needed)",
            peer_id,
            request.term,
            self._count_voters(self._pre_votes),
            self.quorum,
        )
        if self._count_voters(self._pre_votes) >= self.quorum:
            self._win_pre_vote(request.term)

    def _win_pre_vote(self, term: int) -> None:
        self._pre_vote_term = None
        self.narrate.info(
            "a majority would elect me (%s): starting an election for term %d",
            ", ".join(str(v) for v in sorted(self._pre_votes)),
            term,
        )
        new_term = self._become_candidate(transfer=False)
        if new_term is not None:
            self._spawn(self._ask_for_votes(new_term, transfer=False), name="election")

    async def start_election(self, transfer: bool = False) -> None:
        """Become a candidate: new term, vote for self, make both durable, then ask every peer.

        `transfer`: the leader asked this node to take over (TimeoutNow), so its vote requests say
        so, and voters grant them even though they heard from that leader moments ago."""
        term = self._become_candidate(transfer)
        if term is not None:
            await self._ask_for_votes(term, transfer)

    def _become_candidate(self, transfer: bool) -> int | None:
        """Take the next term and vote for itself, at once (so nothing can come in between the
        decision to stand and the new term); None if this node may not stand now."""
        if self._stopped or self._role is Role.LEADER or not self.may_stand:
            return None
        self._pre_vote_term = None
        self._role = Role.CANDIDATE
        self.leader_id = None
        term = self.current_term + 1
        self.log.set_hard_state(term, self.node_id)
        self._votes = {self.node_id}
        self._reset_election_timer()
        self.observer.election_started()
        self.observer.state_changed()
        return term

    async def _ask_for_votes(self, term: int, transfer: bool) -> None:
        # The new term and the self-vote must be durable before any vote request leaves (seed defect 1).
        await self.log.flush()
        if self._role is not Role.CANDIDATE or self.current_term != term:
            return
        if self._count_voters(self._votes) >= self.quorum:
            self._become_leader()
            return
        request = raft_pb2.VoteRequest(
            term=term,
            requester_id=self.node_id,
            last_log_index=self.log.last_index,
            last_log_term=self.log.last_term,
            leadership_transfer=transfer,
        )
        self.narrate.info(
            "asking for votes%s (my log: last term %d, last index %d)",
            " to take over from the leader" if transfer else "",
            request.last_log_term,
            request.last_log_index,
        )
        for peer_id in self._other_voters():
            self._spawn(self._ask_for_vote(peer_id, request), name=f"vote-{peer_id}")

    async def _ask_for_vote(self, peer_id: int, request: raft_pb2.VoteRequest) -> None:
        """Send a vote or pre-vote request and count its reply."""
        what = "pre-vote" if request.pre_vote else "vote"
        try:
            reply = await self.transport.request_vote(
                peer_id, request, timeout=self.timing.election_timeout_min
            )
        except PeerUnreachableError as e:
            self.narrate.debug("%s request to %d failed: %s", what, peer_id, e)
            return
        if request.pre_vote:
            self.handle_pre_vote_reply(peer_id, request, reply)
        else:
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
        if not self.config.is_voter(peer_id):
            return  # only the votes of this node's configuration count (thesis section 4.1)
        self._votes.add(peer_id)
        votes = self._count_voters(self._votes)
        self.narrate.info("%d granted its vote (%d of %d needed)", peer_id, votes, self.quorum)
        if votes >= self.quorum:
            self._become_leader()

    async def handle_request_vote(
        self, request: raft_pb2.VoteRequest
    ) -> raft_pb2.RequestVoteResponse:
        """RequestVote receiver rules (Figure 2); the reply leaves only once term and vote are durable.

        A pre-vote is answered without changing anything (thesis section 9.6). A real vote request
        that arrives within the minimum election timeout of hearing from a current leader is
        refused without adopting its term (thesis section 4.2.3), unless the leader itself asked
        the candidate to take over (section 3.10)."""
        self._check_peer_message(
            request.requester_id,
            request.term,
            request.last_log_index,
            request.last_log_term,
        )
        self._check_candidate(request)
        if request.pre_vote:
            return await self._handle_pre_vote(request)
        candidate = request.requester_id
        if not request.leadership_transfer and self._leader_is_recent():
            self.narrate.info(
                "ignored vote request from %d for term %d: %s",
                candidate,
                request.term,
                self._why_leader_is_recent(),
            )
            await self.log.flush()
            return raft_pb2.RequestVoteResponse(term=self.current_term, vote_granted=False)
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

    def _why_leader_is_recent(self) -> str:
        if self._role is Role.LEADER:
            return "I lead this cluster"
        ago = (self.clock.now() - self._leader_contact) * 1000
        return f"I heard from leader {self.leader_id} {ago:.0f} ms ago"

    async def _handle_pre_vote(self, request: raft_pb2.VoteRequest) -> raft_pb2.RequestVoteResponse:
        """Would this node vote for the candidate in `request.term`? Decided by the RequestVote rules
        plus "no current leader heard from recently"; no term, vote or timer changes either way."""
        candidate = request.requester_id
        term = self.current_term
        mine = (self.log.last_term, self.log.last_index)
        theirs = (request.last_log_term, request.last_log_index)
        why: str | None = None
        if request.term < term:
            why = f"its term {request.term} is behind mine"
        elif request.term == term and self.voted_for not in (None, candidate):
            why = f"I already voted for {self.voted_for} in term {term}"
        elif self._leader_is_recent():
            why = self._why_leader_is_recent()
        elif theirs < mine:
            why = "its log (last term {}, index {}) is behind mine ({}, {})".format(*theirs, *mine)
        if why is not None:
            self.narrate.info(
                "would not vote for %d in term %d (pre-vote): %s", candidate, request.term, why
            )
            # A refusal carries this node's term, so a candidate with a stale term catches up; the
            # term must then be durable, as for any reply that carries it.
            await self.log.flush()
            return raft_pb2.RequestVoteResponse(term=self.current_term, vote_granted=False)
        self.narrate.info(
            "would vote for %d in term %d (pre-vote): its log (last term %d, index %d) is at "
            "least as up to date as mine (%d, %d) and I have no recent leader",
            candidate,
            request.term,
            *theirs,
            *mine,
        )
        # A grant carries the term asked about, so it can never look like a newer term to anyone.
        return raft_pb2.RequestVoteResponse(term=request.term, vote_granted=True)

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
        self._check_unlisted_leader(request.requester_id, request.term)
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
        self._heard_from_leader()

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
                self.narrate.info(
                    "truncating my log from index %d: it conflicts with the leader's", index
                )
                self._truncate_log(index)
            self._append_to_log(entries[offset:])
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
                self.narrate.info("commit index now %d (told by the leader)", new_commit)
                self._apply_committed()
        await self.log.flush()
        # The term as it is now: if a newer leader appeared while the entries were being written,
        # the old leader learns of it here instead of counting this reply (section 5.1).
        return raft_pb2.AppendEntriesResponse(
            term=self.current_term, success=success, match_index=match_index
        )

    def _check_peer_message(self, requester_id: int, term: int, *numbers: int) -> None:
        """Refuse a message from this node's own id, from a node whose removal this node knows
        committed, or with numbers out of range. Until the removal commits, the removed node is
        still a member of the committed configuration: a leader removing itself leads until then,
        and in its term it is still heard after that, while it hands over (thesis 4.2.2)."""
        numbers = (term, *numbers)
        if requester_id == self.node_id or requester_id <= 0:
            self.narrate.warning("refused a message claiming to come from %d", requester_id)
            raise InvalidRequestError(f"{requester_id} is not another member's id")
        if requester_id in self.configs.at(self.commit_index).removed and not self._is_my_leader(
            requester_id, term
        ):
            self.narrate.warning(
                "refused a message from %d: it was removed from this cluster", requester_id
            )
            raise InvalidRequestError(f"{requester_id} was removed from this cluster")
        if any(n < 0 or n >= MAX_WIRE_NUMBER for n in numbers):
            self.narrate.warning(
                "refused a message from %d: a term or index is out of range", requester_id
            )
            raise InvalidRequestError("a term or index is negative or absurdly large")

    def _check_unlisted_leader(self, leader: int, term: int) -> None:
        """Entries from a leader this node's configuration does not list are accepted only while
        this node has no recent leader of its own: the entry adding that leader may be among those
        this node has yet to receive (thesis section 4.1), and refusing would leave it behind for
        good; but while a known leader speaks, such a message can only disrupt (as a vote request
        would, thesis section 4.2.3). A node that knows no members yet (joining) accepts any, and
        the leader this node follows in its term (one removing itself) is accepted until it steps
        down."""
        config = self.config
        if config.is_member(leader) or not config.members or self._is_my_leader(leader, term):
            return
        if self._leader_is_recent():
            self.narrate.warning(
                "refused entries from %d: it is not a member, and %s",
                leader,
                self._why_leader_is_recent(),
            )
            raise InvalidRequestError(f"{leader} is not a member of this cluster")
        if self._unlisted_leader_noted != (leader, self.current_term):
            self._unlisted_leader_noted = (leader, self.current_term)
            self.narrate.info(
                "accepting entries from %d, which my configuration does not list: an entry I have "
                "not received yet must add it",
                leader,
            )

    def _is_my_leader(self, node_id: int, term: int) -> bool:
        return term == self.current_term and self.leader_id == node_id

    def _check_candidate(self, request: raft_pb2.VoteRequest) -> None:
        """Votes and pre-votes go to members of this node's configuration; to a candidate it does
        not list only while no leader is recent and the candidate's log is ahead of this node's.
        That candidate may hold the entry adding it, which this node has yet to receive (thesis
        4.1: refusing it could leave the cluster without a leader for good); while a leader
        speaks, such a request can only disrupt (thesis 4.2.3)."""
        candidate = request.requester_id
        if self.config.is_member(candidate):
            return
        ahead = (request.last_log_term, request.last_log_index) > (
            self.log.last_term,
            self.log.last_index,
        )
        if ahead and not self._leader_is_recent():
            return
        self.narrate.warning(
            "refused a vote request from %d: not a member of this cluster", candidate
        )
        raise InvalidRequestError(f"{candidate} is not a member of this cluster")

    def _check_member(self, requester_id: int, what: str, term: int | None = None) -> None:
        """Read index and TimeoutNow requests come only from members of this node's configuration,
        or from the leader it follows in `term` (one removing itself hands over with TimeoutNow)."""
        if term is not None and self._is_my_leader(requester_id, term):
            return
        if not self.config.is_member(requester_id):
            self.narrate.warning(
                "refused a %s from %d: not a member of this cluster", what, requester_id
            )
            raise InvalidRequestError(f"{requester_id} is not a member of this cluster")

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
            if entry.kind == raft_pb2.ENTRY_KIND_CONFIG:
                try:
                    Membership.from_proto(entry.config)
                except MembershipError as e:
                    self.narrate.warning(
                        "refused append from %d: a malformed configuration: %s",
                        request.requester_id,
                        e,
                    )
                    raise InvalidRequestError(f"entry {entry.index}: {e}") from None
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
        self.progress = {}
        self._departing = {}
        self._leaving = False
        self._sync_progress()
        # Section 8: a no-op of the new term lets entries of earlier terms commit without a new write.
        self._append_as_leader(raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_NOOP))
        task = self._spawn(self._check_quorum(term), name="check-quorum")
        self._leader_tasks = [task] if task is not None else []
        self._leader_silent = False
        self.observer.election_won()
        self.observer.state_changed()

    def _sync_progress(self) -> None:
        """Leader: replicate to every other member of the configuration in use; keep sending to a
        removed follower until it has been told its removal committed."""
        term = self.current_term
        now = self.clock.now()
        for peer_id in self.peers:
            self._departing.pop(peer_id, None)
            if peer_id not in self.progress:
                # A new follower, or the votes just won: count as heard from, for check quorum.
                self.progress[peer_id] = Progress(next_index=self.log.last_index + 1, heard_at=now)
                task = self._spawn(self._replicate(peer_id, term), name=f"replicate-{peer_id}")
                if task is not None:
                    self._replicators[peer_id] = task
        for peer_id in list(self.progress):
            if peer_id not in self.peers and peer_id not in self._departing:
                self._departing[peer_id] = self.configs.latest_index

    def _stop_replicating(self, peer_id: int) -> None:
        progress = self.progress.pop(peer_id, None)
        self._departing.pop(peer_id, None)
        if progress is not None:
            self._end_snapshot_transfer(progress)
        task = self._replicators.pop(peer_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _check_quorum(self, term: int) -> None:
        """Step down once a majority (counting this node) has not answered for an election timeout,
        so a leader cut off from the others stops taking writes and reads that cannot succeed."""
        window = self.timing.election_timeout_max
        while self._role is Role.LEADER and self.current_term == term:
            heard = self._majority_heard_at()
            # One expression for the test and the timer, so a timer firing on time is never early.
            deadline = heard + window
            if self.clock.now() >= deadline:
                answered = int(self.is_voter) + sum(
                    1 for p in self._voter_progress() if p.heard_at > self.clock.now() - window
                )
                self._become_follower(
                    term,
                    None,
                    f"only {answered} of {self.cluster_size} nodes (counting me) answered in the "
                    f"last {window * 1000:.0f} ms; I may be cut off from the majority (check quorum)",
                )
                return
            # A new configuration has another majority: the loop looks again at once.
            self._quorum_wake = asyncio.Event()
            await wait_until_time(self.clock, self._quorum_wake, deadline)

    def _majority_heard_at(self) -> float:
        """The latest time by which a majority of the voters, counting this node if it votes, had
        answered us."""
        heard = [p.heard_at for p in self._voter_progress()]
        if self.is_voter:
            heard.append(self.clock.now())
        heard.sort(reverse=True)
        return heard[self.quorum - 1] if len(heard) >= self.quorum else float("-inf")

    def _stop_leading(self) -> None:
        self._transfer = None
        if self._commit_notice is not None:
            self._commit_notice.cancel()
            self._commit_notice = None
        self._notify()
        for task in self._leader_tasks + list(self._replicators.values()):
            task.cancel()
        self._leader_tasks = []
        self._replicators = {}
        for progress in self.progress.values():
            self._end_snapshot_transfer(progress)
        self.progress = {}
        self._departing = {}
        self._fail_waiters("leadership was lost before the write committed")

    def _fail_waiters(self, why: str) -> None:
        waiters, self._waiters = self._waiters, {}
        for _, future in waiters.values():
            if not future.done():
                future.set_exception(CommitUnknownError(f"{why}; it may or may not be applied"))

    def _append_as_leader(self, entry: raft_pb2.LogEntry) -> int:
        entry.term = self.current_term
        entry.index = self.log.last_index + 1
        # Log time (sessions expire by it) never goes backwards, even if this clock is behind the
        # previous leader's.
        if entry.index - 1 > self.log.base_index:
            previous = self.log.entry(entry.index - 1).leader_time_ms
        else:
            previous = self.state_machine.log_time_ms if entry.index > 1 else 0
        entry.leader_time_ms = max(int(self.wall_clock() * 1000), previous)
        self._append_to_log([entry])
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
        full_since: float | None = None
        try:
            while self.log.durable_index < self.log.last_index:
                try:
                    await self.log.flush()
                except DiskFullError as e:
                    now = self.clock.now()
                    if full_since is None:
                        full_since = now
                        self.narrate.error(
                            "%s: refusing writes until space returns (retrying)", e.strerror
                        )
                    if (
                        self._role is Role.LEADER
                        and now - full_since >= self.timing.election_timeout_max
                    ):
                        # A leader that can make nothing durable commits nothing: let a node
                        # with a working disk lead (it stands for no election meanwhile).
                        self._become_follower(
                            self.current_term,
                            None,
                            "my disk has been full for an election timeout; a node that can "
                            "write should lead",
                        )
                    await self.pause(self.timing.heartbeat_interval)
                    continue
                if full_since is not None:
                    full_since = None
                    self.narrate.info("my disk has space again: taking writes")
                if self._role is Role.LEADER:
                    self._advance_commit()
        finally:
            self._self_flush_running = False

    async def pause(self, seconds: float) -> None:
        """Wait `seconds` on this node's clock (the simulation's, in the simulation)."""
        await wait_until_time(self.clock, asyncio.Event(), self.clock.now() + seconds)

    async def _retry_full_disk(self) -> None:
        try:
            await self.log.flush()
        except DiskFullError:
            pass

    async def propose_mapping(
        self, key: str, value: str, session: raft_pb2.Session | None = None
    ) -> None:
        """Store one mapping; return once it is committed and applied here. Raises NotLeaderError.

        Without a session it is the seed's MAPPING entry; with one, a COMMAND whose result may be
        SessionExpired, raised here as SessionExpiredError.
        """
        if session is None or session.client_id == 0:
            await self._propose_entry(
                raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_MAPPING, key=key, value=value)
            )
            return
        batch = raft_pb2.MappingBatch(
            mappings=[raft_pb2.Mapping(key=key, value=value)], session=session
        )
        result = await self.propose(raft_pb2.Command(put=batch))
        if isinstance(result, SessionExpired):
            raise SessionExpiredError(result.reason)

    async def propose(self, command: raft_pb2.Command) -> ApplyResult:
        """Append a command; once it is committed and applied here, return what applying it gave.

        Raises NotLeaderError (nothing appended) or CommitUnknownError (outcome unknown).
        """
        result = await self._propose_entry(
            raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_COMMAND, command=command)
        )
        if isinstance(result, SessionExpired):
            self.narrate.info("refused a client's write: %s", result.reason)
        elif command.WhichOneof("op") == "register_client":
            self.narrate.debug("registered client session %s", result)
        return result

    async def _propose_entry(self, entry: raft_pb2.LogEntry) -> ApplyResult:
        if self._role is not Role.LEADER:
            leader_id, address = self.leader()
            if leader_id is not None:
                self.narrate.info("redirecting a client to leader %d", leader_id)
            else:
                self.narrate.info("turning a client away: no leader known")
            raise NotLeaderError(leader_id, address)
        self._refuse_while_transferring()
        if self.log.disk_full:
            raise OverloadedError(
                f"disk full on node {self.node_id}: it takes no writes until space returns"
            )
        if len(self._waiters) >= MAX_WAITING_PROPOSALS:
            raise OverloadedError(
                f"{len(self._waiters)} writes already wait to commit on node {self.node_id}; "
                "try again later"
            )
        index = self._append_as_leader(entry)
        future: asyncio.Future[ApplyResult] = asyncio.get_running_loop().create_future()
        self._waiters[index] = (self.current_term, future)
        # One timer per write, not a timeout context and a shield (each a few objects and
        # callbacks more). A caller that is cancelled cancels the future, which apply then skips.
        # Latency for metrics only: a finer clock than the loop's (whose ticks are milliseconds);
        # no decision depends on it.
        started = time.perf_counter()
        timer = self.clock.call_at(
            self.clock.now() + self.timing.proposal_timeout,
            lambda: self._expire_proposal(index, future),
        )
        try:
            result = await future
        finally:
            timer.cancel()
            if self._waiters.get(index, (0, None))[1] is future:
                del self._waiters[index]
        self.observer.proposal_committed(time.perf_counter() - started)
        return result

    def _expire_proposal(self, index: int, future: asyncio.Future[ApplyResult]) -> None:
        if not future.done():
            future.set_exception(
                CommitUnknownError(
                    f"entry {index} did not commit within {self.timing.proposal_timeout:g} s; "
                    "it may or may not be applied"
                )
            )

    async def _replicate(self, peer_id: int, term: int) -> None:
        """Keep one follower's log in step with ours: entries when it lacks them, else heartbeats."""
        progress = self.progress[peer_id]
        while (
            self._role is Role.LEADER
            and self.current_term == term
            and self.progress.get(peer_id) is progress
        ):
            now = self.clock.now()
            if peer_id in self._departing and self._gave_up_on_departing(peer_id, progress, now):
                return
            has_entries = progress.next_index <= self.log.last_index
            commit_news = min(self._announced_commit, progress.match_index) > progress.told_commit
            commit_news = commit_news or progress.sent_round < self._read_round
            # One expression for both the test and the timer: with `now - last_sent >= interval`
            # rounding could call a timer that fired exactly on time early, and the task would
            # re-arm the same instant forever.
            next_heartbeat = progress.last_sent + self.timing.heartbeat_interval
            heartbeat_due = now >= next_heartbeat
            if now < progress.retry_at or not (has_entries or commit_news or heartbeat_due):
                wait = max(progress.retry_at, next_heartbeat)
                progress.wake.clear()
                await wait_until_time(self.clock, progress.wake, wait)
                continue
            await self._send_append(peer_id, term, progress)

    async def _send_append(self, peer_id: int, term: int, progress: Progress) -> None:
        prev = progress.next_index - 1
        if prev < self.log.base_index:
            await self._send_snapshot_chunk(peer_id, term, progress)
            return
        entries = self.log.entries(
            progress.next_index, MAX_ENTRIES_PER_MESSAGE, MAX_BYTES_PER_MESSAGE
        )
        # Followers in step get the same message: built (and, by the transport, encoded) once.
        # Within a term the leader's log only grows, so these numbers determine its content.
        key = (term, prev, entries[-1].index if entries else prev, self.commit_index)
        if self._last_append is not None and self._last_append[0] == key:
            request = self._last_append[1]
        else:
            request = raft_pb2.AppendEntriesRequest(
                term=term,
                requester_id=self.node_id,
                prev_log_index=prev,
                prev_log_term=self.log.term_at(prev),
                leader_commit=self.commit_index,
                log_entries=entries,
            )
            self._last_append = (key, request)
        sent_at = progress.last_sent = self.clock.now()
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
        if reply.term == term:
            # The follower heard from us after `sent_at`; that is what check quorum counts.
            progress.heard_at = max(progress.heard_at, sent_at)
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
            self._advance_commit()
            self._after_follower_progress(peer_id, progress)
            return
        # Back up past the whole conflicting term at once (section 5.3, "the protocol can be
        # optimized"): to after our last entry of that term, or to the follower's first entry of it.
        next_index = reply.conflict_index
        if reply.conflict_term > 0:
            lowest = self.log.base_index
            for index in range(min(request.prev_log_index, self.log.last_index), lowest, -1):
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
        """Commit the highest index durable on a majority, if it is from this term (section 5.4.2).

        The majority is of the voters of the configuration in use; a leader that is removing
        itself does not count itself (thesis section 4.2.2)."""
        matches = [p.match_index for p in self._voter_progress()]
        if self.is_voter:
            matches.append(self.log.durable_index)
        if len(matches) < self.quorum:
            return
        matches.sort(reverse=True)
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
        if self._commit_notice is None:
            self._commit_notice = self.clock.call_at(
                self.clock.now() + self.timing.commit_notice_delay, self._announce_commit
            )
        self._after_leader_commit()

    def _announce_commit(self) -> None:
        """Followers not told the new commit index by now get a message that says it."""
        self._commit_notice = None
        if self._role is not Role.LEADER or self._stopped:
            return
        self._announced_commit = self.commit_index
        for progress in self.progress.values():
            progress.wake.set()

    # ---- leadership transfer (thesis section 3.10) -----------------------------------------

    async def transfer_leadership(self, target_id: int | None = None) -> int:
        """Hand leadership to `target_id` (None or 0: the most up-to-date other node); return the
        id of the node that leads afterwards (this node's own id if it was the target).

        While the transfer runs, new writes are refused with NotLeaderError naming the target, so
        clients retry there; reads are still served. The target's log is brought up to date, then
        it is told to start an election at once (TimeoutNow). If leadership has not moved within an
        election timeout, the transfer is abandoned, this node takes writes again, and
        TransferFailedError is raised. Raises NotLeaderError when this node does not lead and
        ValueError for a target that is not a member.
        """
        if self._role is not Role.LEADER:
            raise NotLeaderError(*self.leader())
        if target_id == self.node_id:
            return self.node_id
        voters = self._other_voters()
        if target_id and target_id not in voters:
            if self.config.is_member(target_id):
                raise ValueError(f"{target_id} is a learner, not a voting member")
            raise ValueError(f"{target_id} is not a member of this cluster")
        if self._transfer is not None:
            raise TransferFailedError(f"already handing leadership to {self._transfer.target}")
        if not voters:
            raise TransferFailedError("there is no other voter to hand leadership to")
        term = self.current_term
        window = self.timing.election_timeout_max
        recent = self.clock.now() - window

        def readiness(peer: int) -> tuple[bool, int, int]:
            # A peer that answers now beats one further ahead that may be down.
            progress = self.progress[peer]
            return (progress.heard_at > recent, progress.match_index, -peer)

        target = target_id or max(voters, key=readiness)
        transfer = self._transfer = _Transfer(target, term)
        self.narrate.info(
            "handing leadership to %d: refusing new writes until it takes over (its log matches "
            "mine up to index %d of %d)",
            target,
            self.progress[target].match_index,
            self.log.last_index,
        )
        try:
            async with asyncio.timeout(window):
                await self._send_timeout_now(transfer)
                # The target's vote request (or a newer leader's message) makes this node follow.
                while self._role is Role.LEADER and self.current_term == term:
                    await self._changed.wait()
        except TimeoutError:
            if self._role is Role.LEADER and self.current_term == term:
                self.narrate.info(
                    "gave up handing leadership to %d: it did not take over within %d ms; "
                    "accepting writes again",
                    target,
                    window * 1000,
                )
                raise TransferFailedError(
                    f"{target} did not take over within {window:g} s; {self.node_id} still leads"
                ) from None
        finally:
            if self._transfer is transfer:
                self._transfer = None
        # Who won becomes known with its first append.
        try:
            async with asyncio.timeout(window):
                while self.leader_id is None:
                    await self._changed.wait()
        except TimeoutError:
            raise TransferFailedError(
                "leadership moved on, but no new leader is known here yet"
            ) from None
        leader_id = self.leader_id
        assert leader_id is not None
        return leader_id

    async def _send_timeout_now(self, transfer: _Transfer) -> None:
        """Bring the transfer's target up to date, then tell it to start an election now; retried
        while it cannot be reached. Returns early if this node stops leading meanwhile."""
        target, term = transfer.target, transfer.term

        def leading() -> bool:
            return (
                self._role is Role.LEADER and self.current_term == term and target in self.progress
            )

        while leading() and self.progress[target].match_index < self.log.last_index:
            self.progress[target].wake.set()
            await self._changed.wait()
        request = raft_pb2.TimeoutNowRequest(term=term, requester_id=self.node_id)
        while leading():
            self.narrate.info(
                "%d holds my whole log (up to index %d): telling it to start an election now",
                target,
                self.log.last_index,
            )
            try:
                reply = await self.transport.timeout_now(
                    target, request, timeout=self.timing.election_timeout_min
                )
            except PeerUnreachableError as e:
                self.narrate.debug("TimeoutNow to %d failed: %s", target, e)
                await self.pause(self.timing.heartbeat_interval)
                continue
            self._step_down_if_newer(reply.term, f"{target}'s TimeoutNow reply")
            return

    def _refuse_while_transferring(self) -> None:
        """While leadership is being handed over, new writes go to the target (thesis 3.10)."""
        transfer = self._transfer
        if transfer is not None:
            self.narrate.info("turning a client away: handing leadership to %d", transfer.target)
            target = self.config.address(transfer.target)
            raise NotLeaderError(transfer.target, target.client_address if target else None)

    async def handle_timeout_now(
        self, request: raft_pb2.TimeoutNowRequest
    ) -> raft_pb2.TimeoutNowResponse:
        """The leader hands leadership over: start an election at once, without a pre-vote, with
        vote requests that voters grant despite having just heard from that leader."""
        self._check_peer_message(request.requester_id, request.term)
        self._check_member(request.requester_id, "TimeoutNow", request.term)
        leader = request.requester_id
        self._step_down_if_newer(request.term, f"TimeoutNow from {leader}")
        reply = raft_pb2.TimeoutNowResponse(term=self.current_term)
        if request.term < self.current_term or self._role is Role.LEADER:
            self.narrate.info(
                "ignored TimeoutNow from %d: its term %d is not my current term",
                leader,
                request.term,
            )
            return reply
        self.narrate.info(
            "leader %d asked me to take over: starting an election for term %d now",
            leader,
            self.current_term + 1,
        )
        term = self._become_candidate(transfer=True)
        if term is not None:
            self._spawn(self._ask_for_votes(term, transfer=True), name="election")
        return reply

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
                read_index = await self._confirm_read_index(term)
                await self._wait_until(lambda: self.last_applied >= read_index, term)
        except TimeoutError:
            raise UnavailableError(
                f"could not confirm leadership within {self.timing.proposal_timeout:g} s"
            ) from None
        return self.state_machine.get(key)

    async def linearizable_read(self, key: str) -> str | None:
        """A linearizable read on any node: the leader confirms itself (`read`); a follower asks
        the leader for a read index, applies up to it and answers from its own state.

        Raises UnavailableError when no leader can confirm the read in time (no leader known,
        the leader unreachable or deposed); never answers from state that may be stale.
        """
        if self._reads_waiting >= MAX_WAITING_READS:
            raise OverloadedError(
                f"{self._reads_waiting} reads already wait on node {self.node_id}; try again later"
            )
        self._reads_waiting += 1
        try:
            return await self._linearizable_read(key)
        finally:
            self._reads_waiting -= 1

    async def _linearizable_read(self, key: str) -> str | None:
        started = time.perf_counter()  # for metrics only, as for proposals
        if self._role is Role.LEADER:
            try:
                value = await self.read(key)
            except NotLeaderError as e:
                raise UnavailableError(f"lost leadership while reading: {e}") from None
            self.observer.read_served(time.perf_counter() - started)
            return value
        leader_id = self.leader_id
        if leader_id is None or leader_id == self.node_id:
            raise UnavailableError("no leader known to confirm the read")
        timeout = self.timing.proposal_timeout
        try:
            async with asyncio.timeout(timeout):
                read_index = await self._read_index_from_leader()
                while self.last_applied < read_index:
                    await self._changed.wait()
        except TimeoutError:
            raise UnavailableError(
                f"could not apply up to the leader's read index within {timeout:g} s"
            ) from None
        self.narrate.debug("served a linearizable read at read index %d", read_index)
        self.observer.read_served(time.perf_counter() - started)
        return self.state_machine.get(key)

    async def _read_index_from_leader(self) -> int:
        """The leader's read index, from a request sent after this call began (so it covers
        every write acknowledged before the read arrived). Reads that arrive while a request is
        out share the next one: one request in flight per follower, however many reads."""
        batch = self._next_read_index
        if batch is None:
            batch = self._next_read_index = asyncio.get_running_loop().create_future()
            # Every read sharing it may have given up by the time it fails.
            batch.add_done_callback(_retrieve_exception)
            if not self._read_index_sending:
                self._read_index_sending = True
                if self._spawn(self._send_read_index_requests(), name="read-index") is None:
                    self._read_index_sending = False
                    self._next_read_index = None
                    raise UnavailableError("the node is shutting down")
        # Shielded: one read giving up must not fail the others sharing the request.
        return await asyncio.shield(batch)

    async def _send_read_index_requests(self) -> None:
        batch: asyncio.Future[int] | None = None
        try:
            while (batch := self._next_read_index) is not None:
                self._next_read_index = None
                try:
                    read_index = await self._ask_leader_for_read_index()
                except UnavailableError as e:
                    if not batch.done():
                        batch.set_exception(e)
                else:
                    if not batch.done():
                        batch.set_result(read_index)
        finally:
            # Only when the node stops does this end with reads still waiting.
            self._read_index_sending = False
            for waiting in (batch, self._next_read_index):
                if waiting is not None and not waiting.done():
                    waiting.set_exception(UnavailableError("the node is shutting down"))
            self._next_read_index = None

    async def _ask_leader_for_read_index(self) -> int:
        leader_id = self.leader_id
        if leader_id is None or leader_id == self.node_id or self._role is Role.LEADER:
            raise UnavailableError("no leader known to confirm the read")
        request = raft_pb2.ReadIndexRequest(term=self.current_term, requester_id=self.node_id)
        try:
            reply = await self.transport.read_index(
                leader_id, request, self.timing.proposal_timeout
            )
        except PeerUnreachableError as e:
            raise UnavailableError(f"leader {leader_id} is unreachable: {e}") from None
        self._step_down_if_newer(reply.term, f"{leader_id}'s read index reply")
        if not reply.success:
            raise UnavailableError(f"{leader_id} could not confirm it leads")
        return reply.read_index

    async def handle_read_index(
        self, request: raft_pb2.ReadIndexRequest
    ) -> raft_pb2.ReadIndexResponse:
        """A follower asks for a read index (thesis section 6.4.1): the leader confirms it still
        leads, as for its own reads, and gives its commit index as of the request."""
        self._check_peer_message(request.requester_id, request.term)
        self._check_member(request.requester_id, "read index request")
        self._step_down_if_newer(request.term, f"read index request from {request.requester_id}")
        term = self.current_term
        refused = raft_pb2.ReadIndexResponse(term=term, success=False)
        if self._role is not Role.LEADER:
            return refused
        try:
            async with asyncio.timeout(self.timing.proposal_timeout):
                read_index = await self._confirm_read_index(term)
        except (TimeoutError, NotLeaderError):
            self.narrate.debug(
                "could not confirm a read index for %d: leadership unconfirmed",
                request.requester_id,
            )
            refused.term = self.current_term
            return refused
        self.narrate.debug("gave read index %d to %d", read_index, request.requester_id)
        return raft_pb2.ReadIndexResponse(term=term, success=True, read_index=read_index)

    async def _confirm_read_index(self, term: int) -> int:
        """The leader's commit index once a majority has confirmed this node still leads `term`."""
        # Until its no-op commits, a new leader does not know the latest commit index.
        await self._wait_until(lambda: self.log.term_at(self.commit_index) == term, term)
        read_index = self.commit_index
        # A round of heartbeats answered by a majority shows no newer leader existed when the read
        # arrived; reads that arrive together share one round.
        self._read_round += 1
        read_round = self._read_round
        for progress in self.progress.values():
            progress.wake.set()
        await self._wait_until(lambda: self._confirmed(read_round), term)
        return read_index

    def _confirmed(self, read_round: int) -> bool:
        acks = int(self.is_voter) + sum(
            1 for p in self._voter_progress() if p.acked_round >= read_round
        )
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
        if self.last_applied < self.commit_index:
            self._apply_entries()
            self._maybe_snapshot()
            self._check_removed()

    def _apply_entries(self) -> None:
        while self.last_applied < self.commit_index:
            entry = self.log.entry(self.last_applied + 1)
            result = self.state_machine.apply(entry)
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

    # ---- membership (thesis chapter 4, one server at a time) -------------------------------

    def _other_voters(self) -> list[int]:
        return [i for i in self.configs.latest.voters if i != self.node_id]

    def _voter_progress(self) -> list[Progress]:
        voters = self.configs.latest.voters
        return [p for i, p in self.progress.items() if i in voters]

    def _count_voters(self, ids: set[int]) -> int:
        voters = self.configs.latest.voters
        return sum(1 for i in ids if i in voters)

    def _append_to_log(self, entries: list[raft_pb2.LogEntry]) -> None:
        """Append to the log; a configuration among the entries is in use from now on (4.1)."""
        self.log.append(entries)
        before = self.configs.latest
        for entry in entries:
            if entry.kind == raft_pb2.ENTRY_KIND_CONFIG:
                self.configs.append(entry.index, Membership.from_proto(entry.config))
        if self.configs.latest is not before:
            self._config_changed(before)

    def _truncate_log(self, index: int) -> None:
        """Drop entries from `index` on; a configuration among them is no longer in use."""
        self.log.truncate_from(index)
        before = self.configs.latest
        self.configs.truncate_from(index)
        if self.configs.latest is not before:
            self._config_changed(before)

    def _rebuild_configs(self, base: Membership, base_index: int) -> None:
        """Recompute the configurations from a snapshot's (or the bootstrap one) and the log."""
        before = self.configs.latest
        self.configs.reset(base, base_index)
        for index in range(max(base_index, self.log.base_index) + 1, self.log.last_index + 1):
            entry = self.log.entry(index)
            if entry.kind == raft_pb2.ENTRY_KIND_CONFIG:
                self.configs.append(index, Membership.from_proto(entry.config))
        self._config_changed(before)

    def _config_changed(self, before: Membership) -> None:
        config = self.configs.latest
        self.peers = {i: n for i, n in config.members.items() if i != self.node_id}
        self.transport.update_peers({i: n.raft_address for i, n in self.peers.items()})
        if config is before:
            return
        index = self.configs.latest_index
        self.narrate.info(
            "configuration now: %s (from index %d%s)",
            config.describe(),
            index,
            ", not yet committed" if index > self.commit_index else "",
        )
        if self._role is Role.LEADER:
            self._sync_progress()
            self._quorum_wake.set()
        elif not self.may_stand:
            if self._role is Role.CANDIDATE:
                self._become_follower(self.current_term, None, "I no longer vote")
            self._cancel_election_timer()
        elif self._election_timer is None and self._timer_armed_at and not self._stopped:
            # Promoted to voter (after start): from now on this node may stand for election.
            self._reset_election_timer()
        self.observer.state_changed()

    def _after_follower_progress(self, peer_id: int, progress: Progress) -> None:
        """Leader: a follower holds more of the log than before."""
        if self._transfer is not None and self._transfer.target == peer_id:
            self._notify()  # the transfer waits for its target to catch up
        removal = self._departing.get(peer_id)
        if removal is not None and progress.told_commit >= removal:
            self.narrate.info("%d knows its removal committed: no longer sending to it", peer_id)
            self._stop_replicating(peer_id)
            return
        if peer_id in self.configs.latest.learners:
            self._maybe_promote(peer_id)

    def _gave_up_on_departing(self, peer_id: int, progress: Progress, now: float) -> bool:
        """Stop telling a removed follower about its removal once that has committed, if it would
        need a whole snapshot to learn it or has not answered for an election timeout: it must
        not hold back log compaction or cost the leader work for good."""
        if self._departing[peer_id] > self.commit_index:
            return False
        needs_snapshot = progress.next_index - 1 < self.log.base_index
        silent = now - progress.heard_at > self.timing.election_timeout_max
        if not (needs_snapshot or silent):
            return False
        self.narrate.info(
            "stopped sending to removed node %d: %s",
            peer_id,
            "it would need a snapshot" if needs_snapshot else "it does not answer",
        )
        self._stop_replicating(peer_id)
        return True

    def _maybe_promote(self, peer_id: int) -> None:
        """Make a learner a voter once its log has caught up, so adding it never leaves the new
        majority waiting for a node that is far behind (thesis section 4.2.1)."""
        if self._role is not Role.LEADER or self._leaving or self._transfer is not None:
            return
        if self.configs.latest_index > self.commit_index:
            return  # one change at a time
        if self.log.term_at(self.commit_index) != self.current_term:
            return  # not before this leader has committed an entry of its own term
        progress = self.progress.get(peer_id)
        if progress is None or progress.snapshot is not None:
            return
        # It must hold the configuration that added it (so it has answered us), and be within one
        # message of the end of the log.
        behind = self.log.last_index - progress.match_index
        if progress.match_index < self.configs.latest_index or behind > MAX_ENTRIES_PER_MESSAGE:
            return
        self.narrate.info(
            "learner %d has caught up (%d entries behind me): promoting it to voter",
            peer_id,
            behind,
        )
        promoted = self.configs.latest.with_voter(peer_id)
        self._append_as_leader(
            raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_CONFIG, config=promoted.to_proto())
        )

    def _after_leader_commit(self) -> None:
        """Leader: a new commit may complete a change: promote the next learner, or leave."""
        if self._leaving or self.configs.latest_index > self.commit_index:
            return
        if not self.configs.latest.is_member(self.node_id):
            self._leaving = True
            self._spawn(self._leave_after_removal(self.current_term), name="leave")
            return
        for learner in list(self.configs.latest.learners):
            self._maybe_promote(learner)

    async def _leave_after_removal(self, term: int) -> None:
        """The configuration removing this leader committed: hand leadership to the most
        up-to-date voter, so the others need not wait out an election timeout, then step down
        (thesis section 4.2.2)."""
        self.narrate.info(
            "the configuration without me committed at index %d: handing over and stepping down",
            self.configs.latest_index,
        )
        voters = self._other_voters()
        if voters and self._role is Role.LEADER and self.current_term == term:
            target = max(voters, key=lambda p: (self.progress[p].match_index, -p))
            transfer = self._transfer = _Transfer(target, term)
            try:
                async with asyncio.timeout(self.timing.election_timeout_min):
                    await self._send_timeout_now(transfer)
            except TimeoutError:
                pass
            finally:
                if self._transfer is transfer:
                    self._transfer = None
        if self._role is Role.LEADER and self.current_term == term:
            self._become_follower(term, None, "I am no longer a member of this cluster")
        self._check_removed()

    def _check_removed(self) -> None:
        """A node learns it was removed once the configuration removing it is committed."""
        if self.removed.is_set() or self._role is Role.LEADER:
            return
        if self.node_id not in self.configs.at(self.commit_index).removed:
            return
        self.narrate.info(
            "removed from the cluster (the change committed by index %d): no longer taking part",
            self.commit_index,
        )
        self._cancel_election_timer()
        self.removed.set()
        self.observer.state_changed()

    def _require_leader(self) -> None:
        if self._role is not Role.LEADER:
            raise NotLeaderError(*self.leader())
        self._refuse_while_transferring()

    async def list_members(self) -> tuple[Membership, int, bool]:
        """The leader's configuration in use; NotLeaderError elsewhere."""
        if self._role is not Role.LEADER:
            raise NotLeaderError(*self.leader())
        return self.membership()

    async def add_member(
        self, node: NodeAddress, wait_until_voter: bool = True
    ) -> tuple[Membership, int, bool]:
        """Add `node` as a learner and return once that has committed; the leader promotes it to
        voter once it has caught up (with `wait_until_voter`, this waits for that too, at most
        PROMOTION_WAIT seconds). Adding a member that is already there with the same addresses
        changes nothing. Raises NotLeaderError, MembershipError, ChangeInProgressError or
        CommitUnknownError."""
        self._require_leader()
        existing = self.configs.latest.address(node.id)
        if existing is not None and existing != node:
            raise MembershipError(
                f"{node.id} is already a member, at {existing.raft_address} "
                f"(client {existing.client_address})"
            )
        if existing is None:
            await self._change_config(
                lambda config: config.with_learner(node),
                f"adding {node.id} (Raft {node.raft_address}, clients {node.client_address}) as "
                "a learner",
            )
        await self._wait_for(
            lambda: self.configs.latest_index <= self.commit_index, self.timing.proposal_timeout
        )
        if wait_until_voter:
            await self._wait_for(
                lambda: not self.configs.latest.learners.get(node.id)
                and self.configs.latest_index <= self.commit_index,
                PROMOTION_WAIT,
            )
        return self.membership()

    async def remove_member(self, node_id: int) -> tuple[Membership, int, bool]:
        """Remove a member for good and return once that has committed; its id is never used
        again. A leader removing itself steps down once the change commits. Raises
        NotLeaderError, MembershipError, ChangeInProgressError or CommitUnknownError."""
        self._require_leader()
        config = self.configs.latest
        if node_id not in config.removed or config.is_member(node_id):
            await self._change_config(lambda c: c.without(node_id), f"removing {node_id}")
        # Asked again while the removal is still uncommitted: answer once it has, as add does.
        await self._wait_for(
            lambda: self.configs.latest_index <= self.commit_index, self.timing.proposal_timeout
        )
        return self.membership()

    async def _change_config(
        self, change: Callable[[Membership], Membership], what: str
    ) -> ApplyResult:
        """Append the configuration `change` makes of the one in use, once this leader has
        committed an entry of its own term and no other change is pending; wait for its commit."""
        term = self.current_term
        try:
            async with asyncio.timeout(self.timing.proposal_timeout):
                await self._wait_until(lambda: self.log.term_at(self.commit_index) == term, term)
        except TimeoutError:
            raise ChangeInProgressError(
                "this leader has not yet committed an entry of its own term; try again"
            ) from None
        pending = self.configs.latest_index
        if pending > self.commit_index or self._leaving:
            raise ChangeInProgressError(
                f"the membership change at index {pending} has not committed yet; "
                "one change at a time"
            )
        new = change(self.configs.latest)
        self.narrate.info("%s", what)
        return await self._propose_entry(
            raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_CONFIG, config=new.to_proto())
        )

    async def _wait_for(self, condition: Callable[[], bool], timeout: float) -> None:
        """Leader: wait until `condition` holds, at most `timeout` seconds; NotLeaderError if
        leadership is lost meanwhile. After `timeout` it just returns: the admin calls then answer
        with membership(), whose flag says whether the configuration has committed yet."""
        term = self.current_term
        try:
            async with asyncio.timeout(timeout):
                await self._wait_until(condition, term)
        except TimeoutError:
            return

    # ---- snapshots and log compaction (thesis chapter 5) -----------------------------------

    def _restore(self, loaded: LoadedSnapshot) -> None:
        """Replace the state machine with a snapshot's; the log already starts after it."""
        self.state_machine.install(_state_of(loaded))
        self.commit_index = max(self.commit_index, loaded.index)

    def _maybe_snapshot(self) -> None:
        """Snapshot once the log has grown past the policy's thresholds since the last snapshot."""
        policy = self.snapshot_policy
        if policy is None or self._snapshotting or self._stopped or self.log.snapshots is None:
            return
        latest = self.log.snapshots.latest
        since = latest.index if latest is not None else 0
        index = self.last_applied
        if index - since < policy.entries and self.log.bytes_after(since) < policy.bytes:
            return
        self._snapshotting = True
        # Copying the state is quick; encoding and writing it happen while the node goes on.
        state = self.state_machine.snapshot()
        term = self.log.term_at(index)
        members = self.configs.at(index)
        if self._spawn(self._write_snapshot(state, members, index, term), name="snapshot") is None:
            self._snapshotting = False

    async def _write_snapshot(
        self, state: SnapshotState, members: Membership, index: int, term: int
    ) -> None:
        store = self.log.snapshots
        assert store is not None and self.snapshot_policy is not None
        started = self.clock.now()
        try:
            pieces = await _encode_state(state)
            # A large state's copy and its encoding are each as big as the state: let them go as
            # soon as they are done with, not when this (long) coroutine ends.
            del state
            meta = await store.write(index, term, members, pieces)
            del pieces
            self.narrate.info(
                "took a snapshot up to index %d (term %d, %s)", index, term, _size(meta.size)
            )
            # Followers being sent a snapshot still need the entries after it (else each install
            # would be followed by another: the snapshot install loop).
            policy = self.snapshot_policy
            point = self.log.keep_point(index, policy.keep_entries, policy.keep_bytes)
            for progress in self.progress.values():
                if progress.snapshot is not None:
                    point = min(point, progress.snapshot.index)
            point = min(point, self.last_applied, self.log.last_index)
            if point > self.log.base_index:
                self.log.compact(point)
                self.configs.compact(point)
                await self.log.flush()
                self.narrate.info("discarded the log up to index %d", point)
            self.observer.snapshot_taken()
        except OSError as e:
            self.narrate.error("could not write a snapshot up to index %d: %s", index, e)
        finally:
            # The next snapshot waits a few times as long as this one took: snapshotting a large
            # state then takes only a share of the node's time, the rest is left for serving.
            rest = _SNAPSHOT_REST * (self.clock.now() - started)
            if rest > 0 and not self._stopped:
                self.clock.call_at(self.clock.now() + rest, self._end_snapshot_rest)
            else:
                self._snapshotting = False

    def _end_snapshot_rest(self) -> None:
        self._snapshotting = False
        self._maybe_snapshot()

    async def _send_snapshot_chunk(self, peer_id: int, term: int, progress: Progress) -> None:
        """Send a follower whose next entry is compacted away one chunk of the newest snapshot;
        one chunk in flight per follower, the next once it answers (thesis section 5.3)."""
        store = self.log.snapshots
        latest = store.latest if store is not None else None
        if store is None or latest is None:
            self.narrate.error("%d needs entries I no longer have, and I have no snapshot", peer_id)
            progress.retry_at = self.clock.now() + self.timing.heartbeat_interval
            return
        meta = progress.snapshot
        if meta is None:
            # The file stays until this transfer ends, even if newer snapshots are taken meanwhile.
            meta = progress.snapshot = latest
            store.pin(meta)
            progress.snapshot_offset = 0
            progress.snapshot_heard = self.clock.now()
            self.narrate.info(
                "sending snapshot up to index %d (%s) to %d", meta.index, _size(meta.size), peer_id
            )
        offset = progress.snapshot_offset
        policy = self.snapshot_policy
        chunk = policy.chunk_bytes if policy is not None else SNAPSHOT_CHUNK_BYTES
        try:
            data = await store.read_chunk(meta, offset, chunk)
        except OSError as e:
            self.narrate.error("could not read the snapshot for %d: %s", peer_id, e)
            self._end_snapshot_transfer(progress)
            progress.retry_at = self.clock.now() + self.timing.heartbeat_interval
            return
        request = raft_pb2.InstallSnapshotRequest(
            term=term,
            requester_id=self.node_id,
            last_included_index=meta.index,
            last_included_term=meta.term,
            offset=offset,
            total_size=meta.size,
            data=data,
            done=offset + len(data) >= meta.size,
            checksum=meta.checksum,
        )
        sent_at = progress.last_sent = self.clock.now()
        read_round = progress.sent_round = self._read_round
        try:
            reply = await self.transport.install_snapshot(
                peer_id, request, timeout=self.timing.append_timeout
            )
        except PeerUnreachableError as e:
            self.narrate.debug("snapshot chunk to %d failed: %s", peer_id, e)
            now = self.clock.now()
            progress.retry_at = now + self.timing.heartbeat_interval
            if progress.snapshot is meta and now - progress.snapshot_heard > (
                self.timing.election_timeout_max
            ):
                # A follower that stays away must not keep the log and this file from being
                # compacted; the transfer starts afresh, with the newest snapshot, once it answers.
                self.narrate.info("stopped sending a snapshot to %d: it does not answer", peer_id)
                self._end_snapshot_transfer(progress)
            return
        if self._step_down_if_newer(reply.term, f"{peer_id}'s snapshot reply"):
            return
        if self._role is not Role.LEADER or self.current_term != term or reply.term != term:
            return
        progress.heard_at = max(progress.heard_at, sent_at)
        if read_round > progress.acked_round:
            progress.acked_round = read_round
            self._notify()
        if progress.snapshot is not meta:
            return
        progress.snapshot_heard = self.clock.now()
        if reply.installed:
            self._end_snapshot_transfer(progress)
            progress.match_index = max(progress.match_index, meta.index)
            progress.next_index = max(progress.next_index, meta.index + 1)
            self.narrate.info("%d installed my snapshot up to index %d", peer_id, meta.index)
            self._advance_commit()
            self._after_follower_progress(peer_id, progress)
            return
        progress.snapshot_offset = reply.next_offset if 0 <= reply.next_offset < meta.size else 0

    def _end_snapshot_transfer(self, progress: Progress) -> None:
        if progress.snapshot is not None and self.log.snapshots is not None:
            self.log.snapshots.unpin(progress.snapshot)
        progress.snapshot = None

    async def handle_install_snapshot(
        self, request: raft_pb2.InstallSnapshotRequest
    ) -> raft_pb2.InstallSnapshotResponse:
        """InstallSnapshot receiver rules (thesis Figure 5.3, paper Figure 13): chunks are written
        in order to a temporary file; after the last, the snapshot is verified and installed."""
        self._check_peer_message(
            request.requester_id,
            request.term,
            request.last_included_index,
            request.last_included_term,
            request.offset,
            request.total_size,
        )
        self._check_unlisted_leader(request.requester_id, request.term)
        leader = request.requester_id
        if request.term < self.current_term:
            # Rule 1: reply immediately if term < currentTerm.
            return raft_pb2.InstallSnapshotResponse(term=self.current_term)
        if request.term > self.current_term or self._role is Role.CANDIDATE:
            self._become_follower(request.term, leader, f"{leader} leads term {request.term}")
        elif self._role is Role.LEADER:
            self.narrate.error("refused a snapshot from %d: I lead this term myself", leader)
            return raft_pb2.InstallSnapshotResponse(term=self.current_term)
        self._set_leader(leader)
        self._heard_from_leader()
        async with self._install_lock:
            reply = await self._receive_chunk(request)
        await self.log.flush()
        reply.term = self.current_term
        return reply

    async def _receive_chunk(
        self, request: raft_pb2.InstallSnapshotRequest
    ) -> raft_pb2.InstallSnapshotResponse:
        index, term = request.last_included_index, request.last_included_term
        total, checksum = request.total_size, request.checksum
        store = self.log.snapshots
        if store is None:
            raise InvalidRequestError("this node keeps no snapshots")
        if index <= self.commit_index:
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
                self.narrate.info(
                    "receiving a snapshot up to index %d (term %d, %s) from %d",
                    index,
                    term,
                    _size(total),
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
            self.narrate.warning("snapshot transfer from %d went wrong; restarting it", index)
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
            if loaded.index <= self.commit_index:
                return raft_pb2.InstallSnapshotResponse(next_offset=total, installed=True)
            loaded = await store.keep_incoming(loaded)
        except (SnapshotError, ValueError) as e:
            self.narrate.warning("%s; asking for it again", e)
            return raft_pb2.InstallSnapshotResponse(next_offset=0)
        if loaded.index <= self.commit_index:
            return raft_pb2.InstallSnapshotResponse(next_offset=total, installed=True)
        # Rules 6 and 7: keep the entries that follow the snapshot if the log has its last entry,
        # else discard the whole log; then reset the state machine from the snapshot.
        kept = self.log.holds(loaded.index, loaded.term)
        self.log.reset(loaded.index, loaded.term)
        self._rebuild_configs(loaded.members, loaded.index)
        self._restore(loaded)
        self.narrate.info(
            "installed snapshot up to index %d (term %d, %s); %s",
            loaded.index,
            loaded.term,
            _size(loaded.meta.size),
            (
                f"kept my entries after it (up to {self.log.last_index})"
                if kept and self.log.last_index > loaded.index
                else "my log now starts after it"
            ),
        )
        self.observer.snapshot_installed()
        self._notify()
        self._apply_committed()
        return raft_pb2.InstallSnapshotResponse(next_offset=total, installed=True)


def _retrieve_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


# How much encoding of a snapshot's state runs between two turns of the event loop.
_STATE_BYTES_PER_TURN = 256 * 1024
# After a snapshot, a node takes no other for this many times as long as it took.
_SNAPSHOT_REST = 4


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


def main(argv: list[str] | None = None) -> int:
    """`python raft_node.py ...`: run one node as a daemon (flags and servers live in node_daemon.py)."""
    import node_daemon

    return node_daemon.main(argv)


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
    "SessionExpiredError",
    "Timing",
    "TransferFailedError",
    "Transport",
    "UnavailableError",
    "main",
)
