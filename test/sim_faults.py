"""The fault injector: network, disk and process faults of every kind, at random times, each undone
after a random while; and, when the fault phase ends, everything healed at once. Alongside it, the
operator: membership changes (nodes added, followers and leaders removed, dead nodes replaced, new
nodes crashed while they catch up), one after another, through admin calls to the leader."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from raft_node import NotLeaderError, TransferFailedError
from test.sim_network import ClientOp, ClientReply, Link, LinkEffect
from test.sim_world import Host, Process, World

# Every kind of fault, in the order a summary lists them.
FAULT_KINDS = (
    "drop",
    "delay",
    "duplicate",
    "reorder",
    "partition",
    "asymmetric",
    "isolate-leader",
    "split",
    "bridge",
    "crash",
    "power-loss",
    "pause",
    "slow-disk",
    "transfer",
)
# Faults at chosen moments rather than random times: a leader just elected is crashed (its first entry
# may not be durable yet) or cut off (its first entries stay its own: the start of the Raft paper's
# Figure 8); a node that has just granted a vote is crashed and restarted at once (it must remember
# its vote). Each happens with the probability given, per election or per vote, in the fault phase.
TARGETED_KINDS = ("crash-new-leader", "isolate-new-leader", "crash-after-vote")
CRASH_NEW_LEADER = 0.3
ISOLATE_NEW_LEADER = 0.25
CRASH_AFTER_VOTE = 0.15
# How often each kind is drawn once every kind has had its turn (power loss takes down most of the
# cluster, so it comes more rarely).
_WEIGHTS = {kind: 1.0 for kind in FAULT_KINDS} | {"power-loss": 0.3, "crash": 1.5, "pause": 1.5}
# Mean seconds between two faults.
MEAN_GAP = 0.6


def down_voters(world: World) -> int:
    """How many voters of the cluster's configuration are down, starting, paused or gone."""
    hosts = world.hosts
    return sum(
        1
        for i in world.config().voters
        if i not in hosts or not hosts[i].up or hosts[i].paused or hosts[i].starting
    )


def max_down(world: World) -> int:
    """At most this many voters down at once (outside a power loss), so a majority stays up."""
    return (len(world.config().voters) - 1) // 2


@dataclass
class _Active:
    kind: str
    ended: str
    undo: Callable[[], None]
    timer: asyncio.TimerHandle | None = None


