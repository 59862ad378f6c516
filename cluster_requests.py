"""What the `Cluster` service checks of a client's request, the replies it builds, and the status
a refused or unknown write or read ends with: shared by cluster_server.py and the parts of its
servicer kept in cluster_batch.py, cluster_ranges.py and cluster_leases.py."""

from __future__ import annotations

from typing import TypeVar

import grpc

from leases import LeaseRefused
from node_types import (
    MAX_WIRE_NUMBER,
    CommitUnknownError,
    NotLeaderError,
    OverloadedError,
    UnavailableError,
)
from rpc import raft_pb2
from state_machine import ApplyResult, DeleteResult, KeyValueStateMachine, SessionExpired

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1024 * 1024
# One ProposeMappings batch is one log entry: bounded so it fits a message to the followers.
MAX_BATCH_MAPPINGS = 1000
MAX_BATCH_BYTES = 2 * 1024 * 1024

# The write replies that carry a redirect (success, current_leader, leader_address).
_WriteReply = TypeVar(
    "_WriteReply",
    raft_pb2.ProposeMappingResponse,
    raft_pb2.DeleteResponse,
    raft_pb2.CompareAndSwapResponse,
    raft_pb2.RegisterClientResponse,
    raft_pb2.MembershipResponse,
    raft_pb2.SnapshotChunk,
    raft_pb2.DeleteRangeResponse,
    raft_pb2.LeaseGrantResponse,
    raft_pb2.LeaseRevokeResponse,
    raft_pb2.LeaseKeepAliveResponse,
    raft_pb2.LeaseTimeToLiveResponse,
    raft_pb2.LeaseLeasesResponse,
)


