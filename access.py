"""Who may talk to a node, and whether it may stand for election: every check a peer's message
passes before the node acts on it, in one place.

Before a message gets here, the transport has said who sent it: under mutual TLS raft_server.py
refuses (PERMISSION_DENIED) a call whose certificate names no member, or whose message claims to come
from another member than the one its certificate names (tls.py: `urn:raft-demo:node:<id>`); without
TLS, whoever reaches the Raft port is taken at its word, as with etcd.

The whole rule. A message is refused (InvalidRequestError, nothing changes) when:

- it claims to come from this node's own id, or an id that is not positive; or carries a term or
  index that is negative or too large for the wire (int64), or entries that no leader's log could
  hold (non-consecutive, terms decreasing or newer than the leader's, a malformed configuration);
- it comes from a node whose removal this node knows committed (thesis 4.2.2), unless it is the
  leader this node follows in that term: a leader removing itself leads until its removal
  commits, and is still heard in its own term while it hands over;
- it brings entries or a snapshot from a leader this node's configuration does not list, while a
  leader of its own is recent (thesis 4.2.3: such a message can only disrupt). With no recent
  leader it is accepted: the entry adding that leader may be one this node has yet to receive
  (thesis 4.1). A node that knows no members yet (joining) accepts any leader;
- it asks for a vote or pre-vote from a candidate this node's configuration does not list, unless
  no leader is recent and the candidate's log is ahead of this node's (again thesis 4.1 / 4.2.3);
- it is a read index request or TimeoutNow from a node that is not a member, unless (TimeoutNow)
  it is the leader this node follows in that term.

Separately, a vote request within the minimum election timeout of hearing from a current leader is
refused as a vote (not as invalid) unless the leader asked for it (thesis 4.2.3, 3.10); `leader_is_recent`
is that test. A node may stand for election if it is a voter, or a voter of the committed
configuration that an uncommitted one removes (thesis 4.2.2).
"""

from __future__ import annotations

from typing import Protocol

from log import RaftLog
from membership import ConfigHistory, Membership, MembershipError
from node_types import MAX_WIRE_NUMBER, Clock, InvalidRequestError, NodeBasics, Timing
from rpc import raft_pb2


class AccessNode(NodeBasics, Protocol):
    """What the rules read of the node."""

    log: RaftLog
    clock: Clock
    timing: Timing
    configs: ConfigHistory
    commit_index: int
    leader_id: int | None
    leader_contact: float

    @property
    def config(self) -> Membership: ...
    @property
    def is_voter(self) -> bool: ...


