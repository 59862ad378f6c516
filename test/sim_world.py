"""The simulated world around the nodes: node processes that start, crash and pause, each with a
pausable clock and a disk with fsync latency, joined by the simulated network (test/sim_network.py);
hosts that join the cluster (new ids, empty disks), and hosts that leave it for good.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from cluster_config import ClusterConfig, NodeAddress
from disk import DiskOp, MemoryDisk
from log import LOG_FILE, LogCorruptionError, _scan_log
from membership import Membership
from raft_node import PeerUnreachableError, RaftNode, SnapshotPolicy, Timing
from rpc import raft_pb2
from snapshot import SNAPSHOT_PREFIX, LoadedSnapshot, SnapshotError, decode_snapshot
from test.memory_transport import CallTransport, Reply, Request
from test.sim_checks import (
    Invariants,
    LeadershipChecks,
    LogView,
    ObservedRaftLog,
    ObservedRaftNode,
    RecordingStateMachine,
    view_of_terms,
    views_of,
)
from test.sim_loop import Trace
from test.sim_network import Network


def random_timing(rng: random.Random) -> Timing:
    """A timing configuration as a user might choose one; narrow election ranges split more votes."""
    heartbeat = rng.uniform(0.1, 0.25)
    low = rng.uniform(max(0.4, 3 * heartbeat), 1.0)
    return Timing(
        heartbeat_interval=heartbeat,
        election_timeout_min=low,
        election_timeout_max=low * rng.uniform(1.2, 2.0),
        # Shorter than the daemon's 5 s, so clients see more definite outcomes before giving up.
        proposal_timeout=2.5,
        append_timeout=1.0,
    )


# This share of runs takes no snapshots (the log grows); the others snapshot every few dozen
# entries and send snapshots in small chunks, so compaction and InstallSnapshot happen often.
NO_SNAPSHOT_SHARE = 0.1


def random_snapshot_policy(rng: random.Random) -> SnapshotPolicy | None:
    if rng.random() < NO_SNAPSHOT_SHARE:
        return None
    return SnapshotPolicy(
        entries=rng.randint(8, 40),
        bytes=1 << 30,
        keep_entries=rng.randint(0, 6),
        chunk_bytes=rng.randint(64, 512),
    )


# The wall-clock time (seconds since the epoch) at the start of every run: the leaders stamp log
# time from it, so session expiry is as deterministic as the rest.
WALL_CLOCK_START = 1_800_000_000.0
# How often the check-quorum check looks at the leaders (simulated seconds).
LEADER_CHECK_INTERVAL = 0.1
# A timer fires this long after it is due, as a real one fires a little late (never early).
TIMER_LATENCY = 1e-6
# A healthy disk's fsync takes this long (seconds), but one in SLOW_FSYNC_SHARE takes
# SLOW_FSYNC_TIME; a slow disk's is set by a fault.
FSYNC_TIME = (0.0003, 0.004)
SLOW_FSYNC_SHARE = 0.1
SLOW_FSYNC_TIME = (0.005, 0.06)


@dataclass(frozen=True)
class Failure:
    """The first invariant that broke in a run."""

    invariant: str
    detail: str
    time: float


# ---- node processes ----------------------------------------------------------------------------


class SimTimer:
    """A timer on a node's clock: it never fires while the node is paused (it waits for the resume)
    nor after the node crashed."""

    __slots__ = ("_process", "_callback", "_handle", "_cancelled")

    def __init__(self, process: Process, when: float, callback: Callable[[], object]) -> None:
        self._process = process
        self._callback = callback
        self._cancelled = False
        self._handle = process.host.world.loop.call_at(when + TIMER_LATENCY, self._fire)

    def cancel(self) -> None:
        self._cancelled = True
        self._handle.cancel()

    def _fire(self) -> None:
        if not self._cancelled:
            self._process.enter(self._callback)


class SimClock:
    """A node's clock. Time itself goes on while a node is paused, as a machine's monotonic clock does;
    the node just cannot act on it until it resumes."""

    def __init__(self, process: Process) -> None:
        self._process = process
        self._loop = process.host.world.loop

    def now(self) -> float:
        return self._loop.time()

    def call_at(self, when: float, callback: Callable[[], object]) -> SimTimer:
        return SimTimer(self._process, when, callback)


class SimTransport(CallTransport):
    """A node's way to its peers, through the simulated network; a request whose request or reply is
    lost fails with PeerUnreachableError once the caller's timeout passes on the caller's clock."""

    def __init__(self, process: Process) -> None:
        self._process = process

    async def _call(self, peer_id: int, request: Request, timeout: float) -> Reply:
        process = self._process
        if not process.alive:
            raise PeerUnreachableError("this node is down")
        world = process.host.world
        future: asyncio.Future[Reply] = world.loop.create_future()
        process.enter(lambda: world.network.send_request(process, peer_id, request, future))

        def expire() -> None:
            if not future.done():
                future.set_exception(
                    PeerUnreachableError(f"no reply from {peer_id} in {timeout:g} s")
                )

        timer = process.clock.call_at(process.clock.now() + timeout, expire)
        try:
            return await future
        finally:
            timer.cancel()


class Process:
    """One incarnation of a node, from its start to its crash."""

    node: ObservedRaftNode
    log: ObservedRaftLog

    def __init__(self, host: Host, number: int) -> None:
        self.host = host
        self.number = number
        self.alive = True
        self.tasks: dict[asyncio.Task[None], None] = {}
        self.clock = SimClock(self)
        self.transport = SimTransport(self)

    def enter(self, action: Callable[[], object]) -> None:
        """Run `action` in this process now, later if it is paused, or never if it has crashed."""
        host = self.host
        if host.process is not self:
            return
        if host.paused:
            host.held.append(lambda: self.enter(action))
        else:
            action()

    def spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Run a task on behalf of this process; it is cancelled if the process crashes."""
        task = self.host.world.loop.create_task(coro)
        self.tasks[task] = None
        task.add_done_callback(lambda t: self._finished(t, what))

    def _finished(self, task: asyncio.Task[None], what: str) -> None:
        self.tasks.pop(task, None)
        if task.cancelled() or not self.alive:
            return
        error = task.exception()
        if error is not None:
            self.host.world.fail(
                "no unexpected errors", f"node {self.host.node_id} failed {what}: {error!r}"
            )


