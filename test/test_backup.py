"""Backup and restore: `cluster_client.py snapshot save FILE` takes the leader's whole state at one
applied index into a checksummed file; `raft_node.py ... --restore FILE` builds each node's data
directory of a new cluster from it, with a new cluster id. A damaged, cut short or foreign file
is refused in one line and nothing is written."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from backup_file import BackupMeta, encode_backup, now_ms, read_backup
from backups import MAX_BACKUPS, Backups
from cluster_client import Client
from cluster_config import ClusterConfig
from cluster_identity import FILE_NAME, derive_cluster_id
from log import RaftLog
from membership import Membership
from node_types import OverloadedError
from rpc import raft_pb2, raft_pb2_grpc
from state_machine import KeyValueStateMachine, decode_state
from test.cluster_process import LocalCluster, find_free_port_block
from test.conftest import log_tails, run_script, wait_until
from test.test_snapshot_cluster import MakeCluster, serves_all, write_many

# ---- a backup made without a cluster -------------------------------------------------------


def _state_machine() -> KeyValueStateMachine:
    """Keys and a client session whose compare-and-swap reply (request 1) is remembered."""
    machine = KeyValueStateMachine()
    command = raft_pb2.Command
    machine.apply(
        raft_pb2.LogEntry(
            index=1,
            term=2,
            kind=raft_pb2.ENTRY_KIND_COMMAND,
            command=command(register_client=raft_pb2.RegisterClientRequest()),
        )
    )
    session = raft_pb2.Session(client_id=1, sequence=1, first_outstanding=1)
    cas = raft_pb2.CompareAndSwapRequest(key="cas-key", new_value="mine", session=session)
    machine.apply(
        raft_pb2.LogEntry(
            index=2,
            term=2,
            kind=raft_pb2.ENTRY_KIND_COMMAND,
            command=command(compare_and_swap=cas),
        )
    )
    for index in range(3, 2003):
        machine.apply(raft_pb2.LogEntry(index=index, term=3, key=f"k-{index}", value="v" * 40))
    return machine


def _seed(first_port: int) -> list[str]:
    return ["--first-port", str(first_port), "--nodes", "3"]


def _restore(
    node_id: int, first_port: int, data_dir: Path, backup: Path, *extra: str
) -> tuple[int, str, str]:
    ran = run_script(
        [
            "raft_node.py",
            "--port",
            str(node_id),
            *_seed(first_port),
            "--data-dir",
            str(data_dir),
            "--restore",
            str(backup),
            *extra,
        ]
    )
    return ran.returncode, ran.stdout, ran.stderr


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    return lines[0]


def _cluster_id(data_dir: Path) -> str | None:
    """The cluster id kept in a data directory, as the node reads it."""
    path = data_dir / FILE_NAME
    if not path.exists():
        return None
    words = path.read_text().split()
    assert words[:2] == ["raft-demo", "cluster"], words
    return words[2]


@pytest.fixture
def backup(tmp_path: Path) -> tuple[Path, ClusterConfig, bytes]:
    """A valid backup of a cluster on the seed scheme's ports from a free block."""
    source = ClusterConfig.seed_scheme(find_free_port_block(6), 3)
    machine = _state_machine()
    meta = BackupMeta(
        derive_cluster_id(source), machine.last_applied, 3, now_ms(), Membership.bootstrap(source)
    )
    data = encode_backup(meta, machine.snapshot())
    path = tmp_path / "backup.db"
    path.write_bytes(data)
    return path, source, data


def _other_version(data: bytes) -> bytes:
    """The same backup, as a newer format would write it: valid checksum, format 2."""
    magic, header, rest = data.split(b"\n", 2)
    doc = json.loads(header)
    doc["format"] = 2
    body = magic + b"\n" + json.dumps(doc).encode() + b"\n" + rest[: rest.rindex(b"end ")]
    return body + b"end %d sha256 %s\n" % (len(body), hashlib.sha256(body).hexdigest().encode())


