"""A `Cluster` gRPC server that does nothing: the ceiling of the benchmark's client loop.

`python -m test.null_server --port P` answers every call at once, as a one-node leader would.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rpc import raft_pb2, raft_pb2_grpc  # noqa: E402


class NullCluster(raft_pb2_grpc.ClusterServicer):
    """Every write succeeds and every read finds nothing; nothing is stored."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._leader = raft_pb2.LeaderResponse(
            node_id=1, role="leader", term=1, leader_id=1, leader_address=address
        )
        self._ok = raft_pb2.ProposeMappingResponse(success=True)

    async def ProposeMapping(self, request: Any, context: Any) -> Any:
        return self._ok

    async def ProposeMappings(self, request: Any, context: Any) -> Any:
        return self._ok

    async def GetValue(self, request: Any, context: Any) -> Any:
        return raft_pb2.GetValueResponse(key=request.key)

    async def CompareAndSwap(self, request: Any, context: Any) -> Any:
        return raft_pb2.CompareAndSwapResponse(
            success=True, swapped=True, current_value=request.new_value
        )

    async def GetLeader(self, request: Any, context: Any) -> Any:
        return self._leader


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server()
    address = f"{host}:{port}"
    raft_pb2_grpc.add_ClusterServicer_to_server(NullCluster(address), server)
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m test.null_server", description="A Cluster server that does nothing."
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
