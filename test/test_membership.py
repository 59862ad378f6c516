"""Membership changes (thesis chapter 4, one server at a time): the configuration type, its history in
the log, and nodes adding, promoting and removing members over an in-memory network."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import pytest

from cluster_config import ClusterConfig, NodeAddress
from disk import MemoryDisk
from log import RaftLog
from membership import (
    ChangeInProgressError,
    ConfigHistory,
    Membership,
    MembershipError,
)
from raft_node import (
    CommitUnknownError,
    InvalidRequestError,
    NotLeaderError,
    RaftNode,
    SnapshotPolicy,
    Timing,
)
from rpc import raft_pb2
from test.memory_transport import InMemoryNetwork

FAST = Timing(
    heartbeat_interval=0.02,
    election_timeout_min=0.15,
    election_timeout_max=0.3,
    proposal_timeout=2.0,
    append_timeout=0.5,
)
DEADLINE = 10.0


def address(node_id: int) -> NodeAddress:
    return NodeAddress(node_id, f"10.0.0.{node_id}:7000", f"10.0.0.{node_id}:8000")


def cluster_of(*ids: int) -> ClusterConfig:
    return ClusterConfig({i: address(i) for i in ids})


# ---- the configuration type ---------------------------------------------------------------------


def test_changes_are_one_server_at_a_time_and_ids_are_never_reused() -> None:
    three = Membership.bootstrap(cluster_of(1, 2, 3))
    with_learner = three.with_learner(address(4))
    assert (sorted(with_learner.voters), sorted(with_learner.learners)) == ([1, 2, 3], [4])
    assert with_learner.quorum == 2  # a learner does not count toward a majority
    promoted = with_learner.with_voter(4)
    assert (sorted(promoted.voters), promoted.learners, promoted.quorum) == ([1, 2, 3, 4], {}, 3)
    removed = promoted.without(2)
    assert (sorted(removed.voters), removed.removed) == ([1, 3, 4], frozenset({2}))

    with pytest.raises(MembershipError, match="never reused"):
        removed.with_learner(address(2))
    with pytest.raises(MembershipError, match="already a member"):
        three.with_learner(address(3))
    with pytest.raises(MembershipError, match="already used by member 1"):
        three.with_learner(NodeAddress(9, "10.0.0.1:7000", "10.0.0.9:8000"))
    with pytest.raises(MembershipError, match="not a learner"):
        three.with_voter(3)
    with pytest.raises(MembershipError, match="not a member"):
        three.without(7)
    with pytest.raises(MembershipError, match="only voter"):
        Membership.bootstrap(cluster_of(1)).without(1)
    with pytest.raises(MembershipError, match="positive"):
        three.with_learner(NodeAddress(0, "h:1", "h:2"))
    with pytest.raises(MembershipError, match="host:port"):
        three.with_learner(NodeAddress(5, "nowhere", "h:2"))


def test_a_configuration_survives_the_wire_and_the_snapshot_encoding() -> None:
    config = Membership.bootstrap(cluster_of(1, 2, 3)).with_learner(address(4)).without(2)
    assert Membership.from_proto(config.to_proto()) == config
    assert Membership.from_json(config.to_json()) == config
    # The first snapshot format listed members only; all of them voted.
    assert Membership.from_json(b'{"1": ["h:1", "h:2"]}') == Membership(
        {1: NodeAddress(1, "h:1", "h:2")}
    )


@pytest.mark.parametrize(
    "config",
    [
        raft_pb2.Configuration(),
        raft_pb2.Configuration(
            members=[raft_pb2.Member(id=1, raft_address="h:1", client_address="h:2")]
        ),
        raft_pb2.Configuration(
            members=[
                raft_pb2.Member(id=1, raft_address="h:1", client_address="h:2", voter=True),
                raft_pb2.Member(id=1, raft_address="h:3", client_address="h:4", voter=True),
            ]
        ),
        raft_pb2.Configuration(
            members=[raft_pb2.Member(id=1, raft_address="h:1", client_address="h:2", voter=True)],
            removed_ids=[1],
        ),
        raft_pb2.Configuration(
            members=[raft_pb2.Member(id=-1, raft_address="h:1", client_address="h:2", voter=True)]
        ),
    ],
    ids=["empty", "no-voter", "duplicate-id", "removed-member", "negative-id"],
)
def test_a_malformed_configuration_is_refused(config: raft_pb2.Configuration) -> None:
    with pytest.raises(MembershipError):
        Membership.from_proto(config)


def test_the_configuration_in_use_is_the_latest_in_the_log_and_follows_truncation() -> None:
    base = Membership.bootstrap(cluster_of(1, 2, 3))
    history = ConfigHistory(base)
    learner = base.with_learner(address(4))
    voter = learner.with_voter(4)
    history.append(5, learner)
    history.append(9, voter)
    assert (history.latest, history.latest_index) == (voter, 9)
    assert (history.at(4), history.at(5), history.at(8), history.at(100)) == (
        base,
        learner,
        learner,
        voter,
    )
    history.truncate_from(9)  # the entry at 9 was overwritten by a new leader's
    assert (history.latest, history.latest_index) == (learner, 5)
    history.compact(7)  # a snapshot at 7 holds the configuration in force there
    assert (history.latest, list(history.indices())) == (learner, [5])
    assert history.at(1) == learner


# ---- nodes --------------------------------------------------------------------------------------


class Cluster:
    """Nodes on one in-memory network, each with its own MemoryDisk; stopped at the end."""

    def __init__(self) -> None:
        self.net = InMemoryNetwork()
        self.nodes: dict[int, RaftNode] = {}
        self.disks: dict[int, MemoryDisk] = {}
        self.logs: list[RaftLog] = []

    async def start(
        self,
        node_id: int,
        cluster: ClusterConfig,
        join: bool = False,
        policy: SnapshotPolicy | None = None,
    ) -> RaftNode:
        disk = self.disks.setdefault(node_id, MemoryDisk())
        log = await RaftLog.open(f"/raft/{node_id}", disk)
        self.logs.append(log)
        node = RaftNode(
            node_id,
            cluster,
            log,
            self.net.transport(node_id),
            FAST,
            random.Random(node_id),
            snapshot_policy=policy,
            join=join,
        )
        self.net.attach(node)
        self.nodes[node_id] = node
        node.start()
        return node

    async def stop(self, node_id: int) -> None:
        self.net.detach(node_id)
        await self.nodes.pop(node_id).stop()

    async def leader(self, among: set[int] | None = None) -> RaftNode:
        ids = among if among is not None else set(self.nodes)

        def one() -> bool:
            return any(self.nodes[i].role == "leader" for i in ids if i in self.nodes)

        await self.net.wait_until(one, DEADLINE, "a leader is elected")
        return next(self.nodes[i] for i in sorted(ids) if self.nodes[i].role == "leader")

    async def until(self, check: object, what: str) -> None:
        assert callable(check)
        await self.net.wait_until(check, DEADLINE, what)

    async def close(self) -> None:
        for node in list(self.nodes.values()):
            await node.stop()
        for log in self.logs:
            await log.close()


@pytest.fixture
async def c() -> AsyncIterator[Cluster]:
    cluster = Cluster()
    try:
        yield cluster
    finally:
        await cluster.close()


async def three_nodes(c: Cluster, policy: SnapshotPolicy | None = None) -> RaftNode:
    for i in (1, 2, 3):
        await c.start(i, cluster_of(1, 2, 3), policy=policy)
    leader = await c.leader()
    await leader.propose_mapping("before", "1")
    return leader


async def test_a_joining_node_learns_the_log_as_a_learner_and_is_promoted_once_caught_up(
    c: Cluster,
) -> None:
    """Thesis 4.2.1: a new server joins as a non-voting member until it has caught up, so adding
    it never leaves the cluster waiting on a node far behind."""
    leader = await three_nodes(c)
    for i in range(30):
        await leader.propose_mapping(f"k{i}", str(i))
    joiner = await c.start(4, cluster_of(4), join=True)
    assert joiner.config.members == {} and joiner.role == "follower"

    config, index, committed = await leader.add_member(address(4), wait_until_voter=True)

    assert committed and config.is_voter(4) and sorted(config.voters) == [1, 2, 3, 4]
    await c.until(lambda: joiner.get_value("k29") == "29", "the new node applied the log")
    assert joiner.config == config
    assert joiner.configs.latest_index == index
    # Learner first, then voter: two configuration entries, one change each.
    kinds = [
        leader.log.entry(i).config
        for i in range(1, leader.log.last_index + 1)
        if leader.log.entry(i).kind == raft_pb2.ENTRY_KIND_CONFIG
    ]
    voters_then = [sorted(m.id for m in k.members if m.voter) for k in kinds]
    learners_then = [sorted(m.id for m in k.members if not m.voter) for k in kinds]
    assert (voters_then, learners_then) == ([[1, 2, 3], [1, 2, 3, 4]], [[4], []])


async def test_a_learner_that_never_answers_stays_a_learner_and_the_cluster_keeps_committing(
    c: Cluster,
) -> None:
    leader = await three_nodes(c)
    config, _, committed = await leader.add_member(address(4), wait_until_voter=False)
    assert committed and 4 in config.learners

    await leader.propose_mapping("after", "2")  # the majority is still two of 1, 2, 3

    assert 4 in leader.config.learners and not leader.config.is_voter(4)
    assert leader.quorum == 2


async def test_only_one_change_at_a_time(c: Cluster) -> None:
    """Thesis 4.1: "the leader ... must not begin another change until the previous one has been
    committed"."""
    leader = await three_nodes(c)
    others = [i for i in (1, 2, 3) if i != leader.node_id]
    for other in others:
        c.net.disconnect(leader.node_id, other)
    first = asyncio.ensure_future(leader.add_member(address(4), wait_until_voter=False))
    await c.until(lambda: 4 in leader.config.learners, "the first change is appended")
    # In use at once, though not committed.
    assert leader.membership()[2] is False

    with pytest.raises(ChangeInProgressError, match="one change at a time"):
        await leader.remove_member(others[0])

    c.net.heal()
    with contextlib.suppress(CommitUnknownError):
        await first  # the cut-off leader may have stepped down meanwhile (check quorum)
    leader = await c.leader()
    await leader.remove_member(others[0])
    assert others[0] in leader.config.removed


