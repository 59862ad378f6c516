"""The systems the benchmark compares, each started on loopback and driven over gRPC by one client
loop: this project, etcd, PySyncObj (through test/pysyncobj_adapter.py) and a do-nothing server."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from cluster_client import Client, ClientError
from rpc import raft_pb2, raft_pb2_grpc
from test.cluster_process import CHANNEL_OPTIONS, HOST, LocalCluster, find_free_port_block

REPO_ROOT = Path(__file__).resolve().parent.parent
# Generated protobuf modules carry no static names, so they are looked up at run time.
etcd_kv: Any = importlib.import_module("test.etcd_api.kv_pb2")

WORKLOADS = ("write", "read", "stale-read", "mixed", "batch", "cas")
RPC_TIMEOUT = 5.0
# How long one operation may keep retrying (a leader change, a redirect) before it counts as an error.
OPERATION_DEADLINE = 10.0


class BenchError(Exception):
    """An operation failed for good, or a system could not be started; one-line message."""


class Unsupported(Exception):
    """The system has no such operation (such as a linearizable read on PySyncObj)."""


def cpu_seconds(pid: int, path: str = "") -> float:
    """User plus system CPU time of a process so far, from /proc/<pid>/stat (0 once it is gone);
    with `path`, of the thread whose stat file that is."""
    try:
        stat = Path(path or f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces; the fields after its closing ')' are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU time of a process's main thread (its event loop's, for every system measured here)."""
    return cpu_seconds(pid, f"/proc/{pid}/task/{pid}/stat")


def main_thread_wait_seconds(pid: int) -> float:
    """How long a process's main thread has waited, ready to run, for a CPU (from schedstat; 0
    where the kernel does not keep it): on a saturated machine, time its event loop lost."""
    try:
        return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class NodeSample:
    """One process of a system at one moment: its CPU so far and, for this project, its metrics."""

    name: str
    cpu: float
    loop_cpu: float
    loop_wait: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


