"""Real faults for a cluster of node processes: each node on its own host (a network namespace) or
behind per-link TCP proxies, and a seeded nemesis that kills, pauses and partitions them over time.

As root with `ip netns` working, every node runs in its own network namespace with its own address,
joined by veth pairs to a bridge; a cut link is a blackhole route in the sender's namespace, so its
packets vanish as on a failed network. Elsewhere every directed pair of nodes talks through its own
TCP proxy on loopback, which stops forwarding in the cut direction. Everything made here is removed
on every exit path, and a new run first removes what a crashed earlier run left behind.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import ipaddress
import itertools
import os
import random
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cluster_config import ClusterConfig, NodeAddress
from test.cluster_process import HOST, HostCluster, find_free_port_block

# Names of everything a run creates start with this, then the creating process's pid (6 hex
# digits) and a per-process sequence digit, so two runs never collide and a later run can tell
# whether the process that made a name is gone.
NAME_PREFIX = "rf"
_NAME = re.compile(rf"^{NAME_PREFIX}([0-9a-f]{{6}})[0-9a-f](?:n|h|p|br)\d*$")
RAFT_PORT = 7000
CLIENT_PORT = 7001
SUBNET_PREFIX = "10.213"

FAULT_KINDS: tuple[str, ...] = (
    "kill",
    "kill-leader",
    "pause",
    "partition",
    "isolate-leader",
    "bridge",
    "one-way",
)


class NetworkError(RuntimeError):
    """The network for the nodes could not be set up; the message says which command failed."""


class Network(Protocol):
    """Where nodes live and how links between them are cut: `cut(a, b)` drops what a sends to b."""

    kind: str
    config: ClusterConfig

    def cluster_files(self, directory: Path) -> dict[int, Path]: ...

    def prefixes(self) -> dict[int, list[str]]: ...

    def cut(self, src: int, dst: int) -> None: ...

    def heal(self) -> None: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


def _toml(nodes: Iterable[NodeAddress]) -> str:
    return "".join(
        f'[[node]]\nid = {n.id}\nraft = "{n.raft_address}"\nclient = "{n.client_address}"\n\n'
        for n in nodes
    )


# -- network namespaces -----------------------------------------------------------------------------

_sequence = itertools.count()
_live_networks: set[Network] = set()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetworkError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def namespaces_available() -> bool:
    """True when this process may create network namespaces (root, with a working `ip netns`)."""
    if os.geteuid() != 0:
        return False
    try:
        return _ip("netns", "list", check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Remove namespaces and interfaces left by runs whose process is gone, ending the node
    processes still inside those namespaces; the names removed."""
    removed: list[str] = []

    def stale(name: str) -> bool:
        match = _NAME.match(name)
        return match is not None and not _process_alive(int(match.group(1), 16))

    links = _ip("-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        parts = line.split(":", 2)
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@", 1)[0]
        if stale(name) and _ip("link", "del", name, check=False).returncode == 0:
            removed.append(name)
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split(" ", 1)[0]
        if not stale(name):
            continue
        # Nodes of a run that was itself killed outlive it inside their namespaces.
        for pid in _ip("netns", "pids", name, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        if _ip("netns", "del", name, check=False).returncode == 0:
            removed.append(name)
    return removed


def _pick_subnet(salt: int) -> int:
    """A third octet x such that 10.213.x.0/24 overlaps no address or route on this host."""
    used = _ip("-4", "route", "show", "table", "all", check=False).stdout
    used += _ip("-4", "-o", "addr", "show", check=False).stdout
    taken = [
        ipaddress.ip_network(m, strict=False)
        for m in re.findall(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", used)
    ]
    for step in range(224):
        x = 16 + (salt + step) % 224
        candidate = ipaddress.ip_network(f"{SUBNET_PREFIX}.{x}.0/24")
        if not any(candidate.overlaps(net) for net in taken if net.prefixlen > 0):
            return x
    raise NetworkError(f"no free /24 left in {SUBNET_PREFIX}.0.0/16 on this host")


class NamespaceNetwork:
    """Each node in its own network namespace, with its own address, on a bridge in the root
    namespace (where the clients run). Cutting a->b adds a blackhole route for b inside a."""

    kind = "namespaces"

    def __init__(self, node_ids: Sequence[int]) -> None:
        sweep_stale()
        self.tag = f"{NAME_PREFIX}{os.getpid() & 0xFFFFFF:06x}{next(_sequence) % 16:x}"
        self.node_ids = sorted(node_ids)
        self._index = {n: i for i, n in enumerate(self.node_ids)}
        self._cuts: set[tuple[int, int]] = set()
        self._made_links: list[str] = []
        self._made_namespaces: list[str] = []
        self._closed = False
        _live_networks.add(self)
        try:
            self.subnet = _pick_subnet(os.getpid() * 16 + next(_sequence))
            self.bridge = f"{self.tag}br"
            self.gateway = f"{SUBNET_PREFIX}.{self.subnet}.1"
            self.hosts = {
                n: f"{SUBNET_PREFIX}.{self.subnet}.{10 + i}" for n, i in self._index.items()
            }
            self._build()
        except BaseException:
            self.close()
            raise
        self.config = ClusterConfig(
            {
                n: NodeAddress(n, f"{h}:{RAFT_PORT}", f"{h}:{CLIENT_PORT}")
                for n, h in self.hosts.items()
            }
        )

    def namespace(self, node_id: int) -> str:
        return f"{self.tag}n{self._index[node_id]}"

    def _build(self) -> None:
        # Bridged frames must not pass through the host's iptables (where a firewall such as
        # Docker's may drop forwarded traffic); older iproute2 lacks the option, so plain then.
        quiet = ("nf_call_iptables", "0", "nf_call_ip6tables", "0", "nf_call_arptables", "0")
        made = _ip("link", "add", self.bridge, "type", "bridge", *quiet, check=False)
        if made.returncode != 0:
            _ip("link", "add", self.bridge, "type", "bridge")
        self._made_links.append(self.bridge)
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for node_id, i in self._index.items():
            ns, outer, inner = self.namespace(node_id), f"{self.tag}h{i}", f"{self.tag}p{i}"
            _ip("netns", "add", ns)
            self._made_namespaces.append(ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            self._made_links.append(outer)
            _ip("link", "set", outer, "master", self.bridge, "up")
            _ip("link", "set", inner, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{self.hosts[node_id]}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def cluster_files(self, directory: Path) -> dict[int, Path]:
        path = directory / "cluster.toml"
        path.write_text(_toml(self.config.nodes.values()), encoding="utf-8")
        return {n: path for n in self.node_ids}

    def prefixes(self) -> dict[int, list[str]]:
        return {n: ["ip", "netns", "exec", self.namespace(n)] for n in self.node_ids}

    def cut(self, src: int, dst: int) -> None:
        if (src, dst) in self._cuts:
            return
        _ip("-n", self.namespace(src), "route", "add", "blackhole", f"{self.hosts[dst]}/32")
        self._cuts.add((src, dst))

    def heal(self) -> None:
        for src, dst in sorted(self._cuts):
            ns = self.namespace(src)
            _ip("-n", ns, "route", "del", "blackhole", f"{self.hosts[dst]}/32", check=False)
        self._cuts.clear()

    def describe(self) -> str:
        return (
            f"each node in its own network namespace ({self.tag}n*) on "
            f"{SUBNET_PREFIX}.{self.subnet}.0/24, bridge {self.bridge}"
        )

    def close(self) -> None:
        """Delete every interface and namespace this network made; idempotent."""
        if self._closed:
            return
        self._closed = True
        _live_networks.discard(self)
        # Deleting the root-side ends first, rather than leaving it to namespace teardown, which
        # the kernel finishes later, means nothing of this run is visible once close returns.
        for name in reversed(self._made_links):
            _ip("link", "del", name, check=False)
        for name in reversed(self._made_namespaces):
            _ip("netns", "del", name, check=False)


# -- per-link TCP proxies ---------------------------------------------------------------------------


class _Gate:
    """Whether bytes may flow from one node to another, waitable from the proxy loop."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()


class ProxyNetwork:
    """Nodes on loopback; node a reaches node b's Raft service only through a proxy of its own for
    the link a->b. Cutting a->b stops the bytes a sends to b (in a's requests to b and in a's replies
    to b's requests) from being forwarded; they are held back as TCP would hold them, until healed.
    """

    kind = "proxies"

    def __init__(self, node_ids: Sequence[int]) -> None:
        self.node_ids = sorted(node_ids)
        count = len(self.node_ids)
        first = find_free_port_block(2 * count + count * (count - 1))
        ports = iter(range(first, first + 2 * count + count * (count - 1)))
        self.config = ClusterConfig(
            {n: NodeAddress(n, f"{HOST}:{next(ports)}", f"{HOST}:{next(ports)}") for n in node_ids}
        )
        self._proxy_port = {
            (a, b): next(ports) for a in self.node_ids for b in self.node_ids if a != b
        }
        self._cuts: set[tuple[int, int]] = set()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._gates: dict[tuple[int, int], _Gate] = {}
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        _live_networks.add(self)
        try:
            self._call(self._start())
        except BaseException:
            self.close()
            raise

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _start(self) -> None:
        for a in self.node_ids:
            for b in self.node_ids:
                if a != b:
                    self._gates[(a, b)] = _Gate()
        for (a, b), port in self._proxy_port.items():
            server = await asyncio.start_server(functools.partial(self._link, a, b), HOST, port)
            self._servers.append(server)

    async def _link(
        self, a: int, b: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One connection a opened to b: a's bytes go out through gate a->b, b's back through b->a."""
        host, port = self.config.node(b).raft_address.rsplit(":", 1)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            self._writers.discard(writer)
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            self._pump(reader, up_writer, self._gates[(a, b)]),
            self._pump(up_reader, writer, self._gates[(b, a)]),
            return_exceptions=True,
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gate: _Gate
    ) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                # Held while cut; not reading further makes the sender's window fill, as on a
                # network that has stopped delivering.
                await gate.open.wait()
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.write_eof()

    def cluster_files(self, directory: Path) -> dict[int, Path]:
        files = {}
        for a in self.node_ids:
            seen = [
                (
                    n
                    if n.id == a
                    else NodeAddress(
                        n.id, f"{HOST}:{self._proxy_port[(a, n.id)]}", n.client_address
                    )
                )
                for n in self.config.nodes.values()
            ]
            path = directory / f"cluster-{a}.toml"
            path.write_text(_toml(seen), encoding="utf-8")
            files[a] = path
        return files

    def prefixes(self) -> dict[int, list[str]]:
        return {}

    def _set(self, link: tuple[int, int], is_open: bool) -> None:
        gate = self._gates[link].open
        self._loop.call_soon_threadsafe(gate.set if is_open else gate.clear)

    def cut(self, src: int, dst: int) -> None:
        self._cuts.add((src, dst))
        self._set((src, dst), False)

    def heal(self) -> None:
        for link in self._cuts:
            self._set(link, True)
        self._cuts.clear()

    def describe(self) -> str:
        first = min(self._proxy_port.values())
        return f"nodes on {HOST} behind one TCP proxy per directed link (ports from {first})"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _live_networks.discard(self)

        async def shut() -> None:
            for server in self._servers:
                server.close()
            for writer in list(self._writers):
                writer.close()
            for gate in self._gates.values():
                gate.open.set()

        with contextlib.suppress(Exception):
            self._call(shut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


def make_network(node_ids: Sequence[int], mode: str = "auto") -> Network:
    """Namespaces where possible ("auto"), or the mode asked for: "namespaces" or "proxies"."""
    if mode == "proxies" or (mode == "auto" and not namespaces_available()):
        return ProxyNetwork(node_ids)
    if mode not in ("auto", "namespaces"):
        raise ValueError(f"unknown network mode {mode!r}: choose auto, namespaces or proxies")
    return NamespaceNetwork(node_ids)


def _close_all_networks() -> None:
    for network in list(_live_networks):
        network.close()


atexit.register(_close_all_networks)


# -- the nemesis ------------------------------------------------------------------------------------


@dataclass
class Fault:
    """One injected fault: what, to whom, and when (seconds since the run started)."""

    kind: str
    description: str
    started: float
    ended: float | None = None
    nodes: tuple[int, ...] = ()

    def line(self) -> str:
        end = "…" if self.ended is None else f"{self.ended:6.1f}"
        return f"[{self.started:6.1f} - {end} s] {self.kind}: {self.description}"


@dataclass
class NemesisTiming:
    """How long faults last and how long the cluster is left alone between them (seconds)."""

    # A pause must outlast the longest election timeout (1.6 s by default) to depose a leader.
    pause: tuple[float, float] = (2.5, 4.5)
    down: tuple[float, float] = (1.0, 4.0)
    partition: tuple[float, float] = (3.0, 7.0)
    quiet: tuple[float, float] = (1.0, 3.0)


@dataclass
class Nemesis:
    """Injects faults one after another, drawn from `kinds` by a seeded random.Random, until told
    to stop; every kind appears once before any appears again, and some network faults have a
    node crash or pause inside them. `stale_target` is the client address of a leader that is
    isolated right now (for reads aimed at it)."""

    cluster: HostCluster
    network: Network
    rng: random.Random
    clock: Callable[[], float]
    say: Callable[[str], None] = print
    kinds: Sequence[str] = FAULT_KINDS
    timing: NemesisTiming = field(default_factory=NemesisTiming)
    faults: list[Fault] = field(default_factory=list)
    stale_target: str | None = None
    # How often a network fault also has a node killed or paused for part of it.
    overlap: float = 0.3
    _killed: set[int] = field(default_factory=set)
    _paused: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in FAULT_KINDS]
        if unknown or not self.kinds:
            raise ValueError(
                f"unknown fault kind {unknown[0]!r}; choose from {', '.join(FAULT_KINDS)}"
                if unknown
                else "no fault kinds given"
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Inject faults until `stop` is set; the fault under way is healed before returning."""
        deck: list[str] = []
        try:
            while not stop.is_set():
                if not deck:
                    deck = list(self.kinds)
                    self.rng.shuffle(deck)
                kind = deck.pop()
                await self._inject(kind, stop)
                await self._sleep(self.rng.uniform(*self.timing.quiet), stop)
        finally:
            self.heal_all()

    async def _sleep(self, seconds: float, stop: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    async def _leader(self) -> int | None:
        try:
            return await self.cluster.wait_for_leader(3.0)
        except TimeoutError:
            return None

    def _begin(self, kind: str, description: str, nodes: Iterable[int]) -> Fault:
        fault = Fault(kind, description, self.clock(), nodes=tuple(nodes))
        self.faults.append(fault)
        self.say(f"nemesis: {kind}: {description}")
        return fault

    def _end(self, fault: Fault, note: str) -> None:
        fault.ended = self.clock()
        self.say(f"nemesis: healed {fault.kind}: {note}")

    async def _inject(self, kind: str, stop: asyncio.Event) -> None:
        ids = list(self.cluster.node_ids)
        leader = await self._leader() if kind in ("kill-leader", "isolate-leader") else None
        if kind in ("kill", "kill-leader"):
            if kind == "kill-leader" and leader is not None:
                victims = [leader]
            else:
                victims = self.rng.sample(ids, self.rng.choice((1, 1, 2)))
            who = ", ".join(str(v) for v in victims)
            label = "the leader " if kind == "kill-leader" and leader is not None else ""
            fault = self._begin(kind, f"SIGKILL {label}node {who}", victims)
            for victim in victims:
                if self.cluster.is_running(victim):
                    self.cluster.kill_node(victim)
                    self._killed.add(victim)
            down = self.rng.uniform(*self.timing.down)
            await self._sleep(down, stop)
            self._restart_killed()
            self._end(fault, f"restarted node {who} after {down:.1f} s, same data dir")
        elif kind == "pause":
            victim = self.rng.choice(ids)
            seconds = self.rng.uniform(*self.timing.pause)
            fault = self._begin(kind, f"SIGSTOP node {victim} for {seconds:.1f} s", [victim])
            if self.cluster.is_running(victim):
                self.cluster.pause_node(victim)
                self._paused.add(victim)
            await self._sleep(seconds, stop)
            self._resume_paused()
            self._end(fault, f"SIGCONT node {victim}")
        else:
            groups, description = self._partition(kind, ids, leader)
            seconds = self.rng.uniform(*self.timing.partition)
            fault = self._begin(kind, f"{description} for {seconds:.1f} s", ids)
            for src, dst in groups:
                self.network.cut(src, dst)
            if kind == "isolate-leader" and leader is not None:
                self.stale_target = self.cluster.client_address(leader)
            if self.rng.random() < self.overlap:
                await self._crash_within(seconds, ids, kind, stop)
            else:
                await self._sleep(seconds, stop)
            self.stale_target = None
            self.network.heal()
            self._end(fault, "every link restored")

    async def _crash_within(
        self, seconds: float, ids: list[int], during: str, stop: asyncio.Event
    ) -> None:
        """Spend `seconds` of a network fault with one node killed or paused for part of it."""
        victim = self.rng.choice(ids)
        before = self.rng.uniform(0.2, 0.4) * seconds
        hold = self.rng.uniform(0.3, 0.5) * seconds
        kill = self.rng.random() < 0.5
        await self._sleep(before, stop)
        if not stop.is_set() and self.cluster.is_running(victim):
            if kill:
                fault = self._begin("kill", f"SIGKILL node {victim} during the {during}", [victim])
                self.cluster.kill_node(victim)
                self._killed.add(victim)
            else:
                fault = self._begin("pause", f"SIGSTOP node {victim} during the {during}", [victim])
                self.cluster.pause_node(victim)
                self._paused.add(victim)
            await self._sleep(hold, stop)
            self._restart_killed()
            self._resume_paused()
            self._end(fault, f"{'restarted' if kill else 'resumed'} node {victim}")
        await self._sleep(max(0.0, seconds - before - hold), stop)

    def _partition(
        self, kind: str, ids: list[int], leader: int | None
    ) -> tuple[list[tuple[int, int]], str]:
        """The directed links to cut for a partition kind, and how to say it."""

        def apart(side_a: Sequence[int], side_b: Sequence[int]) -> list[tuple[int, int]]:
            return [(a, b) for a in side_a for b in side_b] + [
                (b, a) for a in side_a for b in side_b
            ]

        def names(nodes: Iterable[int]) -> str:
            return "{" + ", ".join(str(n) for n in sorted(nodes)) + "}"

        shuffled = list(ids)
        self.rng.shuffle(shuffled)
        if kind == "isolate-leader":
            alone = leader if leader is not None else shuffled[0]
            rest = [n for n in ids if n != alone]
            what = "leader" if leader is not None else "node (no leader known)"
            return apart([alone], rest), f"isolate the {what} {alone} from {names(rest)}"
        if kind == "bridge":
            middle, rest = shuffled[0], shuffled[1:]
            half = len(rest) // 2
            left, right = rest[:half], rest[half:]
            return apart(left, right), (
                f"{names(left)} and {names(right)} cannot reach each other; "
                f"{middle} reaches both"
            )
        if kind == "one-way":
            mute = shuffled[0]
            rest = [n for n in ids if n != mute]
            return [(mute, n) for n in rest], (
                f"node {mute} hears {names(rest)} but they do not hear it"
            )
        minority = shuffled[: (len(ids) - 1) // 2]
        majority = [n for n in ids if n not in minority]
        return apart(minority, majority), f"{names(majority)} | {names(minority)}"

    def _restart_killed(self) -> None:
        for node_id in sorted(self._killed):
            if not self.cluster.is_running(node_id):
                self.cluster.start_node(node_id)
        self._killed.clear()

    def _resume_paused(self) -> None:
        for node_id in sorted(self._paused):
            if self.cluster.is_running(node_id):
                self.cluster.resume_node(node_id)
        self._paused.clear()

    def heal_all(self) -> None:
        """Undo everything: links restored, paused nodes resumed, killed nodes restarted."""
        self.stale_target = None
        self.network.heal()
        self._resume_paused()
        self._restart_killed()
        for fault in self.faults:
            if fault.ended is None:
                fault.ended = self.clock()
