"""What the leader does per batch rather than per write, and the counters that show what
replication costs (counters.py, metrics.py): each behaviour a user relies on, on one node in process.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from disk import MemoryDisk
from log import RaftLog
from metrics import NodeMetrics
from raft_node import CommitUnknownError
from rpc.raft_pb2 import (
    AppendEntriesRequest,
    AppendEntriesResponse,
    RequestVoteResponse,
    VoteRequest,
)
from test.test_paper import QUIET, Harness, Member, entries_for, eventually


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    harness = Harness()
    try:
        yield harness
    finally:
        await harness.close()


def told_everyone(m: Member) -> bool:
    """Whether both followers hold the leader's log and know its commit index (no message or
    reply about it is still under way)."""
    node = m.node
    return all(
        p.match_index == node.log.last_index and p.told_commit == node.commit_index
        for p in node.progress.values()
    ) and all(
        s.reply.done() for s in m.transport.sent if isinstance(s.request, AppendEntriesRequest)
    )


async def leader(h: Harness, proposal_timeout: float = 10.0) -> Member:
    """Node 1 of three, leading term 2; its followers answer nothing unless the test says so."""
    timing = dataclasses.replace(QUIET, proposal_timeout=proposal_timeout)
    m = await h.member(terms=[1], term=1, timing=timing)
    await m.node.start_election()
    request = (await m.transport.wait_sent(VoteRequest, 1, peer=2))[0]
    m.node.handle_vote_reply(2, request, RequestVoteResponse(term=2, vote_granted=True))
    assert m.node.is_leader
    return m


async def test_each_write_that_cannot_commit_gives_up_at_its_own_deadline(h: Harness) -> None:
    """A write the followers never acknowledge ends with CommitUnknownError once the proposal
    timeout has passed since it arrived: not before (it is not cut short by an earlier write's
    deadline), and not much after, though one timer watches every waiting write."""
    m = await leader(h, proposal_timeout=0.4)
    loop = asyncio.get_running_loop()
    ended: dict[str, float] = {}

    async def write(key: str) -> None:
        started = loop.time()
        with pytest.raises(CommitUnknownError, match="did not commit within 0.4 s"):
            await m.node.propose_mapping(key, "v")
        ended[key] = loop.time() - started

    first = asyncio.ensure_future(write("a"))
    await asyncio.sleep(0.15)
    # A caller that gives up leaves the others' deadlines as they were.
    abandoned = asyncio.ensure_future(m.node.propose_mapping("gone", "v"))
    await asyncio.sleep(0)
    abandoned.cancel()
    second = asyncio.ensure_future(write("b"))
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    for key in "ab":
        assert 0.4 <= ended[key] < 1.5, (key, ended)


async def test_the_counters_tell_messages_entries_and_fsyncs(h: Harness) -> None:
    """Every AppendEntries a leader sends is counted with its entries (by how many it carried),
    every reply it receives, and every fsync; /metrics reports them."""
    m = await leader(h)
    m.transport.policy = lambda peer, request: (
        AppendEntriesResponse(term=2, success=True)
        if isinstance(request, AppendEntriesRequest)
        else None
    )
    for i in range(3):
        await asyncio.wait_for(m.node.propose_mapping(f"k{i}", "v"), 5)
    counters = m.node.counters
    appends = [s.request for s in m.transport.sent if isinstance(s.request, AppendEntriesRequest)]
    assert counters.appends_sent == len(appends)
    assert counters.entries_sent == sum(
        len(r.log_entries) for r in appends if isinstance(r, AppendEntriesRequest)
    )
    assert counters.messages_received >= counters.appends_sent - 2  # replies still in flight
    sizes = {n: c for n, c in enumerate(counters.entries_per_append) if c}
    assert sum(sizes.values()) == counters.appends_sent
    assert m.log.fsyncs >= 4  # the term and vote, the no-op and three writes (some together)

    metrics = NodeMetrics()
    metrics.attach(m.node)
    text = metrics.exposition().decode()
    assert f"raft_demo_append_messages_sent_total {float(counters.appends_sent)}" in text
    assert f"raft_demo_log_fsyncs_total {float(m.log.fsyncs)}" in text
    for n, c in sizes.items():
        assert f'raft_demo_append_messages_by_entries_total{{entries="{n}"}} {float(c)}' in text


async def test_a_log_emptied_by_a_snapshot_measures_nothing_kept_behind_an_older_index() -> None:
    """A snapshot of the node's own, taken up to an index, may finish after a leader's newer
    snapshot emptied the log: what the log keeps behind that older index is then nothing, and
    the node goes on (it once raised IndexError, failing the snapshot task)."""
    log = await RaftLog.open("/data/1", MemoryDisk())
    try:
        log.append(entries_for([1, 1, 1]))
        log.reset(10, 2)  # a leader's snapshot up to index 10, which the log does not hold
        assert log.bytes_after(2) == 0
        assert log.keep_point(2, keep_entries=5, keep_bytes=1 << 20) == 10
    finally:
        await log.close()


async def test_steady_writes_tell_the_commit_index_without_messages_of_its_own(
    h: Harness,
) -> None:
    """Under steady writes each message that carries entries also tells the followers the commit
    index, so the leader sends no message only to say it; once writes stop, the last commit
    index still reaches every follower, by a message of its own after commit_notice_delay."""
    m = await leader(h)
    m.node.timing = dataclasses.replace(m.node.timing, commit_notice_delay=0.2)
    m.transport.policy = lambda peer, request: (
        AppendEntriesResponse(term=2, success=True)
        if isinstance(request, AppendEntriesRequest)
        else None
    )
    await asyncio.wait_for(m.node.propose_mapping("warm", "up"), 5)
    await eventually(lambda: told_everyone(m), "both followers were told the commit index")
    m.transport.sent.clear()
    for i in range(10):  # writes 40 ms apart for 0.4 s: twice the notice delay
        await asyncio.wait_for(m.node.propose_mapping(f"k{i}", "v"), 5)
        await asyncio.sleep(0.04)
    last = m.node.commit_index
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        told = {
            s.peer
            for s in m.transport.sent
            if isinstance(s.request, AppendEntriesRequest) and s.request.leader_commit == last
        }
        if told == {2, 3}:
            break
        assert loop.time() < deadline, "the last commit index never reached every follower"
        await asyncio.sleep(0.01)
    notices = [
        s.request
        for s in m.transport.sent
        if isinstance(s.request, AppendEntriesRequest) and not s.request.log_entries
    ]
    assert len(notices) == 2, [(n.leader_commit, n.prev_log_index) for n in notices]
    assert all(n.leader_commit == last for n in notices)


async def test_reads_share_a_heartbeat_round_only_until_it_is_sent(h: Harness) -> None:
    """Thesis section 6.4: a read is confirmed by a heartbeat round a majority answers, sent
    after the read arrived. Reads that arrive together share one round; a read that arrives once
    the round has gone out waits for the next, however soon the earlier round is answered."""
    m = await leader(h)
    m.transport.policy = lambda peer, request: (
        AppendEntriesResponse(term=2, success=True)
        if isinstance(request, AppendEntriesRequest)
        else None
    )
    await asyncio.wait_for(m.node.propose_mapping("k", "v"), 5)
    await eventually(lambda: told_everyone(m), "both followers were told the commit index")
    m.transport.policy = None
    before = len(m.transport.requests(AppendEntriesRequest, 2))

    first = asyncio.ensure_future(m.node.read("k"))
    together = asyncio.ensure_future(m.node.read("k"))
    await m.transport.wait_sent(AppendEntriesRequest, before + 1, peer=2)
    assert m.node.counters.read_rounds == 1  # the two reads share the round
    late = asyncio.ensure_future(m.node.read("k"))
    await eventually(lambda: m.node.counters.read_rounds == 2, "the late read asks for a round")
    m.transport.answer(2, AppendEntriesResponse(term=2, success=True))
    assert await asyncio.wait_for(first, 5) == "v"
    assert await asyncio.wait_for(together, 5) == "v"
    # Its own round goes out once the previous message to 2 is answered; until that is answered
    # too, nothing may confirm it.
    await m.transport.wait_sent(AppendEntriesRequest, before + 2, peer=2)
    assert not late.done(), "a read was confirmed by heartbeats sent before it arrived"
    m.transport.answer(2, AppendEntriesResponse(term=2, success=True))
    assert await asyncio.wait_for(late, 5) == "v"
    assert m.node.counters.read_rounds == 2