async def scrape_metrics(host: str, port: int, timeout: float = 2.0) -> dict[str, float]:
    """A node's /metrics as {name with labels: value}; empty if it does not answer."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
                body = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return {}
    values: dict[str, float] = {}
    for line in body.decode("utf-8", "replace").split("\r\n\r\n", 1)[-1].splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                continue
    return values


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc/<pid>/status (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- processes ------------------------------------------------------------------------------------

_live: set[Processes] = set()


class Processes:
    """Child processes, each in its own process group, killed on every exit path (stop(), atexit
    and, through the benchmark's signal handling, SIGTERM/SIGINT)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, command: Sequence[str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        self._logs.append(log)
        proc = subprocess.Popen(
            list(command),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
        self.procs[name] = proc
        _live.add(self)
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def dead(self) -> list[str]:
        return [
            f"{n} exited with {p.returncode}" for n, p in self.procs.items() if p.poll() is not None
        ]

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        for log in self._logs:
            log.close()
        self._logs.clear()
        _live.discard(self)


def _stop_all() -> None:
    for processes in list(_live):
        processes.stop()


atexit.register(_stop_all)


# -- drivers: one per protocol, shared by the N tasks of a measurement --------------------------


class Driver:
    """The operations the client loop issues; each retries until it succeeds or its deadline."""

    async def put(self, key: str, value: str) -> None:
        raise NotImplementedError

    async def put_many(self, mappings: dict[str, str]) -> None:
        raise NotImplementedError

    async def get(self, key: str, stale: bool) -> str | None:
        raise NotImplementedError

    async def cas(self, key: str, expected: str | None, new: str) -> bool:
        raise NotImplementedError

    async def find_leader(self, timeout: float) -> str:
        """The leader's address, once one is known within `timeout` seconds."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class ClusterApiDriver(Driver):
    """Speaks this project's `Cluster` service: writes go to the leader (following redirects),
    reads go round-robin to every node. No client session, so the node does no session work."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self._channels = {
            a: grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for a in addresses
        }
        self._stubs = {a: raft_pb2_grpc.ClusterStub(c) for a, c in self._channels.items()}
        self._addresses = list(addresses)
        self._leader = self._addresses[0]
        self._next_read = itertools.cycle(self._addresses)

    async def _write(self, method: str, request: Any) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OPERATION_DEADLINE
        tried = 0
        while True:
            address = self._leader
            try:
                reply = await getattr(self._stubs[address], method)(request, timeout=RPC_TIMEOUT)
            except grpc.aio.AioRpcError as e:
                reason = f"{address}: {e.code().name}"
                tried += 1
                self._leader = self._addresses[tried % len(self._addresses)]
            else:
                if reply.success:
                    return reply
                reason = f"{address} is not the leader"
                if reply.leader_address in self._stubs:
                    self._leader = reply.leader_address
                else:
                    tried += 1
                    self._leader = self._addresses[tried % len(self._addresses)]
            if loop.time() >= deadline:
                raise BenchError(f"{method} did not succeed in {OPERATION_DEADLINE:g} s ({reason})")
            await asyncio.sleep(0.01)

    async def put(self, key: str, value: str) -> None:
        await self._write("ProposeMapping", raft_pb2.Mapping(key=key, value=value))

    async def put_many(self, mappings: dict[str, str]) -> None:
        batch = raft_pb2.MappingBatch(
            mappings=[raft_pb2.Mapping(key=k, value=v) for k, v in mappings.items()]
        )
        await self._write("ProposeMappings", batch)

    async def cas(self, key: str, expected: str | None, new: str) -> bool:
        request = raft_pb2.CompareAndSwapRequest(key=key, new_value=new)
        if expected is not None:
            request.expected_value = expected
        reply = await self._write("CompareAndSwap", request)
        return bool(reply.swapped)

    async def get(self, key: str, stale: bool) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OPERATION_DEADLINE
        request = raft_pb2.Key(key=key, allow_stale=stale)
        while True:
            address = next(self._next_read)
            try:
                reply = await self._stubs[address].GetValue(request, timeout=RPC_TIMEOUT)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise Unsupported(e.details() or "not implemented") from None
                if loop.time() >= deadline:
                    raise BenchError(f"GetValue: {address}: {e.code().name}") from None
                await asyncio.sleep(0.01)
            else:
                return str(reply.value) if reply.HasField("value") else None

    async def find_leader(self, timeout: float) -> str:
        """The client address of the node that says it leads, once one does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for address, stub in self._stubs.items():
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.GetLeader(raft_pb2.LeaderRequest(), timeout=0.5)
                    if reply.role == "leader":
                        self._leader = address
                        return address
            if loop.time() >= deadline:
                raise BenchError(f"no node of {', '.join(self._stubs)} leads after {timeout:g} s")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


class EtcdDriver(Driver):
    """Speaks etcd's v3 KV API: writes to the leader (found through Maintenance.Status, so no
    member forwards them), reads round-robin to every member (linearizable unless `stale`)."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self._addresses = list(addresses)
        self._channels = {
            a: grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for a in addresses
        }

        def method(channel: Any, path: str, request: Any, reply: Any) -> Any:
            return channel.unary_unary(
                path,
                request_serializer=request.SerializeToString,
                response_deserializer=reply.FromString,
            )

        kv = etcd_kv
        self._put = {
            a: method(c, "/etcdserverpb.KV/Put", kv.PutRequest, kv.PutResponse)
            for a, c in self._channels.items()
        }
        self._range = {
            a: method(c, "/etcdserverpb.KV/Range", kv.RangeRequest, kv.RangeResponse)
            for a, c in self._channels.items()
        }
        self._txn = {
            a: method(c, "/etcdserverpb.KV/Txn", kv.TxnRequest, kv.TxnResponse)
            for a, c in self._channels.items()
        }
        self._status = {
            a: method(c, "/etcdserverpb.Maintenance/Status", kv.StatusRequest, kv.StatusResponse)
            for a, c in self._channels.items()
        }
        self._leader = self._addresses[0]
        self._next_read = itertools.cycle(self._addresses)

    async def find_leader(self, timeout: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for address, status in self._status.items():
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await status(etcd_kv.StatusRequest(), timeout=0.5)
                    if reply.leader and reply.leader == reply.header.member_id:
                        self._leader = address
                        return address
            if loop.time() >= deadline:
                raise BenchError(f"no etcd member of {', '.join(self._addresses)} leads")
            await asyncio.sleep(0.1)

    async def _call(self, calls: dict[str, Any], request: Any, to_leader: bool) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OPERATION_DEADLINE
        while True:
            address = self._leader if to_leader else next(self._next_read)
            try:
                return await calls[address](request, timeout=RPC_TIMEOUT)
            except grpc.aio.AioRpcError as e:
                if loop.time() >= deadline:
                    raise BenchError(f"etcd {address}: {e.code().name}") from None
                if to_leader:
                    with contextlib.suppress(BenchError):
                        await self.find_leader(timeout=1.0)
                await asyncio.sleep(0.01)

    async def put(self, key: str, value: str) -> None:
        await self._call(
            self._put, etcd_kv.PutRequest(key=key.encode(), value=value.encode()), True
        )

    async def put_many(self, mappings: dict[str, str]) -> None:
        ops = [
            etcd_kv.RequestOp(request_put=etcd_kv.PutRequest(key=k.encode(), value=v.encode()))
            for k, v in mappings.items()
        ]
        await self._call(self._txn, etcd_kv.TxnRequest(success=ops), True)

    async def cas(self, key: str, expected: str | None, new: str) -> bool:
        compare = etcd_kv.Compare(key=key.encode())
        if expected is None:
            # "Absent" is version 0 in etcd.
            compare.target = etcd_kv.Compare.VERSION
            compare.version = 0
        else:
            compare.target = etcd_kv.Compare.VALUE
            compare.value = expected.encode()
        put = etcd_kv.RequestOp(
            request_put=etcd_kv.PutRequest(key=key.encode(), value=new.encode())
        )
        reply = await self._call(
            self._txn, etcd_kv.TxnRequest(compare=[compare], success=[put]), True
        )
        return bool(reply.succeeded)

    async def get(self, key: str, stale: bool) -> str | None:
        request = etcd_kv.RangeRequest(key=key.encode(), serializable=stale)
        reply = await self._call(self._range, request, False)
        return reply.kvs[0].value.decode() if reply.kvs else None

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


# -- systems ----------------------------------------------------------------------------------------


# Every started system that is not stopped yet, so that a signal can stop them all at once.
LIVE: set[System] = set()


def stop_all_systems() -> None:
    for system in list(LIVE):
        system.stop()


class System:
    """One system under test: started for a cluster size, queried for its processes' pids."""

    name = ""
    unsupported: frozenset[str] = frozenset()

    @classmethod
    def missing(cls) -> str | None:
        """Why the system cannot run here and how to install it, or None when it can."""
        return None

    def start(self, nodes: int) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError

    def named_pids(self) -> dict[str, int]:
        """Each running process of the system by a name for the report."""
        return {str(i): p for i, p in enumerate(self.pids())}

    async def sample(self) -> list[NodeSample]:
        """Every process's CPU so far (and what else the system tells of its cost)."""
        return [
            NodeSample(
                name, cpu_seconds(pid), main_thread_cpu_seconds(pid), main_thread_wait_seconds(pid)
            )
            for name, pid in self.named_pids().items()
        ]

    def driver(self) -> Driver:
        raise NotImplementedError

    async def wait_ready(self, timeout: float = 20) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class MeteredCluster(LocalCluster):
    """A LocalCluster whose every node serves /metrics on a port of its own; with `source`, the
    nodes run the raft_node.py of that folder (another version of this project, for an A/B)."""

    def __init__(
        self, nodes: int, extra_args: Sequence[str] = (), source: Path | None = None
    ) -> None:
        super().__init__(nodes, extra_args=extra_args)
        first = find_free_port_block(nodes)
        self.metrics_ports = {n: first + i for i, n in enumerate(self.node_ids)}
        self.source = source

    def bootstrap_command(self, node_id: int) -> list[str]:
        command = super().bootstrap_command(node_id)
        if self.source is not None:
            # The script's folder comes first on the node's import path: all of it is that version.
            command[command.index("raft_node.py")] = str(self.source / "raft_node.py")
        return [*command, "--metrics-port", str(self.metrics_ports[node_id])]


class RaftDemo(System):
    """This project: `raft_node.py` processes through LocalCluster, at --log-level WARNING, each
    serving /metrics (the benchmark reads each node's counters there)."""

    name = "raft-demo"

    def __init__(self) -> None:
        self.cluster: MeteredCluster | None = None

    # Where the nodes' code comes from (None: this checkout).
    source: Path | None = None

    def start(self, nodes: int) -> None:
        self.cluster = MeteredCluster(nodes, ["--log-level", "WARNING"], self.source)
        LIVE.add(self)
        self.cluster.start()

    def named_pids(self) -> dict[str, int]:
        cluster = self._cluster()
        return {str(n): p for n in cluster.node_ids if (p := cluster.pid(n)) is not None}

    async def sample(self) -> list[NodeSample]:
        cluster = self._cluster()
        samples = await super().sample()
        scraped = await asyncio.gather(
            *(scrape_metrics(HOST, cluster.metrics_ports[int(s.name)]) for s in samples)
        )
        for node_sample, metrics in zip(samples, scraped, strict=True):
            node_sample.metrics = metrics
        return samples

    def _cluster(self) -> MeteredCluster:
        if self.cluster is None:
            raise BenchError("raft-demo is not started")
        return self.cluster

    def pids(self) -> list[int]:
        cluster = self._cluster()
        return [p for n in cluster.node_ids if (p := cluster.pid(n)) is not None]

    def addresses(self) -> list[str]:
        cluster = self._cluster()
        return [cluster.client_address(n) for n in cluster.node_ids]

    def driver(self) -> Driver:
        return ClusterApiDriver(self.addresses())

    async def wait_ready(self, timeout: float = 20) -> None:
        cluster = self._cluster()
        try:
            await cluster.wait_for_leader(timeout=timeout)
        except TimeoutError as e:
            raise BenchError(f"raft-demo elected no leader: {e}") from None

    def stop(self) -> None:
        LIVE.discard(self)
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


class _ProcessSystem(System):
    """A system made of processes this module starts itself, with a temporary data directory."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self.processes = Processes(self.workdir / "logs")
        self.client_addresses: list[str] = []
        LIVE.add(self)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.procs.values() if p.poll() is None]

    def stop(self) -> None:
        LIVE.discard(self)
        self.processes.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _check_alive(self) -> None:
        dead = self.processes.dead()
        if dead:
            raise BenchError(f"{self.name}: {'; '.join(dead)} (logs in {self.processes.log_dir})")

    # Ready means a leader is known and, unless cleared, a first write succeeded.
    write_when_ready = True

    async def wait_ready(self, timeout: float = 20) -> None:
        driver = self.driver()
        try:
            await driver.find_leader(timeout)
            if self.write_when_ready:
                await driver.put("bench-ready", "1")
        except BenchError:
            self._check_alive()
            raise
        finally:
            await driver.close()


class Etcd(_ProcessSystem):
    """etcd from the Debian package, one member per node, each with its own data dir (fsync on)."""

    name = "etcd"

    @classmethod
    def missing(cls) -> str | None:
        if shutil.which("etcd") is None:
            return "etcd is not installed: apt-get install etcd-server (version 3.4)"
        return None

    def start(self, nodes: int) -> None:
        first = find_free_port_block(2 * nodes)
        peers = [f"http://{HOST}:{first + nodes + i}" for i in range(nodes)]
        initial = ",".join(f"m{i}={url}" for i, url in enumerate(peers))
        self.client_addresses = [f"{HOST}:{first + i}" for i in range(nodes)]
        for i in range(nodes):
            client_url = f"http://{self.client_addresses[i]}"
            self.processes.start(
                f"m{i}",
                [
                    "etcd",
                    "--name", f"m{i}",
                    "--data-dir", str(self.workdir / f"m{i}"),
                    "--listen-client-urls", client_url,
                    "--advertise-client-urls", client_url,
                    "--listen-peer-urls", peers[i],
                    "--initial-advertise-peer-urls", peers[i],
                    "--initial-cluster", initial,
                    "--initial-cluster-state", "new",
                    "--initial-cluster-token", f"bench-{os.getpid()}-{first}",
                    "--log-level", "error",
                ],
            )  # fmt: skip

    def driver(self) -> EtcdDriver:
        return EtcdDriver(self.client_addresses)


class PySyncObj(_ProcessSystem):
    """PySyncObj 0.3.17's ReplDict, one test/pysyncobj_adapter.py process per node."""

    name = "pysyncobj"
    # ReplDict reads are local only, and it has no compare-and-swap.
    unsupported = frozenset({"read", "mixed", "cas"})

    @classmethod
    def missing(cls) -> str | None:
        try:
            importlib.import_module("pysyncobj")
        except ImportError:
            return "pysyncobj is not installed: pip install pysyncobj==0.3.17"
        return None

    def start(self, nodes: int) -> None:
        first = find_free_port_block(2 * nodes)
        raft = [f"{HOST}:{first + nodes + i}" for i in range(nodes)]
        self.client_addresses = [f"{HOST}:{first + i}" for i in range(nodes)]
        for i in range(nodes):
            peers = [f"--peer={raft[j]}={self.client_addresses[j]}" for j in range(nodes) if j != i]
            self.processes.start(
                f"n{i}",
                [
                    sys.executable,
                    "-m",
                    "test.pysyncobj_adapter",
                    "--raft",
                    raft[i],
                    "--client",
                    self.client_addresses[i],
                    *peers,
                ],
            )

    def driver(self) -> ClusterApiDriver:
        return ClusterApiDriver(self.client_addresses)


class NullServer(_ProcessSystem):
    """One do-nothing `Cluster` server (whatever the cluster size): the client loop's ceiling."""

    name = "null"

    def start(self, nodes: int) -> None:
        port = find_free_port_block(1)
        self.client_addresses = [f"{HOST}:{port}"]
        self.processes.start(
            "null", [sys.executable, "-m", "test.null_server", "--port", str(port)]
        )

    def driver(self) -> ClusterApiDriver:
        return ClusterApiDriver(self.client_addresses)

    # A single process: no write is needed to show it is ready.
    write_when_ready = False


class ClientDriver(Driver):
    """This project's own `Client` (cluster_client.py): one client session for every task, and the
    requests the tasks make in one event-loop turn sent as one Batch call to the leader."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self._client = Client.from_endpoints(
            list(addresses), deadline=OPERATION_DEADLINE, attempt_timeout=RPC_TIMEOUT
        )

    async def put(self, key: str, value: str) -> None:
        await self._client.propose_mapping(key, value)

    async def put_many(self, mappings: dict[str, str]) -> None:
        await self._client.propose_mappings(mappings)

    async def cas(self, key: str, expected: str | None, new: str) -> bool:
        swapped, _ = await self._client.compare_and_swap(key, expected, new)
        return swapped

    async def get(self, key: str, stale: bool) -> str | None:
        return await self._client.get_value(key, None, stale=stale)

    async def find_leader(self, timeout: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with contextlib.suppress(ClientError):
                _, address = await self._client.leader()
                return address
            if loop.time() >= deadline:
                raise BenchError(f"no leader found in {timeout:g} s")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        await self._client.close()


class RaftDemoClient(RaftDemo):
    """This project's nodes driven through its own Client (sessions, batched calls), where
    `raft-demo` drives them through the seed's unary calls without sessions."""

    name = "raft-demo-client"

    def driver(self) -> ClientDriver:
        return ClientDriver(self.addresses())


BASELINE_ENV = "RAFT_DEMO_BASELINE"


class Baseline(RaftDemo):
    """Another version of this project, checked out in the folder $RAFT_DEMO_BASELINE (e.g. by
    `git archive OLD | tar -x -C DIR`), measured in the same run as this one: an A/B."""

    name = "baseline"

    @classmethod
    def missing(cls) -> str | None:
        folder = os.environ.get(BASELINE_ENV)
        if not folder or not (Path(folder) / "raft_node.py").is_file():
            return f"set {BASELINE_ENV} to a folder holding another version of raft_node.py"
        return None

    def start(self, nodes: int) -> None:
        self.source = Path(os.environ[BASELINE_ENV]).resolve()
        super().start(nodes)


SYSTEMS: dict[str, type[System]] = {
    s.name: s for s in (RaftDemo, RaftDemoClient, Etcd, PySyncObj, NullServer, Baseline)
}
