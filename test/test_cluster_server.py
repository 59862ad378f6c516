"""The Cluster service as a client sees it over a real gRPC connection: what it accepts, the
status codes it answers with, and how it reports redirects, missing keys and the leader."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest

from cluster_server import MAX_KEY_BYTES, MAX_VALUE_BYTES, ClusterServicer
from raft_node import CommitUnknownError, NotLeaderError
from rpc import raft_pb2, raft_pb2_grpc


@dataclass
class FakeNode:
    """Stands in for a RaftNode: a dict store, a scripted refusal, and a fixed view of the leader."""

    node_id: int = 12346
    role: str = "follower"
    current_term: int = 4
    known_leader: tuple[int | None, str | None] = (None, None)
    refusal: Exception | None = None
    store: dict[str, str] = field(default_factory=dict)
    proposals: list[tuple[str, str]] = field(default_factory=list)

    def leader(self) -> tuple[int | None, str | None]:
        return self.known_leader

    async def propose_mapping(self, key: str, value: str) -> None:
        self.proposals.append((key, value))
        if self.refusal is not None:
            raise self.refusal
        self.store[key] = value

    def get_value(self, key: str) -> str | None:
        return self.store.get(key)


@dataclass
class Served:
    node: FakeNode
    stub: raft_pb2_grpc.ClusterStub


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    node = FakeNode()
    server = grpc.aio.server()
    try:
        raft_pb2_grpc.add_ClusterServicer_to_server(ClusterServicer(node), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield Served(node, raft_pb2_grpc.ClusterStub(channel))
        finally:
            await channel.close()
    finally:
        await server.stop(None)


async def propose(served: Served, key: str, value: str) -> raft_pb2.ProposeMappingResponse:
    response: raft_pb2.ProposeMappingResponse = await served.stub.ProposeMapping(
        raft_pb2.Mapping(key=key, value=value), timeout=5
    )
    return response


async def get(served: Served, key: str) -> raft_pb2.GetValueResponse:
    response: raft_pb2.GetValueResponse = await served.stub.GetValue(
        raft_pb2.Key(key=key), timeout=5
    )
    return response


async def test_a_committed_proposal_answers_success_and_reaches_the_node(served: Served) -> None:
    response = await propose(served, "colour", "blue")
    assert response.success
    assert served.node.proposals == [("colour", "blue")]


@pytest.mark.parametrize(
    "key, value, complaint",
    [
        ("", "v", "key must not be empty"),
        ("k" * (MAX_KEY_BYTES + 1), "v", "key is 1025 bytes"),
        # 513 characters, but 1026 bytes: the limit counts UTF-8 bytes.
        ("é" * 513, "v", "key is 1026 bytes"),
        ("k", "v" * (MAX_VALUE_BYTES + 1), "value is 1048577 bytes"),
        ("k", "€" * (MAX_VALUE_BYTES // 3 + 1), "value is 1048578 bytes"),
    ],
    ids=["empty key", "long key", "long key in bytes", "long value", "long value in bytes"],
)
async def test_an_invalid_proposal_is_invalid_argument_and_never_reaches_the_node(
    served: Served, key: str, value: str, complaint: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await propose(served, key, value)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert complaint in caught.value.details()
    assert served.node.proposals == []


async def test_a_key_and_value_exactly_at_the_limits_are_accepted(served: Served) -> None:
    key = "é" * (MAX_KEY_BYTES // 2)
    value = "v" * MAX_VALUE_BYTES
    assert (await propose(served, key, value)).success
    assert served.node.store[key] == value


async def test_a_follower_that_knows_the_leader_redirects_with_its_id_and_address(
    served: Served,
) -> None:
    served.node.refusal = NotLeaderError(12345, "127.0.0.1:12350")
    response = await propose(served, "k", "v")
    assert not response.success
    assert response.HasField("current_leader")
    assert response.current_leader == 12345
    assert response.leader_address == "127.0.0.1:12350"


async def test_a_follower_that_knows_no_leader_leaves_the_redirect_fields_unset(
    served: Served,
) -> None:
    served.node.refusal = NotLeaderError(None, None)
    response = await propose(served, "k", "v")
    assert not response.success
    assert not response.HasField("current_leader")
    assert response.leader_address == ""


async def test_a_redirect_carries_the_leader_id_even_without_its_address(served: Served) -> None:
    served.node.refusal = NotLeaderError(12347, None)
    response = await propose(served, "k", "v")
    assert not response.success
    assert response.current_leader == 12347
    assert response.leader_address == ""


async def test_an_unknown_commit_outcome_is_unavailable_with_the_node_s_reason(
    served: Served,
) -> None:
    served.node.refusal = CommitUnknownError("lost leadership before the entry committed")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await propose(served, "k", "v")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "lost leadership before the entry committed"


async def test_get_value_tells_a_missing_key_from_an_empty_value(served: Served) -> None:
    served.node.store.update({"present": "here", "empty": ""})
    present = await get(served, "present")
    assert (present.key, present.HasField("value"), present.value) == ("present", True, "here")
    empty = await get(served, "empty")
    assert (empty.key, empty.HasField("value"), empty.value) == ("empty", True, "")
    missing = await get(served, "missing")
    assert (missing.key, missing.HasField("value")) == ("missing", False)


@pytest.mark.parametrize("key", ["", "k" * (MAX_KEY_BYTES + 1)], ids=["empty", "too long"])
async def test_get_value_with_an_invalid_key_is_invalid_argument(served: Served, key: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(served, key)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "key" in caught.value.details()


async def test_get_leader_reports_the_node_s_view(served: Served) -> None:
    served.node.known_leader = (12345, "127.0.0.1:12350")
    response: raft_pb2.LeaderResponse = await served.stub.GetLeader(
        raft_pb2.LeaderRequest(), timeout=5
    )
    assert (response.node_id, response.role, response.term) == (12346, "follower", 4)
    assert response.HasField("leader_id")
    assert (response.leader_id, response.leader_address) == (12345, "127.0.0.1:12350")


async def test_get_leader_without_a_known_leader_leaves_it_unset(served: Served) -> None:
    served.node.role = "candidate"
    served.node.current_term = 9
    response: raft_pb2.LeaderResponse = await served.stub.GetLeader(
        raft_pb2.LeaderRequest(), timeout=5
    )
    assert (response.node_id, response.role, response.term) == (12346, "candidate", 9)
    assert not response.HasField("leader_id")
    assert response.leader_address == ""
