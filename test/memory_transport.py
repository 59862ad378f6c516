"""In-process transports for tests: a scripted one where the test answers each message, and an
in-memory network that wires several RaftNodes together with links that can be cut and healed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf.message import Message

from raft_node import PeerUnreachableError, RaftNode
from rpc import raft_pb2

Request = (
    raft_pb2.VoteRequest
    | raft_pb2.AppendEntriesRequest
    | raft_pb2.ReadIndexRequest
    | raft_pb2.TimeoutNowRequest
    | raft_pb2.InstallSnapshotRequest
)
Reply = (
    raft_pb2.RequestVoteResponse
    | raft_pb2.AppendEntriesResponse
    | raft_pb2.ReadIndexResponse
    | raft_pb2.TimeoutNowResponse
    | raft_pb2.InstallSnapshotResponse
)
# A scripted reply policy: a reply to send at once, None to let the test answer, or raise
# PeerUnreachableError to drop the message.
Policy = Callable[[int, Request], Reply | None]

_R = TypeVar(
    "_R",
    raft_pb2.VoteRequest,
    raft_pb2.AppendEntriesRequest,
    raft_pb2.ReadIndexRequest,
    raft_pb2.TimeoutNowRequest,
    raft_pb2.InstallSnapshotRequest,
)
_M = TypeVar("_M", bound=Message)
_Answer = TypeVar(
    "_Answer",
    raft_pb2.RequestVoteResponse,
    raft_pb2.AppendEntriesResponse,
    raft_pb2.ReadIndexResponse,
    raft_pb2.TimeoutNowResponse,
    raft_pb2.InstallSnapshotResponse,
)

_REPLY_TYPE: dict[type[Request], type[Reply]] = {
    raft_pb2.VoteRequest: raft_pb2.RequestVoteResponse,
    raft_pb2.AppendEntriesRequest: raft_pb2.AppendEntriesResponse,
    raft_pb2.ReadIndexRequest: raft_pb2.ReadIndexResponse,
    raft_pb2.TimeoutNowRequest: raft_pb2.TimeoutNowResponse,
    raft_pb2.InstallSnapshotRequest: raft_pb2.InstallSnapshotResponse,
}


def _copy(message: _M) -> _M:
    """A copy through the wire encoding, so that sender and receiver never share objects."""
    return type(message).FromString(message.SerializeToString())


class CallTransport:
    """The node's Transport over one untyped `_call`: each RPC method sends through it and checks
    that the reply is of the kind its request asks for. Subclasses say how a request travels."""

    async def _call(self, peer_id: int, request: Request, timeout: float) -> Reply:
        raise NotImplementedError

    def update_peers(self, addresses: dict[int, str]) -> None:
        """Messages here travel by node id; addresses do not matter."""

    async def _typed(
        self, peer_id: int, request: Request, timeout: float, kind: type[_Answer]
    ) -> _Answer:
        reply = await self._call(peer_id, request, timeout)
        if not isinstance(reply, kind):
            raise TypeError(f"{type(request).__name__} answered by {type(reply).__name__}")
        return reply

    async def request_vote(
        self, peer_id: int, request: raft_pb2.VoteRequest, timeout: float
    ) -> raft_pb2.RequestVoteResponse:
        return await self._typed(peer_id, request, timeout, raft_pb2.RequestVoteResponse)

    async def append_entries(
        self, peer_id: int, request: raft_pb2.AppendEntriesRequest, timeout: float
    ) -> raft_pb2.AppendEntriesResponse:
        return await self._typed(peer_id, request, timeout, raft_pb2.AppendEntriesResponse)

    async def read_index(
        self, peer_id: int, request: raft_pb2.ReadIndexRequest, timeout: float
    ) -> raft_pb2.ReadIndexResponse:
        return await self._typed(peer_id, request, timeout, raft_pb2.ReadIndexResponse)

    async def timeout_now(
        self, peer_id: int, request: raft_pb2.TimeoutNowRequest, timeout: float
    ) -> raft_pb2.TimeoutNowResponse:
        return await self._typed(peer_id, request, timeout, raft_pb2.TimeoutNowResponse)

    async def install_snapshot(
        self, peer_id: int, request: raft_pb2.InstallSnapshotRequest, timeout: float
    ) -> raft_pb2.InstallSnapshotResponse:
        return await self._typed(peer_id, request, timeout, raft_pb2.InstallSnapshotResponse)

    async def close(self) -> None:
        pass


class _Waitable:
    """Wakes every waiter whenever something changes; waiters re-check their own condition."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_for(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not check():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"gave up after {timeout:g} s waiting until {what}")
            try:
                # Also look again now and then: a node's own state (a timer that fired) changes
                # without a message on the network.
                async with asyncio.timeout(min(remaining, 0.02)):
                    await self._changed.wait()
            except TimeoutError:
                pass


