"""Run real node processes and check what a user relies on: `python -m test.test_harness [scenario]`.

`python -m test.test_harness up` instead starts a cluster and keeps it running until Ctrl-C (with
`--web [PORT]`, behind proxies and with the live view, test/live_cluster.py);
`python -m test.test_harness faults --duration S --seed N` runs the fault suite (test/fault_suite.py);
`python -m test.test_harness membership` grows, shrinks and repairs a cluster under load.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from test.cluster_process import (
    HOST,
    REPO_ROOT,
    ClusterTls,
    HostCluster,
    LocalCluster,
    NodeProbe,
    PortBusyError,
    busy_ports,
    find_free_port_block,
)

if TYPE_CHECKING:
    import cluster_client
    from test.fault_suite import RecordedLoad
    from test.nemesis import Change

LEADER_TIMEOUT = 15.0
CATCH_UP_TIMEOUT = 30.0
WRITES_RESUME_TIMEOUT = 10.0
TAIL_LINES = 12


class ScenarioFailed(Exception):
    """An outcome a user relies on did not hold; `nodes` are the ones whose logs explain it."""

    def __init__(self, reason: str, nodes: list[int] | None = None) -> None:
        super().__init__(reason)
        self.nodes = nodes or []


@dataclass
class Scenario:
    """What a scenario works with: a started cluster with a leader, a probe, and a narrator."""

    cluster: LocalCluster
    probe: NodeProbe
    started: float
    clients: list[cluster_client.Client] = field(default_factory=list)

    def clock(self) -> float:
        """Seconds since the scenario started, as its narration shows them."""
        return time.monotonic() - self.started

    def say(self, text: str) -> None:
        print(f"    [{self.clock():6.2f}s] {text}", flush=True)

    def client(self, **kwargs: float) -> cluster_client.Client:
        client = self.cluster.client(**kwargs)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        await self.probe.close()


# -- helpers shared by scenarios --------------------------------------------------------------------


def _unavailable_error() -> type[Exception]:
    import cluster_client

    return cluster_client.ClusterUnavailableError


async def write_all(
    client: cluster_client.Client, items: dict[str, str], concurrency: int
) -> tuple[dict[str, str], list[str]]:
    """Propose every mapping, `concurrency` at a time: (the acknowledged ones, error messages)."""
    acked: dict[str, str] = {}
    errors: list[str] = []
    queue = list(items.items())
    queue.reverse()

    async def worker() -> None:
        while queue:
            key, value = queue.pop()
            try:
                await client.propose_mapping(key, value)
            except Exception as e:  # noqa: BLE001 - every failure is counted, not fatal
                errors.append(f"{key}: {type(e).__name__}: {e}")
            else:
                acked[key] = value

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return acked, errors


def require_all_acked(acked: dict[str, str], wanted: int, errors: list[str]) -> None:
    if len(acked) != wanted:
        raise ScenarioFailed(
            f"only {len(acked)} of {wanted} writes were acknowledged with a stable leader; "
            f"first error: {errors[0] if errors else 'none'}"
        )


async def wait_serves(
    scenario: Scenario, node_id: int, expected: dict[str, str], timeout: float, what: str
) -> float:
    """Wait until the node's own GetValue returns every expected value; the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    remaining = dict(expected)
    while True:
        wrong = await scenario.probe.mismatches(node_id, remaining)
        remaining = {k: expected[k] for k in wrong}
        if not remaining:
            return loop.time() - start
        if loop.time() - start >= timeout:
            key = next(iter(wrong))
            raise ScenarioFailed(
                f"{what} {node_id} still does not serve {len(remaining)} of {len(expected)} keys "
                f"after {timeout:g} s, e.g. {key!r}: expected {expected[key]!r}, "
                f"got {wrong[key]!r}",
                [node_id],
            )
        await asyncio.sleep(0.2)


# -- scenarios --------------------------------------------------------------------------------------


