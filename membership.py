"""Cluster membership (thesis chapter 4): who votes, who only learns, which ids are gone for good, and
the history of configurations in the log, so a node always uses the latest one it holds. Also the
quorum arithmetic: this is the only place a majority is counted.

A configuration is a log entry like any other, in use from the moment it is appended (committed or
not); truncating the log or installing a snapshot brings back the configuration in force at that
point. Changes are one server at a time, which keeps any two majorities of consecutive
configurations overlapping.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from cluster_config import ClusterConfig, ConfigError, NodeAddress, parse_host_port
from rpc import raft_pb2

MAX_NODE_ID = 2**62

# What a majority is counted over: log indices (commit), times (check quorum).
Value = TypeVar("Value", int, float)


class MembershipError(Exception):
    """A membership change that cannot be made; the message says why in one line."""


class ChangeInProgressError(Exception):
    """Another membership change is not yet committed (or the leader has not yet committed an
    entry of its own term); try again shortly."""


@dataclass(frozen=True)
class Membership:
    """One configuration: voters, learners (receive the log, never vote), and removed ids."""

    voters: dict[int, NodeAddress]
    learners: dict[int, NodeAddress] = field(default_factory=dict)
    removed: frozenset[int] = frozenset()

    @classmethod
    def bootstrap(cls, cluster: ClusterConfig) -> Membership:
        """Every node of a fresh cluster's --nodes/--cluster description votes."""
        return cls(dict(cluster.nodes))

    @classmethod
    def empty(cls) -> Membership:
        """What a joining node knows before the cluster's log reaches it: nobody."""
        return cls({})

    # ---- views -----------------------------------------------------------------------------

    @property
    def members(self) -> dict[int, NodeAddress]:
        return {**self.voters, **self.learners}

    def is_voter(self, node_id: int) -> bool:
        return node_id in self.voters

    def is_member(self, node_id: int) -> bool:
        return node_id in self.voters or node_id in self.learners

    @property
    def quorum(self) -> int:
        """The votes or acknowledgements that make a majority of the voters."""
        return len(self.voters) // 2 + 1

    # ---- quorum arithmetic (the only place a majority is counted) ----------------------------

    def counts(self, node_id: int) -> bool:
        """Whether `node_id`'s vote or acknowledgement counts toward this configuration's
        majorities: only a voter's does (thesis 4.1). A leader this configuration removes is
        therefore not counted, not even by itself, while it leads on to commit its removal
        (thesis 4.2.2); nor is a learner, or a removed follower still being told of its removal."""
        return node_id in self.voters

    def count(self, ids: Iterable[int]) -> int:
        """How many of `ids` count (votes, acknowledgements)."""
        return sum(1 for i in ids if self.counts(i))

    def has_majority(self, ids: Iterable[int]) -> bool:
        """Whether `ids` (votes, or acknowledgements of a read round) make a majority."""
        return self.count(ids) >= self.quorum

    def majority_value(self, values: Mapping[int, Value]) -> Value | None:
        """The largest value that a majority holds at least, counting each node's own (a leader
        passes its own too): from match indices, the index a majority has durably stored (section
        5.3); from the times each answered, when a majority last had. None without a majority."""
        counted = sorted((v for i, v in values.items() if self.counts(i)), reverse=True)
        return counted[self.quorum - 1] if len(counted) >= self.quorum else None

    def address(self, node_id: int) -> NodeAddress | None:
        return self.voters.get(node_id) or self.learners.get(node_id)

    def describe(self) -> str:
        """One line for the narration: "voters 1, 2, 3; learners 6; removed 4"."""
        parts = ["voters " + (", ".join(str(i) for i in sorted(self.voters)) or "none")]
        if self.learners:
            parts.append("learners " + ", ".join(str(i) for i in sorted(self.learners)))
        if self.removed:
            parts.append("removed " + ", ".join(str(i) for i in sorted(self.removed)))
        return "; ".join(parts)

    # ---- changes (one server at a time, thesis section 4.1) --------------------------------

    def with_learner(self, node: NodeAddress) -> Membership:
        """Add a node that receives the log but does not vote until promoted."""
        check_new_member(node)
        if node.id in self.removed:
            raise MembershipError(
                f"id {node.id} was removed from this cluster; ids are never reused"
            )
        if self.is_member(node.id):
            raise MembershipError(f"{node.id} is already a member")
        for other in self.members.values():
            taken = {other.raft_address, other.client_address}
            if node.raft_address in taken or node.client_address in taken:
                raise MembershipError(
                    f"an address of {node.id} is already used by member {other.id}"
                )
        return Membership(self.voters, {**self.learners, node.id: node}, self.removed)

    def with_voter(self, node_id: int) -> Membership:
        """Promote a learner to voter."""
        node = self.learners.get(node_id)
        if node is None:
            raise MembershipError(f"{node_id} is not a learner")
        learners = {i: n for i, n in self.learners.items() if i != node_id}
        return Membership({**self.voters, node_id: node}, learners, self.removed)

    def without(self, node_id: int) -> Membership:
        """Remove a voter or learner for good."""
        if not self.is_member(node_id):
            raise MembershipError(f"{node_id} is not a member of this cluster")
        if node_id in self.voters and len(self.voters) == 1:
            raise MembershipError(f"{node_id} is the only voter; a cluster needs one")
        return Membership(
            {i: n for i, n in self.voters.items() if i != node_id},
            {i: n for i, n in self.learners.items() if i != node_id},
            self.removed | {node_id},
        )

    # ---- encodings -------------------------------------------------------------------------

    def to_proto(self) -> raft_pb2.Configuration:
        members = [
            raft_pb2.Member(
                id=n.id,
                raft_address=n.raft_address,
                client_address=n.client_address,
                voter=n.id in self.voters,
            )
            for _, n in sorted(self.members.items())
        ]
        return raft_pb2.Configuration(members=members, removed_ids=sorted(self.removed))

    @classmethod
    def from_proto(cls, config: raft_pb2.Configuration) -> Membership:
        """Decode a configuration from the log or the wire; MembershipError if it is not well formed."""
        voters: dict[int, NodeAddress] = {}
        learners: dict[int, NodeAddress] = {}
        for m in config.members:
            node = NodeAddress(m.id, m.raft_address, m.client_address)
            check_new_member(node)
            if m.id in voters or m.id in learners:
                raise MembershipError(f"member {m.id} appears twice")
            (voters if m.voter else learners)[m.id] = node
        removed = frozenset(config.removed_ids)
        if removed & (voters.keys() | learners.keys()):
            raise MembershipError("a removed id is listed as a member")
        if not voters:
            raise MembershipError("a configuration needs at least one voter")
        return cls(voters, learners, removed)

    def to_json(self) -> bytes:
        doc = {
            "voters": {str(i): [n.raft_address, n.client_address] for i, n in self.voters.items()},
            "learners": {
                str(i): [n.raft_address, n.client_address] for i, n in self.learners.items()
            },
            "removed": sorted(self.removed),
        }
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Membership:
        """Decode `to_json`'s form; also the older form {id: [raft, client]} where all vote.
        ValueError (or a subclass) if it does not parse."""
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("members are not a JSON object")
        if "voters" not in doc:
            return cls(_nodes(doc))
        removed = doc.get("removed", [])
        if not isinstance(removed, list) or not all(isinstance(i, int) for i in removed):
            raise ValueError("removed ids are not a list of integers")
        return cls(_nodes(doc["voters"]), _nodes(doc.get("learners", {})), frozenset(removed))


