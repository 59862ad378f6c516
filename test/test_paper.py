"""One test per rule of the Raft paper's Figure 2 (and the sections it cites), run in-process.

Each test puts a node in a known state (init), makes one step (act), and checks its state, what it
made durable and the messages it sent (check). Nodes keep their log on a MemoryDisk, so "durable"
means "survives MemoryDisk.crash()". Quotes are from "In Search of an Understandable Consensus
Algorithm (Extended Version)", Ongaro and Ousterhout.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import random
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import pytest

import leader
from cluster_config import ClusterConfig, NodeAddress
from disk import DiskOp, MemoryDisk
from log import LOG_FILE, RaftLog
from membership import Membership
from raft_node import (
    CommitUnknownError,
    InvalidRequestError,
    NotLeaderError,
    PeerUnreachableError,
    RaftNode,
    SnapshotPolicy,
    Timing,
    TransferFailedError,
    UnavailableError,
)
from rpc import raft_pb2
from rpc.raft_pb2 import (
    AppendEntriesRequest,
    AppendEntriesResponse,
    InstallSnapshotRequest,
    InstallSnapshotResponse,
    LogEntry,
    RequestVoteResponse,
    VoteRequest,
)
from snapshot import encode_snapshot
from state_machine import KeyValueStateMachine
from test.memory_transport import InMemoryNetwork, ScriptedTransport

DEADLINE = 5.0

# Timers that never fire during a test that is not about them.
QUIET = Timing(
    heartbeat_interval=5.0,
    election_timeout_min=10.0,
    election_timeout_max=20.0,
    proposal_timeout=10.0,
    append_timeout=30.0,
)
# Timers for tests about timers and whole clusters; still generous for a loaded machine.
BRISK = Timing(
    heartbeat_interval=0.03,
    election_timeout_min=0.3,
    election_timeout_max=0.6,
    proposal_timeout=5.0,
    append_timeout=1.0,
)


# For whole-cluster tests that need one leader to stay in office: slow enough that a busy machine
# does not hold up heartbeats for a whole election timeout.
SEDATE = Timing(
    heartbeat_interval=0.05,
    election_timeout_min=0.8,
    election_timeout_max=1.2,
    proposal_timeout=5.0,
    append_timeout=1.0,
)


def cluster_of(size: int) -> ClusterConfig:
    """Members 1..size; no sockets are opened, so the addresses are only names."""
    return ClusterConfig(
        {i: NodeAddress(i, f"10.0.0.{i}:7000", f"10.0.0.{i}:8000") for i in range(1, size + 1)}
    )


CLUSTER3 = cluster_of(3)
CLUSTER5 = cluster_of(5)


def data_dir(node_id: int) -> str:
    return f"/raft/{node_id}"


def entry(index: int, term: int, key: str | None = None, value: str | None = None) -> LogEntry:
    return LogEntry(
        term=term,
        index=index,
        key=key if key is not None else f"k{index}",
        value=value if value is not None else f"v{index}-t{term}",
    )


def entries_for(terms: Sequence[int], first: int = 1) -> list[LogEntry]:
    return [entry(first + i, t) for i, t in enumerate(terms)]


def log_terms(log: RaftLog) -> list[int]:
    return [log.term_at(i) for i in range(1, log.last_index + 1)]


def vote(term: int, candidate: int, last_index: int, last_term: int) -> VoteRequest:
    return VoteRequest(
        term=term, requester_id=candidate, last_log_index=last_index, last_log_term=last_term
    )


def pre_vote(term: int, candidate: int, last_index: int, last_term: int) -> VoteRequest:
    request = vote(term, candidate, last_index, last_term)
    request.pre_vote = True
    return request


def append(
    term: int,
    leader: int,
    prev_index: int,
    prev_term: int,
    entries: Sequence[LogEntry] = (),
    commit: int = 0,
) -> AppendEntriesRequest:
    return AppendEntriesRequest(
        term=term,
        requester_id=leader,
        prev_log_index=prev_index,
        prev_log_term=prev_term,
        leader_commit=commit,
        log_entries=list(entries),
    )


def election_timer(node: RaftNode) -> asyncio.TimerHandle | None:
    """The node's armed election timer. These tests run the node on the event loop's own clock,
    whose timers are TimerHandles."""
    armed = node.election_timer
    timer = armed[0] if armed is not None else None
    assert timer is None or isinstance(timer, asyncio.TimerHandle)
    return timer


def armed_for(node: RaftNode, timer: asyncio.TimerHandle) -> float:
    """How long the node's current election timer waits, from when it was armed."""
    armed = node.election_timer
    assert armed is not None and armed[0] is timer
    return timer.when() - armed[1]


def crashed_copy(disk: MemoryDisk) -> MemoryDisk:
    """What the disk would hold if the machine lost power at this instant."""
    hook, disk.before_op = disk.before_op, None  # a test's hook is not part of the disk
    try:
        snapshot = copy.deepcopy(disk)
    finally:
        disk.before_op = hook
    snapshot.crash()
    return snapshot


async def durable_state(disk: MemoryDisk, node_id: int) -> tuple[int, int | None, list[int]]:
    """(current_term, voted_for, terms of the log entries) that a restart on `disk` would find."""
    log = await RaftLog.open(data_dir(node_id), disk)
    try:
        return log.current_term, log.voted_for, log_terms(log)
    finally:
        await log.close()


async def eventually_durable(
    disk: MemoryDisk, node_id: int, term: int, voted_for: int | None
) -> None:
    """Wait until a crash would keep (term, voted_for) as the node's hard state."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        found = (await durable_state(crashed_copy(disk), node_id))[:2]
        if found == (term, voted_for):
            return
        if loop.time() >= deadline:
            raise AssertionError(f"hard state {(term, voted_for)} never became durable: {found}")
        await asyncio.sleep(0.002)


async def eventually(check: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Wait until `check()` holds, re-checking as the event loop runs; fail at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() >= deadline:
            raise AssertionError(f"gave up after {timeout:g} s waiting until {what}")
        await asyncio.sleep(0.002)


class RecordingStateMachine(KeyValueStateMachine):
    """The key-value state machine, also noting the index of every entry applied, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.applied: list[int] = []

    def apply(self, entry: LogEntry) -> None:
        self.applied.append(entry.index)
        super().apply(entry)


class DiskGate:
    """Holds every disk operation `match` selects until `release()`; `held` lists those waiting."""

    def __init__(self, disk: MemoryDisk, match: Callable[[DiskOp], bool]) -> None:
        self.held: list[DiskOp] = []
        self._open = asyncio.Event()
        self._match = match
        disk.before_op = self._before

    async def _before(self, op: DiskOp) -> None:
        if self._match(op) and not self._open.is_set():
            self.held.append(op)
            await self._open.wait()

    def release(self) -> None:
        self._open.set()


@dataclass
class Member:
    """A node under test with its disk and the scripted transport it talks through."""

    node: RaftNode
    disk: MemoryDisk
    transport: ScriptedTransport

    @property
    def log(self) -> RaftLog:
        return self.node.log


class Harness:
    """Builds nodes on MemoryDisks and stops every one of them when the test ends."""

    def __init__(self) -> None:
        self.nodes: list[RaftNode] = []
        self.logs: list[RaftLog] = []
        self.gates: list[DiskGate] = []

    async def open_log(
        self,
        disk: MemoryDisk,
        node_id: int,
        terms: Sequence[int] = (),
        term: int | None = None,
        voted_for: int | None = None,
    ) -> RaftLog:
        log = await RaftLog.open(data_dir(node_id), disk)
        self.logs.append(log)
        log.append(entries_for(terms))
        current = term if term is not None else (terms[-1] if terms else 0)
        if current or voted_for is not None:
            log.set_hard_state(current, voted_for)
        await log.flush()
        return log

    def node(
        self,
        node_id: int,
        cluster: ClusterConfig,
        log: RaftLog,
        transport: ScriptedTransport | None = None,
        timing: Timing = QUIET,
        network: InMemoryNetwork | None = None,
    ) -> RaftNode:
        if network is not None:
            node = RaftNode(
                node_id, cluster, log, network.transport(node_id), timing, random.Random(node_id)
            )
            network.attach(node)
        else:
            assert transport is not None
            node = RaftNode(node_id, cluster, log, transport, timing, random.Random(node_id))
        self.nodes.append(node)
        return node

    async def member(
        self,
        node_id: int = 1,
        cluster: ClusterConfig = CLUSTER3,
        terms: Sequence[int] = (),
        term: int | None = None,
        voted_for: int | None = None,
        timing: Timing = QUIET,
    ) -> Member:
        disk = MemoryDisk()
        log = await self.open_log(disk, node_id, terms, term, voted_for)
        transport = ScriptedTransport()
        return Member(self.node(node_id, cluster, log, transport, timing), disk, transport)

    async def restart(self, member: Member, cluster: ClusterConfig = CLUSTER3) -> Member:
        """Crash the member's machine at once, and start a new node on what its disk kept."""
        member.disk.crash()
        await member.node.stop()
        log = await RaftLog.open(data_dir(member.node.node_id), member.disk)
        self.logs.append(log)
        transport = ScriptedTransport()
        node = self.node(member.node.node_id, cluster, log, transport, member.node.timing)
        return Member(node, member.disk, transport)

    def gate(self, disk: MemoryDisk, match: Callable[[DiskOp], bool]) -> DiskGate:
        """A DiskGate that is released when the test ends, however it ends."""
        gate = DiskGate(disk, match)
        self.gates.append(gate)
        return gate

    async def close(self) -> None:
        for gate in self.gates:
            gate.release()
        stuck: list[str] = []

        async def bounded(what: str, step: Awaitable[None]) -> None:
            # Something that cannot finish would hang the whole run; fail this test instead.
            try:
                async with asyncio.timeout(DEADLINE):
                    await step
            except TimeoutError:
                stuck.append(what)
            except OSError:
                pass  # a log whose disk crashed under it has nothing left to write

        for node in self.nodes:
            await bounded(f"stopping node {node.node_id}", node.stop())
            await bounded(f"closing node {node.node_id}'s transport", node.transport.close())
        for log in self.logs:
            await bounded(f"closing the log in {log.data_dir}", log.close())
        assert not stuck, f"did not finish within {DEADLINE:g} s: {', '.join(stuck)}"


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    harness = Harness()
    try:
        yield harness
    finally:
        await harness.close()