async def put_then_read_from_leader(
    s: Scenario, client: cluster_client.Client, key: str, value: str
) -> int:
    """Put through the client, then read straight from the node that acknowledged it; its id."""
    await client.propose_mapping(key, value)
    by_address = {s.cluster.client_address(n): n for n in s.cluster.node_ids}
    leader = by_address.get(client.known_leader or "")
    if leader is None:
        raise ScenarioFailed(f"after put {key} the client names no known leader")
    got = await s.probe.get_value(leader, key)
    if got != value:
        raise ScenarioFailed(
            f"right after put {key}={value!r} was acknowledged, leader {leader} served {got!r}",
            [leader],
        )
    return leader


async def scenario_basic(s: Scenario) -> None:
    """Writes are acknowledged, the leader serves them at once, every follower soon after."""
    leader = await s.cluster.wait_for_leader(LEADER_TIMEOUT)
    s.say(f"leader is {leader}; writing 20 keys one by one, reading each back from the leader")
    client = s.client()
    written: dict[str, str] = {}
    for i in range(20):
        key, value = f"basic-{i}", f"value {i}"
        await put_then_read_from_leader(s, client, key, value)
        written[key] = value
    s.say("overwriting basic-0; the leader must serve the new value")
    leader = await put_then_read_from_leader(s, client, "basic-0", "second value")
    written["basic-0"] = "second value"
    s.say("waiting for every follower to serve all 20 keys")
    for node_id in s.cluster.node_ids:
        if node_id != leader:
            took = await wait_serves(s, node_id, written, CATCH_UP_TIMEOUT, "follower")
            s.say(f"follower {node_id} serves all keys ({took:.2f} s)")
    s.say("reading through the client: written keys, then a key never written")
    for key, value in written.items():
        got = await client.get_value(key)
        if got != value:
            raise ScenarioFailed(f"client get {key} returned {got!r}, expected {value!r}")
    missing = await client.get_value("basic-never-written")
    if missing != "":
        raise ScenarioFailed(f"client get of a missing key returned {missing!r}, expected ''")
    missing = await client.get_value("basic-never-written", default="<none>")
    if missing != "<none>":
        raise ScenarioFailed(f"client get with default='<none>' returned {missing!r}")


async def scenario_leader_dies(s: Scenario) -> None:
    """Writes continue after the leader is killed; the old leader catches up with no new writes."""
    loop = asyncio.get_running_loop()
    leader = await s.cluster.wait_for_leader(LEADER_TIMEOUT)
    client = s.client()
    unavailable = _unavailable_error()
    acked: dict[str, str] = {}
    acks: list[tuple[float, float]] = []  # (when the write started, when it was acknowledged)
    failures: list[str] = []
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        i = 0
        while not stop.is_set():
            key, value = f"ld-{w}-{i}", f"value {w}/{i}"
            i += 1
            started = loop.time()
            try:
                await client.propose_mapping(key, value)
            except unavailable as e:
                failures.append(f"{key}: {e}")
                continue
            acked[key] = value
            acks.append((started, loop.time()))

    async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = loop.time() + timeout
        while not condition():
            if loop.time() >= deadline:
                raise ScenarioFailed(f"{what} within {timeout:g} s")
            for task in writers:
                if task.done() and task.exception() is not None:
                    raise ScenarioFailed(f"a writer failed: {task.exception()!r}")
            await asyncio.sleep(0.02)

    s.say(f"leader is {leader}; starting 4 writers")
    writers = [asyncio.create_task(writer(w)) for w in range(4)]
    try:
        await until(lambda: len(acks) >= 50, 15, "50 writes were not acknowledged")
        pid = s.cluster.pid(leader)
        s.say(f"{len(acks)} writes acknowledged; killing leader {leader} (pid {pid}) with SIGKILL")
        killed_at = loop.time()
        s.cluster.kill_node(leader)
        dead_at = loop.time()
        new_leader = await s.cluster.wait_for_leader(WRITES_RESUME_TIMEOUT, exclude=[leader])
        elected = loop.time() - killed_at
        s.say(f"node {new_leader} leads, {elected:.2f} s after the kill")
        await until(
            lambda: any(start >= dead_at for start, _ in acks),
            WRITES_RESUME_TIMEOUT,
            "no write started after the kill was acknowledged",
        )
        first_ack = min(end for start, end in acks if start >= dead_at) - killed_at
        ends = sorted(end for _, end in acks)
        gap = max(b - a for a, b in zip(ends, ends[1:], strict=False))
        s.say(
            f"writes resumed: first acknowledged write started after the kill took "
            f"{first_ack:.2f} s from the kill; longest pause between acknowledgements {gap:.2f} s"
        )
        before = len(acks)
        await until(lambda: len(acks) >= before + 50, 15, "50 more writes were not acknowledged")
    finally:
        stop.set()
        done, pending = await asyncio.wait(writers, timeout=WRITES_RESUME_TIMEOUT)
        for task in pending:
            task.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            raise ScenarioFailed(f"a writer failed: {task.exception()!r}")
    s.say(
        f"writers stopped: {len(acked)} writes acknowledged, {len(failures)} reported unavailable"
        + ("" if not pending else f", {len(pending)} writers hung and were cancelled")
    )
    s.say(f"restarting {leader}; with no new writes it must serve every acknowledged key")
    s.cluster.restart_node(leader)
    took = await wait_serves(s, leader, acked, CATCH_UP_TIMEOUT, "restarted node")
    s.say(f"node {leader} caught up in {took:.2f} s; checking the other nodes")
    for node_id in s.cluster.node_ids:
        if node_id != leader:
            await wait_serves(s, node_id, acked, CATCH_UP_TIMEOUT, "node")