async def test_a_follower_drops_an_uncommitted_configuration_with_the_entries_a_leader_overwrites(
    c: Cluster,
) -> None:
    """The configuration in use is the latest in the log, committed or not (thesis 4.1); when the
    entry holding it is truncated, the one before it is in use again."""
    follower = await c.start(3, cluster_of(1, 2, 3))
    base = follower.config
    learner = base.with_learner(address(4))
    change = raft_pb2.LogEntry(
        term=2, index=1, kind=raft_pb2.ENTRY_KIND_CONFIG, config=learner.to_proto()
    )
    reply = await follower.handle_append_entries(
        raft_pb2.AppendEntriesRequest(term=2, requester_id=1, log_entries=[change])
    )
    assert reply.success and follower.config == learner and follower.commit_index == 0
    assert follower.membership() == (learner, 1, False)

    overwrite = raft_pb2.LogEntry(term=3, index=1, kind=raft_pb2.ENTRY_KIND_NOOP)
    reply = await follower.handle_append_entries(
        raft_pb2.AppendEntriesRequest(term=3, requester_id=2, log_entries=[overwrite])
    )

    assert reply.success and follower.config == base
    assert follower.membership() == (base, 0, True)


async def test_a_leader_that_removes_itself_hands_over_and_steps_down_after_the_change_commits(
    c: Cluster,
) -> None:
    """Thesis 4.2.2: the removed leader manages the cluster until the change commits, not counting
    itself in majorities, then steps down."""
    leader = await three_nodes(c)
    old = leader.node_id

    config, _, committed = await leader.remove_member(old)

    assert committed and old in config.removed
    await c.until(lambda: leader.removed.is_set(), "the old leader learns it is removed")
    assert leader.role == "follower"
    rest = {i for i in (1, 2, 3) if i != old}
    new_leader = await c.leader(rest)
    await new_leader.propose_mapping("after", "removal")
    assert sorted(new_leader.config.voters) == sorted(rest)
    # The old leader no longer takes part: its messages are refused.
    with pytest.raises(InvalidRequestError, match="removed"):
        await new_leader.handle_request_vote(
            raft_pb2.VoteRequest(
                term=new_leader.current_term + 1,
                requester_id=old,
                last_log_index=leader.log.last_index,
                last_log_term=leader.log.last_term,
            )
        )


