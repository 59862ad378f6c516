"""The command line's lock and election: `lock NAME [--ttl S] [-- COMMAND ARGS...]` and
`elect NAME [VALUE] [--ttl S] [--observe]` (coordination.py does the work)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
from typing import Any

from cluster_client import Client, LeaseNotFoundError
from coordination import Election, Lock, observe

PROG = "cluster_client.py"
EXIT_OK = 0
# The lease was lost while holding the lock (or leading): someone else may hold it now.
EXIT_LOST = 5
COORDINATION_COMMANDS = ("lock", "elect")
# The environment variables COMMAND gets: the lock's fencing token, and its key.
TOKEN_VARIABLE = "RAFT_DEMO_LOCK_REVISION"
KEY_VARIABLE = "RAFT_DEMO_LOCK_KEY"
# A command still running this long after SIGTERM (its lock lost) gets SIGKILL.
KILL_GRACE = 5.0
DEFAULT_TTL = 10


def add_coordination_commands(commands: Any) -> None:
    """The lock and elect commands' parsers (`commands`: the subparsers of the command line)."""
    lock = commands.add_parser(
        "lock",
        help="lock NAME [--ttl S] [-- COMMAND ARGS...]: take lock NAME (waiting for it), run "
        "COMMAND while holding it and release it after; "
        f"COMMAND gets the fencing token in ${TOKEN_VARIABLE}; exits with COMMAND's code. "
        "Without COMMAND, hold it until Ctrl-C",
    )
    lock.add_argument("name", metavar="NAME")
    lock.add_argument(
        "--ttl",
        type=int,
        default=DEFAULT_TTL,
        metavar="S",
        help=f"the lease's TTL: a holder that dies frees the lock within about S seconds "
        f"(default {DEFAULT_TTL})",
    )
    # COMMAND comes after "--" (split_command takes it off before parsing).
    lock.set_defaults(run=[])
    elect = commands.add_parser(
        "elect",
        help="campaign in election NAME with VALUE and print the leader's value each time it "
        "changes, until Ctrl-C (which resigns); with --observe, only print",
    )
    elect.add_argument("name", metavar="NAME")
    elect.add_argument("value", nargs="?", metavar="VALUE")
    elect.add_argument("--ttl", type=int, default=DEFAULT_TTL, metavar="S")
    elect.add_argument("--observe", action="store_true", help="print the leader only")


def coordination_operand_problem(args: argparse.Namespace) -> str | None:
    if args.command not in COORDINATION_COMMANDS:
        return None
    if not args.name or args.name.endswith("/"):
        return f"{args.command} takes a NAME that is not empty and does not end with '/'"
    if args.ttl < 1:
        return f"{args.command} --ttl takes at least 1 second, not {args.ttl}"
    if args.command == "lock":
        return None
    if (args.value is None) != args.observe:
        return "elect takes NAME VALUE to campaign, or NAME --observe to watch"
    return None


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """For `lock`: the command line before the first "--", and the COMMAND after it (the caller
    parses the whole line again when its command is not lock: a "--" there still lets a key
    start with "-")."""
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    if "lock" not in argv[:at]:
        return argv, []
    return argv[:at], argv[at + 1 :]


async def run_coordination_command(client: Client, args: argparse.Namespace) -> int:
    if args.command == "lock":
        return await _run_lock(client, args)
    return await _run_elect(client, args)


def _die_with_parent() -> None:
    """In COMMAND's process before it runs: die when the lock's process does (even by SIGKILL),
    so that it does not go on working without the lock."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


async def _run_lock(client: Client, args: argparse.Namespace) -> int:
    async with client.lease(args.ttl) as lease:
        lock = Lock(client, args.name, lease)
        try:
            token = await lock.acquire(f"{socket.gethostname()}:{os.getpid()}")
        except LeaseNotFoundError as e:
            print(f"{PROG}: lost the lease before getting lock {args.name!r}: {e}", file=sys.stderr)
            return EXIT_LOST
        try:
            if not args.run:
                print(f"{lock.key} {token}", flush=True)
                await lease.lost.wait()
            else:
                env = dict(os.environ, **{TOKEN_VARIABLE: str(token), KEY_VARIABLE: lock.key})
                process = await asyncio.create_subprocess_exec(
                    *args.run, env=env, preexec_fn=_die_with_parent
                )
                waiting = asyncio.ensure_future(process.wait())
                lost = asyncio.ensure_future(lease.lost.wait())
                try:
                    await asyncio.wait([waiting, lost], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    lost.cancel()
                    if not waiting.done():
                        await _stop(process)
                code = await waiting
                if not lease.lost.is_set():
                    return code if code >= 0 else 128 - code
            print(
                f"{PROG}: lost lock {args.name!r} (token {token}): {lease.reason}; another "
                "holder may have it now",
                file=sys.stderr,
            )
            return EXIT_LOST
        finally:
            if not lease.lost.is_set():
                with contextlib.suppress(Exception):
                    await lock.release()


async def _stop(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), KILL_GRACE)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()


async def _run_elect(client: Client, args: argparse.Namespace) -> int:
    async def show() -> None:
        async for holder in observe(client, args.name):
            print("(no leader)" if holder is None else holder.value, flush=True)

    if args.observe:
        await show()
        return EXIT_OK  # pragma: no cover (observing never ends by itself)
    shower = asyncio.ensure_future(show())
    try:
        async with client.lease(args.ttl) as lease:
            election = Election(client, args.name, lease)
            try:
                await election.campaign(args.value)
                await lease.lost.wait()
            except LeaseNotFoundError:
                pass
            print(f"{PROG}: lost the election's lease: {lease.reason}", file=sys.stderr)
            return EXIT_LOST
    finally:
        shower.cancel()
