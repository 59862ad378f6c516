"""The command line of `cluster_client.py` (`python cluster_client.py --help`): flags and commands
parsed, run through the `cluster_client` library, answered as output and exit codes."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any, NoReturn, TypeVar

from backup_file import BackupError, describe, read_backup
from cli_coordination import (
    COORDINATION_COMMANDS,
    add_coordination_commands,
    coordination_operand_problem,
    run_coordination_command,
    split_command,
)
from cli_kv import add_watch_command, key_operand_problem, run_cas_revision, run_kv_command
from cli_leases import (
    LEASE_COMMANDS,
    add_lease_commands,
    lease_operand_problem,
    run_lease_command,
)
from cli_view import EventPrinter, LiveTable, contact_style, is_terminal, lag_style
from cluster_client import (
    DEFAULT_ADD_MEMBER_TIMEOUT,
    DEFAULT_DEADLINE,
    DEFAULT_SNAPSHOT_TIMEOUT,
    Client,
    ClusterStatus,
    ClusterUnavailableError,
    LeaseNotFoundError,
    MemberList,
    MembershipRefusedError,
    MemberStatus,
    PermissionDeniedError,
    RequestRejectedError,
    SessionExpiredError,
    WatchCompactedError,
)
from cluster_config import DEFAULT_FIRST_PORT, DEFAULT_NODES, ConfigError, NodeAddress
from membership import MAX_NODE_ID, MembershipError, check_new_member
from tls import TlsConfig, TlsError

# The program users run is cluster_client.py, which hands its command line to this module.
PROG = "cluster_client.py"

EXIT_OK = 0
EXIT_MISSING_KEY = 1
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_SWAPPED = 4

_T = TypeVar("_T")

_EPILOG = f"""\
Reads are linearizable (they see every write completed before them) unless --stale is given.
Writes are exactly-once: a retry after a lost reply never applies a write twice.

