"""The client library and CLI against scripted Cluster servers on real sockets: finding the
leader through redirects, riding out elections and dead nodes, giving up cleanly, exit codes, and
the membership commands."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

import cluster_client
from cluster_client import (
    CHANGE_BUSY_RETRIES,
    Client,
    ClusterUnavailableError,
    Member,
    MembershipBusyError,
    MembershipRefusedError,
    RequestRejectedError,
)
from cluster_config import ConfigError
from rpc import raft_pb2, raft_pb2_grpc

REPO = Path(__file__).resolve().parent.parent


class _OpAborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _OpContext:
    """Stands in for a call's context while one op of a Batch call is answered."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _OpAborted(code, details)


class FakeNode(raft_pb2_grpc.ClusterServicer):
    """A scripted node: it leads when `leader` is itself, otherwise it redirects to `leader`
    (by id, and by address unless `tell_address` is off). `aborts` are answered first, in order."""

    def __init__(self, node_id: int, address: str, server: grpc.aio.Server) -> None:
        self.node_id = node_id
        self.address = address
        self.server = server
        self.leader: FakeNode | None = None
        self.tell_address = True
        self.aborts: list[tuple[grpc.StatusCode, str]] = []
        self.store: dict[str, str] = {}
        self.calls: list[str] = []
        # Whether it offers Batch, and how many ops each Batch call carried.
        self.batching = True
        self.batch_calls: list[int] = []
        self.batch_refusals = 0
        # Whole Batch calls answered with these first, in order.
        self.batch_aborts: list[tuple[grpc.StatusCode, str]] = []
        # Membership: this node's configuration and its log index; whether an added node is a
        # voter by the time the reply is sent (if the request waits for that); how long a change
        # takes to answer; and the change requests received.
        self.config = raft_pb2.Configuration()
        self.config_index = 0
        self.promote = True
        self.change_delay = 0.0
        self.changes: list[raft_pb2.AddMemberRequest | raft_pb2.RemoveMemberRequest] = []

    async def Batch(
        self, request: raft_pb2.BatchRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.BatchResponse:
        """Each op answered by its own method, as a real node does; UNIMPLEMENTED, as the seed's
        nodes answer, unless `batching`."""
        if not self.batching:
            self.batch_refusals += 1
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        self.batch_calls.append(len(request.ops))
        if self.batch_aborts:
            code, message = self.batch_aborts.pop(0)
            await context.abort(code, message)
        methods = {
            "put": self.ProposeMapping,
            "put_many": self.ProposeMappings,
            "delete": self.DeleteKey,
            "get": self.GetValue,
        }

        async def answer(op: raft_pb2.BatchOp) -> raft_pb2.BatchResult:
            which = op.WhichOneof("op")
            assert which is not None
            try:
                reply = await methods[which](getattr(op, which), _OpContext())
            except _OpAborted as e:
                return raft_pb2.BatchResult(code=e.code.value[0], details=e.details)
            return raft_pb2.BatchResult(**{which: reply})

        results = [await answer(op) for op in request.ops]
        return raft_pb2.BatchResponse(results=results)

    async def _answer_abort(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.calls.append(method)
        if self.aborts:
            code, message = self.aborts.pop(0)
            await context.abort(code, message)

    async def ProposeMapping(
        self, request: raft_pb2.Mapping, context: grpc.aio.ServicerContext
    ) -> raft_pb2.ProposeMappingResponse:
        await self._answer_abort("ProposeMapping", context)
        if self.leader is self:
            self.store[request.key] = request.value
            return raft_pb2.ProposeMappingResponse(success=True)
        response = raft_pb2.ProposeMappingResponse(success=False)
        if self.leader is not None:
            response.current_leader = self.leader.node_id
            if self.tell_address:
                response.leader_address = self.leader.address
        return response

    async def GetValue(
        self, request: raft_pb2.Key, context: grpc.aio.ServicerContext
    ) -> raft_pb2.GetValueResponse:
        await self._answer_abort("GetValue", context)
        if request.key in self.store:
            return raft_pb2.GetValueResponse(key=request.key, value=self.store[request.key])
        return raft_pb2.GetValueResponse(key=request.key)

    async def GetLeader(
        self, request: raft_pb2.LeaderRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.LeaderResponse:
        await self._answer_abort("GetLeader", context)
        role = "leader" if self.leader is self else "follower"
        response = raft_pb2.LeaderResponse(node_id=self.node_id, role=role, term=3)
        if self.leader is not None:
            response.leader_id = self.leader.node_id
            if self.tell_address:
                response.leader_address = self.leader.address
        return response

    def _membership(self) -> raft_pb2.MembershipResponse:
        response = raft_pb2.MembershipResponse(
            success=self.leader is self,
            config=self.config,
            config_index=self.config_index,
            committed=True,
        )
        if self.leader is not None:
            response.current_leader = self.leader.node_id
            if self.tell_address:
                response.leader_address = self.leader.address
        return response

    async def ListMembers(
        self, request: raft_pb2.ListMembersRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.MembershipResponse:
        await self._answer_abort("ListMembers", context)
        response = self._membership()
        if request.allow_stale:
            response.success = True
        return response

    async def AddMember(
        self, request: raft_pb2.AddMemberRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.MembershipResponse:
        self.changes.append(request)
        await asyncio.sleep(self.change_delay)
        await self._answer_abort("AddMember", context)
        if self.leader is self:
            self.config.members.append(
                raft_pb2.Member(
                    id=request.id,
                    raft_address=request.raft_address,
                    client_address=request.client_address,
                    voter=request.wait_until_voter and self.promote,
                )
            )
            self.config_index += 1
        return self._membership()

    async def RemoveMember(
        self, request: raft_pb2.RemoveMemberRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.MembershipResponse:
        self.changes.append(request)
        await self._answer_abort("RemoveMember", context)
        if self.leader is self:
            kept = [m for m in self.config.members if m.id != request.id]
            del self.config.members[:]
            self.config.members.extend(kept)
            self.config.removed_ids.append(request.id)
            self.config_index += 1
        return self._membership()


def configure(node: FakeNode, *members: FakeNode, learners: tuple[int, ...] = ()) -> None:
    """Give `node` a configuration of `members` (voters, Raft address = client address with
    the port minus 1000) plus `learners` (ids, addresses made up)."""
    for member in members:
        host, port = member.address.rsplit(":", 1)
        node.config.members.append(
            raft_pb2.Member(
                id=member.node_id,
                raft_address=f"{host}:{int(port) - 1000}",
                client_address=member.address,
                voter=True,
            )
        )
    for learner in learners:
        node.config.members.append(
            raft_pb2.Member(
                id=learner,
                raft_address=f"10.0.0.{learner}:7000",
                client_address=f"10.0.0.{learner}:7001",
            )
        )


StartNode = Callable[[], Awaitable[FakeNode]]


# Every test runs against nodes that offer Batch (the Client batches its calls) and against nodes
# that do not (the seed's: the Client falls back to a call per request).
@pytest.fixture(params=["batch", "unary"])
def batching(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "batch")


@pytest.fixture
async def start_node(batching: bool) -> AsyncIterator[StartNode]:
    """Starts fake nodes on free ports (id = port until a test says otherwise); stops them all."""
    servers: list[grpc.aio.Server] = []

    async def start() -> FakeNode:
        server = grpc.aio.server()
        servers.append(server)
        port = server.add_insecure_port("127.0.0.1:0")
        node = FakeNode(port, f"127.0.0.1:{port}", server)
        node.batching = batching
        raft_pb2_grpc.add_ClusterServicer_to_server(node, server)
        await server.start()
        return node

    try:
        yield start
    finally:
        for server in servers:
            await server.stop(None)


def dead_address() -> str:
    """An address nothing listens on: a port the kernel just handed out and we gave back."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


def elect(leader: FakeNode, *nodes: FakeNode) -> None:
    for node in nodes:
        node.leader = leader


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while not condition():
        assert loop.time() < give_up, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_follows_a_redirect_by_leader_address_and_then_starts_with_the_leader(
    start_node: StartNode,
) -> None:
    follower, leader = await start_node(), await start_node()
    elect(leader, follower, leader)
    follower.store["k"] = "stale"
    # Only the follower is known: the leader can be found through the redirect alone.
    async with Client.from_endpoints([follower.address]) as client:
        await client.propose_mapping("k", "v1")
        assert leader.store == {"k": "v1"}
        assert client.known_leader == leader.address
        await client.propose_mapping("k", "v2")
        assert await client.get_value("k") == "v2"
    assert follower.calls == ["ProposeMapping"]
    assert leader.store == {"k": "v2"}


async def test_follows_a_redirect_by_leader_id_through_the_seed_port_scheme(
    start_node: StartNode,
) -> None:
    nodes = sorted([await start_node() for _ in range(3)], key=lambda n: n.node_id)
    # The seed's addressing: id = Raft port, client port = Raft port + number of nodes.
    for node in nodes:
        node.node_id -= len(nodes)
        node.tell_address = False
    first, middle, leader = nodes
    first.leader = leader
    leader.leader = leader
    async with Client([n.node_id for n in nodes]) as client:
        await client.propose_mapping("k", "v")
    assert leader.store == {"k": "v"}
    assert first.calls == ["ProposeMapping"]
    # Straight from the first node to the leader it named, not on to the next in the list.
    assert middle.calls == []


async def test_retries_while_no_leader_is_known_and_succeeds_once_one_is_elected(
    start_node: StartNode,
) -> None:
    nodes = [await start_node() for _ in range(3)]
    async with Client.from_endpoints([n.address for n in nodes]) as client:
        proposal = asyncio.create_task(client.propose_mapping("k", "v"))
        try:
            # Several full rounds without a leader, then an election.
            await wait_until(lambda: all(len(n.calls) >= 3 for n in nodes))
            assert not proposal.done()
            elect(nodes[1], *nodes)
            await asyncio.wait_for(proposal, 10)
        finally:
            proposal.cancel()
    assert nodes[1].store == {"k": "v"}
    assert client.known_leader == nodes[1].address


async def test_gives_up_at_the_deadline_saying_what_it_saw_without_a_tight_loop(
    start_node: StartNode,
) -> None:
    nodes = [await start_node() for _ in range(2)]
    loop = asyncio.get_running_loop()
    async with Client.from_endpoints([n.address for n in nodes], deadline=1.0) as client:
        started = loop.time()
        with pytest.raises(ClusterUnavailableError) as caught:
            await client.propose_mapping("k", "v")
        elapsed = loop.time() - started
    assert "knows no leader" in str(caught.value)
    assert elapsed >= 1.0
    # Backing off from 20 ms, doubling to 1 s, leaves room for about ten rounds in one second;
    # a loop without pauses would make thousands of calls.
    assert nodes[0].calls
    assert all(len(n.calls) <= 40 for n in nodes), [len(n.calls) for n in nodes]


async def test_skips_a_dead_endpoint(start_node: StartNode) -> None:
    alive = await start_node()
    elect(alive, alive)
    async with Client.from_endpoints([dead_address(), alive.address], deadline=5) as client:
        await client.propose_mapping("k", "v")
        assert await client.get_value("k") == "v"
        assert await client.leader() == (alive.node_id, alive.address)
    assert alive.calls == ["ProposeMapping", "GetValue", "GetLeader"]


async def test_moves_on_when_the_remembered_leader_goes_away(start_node: StartNode) -> None:
    old, new = await start_node(), await start_node()
    elect(old, old, new)
    async with Client.from_endpoints([old.address, new.address], deadline=5) as client:
        await client.propose_mapping("k", "v1")
        assert client.known_leader == old.address
        await old.server.stop(None)
        elect(new, new)
        await client.propose_mapping("k", "v2")
        assert client.known_leader == new.address
    assert new.store == {"k": "v2"}


async def test_an_unknown_commit_outcome_is_retried(start_node: StartNode) -> None:
    leader = await start_node()
    elect(leader, leader)
    leader.aborts.append((grpc.StatusCode.UNAVAILABLE, "lost leadership before commit"))
    async with Client.from_endpoints([leader.address], deadline=5) as client:
        await client.propose_mapping("k", "v")
    assert leader.calls == ["ProposeMapping", "ProposeMapping"]
    assert leader.store == {"k": "v"}


async def test_an_invalid_argument_is_raised_at_once_and_not_retried(
    start_node: StartNode,
) -> None:
    first, second = await start_node(), await start_node()
    elect(first, first, second)
    first.aborts.append((grpc.StatusCode.INVALID_ARGUMENT, "key must not be empty"))
    async with Client.from_endpoints([first.address, second.address]) as client:
        with pytest.raises(RequestRejectedError, match="^key must not be empty$"):
            await client.propose_mapping("", "v")
    assert first.calls == ["ProposeMapping"]
    assert second.calls == []


async def test_get_value_of_a_missing_key_gives_the_default(start_node: StartNode) -> None:
    node = await start_node()
    node.store["empty"] = ""
    async with Client.from_endpoints([node.address]) as client:
        assert await client.get_value("missing") == ""
        assert await client.get_value("missing", default=None) is None
        assert await client.get_value("empty", default=None) == ""


async def test_leader_is_confirmed_by_the_leader_a_follower_points_to(
    start_node: StartNode,
) -> None:
    follower, leader = await start_node(), await start_node()
    elect(leader, follower, leader)
    async with Client.from_endpoints([follower.address]) as client:
        assert await client.leader() == (leader.node_id, leader.address)
    assert leader.calls == ["GetLeader"]


def test_constructors_address_the_cluster_like_the_nodes_do(tmp_path: Path) -> None:
    assert Client.seed_scheme(12345, 3).addresses == [
        "127.0.0.1:12348",
        "127.0.0.1:12349",
        "127.0.0.1:12350",
    ]
    assert Client([12345, 12346]).addresses == ["127.0.0.1:12347", "127.0.0.1:12348"]
    cluster_file = tmp_path / "cluster.toml"
    cluster_file.write_text(
        '[[node]]\nid = 1\nraft = "10.0.0.1:7000"\nclient = "10.0.0.1:8000"\n'
        '[[node]]\nid = 2\nraft = "10.0.0.2:7000"\nclient = "10.0.0.2:8000"\n'
    )
    assert Client.from_cluster_file(cluster_file).addresses == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert Client.from_endpoints("a:1, b:2").addresses == ["a:1", "b:2"]
    with pytest.raises(ConfigError):
        Client.from_endpoints(["no-port"])
    with pytest.raises(ConfigError):
        Client.from_cluster_file(tmp_path / "missing.toml")


# --- the command line, run as a user runs it -----------------------------------------------


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO / "cluster_client.py"),
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def assert_one_line(stderr: str) -> None:
    assert "Traceback" not in stderr
    assert len(stderr.splitlines()) == 1, stderr


async def test_cli_put_get_and_leader(start_node: StartNode) -> None:
    node = await start_node()
    port = int(node.address.rsplit(":", 1)[1])
    node.node_id = port - 1
    elect(node, node)
    seed = ["--first-port", str(port - 1), "--nodes", "1", "--timeout", "5"]

    assert await run_cli(*seed, "put", "colour", "blue") == (0, "", "")
    assert node.store == {"colour": "blue"}
    assert await run_cli(*seed, "get", "colour") == (0, "blue\n", "")

    code, out, err = await run_cli(*seed, "get", "size")
    assert (code, out) == (1, "")
    assert_one_line(err)
    assert "'size' is not set" in err

    assert await run_cli("--endpoints", node.address, "leader") == (
        0,
        f"{port - 1} {node.address}\n",
        "",
    )


async def test_cli_rejected_request_exits_2_with_the_reason(start_node: StartNode) -> None:
    node = await start_node()
    elect(node, node)
    node.aborts.append((grpc.StatusCode.INVALID_ARGUMENT, "key is 2000 bytes"))
    code, out, err = await run_cli("--endpoints", node.address, "put", "k", "v")
    assert (code, out) == (2, "")
    assert_one_line(err)
    assert "key is 2000 bytes" in err


async def test_cli_without_a_cluster_exits_3_after_the_timeout() -> None:
    code, out, err = await run_cli("--endpoints", dead_address(), "--timeout", "0.5", "get", "k")
    assert (code, out) == (3, "")
    assert_one_line(err)
    assert "within 0.5 s" in err


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["--timeout", "0", "leader"],
        ["--endpoints", "a:1", "--cluster", "c.toml", "leader"],
        ["--cluster", "/nonexistent/cluster.toml", "leader"],
        ["--endpoints", "no-port", "leader"],
    ],
    ids=["no command", "unknown command", "zero timeout", "two forms", "no file", "bad address"],
)
async def test_cli_usage_errors_exit_2_with_one_line(args: list[str]) -> None:
    code, out, err = await run_cli(*args)
    assert (code, out) == (2, "")
    assert_one_line(err)


# --- sessions: exactly-once retries --------------------------------------------------------


class SessionNode(FakeNode):
    """A leader that offers sessions and records the session of every write it receives."""

    def __init__(self, node_id: int, address: str, server: grpc.aio.Server) -> None:
        super().__init__(node_id, address, server)
        self.next_client_id = 100
        self.sessions: list[tuple[str, int, int, int]] = []
        self.transfer_to: int | None = None

    def _record(self, method: str, session: raft_pb2.Session) -> None:
        self.sessions.append(
            (method, session.client_id, session.sequence, session.first_outstanding)
        )

    async def RegisterClient(
        self, request: raft_pb2.RegisterClientRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.RegisterClientResponse:
        # Scripted aborts are for the writes themselves, so registering never consumes one.
        self.calls.append("RegisterClient")
        self.next_client_id += 1
        return raft_pb2.RegisterClientResponse(success=True, client_id=self.next_client_id)

    async def ProposeMapping(
        self, request: raft_pb2.Mapping, context: grpc.aio.ServicerContext
    ) -> raft_pb2.ProposeMappingResponse:
        self._record("ProposeMapping", request.session)
        return await super().ProposeMapping(request, context)

    async def CompareAndSwap(
        self, request: raft_pb2.CompareAndSwapRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.CompareAndSwapResponse:
        self._record("CompareAndSwap", request.session)
        await self._answer_abort("CompareAndSwap", context)
        current = self.store.get(request.key)
        expected = request.expected_value if request.HasField("expected_value") else None
        response = raft_pb2.CompareAndSwapResponse(success=True, swapped=current == expected)
        if current == expected:
            current = self.store[request.key] = request.new_value
        if current is not None:
            response.current_value = current
        return response

    async def DeleteKey(
        self, request: raft_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.DeleteResponse:
        self._record("DeleteKey", request.session)
        await self._answer_abort("DeleteKey", context)
        existed = self.store.pop(request.key, None) is not None
        return raft_pb2.DeleteResponse(success=True, existed=existed)

    async def ProposeMappings(
        self, request: raft_pb2.MappingBatch, context: grpc.aio.ServicerContext
    ) -> raft_pb2.ProposeMappingResponse:
        self._record("ProposeMappings", request.session)
        await self._answer_abort("ProposeMappings", context)
        self.store.update((m.key, m.value) for m in request.mappings)
        return raft_pb2.ProposeMappingResponse(success=True)

    async def GetValue(
        self, request: raft_pb2.Key, context: grpc.aio.ServicerContext
    ) -> raft_pb2.GetValueResponse:
        self.calls.append("stale" if request.allow_stale else "linearizable")
        return await super().GetValue(request, context)

    async def TransferLeadership(
        self, request: raft_pb2.TransferLeadershipRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.TransferLeadershipResponse:
        await self._answer_abort("TransferLeadership", context)
        self.transfer_to = request.target_id
        return raft_pb2.TransferLeadershipResponse(
            success=True, current_leader=request.target_id or 7, leader_address="elsewhere:1"
        )


@pytest.fixture
async def session_node(batching: bool) -> AsyncIterator[SessionNode]:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    node = SessionNode(port, f"127.0.0.1:{port}", server)
    node.batching = batching
    node.leader = node
    raft_pb2_grpc.add_ClusterServicer_to_server(node, server)
    await server.start()
    try:
        yield node
    finally:
        await server.stop(None)


async def test_a_retried_write_resends_the_same_client_id_and_sequence(
    session_node: SessionNode,
) -> None:
    session_node.aborts.append((grpc.StatusCode.UNAVAILABLE, "entry 9 did not commit in time"))
    async with Client.from_endpoints([session_node.address], deadline=5) as client:
        assert await client.compare_and_swap("k", None, "v") == (True, "v")
        assert await client.delete("k") is True
    assert session_node.calls.count("RegisterClient") == 1
    assert session_node.sessions == [
        ("CompareAndSwap", 101, 1, 1),
        ("CompareAndSwap", 101, 1, 1),
        ("DeleteKey", 101, 2, 2),
    ]


async def test_concurrent_tasks_share_one_session_with_distinct_sequence_numbers(
    session_node: SessionNode,
) -> None:
    async with Client.from_endpoints([session_node.address]) as client:
        await asyncio.gather(
            *(client.propose_mapping(f"k{i}", "v") for i in range(8)),
            client.propose_mappings({"a": "1", "b": "2"}),
        )
        assert client.client_id == 101
    assert session_node.calls.count("RegisterClient") == 1
    sequences = sorted(s[2] for s in session_node.sessions)
    assert sequences == list(range(1, 10))
    # The lowest reply still awaited never lies above a request's own number.
    assert all(0 < first <= sequence for _, _, sequence, first in session_node.sessions)


async def test_an_expired_session_raises_and_the_next_write_registers_again(
    session_node: SessionNode,
) -> None:
    from cluster_client import SessionExpiredError

    async with Client.from_endpoints([session_node.address]) as client:
        await client.propose_mapping("a", "1")
        session_node.aborts.append(
            (grpc.StatusCode.FAILED_PRECONDITION, "client session 101 is unknown")
        )
        with pytest.raises(SessionExpiredError, match="session 101 is unknown"):
            await client.delete("a")
        await client.propose_mapping("b", "2")
        assert client.client_id == 102
    assert [s[:2] for s in session_node.sessions] == [
        ("ProposeMapping", 101),
        ("DeleteKey", 101),
        ("ProposeMapping", 102),
    ]


async def test_a_cluster_without_sessions_gets_the_seed_s_writes(start_node: StartNode) -> None:
    # FakeNode has no RegisterClient, as the seed's nodes had none.
    node = await start_node()
    elect(node, node)
    async with Client.from_endpoints([node.address], deadline=5) as client:
        await client.propose_mapping("k", "v")
        assert client.client_id is None
    assert node.store == {"k": "v"}


async def test_stale_reads_and_reads_from_one_chosen_node(
    start_node: StartNode, session_node: SessionNode
) -> None:
    other = await start_node()
    session_node.store["k"] = "v"
    async with Client.from_endpoints([other.address, session_node.address], deadline=1) as c:
        assert await c.get_value("k", stale=True, node=session_node.address) == "v"
        assert await c.get_value("k", node=session_node.address) == "v"
        # Only the chosen node is asked, however long it keeps failing.
        other.aborts.extend([(grpc.StatusCode.UNAVAILABLE, "no leader known")] * 1000)
        with pytest.raises(ClusterUnavailableError, match="could not get 'k'"):
            await c.get_value("k", node=other.address)
    assert [c for c in session_node.calls if c != "GetValue"] == ["stale", "linearizable"]
    assert set(other.calls) == {"GetValue"}


async def test_cli_transfer_leader_cas_absent_and_delete(session_node: SessionNode) -> None:
    where = ["--endpoints", session_node.address, "--timeout", "5"]
    assert await run_cli(*where, "transfer-leader", "3") == (0, "3\n", "")
    assert session_node.transfer_to == 3
    assert await run_cli(*where, "cas", "--absent", "k", "v") == (0, "v\n", "")
    code, out, err = await run_cli(*where, "cas", "k", "other", "w")
    assert (code, out) == (4, "")
    assert_one_line(err)
    assert "'v'" in err
    assert await run_cli(*where, "delete", "k") == (0, "", "")
    code, out, err = await run_cli(*where, "delete", "k")
    assert (code, out) == (1, "")
    assert_one_line(err)
    assert await run_cli(*where, "get", "--stale", "k") == (
        1,
        "",
        "cluster_client.py: key 'k' is not set\n",
    )
    assert session_node.calls[-2:] == ["stale", "GetValue"]


# --- membership ----------------------------------------------------------------------------


def raft_address_of(node: FakeNode) -> str:
    host, port = node.address.rsplit(":", 1)
    return f"{host}:{int(port) - 1000}"


async def test_members_come_from_the_leader_through_a_redirect(start_node: StartNode) -> None:
    follower, leader = await start_node(), await start_node()
    elect(leader, follower, leader)
    configure(leader, follower, leader, learners=(6,))
    leader.config.removed_ids.append(4)
    leader.config_index = 17
    async with Client.from_endpoints([follower.address]) as client:
        members = await client.members()
        assert client.known_leader == leader.address
    assert members.members == [
        Member(follower.node_id, raft_address_of(follower), follower.address, True),
        Member(leader.node_id, raft_address_of(leader), leader.address, True),
        Member(6, "10.0.0.6:7000", "10.0.0.6:7001", False),
    ]
    assert [m.id for m in members.voters] == [follower.node_id, leader.node_id]
    assert [m.id for m in members.learners] == [6]
    assert members.member(6) == Member(6, "10.0.0.6:7000", "10.0.0.6:7001", False)
    assert members.member(5) is None
    assert (members.removed, members.config_index, members.committed) == ([4], 17, True)
    assert members.leader_id == leader.node_id
    assert follower.calls == ["ListMembers"]


async def test_stale_members_are_the_first_node_s_own_view(start_node: StartNode) -> None:
    follower, leader = await start_node(), await start_node()
    elect(leader, follower, leader)
    configure(leader, follower, leader, learners=(6,))
    leader.config_index = 17
    # The follower has not heard of the learner yet.
    configure(follower, follower, leader)
    follower.config_index = 12
    async with Client.from_endpoints([follower.address, leader.address]) as client:
        members = await client.members(stale=True)
    assert [m.id for m in members.members] == [follower.node_id, leader.node_id]
    assert (members.config_index, members.leader_id) == (12, leader.node_id)
    assert leader.calls == []


async def test_members_listed_can_be_found_by_id_in_a_later_redirect(
    start_node: StartNode,
) -> None:
    follower, leader = await start_node(), await start_node()
    elect(leader, follower, leader)
    follower.tell_address = False
    configure(follower, follower, leader)
    async with Client.from_endpoints([follower.address], deadline=2) as client:
        await client.members(stale=True)
        # The follower names the leader by id only: its address came from the member list.
        await client.propose_mapping("k", "v")
    assert leader.store == {"k": "v"}


async def test_add_and_remove_member_send_the_change_to_the_leader_and_return_the_result(
    start_node: StartNode,
) -> None:
    follower, leader = await start_node(), await start_node()
    elect(leader, follower, leader)
    configure(leader, follower, leader)
    leader.config_index = 5
    async with Client.from_endpoints([follower.address]) as client:
        voter = await client.add_member(6, "10.0.0.6:7000", "10.0.0.6:7001")
        leader.promote = False
        learner = await client.add_member(
            7, "10.0.0.7:7000", "10.0.0.7:7001", wait_until_voter=False
        )
        removed = await client.remove_member(follower.node_id)
    assert voter.member(6) == Member(6, "10.0.0.6:7000", "10.0.0.6:7001", True)
    assert voter.config_index == 6
    assert learner.member(7) == Member(7, "10.0.0.7:7000", "10.0.0.7:7001", False)
    assert removed.member(follower.node_id) is None
    assert (removed.removed, removed.config_index) == ([follower.node_id], 8)
    assert leader.changes == [
        raft_pb2.AddMemberRequest(
            id=6,
            raft_address="10.0.0.6:7000",
            client_address="10.0.0.6:7001",
            wait_until_voter=True,
        ),
        raft_pb2.AddMemberRequest(
            id=7, raft_address="10.0.0.7:7000", client_address="10.0.0.7:7001"
        ),
        raft_pb2.RemoveMemberRequest(id=follower.node_id),
    ]
    # Only the first change needed the redirect.
    assert len(follower.changes) == 1


async def test_a_change_in_progress_is_asked_again_of_the_leader_until_it_goes_through(
    start_node: StartNode,
) -> None:
    leader, other = await start_node(), await start_node()
    elect(leader, leader, other)
    leader.aborts.extend([(grpc.StatusCode.ABORTED, "a change at index 9 is uncommitted")] * 2)
    async with Client.from_endpoints([leader.address, other.address]) as client:
        removed = await client.remove_member(3)
    assert removed.removed == [3]
    assert leader.calls == ["RemoveMember"] * 3
    assert other.calls == []


async def test_a_change_still_in_progress_after_a_few_tries_raises_busy(
    start_node: StartNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster_client, "CHANGE_BUSY_BACKOFF", 0.001)
    leader = await start_node()
    elect(leader, leader)
    leader.aborts.extend([(grpc.StatusCode.ABORTED, "a change at index 9 is uncommitted")] * 100)
    async with Client.from_endpoints([leader.address]) as client:
        with pytest.raises(MembershipBusyError, match="index 9 is uncommitted") as caught:
            await client.add_member(6, "10.0.0.6:7000", "10.0.0.6:7001")
    # Nothing was changed: the same kind of error as an invalid request.
    assert isinstance(caught.value, RequestRejectedError)
    assert leader.calls == ["AddMember"] * (CHANGE_BUSY_RETRIES + 1)


async def test_a_refused_change_raises_at_once_and_is_not_retried(start_node: StartNode) -> None:
    leader, other = await start_node(), await start_node()
    elect(leader, leader, other)
    leader.aborts.append((grpc.StatusCode.FAILED_PRECONDITION, "id 6 was removed"))
    async with Client.from_endpoints([leader.address, other.address]) as client:
        with pytest.raises(MembershipRefusedError, match="^id 6 was removed$"):
            await client.add_member(6, "10.0.0.6:7000", "10.0.0.6:7001")
    assert leader.calls == ["AddMember"]
    assert other.calls == []


async def test_an_unknown_change_outcome_is_retried(start_node: StartNode) -> None:
    leader = await start_node()
    elect(leader, leader)
    leader.aborts.append((grpc.StatusCode.UNAVAILABLE, "lost leadership before it committed"))
    async with Client.from_endpoints([leader.address], deadline=5) as client:
        added = await client.add_member(6, "10.0.0.6:7000", "10.0.0.6:7001")
    assert leader.calls == ["AddMember", "AddMember"]
    assert added.member(6) is not None


async def test_add_member_waits_past_the_client_deadline_up_to_its_own_timeout(
    start_node: StartNode,
) -> None:
    leader = await start_node()
    elect(leader, leader)
    # Catching up takes longer than the client's deadline for other calls.
    leader.change_delay = 1.0
    async with Client.from_endpoints([leader.address], deadline=0.3) as client:
        added = await client.add_member(6, "10.0.0.6:7000", "10.0.0.6:7001")
        assert added.member(6) is not None
        with pytest.raises(ClusterUnavailableError, match="could not add member 7 within 0.3 s"):
            await client.add_member(7, "10.0.0.7:7000", "10.0.0.7:7001", timeout=0.3)


async def test_cli_member_list_prints_one_line_per_member_and_marks_the_leader(
    start_node: StartNode,
) -> None:
    leader = await start_node()
    elect(leader, leader)
    leader.node_id = 2
    configure(leader, leader, learners=(16,))
    leader.config.removed_ids.append(3)
    leader.config_index = 40
    where = ["--endpoints", leader.address, "--timeout", "5"]
    code, out, err = await run_cli(*where, "member", "list")
    assert (code, err) == (0, "")
    raft = raft_address_of(leader)
    assert out.splitlines() == [
        f"2   voter    raft {raft}  client {leader.address}  (leader)",
        f"16  learner  raft {'10.0.0.16:7000':<{len(raft)}}  client 10.0.0.16:7001",
    ]
    code, out, err = await run_cli(*where, "member", "list", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "members": [
            {"id": 2, "voter": True, "raft_address": raft, "client_address": leader.address},
            {
                "id": 16,
                "voter": False,
                "raft_address": "10.0.0.16:7000",
                "client_address": "10.0.0.16:7001",
            },
        ],
        "removed": [3],
        "config_index": 40,
        "committed": True,
        "leader": 2,
    }


async def test_cli_member_add_and_remove_say_what_happened(start_node: StartNode) -> None:
    leader = await start_node()
    elect(leader, leader)
    configure(leader, leader)
    leader.config_index = 122
    where = ["--endpoints", leader.address, "--timeout", "5"]
    assert await run_cli(*where, "member", "add", "6", "127.0.0.1:12360", "127.0.0.1:12361") == (
        0,
        "added 6 (127.0.0.1:12360, client 127.0.0.1:12361) as a learner; "
        "promoted to voter at index 123\n",
        "",
    )
    leader.promote = False
    assert await run_cli(*where, "member", "add", "7", "h7:1", "h7:2") == (
        0,
        "added 7 (h7:1, client h7:2) as a learner; still catching up "
        "(promoted to voter once it has)\n",
        "",
    )
    assert await run_cli(*where, "member", "add", "--no-wait", "8", "h8:1", "h8:2") == (
        0,
        "added 8 (h8:1, client h8:2) as a learner at index 125; "
        "promoted to voter once it has caught up\n",
        "",
    )
    assert [(c.id, c.wait_until_voter) for c in leader.changes] == [  # type: ignore[union-attr]
        (6, True),
        (7, True),
        (8, False),
    ]
    assert await run_cli(*where, "member", "remove", "7") == (0, "removed 7 at index 126\n", "")


@pytest.mark.parametrize(
    "aborts, exit_code",
    [
        ([(grpc.StatusCode.FAILED_PRECONDITION, "3 is the only voter; a cluster needs one")], 1),
        ([(grpc.StatusCode.ABORTED, "a change at index 9 is uncommitted")] * 100, 1),
        ([(grpc.StatusCode.INVALID_ARGUMENT, "node id must be a positive integer")], 2),
    ],
    ids=["refused", "change in progress", "invalid"],
)
async def test_cli_member_change_refused_exits_1_and_rejected_exits_2(
    start_node: StartNode, aborts: list[tuple[grpc.StatusCode, str]], exit_code: int
) -> None:
    leader = await start_node()
    elect(leader, leader)
    leader.aborts.extend(aborts)
    code, out, err = await run_cli("--endpoints", leader.address, "member", "remove", "3")
    assert (code, out) == (exit_code, "")
    assert_one_line(err)
    assert aborts[0][1] in err
    # Nothing was applied by the fake leader: every answer was a refusal.
    assert leader.config_index == 0


async def test_cli_member_list_without_a_cluster_exits_3() -> None:
    code, out, err = await run_cli(
        "--endpoints", dead_address(), "--timeout", "0.5", "member", "list"
    )
    assert (code, out) == (3, "")
    assert_one_line(err)
    assert "could not list the members within 0.5 s" in err


@pytest.mark.parametrize(
    "args",
    [
        ["member"],
        ["member", "promote", "3"],
        ["member", "list", "extra"],
        ["member", "add", "6", "h:1"],
        ["member", "add", "six", "h:1", "h:2"],
        ["member", "add", "6", "no-port", "h:2"],
        ["member", "add", "6", "h:1", "h:1"],
        ["member", "add", "0", "h:1", "h:2"],
        ["member", "remove", "0"],
        ["member", "remove", str(2**64)],
        ["transfer-leader", str(2**64)],
    ],
    ids=[
        "no action",
        "unknown action",
        "extra operand",
        "missing address",
        "id not a number",
        "bad address",
        "same addresses",
        "id 0",
        "remove id 0",
        "remove id too big",
        "transfer to an id too big",
    ],
)
async def test_cli_member_usage_errors_exit_2_with_one_line(args: list[str]) -> None:
    code, out, err = await run_cli("--endpoints", dead_address(), *args)
    assert (code, out) == (2, "")
    assert_one_line(err)


async def test_sixty_four_concurrent_writers_cost_the_leader_a_few_calls(
    session_node: SessionNode, batching: bool
) -> None:
    async with Client.from_endpoints([session_node.address]) as client:
        await asyncio.gather(*(client.propose_mapping(f"k{i}", str(i)) for i in range(64)))
        await asyncio.gather(*(client.delete(f"k{i}") for i in range(0, 64, 2)))
        values = await asyncio.gather(*(client.get_value(f"k{i}", None) for i in range(64)))
    assert values == [None if i % 2 == 0 else str(i) for i in range(64)]
    # Every write kept its own place in the session, batched or not.
    assert sorted(s[2] for s in session_node.sessions) == list(range(1, 64 + 32 + 1))
    if batching:
        # The writers that started together travel together: the first write of all registers
        # the session, which the others wait for, so the puts take at most a few calls.
        assert sum(session_node.batch_calls) == 64 + 32 + 64
        assert len(session_node.batch_calls) <= 6, session_node.batch_calls
        assert session_node.calls.count("ProposeMapping") == 64
    else:
        # The seed's nodes: asked once whether they take batches, then call by call.
        assert session_node.batch_refusals == 1
        assert session_node.batch_calls == []
        assert session_node.calls.count("ProposeMapping") == 64


@pytest.mark.parametrize("batching", [True], ids=["batch"])
async def test_a_batch_call_that_fails_whole_is_retried_op_by_op_with_the_same_sequences(
    session_node: SessionNode,
) -> None:
    session_node.batch_aborts.append((grpc.StatusCode.UNAVAILABLE, "connection reset"))
    async with Client.from_endpoints([session_node.address], deadline=5) as client:
        await asyncio.gather(*(client.propose_mapping(f"k{i}", "v") for i in range(4)))
    # The first call failed as a whole (nothing applied); each op was retried after its own
    # backoff, carrying the sequence number it had.
    assert session_node.batch_calls[0] == 4
    assert sum(session_node.batch_calls[1:]) == 4
    assert sorted(s[2] for s in session_node.sessions) == [1, 2, 3, 4]
    assert session_node.store == {f"k{i}": "v" for i in range(4)}


async def test_one_op_refused_in_a_batch_raises_for_its_caller_alone(
    session_node: SessionNode,
) -> None:
    async with Client.from_endpoints([session_node.address], deadline=5) as client:
        await client.propose_mapping("warm", "up")  # registers the session first
        session_node.aborts.append((grpc.StatusCode.INVALID_ARGUMENT, "value too large"))
        outcomes = await asyncio.gather(
            client.propose_mapping("a", "1"),
            client.propose_mapping("b", "2"),
            return_exceptions=True,
        )
    assert isinstance(outcomes[0], RequestRejectedError)
    assert "value too large" in str(outcomes[0])
    assert not isinstance(outcomes[1], BaseException)
    assert session_node.store == {"warm": "up", "b": "2"}


async def test_a_cancelled_writer_leaves_the_others_of_its_batch_alone(
    session_node: SessionNode,
) -> None:
    async with Client.from_endpoints([session_node.address], deadline=5) as client:
        await client.propose_mapping("warm", "up")
        doomed = asyncio.ensure_future(client.propose_mapping("a", "1"))
        kept = [asyncio.ensure_future(client.propose_mapping(f"k{i}", "v")) for i in range(3)]
        await asyncio.sleep(0)
        doomed.cancel()
        await asyncio.gather(*kept)
        assert doomed.cancelled()
    assert all(session_node.store[f"k{i}"] == "v" for i in range(3))