class Access:
    """Applies the rule above for one node (its only state: which unlisted leader it last noted)."""

    def __init__(self, node: AccessNode) -> None:
        self.node = node
        self._unlisted_leader_noted: tuple[int, int] | None = None

    def may_stand(self) -> bool:
        """Whether this node may stand for election: a voter, or a voter of the committed
        configuration that an uncommitted one removes. The latter's vote does not count, but it
        may be the only node able to commit its own removal (thesis 4.2.2: a leader being removed
        leads until then), so it must be able to lead."""
        node = self.node
        return node.is_voter or node.configs.at(node.commit_index).is_voter(node.node_id)

    def check_message(self, requester_id: int, term: int, *numbers: int) -> None:
        """Refuse a message from this node's own id, from a node whose removal this node knows
        committed, or with numbers out of range. Until the removal commits, the removed node is
        still a member of the committed configuration: a leader removing itself leads until then,
        and in its term it is still heard after that, while it hands over (thesis 4.2.2)."""
        node = self.node
        numbers = (term, *numbers)
        if requester_id == node.node_id or requester_id <= 0:
            node.narrate.warning("refused a message claiming to come from %d", requester_id)
            raise InvalidRequestError(f"{requester_id} is not another member's id")
        if requester_id in node.configs.at(node.commit_index).removed and not self.is_my_leader(
            requester_id, term
        ):
            node.narrate.warning(
                "refused a message from %d: it was removed from this cluster", requester_id
            )
            raise InvalidRequestError(f"{requester_id} was removed from this cluster")
        if any(n < 0 or n >= MAX_WIRE_NUMBER for n in numbers):
            node.narrate.warning(
                "refused a message from %d: a term or index is out of range", requester_id
            )
            raise InvalidRequestError("a term or index is negative or absurdly large")

    def check_unlisted_leader(self, leader: int, term: int) -> None:
        """Entries from a leader this node's configuration does not list are accepted only while
        this node has no recent leader of its own: the entry adding that leader may be among those
        this node has yet to receive (thesis section 4.1), and refusing would leave it behind for
        good; but while a known leader speaks, such a message can only disrupt (as a vote request
        would, thesis section 4.2.3). A node that knows no members yet (joining) accepts any, and
        the leader this node follows in its term (one removing itself) is accepted until it steps
        down."""
        node = self.node
        config = node.config
        if config.is_member(leader) or not config.members or self.is_my_leader(leader, term):
            return
        if self.leader_is_recent():
            node.narrate.warning(
                "refused entries from %d: it is not a member, and %s",
                leader,
                self.why_leader_is_recent(),
            )
            raise InvalidRequestError(f"{leader} is not a member of this cluster")
        if self._unlisted_leader_noted != (leader, node.current_term):
            self._unlisted_leader_noted = (leader, node.current_term)
            node.narrate.info(
                "accepting entries from %d, which my configuration does not list: an entry I have "
                "not received yet must add it",
                leader,
            )

    def check_candidate(self, request: raft_pb2.VoteRequest) -> None:
        """Votes and pre-votes go to members of this node's configuration; to a candidate it does
        not list only while no leader is recent and the candidate's log is ahead of this node's.
        That candidate may hold the entry adding it, which this node has yet to receive (thesis
        4.1: refusing it could leave the cluster without a leader for good); while a leader
        speaks, such a request can only disrupt (thesis 4.2.3)."""
        node = self.node
        candidate = request.requester_id
        if node.config.is_member(candidate):
            return
        ahead = (request.last_log_term, request.last_log_index) > (
            node.log.last_term,
            node.log.last_index,
        )
        if ahead and not self.leader_is_recent():
            return
        node.narrate.warning(
            "refused a vote request from %d: not a member of this cluster", candidate
        )
        raise InvalidRequestError(f"{candidate} is not a member of this cluster")

    def check_member(self, requester_id: int, what: str, term: int | None = None) -> None:
        """Read index and TimeoutNow requests come only from members of this node's configuration,
        or from the leader it follows in `term` (one removing itself hands over with TimeoutNow)."""
        node = self.node
        if term is not None and self.is_my_leader(requester_id, term):
            return
        if not node.config.is_member(requester_id):
            node.narrate.warning(
                "refused a %s from %d: not a member of this cluster", what, requester_id
            )
            raise InvalidRequestError(f"{requester_id} is not a member of this cluster")

    def is_my_leader(self, node_id: int, term: int) -> bool:
        node = self.node
        return term == node.current_term and node.leader_id == node_id

    def check_entries(self, request: raft_pb2.AppendEntriesRequest) -> None:
        node = self.node
        expected_index = request.prev_log_index + 1
        previous_term = request.prev_log_term
        for entry in request.log_entries:
            # A leader's log has consecutive indices and terms that never decrease (section 5.3).
            if entry.index != expected_index or not previous_term <= entry.term <= request.term:
                node.narrate.warning(
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
                    node.narrate.warning(
                        "refused append from %d: a malformed configuration: %s",
                        request.requester_id,
                        e,
                    )
                    raise InvalidRequestError(f"entry {entry.index}: {e}") from None
        if request.prev_log_term > request.term:
            raise InvalidRequestError("prev_log_term is newer than the leader's term")

    def leader_is_recent(self) -> bool:
        """Whether this node heard from a current leader within the minimum election timeout
        (thesis section 4.2.3); a leader counts as hearing from itself."""
        node = self.node
        if node.is_leader:
            return True
        return (
            node.leader_id is not None
            and node.clock.now() - node.leader_contact < node.timing.election_timeout_min
        )

    def why_leader_is_recent(self) -> str:
        node = self.node
        if node.is_leader:
            return "I lead this cluster"
        ago = (node.clock.now() - node.leader_contact) * 1000
        return f"I heard from leader {node.leader_id} {ago:.0f} ms ago"