exit codes:
  {EXIT_OK}  success
  {EXIT_MISSING_KEY}  get: the key is not set; delete: the key was not set (nothing removed);
     member add/remove: the cluster refused the change (nothing changed)
  {EXIT_USAGE}  bad command line, cluster description or TLS file, or the cluster rejected the
     request (also: permission denied, an admin call without an admin's certificate)
  {EXIT_UNAVAILABLE}  the cluster did not complete the request before --timeout
     (after a failed write, the write may or may not have been applied)
  {EXIT_NOT_SWAPPED}  cas: the key did not hold EXPECTED (or was not absent); nothing changed
  status: {EXIT_OK} when every member answered and one of them leads, else {EXIT_UNAVAILABLE}
     (the table is printed either way); with --watch, {EXIT_OK} on Ctrl-C
  events: {EXIT_OK} on Ctrl-C; {EXIT_USAGE} when a node refuses this client
  snapshot save/status: {EXIT_REFUSED} when the file cannot be written, or is not a valid backup
  watch: {EXIT_OK} on Ctrl-C; {EXIT_REFUSED} when every node's window has moved past --rev
     (compacted: those changes are no longer kept)
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line on stderr."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return seconds


def _build_parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="Write to and read from a raft-demo cluster.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_argument_group(
        "which cluster (one form; default: the seed's layout, --first-port "
        f"{DEFAULT_FIRST_PORT} --nodes {DEFAULT_NODES})"
    )
    where.add_argument(
        "--first-port", type=int, metavar="P", help="first Raft port of the seed's layout"
    )
    where.add_argument("--nodes", type=int, metavar="N", help="number of nodes in that layout")
    where.add_argument("--cluster", metavar="FILE", help="cluster TOML file, as the nodes use")
    where.add_argument(
        "--endpoints", metavar="HOST:PORT,...", help="the nodes' client addresses, comma-separated"
    )
    tls = parser.add_argument_group(
        "TLS (default: plain text; --tls-ca alone verifies the nodes, add --tls-cert and "
        "--tls-key where they require client certificates)"
    )
    tls.add_argument("--tls-ca", metavar="FILE", help="CA certificate(s) to verify the nodes with")
    tls.add_argument("--tls-cert", metavar="FILE", help="this client's certificate (PEM)")
    tls.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    tls.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="check the nodes' certificates against NAME rather than the host dialled",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="S",
        help=f"give up after S seconds (default {DEFAULT_DEADLINE:g}; "
        f"{DEFAULT_ADD_MEMBER_TIMEOUT:g} for member add, {DEFAULT_SNAPSHOT_TIMEOUT:g} for "
        "snapshot save)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    put = commands.add_parser(
        "put", help="store VALUE under KEY; prints nothing, returns once committed"
    )
    put.add_argument("key", metavar="KEY")
    put.add_argument("value", metavar="VALUE")
    put.add_argument("--lease", type=int, metavar="ID", help="attach KEY to lease ID (see grant)")
    get = commands.add_parser(
        "get",
        help="print the value under KEY, or with --prefix every key starting with P and its "
        "value (linearizable)",
        usage=f"{PROG} get [--stale] [--json] KEY | {PROG} get --prefix P [--limit N] "
        "[--keys-only] [--stale] [--json]",
    )
    get.add_argument(
        "--stale",
        action="store_true",
        help="answer from the first node's own state at once; it may lag the latest writes",
    )
    get.add_argument("--prefix", metavar="P", help='every key starting with P ("": every key)')
    get.add_argument("--limit", type=int, metavar="N", help="with --prefix: at most N keys")
    get.add_argument("--keys-only", action="store_true", help="with --prefix: keys only")
    get.add_argument(
        "--json",
        action="store_true",
        help="one JSON document, with each key's revisions (create, mod, version)",
    )
    get.add_argument("key", nargs="?", metavar="KEY")
    delete = commands.add_parser(
        "delete",
        help="remove KEY; exit 1 if it was not set. With --prefix: every key starting with P, "
        "in one write; prints how many",
        usage=f"{PROG} delete KEY | {PROG} delete --prefix P",
    )
    delete.add_argument("--prefix", metavar="P", help="every key starting with P")
    delete.add_argument("key", nargs="?", metavar="KEY")
    cas = commands.add_parser(
        "cas",
        help="set KEY to NEW only if it holds EXPECTED (with --absent: only if it is not set); "
        "prints the value after; exit 4 if not swapped",
        usage=f"{PROG} cas KEY EXPECTED NEW | {PROG} cas --absent KEY NEW | "
        f"{PROG} cas --rev N KEY NEW",
    )
    cas.add_argument(
        "--absent", action="store_true", help="swap only if KEY is not set (give no EXPECTED)"
    )
    cas.add_argument(
        "--rev",
        type=int,
        metavar="N",
        help="swap only if KEY's mod revision is N (0: absent); give no EXPECTED",
    )
    cas.add_argument("operands", nargs="+", metavar="KEY [EXPECTED] NEW")
    put_many = commands.add_parser(
        "put-many",
        help="store every KEY=VALUE atomically (all or none); the key ends at the first '='",
    )
    put_many.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    transfer = commands.add_parser(
        "transfer-leader",
        help="hand leadership to node ID (0: the most up-to-date other node); prints the new "
        "leader's id",
    )
    transfer.add_argument("target", type=int, metavar="ID")
    commands.add_parser(
        "leader", help='print the leader\'s id and client address: "<id> <host:port>"'
    )
    member = commands.add_parser(
        "member",
        help="list, add or remove the cluster's members (one change at a time)",
        description="List, add or remove the cluster's members.",
    )
    actions = member.add_subparsers(dest="action", required=True, metavar="ACTION")
    member_list = actions.add_parser(
        "list",
        help="print one line per member: id, voter or learner, Raft and client addresses, "
        "and which leads",
    )
    member_list.add_argument(
        "--json",
        action="store_true",
        help="print the configuration as JSON (with removed ids, its log index, whether committed)",
    )
    member_list.add_argument(
        "--stale",
        action="store_true",
        help="answer from the first node's own configuration; it may lag or be uncommitted",
    )
    add = actions.add_parser(
        "add",
        help="add node ID (started with raft_node.py --join) as a learner; it is promoted to "
        f"voter once caught up. Waits for that (at most --timeout, default "
        f"{DEFAULT_ADD_MEMBER_TIMEOUT:g} s)",
    )
    add.add_argument("node_id", type=int, metavar="ID")
    add.add_argument("raft_address", metavar="RAFT_ADDR", help="where peers reach it, host:port")
    add.add_argument(
        "client_address", metavar="CLIENT_ADDR", help="where clients reach it, host:port"
    )
    add.add_argument(
        "--no-wait",
        action="store_true",
        help="return once it is a learner; the leader still promotes it once it has caught up",
    )
    remove = actions.add_parser("remove", help="remove node ID for good (its id is never reused)")
    remove.add_argument("node_id", type=int, metavar="ID")
    status = commands.add_parser(
        "status",
        help="ask every member for its status and print a table: id, addresses, role, term, "
        "commit and applied index, and (from the leader) lag and last contact",
    )
    web = commands.add_parser(
        "web", help="serve the live view on http://127.0.0.1:PORT/ (default 8080) until Ctrl-C"
    )
    web.add_argument("port", nargs="?", type=int, default=8080, metavar="PORT")
    status.add_argument("--json", action="store_true", help="print one JSON document instead")
    status.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=_positive_seconds,
        metavar="SECONDS",
        help="print it again every SECONDS (2) until Ctrl-C; on a terminal, redrawn in place",
    )
    events = commands.add_parser(
        "events",
        help="print what the nodes do as it happens, one line per event (every node's, merged "
        "by time, or one node's), until Ctrl-C",
    )
    events.add_argument(
        "--node",
        metavar="ID_OR_ADDRESS",
        help="only this node: its id, or its client address (host:port)",
    )
    events.add_argument(
        "--json", action="store_true", help="one JSON object per event (every NodeEvent field)"
    )
    snapshot = commands.add_parser(
        "snapshot",
        help="save a backup of the whole store to a file, or check one",
        description="Back up the whole store (keys, client sessions, everything the nodes "
        "snapshot) to a file, or check a backup file. To restore one, build each node's data "
        "directory with `raft_node.py ... --restore FILE` (see docs/operations.md).",
    )
    snapshot_actions = snapshot.add_subparsers(dest="action", required=True, metavar="ACTION")
    save = snapshot_actions.add_parser(
        "save",
        help="save the leader's state at one applied index to FILE, atomically, with a "
        "checksum; prints what it holds (an admin call under TLS)",
    )
    save.add_argument("file", metavar="FILE")
    check = snapshot_actions.add_parser(
        "status", help="verify a backup FILE (no cluster needed) and print what it holds"
    )
    check.add_argument("file", metavar="FILE")
    add_watch_command(commands)
    add_lease_commands(commands)
    add_coordination_commands(commands)
    return parser


