"""The `Raft` gRPC service: hands peers' messages (votes, entries, read index, timeout now, snapshot
chunks) to the node, maps refusals to codes. It first checks who is calling: a peer of this cluster
(its cluster id) and, under mutual TLS, the member its certificate names, who alone may speak for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc

from cluster_identity import METADATA_KEY, ClusterIdentity
from disk import DiskFullError
from node_types import InvalidRequestError
from rpc import raft_pb2, raft_pb2_grpc
from tls import NODE_URI_PREFIX, certified_node

# A node of another cluster calls again and again; say so once per this many seconds and caller.
_WARN_EVERY = 10.0


class PeerNode(Protocol):
    """What this service needs from a node: its handlers of peers' messages, and its voice."""

    @property
    def narrate(self) -> logging.LoggerAdapter[logging.Logger]: ...

    async def handle_request_vote(
        self, request: raft_pb2.VoteRequest
    ) -> raft_pb2.RequestVoteResponse: ...

    async def handle_append_entries(
        self, request: raft_pb2.AppendEntriesRequest
    ) -> raft_pb2.AppendEntriesResponse: ...

    async def handle_read_index(
        self, request: raft_pb2.ReadIndexRequest
    ) -> raft_pb2.ReadIndexResponse: ...

    async def handle_timeout_now(
        self, request: raft_pb2.TimeoutNowRequest
    ) -> raft_pb2.TimeoutNowResponse: ...

    async def handle_install_snapshot(
        self, request: raft_pb2.InstallSnapshotRequest
    ) -> raft_pb2.InstallSnapshotResponse: ...


class Malformed:
    """A request whose bytes did not parse as its message type; handlers refuse it."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.reason = f"the request does not parse as a {type_name}: {error}"


class _Registration:
    """Stands in for a server while a generated `add_*Servicer_to_server` registers handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # built again below from the registered handlers

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.service = service
        self.handlers = dict(handlers)


# Awaited before a malformed request is answered: a caller that may not use the service at all is
# refused as such (it aborts the call), whatever it sent.
Gate = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]


def add_refusing_malformed(
    add_to_server: Callable[[Any, Any], None],
    servicer: Any,
    server: grpc.aio.Server,
    gate: Gate | None = None,
) -> None:
    """Register `servicer` as the generated `add_to_server` would, but so that every method of
    the service, present and future, answers a request that does not parse with INVALID_ARGUMENT
    instead of gRPC's UNKNOWN (an unhandled decoding exception), once `gate` let the caller in.
    The handlers are changed once, here: an interceptor would cost every call a few more objects
    and awaits. A streaming handler reading its own messages sees a `Malformed` in their place and
    must refuse it."""
    registration = _Registration()
    add_to_server(servicer, registration)
    handlers = {name: _tolerant(h, gate) for name, h in registration.handlers.items()}
    service = registration.service
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def _tolerant(handler: grpc.RpcMethodHandler, gate: Gate | None) -> grpc.RpcMethodHandler:
    parse = getattr(handler, "request_deserializer", None)
    if parse is None:
        return handler
    type_name = getattr(getattr(parse, "__self__", None), "__name__", "request")

    def tolerant(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as e:  # protobuf's DecodeError, whose module ships no type stubs
            return Malformed(type_name, e)

    changes: dict[str, Any] = {"request_deserializer": tolerant}
    if handler.unary_unary is not None:
        changes["unary_unary"] = _refusing_malformed(handler.unary_unary, gate)
    elif handler.unary_stream is not None:
        changes["unary_stream"] = _refusing_malformed_stream(handler.unary_stream, gate)
    return handler._replace(**changes)


async def _refuse_malformed(
    request: Malformed, context: grpc.aio.ServicerContext[Any, Any], gate: Gate | None
) -> None:
    if gate is not None:
        await gate(context)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)


def _refusing_malformed(behaviour: Callable[..., Any], gate: Gate | None) -> Callable[..., Any]:
    async def refuse_or_serve(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Malformed):
            await _refuse_malformed(request, context, gate)
        return await behaviour(request, context)

    return refuse_or_serve


def _refusing_malformed_stream(
    behaviour: Callable[..., Any], gate: Gate | None
) -> Callable[..., Any]:
    async def refuse_or_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Malformed):
            await _refuse_malformed(request, context, gate)
        async for reply in behaviour(request, context):
            yield reply

    return refuse_or_stream


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
    """Abort the call with the code that says why: a bad request, a full disk (the node recovers
    once space returns), or a disk that failed for good (the node is stopping)."""
    if isinstance(error, InvalidRequestError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, DiskFullError):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    await context.abort(grpc.StatusCode.UNAVAILABLE, f"this node's disk failed: {error}")


