"""Locks and elections (coordination.py, cli_coordination.py) on a cluster of real processes:
mutual exclusion among contending tasks with strictly increasing fencing tokens; the `lock` command
running a command under the lock, a holder killed with SIGKILL losing it to the next within its
TTL (and its command with it), a holder whose lease is revoked stopping its command; and `elect`
with two campaigners, an observer and a killed leader."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cluster_client import Client
from coordination import Election, Lock, hold_lock, leader
from lease_keeper import LEASE_TICK
from test.cluster_process import LocalCluster, process_alive
from test.conftest import REPO, wait_until


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    made = LocalCluster(nodes=3)
    try:
        made.start()
        yield made
    finally:
        made.stop()


def cli_args(cluster: LocalCluster, *args: str) -> list[str]:
    where = ["--first-port", str(cluster.first_port), "--nodes", str(cluster.nodes)]
    return [sys.executable, "cluster_client.py", *where, *args]


@contextlib.asynccontextmanager
async def started(cluster: LocalCluster, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """The command line running with `args`, killed (if still running) on the way out."""
    process = await asyncio.create_subprocess_exec(
        *cli_args(cluster, *args),
        cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def line(process: asyncio.subprocess.Process, timeout: float = 15) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(timeout):
        read = await process.stdout.readline()
    assert read, "the process ended without printing"
    return read.decode().rstrip("\n")


async def test_contending_tasks_hold_the_lock_one_at_a_time_with_rising_tokens(
    cluster: LocalCluster,
) -> None:
    sections: list[tuple[float, float, int]] = []
    inside = 0

    async def contend(client: Client, rounds: int) -> None:
        nonlocal inside
        for _ in range(rounds):
            async with hold_lock(client, "mutex", ttl=5) as lock:
                inside += 1
                assert inside == 1, "two holders at once"
                entered = time.monotonic()
                await asyncio.sleep(0.3)  # long beside a round of lock calls
                inside -= 1
                sections.append((entered, time.monotonic(), lock.token))

    clients = [cluster.client() for _ in range(4)]
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(contend(c, 2) for c in clients))
    finally:
        for client in clients:
            await client.close()
    assert len(sections) == 8
    in_order = sorted(sections)
    for (_, left, token), (entered, _, next_token) in zip(in_order, in_order[1:], strict=False):
        assert left <= entered and token < next_token
    async with cluster.client() as client:
        assert await client.get_prefix("mutex/") == []


async def test_a_waiter_whose_lease_is_lost_gets_nothing(cluster: LocalCluster) -> None:
    async with cluster.client() as client, hold_lock(client, "lost-wait", ttl=5):
        async with client.lease(5) as lease:
            waiting = asyncio.create_task(Lock(client, "lost-wait", lease).acquire())
            await wait_until(
                lambda: _count(client, "lost-wait/", 2), timeout=10, what="the waiter's key"
            )
            await client.revoke_lease(lease.id)
            with pytest.raises(Exception, match="lease"):
                async with asyncio.timeout(10):
                    await waiting


async def _count(client: Client, prefix: str, wanted: int) -> bool:
    return len(await client.get_prefix(prefix)) == wanted


@pytest.mark.slow
async def test_the_lock_command_runs_under_the_lock_and_a_killed_holder_loses_it_in_ttl(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    ttl = 2
    pid_file = tmp_path / "holder.pid"
    holder_script = (
        "import os, sys, time; "
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
        "print('token', os.environ['RAFT_DEMO_LOCK_REVISION'], flush=True); time.sleep(120)"
    )
    waiter_script = (
        "import os, sys; print('token', os.environ['RAFT_DEMO_LOCK_REVISION']); sys.exit(7)"
    )
    async with cluster.client() as client:
        async with started(
            cluster,
            "lock",
            "cli-lock",
            "--ttl",
            str(ttl),
            "--",
            sys.executable,
            "-c",
            holder_script,
        ) as holder:
            first = int((await line(holder)).split()[1])
            async with started(
                cluster,
                "lock",
                "cli-lock",
                "--ttl",
                str(ttl),
                "--",
                sys.executable,
                "-c",
                waiter_script,
            ) as waiter:
                await wait_until(
                    lambda: _count(client, "cli-lock/", 2), timeout=15, what="the waiter's key"
                )
                assert waiter.returncode is None  # waiting, not holding
                holder.kill()  # SIGKILL: no release, no revoke; only the lease's expiry frees it
                killed = time.monotonic()
                got = await line(waiter, timeout=ttl + 10)
                took = time.monotonic() - killed
                second = int(got.split()[1])
                assert second > first
                # The lease was kept alive until the kill: at most a TTL and a tick, plus the
                # commit and this machine's slack; and the holder's command died with it.
                assert took <= ttl + LEASE_TICK + 2.0, took
                assert await asyncio.wait_for(waiter.wait(), 15) == 7
                await wait_until(
                    lambda: _async(not process_alive(int(pid_file.read_text()))),
                    timeout=10,
                    what="the killed holder's command to die with it",
                )
        assert await client.get_prefix("cli-lock/") == []


async def _async(value: bool) -> bool:
    return value


async def test_a_lock_holder_whose_lease_is_revoked_stops_its_command_and_exits_5(
    cluster: LocalCluster,
) -> None:
    script = "import time; print('in', flush=True); time.sleep(120)"
    async with cluster.client() as client:
        async with started(
            cluster, "lock", "revoked", "--ttl", "30", "--", sys.executable, "-c", script
        ) as holder:
            assert await line(holder) == "in"
            (key,) = [kv.key for kv in await client.get_prefix("revoked/")]
            await client.revoke_lease(int(key.rsplit("/", 1)[1]))
            assert await asyncio.wait_for(holder.wait(), 15) == 5
            assert holder.stderr is not None
            assert "lost lock 'revoked'" in (await holder.stderr.read()).decode()


async def test_the_lock_command_without_a_command_holds_until_interrupted(
    cluster: LocalCluster,
) -> None:
    async with cluster.client() as client:
        async with started(cluster, "lock", "held", "--ttl", "30") as holder:
            key, token = (await line(holder)).split()
            assert key.startswith("held/") and int(token) > 0
            holder.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(holder.wait(), 15) == 0
        # Released at once, not after the TTL.
        assert await client.get_prefix("held/") == []


@pytest.mark.slow
async def test_elect_with_two_campaigners_an_observer_and_a_killed_leader(
    cluster: LocalCluster,
) -> None:
    ttl = 2
    async with started(cluster, "elect", "chief", "--observe") as observer:
        assert await line(observer) == "(no leader)"
        async with started(cluster, "elect", "chief", "alpha", "--ttl", str(ttl)) as alpha:
            assert await line(alpha) in ("(no leader)", "alpha")
            assert await line(observer) == "alpha"
            async with started(cluster, "elect", "chief", "beta", "--ttl", str(ttl)) as beta:
                assert await line(beta) == "alpha"
                alpha.kill()
                killed = time.monotonic()
                assert await line(beta, timeout=ttl + 10) == "beta"
                assert time.monotonic() - killed <= ttl + LEASE_TICK + 2.0
                assert await line(observer) == "beta"
                beta.send_signal(signal.SIGINT)  # resigns
                assert await asyncio.wait_for(beta.wait(), 15) == 0
                assert await line(observer, timeout=5) == "(no leader)"


async def test_an_election_in_the_library_campaigns_proclaims_and_resigns(
    cluster: LocalCluster,
) -> None:
    async with cluster.client() as client:
        async with client.lease(10) as first, client.lease(10) as second:
            one, two = Election(client, "lib", first), Election(client, "lib", second)
            await one.campaign("one")
            waiting = asyncio.create_task(two.campaign("two"))
            await one.proclaim("one, again")
            found = await leader(client, "lib")
            assert found is not None and found.value == "one, again"
            assert not waiting.done()
            await one.resign()
            async with asyncio.timeout(10):
                assert await waiting > one.revision
            found = await leader(client, "lib")
            assert found is not None and found.value == "two"
