"""Throughput and latency of writes and reads at several client concurrencies:
`python -m test.benchmark` (starts its own five-node cluster unless given `--endpoints`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import string
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import uvloop

from cluster_config import ConfigError
from test.cluster_process import LocalCluster, PortBusyError

if TYPE_CHECKING:
    import cluster_client

# One Client per concurrency level, shared by its N tasks: gRPC multiplexes their calls over one
# HTTP/2 connection per node, as an application would. More Clients in this one single-threaded
# process would add connections, not client capacity; the "client cpu" column shows when the
# client itself, not the cluster, is the limit (near 100%).
HOW_CLIENTS_ARE_RUN = (
    "one Client per concurrency level shared by N tasks in this process; reads go to the leader "
    "the client last wrote to; client and nodes share this machine's CPUs"
)


@dataclass
class Point:
    workload: str
    clients: int
    ops: int
    seconds: float
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    client_cpu_percent: float


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, int(-(-fraction * len(sorted_values) // 1)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def measure(
    workload: str,
    clients: int,
    duration: float,
    operation: Callable[[int, int], Awaitable[None]],
) -> Point:
    """Run `operation(task, i)` from `clients` concurrent tasks until `duration` s have passed."""
    import cluster_client

    loop = asyncio.get_running_loop()
    stop_at = loop.time() + duration
    latencies: list[float] = []
    errors = 0

    async def task(t: int) -> None:
        nonlocal errors
        i = 0
        while loop.time() < stop_at:
            started = time.perf_counter()
            try:
                await operation(t, i)
            except cluster_client.ClientError:
                errors += 1
            else:
                latencies.append(time.perf_counter() - started)
            i += 1

    cpu_start, wall_start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(task(t) for t in range(clients)))
    wall = time.perf_counter() - wall_start
    cpu = time.process_time() - cpu_start
    latencies.sort()
    return Point(
        workload=workload,
        clients=clients,
        ops=len(latencies),
        seconds=round(wall, 3),
        ops_per_s=round(len(latencies) / wall, 1),
        p50_ms=round(percentile(latencies, 0.50) * 1000, 2),
        p99_ms=round(percentile(latencies, 0.99) * 1000, 2),
        errors=errors,
        client_cpu_percent=round(100 * cpu / wall, 0),
    )


def print_header() -> None:
    print(
        f"{'workload':<9}{'clients':>8}{'ops':>9}{'ops/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}{'client cpu':>12}",
        flush=True,
    )


def print_point(p: Point) -> None:
    print(
        f"{p.workload:<9}{p.clients:>8}{p.ops:>9}{p.ops_per_s:>10.1f}{p.p50_ms:>9.2f}"
        f"{p.p99_ms:>9.2f}{p.errors:>8}{p.client_cpu_percent:>11.0f}%",
        flush=True,
    )


async def run_level(
    client: cluster_client.Client, clients: int, duration: float, value: str, prefix: str
) -> list[Point]:
    """Writes of fresh keys, then reads of the keys just written, from `clients` tasks."""
    # Connect and find the leader outside the measured time.
    await client.propose_mapping(f"{prefix}-warmup", value)
    written: list[list[str]] = [[] for _ in range(clients)]

    async def write(t: int, i: int) -> None:
        key = f"{prefix}-{t}-{i}"
        await client.propose_mapping(key, value)
        written[t].append(key)

    writes = await measure("write", clients, duration, write)
    print_point(writes)
    keys = [k for per_task in written for k in per_task] or [f"{prefix}-warmup"]

    async def read(t: int, i: int) -> None:
        await client.get_value(random.choice(keys))

    reads = await measure("read", clients, duration, read)
    print_point(reads)
    return [writes, reads]


async def run_sweep(
    make_client: Callable[[], cluster_client.Client],
    levels: list[int],
    duration: float,
    value_size: int,
) -> list[Point]:
    value = "".join(random.choices(string.ascii_letters + string.digits, k=value_size))
    run = f"bench-{os.getpid()}-{int(time.time())}"
    points: list[Point] = []
    print_header()
    for clients in levels:
        client = make_client()
        try:
            points += await run_level(client, clients, duration, value, f"{run}-{clients}")
        finally:
            await client.close()
    return points


def _fail(message: str) -> NoReturn:
    print(f"benchmark: {message}", file=sys.stderr)
    raise SystemExit(2)


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,8,64, not {text!r}") from None
    if not levels or any(n < 1 for n in levels):
        raise argparse.ArgumentTypeError(f"expected positive numbers like 1,8,64, not {text!r}")
    return levels


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            number = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
        if number <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, not {text!r}")
        return number

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m test.benchmark",
        description="Measure write and read throughput and latency of a raft-demo cluster. "
        "Prints figures; passes or fails nothing.",
    )
    parser.add_argument(
        "--endpoints",
        help="client addresses (host:port,...) of a running cluster; default: start a local "
        "cluster on free ports",
    )
    parser.add_argument("--nodes", type=_positive(int), default=5, help="local cluster size (5)")
    parser.add_argument(
        "--clients",
        type=_levels,
        default=[1, 8, 64],
        help="concurrent requests per point, comma-separated (1,8,64)",
    )
    parser.add_argument(
        "--duration", type=_positive(float), default=5.0, help="seconds per workload and point (5)"
    )
    parser.add_argument(
        "--value-size", type=_positive(int), default=64, help="bytes per written value (64)"
    )
    parser.add_argument(
        "--node-log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default="WARNING",
        help="log level of a local cluster's nodes (WARNING: per-write narration is not measured)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)

    if args.json is not None:
        folder = args.json.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK) or args.json.is_dir():
            _fail(f"cannot write {args.json}: not a writable file path")

    import cluster_client

    cluster: LocalCluster | None = None
    try:
        if args.endpoints:
            endpoints = args.endpoints

            def make_client() -> cluster_client.Client:
                return cluster_client.Client.from_endpoints(endpoints)

            make_client()  # a malformed address is reported now, not mid-run
            target = f"the cluster at {endpoints}"
        else:
            cluster = LocalCluster(args.nodes, extra_args=["--log-level", args.node_log_level])
            cluster.start()
            uvloop.run(cluster.wait_for_leader(timeout=15))
            make_client = cluster.client
            target = (
                f"a local {args.nodes}-node cluster (Raft ports {cluster.first_port}-"
                f"{cluster.first_port + args.nodes - 1}, node log level {args.node_log_level})"
            )
        print(f"benchmark of {target}")
        print(
            f"{args.duration:g} s per point, {args.value_size}-byte values; {HOW_CLIENTS_ARE_RUN}"
        )
        points = uvloop.run(run_sweep(make_client, args.clients, args.duration, args.value_size))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (cluster_client.ClientError, ConfigError, PortBusyError) as e:
        print(f"benchmark: {e}", file=sys.stderr)
        return 1
    except TimeoutError as e:
        print(f"benchmark: the local cluster did not elect a leader: {e}", file=sys.stderr)
        return 1
    finally:
        if cluster is not None:
            cluster.stop()

    if args.json is not None:
        report = {
            "target": target,
            "duration_s": args.duration,
            "value_size": args.value_size,
            "how": HOW_CLIENTS_ARE_RUN,
            "results": [asdict(p) for p in points],
        }
        try:
            args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            print(f"benchmark: cannot write {args.json}: {e.strerror}", file=sys.stderr)
            return 1
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
