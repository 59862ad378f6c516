"""`python raft_node.py`'s command line: every flag with its help, and the checks flags must pass
together before a node starts (each flag also from RAFT_DEMO_* and a TOML file: node_settings.py).
"""

from __future__ import annotations

import argparse
import math
from typing import NoReturn

from cluster_identity import DEFAULT_TOKEN
from node_settings import parse_args
from node_types import SnapshotPolicy
from restore import add_restore_flags, check_restore_flags
from watch import add_watch_flags


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _time_scale(text: str) -> float:
    """--time-scale's value: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Every flag of `python raft_node.py`; node_settings adds the file and environment to each."""
    parser = OneLineParser(
        prog="raft_node.py",
        description="Run one node of a raft-demo cluster: a Raft-replicated key-value store.",
        epilog=(
            "Examples: `python raft_node.py --port 12345` (the seed's scheme: five nodes on "
            "127.0.0.1, Raft ports 12345-12349, client ports 12350-12354); "
            "`python raft_node.py --id 2 --cluster cluster.toml` (any hosts); "
            "`python raft_node.py --id 6 --join 127.0.0.1:12350 --raft-address 127.0.0.1:12360 "
            "--client-address 127.0.0.1:12361` (a new node joins a running cluster); "
            "`python raft_node.py --id 2 --cluster new.toml --restore backup.db` (build node 2's "
            "data directory of a new cluster from a backup, then exit). "
            "Exit codes: 0 clean stop or removed from the cluster, 1 damaged data directory, "
            "2 bad arguments, address in use, or the cluster refused to add this node; with "
            "--restore: 0 built, 1 the backup is refused, 2 the data directory is not empty or "
            "in use."
        ),
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file of flag values, a key per flag (heartbeat_ms = 100; relative paths are "
        "taken from the file's directory); not the --cluster file, which lists the members. "
        "Every flag can also be set as RAFT_DEMO_<FLAG> (RAFT_DEMO_HEARTBEAT_MS=100, "
        "RAFT_DEMO_CONFIG=FILE). The command line wins over the environment, which wins over "
        "the file",
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--port", type=int, help="seed scheme: this node's Raft port, which is also its id"
    )
    who.add_argument("--id", type=int, help="this node's id in the --cluster file")
    parser.add_argument(
        "--first-port", type=int, default=12345, help="seed scheme: the first Raft port (12345)"
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=5,
        help="seed scheme: number of nodes (5); client port = Raft port + nodes",
    )
    parser.add_argument(
        "--cluster",
        metavar="FILE",
        help="TOML file with a [[node]] table per member: id, raft = 'host:port', client = 'host:port'",
    )
    parser.add_argument(
        "--join",
        metavar="ADDR",
        help="join a running cluster: ask the member whose client address is ADDR to add this "
        "node (--id, --raft-address, --client-address) as a learner; it votes once caught up",
    )
    parser.add_argument(
        "--raft-address", metavar="HOST:PORT", help="with --join: this node's Raft address"
    )
    parser.add_argument(
        "--client-address", metavar="HOST:PORT", help="with --join: this node's client address"
    )
    parser.add_argument(
        "--host",
        help="address to bind both services to (default: the host in this node's own addresses)",
    )
    parser.add_argument(
        "--data-dir", metavar="DIR", help="where the log and hard state live (default data/<id>)"
    )
    parser.add_argument(
        "--cluster-token",
        default=DEFAULT_TOKEN,
        metavar="TOKEN",
        help="mixed into the cluster id a new cluster derives from its members (default "
        f"{DEFAULT_TOKEN}): give two clusters with the same member addresses different tokens",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="INFO narrates each event; DEBUG adds every message (INFO)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text: the narration as lines to read; json: one JSON object per line with ts, "
        "level, logger, msg and the node's node, role and term (text)",
    )
    parser.add_argument(
        "--heartbeat-ms", type=int, default=200, help="leader heartbeat interval (200)"
    )
    parser.add_argument(
        "--election-timeout-min-ms",
        type=int,
        default=800,
        help="shortest election timeout; each wait draws afresh from [min, max] (800)",
    )
    parser.add_argument(
        "--election-timeout-max-ms", type=int, default=1600, help="longest election timeout (1600)"
    )
    parser.add_argument(
        "--time-scale",
        type=_time_scale,
        default=1.0,
        metavar="N",
        help="multiply every Raft timer (heartbeat, election timeouts, a peer call's timeout) by "
        "N, e.g. 10 to watch an election step by step; reported by Status and Events (1)",
    )
    parser.add_argument(
        "--proposal-timeout-ms",
        type=int,
        default=5000,
        help="how long a leader waits for a write to commit before answering UNAVAILABLE (5000)",
    )
    parser.add_argument(
        "--snapshot-entries",
        type=int,
        default=SnapshotPolicy.entries,
        help="take a snapshot and compact the log once this many entries follow the last "
        f"snapshot ({SnapshotPolicy.entries})",
    )
    parser.add_argument(
        "--snapshot-bytes",
        type=int,
        default=SnapshotPolicy.bytes,
        help="... or once the log after the last snapshot takes this many bytes "
        f"({SnapshotPolicy.bytes})",
    )
    parser.add_argument(
        "--snapshot-keep-entries",
        type=int,
        default=SnapshotPolicy.keep_entries,
        help="entries kept in the log behind a snapshot, so a follower a little behind catches "
        f"up without a snapshot transfer ({SnapshotPolicy.keep_entries})",
    )
    parser.add_argument(
        "--snapshot-keep-bytes",
        type=int,
        default=SnapshotPolicy.keep_bytes,
        help="... and at most this many bytes of their log records "
        f"({SnapshotPolicy.keep_bytes})",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics over HTTP at /metrics on this port (off by default)",
    )
    parser.add_argument(
        "--metrics-host",
        metavar="HOST",
        help="address to bind the metrics endpoint to (default: as the node's other servers)",
    )
    add_watch_flags(parser)
    _add_tls_flags(parser)
    add_restore_flags(parser)
    return parser


def parse_node_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args(parser, argv)
    _check_tls_flags(parser, args)
    check_restore_flags(parser, args)
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        parser.error(f"--metrics-port must be in 1-65535, not {args.metrics_port}")
    if args.join is not None:
        if args.id is None or args.raft_address is None or args.client_address is None:
            parser.error("--join needs --id, --raft-address and --client-address")
        if args.cluster is not None:
            parser.error(
                "--join and --cluster exclude each other: a joining node learns the "
                "members from the cluster"
            )
    elif args.raft_address is not None or args.client_address is not None:
        parser.error("--raft-address and --client-address go with --join")
    elif args.id is not None and args.cluster is None:
        parser.error("--id needs --cluster FILE (or --join ADDR)")
    if args.port is not None and args.cluster is not None:
        parser.error("--port uses the seed's port scheme; use --id with --cluster")
    return args


def _add_tls_flags(parser: argparse.ArgumentParser) -> None:
    tls = parser.add_argument_group(
        "TLS (all of --tls-cert, --tls-key and --tls-ca, or none: plain text)"
    )
    tls.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="this node's certificate (PEM): served on both ports and presented to its peers; "
        "it must name the node (subject alternative name urn:raft-demo:node:ID, as make_certs.py "
        "issues it), for peers accept Raft messages only from the member a certificate names",
    )
    tls.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    tls.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="CA certificate(s) (PEM): peers must present a certificate it signed (mutual TLS), "
        "and this node checks theirs against it",
    )
    tls.add_argument(
        "--client-cert-auth",
        action="store_true",
        help="clients must also present a certificate signed by --tls-ca",
    )
    tls.add_argument(
        "--admin-cert-name",
        action="append",
        metavar="NAME",
        help="admin calls (member list/add/remove, transfer-leader) only for clients whose "
        "certificate has this common name or DNS name (repeatable; needs --client-cert-auth)",
    )
    tls.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="check peers' certificates against NAME rather than the host they are dialled at",
    )
    peers = parser.add_argument_group(
        "Separate trust for peers (all three or none; needs --tls-*): the Raft port then serves "
        "and dials with these, and trusts only --peer-tls-ca, so a CA that signs client "
        "certificates can never vouch for a peer. Certificates are read again on SIGHUP."
    )
    peers.add_argument(
        "--peer-tls-cert",
        metavar="FILE",
        help="this node's certificate for the Raft port (PEM), naming the node as --tls-cert must",
    )
    peers.add_argument("--peer-tls-key", metavar="FILE", help="its private key (PEM)")
    peers.add_argument(
        "--peer-tls-ca",
        metavar="FILE",
        help="CA certificate(s) (PEM) that sign peers' certificates, and only theirs",
    )


