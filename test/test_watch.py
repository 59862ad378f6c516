"""Watches on clusters of real processes: from a past revision, from now, by prefix, with previous
values, on a follower; the window's compacted error; a slow watcher cut off and resumed; the window
kept across a restart from a snapshot; and a watcher on every node checked against the committed
history across the leader's death, with the library's watch reconnecting and missing nothing."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from client_kv import WatchEvent
from cluster_client import Client, WatchCompactedError
from rpc import raft_pb2, raft_pb2_grpc
from test.cluster_process import CHANNEL_OPTIONS, LocalCluster
from test.conftest import REPO, wait_until


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    made = LocalCluster(nodes=3, extra_args=["--watch-window", "50"])
    try:
        made.start()
        yield made
    finally:
        made.stop()


@contextlib.asynccontextmanager
async def stub_for(address: str) -> AsyncIterator[raft_pb2_grpc.ClusterStub]:
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    try:
        yield raft_pb2_grpc.ClusterStub(channel)
    finally:
        await channel.close()


async def take(events: AsyncIterator[WatchEvent], count: int, timeout: float = 10) -> list[Any]:
    taken: list[WatchEvent] = []
    async with asyncio.timeout(timeout):
        async for event in events:
            taken.append(event)
            if len(taken) == count:
                break
    return taken


def brief(events: list[WatchEvent]) -> list[tuple[str, str, str | None]]:
    return [(e.type, e.key, e.value) for e in events]


async def test_a_watch_from_a_past_revision_gets_every_change_since_then_live_ones_after(
    cluster: LocalCluster,
) -> None:
    async with cluster.client() as client:
        first = await client.propose_mapping("past/a", "1")
        await client.propose_mapping("past/a", "2")
        await client.delete("past/a")
        watch = client.watch("past/", prefix=True, start_revision=first, prev_value=True)
        backlog = await take(watch, 3)
        assert brief(backlog) == [
            ("put", "past/a", "1"),
            ("put", "past/a", "2"),
            ("delete", "past/a", None),
        ]
        assert [e.prev_value for e in backlog] == [None, "1", "2"]
        assert backlog[0].revision == first and backlog[1].version == 2
        # Then live: a change made after the backlog, on the same stream.
        live = asyncio.create_task(take(watch, 1))
        revision = await client.propose_mapping("past/b", "3")
        (event,) = await live
        assert (event.key, event.value, event.revision, event.prev_value) == (
            "past/b",
            "3",
            revision,
            None,
        )
        await watch.aclose()


async def test_a_watch_from_now_sees_only_later_changes_of_its_key_or_prefix(
    cluster: LocalCluster,
) -> None:
    async with cluster.client() as client:
        await client.propose_mapping("now/x", "before")
        key_events: list[WatchEvent] = []
        prefix_events: list[WatchEvent] = []

        async def follow(into: list[WatchEvent], **how: Any) -> None:
            async for event in client.watch(**how):
                into.append(event)

        tasks = [
            asyncio.create_task(follow(key_events, key="now/x")),
            asyncio.create_task(follow(prefix_events, key="now/", prefix=True)),
        ]
        try:
            # A watch from now is in place once a change made after it reaches it: write until
            # one reaches both (a change made before a watch is in place never reaches it).
            for attempt in range(1, 21):
                ready = await client.propose_mapping("now/x", f"ready-{attempt}")
                with contextlib.suppress(AssertionError):
                    await wait_until(
                        _async(lambda r=ready: _has(key_events, r) and _has(prefix_events, r)),
                        1,
                        "both watches see the ready change",
                    )
                    break
            else:
                raise AssertionError("the watches never saw a change made after them")
            await client.propose_mappings({"now/y": "1", "now/x": "2", "other": "3"})
            await client.delete_prefix("now/")
            await wait_until(
                _async(lambda: len(_after(prefix_events, ready)) >= 4),
                10,
                "every change is seen",
            )
            await wait_until(_async(lambda: len(_after(key_events, ready)) >= 2), 10, "key")
            assert "before" not in {e.value for e in key_events + prefix_events}
            assert brief(_after(key_events, ready)) == [
                ("put", "now/x", "2"),
                ("delete", "now/x", None),
            ]
            later = _after(prefix_events, ready)
            assert brief(later) == [
                # One revision's changes in the order the write made them.
                ("put", "now/y", "1"),
                ("put", "now/x", "2"),
                # The delete-range's deletions, in key order, all at one revision.
                ("delete", "now/x", None),
                ("delete", "now/y", None),
            ]
            assert later[2].revision == later[3].revision
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _has(events: list[WatchEvent], revision: int) -> bool:
    return any(e.revision == revision for e in events)


def _after(events: list[WatchEvent], revision: int) -> list[WatchEvent]:
    return [e for e in events if e.revision > revision]


def _async(check: Any) -> Any:
    async def run() -> Any:
        return check()

    return run


async def test_a_follower_serves_a_watch_from_its_own_state(cluster: LocalCluster) -> None:
    leader = await cluster.wait_for_leader(timeout=15)
    follower = next(n for n in cluster.node_ids if n != leader)
    async with cluster.client() as client, stub_for(cluster.client_address(follower)) as stub:
        call = stub.Watch(raft_pb2.WatchRequest(key="fw/k"))
        try:
            created = await call.read()
            assert created.created
            revision = await client.propose_mapping("fw/k", "v")
            message = await asyncio.wait_for(call.read(), 10)
            assert [(e.key, e.value, e.revision) for e in message.events] == [
                ("fw/k", "v", revision)
            ]
            assert message.revision >= revision
        finally:
            call.cancel()


async def test_a_start_older_than_the_window_is_refused_naming_the_oldest_revision(
    cluster: LocalCluster,
) -> None:
    """--watch-window 50: after 60 more changes, revision 1 is gone; the error says what is not."""
    async with cluster.client() as client:
        for i in range(6):
            await client.propose_mappings({f"fill/{i}/{j}": "x" for j in range(10)})
        async with stub_for(cluster.client_addresses[0]) as stub:
            call = stub.Watch(raft_pb2.WatchRequest(key="fill/", prefix=True, start_revision=1))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call.read()
            assert raised.value.code() == grpc.StatusCode.OUT_OF_RANGE
            assert "revision 1 has been compacted" in (raised.value.details() or "")
            assert "oldest revision this node still serves is" in (raised.value.details() or "")
        with pytest.raises(WatchCompactedError, match="compacted"):
            await take(client.watch("fill/", prefix=True, start_revision=1), 1)


async def test_a_slow_watcher_is_cut_off_and_resumes_where_it_was_told(
    make_cluster: Any,
) -> None:
    """A watcher that does not read lets changes wait; past --watch-queue it is cut off with
    RESOURCE_EXHAUSTED naming the revision to resume from, and resuming there misses nothing."""
    cluster: LocalCluster = make_cluster(nodes=1, extra_args=["--watch-queue", "20"])
    await cluster.wait_for_leader(timeout=15)
    value = "x" * 65536
    async with cluster.client() as client, stub_for(cluster.client_addresses[0]) as stub:
        call = stub.Watch(raft_pb2.WatchRequest(key="slow/", prefix=True))
        created = await call.read()
        written: list[tuple[int, str]] = []
        # Enough to fill the stream's flow-control window and socket buffers, then the queue.
        for i in range(150):
            revision = await client.propose_mapping(f"slow/{i:03d}", value)
            written.append((revision, f"slow/{i:03d}"))
        received: list[tuple[int, str]] = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async with asyncio.timeout(20):
                while (message := await call.read()) is not grpc.aio.EOF:
                    received += [(e.revision, e.key) for e in message.events]
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = raised.value.details() or ""
        assert "fell behind" in details and "resume from revision" in details
        resume = int(details.rsplit("revision ", 1)[1].split()[0])
        assert created.revision < resume <= written[-1][0]
        assert received == [w for w in written if w[0] < resume]
        # Resumed where it was told: the rest, none twice, none missing.
        missing = len(written) - len(received)
        rest = await take(client.watch("slow/", prefix=True, start_revision=resume), missing)
        assert received + [(e.revision, e.key) for e in rest] == written


async def test_the_window_survives_a_restart_from_a_snapshot(make_cluster: Any) -> None:
    """A node restarted from a snapshot (its log compacted behind it) still serves a watch from
    the first revision: the window is in the snapshot."""
    cluster: LocalCluster = make_cluster(
        nodes=1, extra_args=["--snapshot-entries", "20", "--snapshot-keep-entries", "0"]
    )
    await cluster.wait_for_leader(timeout=15)
    async with cluster.client() as client:
        revisions = [await client.propose_mapping(f"snap/{i}", str(i)) for i in range(50)]
    node = cluster.node_ids[0]
    await wait_until(
        _async(lambda: "took a snapshot" in cluster.node_log(node)), 10, "a snapshot is taken"
    )
    cluster.restart_node(node)
    await cluster.wait_for_leader(timeout=15)
    assert "restored state from snapshot" in cluster.node_log(node)
    async with cluster.client() as client:
        events = await take(client.watch("snap/", prefix=True, start_revision=1), 50)
    assert [(e.key, e.revision) for e in events] == [(f"snap/{i}", revisions[i]) for i in range(50)]


@pytest.mark.slow
async def test_watchers_on_every_node_see_the_committed_history_across_a_leader_kill(
    make_cluster: Any,
) -> None:
    """A watcher per node (no reconnecting) and the library's watch (reconnecting to any node)
    while writes go on and the leader is killed: every surviving node's watcher and the library's
    see the same changes, in revision order, none twice, every acknowledged write among them; the
    killed node's saw a prefix of them; restarted, it serves the same history from revision 1."""
    cluster: LocalCluster = make_cluster(nodes=3)
    await cluster.wait_for_leader(timeout=15)
    per_node: dict[int, list[tuple[int, str, str | None]]] = {n: [] for n in cluster.node_ids}
    library: list[tuple[int, str, str | None]] = []
    reconnects: list[str] = []
    acknowledged: list[tuple[int, str, str]] = []

    async def node_watcher(node: int) -> None:
        async with stub_for(cluster.client_address(node)) as stub:
            call = stub.Watch(raft_pb2.WatchRequest(key="h/", prefix=True, start_revision=1))
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for message in call:
                    per_node[node] += [(e.revision, e.key, _value(e)) for e in message.events]

    async def library_watcher(client: Client) -> None:
        def reconnected(address: str, reason: str) -> None:
            reconnects.append(address)

        watch = client.watch("h/", prefix=True, start_revision=1, on_reconnect=reconnected)
        async for event in watch:
            library.append((event.revision, event.key, event.value))

    async def writer(client: Client, count: int, start: int) -> None:
        for i in range(start, start + count):
            key, value = f"h/{i % 7}", str(i)
            with contextlib.suppress(Exception):
                revision = await client.propose_mapping(key, value)
                acknowledged.append((revision, key, value))

    async with cluster.client(deadline=20) as writes, cluster.client() as watches:
        watchers = [asyncio.create_task(node_watcher(n)) for n in cluster.node_ids]
        # The library's watch is pointed at the leader first, so its death forces a reconnect.
        leader = await cluster.wait_for_leader(timeout=15)
        await writes.propose_mapping("h/start", "0")
        watches._leader = cluster.client_address(leader)
        watchers.append(asyncio.create_task(library_watcher(watches)))
        try:
            await writer(writes, 60, 0)
            cluster.kill_node(leader)
            await writer(writes, 60, 60)
            last = max(r for r, _, _ in acknowledged)
            survivors = [n for n in cluster.node_ids if n != leader]

            def caught_up() -> bool:
                return all(per_node[n] and per_node[n][-1][0] >= last for n in survivors) and bool(
                    library and library[-1][0] >= last
                )

            await wait_until(_async(caught_up), 20, "every watcher reached the last write")
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
    history = per_node[survivors[0]]
    revisions = [r for r, _, _ in history]
    assert revisions == sorted(revisions), "in revision order"
    assert len(set(history)) == len(history), "none twice"
    assert set(acknowledged) <= {(r, k, v) for r, k, v in history if v is not None}
    for node in survivors[1:]:
        assert per_node[node] == history, f"node {node} saw another history"
    assert cluster.client_address(leader) in reconnects, "the library's watch never moved"
    assert library == history, "the reconnecting watch missed or repeated a change"
    assert per_node[leader] == history[: len(per_node[leader])], "the killed node's is a prefix"
    # Restarted, the old leader catches up and serves the same history from the first revision.
    cluster.start_node(leader)
    async with cluster.client() as client:
        at = cluster.client_address(leader)

        async def replayed() -> list[tuple[int, str, str | None]] | None:
            async with stub_for(at) as stub:
                call = stub.Watch(raft_pb2.WatchRequest(key="h/", prefix=True, start_revision=1))
                seen: list[tuple[int, str, str | None]] = []
                try:
                    async with asyncio.timeout(2):
                        async for message in call:
                            seen += [(e.revision, e.key, _value(e)) for e in message.events]
                            if message.revision >= history[-1][0]:
                                return seen
                except (TimeoutError, grpc.aio.AioRpcError):
                    return None
                finally:
                    call.cancel()
            return None

        del client
        assert await wait_until(replayed, 20, "the restarted node serves the history") == history


