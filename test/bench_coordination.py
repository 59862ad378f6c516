"""`python -m test.bench_coordination`: what ranges and watches cost, beside etcd in the same run
(when installed). Two measurements, a few seconds each, on clusters this script starts and stops:

- range: one client reads the same 1,000 keys (a prefix) over and over, linearizable and stale
  (etcd: serializable); ranges per second and the median latency;
- watch fan-out: 100 watchers of one prefix while 4 writers commit batches of 10 keys; changes
  delivered per second across all watchers, from the first write to the last change received;
- lease keepalives: 10,000 leases granted, then rounds of one keepalive for each on one stream
  (etcd's LeaseKeepAlive; raft-demo's LeaseKeepAliveStream), and for raft-demo also as unary
  calls, 64 at a time; how long a round for all takes and keepalives per second.

Figures only: nothing here passes or fails on a timing."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from rpc import raft_pb2, raft_pb2_grpc
from test.bench_systems import Etcd, EtcdDriver, etcd_kv
from test.cluster_process import CHANNEL_OPTIONS, LocalCluster

KEYS = 1000
WATCHERS = 100
BATCH = 10
WRITERS = 4
LEASES = 10_000
# Grants (and unary keepalives) in flight at once, well within the 128 streams a node lets one
# connection hold (streams just finished may still count for a moment).
CONCURRENCY = 64
LEASE_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


async def _grant_all(grant: Callable[[], Awaitable[int]]) -> tuple[list[int], float]:
    """LEASES leases granted, CONCURRENCY at a time: their ids, and grants per second."""
    ids: list[int] = []
    left = [LEASES]
    started = time.perf_counter()

    async def granter() -> None:
        while left[0] > 0:
            left[0] -= 1
            ids.append(await grant())

    await asyncio.gather(*(granter() for _ in range(CONCURRENCY)))
    return ids[:LEASES], LEASES / (time.perf_counter() - started)


async def _keepalive_rounds(
    open_stream: Callable[[], Any],
    request: Callable[[int], Any],
    alive: Callable[[Any], bool],
    ids: list[int],
    seconds: float,
) -> tuple[int, float, float]:
    """Rounds of one keepalive per lease on one stream (written while replies are read), for
    `seconds` (at least one round): (rounds, median seconds a round, keepalives per second)."""
    call = open_stream()
    rounds: list[float] = []
    started = time.perf_counter()
    try:
        while not rounds or time.perf_counter() - started < seconds:
            begun = time.perf_counter()

            async def write() -> None:
                for lease_id in ids:
                    await call.write(request(lease_id))

            writer = asyncio.create_task(write())
            for _ in ids:
                reply = await call.read()
                assert alive(reply), reply
            await writer
            rounds.append(time.perf_counter() - begun)
    finally:
        call.cancel()
    return len(rounds), statistics.median(rounds), len(ids) / statistics.median(rounds)


async def _timed(call: Callable[[], Awaitable[Any]], seconds: float) -> tuple[int, float, float]:
    """Run `call` back to back for `seconds`: (calls, calls per second, median ms)."""
    latencies: list[float] = []
    started = time.perf_counter()
    while (now := time.perf_counter()) - started < seconds:
        await call()
        latencies.append(time.perf_counter() - now)
    elapsed = time.perf_counter() - started
    return len(latencies), len(latencies) / elapsed, statistics.median(latencies) * 1000


async def _fan_out(
    open_watch: Callable[[], Any],
    count_events: Callable[[Any], int],
    write_batch: Callable[[int], Awaitable[None]],
    seconds: float,
) -> tuple[int, int, float]:
    """WATCHERS streams from `open_watch()`; batches written for `seconds`; (batches written,
    changes delivered in all, changes delivered per second)."""
    received = [0] * WATCHERS
    total = [0]
    # Set once every watcher has received every change written (the target known once writing
    # stops).
    target = [0]
    done = asyncio.Event()
    streams = [open_watch() for _ in range(WATCHERS)]
    for stream in streams:
        await stream.read()  # created: the watch is in place

    async def drain(i: int, stream: Any) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            while (message := await stream.read()) is not grpc.aio.EOF:
                count = count_events(message)
                received[i] += count
                total[0] += count
                if target[0] and total[0] >= target[0]:
                    done.set()

    readers = [asyncio.create_task(drain(i, s)) for i, s in enumerate(streams)]
    started = time.perf_counter()
    written = [0]

    async def writer() -> None:
        while time.perf_counter() - started < seconds:
            number = written[0]
            written[0] += 1
            await write_batch(number)

    try:
        # Several writers at once, so that the writes' commit latency does not set the pace.
        await asyncio.gather(*(writer() for _ in range(WRITERS)))
        batches = written[0]
        target[0] = batches * BATCH * WATCHERS
        if total[0] < target[0]:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 30)
        elapsed = time.perf_counter() - started
    finally:
        for stream in streams:
            stream.cancel()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    delivered = sum(received)
    return batches, delivered, delivered / elapsed


async def bench_raft_demo(nodes: int, seconds: float) -> dict[str, str]:
    figures: dict[str, str] = {}
    with LocalCluster(nodes=nodes, extra_args=["--log-level", "WARNING"]) as cluster:
        cluster.start()
        await cluster.wait_for_leader(timeout=20)
        async with cluster.client() as client:
            await client.propose_mappings({f"r/{i:04d}": "v" * 100 for i in range(KEYS)})
            leader = client.known_leader or cluster.client_addresses[0]
            channel = grpc.aio.insecure_channel(leader, options=CHANNEL_OPTIONS)
            try:
                stub = raft_pb2_grpc.ClusterStub(channel)
                # The raw call, as for etcd: what the library adds on top is measured apart.
                for stale in (False, True):
                    request = raft_pb2.RangeRequest(
                        key="r/", prefix=True, limit=KEYS, allow_stale=stale
                    )

                    async def one(request: raft_pb2.RangeRequest = request) -> None:
                        reply = await stub.Range(request, timeout=10)
                        assert len(reply.kvs) == KEYS

                    n, rate, median = await _timed(one, seconds)
                    label = "range 1000 keys, " + ("stale" if stale else "linearizable")
                    figures[label] = f"{rate:7.1f}/s  median {median:6.2f} ms  ({n} ranges)"

                async def library() -> None:
                    page = await client.get_range("r/", prefix=True, limit=KEYS)
                    assert len(page.kvs) == KEYS

                n, rate, median = await _timed(library, seconds)
                figures["range 1000 keys, Client.get_range"] = (
                    f"{rate:7.1f}/s  median {median:6.2f} ms  ({n} ranges)"
                )

                def open_watch() -> Any:
                    return stub.Watch(raft_pb2.WatchRequest(key="w/", prefix=True))

                async def write(batch: int) -> None:
                    await client.propose_mappings(
                        {f"w/{batch}/{i}": "x" * 100 for i in range(BATCH)}
                    )

                batches, delivered, rate = await _fan_out(
                    open_watch, lambda m: len(m.events), write, seconds
                )
                figures[f"watch fan-out, {WATCHERS} watchers"] = (
                    f"{rate:7.0f} changes/s delivered  ({delivered} changes, {batches} batches "
                    f"of {BATCH})"
                )

            finally:
                await channel.close()
            # A connection of its own: the watches' streams may still be closing on the other.
            channel = grpc.aio.insecure_channel(leader, options=LEASE_CHANNEL_OPTIONS)
            try:
                stub = raft_pb2_grpc.ClusterStub(channel)

                async def grant() -> int:
                    reply = await stub.LeaseGrant(raft_pb2.LeaseGrantRequest(ttl=600), timeout=30)
                    return int(reply.id)

                ids, grants = await _grant_all(grant)
                figures[f"lease grants ({LEASES})"] = f"{grants:7.0f}/s"
                n, median, rate = await _keepalive_rounds(
                    stub.LeaseKeepAliveStream,
                    lambda i: raft_pb2.LeaseKeepAliveRequest(id=i),
                    lambda reply: reply.ttl == 600,
                    ids,
                    seconds,
                )
                figures[f"keepalive {LEASES} leases, stream"] = (
                    f"{rate:7.0f}/s  a round {median * 1000:6.0f} ms  ({n} rounds)"
                )
                queue = list(ids)
                begun = time.perf_counter()

                async def keeper() -> None:
                    while queue:
                        lease_id = queue.pop()
                        reply = await stub.LeaseKeepAlive(
                            raft_pb2.LeaseKeepAliveRequest(id=lease_id), timeout=30
                        )
                        assert reply.ttl == 600

                await asyncio.gather(*(keeper() for _ in range(CONCURRENCY)))
                took = time.perf_counter() - begun
                figures[f"keepalive {LEASES} leases, unary x{CONCURRENCY}"] = (
                    f"{LEASES / took:7.0f}/s  a round {took * 1000:6.0f} ms  (1 round)"
                )
            finally:
                await channel.close()
    return figures


async def bench_etcd(nodes: int, seconds: float) -> dict[str, str]:
    figures: dict[str, str] = {}
    etcd = Etcd()
    try:
        etcd.start(nodes)
        await etcd.wait_ready()
        driver = EtcdDriver(etcd.client_addresses)
        await driver.find_leader(10)
        leader = driver._leader
        channel = grpc.aio.insecure_channel(leader, options=CHANNEL_OPTIONS)
        try:
            kv = etcd_kv
            txn = channel.unary_unary(
                "/etcdserverpb.KV/Txn",
                request_serializer=kv.TxnRequest.SerializeToString,
                response_deserializer=kv.TxnResponse.FromString,
            )
            rng = channel.unary_unary(
                "/etcdserverpb.KV/Range",
                request_serializer=kv.RangeRequest.SerializeToString,
                response_deserializer=kv.RangeResponse.FromString,
            )
            watch = channel.stream_stream(
                "/etcdserverpb.Watch/Watch",
                request_serializer=kv.WatchRequest.SerializeToString,
                response_deserializer=kv.WatchResponse.FromString,
            )

            def puts(keys: list[str]) -> Any:
                return kv.TxnRequest(
                    success=[
                        kv.RequestOp(request_put=kv.PutRequest(key=k.encode(), value=b"v" * 100))
                        for k in keys
                    ]
                )

            for start in range(0, KEYS, 100):  # etcd's default limit: 128 operations a txn
                await txn(puts([f"r/{i:04d}" for i in range(start, start + 100)]), timeout=10)
            for serializable in (False, True):

                async def one(serializable: bool = serializable) -> None:
                    reply = await rng(
                        kv.RangeRequest(
                            key=b"r/", range_end=b"r0", limit=KEYS, serializable=serializable
                        ),
                        timeout=10,
                    )
                    assert len(reply.kvs) == KEYS

                n, rate, median = await _timed(one, seconds)
                label = "range 1000 keys, " + ("stale" if serializable else "linearizable")
                figures[label] = f"{rate:7.1f}/s  median {median:6.2f} ms  ({n} ranges)"

            def open_watch() -> Any:
                call = watch()
                request = kv.WatchRequest(
                    create_request=kv.WatchCreateRequest(key=b"w/", range_end=b"w0")
                )
                asyncio.get_running_loop().create_task(call.write(request))
                return call

            async def write(batch: int) -> None:
                await txn(puts([f"w/{batch}/{i}" for i in range(BATCH)]), timeout=10)

            batches, delivered, rate = await _fan_out(
                open_watch, lambda m: len(m.events), write, seconds
            )
            figures[f"watch fan-out, {WATCHERS} watchers"] = (
                f"{rate:7.0f} changes/s delivered  ({delivered} changes, {batches} batches "
                f"of {BATCH})"
            )
            await channel.close()
            channel = grpc.aio.insecure_channel(leader, options=LEASE_CHANNEL_OPTIONS)
            lease_grant = channel.unary_unary(
                "/etcdserverpb.Lease/LeaseGrant",
                request_serializer=kv.LeaseGrantRequest.SerializeToString,
                response_deserializer=kv.LeaseGrantResponse.FromString,
            )
            keepalive = channel.stream_stream(
                "/etcdserverpb.Lease/LeaseKeepAlive",
                request_serializer=kv.LeaseKeepAliveRequest.SerializeToString,
                response_deserializer=kv.LeaseKeepAliveResponse.FromString,
            )

            async def grant() -> int:
                reply = await lease_grant(kv.LeaseGrantRequest(TTL=600), timeout=30)
                return int(reply.ID)

            ids, grants = await _grant_all(grant)
            figures[f"lease grants ({LEASES})"] = f"{grants:7.0f}/s"
            n, median, rate = await _keepalive_rounds(
                keepalive,
                lambda i: kv.LeaseKeepAliveRequest(ID=i),
                lambda reply: reply.TTL == 600,
                ids,
                seconds,
            )
            figures[f"keepalive {LEASES} leases, stream"] = (
                f"{rate:7.0f}/s  a round {median * 1000:6.0f} ms  ({n} rounds)"
            )
        finally:
            await channel.close()
            await driver.close()
    finally:
        etcd.stop()
    return figures


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m test.bench_coordination", description=__doc__)
    parser.add_argument("--nodes", type=int, default=1, help="nodes per cluster (1)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement (2)")
    args = parser.parse_args(argv)
    systems: dict[str, dict[str, str]] = {
        "raft-demo": await bench_raft_demo(args.nodes, args.seconds)
    }
    missing = Etcd.missing()
    if missing is None:
        systems["etcd"] = await bench_etcd(args.nodes, args.seconds)
    print(f"{args.nodes}-node clusters, {args.seconds:g} s per measurement")
    for name, figures in systems.items():
        print(f"{name}:")
        for label, figure in figures.items():
            print(f"  {label:36} {figure}")
    if missing is not None:
        print(f"etcd: not measured ({missing})")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