async def into_role(m: Member, role: str) -> None:
    """Make a follower a candidate (one election) or a leader (an election won by peers' votes)."""
    if role == "follower":
        return
    peers = sorted(m.node.peers)
    await m.node.start_election()
    await m.transport.wait_sent(VoteRequest, len(peers))
    assert m.node.role == "candidate"
    if role == "leader":
        for peer in peers[: m.node.quorum - 1]:
            request = m.transport.requests(VoteRequest, peer)[0]
            granted = RequestVoteResponse(term=request.term, vote_granted=True)
            m.node.handle_vote_reply(peer, request, granted)
        assert m.node.role == "leader"


# ---- section 5.1: terms --------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["follower", "candidate", "leader"])
async def test_a_request_with_a_stale_term_is_rejected_and_told_the_current_term(
    h: Harness, role: str
) -> None:
    """Stale terms are refused.

    "If a server receives a request with a stale term number, it rejects the request."
    Figure 2: RequestVote and AppendEntries both "reply false if term < currentTerm"; the reply
    carries currentTerm "for the sender to update itself". Reference: section 5.1."""
    m = await h.member(terms=[1, 2], term=3)
    m.node.start()
    await into_role(m, role)
    term, leader = m.node.current_term, m.node.leader_id
    stale = term - 1
    timer = election_timer(m.node)

    vote_reply = await m.node.handle_request_vote(vote(stale, 2, 9, stale))
    append_reply = await m.node.handle_append_entries(
        append(stale, 2, 2, 2, [entry(3, stale)], commit=3)
    )

    assert (vote_reply.vote_granted, vote_reply.term) == (False, term)
    assert (append_reply.success, append_reply.term) == (False, term)
    assert (m.node.role, m.node.current_term, m.node.leader_id) == (role, term, leader)
    assert m.node.voted_for == (None if role == "follower" else 1)
    assert m.log.last_index == (3 if role == "leader" else 2)  # the leader's own no-op only
    assert m.node.commit_index == 0
    # A deposed leader's messages must not keep this node from starting an election.
    assert election_timer(m.node) is timer
    assert (await durable_state(crashed_copy(m.disk), 1))[:2] == (term, m.node.voted_for)


@pytest.mark.parametrize("role", ["candidate", "leader"])
@pytest.mark.parametrize("message", ["RequestVote", "AppendEntries"])
async def test_a_newer_term_in_a_request_makes_a_leader_or_candidate_a_follower(
    h: Harness, role: str, message: str
) -> None:
    """A newer term in a request demotes.

    "If a candidate or leader discovers that its term is out of date, it immediately reverts to
    follower state." Figure 2, all servers: "If RPC request or response contains term T >
    currentTerm: set currentTerm = T, convert to follower". Reference: section 5.1."""
    m = await h.member(terms=[1], term=1)
    await into_role(m, role)
    assert m.node.current_term == 2

    if message == "RequestVote":
        # A candidate whose log is behind: the term is adopted, the vote refused. A leader heeds a
        # newer term's vote request only when it was asked to hand over (thesis section 4.2.3).
        request = vote(7, 3, 0, 0)
        request.leadership_transfer = role == "leader"
        reply = await m.node.handle_request_vote(request)
        assert (reply.term, reply.vote_granted) == (7, False)
        expected_leader = None
    else:
        append_reply = await m.node.handle_append_entries(append(7, 3, 1, 1))
        assert (append_reply.term, append_reply.success) == (7, True)
        expected_leader = 3
    survived = crashed_copy(m.disk)  # the reply has left: what it says must be durable

    assert (m.node.role, m.node.current_term, m.node.voted_for) == ("follower", 7, None)
    assert m.node.leader_id == expected_leader
    assert m.node.progress == {}
    assert election_timer(m.node) is not None
    assert (await durable_state(survived, 1))[:2] == (7, None)


@pytest.mark.parametrize(
    "role, reply_kind", [("candidate", "vote"), ("leader", "append"), ("leader", "vote")]
)
async def test_a_newer_term_in_a_reply_makes_a_leader_or_candidate_a_follower(
    h: Harness, role: str, reply_kind: str
) -> None:
    """Figure 2, all servers: "If RPC request or response contains term T > currentTerm: set
    currentTerm = T, convert to follower" -- a response too, including a late vote reply reaching
    a leader (seed defect 5 ignored terms in replies). Reference: section 5.1."""
    m = await h.member(terms=[1], term=1)
    await into_role(m, role)
    assert m.node.current_term == 2

    if reply_kind == "vote":
        request = m.transport.requests(VoteRequest, peer=3)[0]
        m.node.handle_vote_reply(3, request, RequestVoteResponse(term=5, vote_granted=False))
    else:
        sent = (await m.transport.wait_sent(AppendEntriesRequest, 1, peer=3))[0]
        m.node.handle_append_reply(3, sent, AppendEntriesResponse(term=5, success=False))

    assert (m.node.role, m.node.current_term, m.node.voted_for) == ("follower", 5, None)
    assert m.node.leader_id is None
    assert m.node.progress == {}
    # No reply waits on this change, but it must still reach the disk on its own.
    await eventually_durable(m.disk, 1, 5, None)


# ---- section 5.2: leader election ----------------------------------------------------------------


async def test_a_new_election_makes_its_term_and_self_vote_durable_before_asking_for_votes(
    h: Harness,
) -> None:
    """Term and self-vote are durable first.

    "To begin an election, a follower increments its current term and transitions to candidate
    state. It then votes for itself and issues RequestVote RPCs in parallel to each of the other
    servers." Figure 2: currentTerm and votedFor are "updated on stable storage before responding
    to RPCs" -- and so before asking for any (seed defect 1). Reference: section 5.2."""
    m = await h.member(terms=[1, 1], term=1)
    at_first_send: list[MemoryDisk] = []

    def snapshot(peer: int, request: object) -> None:
        if not at_first_send:
            at_first_send.append(crashed_copy(m.disk))

    m.transport.on_send = snapshot

    await m.node.start_election()

    requests = await m.transport.wait_sent(VoteRequest, 2)
    assert sorted(s.peer for s in m.transport.sent) == [2, 3]
    for request in requests:
        assert (request.term, request.requester_id) == (2, 1)
        assert (request.last_log_index, request.last_log_term) == (2, 1)
    assert (m.node.role, m.node.current_term, m.node.voted_for) == ("candidate", 2, 1)
    assert m.node.leader_id is None
    assert await durable_state(at_first_send[0], 1) == (2, 1, [1, 1])


async def test_a_candidate_with_votes_from_a_majority_leads_appends_a_noop_and_sends_appends(
    h: Harness,
) -> None:
    """A majority of votes makes a leader.

    "A candidate wins an election if it receives votes from a majority of the servers in the
    full cluster for the same term... It then sends heartbeat messages to all of the other servers."
    Section 8: "having each leader commit a blank no-op entry into the log at the start of its
    term." Reference: sections 5.2 and 8."""
    m = await h.member(cluster=CLUSTER5, terms=[1], term=1)
    await m.node.start_election()
    await m.transport.wait_sent(VoteRequest, 4)
    requests = {peer: m.transport.requests(VoteRequest, peer)[0] for peer in (2, 3, 4, 5)}

    m.node.handle_vote_reply(2, requests[2], RequestVoteResponse(term=2, vote_granted=True))
    m.node.handle_vote_reply(3, requests[3], RequestVoteResponse(term=2, vote_granted=False))
    assert m.node.role == "candidate"  # 2 of 5 votes, counting its own
    m.node.handle_vote_reply(2, requests[2], RequestVoteResponse(term=2, vote_granted=True))
    assert m.node.role == "candidate"  # the same voter twice is still one vote
    m.node.handle_vote_reply(4, requests[4], RequestVoteResponse(term=2, vote_granted=True))

    assert (m.node.role, m.node.current_term, m.node.leader_id) == ("leader", 2, 1)
    assert m.node.leader() == (1, "10.0.0.1:8000")
    assert m.log.last_index == 2
    noop = m.log.entry(2)
    assert (noop.term, noop.kind) == (2, raft_pb2.ENTRY_KIND_NOOP)
    for peer in (2, 3, 4, 5):
        first = (await m.transport.wait_sent(AppendEntriesRequest, 1, peer=peer))[0]
        assert (first.term, first.requester_id) == (2, 1)
        assert (first.prev_log_index, first.prev_log_term) == (1, 1)
        assert [(e.index, e.term, e.kind) for e in first.log_entries] == [
            (2, 2, raft_pb2.ENTRY_KIND_NOOP)
        ]
    assert m.node.commit_index == 0  # nobody has acknowledged the no-op yet