async def scenario_full_restart(s: Scenario) -> None:
    """Acknowledged writes survive every node being killed at once."""
    await s.cluster.wait_for_leader(LEADER_TIMEOUT)
    client = s.client()
    items = {f"fr-{i}": f"value {i}" for i in range(300)}
    s.say("writing 300 keys, 32 at a time")
    acked, errors = await write_all(client, items, 32)
    require_all_acked(acked, len(items), errors)
    s.say("all acknowledged; killing every node with SIGKILL")
    for node_id in s.cluster.node_ids:
        s.cluster.kill_node(node_id)
    s.say("restarting every node")
    s.cluster.start()
    leader = await s.cluster.wait_for_leader(LEADER_TIMEOUT)
    s.say(f"node {leader} leads; it must serve every acknowledged key")
    took = await wait_serves(s, leader, acked, CATCH_UP_TIMEOUT, "leader")
    s.say(f"leader {leader} serves all 300 keys ({took:.2f} s after it was found)")


async def scenario_follower_catch_up(s: Scenario) -> None:
    """A follower that was down through 1,000 writes catches up after its restart."""
    leader = await s.cluster.wait_for_leader(LEADER_TIMEOUT)
    follower = next(n for n in s.cluster.node_ids if n != leader)
    s.say(f"leader is {leader}; killing follower {follower} with SIGKILL")
    s.cluster.kill_node(follower)
    client = s.client()
    items = {f"cu-{i}": f"value {i}" for i in range(1000)}
    s.say("writing 1,000 keys, 32 at a time")
    loop = asyncio.get_running_loop()
    started = loop.time()
    acked, errors = await write_all(client, items, 32)
    elapsed = loop.time() - started
    require_all_acked(acked, len(items), errors)
    s.say(f"all acknowledged in {elapsed:.2f} s ({len(items) / elapsed:.0f} writes/s)")
    s.say(f"restarting {follower}; it must serve all 1,000 keys")
    s.cluster.restart_node(follower)
    took = await wait_serves(s, follower, acked, CATCH_UP_TIMEOUT, "follower")
    s.say(f"follower {follower} caught up in {took:.2f} s")


# Snapshots every 100 entries, so that a follower down for a few seconds under load needs one.
MEMBERSHIP_FLAGS = ["--snapshot-entries", "100", "--snapshot-keep-entries", "20"]
CHANGE_TIMEOUT = 60.0