async def test_a_removed_follower_learns_its_removal_committed_and_stops(c: Cluster) -> None:
    leader = await three_nodes(c)
    gone = next(i for i in (1, 2, 3) if i != leader.node_id)
    await leader.remove_member(gone)
    await c.until(lambda: c.nodes[gone].removed.is_set(), "the removed follower learns it")
    await c.until(lambda: gone not in leader.progress, "the leader stops sending to it")
    assert c.nodes[gone].role == "follower"
    # Removing it again changes nothing; adding it again is refused.
    again, _, _ = await leader.remove_member(gone)
    assert again == leader.config
    with pytest.raises(MembershipError, match="never reused"):
        await leader.add_member(address(gone))


async def test_admin_calls_on_a_follower_are_redirected(c: Cluster) -> None:
    leader = await three_nodes(c)
    follower = c.nodes[next(i for i in (1, 2, 3) if i != leader.node_id)]
    await c.until(lambda: follower.leader_id == leader.node_id, "the follower knows its leader")
    for call in (
        follower.add_member(address(4)),
        follower.remove_member(leader.node_id),
        follower.list_members(),
    ):
        with pytest.raises(NotLeaderError) as redirect:
            await call
        assert redirect.value.leader_id == leader.node_id


async def test_a_restart_uses_the_configuration_in_the_log_and_snapshot_not_the_start_flags(
    c: Cluster,
) -> None:
    """A configuration on disk wins over the one the node is started with (which only bootstraps
    a fresh cluster), also once the log prefix holding it was compacted into a snapshot."""
    policy = SnapshotPolicy(entries=10, keep_entries=0)
    leader = await three_nodes(c, policy)
    await c.start(4, cluster_of(4), join=True, policy=policy)
    await leader.add_member(address(4), wait_until_voter=True)
    for i in range(25):
        await leader.propose_mapping(f"k{i}", str(i))
    follower = next(i for i in (1, 2, 3) if i != leader.node_id)
    node = c.nodes[follower]
    await c.until(
        lambda: node.log.base_index > node.configs.latest_index, "the change is compacted away"
    )
    expected = node.config
    await c.stop(follower)

    restarted = await c.start(follower, cluster_of(1, 2, 3), policy=policy)

    assert restarted.config == expected and restarted.config.is_voter(4)
    assert restarted.log.base_index > 0