def _value(event: raft_pb2.WatchEvent) -> str | None:
    return None if event.type == raft_pb2.WATCH_EVENT_DELETE else event.value


async def test_the_command_line_prints_a_line_per_change_until_interrupted(
    cluster: LocalCluster,
) -> None:
    async with cluster.client() as client:
        before = await client.propose_mapping("cli/a", "1")
        where = ["--first-port", str(cluster.first_port), "--nodes", str(cluster.nodes)]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "cluster_client.py",
            *where,
            "watch",
            "cli/",
            "--prefix",
            "--prev",
            "--rev",
            str(before),
            cwd=REPO,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            first = await asyncio.wait_for(process.stdout.readline(), 20)
            assert first.decode() == f"{before} PUT cli/a 1 (was absent)\n"
            _, later = await client.delete_prefix("cli/")
            second = await asyncio.wait_for(process.stdout.readline(), 20)
            assert second.decode() == f"{later} DELETE cli/a (was 1)\n"
            process.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(process.wait(), 20) == 0
            assert process.stderr is not None
            assert b"Traceback" not in await process.stderr.read()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def test_a_watched_follower_caught_up_by_a_snapshot_sends_every_change_it_skipped(
    make_cluster: Any,
) -> None:
    """A follower paused while the leader compacts its log past it is caught up by a snapshot,
    not by entries; its watcher still gets every change, from the snapshot's window, in order."""
    cluster: LocalCluster = make_cluster(
        nodes=3, extra_args=["--snapshot-entries", "20", "--snapshot-keep-entries", "0"]
    )
    leader = await cluster.wait_for_leader(timeout=15)
    follower = next(n for n in cluster.node_ids if n != leader)
    seen: list[tuple[int, str]] = []
    async with stub_for(cluster.client_address(follower)) as stub, cluster.client() as client:
        call = stub.Watch(raft_pb2.WatchRequest(key="far/", prefix=True))
        await call.read()

        async def follow() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                while (message := await call.read()) is not grpc.aio.EOF:
                    seen.extend((e.revision, e.key) for e in message.events)

        reader = asyncio.create_task(follow())
        try:
            written = [(await client.propose_mapping("far/before", "0"), "far/before")]
            await wait_until(_async(lambda: len(seen) == 1), 10, "the first change is seen")
            cluster.pause_node(follower)
            try:
                for i in range(60):
                    written.append(
                        (await client.propose_mapping(f"far/{i:02d}", "x"), f"far/{i:02d}")
                    )
            finally:
                cluster.resume_node(follower)
            await wait_until(
                _async(lambda: len(seen) >= len(written)), 20, "the follower's watcher catches up"
            )
        finally:
            call.cancel()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    assert "installed snapshot up to index" in cluster.node_log(follower)
    assert seen == written
