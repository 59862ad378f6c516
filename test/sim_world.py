"""The simulated world around the nodes: node processes that start, crash and pause, each with a
pausable clock and a disk with fsync latency, and a network whose links drop, delay, duplicate,
reorder and partition the nodes' messages and the clients' requests."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from cluster_config import ClusterConfig, NodeAddress
from log import LOG_FILE, DiskOp, LogCorruptionError, MemoryDisk, _scan_log
from raft_node import (
    CommitUnknownError,
    InvalidRequestError,
    NotLeaderError,
    PeerUnreachableError,
    RaftNode,
    Timing,
    UnavailableError,
)
from rpc import raft_pb2
from test.sim_checks import (
    Invariants,
    LogView,
    ObservedRaftLog,
    ObservedRaftNode,
    RecordingStateMachine,
    view_of_terms,
    views_of,
)
from test.sim_loop import Trace

Request = raft_pb2.VoteRequest | raft_pb2.AppendEntriesRequest
Reply = raft_pb2.RequestVoteResponse | raft_pb2.AppendEntriesResponse
Link = tuple[int, int]


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


class SimTransport:
    """A node's way to its peers, through the simulated network; a request whose request or reply is
    lost fails with PeerUnreachableError once the caller's timeout passes on the caller's clock."""

    def __init__(self, process: Process) -> None:
        self._process = process

    async def request_vote(
        self, peer_id: int, request: raft_pb2.VoteRequest, timeout: float
    ) -> raft_pb2.RequestVoteResponse:
        reply = await self._call(peer_id, request, timeout)
        assert isinstance(reply, raft_pb2.RequestVoteResponse)
        return reply

    async def append_entries(
        self, peer_id: int, request: raft_pb2.AppendEntriesRequest, timeout: float
    ) -> raft_pb2.AppendEntriesResponse:
        reply = await self._call(peer_id, request, timeout)
        assert isinstance(reply, raft_pb2.AppendEntriesResponse)
        return reply

    async def close(self) -> None:
        pass

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
    """One machine: its disk outlives the processes that run on it."""

    def __init__(self, world: World, node_id: int) -> None:
        self.world = world
        self.node_id = node_id
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
        # While down: the terms of the entries its disk holds (what a restart will find).
        self.disk_terms: list[int] = []

    def views(self) -> list[LogView]:
        """The logs this node could present in an election (see Invariants)."""
        if self.process is not None:
            return views_of(self.process.log)
        return [view_of_terms("on-disk", self.disk_terms)]

    def _read_disk_terms(self) -> list[int]:
        path = f"{self.data_dir}/{LOG_FILE}"
        try:
            data = self.disk.file_bytes(path)
        except KeyError:
            return []
        try:
            # The same parse a restart does (it also drops a torn tail).
            return [e.term for e in _scan_log(path, data).entries]
        except LogCorruptionError:
            return []

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
        self.starting = True
        self.incarnations += 1
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
            world.cluster,
            log,
            process.transport,
            world.timing,
            random.Random(world.node_seed_rng.getrandbits(64)),
            process.clock,
        )
        node.invariants = world.invariants
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

    def crash(self, torn_bytes: int) -> None:
        """Kill the process at once; the disk keeps only what was fsync'd (maybe a torn record)."""
        process = self.process
        assert process is not None
        self.process = None
        process.alive = False
        log = process.log
        # Until the disk has lost power (below), what it will keep is at least the durable prefix.
        self.disk_terms = [log.term_at(i) for i in range(1, log.durable_index + 1)]
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
            self.disk_terms = self._read_disk_terms()
            self._resumed.set()

        world.loop.call_soon(lose_power)

    def pause(self) -> None:
        self.paused = True
        self._resumed.clear()

    def resume(self) -> None:
        self.paused = False
        self._resumed.set()
        held, self.held = self.held, []
        for action in held:
            action()


