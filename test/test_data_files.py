"""Every file a node keeps in its data directory, damaged (cut short, a byte flipped, garbage): at
start the node either refuses with exit code 1 and one line naming the file, or repairs and says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster_identity import FILE_NAME as CLUSTER_ID_FILE
from log import LOG_FILE, STATE_FILE, RaftLog, _scan_log
from snapshot import DAMAGED_SUFFIX, INCOMING_FILE, SNAPSHOT_PREFIX
from test.cluster_process import LocalCluster
from test.conftest import REPO

KEYS = 30
# Snapshots every 5 entries, keeping 20 behind each: the log then still holds every entry after
# the older of the two snapshots kept, so losing the newest one is recoverable.
NODE_FLAGS = [
    "--snapshot-entries",
    "5",
    "--snapshot-keep-entries",
    "20",
    "--election-timeout-min-ms",
    "150",
    "--election-timeout-max-ms",
    "300",
    "--heartbeat-ms",
    "50",
]


@dataclass
class Golden:
    """A one-node cluster that ran, took writes and stopped cleanly; `pristine` is a copy of its
    data directory as it stopped."""

    cluster: LocalCluster
    node_id: int
    pristine: Path


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Golden]:
    root = tmp_path_factory.mktemp("golden")
    cluster = LocalCluster(1, data_dir=root / "nodes", extra_args=NODE_FLAGS)
    try:
        cluster.start()
        (node_id,) = cluster.node_ids

        async def write() -> None:
            await cluster.wait_for_leader(30)
            async with cluster.client(deadline=15) as client:
                for i in range(KEYS):
                    await client.propose_mapping(f"k{i}", f"v{i}")
                # A node waits longer between snapshots when taking one was slow (a loaded
                # machine), so KEYS writes may not yet have compacted the log: more writes, until
                # its header shows a compacted prefix.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                extra = 0
                while cluster.log_bounds(node_id, whole=False)[0] == 0:
                    assert loop.time() < deadline, "the log was never compacted"
                    await client.propose_mapping(f"extra{extra}", "x")
                    extra += 1

        asyncio.run(write())
        assert cluster.stop_node(node_id) == 0
        pristine = root / "pristine"
        shutil.copytree(cluster.node_data_dir(node_id), pristine)
        made = Golden(cluster, node_id, pristine)
        data = (pristine / LOG_FILE).read_bytes()
        scan = _scan_log(str(pristine / LOG_FILE), data)
        assert len(snapshots(pristine)) == 2 and scan.base_index > 0, os.listdir(pristine)
        assert len(scan.entries) >= 3
        yield made
    finally:
        cluster.stop()


# ---- damage -------------------------------------------------------------------------------------


def cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def garbage(path: Path) -> None:
    size = max(path.stat().st_size, 64)
    path.write_bytes(bytes((i * 151 + 7) % 256 for i in range(size)))


def flip_every_snapshot(directory: Path) -> None:
    for path in snapshots(directory):
        flip(path, 60)


def first_record(directory: Path) -> int:
    path = directory / LOG_FILE
    return _scan_log(str(path), path.read_bytes()).offsets[0]


def snapshots(directory: Path) -> list[Path]:
    """The snapshot files kept (not temporary or set aside), oldest first."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.name.startswith(SNAPSHOT_PREFIX)
        and p.name[len(SNAPSHOT_PREFIX) :].replace("-", "").isdigit()
    )


def newest_snapshot(directory: Path) -> Path:
    return snapshots(directory)[-1]


