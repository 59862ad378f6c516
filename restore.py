"""`python raft_node.py ... --restore FILE`: build one node's data directory of a new cluster from a
backup file (backup_file.py), then exit; the node is then started with the same flags, without
--restore.

What a restored data directory holds: the backup's state as this node's snapshot at the backup's
index and term (snapshot.py's format), an empty log that continues after it, that term as the
node's current term (no vote), the members the flags give (the new cluster's, never the old
one's), and a new cluster id (cluster_identity.derive_restored_cluster_id), which every node
restored from the same backup with the same members and token shares and which differs from the
old cluster's: peers refuse calls from another cluster, so the restored cluster and the old one
never talk, even where they share addresses.

Nothing is written until the backup has verified (checksum, format, state), and the directory is
built beside its final place and renamed into it, so a refused or interrupted restore leaves the
data directory as it was.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from backup_file import Backup, BackupError, read_backup
from cluster_config import ClusterConfig
from cluster_identity import ClusterIdentity, derive_restored_cluster_id
from log import RaftLog
from membership import Membership

EXIT_BAD_BACKUP = 1
EXIT_REFUSED = 2


class RestoreError(Exception):
    """A restore refused before anything was written (or undone); the message is one line."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Restored:
    data_dir: Path
    backup: Backup
    cluster_id: str
    members: Membership
    replaced: bool


def add_restore_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Restore (build this node's data directory of a NEW cluster from a backup, then exit)"
    )
    group.add_argument(
        "--restore",
        metavar="FILE",
        help="a backup made by `cluster_client.py snapshot save`: write this node's data "
        "directory (--data-dir) from it, with the members the other flags give and a new "
        "cluster id, and exit; run it for every member with the same flags, then start each "
        "node with those flags, without --restore",
    )
    group.add_argument(
        "--force",
        action="store_true",
        help="with --restore: replace a data directory that is not empty (everything in it is "
        "deleted); without it such a directory is refused",
    )


def check_restore_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.restore is None:
        if args.force:
            parser.error("--force goes with --restore")
        return
    if args.join is not None:
        parser.error(
            "--restore and --join exclude each other: restore every member of the new "
            "cluster, then add nodes with --join once it runs"
        )


def run_restore(args: argparse.Namespace, cluster: ClusterConfig, node_id: int) -> int:
    """Restore this node's data directory from `args.restore`; one line on stderr and a nonzero
    exit code if it is refused."""
    data_dir = Path(args.data_dir or Path("data") / str(node_id))
    try:
        restored = restore_data_dir(
            args.restore, data_dir, node_id, cluster, args.cluster_token, args.force
        )
    except RestoreError as e:
        print(f"raft_node.py: error: {e}", file=sys.stderr)
        return e.code
    meta = restored.backup.meta
    print(
        f"restored node {node_id}'s data directory {data_dir}"
        f"{' (replacing what it held)' if restored.replaced else ''} from {args.restore}: the "
        f"state at index {meta.index} (term {meta.term}) of cluster {meta.cluster_id}, "
        f"{restored.backup.keys} keys, {restored.backup.sessions} client sessions"
    )
    print(
        f"it belongs to a new cluster, {restored.cluster_id}, whose members are "
        f"{restored.members.describe()}; start the node with the same flags, without --restore"
    )
    return 0


def restore_data_dir(
    backup_path: str,
    data_dir: Path,
    node_id: int,
    cluster: ClusterConfig,
    token: str,
    force: bool = False,
) -> Restored:
    """Build `data_dir` for node `node_id` of the cluster `cluster` describes from a backup;
    RestoreError (nothing written) if the backup does not verify, the directory is not empty
    (unless `force`) or is in use by a running node."""
    try:
        backup = read_backup(backup_path)
    except BackupError as e:
        raise RestoreError(f"refused {e}", EXIT_BAD_BACKUP) from None
    meta = backup.meta
    replaced = _check_target(data_dir, force)
    cluster.node(node_id)
    members = Membership.bootstrap(cluster)
    cluster_id = derive_restored_cluster_id(
        cluster, token, meta.cluster_id, meta.index, meta.term, meta.created_ms
    )
    if cluster_id == meta.cluster_id:
        # Only a hash collision gets here; the restored cluster must never pass for the old one.
        raise RestoreError(
            f"the new cluster id {cluster_id} equals the backup's; give another --cluster-token",
            EXIT_REFUSED,
        )
    parent = data_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    building = parent / f".{data_dir.name}.restoring-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    try:
        asyncio.run(_build(building, backup, members, cluster_id))
        _put_in_place(building, data_dir, replaced)
    except OSError as e:
        shutil.rmtree(building, ignore_errors=True)
        where = e.filename if e.filename is not None else data_dir
        raise RestoreError(f"cannot write {where}: {e.strerror or e}", EXIT_REFUSED) from None
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return Restored(data_dir, backup, cluster_id, members, replaced)


def _check_target(data_dir: Path, force: bool) -> bool:
    """Whether `data_dir` exists and will be replaced; RestoreError if it may not be."""
    if not data_dir.exists():
        return False
    if not data_dir.is_dir():
        raise RestoreError(f"data directory {data_dir} is not a directory", EXIT_REFUSED)
    held = sorted(os.listdir(data_dir))
    lock = data_dir / "LOCK"
    if lock.exists():
        with open(lock, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise RestoreError(
                    f"data directory {data_dir} is in use by a running node; stop it first",
                    EXIT_REFUSED,
                ) from None
            fcntl.flock(f, fcntl.LOCK_UN)
    if held and not force:
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise RestoreError(
            f"data directory {data_dir} is not empty (it holds {shown}); a restore replaces "
            "everything in it: give --force to do so",
            EXIT_REFUSED,
        )
    return True


async def _build(directory: Path, backup: Backup, members: Membership, cluster_id: str) -> None:
    """Write a node's data directory in `directory` through the node's own log and snapshot
    code (so its formats are the node's), then open it as the node would and check it."""
    meta = backup.meta
    log = await RaftLog.open(directory)
    try:
        assert log.snapshots is not None
        await log.snapshots.write(meta.index, meta.term, members, backup.state)
        log.reset(meta.index, meta.term)
        # The backup's term, so that this cluster's first election is of a later term than the
        # entries its snapshot covers (no vote cast in it).
        log.set_hard_state(meta.term, None)
        await log.flush()
    finally:
        await log.close()
    await (await ClusterIdentity.load(str(directory))).keep(cluster_id)
    check = await RaftLog.open(directory)
    try:
        restored = check.restored
        if restored is None or (restored.index, restored.term) != (meta.index, meta.term):
            raise OSError(f"{directory}: the restored snapshot does not read back")
        if (check.last_index, check.current_term) != (meta.index, meta.term):
            raise OSError(f"{directory}: the restored log does not read back")
    finally:
        await check.close()


def _put_in_place(building: Path, data_dir: Path, replace: bool) -> None:
    parent = building.parent
    aside = parent / f".{data_dir.name}.replaced-{os.getpid()}"
    if replace:
        os.rename(data_dir, aside)
    os.rename(building, data_dir)
    fd = os.open(parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if replace:
        shutil.rmtree(aside, ignore_errors=True)