def _client_from_args(parser: _Parser, args: argparse.Namespace) -> Client:
    seed_form = args.first_port is not None or args.nodes is not None
    forms = [seed_form, args.cluster is not None, args.endpoints is not None]
    if sum(forms) > 1:
        parser.error("give only one of --first-port/--nodes, --cluster or --endpoints")
    deadline = DEFAULT_DEADLINE if args.timeout is None else args.timeout
    tls = _tls_from_args(parser, args)
    if args.cluster is not None:
        return Client.from_cluster_file(args.cluster, deadline=deadline, tls=tls)
    if args.endpoints is not None:
        return Client.from_endpoints(args.endpoints, deadline=deadline, tls=tls)
    return Client.seed_scheme(
        DEFAULT_FIRST_PORT if args.first_port is None else args.first_port,
        DEFAULT_NODES if args.nodes is None else args.nodes,
        deadline=deadline,
        tls=tls,
    )


def _tls_from_args(parser: _Parser, args: argparse.Namespace) -> TlsConfig | None:
    """The TLS settings the flags ask for (TlsError for an unusable file), or None: plain text."""
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_ca is None and args.tls_cert is None:
        if args.tls_server_name is not None:
            parser.error("--tls-server-name needs --tls-ca")
        return None
    return TlsConfig.load(args.tls_cert, args.tls_key, args.tls_ca, args.tls_server_name)


