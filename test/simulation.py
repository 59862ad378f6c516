"""Deterministic simulation of a raft-demo cluster: the project's own RaftNode, log and state machine on
a simulated clock, network and disk, with faults of every kind and membership changes, checked for
Raft's safety properties, linearizability and liveness. One seed fixes the whole run, so any failure
replays exactly.

    python -m test.simulation --seed 42 --verbose     # one run, narrated
    python -m test.simulation --seeds 0-999 --jobs 2  # a soak, with a summary
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Literal, NoReturn, TextIO

from state_machine import CasResult, DeleteResult
from test import sim_variants
from test.linearizability import History, check
from test.linearizability_ranges import RangeKey, expand_ranges
from test.sim_faults import (
    FAULT_KINDS,
    MEMBERSHIP_KINDS,
    TARGETED_KINDS,
    FaultInjector,
    MembershipChanges,
)
from test.sim_leases import LeaseClient, LeaseRecord
from test.sim_loop import SimulationStalled, Trace, TraceHandler, VirtualTimeLoop
from test.sim_network import ClientOp, ClientReply
from test.sim_world import World

KEYS = ("a", "b", "c")
CLIENTS = 5
OpKind = Literal["put", "get", "put-many", "cas", "delete"]
# The share of each kind of operation a client issues; the rest are linearizable reads.
OP_SHARES: tuple[tuple[OpKind, float], ...] = (
    ("put", 0.35),
    ("put-many", 0.06),
    ("cas", 0.1),
    ("delete", 0.04),
)
# This share of reads goes to a random node rather than the leader (a follower uses ReadIndex).
FOLLOWER_READ_SHARE = 0.5
# Every this many reads of a client, one reads every key at once (a range).
RANGE_EVERY = 4
# A write with a session is sent up to this many times, with the same sequence number.
WRITE_ATTEMPTS = 3
# A client gives up on a request after this long and counts its outcome as unknown.
CLIENT_TIMEOUT = 3.0
# The fault phase ends once the clients have this many successful operations (or at the limit).
DEFAULT_OPS = 200
FAULT_PHASE_LIMIT = 400.0
# Liveness: once faults stop, the membership changes left undone are finished within
# RECONCILE_BOUND simulated seconds; then a stable leader within LEADER_BOUND, and each client's
# final put and get, and every member caught up (and every added node a voter), within
# LIVENESS_BOUND.
RECONCILE_BOUND = 30.0
LEADER_BOUND = 15.0
LIVENESS_BOUND = 40.0
# The linearizability search gives up (and the run fails as inconclusive) beyond this many steps.
CHECK_STEPS = 5_000_000


@dataclass
class RunResult:
    """What one run did and whether every check held."""

    seed: int
    nodes: int
    ops: int
    variant: str | None
    invariant: str | None = None
    report: str = ""
    sim_time: float = 0.0
    wall_time: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    # Membership changes by kind, their outcomes, and the cluster's sizes (None: not simulated).
    membership: dict[str, int] | None = None
    network: dict[str, int] = field(default_factory=dict)
    events: int = 0
    trace_hash: str = ""

    @property
    def ok(self) -> bool:
        return self.invariant is None

    @property
    def operations(self) -> int:
        return sum(self.outcomes.values())


def replay_command(
    seed: int,
    nodes: int,
    ops: int,
    variant: str | None,
    membership: bool = True,
    leases: bool = False,
) -> str:
    command = f"python -m test.simulation --seed {seed} --verbose"
    if nodes != 5:
        command += f" --nodes {nodes}"
    if ops != DEFAULT_OPS:
        command += f" --ops {ops}"
    if not membership:
        command += " --no-membership"
    if leases:
        command += " --leases"
    if variant is not None:
        command += f" --variant {variant}"
    return command


class _Stop(Exception):
    """The run is over (a check failed); unwinds the scenario."""


class Client:
    """One client on a small key space, with unique values: the seed's puts (no session) and
    linearizable reads (half of them from a random node, which a follower serves through
    ReadIndex), and with a session put-many, compare-and-swap and delete, each resent with the
    same sequence number after a timeout, so that the cluster must apply it exactly once."""

    def __init__(self, sim: Simulation, number: int) -> None:
        self.sim = sim
        self.number = number
        self.leader: int | None = None
        self._writes = 0
        self._client_id: int | None = None
        self._sequence = 0
        # The value this client last saw under each key: what its cas expects, so some swap.
        self._seen: dict[str, str | None] = {}
        self._reads = 0

    async def run(self) -> None:
        rng = self.sim.world.client_rng
        while self.sim.issuing:
            draw = rng.random()
            kind: OpKind = "get"
            for name, share in OP_SHARES:
                if draw < share:
                    kind = name
                    break
                draw -= share
            await self.operation(kind, rng.choice(KEYS))

    async def until_ok(self, kind: Literal["put", "get"], deadline: float) -> None:
        """Retry `kind` until it succeeds; liveness fails if that takes past `deadline`."""
        sim = self.sim
        rng = sim.world.client_rng
        while await self.operation(kind, rng.choice(KEYS)) != "ok":
            if sim.world.loop.time() > deadline:
                sim.stop(
                    "liveness",
                    f"client {self.number} could not complete a {kind} within "
                    f"{LIVENESS_BOUND:g} s after the faults stopped\n{sim.node_states()}",
                )

    def _value(self) -> str:
        self._writes += 1
        return f"{self.number}.{self._writes}"

    async def _send(self, target: int, op: ClientOp) -> ClientReply | None:
        """One request to `target`; its reply, or None when none came within CLIENT_TIMEOUT."""
        world = self.sim.world
        future: asyncio.Future[ClientReply] = world.loop.create_future()
        world.network.client_call(self.number, target, op, future)
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT):
                return await future
        except TimeoutError:
            return None

    async def _pause(self, outcome: str) -> None:
        rng = self.sim.world.client_rng
        if outcome == "ok":
            await asyncio.sleep(rng.uniform(0.0, 0.02))
        elif outcome == "fail" and self.leader is not None:
            await asyncio.sleep(rng.uniform(0.001, 0.01))
        else:
            await asyncio.sleep(rng.uniform(0.05, 0.3))

    def _target(self) -> int:
        if self.leader is not None:
            return self.leader
        return self.sim.world.client_rng.choice(self.sim.world.member_ids())

    async def operation(self, kind: OpKind, key: str) -> str:
        """One operation and its outcome: ok, fail (certainly no effect) or unknown."""
        if kind in ("put", "get"):
            return await self._plain(kind, key)
        return await self._session_write(kind, key)

    async def _plain(self, kind: str, key: str) -> str:
        sim = self.sim
        world = sim.world
        rng = world.client_rng
        value = self._value() if kind == "put" else None
        target = self._target()
        if kind == "get" and rng.random() < FOLLOWER_READ_SHARE:
            # Any node at all, also one being added or one removed that does not know it yet.
            target = rng.choice(world.live_ids())
        ranged = False
        if kind == "get":
            # Every RANGE_EVERY-th read of a client reads every key at once (a range), checked per
            # key; counted rather than drawn, so the runs' random choices stay as they were.
            self._reads += 1
            ranged = self._reads % RANGE_EVERY == 0
        subject: Hashable = RangeKey("", None) if ranged else key
        op_id = sim.history.invoke(self.number, "put" if kind == "put" else "get", subject, value)
        what = f"put {key}={value}" if kind == "put" else ("range" if ranged else f"get {key}")
        world.trace.event("client", f"c{self.number} -> {target}: {what} (op {op_id})")
        reply = await self._send(target, ClientOp("range" if ranged else kind, key, value))
        if reply is None:
            sim.history.unknown(op_id)
            outcome, text = "unknown", "timed out"
            self.leader = None
        elif reply.status == "ok" and ranged:
            assert isinstance(reply.result, tuple)
            sim.history.ok(op_id, reply.result)
            self._seen.update(reply.result)
            outcome, text = "ok", f"ok {len(reply.result)} keys"
        elif reply.status == "ok":
            sim.history.ok(op_id, reply.value if kind == "get" else None)
            self._seen[key] = reply.value if kind == "get" else value
            outcome = "ok"
            text = f"ok {reply.value!r}" if kind == "get" else "ok"
            if kind == "put":
                self.leader = target
        elif reply.status == "not-leader":
            sim.history.fail(op_id)
            outcome, text = "fail", f"not the leader (leader: {reply.leader})"
            self.leader = reply.leader
        elif reply.status == "unavailable":
            sim.history.fail(op_id)
            outcome, text = "fail", "unavailable"
            self.leader = None
        else:
            sim.history.unknown(op_id)
            outcome, text = "unknown", "commit unknown"
            self.leader = None
        world.trace.event("client", f"c{self.number} <- {target}: {what} (op {op_id}): {text}")
        sim.outcome(outcome)
        await self._pause(outcome)
        return outcome

    async def _register(self) -> int | None:
        """This client's session id, registering it first (one attempt; None if that failed)."""
        if self._client_id is not None:
            return self._client_id
        world = self.sim.world
        target = self._target()
        world.trace.event("client", f"c{self.number} -> {target}: register")
        reply = await self._send(target, ClientOp("register"))
        if reply is not None and reply.status == "ok":
            assert isinstance(reply.result, int)
            self._client_id = reply.result
            self.leader = target
            world.trace.event("client", f"c{self.number} <- {target}: client id {reply.result}")
        else:
            self.leader = reply.leader if reply is not None else None
            await self._pause("fail")
        return self._client_id

    async def _session_write(self, kind: OpKind, key: str) -> str:
        sim = self.sim
        world = sim.world
        rng = world.client_rng
        client_id = await self._register()
        if client_id is None:
            return "fail"
        self._sequence += 1
        # One request at a time per client, so every earlier reply has been seen.
        session = (client_id, self._sequence, self._sequence)
        history = sim.history
        if kind == "put-many":
            keys = sorted(rng.sample(KEYS, 2))
            mappings = tuple((k, self._value()) for k in keys)
            op = ClientOp(kind, mappings=mappings, session=session)
            # Recorded as one put per key: the checker models each key on its own, so it does
            # not check that the batch's keys changed together (the state machine's tests do).
            op_ids = [history.invoke(self.number, "put", k, v) for k, v in mappings]
            what = "put-many " + ", ".join(f"{k}={v}" for k, v in mappings)
        elif kind == "cas":
            expected = self._seen.get(key) if rng.random() < 0.7 else None
            op = ClientOp(kind, key, self._value(), expected=expected, session=session)
            op_ids = [history.invoke(self.number, "cas", key, op.value, expected)]
            what = f"cas {key} {expected!r}->{op.value}"
        else:
            op = ClientOp(kind, key, session=session)
            op_ids = [history.invoke(self.number, "delete", key)]
            what = f"delete {key}"
        what += f" (client {client_id} #{self._sequence}, op {op_ids[0]})"
        maybe_applied = False
        reply: ClientReply | None = None
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            target = self._target()
            again = f" (attempt {attempt})" if attempt > 1 else ""
            world.trace.event("client", f"c{self.number} -> {target}: {what}{again}")
            reply = await self._send(target, op)
            status = "timed out" if reply is None else reply.status
            world.trace.event("client", f"c{self.number} <- {target}: {what}: {status}")
            if reply is not None and reply.status == "ok":
                self.leader = target
                break
            if reply is None or reply.status in ("unknown", "expired"):
                maybe_applied = True
            if reply is not None and reply.status == "expired":
                self._client_id = None
                break
            self.leader = reply.leader if reply is not None else None
            await self._pause("fail" if self.leader is not None else "unknown")
        if reply is not None and reply.status == "ok":
            outcome = "ok"
            if kind == "put-many":
                for (k, v), op_id in zip(op.mappings, op_ids, strict=True):
                    history.ok(op_id)
                    self._seen[k] = v
            elif kind == "cas":
                assert isinstance(reply.result, CasResult)
                swapped, after = reply.result.swapped, reply.result.value
                # The checker wants the value the cas found: `expected` when it swapped.
                history.ok(op_ids[0], (swapped, op.expected if swapped else after))
                self._seen[key] = after
            else:
                assert isinstance(reply.result, DeleteResult)
                history.ok(op_ids[0], reply.result.existed)
                self._seen[key] = None
        else:
            outcome = "unknown" if maybe_applied else "fail"
            for op_id in op_ids:
                if maybe_applied:
                    history.unknown(op_id)
                else:
                    history.fail(op_id)
        sim.outcome(outcome)
        await self._pause(outcome)
        return outcome


