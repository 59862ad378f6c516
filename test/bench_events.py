"""What watching costs: writes per second of a five-node cluster with and without one Cluster.Events
subscriber on every node, interleaved A/B rounds on the same cluster. Prints figures; passes or
fails nothing.

    python -m test.bench_events [--clients 64] [--rounds 3] [--duration 10] [--watcher-process]

With --watcher-process the subscribers run in a process of their own, as a live view or an
`events` command would, instead of sharing the writing clients' process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import grpc

from rpc import raft_pb2, raft_pb2_grpc
from test.cluster_process import LocalCluster


async def _writes(cluster: LocalCluster, clients: int, duration: float) -> float:
    """Writes per second from `clients` tasks writing for `duration` seconds."""
    done = 0
    async with cluster.client() as client:
        await client.propose_mapping("warm", "up")
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + duration

        async def writer(t: int) -> None:
            nonlocal done
            i = 0
            while loop.time() < stop_at:
                await client.propose_mapping(f"k{t}-{i % 100}", "x" * 64)
                done += 1
                i += 1

        started = time.perf_counter()
        await asyncio.gather(*(writer(t) for t in range(clients)))
        return done / (time.perf_counter() - started)


async def _subscribe(address: str, counts: dict[str, int]) -> None:
    """Read one node's events until cancelled, counting them (and those it was told it missed)."""
    async with grpc.aio.insecure_channel(address) as channel:
        async for batch in raft_pb2_grpc.ClusterStub(channel).Events(raft_pb2.EventsRequest()):
            for event in batch.events:
                counts["events"] += 1
                if event.kind == "dropped":
                    counts["dropped"] += event.count


async def _watch_until_stopped(addresses: list[str]) -> None:
    """The watcher process: subscribe to every address until SIGTERM, then print the counts."""
    counts = {"events": 0, "dropped": 0}
    tasks = [asyncio.create_task(_subscribe(a, counts)) for a in addresses]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("watching", flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(counts), flush=True)


class _WatcherProcess:
    """Subscribers to every node in a process of their own."""

    def __init__(self, addresses: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "test.bench_events", "--watch", ",".join(addresses)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # "watching": subscribed

    def stop(self, counts: dict[str, int]) -> None:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        counts.update(json.loads(out.strip().splitlines()[-1]))


async def run(
    clients: int, rounds: int, duration: float, nodes: int, watcher_process: bool = False
) -> None:
    with tempfile.TemporaryDirectory(prefix="raft-demo-bench-events-") as work:
        with LocalCluster(nodes=nodes, data_dir=work) as cluster:
            cluster.start()
            await cluster.wait_for_leader(30)
            results: dict[str, list[float]] = {"without": [], "with": []}
            for round_ in range(1, rounds + 1):
                # Alternate which goes first, so a drift of the machine's load favours neither.
                order = ["without", "with"] if round_ % 2 else ["with", "without"]
                for variant in order:
                    counts = {"events": 0, "dropped": 0}
                    watchers = []
                    process = None
                    if variant == "with" and watcher_process:
                        process = _WatcherProcess(cluster.client_addresses)
                    elif variant == "with":
                        watchers = [
                            asyncio.create_task(_subscribe(a, counts))
                            for a in cluster.client_addresses
                        ]
                    try:
                        rate = await _writes(cluster, clients, duration)
                    finally:
                        if process is not None:
                            process.stop(counts)
                    for w in watchers:
                        w.cancel()
                    await asyncio.gather(*watchers, return_exceptions=True)
                    results[variant].append(rate)
                    extra = ""
                    if variant == "with":
                        extra = (
                            f" ({counts['events']:,} events read, {counts['dropped']:,} dropped)"
                        )
                    print(
                        f"round {round_} {variant:>7} subscriber: {rate:8.1f} writes/s{extra}",
                        flush=True,
                    )
            without = statistics.median(results["without"])
            with_ = statistics.median(results["with"])
            print(
                f"median of {rounds}: {without:.1f} writes/s without, {with_:.1f} with one "
                f"subscriber per node: {100 * (without - with_) / without:+.1f}% drop "
                f"({clients} clients, {nodes} nodes, {duration:g} s per run, subscribers in "
                f"{'a process of their own' if watcher_process else 'the clients process'}; "
                f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m test.bench_events", description=__doc__)
    parser.add_argument("--clients", type=int, default=64, help="concurrent writers (64)")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds (3)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    parser.add_argument("--nodes", type=int, default=5, help="cluster size (5)")
    parser.add_argument(
        "--watcher-process",
        action="store_true",
        help="subscribers in a process of their own rather than the clients' process",
    )
    parser.add_argument("--watch", metavar="ADDRS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.watch:
        asyncio.run(_watch_until_stopped(args.watch.split(",")))
        return 0
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    asyncio.run(run(args.clients, args.rounds, args.duration, args.nodes, args.watcher_process))
    return 0


if __name__ == "__main__":
    sys.exit(main())