def _check_operands(parser: _Parser, args: argparse.Namespace) -> None:
    """Command-line shapes argparse cannot express: cas's optional EXPECTED, put-many's pairs."""
    problem = lease_operand_problem(args) or coordination_operand_problem(args)
    if problem is not None:
        parser.error(problem)
    if args.command == "cas":
        if args.absent and args.rev is not None:
            parser.error("cas takes --absent or --rev, not both")
        wanted = 2 if args.absent or args.rev is not None else 3
        if len(args.operands) != wanted:
            parser.error(
                "cas takes KEY EXPECTED NEW, --absent KEY NEW, or --rev N KEY NEW"
                + (" (no EXPECTED with --absent or --rev)" if wanted == 2 else "")
            )
        if args.rev is not None and args.rev < 0:
            parser.error(f"cas --rev takes a revision (0: absent), not {args.rev}")
    elif args.command in ("get", "delete", "watch"):
        problem = key_operand_problem(args)
        if problem is not None:
            parser.error(problem)
    elif args.command == "put-many":
        mappings: dict[str, str] = {}
        for pair in args.pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                parser.error(f"put-many takes KEY=VALUE pairs; {pair!r} has no '='")
            if key in mappings:
                parser.error(f"put-many: key {key!r} is given twice")
            mappings[key] = value
        args.mappings = mappings
    elif args.command == "transfer-leader" and not 0 <= args.target < MAX_NODE_ID:
        parser.error("transfer-leader takes a node id, or 0 for any node")
    elif args.command == "member" and args.action == "add":
        try:
            check_new_member(NodeAddress(args.node_id, args.raft_address, args.client_address))
        except MembershipError as e:
            parser.error(f"member add: {e}")
    elif (
        args.command == "member" and args.action == "remove" and not 0 < args.node_id < MAX_NODE_ID
    ):
        parser.error(
            f"member remove: node id must be a positive integer below 2^62, not {args.node_id}"
        )


async def _run_command(client: Client, args: argparse.Namespace) -> int:
    async with client:
        if args.command == "put":
            await client.propose_mapping(args.key, args.value, lease=args.lease or 0)
            return EXIT_OK
        if args.command in LEASE_COMMANDS:
            return await run_lease_command(client, args)
        if args.command in COORDINATION_COMMANDS:
            return await run_coordination_command(client, args)
        if args.command in ("get", "delete", "watch"):
            # Prefixes, revisions and watches (cli_kv.py); a plain get or delete is answered here.
            handled = await run_kv_command(client, args)
            if handled is not None:
                return handled
        if args.command == "cas" and args.rev is not None:
            return await run_cas_revision(client, args)
        if args.command == "get":
            value = await client.get_value(args.key, default=None, stale=args.stale)
            if value is None:
                print(f"{PROG}: key {args.key!r} is not set", file=sys.stderr)
                return EXIT_MISSING_KEY
            print(value)
            return EXIT_OK
        if args.command == "delete":
            if not await client.delete(args.key):
                print(f"{PROG}: key {args.key!r} was not set", file=sys.stderr)
                return EXIT_MISSING_KEY
            return EXIT_OK
        if args.command == "cas":
            key, *rest = args.operands
            expected = None if args.absent else rest[0]
            swapped, current = await client.compare_and_swap(key, expected, rest[-1])
            if not swapped:
                now = "is not set" if current is None else f"holds {current!r}"
                print(f"{PROG}: not swapped: key {key!r} {now}", file=sys.stderr)
                return EXIT_NOT_SWAPPED
            print(current)
            return EXIT_OK
        if args.command == "put-many":
            await client.propose_mappings(args.mappings)
            return EXIT_OK
        if args.command == "transfer-leader":
            print(await client.transfer_leadership(args.target))
            return EXIT_OK
        if args.command == "member":
            return await _run_member_command(client, args)
        if args.command == "status":
            return await _run_status_command(client, args)
        if args.command == "events":
            return await _run_events_command(client, args)
        if args.command == "snapshot":
            timeout = DEFAULT_SNAPSHOT_TIMEOUT if args.timeout is None else args.timeout
            backup = await client.save_snapshot(args.file, timeout=timeout)
            first, *rest = describe(backup)
            print("\n".join([f"saved {first}", *rest]))
            return EXIT_OK
        leader_id, address = await client.leader()
        print(f"{leader_id} {address}")
        return EXIT_OK


def _describe_members(members: MemberList) -> list[str]:
    """`member list`: one aligned line per member, the leader marked."""
    width = max((len(str(m.id)) for m in members.members), default=0)
    raft_width = max((len(m.raft_address) for m in members.members), default=0)
    lines = []
    for m in members.members:
        line = (
            f"{m.id:<{width}}  {'voter' if m.voter else 'learner':<7}  "
            f"raft {m.raft_address:<{raft_width}}  client {m.client_address}"
        )
        if m.id == members.leader_id:
            line += "  (leader)"
        lines.append(line)
    return lines


def _members_json(members: MemberList) -> str:
    return json.dumps(
        {
            "members": [
                {
                    "id": m.id,
                    "voter": m.voter,
                    "raft_address": m.raft_address,
                    "client_address": m.client_address,
                }
                for m in members.members
            ],
            "removed": members.removed,
            "config_index": members.config_index,
            "committed": members.committed,
            "leader": members.leader_id,
        }
    )