def _nodes(doc: object) -> dict[int, NodeAddress]:
    if not isinstance(doc, dict):
        raise ValueError("members are not a JSON object")
    nodes = {}
    for key, value in doc.items():
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"member {key} is not [raft address, client address]")
        nodes[int(key)] = NodeAddress(int(key), str(value[0]), str(value[1]))
    return nodes


def check_new_member(node: NodeAddress) -> None:
    """MembershipError unless the id is positive and both addresses are host:port."""
    if not 0 < node.id < MAX_NODE_ID:
        raise MembershipError(f"node id must be a positive integer below 2^62, not {node.id}")
    for address in (node.raft_address, node.client_address):
        try:
            parse_host_port(address)
        except ConfigError as e:
            raise MembershipError(str(e)) from None
    if node.raft_address == node.client_address:
        raise MembershipError("the Raft and client addresses must differ")


class ConfigHistory:
    """The configurations a node's log holds, by index, on top of the one at the log's base (from
    the snapshot, or the bootstrap configuration when the log starts at 1). The latest is in use."""

    def __init__(self, base: Membership, base_index: int = 0) -> None:
        self._entries: list[tuple[int, Membership]] = [(base_index, base)]

    @property
    def latest(self) -> Membership:
        return self._entries[-1][1]

    @property
    def latest_index(self) -> int:
        """The log index of the configuration in use; 0 when it is the bootstrap one."""
        return self._entries[-1][0]

    @property
    def recorded(self) -> bool:
        """Whether any configuration came from the log or a snapshot (not only the start flags)."""
        return len(self._entries) > 1 or self._entries[0][0] > 0

    def at(self, index: int) -> Membership:
        """The configuration in force at log index `index` (the latest at or before it)."""
        for entry_index, membership in reversed(self._entries):
            if entry_index <= index:
                return membership
        return self._entries[0][1]

    def append(self, index: int, membership: Membership) -> None:
        if index <= self._entries[-1][0]:
            raise ValueError(f"configuration at {index} is not after {self._entries[-1][0]}")
        self._entries.append((index, membership))

    def truncate_from(self, index: int) -> None:
        """The log lost its entries from `index` on: so do the configurations among them."""
        while len(self._entries) > 1 and self._entries[-1][0] >= index:
            self._entries.pop()

    def compact(self, base_index: int) -> None:
        """Entries up to `base_index` are gone from the log; keep the one in force there as base."""
        while len(self._entries) > 1 and self._entries[1][0] <= base_index:
            self._entries.pop(0)

    def reset(self, base: Membership, base_index: int) -> None:
        """A snapshot replaced the log: its configuration is the only one known."""
        self._entries = [(base_index, base)]

    def indices(self) -> Iterable[int]:
        return (i for i, _ in self._entries)
