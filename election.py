"""The rounds of an election (section 5.2) as a node runs and answers them: the pre-vote (thesis
9.6), the vote, and the RequestVote receiver rules. The node changes role and term; this counts the
votes (membership.py says what makes a majority) and access.py says who may ask."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol

from access import Access
from log import RaftLog
from membership import Membership
from node_types import NodeBasics, PeerUnreachableError, Role, Timing, Transport
from rpc import raft_pb2


class ElectionNode(NodeBasics, Protocol):
    """What an election needs of its node."""

    log: RaftLog
    transport: Transport
    timing: Timing
    access: Access

    @property
    def role(self) -> str: ...
    @property
    def voted_for(self) -> int | None: ...
    @property
    def config(self) -> Membership: ...
    @property
    def quorum(self) -> int: ...
    @property
    def may_stand(self) -> bool: ...
    @property
    def stopped(self) -> bool: ...

    def other_voters(self) -> list[int]: ...
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> Any: ...
    def step_down_if_newer(self, term: int, source: str) -> bool: ...
    def reset_election_timer(self) -> None: ...
    def become_candidate(self, transfer: bool) -> int | None: ...
    def become_leader(self) -> None: ...


class Election:
    """The rounds of an election (section 5.2) as this node runs and answers them: the pre-vote
    (thesis 9.6), the vote, and the RequestVote receiver rules. The node changes role and term;
    this counts the votes (membership.py says what makes a majority)."""

    def __init__(self, node: ElectionNode) -> None:
        self.node = node
        # Candidate state: who voted for this node in its current term.
        self.votes: set[int] = set()
        # The term this node is collecting pre-votes for, and who granted them (counting itself).
        self.pre_vote_term: int | None = None
        self.pre_votes: set[int] = set()

    def start_pre_vote(self) -> None:
        """Ask every peer whether it would vote for this node in the next term (thesis section 9.6),
        changing nothing here: only with a majority of yeses does the real election start."""
        node = self.node
        if node.stopped or node.is_leader or not node.may_stand:
            return
        term = node.current_term + 1
        self.pre_vote_term = term
        self.pre_votes = {node.node_id}
        # Failing this round, the next timeout tries again.
        node.reset_election_timer()
        if len(self.pre_votes) >= node.quorum:
            self._win_pre_vote(term)
            return
        request = self._vote_request(term, pre_vote=True)
        for peer_id in node.other_voters():
            node.spawn(self._ask_for_vote(peer_id, request), name=f"pre-vote-{peer_id}")

    def handle_pre_vote_reply(
        self, peer_id: int, request: raft_pb2.VoteRequest, reply: raft_pb2.RequestVoteResponse
    ) -> None:
        """Count a pre-vote. A grant carries the term asked about, which nobody holds yet, so it
        changes no term; a refusal carries the voter's own term, and a newer one is a real term
        this node missed (it catches up, as Figure 2 says for any reply)."""
        node = self.node
        if not reply.vote_granted:
            if node.step_down_if_newer(reply.term, f"{peer_id}'s pre-vote reply"):
                return
            if self.pre_vote_term == request.term:
                node.narrate.tell(
                    "pre_vote",
                    "%d would not vote for me in term %d",
                    peer_id,
                    request.term,
                    action="reply",
                    peer=peer_id,
                )
            return
        if (
            node.is_leader
            or self.pre_vote_term != request.term
            or node.current_term + 1 != request.term
            or not node.config.is_voter(peer_id)
        ):
            return  # a reply to a pre-vote that is over, or from a node that does not vote
        self.pre_votes.add(peer_id)
        granted = node.config.count(self.pre_votes)
        node.narrate.tell(
            "pre_vote",
            "%d would vote for me in term %d (%d of %d needed)",
            peer_id,
            request.term,
            granted,
            node.quorum,
            action="reply",
            peer=peer_id,
            ok=True,
            count=granted,
        )
        if node.config.has_majority(self.pre_votes):
            self._win_pre_vote(request.term)

    def _win_pre_vote(self, term: int) -> None:
        node = self.node
        self.pre_vote_term = None
        node.narrate.tell(
            "pre_vote",
            "a majority would elect me (%s): starting an election for term %d",
            ", ".join(str(v) for v in sorted(self.pre_votes)),
            term,
            action="won",
            ok=True,
            count=len(self.pre_votes),
        )
        new_term = node.become_candidate(transfer=False)
        if new_term is not None:
            node.spawn(self.ask_for_votes(new_term, transfer=False), name="election")

    async def ask_for_votes(self, term: int, transfer: bool) -> None:
        node = self.node
        # The new term and the self-vote must be durable before any vote request leaves (seed defect 1).
        await node.log.flush()
        if node.role != Role.CANDIDATE.value or node.current_term != term:
            return
        if node.config.has_majority(self.votes):
            node.become_leader()
            return
        request = self._vote_request(term, leadership_transfer=transfer)
        node.narrate.tell(
            "vote",
            "asking for votes%s (my log: last term %d, last index %d)",
            " to take over from the leader" if transfer else "",
            request.last_log_term,
            request.last_log_index,
            action="ask",
            count=node.quorum,
        )
        for peer_id in node.other_voters():
            node.spawn(self._ask_for_vote(peer_id, request), name=f"vote-{peer_id}")

    def _vote_request(self, term: int, **flags: bool) -> raft_pb2.VoteRequest:
        """A (pre-)vote request for `term`, carrying this node's last log entry (section 5.4.1)."""
        node = self.node
        return raft_pb2.VoteRequest(
            term=term,
            requester_id=node.node_id,
            last_log_index=node.log.last_index,
            last_log_term=node.log.last_term,
            **flags,
        )

    async def _ask_for_vote(self, peer_id: int, request: raft_pb2.VoteRequest) -> None:
        """Send a vote or pre-vote request and count its reply."""
        node = self.node
        what = "pre-vote" if request.pre_vote else "vote"
        try:
            reply = await node.transport.request_vote(
                peer_id, request, timeout=node.timing.election_timeout_min
            )
        except PeerUnreachableError as e:
            node.narrate.debug("%s request to %d failed: %s", what, peer_id, e)
            return
        if request.pre_vote:
            self.handle_pre_vote_reply(peer_id, request, reply)
        else:
            self.handle_vote_reply(peer_id, request, reply)

    def handle_vote_reply(
        self, peer_id: int, request: raft_pb2.VoteRequest, reply: raft_pb2.RequestVoteResponse
    ) -> None:
        node = self.node
        if node.step_down_if_newer(reply.term, f"{peer_id}'s vote reply"):
            return
        if node.role != Role.CANDIDATE.value or node.current_term != request.term:
            return  # a reply to an election that is over
        if not reply.vote_granted:
            node.narrate.tell("vote", "%d refused its vote", peer_id, action="reply", peer=peer_id)
            return
        if not node.config.is_voter(peer_id):
            return  # only the votes of this node's configuration count (thesis section 4.1)
        self.votes.add(peer_id)
        votes = node.config.count(self.votes)
        node.narrate.tell(
            "vote",
            "%d granted its vote (%d of %d needed)",
            peer_id,
            votes,
            node.quorum,
            action="reply",
            peer=peer_id,
            ok=True,
            count=votes,
        )
        if votes >= node.quorum:
            node.become_leader()

    async def handle_request_vote(
        self, request: raft_pb2.VoteRequest
    ) -> raft_pb2.RequestVoteResponse:
        """RequestVote receiver rules (Figure 2); the reply leaves only once term and vote are durable.

        A pre-vote is answered without changing anything (thesis section 9.6). A real vote request
        that arrives within the minimum election timeout of hearing from a current leader is
        refused without adopting its term (thesis section 4.2.3), unless the leader itself asked
        the candidate to take over (section 3.10)."""
        node = self.node
        node.access.check_message(
            request.requester_id,
            request.term,
            request.last_log_index,
            request.last_log_term,
        )
        node.access.check_candidate(request)
        if request.pre_vote:
            return await self._handle_pre_vote(request)
        candidate = request.requester_id
        if not request.leadership_transfer and node.access.leader_is_recent():
            why = node.access.why_leader_is_recent()
            node.narrate.tell(
                "vote",
                "ignored vote request from %d for term %d: %s",
                candidate,
                request.term,
                why,
                action="answer",
                peer=candidate,
                detail=why,
            )
            await node.log.flush()
            return raft_pb2.RequestVoteResponse(term=node.current_term, vote_granted=False)
        node.narrate.debug(
            "vote request from %d: term %d, last log (term %d, index %d)",
            candidate,
            request.term,
            request.last_log_term,
            request.last_log_index,
        )
        node.step_down_if_newer(request.term, f"vote request from {candidate}")
        term = node.current_term
        granted = False
        mine = (node.log.last_term, node.log.last_index)
        theirs = (request.last_log_term, request.last_log_index)
        if request.term < term:
            node.narrate.tell(
                "vote",
                "refused vote to %d: its term %d is behind mine",
                candidate,
                request.term,
                action="answer",
                peer=candidate,
                detail="its term is behind mine",
            )
        elif node.voted_for not in (None, candidate):
            node.narrate.tell(
                "vote",
                "refused vote to %d: already voted for %s in term %d",
                candidate,
                node.voted_for,
                term,
                action="answer",
                peer=candidate,
                detail=f"already voted for {node.voted_for}",
            )
        elif theirs < mine:
            # Section 5.4.1: the later last term wins; with equal last terms, the longer log wins.
            node.narrate.tell(
                "vote",
                "refused vote to %d: its log (last term %d, index %d) is behind mine (%d, %d)",
                candidate,
                *theirs,
                *mine,
                action="answer",
                peer=candidate,
                detail="its log is behind mine",
            )
        else:
            granted = True
            node.log.set_hard_state(term, candidate)
            node.narrate.tell(
                "vote",
                "granted vote to %d: its log (last term %d, index %d) is at least as up to date "
                "as mine (%d, %d)",
                candidate,
                *theirs,
                *mine,
                action="answer",
                peer=candidate,
                ok=True,
                detail="its log is at least as up to date as mine",
            )
            # Granting a vote resets the election timer (Figure 2, rules for followers).
            node.reset_election_timer()
        await node.log.flush()
        return raft_pb2.RequestVoteResponse(term=node.current_term, vote_granted=granted)

    async def _handle_pre_vote(self, request: raft_pb2.VoteRequest) -> raft_pb2.RequestVoteResponse:
        """Would this node vote for the candidate in `request.term`? Decided by the RequestVote rules
        plus "no current leader heard from recently"; no term, vote or timer changes either way."""
        node = self.node
        candidate = request.requester_id
        term = node.current_term
        mine = (node.log.last_term, node.log.last_index)
        theirs = (request.last_log_term, request.last_log_index)
        why: str | None = None
        if request.term < term:
            why = f"its term {request.term} is behind mine"
        elif request.term == term and node.voted_for not in (None, candidate):
            why = f"I already voted for {node.voted_for} in term {term}"
        elif node.access.leader_is_recent():
            why = node.access.why_leader_is_recent()
        elif theirs < mine:
            why = "its log (last term {}, index {}) is behind mine ({}, {})".format(*theirs, *mine)
        if why is not None:
            node.narrate.tell(
                "pre_vote",
                "would not vote for %d in term %d (pre-vote): %s",
                candidate,
                request.term,
                why,
                action="answer",
                peer=candidate,
                detail=why,
            )
            # A refusal carries this node's term, so a candidate with a stale term catches up; the
            # term must then be durable, as for any reply that carries it.
            await node.log.flush()
            return raft_pb2.RequestVoteResponse(term=node.current_term, vote_granted=False)
        node.narrate.tell(
            "pre_vote",
            "would vote for %d in term %d (pre-vote): its log (last term %d, index %d) is at "
            "least as up to date as mine (%d, %d) and I have no recent leader",
            candidate,
            request.term,
            *theirs,
            *mine,
            action="answer",
            peer=candidate,
            ok=True,
            detail="its log is at least as up to date as mine and I have no recent leader",
        )
        # A grant carries the term asked about, so it can never look like a newer term to anyone.
        return raft_pb2.RequestVoteResponse(term=request.term, vote_granted=True)