async def test_entries_from_a_leader_the_configuration_does_not_list_yet_are_accepted_only_without_a_recent_leader(
    c: Cluster,
) -> None:
    """Thesis 4.1: a server that missed the entry adding the current leader must still accept that
    leader's entries, or it stays behind for good. While a leader it knows is speaking, though, such
    a message can only disrupt, so it is refused (as vote requests are, thesis 4.2.3)."""
    follower = await c.start(3, cluster_of(1, 2, 3))
    noop = raft_pb2.LogEntry(term=2, index=1, kind=raft_pb2.ENTRY_KIND_NOOP)
    from_known = raft_pb2.AppendEntriesRequest(term=2, requester_id=1, log_entries=[noop])
    assert (await follower.handle_append_entries(from_known)).success
    from_unlisted = raft_pb2.AppendEntriesRequest(
        term=5, requester_id=9, prev_log_index=1, prev_log_term=2
    )

    with pytest.raises(InvalidRequestError, match="not a member"):
        await follower.handle_append_entries(from_unlisted)
    assert (follower.current_term, follower.leader_id) == (2, 1)

    # No word from leader 1 for longer than the minimum election timeout: now it is accepted.
    await c.until(lambda: not follower.leader_is_recent(), "leader 1 is no longer recent")
    reply = await follower.handle_append_entries(from_unlisted)
    assert reply.success and (follower.current_term, follower.leader_id) == (5, 9)


async def test_a_leader_stops_sending_to_a_removed_node_that_is_down(c: Cluster) -> None:
    """A removed node that is down never learns of its removal; the leader must not keep sending
    to it (nor keep log entries or a snapshot for it) for ever."""
    leader = await three_nodes(c)
    gone = next(i for i in (1, 2, 3) if i != leader.node_id)
    await c.stop(gone)
    await leader.remove_member(gone)
    await c.until(lambda: gone not in leader.progress, "the leader gives up on the removed node")
    await leader.propose_mapping("after", "removal")  # the other two are the majority now
    assert leader.quorum == 2 and sorted(leader.config.voters) == sorted(
        i for i in (1, 2, 3) if i != gone
    )


