"""Profiles of a leader and a follower under load: `python -m test.bench_profile --label before`.

Starts five nodes (as the benchmark does), drives them with 64 writers from this process and, while
they run, records the leader and one follower with py-spy (`pip install py-spy`; it reads other
processes' memory, so it needs root or ptrace permission). Writes, per node, the speedscope file
(open it at https://www.speedscope.app) and a text summary: the functions with the most samples of
their own, and with the most samples in them or their callees.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import uvloop

from test.bench_systems import RaftDemo
from test.benchmark import Workload, operation_for

# The py-spy program: the one installed beside this Python, else the one on PATH.
PY_SPY = ""


def summarise(raw: str, top: int = 25) -> str:
    """Own and total sample shares per function, from py-spy's collapsed-stack ("raw") output."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        # Each frame reads "function (file:line)"; the line number is dropped to group by function.
        frames = [f.rsplit(":", 1)[0] + ")" if ":" in f else f for f in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    lines = [f"# {samples} samples", "", f"## top {top} by own time"]
    lines += [f"{100 * n / samples:6.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", f"## top {top} by total time (own + callees)"]
    lines += [f"{100 * n / samples:6.1f}%  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines) + "\n"


def _write_summary(base: Path, header: str) -> None:
    raw = Path(f"{base}.raw.txt").read_text()
    Path(f"{base}.txt").write_text(header + summarise(raw))


async def _drive(system: RaftDemo, seconds: float, clients: int, started: asyncio.Event) -> int:
    driver = system.driver()
    try:
        await driver.find_leader(10)
        operation = operation_for(Workload("write", "v" * 64, []), driver, clients, "profile")
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + seconds
        done = 0

        async def task(t: int) -> None:
            nonlocal done
            i = 0
            while loop.time() < stop_at:
                await operation(t, i)
                i += 1
                done += 1

        started.set()
        await asyncio.gather(*(task(t) for t in range(clients)))
        return done
    finally:
        await driver.close()


async def _run(out: Path, label: str, seconds: float, clients: int, rate: int) -> None:
    system = RaftDemo()
    try:
        system.start(5)
        await system.wait_ready()
        assert system.cluster is not None
        cluster = system.cluster
        leader = await cluster.wait_for_leader(timeout=20)
        follower = next(n for n in cluster.node_ids if n != leader)
        started = asyncio.Event()
        drive = asyncio.ensure_future(_drive(system, seconds + 2, clients, started))
        await started.wait()
        await asyncio.sleep(1)  # into the steady state
        records = {}
        for role, node in (("leader", leader), ("follower", follower)):
            base = out / f"{label}-{role}-{clients}-writers"
            command = [
                PY_SPY,
                "record",
                "--pid",
                str(cluster.pid(node)),
                "--rate",
                str(rate),
                "--duration",
                str(int(seconds)),
                "--nonblocking",
            ]
            records[role] = (
                base,
                await asyncio.create_subprocess_exec(
                    *command,
                    "--format",
                    "raw",
                    "--output",
                    f"{base}.raw.txt",
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                ),
            )
        for role, (base, proc) in records.items():
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(
                    f"py-spy failed on the {role} ({proc.returncode}): {err.decode()[-500:]}"
                )
            header = (
                f"py-spy record --rate {rate} --nonblocking --format raw, {seconds:g} s, the "
                f"{role} of five nodes on loopback at --log-level WARNING, {clients} writers of "
                f"64-byte values from one client process ({label}).\n"
            )
            await asyncio.to_thread(_write_summary, base, header)
            print(f"wrote {base}.txt and {base}.raw.txt")
        ops = await drive
        print(f"{ops} writes in {seconds + 2:g} s")
    finally:
        system.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m test.bench_profile", description=__doc__)
    parser.add_argument("--label", default=time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--out", type=Path, default=Path("bench/profiles"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rate", type=int, default=100)
    args = parser.parse_args(argv)
    global PY_SPY
    beside = Path(sys.executable).parent / "py-spy"
    PY_SPY = str(beside) if beside.is_file() else shutil.which("py-spy") or ""
    if not PY_SPY:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    uvloop.run(_run(args.out, args.label, args.seconds, args.clients, args.rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
