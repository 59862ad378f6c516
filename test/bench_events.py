"""What watching costs: writes per second of a five-node cluster with and without one Cluster.Events
subscriber on every node, interleaved A/B rounds on the same cluster. Prints figures; passes or
fails nothing.

    python -m test.bench_events [--clients 64] [--rounds 3] [--duration 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
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


async def run(clients: int, rounds: int, duration: float, nodes: int) -> None:
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
                    if variant == "with":
                        watchers = [
                            asyncio.create_task(_subscribe(a, counts))
                            for a in cluster.client_addresses
                        ]
                    rate = await _writes(cluster, clients, duration)
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
                f"({clients} clients, {nodes} nodes, {duration:g} s per run; "
                f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m test.bench_events", description=__doc__)
    parser.add_argument("--clients", type=int, default=64, help="concurrent writers (64)")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds (3)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    parser.add_argument("--nodes", type=int, default=5, help="cluster size (5)")
    args = parser.parse_args(argv)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    asyncio.run(run(args.clients, args.rounds, args.duration, args.nodes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
