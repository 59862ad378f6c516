"""The user's way into a raft-demo cluster: an async library (`Client`) that finds the leader and
retries through elections and crashes. The command line (`python cluster_client.py --help`) is
`cluster_cli.py`, which this module runs when started as a program."""

from __future__ import annotations

import asyncio
import importlib
import random
import sys
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc

from client_admin import (
    DEFAULT_ADD_MEMBER_TIMEOUT,
    DEFAULT_SNAPSHOT_TIMEOUT,
    AdminMethods,
    ClusterStatus,
    Member,
    MemberList,
    MemberStatus,
)
from client_batching import CallBatcher
from client_errors import (
    CHANGE_BUSY_BACKOFF,
    CHANGE_BUSY_RETRIES,
    DENIED,
    REJECTED,
    Attempt,
    ClientError,
    ClusterUnavailableError,
    Done,
    LeaseNotFoundError,
    MembershipBusyError,
    MembershipRefusedError,
    Next,
    PermissionDeniedError,
    RequestRejectedError,
    SessionExpiredError,
    WatchCompactedError,
    one_line,
    refusal,
)
from client_kv import CasOutcome, KeyValue, KeyValueMethods, RangePage, WatchEvent
from client_leases import KeptLease, LeaseGrant, LeaseInfo, LeaseMethods
from cluster_config import (
    DEFAULT_FIRST_PORT,
    DEFAULT_NODES,
    LOCALHOST,
    ClusterConfig,
    ConfigError,
    NodeAddress,
    parse_host_port,
)
from rpc import raft_pb2, raft_pb2_grpc
from tls import TlsConfig, open_channel

DEFAULT_DEADLINE = 10.0
# A proposal is answered only once committed; the node gives up after its proposal timeout
# (5 s by default), so one attempt waits a little longer than that rather than abandon a commit.
DEFAULT_ATTEMPT_TIMEOUT = 6.0
DEFAULT_READ_ATTEMPT_TIMEOUT = 1.0
BACKOFF_MIN = 0.02
BACKOFF_MAX = 1.0

# A restarted node should be reachable again within about a second, not after gRPC's default
# reconnect backoff, which grows to two minutes.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

_T = TypeVar("_T")

# What the library offers, for `from cluster_client import ...`.
__all__ = [
    "CHANGE_BUSY_RETRIES",
    "DEFAULT_ADD_MEMBER_TIMEOUT",
    "DEFAULT_SNAPSHOT_TIMEOUT",
    "CasOutcome",
    "Client",
    "ClientError",
    "ClusterStatus",
    "ClusterUnavailableError",
    "KeptLease",
    "KeyValue",
    "Member",
    "MemberList",
    "MemberStatus",
    "LeaseGrant",
    "LeaseInfo",
    "LeaseNotFoundError",
    "MembershipBusyError",
    "MembershipRefusedError",
    "PermissionDeniedError",
    "RangePage",
    "RequestRejectedError",
    "SessionExpiredError",
    "WatchCompactedError",
    "WatchEvent",
]


def _seed_config(all_raft_ports: Sequence[int]) -> ClusterConfig:
    """The seed client's addressing: ids are Raft ports, client port = Raft port + node count."""
    ports = list(all_raft_ports)
    if not ports:
        raise ConfigError("no Raft ports given")
    if len(set(ports)) != len(ports):
        raise ConfigError(f"Raft ports {ports} contain duplicates")
    count = len(ports)
    nodes: dict[int, NodeAddress] = {}
    for port in ports:
        if not 0 < port or port + count > 65535:
            raise ConfigError(f"Raft port {port} (client port {port + count}) is not in 1-65535")
        nodes[port] = NodeAddress(port, f"{LOCALHOST}:{port}", f"{LOCALHOST}:{port + count}")
    return ClusterConfig(nodes)