def _check_tls_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    given = [args.tls_cert is not None, args.tls_key is not None, args.tls_ca is not None]
    if any(given) and not all(given):
        parser.error("--tls-cert, --tls-key and --tls-ca go together: give all three or none")
    if not any(given):
        for flag, value in (
            ("--client-cert-auth", args.client_cert_auth),
            ("--tls-server-name", args.tls_server_name),
            ("--admin-cert-name", args.admin_cert_name),
        ):
            if value:
                parser.error(f"{flag} needs TLS: --tls-cert, --tls-key and --tls-ca")
    peer = [args.peer_tls_cert, args.peer_tls_key, args.peer_tls_ca]
    if any(f is not None for f in peer):
        if not all(f is not None for f in peer):
            parser.error(
                "--peer-tls-cert, --peer-tls-key and --peer-tls-ca go together: give all three "
                "or none"
            )
        if not any(given):
            parser.error(
                "--peer-tls-* need TLS for clients too: --tls-cert, --tls-key and --tls-ca"
            )
    if args.admin_cert_name and not all(name.strip() for name in args.admin_cert_name):
        parser.error("--admin-cert-name must not be empty")
    if args.admin_cert_name and not args.client_cert_auth:
        parser.error(
            "--admin-cert-name needs --client-cert-auth: only a verified client certificate "
            "says who is calling"
        )