def key_problem(key: str) -> str | None:
    """Why `key` cannot be stored, or None when it is acceptable."""
    if not key:
        return "key must not be empty"
    size = len(key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        return f"key is {size} bytes in UTF-8; the limit is {MAX_KEY_BYTES} bytes"
    return None


def value_problem(value: str) -> str | None:
    """Why `value` cannot be stored, or None when it is acceptable."""
    # Only strings near the limit can exceed it; skip encoding the common small value.
    if len(value) * 4 <= MAX_VALUE_BYTES:
        return None
    size = len(value.encode("utf-8"))
    if size > MAX_VALUE_BYTES:
        return f"value is {size} bytes in UTF-8; the limit is {MAX_VALUE_BYTES} bytes (1 MiB)"
    return None


def session_problem(session: raft_pb2.Session) -> str | None:
    """Why a write's session is malformed, or None (no session, client_id 0, is fine)."""
    numbers = (session.client_id, session.sequence, session.first_outstanding)
    if any(n < 0 or n >= MAX_WIRE_NUMBER for n in numbers):
        return "session numbers must be non-negative and below 2^62"
    if session.client_id == 0:
        if session.sequence or session.first_outstanding:
            return "a session with a sequence number needs the client_id from RegisterClient"
        return None
    if session.sequence < 1:
        return "a session's sequence numbers start at 1"
    if session.first_outstanding > session.sequence:
        return "first_outstanding cannot be above the request's own sequence number"
    return None


def batch_problem(batch: raft_pb2.MappingBatch) -> str | None:
    """Why a ProposeMappings batch cannot be applied, or None when it is acceptable."""
    count = len(batch.mappings)
    if count == 0:
        return "a batch needs at least one mapping"
    if count > MAX_BATCH_MAPPINGS:
        return f"a batch holds {count} mappings; the limit is {MAX_BATCH_MAPPINGS}"
    size = 0
    for mapping in batch.mappings:
        problem = (
            key_problem(mapping.key) or value_problem(mapping.value) or lease_problem(mapping.lease)
        )
        if problem is not None:
            return f"mapping for {mapping.key[:40]!r}: {problem}"
        size += len(mapping.key.encode("utf-8")) + len(mapping.value.encode("utf-8"))
    if size > MAX_BATCH_BYTES:
        return f"a batch holds {size} bytes of keys and values; the limit is {MAX_BATCH_BYTES}"
    return None


def range_problem(key: str, range_end: str | None, prefix: bool) -> str | None:
    """Why a request's range of keys is malformed, or None when it is acceptable."""
    if prefix and range_end is not None:
        return "give a prefix or a range_end, not both"
    for name, text in (("key", key), ("range_end", range_end or "")):
        size = len(text.encode("utf-8"))
        if size > MAX_KEY_BYTES:
            return f"{name} is {size} bytes in UTF-8; the limit is {MAX_KEY_BYTES} bytes"
    if not key and not prefix and range_end is None:
        return "key must not be empty (give a prefix, or a range_end)"
    if range_end and range_end <= key:
        return f"range_end {range_end[:40]!r} must come after key {key[:40]!r}"
    return None


def optional(
    message: raft_pb2.RangeRequest | raft_pb2.DeleteRangeRequest | raft_pb2.WatchRequest, name: str
) -> str | None:
    return getattr(message, name) if message.HasField(name) else None


def redirect(response: _WriteReply, e: NotLeaderError) -> _WriteReply:
    response.success = False
    if e.leader_id is not None:
        response.current_leader = e.leader_id
    if e.leader_address:
        response.leader_address = e.leader_address
    return response


def without_mapping_sessions(batch: raft_pb2.MappingBatch) -> raft_pb2.MappingBatch:
    """A mapping's own session means nothing in a batch; it is not worth a place in the log."""
    if not any(m.HasField("session") for m in batch.mappings):
        return batch
    return raft_pb2.MappingBatch(
        mappings=[
            raft_pb2.Mapping(key=m.key, value=m.value, lease=m.lease) for m in batch.mappings
        ],
        session=batch.session,
    )


def put_reply(outcome: ApplyResult) -> raft_pb2.ProposeMappingResponse:
    """A put's (or a batch's) success reply, with the revision it produced."""
    return raft_pb2.ProposeMappingResponse(success=True, revision=getattr(outcome, "revision", 0))


def delete_reply(outcome: ApplyResult) -> raft_pb2.DeleteResponse:
    if isinstance(outcome, DeleteResult):
        return raft_pb2.DeleteResponse(
            success=True, existed=outcome.existed, revision=outcome.revision
        )
    # A reply a session kept from before revisions: whether the key existed, alone.
    return raft_pb2.DeleteResponse(success=True, existed=bool(outcome))


def get_reply(machine: KeyValueStateMachine, key: str) -> raft_pb2.GetValueResponse:
    """GetValue's answer from this state: the value with its revisions, or none."""
    value = machine.get(key)
    if value is None:
        return raft_pb2.GetValueResponse(key=key, revision=machine.revision)
    create, mod, version = machine.revisions(key)
    return raft_pb2.GetValueResponse(
        key=key,
        value=value,
        create_revision=create,
        mod_revision=mod,
        version=version,
        revision=machine.revision,
    )


def lease_status(refused: LeaseRefused) -> grpc.StatusCode:
    code = getattr(grpc.StatusCode, refused.status, None)
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.FAILED_PRECONDITION


def lease_problem(lease_id: int) -> str | None:
    """Why a write's lease field is malformed (0: no lease, fine), or None."""
    if not 0 <= lease_id < MAX_WIRE_NUMBER:
        return f"lease must be 0 (none) or a lease id, not {lease_id}"
    return None


def write_failure(
    outcome: Exception | SessionExpired | LeaseRefused,
) -> tuple[grpc.StatusCode, str]:
    """The status a write's own call ends with when it was not done (or not known to be)."""
    if isinstance(outcome, LeaseRefused):
        return lease_status(outcome), outcome.reason
    if isinstance(outcome, SessionExpired):
        return grpc.StatusCode.FAILED_PRECONDITION, outcome.reason
    if isinstance(outcome, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(outcome)
    if isinstance(outcome, CommitUnknownError):
        # The entry may still commit later; UNAVAILABLE tells the client the outcome is unknown.
        return grpc.StatusCode.UNAVAILABLE, str(outcome)
    return grpc.StatusCode.UNKNOWN, f"{type(outcome).__name__}: {outcome}"


def read_failure(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status a linearizable read's own call ends with when it could not be served."""
    if isinstance(error, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    return grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {error}"
