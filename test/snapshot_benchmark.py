"""Figures for snapshots and compaction: `python -m test.snapshot_benchmark [disk|restart|transfer]`.

- disk: N writes over 10,000 keys to a one-node store on the real disk, with the daemon's default
  snapshot thresholds: the data directory's size (largest seen, and at the end) against the state's.
- restart: a node whose snapshot holds a million keys is started; how long until it serves reads.
- transfer: a follower of a three-node cluster misses about 100 MB of writes, comes back and
  receives them as a snapshot; how long that takes, and the write latency the cluster's clients see
  meanwhile (and while the other two nodes snapshot the state), with the elections and the stalls
  of each node's event loop (test/loop_lag.py) in each phase. It prints figures; it does not pass
  or fail.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import grpc

from cluster_client import Client
from cluster_config import ClusterConfig
from log import RaftLog
from membership import Membership
from raft_node import RaftNode, SnapshotPolicy, Timing
from rpc import raft_pb2, raft_pb2_grpc
from state_machine import SnapshotState
from test import loop_lag
from test.cluster_process import LocalCluster, find_free_port_block
from test.memory_transport import InMemoryNetwork

REPO = Path(__file__).resolve().parent.parent
KEYS = 10_000


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


# ---- disk bound ---------------------------------------------------------------------------------


async def disk_bound(writes: int, concurrency: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="raft-demo-snapbench-"))
    try:
        log = await RaftLog.open(work / "node")
        cluster = ClusterConfig.seed_scheme(first_port=40000, count=1)
        net = InMemoryNetwork()
        node = RaftNode(
            40000,
            cluster,
            log,
            net.transport(40000),
            Timing(heartbeat_interval=0.05, election_timeout_min=0.1, election_timeout_max=0.2),
            snapshot_policy=SnapshotPolicy(),
        )
        node.start()
        await node.start_election()  # alone, it wins at once
        assert node.role == "leader"
        largest = 0
        started = time.perf_counter()
        counter = iter(range(writes))

        async def writer() -> None:
            for i in counter:
                await node.propose_mapping(f"key-{i % KEYS:05d}", f"value-{i:09d}-{'x' * 40}")

        async def watch() -> None:
            nonlocal largest
            while True:
                largest = max(largest, dir_size(work))
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(writer() for _ in range(concurrency)))
        watcher.cancel()
        elapsed = time.perf_counter() - started
        await node.stop()
        await log.close()
        final = dir_size(work)
        state = len(node.state_machine.snapshot().encode())
        raw = sum(len(k) + len(v) for k, v in node.state_machine._data.items())
        print(f"disk bound: {writes:,} writes over {KEYS:,} keys in {elapsed:.0f} s")
        print(f"  state: {mb(state)} encoded ({mb(raw)} of keys and values)")
        print(
            f"  data directory: largest {mb(largest)} ({largest / state:.1f}x the state), at the end {mb(final)} ({final / state:.1f}x)"
        )
        for f in sorted((work / "node").iterdir()):
            print(f"    {f.name}: {mb(f.stat().st_size)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- restart time -------------------------------------------------------------------------------


async def restart_time(keys: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="raft-demo-snapbench-"))
    port = find_free_port_block(2)
    proc: asyncio.subprocess.Process | None = None
    try:
        data_dir = work / "node"
        log = await RaftLog.open(data_dir)
        log.set_hard_state(1, None)
        data = {f"key-{i:07d}": f"value-{i:07d}-{'x' * 20}" for i in range(keys)}
        state = SnapshotState(data, [], 0, 1).encode()
        assert log.snapshots is not None
        members = Membership.bootstrap(ClusterConfig.seed_scheme(port, 1))
        meta = await log.snapshots.write(1, 1, members, state)
        log.reset(1, 1)
        await log.flush()
        await log.close()
        print(f"restart: a node with {keys:,} keys (snapshot {mb(meta.size)})")
        command = [
            sys.executable,
            "raft_node.py",
            "--port",
            str(port),
            "--first-port",
            str(port),
            "--nodes",
            "1",
            "--data-dir",
            str(data_dir),
            "--log-level",
            "WARNING",
        ]
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *command, cwd=REPO, stdin=asyncio.subprocess.DEVNULL
        )
        probe = f"key-{keys - 1:07d}"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port + 1}") as channel:
            stub = raft_pb2_grpc.ClusterStub(channel)
            stale_at = linear_at = None
            cpu = 0.0
            while linear_at is None and time.perf_counter() - started < 120:
                request = raft_pb2.Key(key=probe, allow_stale=stale_at is None)
                try:
                    reply = await stub.GetValue(request, timeout=1)
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.02)
                    continue
                if reply.value != f"value-{keys - 1:07d}-{'x' * 20}":
                    await asyncio.sleep(0.02)
                    continue
                if stale_at is None:
                    stale_at = time.perf_counter() - started
                    cpu = cpu_seconds(proc.pid)
                else:
                    linear_at = time.perf_counter() - started
        print(
            f"  process start to serving its state (stale read): {stale_at:.2f} s "
            f"(the node had used {cpu:.2f} s of CPU by then; on a busy machine the difference "
            "is time spent waiting for a core)"
        )
        print(f"  process start to a linearizable read (after electing itself): {linear_at:.2f} s")
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- InstallSnapshot of a large state -----------------------------------------------------------

_STAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d\d\d) ")


def stamp_of(text: str, marker: str) -> datetime | None:
    """When the last line with `marker` was logged."""
    for line in reversed(text.splitlines()):
        if marker in line:
            found = _STAMP.match(line)
            if found:
                return datetime.strptime(found.group(1), "%H:%M:%S.%f")
    return None


class _ProbedCluster(LocalCluster):
    """Nodes run through test/loop_lag.py, so each logs the stalls of its event loop."""

    def command(self, node_id: int) -> list[str]:
        command = super().command(node_id)
        return [command[0], "-m", "test.loop_lag", *command[2:]]


def _latency_line(what: str, latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"  {what}: {len(ordered)}, p50 {statistics.median(ordered) * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms"
    )


def _phase_report(
    cluster: LocalCluster, roles: dict[int, str], start: datetime, end: datetime
) -> list[str]:
    lines = []
    elections = 0
    for node_id, role in roles.items():
        text = cluster.node_log(node_id)
        elections += len(_lines_between(text, "won the election", start, end))
        found = loop_lag.stalls(text, start, end)
        lag = "none over 50 ms"
        if found:
            longest = max(found, key=lambda s: s.ms)
            busiest = max(found, key=lambda s: s.loop_cpu_ms)
            lag = (
                f"{len(found)} over 50 ms; longest {longest.ms:.0f} ms (its loop on the CPU "
                f"{longest.loop_cpu_ms:.0f} ms, the process {longest.process_cpu_ms:.0f} ms); "
                f"most work on the loop in one stall {busiest.loop_cpu_ms:.0f} ms"
            )
        lines.append(f"    event-loop stalls on {node_id} ({role}): {lag}")
    lines.insert(0, f"    elections: {elections}")
    return lines


def _lines_between(text: str, marker: str, start: datetime, end: datetime) -> list[str]:
    found = []
    for line in text.splitlines():
        stamp = _STAMP.match(line)
        if marker in line and stamp:
            at = datetime.strptime(stamp.group(1), "%H:%M:%S.%f")
            if start <= at <= end:
                found.append(line)
    return found


def _clock() -> datetime:
    # The nodes stamp their lines with the time of day only.
    return datetime.strptime(datetime.now().strftime("%H:%M:%S.%f")[:-3], "%H:%M:%S.%f")


async def transfer(megabytes: int, verbose: bool, log_dir: str | None) -> None:
    # One snapshot once the large values are in (and the next a few hundred writes later).
    flags = [
        "--snapshot-entries",
        str(megabytes + 50),
        "--snapshot-bytes",
        str(10**12),
        "--snapshot-keep-entries",
        "0",
    ]
    with _ProbedCluster(nodes=3, extra_args=flags, log_dir=log_dir) as cluster:
        cluster.start()
        leader = await cluster.wait_for_leader(timeout=20)
        follower = next(n for n in cluster.node_ids if n != leader)
        other = next(n for n in cluster.node_ids if n not in (leader, follower))
        big = "v" * (1024 * 1024 - 64)
        stop = asyncio.Event()
        latencies: list[float] = []

        async def writer(client: Client) -> None:
            i = 0
            while not stop.is_set():
                t = time.perf_counter()
                await client.propose_mapping(f"during-{i % 100}", str(i))
                latencies.append(time.perf_counter() - t)
                i += 1

        async with Client.from_endpoints(cluster.client_addresses, deadline=60) as client:
            cluster.kill_node(follower)
            for i in range(megabytes):
                await client.propose_mapping(f"big-{i:04d}", f"{i}-{big}")
            # The next writes pass the snapshot threshold: the two running nodes snapshot the
            # large state while a writer goes on.
            snapshotting_from = _clock()
            started = time.perf_counter()
            task = asyncio.create_task(writer(client))
            while not all(
                "took a snapshot" in cluster.node_log(n) for n in cluster.node_ids if n != follower
            ):
                if time.perf_counter() - started > 300:
                    raise SystemExit("the nodes did not take a snapshot within 300 s")
                await asyncio.sleep(0.05)
            await asyncio.sleep(1)
            stop.set()
            await task
            snapshotting = latencies
            snapshotting_to = _clock()
            before: list[float] = []
            for i in range(100):
                t = time.perf_counter()
                await client.propose_mapping(f"probe-{i}", str(i))
                before.append(time.perf_counter() - t)

            # Leadership may have moved while the state was snapshotted.
            first_leader, first_other = leader, other
            leader = await cluster.wait_for_leader(timeout=20, exclude=[follower])
            other = next(n for n in cluster.node_ids if n not in (leader, follower))
            latencies = []
            stop.clear()
            task = asyncio.create_task(writer(client))
            started = time.perf_counter()
            transfer_from = _clock()
            cluster.start_node(follower)
            while "installed snapshot up to index" not in cluster.node_log(follower):
                if time.perf_counter() - started > 300:
                    raise SystemExit("the follower did not install the snapshot within 300 s")
                await asyncio.sleep(0.05)
            installed = time.perf_counter() - started
            # A little longer: the follower's first appends after its install count too.
            await asyncio.sleep(1)
            stop.set()
            await task
            transfer_to = _clock()
        sending = stamp_of(cluster.node_log(leader), "sending snapshot up to index")
        done = stamp_of(cluster.node_log(follower), "installed snapshot up to index")
        sizes = re.findall(
            r"sending snapshot up to index \d+ \(([\d.]+ MB)\) to " + str(follower),
            cluster.node_log(leader),
        )
        roles = {leader: "leader", follower: "the follower", other: "the other follower"}
        print(
            f"transfer: a follower missed {megabytes} MB of writes (snapshot {sizes[-1] if sizes else '?'})"
        )
        print(_latency_line("writes while two nodes snapshot the state", snapshotting))
        for line in _phase_report(
            cluster,
            {first_leader: "leader at first", first_other: "follower at first"},
            snapshotting_from,
            snapshotting_to,
        ):
            print(line)
        print(_latency_line("writes just before the transfer", before))
        if sending and done:
            print(
                f"  first chunk sent to snapshot installed: {(done - sending).total_seconds():.2f} s"
            )
        print(f"  follower process start to snapshot installed: {installed:.2f} s")
        print(_latency_line(f"writes meanwhile (node {leader} leads)", latencies))
        for line in _phase_report(cluster, roles, transfer_from, transfer_to):
            print(line)
        if verbose:
            for node_id in (leader, follower):
                for line in cluster.node_log(node_id).splitlines():
                    if "snapshot" in line or "discarded" in line or "stalled" in line:
                        print(f"    {line}")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m test.snapshot_benchmark", description=__doc__.splitlines()[0]
    )
    parser.add_argument("what", nargs="*", choices=["disk", "restart", "transfer"], default=[])
    parser.add_argument("--writes", type=int, default=1_000_000, help="disk: how many writes")
    parser.add_argument("--concurrency", type=int, default=256, help="disk: writers at once")
    parser.add_argument("--keys", type=int, default=1_000_000, help="restart: keys in the state")
    parser.add_argument(
        "--verbose", action="store_true", help="transfer: print the nodes' snapshot narration"
    )
    parser.add_argument("--megabytes", type=int, default=100, help="transfer: state size in MB")
    parser.add_argument(
        "--log-dir", help="transfer: keep the nodes' logs in this directory (default: discarded)"
    )
    args = parser.parse_args()
    chosen = args.what or ["disk", "restart", "transfer"]
    import uvloop

    for what in chosen:
        if what == "disk":
            uvloop.run(disk_bound(args.writes, args.concurrency))
        elif what == "restart":
            uvloop.run(restart_time(args.keys))
        else:
            uvloop.run(transfer(args.megabytes, args.verbose, args.log_dir))
        sys.stdout.flush()


if __name__ == "__main__":
    main()


__all__ = ("main",)