class Client(KeyValueMethods, LeaseMethods, AdminMethods):
    """A client of one cluster. Give exactly one of: the seed's list of Raft ports, a
    `ClusterConfig`, or the nodes' client endpoints ("host:port"); or use a `from_*` constructor.

    Every operation keeps trying, with backoff, until it succeeds or `deadline` seconds pass
    (then `ClusterUnavailableError`). One node gets `attempt_timeout` seconds to answer a
    proposal and `read_attempt_timeout` seconds for a read, within what is left of the deadline.
    With `tls` every connection, to nodes given or learnt from redirects and membership alike,
    uses TLS with those settings (`TlsConfig.load(cert, key, ca)`); without it, plain text.

    With `batching` (the default), the puts, deletes and gets that the client's tasks ask of one
    node in one event-loop turn travel as one `Batch` call (client_batching.py); each keeps its
    own session, deadline and retries. Without it, each is a call of its own, as the seed's.
    """

    def __init__(
        self,
        all_raft_ports: Sequence[int] | None = None,
        *,
        config: ClusterConfig | None = None,
        endpoints: Sequence[str] | str | None = None,
        deadline: float = DEFAULT_DEADLINE,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
        read_attempt_timeout: float = DEFAULT_READ_ATTEMPT_TIMEOUT,
        tls: TlsConfig | None = None,
        batching: bool = True,
    ) -> None:
        if sum(x is not None for x in (all_raft_ports, config, endpoints)) != 1:
            raise ValueError("give exactly one of all_raft_ports, config or endpoints")
        for name, seconds in (
            ("deadline", deadline),
            ("attempt_timeout", attempt_timeout),
            ("read_attempt_timeout", read_attempt_timeout),
        ):
            if not seconds > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {seconds}")
        if all_raft_ports is not None:
            config = _seed_config(all_raft_ports)
        self._address_of: dict[int, str]
        if config is not None:
            self._address_of = {i: n.client_address for i, n in config.nodes.items()}
            self._addresses = config.client_addresses
        else:
            assert endpoints is not None
            if isinstance(endpoints, str):
                endpoints = endpoints.split(",")
            # Duplicates would only make a round ask the same node twice.
            self._addresses = list(dict.fromkeys(e.strip() for e in endpoints if e.strip()))
            if not self._addresses:
                raise ConfigError("no endpoints given")
            for address in self._addresses:
                parse_host_port(address)
            self._address_of = {}
        self._deadline = deadline
        self._attempt_timeout = attempt_timeout
        self._read_attempt_timeout = read_attempt_timeout
        self._tls = tls
        self._leader: str | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, raft_pb2_grpc.ClusterStub] = {}
        # The write session (thesis section 6.3): registered on the first write, shared by every
        # task using this client. None: not registered yet (or forgotten by the cluster).
        self._client_id: int | None = None
        # False once the cluster turned out not to offer sessions (the seed's nodes).
        self._sessions_offered = True
        self._next_sequence = 1
        # Sequence numbers whose replies this client has not seen yet.
        self._outstanding: set[int] = set()
        self._registering: tuple[asyncio.AbstractEventLoop, asyncio.Task[int | None]] | None = None
        self._batcher = CallBatcher() if batching else None

    @classmethod
    def seed_scheme(
        cls,
        first_port: int = DEFAULT_FIRST_PORT,
        nodes: int = DEFAULT_NODES,
        *,
        deadline: float = DEFAULT_DEADLINE,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
        read_attempt_timeout: float = DEFAULT_READ_ATTEMPT_TIMEOUT,
        tls: TlsConfig | None = None,
    ) -> Client:
        """Nodes on 127.0.0.1 with consecutive Raft ports from `first_port` (the seed's layout)."""
        return cls(
            config=ClusterConfig.seed_scheme(first_port, nodes),
            deadline=deadline,
            attempt_timeout=attempt_timeout,
            read_attempt_timeout=read_attempt_timeout,
            tls=tls,
        )

    @classmethod
    def from_cluster_file(
        cls,
        path: str | Path,
        *,
        deadline: float = DEFAULT_DEADLINE,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
        read_attempt_timeout: float = DEFAULT_READ_ATTEMPT_TIMEOUT,
        tls: TlsConfig | None = None,
    ) -> Client:
        """The nodes listed in a cluster TOML file (the same file the nodes read)."""
        return cls(
            config=ClusterConfig.from_toml(path),
            deadline=deadline,
            attempt_timeout=attempt_timeout,
            read_attempt_timeout=read_attempt_timeout,
            tls=tls,
        )

    @classmethod
    def from_endpoints(
        cls,
        endpoints: Sequence[str] | str,
        *,
        deadline: float = DEFAULT_DEADLINE,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
        read_attempt_timeout: float = DEFAULT_READ_ATTEMPT_TIMEOUT,
        tls: TlsConfig | None = None,
    ) -> Client:
        """Nodes known only by their client addresses ("host:port"). A redirect that names the
        leader by id alone cannot be followed then; the client asks the other nodes instead."""
        return cls(
            endpoints=endpoints,
            deadline=deadline,
            attempt_timeout=attempt_timeout,
            read_attempt_timeout=read_attempt_timeout,
            tls=tls,
        )

    @property
    def addresses(self) -> list[str]:
        """The client addresses this client knows, in the order it tries them."""
        return list(self._addresses)

    @property
    def known_leader(self) -> str | None:
        """The client address of the node that last acted as leader for this client, if any."""
        return self._leader

    @property
    def client_id(self) -> int | None:
        """This client's session id, once its first write registered one."""
        return self._client_id

    async def propose_mapping(self, key: str, value: str, *, lease: int = 0) -> int:
        """Store `value` under `key`; returns its revision once the cluster has committed and
        applied it (0 from a node that predates revisions). With `lease`, the key goes when that
        lease is revoked or expires (LeaseNotFoundError, nothing applied, if it is gone); without,
        a key put earlier with a lease leaves it.

        Retries are exactly-once (the write carries this client's session). After
        `ClusterUnavailableError` or `SessionExpiredError` the write may or may not have been
        applied.
        """

        def request(session: raft_pb2.Session | None) -> raft_pb2.Mapping:
            return raft_pb2.Mapping(key=key, value=value, session=session, lease=lease)

        return await self._write(
            f"put {key!r}", "ProposeMapping", request, lambda r: int(r.revision)
        )

    async def propose_mappings(self, mappings: dict[str, str], *, lease: int = 0) -> int:
        """Store every mapping at once: one log entry, so a reader sees all of them or none;
        returns its revision. With `lease`, every key is attached to it."""

        def request(session: raft_pb2.Session | None) -> raft_pb2.MappingBatch:
            return raft_pb2.MappingBatch(
                mappings=[
                    raft_pb2.Mapping(key=k, value=v, lease=lease) for k, v in mappings.items()
                ],
                session=session,
            )

        return await self._write(
            f"put {len(mappings)} mappings", "ProposeMappings", request, lambda r: int(r.revision)
        )

    async def delete(self, key: str) -> bool:
        """Remove `key`; whether it existed (as the one application of this delete found it)."""

        def request(session: raft_pb2.Session | None) -> raft_pb2.DeleteRequest:
            return raft_pb2.DeleteRequest(key=key, session=session)

        def existed(response: Any) -> bool:
            return bool(response.existed)

        return await self._write(f"delete {key!r}", "DeleteKey", request, existed)

    async def compare_and_swap(
        self, key: str, expected: str | None, new: str
    ) -> tuple[bool, str | None]:
        """Set `key` to `new` only if it holds `expected` (None: only if it is absent).

        Returns (swapped, the key's value after the operation; None when absent). A retry after a
        lost reply returns the original outcome, never a second application's.
        """

        def request(session: raft_pb2.Session | None) -> raft_pb2.CompareAndSwapRequest:
            made = raft_pb2.CompareAndSwapRequest(key=key, new_value=new, session=session)
            if expected is not None:
                made.expected_value = expected
            return made

        def outcome(response: Any) -> tuple[bool, str | None]:
            current = response.current_value if response.HasField("current_value") else None
            return bool(response.swapped), current

        return await self._write(f"compare-and-swap {key!r}", "CompareAndSwap", request, outcome)

    async def get_value(
        self,
        key: str,
        default: str | None = "",
        *,
        stale: bool = False,
        node: str | None = None,
    ) -> str | None:
        """The value stored under `key`, or `default` when it is not set.

        Linearizable: it reflects every write completed before the call, whichever node answers.
        With `stale=True` a node answers from its own state at once, which may lag behind. With
        `node` ("host:port") only that node is asked.
        """

        async def attempt(
            address: str, stub: raft_pb2_grpc.ClusterStub, seconds: float
        ) -> Done[str | None]:
            response: raft_pb2.GetValueResponse = await self._call(
                address, stub, "GetValue", raft_pb2.Key(key=key, allow_stale=stale), seconds
            )
            return Done(response.value if response.HasField("value") else default)

        return await self._retry(
            f"get {key!r}",
            self._read_attempt_timeout,
            attempt,
            only=None if node is None else [node],
        )

    async def close(self) -> None:
        """Close every connection; the client may be used again afterwards (it reconnects)."""
        if self._batcher is not None:
            await self._batcher.close()
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _redirect(self, address: str, leader_id: int | None, leader_address: str) -> Next:
        """Where a node that is not the leader points us: its leader's address, or the address
        this client knows for its leader's id."""
        if self._leader == address:
            self._leader = None
        target = leader_address or (
            self._address_of.get(leader_id) if leader_id is not None else None
        )
        if target:
            return Next(f"{address} is not the leader and points to {target}", leader=target)
        if leader_id is not None:
            return Next(f"{address} names leader {leader_id}, whose address is unknown here")
        return Next(f"{address} knows no leader")

    async def _session(self) -> int | None:
        """This client's session id, registering one first if needed (once, however many tasks
        ask at the same time); None when the cluster offers no sessions."""
        if self._client_id is not None or not self._sessions_offered:
            return self._client_id
        loop = asyncio.get_running_loop()
        if (
            self._registering is None
            or self._registering[0] is not loop
            or self._registering[1].done()
        ):
            self._registering = (loop, loop.create_task(self._register()))
        # Every task waiting for the session resumes in the same turn once it is known, so their
        # writes travel together; one waiter that gives up does not cancel it for the others.
        return await asyncio.shield(self._registering[1])

    async def _register(self) -> int | None:
        async def attempt(
            address: str, stub: raft_pb2_grpc.ClusterStub, seconds: float
        ) -> Done[int] | Next:
            response: raft_pb2.RegisterClientResponse = await stub.RegisterClient(
                raft_pb2.RegisterClientRequest(), timeout=seconds
            )
            if response.success:
                self._leader = address
                return Done(response.client_id)
            leader_id = response.current_leader if response.HasField("current_leader") else None
            return self._redirect(address, leader_id, response.leader_address)

        try:
            self._client_id = await self._retry(
                "register a client session", self._attempt_timeout, attempt
            )
        except RequestRejectedError:
            # The seed's nodes have no sessions; write to them as the seed's client did.
            self._sessions_offered = False
        return self._client_id

    async def _write(
        self,
        what: str,
        method: str,
        make_request: Callable[[raft_pb2.Session | None], Any],
        result: Callable[[Any], _T],
    ) -> _T:
        """Send one write under this client's session with a new sequence number; every retry
        resends the same request, so the cluster applies it at most once."""
        client_id = await self._session()
        sequence = self._next_sequence
        self._next_sequence += 1
        self._outstanding.add(sequence)
        session = None
        if client_id is not None:
            # Every reply below the lowest one still awaited has been seen: the cluster may drop them.
            session = raft_pb2.Session(
                client_id=client_id, sequence=sequence, first_outstanding=min(self._outstanding)
            )
        request = make_request(session)

        async def attempt(
            address: str, stub: raft_pb2_grpc.ClusterStub, seconds: float
        ) -> Done[_T] | Next:
            response = await self._call(address, stub, method, request, seconds)
            if response.success:
                self._leader = address
                return Done(result(response))
            leader_id = response.current_leader if response.HasField("current_leader") else None
            return self._redirect(address, leader_id, response.leader_address)

        try:
            return await self._retry(what, self._attempt_timeout, attempt)
        except SessionExpiredError:
            if self._client_id == client_id:
                self._client_id = None
            raise
        finally:
            # Answered or abandoned: this sequence number is never sent again.
            self._outstanding.discard(sequence)

    async def _call(
        self,
        address: str,
        stub: raft_pb2_grpc.ClusterStub,
        method: str,
        request: Any,
        seconds: float,
    ) -> Any:
        """One unary call, or one op of this turn's Batch call to that node."""
        if self._batcher is None:
            return await getattr(stub, method)(request, timeout=seconds)
        return await self._batcher.call(address, stub, method, request, seconds)

    def _stub(self, address: str) -> raft_pb2_grpc.ClusterStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = open_channel(address, _CHANNEL_OPTIONS, self._tls)
            self._channels[address] = channel
            stub = self._stubs[address] = raft_pb2_grpc.ClusterStub(channel)
        return stub

    def _round(self) -> list[str]:
        if self._leader is None:
            return list(self._addresses)
        return [self._leader] + [a for a in self._addresses if a != self._leader]

    async def _retry(
        self,
        what: str,
        seconds: float,
        attempt: Attempt[_T],
        only: list[str] | None = None,
        *,
        deadline: float | None = None,
        refused: Callable[[str], ClientError] = refusal,
        busy_retries: int = 0,
    ) -> _T:
        """Run `attempt` against one node after another, following redirects, until one
        completes it. Between rounds that fail everywhere, wait with exponential backoff and
        full jitter, so a cluster in the middle of an election is not flooded.

        Gives up after `deadline` seconds (default: the client's). FAILED_PRECONDITION raises
        `refused` (by default LeaseNotFoundError or SessionExpiredError); NOT_FOUND (a lease that
        is gone) LeaseNotFoundError. With `busy_retries`, ABORTED (a membership change already in progress) asks
        the same node again that many times after short pauses, then raises MembershipBusyError.
        """
        loop = asyncio.get_running_loop()
        overall = self._deadline if deadline is None else deadline
        deadline_at = loop.time() + overall
        backoff = BACKOFF_MIN
        attempts = 0
        busy = 0
        last = "no node was tried"
        while True:
            queue = deque(self._round() if only is None else only)
            tried: set[str] = set()
            while queue:
                address = queue.popleft()
                if address in tried:
                    continue
                remaining = deadline_at - loop.time()
                if remaining <= 0:
                    break
                tried.add(address)
                attempts += 1
                try:
                    outcome = await attempt(address, self._stub(address), min(seconds, remaining))
                except grpc.aio.AioRpcError as e:
                    code: grpc.StatusCode = e.code()
                    details = one_line(e.details())
                    if code in DENIED:
                        raise PermissionDeniedError(details or code.name) from None
                    if code in REJECTED:
                        raise RequestRejectedError(details or code.name) from None
                    if code == grpc.StatusCode.FAILED_PRECONDITION:
                        raise refused(details or code.name) from None
                    if code == grpc.StatusCode.NOT_FOUND:
                        raise LeaseNotFoundError(details or code.name) from None
                    last = f"{address} answered {code.name}: {details}"
                    if code == grpc.StatusCode.ABORTED and busy_retries:
                        if busy == busy_retries:
                            raise MembershipBusyError(
                                f"{details or code.name} (still so after {busy + 1} tries)"
                            ) from None
                        busy += 1
                        pause = min(
                            CHANGE_BUSY_BACKOFF * 2 ** (busy - 1), deadline_at - loop.time()
                        )
                        await asyncio.sleep(random.uniform(pause / 2, pause) if pause > 0 else 0)
                        # This node leads and answered: it is the one to ask again.
                        tried.discard(address)
                        queue.appendleft(address)
                        continue
                    if self._leader == address:
                        self._leader = None
                    continue
                if isinstance(outcome, Done):
                    return outcome.value
                last = outcome.note
                if outcome.leader is not None and only is None:
                    # Straight to the named leader; if it was already asked in this round,
                    # the next round (after a pause) starts afresh.
                    queue.appendleft(outcome.leader)
            remaining = deadline_at - loop.time()
            if remaining <= 0:
                plural = "" if attempts == 1 else "s"
                raise ClusterUnavailableError(
                    f"could not {what} within {overall:g} s "
                    f"({attempts} attempt{plural}); last: {last}"
                )
            await asyncio.sleep(random.uniform(0, min(backoff, remaining)))
            backoff = min(backoff * 2, BACKOFF_MAX)


if __name__ == "__main__":
    # `python cluster_client.py` runs the command line, which is built on this library, never the
    # reverse: run as a program, this file only hands over to it (as raft_node.py does).
    sys.exit(importlib.import_module("cluster_cli").main())
