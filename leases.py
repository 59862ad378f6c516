"""Leases as replicated state: which leases exist, their TTLs and the keys attached to each. The
state machine (state_machine.py) applies grants, revokes and expiries from the log, so every node
agrees; when a lease lasts is the leader's business alone (lease_keeper.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

# The most leases the store holds at once; a grant beyond them is refused, so memory stays bounded.
MAX_LEASES = 1_000_000
# The longest TTL a lease may have, in seconds (about 31 years).
MAX_LEASE_TTL = 1_000_000_000


class LeaseGranted(NamedTuple):
    """A grant's outcome: the lease's id, its TTL in seconds, and the grant's revision."""

    id: int
    ttl: int
    revision: int


class LeaseRevoked(NamedTuple):
    """A revoke's outcome: how many keys went with the lease, and the revoke's revision."""

    deleted: int
    revision: int


@dataclass(frozen=True)
class LeaseRefused:
    """The write was not applied because of a lease: unknown (never granted, revoked or expired),
    an id already in use, or too many leases. `reason` starts with "lease"; `status` names the
    gRPC status code the call ends with."""

    reason: str
    status: str = "FAILED_PRECONDITION"


@dataclass
class Lease:
    id: int
    ttl: int
    keys: set[str] = field(default_factory=set)


class LeaseTable:
    """The leases and the keys attached to each; changed only by the state machine's applies."""

    def __init__(self) -> None:
        self.leases: dict[int, Lease] = {}
        # The lease each attached key belongs to.
        self.key_lease: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.leases)

    def __contains__(self, lease_id: int) -> bool:
        return lease_id in self.leases

    def get(self, lease_id: int) -> Lease | None:
        return self.leases.get(lease_id)

    def grant(self, index: int, ttl: int, requested: int) -> LeaseGranted | LeaseRefused:
        """Grant a lease at log index `index`: id `requested`, or (0) the index itself."""
        if requested:
            if requested in self.leases:
                return LeaseRefused(f"lease {requested} already exists", "ALREADY_EXISTS")
            lease_id = requested
        else:
            lease_id = index
            if lease_id in self.leases:  # an id asked for earlier took this index's number
                lease_id = max(self.leases) + 1
        if len(self.leases) >= MAX_LEASES:
            return LeaseRefused(
                f"lease {lease_id} refused: the store holds {MAX_LEASES} leases",
                "RESOURCE_EXHAUSTED",
            )
        self.leases[lease_id] = Lease(lease_id, ttl)
        return LeaseGranted(lease_id, ttl, index)

    def unknown(self, lease_id: int) -> LeaseRefused | None:
        """Why a write cannot attach a key to `lease_id` (0: no lease, always fine), or None."""
        if lease_id == 0 or lease_id in self.leases:
            return None
        return LeaseRefused(
            f"lease {lease_id} not found (never granted, revoked or expired): write not applied"
        )

    def attach(self, key: str, lease_id: int) -> None:
        """The key was put with `lease_id` (0: none): it leaves its old lease, if another."""
        old = self.key_lease.get(key)
        if old == lease_id:
            return
        if old is not None:
            self.leases[old].keys.discard(key)
            del self.key_lease[key]
        if lease_id:
            self.leases[lease_id].keys.add(key)
            self.key_lease[key] = lease_id

    def detach(self, key: str) -> None:
        """The key was deleted."""
        old = self.key_lease.pop(key, None)
        if old is not None:
            self.leases[old].keys.discard(key)

    def remove(self, lease_id: int) -> list[str]:
        """Forget the lease; its keys, in order, for the caller to delete."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return []
        for key in lease.keys:
            del self.key_lease[key]
        return sorted(lease.keys)

    def copy(self) -> list[tuple[int, int, list[str]]]:
        """The table as (id, ttl, keys), in grant order: what a snapshot holds."""
        return [(lease.id, lease.ttl, sorted(lease.keys)) for lease in self.leases.values()]

    @classmethod
    def from_state(cls, rows: list[tuple[int, int, list[str]]]) -> LeaseTable:
        table = cls()
        for lease_id, ttl, keys in rows:
            table.leases[lease_id] = Lease(lease_id, ttl, set(keys))
            table.key_lease.update((key, lease_id) for key in keys)
        return table


def decode_leases(rows: Any) -> list[tuple[int, int, list[str]]]:
    """A snapshot's leases (as `LeaseTable.copy` made them, through JSON); ValueError if not."""
    decoded = []
    for lease_id, ttl, keys in rows:
        if not all(isinstance(k, str) for k in keys):
            raise ValueError("a lease's key is not a string")
        decoded.append((int(lease_id), int(ttl), list(keys)))
    return decoded