class FaultInjector:
    """Injects faults until stopped. Each run starts with every kind once, in a random order, so each
    run sees all of them; after that kinds are drawn at random."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.rng = world.fault_rng
        self.counts: Counter[str] = Counter({kind: 0 for kind in FAULT_KINDS})
        self.targeted: Counter[str] = Counter({kind: 0 for kind in TARGETED_KINDS})
        self._active: dict[int, _Active] = {}
        self._next = 0
        self._stopped = False

    async def run(self, on_fault: Callable[[], None] | None = None) -> None:
        world = self.world
        world.on_elected = self._elected
        world.on_voted = self._voted
        rng = self.rng
        todo = list(FAULT_KINDS)
        rng.shuffle(todo)
        kinds = list(_WEIGHTS)
        weights = [_WEIGHTS[k] for k in kinds]
        while not self._stopped:
            await asyncio.sleep(rng.expovariate(1 / MEAN_GAP))
            if self._stopped:
                break
            for kind in [*todo, *rng.choices(kinds, weights, k=4)]:
                if self._inject(kind):
                    if kind in todo:
                        todo.remove(kind)
                    break
            if on_fault is not None:
                on_fault()

    def stop(self) -> None:
        """Inject nothing more and undo every active fault now: heal links, disks and processes."""
        self._stopped = True
        self.world.on_elected = None
        self.world.on_voted = None
        for fault_id in list(self._active):
            self._end(fault_id)

    # ---- bookkeeping ---------------------------------------------------------------------------

    def _start(
        self, kind: str, what: str, undo: Callable[[], None], duration: float, ended: str = ""
    ) -> None:
        """Trace `what` (the fault, begun now) and undo it after `duration` (tracing `ended`)."""
        self._next += 1
        fault_id = self._next
        active = _Active(kind, ended or f"over: {what}", undo)
        active.timer = self.world.loop.call_later(duration, self._end, fault_id)
        self._active[fault_id] = active
        self.world.trace.event("fault", f"{what} for {duration:.2f} s")

    def _end(self, fault_id: int) -> None:
        active = self._active.pop(fault_id, None)
        if active is None:
            return
        if active.timer is not None:
            active.timer.cancel()
        self.world.trace.event("fault", active.ended)
        active.undo()

    def _down(self) -> int:
        return down_voters(self.world)

    @property
    def _max_down(self) -> int:
        """At most this many voters down (crashed or paused) at once, outside a power loss."""
        return max_down(self.world)

    def _duration(self) -> float:
        return self.rng.uniform(0.2, 3.0)

    def _pick_node(self, prefer_leader: float) -> int:
        leader = self.world.leader()
        up = [i for i, h in self.world.hosts.items() if h.up and not h.paused]
        if leader is not None and leader in up and self.rng.random() < prefer_leader:
            return leader
        return self.rng.choice(up)

    def _some_links(self) -> list[Link]:
        """Directed links of one node, of a few nodes, or of the whole cluster."""
        rng = self.rng
        ids = self.world.live_ids()
        choice = rng.random()
        if choice < 0.4:
            chosen = [rng.choice(ids)]
        elif choice < 0.8:
            chosen = rng.sample(ids, rng.randint(2, len(ids)))
        else:
            chosen = ids
        links = [(a, b) for a in ids for b in ids if a != b and (a in chosen or b in chosen)]
        return [link for link in links if rng.random() < 0.7] or links

    def _link_fault(self, kind: str, links: list[Link], effect: LinkEffect, what: str) -> None:
        network = self.world.network
        effect_id = network.add_effect(links, effect)
        self._start(kind, what, lambda: network.remove_effect(effect_id), self._duration())

    def _elected(self, node_id: int) -> None:
        if self._stopped:
            return
        draw = self.rng.random()
        if draw < CRASH_NEW_LEADER:
            delay = self.rng.uniform(0.0, 0.006)
            self.world.loop.call_later(delay, self._targeted_crash, "crash-new-leader", node_id)
        elif draw < CRASH_NEW_LEADER + ISOLATE_NEW_LEADER:
            # Before its first append leaves: its no-op (and any write it takes) stays its own.
            self.targeted["isolate-new-leader"] += 1
            self._isolate("isolate-new-leader", node_id, f"isolate new leader {node_id}")

    def _voted(self, node_id: int) -> None:
        if self._stopped or self.rng.random() >= CRASH_AFTER_VOTE:
            return
        self.world.loop.call_soon(self._targeted_crash, "crash-after-vote", node_id)

    def _targeted_crash(self, kind: str, node_id: int) -> None:
        host = self.world.hosts[node_id]
        if self._stopped or not host.up or host.paused or self._down() >= self._max_down:
            return
        self.targeted[kind] += 1
        # A voter restarted at once may be asked again in the same election: it must remember.
        quick = kind == "crash-after-vote"
        self._crash(kind, [node_id], quick_restart=quick)

    # ---- the faults ----------------------------------------------------------------------------

    def _inject(self, kind: str) -> bool:
        """Inject one fault of `kind`; False if it cannot be injected now."""
        world = self.world
        rng = self.rng
        ids = world.live_ids()
        # A power loss takes down a majority whatever else is down; single nodes go down only while
        # a majority stays up.
        if kind in ("crash", "pause") and self._down() >= self._max_down:
            return False
        if kind == "drop":
            drop = rng.uniform(0.05, 0.6)
            self._link_fault(
                kind, self._some_links(), LinkEffect(drop=drop), f"drop {drop:.0%} of messages"
            )
        elif kind == "delay":
            low = rng.uniform(0.01, 0.5)
            high = low + rng.uniform(0.0, 2.5)
            self._link_fault(
                kind,
                self._some_links(),
                LinkEffect(delay=(low, high)),
                f"delay messages by {low:.2f}-{high:.2f} s",
            )
        elif kind == "duplicate":
            duplicate = rng.uniform(0.1, 0.6)
            self._link_fault(
                kind,
                self._some_links(),
                LinkEffect(duplicate=duplicate),
                f"duplicate {duplicate:.0%} of messages",
            )
        elif kind == "reorder":
            jitter = rng.uniform(0.02, 0.4)
            self._link_fault(
                kind,
                self._some_links(),
                LinkEffect(jitter=jitter),
                f"reorder messages (jitter up to {jitter * 1000:.0f} ms)",
            )
        elif kind == "partition":
            a, b = rng.sample(ids, 2)
            self._cut(kind, [(a, b), (b, a)], f"partition {a} <-/-> {b}")
        elif kind == "asymmetric":
            a = rng.choice(ids)
            others = rng.sample([i for i in ids if i != a], rng.randint(1, len(ids) - 1))
            # a hears the others; they do not hear a.
            self._cut(
                kind, [(a, b) for b in others], f"asymmetric: {sorted(others)} cannot hear {a}"
            )
        elif kind == "isolate-leader":
            leader = world.leader()
            target = leader if leader is not None else rng.choice(ids)
            role = "leader " if leader is not None else ""
            self._isolate(kind, target, f"isolate {role}{target}")
        elif kind == "split":
            shuffled = ids[:]
            rng.shuffle(shuffled)
            minority = shuffled[: rng.randint(1, (len(ids) - 1) // 2)]
            majority = shuffled[len(minority) :]
            self._cut(
                kind,
                [(a, b) for a in minority for b in majority]
                + [(b, a) for a in minority for b in majority],
                f"split {sorted(minority)} | {sorted(majority)}",
            )
        elif kind == "bridge":
            shuffled = ids[:]
            rng.shuffle(shuffled)
            bridge, rest = shuffled[0], shuffled[1:]
            left, right = rest[: len(rest) // 2], rest[len(rest) // 2 :]
            self._cut(
                kind,
                [(a, b) for a in left for b in right] + [(b, a) for a in left for b in right],
                f"bridge: {sorted(left)} | {sorted(right)} meet only through {bridge}",
            )
        elif kind == "crash":
            self._crash(kind, [self._pick_node(prefer_leader=0.4)])
        elif kind == "power-loss":
            up = [i for i in ids if world.hosts[i].up]
            if not up:
                return False
            count = rng.randint(len(ids) // 2 + 1, len(ids))
            self._crash(kind, sorted(rng.sample(up, min(count, len(up)))))
        elif kind == "pause":
            target = self._pick_node(prefer_leader=0.4)
            host = world.hosts[target]
            host.pause()
            self._start(kind, f"pause {target}", host.resume, self._duration(), f"resume {target}")
        elif kind == "transfer":
            return self._ask_for_transfer()
        elif kind == "slow-disk":
            target = rng.choice(ids)
            host = world.hosts[target]
            low = rng.uniform(0.01, 0.2)
            high = low + rng.uniform(0.0, 0.8)

            def heal_disk() -> None:
                host.slow_disk = None

            host.slow_disk = (low, high)
            self._start(
                kind,
                f"slow disk on {target}: fsync {low:.2f}-{high:.2f} s",
                heal_disk,
                self._duration(),
                f"disk of {target} healthy again",
            )
        else:
            raise ValueError(f"unknown fault kind {kind!r}")
        self.counts[kind] += 1
        return True

    def _ask_for_transfer(self) -> bool:
        """Ask a node (the leader, mostly) to hand leadership to a random target: itself, "the
        most up-to-date node" (0), or one that may be down, paused or cut off."""
        world = self.world
        rng = self.rng
        up = [i for i, h in world.hosts.items() if h.process is not None and not h.paused]
        if not up:
            return False
        leader = world.leader()
        asker = leader if leader in up and rng.random() < 0.8 else rng.choice(up)
        target = rng.choice([0, *world.live_ids()])
        process = world.hosts[asker].process
        assert process is not None
        world.network.stats["transfers asked"] += 1
        world.trace.event(
            "fault", f"ask {asker} to hand leadership to {target or 'the most up-to-date node'}"
        )
        process.spawn(self._transfer(process, asker, target), "a leadership transfer")
        self.counts["transfer"] += 1
        return True

    async def _transfer(self, process: Process, asker: int, target: int) -> None:
        try:
            leader = await process.node.transfer_leadership(target or None)
        except (NotLeaderError, TransferFailedError, ValueError) as e:
            # ValueError: the target is not a voter (a learner, a removed or an unknown node).
            outcome = f"not done: {e}"
        else:
            outcome = f"{leader} leads"
            if leader != asker:
                self.world.network.stats["transfers done"] += 1
        self.world.trace.event("fault", f"transfer asked of {asker}: {outcome}")

    def _isolate(self, kind: str, target: int, what: str) -> None:
        others = [b for b in self.world.live_ids() if b != target]
        self._cut(kind, [(target, b) for b in others] + [(b, target) for b in others], what)

    def _cut(self, kind: str, links: list[Link], what: str) -> None:
        self._link_fault(kind, links, LinkEffect(cut=True), what)

    def crash(self, kind: str, node_id: int) -> None:
        """Crash one node now (for the operator's faults), restarted after a while as any other."""
        self._crash(kind, [node_id])

    def _crash(self, kind: str, targets: list[int], quick_restart: bool = False) -> None:
        world = self.world
        for target in targets:
            host = world.hosts[target]
            torn = self.rng.choice([0, 0, self.rng.randint(1, 64)])
            host.crash(torn_bytes=torn)
            # A supervisor often restarts a process at once; sometimes the machine takes a while.
            if quick_restart or self.rng.random() < 0.3:
                downtime = self.rng.uniform(0.002, 0.05)
            else:
                downtime = self.rng.uniform(0.1, 4.0)
            torn_text = f", tearing {torn} bytes of an unsynced write" if torn else ""
            self._start(
                kind,
                f"{kind}: crash {target}{torn_text}; down",
                self._restarter(target),
                downtime,
                f"restart {target}",
            )

    def _restarter(self, node_id: int) -> Callable[[], None]:
        world = self.world

        def restart() -> None:
            world.background(world.hosts[node_id].start())

        return restart


