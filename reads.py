"""Linearizable reads by ReadIndex (thesis section 6.4): a leader confirms it still leads with a
round of heartbeats; a follower asks the leader for a read index and applies up to it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from access import Access
from counters import Counters
from leader import LeaderTerm
from log import RaftLog
from node_events import EventFeed
from node_status import NodeObserver
from node_types import (
    MAX_WAITING_READS,
    NodeBasics,
    NotLeaderError,
    OverloadedError,
    PeerUnreachableError,
    Timing,
    Transport,
    UnavailableError,
    retrieve_exception,
)
from rpc import raft_pb2
from state_machine import KeyValueStateMachine

_T = TypeVar("_T")


class ReadNode(NodeBasics, Protocol):
    """What reads need of their node."""

    log: RaftLog
    transport: Transport
    timing: Timing
    state_machine: KeyValueStateMachine
    observer: NodeObserver
    access: Access
    commit_index: int
    leader_id: int | None
    leadership: LeaderTerm | None
    feed: EventFeed
    counters: Counters

    @property
    def last_applied(self) -> int: ...

    def leader(self) -> tuple[int | None, str | None]: ...
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None: ...
    def step_down_if_newer(self, term: int, source: str) -> bool: ...
    def check_still_leader(self, term: int) -> None: ...
    async def wait_until(self, condition: Callable[[], bool], term: int) -> None: ...
    async def wait_for_change(self) -> None: ...


class Reads:
    """One node's linearizable reads, as leader and as follower."""

    def __init__(self, node: ReadNode) -> None:
        self.node = node
        # A follower's reads waiting for the next ReadIndex request, and whether one is out.
        self._next_read_index: asyncio.Future[int] | None = None
        self._read_index_sending = False
        self._reads_waiting = 0

    async def read(self, key: str) -> str | None:
        """A linearizable read on the leader: it reflects every write acknowledged before the call.

        Raises NotLeaderError when this node is not (or stops being) the leader, and
        UnavailableError when it cannot confirm its leadership within the proposal timeout.
        """
        return await self._leader_read(lambda machine: machine.get(key))

    async def leader_query(self, query: Callable[[KeyValueStateMachine], _T]) -> _T:
        """`query` on the leader's state once it confirmed it still leads (after the call) and
        applied up to its commit index: NotLeaderError on any other node, UnavailableError when
        it cannot confirm in time. Leader-only answers (lease keepalives) are built on it."""
        return await self._leader_read(query)

    async def _leader_read(self, query: Callable[[KeyValueStateMachine], _T]) -> _T:
        node = self.node
        term = node.current_term
        node.check_still_leader(term)
        try:
            async with asyncio.timeout(node.timing.proposal_timeout):
                read_index = await self.confirm_read_index(term)
                await node.wait_until(lambda: node.last_applied >= read_index, term)
        except TimeoutError:
            raise UnavailableError(
                f"could not confirm leadership within {node.timing.proposal_timeout:g} s"
            ) from None
        return query(node.state_machine)

    async def linearizable_read(self, key: str) -> str | None:
        """A linearizable read on any node: the leader confirms itself (`read`); a follower asks
        the leader for a read index, applies up to it and answers from its own state.

        Raises UnavailableError when no leader can confirm the read in time (no leader known,
        the leader unreachable or deposed); never answers from state that may be stale.
        """
        return await self.linearizable(lambda machine: machine.get(key), f"get {key}")

    async def linearizable(self, query: Callable[[KeyValueStateMachine], _T], what: str) -> _T:
        """`query` run on this node's state once it reflects every write acknowledged before the
        call (as `linearizable_read`, which is a `get`); `what` names the read in events."""
        node = self.node
        if self._reads_waiting >= MAX_WAITING_READS:
            raise OverloadedError(
                f"{self._reads_waiting} reads already wait on node {node.node_id}; try again later"
            )
        self._reads_waiting += 1
        try:
            value = await self._linearizable_read(query)
        except Exception as e:
            if node.feed.active:
                node.feed.emit("client", f"{what} failed: {e}", action="read", detail=what)
            raise
        finally:
            self._reads_waiting -= 1
        if node.feed.active:
            node.feed.emit(
                "client",
                f"answered a read ({what}; applied up to index {node.last_applied})",
                action="read",
                index=node.last_applied,
                ok=True,
                detail=what,
            )
        return value

    async def _linearizable_read(self, query: Callable[[KeyValueStateMachine], _T]) -> _T:
        node = self.node
        started = time.perf_counter()  # for metrics only, as for proposals
        if node.is_leader:
            try:
                value = await self._leader_read(query)
            except NotLeaderError as e:
                raise UnavailableError(f"lost leadership while reading: {e}") from None
            node.observer.read_served(time.perf_counter() - started)
            return value
        leader_id = node.leader_id
        if leader_id is None or leader_id == node.node_id:
            raise UnavailableError("no leader known to confirm the read")
        timeout = node.timing.proposal_timeout
        try:
            async with asyncio.timeout(timeout):
                read_index = await self._read_index_from_leader()
                while node.last_applied < read_index:
                    await node.wait_for_change()
        except TimeoutError:
            raise UnavailableError(
                f"could not apply up to the leader's read index within {timeout:g} s"
            ) from None
        node.narrate.debug("served a linearizable read at read index %d", read_index)
        node.observer.read_served(time.perf_counter() - started)
        return query(node.state_machine)

    async def _read_index_from_leader(self) -> int:
        """The leader's read index, from a request sent after this call began (so it covers
        every write acknowledged before the read arrived). Reads that arrive while a request is
        out share the next one: one request in flight per follower, however many reads."""
        node = self.node
        batch = self._next_read_index
        if batch is None:
            batch = self._next_read_index = asyncio.get_running_loop().create_future()
            # Every read sharing it may have given up by the time it fails.
            batch.add_done_callback(retrieve_exception)
            if not self._read_index_sending:
                self._read_index_sending = True
                if node.spawn(self._send_read_index_requests(), name="read-index") is None:
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
        node = self.node
        leader_id = node.leader_id
        if leader_id is None or leader_id == node.node_id or node.is_leader:
            raise UnavailableError("no leader known to confirm the read")
        request = raft_pb2.ReadIndexRequest(term=node.current_term, requester_id=node.node_id)
        node.counters.messages_sent += 1
        try:
            reply = await node.transport.read_index(
                leader_id, request, node.timing.proposal_timeout
            )
        except PeerUnreachableError as e:
            raise UnavailableError(f"leader {leader_id} is unreachable: {e}") from None
        node.counters.messages_received += 1
        node.step_down_if_newer(reply.term, f"{leader_id}'s read index reply")
        if not reply.success:
            raise UnavailableError(f"{leader_id} could not confirm it leads")
        return reply.read_index

    async def handle_read_index(
        self, request: raft_pb2.ReadIndexRequest
    ) -> raft_pb2.ReadIndexResponse:
        """A follower asks for a read index (thesis section 6.4.1): the leader confirms it still
        leads, as for its own reads, and gives its commit index as of the request."""
        node = self.node
        counters = node.counters
        counters.messages_received += 1
        counters.messages_sent += 1  # its reply
        node.access.check_message(request.requester_id, request.term)
        node.access.check_member(request.requester_id, "read index request")
        node.step_down_if_newer(request.term, f"read index request from {request.requester_id}")
        term = node.current_term
        refused = raft_pb2.ReadIndexResponse(term=term, success=False)
        if not node.is_leader:
            return refused
        try:
            async with asyncio.timeout(node.timing.proposal_timeout):
                read_index = await self.confirm_read_index(term)
        except (TimeoutError, NotLeaderError):
            node.narrate.debug(
                "could not confirm a read index for %d: leadership unconfirmed",
                request.requester_id,
            )
            refused.term = node.current_term
            return refused
        node.narrate.debug("gave read index %d to %d", read_index, request.requester_id)
        return raft_pb2.ReadIndexResponse(term=term, success=True, read_index=read_index)

    async def confirm_read_index(self, term: int) -> int:
        """The leader's commit index once a majority has confirmed this node still leads `term`."""
        node = self.node
        # Until its no-op commits, a new leader does not know the latest commit index.
        await node.wait_until(lambda: node.log.term_at(node.commit_index) == term, term)
        read_index = node.commit_index
        # A round of heartbeats answered by a majority shows no newer leader existed when the read
        # arrived; reads that arrive together share one round.
        leadership = node.leadership
        assert leadership is not None  # wait_until checked that this node still leads `term`
        read_round = leadership.start_read_round()
        if not await leadership.wait_confirmed(read_round):
            node.check_still_leader(term)
            raise NotLeaderError(*node.leader())
        return read_index
