"""gRPC health checking (grpc.health.v1) that follows a node's state, and server reflection, for
both of a node's servers."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

import grpc

from node_status import NodeObserver

if TYPE_CHECKING:
    from grpc_health.v1 import _async as health_aio


class HealthNode(Protocol):
    """What health checks read of the node."""

    @property
    def serving(self) -> bool: ...


class NodeHealth(NodeObserver):
    """Keeps the standard gRPC health service (grpc.health.v1) of both servers in step with the
    node: SERVING for "" and the server's own service while `node.serving`, else NOT_SERVING.
    Driven by the node's state changes, never by polling."""

    def __init__(self, node: HealthNode) -> None:
        self._node = node
        self._servicers: list[tuple[health_aio.HealthServicer, tuple[str, ...]]] = []
        self._changed = asyncio.Event()
        self._reported: bool | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def add_to(self, server: grpc.aio.Server, service: str) -> None:
        from grpc_health.v1 import _async as health_aio
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        servicer = health_aio.HealthServicer()
        names = ("", service)
        for name in names:
            # The servicer starts as SERVING for "": no node is that before it has a leader.
            await servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        self._servicers.append((servicer, names))

    def state_changed(self) -> None:
        self._changed.set()

    def start(self) -> None:
        self._changed.set()
        self._task = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        from grpc_health.v1 import health_pb2

        while True:
            await self._changed.wait()
            self._changed.clear()
            serving = self._node.serving
            if serving == self._reported:
                continue
            self._reported = serving
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for servicer, names in self._servicers:
                for name in names:
                    await servicer.set(name, status)

    async def stop(self) -> None:
        """NOT_SERVING from now on, whatever the node does while it stops."""
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
        for servicer, _ in self._servicers:
            await servicer.enter_graceful_shutdown()


async def add_health_and_reflection(
    server: grpc.aio.Server, service: str, health: NodeHealth
) -> None:
    """Health checking and server reflection (so grpcurl can list and call the services)."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection

    from rpc import raft_pb2

    await health.add_to(server, service)
    names = (
        raft_pb2.DESCRIPTOR.services_by_name[service].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