def test_a_damaged_cut_short_or_foreign_file_is_refused_in_one_line_and_nothing_is_written(
    tmp_path: Path, backup: tuple[Path, ClusterConfig, bytes]
) -> None:
    _, source, data = backup
    middle = len(data) // 2
    variants = {
        "flipped.db": (
            data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :],
            "damaged",
        ),
        "truncated.db": (data[:-1000], "truncated"),
        "half.db": (data[: len(data) // 2], "truncated"),
        "trailer-cut.db": (data[:-1], "truncated"),
        "random.db": (os.urandom(len(data)), "not a raft-demo backup file"),
        "empty.db": (b"", "not a raft-demo backup file"),
        "newer.db": (_other_version(data), "format version 2"),
    }
    first_port = min(source.nodes)
    for name, (content, reason) in variants.items():
        path = tmp_path / name
        path.write_bytes(content)
        target = tmp_path / f"restored-{name}"
        code, out, err = _restore(first_port, first_port, target, path)
        line = _one_line(err)
        assert code == 1, (name, code, err)
        assert str(path) in line and reason in line, (name, line)
        assert not target.exists(), f"{name}: a refused restore wrote {target}"
        assert out == ""
    # Nothing beside the files either (no directory half built).
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"backup.db", *variants}, names

    checked = run_script(["cluster_client.py", "snapshot", "status", str(tmp_path / "flipped.db")])
    assert checked.returncode == 1 and "damaged" in _one_line(checked.stderr)
    missing = tmp_path / "missing.db"
    code, _, err = _restore(first_port, first_port, tmp_path / "restored-missing", missing)
    assert code == 1 and str(missing) in _one_line(err) and "cannot read" in err


def test_restore_builds_each_node_of_a_new_cluster_with_a_new_identity(
    tmp_path: Path, backup: tuple[Path, ClusterConfig, bytes]
) -> None:
    path, source, _ = backup
    meta = read_backup(str(path)).meta
    first_port = min(source.nodes)
    root = tmp_path / "new"
    # The same members and token as the cluster backed up: the one case where a cluster id
    # derived from members alone would be the old one.
    for node_id in source.nodes:
        code, out, err = _restore(node_id, first_port, root / str(node_id), path)
        assert code == 0, err
        assert f"index {meta.index}" in out and "without --restore" in out
    ids = {_cluster_id(root / str(n)) for n in source.nodes}
    assert len(ids) == 1 and None not in ids, ids
    assert ids != {meta.cluster_id} and ids != {derive_cluster_id(source)}

    async def opened(directory: Path) -> tuple[int, int, int, Membership, KeyValueStateMachine]:
        """What the node will find at start: its log's bounds, its term, the snapshot's members
        and state."""
        log = await RaftLog.open(directory)
        try:
            restored = log.restored
            assert restored is not None
            machine = KeyValueStateMachine()
            machine.restore(restored.state)
            return log.base_index, log.last_index, log.current_term, restored.members, machine
        finally:
            await log.close()

    base, last, term, members, machine = asyncio.run(opened(root / str(first_port)))
    assert (base, last, term) == (meta.index, meta.index, meta.term)
    assert members == Membership.bootstrap(source)
    assert machine.last_applied == meta.index and machine.get("k-2002") == "v" * 40
    assert machine.has_session(1)

    # A data directory that holds anything is refused unless --force; then it is replaced.
    target = root / str(first_port)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    code, _, err = _restore(first_port, first_port, target, path)
    assert code == 2 and "--force" in _one_line(err) and str(target) in err
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    (target / "stray").write_text("x")
    code, out, err = _restore(first_port, first_port, target, path, "--force")
    assert code == 0, err
    assert "replacing" in out and not (target / "stray").exists()
    assert {p.name for p in target.iterdir()} == set(before)
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "leftovers beside it"

    # Onto other members: those the flags give, never the backup's, and another id again.
    elsewhere = ClusterConfig.seed_scheme(find_free_port_block(6), 3)
    moved = tmp_path / "elsewhere"
    code, _, err = _restore(min(elsewhere.nodes), min(elsewhere.nodes), moved, path)
    assert code == 0, err
    *_, members, machine = asyncio.run(opened(moved))
    assert members == Membership.bootstrap(elsewhere) and machine.last_applied == meta.index
    assert _cluster_id(moved) not in (meta.cluster_id, *ids, derive_cluster_id(elsewhere))


def test_a_node_takes_a_bounded_number_of_backups_at_once() -> None:
    """Each backup holds a copy of the whole state until sent: beyond MAX_BACKUPS, refused."""
    backups = Backups(cast(Any, None), lambda: "0123456789abcdef")
    with ExitStack() as held:
        for _ in range(MAX_BACKUPS):
            held.enter_context(backups.slot())
        with pytest.raises(OverloadedError, match="already being taken"), backups.slot():
            pass
    with backups.slot():
        pass  # every place was given back