async def test_a_candidate_hearing_from_a_leader_of_its_own_term_becomes_its_follower(
    h: Harness,
) -> None:
    """A candidate yields to a leader of its term.

    "If the leader's term (included in its RPC) is at least as large as the candidate's current
    term, then the candidate recognizes the leader as legitimate and returns to follower state."
    (Seed defect 6 kept the candidate campaigning.) Reference: section 5.2."""
    m = await h.member(terms=[1], term=1)
    await into_role(m, "candidate")
    assert m.node.current_term == 2

    reply = await m.node.handle_append_entries(append(2, 3, 1, 1, [entry(2, 2)]))

    assert (reply.term, reply.success, reply.match_index) == (2, True, 2)
    assert (m.node.role, m.node.current_term, m.node.leader_id) == ("follower", 2, 3)
    assert m.node.voted_for == 1  # its vote in term 2 stays cast
    assert log_terms(m.log) == [1, 2]
    assert m.node.leader() == (3, "10.0.0.3:8000")


async def test_at_most_one_vote_per_term_first_come_first_served(h: Harness) -> None:
    """One vote per term.

    "Each server will vote for at most one candidate in a given term, on a first-come-first-served
    basis." Figure 2: "If votedFor is null or candidateId, and candidate's log is at least as
    up-to-date as receiver's log, grant vote." Reference: section 5.2."""
    m = await h.member(terms=[1], term=1)

    first = await m.node.handle_request_vote(vote(2, 2, 1, 1))
    second = await m.node.handle_request_vote(vote(2, 3, 1, 1))
    repeated = await m.node.handle_request_vote(vote(2, 2, 1, 1))

    assert (first.term, first.vote_granted) == (2, True)
    assert (second.term, second.vote_granted) == (2, False)
    assert (repeated.term, repeated.vote_granted) == (2, True)  # a retried request, same answer
    assert (m.node.current_term, m.node.voted_for) == (2, 2)
    assert m.node.leader_id is None


async def test_a_vote_survives_a_crash_right_after_the_reply(h: Harness) -> None:
    """Figure 2: votedFor is persistent state, "updated on stable storage before responding to
    RPCs"; after a restart the node must not vote again in that term (seed defect 1 lost
    votedFor on restart and voted twice). Reference: section 5.2."""
    m = await h.member(terms=[1], term=1)
    granted = await m.node.handle_request_vote(vote(2, 2, 1, 1))
    assert granted.vote_granted

    restarted = await h.restart(m)  # the crash comes before anything else runs

    assert (restarted.node.current_term, restarted.node.voted_for) == (2, 2)
    other = await restarted.node.handle_request_vote(vote(2, 3, 1, 1))
    assert (other.term, other.vote_granted) == (2, False)
    again = await restarted.node.handle_request_vote(vote(2, 2, 1, 1))
    assert again.vote_granted


@pytest.mark.parametrize(
    "last_term, last_index, granted",
    [
        (3, 1, True),  # later last term, shorter log: more up to date
        (1, 9, False),  # earlier last term, longer log: behind
        (2, 4, True),  # same last term, longer log
        (2, 3, True),  # same last term, same length: at least as up to date
        (2, 2, False),  # same last term, shorter log
        (0, 0, False),  # empty log
    ],
)
async def test_a_vote_goes_only_to_a_candidate_whose_log_is_at_least_as_up_to_date(
    h: Harness, last_term: int, last_index: int, granted: bool
) -> None:
    """The up-to-date rule.

    "If the logs have last entries with different terms, then the log with the later term is more
    up-to-date. If the logs end with the same term, then whichever log is longer is more
    up-to-date." (Seed defect 4 required both a later term and a longer log.)
    Reference: section 5.4.1."""
    m = await h.member(terms=[1, 1, 2], term=2)

    reply = await m.node.handle_request_vote(vote(3, 2, last_index, last_term))

    assert (reply.term, reply.vote_granted) == (3, granted)
    assert m.node.current_term == 3
    assert m.node.voted_for == (2 if granted else None)
    assert (await durable_state(crashed_copy(m.disk), 1))[:2] == (3, m.node.voted_for)


async def test_granting_a_vote_resets_the_election_timer(h: Harness) -> None:
    """Figure 2, followers: "If election timeout elapses without receiving AppendEntries RPC from
    current leader or granting vote to candidate: convert to candidate" -- so granting a vote
    starts a fresh wait (seed defect 7 did not). Reference: Figure 2, section 5.2."""
    m = await h.member(terms=[1], term=2)
    m.node.start()
    before = election_timer(m.node)
    assert before is not None

    reply = await m.node.handle_request_vote(vote(2, 2, 1, 1))

    assert reply.vote_granted
    after = election_timer(m.node)
    assert after is not None and after is not before
    assert before.cancelled()


@pytest.mark.parametrize("why", ["already voted", "log behind", "stale term"])
async def test_refusing_a_vote_does_not_reset_the_election_timer(h: Harness, why: str) -> None:
    """Only a current leader's AppendEntries or a granted vote postpone an election (Figure 2,
    followers); a refused candidate must not keep this node from campaigning itself.
    Reference: Figure 2, section 5.2."""
    m = await h.member(terms=[1, 2], term=2, voted_for=2 if why == "already voted" else None)
    m.node.start()
    before = election_timer(m.node)
    request = {
        "already voted": vote(2, 3, 2, 2),
        "log behind": vote(2, 3, 1, 1),
        "stale term": vote(1, 3, 5, 1),
    }[why]

    reply = await m.node.handle_request_vote(request)

    assert not reply.vote_granted
    assert election_timer(m.node) is before
    assert before is not None and not before.cancelled()


async def test_a_higher_term_vote_request_does_not_make_the_candidate_the_leader(
    h: Harness,
) -> None:
    """A RequestVote only asks for a vote: "While waiting for votes, a candidate may receive an
    AppendEntries RPC from another server claiming to be leader" -- only that makes a leader
    known. Seed defect 7 took the candidate for the leader, and then the real winner's heartbeats
    did not reset its timer. Reference: section 5.2, Figure 2."""
    m = await h.member(cluster=CLUSTER5, terms=[1], term=3)
    await m.node.handle_append_entries(append(3, 2, 1, 1))
    assert m.node.leader_id == 2
    m.node.start()

    # As when leader 2 hands over to 3 (so the vote counts although 2 was just heard from).
    request = vote(4, 3, 1, 1)
    request.leadership_transfer = True
    reply = await m.node.handle_request_vote(request)

    assert (reply.term, reply.vote_granted) == (4, True)
    assert m.node.leader() == (None, None)
    # Node 5 won term 4 with the votes of 2, 4 and 5; its heartbeat is what makes it known.
    before = election_timer(m.node)
    heartbeat = await m.node.handle_append_entries(append(4, 5, 1, 1))
    assert (heartbeat.term, heartbeat.success) == (4, True)
    assert m.node.leader() == (5, "10.0.0.5:8000")
    after = election_timer(m.node)
    assert after is not None and after is not before


async def test_each_election_timeout_is_drawn_afresh_from_the_range(h: Harness) -> None:
    """A fresh random timeout for every wait.

    "Raft uses randomized election timeouts... election timeouts are chosen randomly from a
    fixed interval"; "Each candidate restarts its randomized election timeout at the start of an
    election, and it waits for that timeout to elapse before starting the next election."
    (Seed defect 8 used a fixed timeout.) Reference: section 5.2."""
    timing = Timing(
        heartbeat_interval=0.01,
        election_timeout_min=0.03,
        election_timeout_max=0.09,
        append_timeout=1.0,
    )
    m = await h.member(terms=[1], term=1, timing=timing)

    def unreachable(peer: int, request: object) -> None:
        raise PeerUnreachableError(f"{peer} is down")

    m.transport.policy = unreachable
    seen: list[asyncio.TimerHandle] = []
    waits: list[float] = []

    def note_new_timer() -> bool:
        timer = election_timer(m.node)
        if timer is not None and not any(timer is s for s in seen):
            seen.append(timer)
            waits.append(armed_for(m.node, timer))
        return len(waits) >= 6

    m.node.start()
    await eventually(note_new_timer, "the election timer was armed 6 times")

    for wait in waits:
        assert timing.election_timeout_min - 1e-6 <= wait <= timing.election_timeout_max + 1e-3
    assert len({round(w, 6) for w in waits}) == len(waits), f"timeouts repeat: {waits}"
    # Each wait that ran out asked again whether a majority would elect it in the next term; with
    # no peer answering, it never stood (thesis section 9.6).
    requests = await m.transport.wait_sent(VoteRequest, 2 * 5)
    assert {(r.term, r.pre_vote) for r in requests} == {(2, True)}
    assert (m.node.role, m.node.current_term) == ("follower", 1)


# ---- section 5.3: log replication, follower side -------------------------------------------------


async def test_an_append_whose_prev_entry_does_not_match_is_rejected_with_a_conflict_hint(
    h: Harness,
) -> None:
    """Figure 2, AppendEntries: "Reply false if log doesn't contain an entry at prevLogIndex whose
    term matches prevLogTerm". Section 5.3: "the follower can include the term of the conflicting
    entry and the first index it stores for that term" (raft.proto: conflict_term,
    conflict_index). Reference: section 5.3."""
    m = await h.member(terms=[1, 1, 2, 2, 2], term=3)
    m.node.start()
    timer = election_timer(m.node)

    reply = await m.node.handle_append_entries(append(3, 2, 4, 3, [entry(5, 3)], commit=5))

    assert (reply.term, reply.success) == (3, False)
    assert (reply.conflict_term, reply.conflict_index) == (2, 3)
    assert log_terms(m.log) == [1, 1, 2, 2, 2]
    assert m.node.commit_index == 0
    # The message is still from the current leader: it is known, and the timer restarts.
    assert m.node.leader_id == 2
    assert election_timer(m.node) is not timer


