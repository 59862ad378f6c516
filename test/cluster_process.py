"""Start, stop, kill and query real `raft_node.py` processes on localhost, for tests and tools.

Every process started here is ended on every exit path: `stop()`, the context manager, atexit, and
SIGTERM/SIGHUP to this process (which, like SIGINT, then unwinds as KeyboardInterrupt).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TYPE_CHECKING, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # So that `cluster_config`, `rpc` and `cluster_client` import however this module was reached.
    sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402

from cluster_config import ClusterConfig  # noqa: E402
from rpc import raft_pb2, raft_pb2_grpc  # noqa: E402

if TYPE_CHECKING:
    import cluster_client

HOST = "127.0.0.1"
# Ports are drawn below Linux's default ephemeral range (32768-60999), so outgoing connections of
# other programs do not take them between the check and the node's bind.
_PORT_RANGE = (20000, 32000)
# A node that was stopped or killed must not keep a channel in a long reconnect backoff, or polling
# it after a restart would see "unavailable" for seconds after it is back.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


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
    """The first port of `count` consecutive ports that are all free now."""
    low, high = _PORT_RANGE
    for _ in range(attempts):
        first = random.randrange(low, high - count)
        if all(port_is_free(p, host, strict=True) for p in range(first, first + count)):
            return first
    raise PortBusyError(f"found no {count} consecutive free ports in {low}-{high} on {host}")


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
            channel = grpc.aio.insecure_channel(
                self._cluster.client_address(node_id), options=CHANNEL_OPTIONS
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

    # -- addresses and paths ------------------------------------------------------------------

    def client_address(self, node_id: int) -> str:
        return self.config.node(node_id).client_address

    @property
    def client_addresses(self) -> list[str]:
        return self.config.client_addresses

    def node_data_dir(self, node_id: int) -> Path:
        return self.data_dir / str(node_id)

    def log_path(self, node_id: int) -> Path:
        return self.log_dir / f"{node_id}.log"

    def command(self, node_id: int) -> list[str]:
        """The command line that starts this node (run with the repository root as cwd)."""
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
        ]

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
        self.config.node(node_id)
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
        """Send `sig` to the node and, unless it only pauses or resumes it, reap the process.

        A signal the node survives (e.g. SIGTERM it ignores) is followed by SIGKILL after 10 s.
        """
        proc = self._running_proc(node_id)
        if proc is None:
            raise RuntimeError(f"node {node_id} is not running")
        _signal_group(proc, sig)
        if sig in (signal.SIGSTOP, signal.SIGCONT, signal.SIGTSTP):
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
        """A cluster_client.Client that knows every node of this cluster."""
        import cluster_client

        return cluster_client.Client.seed_scheme(self.first_port, self.nodes, **kwargs)

    def node_log(self, node_id: int) -> str:
        """Everything the node wrote so far (all its runs), or "" when there is no log yet."""
        try:
            return self.log_path(node_id).read_text(encoding="utf-8", errors="replace")
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
        if log is not None and not log.closed:
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
        self.cluster_files = dict(cluster_files)
        self.prefixes = dict(prefixes or {})
        self.cleanups: list[Callable[[], None]] = []

    def command(self, node_id: int) -> list[str]:
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
        ]

    def client(self, **kwargs: Any) -> cluster_client.Client:
        import cluster_client

        return cluster_client.Client(config=self.config, **kwargs)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            while self.cleanups:
                self.cleanups.pop()()


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