@dataclass
class Sent:
    """One message a node sent: to whom, what, and (once settled) how it ended."""

    peer: int
    request: Request
    reply: asyncio.Future[Reply] = field(repr=False)


class ScriptedTransport(_Waitable, CallTransport):
    """A Transport where the test decides the fate of every message the node sends.

    Each request is recorded in `sent` (in order) and waits until the test calls `answer(peer,
    reply)` or `fail(peer)`, which settle the oldest unsettled request of the matching kind to that
    peer. `policy`, if set, is asked first and may answer (or drop) a request at once. A request
    still unsettled after the timeout the node gave fails as if the peer were unreachable.
    `on_send`, if set, is called synchronously as each request leaves.
    """

    def __init__(self, policy: Policy | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.on_send: Callable[[int, Request], None] | None = None
        self.sent: list[Sent] = []
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        for sent in self.sent:
            if not sent.reply.done():
                sent.reply.set_exception(PeerUnreachableError("the transport is closed"))

    async def _call(self, peer_id: int, request: Request, timeout: float) -> Reply:
        if self._closed:
            raise PeerUnreachableError("transport closed")
        request = _copy(request)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        sent = Sent(peer_id, request, future)
        self.sent.append(sent)
        if self.on_send is not None:
            self.on_send(peer_id, request)
        if self.policy is not None:
            try:
                reply = self.policy(peer_id, request)
            except PeerUnreachableError as e:
                future.set_exception(e)
            else:
                if reply is not None:
                    future.set_result(reply)
        self._notify()
        try:
            # On timeout (or if the sender is cancelled) the future is cancelled: it is settled.
            # asyncio.timeout rather than wait_for: on Python 3.11, wait_for can swallow a
            # cancellation that races with the reply, and a stopping node would never finish.
            async with asyncio.timeout(timeout):
                reply = await future
        except TimeoutError:
            raise PeerUnreachableError(f"no reply from {peer_id} in {timeout:g} s") from None
        return _copy(reply)

    # ---- what the node sent ----------------------------------------------------------------

    def requests(self, kind: type[_R], peer: int | None = None) -> list[_R]:
        """Every request of one kind sent so far (to one peer, if given), oldest first."""
        return [
            s.request
            for s in self.sent
            if isinstance(s.request, kind) and (peer is None or s.peer == peer)
        ]

    def unsettled(self, kind: type[Request] | None = None, peer: int | None = None) -> list[Sent]:
        """Requests still waiting for the test to answer or fail them, oldest first."""
        return [
            s
            for s in self.sent
            if not s.reply.done()
            and (kind is None or isinstance(s.request, kind))
            and (peer is None or s.peer == peer)
        ]

    async def wait_sent(
        self, kind: type[_R], count: int, peer: int | None = None, timeout: float = 5.0
    ) -> list[_R]:
        """Wait until at least `count` requests of `kind` (to `peer`, if given) were sent."""
        what = f"{count} {kind.__name__}" + (f" to {peer}" if peer is not None else "")
        await self._wait_for(lambda: len(self.requests(kind, peer)) >= count, timeout, what)
        return self.requests(kind, peer)

    # ---- settling requests -----------------------------------------------------------------

    def _oldest(self, peer: int, reply_type: type[Reply] | None) -> Sent:
        for s in self.sent:
            if s.peer != peer or s.reply.done():
                continue
            if reply_type is None or _REPLY_TYPE[type(s.request)] is reply_type:
                return s
        kind = reply_type.__name__ if reply_type else "request"
        raise AssertionError(f"no unanswered request to {peer} awaits a {kind}")

    def answer(self, peer: int, reply: Reply) -> Request:
        """Deliver `reply` to the oldest unsettled request to `peer` that expects its kind."""
        sent = self._oldest(peer, type(reply))
        sent.reply.set_result(reply)
        self._notify()
        return sent.request

    def fail(self, peer: int) -> Request:
        """Drop the oldest unsettled request to `peer`: the node sees PeerUnreachableError."""
        sent = self._oldest(peer, None)
        sent.reply.set_exception(PeerUnreachableError(f"{peer} is unreachable"))
        self._notify()
        return sent.request


@dataclass(frozen=True)
class Delivery:
    """One message the network carried to its receiver, and the reply that came back (if any)."""

    src: int
    dst: int
    request: Request
    reply: Reply | None


class InMemoryNetwork(_Waitable):
    """Connects RaftNodes in one process: a send calls the receiver's handler directly.

    Links are symmetric and all up at first; `disconnect`, `isolate` and `heal` change them. A
    message on a cut link, to a node not attached, or whose receiver refuses it, fails with
    PeerUnreachableError; a reply is lost if the link is cut while the receiver handles the request.
    `delay` (seconds, default 0) is waited before each delivery; even with 0 the sender yields once,
    as it would on a real network. The network has no randomness of its own. `deliveries` records
    every request that reached its receiver, with the reply, in order.
    """

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.nodes: dict[int, RaftNode] = {}
        self.deliveries: list[Delivery] = []
        self._cut: set[frozenset[int]] = set()

    def transport(self, node_id: int) -> _Endpoint:
        """The Transport to give the RaftNode with this id."""
        return _Endpoint(self, node_id)

    def attach(self, node: RaftNode) -> None:
        self.nodes[node.node_id] = node

    def detach(self, node_id: int) -> None:
        """Take a node off the network (as when its process dies); messages to it then fail."""
        self.nodes.pop(node_id, None)

    def disconnect(self, a: int, b: int) -> None:
        self._cut.add(frozenset((a, b)))

    def isolate(self, node_id: int) -> None:
        """Cut every link between `node_id` and the other attached nodes."""
        for other in self.nodes:
            if other != node_id:
                self.disconnect(node_id, other)

    def heal(self) -> None:
        """Restore every link."""
        self._cut.clear()

    def connected(self, a: int, b: int) -> bool:
        return frozenset((a, b)) not in self._cut

    async def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait, re-checking after every delivery, until `check()` holds; fail at the deadline."""
        await self._wait_for(check, timeout, what)

    async def _deliver(self, src: int, dst: int, request: Request, timeout: float) -> Reply:
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        else:
            await asyncio.sleep(0)
        receiver = self.nodes.get(dst)
        if receiver is None or not self.connected(src, dst):
            raise PeerUnreachableError(f"{dst} is unreachable from {src}")
        request = _copy(request)
        call: Awaitable[Reply]
        if isinstance(request, raft_pb2.VoteRequest):
            call = receiver.handle_request_vote(request)
        elif isinstance(request, raft_pb2.ReadIndexRequest):
            call = receiver.handle_read_index(request)
        elif isinstance(request, raft_pb2.TimeoutNowRequest):
            call = receiver.handle_timeout_now(request)
        elif isinstance(request, raft_pb2.InstallSnapshotRequest):
            call = receiver.handle_install_snapshot(request)
        else:
            call = receiver.handle_append_entries(request)
        try:
            # The receiver's handler runs in the sender's task, as one call (see ScriptedTransport._call above
            # for why not wait_for).
            async with asyncio.timeout(timeout):
                reply = await call
        except TimeoutError:
            raise PeerUnreachableError(f"{dst} did not answer in {timeout:g} s") from None
        except Exception as e:
            # What the receiver's gRPC service would turn into an error status.
            self.deliveries.append(Delivery(src, dst, request, None))
            self._notify()
            raise PeerUnreachableError(f"{dst} refused the message: {e}") from None
        delivered = self.nodes.get(dst) is receiver and self.connected(src, dst)
        self.deliveries.append(Delivery(src, dst, request, reply if delivered else None))
        self._notify()
        if not delivered:
            raise PeerUnreachableError(f"the reply from {dst} to {src} was lost")
        return _copy(reply)


class _Endpoint(CallTransport):
    """One node's view of the InMemoryNetwork: the Transport its RaftNode uses."""

    def __init__(self, network: InMemoryNetwork, node_id: int) -> None:
        self._network = network
        self._node_id = node_id

    async def _call(self, peer_id: int, request: Request, timeout: float) -> Reply:
        return await self._network._deliver(self._node_id, peer_id, request, timeout)
