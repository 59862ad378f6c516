"""The user's way into a raft-demo cluster: an async library (`Client`) that finds the leader and
retries through elections and crashes. The command line (`python cluster_client.py --help`) is
`cluster_cli.py`, which this module runs when started as a program."""

from __future__ import annotations

import asyncio
import importlib
import random
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc

from backup_file import Backup, write_backup_file
from client_batching import CallBatcher
from client_errors import (
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
# Adding a member may wait for the new node to catch up (by snapshot if it is far behind) and be
# promoted to voter, which can take tens of seconds: add_member has its own, longer timeout.
DEFAULT_ADD_MEMBER_TIMEOUT = 120.0
# Saving a backup streams the whole store: a large one takes a while.
DEFAULT_SNAPSHOT_TIMEOUT = 300.0
BACKOFF_MIN = 0.02
BACKOFF_MAX = 1.0
# A membership change refused because another one is not yet committed is asked again this many
# times, after pauses from CHANGE_BUSY_BACKOFF seconds doubling, before the refusal is raised.
CHANGE_BUSY_RETRIES = 4
CHANGE_BUSY_BACKOFF = 0.1

# A restarted node should be reachable again within about a second, not after gRPC's default
# reconnect backoff, which grows to two minutes.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# An event stream that broke is opened again after this many seconds, doubling up to the most.
EVENTS_RETRY_MIN = 0.5
EVENTS_RETRY_MAX = 5.0
# Events read from the nodes but not yet taken by the caller; beyond them, the nodes are left to
# hold them (and to drop them, saying how many, if the caller falls far behind).
EVENTS_BUFFER = 1024

_T = TypeVar("_T")

# What the library offers, for `from cluster_client import ...`.
__all__ = [
    "CasOutcome",
    "Client",
    "ClientError",
    "ClusterUnavailableError",
    "KeptLease",
    "KeyValue",
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


@dataclass(frozen=True)
class Member:
    """One member of the cluster: where peers and clients reach it, and whether it votes (a
    learner receives the log but neither votes nor counts toward a majority)."""

    id: int
    raft_address: str
    client_address: str
    voter: bool


@dataclass(frozen=True)
class MemberList:
    """A cluster configuration as one node reported it."""

    # By id.
    members: list[Member]
    # Ids removed from the cluster; none of them may join again.
    removed: list[int]
    # The log index of this configuration's entry (0: the one the cluster was started with).
    config_index: int
    # Whether that entry is known to be committed (a configuration is in use before it is).
    committed: bool
    # The leader as the answering node knows it, if it knows one.
    leader_id: int | None

    @property
    def voters(self) -> list[Member]:
        return [m for m in self.members if m.voter]

    @property
    def learners(self) -> list[Member]:
        return [m for m in self.members if not m.voter]

    def member(self, node_id: int) -> Member | None:
        """The member with this id, or None if it is not one."""
        return next((m for m in self.members if m.id == node_id), None)


@dataclass(frozen=True)
class MemberStatus:
    """One member as `Client.status()` found it: its own report (Status), or why it gave none."""

    id: int | None
    raft_address: str
    client_address: str
    # None when the node answered; else why not (it is down, or unreachable from here).
    error: str | None = None
    role: str = ""
    term: int = 0
    leader_id: int | None = None
    commit_index: int = 0
    applied_index: int = 0
    last_log_index: int = 0
    snapshot_index: int = 0
    voter: bool = False
    learner: bool = False
    # Its health check's answer: a voter with a live leader.
    serving: bool = False
    # The factor its Raft timers are multiplied by (--time-scale; 1 normally).
    time_scale: float = 1.0
    # From the leader's view (also for a node that did not answer here): entries this node has
    # not acknowledged (0 for the leader itself), and seconds since it last answered the leader.
    # None when unknown. For an unreachable node, voter and learner are as the membership says.
    lag: int | None = None
    last_contact: float | None = None

    @property
    def reachable(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ClusterStatus:
    """Every member's own report, by id (those unknown last), and which node leads."""

    nodes: list[MemberStatus]
    # The node that reported itself leader (in the newest term, if several did).
    leader_id: int | None

    @property
    def unreachable(self) -> list[MemberStatus]:
        return [n for n in self.nodes if not n.reachable]


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


class Client(KeyValueMethods, LeaseMethods):
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

    async def transfer_leadership(self, target_id: int = 0) -> int:
        """Ask the leader to hand leadership to node `target_id` (0: whichever node is most up to
        date); returns the new leader's id once it leads."""

        async def attempt(
            address: str, stub: raft_pb2_grpc.ClusterStub, seconds: float
        ) -> Done[int] | Next:
            response: raft_pb2.TransferLeadershipResponse = await stub.TransferLeadership(
                raft_pb2.TransferLeadershipRequest(target_id=target_id), timeout=seconds
            )
            leader_id = response.current_leader if response.HasField("current_leader") else None
            if response.success:
                self._leader = response.leader_address or None
                return Done(leader_id if leader_id is not None else target_id)
            if response.leader_address == address:
                return Next(f"{address} leads but could not hand leadership over yet")
            return self._redirect(address, leader_id, response.leader_address)

        what = "transfer leadership" + (f" to {target_id}" if target_id else "")
        return await self._retry(what, self._attempt_timeout, attempt)

    async def members(self, stale: bool = False) -> MemberList:
        """The cluster's members as the leader knows them (its latest configuration, committed
        or not). With `stale=True` the first node that answers gives its own view, which may lag."""

        async def call(
            stub: raft_pb2_grpc.ClusterStub, seconds: float
        ) -> raft_pb2.MembershipResponse:
            response: raft_pb2.MembershipResponse = await stub.ListMembers(
                raft_pb2.ListMembersRequest(allow_stale=stale), timeout=seconds
            )
            return response

        return await self._membership_call(
            "list the members", call, self._read_attempt_timeout, self._deadline, leads=not stale
        )

    async def add_member(
        self,
        node_id: int,
        raft_address: str,
        client_address: str,
        wait_until_voter: bool = True,
        *,
        timeout: float = DEFAULT_ADD_MEMBER_TIMEOUT,
    ) -> MemberList:
        """Add node `node_id` (started with `raft_node.py --join`) as a learner; the leader
        promotes it to voter once its log has caught up. Returns the configuration once the
        learner is committed, or with `wait_until_voter` once the promotion is (or the leader
        stopped waiting: the node is then still a learner in the result and is promoted later).

        Gives up after `timeout` seconds (not the client's deadline: catching up can take long).
        Adding the same node again changes nothing. Raises `MembershipRefusedError` when the
        cluster refuses (the id was removed or is taken, an address is in use) and
        `MembershipBusyError` when another change stays uncommitted.
        """
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout}")
        request = raft_pb2.AddMemberRequest(
            id=node_id,
            raft_address=raft_address,
            client_address=client_address,
            wait_until_voter=wait_until_voter,
        )

        async def call(
            stub: raft_pb2_grpc.ClusterStub, seconds: float
        ) -> raft_pb2.MembershipResponse:
            response: raft_pb2.MembershipResponse = await stub.AddMember(request, timeout=seconds)
            return response

        # One attempt may take all of the timeout: the leader answers only once it is done.
        return await self._membership_call(
            f"add member {node_id}", call, timeout, timeout, leads=True
        )

    async def remove_member(self, node_id: int) -> MemberList:
        """Remove node `node_id` for good (its id is never reused); returns the configuration
        once the removal has committed. Removing a node already removed changes nothing. Raises
        `MembershipRefusedError` for an id that is not a member or the last voter."""
        request = raft_pb2.RemoveMemberRequest(id=node_id)

        async def call(
            stub: raft_pb2_grpc.ClusterStub, seconds: float
        ) -> raft_pb2.MembershipResponse:
            response: raft_pb2.MembershipResponse = await stub.RemoveMember(
                request, timeout=seconds
            )
            return response

        return await self._membership_call(
            f"remove member {node_id}", call, self._attempt_timeout, self._deadline, leads=True
        )

    async def leader(self) -> tuple[int, str]:
        """The leader's id and client address, as confirmed by the leader itself."""

        async def attempt(
            address: str, stub: raft_pb2_grpc.ClusterStub, seconds: float
        ) -> Done[tuple[int, str]] | Next:
            response: raft_pb2.LeaderResponse = await stub.GetLeader(
                raft_pb2.LeaderRequest(), timeout=seconds
            )
            if response.role == "leader":
                self._leader = address
                return Done((response.node_id, address))
            leader_id = response.leader_id if response.HasField("leader_id") else None
            return self._redirect(address, leader_id, response.leader_address)

        return await self._retry("find the leader", self._read_attempt_timeout, attempt)

    async def status(self) -> ClusterStatus:
        """Ask every member for its own status, at once. The members are those of the leader's
        configuration (or, with no leader, the newest one any node reports), so nodes added since
        this client was made are asked too. A node that does not answer within the read attempt
        timeout is reported with the reason; this never raises for an unreachable node."""
        seconds = min(self._read_attempt_timeout, self._deadline)

        async def ask(address: str) -> raft_pb2.StatusResponse | str:
            try:
                response: raft_pb2.StatusResponse = await self._stub(address).Status(
                    raft_pb2.StatusRequest(), timeout=seconds
                )
            except grpc.aio.AioRpcError as e:
                details = one_line(e.details())
                return f"{e.code().name}: {details}" if details else e.code().name
            return response

        answers: dict[str, raft_pb2.StatusResponse | str] = {}
        pending = list(self._addresses)
        config: raft_pb2.Configuration | None = None
        while pending:
            results = await asyncio.gather(*(ask(address) for address in pending))
            answers.update(zip(pending, results, strict=True))
            config = _newest_configuration([a for a in answers.values() if not isinstance(a, str)])
            members = config.members if config is not None else []
            # Each round asks only addresses never asked, so this ends.
            pending = [m.client_address for m in members if m.client_address not in answers]
        replies = [a for a in answers.values() if not isinstance(a, str)]
        leaders = [r for r in replies if r.role == "leader"]
        leader = max(leaders, key=lambda r: r.term) if leaders else None
        progress = {p.id: p for p in leader.peers} if leader is not None else {}

        def leaders_view(node_id: int) -> tuple[int | None, float | None]:
            """The leader's lag and last contact for this node (0 and None for itself)."""
            if leader is not None and node_id == leader.node_id:
                return 0, None
            peer = progress.get(node_id)
            if peer is None:
                return None, None
            contact = peer.last_contact_seconds if peer.HasField("last_contact_seconds") else None
            return peer.lag, contact

        rows: dict[int | str, MemberStatus] = {}
        for reply in replies:
            lag, contact = leaders_view(reply.node_id)
            rows[reply.node_id] = MemberStatus(
                id=reply.node_id,
                raft_address=reply.raft_address,
                client_address=reply.client_address,
                role=reply.role,
                term=reply.term,
                leader_id=reply.leader_id if reply.HasField("leader_id") else None,
                commit_index=reply.commit_index,
                applied_index=reply.applied_index,
                last_log_index=reply.last_log_index,
                snapshot_index=reply.snapshot_index,
                voter=reply.voter,
                learner=reply.learner,
                serving=reply.serving,
                time_scale=reply.time_scale or 1.0,
                lag=lag,
                last_contact=contact,
            )
        by_address = {v: k for k, v in self._address_of.items()}
        if config is not None:
            self._address_of.update((m.id, m.client_address) for m in config.members)
            for m in config.members:
                if m.id not in rows:
                    problem = answers.get(m.client_address)
                    lag, contact = leaders_view(m.id)
                    rows[m.id] = MemberStatus(
                        id=m.id,
                        raft_address=m.raft_address,
                        client_address=m.client_address,
                        error=problem if isinstance(problem, str) else "not asked",
                        voter=m.voter,
                        learner=not m.voter,
                        lag=lag,
                        last_contact=contact,
                    )
        else:
            # Nobody answered: every address asked is unreachable, with its id if known.
            for address, problem in answers.items():
                node_id = by_address.get(address)
                rows[node_id if node_id is not None else address] = MemberStatus(
                    id=node_id,
                    raft_address="",
                    client_address=address,
                    error=str(problem),
                )
        nodes = sorted(rows.values(), key=lambda n: (n.id is None, n.id or 0, n.client_address))
        return ClusterStatus(nodes, leader.node_id if leader is not None else None)

    async def save_snapshot(
        self, path: str | Path, *, timeout: float = DEFAULT_SNAPSHOT_TIMEOUT
    ) -> Backup:
        """Save a backup of the whole store (every key, every client session: all the state
        machine holds) to `path`: the leader's state at one applied index, taken once it has
        confirmed it leads, so the backup holds every write completed before the call. The
        file is written atomically (a temporary file, fsync'd, verified, renamed); returns what
        it holds. An admin call under TLS. BackupError if what arrived does not verify; OSError
        if `path` cannot be written."""

        async def attempt(
            address: str, stub: raft_pb2_grpc.ClusterStub, seconds: float
        ) -> Done[Backup] | Next:
            call = stub.SaveSnapshot(raft_pb2.SaveSnapshotRequest(), timeout=seconds)
            try:
                first = await call.read()
                if first is grpc.aio.EOF:
                    return Next(f"{address} ended the backup stream without a word")
                if not first.success:
                    leader_id = first.current_leader if first.HasField("current_leader") else None
                    return self._redirect(address, leader_id, first.leader_address)
                self._leader = address

                async def chunks() -> AsyncIterator[bytes]:
                    while (chunk := await call.read()) is not grpc.aio.EOF:
                        yield chunk.data

                return Done(await write_backup_file(str(path), chunks()))
            finally:
                call.cancel()

        return await self._retry("save a snapshot", timeout, attempt, deadline=timeout)

    def event_addresses(self, node: str | None = None) -> list[str]:
        """The client addresses `events(node)` follows: `node` as a node id this client knows or
        as a client address ("host:port"); None: every node this client knows."""
        if node is None:
            known = list(self._addresses) + list(self._address_of.values())
            return list(dict.fromkeys(known))
        if node.isdigit() and int(node) in self._address_of:
            return [self._address_of[int(node)]]
        try:
            parse_host_port(node)
        except ConfigError:
            raise ConfigError(f"{node!r} is neither a known node id nor a host:port") from None
        return [node]

    async def events(
        self,
        node: str | None = None,
        on_unreachable: Callable[[str, str], None] | None = None,
    ) -> AsyncIterator[raft_pb2.NodeEvent]:
        """What the nodes do, as it happens (Cluster.Events): from one node (`node`: its id or
        client address) or, with None, from every node this client knows, merged as the events
        arrive. Each node's events are in order; each stream starts with a "state" event, and
        again after a reconnection. Never ends by itself: stop iterating (or cancel) to end it.

        A node that cannot be reached, or whose stream breaks, is asked again every few seconds;
        `on_unreachable(address, reason)` is told once per outage. Raises PermissionDeniedError
        when a node refuses this client, RequestRejectedError when it has no event stream."""
        queue: asyncio.Queue[raft_pb2.NodeEvent | BaseException] = asyncio.Queue(EVENTS_BUFFER)
        tasks = [
            asyncio.create_task(self._follow_events(address, queue, on_unreachable))
            for address in self.event_addresses(node)
        ]
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow_events(
        self,
        address: str,
        queue: asyncio.Queue[raft_pb2.NodeEvent | BaseException],
        on_unreachable: Callable[[str, str], None] | None,
    ) -> None:
        """One node's events into `queue`, reconnecting with backoff for as long as it runs."""
        pause = EVENTS_RETRY_MIN
        reported = False
        while True:
            call = self._stub(address).Events(raft_pb2.EventsRequest())
            try:
                async for batch in call:
                    reported = False
                    pause = EVENTS_RETRY_MIN
                    for event in batch.events:
                        await queue.put(event)
                reason = "the node ended the stream"
            except grpc.aio.AioRpcError as e:
                code: grpc.StatusCode = e.code()
                details = one_line(e.details())
                if code in DENIED:
                    await queue.put(PermissionDeniedError(details or code.name))
                    return
                if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT):
                    await queue.put(RequestRejectedError(f"{address}: {details or code.name}"))
                    return
                reason = f"{code.name}: {details}" if details else code.name
            finally:
                call.cancel()
            if not reported and on_unreachable is not None:
                on_unreachable(address, reason)
            reported = True
            await asyncio.sleep(random.uniform(pause / 2, pause))
            pause = min(pause * 2, EVENTS_RETRY_MAX)

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

    async def _membership_call(
        self,
        what: str,
        call: Callable[[raft_pb2_grpc.ClusterStub, float], Awaitable[raft_pb2.MembershipResponse]],
        attempt_seconds: float,
        deadline: float,
        *,
        leads: bool,
    ) -> MemberList:
        """One membership call, sent to the leader through redirects and retried like a write.
        `leads`: only the leader answers it with success (so the answering node leads)."""

        async def attempt(
            address: str, stub: raft_pb2_grpc.ClusterStub, seconds: float
        ) -> Done[MemberList] | Next:
            response = await call(stub, seconds)
            leader_id = response.current_leader if response.HasField("current_leader") else None
            if not response.success:
                return self._redirect(address, leader_id, response.leader_address)
            if leads:
                self._leader = address
            members = [
                Member(m.id, m.raft_address, m.client_address, m.voter)
                for m in response.config.members
            ]
            # Members added since this client was made can now be found by id in a redirect.
            self._address_of.update((m.id, m.client_address) for m in members)
            return Done(
                MemberList(
                    members=members,
                    removed=list(response.config.removed_ids),
                    config_index=response.config_index,
                    committed=response.committed,
                    leader_id=leader_id,
                )
            )

        return await self._retry(
            what,
            attempt_seconds,
            attempt,
            deadline=deadline,
            refused=MembershipRefusedError,
            busy_retries=CHANGE_BUSY_RETRIES,
        )

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


def _newest_configuration(
    replies: Sequence[raft_pb2.StatusResponse],
) -> raft_pb2.Configuration | None:
    """The configuration of the leader of the newest term among the replies; with no leader, the
    one from the highest log index any node reports."""
    if not replies:
        return None
    leaders = [r for r in replies if r.role == "leader"]
    if leaders:
        return max(leaders, key=lambda r: r.term).config
    return max(replies, key=lambda r: r.config_index).config


if __name__ == "__main__":
    # `python cluster_client.py` runs the command line, which is built on this library, never the
    # reverse: run as a program, this file only hands over to it (as raft_node.py does).
    sys.exit(importlib.import_module("cluster_cli").main())
