"""The fault suite: a real five-node cluster under a nemesis while concurrent clients read, write,
compare-and-swap and delete; the recorded history must be linearizable and lose no acknowledged write.

`run_suite(SuiteOptions(...))` runs it and returns a `SuiteResult` whose `report` is printed by
`python -m test.test_harness faults --duration S --seed N` and used by test/test_faults.py; with
`membership=True` (`faults --membership`) the nemesis also grows, shrinks and replaces members.
`RecordedLoad` is the same workload and checks without a nemesis, for the membership scenarios.
With `locks=N`, N more clients take one lock in turn (test/lock_workload.py), and the run also
checks that no two of them were ever inside at once.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import cluster_client
from cluster_client import (
    Client,
    ClusterUnavailableError,
    RequestRejectedError,
    SessionExpiredError,
)
from test import linearizability
from test.cluster_process import ClusterTls, HostCluster, LocalCluster
from test.fault_leases import LeaseProbe
from test.fault_watch import WatchRecorder
from test.linearizability import CheckResult, History, Operation
from test.lock_workload import LockWorkload, check_sections
from test.nemesis import (
    FAULT_KINDS,
    MEMBERSHIP_KINDS,
    Fault,
    MembershipChanges,
    Nemesis,
    NemesisTiming,
    NetworkError,
    make_network,
)

_T = TypeVar("_T")

# Relative weights of the operations each client issues.
# A "range" reads every key of the workload at once (its prefix): recorded as a read of each key
# over the range's interval, so the checker holds every key it returned to linearizability.
OPERATION_MIX: dict[str, float] = {
    "get": 0.3,
    "range": 0.1,
    "put": 0.3,
    "cas": 0.15,
    "delete": 0.15,
}
KEY_PREFIX = "k"
LEADER_TIMEOUT = 30.0
# How long every node gets, once healed and idle, to serve the final values from its own state.
CONVERGE_TIMEOUT = 20.0
# The search bound per key; a search that needs more yields an "inconclusive" verdict.
CHECK_MAX_STEPS = 5_000_000
FINAL_CLIENT = "final"
# With membership changes: snapshots often enough that a follower kept down for a few seconds
# needs one, and joining nodes receive one.
MEMBERSHIP_NODE_FLAGS = ["--snapshot-entries", "200", "--snapshot-keep-entries", "50"]
WRITE_KINDS = ("put", "cas", "delete")
# Written once everything is healed: every watcher must be sent it (and all before it) within
# WATCH_CATCH_UP seconds.
WATCH_MARKER = "watch-end"
WATCH_CATCH_UP = 30.0


@dataclass
class SuiteOptions:
    """What to run: how long, from which seed, with how many clients and keys, and which faults."""

    duration: float = 60.0
    seed: int = 0
    clients: int = 10
    keys: int = 6
    faults: Sequence[str] = FAULT_KINDS
    # Reads aimed with allow_stale at an isolated old leader: a run that must NOT be linearizable.
    stale_reads: bool = False
    network: str = "auto"
    # Seconds one client operation may take (retries included) before its outcome counts as unknown.
    op_deadline: float = 4.0
    # Left running, healed, after the last fault, so the workload sees the cluster recover.
    settle: float = 3.0
    timing: NemesisTiming = field(default_factory=NemesisTiming)
    # How often a network fault also has a node killed or paused for part of it.
    overlap: float = 0.3
    # Also grow, shrink and replace members and bring back a follower by snapshot (needs each
    # node on its own host: namespaces).
    membership: bool = False
    # Mutual TLS with a CA of the peers' own, and client certificates required.
    tls: bool = False
    # Clients taking one lock in turn, besides the key-value clients (test/lock_workload.py).
    locks: int = 0
    work_dir: Path | None = None
    history_dir: Path | None = None
    say: Callable[[str], None] = print


@dataclass
class SuiteResult:
    """What a run found: the history, the checker's verdict, lost writes, faults, and the report."""

    options: SuiteOptions
    history: History
    check: CheckResult
    lost_writes: list[str]
    faults: list[Fault]
    network: str
    report: str = ""
    history_file: Path | None = None
    client_errors: list[str] = field(default_factory=list)
    # Reads sent with allow_stale to an isolated old leader (only with SuiteOptions.stale_reads).
    stale_reads: int = 0
    # Nodes that, once healed and idle, still did not serve the final values.
    diverged: list[str] = field(default_factory=list)
    # Membership changes that did not go as promised (a removed node that did not exit, ...).
    membership_problems: list[str] = field(default_factory=list)
    members: list[int] = field(default_factory=list)
    # What the watchers (one per node, one through the library) were sent, and what was wrong.
    watch_summary: str = ""
    watch_problems: list[str] = field(default_factory=list)
    # Leases kept alive and abandoned through the faults, and what broke their promises.
    lease_summary: str = ""
    lease_problems: list[str] = field(default_factory=list)
    # With SuiteOptions.locks: the lock clients' record, and what breaks mutual exclusion in it.
    locks: LockWorkload | None = None
    lock_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.check.ok
            and not self.lost_writes
            and not self.diverged
            and not self.membership_problems
            and not self.watch_problems
            and not self.lease_problems
            and not self.lock_problems
        )


