"""PySyncObj's ReplDict behind this project's `Cluster` gRPC API, one process per node, so the
benchmark drives PySyncObj with the same client loop (needs `pip install pysyncobj==0.3.17`).

`python -m test.pysyncobj_adapter --raft 127.0.0.1:P --client 127.0.0.1:C --peer HOST:PORT ...`
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rpc import raft_pb2, raft_pb2_grpc  # noqa: E402


class ReplDictCluster(raft_pb2_grpc.ClusterServicer):
    """Writes are ReplDict commands (PySyncObj forwards them to its leader and calls back once
    they are applied here); reads are this node's own copy, so they may be stale."""

    def __init__(self, sync: Any, store: Any, client_of: dict[str, str]) -> None:
        self._sync = sync
        self._store = store
        self._client_of = client_of

    async def _replicate(self, command: Callable[..., Any], *args: Any) -> bool:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()

        def callback(result: Any, error: int) -> None:
            # Runs on PySyncObj's own thread.
            loop.call_soon_threadsafe(_settle, done, error == 0)

        command(*args, callback=callback)
        return await done

    async def ProposeMapping(self, request: Any, context: Any) -> Any:
        ok = await self._replicate(self._store.set, request.key, request.value)
        return raft_pb2.ProposeMappingResponse(success=ok)

    async def ProposeMappings(self, request: Any, context: Any) -> Any:
        batch = {m.key: m.value for m in request.mappings}
        ok = await self._replicate(self._store.update, batch)
        return raft_pb2.ProposeMappingResponse(success=ok)

    async def GetValue(self, request: Any, context: Any) -> Any:
        if not request.allow_stale:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "ReplDict has no linearizable read")
        value = self._store.get(request.key)
        if value is None:
            return raft_pb2.GetValueResponse(key=request.key)
        return raft_pb2.GetValueResponse(key=request.key, value=value)

    async def GetLeader(self, request: Any, context: Any) -> Any:
        leader = self._sync._getLeader()
        me = self._sync.selfNode.address
        if leader is None:
            return raft_pb2.LeaderResponse(role="follower")
        role = "leader" if leader.address == me else "follower"
        return raft_pb2.LeaderResponse(
            role=role, leader_address=self._client_of.get(leader.address, "")
        )


def _settle(future: asyncio.Future[bool], ok: bool) -> None:
    if not future.done():
        future.set_result(ok)


async def serve(raft: str, client: str, peers: list[str], clients: list[str]) -> None:
    # Imported by name: PySyncObj is optional and has no type information.
    pysyncobj: Any = importlib.import_module("pysyncobj")
    batteries: Any = importlib.import_module("pysyncobj.batteries")
    store = batteries.ReplDict()
    # Memory only (PySyncObj's default): no journal file, so no fsync on its write path.
    conf = pysyncobj.SyncObjConf(dynamicMembershipChange=False)
    sync = pysyncobj.SyncObj(raft, peers, conf=conf, consumers=[store])
    client_of = dict(zip([raft, *peers], clients, strict=True))
    server = grpc.aio.server()
    raft_pb2_grpc.add_ClusterServicer_to_server(ReplDictCluster(sync, store, client_of), server)
    server.add_insecure_port(client)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=0.5)
        sync.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m test.pysyncobj_adapter",
        description="Serve a PySyncObj ReplDict through the Cluster gRPC API.",
    )
    parser.add_argument("--raft", required=True, help="this node's PySyncObj address")
    parser.add_argument("--client", required=True, help="this node's Cluster gRPC address")
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        help="another node as RAFT_ADDR=CLIENT_ADDR (repeat for each)",
    )
    args = parser.parse_args(argv)
    try:
        importlib.import_module("pysyncobj")
    except ImportError:
        print("pysyncobj is not installed: pip install pysyncobj==0.3.17", file=sys.stderr)
        return 2
    peers = [p.split("=", 1)[0] for p in args.peer]
    clients = [args.client, *(p.split("=", 1)[1] for p in args.peer)]
    uvloop.run(serve(args.raft, args.client, peers, clients))
    return 0


if __name__ == "__main__":
    sys.exit(main())