async def test_an_append_beyond_the_end_of_the_log_asks_for_the_next_index(h: Harness) -> None:
    """Figure 2, AppendEntries: "Reply false if log doesn't contain an entry at prevLogIndex";
    when the log is too short, raft.proto's hint is conflict_term 0 and conflict_index = last
    index + 1. Reference: section 5.3."""
    m = await h.member(terms=[1, 1, 2], term=3)

    reply = await m.node.handle_append_entries(append(3, 2, 7, 3, [entry(8, 3)]))

    assert (reply.term, reply.success) == (3, False)
    assert (reply.conflict_term, reply.conflict_index) == (0, 4)
    assert log_terms(m.log) == [1, 1, 2]


async def test_conflicting_entries_and_all_that_follow_are_deleted(h: Harness) -> None:
    """Figure 2, AppendEntries: "If an existing entry conflicts with a new one (same index but
    different terms), delete the existing entry and all that follow it"; "Append any new entries
    not already in the log". (Seed defect 3 overwrote index by index and kept the stale tail.)
    Reference: section 5.3."""
    m = await h.member(terms=[1, 1, 2, 2, 2], term=2)

    reply = await m.node.handle_append_entries(append(3, 2, 2, 1, [entry(3, 3, "x", "new")]))
    survived = crashed_copy(m.disk)

    assert (reply.term, reply.success, reply.match_index) == (3, True, 3)
    assert m.log.last_index == 3
    assert log_terms(m.log) == [1, 1, 3]
    assert m.log.entry(3).value == "new"
    assert (await durable_state(survived, 1))[2] == [1, 1, 3]


async def test_a_repeated_or_reordered_older_append_does_not_truncate_matching_entries(
    h: Harness,
) -> None:
    """Figure 2, AppendEntries: only an entry that "conflicts with a new one (same index but
    different terms)" is deleted; an entry already present is kept ("Append any new entries not
    already in the log"), so a delayed message cannot shorten the log. Reference: section 5.3."""
    m = await h.member(terms=[1], term=2)
    newer = append(2, 2, 1, 1, [entry(2, 2), entry(3, 2), entry(4, 2)])
    older = append(2, 2, 1, 1, [entry(2, 2)])
    assert (await m.node.handle_append_entries(newer)).match_index == 4

    late = await m.node.handle_append_entries(older)
    repeated = await m.node.handle_append_entries(newer)

    assert (late.success, late.match_index) == (True, 2)
    assert (repeated.success, repeated.match_index) == (True, 4)
    assert log_terms(m.log) == [1, 2, 2, 2]
    assert (await durable_state(crashed_copy(m.disk), 1))[2] == [1, 2, 2, 2]


async def test_a_follower_commits_up_to_min_of_leader_commit_and_its_last_new_entry(
    h: Harness,
) -> None:
    """Figure 2, AppendEntries: "If leaderCommit > commitIndex, set commitIndex = min(leaderCommit,
    index of last new entry)"; all servers: "If commitIndex > lastApplied: increment lastApplied,
    apply log[lastApplied] to state machine" -- in order, each entry once (seed defects 10, 13).
    Reference: Figure 2, section 5.3."""
    m = await h.member(term=1)
    machine = RecordingStateMachine()
    m.node.state_machine = machine
    first = append(1, 2, 0, 0, [entry(1, 1, "a", "1"), entry(2, 1, "a", "2")], commit=5)

    await m.node.handle_append_entries(first)
    assert (m.node.commit_index, machine.applied, m.node.get_value("a")) == (2, [1, 2], "2")

    await m.node.handle_append_entries(append(1, 2, 2, 1, commit=5))  # a heartbeat
    assert m.node.commit_index == 2

    third = append(1, 2, 2, 1, [entry(3, 1, "b", "x")], commit=3)
    await m.node.handle_append_entries(third)
    await m.node.handle_append_entries(first)  # delayed duplicates change nothing
    await m.node.handle_append_entries(third)

    assert (m.node.commit_index, m.node.last_applied) == (3, 3)
    assert machine.applied == [1, 2, 3]
    assert (m.node.get_value("a"), m.node.get_value("b")) == ("2", "x")


async def test_a_follower_does_not_commit_its_entries_past_what_the_leader_sent(
    h: Harness,
) -> None:
    """Figure 2's min(leaderCommit, index of last new entry): entries after those the leader's
    message checked may belong to a deposed leader and must not be committed because leaderCommit
    is higher. Reference: Figure 2, section 5.3."""
    m = await h.member(terms=[1, 1, 2, 2], term=2)

    reply = await m.node.handle_append_entries(append(3, 2, 2, 1, commit=4))

    assert (reply.success, reply.match_index) == (True, 2)
    assert (m.node.commit_index, m.node.last_applied) == (2, 2)
    assert m.node.get_value("k3") is None


async def test_a_follower_acknowledges_entries_only_once_they_are_durable(h: Harness) -> None:
    """Figure 2: persistent state (the log) is "updated on stable storage before responding to
    RPCs"; the leader counts the reply as a replica (seed defect 2 acknowledged entries held only
    in memory). A crash right after the reply must keep them. Reference: Figure 2, section 5.3."""
    m = await h.member(terms=[1], term=1)

    reply = await m.node.handle_append_entries(
        append(2, 2, 1, 1, [entry(2, 2), entry(3, 2)], commit=1)
    )
    m.disk.crash()

    assert (reply.success, reply.match_index) == (True, 3)
    restarted = await RaftLog.open(data_dir(1), m.disk)
    h.logs.append(restarted)
    assert log_terms(restarted) == [1, 2, 2]
    assert restarted.current_term == 2


# ---- sections 5.3 and 5.4: the leader ------------------------------------------------------------


