"""The names every part of a node shares: its roles, the errors it raises, its settings, and the
small protocols through which it reaches time (`Clock`, `Timer`) and its peers (`Transport`)."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cluster_config import ConfigError
from node_events import EventNarrator
from rpc import raft_pb2

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
    # The factor the Raft timers above were multiplied by (--time-scale), to report; see scaled().
    time_scale: float = 1.0

    def scaled(self, factor: float) -> Timing:
        """These settings with every Raft timer (heartbeat, election timeouts, a peer call's
        timeout, the commit notice delay) `factor` times as long, so that an election can be
        watched step by step. A client's proposal timeout is the client's, and stays."""
        if not (factor > 0 and math.isfinite(factor)):
            raise ConfigError(f"the time scale must be a positive number, not {factor:g}")
        return dataclasses.replace(
            self,
            heartbeat_interval=self.heartbeat_interval * factor,
            election_timeout_min=self.election_timeout_min * factor,
            election_timeout_max=self.election_timeout_max * factor,
            append_timeout=self.append_timeout * factor,
            commit_notice_delay=self.commit_notice_delay * factor,
            time_scale=self.time_scale * factor,
        )

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


def retrieve_exception(future: asyncio.Future[Any]) -> None:
    """A done callback that marks a future's exception as retrieved (nobody may be left to)."""
    if not future.cancelled():
        future.exception()


def size_text(n: int) -> str:
    """A size for the narration: bytes, or MB once it is large."""
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


class NodeBasics(Protocol):
    """What every part of a node reads of it: who it is, its term, whether it leads, and its voice
    (the narration). Each part's own Protocol adds what else it needs."""

    @property
    def narrate(self) -> EventNarrator: ...
    @property
    def node_id(self) -> int: ...
    @property
    def current_term(self) -> int: ...
    @property
    def is_leader(self) -> bool: ...


def put_entry(
    key: str, value: str, session: raft_pb2.Session | None = None, lease: int = 0
) -> raft_pb2.LogEntry:
    """The log entry of one client's put: the seed's MAPPING entry without a session or a lease;
    with one, a COMMAND (its session makes it exactly-once; the seed's entry has no lease)."""
    if (session is None or session.client_id == 0) and not lease:
        return raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_MAPPING, key=key, value=value)
    batch = raft_pb2.MappingBatch(
        mappings=[raft_pb2.Mapping(key=key, value=value, lease=lease)], session=session
    )
    return raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_COMMAND, command=raft_pb2.Command(put=batch))
