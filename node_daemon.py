"""The process around one Raft node: its two gRPC servers, signals, joining a running cluster, and
handing leadership over before it stops (its flags are node_flags.py's)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from backups import Backups
from cluster_config import ClusterConfig, ConfigError, NodeAddress, parse_host_port
from cluster_identity import ClusterIdentity, ClusterIdentityError, derive_cluster_id
from log import REMEDY, LogCorruptionError, RaftLog, RealDisk
from membership import Membership, MembershipError, check_new_member
from node_flags import parse_node_args
from node_settings import JsonLogFormatter
from node_status import NodeObserver, Observers
from raft_node import HANDOVER_TIMEOUTS, RaftNode, SnapshotPolicy, Timing
from restore import run_restore
from rpc import raft_pb2_grpc
from snapshot import SnapshotError
from tls import NodeTlsFiles, RenewableServerCredentials, TlsConfig, TlsError

if TYPE_CHECKING:
    import grpc

# Limits every gRPC server of a node sets (see "Hostile input" in docs/failures.md).
SERVER_MAX_CALLS = 4096
SERVER_LIMITS: list[tuple[str, int]] = [
    # One connection cannot hold more than this many calls open at once.
    ("grpc.max_concurrent_streams", 128),
    # A connection with no call for 5 minutes is closed; one older than 30 minutes is asked to
    # reconnect (its calls get 1 minute to finish), so no connection holds resources forever.
    ("grpc.max_connection_idle_ms", 5 * 60_000),
    ("grpc.max_connection_age_ms", 30 * 60_000),
    ("grpc.max_connection_age_grace_ms", 60_000),
    # The server pings a connection quiet for a minute and drops it if no answer comes in 20 s.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # A client may ping at most every 10 s (also without calls); more often, after 2 strikes,
    # the connection is closed.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
]


def _fail(code: int, message: str) -> NoReturn:
    if any(isinstance(h.formatter, JsonLogFormatter) for h in logging.getLogger().handlers):
        # JSON logs stay parseable to the last line.
        logging.getLogger("raft_node").error(message)
    else:
        print(f"raft_node.py: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _setup_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLogFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)-5s %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # gRPC's own chatter stays out of the narration unless it is a real problem.
    logging.getLogger("grpc").setLevel(logging.WARNING)


async def _serve(
    args: argparse.Namespace,
    cluster: ClusterConfig,
    node_id: int,
    timing: Timing,
    policy: SnapshotPolicy,
) -> int:
    import grpc

    import cluster_server
    import raft_server
    from health import NodeHealth, add_health_and_reflection
    from raft_client import GrpcTransport

    me = cluster.node(node_id)
    data_dir = Path(args.data_dir or Path("data") / str(node_id))
    lock = _lock_data_dir(data_dir)
    metrics = None
    if args.metrics_port is not None:
        from metrics import NodeMetrics

        metrics = NodeMetrics()
    try:
        identity = await ClusterIdentity.load(str(data_dir))
        log = await RaftLog.open(
            data_dir, RealDisk(on_fsync=metrics.observe_fsync) if metrics is not None else None
        )
    except (LogCorruptionError, ClusterIdentityError) as e:
        _fail(1, str(e))
    except OSError as e:
        # A file that cannot be read at all (no permission, a directory in its place).
        where = e.filename if e.filename is not None else data_dir
        _fail(1, f"cannot read {where}: {e.strerror or e}; {REMEDY}")
    tls_files: NodeTlsFiles | None = args.tls_files
    tls, peer_tls = _load_tls(tls_files, node_id)
    joining = args.join is not None
    if identity.cluster_id is None and not joining:
        # Every member bootstrapped from the same flags derives the same id (a joining node
        # instead adopts its leader's). Kept from now on: later flags never change it.
        await identity.keep(derive_cluster_id(cluster, args.cluster_token))
    transport = GrpcTransport(
        {p.id: p.raft_address for p in cluster.peers_of(node_id)}, identity, tls=peer_tls
    )
    node = RaftNode(node_id, cluster, log, transport, timing, snapshot_policy=policy, join=joining)
    node.state_machine.window.limit = args.watch_window
    try:
        node.start_from_snapshot()
    except (SnapshotError, ValueError) as e:
        await log.close()
        _fail(1, str(e))
    if node.configs.recorded:
        flags = Membership.bootstrap(cluster)
        if not joining and node.config.members != flags.members:
            # The log wins over the start flags (thesis 4.1); say so, so nobody is surprised.
            node.narrate.info(
                "using the membership in my log (%s); the start flags only describe a new cluster",
                node.config.describe(),
            )

    if timing.time_scale != 1:
        node.narrate.info(
            "every Raft timer is %g times as long (--time-scale): heartbeat %d ms, election "
            "timeout %d to %d ms",
            timing.time_scale,
            timing.heartbeat_interval * 1000,
            timing.election_timeout_min * 1000,
            timing.election_timeout_max * 1000,
        )
    health = NodeHealth(node)
    observers: list[NodeObserver] = [health, _MemoryTrim()]
    if metrics is not None:
        metrics.attach(node)
        observers.append(metrics)
    node.observer = Observers(*observers)
    metrics_server: asyncio.Server | None = None
    servers: list[grpc.aio.Server] = []
    raft_servicer = raft_server.RaftServicer(node, identity, authenticate=tls is not None)
    # Each server's credentials, renewed in place on SIGHUP (none: plain text).
    raft_credentials = cluster_credentials = None
    if tls is not None and peer_tls is not None:
        raft_credentials = RenewableServerCredentials(peer_tls, require_client_auth=True)
        cluster_credentials = RenewableServerCredentials(tls, args.client_cert_auth)
    exit_code = 0
    try:
        # Per service: its name, address, servicer, message size limit, and its TLS credentials.
        services: list[
            tuple[
                str, str, Callable[[grpc.aio.Server], None], int, RenewableServerCredentials | None
            ]
        ] = [
            (
                "Raft",
                me.raft_address,
                lambda s: raft_server.add_refusing_malformed(
                    raft_pb2_grpc.add_RaftServicer_to_server, raft_servicer, s, raft_servicer.gate
                ),
                64 * 1024 * 1024,
                raft_credentials,
            ),
            (
                "Cluster",
                me.client_address,
                lambda s: raft_server.add_refusing_malformed(
                    raft_pb2_grpc.add_ClusterServicer_to_server,
                    cluster_server.ClusterServicer(
                        node,
                        admin_names=args.admin_cert_name or (),
                        backups=Backups(node, lambda: identity.cluster_id),
                        watch_queue=args.watch_queue,
                    ),
                    s,
                ),
                4 * 1024 * 1024,
                cluster_credentials,
            ),
        ]
        for name, address, add_services, limit, credentials in services:
            server = grpc.aio.server(
                # Beyond this many calls in progress a server answers RESOURCE_EXHAUSTED at once,
                # so a flood costs bounded memory; peers need only a few calls each.
                maximum_concurrent_rpcs=SERVER_MAX_CALLS,
                options=[
                    # Without this, gRPC lets a second process share a port that is in use.
                    ("grpc.so_reuseport", 0),
                    ("grpc.max_receive_message_length", limit),
                    ("grpc.max_send_message_length", limit),
                    *SERVER_LIMITS,
                ],
            )
            add_services(server)
            await add_health_and_reflection(server, name, health)
            bind = _bind_address(address, args.host)
            problem = _cannot_bind(bind)
            if problem is None:
                try:
                    if credentials is None:
                        port = server.add_insecure_port(bind)
                    else:
                        port = server.add_secure_port(bind, credentials.credentials)
                    if port == 0:
                        problem = "gRPC could not bind it"
                except RuntimeError as e:
                    problem = str(e)
            if problem is not None:
                _fail(2, f"cannot listen on {bind}: {problem}")
            await server.start()
            servers.append(server)
        if metrics is not None:
            from metrics import serve_metrics

            own_host, _ = parse_host_port(me.client_address)
            metrics_host = args.metrics_host or args.host or own_host
            try:
                metrics_server = await serve_metrics(metrics, metrics_host, args.metrics_port)
            except OSError as e:
                host = f"[{metrics_host}]" if ":" in metrics_host else metrics_host
                where = f"{host}:{args.metrics_port}"
                _fail(2, f"cannot listen on {where} for metrics: {e.strerror or e}")
        health.start()

        stop = asyncio.Event()
        # A second signal while a leader hands over means: stop now.
        hurry = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        def on_signal() -> None:
            (hurry if stop.is_set() else stop).set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)

        def renew_certificates() -> None:
            if tls_files is None or raft_credentials is None or cluster_credentials is None:
                node.narrate.info("SIGHUP: nothing to read again, this node runs without TLS")
                return
            try:
                clients, peers = tls_files.load(node_id)
            except TlsError as e:
                node.narrate.error("SIGHUP: kept the certificates in use: %s", e)
                return
            cluster_credentials.renew(clients)
            raft_credentials.renew(peers)
            transport.renew_tls(peers)
            node.narrate.info(
                "SIGHUP: certificates read again (%s); new connections present them",
                peers.describe_certificate(),
            )

        loop.add_signal_handler(signal.SIGHUP, renew_certificates)
        node.narrate.info(
            "serving Raft on %s and clients on %s; data in %s; cluster %s",
            me.raft_address,
            me.client_address,
            data_dir,
            identity.cluster_id or "(learnt from its leader once joined)",
        )
        if tls is not None:
            node.narrate.info("%s", _describe_tls(args))
        node.start()
        refused: list[str] = []
        if joining and not node.config.is_member(node_id):
            joined = asyncio.ensure_future(_join(node, args.join, refused, stop, tls))
        else:
            joined = None
        removed = asyncio.ensure_future(node.removed.wait())
        stopping = asyncio.ensure_future(stop.wait())
        broken = asyncio.ensure_future(log.broken.wait())
        try:
            await asyncio.wait({removed, stopping, broken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            removed.cancel()
            stopping.cancel()
            broken.cancel()
            if joined is not None:
                joined.cancel()
        await health.stop()
        if log.failure is not None:
            # After a failed fsync the kernel may have dropped the data it could not write and
            # will not say so again (fsyncgate), so what is on disk is unknown: stop, and let a
            # restart read back what the disk really holds, rather than guess or retry.
            node.narrate.error(
                "stopping: a write to my data directory failed (%s); restart me once the disk "
                "is healthy, and I will recover from what it really holds",
                log.failure,
            )
            exit_code = 1
        elif refused:
            node.narrate.error("the cluster refused to add me: %s", refused[0])
            exit_code = 2
        elif node.removed.is_set():
            node.narrate.info("stopping: this node is no longer a member of the cluster")
        else:
            await _hand_over(node, HANDOVER_TIMEOUTS * timing.election_timeout_max, hurry)
        if exit_code == 0:
            node.narrate.info("stopping: finishing disk writes")
    finally:
        await node.stop()
        await health.stop()
        if metrics_server is not None:
            metrics_server.close()
        # A leader's open AppendStream would otherwise hold the server for its whole grace period.
        raft_servicer.end_streams()
        for server in servers:
            await server.stop(grace=0.5)
        await transport.close()
        await log.close()
        lock.close()
    return exit_code


class _MemoryTrim(NodeObserver):
    """After a snapshot the state's copy, its encoding and the compacted log entries are freed, but
    the C allocator keeps most of that memory for itself: hand it back to the system (glibc's
    malloc_trim, in a worker thread; elsewhere nothing happens)."""

    def __init__(self) -> None:
        self._trim: Callable[[int], int] | None = None
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            pass

    def snapshot_taken(self) -> None:
        self._soon()

    def snapshot_installed(self) -> None:
        self._soon()

    def _soon(self) -> None:
        if self._trim is not None:
            future = asyncio.get_running_loop().run_in_executor(None, self._trim, 0)
            future.add_done_callback(lambda f: f.exception())


async def _join(
    node: RaftNode,
    address: str,
    refused: list[str],
    stop: asyncio.Event,
    tls: TlsConfig | None = None,
) -> None:
    """Ask the cluster at `address` to add this node as a learner, until it agrees or refuses.
    A cluster that keeps admin calls from this node's certificate is waited on instead: an
    admin adds the node with `member add`."""
    from cluster_client import (
        Client,
        ClientError,
        ClusterUnavailableError,
        MembershipBusyError,
        MembershipRefusedError,
        PermissionDeniedError,
    )

    me = node.me
    node.narrate.info(
        "asking the cluster at %s to add me (Raft %s, clients %s) as a learner",
        address,
        me.raft_address,
        me.client_address,
    )
    async with Client.from_endpoints([address], tls=tls) as client:
        while not node.config.is_member(node.node_id):
            try:
                added = await client.add_member(
                    node.node_id, me.raft_address, me.client_address, wait_until_voter=False
                )
            except MembershipBusyError as e:
                node.narrate.info("the cluster is busy with another change (%s); asking again", e)
            except MembershipRefusedError as e:
                refused.append(str(e))
                stop.set()
                return
            except PermissionDeniedError as e:
                node.narrate.info(
                    "the cluster does not let my certificate add members (%s); waiting for an "
                    "admin to add me with `member add`",
                    e,
                )
                while not node.config.is_member(node.node_id):
                    await node.pause(1.0)
                return
            except (ClusterUnavailableError, ClientError) as e:
                node.narrate.info("could not reach the cluster to join it (%s); trying again", e)
            else:
                node.narrate.info(
                    "the cluster added me as a learner (configuration at index %d); catching up",
                    added.config_index,
                )
                return
            await node.pause(1.0)


async def _hand_over(node: RaftNode, timeout: float, hurry: asyncio.Event) -> None:
    """A leader asked to stop first hands leadership to the most up-to-date other node, so the
    cluster need not wait an election timeout for a successor (thesis section 3.10). Bounded: after
    `timeout`, or a second signal, it stops anyway."""
    if node.role != "leader":
        return
    node.narrate.info("stopping: handing leadership over first")
    transfer = asyncio.ensure_future(node.transfer_leadership(None))
    hurried = asyncio.ensure_future(hurry.wait())
    try:
        done, _ = await asyncio.wait(
            {transfer, hurried}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        hurried.cancel()
        if not transfer.done():
            transfer.cancel()
    if transfer not in done or transfer.cancelled():
        node.narrate.info("stopping without handing leadership over: no successor in time")
        return
    error = transfer.exception()
    if error is not None:
        node.narrate.info("stopping without handing leadership over: %s", error)
        return
    node.narrate.info("handed leadership to %d", transfer.result())


def _bind_address(address: str, host: str | None) -> str:
    own_host, port = parse_host_port(address)
    host = host or own_host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _cannot_bind(bind: str) -> str | None:
    """Why `bind` cannot be listened on, checked with a plain socket so the user gets one clear line."""
    import socket

    host, port = parse_host_port(bind)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return e.strerror or str(e)
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # Same reuse rule as the gRPC server: a port still in TIME_WAIT is fine, one in use is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as e:
            return e.strerror or str(e)
    return None


def _lock_data_dir(data_dir: Path) -> Any:
    """Hold an exclusive lock on the data directory so two nodes never share one."""
    import fcntl

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = open(data_dir / "LOCK", "a")
    except OSError as e:
        _fail(2, f"cannot use data directory {data_dir}: {e.strerror}")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        _fail(2, f"data directory {data_dir} is in use by another node")
    return lock


def _describe_tls(args: argparse.Namespace) -> str:
    if not args.client_cert_auth:
        clients = "clients need none"
    elif args.admin_cert_name:
        names = ", ".join(args.admin_cert_name)
        clients = f"clients need one signed by {args.tls_ca}, and only {names} may make admin calls"
    else:
        clients = f"clients need one signed by {args.tls_ca}"
    return (
        f"TLS on both services: peers must present a certificate signed by "
        f"{args.peer_tls_ca or args.tls_ca} that names a member, and speak only for it; {clients}"
    )


def _tls_files(args: argparse.Namespace) -> NodeTlsFiles | None:
    if args.tls_cert is None:
        return None
    return NodeTlsFiles(
        args.tls_cert,
        args.tls_key,
        args.tls_ca,
        args.tls_server_name,
        args.peer_tls_cert,
        args.peer_tls_key,
        args.peer_tls_ca,
    )


def _load_tls(
    files: NodeTlsFiles | None, node_id: int
) -> tuple[TlsConfig | None, TlsConfig | None]:
    """(for clients, for peers), or (None, None) for plain text; a file that cannot be used ends
    the process with one line."""
    if files is None:
        return None, None
    try:
        return files.load(node_id)
    except TlsError as e:
        _fail(2, str(e))


def main(argv: list[str] | None = None) -> int:
    args = parse_node_args(argv)
    _setup_logging(args.log_level, args.log_format)
    try:
        if args.port is not None:
            cluster = ClusterConfig.seed_scheme(args.first_port, args.nodes)
            node_id = args.port
        elif args.join is not None:
            node_id = args.id
            me = NodeAddress(node_id, args.raft_address, args.client_address)
            try:
                check_new_member(me)
                parse_host_port(args.join)
            except MembershipError as e:
                raise ConfigError(str(e)) from None
            cluster = ClusterConfig({node_id: me})
        else:
            cluster = ClusterConfig.from_toml(args.cluster)
            node_id = args.id
        cluster.node(node_id)
        timing = Timing(
            heartbeat_interval=args.heartbeat_ms / 1000,
            election_timeout_min=args.election_timeout_min_ms / 1000,
            election_timeout_max=args.election_timeout_max_ms / 1000,
            proposal_timeout=args.proposal_timeout_ms / 1000,
        ).scaled(args.time_scale)
        policy = SnapshotPolicy(
            entries=args.snapshot_entries,
            bytes=args.snapshot_bytes,
            keep_entries=args.snapshot_keep_entries,
            keep_bytes=args.snapshot_keep_bytes,
        )
    except ConfigError as e:
        _fail(2, str(e))
    if args.restore is not None:
        return run_restore(args, cluster, node_id)
    args.tls_files = _tls_files(args)
    # Checked before anything starts, so a bad file is one line and exit 2; read again in _serve.
    _load_tls(args.tls_files, node_id)
    import uvloop

    return uvloop.run(_serve(args, cluster, node_id, timing, policy))