async def test_the_leader_backs_up_with_the_conflict_hint_and_repairs_divergent_logs(
    h: Harness,
) -> None:
    """The leader backs up by whole terms.

    "When rejecting an AppendEntries request, the follower can include the term of the
    conflicting entry and the first index it stores for that term. With this information, the
    leader can decrement nextIndex to bypass all of the conflicting entries in that term"; "the
    leader handles inconsistencies by forcing the followers' logs to duplicate its own."
    (Figure 7's followers (a) and (f).) Reference: section 5.3."""
    net = InMemoryNetwork()
    logs = {
        1: [1, 1, 1, 4, 4, 5, 5, 6, 6, 6],
        2: [1, 1, 1, 4],
        3: [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
    }
    disks = {i: MemoryDisk() for i in logs}
    nodes = {
        i: h.node(i, CLUSTER3, await h.open_log(disks[i], i, terms, 6), network=net)
        for i, terms in logs.items()
    }
    leader = nodes[1]

    await leader.start_election()
    await net.wait_until(lambda: leader.role == "leader", DEADLINE, "node 1 leads")
    expected = logs[1] + [7]
    await net.wait_until(
        lambda: all(log_terms(n.log) == expected and n.commit_index == 11 for n in nodes.values()),
        DEADLINE,
        "every log matches the leader's and index 11 is committed everywhere",
    )

    def appends_to(peer: int) -> list[tuple[int, bool, int, int]]:
        return [
            (
                d.request.prev_log_index,
                d.reply.success,
                d.reply.conflict_term,
                d.reply.conflict_index,
            )
            for d in net.deliveries
            if d.dst == peer
            and isinstance(d.request, AppendEntriesRequest)
            and isinstance(d.reply, AppendEntriesResponse)
        ]

    # Follower (f) holds terms 2 and 3 the leader never had: one round trip per term skipped.
    assert appends_to(3)[:3] == [(10, False, 3, 7), (6, False, 2, 4), (3, True, 0, 0)]
    # Follower (a) is short: it asks for the entry after its last.
    assert appends_to(2)[:2] == [(10, False, 0, 5), (4, True, 0, 0)]
    for node in nodes.values():
        assert node.last_applied == 11
        assert node.get_value("k10") == "v10-t6"
        assert node.get_value("k11") is None  # index 11 is the new leader's no-op
    for i in (2, 3):
        assert (await durable_state(crashed_copy(disks[i]), i))[2] == expected


async def test_a_leader_commits_an_earlier_terms_entry_only_with_one_of_its_own(
    h: Harness,
) -> None:
    """Figure 8: no commit by counting old-term replicas.

    "Raft never commits log entries from previous terms by counting replicas. Only log entries
    from the leader's current term are committed by counting replicas; once an entry from the
    current term has been committed in this way, then all prior entries are committed indirectly."
    (Figure 8.) Reference: section 5.4.2."""
    m = await h.member(terms=[1, 2], term=2, voted_for=1)
    await m.node.start_election()
    request = (await m.transport.wait_sent(VoteRequest, 1, peer=2))[0]
    log_path = os.path.join(data_dir(1), LOG_FILE)
    # Hold the leader's own write of its no-op, so that only a follower holds index 3.
    gate = h.gate(m.disk, lambda op: op.path == log_path)
    m.node.handle_vote_reply(2, request, RequestVoteResponse(term=3, vote_granted=True))
    assert (m.node.role, log_terms(m.log)) == ("leader", [1, 2, 3])
    await eventually(lambda: bool(gate.held), "the leader starts writing its no-op")
    sent = (await m.transport.wait_sent(AppendEntriesRequest, 1, peer=2))[0]
    assert (sent.prev_log_index, len(sent.log_entries)) == (2, 1)

    m.transport.answer(2, AppendEntriesResponse(term=3, success=True, match_index=3))
    await eventually(lambda: m.node.progress[2].match_index == 3, "node 2's reply is handled")

    # Index 2 (term 2) is now on nodes 1 and 2, a majority; index 3 only on node 2.
    assert m.log.durable_index == 2
    assert m.node.commit_index == 0
    assert m.node.last_applied == 0

    gate.release()
    await eventually(lambda: m.node.commit_index == 3, "index 3 commits")
    assert m.node.last_applied == 3
    assert m.node.get_value("k2") == "v2-t2"


async def test_a_proposal_returns_once_committed_and_applied_and_a_follower_redirects(
    h: Harness,
) -> None:
    """A proposal returns once applied; others redirect.

    "When the entry has been safely replicated, the leader applies the entry to its state
    machine and returns the result of that execution to the client." Section 8: "If the client's
    first choice is not the leader, that server will reject the client's request and supply
    information about the most recent leader it has heard from." (Seed defect 13 answered before
    applying.) Reference: sections 5.3 and 8."""
    net = InMemoryNetwork()
    nodes = {
        i: h.node(i, CLUSTER3, await h.open_log(MemoryDisk(), i, [1], 1), network=net)
        for i in (1, 2, 3)
    }
    await nodes[1].start_election()
    await net.wait_until(
        lambda: nodes[2].leader_id == 1 and nodes[3].leader_id == 1,
        DEADLINE,
        "both followers know node 1 leads",
    )

    await nodes[1].propose_mapping("colour", "blue")
    index = nodes[1].log.last_index
    read = nodes[1].get_value("colour")  # no await between: the same instant as the reply

    assert read == "blue"
    assert nodes[1].commit_index >= index and nodes[1].last_applied >= index
    holders = [i for i in (2, 3) if nodes[i].log.last_index >= index]
    assert holders, "the proposal returned before any follower held the entry"

    before = nodes[2].log.last_index
    with pytest.raises(NotLeaderError) as redirect:
        await nodes[2].propose_mapping("colour", "red")
    assert (redirect.value.leader_id, redirect.value.leader_address) == (1, "10.0.0.1:8000")
    assert nodes[2].log.last_index == before

    lonely = await h.member(node_id=1, terms=[1], term=1)
    with pytest.raises(NotLeaderError) as nobody:
        await lonely.node.propose_mapping("colour", "green")
    assert (nobody.value.leader_id, nobody.value.leader_address) == (None, None)
    assert lonely.log.last_index == 1


# ---- input no correct member sends ---------------------------------------------------------------

ABSURD = 2**63 - 1


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(vote(4, 99, 2, 2), id="vote-unknown-requester"),
        pytest.param(vote(4, 1, 2, 2), id="vote-from-itself"),
        pytest.param(vote(4, 3, -1, 2), id="vote-negative-index"),
        pytest.param(vote(ABSURD, 3, 2, 2), id="vote-absurd-term"),
        pytest.param(vote(-4, 3, 2, 2), id="vote-negative-term"),
        pytest.param(append(4, 99, 2, 2), id="append-unknown-requester"),
        pytest.param(append(4, 1, 2, 2), id="append-from-itself"),
        pytest.param(append(4, 3, -1, 0), id="append-negative-prev-index"),
        pytest.param(append(ABSURD, 3, 2, 2), id="append-absurd-term"),
        pytest.param(append(4, 3, 2, 2, commit=-5), id="append-negative-commit"),
        pytest.param(append(4, 3, 2, 2, commit=ABSURD), id="append-absurd-commit"),
        pytest.param(append(4, 3, 2, 2, [entry(5, 4)]), id="append-entries-with-a-gap"),
        pytest.param(append(4, 3, 2, 2, [entry(3, 9)]), id="append-entry-term-above-leaders"),
        pytest.param(append(4, 3, 2, 2, [entry(3, 1)]), id="append-entry-term-below-prev"),
        pytest.param(pre_vote(ABSURD, 3, 2, 2), id="pre-vote-absurd-term"),
        pytest.param(
            raft_pb2.TimeoutNowRequest(term=3, requester_id=99), id="timeout-now-unknown-requester"
        ),
        pytest.param(
            raft_pb2.TimeoutNowRequest(term=ABSURD, requester_id=2), id="timeout-now-absurd-term"
        ),
    ],
)
async def test_a_message_no_correct_member_sends_is_refused_and_changes_nothing(
    h: Harness, request_: VoteRequest | AppendEntriesRequest | raft_pb2.TimeoutNowRequest
) -> None:
    """A forged or corrupted peer message must not move the term, the vote, the log or the timer:
    terms only grow and "each server will vote for at most one candidate in a given term", so one
    accepted absurd term would wreck the cluster for good. Reference: sections 5.1 and 5.2."""
    m = await h.member(terms=[1, 2], term=3)
    await m.node.handle_append_entries(append(3, 2, 2, 2))
    m.node.start()
    state = (m.node.role, m.node.current_term, m.node.voted_for, m.node.leader_id)
    timer = election_timer(m.node)
    ops = len(m.disk.ops)

    with pytest.raises(InvalidRequestError):
        if isinstance(request_, VoteRequest):
            await m.node.handle_request_vote(request_)
        elif isinstance(request_, raft_pb2.TimeoutNowRequest):
            await m.node.handle_timeout_now(request_)
        else:
            await m.node.handle_append_entries(request_)

    assert (m.node.role, m.node.current_term, m.node.voted_for, m.node.leader_id) == state
    assert log_terms(m.log) == [1, 2]
    assert m.node.commit_index == 0
    assert election_timer(m.node) is timer
    assert m.disk.ops[ops:] == []


# ---- whole clusters over the in-memory network ---------------------------------------------------


def settled_leader(nodes: dict[int, RaftNode], among: Sequence[int]) -> RaftNode | None:
    """The leader of `among` once every one of them follows it in its term, else None."""
    group = [nodes[i] for i in among]
    found = [n for n in group if n.role == "leader"]
    if len(found) != 1:
        return None
    leader = found[0]
    for n in group:
        if n.current_term != leader.current_term or n.leader_id != leader.node_id:
            return None
    return leader


def senders_per_term(net: InMemoryNetwork) -> dict[int, set[int]]:
    """For each term, every node that sent AppendEntries in it (only a leader does)."""
    found: dict[int, set[int]] = {}
    for d in net.deliveries:
        if isinstance(d.request, AppendEntriesRequest):
            found.setdefault(d.request.term, set()).add(d.src)
    return found


async def running_cluster(
    h: Harness, size: int, net: InMemoryNetwork, timing: Timing = BRISK
) -> tuple[dict[int, RaftNode], RaftNode]:
    """Nodes 1..size on `net`, started, and the leader they settle on."""
    ids = list(range(1, size + 1))
    cluster = cluster_of(size)
    nodes = {
        i: h.node(i, cluster, await h.open_log(MemoryDisk(), i), timing=timing, network=net)
        for i in ids
    }
    for node in nodes.values():
        node.start()
    await net.wait_until(lambda: settled_leader(nodes, ids) is not None, DEADLINE, "a leader")
    leader = settled_leader(nodes, ids)
    assert leader is not None
    return nodes, leader


@pytest.mark.parametrize("size", [3, 5])
async def test_a_cluster_elects_one_leader_per_term_replicates_and_survives_a_partition(
    h: Harness, size: int
) -> None:
    """Figure 3: "Election Safety: at most one leader can be elected in a given term"; "Leader
    Append-Only" and "Log Matching". A leader cut off from the others is replaced in a higher term;
    once the partition heals, "If a candidate or leader discovers that its term is out of date, it
    immediately reverts to follower state", and its log is made to match. Reference: sections 5.2,
    5.3, 5.4."""
    net = InMemoryNetwork()
    nodes, first = await running_cluster(h, size, net)
    ids = list(nodes)
    for i in range(3):
        await first.propose_mapping(f"key{i}", f"value{i}")
    await net.wait_until(
        lambda: all(n.get_value("key2") == "value2" for n in nodes.values()),
        DEADLINE,
        "every node applied the proposals",
    )
    assert all(n.get_value("key0") == "value0" for n in nodes.values())

    net.isolate(first.node_id)
    # Its proposal cannot commit: the others never see it.
    lost = asyncio.create_task(first.propose_mapping("lost", "never"))
    others = [i for i in ids if i != first.node_id]
    await net.wait_until(
        lambda: settled_leader(nodes, others) is not None, DEADLINE, "a new leader"
    )
    second = settled_leader(nodes, others)
    assert second is not None and second.current_term > first.current_term
    await second.propose_mapping("after", "partition")

    net.heal()
    with pytest.raises(CommitUnknownError):
        await lost
    await net.wait_until(
        lambda: first.role == "follower"
        and all(
            log_terms(n.log) == log_terms(second.log) and n.get_value("after") == "partition"
            for n in nodes.values()
        ),
        DEADLINE,
        "the old leader steps down and every log matches the new leader's",
    )
    assert first.current_term >= second.current_term
    assert all(n.get_value("lost") is None for n in nodes.values())
    for term, senders in senders_per_term(net).items():
        assert len(senders) == 1, f"term {term} had leaders {sorted(senders)}"