# -- the workload ----------------------------------------------------------------------------------


@dataclass
class _Workload:
    """Concurrent clients, each with its own Client (and so its own session), recording every
    operation in one History."""

    history: History
    keys: list[str]
    nemesis: Nemesis | None
    options: SuiteOptions
    rng: random.Random
    latencies: list[float] = field(default_factory=list)
    client_errors: list[str] = field(default_factory=list)
    stale_reads: int = 0
    range_reads: int = 0
    # Every acknowledged put, by the revision its reply named: what the watchers must have seen.
    put_revisions: dict[int, tuple[str, str]] = field(default_factory=dict)

    async def client_loop(self, index: int, client: Client, stop: asyncio.Event) -> None:
        rng = random.Random(self.rng.random())
        seen: dict[str, str | None] = {}
        kinds, weights = zip(*OPERATION_MIX.items(), strict=True)
        serial = 0
        while not stop.is_set():
            key = rng.choice(self.keys)
            kind = rng.choices(kinds, weights)[0]
            serial += 1
            value = f"c{index}-{serial}"
            if kind == "get":
                await self._get(index, client, key, seen)
            elif kind == "range":
                await self._range(index, client, seen)
            elif kind == "put":
                await self._put(index, client, key, value, seen)
            elif kind == "delete":
                await self._delete(index, client, key, seen)
            else:
                expected = seen.get(key) if rng.random() < 0.75 else None
                await self._cas(index, client, key, expected, value, seen)

    def _finish_unknown(self, op_id: int, error: BaseException) -> None:
        if not isinstance(error, ClusterUnavailableError | SessionExpiredError):
            self.client_errors.append(f"{type(error).__name__}: {error}")
        self.history.unknown(op_id)

    def _ok(self, op_id: int, result: Hashable = None) -> None:
        op = self.history.ok(op_id, result)
        assert op.complete is not None
        self.latencies.append(op.complete - op.invoke)

    async def _get(self, index: int, client: Client, key: str, seen: dict[str, str | None]) -> None:
        target = (
            self.nemesis.stale_target
            if self.options.stale_reads and self.nemesis is not None
            else None
        )
        op_id = self.history.invoke(index, "get", key)
        try:
            if target is not None:
                self.stale_reads += 1
                value = await client.get_value(key, default=None, stale=True, node=target)
            else:
                value = await client.get_value(key, default=None)
        except (cluster_client.ClientError, OSError) as e:
            # A read that did not answer changed nothing; the checker may ignore it.
            if not isinstance(e, cluster_client.ClientError):
                self.client_errors.append(f"{type(e).__name__}: {e}")
            self.history.fail(op_id)
            return
        self._ok(op_id, value)
        seen[key] = value

    async def _range(self, index: int, client: Client, seen: dict[str, str | None]) -> None:
        """Every key of the workload in one linearizable Range, recorded as a get of each key
        invoked before the call and completed after it."""
        op_ids = {key: self.history.invoke(index, "get", key) for key in self.keys}
        try:
            page = await client.get_range(KEY_PREFIX, prefix=True)
        except (cluster_client.ClientError, OSError) as e:
            if not isinstance(e, cluster_client.ClientError):
                self.client_errors.append(f"{type(e).__name__}: {e}")
            for op_id in op_ids.values():
                self.history.fail(op_id)
            return
        self.range_reads += 1
        found = {kv.key: kv.value for kv in page.kvs}
        for key, op_id in op_ids.items():
            self._ok(op_id, found.get(key))
            seen[key] = found.get(key)

    async def _write(self, op_id: int, call: Awaitable[_T]) -> tuple[bool, _T | None]:
        """Await a write; (True, its result) once acknowledged, else (False, None) with the
        operation recorded as failed (certainly not applied) or unknown (maybe applied)."""
        try:
            return True, await call
        except RequestRejectedError:
            self.history.fail(op_id)
        except (cluster_client.ClientError, OSError) as e:
            self._finish_unknown(op_id, e)
        return False, None

    async def _put(
        self, index: int, client: Client, key: str, value: str, seen: dict[str, str | None]
    ) -> None:
        op_id = self.history.invoke(index, "put", key, value)
        done, revision = await self._write(op_id, client.propose_mapping(key, value))
        if done:
            self._ok(op_id)
            seen[key] = value
            if revision:
                self.put_revisions[revision] = (key, value)

    async def _delete(
        self, index: int, client: Client, key: str, seen: dict[str, str | None]
    ) -> None:
        op_id = self.history.invoke(index, "delete", key)
        done, existed = await self._write(op_id, client.delete(key))
        if done:
            self._ok(op_id, bool(existed))
            seen[key] = None

    async def _cas(
        self,
        index: int,
        client: Client,
        key: str,
        expected: str | None,
        value: str,
        seen: dict[str, str | None],
    ) -> None:
        op_id = self.history.invoke(index, "cas", key, value, expected)
        done, result = await self._write(op_id, client.compare_and_swap(key, expected, value))
        if not done or result is None:
            return
        swapped, after = result
        # The checker wants what the key held when the cas ran: `expected` if it swapped, else
        # the value it still holds.
        self._ok(op_id, (True, expected) if swapped else (False, after))
        seen[key] = value if swapped else after


