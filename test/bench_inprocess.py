"""The consensus code's own CPU per operation, without gRPC: `python -m test.bench_inprocess`.

Five `RaftNode`s in this one process, on memory disks, talking through the in-memory transport
(test/memory_transport.py); N tasks write (or read) for a while. What it prints is the Python work
of the leader's and followers' code per write or read, with message, fsync and batch counts. Run it
from two versions of the project (e.g. with `PYTHONPATH=OLD python -m test.bench_inprocess` from a
checkout of the old one) to compare them on a busy machine: CPU time per operation is little
affected by other load, unlike throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

import uvloop

from cluster_config import ClusterConfig
from disk import MemoryDisk
from log import RaftLog
from raft_node import RaftNode, Timing
from test.memory_transport import InMemoryNetwork

TIMING = Timing(
    heartbeat_interval=0.05,
    election_timeout_min=1.0,
    election_timeout_max=2.0,
    proposal_timeout=10.0,
    append_timeout=5.0,
)


async def _cluster(size: int) -> tuple[dict[int, RaftNode], RaftNode]:
    first = 30000
    cluster = ClusterConfig.seed_scheme(first, size, "127.0.0.1")
    net = InMemoryNetwork()
    nodes = {}
    for node_id in sorted(cluster.nodes):
        log = await RaftLog.open(f"/data/{node_id}", MemoryDisk())
        node = RaftNode(node_id, cluster, log, net.transport(node_id), TIMING, random.Random(1))
        net.attach(node)
        nodes[node_id] = node
    for node in nodes.values():
        node.start()
    deadline = time.monotonic() + 30
    while True:
        leaders = [n for n in nodes.values() if n.is_leader]
        if leaders and all(n.leader_id == leaders[0].node_id for n in nodes.values()):
            return nodes, leaders[0]
        if time.monotonic() > deadline:
            raise SystemExit("no leader")
        await asyncio.sleep(0.01)


async def _measure(workload: str, clients: int, seconds: float, size: int) -> None:
    nodes, leader = await _cluster(size)
    await leader.propose_mapping("k", "v" * 64)
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds
    ops = 0
    value = "v" * 64
    followers = [n for n in nodes.values() if n is not leader]

    async def task(t: int) -> None:
        nonlocal ops
        i = 0
        while loop.time() < stop_at:
            if workload == "write":
                await leader.propose_mapping(f"w-{t}-{i % 100}", value)
            else:
                await followers[i % len(followers)].linearizable_read("k")
            i += 1
            ops += 1

    def counts() -> tuple[int, int, int, int]:
        c = leader.counters
        return (
            (
                leader.commit_index,
                sum(n.counters.messages_sent for n in nodes.values()),
                sum(n.log.fsyncs for n in nodes.values()),
                c.appends_sent,
            )
            if hasattr(leader, "counters")
            else (leader.commit_index, 0, 0, 0)
        )

    before = counts()
    entries_before = leader.counters.entries_sent if hasattr(leader, "counters") else 0
    cpu = time.process_time()
    await asyncio.gather(*(task(t) for t in range(clients)))
    cpu = time.process_time() - cpu
    after = counts()
    committed, messages, fsyncs, appends = (a - b for a, b in zip(after, before, strict=True))
    entries = (leader.counters.entries_sent if hasattr(leader, "counters") else 0) - entries_before
    line = f"{workload} c={clients}: {ops} ops, {1e6 * cpu / max(ops, 1):.1f} us CPU/op (all nodes)"
    if appends:
        line += (
            f", messages/op {messages / max(ops, 1):.2f}, fsyncs/op {fsyncs / max(ops, 1):.2f}, "
            f"entries/append {entries / appends:.1f}, committed {committed}"
        )
    print(line, flush=True)
    for node in nodes.values():
        await node.stop()
        await node.log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m test.bench_inprocess", description=__doc__)
    parser.add_argument("--workloads", default="write,read")
    parser.add_argument("--clients", default="1,64")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--nodes", type=int, default=5)
    args = parser.parse_args(argv)
    for workload in args.workloads.split(","):
        for clients in (int(c) for c in args.clients.split(",")):
            uvloop.run(_measure(workload, clients, args.seconds, args.nodes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