class Simulation:
    """One run: a cluster, clients, faults and membership changes on one seed; then a quiet phase
    and the final checks."""

    def __init__(
        self,
        seed: int,
        nodes: int,
        ops: int,
        verbose: bool,
        out: TextIO | None = None,
        variant: str | None = None,
        membership: bool = True,
        leases: bool = False,
    ) -> None:
        self.seed = seed
        self.leases = leases
        self.variant = variant
        self.nodes = nodes
        self.ops = ops
        self.loop = VirtualTimeLoop()
        self.trace = Trace(self.loop, verbose, out)
        self.world = World(seed, nodes, self.loop, self.trace)
        self.history = History(clock=self.loop.time)
        self.injector = FaultInjector(self.world)
        self.changes = (
            MembershipChanges(
                self.world, self.injector, overlapping=sim_variants.overlapping(variant)
            )
            if membership
            else None
        )
        self.issuing = True
        self.outcomes: Counter[str] = Counter({"ok": 0, "fail": 0, "unknown": 0})
        self._successes = 0
        self._enough = asyncio.Event()
        # A failure report shows the notable events up to here (None: up to the failure).
        self._report_until: float | None = None

    @property
    def changing(self) -> bool:
        """Whether this run changes the cluster's membership."""
        return self.changes is not None and self.changes.active

    def outcome(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        if outcome == "ok" and self.issuing:
            self._successes += 1
            self.check_enough()

    def check_enough(self) -> None:
        """The fault phase lasts until the clients have their operations and every kind of fault
        and of membership change ran."""
        if self._successes >= self.ops and all(self.injector.counts.values()):
            if self.changes is None or not self.changing or all(self.changes.counts.values()):
                self._enough.set()

    def stop(self, invariant: str, detail: str) -> NoReturn:
        self.world.fail(invariant, detail)
        raise _Stop

    def node_states(self) -> str:
        lines = []
        for node_id, host in self.world.hosts.items():
            node = host.node
            if node is None:
                why = "retired (died with its disk)" if host.retired else "down"
                lines.append(f"  node {node_id}: {'left the cluster' if host.gone else why}")
                continue
            lines.append(
                f"  node {node_id}: {node.role} of term {node.current_term}"
                f"{' (paused)' if host.paused else ''}, leader {node.leader_id}, "
                f"last index {node.log.last_index}, commit {node.commit_index}, "
                f"applied {node.last_applied}; {node.config.describe()} "
                f"(index {node.configs.latest_index})"
            )
        return "\n".join(lines)

    # ---- the scenario ----------------------------------------------------------------------

    async def _until(self, condition: Callable[[], bool], deadline: float, what: str) -> None:
        while not condition():
            if self.loop.time() > deadline:
                self.stop("liveness", f"{what}\n{self.node_states()}")
            await asyncio.sleep(0.05)

    def _stable_leader(self) -> int | None:
        """The one leader, a voter of its own configuration, whom every member (running, not
        paused) follows in its term."""
        hosts = self.world.hosts
        leaders = [
            h.node
            for h in hosts.values()
            if h.node is not None and not h.paused and h.node.role == "leader"
        ]
        if len(leaders) != 1 or not leaders[0].is_voter:
            return None
        leader = leaders[0]
        for member in leader.config.members:
            host = hosts.get(member)
            node = host.node if host is not None else None
            if node is None or host is None or host.paused:
                return None
            if node.current_term != leader.current_term or node.leader_id != leader.node_id:
                return None
        return leader.node_id

    def _intended_members(self) -> set[int]:
        return {i for i, h in self.world.hosts.items() if h.intent == "member" and not h.departed}

    def _converged(self) -> bool:
        """Every member caught up with the leader; the leader's configuration committed, with
        every added node promoted to voter and the members the operator asked for."""
        leader_id = self._stable_leader()
        leader = self.world.hosts[leader_id].node if leader_id is not None else None
        if leader is None:
            return False
        config = leader.config
        if config.learners or leader.configs.latest_index > leader.commit_index:
            return False
        if self.changing and set(config.members) != self._intended_members():
            return False
        last = leader.log.last_index
        for member in config.members:
            node = self.world.hosts[member].node
            if node is None or not (
                node.log.last_index == node.commit_index == node.last_applied == last
            ):
                return False
        return True

    async def _scenario(self) -> None:
        world = self.world
        trace = self.trace
        timing = world.timing
        trace.event(
            "sim",
            f"seed {self.seed}: {self.nodes} nodes, {CLIENTS} clients, keys {', '.join(KEYS)}; "
            f"heartbeat {timing.heartbeat_interval * 1000:.0f} ms, election timeout "
            f"{timing.election_timeout_min * 1000:.0f}-{timing.election_timeout_max * 1000:.0f} ms",
        )
        if self.variant is not None:
            trace.event(
                "sim", f"broken node ({self.variant}): {sim_variants.describe(self.variant)}"
            )
        if self.changing:
            trace.event("sim", "this run changes the membership (one change at a time)")
        for host in world.hosts.values():
            await host.start()
        self.loop.create_task(world.monitor_leaders())
        injector = self.loop.create_task(self.injector.run(on_fault=self.check_enough))
        changes = self.changes if self.changing else None
        changer = (
            self.loop.create_task(changes.run(on_change=self.check_enough))
            if changes is not None
            else None
        )
        world.network.client_drop = 0.01
        clients = [Client(self, i) for i in range(1, CLIENTS + 1)]
        running = [self.loop.create_task(c.run()) for c in clients]
        leases = LeaseRecord(self.loop.time, world.fail) if self.leases else None
        if leases is not None:
            world.invariants.first_applied.append(leases.first_applied)
            lease_client = LeaseClient(
                leases,
                self.loop,
                world.network.client_call,
                world.member_ids,
                self.seed,
                lambda: self.issuing,
            )
            running.append(self.loop.create_task(lease_client.run()))
        try:
            async with asyncio.timeout(FAULT_PHASE_LIMIT):
                await self._enough.wait()
        except TimeoutError:
            trace.event("sim", f"fault phase ends at its limit of {FAULT_PHASE_LIMIT:g} s")

        # The quiet phase: heal everything, stop issuing, and expect progress.
        quiet = self.loop.time()
        self.issuing = False
        if changer is not None and changes is not None:
            changer.cancel()
            changes.stop()
        injector.cancel()
        self.injector.stop()
        world.network.client_drop = 0.0
        trace.event("sim", "faults stop: network healed, paused nodes resumed, crashed restarted")
        await asyncio.gather(*running)
        settled = quiet
        if changes is not None:
            trace.event("sim", "membership changes stop; the operator finishes those left undone")
            if not await changes.reconcile(quiet + RECONCILE_BOUND):
                self.stop(
                    "liveness",
                    f"the membership changes left undone were not finished within "
                    f"{RECONCILE_BOUND:g} s after the faults stopped\n{self.node_states()}",
                )
            settled = self.loop.time()
        await self._until(
            lambda: self._stable_leader() is not None,
            settled + LEADER_BOUND,
            f"no stable leader within {LEADER_BOUND:g} s after the faults stopped",
        )
        leader_from = self.loop.time()
        deadline = settled + LIVENESS_BOUND
        await asyncio.gather(*(c.until_ok("put", deadline) for c in clients))
        await asyncio.gather(*(c.until_ok("get", deadline) for c in clients))
        await self._until(
            self._converged,
            deadline,
            f"the nodes did not all catch up (every added node a voter, the configuration "
            f"committed) within {LIVENESS_BOUND:g} s after the faults stopped",
        )
        trace.event("sim", "all nodes caught up; final checks")
        if leases is not None:
            # Nobody keeps a lease alive any more: give the leader time to expire them all.
            # (A little past the bound, so that a lease still there is certainly late.)
            await asyncio.sleep(
                max(0.0, leader_from + leases.settle_time() + 0.1 - self.loop.time())
            )
        leader_id = self._stable_leader()
        assert leader_id is not None
        leader = world.hosts[leader_id].node
        assert leader is not None
        if leases is not None:
            leases.check_final(leader.state_machine, leader_from)
            trace.event(
                "sim",
                f"leases: {len(leases.leases)} granted, {leases.keepalives} keepalives "
                f"acknowledged, {leases.expired} expired; none early, none late",
            )
        members = [world.hosts[i] for i in leader.config.members]
        world.invariants.check_final(
            leader_id,
            [
                (h.node_id, h.process.log, h.process.node.commit_index)
                for h in members
                if h.process is not None
            ],
        )
        world.invariants.watches.check_final(
            [
                (h.node_id, h.process.node.state_machine)
                for h in members
                if h.process is not None and h.process.node is not None
            ]
        )
        if world.failure is not None:
            raise _Stop
        result = check(expand_ranges(self.history.operations), max_steps=CHECK_STEPS)
        if result.inconclusive:
            self.stop("linearizability", f"the check was inconclusive: {result.report()}")
        if not result.ok:
            # What led up to it is what happened before the failing window closed.
            self._report_until = result.window_end
            self.stop("linearizability", result.report())
        trace.event("sim", f"history is linearizable ({len(self.history)} operations)")

    def run(self) -> RunResult:
        started = time.perf_counter()
        raft_logger = logging.getLogger("raft")
        saved = (raft_logger.level, raft_logger.propagate, raft_logger.handlers[:])
        # A node logs an error only when something is wrong with itself or a peer.
        handler = TraceHandler(
            self.trace, lambda text: self.world.fail("no errors logged by the nodes", text)
        )
        raft_logger.handlers = [handler]
        raft_logger.setLevel(logging.INFO)
        raft_logger.propagate = False
        loop = self.loop

        def unexpected(_: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
            error = context.get("exception")
            self.world.fail(
                "no unexpected errors",
                f"{context.get('message')}: {error!r}" if error else str(context.get("message")),
            )

        loop.set_exception_handler(unexpected)
        scenario = loop.create_task(self._scenario())
        try:
            try:
                loop.run_until_complete(
                    asyncio.wait([scenario, self.world.failed], return_when=asyncio.FIRST_COMPLETED)
                )
                if scenario.done() and not scenario.cancelled():
                    error = scenario.exception()
                    if error is not None and not isinstance(error, _Stop):
                        self.world.fail("no unexpected errors", f"the simulation failed: {error!r}")
            except SimulationStalled as e:
                stalled = True
                self.world.fail("no stall", str(e))
            else:
                stalled = False
            sim_time = loop.time()
            digest = self.trace.digest()
            events = self.trace.count
            # What happens while shutting down (cancelled tasks, say) is not part of the run.
            failure = self.world.failure
            self.trace.close()
            self._shut_down(stalled)
        finally:
            raft_logger.handlers = saved[2]
            raft_logger.setLevel(saved[0])
            raft_logger.propagate = saved[1]
        result = RunResult(
            seed=self.seed,
            nodes=self.nodes,
            ops=self.ops,
            variant=None,
            sim_time=sim_time,
            wall_time=time.perf_counter() - started,
            outcomes=dict(self.outcomes),
            faults=dict(self.injector.counts) | dict(self.injector.targeted),
            membership=self.changes.summary() if self.changes is not None else None,
            network=dict(self.world.network.stats),
            events=events,
            trace_hash=digest,
        )
        if failure is not None:
            result.invariant = failure.invariant
            until = failure.time if self._report_until is None else self._report_until
            recent = self.trace.recent(until)
            result.report = "\n".join(
                [
                    f"SIMULATION FAILURE: seed {self.seed}: {failure.invariant} broken at "
                    f"simulated t={failure.time:.6f} s",
                    *(f"  {line}" for line in failure.detail.splitlines()),
                    f"the last {len(recent)} events before it (up to t={until:.6f} s):",
                    *(f"  {line}" for line in recent),
                ]
            )
        return result

    def _shut_down(self, stalled: bool) -> None:
        """Cancel whatever is still running and close the loop (nothing here is traced). A loop that
        stalled cannot run its tasks to their end; they are left to the garbage collector."""
        loop = self.loop
        try:
            for _ in range(0 if stalled else 3):
                tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
                if not tasks:
                    break
                for task in tasks:
                    task.cancel()
                loop.run_until_complete(asyncio.wait(tasks, timeout=60.0))
        except SimulationStalled:
            pass
        finally:
            loop.close()


def run_seed(
    seed: int,
    nodes: int = 5,
    ops: int = DEFAULT_OPS,
    verbose: bool = False,
    variant: str | None = None,
    out: TextIO | None = None,
    membership: bool = True,
    leases: bool = False,
) -> RunResult:
    """Run one seed (with a broken variant of the node, if named; without membership changes,
    if asked; with a lease client, if asked) and return what happened."""
    with sim_variants.applied(variant):
        result = Simulation(seed, nodes, ops, verbose, out, variant, membership, leases).run()
    result.variant = variant
    if not result.ok:
        replay = replay_command(seed, nodes, ops, variant, membership, leases)
        result.report += f"\nreplay: {replay}"
    return result


# ---- many seeds ----------------------------------------------------------------------------------


def _run_chunk(
    seeds: list[int], nodes: int, ops: int, variant: str | None, membership: bool
) -> list[RunResult]:
    return [run_seed(seed, nodes, ops, variant=variant, membership=membership) for seed in seeds]


def soak(
    seeds: Sequence[int],
    nodes: int = 5,
    ops: int = DEFAULT_OPS,
    jobs: int = 1,
    variant: str | None = None,
    stop_at_first_failure: bool = False,
    progress: Callable[[RunResult], None] | None = None,
    membership: bool = True,
) -> list[RunResult]:
    """Run many seeds, in `jobs` worker processes; results come back sorted by seed.

    With stop_at_first_failure, stops once a run fails, after finishing every lower seed, so the
    lowest failing seed of the range is among the results.
    """
    chunk_size = 2
    chunks = [list(seeds[i : i + chunk_size]) for i in range(0, len(seeds), chunk_size)]
    results: list[RunResult] = []

    def take(batch: Iterable[RunResult]) -> None:
        for result in batch:
            results.append(result)
            if progress is not None:
                progress(result)

    if jobs <= 1:
        for chunk in chunks:
            take(_run_chunk(chunk, nodes, ops, variant, membership))
            if stop_at_first_failure and any(not r.ok for r in results):
                break
    else:
        # Workers are fresh interpreters (spawn), each applying the variant in itself.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            pending: set[Future[list[RunResult]]] = {
                pool.submit(_run_chunk, chunk, nodes, ops, variant, membership) for chunk in chunks
            }
            stopping = False
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    if not future.cancelled():
                        take(future.result())
                if stop_at_first_failure and not stopping and any(not r.ok for r in results):
                    stopping = True
                    for future in pending:
                        future.cancel()
    results.sort(key=lambda r: r.seed)
    return results


def summarize(results: Sequence[RunResult], wall: float, jobs: int) -> str:
    """The soak's figures: runs, simulated time, operations, faults, membership changes, messages,
    failures, speed."""
    runs = len(results)
    failed = [r for r in results if not r.ok]
    sim_time = sum(r.sim_time for r in results)
    outcomes: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    network: Counter[str] = Counter()
    membership: Counter[str] = Counter()
    for r in results:
        outcomes.update(r.outcomes)
        faults.update(r.faults)
        network.update(r.network)
        membership.update(r.membership or {})
    operations = sum(outcomes.values())
    # Failed runs stop early, so the per-run figures are over the runs that finished.
    finished = [r for r in results if r.ok]
    per_run = min((r.outcomes.get("ok", 0) for r in finished), default=0)
    kinds_everywhere = sum(1 for r in finished if all(r.faults.get(k, 0) for k in FAULT_KINDS))
    sizes = sorted({r.nodes for r in results})
    lines = [
        f"runs: {runs} ({'/'.join(map(str, sizes))} nodes), {len(failed)} failed",
        f"simulated time: {sim_time:.0f} s ({sim_time / max(runs, 1):.1f} s per run)",
        f"client operations: {operations} ({outcomes['ok']} ok, {outcomes['fail']} failed, "
        f"{outcomes['unknown']} unknown); at least {per_run} ok in every finished run",
        f"faults injected: {sum(faults.values())}; every kind in {kinds_everywhere} of "
        f"{len(finished)} finished runs",
        "  " + ", ".join(f"{kind} {faults[kind]}" for kind in FAULT_KINDS + TARGETED_KINDS),
    ]
    simulated = [r for r in finished if r.membership is not None]
    changing = [r for r in simulated if (r.membership or {}).get("changing")]
    if simulated:
        every = sum(
            1 for r in changing if all((r.membership or {}).get(k) for k in MEMBERSHIP_KINDS)
        )
        lows = [(r.membership or {}).get("fewest voters", 0) for r in changing] or [0]
        highs = [(r.membership or {}).get("most voters", 0) for r in changing] or [0]
        lines += [
            f"membership changes: {sum(membership[k] for k in MEMBERSHIP_KINDS)} in "
            f"{len(changing)} of {len(simulated)} finished runs, every kind in {every} of them; "
            f"voters between {min(lows)} and {max(highs)}",
            "  "
            + ", ".join(f"{kind} {membership[kind]}" for kind in MEMBERSHIP_KINDS)
            + f" ({network['new nodes crashed mid-snapshot']} of those crashes mid-snapshot)",
            f"  admin calls: {membership['calls done']} done, {membership['calls refused']} "
            f"refused, {membership['calls gave up']} given up (finished at the end); removed "
            f"nodes: {network['nodes that learned of their removal']} learned it and exited, "
            f"{membership['removed nodes unaware']} never did; messages refused as from a "
            f"removed node or non-member: {network['refused: sender removed or not a member']} "
            f"({network['hand-overs refused']} TimeoutNow)",
        ]
    lines += [
        f"elections: {network['elections']} after a pre-vote, {network['elections by transfer']} "
        f"by transfer; leadership transfers: {network['transfers asked']} asked, "
        f"{network['transfers done']} moved leadership",
        f"snapshots: {network['snapshots taken']} taken, {network['snapshots installed']} "
        f"installed from a leader, {network['snapshot restores']} restored at a restart, "
        f"{network['crashes mid-transfer']} crashes in the middle of a transfer",
        f"messages: {network['messages']} ({network['dropped']} dropped, "
        f"{network['lost to partitions']} cut by partitions, {network['duplicated']} duplicated, "
        f"{network['reordered']} reordered, {network['lost to crashed nodes']} to crashed nodes)",
        f"client writes appended in batches: {network['client writes batched']} in "
        f"{network['client write batches']} batches, {network['client batches of several']} "
        "of several",
        f"wall time: {wall:.1f} s with {jobs} process{'es' if jobs > 1 else ''}; "
        f"{sim_time / wall if wall else 0:.0f} simulated seconds per wall second",
    ]
    if failed:
        lines.append("failures:")
        lines.extend(
            f"  seed {r.seed}: {r.invariant}; replay: "
            f"{replay_command(r.seed, r.nodes, r.ops, r.variant, r.membership is not None)}"
            for r in failed
        )
    return "\n".join(lines)


# ---- the command line ----------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _seed_range(text: str) -> range:
    first, sep, last = text.partition("-")
    try:
        low = int(first)
        high = int(last) if sep else low
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed range like 0-999") from None
    if low < 0 or high < low:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed range like 0-999")
    return range(low, high + 1)


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(
        prog="python -m test.simulation",
        description="Run raft-demo's nodes in a deterministic simulation with faults, and check them.",
        epilog="Exit codes: 0 every check held, 1 a check failed, 2 bad arguments.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--seed", type=int, help="run this one seed")
    which.add_argument("--seeds", type=_seed_range, metavar="A-B", help="soak seeds A to B")
    parser.add_argument("--verbose", action="store_true", help="narrate every event (with --seed)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes for --seeds (1)")
    parser.add_argument(
        "--ops", type=int, default=DEFAULT_OPS, help=f"successful client operations ({DEFAULT_OPS})"
    )
    parser.add_argument(
        "--nodes", type=int, default=5, help="cluster size at the start, 3 to 9 (5)"
    )
    parser.add_argument(
        "--no-membership",
        action="store_true",
        help="change no membership (the cluster keeps the nodes it started with)",
    )
    parser.add_argument(
        "--leases",
        action="store_true",
        help="also run a client of leases, and check that none expires early or late",
    )
    parser.add_argument(
        "--variant",
        choices=sorted(sim_variants.VARIANTS),
        help="run a deliberately broken node, to see the checks catch it",
    )
    args = parser.parse_args(argv)
    if not 3 <= args.nodes <= 9:
        parser.error("--nodes must be between 3 and 9")
    if args.ops < 1 or args.jobs < 1:
        parser.error("--ops and --jobs must be positive")
    if args.seed is not None and args.seed < 0:
        parser.error("--seed must not be negative")

    if args.seed is not None:
        result = run_seed(
            args.seed,
            args.nodes,
            args.ops,
            args.verbose,
            args.variant,
            membership=not args.no_membership,
            leases=args.leases,
        )
        if not result.ok:
            print(result.report)
        print(
            f"seed {result.seed}: {'ok' if result.ok else 'FAILED: ' + str(result.invariant)}; "
            f"{result.sim_time:.1f} simulated s in {result.wall_time:.2f} wall s; "
            f"{result.operations} client operations ({result.outcomes['ok']} ok); "
            f"{sum(result.faults.values())} faults; trace {result.trace_hash[:16]}"
        )
        return 0 if result.ok else 1

    seeds: range = args.seeds
    started = time.perf_counter()
    done = 0
    failures = 0

    def progress(result: RunResult) -> None:
        nonlocal done, failures
        done += 1
        if not result.ok:
            failures += 1
            print(result.report, flush=True)
        if done % 500 == 0:
            print(
                f"... {done}/{len(seeds)} runs, {failures} failed, "
                f"{time.perf_counter() - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    results = soak(
        seeds,
        args.nodes,
        args.ops,
        args.jobs,
        args.variant,
        progress=progress,
        membership=not args.no_membership,
    )
    print(summarize(results, time.perf_counter() - started, args.jobs))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (say, `| head`): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 1
    sys.exit(status)