# -- checks on the history --------------------------------------------------------------------------


def _mutations(ops: Sequence[Operation]) -> list[tuple[Operation, object]]:
    """(operation, the value it leaves: None for a delete) for every operation that may have
    changed its key: acknowledged and unknown puts, deletes and swapping cas."""
    found: list[tuple[Operation, object]] = []
    for op in ops:
        if op.outcome == "fail" or op.kind == "get":
            continue
        if op.kind == "cas" and op.outcome == "ok" and not _swapped(op):
            continue
        found.append((op, None if op.kind == "delete" else op.value))
    return found


def _swapped(op: Operation) -> bool:
    result = op.result
    return bool(result[0]) if isinstance(result, tuple) else bool(result)


def lost_writes(history: History, final: dict[str, str | None]) -> list[str]:
    """Keys whose final value shows an acknowledged write lost, each with a one-line reason.

    The final value must come from an operation X (a put or swapping cas of that value, a delete
    for a missing key, or the initial state) that no acknowledged write follows in real time: an
    acknowledged write invoked after X completed took effect after X, and values are unique, so
    nothing could bring X's value back. An unknown X never completed, so nothing follows it.
    """
    problems: list[str] = []
    by_key: dict[Hashable, list[Operation]] = {}
    for op in history.operations:
        if op.client != FINAL_CLIENT:
            by_key.setdefault(op.key, []).append(op)
    for key, value in final.items():
        ops = by_key.get(key, [])
        mutations = _mutations(ops)
        acked = [op for op, _ in mutations if op.outcome == "ok"]
        sources = [op for op, leaves in mutations if leaves == value]
        if value is not None and not sources:
            problems.append(f"key {key!r} ends as {value!r}, which no operation could have written")
            continue

        if value is None:
            # Missing at the end: a delete, or nothing acknowledged was ever written.
            ends = [op.completes for op in sources] + [-math.inf]
        else:
            ends = [op.completes for op in sources]
        blockers = [_first_after(acked, end) for end in ends]
        if all(b is not None for b in blockers):
            last = max((b for b in blockers if b is not None), key=lambda op: op.invoke)
            shown = "missing" if value is None else repr(value)
            problems.append(
                f"key {key!r} ends {shown}, but {last.describe()} was acknowledged after "
                "whatever could have left that"
            )
    return problems


