"""Side-by-side benchmark of this project, etcd, PySyncObj and a do-nothing server, all driven by
the same client loop over gRPC: `python -m test.benchmark` (see `--help`; `failover` and `restart`
are separate measurements of this project)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import signal
import statistics
import string
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import uvloop

from test.bench_report import (
    BATCH_SIZE,
    HEADER,
    Cell,
    Progress,
    Report,
    draw_charts,
    format_cell,
    format_node_cost,
    format_table,
    headline_table,
    markdown_table,
    node_cost_table,
    node_costs,
    percentile,
)
from test.bench_systems import (
    SYSTEMS,
    WORKLOADS,
    BenchError,
    ClusterApiDriver,
    Driver,
    RaftDemo,
    System,
    Unsupported,
    rss_bytes,
    stop_all_systems,
)
from test.cluster_process import LocalCluster, PortBusyError

HOW = (
    "one client process; for each cell N asyncio tasks share one gRPC channel per node; writes go "
    "to the leader, reads round-robin to every node; client and nodes share this machine's CPUs"
)
PRELOADED_KEYS = 1000
# Of the mixed workload's operations, this share are (linearizable) reads, the rest writes.
MIXED_READ_SHARE = 0.9


def _machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({model or 'unknown'}), "
        f"Python {platform.python_version()}, load average {load} at start"
    )


# -- one measurement --------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    value: str
    keys: list[str]


def operation_for(
    workload: Workload, driver: Driver, clients: int, tag: str
) -> Callable[[int, int], Awaitable[None]]:
    """The call task `t` makes for its `i`-th operation of `workload`."""
    value, keys = workload.value, workload.keys
    if workload.name == "write":

        async def write(t: int, i: int) -> None:
            await driver.put(f"w-{t}-{i % 1000}", value)

        return write
    if workload.name in ("read", "stale-read"):
        stale = workload.name == "stale-read"

        async def read(t: int, i: int) -> None:
            await driver.get(random.choice(keys), stale)

        return read
    if workload.name == "mixed":

        async def mixed(t: int, i: int) -> None:
            if random.random() < MIXED_READ_SHARE:
                await driver.get(random.choice(keys), False)
            else:
                await driver.put(random.choice(keys), value)

        return mixed
    if workload.name == "batch":

        async def batch(t: int, i: int) -> None:
            await driver.put_many({f"b-{t}-{i % 10}-{j}": value for j in range(BATCH_SIZE)})

        return batch
    if workload.name == "cas":
        last: dict[int, str | None] = {}

        async def cas(t: int, i: int) -> None:
            new = f"{i}-{value}"
            if not await driver.cas(f"cas-{tag}-{t}", last.get(t), new):
                raise BenchError(f"compare-and-swap of cas-{tag}-{t} did not swap")
            last[t] = new

        return cas
    raise ValueError(f"unknown workload {workload.name}")


async def measure(
    cell: Cell,
    duration: float,
    operation: Callable[[int, int], Awaitable[None]],
    system: System,
) -> Cell:
    """Run `operation` from `cell.clients` tasks for `duration` s and fill in the cell, with what
    each of the system's processes spent on it."""
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
            except BenchError:
                errors += 1
            else:
                latencies.append(time.perf_counter() - started)
            i += 1

    before = await system.sample()
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(task(t) for t in range(cell.clients)))
    wall = time.perf_counter() - wall_start
    cpu = time.process_time() - cpu_start
    after = await system.sample()
    cluster_cpu = sum(s.cpu for s in after) - sum(s.cpu for s in before)
    cell.node_costs = node_costs(before, after, len(latencies), wall)
    latencies.sort()
    cell.ops = len(latencies)
    cell.errors = errors
    cell.seconds = round(wall, 3)
    cell.ops_per_s = round(len(latencies) / wall, 1)
    cell.p50_ms = round(percentile(latencies, 0.50) * 1000, 2)
    cell.p99_ms = round(percentile(latencies, 0.99) * 1000, 2)
    cell.p999_ms = round(percentile(latencies, 0.999) * 1000, 2)
    cell.cpu_s_per_1000_ops = round(1000 * cluster_cpu / len(latencies), 4) if latencies else None
    cell.client_cpu_percent = round(100 * cpu / wall, 0)
    return cell


# -- the side-by-side run -----------------------------------------------------------------------------


@dataclass
class Plan:
    systems: list[str]
    workloads: list[str]
    clients: list[int]
    value_sizes: list[int]
    nodes: list[int]
    duration: float

    def cells_for(self, system: type[System]) -> int:
        workloads = [w for w in self.workloads if w not in system.unsupported]
        return len(workloads) * len(self.clients) * len(self.value_sizes)


