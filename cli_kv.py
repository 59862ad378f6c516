"""The command line's ranges, revisions and watches: `get --prefix`, `get --json`,
`delete --prefix`, `cas --rev` and `watch` (the rest of the command line is cluster_cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from client_kv import KeyValue, WatchEvent
from cluster_client import Client

PROG = "cluster_client.py"
EXIT_OK = 0
EXIT_MISSING_KEY = 1
EXIT_NOT_SWAPPED = 4


def add_watch_command(commands: Any) -> None:
    """The `watch` command's parser (`commands`: the subparsers of the command line)."""
    watch = commands.add_parser(
        "watch",
        help="print every change to KEY (or with --prefix, to every key starting with KEY) as "
        "it happens, one line per change, until Ctrl-C",
    )
    watch.add_argument("key", nargs="?", metavar="KEY")
    watch.add_argument(
        "--prefix", action="store_true", help='KEY is a prefix ("" or none: every key)'
    )
    watch.add_argument(
        "--rev",
        type=int,
        default=0,
        metavar="N",
        help="start with the changes from revision N (default: from now on)",
    )
    watch.add_argument("--prev", action="store_true", help="with each change, the value before")
    watch.add_argument("--json", action="store_true", help="one JSON object per change")


def key_operand_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with get/delete/watch's KEY and --prefix, if anything."""
    if args.command == "watch":
        if args.key is None and not args.prefix:
            return "watch takes KEY, or --prefix [P]"
        if args.rev < 0:
            return f"watch --rev takes a revision, not {args.rev}"
        return None
    if (args.key is None) == (args.prefix is None):
        return f"{args.command} takes KEY or --prefix P (one of them)"
    if args.command == "get" and args.prefix is None and (args.limit or args.keys_only):
        return "--limit and --keys-only go with --prefix"
    if args.command == "get" and args.limit is not None and args.limit < 1:
        return f"--limit takes a positive number of keys, not {args.limit}"
    return None


def _kv_json(kv: KeyValue) -> dict[str, Any]:
    doc: dict[str, Any] = {"key": kv.key}
    if kv.value is not None:
        doc["value"] = kv.value
    doc.update(create_revision=kv.create_revision, mod_revision=kv.mod_revision, version=kv.version)
    return doc


def watch_line(event: WatchEvent, as_json: bool, prev: bool) -> str:
    """One change as the `watch` command prints it."""
    if as_json:
        doc: dict[str, Any] = {"type": event.type, "key": event.key}
        if event.value is not None:
            doc["value"] = event.value
        doc.update(
            revision=event.revision,
            create_revision=event.create_revision,
            version=event.version,
        )
        if prev:
            doc["prev_value"] = event.prev_value
        return json.dumps(doc, ensure_ascii=False)
    line = f"{event.revision} {event.type.upper()} {event.key}"
    if event.value is not None:
        line += f" {event.value}"
    if prev:
        line += " (was absent)" if event.prev_value is None else f" (was {event.prev_value})"
    return line


async def run_kv_command(client: Client, args: argparse.Namespace) -> int | None:
    """Run get --prefix / get --json / delete --prefix / watch; None: not one of those."""
    if args.command == "watch":
        async for event in client.watch(
            args.key or "",
            prefix=args.prefix,
            start_revision=args.rev,
            prev_value=args.prev,
        ):
            print(watch_line(event, args.json, args.prev), flush=True)
        return EXIT_OK  # pragma: no cover (a watch never ends by itself)
    if args.command == "delete":
        if args.prefix is None:
            return None
        deleted, _ = await client.delete_prefix(args.prefix)
        print(deleted)
        return EXIT_OK
    if args.prefix is not None:
        kvs = await client.get_prefix(
            args.prefix, limit=args.limit, stale=args.stale, keys_only=args.keys_only
        )
        if args.json:
            print(json.dumps({"kvs": [_kv_json(kv) for kv in kvs]}, ensure_ascii=False))
        else:
            for kv in kvs:
                print(kv.key if kv.value is None else f"{kv.key}\t{kv.value}")
        return EXIT_OK
    if not args.json:
        return None
    found = await client.get_kv(args.key, stale=args.stale)
    if found is None:
        print(f"{PROG}: key {args.key!r} is not set", file=sys.stderr)
        return EXIT_MISSING_KEY
    print(json.dumps(_kv_json(found), ensure_ascii=False))
    return EXIT_OK


async def run_cas_revision(client: Client, args: argparse.Namespace) -> int:
    """`cas --rev N KEY NEW`: swap only if KEY's mod revision is N (0: absent)."""
    key, new = args.operands
    outcome = await client.compare_and_swap_revision(key, args.rev, new)
    if not outcome.swapped:
        now = (
            "is not set"
            if outcome.value is None
            else f"holds {outcome.value!r} at mod revision {outcome.mod_revision}"
        )
        print(f"{PROG}: not swapped: key {key!r} {now}", file=sys.stderr)
        return EXIT_NOT_SWAPPED
    print(outcome.value)
    return EXIT_OK