# ---- on real clusters ----------------------------------------------------------------------


async def _cas_with_session(address: str) -> raft_pb2.CompareAndSwapRequest:
    """A compare-and-swap in a session of its own; its reply is what a retry must get again."""
    channel = grpc.aio.insecure_channel(address)
    try:
        stub = raft_pb2_grpc.ClusterStub(channel)
        registered = await stub.RegisterClient(raft_pb2.RegisterClientRequest(), timeout=6)
        session = raft_pb2.Session(client_id=registered.client_id, sequence=1, first_outstanding=1)
        cas = raft_pb2.CompareAndSwapRequest(key="cas-key", new_value="mine", session=session)
        first = await stub.CompareAndSwap(cas, timeout=6)
        assert (first.success, first.swapped) == (True, True)
        return cas
    finally:
        await channel.close()


async def _retry_cas(
    cluster: LocalCluster, cas: raft_pb2.CompareAndSwapRequest
) -> raft_pb2.CompareAndSwapResponse:
    async def attempt() -> raft_pb2.CompareAndSwapResponse | None:
        leader = await cluster.wait_for_leader(timeout=15)
        channel = grpc.aio.insecure_channel(cluster.client_address(leader))
        try:
            reply: raft_pb2.CompareAndSwapResponse = await raft_pb2_grpc.ClusterStub(
                channel
            ).CompareAndSwap(cas, timeout=6)
            return reply if reply.success else None
        except grpc.aio.AioRpcError:
            return None
        finally:
            await channel.close()

    return await wait_until(attempt, 20, "the leader answers the retried compare-and-swap")