async def run_system(
    system: System, nodes: int, plan: Plan, report: Report, progress: Progress
) -> None:
    """Measure every planned cell of one started system of one cluster size."""
    await system.wait_ready()
    for value_size in plan.value_sizes:
        value = "".join(random.choices(string.ascii_letters + string.digits, k=value_size))
        driver = system.driver()
        try:
            keys = [f"k-{i}" for i in range(PRELOADED_KEYS)]
            if {"read", "stale-read", "mixed"} & set(plan.workloads):
                for start in range(0, len(keys), BATCH_SIZE):
                    await driver.put_many({k: value for k in keys[start : start + BATCH_SIZE]})
        finally:
            await driver.close()
        for workload in plan.workloads:
            if workload in system.unsupported:
                continue
            for clients in plan.clients:
                cell = Cell(system.name, workload, nodes, value_size, clients)
                label = f"{system.name} {workload} n={nodes} {value_size}B c={clients}"
                progress.show(label)
                # A fresh driver per cell: no connection state carries over between cells.
                driver = system.driver()
                try:
                    if hasattr(driver, "find_leader"):
                        await driver.find_leader(10)
                    operation = operation_for(
                        Workload(workload, value, keys),
                        driver,
                        clients,
                        f"{nodes}-{value_size}-{clients}",
                    )
                    await measure(cell, plan.duration, operation, system)
                except Unsupported as e:
                    cell.note = f"not supported: {e}"
                finally:
                    await driver.close()
                report.cells.append(cell)
                progress.step(label)
                _print_row(progress, format_cell(cell))
                for row in cell.node_costs:
                    _print_row(progress, format_node_cost(row))


def _print_row(progress: Progress, row: str) -> None:
    progress.print(row)


def run_plan(plan: Plan, report: Report) -> None:
    runnable: list[type[System]] = []
    for name in plan.systems:
        kind = SYSTEMS[name]
        why = kind.missing()
        if why is None:
            runnable.append(kind)
        else:
            report.skipped[name] = why
            print(f"skipping {name}: {why}", flush=True)
    progress = Progress(sum(plan.cells_for(k) for k in runnable) * len(plan.nodes))
    print(HEADER, flush=True)
    for nodes in plan.nodes:
        for kind in runnable:
            system = kind()
            try:
                system.start(nodes)
                uvloop.run(run_system(system, nodes, plan, report, progress))
            except (BenchError, PortBusyError) as e:
                message = f"could not be measured: {e}"
                report.cells.append(Cell(kind.name, "-", nodes, 0, 0, note=message))
                _print_row(progress, f"{kind.name} ({nodes} nodes) {message}")
            finally:
                system.stop()
    progress.finish()


# -- failover and restart (this project only) ------------------------------------------------------------


async def _failover(cluster: LocalCluster, runs: int, progress: Progress) -> list[float]:
    addresses = [cluster.client_address(n) for n in cluster.node_ids]
    driver = ClusterApiDriver(addresses)
    times: list[float] = []
    try:
        for run in range(runs):
            leader = await cluster.wait_for_leader(timeout=20)
            await driver.find_leader(10)
            await driver.put("failover", f"before-{run}")
            killed_at = time.perf_counter()
            cluster.kill_node(leader)
            await driver.put("failover", f"after-{run}")
            times.append(time.perf_counter() - killed_at)
            cluster.start_node(leader)
            # Before the next kill the restarted node must have caught up, so that every run
            # starts from a healthy cluster of five.
            async with cluster.probe() as probe:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        if await probe.get_value(leader, "failover") == f"after-{run}":
                            break
                    except Exception:  # noqa: BLE001 - not answering yet counts as not caught up
                        pass
                    if time.monotonic() > deadline:
                        raise BenchError(f"node {leader} did not catch up after its restart")
                    await asyncio.sleep(0.05)
            progress.step(f"failover {run + 1}: {times[-1] * 1000:.0f} ms")
    finally:
        await driver.close()
    return times


def run_failover(nodes: int, runs: int, report: Report) -> None:
    system = RaftDemo()
    try:
        system.start(nodes)
        assert system.cluster is not None
        progress = Progress(runs)
        times = uvloop.run(_failover(system.cluster, runs, progress))
        progress.finish()
    finally:
        system.stop()
    report.extra["failover"] = {
        "nodes": nodes,
        "runs_ms": [round(t * 1000, 1) for t in times],
        "median_ms": round(statistics.median(times) * 1000, 1),
    }
    print(
        f"failover ({nodes} nodes, kill -9 of the leader to the next acknowledged write): "
        f"median {statistics.median(times) * 1000:.0f} ms, "
        f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms over {len(times)} runs"
    )


