"""The Cluster service as a client sees it over a real gRPC connection: what it accepts, the
status codes it answers with, and how it reports redirects, missing keys, the leader and the
cluster's members."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import pytest

from cluster_batch import MAX_CALL_OPS
from cluster_config import NodeAddress
from cluster_requests import (
    MAX_BATCH_BYTES,
    MAX_BATCH_MAPPINGS,
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
)
from cluster_server import ClusterServicer
from membership import ChangeInProgressError, Membership, MembershipError
from node_events import EventNarrator
from node_status import NodeStatus, PeerStatus
from raft_node import CommitUnknownError, NotLeaderError, OverloadedError, UnavailableError
from rpc import raft_pb2, raft_pb2_grpc
from state_machine import (
    ApplyResult,
    CasResult,
    DeleteResult,
    KeyValueStateMachine,
    PutResult,
    SessionExpired,
)


def three_voters() -> Membership:
    return Membership(
        {i: NodeAddress(i, f"10.0.0.{i}:7000", f"10.0.0.{i}:7001") for i in (1, 2, 3)}
    )


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
    commands: list[raft_pb2.Command] = field(default_factory=list)
    # How many entries each propose_entries call (a Batch call's writes) appended together.
    entry_batches: list[int] = field(default_factory=list)
    # What applying any command returns instead of its real result (e.g. SessionExpired).
    result_override: ApplyResult = None
    read_refusal: Exception | None = None
    linearizable_reads: int = 0
    # Membership: the latest configuration (with its index and whether committed), what the
    # membership calls raise instead of answering, and the calls that reached the node.
    config: tuple[Membership, int, bool] = field(default_factory=lambda: (three_voters(), 0, True))
    member_refusal: Exception | None = None
    member_calls: list[tuple[object, ...]] = field(default_factory=list)
    # The event stream is tested against real nodes (test_node_events.py).
    feed: Any = None

    def leader(self) -> tuple[int | None, str | None]:
        return self.known_leader

    @property
    def narrate(self) -> EventNarrator:
        return EventNarrator(cast(Any, self))

    @property
    def state_machine(self) -> KeyValueStateMachine:
        """The store as a real state machine (a fresh one each time: the fake applies nothing)."""
        machine = KeyValueStateMachine()
        for index, (key, value) in enumerate(self.store.items(), 1):
            machine.apply(
                raft_pb2.LogEntry(
                    index=index, kind=raft_pb2.ENTRY_KIND_MAPPING, key=key, value=value
                )
            )
        return machine

    @property
    def reads(self) -> FakeNode:
        return self

    @property
    def is_leader(self) -> bool:
        return self.role == "leader"

    # Lease calls are tested against real nodes (test_leases.py).
    leadership: Any = None

    async def leader_query(self, query: Any) -> Any:
        return query(self.state_machine)

    async def linearizable(self, query: Any, what: str) -> Any:
        self.linearizable_reads += 1
        if self.read_refusal is not None:
            raise self.read_refusal
        return query(self.state_machine)

    async def propose_mapping(
        self, key: str, value: str, session: raft_pb2.Session | None = None
    ) -> int:
        self.proposals.append((key, value))
        if self.refusal is not None:
            raise self.refusal
        self.store[key] = value
        return len(self.proposals)

    async def propose(self, command: raft_pb2.Command) -> ApplyResult:
        self.commands.append(command)
        if self.refusal is not None:
            raise self.refusal
        if self.result_override is not None:
            return self.result_override
        op = command.WhichOneof("op")
        if op == "put":
            self.store.update((m.key, m.value) for m in command.put.mappings)
            return PutResult(len(self.commands))
        if op == "delete":
            return DeleteResult(self.store.pop(command.delete.key, None) is not None)
        if op == "register_client":
            return 77
        cas = command.compare_and_swap
        expected = cas.expected_value if cas.HasField("expected_value") else None
        current = self.store.get(cas.key)
        if current == expected:
            self.store[cas.key] = cas.new_value
            return CasResult(True, cas.new_value)
        return CasResult(False, current)

    async def propose_entries(
        self, entries: list[raft_pb2.LogEntry]
    ) -> list[ApplyResult | Exception]:
        self.entry_batches.append(len(entries))
        if isinstance(self.refusal, (NotLeaderError, OverloadedError)):
            raise self.refusal
        outcomes: list[ApplyResult | Exception] = []
        for entry in entries:
            try:
                if entry.kind == raft_pb2.ENTRY_KIND_MAPPING:
                    await self.propose_mapping(entry.key, entry.value)
                    outcomes.append(None)
                else:
                    outcomes.append(await self.propose(entry.command))
            except Exception as e:
                outcomes.append(e)
        return outcomes

    def get_value(self, key: str) -> str | None:
        return self.store.get(key)

    async def transfer_leadership(self, target_id: int | None = None) -> int:
        raise NotLeaderError(*self.known_leader)

    async def linearizable_read(self, key: str) -> str | None:
        self.linearizable_reads += 1
        if self.read_refusal is not None:
            raise self.read_refusal
        return self.store.get(key)

    def membership(self) -> tuple[Membership, int, bool]:
        return self.config

    async def list_members(self) -> tuple[Membership, int, bool]:
        self.member_calls.append(("list",))
        if self.member_refusal is not None:
            raise self.member_refusal
        return self.config

    async def add_member(
        self, node: NodeAddress, wait_until_voter: bool
    ) -> tuple[Membership, int, bool]:
        self.member_calls.append(("add", node, wait_until_voter))
        if self.member_refusal is not None:
            raise self.member_refusal
        membership, index, _ = self.config
        membership = membership.with_learner(node)
        if wait_until_voter:
            membership = membership.with_voter(node.id)
        self.config = (membership, index + 1, True)
        return self.config

    async def remove_member(self, node_id: int) -> tuple[Membership, int, bool]:
        self.member_calls.append(("remove", node_id))
        if self.member_refusal is not None:
            raise self.member_refusal
        membership, index, _ = self.config
        self.config = (membership.without(node_id), index + 1, True)
        return self.config

    def status(self) -> NodeStatus:
        membership, index, _ = self.config
        leader_id, _ = self.known_leader
        leading = self.role == "leader"
        return NodeStatus(
            node_id=self.node_id,
            raft_address="10.0.0.1:7000",
            client_address="10.0.0.1:7001",
            role=self.role,
            term=self.current_term,
            leader_id=leader_id,
            commit_index=40,
            applied_index=39,
            last_log_index=42,
            snapshot_index=10,
            voter=True,
            learner=False,
            leader_contact=None if leading or leader_id is None else 0.05,
            config=membership,
            config_index=index,
            serving=leader_id is not None,
            peers=(
                (PeerStatus(2, True, 42, 0, 0.01), PeerStatus(3, True, 30, 12, None))
                if leading
                else ()
            ),
        )


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


# ---- the operations added for linearizable, exactly-once use ----------------------------------


def session(client_id: int = 7, sequence: int = 1) -> raft_pb2.Session:
    return raft_pb2.Session(client_id=client_id, sequence=sequence, first_outstanding=sequence)


async def test_delete_reports_whether_the_key_existed(served: Served) -> None:
    served.node.store["k"] = "v"
    first = await served.stub.DeleteKey(raft_pb2.DeleteRequest(key="k"), timeout=5)
    assert (first.success, first.existed) == (True, True)
    again = await served.stub.DeleteKey(raft_pb2.DeleteRequest(key="k"), timeout=5)
    assert (again.success, again.existed) == (True, False)


async def test_compare_and_swap_reports_whether_it_swapped_and_the_value_after(
    served: Served,
) -> None:
    stub = served.stub
    absent = raft_pb2.CompareAndSwapRequest(key="k", new_value="a")
    swapped = await stub.CompareAndSwap(absent, timeout=5)
    assert (swapped.success, swapped.swapped, swapped.current_value) == (True, True, "a")
    refused = await stub.CompareAndSwap(
        raft_pb2.CompareAndSwapRequest(key="k", expected_value="zz", new_value="b"), timeout=5
    )
    assert (refused.success, refused.swapped, refused.current_value) == (True, False, "a")
    del served.node.store["k"]
    on_missing = await stub.CompareAndSwap(
        raft_pb2.CompareAndSwapRequest(key="k", expected_value="a", new_value="b"), timeout=5
    )
    assert (on_missing.swapped, on_missing.HasField("current_value")) == (False, False)


async def test_a_batch_is_proposed_as_one_command(served: Served) -> None:
    batch = raft_pb2.MappingBatch(
        mappings=[raft_pb2.Mapping(key="a", value="1"), raft_pb2.Mapping(key="b", value="2")],
        session=session(),
    )
    response = await served.stub.ProposeMappings(batch, timeout=5)
    assert response.success
    assert len(served.node.commands) == 1
    assert served.node.commands[0].put.session.client_id == 7
    assert served.node.store == {"a": "1", "b": "2"}


@pytest.mark.parametrize(
    "mappings, complaint",
    [
        ([], "at least one mapping"),
        ([("k", "v")] * (MAX_BATCH_MAPPINGS + 1), f"the limit is {MAX_BATCH_MAPPINGS}"),
        ([(f"k{i}", "v" * (1024 * 1024 - 8)) for i in range(3)], f"the limit is {MAX_BATCH_BYTES}"),
        ([("ok", "v"), ("", "v")], "key must not be empty"),
    ],
    ids=["empty", "too many", "too many bytes", "a bad key"],
)
async def test_an_invalid_batch_is_invalid_argument_and_never_reaches_the_node(
    served: Served, mappings: list[tuple[str, str]], complaint: str
) -> None:
    batch = raft_pb2.MappingBatch(mappings=[raft_pb2.Mapping(key=k, value=v) for k, v in mappings])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.ProposeMappings(batch, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert complaint in caught.value.details()
    assert served.node.commands == []


async def test_register_client_returns_the_client_id(served: Served) -> None:
    response = await served.stub.RegisterClient(raft_pb2.RegisterClientRequest(), timeout=5)
    assert (response.success, response.client_id) == (True, 77)


async def test_every_write_from_a_follower_carries_the_redirect(served: Served) -> None:
    served.node.refusal = NotLeaderError(12345, "127.0.0.1:12350")
    stub = served.stub
    replies = [
        await stub.DeleteKey(raft_pb2.DeleteRequest(key="k"), timeout=5),
        await stub.CompareAndSwap(raft_pb2.CompareAndSwapRequest(key="k"), timeout=5),
        await stub.ProposeMappings(
            raft_pb2.MappingBatch(mappings=[raft_pb2.Mapping(key="k")]), timeout=5
        ),
        await stub.RegisterClient(raft_pb2.RegisterClientRequest(), timeout=5),
    ]
    for reply in replies:
        assert not reply.success
        assert (reply.current_leader, reply.leader_address) == (12345, "127.0.0.1:12350")


async def test_an_expired_session_is_failed_precondition(served: Served) -> None:
    served.node.result_override = SessionExpired("client session 7 is unknown")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.DeleteKey(raft_pb2.DeleteRequest(key="k", session=session()), timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == "client session 7 is unknown"


@pytest.mark.parametrize(
    "bad, complaint",
    [
        (raft_pb2.Session(client_id=7, sequence=0), "start at 1"),
        (raft_pb2.Session(client_id=0, sequence=3), "needs the client_id"),
        (raft_pb2.Session(client_id=7, sequence=2, first_outstanding=3), "first_outstanding"),
        (raft_pb2.Session(client_id=-1, sequence=1), "non-negative"),
    ],
    ids=["sequence 0", "no client id", "outstanding above sequence", "negative"],
)
async def test_a_malformed_session_is_invalid_argument(
    served: Served, bad: raft_pb2.Session, complaint: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.ProposeMapping(raft_pb2.Mapping(key="k", value="v", session=bad))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert complaint in caught.value.details()


async def test_get_value_is_linearizable_unless_stale_is_allowed(served: Served) -> None:
    served.node.store["k"] = "v"
    assert (await get(served, "k")).value == "v"
    assert served.node.linearizable_reads == 1
    stale = await served.stub.GetValue(raft_pb2.Key(key="k", allow_stale=True), timeout=5)
    assert stale.value == "v"
    assert served.node.linearizable_reads == 1


async def test_a_read_that_cannot_be_confirmed_is_unavailable_not_stale(served: Served) -> None:
    served.node.store["k"] = "old"
    served.node.read_refusal = UnavailableError("no leader known to confirm the read")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(served, "k")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no leader known" in caught.value.details()


# ---- membership: ListMembers, AddMember, RemoveMember -----------------------------------------


def lead(node: FakeNode) -> None:
    node.role = "leader"
    node.known_leader = (node.node_id, "127.0.0.1:12351")


async def test_list_members_gives_the_leader_s_configuration_and_marks_the_leader(
    served: Served,
) -> None:
    lead(served.node)
    learner = NodeAddress(6, "10.0.0.6:7000", "10.0.0.6:7001")
    served.node.config = (three_voters().with_learner(learner).without(2), 42, False)
    response = await served.stub.ListMembers(raft_pb2.ListMembersRequest(), timeout=5)
    assert response.success
    assert Membership.from_proto(response.config) == served.node.config[0]
    assert [(m.id, m.voter) for m in response.config.members] == [(1, True), (3, True), (6, False)]
    assert list(response.config.removed_ids) == [2]
    assert (response.config_index, response.committed) == (42, False)
    assert (response.current_leader, response.leader_address) == (12346, "127.0.0.1:12351")
    assert served.node.member_calls == [("list",)]


async def test_list_members_on_a_follower_redirects_unless_stale_is_allowed(
    served: Served,
) -> None:
    served.node.known_leader = (12345, "127.0.0.1:12350")
    served.node.member_refusal = NotLeaderError(12345, "127.0.0.1:12350")
    redirect = await served.stub.ListMembers(raft_pb2.ListMembersRequest(), timeout=5)
    assert not redirect.success
    assert (redirect.current_leader, redirect.leader_address) == (12345, "127.0.0.1:12350")
    assert not redirect.config.members

    stale = await served.stub.ListMembers(raft_pb2.ListMembersRequest(allow_stale=True), timeout=5)
    assert stale.success
    assert Membership.from_proto(stale.config) == three_voters()
    assert (stale.config_index, stale.committed) == (0, True)
    # The follower's own view says whom it follows.
    assert stale.current_leader == 12345
    # Answered from the node's own configuration, never through the leader-only call.
    assert served.node.member_calls == [("list",)]


async def test_list_members_that_cannot_be_confirmed_is_unavailable(served: Served) -> None:
    served.node.member_refusal = UnavailableError("leadership could not be confirmed")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.ListMembers(raft_pb2.ListMembersRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def add_request(node: NodeAddress, wait_until_voter: bool) -> raft_pb2.AddMemberRequest:
    return raft_pb2.AddMemberRequest(
        id=node.id,
        raft_address=node.raft_address,
        client_address=node.client_address,
        wait_until_voter=wait_until_voter,
    )


async def test_add_member_hands_the_node_and_wait_flag_over_and_returns_the_new_configuration(
    served: Served,
) -> None:
    lead(served.node)
    six = NodeAddress(6, "10.0.0.6:7000", "10.0.0.6:7001")
    learner = await served.stub.AddMember(add_request(six, False), timeout=5)
    assert served.node.member_calls == [("add", six, False)]
    assert learner.success
    assert Membership.from_proto(learner.config).learners == {6: six}
    assert (learner.config_index, learner.committed) == (1, True)

    seven = NodeAddress(7, "10.0.0.7:7000", "10.0.0.7:7001")
    voter = await served.stub.AddMember(add_request(seven, True), timeout=5)
    assert served.node.member_calls[-1] == ("add", seven, True)
    assert Membership.from_proto(voter.config).is_voter(7)
    assert voter.config_index == 2


async def test_remove_member_returns_the_configuration_without_it(served: Served) -> None:
    lead(served.node)
    response = await served.stub.RemoveMember(raft_pb2.RemoveMemberRequest(id=3), timeout=5)
    assert served.node.member_calls == [("remove", 3)]
    assert response.success
    removed = Membership.from_proto(response.config)
    assert sorted(removed.voters) == [1, 2]
    assert removed.removed == {3}
    assert response.config_index == 1


@pytest.mark.parametrize(
    "node_id, raft_address, client_address, complaint",
    [
        (0, "10.0.0.6:7000", "10.0.0.6:7001", "positive integer"),
        (-6, "10.0.0.6:7000", "10.0.0.6:7001", "positive integer"),
        (2**62, "10.0.0.6:7000", "10.0.0.6:7001", "below 2^62"),
        (6, "", "10.0.0.6:7001", "host:port"),
        (6, "10.0.0.6:7000", "10.0.0.6", "host:port"),
        (6, "10.0.0.6:70000", "10.0.0.6:7001", "outside 1-65535"),
        (6, "10.0.0.6:7000", "10.0.0.6:7000", "must differ"),
    ],
    ids=["id 0", "negative id", "id too big", "no raft", "no port", "bad port", "same address"],
)
async def test_add_member_with_a_bad_id_or_address_is_invalid_argument_and_never_reaches_the_node(
    served: Served, node_id: int, raft_address: str, client_address: str, complaint: str
) -> None:
    lead(served.node)
    request = raft_pb2.AddMemberRequest(
        id=node_id, raft_address=raft_address, client_address=client_address
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.AddMember(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert complaint in caught.value.details()
    assert served.node.member_calls == []


@pytest.mark.parametrize("node_id", [0, -3, 2**62], ids=["0", "negative", "too big"])
async def test_remove_member_with_a_bad_id_is_invalid_argument_and_never_reaches_the_node(
    served: Served, node_id: int
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.RemoveMember(raft_pb2.RemoveMemberRequest(id=node_id), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node id" in caught.value.details()
    assert served.node.member_calls == []


ADD_SIX = add_request(NodeAddress(6, "10.0.0.6:7000", "10.0.0.6:7001"), True)


async def call_change(served: Served, method: str) -> raft_pb2.MembershipResponse:
    if method == "AddMember":
        response: raft_pb2.MembershipResponse = await served.stub.AddMember(ADD_SIX, timeout=5)
    else:
        response = await served.stub.RemoveMember(raft_pb2.RemoveMemberRequest(id=3), timeout=5)
    return response


@pytest.mark.parametrize("method", ["AddMember", "RemoveMember"])
@pytest.mark.parametrize(
    "refusal, code",
    [
        (
            MembershipError("id 6 was removed from this cluster"),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (ChangeInProgressError("a change at index 9 is uncommitted"), grpc.StatusCode.ABORTED),
        (CommitUnknownError("lost leadership before it committed"), grpc.StatusCode.UNAVAILABLE),
    ],
    ids=["refused", "change in progress", "outcome unknown"],
)
async def test_a_membership_change_the_node_refuses_answers_its_status_code_and_reason(
    served: Served, method: str, refusal: Exception, code: grpc.StatusCode
) -> None:
    lead(served.node)
    served.node.member_refusal = refusal
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_change(served, method)
    assert caught.value.code() == code
    assert caught.value.details() == str(refusal)


@pytest.mark.parametrize("method", ["AddMember", "RemoveMember"])
async def test_a_membership_change_sent_to_a_follower_carries_the_redirect(
    served: Served, method: str
) -> None:
    served.node.member_refusal = NotLeaderError(12345, "127.0.0.1:12350")
    response = await call_change(served, method)
    assert not response.success
    assert (response.current_leader, response.leader_address) == (12345, "127.0.0.1:12350")


async def test_status_on_the_leader_reports_its_own_view_and_each_followers_progress(
    served: Served,
) -> None:
    served.node.node_id, served.node.role, served.node.known_leader = 1, "leader", (1, "x")
    response = await served.stub.Status(raft_pb2.StatusRequest(), timeout=5)
    assert (response.node_id, response.role, response.term, response.leader_id) == (
        1,
        "leader",
        4,
        1,
    )
    assert (response.raft_address, response.client_address) == ("10.0.0.1:7000", "10.0.0.1:7001")
    assert (response.commit_index, response.applied_index, response.last_log_index) == (40, 39, 42)
    assert (response.snapshot_index, response.voter, response.learner) == (10, True, False)
    assert response.serving and not response.HasField("leader_contact_seconds")
    assert [m.id for m in response.config.members] == [1, 2, 3]
    assert [(p.id, p.match_index, p.lag) for p in response.peers] == [(2, 42, 0), (3, 30, 12)]
    assert response.peers[0].last_contact_seconds == pytest.approx(0.01)
    # A follower that never answered has no last contact, rather than a made-up one.
    assert not response.peers[1].HasField("last_contact_seconds")


async def test_status_on_a_follower_without_a_leader_answers_too_not_a_redirect(
    served: Served,
) -> None:
    response = await served.stub.Status(raft_pb2.StatusRequest(), timeout=5)
    assert (response.node_id, response.role) == (12346, "follower")
    assert not response.HasField("leader_id")
    assert not response.serving
    assert list(response.peers) == []


# ---- Batch: several independent ops in one call, each answered as its own call would be ----


def put_op(key: str, value: str, client_id: int = 0, sequence: int = 0) -> raft_pb2.BatchOp:
    session = raft_pb2.Session(client_id=client_id, sequence=sequence)
    return raft_pb2.BatchOp(put=raft_pb2.Mapping(key=key, value=value, session=session))


async def batch(served: Served, *ops: raft_pb2.BatchOp) -> list[raft_pb2.BatchResult]:
    response: raft_pb2.BatchResponse = await served.stub.Batch(
        raft_pb2.BatchRequest(ops=ops), timeout=5
    )
    assert len(response.results) == len(ops)
    return list(response.results)


async def test_a_batch_appends_its_writes_together_and_answers_each_op_in_order(
    served: Served,
) -> None:
    served.node.store["old"] = "x"
    results = await batch(
        served,
        put_op("a", "1"),
        put_op("b", "2", client_id=5, sequence=1),
        raft_pb2.BatchOp(delete=raft_pb2.DeleteRequest(key="old")),
        raft_pb2.BatchOp(delete=raft_pb2.DeleteRequest(key="never")),
        raft_pb2.BatchOp(
            put_many=raft_pb2.MappingBatch(
                mappings=[raft_pb2.Mapping(key="c", value="3"), raft_pb2.Mapping(key="d")]
            )
        ),
        raft_pb2.BatchOp(get=raft_pb2.Key(key="missing")),
    )
    assert served.node.entry_batches == [5]
    assert [r.code for r in results] == [0] * 6
    assert [r.WhichOneof("reply") for r in results] == [
        "put",
        "put",
        "delete",
        "delete",
        "put_many",
        "get",
    ]
    assert results[0].put.success and results[1].put.success and results[4].put_many.success
    assert (results[2].delete.existed, results[3].delete.existed) == (True, False)
    assert (results[5].get.key, results[5].get.HasField("value")) == ("missing", False)
    assert served.node.store == {"a": "1", "b": "2", "c": "3", "d": ""}
    # Without a session a put is the seed's MAPPING entry; with one, an exactly-once command.
    assert served.node.proposals == [("a", "1")]
    assert served.node.commands[0].put.session.client_id == 5


async def test_an_invalid_op_is_refused_alone_and_the_others_are_done(served: Served) -> None:
    results = await batch(
        served,
        put_op("", "v"),
        put_op("ok", "v"),
        raft_pb2.BatchOp(),
        put_op("k", "v", client_id=0, sequence=3),
        raft_pb2.BatchOp(get=raft_pb2.Key(key="k" * (MAX_KEY_BYTES + 1))),
    )
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [r.code for r in results] == [invalid, 0, invalid, invalid, invalid]
    assert "key must not be empty" in results[0].details
    assert "one of put" in results[2].details
    assert "needs the client_id" in results[3].details
    assert served.node.store == {"ok": "v"}


async def test_a_follower_redirects_a_batch_s_writes_and_answers_its_reads(served: Served) -> None:
    served.node.refusal = NotLeaderError(12345, "127.0.0.1:12350")
    served.node.store["k"] = "v"
    results = await batch(
        served,
        put_op("a", "1"),
        raft_pb2.BatchOp(get=raft_pb2.Key(key="k", allow_stale=True)),
        raft_pb2.BatchOp(get=raft_pb2.Key(key="k")),
    )
    assert [r.code for r in results] == [0, 0, 0]
    assert not results[0].put.success
    assert (results[0].put.current_leader, results[0].put.leader_address) == (
        12345,
        "127.0.0.1:12350",
    )
    assert results[1].get.value == "v" and results[2].get.value == "v"
    # One of the two reads was stale: only the other one asked for a read round.
    assert served.node.linearizable_reads == 1


@pytest.mark.parametrize(
    "outcome, code, details",
    [
        (CommitUnknownError("lost leadership"), grpc.StatusCode.UNAVAILABLE, "lost leadership"),
        (SessionExpired("session 5 expired"), grpc.StatusCode.FAILED_PRECONDITION, "expired"),
        (OverloadedError("1000 writes wait"), grpc.StatusCode.RESOURCE_EXHAUSTED, "1000 writes"),
    ],
    ids=["unknown outcome", "session expired", "overloaded"],
)
async def test_a_write_that_fails_in_a_batch_ends_with_its_own_call_s_status(
    served: Served, outcome: Any, code: grpc.StatusCode, details: str
) -> None:
    if isinstance(outcome, SessionExpired):
        served.node.result_override = outcome
    else:
        served.node.refusal = outcome
    results = await batch(served, put_op("k", "v", client_id=5, sequence=1))
    assert results[0].code == code.value[0]
    assert details in results[0].details


async def test_a_read_that_cannot_be_served_in_a_batch_is_unavailable(served: Served) -> None:
    served.node.read_refusal = UnavailableError("no leader to confirm the read")
    results = await batch(served, raft_pb2.BatchOp(get=raft_pb2.Key(key="k")))
    assert results[0].code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert results[0].details == "no leader to confirm the read"


async def test_gets_whose_values_do_not_fit_one_reply_are_sent_back_to_ask_alone(
    served: Served,
) -> None:
    served.node.store.update({f"big{i}": "v" * MAX_VALUE_BYTES for i in range(5)})
    results = await batch(
        served, *(raft_pb2.BatchOp(get=raft_pb2.Key(key=f"big{i}")) for i in range(5))
    )
    answered = [r for r in results if r.HasField("get")]
    assert 1 <= len(answered) < 5
    assert all(r.get.value == "v" * MAX_VALUE_BYTES for r in answered)
    assert all(r.resend_alone and r.code == 0 for r in results if not r.HasField("get"))


async def test_a_batch_of_too_many_ops_is_refused_whole(served: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await batch(served, *(put_op(f"k{i}", "v") for i in range(MAX_CALL_OPS + 1)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"the limit is {MAX_CALL_OPS}" in caught.value.details()
    assert served.node.store == {}