async def scenario_membership(s: Scenario) -> None:
    """Grow 3 -> 5, shrink 5 -> 3 (the leader last), replace a node whose disk was lost, and bring
    back a follower that needs a snapshot, under a recorded client load."""
    from test.fault_suite import RecordedLoad
    from test.nemesis import MembershipChanges

    cluster = s.cluster
    loop = asyncio.get_running_loop()
    leader = await cluster.wait_for_leader(LEADER_TIMEOUT)
    s.say(
        f"nodes {_ids(cluster.node_ids)} bootstrapped from one cluster file; node {leader} leads; "
        f"they snapshot every {MEMBERSHIP_FLAGS[1]} entries"
    )
    load = RecordedLoad(cluster, s.clock, clients=4, keys=6, fresh_writers=2)
    admin = s.client(deadline=CHANGE_TIMEOUT)
    changes = MembershipChanges(cluster, admin, s.clock, say=lambda text: s.say(f"  {text}"))
    done: list[Change] = []
    written: dict[str, str] = {}

    async def load_has(acked: int, what: str) -> None:
        """Wait until `acked` more of the load's operations succeed (it keeps running)."""
        target = sum(1 for op in load.history.operations if op.outcome == "ok") + acked
        deadline = loop.time() + CHANGE_TIMEOUT
        while sum(1 for op in load.history.operations if op.outcome == "ok") < target:
            if load.failed():
                raise ScenarioFailed(f"a client failed: {load.failed()}")
            if loop.time() >= deadline:
                raise ScenarioFailed(f"{what}: fewer than {acked} operations succeeded")
            await asyncio.sleep(0.05)

    async def expect_voters(expected: list[int]) -> None:
        voters = await changes.voters()
        if voters != sorted(expected):
            raise ScenarioFailed(
                f"member list names voters {_ids(voters)}, expected {_ids(expected)}", voters
            )
        s.say(f"member list: voters {_ids(voters)}")

    async def removed_cleanly(change: Change) -> None:
        node_id = change.nodes[0]
        if change.exit_code != 0 or change.notes:
            how = "did not exit" if change.exit_code is None else f"exited {change.exit_code}"
            raise ScenarioFailed(
                f"removed node {node_id} {how}; {'; '.join(change.notes)}".rstrip("; "), [node_id]
            )

    load.start()
    s.say("load: 4 clients reading, writing, swapping and deleting 6 keys; 2 writing fresh keys")
    try:
        await load_has(200, "before any change")
        first = sorted(cluster.node_ids)

        s.say("-- grow 3 -> 5: member add, then start the node with --join; twice")
        for _ in range(2):
            done.append(await changes.add(announce=True))
        grown = first + [c.nodes[0] for c in done]
        await expect_voters(grown)

        s.say("-- shrink 5 -> 3: remove a follower, then the leader")
        leader = await cluster.wait_for_leader(LEADER_TIMEOUT)
        follower = min(n for n in first if n != leader)
        done.append(await changes.remove(follower))
        await removed_cleanly(done[-1])
        leader = await cluster.wait_for_leader(LEADER_TIMEOUT)
        done.append(await changes.remove(leader))
        await removed_cleanly(done[-1])
        await expect_voters([n for n in grown if n not in (follower, leader)])

        s.say("-- replace a node whose disk was lost: remove its id, add a fresh id")
        leader = await cluster.wait_for_leader(LEADER_TIMEOUT)
        followers = [n for n in cluster.node_ids if n != leader]
        victim = min(followers, key=lambda n: (n not in first, n))
        shrunk = list(cluster.node_ids)
        done.append(await changes.replace(victim))
        fresh_id = done[-1].nodes[1]
        await expect_voters([n for n in shrunk if n != victim] + [fresh_id])
        before = dict(load.fresh)
        took = await wait_serves(s, fresh_id, before, CATCH_UP_TIMEOUT, "replacement")
        s.say(f"node {fresh_id} serves all {len(before)} fresh keys written so far ({took:.2f} s)")

        s.say("-- a follower down long enough to need a snapshot")
        leader = await cluster.wait_for_leader(LEADER_TIMEOUT)
        victim = min(n for n in cluster.node_ids if n != leader)
        done.append(await changes.snapshot_catch_up(victim, fill=True))
        if not done[-1].compacted_past:
            others = [n for n in cluster.node_ids if n != victim]
            raise ScenarioFailed(
                f"the other members' logs were not compacted past node {victim}'s last entry "
                "while it was down, so it needed no snapshot",
                others,
            )
        written.update(done[-1].written)
        expected = {**load.fresh, **written}
        took = await wait_serves(s, victim, expected, CATCH_UP_TIMEOUT, "restarted follower")
        s.say(f"node {victim} serves all {len(expected)} fresh keys ({took:.2f} s)")
        await load_has(100, "after the last change")
    finally:
        await load.stop()

    s.say("load stopped; reading every key once more and checking the history")
    verdict = await load.verdict(written)
    s.say(f"cluster now (python cluster_client.py member list): {await _member_list(cluster)}")
    _print_figures(s, load, done)
    for line in verdict.lines():
        s.say(line)
    if not verdict.ok:
        raise ScenarioFailed("the history shows a lost or unreadable write, or is not linearizable")