_STATUS_COLUMNS = (
    "ID",
    "RAFT ADDR",
    "CLIENT ADDR",
    "ROLE",
    "TERM",
    "COMMIT",
    "APPLIED",
    "LAG",
    "LAST CONTACT",
)
ROLE_STYLES = {
    "leader": "bold green",
    "candidate": "bold yellow",
    "learner": "cyan",
    "unreachable": "bold red",
    "not a member": "dim",
}


def _status_cells(node: MemberStatus) -> list[str]:
    ident = "?" if node.id is None else str(node.id)
    lag = "-" if node.lag is None else str(node.lag)
    contact = "-" if node.last_contact is None else f"{node.last_contact * 1000:.0f} ms ago"
    if not node.reachable:
        where = [ident, node.raft_address or "?", node.client_address, "unreachable"]
        return where + ["-"] * 3 + [lag, contact]
    role = node.role if node.voter else ("learner" if node.learner else "not a member")
    return [
        ident,
        node.raft_address,
        node.client_address,
        role,
        str(node.term),
        str(node.commit_index),
        str(node.applied_index),
        lag,
        contact,
    ]


def _status_table(status: ClusterStatus) -> list[str]:
    """`status`: a boxed table, one row per member, as `etcdctl endpoint status -w table`."""
    rows = [_status_cells(n) for n in status.nodes]
    widths = [max(len(c[i]) for c in [list(_STATUS_COLUMNS), *rows]) for i in range(9)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: Sequence[str], numeric: bool) -> str:
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
            # Numbers line up on the right, words on the left.
            right = numeric and 4 <= i <= 7
            out.append(f" {cell:>{width}} " if right else f" {cell:<{width}} ")
        return "|" + "|".join(out) + "|"

    return [
        rule,
        line(_STATUS_COLUMNS, False),
        rule,
        *(line(r, True) for r in rows),
        rule,
    ]


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _status_json(status: ClusterStatus) -> str:
    nodes = []
    for n in status.nodes:
        entry: dict[str, Any] = {
            "id": n.id,
            "raft_address": n.raft_address or None,
            "client_address": n.client_address,
            "reachable": n.reachable,
            "error": n.error,
        }
        if n.reachable:
            entry.update(
                role=n.role,
                term=n.term,
                leader_id=n.leader_id,
                commit_index=n.commit_index,
                applied_index=n.applied_index,
                last_log_index=n.last_log_index,
                snapshot_index=n.snapshot_index,
                voter=n.voter,
                learner=n.learner,
                serving=n.serving,
                time_scale=n.time_scale,
            )
        # The leader's view, known also for a node that did not answer.
        entry.update(lag=n.lag, last_contact_seconds=_rounded(n.last_contact))
        nodes.append(entry)
    return json.dumps({"leader": status.leader_id, "nodes": nodes})


def _status_notes(status: ClusterStatus) -> list[str]:
    notes = []
    for node in status.unreachable:
        name = node.id if node.id is not None else node.client_address
        notes.append(f"{PROG}: {name} is unreachable: {node.error}")
    if status.leader_id is None:
        notes.append(f"{PROG}: no node reports itself leader")
    return notes


def _time_scale_note(status: ClusterStatus) -> str | None:
    scales = sorted({n.time_scale for n in status.nodes if n.reachable and n.time_scale != 1})
    if not scales:
        return None
    return "Raft timers scaled by " + ", ".join(f"{s:g}" for s in scales) + " (--time-scale)"


def _row_style(node: MemberStatus) -> Any:
    role = _status_cells(node)[3]

    def style(column: int) -> str:
        if column == 3:
            return ROLE_STYLES.get(role, "")
        if column == 7:
            return lag_style(node.lag)
        if column == 8:
            return contact_style(node.last_contact)
        return "dim" if not node.reachable else ""

    return style


async def _run_status_command(client: Client, args: argparse.Namespace) -> int:
    live = None
    if args.watch is not None and not args.json and is_terminal(sys.stdout):
        # Redrawn in place on a terminal; one table after another when piped.
        live = LiveTable(_STATUS_COLUMNS)
    try:
        while True:
            status = await client.status()
            scale = _time_scale_note(status)
            if args.json:
                print(_status_json(status), flush=True)
            elif live is not None:
                rows = [_status_cells(n) for n in status.nodes]
                styles = [_row_style(n) for n in status.nodes]
                live.show(rows, styles, ([scale] if scale else []) + _status_notes(status))
            else:
                print("\n".join(_status_table(status)), flush=True)
                if scale:
                    print(scale, flush=True)
                for note in _status_notes(status):
                    print(note, file=sys.stderr)
            if args.watch is None:
                healthy = status.leader_id is not None and not status.unreachable
                return EXIT_OK if healthy else EXIT_UNAVAILABLE
            await asyncio.sleep(args.watch)
    finally:
        if live is not None:
            live.stop()


