"""Start, stop, kill and query real `raft_node.py` processes on localhost, for tests and tools.

A cluster also follows membership changes: fresh nodes started with `--join` (new id, own ports and
data directory), removed nodes forgotten, and clients that always know the current members.
Every process started here is ended on every exit path: `stop()`, the context manager, atexit, and
SIGTERM/SIGHUP to this process (which, like SIGINT, then unwinds as KeyboardInterrupt).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import fcntl
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TYPE_CHECKING, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # So that `cluster_config`, `rpc` and `cluster_client` import however this module was reached.
    sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402

from cluster_config import ClusterConfig, NodeAddress  # noqa: E402
from rpc import raft_pb2, raft_pb2_grpc  # noqa: E402
from tls import TlsConfig, open_channel  # noqa: E402

if TYPE_CHECKING:
    import cluster_client

HOST = "127.0.0.1"
# Ports are drawn below Linux's default ephemeral range (32768-60999), so outgoing connections of
# other programs do not take them between the check and the node's bind.
_PORT_RANGE = (20000, 32000)
# Ports are bound by node processes a second or more after they are picked. In between, a pick
# by this process or by another one on this machine (a second test run, the harness) must not
# hand them out again: every pick is recorded in this file, under an exclusive lock, for
# RESERVATION_SECONDS or until the process that picked them ends.
_RESERVATIONS = Path(tempfile.gettempdir()) / "raft-demo-port-reservations"
RESERVATION_SECONDS = 600.0
_local_reservations: dict[int, tuple[int, float]] = {}
# A node that was stopped or killed must not keep a channel in a long reconnect backoff, or polling
# it after a restart would see "unavailable" for seconds after it is back.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


# A node's `log` file (see "Data files" in docs/failures.md): a magic header, for a compacted log
# followed by [u64 base index][u64 base term][u32 CRC32]; then records [u32 length][u32 CRC32][entry].
_LOG_MAGIC = b"RAFTLOG1"
_COMPACT_LOG_MAGIC = b"RAFTLOG2"
_LOG_BASE = struct.Struct(">QQI")
_LOG_RECORD = struct.Struct(">II")


class PortBusyError(RuntimeError):
    """A port the cluster needs is already taken; the message names it, in one line."""


def port_is_free(port: int, host: str = HOST, *, strict: bool = False) -> bool:
    """True when `host:port` can be bound now.

    Non-strict mirrors what a gRPC server does (SO_REUSEADDR), so a port whose only users are
    connections in TIME_WAIT counts as free; strict also refuses those, which is the safer choice
    when picking an unused port for a new cluster.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if not strict:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def busy_ports(first_port: int, count: int, host: str = HOST) -> list[int]:
    """The ports of `first_port .. first_port+count-1` that cannot be bound now."""
    return [p for p in range(first_port, first_port + count) if not port_is_free(p, host)]


def find_free_port_block(count: int, host: str = HOST, attempts: int = 200) -> int:
    """The first port of `count` consecutive ports that are all free now, and reserved: no other
    pick on this machine hands any of them out before they are bound (see _RESERVATIONS)."""
    low, high = _PORT_RANGE
    with _reservations() as reserved:
        for _ in range(attempts):
            first = random.randrange(low, high - count)
            block = range(first, first + count)
            if any(p in reserved for p in block):
                continue
            if all(port_is_free(p, host, strict=True) for p in block):
                until = time.time() + RESERVATION_SECONDS
                reserved.update((p, (os.getpid(), until)) for p in block)
                return first
    raise PortBusyError(f"found no {count} consecutive free ports in {low}-{high} on {host}")


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _reservations() -> Iterator[dict[int, tuple[int, float]]]:
    """The ports picked on this machine and not yet expired, by port: (pid, until), held under an
    exclusive lock; what the caller leaves in the dict is written back. Where the shared file
    cannot be used, only this process's own picks are known."""
    try:
        file = open(_RESERVATIONS, "a+", encoding="ascii")
    except OSError:
        yield _local_reservations
        return
    with file:
        fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0)
        now = time.time()
        reserved: dict[int, tuple[int, float]] = {}
        for line in file.read().splitlines():
            try:
                port, pid, until = (int(word) for word in line.split())
            except ValueError:
                continue  # a line cut short by a process killed mid-write
            if until > now and process_alive(pid):
                reserved[port] = (pid, float(until))
        reserved.update((p, v) for p, v in _local_reservations.items() if v[1] > now)
        yield reserved
        _local_reservations.clear()
        _local_reservations.update((p, v) for p, v in reserved.items() if v[0] == os.getpid())
        file.seek(0)
        file.truncate()
        file.write("".join(f"{p} {pid} {until:.0f}\n" for p, (pid, until) in reserved.items()))
        file.flush()