# ---- the operator: membership changes ----------------------------------------------------------

# Every kind of membership change, in the order a summary lists them: add a node (a new id on a
# new host with an empty disk, started with join=True, then added through the leader), remove a
# follower, remove the leader, replace a voter by a new node (its machine dies with its disk, or
# is wiped once the new one votes; its id is removed), and add a node that is crashed while it
# catches up (taking in entries or a snapshot).
MEMBERSHIP_KINDS = ("add", "remove-follower", "remove-leader", "replace", "crash-joining")
# How often each kind is drawn once every kind has had its turn (a leader's removal and a
# replacement cost the most availability, so they come more rarely).
_CHANGE_WEIGHTS = {
    "add": 1.0,
    "remove-follower": 1.0,
    "remove-leader": 0.3,
    "replace": 0.3,
    "crash-joining": 0.4,
}
# This share of runs changes its membership (a budget: each change costs availability, so a run
# with them takes longer to reach its operations).
MEMBERSHIP_SHARE = 0.6
# The cluster grows to at most this many members (or its starting size, if larger) and never
# shrinks below this many voters.
MAX_MEMBERS = 7
MIN_VOTERS = 3
# Mean seconds between the end of one change and the start of the next (until every kind has
# happened once, and after).
FIRST_CHANGES_GAP = 0.5
MEAN_CHANGE_GAP = 8.0
# The operator gives up on one admin call after this long (and on one change after
# CHANGE_DEADLINE), as a person would after a while; what is left is finished at the end.
ADMIN_TIMEOUT = 4.0
ADMIN_WAIT_TIMEOUT = 8.0
CHANGE_DEADLINE = 20.0
# This share of replacements is planned (the new node first, then the old one wiped); in the
# others the old machine dies first.
PLANNED_REPLACEMENT = 0.5
# This share of adds waits until the new node is a voter (the rest until it is a learner).
WAIT_UNTIL_VOTER = 0.3


