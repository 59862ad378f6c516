"""Which cluster a node belongs to: an id derived when a cluster is bootstrapped, kept in the data
directory, and carried by every peer call, so that nodes of two clusters never talk to each other.
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from dataclasses import dataclass, field

from cluster_config import ClusterConfig
from disk import Disk, RealDisk, replace_file

# The gRPC metadata key every `Raft` call carries (lower case, as gRPC requires).
METADATA_KEY = "raft-demo-cluster"
# The default of --cluster-token: clusters bootstrapped from the same members and token share an id.
DEFAULT_TOKEN = "raft-demo"
FILE_NAME = "cluster_id"
_LINE = re.compile(r"raft-demo cluster ([0-9a-f]{16}) crc32 ([0-9a-f]{8})\n")


class ClusterIdentityError(Exception):
    """The data directory's cluster id file is unreadable or damaged."""


def derive_cluster_id(config: ClusterConfig, token: str = DEFAULT_TOKEN) -> str:
    """The id of a cluster bootstrapped with `config`: every node started with the same members
    and token derives the same one without talking, and two clusters with different members (or
    the same members and different tokens) get different ones. Members are taken by id and client
    address: those every node's file agrees on, while peers may reach each other's Raft service
    at other addresses (through a proxy or NAT)."""
    digest = hashlib.sha256(token.encode())
    for node in sorted(config.nodes.values(), key=lambda n: n.id):
        digest.update(f"\n{node.id} {node.client_address}".encode())
    return digest.hexdigest()[:16]


def derive_restored_cluster_id(
    config: ClusterConfig, token: str, source_id: str, index: int, term: int, created_ms: int
) -> str:
    """The id of a cluster restored from a backup (of cluster `source_id` at `index`/`term`,
    taken at `created_ms`) onto the members of `config`: every node restored from the same
    backup with the same members and token derives the same one, and it is never the source's,
    not even on the source's own members and token, so the restored cluster and the old one
    never talk. Restoring one backup twice onto the same members gives the same id: give each
    restored cluster its own --cluster-token to keep them apart."""
    digest = hashlib.sha256(f"restored\n{token}\n{source_id} {index} {term} {created_ms}".encode())
    for node in sorted(config.nodes.values(), key=lambda n: n.id):
        digest.update(f"\n{node.id} {node.client_address}".encode())
    return digest.hexdigest()[:16]


def _encode(cluster_id: str) -> bytes:
    crc = zlib.crc32(cluster_id.encode())
    return f"raft-demo cluster {cluster_id} crc32 {crc:08x}\n".encode()


@dataclass
class ClusterIdentity:
    """A node's cluster id: None while a joining node has not yet heard from its cluster's leader,
    which it then adopts (and keeps) on that leader's first message."""

    path: str
    cluster_id: str | None
    disk: Disk = field(default_factory=RealDisk)

    @classmethod
    async def load(cls, data_dir: str, disk: Disk | None = None) -> ClusterIdentity:
        """The id kept in `data_dir` (None if there is none yet); ClusterIdentityError if the file
        is damaged."""
        disk = disk or RealDisk()
        path = os.path.join(data_dir, FILE_NAME)
        try:
            data = await disk.read_all(path)
        except FileNotFoundError:
            return cls(path, None, disk)
        except OSError as e:
            raise ClusterIdentityError(f"{path}: cannot read it: {e.strerror or e}") from None
        match = _LINE.fullmatch(data.decode("ascii", "replace"))
        if match is None or zlib.crc32(match.group(1).encode()) != int(match.group(2), 16):
            raise ClusterIdentityError(
                f"{path}: damaged (cut short or altered), so this node cannot tell which cluster "
                "it belongs to; copy the file from another member's data directory (every member "
                "holds the same id), or empty this one and add the node back under a new id "
                "(cluster_client.py member remove, then start it with --join)"
            )
        return cls(path, match.group(1), disk)

    async def keep(self, cluster_id: str) -> None:
        """Make `cluster_id` this node's, durably."""
        await replace_file(self.disk, self.path, _encode(cluster_id))
        self.cluster_id = cluster_id

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata a peer call carries."""
        return ((METADATA_KEY, self.cluster_id or ""),)