# ---- the network -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkEffect:
    """What one fault does to the links it covers."""

    cut: bool = False
    drop: float = 0.0
    duplicate: float = 0.0
    # Extra delay drawn uniformly from this range (seconds).
    delay: tuple[float, float] | None = None
    # Extra delay drawn uniformly from [0, jitter]: messages overtake each other.
    jitter: float = 0.0


@dataclass
class LinkState:
    cut: bool = False
    drop: float = 0.0
    duplicate: float = 0.0
    delays: list[tuple[float, float]] = field(default_factory=list)
    jitter: float = 0.0


_HEALTHY = LinkState()


@dataclass(frozen=True)
class ClientOp:
    kind: str  # "put" or "get"
    key: str
    value: str | None = None


@dataclass(frozen=True)
class ClientReply:
    """ok (with a get's value), not-leader (with the leader the node named), unavailable, unknown."""

    status: str
    value: str | None = None
    leader: int | None = None


def describe(message: Request | Reply) -> str:
    if isinstance(message, raft_pb2.AppendEntriesRequest):
        return (
            f"append t{message.term} prev {message.prev_log_index}/t{message.prev_log_term} "
            f"+{len(message.log_entries)} commit {message.leader_commit}"
        )
    if isinstance(message, raft_pb2.VoteRequest):
        return f"vote? t{message.term} last {message.last_log_index}/t{message.last_log_term}"
    if isinstance(message, raft_pb2.AppendEntriesResponse):
        if message.success:
            return f"append ok t{message.term} match {message.match_index}"
        return (
            f"append refused t{message.term} conflict "
            f"{message.conflict_index}/t{message.conflict_term}"
        )
    return f"vote {'yes' if message.vote_granted else 'no'} t{message.term}"


