"""Who is in the cluster and where: the seed's port scheme, or a TOML file listing any hosts.

Shared by the node (`raft_node.py`), the client (`cluster_client.py`) and the test harness.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_FIRST_PORT = 12345
DEFAULT_NODES = 5
LOCALHOST = "127.0.0.1"


class ConfigError(Exception):
    """A cluster description that cannot be used; the message says why, in one line."""


@dataclass(frozen=True)
class NodeAddress:
    """One member: its id, the address peers reach its Raft service on, and its client address."""

    id: int
    raft_address: str
    client_address: str


def parse_host_port(text: str) -> tuple[str, int]:
    """Split "host:port" (or "[v6]:port"), checking that the port is a valid TCP port."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"address {text!r} is not of the form host:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ConfigError(f"address {text!r} has a port outside 1-65535")
    return host.strip("[]"), port


@dataclass(frozen=True)
class ClusterConfig:
    """The members of a cluster, by id."""

    nodes: dict[int, NodeAddress]

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ConfigError("a cluster needs at least one node")

    @classmethod
    def seed_scheme(
        cls,
        first_port: int = DEFAULT_FIRST_PORT,
        count: int = DEFAULT_NODES,
        host: str = LOCALHOST,
    ) -> ClusterConfig:
        """The seed's layout: ids are consecutive Raft ports; each client port is Raft port + count."""
        if count < 1:
            raise ConfigError(f"--nodes must be at least 1, not {count}")
        if not 0 < first_port or first_port + 2 * count - 1 > 65535:
            raise ConfigError(
                f"ports {first_port}..{first_port + 2 * count - 1} do not fit in 1-65535"
            )
        nodes = {
            port: NodeAddress(port, f"{host}:{port}", f"{host}:{port + count}")
            for port in range(first_port, first_port + count)
        }
        return cls(nodes)

    @classmethod
    def from_toml(cls, path: str | Path) -> ClusterConfig:
        """Read a cluster file: a list of `[[node]]` tables with `id`, `raft` and `client` addresses."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read cluster file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"cluster file {path} is not valid TOML: {e}") from None
        entries = data.get("node")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"cluster file {path} has no [[node]] tables")
        nodes: dict[int, NodeAddress] = {}
        seen_addresses: set[str] = set()
        for i, entry in enumerate(entries, start=1):
            where = f"cluster file {path}, node #{i}"
            if not isinstance(entry, dict):
                raise ConfigError(f"{where}: expected a table")
            node_id = entry.get("id")
            if not isinstance(node_id, int) or isinstance(node_id, bool) or node_id <= 0:
                raise ConfigError(f"{where}: 'id' must be a positive integer")
            if node_id in nodes:
                raise ConfigError(f"{where}: id {node_id} appears twice")
            addresses = []
            for field in ("raft", "client"):
                value = entry.get(field)
                if not isinstance(value, str):
                    raise ConfigError(f"{where}: '{field}' must be a \"host:port\" string")
                try:
                    parse_host_port(value)
                except ConfigError as e:
                    raise ConfigError(f"{where}: {e}") from None
                if value in seen_addresses:
                    raise ConfigError(f"{where}: address {value} is used twice")
                seen_addresses.add(value)
                addresses.append(value)
            nodes[node_id] = NodeAddress(node_id, addresses[0], addresses[1])
        return cls(nodes)

    def node(self, node_id: int) -> NodeAddress:
        try:
            return self.nodes[node_id]
        except KeyError:
            known = ", ".join(str(i) for i in sorted(self.nodes))
            raise ConfigError(
                f"node id {node_id} is not in the cluster (members: {known})"
            ) from None

    def peers_of(self, node_id: int) -> list[NodeAddress]:
        return [n for i, n in sorted(self.nodes.items()) if i != node_id]

    @property
    def client_addresses(self) -> list[str]:
        return [n.client_address for _, n in sorted(self.nodes.items())]