def _first_after(ops: Sequence[Operation], moment: float) -> Operation | None:
    later = [op for op in ops if op.invoke > moment]
    return min(later, key=lambda op: op.invoke) if later else None


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _gaps(history: History, start: float, end: float) -> list[tuple[float, float, float]]:
    """(length, from, to) of every stretch in [start, end] in which no operation completed
    successfully, longest first."""
    moments = sorted(
        op.complete
        for op in history.operations
        if op.outcome == "ok" and op.client != FINAL_CLIENT and op.complete is not None
    )
    edges = [start, *(m for m in moments if start <= m <= end), end]
    return sorted(((b - a, a, b) for a, b in zip(edges, edges[1:], strict=False)), reverse=True)


def history_json(history: History, faults: Sequence[Fault], options: SuiteOptions) -> str:
    def plain(value: object) -> object:
        return list(value) if isinstance(value, tuple) else value

    return json.dumps(
        {
            "seed": options.seed,
            "duration": options.duration,
            "faults": [
                {
                    "kind": f.kind,
                    "description": f.description,
                    "started": f.started,
                    "ended": f.ended,
                }
                for f in faults
            ],
            "operations": [
                {
                    "id": op.id,
                    "client": op.client,
                    "kind": op.kind,
                    "key": op.key,
                    "invoke": op.invoke,
                    "complete": op.complete,
                    "outcome": op.outcome,
                    "value": op.value,
                    "expected": op.expected,
                    "result": plain(op.result),
                }
                for op in history.operations
            ],
        },
        indent=1,
    )


def load_history(path: Path) -> History:
    """A History read back from a file written by a failed run, to check it again."""
    data = json.loads(path.read_text(encoding="utf-8"))
    history = History()
    for raw in data["operations"]:
        op_id = history.invoke(
            raw["client"], raw["kind"], raw["key"], raw["value"], raw["expected"], at=raw["invoke"]
        )
        result = raw["result"]
        if isinstance(result, list):
            result = tuple(result)
        if raw["outcome"] == "ok":
            history.ok(op_id, result, at=raw["complete"])
        elif raw["outcome"] == "fail":
            history.fail(op_id, at=raw["complete"])
        else:
            history.unknown(op_id)
    return history


# -- the workload without a nemesis -----------------------------------------------------------------


@dataclass
class LoadVerdict:
    """What `RecordedLoad.verdict` found, checked as the suite checks its runs."""

    operations: int
    check: CheckResult
    # Keys whose final value shows an acknowledged write lost (or that could not be read).
    lost_writes: list[str]
    # Acknowledged fresh writes that some member does not serve, one line per member.
    unreadable: list[str]
    fresh_writes: int

    @property
    def ok(self) -> bool:
        return self.check.ok and not self.lost_writes and not self.unreadable

    def lines(self) -> list[str]:
        lines = [f"history: {self.operations} operations; {self.check.report()}"]
        if self.lost_writes:
            lines.append(f"LOST acknowledged writes (or unreadable keys): {len(self.lost_writes)}")
            lines.extend(f"  {problem}" for problem in self.lost_writes)
        else:
            lines.append("every key holds its last acknowledged value or a later one")
        if self.unreadable:
            lines.extend(self.unreadable)
        else:
            lines.append(
                f"every member serves all {self.fresh_writes} acknowledged writes of fresh keys"
            )
        return lines


