"""Leadership transfer (thesis section 3.10): bring the target up to date, tell it to stand now
(TimeoutNow), and turn writes away meanwhile; the hand-over of a leader that removed itself; and,
on the target, TimeoutNow received: stand at once."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol

from access import Access
from election import Election
from leader import LeaderTerm, Progress, Transfer
from log import RaftLog
from membership import Membership
from node_types import (
    Clock,
    NodeBasics,
    NotLeaderError,
    PeerUnreachableError,
    Timing,
    TransferFailedError,
    Transport,
)
from rpc import raft_pb2


class TransferNode(NodeBasics, Protocol):
    """What a transfer needs of its node."""

    log: RaftLog
    transport: Transport
    timing: Timing
    clock: Clock
    leader_id: int | None
    leadership: LeaderTerm | None

    @property
    def config(self) -> Membership: ...

    def leader(self) -> tuple[int | None, str | None]: ...
    def other_voters(self) -> list[int]: ...
    def step_down_if_newer(self, term: int, source: str) -> bool: ...
    async def pause(self, seconds: float) -> None: ...
    async def wait_for_change(self) -> None: ...

    # Receiving TimeoutNow: stand at once.
    access: Access
    election: Election

    def become_candidate(self, transfer: bool) -> int | None: ...
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> Any: ...


class Transfers:
    """Hands one node's leadership over."""

    def __init__(self, node: TransferNode) -> None:
        self.node = node

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
        node = self.node
        leadership = node.leadership
        if leadership is None:
            raise NotLeaderError(*node.leader())
        if target_id == node.node_id:
            return node.node_id
        voters = node.other_voters()
        if target_id and target_id not in voters:
            if node.config.is_member(target_id):
                raise ValueError(f"{target_id} is a learner, not a voting member")
            raise ValueError(f"{target_id} is not a member of this cluster")
        if leadership.transfer is not None:
            raise TransferFailedError(f"already handing leadership to {leadership.transfer.target}")
        if not voters:
            raise TransferFailedError("there is no other voter to hand leadership to")
        term = node.current_term
        window = node.timing.election_timeout_max
        recent = node.clock.now() - window

        def readiness(peer: int) -> tuple[bool, int, int]:
            # A peer that answers now beats one further ahead that may be down.
            progress = leadership.progress[peer]
            return (progress.heard_at > recent, progress.match_index, -peer)

        target = target_id or max(voters, key=readiness)
        transfer = leadership.transfer = Transfer(target, term)
        node.narrate.tell(
            "transfer",
            "handing leadership to %d: refusing new writes until it takes over (its log matches "
            "mine up to index %d of %d)",
            target,
            leadership.progress[target].match_index,
            node.log.last_index,
            action="start",
            peer=target,
        )
        try:
            async with asyncio.timeout(window):
                await self.send_timeout_now(transfer)
                # The target's vote request (or a newer leader's message) makes this node follow.
                while node.is_leader and node.current_term == term:
                    await node.wait_for_change()
        except TimeoutError:
            if node.is_leader and node.current_term == term:
                node.narrate.tell(
                    "transfer",
                    "gave up handing leadership to %d: it did not take over within %d ms; "
                    "accepting writes again",
                    target,
                    window * 1000,
                    action="failed",
                    peer=target,
                )
                raise TransferFailedError(
                    f"{target} did not take over within {window:g} s; {node.node_id} still leads"
                ) from None
        finally:
            if leadership.transfer is transfer:
                leadership.transfer = None
        # Who won becomes known with its first append.
        try:
            async with asyncio.timeout(window):
                while node.leader_id is None:
                    await node.wait_for_change()
        except TimeoutError:
            raise TransferFailedError(
                "leadership moved on, but no new leader is known here yet"
            ) from None
        leader_id = node.leader_id
        assert leader_id is not None
        return leader_id

    async def send_timeout_now(self, transfer: Transfer) -> None:
        """Bring the transfer's target up to date, then tell it to start an election now; retried
        while it cannot be reached. Returns early if this node stops leading meanwhile."""
        node = self.node
        target, term = transfer.target, transfer.term

        def progress() -> Progress | None:
            # The target's progress while this node still leads the transfer's term.
            leadership = node.leadership
            if leadership is None or node.current_term != term:
                return None
            return leadership.progress.get(target)

        while (behind := progress()) is not None and behind.match_index < node.log.last_index:
            behind.wake.set()
            await node.wait_for_change()
        request = raft_pb2.TimeoutNowRequest(term=term, requester_id=node.node_id)
        while progress() is not None:
            node.narrate.tell(
                "transfer",
                "%d holds my whole log (up to index %d): telling it to start an election now",
                target,
                node.log.last_index,
                action="timeout_now",
                peer=target,
                index=node.log.last_index,
            )
            try:
                reply = await node.transport.timeout_now(
                    target, request, timeout=node.timing.election_timeout_min
                )
            except PeerUnreachableError as e:
                node.narrate.debug("TimeoutNow to %d failed: %s", target, e)
                await node.pause(node.timing.heartbeat_interval)
                continue
            node.step_down_if_newer(reply.term, f"{target}'s TimeoutNow reply")
            return

    def refuse_while_transferring(self) -> None:
        """While leadership is being handed over, new writes go to the target (thesis 3.10)."""
        node = self.node
        leadership = node.leadership
        transfer = leadership.transfer if leadership is not None else None
        if transfer is not None:
            node.narrate.tell(
                "client",
                "turning a client away: handing leadership to %d",
                transfer.target,
                action="redirect",
                peer=transfer.target,
            )
            target = node.config.address(transfer.target)
            raise NotLeaderError(transfer.target, target.client_address if target else None)

    async def hand_over(self, term: int) -> None:
        """The configuration removing this leader committed: tell the most up-to-date voter to
        take over now, for at most the minimum election timeout (thesis section 4.2.2)."""
        node = self.node
        voters = node.other_voters()
        leadership = node.leadership
        if voters and leadership is not None and node.current_term == term:
            target = max(voters, key=lambda p: (leadership.progress[p].match_index, -p))
            transfer = leadership.transfer = Transfer(target, term)
            try:
                async with asyncio.timeout(node.timing.election_timeout_min):
                    await self.send_timeout_now(transfer)
            except TimeoutError:
                pass
            finally:
                if leadership.transfer is transfer:
                    leadership.transfer = None

    async def handle_timeout_now(
        self, request: raft_pb2.TimeoutNowRequest
    ) -> raft_pb2.TimeoutNowResponse:
        """The leader hands leadership over: start an election at once, without a pre-vote, with
        vote requests that voters grant despite having just heard from that leader (thesis 3.10)."""
        node = self.node
        node.access.check_message(request.requester_id, request.term)
        node.access.check_member(request.requester_id, "TimeoutNow", request.term)
        leader = request.requester_id
        node.step_down_if_newer(request.term, f"TimeoutNow from {leader}")
        reply = raft_pb2.TimeoutNowResponse(term=node.current_term)
        if request.term < node.current_term or node.is_leader:
            node.narrate.info(
                "ignored TimeoutNow from %d: its term %d is not my current term",
                leader,
                request.term,
            )
            return reply
        node.narrate.tell(
            "transfer",
            "leader %d asked me to take over: starting an election for term %d now",
            leader,
            node.current_term + 1,
            action="take_over",
            peer=leader,
        )
        term = node.become_candidate(transfer=True)
        if term is not None:
            node.spawn(node.election.ask_for_votes(term, transfer=True), name="election")
        return reply