@pytest.mark.parametrize("size", [3, 5])
async def test_a_read_is_served_only_by_a_leader_a_majority_still_follows(
    h: Harness, size: int
) -> None:
    """Thesis section 6.4: "the leader needs to make sure it hasn't been superseded by a newer leader
    of which it is unaware. It issues a new round of heartbeats and waits for their
    acknowledgments from a majority of the cluster." A leader cut off from the others cannot
    confirm that, so it must not answer from its stale state. Reference: thesis section 6.4."""
    net = InMemoryNetwork()
    # The isolated leader gives up on confirming itself after one second rather than five.
    nodes, first = await running_cluster(
        h, size, net, dataclasses.replace(BRISK, proposal_timeout=1.0)
    )
    ids = list(nodes)
    await first.propose_mapping("color", "red")
    assert await first.read("color") == "red"
    assert await first.read("missing") is None

    net.isolate(first.node_id)
    stale_read = asyncio.create_task(first.read("color"))
    others = [i for i in ids if i != first.node_id]
    await net.wait_until(lambda: settled_leader(nodes, others) is not None, DEADLINE, "new leader")
    second = settled_leader(nodes, others)
    assert second is not None
    await second.propose_mapping("color", "blue")
    assert await second.read("color") == "blue"
    # The old leader's state still says "red" (it may already have stepped down by check quorum, or
    # still believe it leads); it must not answer with it.
    assert first.get_value("color") == "red"
    with pytest.raises((UnavailableError, NotLeaderError)):
        await stale_read
    follower = nodes[next(i for i in others if i != second.node_id)]
    with pytest.raises(NotLeaderError):
        await follower.read("color")


# ---- leadership: pre-vote (thesis 9.6), recent leaders (4.2.3), check quorum (6.2), transfer (3.10)


@pytest.mark.parametrize("case", ["granted", "log behind", "stale term", "leader heard recently"])
async def test_a_pre_vote_is_answered_without_changing_term_vote_or_timer(
    h: Harness, case: str
) -> None:
    """A pre-vote changes nothing on the voter.

    Thesis section 9.6: "In the Pre-Vote algorithm, a candidate only increments its term if it first
    learns from a majority of the cluster that they would be willing to grant the candidate their
    votes (if the candidate's log is sufficiently up-to-date, and the voters have not received
    heartbeats from a valid leader for at least a baseline election timeout)." Answering is not
    voting: term, vote and election timer stay as they were. Reference: thesis section 9.6."""
    m = await h.member(terms=[1, 2], term=2)
    if case == "leader heard recently":
        await m.node.handle_append_entries(append(2, 3, 2, 2))
    m.node.start()
    state = (m.node.role, m.node.current_term, m.node.voted_for, m.node.leader_id)
    timer = election_timer(m.node)
    request = {
        "granted": pre_vote(3, 2, 2, 2),
        "log behind": pre_vote(3, 2, 1, 1),
        "stale term": pre_vote(2, 2, 9, 2),
        "leader heard recently": pre_vote(3, 2, 2, 2),
    }[case]
    request.term = 1 if case == "stale term" else request.term

    reply = await m.node.handle_request_vote(request)

    granted = case == "granted"
    assert reply.vote_granted is granted
    # A grant names the term it was asked about; a refusal tells the candidate this node's term.
    assert reply.term == (3 if granted else 2)
    assert (m.node.role, m.node.current_term, m.node.voted_for, m.node.leader_id) == state
    assert election_timer(m.node) is timer and timer is not None and not timer.cancelled()
    assert (await durable_state(crashed_copy(m.disk), 1))[:2] == (2, None)
    # A real vote request for the same term is still free to be granted afterwards.
    if granted:
        real = await m.node.handle_request_vote(vote(3, 2, 2, 2))
        assert (real.term, real.vote_granted) == (3, True)


async def test_the_term_rises_only_after_a_majority_of_pre_votes(h: Harness) -> None:
    """A candidate stands only with a majority of pre-votes.

    Thesis section 9.6: "Only if the candidate believed it could get votes from a majority of the
    cluster would it increment its term and start a normal election." A granted pre-vote carries a
    term nobody holds yet and must not be mistaken for a newer term. Reference: thesis 9.6."""
    m = await h.member(cluster=CLUSTER5, terms=[1], term=1)

    m.node.start_pre_vote()

    sent = await m.transport.wait_sent(VoteRequest, 4)
    assert {(r.term, r.pre_vote, r.last_log_index, r.last_log_term) for r in sent} == {
        (2, True, 1, 1)
    }
    assert (m.node.role, m.node.current_term, m.node.voted_for) == ("follower", 1, None)
    m.transport.answer(2, RequestVoteResponse(term=2, vote_granted=True))
    m.transport.answer(3, RequestVoteResponse(term=1, vote_granted=False))
    await m.transport.wait_sent(VoteRequest, 4)
    # Two of five (counting itself): nothing moves, and the grant's term 2 was not adopted.
    assert (m.node.role, m.node.current_term, m.node.voted_for) == ("follower", 1, None)
    assert not [r for r in m.transport.requests(VoteRequest) if not r.pre_vote]

    m.transport.answer(4, RequestVoteResponse(term=2, vote_granted=True))

    real = await m.transport.wait_sent(VoteRequest, 4 + 4)
    assert {(r.term, r.pre_vote, r.leadership_transfer) for r in real[4:]} == {(2, False, False)}
    assert (m.node.role, m.node.current_term, m.node.voted_for) == ("candidate", 2, 1)


async def test_a_refused_pre_vote_with_a_newer_term_brings_a_stale_node_up_to_date(
    h: Harness,
) -> None:
    """A refusal carries the voter's own term; a newer one is real, so a node that missed it catches
    up (Figure 2: "If RPC request or response contains term T > currentTerm: set currentTerm = T,
    convert to follower"), without standing in it. Reference: thesis 9.6, section 5.1."""
    m = await h.member(terms=[1], term=1)
    m.node.start_pre_vote()
    await m.transport.wait_sent(VoteRequest, 2)

    m.transport.answer(2, RequestVoteResponse(term=5, vote_granted=False))

    await eventually(lambda: m.node.current_term == 5, "the node adopted term 5")
    assert (m.node.role, m.node.current_term, m.node.voted_for) == ("follower", 5, None)
    await eventually_durable(m.disk, 1, 5, None)
    # The other peer's grant for the stale term 2 comes too late to count.
    m.transport.answer(3, RequestVoteResponse(term=2, vote_granted=True))
    await m.transport.wait_sent(VoteRequest, 2)
    assert not m.transport.unsettled(VoteRequest)
    assert (m.node.role, m.node.current_term) == ("follower", 5)
    assert all(r.pre_vote for r in m.transport.requests(VoteRequest))


@pytest.mark.parametrize("role", ["follower", "leader"])
async def test_a_vote_request_soon_after_hearing_from_the_leader_is_ignored(
    h: Harness, role: str
) -> None:
    """Recent leaders keep their followers.

    Thesis section 4.2.3: "if a server receives a RequestVote request within the minimum election
    timeout of hearing from a current leader, it does not update its term or grant its vote." A
    leader counts as hearing from itself. A candidate the leader asked to take over says so, and is
    heard ("you have permission to disrupt the leader"). Reference: thesis 4.2.3, 3.10."""
    timing = dataclasses.replace(
        QUIET, heartbeat_interval=0.1, election_timeout_min=0.2, election_timeout_max=20.0
    )
    m = await h.member(terms=[1], term=1, timing=timing)
    if role == "follower":
        await m.node.handle_append_entries(append(1, 2, 1, 1))
    else:
        await into_role(m, "leader")
    term = m.node.current_term
    contact = asyncio.get_running_loop().time()

    ignored = await m.node.handle_request_vote(vote(term + 1, 3, 9, term))

    assert (ignored.term, ignored.vote_granted) == (term, False)
    assert (m.node.role, m.node.current_term) == (role, term)
    assert (await durable_state(crashed_copy(m.disk), 1))[:2] == (term, m.node.voted_for)

    if role == "follower":
        # Once the minimum election timeout has passed without the leader, the vote is free.
        loop = asyncio.get_running_loop()
        await eventually(lambda: loop.time() - contact > 0.2, "the leader's lease ran out")
        later = await m.node.handle_request_vote(vote(term + 1, 3, 9, term))
        assert (later.term, later.vote_granted) == (term + 1, True)
    else:
        transfer = vote(term + 1, 3, 9, term)
        transfer.leadership_transfer = True
        granted = await m.node.handle_request_vote(transfer)
        assert (granted.term, granted.vote_granted) == (term + 1, True)
        assert (m.node.role, m.node.voted_for) == ("follower", 3)