async def _load(
    driver: ClusterApiDriver, keys: int, value: str, limit_s: float, progress: Progress
) -> int:
    """Write keys k-0..k-(keys-1) in batches of 1,000 from 4 tasks; the count written in time."""
    batch = 1000
    batches = iter(range(0, keys, batch))
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + limit_s
    written = 0

    async def task() -> None:
        nonlocal written
        for start in batches:
            if loop.time() > stop_at:
                return
            await driver.put_many({f"k-{i}": value for i in range(start, min(start + batch, keys))})
            written += min(batch, keys - start)
            progress.step(f"loaded {written:,} keys")

    await asyncio.gather(*(task() for _ in range(4)))
    return written


async def _restart(
    cluster: LocalCluster, keys: int, value_size: int, limit_s: float, report: Report
) -> None:
    await cluster.wait_for_leader(timeout=20)
    addresses = [cluster.client_address(n) for n in cluster.node_ids]
    driver = ClusterApiDriver(addresses)
    value = "v" * value_size
    progress = Progress(-(-keys // 1000))
    try:
        await driver.find_leader(10)
        started = time.perf_counter()
        written = await _load(driver, keys, value, limit_s, progress)
        load_s = time.perf_counter() - started
        progress.finish()
    finally:
        await driver.close()
    rss = {n: rss_bytes(cluster.pid(n) or 0) for n in cluster.node_ids}
    for node_id in cluster.node_ids:
        cluster.kill_node(node_id)
    restarted = time.perf_counter()
    cluster.start()
    driver = ClusterApiDriver(addresses)
    last = f"k-{written - 1}"
    try:
        await cluster.wait_for_leader(timeout=600)
        elected_s = time.perf_counter() - restarted
        got = await driver.get(last, False)
        serving_s = time.perf_counter() - restarted
    finally:
        await driver.close()
    rss_after = {n: rss_bytes(cluster.pid(n) or 0) for n in cluster.node_ids}
    result = {
        "nodes": cluster.nodes,
        "keys_requested": keys,
        "keys_written": written,
        "value_size": value_size,
        "load_s": round(load_s, 1),
        "load_keys_per_s": round(written / load_s, 0),
        "rss_mb_after_load": {str(n): round(b / 2**20, 1) for n, b in rss.items()},
        "restart_to_leader_s": round(elected_s, 2),
        "restart_to_first_read_s": round(serving_s, 2),
        "first_read_correct": got == value,
        "rss_mb_after_restart": {str(n): round(b / 2**20, 1) for n, b in rss_after.items()},
    }
    report.extra["restart"] = result
    print(
        f"loaded {written:,} of {keys:,} keys ({value_size}-byte values) in {load_s:.1f} s "
        f"({written / load_s:,.0f} keys/s); RSS per node after the load: "
        + ", ".join(f"{b / 2**20:.1f} MB" for b in rss.values())
    )
    print(
        f"after kill -9 of every node: leader elected {elapsed(elected_s)}, first linearizable "
        f"read of {last} answered {elapsed(serving_s)} after the restart "
        f"({'correct' if got == value else 'WRONG: ' + repr(got)}); RSS per node after the "
        "restart: " + ", ".join(f"{b / 2**20:.1f} MB" for b in rss_after.values())
    )


def elapsed(seconds: float) -> str:
    return f"{seconds:.2f} s"


def run_restart(nodes: int, keys: int, value_size: int, limit_s: float, report: Report) -> None:
    system = RaftDemo()
    try:
        system.start(nodes)
        assert system.cluster is not None
        uvloop.run(_restart(system.cluster, keys, value_size, limit_s, report))
    finally:
        system.stop()


# -- command line ------------------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    print(f"benchmark: {message}", file=sys.stderr)
    raise SystemExit(2)


def _numbers(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,8,64, not {text!r}") from None
    if not values or any(n < 1 for n in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers like 1,8,64, not {text!r}")
    return values


def _choices(allowed: tuple[str, ...] | list[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",") if part.strip()]
        wrong = [v for v in values if v not in allowed]
        if not values or wrong:
            raise argparse.ArgumentTypeError(f"expected some of {','.join(allowed)}, not {text!r}")
        return values

    return parse


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m test.benchmark",
        description="Measure this project side by side with etcd, PySyncObj and a do-nothing "
        "gRPC server, all driven by the same client loop. Prints figures, writes JSON and PNG "
        "charts; passes or fails nothing.",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=["run", "failover", "restart"],
        default="run",
        help="run: the side-by-side table (default); failover: kill -9 of the leader to the next "
        "acknowledged write; restart: memory and restart time with many keys",
    )
    parser.add_argument(
        "--systems",
        type=_choices(list(SYSTEMS)),
        default=[s for s in SYSTEMS if s != "baseline"],
        help=f"systems to compare ({','.join(SYSTEMS)}; baseline: another version of this "
        "project, in the folder $RAFT_DEMO_BASELINE, for an A/B)",
    )
    parser.add_argument(
        "--workloads",
        type=_choices(WORKLOADS),
        default=list(WORKLOADS),
        help=f"workloads ({','.join(WORKLOADS)})",
    )
    parser.add_argument(
        "--clients", type=_numbers, default=[1, 8, 64, 256], help="concurrency sweep (1,8,64,256)"
    )
    parser.add_argument(
        "--value-sizes", type=_numbers, default=[64, 4096], help="value sizes in bytes (64,4096)"
    )
    parser.add_argument("--nodes", type=_numbers, default=[5, 3], help="cluster sizes (5,3)")
    parser.add_argument(
        "--duration", type=_positive(float), default=5.0, help="seconds per cell (5)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a one-minute run: raft-demo and null, write and read, 1 and 8 clients, 64-byte "
        "values, 3 nodes, 2 s per cell (explicit flags still win)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench"),
        help="folder for results.json, results.md and the PNG charts (bench)",
    )
    parser.add_argument("--no-charts", action="store_true", help="write no PNG charts")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="measure nothing: print the tables and draw the charts of a saved results.json",
    )
    parser.add_argument("--runs", type=_positive(int), default=10, help="failover runs (10)")
    parser.add_argument(
        "--keys", type=_positive(int), default=1_000_000, help="restart: keys to load (1000000)"
    )
    parser.add_argument(
        "--load-limit",
        type=_positive(float),
        default=900.0,
        help="restart: stop loading after this many seconds and measure what is there (900)",
    )
    return parser


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Stop everything at once, before unwinding: the signal may end this process before a
    # finally block that would stop them has run.
    stop_all_systems()
    raise KeyboardInterrupt(f"ended by {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.quick:
        given = " ".join(argv)
        defaults = {
            "systems": ["raft-demo", "null"],
            "workloads": ["write", "read"],
            "clients": [1, 8],
            "value_sizes": [64],
            "nodes": [3],
            "duration": 2.0,
        }
        for name, value in defaults.items():
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail(f"cannot create {args.out}: {e.strerror}")
    if not os.access(args.out, os.W_OK):
        _fail(f"cannot write to {args.out}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _on_signal)

    if args.from_json is not None:
        try:
            report = load_report(args.from_json)
        except (OSError, ValueError, TypeError, KeyError) as e:
            _fail(f"cannot read {args.from_json}: {e}")
        return write_outputs(report, args.out, None, not args.no_charts)

    command = "python -m test.benchmark " + " ".join(shlex.quote(a) for a in argv)
    report = Report(machine=_machine(), command=command.strip(), duration_s=args.duration)
    print(f"{report.command}\nmachine: {report.machine}\n{HOW}", flush=True)
    try:
        if args.command == "failover":
            run_failover(max(args.nodes), args.runs, report)
        elif args.command == "restart":
            run_restart(max(args.nodes), args.keys, min(args.value_sizes), args.load_limit, report)
        else:
            plan = Plan(
                args.systems,
                args.workloads,
                args.clients,
                args.value_sizes,
                args.nodes,
                args.duration,
            )
            run_plan(plan, report)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (BenchError, PortBusyError, TimeoutError) as e:
        print(f"benchmark: {e}", file=sys.stderr)
        return 1
    json_name = None if args.command == "run" else f"{args.command}.json"
    return write_outputs(report, args.out, json_name, not args.no_charts)


def load_report(path: Path) -> Report:
    """A report saved by an earlier run (its results.json)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    cells = [Cell(**c) for c in data.pop("cells")]
    return Report(**data, cells=cells)


def write_outputs(report: Report, out: Path, json_name: str | None, charts: bool) -> int:
    """Write the JSON (results.json for the side-by-side run); for a run with cells, also print
    the table and the headline comparison, write results.md and draw the charts."""
    path = out / (json_name or "results.json")
    try:
        path.write_text(report.to_json(), encoding="utf-8")
        if report.cells:
            measured = [c for c in report.cells if not c.note]
            print("\n" + format_table(report.cells))
            headlines = [
                headline_table(measured, n, size)
                for n, size in sorted({(c.nodes, c.value_size) for c in measured})
            ]
            print("\n" + "\n\n".join(headlines))
            (out / "results.md").write_text(
                "\n\n".join([*headlines, markdown_table(measured), node_cost_table(measured)])
                + "\n",
                encoding="utf-8",
            )
            if charts:
                try:
                    drawn = draw_charts(measured, out)
                except ImportError:
                    print(
                        "no charts: matplotlib is not installed (pip install -r requirements.txt)"
                    )
                else:
                    print(f"{len(drawn)} chart(s) written to {out}/")
    except OSError as e:
        print(f"benchmark: cannot write to {out}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"figures written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