def _ids(ids: list[int]) -> str:
    return ", ".join(str(i) for i in sorted(ids))


async def _member_list(cluster: LocalCluster) -> str:
    """What the CLI prints for `member list`, on one line."""
    endpoints = ",".join(cluster.client_addresses)
    tls = [] if cluster.tls is None else cluster.tls.client_args()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "cluster_client.py",
        *tls,
        "--endpoints",
        endpoints,
        "member",
        "list",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = " | ".join(line.strip() for line in out.decode().splitlines() if line.strip())
    if proc.returncode != 0:
        raise ScenarioFailed(f"member list exited with code {proc.returncode}: {text}")
    return text


def _print_figures(s: Scenario, load: RecordedLoad, changes: list[Change]) -> None:
    """Per change: how long it took, writes acknowledged per second meanwhile, and writes that
    did not succeed (the cluster did not answer within the client's deadline)."""
    rows = []
    for change in changes:
        end = change.ended if change.ended is not None else change.started
        acked, failed = load.writes(change.started, end)
        rate = acked / change.took if change.took > 0 else 0.0
        rows.append((change.description, f"{change.took:.2f} s", f"{rate:.0f}/s", str(failed)))
    ops = load.history.operations
    start = min(op.invoke for op in ops)
    end = max(op.complete for op in ops if op.complete is not None)
    busy = sum(c.took for c in changes)
    acked, failed = load.writes(start, end)
    for change in changes:
        during, lost = load.writes(change.started, change.ended or change.started)
        acked -= during
        failed -= lost
    quiet = max(end - start - busy, 1e-9)
    rows.append(("between changes", f"{quiet:.2f} s", f"{acked / quiet:.0f}/s", str(failed)))
    width = max(len(r[0]) for r in rows)
    s.say(f"{'change':<{width}}  {'took':>8}  {'writes/s':>8}  writes failed")
    for name, took_text, rate_text, failed_text in rows:
        s.say(f"{name:<{width}}  {took_text:>8}  {rate_text:>8}  {failed_text:>13}")


SCENARIOS: dict[str, Callable[[Scenario], Awaitable[None]]] = {
    "basic": scenario_basic,
    "leader-dies": scenario_leader_dies,
    "full-restart": scenario_full_restart,
    "follower-catch-up": scenario_follower_catch_up,
}
# Run only when named: their own clusters, and longer.
ON_DEMAND: dict[str, Callable[[Scenario], Awaitable[None]]] = {
    "membership": scenario_membership,
}


# -- running ----------------------------------------------------------------------------------------


