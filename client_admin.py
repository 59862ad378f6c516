"""The client library's operator calls: leadership transfer, membership, the cluster's status,
backups and the nodes' event streams; the part of `Client` (cluster_client.py) an operator uses."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from backup_file import Backup, write_backup_file
from client_errors import (
    CHANGE_BUSY_RETRIES,
    DENIED,
    ClientCore,
    Done,
    MembershipRefusedError,
    Next,
    PermissionDeniedError,
    RequestRejectedError,
    one_line,
)
from cluster_config import ConfigError, parse_host_port
from rpc import raft_pb2, raft_pb2_grpc

_T = TypeVar("_T")

# Adding a member may wait for the new node to catch up (by snapshot if it is far behind) and be
# promoted to voter, which can take tens of seconds: add_member has its own, longer timeout.
DEFAULT_ADD_MEMBER_TIMEOUT = 120.0
# Saving a backup streams the whole store: a large one takes a while.
DEFAULT_SNAPSHOT_TIMEOUT = 300.0

# An event stream that broke is opened again after this many seconds, doubling up to the most.
EVENTS_RETRY_MIN = 0.5
EVENTS_RETRY_MAX = 5.0
# Events read from the nodes but not yet taken by the caller; beyond them, the nodes are left to
# hold them (and to drop them, saying how many, if the caller falls far behind).
EVENTS_BUFFER = 1024


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


class AdminMethods(ClientCore):
    """Leadership, membership, status, backups and events, mixed into `Client`."""

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
