"""The command line's leases: `grant`, `keepalive`, `revoke`, `lease` and `leases` (`put --lease`
is cluster_cli.py's put; locks and elections are cli_coordination.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from cluster_client import Client, LeaseNotFoundError

PROG = "cluster_client.py"
EXIT_OK = 0
EXIT_LEASE_GONE = 1
LEASE_COMMANDS = ("grant", "keepalive", "revoke", "lease", "leases")


def add_lease_commands(commands: Any) -> None:
    """The lease commands' parsers (`commands`: the subparsers of the command line)."""
    grant = commands.add_parser(
        "grant",
        help="grant a lease of TTL seconds and print its id (keys put with --lease ID go when "
        "it is revoked or expires)",
    )
    grant.add_argument("ttl", type=int, metavar="TTL")
    grant.add_argument("--id", type=int, default=0, metavar="N", help="the lease id wanted")
    keepalive = commands.add_parser(
        "keepalive",
        help="keep lease ID alive once (or with --forever, every TTL/3 until Ctrl-C) and print "
        "its TTL; exits 1 when the lease is gone",
    )
    keepalive.add_argument("id", type=int, metavar="ID")
    keepalive.add_argument("--forever", action="store_true", help="until Ctrl-C")
    revoke = commands.add_parser(
        "revoke", help="revoke lease ID now; prints how many keys went with it"
    )
    revoke.add_argument("id", type=int, metavar="ID")
    lease = commands.add_parser(
        "lease", help="print lease ID's TTL, the seconds it has left and its keys"
    )
    lease.add_argument("id", type=int, metavar="ID")
    commands.add_parser("leases", help="print the id of every lease, one a line")


def lease_operand_problem(args: argparse.Namespace) -> str | None:
    if args.command == "grant":
        if args.ttl < 1:
            return f"grant takes a TTL of at least 1 second, not {args.ttl}"
        if args.id < 0:
            return f"grant --id takes a positive lease id, not {args.id}"
    elif args.command in ("keepalive", "revoke", "lease") and args.id < 1:
        return f"{args.command} takes a lease id (a positive number), not {args.id}"
    elif args.command == "put" and args.lease is not None and args.lease < 1:
        return f"put --lease takes a lease id (a positive number), not {args.lease}"
    return None


async def run_lease_command(client: Client, args: argparse.Namespace) -> int:
    """Run one of LEASE_COMMANDS; LeaseNotFoundError says the lease is gone (exit 1)."""
    if args.command == "grant":
        granted = await client.grant_lease(args.ttl, lease_id=args.id)
        print(granted.id)
        return EXIT_OK
    if args.command == "revoke":
        print(await client.revoke_lease(args.id))
        return EXIT_OK
    if args.command == "lease":
        info = await client.lease_time_to_live(args.id, keys=True)
        print(f"lease {info.id}: TTL {info.granted_ttl} s, {info.remaining:.1f} s left")
        for key in info.keys:
            print(key)
        return EXIT_OK
    if args.command == "leases":
        for lease_id in await client.leases():
            print(lease_id)
        return EXIT_OK
    loop = asyncio.get_running_loop()
    while True:
        sent = loop.time()
        try:
            ttl = await client.keep_alive(args.id)
        except LeaseNotFoundError as e:
            print(f"{PROG}: lease gone: {e}", file=sys.stderr)
            return EXIT_LEASE_GONE
        print(f"lease {args.id} kept alive: TTL {ttl} s", flush=True)
        if not args.forever:
            return EXIT_OK
        await asyncio.sleep(max(0.0, sent + ttl / 3 - loop.time()))