@dataclass
class Options:
    nodes: int
    first_port: int
    data_root: Path
    duration: float = 300.0
    seed: int = 0
    membership: bool = False
    # Clients taking one lock in turn, checked for mutual exclusion (test/lock_workload.py).
    locks: int = 0
    # Every node, client and probe under TLS (mutual between peers, client certificates
    # required) with certificates made for the run.
    tls: ClusterTls | None = None


async def run_faults(options: Options) -> bool:
    """The fault suite: five nodes on their own hosts, a nemesis and concurrent clients."""
    from test.fault_suite import SuiteOptions, run_suite

    changes = " and membership changes" if options.membership else ""
    print(
        f"\n== faults: {options.duration:g} s of kills, pauses and partitions{changes} under "
        f"concurrent clients (seed {options.seed})",
        flush=True,
    )
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"    {text}", flush=True)

    result = await run_suite(
        SuiteOptions(
            duration=options.duration,
            seed=options.seed,
            work_dir=options.data_root / "faults",
            history_dir=options.data_root,
            say=say,
            membership=options.membership,
            tls=options.tls is not None,
            locks=options.locks,
        )
    )
    print(result.report, flush=True)
    elapsed = time.monotonic() - started
    print(f"{'PASS' if result.ok else 'FAIL'} faults ({elapsed:.1f} s)", flush=True)
    return result.ok


def print_log_tails(cluster: LocalCluster, nodes: list[int]) -> None:
    for node_id in nodes or cluster.node_ids:
        lines = cluster.log_tail(node_id, TAIL_LINES * (2 if nodes else 1))
        print(f"    last lines of node {node_id}'s log ({cluster.log_path(node_id)}):")
        for line in lines:
            print(f"      | {line}")


async def run_scenario(name: str, options: Options) -> bool:
    if name == "faults":
        try:
            return await run_faults(options)
        except Exception as e:  # noqa: BLE001 - reported as this scenario's failure
            print(f"FAIL faults: {type(e).__name__}: {e}", flush=True)
            return False
    run = SCENARIOS.get(name) or ON_DEMAND[name]
    doc = " ".join((run.__doc__ or "").split())
    print(f"\n== {name}: {doc}", flush=True)
    started = time.monotonic()
    cluster: LocalCluster
    if name in ON_DEMAND:
        # Ids 1, 2, 3 read better than ports in a story about ids; ports are picked free.
        cluster = HostCluster.on_localhost(3, options.data_root / name, MEMBERSHIP_FLAGS)
    else:
        cluster = LocalCluster(options.nodes, options.first_port, options.data_root / name)
    cluster.tls = options.tls
    try:
        cluster.start()
        scenario = Scenario(cluster, cluster.probe(), started)
        scenario.say(f"started {len(cluster.node_ids)} nodes")
        try:
            await run(scenario)
        finally:
            await scenario.close()
    except Exception as e:  # noqa: BLE001 - any error fails this scenario, not the run
        reason = str(e) or type(e).__name__
        if not isinstance(e, ScenarioFailed | TimeoutError):
            reason = f"{type(e).__name__}: {reason}"
        elapsed = time.monotonic() - started
        print(f"FAIL {name} ({elapsed:.1f} s): {reason}", flush=True)
        print_log_tails(cluster, e.nodes if isinstance(e, ScenarioFailed) else [])
        return False
    finally:
        cluster.stop()
    print(f"PASS {name} ({time.monotonic() - started:.1f} s)", flush=True)
    return True


async def run_scenarios(names: list[str], options: Options) -> list[str]:
    failed = []
    for name in names:
        if not await run_scenario(name, options):
            failed.append(name)
    return failed


