"""Real faults for a cluster of node processes: each node on its own host (a network namespace) or
behind per-link TCP proxies, and a seeded nemesis that kills, pauses and partitions them over time,
and (on request) changes the cluster's membership under them: grow, shrink, replace a node whose disk
was lost, and bring back a follower that needs a snapshot. `MembershipChanges` makes those changes
for the nemesis, the harness and the tests alike.

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

import cluster_client
from cluster_config import ClusterConfig, NodeAddress
from test.cluster_process import (
    HOST,
    HostCluster,
    LocalCluster,
    find_free_port_block,
    process_alive,
)

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
# Not among the default faults: `SuiteOptions(membership=True)` (`faults --membership`) adds them.
MEMBERSHIP_KINDS: tuple[str, ...] = ("shrink", "grow", "replace", "snapshot-catch-up")


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

    def add_node(self, node_id: int) -> tuple[NodeAddress, list[str]]: ...

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


def sweep_stale() -> list[str]:
    """Remove namespaces and interfaces left by runs whose process is gone, ending the node
    processes still inside those namespaces; the names removed."""
    removed: list[str] = []

    def stale(name: str) -> bool:
        match = _NAME.match(name)
        return match is not None and not process_alive(int(match.group(1), 16))

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
        for node_id in self.node_ids:
            self._add_host(node_id)

    def _add_host(self, node_id: int) -> None:
        i = self._index[node_id]
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

    def add_node(self, node_id: int) -> tuple[NodeAddress, list[str]]:
        """A new host (namespace, address on the bridge) for a node joining later: its
        addresses and the prefix that runs its command there."""
        if node_id in self._index:
            raise ValueError(f"node {node_id} already has a host")
        i = len(self._index)
        if 10 + i > 254:
            raise NetworkError(f"no address left on {SUBNET_PREFIX}.{self.subnet}.0/24")
        self._index[node_id] = i
        self.hosts[node_id] = f"{SUBNET_PREFIX}.{self.subnet}.{10 + i}"
        self.node_ids.append(node_id)
        self._add_host(node_id)
        host = self.hosts[node_id]
        address = NodeAddress(node_id, f"{host}:{RAFT_PORT}", f"{host}:{CLIENT_PORT}")
        return address, ["ip", "netns", "exec", self.namespace(node_id)]

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

    def add_node(self, node_id: int) -> tuple[NodeAddress, list[str]]:
        # Each node here sees its peers at proxy addresses of its own, but a configuration entry
        # in the log gives every member one address that all nodes use.
        raise NetworkError(
            "membership changes need every node on its own host: run as root with `ip netns`"
        )

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


# -- membership changes ----------------------------------------------------------------------------

# A joining node may have to receive a snapshot first, on a machine shared with other work.
PROMOTION_TIMEOUT = 60.0
# A removed node exits once it learns its removal committed: within heartbeats, normally.
EXIT_TIMEOUT = 20.0
SNAPSHOT_TIMEOUT = 30.0
INSTALL_NARRATION = "installed snapshot up to index"
REMOVED_NARRATION = "removed from the cluster"


class MembershipChangeError(RuntimeError):
    """A membership change did not complete as a user relies on; the message says how, in a line."""


@dataclass
class Change:
    """One membership change as it happened: what, which nodes, when (the caller's clock), and
    what was seen on the way."""

    kind: str
    description: str
    started: float
    ended: float | None = None
    nodes: tuple[int, ...] = ()
    # For a removal: how the removed node's process ended (None: it did not exit by itself).
    exit_code: int | None = None
    # For a snapshot catch-up: whether the others' logs were compacted past the node's last
    # entry in time, and whether the node narrated installing a snapshot.
    compacted_past: bool = False
    snapshot_installed: bool = False
    # Writes the change made itself (fresh keys), all acknowledged: they must stay readable.
    written: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def took(self) -> float:
        return (self.ended if self.ended is not None else self.started) - self.started


class MembershipChanges:
    """Membership changes made the way an operator makes them, on a running cluster: the admin
    calls through `client` (`member add`/`member remove`) and nodes started with `--join`. Each
    method waits until the change is done and returns a `Change`; `MembershipChangeError` when it
    cannot be. `cluster.node_ids` follows the members throughout.
    """

    def __init__(
        self,
        cluster: LocalCluster,
        client: cluster_client.Client,
        clock: Callable[[], float],
        say: Callable[[str], None] = print,
    ) -> None:
        self.cluster = cluster
        self.client = client
        self.clock = clock
        self.say = say

    async def members(self) -> cluster_client.MemberList:
        """The configuration as the leader holds it."""
        return await self.client.members()

    async def voters(self) -> list[int]:
        return sorted(m.id for m in (await self.members()).voters)

    async def add(self, announce: bool = True) -> Change:
        """Grow by one: a fresh node (new id, free addresses, empty data directory) is added as a
        learner with `member add` (`announce`; otherwise it asks to be added itself through
        `--join`), started with `--join`, and waited for until the leader has promoted it."""
        address = self.cluster.place_node()
        how = "member add, then --join" if announce else "--join alone"
        change = self._begin("add", f"add node {address.id} ({how})", (address.id,))
        await self._add(address, announce)
        return self._end(change)

    async def remove(self, node_id: int) -> Change:
        """Shrink by one with `member remove`; then the node must say it was removed and exit
        with code 0 (one that does not within EXIT_TIMEOUT is killed; `exit_code` is then None).
        Removing the leader: it steps down once the removal commits, and another node leads."""
        leader = await self._leader()
        role = "the leader" if node_id == leader else "a follower"
        change = self._begin("remove", f"remove node {node_id} ({role})", (node_id,))
        await self._remove(node_id)
        change.exit_code = await self.cluster.wait_exit(node_id, EXIT_TIMEOUT)
        if change.exit_code is None:
            change.notes.append(f"node {node_id} was still running {EXIT_TIMEOUT:g} s later")
            self.say(
                f"node {node_id} has not exited {EXIT_TIMEOUT:g} s after its removal; killing it"
            )
            self.cluster.kill_node(node_id)
        else:
            said = REMOVED_NARRATION in self.cluster.node_log(node_id)
            self.say(
                f"node {node_id} exited with code {change.exit_code}"
                + (f' after narrating "{REMOVED_NARRATION}"' if said else "")
            )
            if not said:
                change.notes.append(f'node {node_id} never narrated "{REMOVED_NARRATION}"')
        if node_id == leader:
            new_leader = await self.cluster.wait_for_leader(PROMOTION_TIMEOUT)
            self.say(f"node {new_leader} now leads")
        return self._end(change)

    async def replace(self, victim: int) -> Change:
        """A node loses its disk: it is killed and its data directory wiped; its id is removed and
        a fresh node (new id, empty data directory) is added in its place."""
        address = self.cluster.place_node()
        change = self._begin(
            "replace",
            f"node {victim} loses its disk; node {address.id} replaces it",
            (victim, address.id),
        )
        if self.cluster.is_running(victim):
            self.cluster.kill_node(victim)
        self.cluster.wipe_node(victim)
        self.say(f"killed node {victim} (SIGKILL) and deleted its data directory")
        await self._remove(victim)
        await self._add(address, True)
        return self._end(change)

    async def snapshot_catch_up(self, victim: int, fill: bool = True) -> Change:
        """A follower is down while the others compact their logs past its last entry; restarted,
        it must catch up by InstallSnapshot. With `fill`, this writes fresh keys itself until the
        logs are compacted far enough; otherwise it waits for the cluster's own writes to get
        there. Either way it restarts the node after at most SNAPSHOT_TIMEOUT; `compacted_past`
        says whether the logs got there (only then must the node narrate installing a snapshot)."""
        change = self._begin(
            "snapshot-catch-up", f"node {victim} is down until it needs a snapshot", (victim,)
        )
        others = [n for n in self.cluster.node_ids if n != victim]
        self.cluster.kill_node(victim)
        _, last = self.cluster.log_bounds(victim)
        self.say(
            f"killed node {victim} (SIGKILL) with its log ending at index {last}; waiting until "
            "every other member's log starts after it"
        )
        reached = await self._compacted_past(others, last, change if fill else None)
        change.compacted_past = reached
        if not reached:
            bases = ", ".join(f"{n}: {self.cluster.log_bounds(n, whole=False)[0]}" for n in others)
            self.say(
                f"the others' logs were not compacted past index {last} within "
                f"{SNAPSHOT_TIMEOUT:g} s (they start after {bases}); it may catch up from them"
            )
        offset = self.cluster.log_size(victim)
        self.cluster.start_node(victim)
        self.say(f"restarted node {victim} on its old data directory")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROMOTION_TIMEOUT
        while True:
            narrated = self.cluster.node_log_since(victim, offset)
            line = next((x for x in narrated.splitlines() if INSTALL_NARRATION in x), None)
            if line is not None:
                change.snapshot_installed = True
                self.say(f"node {victim}: {line[line.index(INSTALL_NARRATION) :].strip()}")
                break
            if not reached or loop.time() >= deadline or not self.cluster.is_running(victim):
                if reached:
                    raise MembershipChangeError(
                        f"node {victim} did not narrate installing a snapshot within "
                        f"{PROMOTION_TIMEOUT:g} s of its restart"
                        + ("" if self.cluster.is_running(victim) else " (it exited)")
                    )
                break
            await asyncio.sleep(0.1)
        return self._end(change)

    # -- steps ----------------------------------------------------------------------------------

    def _begin(self, kind: str, description: str, nodes: tuple[int, ...]) -> Change:
        change = Change(kind, description, self.clock(), nodes=nodes)
        self.say(f"membership: {description}")
        return change

    def _end(self, change: Change) -> Change:
        change.ended = self.clock()
        return change

    async def _leader(self) -> int | None:
        try:
            return await self.cluster.wait_for_leader(PROMOTION_TIMEOUT)
        except TimeoutError:
            return None

    async def _add(self, address: NodeAddress, announce: bool) -> None:
        node_id = address.id
        if announce:
            self.say(
                f"member add {node_id} {address.raft_address} {address.client_address} "
                "(as a learner)"
            )
            listed = await self.client.add_member(
                node_id, address.raft_address, address.client_address, wait_until_voter=False
            )
            if listed.member(node_id) is None:
                raise MembershipChangeError(
                    f"member add {node_id} returned a configuration without it"
                )
        self.cluster.join_node(node_id)
        self.say(f"started node {node_id} with --join {self.cluster.join_address(node_id)}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROMOTION_TIMEOUT
        learner_seen = announce
        while True:
            if not self.cluster.is_running(node_id):
                raise MembershipChangeError(
                    f"node {node_id} exited with code {self.cluster.exit_code(node_id)} "
                    "before it was promoted to voter"
                )
            now: cluster_client.MemberList | None = None
            with contextlib.suppress(cluster_client.ClientError):
                now = await self.members()
            member = None if now is None else now.member(node_id)
            if member is not None and not learner_seen:
                learner_seen = True
                if not member.voter:
                    self.say(f"node {node_id} asked to join and is a learner")
            if member is not None and member.voter and now is not None and now.committed:
                self.say(f"node {node_id} was promoted to voter: {_describe(now)}")
                return
            if loop.time() >= deadline:
                state = "not a member" if member is None else "still a learner"
                raise MembershipChangeError(
                    f"node {node_id} is {state} {PROMOTION_TIMEOUT:g} s after it was started"
                )
            await asyncio.sleep(0.2)

    async def _remove(self, node_id: int) -> None:
        self.say(f"member remove {node_id}")
        listed = await self.client.remove_member(node_id)
        if listed.member(node_id) is not None or node_id not in listed.removed:
            raise MembershipChangeError(
                f"member remove {node_id} returned a configuration that still lists it: "
                f"{_describe(listed)}"
            )
        self.cluster.forget_node(node_id)
        self.say(f"removal committed: {_describe(listed)}")

    async def _compacted_past(self, nodes: list[int], index: int, change: Change | None) -> bool:
        """Wait until the log of every node in `nodes` starts after entry `index`; with `change`,
        write fresh keys meanwhile (recorded in `change.written`). False at SNAPSHOT_TIMEOUT."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SNAPSHOT_TIMEOUT
        done = asyncio.Event()
        written = 0

        async def filler() -> None:
            nonlocal written
            assert change is not None
            while not done.is_set():
                written += 1
                key, value = f"fill-{change.nodes[0]}-{written}", f"v{written}"
                try:
                    await self.client.propose_mapping(key, value)
                except cluster_client.ClientError:
                    continue
                change.written[key] = value

        workers = [] if change is None else [asyncio.create_task(filler()) for _ in range(8)]
        try:
            while True:
                if min(self.cluster.log_bounds(n, whole=False)[0] for n in nodes) > index:
                    return True
                if loop.time() >= deadline:
                    return False
                for task in workers:
                    if task.done():
                        task.result()
                await asyncio.sleep(0.1)
        finally:
            done.set()
            await asyncio.gather(*workers, return_exceptions=True)
            if change is not None:
                self.say(f"wrote {len(change.written)} fresh keys while it was down")


def _ids(ids: Iterable[int]) -> str:
    return ", ".join(str(i) for i in sorted(ids))


def _describe(listed: cluster_client.MemberList) -> str:
    voters = ", ".join(str(m.id) for m in listed.voters) or "none"
    text = f"voters {voters}"
    if listed.learners:
        text += "; learners " + ", ".join(str(m.id) for m in listed.learners)
    if listed.removed:
        text += "; removed " + ", ".join(str(i) for i in sorted(listed.removed))
    return text


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
    isolated right now (for reads aimed at it).

    Membership kinds need `changes`: "shrink" removes members down to `smaller` (a follower,
    then the leader), "grow" adds fresh nodes up to `larger`, "replace" swaps a follower whose
    disk was lost for a fresh node, "snapshot-catch-up" keeps a follower down until the others'
    logs are compacted past it. What went wrong in them (a removed node that did not exit, ...)
    is collected in `membership_problems`."""

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
    changes: MembershipChanges | None = None
    larger: int = 5
    smaller: int = 3
    membership_problems: list[str] = field(default_factory=list)
    _killed: set[int] = field(default_factory=set)
    _paused: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        known = FAULT_KINDS + MEMBERSHIP_KINDS
        unknown = [k for k in self.kinds if k not in known]
        if unknown or not self.kinds:
            raise ValueError(
                f"unknown fault kind {unknown[0]!r}; choose from {', '.join(known)}"
                if unknown
                else "no fault kinds given"
            )
        if self.changes is None and any(k in MEMBERSHIP_KINDS for k in self.kinds):
            raise ValueError("membership kinds need a MembershipChanges (`changes`)")

    async def run(self, stop: asyncio.Event) -> None:
        """Inject faults until `stop` is set; the fault under way is healed before returning."""
        deck: list[str] = []
        try:
            while not stop.is_set():
                if not deck:
                    deck = list(self.kinds)
                    self.rng.shuffle(deck)
                kind = self._draw(deck)
                if kind is None:
                    continue
                await self._inject(kind, stop)
                await self._sleep(self.rng.uniform(*self.timing.quiet), stop)
        finally:
            self.heal_all()

    def _draw(self, deck: list[str]) -> str | None:
        """The next kind from the end of the deck that can be applied now (grow only below
        `larger` members, shrink only above `smaller`); None, with the deck emptied, if none."""
        size = len(self.cluster.node_ids)
        for i in range(len(deck) - 1, -1, -1):
            kind = deck[i]
            if (kind != "grow" or size < self.larger) and (kind != "shrink" or size > self.smaller):
                return deck.pop(i)
        deck.clear()
        return None

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
        if kind in MEMBERSHIP_KINDS:
            await self._change_membership(kind)
            return
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

    async def _change_membership(self, kind: str) -> None:
        """One membership kind, made like an operator would; it is itself recorded as a fault."""
        changes = self.changes
        assert changes is not None
        leader = await self._leader()
        followers = [n for n in self.cluster.node_ids if n != leader]
        size = len(self.cluster.node_ids)
        if kind == "grow":
            fault = self._begin(kind, f"add fresh nodes until there are {self.larger}", [])
        elif kind == "shrink":
            fault = self._begin(kind, f"remove members down to {self.smaller}, leader last", [])
        else:
            victim = self.rng.choice(followers or self.cluster.node_ids)
            what = "loses its disk and is replaced" if kind == "replace" else "needs a snapshot"
            fault = self._begin(kind, f"node {victim} {what}", [victim])
        done: list[Change] = []
        try:
            if kind == "grow":
                while len(self.cluster.node_ids) < self.larger:
                    done.append(await changes.add(announce=self.rng.random() < 0.5))
            elif kind == "shrink":
                while len(self.cluster.node_ids) > self.smaller:
                    now = await self._leader()
                    rest = [n for n in self.cluster.node_ids if n != now]
                    last = len(self.cluster.node_ids) == self.smaller + 1
                    target = now if last and now is not None else self.rng.choice(rest)
                    done.append(await changes.remove(target))
            elif kind == "replace":
                done.append(await changes.replace(victim))
            else:
                done.append(await changes.snapshot_catch_up(victim, fill=False))
        except (MembershipChangeError, cluster_client.ClientError, TimeoutError) as e:
            self.membership_problems.append(f"{kind} at {fault.started:.1f} s: {e}")
            self.say(f"nemesis: {kind} did not complete: {e}")
        for change in done:
            fault.nodes += change.nodes
            if change.kind == "remove" and change.exit_code != 0:
                how = "did not exit" if change.exit_code is None else f"exited {change.exit_code}"
                self.membership_problems.append(f"removed node {change.nodes[0]} {how}")
            self.membership_problems.extend(
                f"{change.kind} of node {change.nodes[0]}: {note}" for note in change.notes
            )
        self._end(
            fault, f"{size} -> {len(self.cluster.node_ids)} members ({_ids(self.cluster.node_ids)})"
        )

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