class Host:
    """One machine: its disk outlives the processes that run on it. A host that joined the cluster
    later (`joiner`) runs its node with `join=True`. A host leaves for good when its node learns
    that its removal committed (the daemon exits: `gone`) or when it dies with its disk
    (`retired`); nothing restarts it then, and the network delivers nothing to or from it."""

    def __init__(self, world: World, node_id: int, joiner: bool = False) -> None:
        self.world = world
        self.node_id = node_id
        self.joiner = joiner
        self.address = world.address(node_id)
        self.gone = False
        self.retired = False
        # What the operator wants: this id in the cluster ("member") or out of it ("removed").
        self.intent = "member"
        self.data_dir = f"/sim/node{node_id}"
        self.disk = MemoryDisk()
        self.disk.before_op = self._disk_op
        self.process: Process | None = None
        self.starting = False
        self.paused = False
        self.held: list[Callable[[], object]] = []
        self._resumed = asyncio.Event()
        self._resumed.set()
        self.slow_disk: tuple[float, float] | None = None
        self.incarnations = 0
        self.resumed_at = float("-inf")
        # Clear from a crash until the power is cut one callback later (see crash); a restart
        # waits for it.
        self._power_settled = asyncio.Event()
        self._power_settled.set()
        # While down: the terms of the entries its disk holds (what a restart will find), and
        # the configuration a restart would put in use.
        self.disk_terms: list[int] = []
        self.disk_config: Membership | None = None

    @property
    def bootstrap(self) -> Membership:
        """The configuration its node starts with when its log and snapshot hold none."""
        return Membership.empty() if self.joiner else Membership.bootstrap(self.world.cluster)

    @property
    def departed(self) -> bool:
        return self.gone or self.retired

    def views(self) -> list[LogView]:
        """The logs this node could present in an election (see Invariants)."""
        if self.process is not None:
            return views_of(self.process.node, self.process.log)
        return [view_of_terms("on-disk", self.disk_terms, self.disk_config)]

    def _read_disk(self) -> tuple[list[int], Membership]:
        """The terms of the log a restart would find, and the configuration it would use."""
        path = f"{self.data_dir}/{LOG_FILE}"
        try:
            data = self.disk.file_bytes(path)
        except KeyError:
            return [], self.bootstrap
        try:
            # The same parse a restart does (it also drops a torn tail).
            scan = _scan_log(path, data)
        except LogCorruptionError:
            return [], self.bootstrap
        # Entries a snapshot covers count as present with the content that was committed there.
        committed = self.world.invariants.committed
        terms = [committed.get(i, (0,))[0] for i in range(1, scan.base_index + 1)]
        terms += [e.term for e in scan.entries]
        entries = scan.entries
        newest = self._newest_snapshot()
        config = self.bootstrap if newest is None else newest.members
        if newest is not None:
            index, term = newest.index, newest.term
            if index > len(terms) or terms[index - 1] != term:
                # A restart resets such a log to the snapshot (Figure 13, rule 7).
                terms = [committed.get(i, (0,))[0] for i in range(1, index + 1)]
                entries = []
            else:
                entries = [e for e in entries if e.index > index]
        for entry in entries:
            if entry.kind == raft_pb2.ENTRY_KIND_CONFIG:
                config = Membership.from_proto(entry.config)
        return terms, config

    def _newest_snapshot(self) -> LoadedSnapshot | None:
        found: list[LoadedSnapshot] = []
        prefix = f"{self.data_dir}/{SNAPSHOT_PREFIX}"
        for name in list(self.disk._names):
            if name.startswith(prefix) and name[len(prefix) :].replace("-", "").isdigit():
                try:
                    loaded = decode_snapshot(name, self.disk.file_bytes(name))
                except SnapshotError:
                    continue
                found.append(loaded)
        return max(found, key=lambda s: (s.index, s.term)) if found else None

    @property
    def up(self) -> bool:
        return self.process is not None

    @property
    def node(self) -> RaftNode | None:
        return self.process.node if self.process is not None else None

    async def _disk_op(self, op: DiskOp) -> None:
        if op.kind in ("fsync", "fsync_dir"):
            rng = self.world.disk_rng
            if self.slow_disk is not None:
                low, high = self.slow_disk
            elif rng.random() < SLOW_FSYNC_SHARE:
                low, high = SLOW_FSYNC_TIME
            else:
                low, high = FSYNC_TIME
            await asyncio.sleep(rng.uniform(low, high))
        # A stopped process issues no I/O and sees no I/O complete.
        while self.paused:
            await self._resumed.wait()

    async def start(self) -> None:
        """Start a new process on this host: reopen the log from the disk, then a fresh node."""
        world = self.world
        if self.departed or self.process is not None:
            return
        self.starting = True
        self.incarnations += 1
        await self._power_settled.wait()
        try:
            log = await ObservedRaftLog.open(self.data_dir, disk=self.disk)
        except LogCorruptionError as e:
            world.fail("crash recovery", f"node {self.node_id} cannot reopen its log: {e}")
            return
        finally:
            self.starting = False
        assert isinstance(log, ObservedRaftLog)
        process = Process(self, self.incarnations)
        node = ObservedRaftNode(
            self.node_id,
            ClusterConfig({self.node_id: self.address}) if self.joiner else world.cluster,
            log,
            process.transport,
            world.timing,
            random.Random(world.node_seed_rng.getrandbits(64)),
            process.clock,
            wall_clock=lambda: WALL_CLOCK_START + world.loop.time(),
            snapshot_policy=world.snapshot_policy,
            join=self.joiner,
        )
        node.stats = world.network.stats
        node.invariants = world.invariants
        node.leadership_checks = world.leadership
        node.on_elected = world.elected
        node.state_machine = RecordingStateMachine(world.invariants, node)
        log.invariants = world.invariants
        log.owner = node
        log.node_id = self.node_id
        world.invariants.check_log(self.node_id, log)
        process.node = node
        process.log = log
        self.process = process
        node.start()
        world.invariants.check_config_in_use(node, log)
        process.spawn(self._leave_once_removed(process), "waiting to learn of its removal")

    async def _leave_once_removed(self, process: Process) -> None:
        """The daemon exits once its node learns that its removal committed."""
        await process.node.removed.wait()
        if self.process is not process:
            return
        world = self.world
        world.network.stats["nodes that learned of their removal"] += 1
        world.trace.event("sim", f"node {self.node_id} knows it was removed: its process exits")
        self.gone = True
        self.process = None
        process.alive = False
        self.paused = False
        self.held.clear()
        world.background(process.node.stop())
        for task in list(process.tasks):
            if task is not asyncio.current_task():
                task.cancel()

    def crash(self, torn_bytes: int) -> None:
        """Kill the process at once; the disk keeps only what was fsync'd (maybe a torn record)."""
        process = self.process
        assert process is not None
        self.process = None
        process.alive = False
        log = process.log
        # Until the disk has lost power (below), what it will keep is at least the durable prefix.
        self.disk_terms = [log.known_term(i) for i in range(1, log.durable_index + 1)]
        self.disk_config = process.node.configs.at(log.durable_index)
        node = process.node
        if node.transferring_snapshot:
            self.world.network.stats["crashes mid-transfer"] += 1
        self.paused = False
        self.held.clear()
        for task in list(process.tasks):
            task.cancel()
        world = self.world
        # Stopping cancels the node's own tasks before the disk loses power (next callback), so no
        # task of the dead process goes on to act on a failed write.
        world.background(process.node.stop())

        def lose_power() -> None:
            self.disk.crash(torn_bytes=torn_bytes)
            self.disk_terms, self.disk_config = self._read_disk()
            self._resumed.set()
            self._power_settled.set()

        self._power_settled.clear()
        world.loop.call_soon(lose_power)

    def retire(self) -> None:
        """The machine dies with its disk: it never comes back (the operator replaces it)."""
        if self.process is not None:
            self.crash(torn_bytes=0)
        self.retired = True

    def pause(self) -> None:
        self.paused = True
        self._resumed.clear()

    def resume(self) -> None:
        self.paused = False
        self.resumed_at = self.world.loop.time()
        self._resumed.set()
        held, self.held = self.held, []
        for action in held:
            action()