def leftover(name: str, source: str) -> Callable[[Path], None]:
    """A temporary file an interrupted write left: a cut-short copy of `source`."""

    def make(directory: Path) -> None:
        data = (directory / source).read_bytes()
        (directory / name).write_bytes(data[: len(data) // 2])

    return make


def snapshot_leftover(name: str) -> Callable[[Path], None]:
    """A cut-short copy of the newest snapshot under `name` (or its own name and ".tmp")."""

    def make(directory: Path) -> None:
        newest = newest_snapshot(directory)
        leftover(name or newest.name + ".tmp", newest.name)(directory)

    return make


@dataclass(frozen=True)
class Row:
    file: str
    damage: str
    apply: Callable[[Path], None]
    # "refuses" (exit 1, one line naming the file and saying these words) or "recovers" (starts,
    # narrating a line with these words).
    outcome: str
    words: tuple[str, ...]


ROWS = [
    Row("log", "cut short in its last record", lambda d: cut(d / LOG_FILE, -3), "recovers",
        ("torn tail",)),
    Row("log", "cut short inside its header", lambda d: cut(d / LOG_FILE, 3), "refuses",
        ("cut to 3 bytes", "acknowledged")),
    Row("log", "byte flipped in a record that is not the last",
        lambda d: flip(d / LOG_FILE, first_record(d) + 9), "refuses",
        ("corrupt at byte offset", "checksum mismatch")),
    Row("log", "byte flipped in the compacted log header", lambda d: flip(d / LOG_FILE, 11),
        "refuses", ("compacted log header",)),
    Row("log", "garbage", lambda d: garbage(d / LOG_FILE), "refuses", ("bad magic",)),
    Row("state", "cut short", lambda d: cut(d / STATE_FILE, 20), "refuses",
        ("state file is 20 bytes", "vote twice")),
    Row("state", "byte flipped", lambda d: flip(d / STATE_FILE, 12), "refuses",
        ("checksum mismatch", "vote twice")),
    Row("state", "garbage", lambda d: garbage(d / STATE_FILE), "refuses", ("vote twice",)),
    Row("snapshot-*", "newest cut short", lambda d: cut(newest_snapshot(d), -10), "recovers",
        ("damaged snapshot", "older snapshot")),
    Row("snapshot-*", "newest with a byte flipped", lambda d: flip(newest_snapshot(d), 60),
        "recovers", ("damaged snapshot: checksum mismatch", "older snapshot")),
    Row("snapshot-*", "newest garbage", lambda d: garbage(newest_snapshot(d)), "recovers",
        ("damaged snapshot", "older snapshot")),
    Row("snapshot-*", "both with a byte flipped",
        flip_every_snapshot, "refuses",
        ("damaged snapshot", "no valid snapshot covers")),
    Row("snapshot.incoming", "left cut short", snapshot_leftover(INCOMING_FILE), "recovers",
        ("never made current",)),
    Row("log.tmp", "left cut short", leftover("log.tmp", LOG_FILE), "recovers",
        ("never made current",)),
    Row("state.tmp", "left cut short", leftover("state.tmp", STATE_FILE), "recovers",
        ("never made current",)),
    Row("snapshot-*.tmp", "left cut short", snapshot_leftover(""), "recovers",
        ("never made current",)),
    Row("cluster_id.tmp", "left cut short", leftover("cluster_id.tmp", CLUSTER_ID_FILE),
        "recovers", ("never made current",)),
    Row("cluster_id", "cut short", lambda d: cut(d / CLUSTER_ID_FILE, 20), "refuses",
        ("damaged", "--join")),
    Row("cluster_id", "garbage", lambda d: garbage(d / CLUSTER_ID_FILE), "refuses",
        ("damaged", "--join")),
    # LOCK is only ever locked, never read: what it holds does not matter.
    Row("LOCK", "garbage", lambda d: garbage(d / "LOCK"), "recovers", ()),
]  # fmt: skip


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


async def refused(golden: Golden, row: Row, directory: Path) -> str | None:
    """Start a node on a damaged copy; None if it refused as the row says, else what went wrong."""
    shutil.copytree(golden.pristine, directory)
    row.apply(directory)
    named = newest_snapshot(directory).name if row.file == "snapshot-*" else row.file
    before = contents(directory)
    port = str(golden.node_id)
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "raft_node.py", "--port", port, "--first-port", port, "--nodes", "1"],
        *["--data-dir", str(directory)],
        cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return "still running after 30 s"
    lines = (out + err).decode().strip().splitlines()
    if proc.returncode != 1 or len(lines) != 1:
        return f"exit code {proc.returncode}, output {lines}"
    line = lines[0]
    # Every remedy ends in adding the node back with --join, when nothing can be restored.
    wanted = [f"{directory / named}:", *row.words, "--join"]
    missing = [w for w in wanted if w not in line]
    if missing or "Traceback" in line:
        return f"the line {line!r} lacks {missing}"
    if contents(directory) != before:
        return "the data directory was changed although the node refused to start"
    return None


async def test_every_file_of_a_data_directory_damaged_stops_or_is_repaired_at_start(
    golden: Golden, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each row damages one file of a cleanly stopped node's directory. Refusals run as real
    processes (several at once: a refusing node binds no port); repairs are checked by opening
    the directory as a node does (the next test starts a real node on all of them at once)."""
    problems: dict[str, str] = {}
    refusals = [r for r in ROWS if r.outcome == "refuses"]
    outcomes = await asyncio.gather(
        *(refused(golden, row, tmp_path / f"refuses-{i}") for i, row in enumerate(refusals))
    )
    for row, problem in zip(refusals, outcomes, strict=True):
        if problem is not None:
            problems[f"{row.file}, {row.damage}"] = problem

    older = snapshots(golden.pristine)[0].name
    for i, row in enumerate(r for r in ROWS if r.outcome == "recovers"):
        directory = tmp_path / f"recovers-{i}"
        shutil.copytree(golden.pristine, directory)
        row.apply(directory)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            log = await RaftLog.open(directory)
        await log.close()
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        names = sorted(p.name for p in directory.iterdir())
        if not row.words:
            ok = not lines
        else:
            ok = len(lines) == 1 and all(w in lines[0] for w in row.words)
        if row.file == "snapshot-*":
            ok = ok and log.restored is not None and log.restored.meta.path.endswith(older)
            ok = ok and sum(n.endswith(DAMAGED_SUFFIX) for n in names) == 1
        if not ok or any(n.endswith(".tmp") or n == INCOMING_FILE for n in names):
            problems[f"{row.file}, {row.damage}"] = f"narrated {lines}; left {names}"
    assert not problems, "\n".join(f"{k}: {v}" for k, v in problems.items())


async def test_a_node_repairs_every_recoverable_damage_narrates_it_and_loses_no_write(
    golden: Golden,
) -> None:
    """A real node on a directory with the newest snapshot damaged, every kind of temporary file
    left behind and a garbage LOCK: it starts from the older snapshot and the log, serves every
    acknowledged write, and says what it repaired."""
    cluster, node_id = golden.cluster, golden.node_id
    directory = cluster.node_data_dir(node_id)
    shutil.rmtree(directory)
    shutil.copytree(golden.pristine, directory)
    for row in ROWS:
        # Not the torn log tail: it loses the last write, and every write is read back below.
        if row.outcome == "recovers" and row.file != "log" and row.damage != "newest garbage":
            row.apply(directory)
    offset = cluster.log_size(node_id)
    cluster.start_node(node_id)
    await cluster.wait_for_leader(30)
    async with cluster.client(deadline=15) as client:
        for i in range(KEYS):
            assert await client.get_value(f"k{i}") == f"v{i}"
    narration = cluster.node_log_since(node_id, offset)
    assert "set it aside" in narration and "started from the older snapshot" in narration
    assert narration.count("never made current") == 5, narration
    assert "Traceback" not in narration
    assert cluster.stop_node(node_id) == 0
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp") or n == INCOMING_FILE]