class Admin:
    """The operator's tool: sends a membership call to whichever node leads, as a client would
    (through the network, following redirects), and asks again on NotLeader, on "another change
    is in progress" and when the outcome is unknown (both calls are idempotent)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.rng = world.member_rng
        self.leader: int | None = None

    def _target(self) -> int:
        live = [i for i, h in self.world.hosts.items() if h.up]
        if self.leader is not None and self.leader in live:
            return self.leader
        return self.rng.choice(live or self.world.live_ids())

    async def _send(self, target: int, op: ClientOp) -> ClientReply | None:
        world = self.world
        future: asyncio.Future[ClientReply] = world.loop.create_future()
        world.network.client_call(0, target, op, future)
        try:
            async with asyncio.timeout(ADMIN_WAIT_TIMEOUT if op.wait else ADMIN_TIMEOUT):
                return await future
        except TimeoutError:
            return None

    async def call(self, op: ClientOp, what: str, deadline: float) -> str:
        """Send `op` until it is done: the outcome is "done", "refused" (the reason is traced) or
        "gave up" (past `deadline`)."""
        world = self.world
        rng = self.rng
        while world.loop.time() < deadline:
            target = self._target()
            world.trace.event("admin", f"-> {target}: {what}")
            reply = await self._send(target, op)
            status = "timed out" if reply is None else reply.status
            detail = f" ({reply.result})" if reply is not None and reply.status == "refused" else ""
            world.trace.event("admin", f"<- {target}: {what}: {status}{detail}")
            if reply is not None and reply.status == "ok":
                self.leader = target
                return "done"
            if reply is not None and reply.status == "refused":
                return "refused"
            if reply is not None and reply.status == "not-leader" and reply.leader is not None:
                self.leader = reply.leader
                await asyncio.sleep(rng.uniform(0.01, 0.05))
            elif reply is not None and reply.status == "busy":
                self.leader = target
                await asyncio.sleep(rng.uniform(0.1, 0.5))
            else:
                self.leader = None
                await asyncio.sleep(rng.uniform(0.1, 0.3))
        world.trace.event("admin", f"gave up: {what}")
        return "gave up"


class MembershipChanges:
    """Changes the cluster's membership while the faults go on: one change at a time, each kind
    once before any repeats (in a random order), then kinds drawn at random, within the size
    bounds; crashes new nodes while they catch up; and at the end finishes what is left undone."""

    def __init__(self, world: World, injector: FaultInjector, overlapping: bool = False) -> None:
        self.world = world
        self.injector = injector
        self.rng = world.member_rng
        self.admin = Admin(world)
        self.counts: Counter[str] = Counter({kind: 0 for kind in MEMBERSHIP_KINDS})
        self.outcomes: Counter[str] = Counter()
        # With overlapping, changes do not wait for each other (a broken operator for a broken
        # node: see the two-changes-at-once variant).
        self.overlapping = overlapping
        self._stopped = False
        self._crash_when_catching_up: set[int] = set()
        # Most runs change their membership; the others stay the runs they were before there
        # were membership changes (a broken operator always changes it).
        self.active = overlapping or self.rng.random() < MEMBERSHIP_SHARE
        self._start = len(world.hosts)
        self._max_members = max(MAX_MEMBERS, self._start)
        self._changes: dict[asyncio.Task[object], None] = {}
        # The fewest and most voters the cluster had after a change (as its leader saw it).
        self.voters_range = (len(world.hosts), len(world.hosts))

    # ---- the schedule --------------------------------------------------------------------------

    async def run(self, on_change: Callable[[], None] | None = None) -> None:
        if not self.active:
            return
        world = self.world
        world.on_catching_up = self._catching_up
        rng = self.rng
        order = list(MEMBERSHIP_KINDS)
        rng.shuffle(order)
        kinds = list(_CHANGE_WEIGHTS)
        weights = [_CHANGE_WEIGHTS[k] for k in kinds]
        while not self._stopped:
            todo = [kind for kind in order if not self.counts[kind]]
            # Every kind early in the run (the fault phase lasts until each has happened), then
            # changes at a gentler pace.
            gap = FIRST_CHANGES_GAP if todo or self.overlapping else MEAN_CHANGE_GAP
            await asyncio.sleep(rng.expovariate(1 / gap))
            if self._stopped:
                break
            change: Coroutine[Any, Any, object] | None = None
            # Those that keep the cluster at least at its starting size first: a smaller one is
            # less available under the faults, and the run takes longer.
            todo.sort(key=lambda kind: kind not in self._towards_start())
            for kind in [*todo, *rng.choices(*self._drawn(kinds, weights), k=4)]:
                change = self._change(kind)
                if change is not None:
                    # A crash while catching up counts once it happens.
                    if kind != "crash-joining":
                        self.counts[kind] += 1
                    break
            if change is None:
                continue
            task = world.loop.create_task(change)
            self._changes[task] = None
            task.add_done_callback(self._finished)
            if on_change is not None:
                on_change()
            if not self.overlapping:
                await asyncio.wait([task])

    def _towards_start(self) -> set[str]:
        """The kinds that bring the number of voters back towards the starting size (growing
        from it, in the first round)."""
        voters = len(self._staying_voters())
        if voters <= self._start:
            return {"add", "crash-joining", "replace"}
        return {"remove-follower", "remove-leader", "replace"}

    def _drawn(self, kinds: list[str], weights: list[float]) -> tuple[list[str], list[float]]:
        """The kinds to draw from after the first round: those that bring the number of voters
        back towards the starting size (a smaller cluster is less available under the faults,
        a larger one costs more to simulate), or all of them at that size."""
        if len(self._staying_voters()) == self._start:
            return kinds, weights
        keep = self._towards_start()
        pairs = [(k, w) for k, w in zip(kinds, weights, strict=True) if k in keep]
        return [k for k, _ in pairs], [w for _, w in pairs]

    def _finished(self, task: asyncio.Task[object]) -> None:
        self._changes.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            self.world.fail("no unexpected errors", f"a membership change failed: {error!r}")

    def stop(self) -> None:
        """Start no more changes, and abandon the ones under way (reconcile finishes them)."""
        self._stopped = True
        self.world.on_catching_up = None
        for task in list(self._changes):
            task.cancel()

    # ---- what the operator sees ------------------------------------------------------------------

    def _pending_joins(self) -> list[int]:
        """Hosts started to join that the configuration does not list yet."""
        members = self.world.config().members
        return [
            i
            for i, h in self.world.hosts.items()
            if h.joiner and h.intent == "member" and not h.departed and i not in members
        ]

    def _room_to_add(self) -> bool:
        members = self.world.config().members
        return len(members) + len(self._pending_joins()) < self._max_members

    def _staying_voters(self) -> list[int]:
        """The voters that are neither dead nor about to be removed."""
        hosts = self.world.hosts
        return [
            i
            for i in self.world.config().voters
            if hosts[i].intent == "member" and not hosts[i].departed
        ]

    def _removable(self, exclude_leader: bool) -> list[int]:
        staying = self._staying_voters()
        if len(staying) <= MIN_VOTERS:
            return []
        leader = self.world.leader()
        return [i for i in staying if not (exclude_leader and i == leader)]

    def _change(self, kind: str) -> Coroutine[Any, Any, object] | None:
        """The change of `kind` to make now, or None if it cannot be made now."""
        world = self.world
        rng = self.rng
        if kind in ("add", "crash-joining"):
            return self._add(crash=kind == "crash-joining") if self._room_to_add() else None
        if kind == "remove-follower":
            followers = self._removable(exclude_leader=True)
            if not followers:
                return None
            return self._remove(rng.choice(sorted(followers)), "remove follower")
        if kind == "remove-leader":
            leader = world.leader()
            if leader is None or leader not in self._removable(exclude_leader=False):
                return None
            return self._remove(leader, "remove leader")
        if kind == "replace":
            hosts = world.hosts
            staying = self._staying_voters()
            candidates = [i for i in staying if hosts[i].up and not hosts[i].paused]
            shrink_first = len(staying) > MIN_VOTERS
            room = self._room_to_add()
            if not candidates or down_voters(world) >= max_down(world):
                return None
            if not shrink_first and not room:
                return None
            return self._replace(rng.choice(sorted(candidates)), shrink_first, room)
        raise ValueError(f"unknown membership change {kind!r}")

    # ---- the changes -------------------------------------------------------------------------------

    async def _add(
        self,
        crash: bool = False,
        host: Host | None = None,
        deadline: float | None = None,
        until_voter: bool = False,
    ) -> Host:
        """Start a node with join=True on a host with an empty disk (or take one that is still
        waiting to be added), and ask the leader to add it."""
        world = self.world
        if host is None:
            pending = self._pending_joins()
            if pending:
                host = world.hosts[pending[0]]
            else:
                host = world.add_host()
                world.trace.event(
                    "admin", f"new node {host.node_id} (empty disk) starts and asks to join"
                )
                # Not part of this change's task: abandoning the change leaves the node running.
                world.background(host.start())
        node_id = host.node_id
        if crash:
            self._crash_when_catching_up.add(node_id)
        wait = until_voter or self.rng.random() < WAIT_UNTIL_VOTER
        what = f"add {node_id}" + (" (until it votes)" if wait else "")
        op = ClientOp("add-member", member=node_id, wait=wait)
        await self._call(op, what, deadline)
        return host

    async def _remove(self, node_id: int, what: str, deadline: float | None = None) -> bool:
        """Ask the leader to remove `node_id`; whether it did (the change committed)."""
        self.world.hosts[node_id].intent = "removed"
        op = ClientOp("remove-member", member=node_id)
        return await self._call(op, f"{what} {node_id}", deadline)

    async def _replace(self, old: int, shrink_first: bool, room: bool) -> None:
        """Replace a voter by a new node with an empty disk, removing the old id for good: either
        its machine dies and the operator then removes it and adds a new one (with only three
        voters, adds the new one first, until it votes), or (planned) the new node is added
        first and the old machine is wiped once the new one votes."""
        world = self.world
        host = world.hosts[old]
        planned = room and self.rng.random() < PLANNED_REPLACEMENT
        if not planned:
            world.trace.event("admin", f"node {old} dies with its disk: replacing it")
            host.retire()
            host.intent = "removed"
            if shrink_first:
                # The new node only once the dead one is out (else there may be no room for it).
                if await self._remove(old, "remove dead") and self._room_to_add():
                    await self._add()
                return
        deadline = world.loop.time() + CHANGE_DEADLINE
        new = await self._add(until_voter=True, deadline=deadline)
        while not world.config().is_voter(new.node_id):
            if world.loop.time() > deadline:
                world.trace.event("admin", f"gave up: {new.node_id} is not a voter yet")
                return
            await asyncio.sleep(0.1)
        if planned:
            world.trace.event("admin", f"{new.node_id} votes: wiping node {old}")
            host.retire()
            host.intent = "removed"
        await self._remove(old, "remove wiped" if planned else "remove dead")

    async def _call(self, op: ClientOp, what: str, deadline: float | None) -> bool:
        if deadline is None:
            deadline = self.world.loop.time() + CHANGE_DEADLINE
        # Before and after: a learner may be promoted between two calls (on its own, once it
        # caught up), and the voter it added must count before the next call removes one.
        self._note_voters()
        outcome = await self.admin.call(op, what, deadline)
        self.outcomes[outcome] += 1
        self._note_voters()
        return outcome == "done"

    def _note_voters(self) -> None:
        if self.world.leader() is not None:
            voters = len(self.world.config().voters)
            low, high = self.voters_range
            self.voters_range = (min(low, voters), max(high, voters))

    def summary(self) -> dict[str, int]:
        """Changes by kind, admin calls by outcome, voters at least and at most, and removed
        nodes that never learned of their removal (their leader changed first, or they were
        down): they stay out, refused by the members."""
        hosts = self.world.hosts.values()
        unaware = sum(1 for h in hosts if h.intent == "removed" and not h.departed)
        return (
            dict(self.counts)
            | {"changing": int(self.active)}
            | {f"calls {outcome}": n for outcome, n in self.outcomes.items()}
            | {
                "fewest voters": self.voters_range[0],
                "most voters": self.voters_range[1],
                "removed nodes unaware": unaware,
            }
        )

    def _catching_up(self, node_id: int, mid_snapshot: bool) -> None:
        """A new node not yet promoted is taking in entries or a snapshot chunk: crash it while
        it writes them, if it was picked for that (it restarts later, as after any crash)."""
        if self._stopped or node_id not in self._crash_when_catching_up:
            return
        host = self.world.hosts[node_id]
        if not host.up or host.paused:
            return
        self._crash_when_catching_up.discard(node_id)
        self.counts["crash-joining"] += 1
        if mid_snapshot:
            self.world.network.stats["new nodes crashed mid-snapshot"] += 1
        self.world.loop.call_soon(self._crash_joining, host)

    def _crash_joining(self, host: Host) -> None:
        if host.up and not self._stopped:
            self.injector.crash("crash-joining", host.node_id)

    # ---- the end -------------------------------------------------------------------------------

    async def reconcile(self, deadline: float) -> bool:
        """Finish what the operator set out to do: every live host meant to be a member is one
        (added first, and waited for until it votes, so that no removal leaves too few voters),
        every id meant to be out (or whose host died) is removed. False if not done by
        `deadline`."""
        world = self.world
        while world.loop.time() < deadline:
            config = world.config()
            hosts = world.hosts
            missing = [
                i
                for i, h in hosts.items()
                if h.intent == "member" and not h.departed and i not in config.members
            ]
            extra = [i for i in config.members if hosts[i].intent == "removed" or hosts[i].departed]
            # Added nodes still catching up: wait until they vote before removing any voter.
            catching_up = [i for i in config.learners if i not in extra]
            # Dead nodes first; and never fewer than MIN_VOTERS voters: the operator keeps a live
            # node it meant to remove, or adds a new one before removing a dead one.
            extra.sort(key=lambda i: not hosts[i].departed)
            voters_after = len(config.voters) - (extra[0] in config.voters if extra else 0)
            if missing:
                await self._add(host=hosts[missing[0]], deadline=deadline)
            elif extra and not catching_up and voters_after < MIN_VOTERS:
                keep = [i for i in extra if not hosts[i].departed]
                if keep:
                    world.trace.event("admin", f"keeping {keep[0]}: too few voters without it")
                    hosts[keep[0]].intent = "member"
                else:
                    await self._add(deadline=deadline)
            elif extra and not catching_up:
                await self._remove(extra[0], "remove", deadline)
            elif not extra and self._config_committed():
                return True
            await asyncio.sleep(0.05)
        return False

    def _config_committed(self) -> bool:
        """Whether a leader holds the configuration it uses as committed: one seen only in a
        leader's log may still be replaced by the next leader's (a removal it appended, lost)."""
        leader = self.world.leader()
        node = self.world.hosts[leader].node if leader is not None else None
        return node is not None and node.configs.latest_index <= node.commit_index
