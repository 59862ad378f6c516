"""What the client library raises, and the small pieces its retry loop is built from (shared by
cluster_client.py and the parts of its Client kept in client_kv.py and client_admin.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc

from rpc import raft_pb2, raft_pb2_grpc

_T = TypeVar("_T")

# A membership change refused because another one is not yet committed is asked again this many
# times, after pauses from CHANGE_BUSY_BACKOFF seconds doubling, before the refusal is raised.
CHANGE_BUSY_RETRIES = 4
CHANGE_BUSY_BACKOFF = 0.1

# The request itself is at fault: asking another node would get the same answer.
REJECTED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)

# Who is asking is at fault: another node would refuse as well.
DENIED = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})


class ClientError(Exception):
    """A request that did not succeed; the message says why in one line."""


class ClusterUnavailableError(ClientError):
    """No node completed the request before the deadline (no leader, nodes down, or unknown
    outcome); the message says what was seen last."""


class RequestRejectedError(ClientError):
    """The cluster refused the request as invalid (for example an empty or oversized key); it was
    certainly not applied."""


class MembershipRefusedError(RequestRejectedError):
    """The cluster refused a membership change (an id that was removed or is taken, an address
    in use, the last voter, ...); nothing changed."""


class MembershipBusyError(MembershipRefusedError):
    """Another membership change was still uncommitted after several tries (the cluster makes
    one at a time); nothing changed, and the same request may succeed a little later."""


class PermissionDeniedError(RequestRejectedError):
    """The cluster does not let this client make the call (an admin call from a client whose
    certificate is not an admin's); nothing was applied."""


class SessionExpiredError(ClientError):
    """The cluster no longer knows this client's session (it expired or was evicted), so it cannot
    tell whether an earlier attempt of the write was applied: the outcome is unknown. The client
    registers a new session for its next write."""


class WatchCompactedError(ClientError):
    """A watch asked for changes older than every node still keeps (their windows of recent
    changes have moved past its revision): changes may have been missed. The message names the
    oldest revision available; start again from a fresh read."""


class LeaseNotFoundError(ClientError):
    """The lease is gone (never granted, revoked, or expired): a write with it was not applied,
    and a kept lease was lost (its keys are deleted, or about to be)."""


def refusal(details: str) -> ClientError:
    """What a write's FAILED_PRECONDITION means: its lease is unknown (the node's message names
    the lease first), else its session is."""
    if details.startswith("lease "):
        return LeaseNotFoundError(details)
    return SessionExpiredError(details)


@dataclass(frozen=True)
class Done(Generic[_T]):
    value: _T


@dataclass(frozen=True)
class Next:
    """This node could not complete the request; `note` says why, `leader` is where to go next."""

    note: str
    leader: str | None = None


Attempt = Callable[[str, raft_pb2_grpc.ClusterStub, float], Awaitable[Done[_T] | Next]]


def one_line(text: str | None) -> str:
    return " ".join((text or "").split())


class ClientCore:
    """What the parts of `Client` kept in other modules (client_kv.py, client_admin.py) use of
    its core in cluster_client.py: declared here for the type checker, defined by `Client`."""

    if TYPE_CHECKING:
        _address_of: dict[int, str]
        _addresses: list[str]
        _attempt_timeout: float
        _read_attempt_timeout: float
        _deadline: float
        _leader: str | None

        async def _retry(
            self,
            what: str,
            seconds: float,
            attempt: Attempt[_T],
            only: list[str] | None = None,
            *,
            deadline: float | None = None,
            refused: Callable[[str], ClientError] = ...,
            busy_retries: int = 0,
        ) -> _T: ...

        async def _write(
            self,
            what: str,
            method: str,
            make_request: Callable[[raft_pb2.Session | None], Any],
            result: Callable[[Any], _T],
        ) -> _T: ...

        def _redirect(self, address: str, leader_id: int | None, leader_address: str) -> Next: ...

        def _stub(self, address: str) -> raft_pb2_grpc.ClusterStub: ...

        def _round(self) -> list[str]: ...
