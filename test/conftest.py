"""Shared fixtures and helpers for the tests that run real node processes on real sockets."""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from cluster_config import ClusterConfig
from cluster_identity import METADATA_KEY, derive_cluster_id
from rpc import raft_pb2, raft_pb2_grpc
from test.cluster_process import CHANNEL_OPTIONS, LocalCluster

REPO = Path(__file__).resolve().parent.parent
_T = TypeVar("_T")


async def wait_until(
    check: Callable[[], Awaitable[_T | None]],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> _T:
    """Poll `check` until it returns something other than None/False; fail the test at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await check()
        if result is not None and result is not False:
            return result
        if loop.time() >= deadline:
            raise AssertionError(f"gave up after {timeout:g} s waiting until {what}")
        await asyncio.sleep(interval)


def log_tails(cluster: LocalCluster, node_ids: Sequence[int] | None = None, lines: int = 15) -> str:
    """The last narration lines of some nodes, for an assertion message."""
    parts = []
    for node_id in cluster.node_ids if node_ids is None else node_ids:
        tail = "\n    ".join(cluster.log_tail(node_id, lines))
        parts.append(f"--- node {node_id}:\n    {tail}")
    return "\n".join(parts)


class _AsMemberOf:
    """A `Raft` stub whose calls carry a cluster id."""

    def __init__(self, stub: Any, cluster_id: str) -> None:
        self._stub = stub
        self._metadata = ((METADATA_KEY, cluster_id),)

    def __getattr__(self, method: str) -> Callable[..., Any]:
        return functools.partial(getattr(self._stub, method), metadata=self._metadata)


class Stubs:
    """gRPC stubs on fresh channels to any address, for speaking to single nodes directly."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                address,
                options=[
                    *CHANNEL_OPTIONS,
                    ("grpc.max_send_message_length", 8 * 1024 * 1024),
                    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
                ],
            )
            self._channels[address] = channel
        return channel

    def cluster(self, address: str) -> Any:
        return raft_pb2_grpc.ClusterStub(self._channel(address))

    def raft(self, address: str, cluster: ClusterConfig | None = None) -> Any:
        """A `Raft` stub; with `cluster`, its calls carry the id that cluster's nodes derived, as
        a member's would (nodes refuse calls without their cluster id)."""
        stub = raft_pb2_grpc.RaftStub(self._channel(address))
        return stub if cluster is None else _AsMemberOf(stub, derive_cluster_id(cluster))

    async def leader_info(self, address: str, timeout: float = 1.0) -> Any | None:
        """The node's LeaderResponse, or None when it does not answer."""
        try:
            return await self.cluster(address).GetLeader(raft_pb2.LeaderRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return None

    async def value(self, address: str, key: str, timeout: float = 1.0) -> str | None:
        """What the node's applied state holds under `key` (None when unset); raises if it is down."""
        response = await self.cluster(address).GetValue(raft_pb2.Key(key=key), timeout=timeout)
        return str(response.value) if response.HasField("value") else None

    async def values(self, address: str, keys: Sequence[str]) -> dict[str, str | None] | None:
        """The node's values for `keys`, or None when it does not answer every read."""
        try:
            got = await asyncio.gather(*(self.value(address, k) for k in keys))
        except grpc.aio.AioRpcError:
            return None
        return dict(zip(keys, got, strict=True))

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


async def leader_of(cluster: LocalCluster) -> tuple[int, str]:
    leader = await cluster.wait_for_leader(timeout=15)
    return leader, cluster.client_address(leader)


async def put(stubs: Stubs, cluster: LocalCluster, key: str, value: str) -> str:
    """Write through whichever node leads, following `leader_address` redirects; the address
    of the node that acknowledged the write."""

    async def attempt() -> str | None:
        _, address = await leader_of(cluster)
        for _ in range(3):
            try:
                reply = await stubs.cluster(address).ProposeMapping(
                    raft_pb2.Mapping(key=key, value=value), timeout=6
                )
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                return None
            if reply.success:
                return address
            if not reply.leader_address:
                return None
            address = reply.leader_address
        return None

    return await wait_until(attempt, 20, f"the cluster accepts a write to {key[:40]!r}")


@pytest.fixture
async def stubs() -> AsyncIterator[Stubs]:
    made = Stubs()
    yield made
    await made.close()


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """Start a fresh LocalCluster (free ports, temporary data dir); every one is stopped afterwards."""
    made: list[LocalCluster] = []

    def make(nodes: int = 5, extra_args: Sequence[str] = (), start: bool = True) -> LocalCluster:
        cluster = LocalCluster(nodes=nodes, extra_args=extra_args)
        made.append(cluster)
        if start:
            cluster.start()
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


def run_script(
    args: Sequence[str], timeout: float = 30, cwd: Path = REPO, env_path: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a Python program as a user would, capturing its output; `env_path` sets PYTHONPATH."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    if env_path is not None:
        env["PYTHONPATH"] = env_path
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