async def test_a_voter_that_missed_the_entry_adding_a_candidate_votes_for_it_if_no_leader_speaks(
    c: Cluster,
) -> None:
    """Thesis 4.1: servers must vote for a candidate their configuration does not list yet, whose
    log holds the entry adding it; else a cluster whose other voters are down has no leader for
    good. While a leader it knows speaks, such a request can only disrupt (thesis 4.2.3)."""
    voter = await c.start(3, cluster_of(1, 2, 3))

    def vote(term: int, candidate: int, last_term: int, last_index: int) -> raft_pb2.VoteRequest:
        return raft_pb2.VoteRequest(
            term=term, requester_id=candidate, last_log_term=last_term, last_log_index=last_index
        )

    with pytest.raises(InvalidRequestError, match="not a member"):
        await voter.handle_request_vote(vote(2, 5, 0, 0))  # no entry it could hold
    reply = await voter.handle_request_vote(vote(2, 4, 1, 5))
    assert reply.vote_granted and voter.voted_for == 4

    heartbeat = raft_pb2.AppendEntriesRequest(term=3, requester_id=1)
    assert (await voter.handle_append_entries(heartbeat)).success
    with pytest.raises(InvalidRequestError, match="not a member"):
        await voter.handle_request_vote(vote(4, 6, 3, 9))
    assert (voter.current_term, voter.leader_id) == (3, 1)


async def receive_removal_of_1(node: RaftNode, leader: int) -> raft_pb2.AppendEntriesResponse:
    """`node` of cluster 1, 2, 3 receives, from `leader` in term 2, a configuration removing 1."""
    removal = Membership.bootstrap(cluster_of(1, 2, 3)).without(1)
    change = raft_pb2.LogEntry(
        term=2, index=1, kind=raft_pb2.ENTRY_KIND_CONFIG, config=removal.to_proto()
    )
    return await node.handle_append_entries(
        raft_pb2.AppendEntriesRequest(term=2, requester_id=leader, log_entries=[change])
    )


async def test_a_leader_removing_itself_is_followed_until_the_removal_commits(c: Cluster) -> None:
    """Thesis 4.2.2: the leader being removed manages the cluster until the change commits, then
    hands over with TimeoutNow; its followers must accept both, in its term. After that, its
    messages are refused."""
    follower = await c.start(3, cluster_of(1, 2, 3))
    appended = await receive_removal_of_1(follower, leader=1)
    assert appended.success and 1 in follower.config.removed and follower.commit_index == 0

    heartbeat = raft_pb2.AppendEntriesRequest(
        term=2, requester_id=1, prev_log_index=1, prev_log_term=2
    )
    assert (await follower.handle_append_entries(heartbeat)).success
    # The removal commits; the leader, in its term, hands over once it knows that.
    heartbeat.leader_commit = 1
    assert (await follower.handle_append_entries(heartbeat)).success
    assert follower.commit_index == 1 and follower.leader_id == 1
    await follower.handle_timeout_now(raft_pb2.TimeoutNowRequest(term=2, requester_id=1))
    await c.until(lambda: follower.current_term == 3, "the follower stands at the hand-over")

    # In a later term, the removed node is nobody's leader: refused.
    with pytest.raises(InvalidRequestError, match="removed"):
        await follower.handle_append_entries(
            raft_pb2.AppendEntriesRequest(term=4, requester_id=1, prev_log_index=1)
        )


async def test_a_node_an_uncommitted_configuration_removes_still_stands_for_election(
    c: Cluster,
) -> None:
    """It may be the only node able to commit its own removal (thesis 4.2.2), so it stands; its
    own vote does not count."""
    node = await c.start(1, cluster_of(1, 2, 3))
    appended = await receive_removal_of_1(node, leader=2)
    assert appended.success and not node.is_voter and node.may_stand

    await c.until(lambda: node.election.pre_vote_term is not None, "the node asks for pre-votes")
    assert node.config.count(node.election.pre_votes) == 0


async def test_removing_a_node_again_while_its_removal_is_pending_waits_for_the_commit(
    c: Cluster,
) -> None:
    leader = await three_nodes(c)
    gone = next(i for i in (1, 2, 3) if i != leader.node_id)
    # The first appends the removal at once, so the second finds it pending (not committed: that
    # takes a round trip to the followers).
    first = asyncio.ensure_future(leader.remove_member(gone))
    second = asyncio.ensure_future(leader.remove_member(gone))

    config, _, committed = await second
    assert committed and gone in config.removed
    await first