class RecordedLoad:
    """The suite's workload with no nemesis, for runs that change the cluster in other ways (the
    membership scenarios): `clients` clients with the suite's operation mix on `keys` keys, and
    `fresh_writers` clients that write fresh keys one after another, all recorded in one History
    on the caller's `clock`. Clients follow the cluster's members as they change."""

    def __init__(
        self,
        cluster: LocalCluster,
        clock: Callable[[], float],
        *,
        clients: int = 4,
        keys: int = 6,
        fresh_writers: int = 2,
        seed: int = 0,
        op_deadline: float = 4.0,
    ) -> None:
        self.cluster = cluster
        self.clock = clock
        self.history = History(clock=clock)
        self.keys = [f"k{i}" for i in range(keys)]
        # Acknowledged writes of fresh keys: each must be readable on every member at the end.
        self.fresh: dict[str, str] = {}
        self._clients = clients
        self._fresh_writers = fresh_writers
        self._options = SuiteOptions(op_deadline=op_deadline, clients=clients, keys=keys)
        self._workload = _Workload(
            self.history, self.keys, None, self._options, random.Random(seed)
        )
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._open: list[Client] = []

    def start(self) -> None:
        for i in range(self._clients + self._fresh_writers):
            client = self.cluster.client(deadline=self._options.op_deadline)
            self._open.append(client)
            if i < self._clients:
                work = self._workload.client_loop(i, client, self._stop)
            else:
                work = self._fresh_loop(i - self._clients, client)
            self._tasks.append(asyncio.create_task(work))

    async def _fresh_loop(self, writer: int, client: Client) -> None:
        serial = 0
        while not self._stop.is_set():
            serial += 1
            key, value = f"fresh-{writer}-{serial}", f"w{writer}-{serial}"
            op_id = self.history.invoke(f"fresh{writer}", "put", key, value)
            done, _ = await self._workload._write(op_id, client.propose_mapping(key, value))
            if done:
                self._workload._ok(op_id)
                self.fresh[key] = value

    def failed(self) -> str | None:
        """Why a client task ended early (an unexpected error), or None while all run."""
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                return repr(task.exception())
        return None

    async def stop(self) -> None:
        """Stop every client; what is still running after its deadline stays unknown."""
        self._stop.set()
        try:
            if self._tasks:
                _, pending = await asyncio.wait(self._tasks, timeout=self._options.op_deadline + 5)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            for client in self._open:
                await client.close()
            self._open.clear()

    def writes(self, start: float, end: float) -> tuple[int, int]:
        """(writes acknowledged between `start` and `end`, writes invoked then that did not
        succeed: unknown, because the cluster did not answer in time, or failed)."""
        acked = sum(
            1
            for op in self.history.operations
            if op.kind in WRITE_KINDS
            and op.client != FINAL_CLIENT
            and op.outcome == "ok"
            and op.complete is not None
            and start <= op.complete <= end
        )
        return acked, len(self.unsuccessful_writes(start, end))

    def unsuccessful_writes(self, start: float, end: float) -> list[Operation]:
        """Writes invoked between `start` and `end` that did not succeed (those still under way
        are not counted: ask once the load has stopped)."""
        pending = set(self.history.pending)
        return [
            op
            for op in self.history.operations
            if op.kind in WRITE_KINDS
            and op.client != FINAL_CLIENT
            and op.outcome != "ok"
            and op.id not in pending
            and start <= op.invoke <= end
        ]

    @property
    def client_errors(self) -> list[str]:
        """Errors other than the cluster not answering in time (a bug's symptom, not a fault's)."""
        return list(self._workload.client_errors)

    async def verdict(
        self, also_written: dict[str, str] | None = None, timeout: float = CONVERGE_TIMEOUT
    ) -> LoadVerdict:
        """After `stop`: every key of the mix read once more (recorded), the history checked for
        linearizability and lost writes, and every member asked (a linearizable read on that
        node) for every acknowledged fresh write and `also_written`, until `timeout`."""
        final, unreadable = await _final_reads(self.cluster, self.history, self.keys, self.clock)
        verdict = linearizability.check(self.history, max_steps=CHECK_MAX_STEPS)
        lost = unreadable + lost_writes(self.history, final)
        expected = {**self.fresh, **(also_written or {})}
        missing: list[str] = []
        loop = asyncio.get_running_loop()
        async with self.cluster.probe(rpc_timeout=3.0) as probe:
            for node_id in self.cluster.node_ids:
                deadline = loop.time() + timeout
                remaining = dict(expected)
                while remaining:
                    wrong = await probe.mismatches(node_id, remaining)
                    remaining = {k: expected[k] for k in wrong}
                    if remaining and loop.time() >= deadline:
                        key = next(iter(remaining))
                        missing.append(
                            f"node {node_id} does not serve {len(remaining)} of {len(expected)} "
                            f"acknowledged fresh writes after {timeout:g} s, e.g. {key!r}: "
                            f"expected {expected[key]!r}, got {wrong[key]!r}"
                        )
                        break
                    if remaining:
                        await asyncio.sleep(0.2)
        return LoadVerdict(len(self.history), verdict, lost, missing, len(expected))


# -- running ----------------------------------------------------------------------------------------


async def _final_reads(
    cluster: LocalCluster, history: History, keys: Sequence[str], clock: Callable[[], float]
) -> tuple[dict[str, str | None], list[str]]:
    """Every key read once more, linearizably, after everything is healed; recorded too."""
    values: dict[str, str | None] = {}
    problems: list[str] = []
    client = cluster.client(deadline=LEADER_TIMEOUT)
    try:
        for key in keys:
            op_id = history.invoke(FINAL_CLIENT, "get", key, at=clock())
            try:
                value = await client.get_value(key, default=None)
            except cluster_client.ClientError as e:
                history.fail(op_id, at=clock())
                problems.append(f"key {key!r} could not be read after healing: {e}")
                continue
            history.ok(op_id, value, at=clock())
            values[key] = value
    finally:
        await client.close()
    return values, problems