async def test_a_leader_that_no_majority_answers_for_an_election_timeout_steps_down(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Check quorum.

    Thesis section 6.2: "a leader steps down if an election timeout elapses without a successful
    round of heartbeats to a majority of its cluster; this allows clients to retry their requests
    with another server." Its waiting proposal fails as when leadership is lost, and it no longer
    takes writes. Reference: thesis section 6.2."""
    timing = Timing(
        heartbeat_interval=0.05,
        election_timeout_min=0.4,
        election_timeout_max=0.8,
        proposal_timeout=10.0,
        append_timeout=0.2,
    )
    m = await h.member(terms=[1], term=1, timing=timing)
    answering = {2}

    def some_answer(peer: int, request: object) -> AppendEntriesResponse | None:
        if not isinstance(request, AppendEntriesRequest) or peer not in answering:
            raise PeerUnreachableError(f"{peer} is cut off")
        match = request.prev_log_index + len(request.log_entries)
        return AppendEntriesResponse(term=request.term, success=True, match_index=match)

    m.transport.policy = some_answer
    caplog.set_level(logging.INFO, logger="raft")
    await into_role(m, "leader")
    loop = asyncio.get_running_loop()
    elected = loop.time()
    # Node 2's answers make a majority of three: the leader stays, timeout after timeout.
    await eventually(lambda: loop.time() - elected > 2 * 0.8, "two election timeouts passed")
    assert (m.node.role, m.node.current_term) == ("leader", 2)

    answering.clear()
    pending = asyncio.create_task(m.node.propose_mapping("k", "v"))
    await eventually(lambda: m.node.role == "follower", "the leader stepped down")

    assert (m.node.current_term, m.node.leader_id) == (2, None)
    with pytest.raises(CommitUnknownError):
        await pending
    with pytest.raises(NotLeaderError):
        await m.node.propose_mapping("k", "v2")
    assert any("check quorum" in r.getMessage() for r in caplog.records)


async def test_timeout_now_starts_an_election_at_once_that_voters_honour(h: Harness) -> None:
    """TimeoutNow.

    Thesis section 3.10: "The prior leader sends a TimeoutNow request to the target server. This
    request has the same effect as the target server's election timer firing: the target server
    starts a new election (incrementing its term and becoming a candidate)." It skips the pre-vote,
    and its vote requests carry the flag that lets voters disrupt the leader. A TimeoutNow of an old
    term is ignored. Reference: thesis sections 3.10 and 4.2.3."""
    m = await h.member(terms=[1], term=1)
    await m.node.handle_append_entries(append(1, 2, 1, 1))

    stale = await m.node.handle_timeout_now(raft_pb2.TimeoutNowRequest(term=0, requester_id=2))
    assert stale.term == 1 and (m.node.role, m.node.current_term) == ("follower", 1)

    reply = await m.node.handle_timeout_now(raft_pb2.TimeoutNowRequest(term=1, requester_id=2))

    assert reply.term == 1
    assert (m.node.role, m.node.current_term, m.node.voted_for) == ("candidate", 2, 1)
    sent = await m.transport.wait_sent(VoteRequest, 2)
    assert {(r.term, r.pre_vote, r.leadership_transfer) for r in sent} == {(2, False, True)}
    # A voter that heard from leader 2 this instant still grants it.
    voter = await h.member(node_id=3, terms=[1], term=1)
    await voter.node.handle_append_entries(append(1, 2, 1, 1))
    granted = await voter.node.handle_request_vote(sent[0])
    assert (granted.term, granted.vote_granted) == (2, True)


@pytest.mark.slow
async def test_a_cut_off_node_does_not_raise_its_term_or_depose_the_leader_when_it_returns(
    h: Harness,
) -> None:
    """The disruption pre-vote prevents.

    Thesis section 9.6: a server that rejoins after being cut off would otherwise have been
    "incrementing its term" with each timeout and, on return, force the leader to step down. With
    pre-vote, "a candidate only increments its term if it first learns from a majority of the cluster
    that they would be willing to grant the candidate their votes". Reference: thesis 9.6."""
    net = InMemoryNetwork()
    nodes, leader = await running_cluster(h, 3, net, SEDATE)
    term = leader.current_term
    cut = nodes[next(i for i in nodes if i != leader.node_id)]
    rounds: list[int] = []
    pre_vote_round = cut.start_pre_vote

    def counted() -> None:
        rounds.append(cut.current_term)
        pre_vote_round()

    cut.start_pre_vote = counted  # type: ignore[method-assign]
    net.isolate(cut.node_id)
    await leader.propose_mapping("while", "away")
    await eventually(lambda: len(rounds) >= 3, "three election timeouts on the cut-off node")
    assert cut.current_term == term and set(rounds) == {term}

    net.heal()
    await leader.propose_mapping("after", "return")
    await net.wait_until(
        lambda: cut.get_value("after") == "return", DEADLINE, "the returning node caught up"
    )
    # It never stood, so it could depose nobody: the leader leads on in its term.
    assert not [
        d
        for d in net.deliveries
        if isinstance(d.request, VoteRequest) and d.src == cut.node_id and not d.request.pre_vote
    ]
    assert (leader.role, leader.current_term) == ("leader", term)
    assert cut.leader_id == leader.node_id and cut.current_term == term


async def test_leadership_transfer_catches_the_target_up_then_hands_over_or_gives_up(
    h: Harness,
) -> None:
    """Leadership transfer.

    Thesis section 3.10: "1. The prior leader stops accepting new client requests. 2. The prior
    leader fully updates the target server's log to match its own ... 3. The prior leader sends a
    TimeoutNow request to the target server." And: "If the transfer does not complete after about
    one election timeout, the prior leader aborts the transfer and resumes accepting client
    requests." Reference: thesis section 3.10."""
    net = InMemoryNetwork()
    nodes, first = await running_cluster(h, 3, net, SEDATE)
    lagging, other = (nodes[i] for i in sorted(nodes) if i != first.node_id)
    net.disconnect(first.node_id, lagging.node_id)
    await first.propose_mapping("k1", "v1")  # committed without the lagging node

    # To a target it cannot reach: writes are refused (pointing at the target) until it gives up.
    doomed = asyncio.create_task(first.transfer_leadership(lagging.node_id))
    await asyncio.sleep(0)  # one turn of the loop: the transfer begins
    with pytest.raises(NotLeaderError) as refused:
        await first.propose_mapping("k2", "refused")
    assert refused.value.leader_id == lagging.node_id
    with pytest.raises(TransferFailedError):
        await doomed
    assert first.role == "leader"
    await first.propose_mapping("k2", "v2")

    # None: the most up-to-date other node.
    assert await first.transfer_leadership(None) == other.node_id
    assert (other.role, other.current_term) == ("leader", first.current_term)
    assert first.role == "follower"
    await net.wait_until(lambda: first.leader_id == other.node_id, DEADLINE, "old leader follows")

    # To the lagging node, once it is reachable: first brought up to date, then it takes over.
    net.heal()
    await net.wait_until(
        lambda: settled_leader(nodes, list(nodes)) is other, DEADLINE, "all follow the new leader"
    )
    net.disconnect(other.node_id, lagging.node_id)
    await other.propose_mapping("k3", "v3")
    behind = lagging.log.last_index
    net.heal()
    last = other.log.last_index
    assert behind < last

    assert await other.transfer_leadership(lagging.node_id) == lagging.node_id

    asked = [
        d.request
        for d in net.deliveries
        if isinstance(d.request, VoteRequest) and d.request.leadership_transfer
    ]
    assert asked and asked[-1].requester_id == lagging.node_id
    assert asked[-1].last_log_index == last  # it held the whole log before it stood
    assert lagging.role == "leader" and lagging.get_value("k3") is not None
    await lagging.propose_mapping("k4", "v4")
    for term, senders in senders_per_term(net).items():
        assert len(senders) == 1, f"term {term} had leaders {sorted(senders)}"


# ---- thesis chapter 5: snapshots and InstallSnapshot ---------------------------------------------


def snapshot_bytes(index: int, term: int, key: str = "snap") -> bytes:
    """A leader's snapshot file for a log whose entries 1..index each set k<i>; `key` holds index."""
    machine = KeyValueStateMachine()
    for i in range(1, index + 1):
        machine.apply(entry(i, 1))
    machine._data[key] = str(index)
    members = Membership.bootstrap(CLUSTER3)
    return encode_snapshot(index, term, members, machine.snapshot().encode())


def install(
    term: int, leader: int, index: int, last_term: int, data: bytes, offset: int, size: int
) -> InstallSnapshotRequest:
    whole = snapshot_bytes(index, last_term)
    return InstallSnapshotRequest(
        term=term,
        requester_id=leader,
        last_included_index=index,
        last_included_term=last_term,
        offset=offset,
        total_size=len(whole),
        data=data[offset : offset + size],
        done=offset + size >= len(whole),
        checksum=zlib.crc32(whole),
    )


async def test_install_snapshot_with_a_stale_term_is_refused_at_once(h: Harness) -> None:
    """Thesis Figure 5.3, InstallSnapshot receiver: "1. Reply immediately if term < currentTerm".
    Reference: thesis chapter 5."""
    m = await h.member(terms=[1, 1], term=3)
    data = snapshot_bytes(10, 2)

    reply = await m.node.handle_install_snapshot(install(2, 2, 10, 2, data, 0, len(data)))

    assert (reply.term, reply.installed, reply.next_offset) == (3, False, 0)
    assert log_terms(m.log) == [1, 1] and m.node.commit_index == 0
    assert m.node.leader_id is None


async def test_install_snapshot_chunks_are_written_in_order_then_the_snapshot_replaces_the_log(
    h: Harness,
) -> None:
    """Thesis Figure 5.3: "2. Create new snapshot file if first chunk (offset is 0) 3. Write data
    into snapshot file at given offset 4. Reply and wait for more data chunks if done is false
    5. Save snapshot file, discard any existing or partial snapshot with a smaller index ...
    7. Discard the entire log 8. Reset state machine using snapshot contents". A chunk out of order
    is answered with the offset the follower wants, so a lost chunk resumes where it was.
    Reference: thesis chapter 5."""
    m = await h.member(terms=[1, 1, 1], term=2)
    data = snapshot_bytes(10, 2)
    third = len(data) // 3

    first = await m.node.handle_install_snapshot(install(2, 2, 10, 2, data, 0, third))
    skipped = await m.node.handle_install_snapshot(install(2, 2, 10, 2, data, 2 * third, 1 << 20))
    second = await m.node.handle_install_snapshot(install(2, 2, 10, 2, data, third, third))
    assert (first.next_offset, first.installed) == (third, False)
    assert (skipped.next_offset, skipped.installed) == (third, False)
    assert (second.next_offset, second.installed) == (2 * third, False)
    assert log_terms(m.log) == [1, 1, 1] and m.node.get_value("snap") is None

    last = await m.node.handle_install_snapshot(install(2, 2, 10, 2, data, 2 * third, 1 << 20))

    assert (last.term, last.installed, last.next_offset) == (2, True, len(data))
    assert (m.log.base_index, m.log.base_term, m.log.last_index) == (10, 2, 10)
    assert m.node.commit_index == m.node.last_applied == 10
    assert m.node.get_value("snap") == "10" and m.node.get_value("k7") == "v7-t1"
    # Installed durably: a restart starts from it.
    restarted = await h.restart(m)
    restarted.node.start_from_snapshot()
    assert (restarted.log.base_index, restarted.log.last_index) == (10, 10)
    assert restarted.node.get_value("snap") == "10"
    # Replication goes on after the snapshot.
    reply = await restarted.node.handle_append_entries(append(2, 2, 10, 2, [entry(11, 2)], 11))
    assert (reply.success, restarted.node.last_applied) == (True, 11)


async def test_a_snapshot_whose_last_entry_the_log_holds_keeps_the_entries_after_it(
    h: Harness,
) -> None:
    """Thesis Figure 5.3: "6. If existing log entry has same index and term as snapshot's last
    included entry, retain log entries following it and reply". Reference: thesis chapter 5."""
    m = await h.member(terms=[1, 1, 1, 2, 2, 2], term=2)
    data = snapshot_bytes(4, 2)

    reply = await m.node.handle_install_snapshot(install(2, 2, 4, 2, data, 0, len(data)))

    assert reply.installed
    assert (m.log.base_index, m.log.last_index) == (4, 6)
    assert [m.log.term_at(i) for i in (4, 5, 6)] == [2, 2, 2]
    assert m.node.commit_index == 4


async def test_a_snapshot_that_fails_its_checksum_is_not_installed_and_is_asked_for_again(
    h: Harness,
) -> None:
    """Thesis chapter 5: the follower installs the snapshot only once it has the whole file; one
    that does not match the checksum the leader announced is discarded, and the transfer restarts
    from offset 0. Reference: thesis chapter 5."""
    m = await h.member(terms=[1, 1], term=2)
    data = bytearray(snapshot_bytes(10, 2))
    data[len(data) // 2] ^= 0xFF

    reply = await m.node.handle_install_snapshot(install(2, 2, 10, 2, bytes(data), 0, len(data)))

    assert (reply.installed, reply.next_offset) == (False, 0)
    assert log_terms(m.log) == [1, 1] and m.node.commit_index == 0


async def test_a_snapshot_whose_state_does_not_decode_is_neither_kept_nor_installed(
    h: Harness,
) -> None:
    """Thesis chapter 5: the follower resets its state machine from a snapshot it has whole; one
    that matches its checksum but whose state does not decode is not kept (a restart must not
    start from it), changes nothing, and is asked for again. Reference: thesis chapter 5."""
    m = await h.member(terms=[1, 1], term=2)
    members = Membership.bootstrap(CLUSTER3)
    data = encode_snapshot(10, 2, members, b'{"last_applied":10}\n')
    request = InstallSnapshotRequest(
        term=2,
        requester_id=2,
        last_included_index=10,
        last_included_term=2,
        offset=0,
        total_size=len(data),
        data=data,
        done=True,
        checksum=zlib.crc32(data),
    )

    reply = await m.node.handle_install_snapshot(request)

    assert (reply.installed, reply.next_offset) == (False, 0)
    assert log_terms(m.log) == [1, 1] and m.node.commit_index == 0
    restarted = await h.restart(m)
    restarted.node.start_from_snapshot()
    assert log_terms(restarted.log) == [1, 1] and restarted.log.restored is None


async def test_a_leader_sends_its_snapshot_in_chunks_to_a_follower_whose_next_entry_it_compacted(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thesis section 5.1: "the leader must occasionally send snapshots to followers that lag
    behind ... when it has already discarded the next log entry that it needs to send to a
    follower". One chunk at a time; the offset the follower answers is where the next starts (so
    a follower that restarted mid-transfer gets it again from 0); once installed, replication
    resumes after the snapshot. Reference: thesis chapter 5."""
    monkeypatch.setattr(leader, "SNAPSHOT_CHUNK_BYTES", 200)
    m = await h.member(terms=[1] * 12, term=1)
    assert m.log.snapshots is not None
    meta = await m.log.snapshots.write(10, 1, m.node.config, snapshot_state(m, 10))
    m.log.compact(10)
    await m.log.flush()
    await into_role(m, "leader")
    append_to_2 = (await m.transport.wait_sent(AppendEntriesRequest, 1, peer=2))[0]
    m.transport.answer(
        2,
        AppendEntriesResponse(
            term=append_to_2.term, success=False, conflict_term=0, conflict_index=3
        ),
    )

    chunk = (await m.transport.wait_sent(InstallSnapshotRequest, 1, peer=2))[0]
    assert (chunk.last_included_index, chunk.offset, len(chunk.data)) == (10, 0, 200)
    assert (chunk.total_size, chunk.checksum) == (meta.size, meta.checksum)
    m.transport.answer(2, InstallSnapshotResponse(term=chunk.term, next_offset=200))
    chunk = (await m.transport.wait_sent(InstallSnapshotRequest, 2, peer=2))[-1]
    assert chunk.offset == 200
    # The follower restarted and lost what it had: it asks for offset 0.
    m.transport.answer(2, InstallSnapshotResponse(term=chunk.term, next_offset=0))
    chunk = (await m.transport.wait_sent(InstallSnapshotRequest, 3, peer=2))[-1]
    assert chunk.offset == 0
    offset = 0
    while True:
        offset += len(chunk.data)
        done = offset >= meta.size
        assert chunk.done == done
        m.transport.answer(
            2, InstallSnapshotResponse(term=chunk.term, next_offset=offset, installed=done)
        )
        if done:
            break
        sent = len(m.transport.requests(InstallSnapshotRequest, 2))
        chunk = (await m.transport.wait_sent(InstallSnapshotRequest, sent + 1, peer=2))[-1]
        assert chunk.offset == offset

    await eventually(
        lambda: any(r.prev_log_index == 10 for r in m.transport.requests(AppendEntriesRequest, 2)),
        "the leader replicates the entries after the snapshot",
    )
    assert m.node.progress[2].match_index >= 10


def snapshot_state(m: Member, index: int) -> bytes:
    machine = KeyValueStateMachine()
    for i in range(1, index + 1):
        machine.apply(m.log.entry(i))
    return machine.snapshot().encode()


async def test_a_follower_cut_off_while_the_leader_compacted_catches_up_by_snapshot(
    h: Harness,
) -> None:
    """Thesis chapter 5, end to end in a cluster: a follower that missed entries the leader has
    since compacted away receives the snapshot, installs it, and then holds every write; the leader
    never discards the entries after a snapshot it is sending, so the follower does not need
    another one right after (no install loop). Reference: thesis chapter 5."""
    net = InMemoryNetwork()
    ids = [1, 2, 3]
    cluster = cluster_of(3)
    policy = SnapshotPolicy(entries=15, bytes=1 << 30, keep_entries=3)
    nodes = {}
    for i in ids:
        log = await h.open_log(MemoryDisk(), i)
        node = RaftNode(
            i, cluster, log, net.transport(i), SEDATE, random.Random(i), snapshot_policy=policy
        )
        net.attach(node)
        h.nodes.append(node)
        nodes[i] = node
        node.start()
    await net.wait_until(lambda: settled_leader(nodes, ids) is not None, DEADLINE, "a leader")
    leader = settled_leader(nodes, ids)
    assert leader is not None
    lagging = next(n for n in nodes.values() if n is not leader)
    net.isolate(lagging.node_id)
    for i in range(60):
        await leader.propose_mapping(f"key{i}", f"value{i}")
    # Every node that could lead once the follower is back has compacted past it: whichever leads
    # then (a leader may change on a loaded machine) can only catch it up by snapshot.
    await eventually(
        lambda: all(
            n.log.base_index > lagging.log.last_index for n in nodes.values() if n is not lagging
        ),
        "compaction",
    )

    def install_replies() -> list[object]:
        return [
            d.reply
            for d in net.deliveries
            if isinstance(d.request, InstallSnapshotRequest) and d.dst == lagging.node_id
        ]

    def installed() -> list[object]:
        return [
            r for r in install_replies() if isinstance(r, InstallSnapshotResponse) and r.installed
        ]

    net.heal()
    # The follower holds the writes as soon as it installs; its reply is delivered just after.
    await net.wait_until(
        lambda: lagging.get_value("key59") == "value59" and bool(installed()),
        DEADLINE,
        "the follower caught up and its install reply was delivered",
    )
    assert all(lagging.get_value(f"key{i}") == f"value{i}" for i in range(60))
    assert len(installed()) == 1 and install_replies()[-1] is installed()[0]
    await leader.propose_mapping("after", "install")
    await net.wait_until(
        lambda: lagging.get_value("after") == "install", DEADLINE, "replication resumed"
    )
