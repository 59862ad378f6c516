"""The `Cluster` gRPC service: checks each client request, hands it to the node, and turns the
node's answer (or refusal) into the reply and status code the client expects."""

from __future__ import annotations

from typing import Protocol

import grpc

from raft_node import CommitUnknownError, NotLeaderError
from rpc import raft_pb2, raft_pb2_grpc

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1024 * 1024


class ClusterNode(Protocol):
    """What this service needs from a node: its identity, whom it follows, and the store."""

    @property
    def node_id(self) -> int: ...

    @property
    def role(self) -> str: ...

    @property
    def current_term(self) -> int: ...

    def leader(self) -> tuple[int | None, str | None]: ...

    async def propose_mapping(self, key: str, value: str) -> None: ...

    def get_value(self, key: str) -> str | None: ...


def key_problem(key: str) -> str | None:
    """Why `key` cannot be stored, or None when it is acceptable."""
    if not key:
        return "key must not be empty"
    size = len(key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        return f"key is {size} bytes in UTF-8; the limit is {MAX_KEY_BYTES} bytes"
    return None


def value_problem(value: str) -> str | None:
    """Why `value` cannot be stored, or None when it is acceptable."""
    # Only strings near the limit can exceed it; skip encoding the common small value.
    if len(value) * 4 <= MAX_VALUE_BYTES:
        return None
    size = len(value.encode("utf-8"))
    if size > MAX_VALUE_BYTES:
        return f"value is {size} bytes in UTF-8; the limit is {MAX_VALUE_BYTES} bytes (1 MiB)"
    return None


class ClusterServicer(raft_pb2_grpc.ClusterServicer):
    """Serves ProposeMapping, GetValue and GetLeader for one node."""

    def __init__(self, node: ClusterNode) -> None:
        self._node = node

    async def ProposeMapping(
        self, request: raft_pb2.Mapping, context: grpc.aio.ServicerContext
    ) -> raft_pb2.ProposeMappingResponse:
        problem = key_problem(request.key) or value_problem(request.value)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            await self._node.propose_mapping(request.key, request.value)
        except NotLeaderError as e:
            response = raft_pb2.ProposeMappingResponse(success=False)
            if e.leader_id is not None:
                response.current_leader = e.leader_id
            if e.leader_address:
                response.leader_address = e.leader_address
            return response
        except CommitUnknownError as e:
            # The entry may still commit later; UNAVAILABLE tells the client the outcome is unknown.
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return raft_pb2.ProposeMappingResponse(success=True)

    async def GetValue(
        self, request: raft_pb2.Key, context: grpc.aio.ServicerContext
    ) -> raft_pb2.GetValueResponse:
        problem = key_problem(request.key)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        value = self._node.get_value(request.key)
        if value is None:
            return raft_pb2.GetValueResponse(key=request.key)
        return raft_pb2.GetValueResponse(key=request.key, value=value)

    async def GetLeader(
        self, request: raft_pb2.LeaderRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.LeaderResponse:
        node = self._node
        response = raft_pb2.LeaderResponse(
            node_id=node.node_id, role=node.role, term=node.current_term
        )
        leader_id, leader_address = node.leader()
        if leader_id is not None:
            response.leader_id = leader_id
        if leader_address:
            response.leader_address = leader_address
        return response