@dataclass
class ClusterTls:
    """A cluster run under TLS: certificates made by make_certs.py in `directory` (a node's own
    pair, node-<id>.pem/.key, is made when the node is first started), and the flags for it. With
    `peer_ca`, peers trust only a CA of their own (peer-ca.pem, node-<id>-peer.pem/.key)."""

    directory: Path
    client_cert_auth: bool = True
    admin_names: tuple[str, ...] = ()
    # The certificate (<name>.pem/.key) this cluster's clients and probes present.
    client_name: str = "client"
    peer_ca: bool = False
    # Checked against every node's certificate instead of the host dialled (--tls-server-name):
    # for nodes on hosts whose addresses the certificates do not carry.
    server_name: str | None = None

    @classmethod
    def create(cls, directory: Path, **options: Any) -> ClusterTls:
        """A new CA with client and admin certificates in `directory`."""
        import make_certs

        make_certs.make_all(directory, [], HOST, peer_ca=options.get("peer_ca", False))
        return cls(directory, **options)

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    def issue_node(self, node_id: int) -> None:
        """Write node `node_id`'s certificates (again: a renewal, with new keys)."""
        import make_certs

        authority, _ = make_certs.load_or_make_authority(self.directory)
        # "localhost" too, for nodes whose own address is another (see `server_name`).
        hosts = make_certs.parse_hosts(f"{HOST},localhost")
        make_certs.write_node(authority, self.directory, node_id, hosts)
        if self.peer_ca:
            make_certs.write_peer_node(self.directory, node_id, hosts)

    def node_args(self, node_id: int) -> list[str]:
        """The TLS flags of node `node_id`."""
        cert, key = self.directory / f"node-{node_id}.pem", self.directory / f"node-{node_id}.key"
        if not cert.exists():
            self.issue_node(node_id)
        args = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(self.ca)]
        if self.peer_ca:
            stem = self.directory / f"node-{node_id}-peer"
            args += [
                "--peer-tls-cert",
                f"{stem}.pem",
                "--peer-tls-key",
                f"{stem}.key",
                "--peer-tls-ca",
                str(self.directory / "peer-ca.pem"),
            ]
        if self.server_name is not None:
            args += ["--tls-server-name", self.server_name]
        if self.client_cert_auth:
            args.append("--client-cert-auth")
        for name in self.admin_names:
            args += ["--admin-cert-name", name]
        return args

    def client_args(self, name: str | None = None) -> list[str]:
        """cluster_client.py's flags for the client certificate `name` (default: client_name)."""
        stem = self.directory / (name or self.client_name)
        server_name = [] if self.server_name is None else ["--tls-server-name", self.server_name]
        return [
            "--tls-cert",
            f"{stem}.pem",
            "--tls-key",
            f"{stem}.key",
            "--tls-ca",
            str(self.ca),
            *server_name,
        ]

    def client_config(self, name: str | None = None) -> TlsConfig:
        stem = self.directory / (name or self.client_name)
        return TlsConfig.load(f"{stem}.pem", f"{stem}.key", self.ca, self.server_name)