@pytest.mark.slow
async def test_a_restored_cluster_serves_every_key_and_session_and_refuses_the_old_one(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    old = make_cluster(nodes=3)
    leader = await old.wait_for_leader(timeout=15)
    async with old.client(deadline=20) as client:
        written = await write_many(client, "key", 150)
    cas = await _cas_with_session(old.client_address(leader))
    async with old.client(deadline=20) as client:
        await client.propose_mapping("cas-key", "theirs")

    backup = tmp_path / "backup.db"
    saved = run_script(
        ["cluster_client.py", *_seed(old.first_port), "snapshot", "save", str(backup)]
    )
    assert saved.returncode == 0, saved.stderr + log_tails(old)
    assert saved.stdout.startswith(f"saved {backup}: cluster "), saved.stdout
    nowhere = tmp_path / "missing" / "backup.db"
    failed = run_script(
        ["cluster_client.py", *_seed(old.first_port), "snapshot", "save", str(nowhere)]
    )
    assert failed.returncode == 1 and f"cannot write {nowhere}" in _one_line(failed.stderr)
    old_id = _cluster_id(old.node_data_dir(leader))
    assert old_id is not None and read_backup(str(backup)).meta.cluster_id == old_id
    assert "taking a backup for a client" in old.node_log(await old.wait_for_leader())
    for node_id in old.node_ids:
        old.kill_node(node_id)

    # The new cluster lives where the old one did (same members, same token).
    root = tmp_path / "new"
    for node_id in old.node_ids:
        code, _, err = _restore(node_id, old.first_port, root / str(node_id), backup)
        assert code == 0, err
    new = LocalCluster(nodes=3, first_port=old.first_port, data_dir=root)
    new_ids = {_cluster_id(root / str(n)) for n in new.node_ids}
    assert len(new_ids) == 1 and old_id not in new_ids, (old_id, new_ids)
    (new_id,) = new_ids
    # Node 1 of the old cluster comes back where it lived, with its data, beside the restored
    # cluster's other two: they must not talk, though each has the other's addresses.
    stale, *others = old.node_ids
    try:
        for node_id in others:
            new.start_node(node_id)
        await new.wait_for_leader(timeout=20, exclude=[stale])
        # A running node's data directory is never restored over, not even with --force.
        running = root / str(others[0])
        code, _, err = _restore(others[0], old.first_port, running, backup, "--force")
        assert code == 2 and "in use by a running node" in _one_line(err), err
        old.start_node(stale)
        for node_id in others:
            assert "restored state from snapshot up to index" in new.node_log(node_id)
            await wait_until(
                functools.partial(serves_all, new, node_id, written),
                30,
                f"restored node {node_id} serves all {len(written)} keys",
            )
        # The session came along: the retried compare-and-swap gets its original reply.
        answer = await _retry_cas(new, cas)
        assert (answer.swapped, answer.current_value) == (True, "mine")
        async with new.client(deadline=20) as client:
            assert await client.get_value("cas-key") == "theirs"
            await client.propose_mapping("after-restore", "yes")
            assert await client.get_value("after-restore") == "yes"

        async def refused_both_ways() -> bool:
            by_new = any(f"belongs to cluster {old_id}" in new.node_log(n) for n in others)
            return by_new and f"belongs to cluster {new_id}" in old.node_log(stale)

        await wait_until(
            refused_both_ways, 20, "the old node and the new cluster refuse each other"
        )

        # Once the old node is gone, the restored cluster's own node 1 takes its place.
        old.kill_node(stale)
        new.start_node(stale)
        async with new.client(deadline=20) as client:
            await client.propose_mapping("after-stale", "yes")
        written |= {"after-restore": "yes", "after-stale": "yes"}
        await wait_until(
            functools.partial(serves_all, new, stale, written),
            30,
            f"restored node {stale} serves all {len(written)} keys",
        )
    except AssertionError as e:
        raise AssertionError(f"{e}\n{log_tails(new)}\n{log_tails(old, [stale])}") from None
    finally:
        new.stop()


@pytest.mark.slow
async def test_a_backup_taken_during_writes_is_the_state_at_one_index(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    """Writes go on, each sequence one write after another, while the backup is taken and
    streamed: the backup holds a prefix of every sequence (no later write without every earlier
    one), at least every write acknowledged before it was asked for, and counters consistent
    with those prefixes; and it is taken at the first try."""
    cluster = make_cluster(nodes=3)
    await cluster.wait_for_leader(timeout=15)
    path = tmp_path / "backup.db"
    sequences = ("a", "b", "c")
    async with cluster.client(deadline=20) as client:
        # Enough state (about 10 MB) that streaming it takes many chunks while writes go on.
        filler = "f" * 500
        for batch in range(20):
            await client.propose_mappings({f"fill-{batch}-{i}": filler for i in range(1000)})
        acked = dict.fromkeys(sequences, 0)
        stop = asyncio.Event()

        async def writer(name: str) -> None:
            i = 0
            while not stop.is_set():
                await client.propose_mapping(f"{name}-{i:06d}", str(i))
                await client.propose_mapping(f"{name}-counter", str(i))
                i += 1
                acked[name] = i

        async def acked_at_least(count: int) -> bool:
            return min(acked.values()) >= count

        tasks = [asyncio.create_task(writer(name)) for name in sequences]
        try:
            await wait_until(functools.partial(acked_at_least, 10), 20, "10 writes acknowledged")
            before = dict(acked)
            saved = await client.save_snapshot(path, timeout=30)
            after = min(acked.values())
            await wait_until(
                functools.partial(acked_at_least, after + 5), 20, "writes go on after the backup"
            )
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    taken = sum(cluster.node_log(n).count("taking a backup for a client") for n in cluster.node_ids)
    assert taken == 1, f"the backup took {taken} tries\n{log_tails(cluster)}"
    # Asked of a follower alone, the client is sent on to the leader, which takes it.
    leader = await cluster.wait_for_leader(timeout=15)
    follower = next(n for n in cluster.node_ids if n != leader)
    async with Client.from_endpoints([cluster.client_address(follower)], deadline=20) as client:
        again = await client.save_snapshot(tmp_path / "again.db", timeout=20)
        assert client.known_leader == cluster.client_address(leader)
    assert again.meta.index >= saved.meta.index and again.keys >= saved.keys
    backup = read_backup(str(path))
    assert backup.meta.index == saved.meta.index
    state = decode_state(b"".join(backup.state))
    assert state.last_applied == backup.meta.index
    for name in sequences:
        sequence = sorted(k for k in state.data if k.startswith(f"{name}-0"))
        count = len(sequence)
        assert sequence == [f"{name}-{i:06d}" for i in range(count)], f"{name}: not a prefix"
        assert count >= before[name], f"{name}: writes acknowledged before the backup are missing"
        counter = int(state.data[f"{name}-counter"])
        assert counter in (count - 1, count - 2), (name, counter, count)
    assert sum(1 for k in state.data if k.startswith("fill-")) == 20_000