class RaftServicer(raft_pb2_grpc.RaftServicer):
    """Thin translation layer; every decision is the node's, except who the caller is. Before the node
    sees a message: with `authenticate` (mutual TLS), the caller's certificate must name a member
    and the message must come from that member (PERMISSION_DENIED otherwise: a client certificate,
    or node 2's speaking for node 3); and a call without this node's cluster id is refused
    (FAILED_PRECONDITION). Whether that member may say what it says (a vote, entries, a read index)
    is the node's rule."""

    def __init__(
        self, node: PeerNode, identity: ClusterIdentity | None = None, authenticate: bool = False
    ) -> None:
        self._node = node
        self._identity = identity
        self._authenticate = authenticate
        self._warned: dict[tuple[str, str], float] = {}
        # AppendStream handlers waiting for their next request, so that shutting down need not wait
        # out the server's grace period for streams that never end by themselves.
        self._idle_streams: set[asyncio.Task[Any]] = set()
        self._ending = False

    async def _check_cluster(
        self, context: grpc.aio.ServicerContext[Any, Any], what: str
    ) -> str | None:
        """Abort the call unless it comes from this node's cluster. Returns the caller's id when
        this node has none yet (it is joining, and adopts its leader's once it accepts entries)."""
        if self._identity is None:
            return None
        theirs = ""
        for key, value in context.invocation_metadata() or ():
            if key == METADATA_KEY:
                theirs = value if isinstance(value, str) else value.decode("ascii", "replace")
        mine = self._identity.cluster_id
        if mine is None and theirs and what in ("AppendEntries", "InstallSnapshot"):
            return theirs
        if theirs == mine:
            return None
        if mine is None:
            problem = "this node has not joined a cluster yet"
        elif not theirs:
            problem = f"the call carries no cluster id; this node belongs to cluster {mine}"
        else:
            problem = f"the caller belongs to cluster {theirs[:32]}, this node to cluster {mine}"
        caller = context.peer() or "?"
        await self._refuse_caller(
            context, grpc.StatusCode.FAILED_PRECONDITION, what, (caller, theirs), problem
        )
        raise AssertionError("unreachable: abort raises")

    async def _refuse_caller(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        code: grpc.StatusCode,
        what: str,
        key: tuple[str, str],
        problem: str,
    ) -> None:
        """Abort the call with `code`; narrate it once per `key` (who is calling) and 10 s, so that a
        caller repeating itself cannot flood the log."""
        now = time.monotonic()
        if now - self._warned.get(key, -_WARN_EVERY) >= _WARN_EVERY:
            self._warned[key] = now
            if len(self._warned) > 1000:
                self._warned.clear()  # bounded, whoever calls
            self._node.narrate.warning(
                "refused %s from %s: %s", what, context.peer() or "?", problem
            )
        await context.abort(code, problem)

    async def check_member_certificate(
        self, context: grpc.aio.ServicerContext[Any, Any], what: str = "a call"
    ) -> int | None:
        """Under mutual TLS, the member id the caller's certificate names; abort with
        PERMISSION_DENIED if it names none (a client's certificate). None without authentication."""
        if not self._authenticate:
            return None
        certified = certified_node(context)
        if certified is None:
            await self._refuse_caller(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                what,
                ("certificate", "none"),
                "the caller's certificate names no member of this cluster (a node's names "
                f"{NODE_URI_PREFIX}ID): only members may speak Raft",
            )
        return certified

    async def _check_sender(
        self, context: grpc.aio.ServicerContext[Any, Any], what: str, sender: int
    ) -> None:
        """Under mutual TLS, abort with PERMISSION_DENIED unless the caller's certificate names
        `sender`, the member the message claims to come from."""
        if not self._authenticate:
            return
        certified = await self.check_member_certificate(context, what)
        if certified != sender:
            await self._refuse_message(context, what, certified, sender)

    async def _refuse_message(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        what: str,
        certified: int | None,
        sender: int,
    ) -> None:
        await self._refuse_caller(
            context,
            grpc.StatusCode.PERMISSION_DENIED,
            what,
            ("certificate", str(certified)),
            f"the caller's certificate is node {certified}'s; it cannot speak for node {sender}",
        )

    async def gate(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """For `add_refusing_malformed`: a caller whose certificate names no member learns nothing
        more, not even that its request did not parse."""
        await self.check_member_certificate(context)

    async def _adopt(self, cluster_id: str | None) -> None:
        """A joining node's first accepted entries come from its cluster's leader: keep its id."""
        if cluster_id is None or self._identity is None or self._identity.cluster_id is not None:
            return
        await self._identity.keep(cluster_id)
        self._node.narrate.info(
            "joined cluster %s (its id is kept in my data directory)", cluster_id
        )

    def end_streams(self) -> None:
        """End every AppendStream once its current request is answered; call before stopping the
        server. The leader sees the stream end, as if this node had gone."""
        self._ending = True
        for task in self._idle_streams:
            task.cancel()

    async def RequestVote(
        self, request: raft_pb2.VoteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> raft_pb2.RequestVoteResponse:
        await self._check_sender(context, "RequestVote", request.requester_id)
        await self._check_cluster(context, "RequestVote")
        try:
            return await self._node.handle_request_vote(request)
        except (InvalidRequestError, OSError) as e:
            await _refuse(context, e)
            raise  # unreachable: abort raises

    async def AppendEntries(
        self, request: raft_pb2.AppendEntriesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> raft_pb2.AppendEntriesResponse:
        await self._check_sender(context, "AppendEntries", request.requester_id)
        joining = await self._check_cluster(context, "AppendEntries")
        try:
            reply = await self._node.handle_append_entries(request)
        except (InvalidRequestError, OSError) as e:
            await _refuse(context, e)
            raise
        await self._adopt(joining if reply.success else None)
        return reply

    async def AppendStream(
        self,
        request_iterator: AsyncIterator[raft_pb2.AppendEntriesRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        # One request at a time, answered before the next is read: replies leave in request order,
        # each only once its entries are durable, exactly as the unary call's would. Who calls is
        # checked once the first request has arrived, as for a unary call: a caller refused before
        # it finished sending would see its own failed write rather than the refusal.
        certified: int | None = None
        joining: str | None = None
        first = True
        task = asyncio.current_task()
        assert task is not None
        while not self._ending:
            self._idle_streams.add(task)
            try:
                request = await context.read()
            except asyncio.CancelledError:
                if self._ending:
                    # Ended normally, so that the server finishes the call instead of waiting for it.
                    task.uncancel()
                    return
                raise
            finally:
                self._idle_streams.discard(task)
            if request is grpc.aio.EOF:
                return
            if first:
                first = False
                certified = await self.check_member_certificate(context, "AppendStream")
                joining = await self._check_cluster(context, "AppendEntries")
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            if self._authenticate and request.requester_id != certified:
                await self._refuse_message(context, "AppendStream", certified, request.requester_id)
            try:
                reply = await self._node.handle_append_entries(request)
            except (InvalidRequestError, OSError) as e:
                await _refuse(context, e)
                raise
            if joining is not None and reply.success:
                await self._adopt(joining)
                joining = None
            await context.write(reply)

    async def ReadIndex(
        self, request: raft_pb2.ReadIndexRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> raft_pb2.ReadIndexResponse:
        await self._check_sender(context, "ReadIndex", request.requester_id)
        await self._check_cluster(context, "ReadIndex")
        try:
            return await self._node.handle_read_index(request)
        except (InvalidRequestError, OSError) as e:
            await _refuse(context, e)
            raise

    async def TimeoutNow(
        self, request: raft_pb2.TimeoutNowRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> raft_pb2.TimeoutNowResponse:
        await self._check_sender(context, "TimeoutNow", request.requester_id)
        await self._check_cluster(context, "TimeoutNow")
        try:
            return await self._node.handle_timeout_now(request)
        except (InvalidRequestError, OSError) as e:
            await _refuse(context, e)
            raise

    async def InstallSnapshot(
        self,
        request: raft_pb2.InstallSnapshotRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> raft_pb2.InstallSnapshotResponse:
        await self._check_sender(context, "InstallSnapshot", request.requester_id)
        joining = await self._check_cluster(context, "InstallSnapshot")
        try:
            reply = await self._node.handle_install_snapshot(request)
        except (InvalidRequestError, OSError) as e:
            await _refuse(context, e)
            raise
        await self._adopt(joining)
        return reply