def _make_dir(path: Path | None) -> Path:
    if path is None:
        return Path(tempfile.mkdtemp(prefix="raft-demo-faults-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_history(result: SuiteResult) -> Path:
    """Write the run's history and faults as JSON (see `load_history`); the file's path."""
    options = result.options
    directory = _make_dir(options.history_dir or Path(tempfile.gettempdir()))
    path = directory / f"fault-history-seed{options.seed}-{int(time.time())}.json"
    path.write_text(history_json(result.history, result.faults, options), encoding="utf-8")
    return path


async def _diverged(
    cluster: HostCluster, final: dict[str, str | None], timeout: float = CONVERGE_TIMEOUT
) -> list[str]:
    """Nodes whose own state (a stale read) still differs from the final values after `timeout`
    seconds with every fault healed and no writes: replication should have caught them up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    client = cluster.client(deadline=1.0)
    wrong: dict[int, str] = {}
    try:
        pending = list(cluster.node_ids)
        while True:
            wrong = {}
            for node_id in pending:
                address = cluster.client_address(node_id)
                for key, value in final.items():
                    try:
                        got = await client.get_value(key, default=None, stale=True, node=address)
                    except cluster_client.ClientError as e:
                        wrong[node_id] = f"node {node_id} did not answer a read of {key!r}: {e}"
                        break
                    if got != value:
                        wrong[node_id] = f"node {node_id} serves {key!r} = {got!r}, not {value!r}"
                        break
            pending = sorted(wrong)
            if not pending or loop.time() >= deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        await client.close()
    return [f"{problem} after {timeout:g} s" for problem in wrong.values()]


async def run_suite(options: SuiteOptions) -> SuiteResult:
    """Run the whole suite once: cluster up, workload and nemesis for `duration`, heal, check."""
    say = options.say
    started = time.monotonic()

    def clock() -> float:
        return time.monotonic() - started

    rng = random.Random(options.seed)
    node_ids = list(range(1, 6))
    network = make_network(node_ids, options.network)
    if options.membership and network.kind != "namespaces":
        network.close()
        raise NetworkError(
            "membership changes need every node on its own host: run as root with `ip netns`"
        )
    owns_work_dir = options.work_dir is None
    work_dir = _make_dir(options.work_dir)
    cluster: HostCluster | None = None
    clients: list[Client] = []
    watches: WatchRecorder | None = None
    leases: LeaseProbe | None = None
    try:
        cluster = HostCluster(
            network.config,
            network.cluster_files(work_dir),
            network.prefixes(),
            data_dir=work_dir / "nodes",
            extra_args=[
                "--log-level",
                "INFO",
                *(MEMBERSHIP_NODE_FLAGS if options.membership else []),
            ],
        )
        cluster.placer = network.add_node
        cluster.cleanups.append(network.close)
        say(f"network: {network.describe()}")
        if options.tls:
            # Certificates name 127.0.0.1 and localhost; nodes on hosts of their own are checked
            # against "localhost" instead of the address dialled.
            cluster.tls = ClusterTls.create(work_dir / "tls", peer_ca=True, server_name="localhost")
            say("TLS: peers trust only their own CA and speak only for the member they are")
        cluster.start()
        leader = await cluster.wait_for_leader(LEADER_TIMEOUT)
        say(f"five nodes up, node {leader} leads; {options.clients} clients on {options.keys} keys")
        history = History(clock=clock)
        keys = [f"{KEY_PREFIX}{i}" for i in range(options.keys)]
        changes = None
        kinds = tuple(options.faults)
        if options.membership:
            admin = cluster.client(deadline=LEADER_TIMEOUT)
            clients.append(admin)
            changes = MembershipChanges(
                cluster, admin, clock, say=lambda text: say(f"[{clock():6.1f}s]   {text}")
            )
            kinds += tuple(k for k in MEMBERSHIP_KINDS if k not in kinds)
        nemesis = Nemesis(
            cluster,
            network,
            random.Random(rng.random()),
            clock,
            say=lambda text: say(f"[{clock():6.1f}s] {text}"),
            kinds=kinds,
            timing=options.timing,
            overlap=options.overlap,
            changes=changes,
        )
        workload = _Workload(history, keys, nemesis, options, random.Random(rng.random()))
        watches = WatchRecorder(cluster, cluster.client(deadline=LEADER_TIMEOUT))
        watches.start()
        probe_client = cluster.client(deadline=LEADER_TIMEOUT)
        clients.append(probe_client)
        leases = LeaseProbe(probe_client)
        await leases.start()
        workers = [cluster.client(deadline=options.op_deadline) for _ in range(options.clients)]
        clients.extend(workers)
        stop_clients, stop_faults = asyncio.Event(), asyncio.Event()
        work_started = clock()
        tasks = [
            asyncio.create_task(workload.client_loop(i, c, stop_clients))
            for i, c in enumerate(workers)
        ]
        locks = LockWorkload(clock, random.Random(rng.random())) if options.locks else None
        if locks is not None:
            lockers = [cluster.client(deadline=options.op_deadline) for _ in range(options.locks)]
            clients.extend(lockers)
            tasks += [
                asyncio.create_task(locks.client_loop(i, c, stop_clients))
                for i, c in enumerate(lockers)
            ]
        faults_task = asyncio.create_task(nemesis.run(stop_faults))
        try:
            await _wait_or_fail(tasks + [faults_task], options.duration)
            stop_faults.set()
            await faults_task
            say(f"[{clock():6.1f}s] faults over, all healed; clients run {options.settle:g} s more")
            await _wait_or_fail(tasks, options.settle)
        finally:
            stop_faults.set()
            stop_clients.set()
            # Each operation gives up after op_deadline; what is still running then is cancelled
            # and stays unknown in the history.
            _, pending = await asyncio.wait(tasks + [faults_task], timeout=options.op_deadline + 5)
            for task in pending:
                task.cancel()
            results = await asyncio.gather(*tasks, faults_task, return_exceptions=True)
        work_ended = clock()
        for outcome in results:
            if isinstance(outcome, Exception):
                raise outcome
        nemesis.heal_all()
        # The nemesis restarts only what it killed: a node down now ended on its own.
        crashed = [
            f"node {n} exited on its own (code {cluster.exit_code(n)}); see {cluster.log_path(n)}"
            for n in cluster.node_ids
            if not cluster.is_running(n)
        ]
        await cluster.wait_for_leader(LEADER_TIMEOUT)
        final, unreadable = await _final_reads(cluster, history, keys, clock)
        marker = cluster.client(deadline=LEADER_TIMEOUT)
        clients.append(marker)
        # One write after everything: each watcher whose node runs must be sent it, and all before.
        last = await marker.propose_mapping(WATCH_MARKER, "end")
        watch_problems = await watches.finish(last, WATCH_CATCH_UP)
        watch_problems += watches.check(workload.put_revisions, final)
        lease_summary, lease_problems = leases.check(watches.deleted_at)
        say(f"[{clock():6.1f}s] checking {len(history)} operations")
        verdict = linearizability.check(history, max_steps=CHECK_MAX_STEPS)
        lost = unreadable + lost_writes(history, final)
        diverged = crashed + await _diverged(cluster, final)
        result = SuiteResult(
            options,
            history,
            verdict,
            lost,
            nemesis.faults,
            network.describe(),
            client_errors=workload.client_errors,
            stale_reads=workload.stale_reads,
            diverged=diverged,
            membership_problems=list(nemesis.membership_problems),
            members=list(cluster.node_ids),
            watch_summary=watches.summary(),
            watch_problems=watch_problems,
            lease_summary=lease_summary,
            lease_problems=lease_problems,
            locks=locks,
            lock_problems=[] if locks is None else check_sections(locks.sections),
        )
        if not result.ok:
            result.history_file = save_history(result)
        result.report = _report(result, workload, work_started, work_ended)
        return result
    finally:
        if leases is not None:
            await leases.close()
        if watches is not None:
            await watches.close()
        for client in clients:
            await client.close()
        if cluster is not None:
            cluster.stop()
        network.close()
        if owns_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)


async def _wait_or_fail(tasks: Sequence[asyncio.Task[None]], seconds: float) -> None:
    """Let the tasks run for `seconds`; a task that ends with an error ends the run with it."""
    done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def _report(result: SuiteResult, workload: _Workload, start: float, end: float) -> str:
    options = result.options
    ops = [op for op in result.history.operations if op.client != FINAL_CLIENT]
    lines = [
        f"fault suite, seed {options.seed}: {end - start:.0f} s of faults and load, "
        f"{options.clients} clients, {options.keys} keys; {result.network}"
    ]
    outcomes = Counter((op.kind, op.outcome) for op in ops)
    lines.append(f"operations: {len(ops)}")
    for kind in ("get", "put", "cas", "delete"):
        parts = ", ".join(f"{outcomes[(kind, o)]} {o}" for o in ("ok", "fail", "unknown"))
        lines.append(f"  {kind:<6} {parts}")
    lines.append(
        f"  range reads of every key: {workload.range_reads} (each counted above as a get of "
        f"each of the {options.keys} keys)"
    )
    if options.stale_reads:
        lines.append(f"  stale reads aimed at an isolated leader: {workload.stale_reads}")
    swaps = sum(1 for op in ops if op.kind == "cas" and op.outcome == "ok" and _swapped(op))
    lines.append(f"  cas that swapped: {swaps}")
    kinds = Counter(f.kind for f in result.faults)
    lines.append(
        f"faults injected: {len(result.faults)} ("
        + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        + ")"
    )
    lines.extend(f"  {f.line()}" for f in result.faults)
    p50 = _percentile(workload.latencies, 0.5) * 1000
    p99 = _percentile(workload.latencies, 0.99) * 1000
    lines.append(f"latency of successful operations: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    gaps = _gaps(result.history, start, end)
    gap, gap_from, gap_to = gaps[0]
    during = [f.kind for f in result.faults if f.started <= gap_to and (f.ended or end) >= gap_from]
    lines.append(
        f"availability: longest stretch with no successful operation {gap:.2f} s "
        f"(t={gap_from:.1f} to {gap_to:.1f} s"
        + (f", during {', '.join(during)})" if during else ")")
        + f"; stretches over 1 s: {sum(1 for g in gaps if g[0] > 1.0)}"
    )
    if result.client_errors:
        lines.append(
            f"unexpected client errors: {len(result.client_errors)}, first: "
            f"{result.client_errors[0]}"
        )
    if result.lost_writes:
        lines.append(f"LOST acknowledged writes (or unreadable keys): {len(result.lost_writes)}")
        lines.extend(f"  {problem}" for problem in result.lost_writes)
    else:
        lines.append(
            "acknowledged writes: every key holds its last acknowledged value or a later one"
        )
    if result.diverged:
        lines.append("nodes that did not catch up once healed:")
        lines.extend(f"  {problem}" for problem in result.diverged)
    else:
        lines.append("once healed, every node serves the final value of every key")
    if options.membership:
        lines.append(
            f"members at the end: {', '.join(str(n) for n in result.members)}"
            + (
                ""
                if not result.membership_problems
                else f"; membership changes that went wrong: {len(result.membership_problems)}"
            )
        )
        lines.extend(f"  {problem}" for problem in result.membership_problems)
    lines.append(f"watches: {result.watch_summary}")
    if result.watch_problems:
        lines.append(f"WATCH problems: {len(result.watch_problems)}")
        lines.extend(f"  {problem}" for problem in result.watch_problems[:20])
    else:
        lines.append(
            "watches: every watcher was sent every change, in order, once, agreeing with the "
            "acknowledged puts and the final values"
        )
    if result.locks is not None:
        lines.extend(result.locks.report())
    lines.append(f"leases: {result.lease_summary}")
    if result.lease_problems:
        lines.append(f"LEASE problems: {len(result.lease_problems)}")
        lines.extend(f"  {problem}" for problem in result.lease_problems)
    lines.append(f"history: {result.check.report()}")
    lines.append(f"verdict: {'PASS' if result.ok else 'FAIL'}")
    if result.history_file is not None:
        lines.append(f"history saved to {result.history_file}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m test.fault_suite FILE`: check a saved history again and print the verdict."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m test.fault_suite",
        description="Check a history saved by a failed fault-suite run again.",
    )
    parser.add_argument("history", type=Path, help="the JSON file the run named")
    args = parser.parse_args(argv)
    try:
        history = load_history(args.history)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"fault_suite: cannot read {args.history}: {e}", file=sys.stderr)
        return 2
    verdict = linearizability.check(history, max_steps=CHECK_MAX_STEPS)
    print(verdict.report())
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