class NodeProbe:
    """Direct queries to single nodes' Cluster service, one cached channel per node.

    Channels belong to the event loop that made them: use a probe inside one `asyncio.run` and
    close it (or use `async with`) before that loop ends.
    """

    def __init__(self, cluster: LocalCluster, rpc_timeout: float = 1.0) -> None:
        self._cluster = cluster
        self._rpc_timeout = rpc_timeout
        self._channels: dict[int, Any] = {}
        self._stubs: dict[int, Any] = {}

    def _stub(self, node_id: int) -> Any:
        stub = self._stubs.get(node_id)
        if stub is None:
            tls = self._cluster.tls
            channel = open_channel(
                self._cluster.client_address(node_id),
                CHANNEL_OPTIONS,
                None if tls is None else tls.client_config(),
            )
            self._channels[node_id] = channel
            stub = self._stubs[node_id] = raft_pb2_grpc.ClusterStub(channel)
        return stub

    async def get_leader(self, node_id: int, timeout: float | None = None) -> Any | None:
        """The node's LeaderResponse, or None when it does not answer in time."""
        try:
            return await self._stub(node_id).GetLeader(
                raft_pb2.LeaderRequest(), timeout=timeout or self._rpc_timeout
            )
        except grpc.aio.AioRpcError:
            return None

    async def get_value(self, node_id: int, key: str, timeout: float | None = None) -> str | None:
        """The value this node's applied state holds for `key` (None when unset).

        Raises grpc.aio.AioRpcError when the node does not answer.
        """
        response = await self._stub(node_id).GetValue(
            raft_pb2.Key(key=key), timeout=timeout or self._rpc_timeout
        )
        return str(response.value) if response.HasField("value") else None

    async def mismatches(
        self, node_id: int, expected: dict[str, str], concurrency: int = 64
    ) -> dict[str, str | None]:
        """The keys of `expected` this node does not serve with the expected value, with what it
        serves instead; a node that does not answer counts every key it was asked as a mismatch."""
        wrong: dict[str, str | None] = {}
        items = list(expected.items())
        for start in range(0, len(items), concurrency):
            batch = items[start : start + concurrency]
            results = await asyncio.gather(
                *(self.get_value(node_id, k) for k, _ in batch), return_exceptions=True
            )
            for (key, value), got in zip(batch, results, strict=True):
                if isinstance(got, BaseException):
                    if not isinstance(got, grpc.aio.AioRpcError):
                        raise got
                    wrong[key] = None
                elif got != value:
                    wrong[key] = got
        return wrong

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> NodeProbe:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class LocalCluster:
    """A cluster of `raft_node.py` processes on 127.0.0.1 in the seed's port scheme.

    Ids are the Raft ports `first_port .. first_port+nodes-1`; each client port is its Raft port
    plus `nodes`. Each node keeps its data in `<data_dir>/<id>` and writes its stdout and stderr
    to `<log_dir>/<id>.log` (appended across restarts, with a marker line per start and exit).

    Membership: `node_ids` and `config` are the members as this object knows them (bootstrap
    nodes, then those `join_node` starts, minus those `forget_node` drops after their removal).
    A node added later gets an id that was never used (here: its Raft port), free ports and its
    own data directory, and is started (and restarted) with `--join`.
    """

    def __init__(
        self,
        nodes: int = 5,
        first_port: int | None = None,
        data_dir: str | Path | None = None,
        extra_args: Sequence[str] = (),
        log_dir: str | Path | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"a cluster needs at least one node, not {nodes}")
        self.nodes = nodes
        self._ports_were_picked = first_port is None
        self.first_port = find_free_port_block(2 * nodes) if first_port is None else first_port
        self.config = ClusterConfig.seed_scheme(self.first_port, nodes, HOST)
        self.node_ids: list[int] = sorted(self.config.nodes)
        self._owns_data_dir = data_dir is None
        self.data_dir = Path(
            tempfile.mkdtemp(prefix="raft-demo-cluster-") if data_dir is None else data_dir
        )
        self.log_dir = Path(log_dir) if log_dir is not None else self.data_dir / "logs"
        self.extra_args = list(extra_args)
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: dict[int, IO[bytes]] = {}
        self._stopped = False
        # Every node this cluster ever had, removed ones included (their logs and exits stay
        # inspectable); `node_ids`/`config` are only the current members.
        self._known: dict[int, NodeAddress] = dict(self.config.nodes)
        # Nodes started with --join, and the client address each was told to join through.
        self._joined: dict[int, str] = {}
        self.removed: list[int] = []
        self._exit_marked: set[int] = set()
        # Set before starting nodes to run the cluster, its clients and probes under TLS.
        self.tls: ClusterTls | None = None

    # -- addresses and paths ------------------------------------------------------------------

    def address(self, node_id: int) -> NodeAddress:
        """Where the node lives (current, removed or planned); ValueError for an unknown id."""
        try:
            return self._known[node_id]
        except KeyError:
            raise ValueError(f"node {node_id} is not known to this cluster") from None

    def client_address(self, node_id: int) -> str:
        return self.address(node_id).client_address

    @property
    def client_addresses(self) -> list[str]:
        return self.config.client_addresses

    def node_data_dir(self, node_id: int) -> Path:
        return self.data_dir / str(node_id)

    def log_path(self, node_id: int) -> Path:
        return self.log_dir / f"{node_id}.log"

    def command(self, node_id: int) -> list[str]:
        """The command line that starts this node (run with the repository root as cwd)."""
        if node_id in self._joined:
            return self.join_command(node_id)
        return self.bootstrap_command(node_id)

    def bootstrap_command(self, node_id: int) -> list[str]:
        """The command line of a node the cluster was started with."""
        return [
            sys.executable,
            "raft_node.py",
            "--port",
            str(node_id),
            "--first-port",
            str(self.first_port),
            "--nodes",
            str(self.nodes),
            "--data-dir",
            str(self.node_data_dir(node_id)),
            *self.extra_args,
            *self.tls_args(node_id),
        ]

    def join_command(self, node_id: int) -> list[str]:
        """The command line of a node that joins a running cluster (also used for its restarts:
        its data directory then holds the configuration and --join changes nothing)."""
        address = self.address(node_id)
        return [
            *self.command_prefix(node_id),
            sys.executable,
            "raft_node.py",
            "--id",
            str(node_id),
            "--join",
            self._joined[node_id],
            "--raft-address",
            address.raft_address,
            "--client-address",
            address.client_address,
            "--data-dir",
            str(self.node_data_dir(node_id)),
            *self.extra_args,
            *self.tls_args(node_id),
        ]

    def command_prefix(self, node_id: int) -> list[str]:
        """What runs the node's command (e.g. on another host); nothing here."""
        return []

    def tls_args(self, node_id: int) -> list[str]:
        """The node's TLS flags; none when the cluster runs in plain text."""
        return [] if self.tls is None else self.tls.node_args(node_id)

    # -- membership ---------------------------------------------------------------------------

    def next_node_id(self) -> int:
        """An id for a new node that no node of this cluster ever had."""
        return max(self._known) + 1

    def place_node(self, node_id: int | None = None) -> NodeAddress:
        """Choose where a new node will live (an unused id, free ports) and remember it; the node
        is neither started nor a member yet. ValueError for an id this cluster already used."""
        address = self._place(node_id)
        if address.id in self._known:
            raise ValueError(
                f"id {address.id} was already used in this cluster; ids are never reused"
            )
        self._known[address.id] = address
        return address

    def _place(self, node_id: int | None) -> NodeAddress:
        # Two consecutive free ports; the id is the Raft port, as for the seed scheme's nodes.
        first = find_free_port_block(2)
        return NodeAddress(
            first if node_id is None else node_id, f"{HOST}:{first}", f"{HOST}:{first + 1}"
        )

    def join_node(self, node_id: int, via: int | None = None) -> None:
        """Start a placed node with `--join`, asking the member `via` (default: the lowest id) to
        add it, and count it as a member from now on; RuntimeError if it is already running."""
        if node_id not in self._known or node_id in self.removed:
            raise ValueError(f"node {node_id} was not placed, or was removed")
        members = [n for n in self.node_ids if n != node_id]
        if via is None and not members:
            raise RuntimeError("a node can only join a cluster that has members")
        self._joined[node_id] = self.client_address(min(members) if via is None else via)
        self._set_members([*self.node_ids, node_id])
        self.start_node(node_id)

    def join_address(self, node_id: int) -> str | None:
        """The client address a node started with --join was told to join through."""
        return self._joined.get(node_id)

    def forget_node(self, node_id: int) -> None:
        """Stop counting a node as a member (after its removal committed); its process, if still
        running, is left alone and ended with the cluster."""
        if node_id not in self.node_ids:
            raise ValueError(f"node {node_id} is not a member")
        self._set_members([n for n in self.node_ids if n != node_id])
        self.removed.append(node_id)

    def _set_members(self, node_ids: Collection[int]) -> None:
        # `nodes` stays the bootstrap size: the seed scheme's nodes are restarted with it.
        self.node_ids = sorted(set(node_ids))
        if self.node_ids:
            self.config = ClusterConfig({n: self._known[n] for n in self.node_ids})

    def wipe_node(self, node_id: int) -> None:
        """Delete a stopped node's data directory, as a lost disk would; RuntimeError if running."""
        if self.is_running(node_id):
            raise RuntimeError(f"node {node_id} is running; stop it before wiping its data")
        shutil.rmtree(self.node_data_dir(node_id), ignore_errors=True)

    def log_bounds(self, node_id: int, whole: bool = True) -> tuple[int, int]:
        """(the index the node's log file starts after, the index of its last whole entry), read
        from the file; (0, 0) when there is none. Without `whole`, only the header is read and the
        second number is the first. Meant for a stopped node, or a running node's header (the file
        is replaced whole when compacted)."""
        path = self.node_data_dir(node_id) / "log"
        try:
            with open(path, "rb") as f:
                data = f.read() if whole else f.read(len(_COMPACT_LOG_MAGIC) + _LOG_BASE.size)
        except FileNotFoundError:
            return 0, 0
        base, pos = 0, len(_LOG_MAGIC)
        if data.startswith(_COMPACT_LOG_MAGIC) and len(data) >= pos + _LOG_BASE.size:
            base = _LOG_BASE.unpack_from(data, pos)[0]
            pos += _LOG_BASE.size
        elif not data.startswith(_LOG_MAGIC):
            raise ValueError(f"{path} does not start like a log file")
        if not whole:
            return base, base
        count = 0
        while pos + _LOG_RECORD.size <= len(data):
            length, crc = _LOG_RECORD.unpack_from(data, pos)
            end = pos + _LOG_RECORD.size + length
            # A record cut short or garbled at the end is a torn write the node will discard.
            if length == 0 or end > len(data) or zlib.crc32(data[end - length : end]) != crc:
                break
            count += 1
            pos = end
        return base, base + count

    # -- process control ----------------------------------------------------------------------

    def start(self) -> None:
        """Start every node that is not running; PortBusyError if one of the ports is taken."""
        if not self._ports_were_picked and not any(self.is_running(n) for n in self.node_ids):
            busy = busy_ports(self.first_port, 2 * self.nodes)
            if busy:
                ports = ", ".join(str(p) for p in busy)
                raise PortBusyError(
                    f"port{'s' if len(busy) > 1 else ''} {ports} on {HOST} already in use "
                    f"(the cluster needs {self.first_port}-{self.first_port + 2 * self.nodes - 1})"
                )
        for node_id in self.node_ids:
            if not self.is_running(node_id):
                self.start_node(node_id)

    def start_node(self, node_id: int) -> None:
        """Start one node; RuntimeError if it is already running."""
        self.address(node_id)
        if self.is_running(node_id):
            raise RuntimeError(f"node {node_id} is already running (pid {self.pid(node_id)})")
        self._stopped = False
        self.node_data_dir(node_id).mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._close_log(node_id)
        log = open(self.log_path(node_id), "ab")
        command = self.command(node_id)
        self._mark(log, f"starting node {node_id}: {' '.join(command)}")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with _signals_deferred():
            # The node gets its own process group (its pgid is its pid) so that Ctrl-C in a
            # terminal reaches only this process, which then ends the nodes itself.
            proc = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                process_group=0,
            )
            self._procs[node_id] = proc
            self._logs[node_id] = log
            _live_clusters.add(self)
        _install_signal_handlers()

    def kill_node(self, node_id: int, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the node and, unless it only pauses, resumes or reloads it (SIGHUP: it reads
        its certificates again), reap the process.

        A signal the node survives (e.g. SIGTERM it ignores) is followed by SIGKILL after 10 s.
        """
        proc = self._running_proc(node_id)
        if proc is None:
            raise RuntimeError(f"node {node_id} is not running")
        _signal_group(proc, sig)
        if sig in (signal.SIGSTOP, signal.SIGCONT, signal.SIGTSTP, signal.SIGHUP):
            return
        if sig != signal.SIGKILL:
            # A paused node would hold any other signal pending until resumed.
            _signal_group(proc, signal.SIGCONT)
        self._reap(node_id, proc, timeout=None if sig == signal.SIGKILL else 10)

    def pause_node(self, node_id: int) -> None:
        """Freeze the node (SIGSTOP): it keeps its ports but answers nothing until resumed."""
        self.kill_node(node_id, signal.SIGSTOP)

    def resume_node(self, node_id: int) -> None:
        self.kill_node(node_id, signal.SIGCONT)

    def stop_node(self, node_id: int, timeout: float = 10) -> int:
        """SIGTERM the node, wait up to `timeout` s (then SIGKILL), and return its exit code.

        For a node that already exited, returns the code it exited with.
        """
        proc = self._procs.get(node_id)
        if proc is None:
            raise RuntimeError(f"node {node_id} was never started")
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            _signal_group(proc, signal.SIGCONT)
            self._reap(node_id, proc, timeout=timeout)
        assert proc.returncode is not None
        return proc.returncode

    def restart_node(self, node_id: int) -> None:
        """Start the node again with the same data dir; a running node is first stopped cleanly."""
        if self.is_running(node_id):
            self.stop_node(node_id)
        self.start_node(node_id)

    def is_running(self, node_id: int) -> bool:
        return self._running_proc(node_id) is not None

    def pid(self, node_id: int) -> int | None:
        proc = self._running_proc(node_id)
        return None if proc is None else proc.pid

    def exit_code(self, node_id: int) -> int | None:
        """The code the node's last process exited with (negative: killed by that signal)."""
        proc = self._procs.get(node_id)
        return None if proc is None else proc.poll()

    def running_nodes(self) -> list[int]:
        return [n for n in self.node_ids if self.is_running(n)]

    async def wait_exit(self, node_id: int, timeout: float) -> int | None:
        """The code the node's process exits with, once it does within `timeout` s; else None
        (it is left running)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            code = self.exit_code(node_id)
            if code is not None:
                proc = self._procs[node_id]
                if proc.pid not in self._exit_marked:
                    self._reap(node_id, proc, timeout=0)
                return code
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        """SIGKILL every node still running, reap it, and remove a temporary data dir; idempotent."""
        for node_id, proc in list(self._procs.items()):
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                self._reap(node_id, proc, timeout=None)
            self._close_log(node_id)
        _live_clusters.discard(self)
        if self._owns_data_dir and not self._stopped:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self._stopped = True

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- queries ------------------------------------------------------------------------------

    def probe(self, rpc_timeout: float = 1.0) -> NodeProbe:
        return NodeProbe(self, rpc_timeout)

    async def wait_for_leader(self, timeout: float = 10, exclude: Collection[int] = ()) -> int:
        """The id of the leader, once one node reports role "leader" and a majority of the
        running nodes (those not in `exclude`) agree on it for its term.

        Nodes in `exclude` are neither asked nor accepted as leader (e.g. one just paused).
        Raises TimeoutError naming what each node reported last.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: dict[int, str] = {}
        async with self.probe(rpc_timeout=0.5) as probe:
            while True:
                asked = [n for n in self.running_nodes() if n not in exclude]
                answers = await asyncio.gather(*(probe.get_leader(n) for n in asked))
                leaders: list[tuple[int, int]] = []
                for node_id, answer in zip(asked, answers, strict=True):
                    if answer is None:
                        last[node_id] = "no answer"
                        continue
                    known = answer.leader_id if answer.HasField("leader_id") else "?"
                    last[node_id] = f"{answer.role} t={answer.term} leader={known}"
                    if answer.role == "leader":
                        leaders.append((answer.term, answer.node_id))
                if leaders:
                    term, leader = max(leaders)
                    agree = sum(
                        1
                        for a in answers
                        if a is not None
                        and a.term == term
                        and (
                            (a.role == "leader" and a.node_id == leader)
                            or (a.HasField("leader_id") and a.leader_id == leader)
                        )
                    )
                    if leader not in exclude and agree > len(asked) // 2:
                        return int(leader)
                if loop.time() >= deadline:
                    raise TimeoutError(
                        f"no leader agreed on by a majority after {timeout:g} s: "
                        + self._describe(last, exclude)
                    )
                await asyncio.sleep(0.05)

    def _describe(self, last: dict[int, str], exclude: Collection[int]) -> str:
        parts = []
        for node_id in self.node_ids:
            if node_id in exclude:
                parts.append(f"{node_id} excluded")
            elif not self.is_running(node_id):
                code = self.exit_code(node_id)
                state = "never started" if code is None else f"exited with code {code}"
                parts.append(f"{node_id} {state}")
            else:
                parts.append(f"{node_id} {last.get(node_id, 'not asked')}")
        return "; ".join(parts)

    def client(self, **kwargs: Any) -> cluster_client.Client:
        """A cluster_client.Client that knows every node of this cluster, and keeps knowing the
        current members when they change (the seed scheme's addresses until then)."""
        if self.tls is not None:
            kwargs.setdefault("tls", self.tls.client_config())
        return following_client(lambda: self.config, **kwargs)

    def node_log(self, node_id: int) -> str:
        """Everything the node wrote so far (all its runs), or "" when there is no log yet."""
        try:
            return self.log_path(node_id).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self, node_id: int) -> int:
        """How many bytes the node's log file holds now (0 before it exists)."""
        try:
            return self.log_path(node_id).stat().st_size
        except FileNotFoundError:
            return 0

    def node_log_since(self, node_id: int, offset: int) -> str:
        """What the node wrote after the first `offset` bytes of its log file."""
        try:
            with open(self.log_path(node_id), "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, node_id: int, lines: int = 20) -> list[str]:
        return self.node_log(node_id).splitlines()[-lines:]

    # -- internals ----------------------------------------------------------------------------

    def _running_proc(self, node_id: int) -> subprocess.Popen[bytes] | None:
        proc = self._procs.get(node_id)
        if proc is None or proc.poll() is not None:
            return None
        return proc

    def _reap(self, node_id: int, proc: subprocess.Popen[bytes], timeout: float | None) -> None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        log = self._logs.get(node_id)
        if log is not None and not log.closed and proc.pid not in self._exit_marked:
            self._exit_marked.add(proc.pid)
            self._mark(log, f"node {node_id} (pid {proc.pid}) {_describe_exit(proc.returncode)}")

    def _close_log(self, node_id: int) -> None:
        log = self._logs.pop(node_id, None)
        if log is not None:
            log.close()

    @staticmethod
    def _mark(log: IO[bytes], text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        log.write(f"--- {stamp} {text}\n".encode())
        log.flush()


class HostCluster(LocalCluster):
    """Nodes that know their cluster from TOML files (`--id ID --cluster FILE`), each started
    through an optional command prefix, such as `ip netns exec NAME` to run it on its own host.

    `config` is the cluster as clients see it; `cluster_files[id]` is the file that node reads
    (nodes may see different peer addresses, e.g. through proxies). `cleanups` run once, after
    every node has been killed, on every path that stops the cluster.
    """

    def __init__(
        self,
        config: ClusterConfig,
        cluster_files: dict[int, Path],
        prefixes: dict[int, list[str]] | None = None,
        data_dir: str | Path | None = None,
        extra_args: Sequence[str] = (),
        log_dir: str | Path | None = None,
    ) -> None:
        # first_port=1 only skips the port search: these nodes use the addresses in `config`.
        super().__init__(len(config.nodes), 1, data_dir, extra_args, log_dir)
        self._ports_were_picked = True
        self.config = config
        self.node_ids = sorted(config.nodes)
        self._known = dict(config.nodes)
        self.cluster_files = dict(cluster_files)
        self.prefixes = dict(prefixes or {})
        self.cleanups: list[Callable[[], None]] = []
        # Where a node added later lives and what its command runs through (e.g. a new network
        # namespace); by default free ports on this host.
        self.placer: Callable[[int], tuple[NodeAddress, list[str]]] | None = None

    @classmethod
    def on_localhost(
        cls,
        nodes: int,
        data_dir: str | Path,
        extra_args: Sequence[str] = (),
        log_dir: str | Path | None = None,
    ) -> HostCluster:
        """Nodes 1..`nodes` on free ports of 127.0.0.1, bootstrapped from one cluster file
        written into `data_dir`."""
        directory = Path(data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        first = find_free_port_block(2 * nodes)
        config = ClusterConfig(
            {
                i: NodeAddress(i, f"{HOST}:{first + 2 * (i - 1)}", f"{HOST}:{first + 2 * i - 1}")
                for i in range(1, nodes + 1)
            }
        )
        path = directory / "cluster.toml"
        path.write_text(
            "".join(
                f'[[node]]\nid = {n.id}\nraft = "{n.raft_address}"\nclient = "{n.client_address}"\n\n'
                for n in config.nodes.values()
            ),
            encoding="utf-8",
        )
        return cls(config, {i: path for i in config.nodes}, None, directory, extra_args, log_dir)

    def command_prefix(self, node_id: int) -> list[str]:
        return list(self.prefixes.get(node_id, []))

    def _place(self, node_id: int | None) -> NodeAddress:
        new_id = self.next_node_id() if node_id is None else node_id
        if self.placer is None:
            first = find_free_port_block(2)
            return NodeAddress(new_id, f"{HOST}:{first}", f"{HOST}:{first + 1}")
        address, prefix = self.placer(new_id)
        self.prefixes[new_id] = prefix
        return address

    def bootstrap_command(self, node_id: int) -> list[str]:
        return [
            *self.prefixes.get(node_id, []),
            sys.executable,
            "raft_node.py",
            "--id",
            str(node_id),
            "--cluster",
            str(self.cluster_files[node_id]),
            "--data-dir",
            str(self.node_data_dir(node_id)),
            *self.extra_args,
            *self.tls_args(node_id),
        ]

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            while self.cleanups:
                self.cleanups.pop()()


_following_class: Callable[..., cluster_client.Client] | None = None


def following_client(members: Callable[[], ClusterConfig], **kwargs: Any) -> cluster_client.Client:
    """A cluster_client.Client whose every round of attempts goes to the members `members()`
    names at that moment, so one client (and its session) outlives any membership change."""
    global _following_class
    if _following_class is None:
        import cluster_client

        class FollowingClient(cluster_client.Client):
            def __init__(self, source: Callable[[], ClusterConfig], **options: Any) -> None:
                super().__init__(config=source(), **options)
                self._members_source = source

            def _round(self) -> list[str]:
                config = self._members_source()
                self._addresses = config.client_addresses
                self._address_of.update((i, n.client_address) for i, n in config.nodes.items())
                return super()._round()

        _following_class = FollowingClient
    return _following_class(members, **kwargs)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was ended by {signal.Signals(-code).name}"
        except ValueError:
            return f"was ended by signal {-code}"
    return f"exited with code {code}"


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    # Only called before the process is reaped, so its pid (= the pgid made for it) is still ours.
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


# -- ending every node on every exit path ---------------------------------------------------------

_live_clusters: set[LocalCluster] = set()
_handlers_installed = False
_deferred: list[int] = []
_deferring = 0


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold off our SIGTERM/SIGHUP handling while a node is being started and recorded, so that
    a signal arriving in between cannot leave a process that no cluster knows about."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _deferred:
            _on_signal(_deferred.pop(), None)


def _kill_all_now() -> None:
    for cluster in list(_live_clusters):
        for proc in list(cluster._procs.values()):
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)


def _stop_all() -> None:
    for cluster in list(_live_clusters):
        cluster.stop()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _deferring:
        _deferred.append(signum)
        return
    # Kill first, without waiting: the unwinding below may be interrupted, and a node that is
    # killed but not yet reaped is reaped by stop() from a finally block or atexit.
    _kill_all_now()
    # KeyboardInterrupt rather than SystemExit: test runners (pytest) end the whole session on
    # it, running teardown, where a SystemExit would only fail the current test.
    raise KeyboardInterrupt(f"ended by {signal.Signals(signum).name}")


def _install_signal_handlers() -> None:
    """Make SIGTERM and SIGHUP end the nodes, unless the program already chose its own handling."""
    global _handlers_installed
    if _handlers_installed or threading.current_thread() is not threading.main_thread():
        return
    _handlers_installed = True
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _on_signal)


atexit.register(_stop_all)