async def run_up(options: Options) -> None:
    cluster = LocalCluster(options.nodes, options.first_port, options.data_root)
    cluster.tls = options.tls
    try:
        cluster.start()
        leader = await cluster.wait_for_leader(LEADER_TIMEOUT)
        print(f"{options.nodes} nodes are up; node {leader} leads. Data in {options.data_root}")
        for node_id in cluster.node_ids:
            print(
                f"  node {node_id}: raft {HOST}:{node_id}, client {cluster.client_address(node_id)}, "
                f"pid {cluster.pid(node_id)}, log {cluster.log_path(node_id)}"
            )
        seed = f"--first-port {cluster.first_port} --nodes {options.nodes}"
        if options.tls is not None:
            seed = " ".join([*options.tls.client_args(), seed])
        print("Try, from the repository root:")
        print(f"  python cluster_client.py {seed} put greeting hello")
        print(f"  python cluster_client.py {seed} get greeting")
        print(f"  python cluster_client.py {seed} leader")
        print("Ctrl-C stops every node.", flush=True)
        reported: set[int] = set()
        while True:
            # A foreground monitor, not synchronisation: report nodes that exit on their own.
            for node_id in cluster.node_ids:
                if not cluster.is_running(node_id) and node_id not in reported:
                    reported.add(node_id)
                    print(
                        f"node {node_id} exited with code {cluster.exit_code(node_id)}; "
                        f"see {cluster.log_path(node_id)}",
                        flush=True,
                    )
            await asyncio.sleep(0.5)
    finally:
        running = cluster.running_nodes()
        if running:
            print(f"\nstopping {len(running)} nodes", flush=True)
        for node_id in running:
            code = cluster.stop_node(node_id)
            print(f"  node {node_id} exited with code {code}", flush=True)
        cluster.stop()


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def _fail(message: str) -> NoReturn:
    print(f"test_harness: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m test.test_harness",
        description="Start real raft-demo nodes and check scenarios against them, "
        "or ('up') keep a cluster running until Ctrl-C.",
    )
    parser.add_argument("--nodes", type=int, default=5, help="number of nodes (default 5)")
    parser.add_argument(
        "--first-port",
        type=int,
        default=12345,
        help="first Raft port (default 12345); ids are the Raft ports, client ports follow them; "
        "0 picks free ports",
    )
    parser.add_argument("--data-dir", type=Path, help="where node data and logs go (default: temp)")
    parser.add_argument("--keep-data", action="store_true", help="keep node data and logs")
    parser.add_argument(
        "--duration",
        type=float,
        default=300.0,
        help="faults: seconds of faults under load (default 300); the suite always runs five "
        "nodes at addresses of its own",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="faults: the seed that decides every fault (default 0)"
    )
    parser.add_argument(
        "--locks",
        type=int,
        default=0,
        metavar="N",
        help="faults: also N clients taking one lock in turn, checked for mutual exclusion",
    )
    parser.add_argument(
        "--membership",
        action="store_true",
        help="faults: also grow, shrink and replace members and bring a follower back by "
        "snapshot (needs root and `ip netns`)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="run nodes and clients under TLS: certificates made in the data dir, mutual TLS "
        "between peers (each speaking only for the member its certificate names), client "
        "certificates required (the fault suite also gives peers a CA of their own)",
    )
    parser.add_argument(
        "--peer-ca",
        action="store_true",
        help="with --tls: peers trust only a CA of their own (--peer-tls-*), not the clients' CA",
    )
    parser.add_argument(
        "--web",
        nargs="?",
        const=8080,
        type=int,
        metavar="PORT",
        help="up: also serve the live view on http://127.0.0.1:PORT/ (default 8080; 0 picks a "
        "free port), with nodes 1..N on free ports behind per-link proxies so its buttons can "
        "kill, pause, cut off, add and remove them (docs/live-view.md)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        metavar="N",
        help="up --web: run every node N times slower (each node's --time-scale)",
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"'up', 'faults' (the fault suite) or 'membership' (grow, shrink, replace, catch "
        f"up by snapshot), run only when named, or scenarios to run (default all): "
        f"{', '.join(SCENARIOS)}",
    )
    args = parser.parse_args(argv)
    names: list[str] = args.scenarios or list(SCENARIOS)
    up = names == ["up"]
    unknown = [n for n in names if n not in SCENARIOS and n not in ON_DEMAND and n != "faults"]
    if not up and unknown:
        _fail(
            f"unknown scenario {unknown[0]!r}; choose 'up', 'faults', "
            f"{', '.join(repr(n) for n in ON_DEMAND)} or from: {', '.join(SCENARIOS)}"
        )
    if (args.web is not None or args.time_scale != 1) and not up:
        _fail("--web and --time-scale go with 'up'")
    if args.web is not None and not 0 <= args.web <= 65535:
        _fail(f"--web takes a port, not {args.web}")
    if not args.time_scale > 0:
        _fail(f"--time-scale must be a positive number, not {args.time_scale:g}")
    if args.peer_ca and not args.tls:
        _fail("--peer-ca goes with --tls")
    if not args.duration > 0:
        _fail(f"--duration must be a positive number of seconds, not {args.duration:g}")
    if not 0 <= args.locks <= 100:
        _fail(f"--locks must be 0 to 100 clients, not {args.locks}")
    if not 1 <= args.nodes <= 99:
        _fail(f"--nodes must be between 1 and 99, not {args.nodes}")
    if not 0 <= args.first_port <= 65535 - 2 * args.nodes + 1:
        _fail(f"--first-port {args.first_port} leaves no room for {2 * args.nodes} ports")
    first_port = args.first_port
    if first_port == 0:
        first_port = find_free_port_block(2 * args.nodes)
    # The fault suite and the membership scenario pick their own addresses; only the other
    # scenarios use these ports.
    own_addresses = {"faults", *ON_DEMAND}
    own = set(names) <= own_addresses or args.web is not None
    busy = busy_ports(first_port, 2 * args.nodes) if not own else []
    if busy:
        _fail(
            f"port {busy[0]} on {HOST} is already in use (the cluster needs "
            f"{first_port}-{first_port + 2 * args.nodes - 1}); choose another --first-port"
        )

    given = args.data_dir is not None
    if given:
        root = args.data_dir if up else args.data_dir / time.strftime("run-%Y%m%d-%H%M%S")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _fail(f"cannot create data dir {root}: {e.strerror}")
    else:
        root = Path(tempfile.mkdtemp(prefix="raft-demo-harness-"))
    options = Options(
        args.nodes, first_port, root, args.duration, args.seed, args.membership, locks=args.locks
    )
    if args.tls:
        options.tls = ClusterTls.create(root / "tls", peer_ca=args.peer_ca)
        print(f"TLS: certificates in {options.tls.directory}; peers and clients must present one")
    # SIGTERM unwinds like Ctrl-C, so every node is stopped by the same finally blocks.
    signal.signal(signal.SIGTERM, _interrupt)

    failed: list[str] = []
    interrupted = False
    started = time.monotonic()
    try:
        if up and args.web is not None:
            from test.live_cluster import run_up_web

            asyncio.run(run_up_web(args.nodes, root, args.web, options.tls, args.time_scale))
        elif up:
            asyncio.run(run_up(options))
        else:
            if set(names) == {"faults"}:
                print(f"raft-demo harness: the fault suite; data in {root}")
            elif set(names) <= own_addresses:
                print(f"raft-demo harness: nodes on {HOST}, ports picked free; data in {root}")
            else:
                print(
                    f"raft-demo harness: {args.nodes} nodes on {HOST}, Raft ports "
                    f"{first_port}-{first_port + args.nodes - 1}, client ports "
                    f"{first_port + args.nodes}-{first_port + 2 * args.nodes - 1}; data in {root}"
                )
            failed = asyncio.run(run_scenarios(names, options))
    except KeyboardInterrupt:
        interrupted = not up
        if interrupted:
            print("\ninterrupted; every node was stopped", file=sys.stderr)
    except PortBusyError as e:
        _fail(str(e))
    finally:
        if not interrupted and not up:
            elapsed = time.monotonic() - started
            passed = len(names) - len(failed)
            summary = f"\n{passed} of {len(names)} scenarios passed in {elapsed:.1f} s"
            print(summary + (f"; failed: {', '.join(failed)}" if failed else ""))
        if args.keep_data or failed or (up and given):
            print(f"node data and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
