"""The fault injector: network, disk and process faults of every kind, at random times, each undone
after a random while; and, when the fault phase ends, everything healed at once."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from raft_node import NotLeaderError, TransferFailedError
from test.sim_network import Link, LinkEffect
from test.sim_world import Process, World

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
        size = len(world.hosts)
        # At most this many nodes down (crashed or paused) at once, outside a power loss.
        self._max_down = (size - 1) // 2

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
        return sum(1 for h in self.world.hosts.values() if not h.up or h.paused or h.starting)

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
        ids = list(self.world.hosts)
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
        ids = list(world.hosts)
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
        target = rng.choice([0, *world.hosts])
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
        except (NotLeaderError, TransferFailedError) as e:
            outcome = f"not done: {e}"
        else:
            outcome = f"{leader} leads"
            if leader != asker:
                self.world.network.stats["transfers done"] += 1
        self.world.trace.event("fault", f"transfer asked of {asker}: {outcome}")

    def _isolate(self, kind: str, target: int, what: str) -> None:
        others = [b for b in self.world.hosts if b != target]
        self._cut(kind, [(target, b) for b in others] + [(b, target) for b in others], what)

    def _cut(self, kind: str, links: list[Link], what: str) -> None:
        self._link_fault(kind, links, LinkEffect(cut=True), what)

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