class Network:
    """Directed links between nodes (and between clients and nodes) with faults layered on them.

    Every delivery is a timer on the loop at a random delay (mostly milliseconds), so messages on one
    link overtake each other whenever their delays do. A message may be dropped, duplicated or held
    back by a fault; one to a crashed node is lost; one to a paused node waits until it resumes.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self.rng = world.net_rng
        self._effects: dict[int, tuple[frozenset[Link], LinkEffect]] = {}
        self._next_effect = 0
        self._links: dict[Link, LinkState] = {}
        self._next_message = 0
        self._newest_arrival: dict[Link, int] = {}
        self.client_drop = 0.0
        self.stats: Counter[str] = Counter()

    # ---- faults on links -------------------------------------------------------------------

    def add_effect(self, links: Iterable[Link], effect: LinkEffect) -> int:
        self._next_effect += 1
        self._effects[self._next_effect] = (frozenset(links), effect)
        self._links.clear()
        return self._next_effect

    def remove_effect(self, effect_id: int) -> None:
        self._effects.pop(effect_id, None)
        self._links.clear()

    def link(self, src: int, dst: int) -> LinkState:
        key = (src, dst)
        state = self._links.get(key)
        if state is None:
            state = LinkState()
            for links, effect in self._effects.values():
                if key in links:
                    state.cut = state.cut or effect.cut
                    state.drop = max(state.drop, effect.drop)
                    state.duplicate = max(state.duplicate, effect.duplicate)
                    state.jitter = max(state.jitter, effect.jitter)
                    if effect.delay is not None:
                        state.delays.append(effect.delay)
            if state == _HEALTHY:
                state = _HEALTHY
            self._links[key] = state
        return state

    def _delay(self, state: LinkState) -> float:
        rng = self.rng
        delay = 0.0002 + min(rng.expovariate(500.0), 0.05)
        if state.jitter:
            delay += rng.uniform(0.0, state.jitter)
        for low, high in state.delays:
            delay += rng.uniform(low, high)
        return delay

    def _fates(self, state: LinkState) -> list[float | None]:
        """The delay of each copy the network delivers (None: that copy is dropped)."""
        rng = self.rng
        copies = 2 if state.duplicate and rng.random() < state.duplicate else 1
        if copies > 1:
            self.stats["duplicated"] += 1
        return [
            None if state.drop and rng.random() < state.drop else self._delay(state)
            for _ in range(copies)
        ]

    @staticmethod
    def _fate_text(fates: list[float | None]) -> str:
        shown = ["dropped" if d is None else f"+{d * 1000:.1f} ms" for d in fates]
        return ("duplicated: " if len(fates) > 1 else "") + ", ".join(shown)

    # ---- peer messages ---------------------------------------------------------------------

    def send_request(
        self, sender: Process, dst: int, request: Request, future: asyncio.Future[Reply]
    ) -> None:
        world = self.world
        src = sender.host.node_id
        self._next_message += 1
        number = self._next_message
        state = self.link(src, dst)
        self.stats["messages"] += 1
        if state.cut:
            self.stats["lost to partitions"] += 1
            world.trace.event(
                "net", f"{src}->{dst} #{number} {describe(request)}: partitioned", False
            )
            return
        data = request.SerializeToString()
        fates = self._fates(state)
        world.trace.event(
            "net", f"{src}->{dst} #{number} {describe(request)}: {self._fate_text(fates)}", False
        )
        now = world.loop.time()
        for delay in fates:
            if delay is None:
                self.stats["dropped"] += 1
                continue
            world.loop.call_at(
                now + delay, self._arrive_request, sender, dst, type(request), data, future, number
            )

    def _arrived(self, src: int, dst: int, number: int, what: str) -> bool:
        """Whether a message may be delivered now; counts reordering and traces losses."""
        if self.link(src, dst).cut:
            self.stats["lost to partitions"] += 1
            self.world.trace.event("net", f"{src}->{dst} #{number} {what} lost: partitioned", False)
            return False
        newest = self._newest_arrival.get((src, dst), 0)
        if number < newest:
            self.stats["reordered"] += 1
        else:
            self._newest_arrival[src, dst] = number
        return True

    def _arrive_request(
        self,
        sender: Process,
        dst: int,
        kind: type[Request],
        data: bytes,
        future: asyncio.Future[Reply],
        number: int,
    ) -> None:
        src = sender.host.node_id
        if not self._arrived(src, dst, number, "request"):
            return
        host = self.world.hosts[dst]
        process = host.process
        if process is None:
            self.stats["lost to crashed nodes"] += 1
            self.world.trace.event("net", f"{src}->{dst} #{number} lost: {dst} is down", False)
            return
        if host.paused:
            self.world.trace.event("net", f"{src}->{dst} #{number} held: {dst} is paused", False)
        process.enter(
            lambda: process.spawn(
                self._serve_request(process, sender, kind, data, future, number),
                f"handling message #{number}",
            )
        )

    async def _serve_request(
        self,
        process: Process,
        sender: Process,
        kind: type[Request],
        data: bytes,
        future: asyncio.Future[Reply],
        number: int,
    ) -> None:
        node = process.node
        reply: Reply
        try:
            if kind is raft_pb2.VoteRequest:
                reply = await node.handle_request_vote(raft_pb2.VoteRequest.FromString(data))
            else:
                reply = await node.handle_append_entries(
                    raft_pb2.AppendEntriesRequest.FromString(data)
                )
        except InvalidRequestError as e:
            self.world.fail(
                "well-formed messages",
                f"node {process.host.node_id} refused message #{number} from node "
                f"{sender.host.node_id} as malformed: {e}",
            )
            return
        process.enter(lambda: self._send_reply(process, sender, reply, future, number))
        if isinstance(reply, raft_pb2.RequestVoteResponse) and reply.vote_granted:
            self.world.voted(process.host.node_id)

    def _send_reply(
        self,
        replier: Process,
        sender: Process,
        reply: Reply,
        future: asyncio.Future[Reply],
        number: int,
    ) -> None:
        world = self.world
        src, dst = replier.host.node_id, sender.host.node_id
        state = self.link(src, dst)
        if state.cut:
            self.stats["lost to partitions"] += 1
            world.trace.event(
                "net", f"{src}->{dst} reply to #{number} {describe(reply)}: partitioned", False
            )
            return
        data = reply.SerializeToString()
        fates = self._fates(state)
        world.trace.event(
            "net",
            f"{src}->{dst} reply to #{number} {describe(reply)}: {self._fate_text(fates)}",
            False,
        )
        now = world.loop.time()
        for delay in fates:
            if delay is None:
                self.stats["dropped"] += 1
                continue
            world.loop.call_at(
                now + delay, self._arrive_reply, src, sender, type(reply), data, future, number
            )

    def _arrive_reply(
        self,
        src: int,
        sender: Process,
        kind: type[Reply],
        data: bytes,
        future: asyncio.Future[Reply],
        number: int,
    ) -> None:
        dst = sender.host.node_id
        # Replies are numbered after the requests they answer, for the reordering count.
        if not self._arrived(src, dst, number, "reply"):
            return

        def deliver() -> None:
            if future.done():
                self.stats["late replies"] += 1
            else:
                future.set_result(kind.FromString(data))

        sender.enter(deliver)

    # ---- client requests -------------------------------------------------------------------

    def client_call(
        self, client: int, node_id: int, op: ClientOp, future: asyncio.Future[ClientReply]
    ) -> None:
        """Send a client's request to a node; its reply (if any) settles `future`."""
        world = self.world
        if self.client_drop and self.rng.random() < self.client_drop:
            self.stats["client messages dropped"] += 1
            world.trace.event("net", f"c{client}->{node_id} request dropped")
            return
        world.loop.call_at(
            world.loop.time() + self._delay(_HEALTHY),
            self._client_arrives,
            client,
            node_id,
            op,
            future,
        )

    def _client_arrives(
        self, client: int, node_id: int, op: ClientOp, future: asyncio.Future[ClientReply]
    ) -> None:
        process = self.world.hosts[node_id].process
        if process is None:
            return
        process.enter(
            lambda: process.spawn(
                self._serve_client(process, client, op, future), f"serving client {client}"
            )
        )

    async def _serve_client(
        self, process: Process, client: int, op: ClientOp, future: asyncio.Future[ClientReply]
    ) -> None:
        node = process.node
        try:
            if op.kind == "put":
                assert op.value is not None
                await node.propose_mapping(op.key, op.value)
                reply = ClientReply("ok")
                self.world.invariants.acknowledged_put(node.node_id, op.key, op.value)
            else:
                reply = ClientReply("ok", await node.read(op.key))
        except NotLeaderError as e:
            reply = ClientReply("not-leader", leader=e.leader_id)
        except UnavailableError:
            reply = ClientReply("unavailable")
        except CommitUnknownError:
            reply = ClientReply("unknown")
        process.enter(lambda: self._client_reply(process, client, reply, future))

    def _client_reply(
        self,
        process: Process,
        client: int,
        reply: ClientReply,
        future: asyncio.Future[ClientReply],
    ) -> None:
        world = self.world
        node_id = process.host.node_id
        if self.client_drop and self.rng.random() < self.client_drop:
            self.stats["client messages dropped"] += 1
            world.trace.event("net", f"{node_id}->c{client} reply {reply.status} dropped")
            return

        def deliver() -> None:
            if not future.done():
                future.set_result(reply)

        world.loop.call_at(world.loop.time() + self._delay(_HEALTHY), deliver)


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
        self.cluster = ClusterConfig(
            {
                i: NodeAddress(i, f"node{i}.sim:7000", f"node{i}.sim:8000")
                for i in range(1, size + 1)
            }
        )
        self.timing = random_timing(random.Random(master.getrandbits(64)))
        # Told of elections and votes, to crash nodes at those moments (the fault injector).
        self.on_elected: Callable[[int], None] | None = None
        self.on_voted: Callable[[int], None] | None = None
        self.failure: Failure | None = None
        self.failed: asyncio.Future[None] = loop.create_future()
        self.hosts = {i: Host(self, i) for i in self.cluster.nodes}
        self.invariants = Invariants(
            self.fail,
            lambda: {i: h.views() for i, h in self.hosts.items()},
            len(self.hosts) // 2 + 1,
        )
        self.network = Network(self)
        self._background: dict[asyncio.Task[Any], None] = {}

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
