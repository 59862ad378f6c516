"""What a node tells the world about itself: observer hooks (for health checks and metrics), event
hooks (for checks that watch a run) and its status as operators see it (the `Status` call,
`cluster_client.py status`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cluster_config import NodeAddress
from membership import ConfigHistory, Membership

if TYPE_CHECKING:
    from leader import Progress
    from log import RaftLog
    from node_types import Clock


class NodeObserver:
    """Told what the node does, for health checks and metrics; every method here does nothing.

    Called on the node's event loop, in the middle of its work: an observer must be quick and
    must not call back into the node."""

    def state_changed(self) -> None:
        """The role, leader, the leader's silence (an election timeout passed without word from
        it), membership, removal or stopping may have changed."""

    def election_started(self) -> None:
        """This node became a candidate in a new term."""

    def election_won(self) -> None:
        """This node became leader."""

    def proposal_committed(self, seconds: float) -> None:
        """A write this node led was committed and applied, `seconds` after it was proposed."""

    def read_served(self, seconds: float) -> None:
        """A linearizable read was answered, `seconds` after it arrived."""

    def snapshot_taken(self) -> None:
        """This node wrote a snapshot of its own state and compacted its log behind it."""

    def snapshot_installed(self) -> None:
        """This node installed a snapshot received from a leader."""


class NodeEvents:
    """Told of the node's consensus decisions at the moment it makes them, for checks that watch
    a run (the simulation's invariants); every method here does nothing.

    Called synchronously, in the middle of the node's work: a hook may read the node's state,
    never change it."""

    def standing(self, term: int, transfer: bool) -> None:
        """This node just became a candidate in `term` (`transfer`: the leader asked it to)."""

    def elected(self) -> None:
        """This node won an election; its log is still as the election left it (no no-op yet)."""

    def leading(self) -> None:
        """This node now leads: its term's leadership has started and its no-op is appended."""

    def appending_config(self) -> None:
        """As leader, this node is about to append a configuration entry."""

    def log_changed(self) -> None:
        """Entries were appended or truncated, or the configurations were rebuilt from a
        snapshot: the configuration in use may have changed."""

    def config_changed(self) -> None:
        """The node has reacted to a (possible) change of the configuration in use."""

    def snapshot_restored(self, at_start: bool) -> None:
        """The state machine was replaced by a snapshot's (restored at start, or installed)."""

    def snapshot_writing(self) -> None:
        """This node starts writing a snapshot of its own state."""


class Observers(NodeObserver):
    """Several observers as one, each told in turn."""

    def __init__(self, *observers: NodeObserver) -> None:
        self._observers = observers

    def state_changed(self) -> None:
        for o in self._observers:
            o.state_changed()

    def election_started(self) -> None:
        for o in self._observers:
            o.election_started()

    def election_won(self) -> None:
        for o in self._observers:
            o.election_won()

    def proposal_committed(self, seconds: float) -> None:
        for o in self._observers:
            o.proposal_committed(seconds)

    def read_served(self, seconds: float) -> None:
        for o in self._observers:
            o.read_served(seconds)

    def snapshot_taken(self) -> None:
        for o in self._observers:
            o.snapshot_taken()

    def snapshot_installed(self) -> None:
        for o in self._observers:
            o.snapshot_installed()


@dataclass(frozen=True)
class PeerStatus:
    """What a leader knows of one follower."""

    id: int
    voter: bool
    match_index: int
    # Entries the leader holds that the follower has not acknowledged.
    lag: int
    # Seconds since the follower last answered in this term; None if it has not.
    last_contact: float | None


@dataclass(frozen=True)
class NodeStatus:
    """One node's view of itself (and, on the leader, of its followers), for operators."""

    node_id: int
    raft_address: str
    client_address: str
    role: str
    term: int
    leader_id: int | None
    commit_index: int
    applied_index: int
    last_log_index: int
    snapshot_index: int
    voter: bool
    learner: bool
    # A follower: seconds since it last heard from its leader in this term; None if it has not.
    leader_contact: float | None
    config: Membership
    config_index: int
    serving: bool
    peers: tuple[PeerStatus, ...] = ()
    # The factor this node's Raft timers are multiplied by (--time-scale).
    time_scale: float = 1.0


class StatusSource(Protocol):
    """What a node's status is read from."""

    node_id: int
    me: NodeAddress
    configs: ConfigHistory
    log: RaftLog
    clock: Clock
    commit_index: int
    leader_id: int | None
    leader_contact: float

    @property
    def role(self) -> str: ...
    @property
    def current_term(self) -> int: ...
    @property
    def last_applied(self) -> int: ...
    @property
    def progress(self) -> dict[int, Progress]: ...
    @property
    def serving(self) -> bool: ...
    @property
    def time_scale(self) -> float: ...


def status_of(node: StatusSource) -> NodeStatus:
    """This node's view of itself and, when it leads, of every other member."""
    now = node.clock.now()
    config = node.configs.latest
    last_index = node.log.last_index
    peers: list[PeerStatus] = []
    for peer_id, progress in sorted(node.progress.items()):
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
    following = node.role != "leader" and node.leader_id is not None
    latest = node.log.snapshots.latest if node.log.snapshots is not None else None
    return NodeStatus(
        node_id=node.node_id,
        raft_address=node.me.raft_address,
        client_address=node.me.client_address,
        role=node.role,
        term=node.current_term,
        leader_id=node.leader_id,
        commit_index=node.commit_index,
        applied_index=node.last_applied,
        last_log_index=last_index,
        snapshot_index=latest.index if latest is not None else 0,
        voter=config.is_voter(node.node_id),
        learner=node.node_id in config.learners,
        leader_contact=(
            now - node.leader_contact if following and node.leader_contact > float("-inf") else None
        ),
        config=config,
        config_index=node.configs.latest_index,
        serving=node.serving,
        peers=tuple(peers),
        time_scale=node.time_scale,
    )