# ---- the world ---------------------------------------------------------------------------------


class World:
    """The hosts, the network and the checks of one run, all driven by one seeded generator."""

    def __init__(self, seed: int, size: int, loop: asyncio.AbstractEventLoop, trace: Trace) -> None:
        self.seed = seed
        self.loop = loop
        self.trace = trace
        master = random.Random(seed)
        # One stream per concern, so that a change in one (say, more client operations) does not
        # reshuffle the others.
        self.net_rng = random.Random(master.getrandbits(64))
        self.disk_rng = random.Random(master.getrandbits(64))
        self.fault_rng = random.Random(master.getrandbits(64))
        self.client_rng = random.Random(master.getrandbits(64))
        self.node_seed_rng = random.Random(master.getrandbits(64))
        self.cluster = ClusterConfig({i: self.address(i) for i in range(1, size + 1)})
        self.timing = random_timing(random.Random(master.getrandbits(64)))
        self.snapshot_policy = random_snapshot_policy(random.Random(master.getrandbits(64)))
        # Drawn last, so runs without membership changes draw everything else as before.
        self.member_rng = random.Random(master.getrandbits(64))
        # Told of elections and votes, to crash nodes at those moments (the fault injector).
        self.on_elected: Callable[[int], None] | None = None
        self.on_voted: Callable[[int], None] | None = None
        # Told when a node that is not yet a voter has taken in entries or a snapshot chunk.
        self.on_catching_up: Callable[[int, bool], None] | None = None
        self.failure: Failure | None = None
        self.failed: asyncio.Future[None] = loop.create_future()
        self.hosts = {i: Host(self, i) for i in self.cluster.nodes}
        # Ids are never reused: a new host takes the next one.
        self.next_id = size + 1
        initial = Membership.bootstrap(self.cluster)
        self.invariants = Invariants(
            self.fail,
            lambda: {i: h.views() for i, h in self.hosts.items() if not h.departed},
            initial,
        )
        self.network = Network(self)
        # A leader steps down once no majority answered for its longest election timeout; the
        # margin covers the monitor's sampling and timer latency.
        self.leadership = LeadershipChecks(
            self.fail,
            loop.time,
            self.timing.election_timeout_max + LEADER_CHECK_INTERVAL + 0.01,
            self.network.stats,
        )
        self._background: dict[asyncio.Task[Any], None] = {}
        self._config = (0, initial)

    @staticmethod
    def address(node_id: int) -> NodeAddress:
        return NodeAddress(node_id, f"node{node_id}.sim:7000", f"node{node_id}.sim:8000")

    def add_host(self) -> Host:
        """A new machine with an empty disk, for a node that joins the cluster."""
        host = Host(self, self.next_id, joiner=True)
        self.next_id += 1
        self.hosts[host.node_id] = host
        return host

    def live_ids(self) -> list[int]:
        """The hosts that have not left for good (up or not)."""
        return [i for i, h in self.hosts.items() if not h.departed]

    def member_ids(self) -> list[int]:
        """The members of the cluster's configuration whose hosts have not left: where a client
        that knows the cluster sends its requests."""
        members = [i for i in sorted(self.config().members) if not self.hosts[i].departed]
        return members or self.live_ids()

    def config(self) -> Membership:
        """The cluster's configuration as far as the fault injector and the operator can tell:
        the leader's, else the newest any running node has in use, else the last one seen."""
        leader = self.leader()
        node = self.hosts[leader].node if leader is not None else None
        if node is not None:
            self._config = (node.configs.latest_index, node.configs.latest)
            return node.configs.latest
        best: tuple[int, Membership] | None = None
        for host in self.hosts.values():
            node = host.node
            # A node still joining knows no members: it says nothing about the cluster's.
            if node is None or not node.config.voters:
                continue
            if best is None or node.configs.latest_index > best[0]:
                best = (node.configs.latest_index, node.configs.latest)
        if best is not None:
            self._config = best
        return self._config[1]

    def fail(self, invariant: str, detail: str) -> None:
        """Record a broken invariant (the first one counts) and end the run."""
        if self.failure is not None:
            return
        self.failure = Failure(invariant, detail, self.loop.time())
        self.trace.event("CHECK", f"{invariant} broken: {detail.splitlines()[0]}")
        if not self.failed.done():
            self.failed.set_result(None)

    def elected(self, node: RaftNode) -> None:
        if self.on_elected is not None:
            self.on_elected(node.node_id)

    def voted(self, node_id: int) -> None:
        if self.on_voted is not None:
            self.on_voted(node_id)

    def catching_up(self, node_id: int, mid_snapshot: bool) -> None:
        if self.on_catching_up is not None:
            self.on_catching_up(node_id, mid_snapshot)

    def heard(self, node_id: int, src: int) -> None:
        """A message from `src` reached node `node_id` (for the leadership checks)."""
        node = self.hosts[node_id].node
        if node is not None:
            self.leadership.heard(node, src)

    async def monitor_leaders(self) -> None:
        """Check quorum, checked every LEADER_CHECK_INTERVAL on the leaders that run unpaused (a
        leader just resumed gets a moment to act on the timers that fired while it was stopped)."""
        while True:
            await asyncio.sleep(LEADER_CHECK_INTERVAL)
            now = self.loop.time()
            leaders = [
                h.node
                for h in self.hosts.values()
                if h.node is not None
                and h.node.role == "leader"
                and not h.paused
                and now - h.resumed_at > LEADER_CHECK_INTERVAL
            ]
            self.leadership.check_leaders(leaders)

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run world-level work (restarts, stopping a crashed node) as a tracked task."""
        task = self.loop.create_task(coro)
        self._background[task] = None

        def finished(t: asyncio.Task[Any]) -> None:
            self._background.pop(t, None)
            if not t.cancelled() and t.exception() is not None:
                self.fail("no unexpected errors", f"simulation task failed: {t.exception()!r}")

        task.add_done_callback(finished)

    def leader(self) -> int | None:
        """The node that leads the newest term, if any node is a leader."""
        best: tuple[int, int] | None = None
        for node_id, host in self.hosts.items():
            node = host.node
            if node is not None and node.role == "leader":
                if best is None or node.current_term > best[0]:
                    best = (node.current_term, node_id)
        return best[1] if best else None
