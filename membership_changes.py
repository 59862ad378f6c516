"""Membership changes, one server at a time (thesis chapter 4): the admin calls that add and remove
members, promoting a learner once it has caught up, and a leader leaving once its removal commits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from cluster_config import NodeAddress
from leader import LeaderTerm
from log import RaftLog
from membership import ChangeInProgressError, ConfigHistory, Membership, MembershipError
from node_types import MAX_ENTRIES_PER_MESSAGE, PROMOTION_WAIT, NodeBasics, NotLeaderError, Timing
from proposals import Writes
from rpc import raft_pb2
from state_machine import ApplyResult
from transfer import Transfers


class ChangesNode(NodeBasics, Protocol):
    """What membership changes need of their node."""

    log: RaftLog
    timing: Timing
    configs: ConfigHistory
    commit_index: int
    leadership: LeaderTerm | None
    transfers: Transfers

    def leader(self) -> tuple[int | None, str | None]: ...
    def membership(self) -> tuple[Membership, int, bool]: ...
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None: ...
    def become_follower(self, term: int, leader_id: int | None, why: str) -> None: ...
    def check_removed(self) -> None: ...
    def append_as_leader(self, entry: raft_pb2.LogEntry) -> int: ...

    writes: Writes

    async def wait_until(self, condition: Callable[[], bool], term: int) -> None: ...


class MembershipChanges:
    """One node's membership changes, as the leader makes them."""

    def __init__(self, node: ChangesNode) -> None:
        self.node = node

    async def list_members(self) -> tuple[Membership, int, bool]:
        """The leader's configuration in use; NotLeaderError elsewhere."""
        node = self.node
        if not node.is_leader:
            raise NotLeaderError(*node.leader())
        return node.membership()

    async def add_member(
        self, node: NodeAddress, wait_until_voter: bool = True
    ) -> tuple[Membership, int, bool]:
        """Add `node` as a learner and return once that has committed; the leader promotes it to
        voter once it has caught up (with `wait_until_voter`, this waits for that too, at most
        PROMOTION_WAIT seconds). Adding a member that is already there with the same addresses
        changes nothing. Raises NotLeaderError, MembershipError, ChangeInProgressError or
        CommitUnknownError."""
        self.require_leader()
        existing = self.node.configs.latest.address(node.id)
        if existing is not None and existing != node:
            raise MembershipError(
                f"{node.id} is already a member, at {existing.raft_address} "
                f"(client {existing.client_address})"
            )
        if existing is None:
            await self.change_config(
                lambda config: config.with_learner(node),
                f"adding {node.id} (Raft {node.raft_address}, clients {node.client_address}) as "
                "a learner",
            )
        await self._wait_for(
            lambda: self.node.configs.latest_index <= self.node.commit_index,
            self.node.timing.proposal_timeout,
        )
        if wait_until_voter:
            await self._wait_for(
                lambda: not self.node.configs.latest.learners.get(node.id)
                and self.node.configs.latest_index <= self.node.commit_index,
                PROMOTION_WAIT,
            )
        return self.node.membership()

    async def remove_member(self, node_id: int) -> tuple[Membership, int, bool]:
        """Remove a member for good and return once that has committed; its id is never used
        again. A leader removing itself steps down once the change commits. Raises
        NotLeaderError, MembershipError, ChangeInProgressError or CommitUnknownError."""
        node = self.node
        self.require_leader()
        config = node.configs.latest
        if node_id not in config.removed or config.is_member(node_id):
            await self.change_config(lambda c: c.without(node_id), f"removing {node_id}")
        # Asked again while the removal is still uncommitted: answer once it has, as add does.
        await self._wait_for(
            lambda: node.configs.latest_index <= node.commit_index, node.timing.proposal_timeout
        )
        return node.membership()

    async def change_config(
        self, change: Callable[[Membership], Membership], what: str
    ) -> ApplyResult:
        """Append the configuration `change` makes of the one in use, once this leader has
        committed an entry of its own term and no other change is pending; wait for its commit."""
        node = self.node
        term = node.current_term
        try:
            async with asyncio.timeout(node.timing.proposal_timeout):
                await node.wait_until(lambda: node.log.term_at(node.commit_index) == term, term)
        except TimeoutError:
            raise ChangeInProgressError(
                "this leader has not yet committed an entry of its own term; try again"
            ) from None
        pending = node.configs.latest_index
        leadership = node.leadership
        if pending > node.commit_index or (leadership is not None and leadership.leaving):
            raise ChangeInProgressError(
                f"the membership change at index {pending} has not committed yet; "
                "one change at a time"
            )
        new = change(node.configs.latest)
        node.narrate.tell("membership", "%s", what, action="request", detail=new.describe())
        return await node.writes.propose_entry(
            raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_CONFIG, config=new.to_proto())
        )

    async def _wait_for(self, condition: Callable[[], bool], timeout: float) -> None:
        """Leader: wait until `condition` holds, at most `timeout` seconds; NotLeaderError if
        leadership is lost meanwhile. After `timeout` it just returns: the admin calls then answer
        with membership(), whose flag says whether the configuration has committed yet."""
        node = self.node
        term = node.current_term
        try:
            async with asyncio.timeout(timeout):
                await node.wait_until(condition, term)
        except TimeoutError:
            return

    def require_leader(self) -> None:
        node = self.node
        if not node.is_leader:
            raise NotLeaderError(*node.leader())
        node.transfers.refuse_while_transferring()

    def maybe_promote(self, peer_id: int) -> None:
        """Make a learner a voter once its log has caught up, so adding it never leaves the new
        majority waiting for a node that is far behind (thesis section 4.2.1)."""
        node = self.node
        leadership = node.leadership
        if leadership is None or leadership.leaving or leadership.transfer is not None:
            return
        if node.configs.latest_index > node.commit_index:
            return  # one change at a time
        if node.log.term_at(node.commit_index) != node.current_term:
            return  # not before this leader has committed an entry of its own term
        progress = leadership.progress.get(peer_id)
        if progress is None or progress.snapshot is not None:
            return
        # It must hold the configuration that added it (so it has answered us), and be within one
        # message of the end of the log.
        behind = node.log.last_index - progress.match_index
        if progress.match_index < node.configs.latest_index or behind > MAX_ENTRIES_PER_MESSAGE:
            return
        node.narrate.tell(
            "membership",
            "learner %d has caught up (%d entries behind me): promoting it to voter",
            peer_id,
            behind,
            action="promote",
            peer=peer_id,
        )
        promoted = node.configs.latest.with_voter(peer_id)
        node.append_as_leader(
            raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_CONFIG, config=promoted.to_proto())
        )

    def after_leader_commit(self) -> None:
        """Leader: a new commit may complete a change: promote the next learner, or leave."""
        node = self.node
        leadership = node.leadership
        if leadership is None or leadership.leaving:
            return
        if node.configs.latest_index > node.commit_index:
            return
        if not node.configs.latest.is_member(node.node_id):
            leadership.leaving = True
            node.spawn(self._leave_after_removal(node.current_term), name="leave")
            return
        for learner in list(node.configs.latest.learners):
            self.maybe_promote(learner)

    async def _leave_after_removal(self, term: int) -> None:
        """The configuration removing this leader committed: hand leadership to the most
        up-to-date voter, so the others need not wait out an election timeout, then step down
        (thesis section 4.2.2)."""
        node = self.node
        node.narrate.tell(
            "membership",
            "the configuration without me committed at index %d: handing over and stepping down",
            node.configs.latest_index,
            action="leave",
            index=node.configs.latest_index,
        )
        await node.transfers.hand_over(term)
        if node.is_leader and node.current_term == term:
            node.become_follower(term, None, "I am no longer a member of this cluster")
        node.check_removed()