async def _run_events_command(client: Client, args: argparse.Namespace) -> int:
    """Print events until Ctrl-C (which main turns into exit 0)."""
    try:
        client.event_addresses(args.node)
    except ConfigError as e:
        print(f"{PROG}: error: --node: {e}", file=sys.stderr)
        return EXIT_USAGE
    merge = args.node is None
    printer = EventPrinter(args.json, merge)

    def unreachable(address: str, reason: str) -> None:
        printer.note(f"{PROG}: {address} is unreachable ({reason}); trying again")

    async def flush_held() -> None:
        while True:
            await asyncio.sleep(0.1)
            printer.flush(time.time())

    flusher = asyncio.create_task(flush_held()) if merge else None
    try:
        async for event in client.events(args.node, on_unreachable=unreachable):
            printer.add(event, time.time())
    finally:
        if flusher is not None:
            flusher.cancel()
        printer.flush()
    return EXIT_OK


async def _run_member_command(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        members = await client.members(stale=args.stale)
        print(_members_json(members) if args.json else "\n".join(_describe_members(members)))
        return EXIT_OK
    if args.action == "remove":
        after = await client.remove_member(args.node_id)
        print(f"removed {args.node_id} at index {after.config_index}")
        return EXIT_OK
    timeout = DEFAULT_ADD_MEMBER_TIMEOUT if args.timeout is None else args.timeout
    wait = not args.no_wait
    after = await client.add_member(
        args.node_id, args.raft_address, args.client_address, wait, timeout=timeout
    )
    added = f"added {args.node_id} ({args.raft_address}, client {args.client_address})"
    member = after.member(args.node_id)
    if member is None:
        # Removed again by a concurrent change before this reply was made.
        print(
            f"{PROG}: {args.node_id} is not a member of the configuration at index "
            f"{after.config_index}",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    if member.voter:
        print(f"{added} as a learner; promoted to voter at index {after.config_index}")
    elif wait:
        print(f"{added} as a learner; still catching up (promoted to voter once it has)")
    else:
        print(
            f"{added} as a learner at index {after.config_index}; "
            "promoted to voter once it has caught up"
        )
    return EXIT_OK


def _run_coroutine(coroutine: Coroutine[Any, Any, _T]) -> _T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _build_parser()
    whole = list(sys.argv[1:] if argv is None else argv)
    ours, command = split_command(whole)
    args = parser.parse_args(ours) if command else None
    if args is None or args.command != "lock":
        args = parser.parse_args(whole)
    else:
        args.run = command
    _check_operands(parser, args)
    try:
        client = _client_from_args(parser, args)
    except (ConfigError, TlsError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "snapshot" and args.action == "status":
        try:
            print("\n".join(describe(read_backup(args.file))))
        except BackupError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return EXIT_REFUSED
        return EXIT_OK
    if args.command == "web":
        import web_view

        return web_view.run_for_client(client, args.port, _tls_from_args(parser, args))
    try:
        return _run_coroutine(_run_command(client, args))
    except MembershipRefusedError as e:
        print(f"{PROG}: refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except PermissionDeniedError as e:
        print(f"{PROG}: permission denied: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RequestRejectedError as e:
        print(f"{PROG}: rejected: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LeaseNotFoundError as e:
        print(f"{PROG}: lease gone: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except WatchCompactedError as e:
        print(f"{PROG}: compacted: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except ClusterUnavailableError as e:
        print(f"{PROG}: unavailable: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except SessionExpiredError as e:
        print(f"{PROG}: outcome unknown: the client session expired: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except BackupError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as e:
        if args.command != "snapshot":
            raise
        # The backup file, or the temporary file beside it, cannot be written.
        print(f"{PROG}: cannot write {e.filename or args.file}: {e.strerror or e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        if args.command in ("events", "watch", "keepalive", "lock", "elect") or (
            args.command == "status" and args.watch is not None
        ):
            return EXIT_OK  # how --watch and events are meant to end
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
