"""AppendEntries on one stream per follower: replies match their requests, a reply that comes too
late is never taken for a later request's, a follower without the stream is still reached, a
follower shutting down ends its streams, a follower whose connection never comes up costs each
append no more than its timeout, and a follower killed while entries are in flight takes part in
replication again once restarted."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import grpc
import pytest

from cluster_client import Client, ClientError
from raft_client import GrpcTransport
from raft_node import PeerUnreachableError, RaftNode
from raft_server import RaftServicer
from rpc import raft_pb2, raft_pb2_grpc
from test.cluster_process import LocalCluster
from test.conftest import leader_of, log_tails, wait_until

MakeCluster = Callable[..., LocalCluster]
PEER = 2


class FakeFollower:
    """Answers appends as a follower whose log holds everything it is sent; a request whose
    prev_log_index is in `held` is answered only once `release` is set."""

    def __init__(self) -> None:
        self.held: set[int] = set()
        self.release = asyncio.Event()
        self.handled: list[int] = []

    async def handle_append_entries(
        self, request: raft_pb2.AppendEntriesRequest
    ) -> raft_pb2.AppendEntriesResponse:
        if request.prev_log_index in self.held:
            await self.release.wait()
        self.handled.append(request.prev_log_index)
        return raft_pb2.AppendEntriesResponse(
            term=request.term,
            success=True,
            match_index=request.prev_log_index + len(request.log_entries),
        )


class UnaryOnlyServicer(raft_pb2_grpc.RaftServicer):
    """A follower of an older version: AppendEntries, but no AppendStream."""

    def __init__(self, follower: FakeFollower) -> None:
        self._follower = follower

    async def AppendEntries(
        self, request: raft_pb2.AppendEntriesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> raft_pb2.AppendEntriesResponse:
        return await self._follower.handle_append_entries(request)


async def serve(
    servicer: raft_pb2_grpc.RaftServicer,
) -> AsyncIterator[tuple[GrpcTransport, grpc.aio.Server]]:
    """`servicer` on a local port, and a transport reaching it as peer PEER."""
    server = grpc.aio.server()
    raft_pb2_grpc.add_RaftServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    transport = GrpcTransport({PEER: f"127.0.0.1:{port}"})
    try:
        yield transport, server
    finally:
        await transport.close()
        await server.stop(None)


@pytest.fixture
def follower() -> FakeFollower:
    return FakeFollower()


@pytest.fixture
async def transport(follower: FakeFollower) -> AsyncIterator[GrpcTransport]:
    async for made, _ in serve(RaftServicer(cast(RaftNode, follower))):
        yield made


def append(prev: int, entries: int = 1) -> raft_pb2.AppendEntriesRequest:
    return raft_pb2.AppendEntriesRequest(
        term=3,
        requester_id=1,
        prev_log_index=prev,
        prev_log_term=3 if prev else 0,
        log_entries=[
            raft_pb2.LogEntry(term=3, index=prev + i + 1, key=f"k{prev + i}", value="v")
            for i in range(entries)
        ],
    )


async def test_each_reply_answers_its_own_request(
    transport: GrpcTransport, follower: FakeFollower
) -> None:
    prevs = [0, 1, 3, 3, 7, 100]
    for prev, entries in zip(prevs, itertools.cycle([1, 2, 0])):
        reply = await transport.append_entries(PEER, append(prev, entries), timeout=5)
        assert (reply.success, reply.match_index) == (True, prev + entries)
    assert follower.handled == prevs


async def test_a_late_reply_is_never_taken_for_the_next_requests(
    transport: GrpcTransport, follower: FakeFollower
) -> None:
    await transport.append_entries(PEER, append(0), timeout=5)
    follower.held.add(1)
    with pytest.raises(PeerUnreachableError):
        await transport.append_entries(PEER, append(1), timeout=0.3)
    # The held request is answered now, while the next one is on its way: had the stream been
    # kept, this reply (match index 2) would be read as the next request's.
    follower.release.set()
    for prev in (5, 9):
        reply = await transport.append_entries(PEER, append(prev, 3), timeout=5)
        assert (reply.success, reply.match_index) == (True, prev + 3)


async def test_a_follower_without_the_stream_is_reached_by_unary_calls(
    follower: FakeFollower,
) -> None:
    async for transport, _ in serve(UnaryOnlyServicer(follower)):
        for prev in (0, 1, 2):
            reply = await transport.append_entries(PEER, append(prev), timeout=5)
            assert (reply.success, reply.match_index) == (True, prev + 1)
    assert follower.handled == [0, 1, 2]


async def test_a_follower_shutting_down_ends_its_streams(follower: FakeFollower) -> None:
    servicer = RaftServicer(cast(RaftNode, follower))
    async for transport, server in serve(servicer):
        await transport.append_entries(PEER, append(0), timeout=5)
        servicer.end_streams()
        # The leader sees the follower go, instead of the stream staying open until the server's
        # grace period runs out.
        with pytest.raises(PeerUnreachableError):
            await transport.append_entries(PEER, append(1), timeout=5)
        await asyncio.wait_for(server.stop(grace=60), timeout=30)
        assert follower.handled == [0]


# ---- real processes ------------------------------------------------------------------------


class Writer:
    """Clients writing distinct keys without pause; remembers every acknowledged write."""

    def __init__(self, client: Client, tasks: int = 4) -> None:
        self.client = client
        self.acknowledged: dict[str, str] = {}
        self._numbers = itertools.count()
        self._tasks = [asyncio.ensure_future(self._run()) for _ in range(tasks)]

    async def _run(self) -> None:
        while True:
            n = next(self._numbers)
            key, value = f"stream-{n}", f"value-{n}"
            try:
                await self.client.propose_mapping(key, value)
            except ClientError:
                continue  # not acknowledged: nothing to check for it
            self.acknowledged[key] = value

    async def more(self, count: int, what: str, timeout: float = 20) -> None:
        """Wait until `count` more writes than now are acknowledged."""
        target = len(self.acknowledged) + count

        async def enough() -> bool:
            return len(self.acknowledged) >= target

        await wait_until(enough, timeout, f"{count} more writes are acknowledged {what}")

    async def stop(self) -> dict[str, str]:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return dict(self.acknowledged)


async def test_an_append_to_a_follower_whose_connection_never_comes_up_ends_at_its_timeout(
    tmp_path: Any,
) -> None:
    """A peer that accepts TCP but never finishes the TLS handshake: the stream's first write waits
    for a call that never starts. Each append must still end at its timeout (once it waited
    forever, and the leader never sent that follower anything again)."""
    import make_certs
    from tls import TlsConfig

    make_certs.make_all(tmp_path, [1], "127.0.0.1")
    tls = TlsConfig.load(tmp_path / "node-1.pem", tmp_path / "node-1.key", tmp_path / "ca.pem")
    held: list[Any] = []
    silent = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    transport = GrpcTransport({PEER: f"127.0.0.1:{port}"}, tls=tls)
    request = raft_pb2.AppendEntriesRequest(term=1, requester_id=1)
    try:
        for _ in range(3):
            with pytest.raises(PeerUnreachableError):
                await asyncio.wait_for(transport.append_entries(PEER, request, timeout=0.05), 5)
        assert not asyncio.current_task().cancelling()  # type: ignore[union-attr]
    finally:
        await transport.close()
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()


async def test_a_follower_killed_mid_stream_is_replicated_to_again_after_restart(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(nodes=3)
    leader, _ = await leader_of(cluster)
    restarted, other = (n for n in cluster.node_ids if n != leader)
    async with cluster.client() as client:
        writer = Writer(client)
        try:
            await writer.more(30, "before the kill")
            # Writes are flowing, so the leader's stream to this follower has a request on it.
            cluster.kill_node(restarted)
            await writer.more(30, f"while {restarted} is down")
            cluster.start_node(restarted)
            # From now on a write commits only with the restarted follower's reply: the leader
            # must have opened a new stream to it and matched its replies to its requests.
            cluster.kill_node(other)
            await writer.more(30, f"by {leader} and the restarted {restarted} alone", timeout=30)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{log_tails(cluster)}") from None
        finally:
            expected = await writer.stop()

    async def holds_every_write() -> bool:
        async with cluster.probe() as probe:
            return not await probe.mismatches(restarted, expected)

    try:
        await wait_until(holds_every_write, 15, f"{restarted} serves all acknowledged writes")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{log_tails(cluster, [leader, restarted])}") from None
