"""The simulated network: directed links between nodes (and between clients and nodes) on which
faults drop, delay, duplicate, reorder and partition messages. It also carries the operator's
membership calls (add and remove a member) to the nodes, as a client would."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cluster_config import NodeAddress
from cluster_leases import on_leader
from membership import ChangeInProgressError, MembershipError
from node_types import put_entry
from raft_node import (
    CommitUnknownError,
    InvalidRequestError,
    NotLeaderError,
    PeerUnreachableError,
    RaftNode,
    SessionExpiredError,
    UnavailableError,
)
from rpc import raft_pb2
from state_machine import ApplyResult, CasResult, SessionExpired
from test.memory_transport import Reply, Request
from test.sim_checks import Invariants
from test.sim_loop import Trace

Link = tuple[int, int]


# What the network needs of the simulated world (test/sim_world.py builds it on the network, so the
# network states its needs instead of importing the world).
class Host(Protocol):
    """A machine: the process running on it now, if any."""

    @property
    def node_id(self) -> int: ...

    @property
    def departed(self) -> bool: ...

    @property
    def paused(self) -> bool: ...

    @property
    def process(self) -> Process | None: ...


class Process(Protocol):
    """One run of a node on its host: messages are handled inside it, and die with it."""

    @property
    def host(self) -> Host: ...

    @property
    def node(self) -> RaftNode: ...

    def enter(self, action: Callable[[], object]) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None: ...


class World(Protocol):
    """The simulation: its loop, trace, randomness for the network, hosts and invariants."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def trace(self) -> Trace: ...

    @property
    def net_rng(self) -> random.Random: ...

    @property
    def invariants(self) -> Invariants: ...

    @property
    def hosts(self) -> Mapping[int, Host]: ...

    def address(self, node_id: int) -> NodeAddress: ...

    def fail(self, invariant: str, detail: str) -> None: ...

    def voted(self, node_id: int) -> None: ...

    def catching_up(self, node_id: int, mid_snapshot: bool) -> None: ...

    def heard(self, node_id: int, src: int) -> None: ...


@dataclass(frozen=True)
class LinkEffect:
    """What one fault does to the links it covers."""

    cut: bool = False
    drop: float = 0.0
    duplicate: float = 0.0
    # Extra delay drawn uniformly from this range (seconds).
    delay: tuple[float, float] | None = None
    # Extra delay drawn uniformly from [0, jitter]: messages overtake each other.
    jitter: float = 0.0


@dataclass
class LinkState:
    cut: bool = False
    drop: float = 0.0
    duplicate: float = 0.0
    delays: list[tuple[float, float]] = field(default_factory=list)
    jitter: float = 0.0


_HEALTHY = LinkState()


# A write's session: (client_id, sequence, first_outstanding).
SessionNumbers = tuple[int, int, int]


# Requests only a leader sends.
_FROM_LEADERS = (
    raft_pb2.AppendEntriesRequest,
    raft_pb2.InstallSnapshotRequest,
    raft_pb2.TimeoutNowRequest,
)


# The keys the simulation's lease client puts start with this.
LEASE_KEY_PREFIX = "lease/"


@dataclass(frozen=True)
class ClientOp:
    """One request: "put" (the seed's, no session), "get", "range" (every key), or with a session "put-many",
    "delete", "cas" (expected None: absent) and "register"; or the operator's "add-member" and
    "remove-member" of node `member` (an add waits for the promotion to voter with `wait`); or
    the leases' "lease-grant" (of `ttl` seconds), "lease-put" (`key`=`value` with `lease`) and
    "keepalive" (of `lease`, answered by the leader as the Cluster service does)."""

    kind: str
    key: str = ""
    value: str | None = None
    expected: str | None = None
    mappings: tuple[tuple[str, str], ...] = ()
    session: SessionNumbers | None = None
    member: int = 0
    wait: bool = False
    lease: int = 0
    ttl: int = 0

    def command(self) -> raft_pb2.Command:
        if self.kind == "register":
            return raft_pb2.Command(register_client=raft_pb2.RegisterClientRequest())
        client_id, sequence, first_outstanding = self.session or (0, 0, 0)
        session = raft_pb2.Session(
            client_id=client_id, sequence=sequence, first_outstanding=first_outstanding
        )
        if self.kind == "put-many":
            mappings = [raft_pb2.Mapping(key=k, value=v) for k, v in self.mappings]
            return raft_pb2.Command(put=raft_pb2.MappingBatch(mappings=mappings, session=session))
        if self.kind == "delete":
            return raft_pb2.Command(delete=raft_pb2.DeleteRequest(key=self.key, session=session))
        assert self.kind == "cas" and self.value is not None
        cas = raft_pb2.CompareAndSwapRequest(key=self.key, new_value=self.value, session=session)
        if self.expected is not None:
            cas.expected_value = self.expected
        return raft_pb2.Command(compare_and_swap=cas)


@dataclass(frozen=True)
class ClientReply:
    """ok (with a get's value or a write's result), not-leader (with the leader the node named),
    unavailable, unknown, or expired (the session is gone; the outcome is unknown); to a
    membership call also busy (another change is not yet committed) or refused (with why)."""

    status: str
    value: str | None = None
    leader: int | None = None
    # A delete's existed, a cas's CasResult, a registration's client id.
    result: object = None


def describe(message: Request | Reply) -> str:
    if isinstance(message, raft_pb2.AppendEntriesRequest):
        return (
            f"append t{message.term} prev {message.prev_log_index}/t{message.prev_log_term} "
            f"+{len(message.log_entries)} commit {message.leader_commit}"
        )
    if isinstance(message, raft_pb2.VoteRequest):
        kind = "pre-vote" if message.pre_vote else "vote"
        flag = " (transfer)" if message.leadership_transfer else ""
        return (
            f"{kind}? t{message.term} last {message.last_log_index}/t{message.last_log_term}{flag}"
        )
    if isinstance(message, raft_pb2.InstallSnapshotRequest):
        done = " done" if message.done else ""
        return (
            f"snapshot t{message.term} upto {message.last_included_index}/"
            f"t{message.last_included_term} at {message.offset}/{message.total_size}{done}"
        )
    if isinstance(message, raft_pb2.InstallSnapshotResponse):
        installed = " installed" if message.installed else ""
        return f"snapshot ack t{message.term} next {message.next_offset}{installed}"
    if isinstance(message, raft_pb2.TimeoutNowRequest):
        return f"timeout now! t{message.term}"
    if isinstance(message, raft_pb2.TimeoutNowResponse):
        return f"timeout now ack t{message.term}"
    if isinstance(message, raft_pb2.ReadIndexRequest):
        return f"read index? t{message.term}"
    if isinstance(message, raft_pb2.ReadIndexResponse):
        if message.success:
            return f"read index {message.read_index} t{message.term}"
        return f"read index refused t{message.term}"
    if isinstance(message, raft_pb2.AppendEntriesResponse):
        if message.success:
            return f"append ok t{message.term} match {message.match_index}"
        return (
            f"append refused t{message.term} conflict "
            f"{message.conflict_index}/t{message.conflict_term}"
        )
    return f"vote {'yes' if message.vote_granted else 'no'} t{message.term}"


# Client writes reaching one node within this many (simulated) seconds of each other are appended
# in one batch, as the writes of one Batch call are.
BATCH_WINDOW = 0.005


class Network:
    """Directed links between nodes (and between clients and nodes) with faults layered on them.

    Every delivery is a timer on the loop at a random delay (mostly milliseconds), so messages on one
    link overtake each other whenever their delays do. A message may be dropped, duplicated or held
    back by a fault; one to a crashed node is lost; one to a paused node waits until it resumes.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self.rng = world.net_rng
        self._effects: dict[int, tuple[frozenset[Link], LinkEffect]] = {}
        self._next_effect = 0
        self._links: dict[Link, LinkState] = {}
        self._next_message = 0
        self._newest_arrival: dict[Link, int] = {}
        self.client_drop = 0.0
        self.stats: Counter[str] = Counter()
        # Client writes that reached a process and wait to be appended in one batch.
        self._batches: dict[
            Process, list[tuple[raft_pb2.LogEntry, asyncio.Future[ApplyResult]]]
        ] = {}

    # ---- faults on links -------------------------------------------------------------------

    def add_effect(self, links: Iterable[Link], effect: LinkEffect) -> int:
        self._next_effect += 1
        self._effects[self._next_effect] = (frozenset(links), effect)
        self._links.clear()
        return self._next_effect

    def remove_effect(self, effect_id: int) -> None:
        self._effects.pop(effect_id, None)
        self._links.clear()

    def link(self, src: int, dst: int) -> LinkState:
        key = (src, dst)
        state = self._links.get(key)
        if state is None:
            state = LinkState()
            for links, effect in self._effects.values():
                if key in links:
                    state.cut = state.cut or effect.cut
                    state.drop = max(state.drop, effect.drop)
                    state.duplicate = max(state.duplicate, effect.duplicate)
                    state.jitter = max(state.jitter, effect.jitter)
                    if effect.delay is not None:
                        state.delays.append(effect.delay)
            if state == _HEALTHY:
                state = _HEALTHY
            self._links[key] = state
        return state

    def _delay(self, state: LinkState) -> float:
        rng = self.rng
        delay = 0.0002 + min(rng.expovariate(500.0), 0.05)
        if state.jitter:
            delay += rng.uniform(0.0, state.jitter)
        for low, high in state.delays:
            delay += rng.uniform(low, high)
        return delay

    def _fates(self, state: LinkState) -> list[float | None]:
        """The delay of each copy the network delivers (None: that copy is dropped)."""
        rng = self.rng
        copies = 2 if state.duplicate and rng.random() < state.duplicate else 1
        if copies > 1:
            self.stats["duplicated"] += 1
        return [
            None if state.drop and rng.random() < state.drop else self._delay(state)
            for _ in range(copies)
        ]

    @staticmethod
    def _fate_text(fates: list[float | None]) -> str:
        shown = ["dropped" if d is None else f"+{d * 1000:.1f} ms" for d in fates]
        return ("duplicated: " if len(fates) > 1 else "") + ", ".join(shown)

    # ---- peer messages ---------------------------------------------------------------------

    def send_request(
        self, sender: Process, dst: int, request: Request, future: asyncio.Future[Reply]
    ) -> None:
        src = sender.host.node_id
        self._next_message += 1
        number = self._next_message
        self.stats["messages"] += 1
        data = request.SerializeToString()
        kind = type(request)
        self._transmit(
            src,
            dst,
            f"#{number} {describe(request)}",
            lambda: self._arrive_request(sender, dst, kind, data, future, number),
        )

    def _transmit(self, src: int, dst: int, what: str, arrive: Callable[[], None]) -> None:
        """Put one message on the link src->dst: lost to a partition, dropped, or handed to
        `arrive` after a random delay (twice if the network duplicates it)."""
        world = self.world
        state = self.link(src, dst)
        if state.cut:
            self.stats["lost to partitions"] += 1
            world.trace.event("net", f"{src}->{dst} {what}: partitioned", False)
            return
        fates = self._fates(state)
        world.trace.event("net", f"{src}->{dst} {what}: {self._fate_text(fates)}", False)
        now = world.loop.time()
        for delay in fates:
            if delay is None:
                self.stats["dropped"] += 1
            else:
                world.loop.call_at(now + delay, arrive)

    def _arrived(self, src: int, dst: int, number: int, what: str) -> bool:
        """Whether a message may be delivered now; counts reordering and traces losses."""
        if self.link(src, dst).cut:
            self.stats["lost to partitions"] += 1
            self.world.trace.event("net", f"{src}->{dst} #{number} {what} lost: partitioned", False)
            return False
        newest = self._newest_arrival.get((src, dst), 0)
        if number < newest:
            self.stats["reordered"] += 1
        else:
            self._newest_arrival[src, dst] = number
        return True

    def _arrive_request(
        self,
        sender: Process,
        dst: int,
        kind: type[Request],
        data: bytes,
        future: asyncio.Future[Reply],
        number: int,
    ) -> None:
        src = sender.host.node_id
        if not self._arrived(src, dst, number, "request"):
            return
        host = self.world.hosts[dst]
        process = host.process
        if process is None:
            self.stats["lost to crashed nodes"] += 1
            why = "has left the cluster" if host.departed else "is down"
            self.world.trace.event("net", f"{src}->{dst} #{number} lost: {dst} {why}", False)
            return
        if host.paused:
            self.world.trace.event("net", f"{src}->{dst} #{number} held: {dst} is paused", False)

        def serve() -> None:
            self.world.heard(dst, src)
            process.spawn(
                self._serve_request(process, sender, kind, data, future, number),
                f"handling message #{number}",
            )

        process.enter(serve)

    async def _serve_request(
        self,
        process: Process,
        sender: Process,
        kind: type[Request],
        data: bytes,
        future: asyncio.Future[Reply],
        number: int,
    ) -> None:
        node = process.node
        src = sender.host.node_id
        # A node refuses a removed sender and a non-member's vote, read index or TimeoutNow
        # request, and may refuse a non-member's entries (while it hears from a leader of its
        # own); what its configuration says as the message arrives decides which.
        config = node.config
        removed = node.configs.at(node.commit_index).removed
        if not node.is_voter and kind in (
            raft_pb2.AppendEntriesRequest,
            raft_pb2.InstallSnapshotRequest,
        ):
            self._taking_in(process, kind, data)
        reply: Reply
        try:
            if kind is raft_pb2.VoteRequest:
                reply = await node.handle_request_vote(raft_pb2.VoteRequest.FromString(data))
            elif kind is raft_pb2.ReadIndexRequest:
                reply = await node.handle_read_index(raft_pb2.ReadIndexRequest.FromString(data))
            elif kind is raft_pb2.TimeoutNowRequest:
                reply = await node.handle_timeout_now(raft_pb2.TimeoutNowRequest.FromString(data))
            elif kind is raft_pb2.InstallSnapshotRequest:
                reply = await node.handle_install_snapshot(
                    raft_pb2.InstallSnapshotRequest.FromString(data)
                )
            else:
                reply = await node.handle_append_entries(
                    raft_pb2.AppendEntriesRequest.FromString(data)
                )
        except InvalidRequestError as e:
            why = str(e)
            if src in config.removed or not config.is_member(src):
                self.stats["refused: sender removed or not a member"] += 1
                if kind is raft_pb2.TimeoutNowRequest:
                    self.stats["hand-overs refused"] += 1
                process.enter(lambda: self._send_refusal(process, sender, why, future, number))
                return
            self.world.fail(
                "well-formed messages",
                f"node {process.host.node_id} refused message #{number} from node "
                f"{src} as malformed: {e}",
            )
            return
        request = kind.FromString(data)
        self.world.invariants.message_accepted(
            node,
            src,
            f"message #{number} ({kind.__name__})",
            request.term,
            kind in _FROM_LEADERS,
            removed,
        )
        process.enter(lambda: self._send_reply(process, sender, reply, future, number))
        # A granted pre-vote records nothing, so only real votes count (crash-after-vote).
        if isinstance(reply, raft_pb2.RequestVoteResponse) and reply.vote_granted:
            assert isinstance(request, raft_pb2.VoteRequest)
            if not request.pre_vote:
                self.world.voted(process.host.node_id)

    def _taking_in(self, process: Process, kind: type[Request], data: bytes) -> None:
        """A node that does not vote (yet) is about to take in entries or a snapshot chunk."""
        if kind is raft_pb2.InstallSnapshotRequest:
            self.world.catching_up(process.host.node_id, True)
        elif raft_pb2.AppendEntriesRequest.FromString(data).log_entries:
            self.world.catching_up(process.host.node_id, False)

    def _send_refusal(
        self,
        replier: Process,
        sender: Process,
        why: str,
        future: asyncio.Future[Reply],
        number: int,
    ) -> None:
        """The error a refused request gets (INVALID_ARGUMENT over gRPC: the caller sees its peer
        as unreachable)."""
        src = replier.host.node_id
        dst = sender.host.node_id

        def arrive() -> None:
            if not self._arrived(src, dst, number, "refusal"):
                return

            def deliver() -> None:
                if not future.done():
                    future.set_exception(PeerUnreachableError(f"INVALID_ARGUMENT: {why}"))

            sender.enter(deliver)

        self._transmit(src, dst, f"reply to #{number}: refused ({why})", arrive)

    def _send_reply(
        self,
        replier: Process,
        sender: Process,
        reply: Reply,
        future: asyncio.Future[Reply],
        number: int,
    ) -> None:
        src = replier.host.node_id
        data = reply.SerializeToString()
        kind = type(reply)
        self._transmit(
            src,
            sender.host.node_id,
            f"reply to #{number} {describe(reply)}",
            lambda: self._arrive_reply(src, sender, kind, data, future, number),
        )

    def _arrive_reply(
        self,
        src: int,
        sender: Process,
        kind: type[Reply],
        data: bytes,
        future: asyncio.Future[Reply],
        number: int,
    ) -> None:
        dst = sender.host.node_id
        # Replies are numbered after the requests they answer, for the reordering count.
        if not self._arrived(src, dst, number, "reply"):
            return

        def deliver() -> None:
            self.world.heard(dst, src)
            if future.done():
                self.stats["late replies"] += 1
            else:
                future.set_result(kind.FromString(data))

        sender.enter(deliver)

    # ---- client requests -------------------------------------------------------------------

    def client_call(
        self, client: int, node_id: int, op: ClientOp, future: asyncio.Future[ClientReply]
    ) -> None:
        """Send a client's request to a node; its reply (if any) settles `future`."""
        world = self.world
        if self.client_drop and self.rng.random() < self.client_drop:
            self.stats["client messages dropped"] += 1
            world.trace.event("net", f"c{client}->{node_id} request dropped")
            return
        world.loop.call_at(
            world.loop.time() + self._delay(_HEALTHY),
            self._client_arrives,
            client,
            node_id,
            op,
            future,
        )

    def _client_arrives(
        self, client: int, node_id: int, op: ClientOp, future: asyncio.Future[ClientReply]
    ) -> None:
        process = self.world.hosts[node_id].process
        if process is None:
            return
        process.enter(
            lambda: process.spawn(
                self._serve_client(process, client, op, future), f"serving client {client}"
            )
        )

    async def _serve_client(
        self, process: Process, client: int, op: ClientOp, future: asyncio.Future[ClientReply]
    ) -> None:
        node = process.node
        try:
            if op.kind == "add-member":
                address = self.world.address(op.member)
                reply = ClientReply("ok", result=await node.add_member(address, op.wait))
            elif op.kind == "remove-member":
                reply = ClientReply("ok", result=await node.remove_member(op.member))
            elif op.kind == "put":
                assert op.value is not None
                # The seed's put, in a batch with the writes that reach this node close to it,
                # as the Cluster service's Batch call appends them (propose_entries).
                await self._batched_write(process, put_entry(op.key, op.value))
                reply = ClientReply("ok")
                self.world.invariants.acknowledged_put(node.node_id, op.key, op.value)
            elif op.kind == "get":
                # Any node serves it: the leader confirms itself, a follower asks it (ReadIndex).
                reply = ClientReply("ok", await node.linearizable_read(op.key))
            elif op.kind in ("put-many", "delete"):
                entry = raft_pb2.LogEntry(kind=raft_pb2.ENTRY_KIND_COMMAND, command=op.command())
                result = await self._batched_write(process, entry)
                reply = ClientReply(
                    "expired" if isinstance(result, SessionExpired) else "ok", result=result
                )
            elif op.kind == "lease-grant":
                grant = raft_pb2.LeaseGrantRequest(ttl=op.ttl)
                reply = ClientReply(
                    "ok", result=await node.propose(raft_pb2.Command(lease_grant=grant))
                )
            elif op.kind == "lease-put":
                assert op.value is not None
                mapping = raft_pb2.Mapping(key=op.key, value=op.value, lease=op.lease)
                command = raft_pb2.Command(put=raft_pb2.MappingBatch(mappings=[mapping]))
                reply = ClientReply("ok", result=await node.propose(command))
            elif op.kind == "keepalive":
                lease_id = op.lease
                ttl = await on_leader(
                    node, lambda keeper, arrived: keeper.keep_alive(lease_id, arrived)
                )
                reply = ClientReply("ok" if ttl is not None else "gone", result=ttl)
            elif op.kind == "range":
                # Every key in order, through the same read path as a get; the lease client's
                # keys (test/sim_leases.py) are not the linearizability checker's business.
                pairs = await node.reads.linearizable(
                    lambda m: tuple(
                        (kv.key, kv.value)
                        for kv in m.range("", None, 1000, 1 << 30).kvs
                        if not kv.key.startswith(LEASE_KEY_PREFIX)
                    ),
                    "range",
                )
                reply = ClientReply("ok", result=pairs)
            else:
                result = await node.propose(op.command())
                if isinstance(result, SessionExpired):
                    reply = ClientReply("expired")
                else:
                    assert op.kind != "cas" or isinstance(result, CasResult)
                    reply = ClientReply("ok", result=result)
        except NotLeaderError as e:
            reply = ClientReply("not-leader", leader=e.leader_id)
        except UnavailableError:
            reply = ClientReply("unavailable")
        except CommitUnknownError:
            reply = ClientReply("unknown")
        except SessionExpiredError:
            reply = ClientReply("expired")
        except ChangeInProgressError:
            reply = ClientReply("busy")
        except MembershipError as e:
            reply = ClientReply("refused", result=str(e))
        process.enter(lambda: self._client_reply(process, client, reply, future))

    async def _batched_write(self, process: Process, entry: raft_pb2.LogEntry) -> ApplyResult:
        """Append `entry` together with the other writes that reach this process within
        BATCH_WINDOW, in one propose_entries call, and return its own outcome."""
        future: asyncio.Future[ApplyResult] = self.world.loop.create_future()
        waiting = self._batches.setdefault(process, [])
        waiting.append((entry, future))
        if len(waiting) == 1:
            self.world.loop.call_at(
                self.world.loop.time() + BATCH_WINDOW,
                lambda: process.enter(lambda: self._send_batch(process)),
            )
        return await future

    def _send_batch(self, process: Process) -> None:
        waiting = self._batches.pop(process, [])
        if not waiting:
            return
        self.stats["client write batches"] += 1
        self.stats["client writes batched"] += len(waiting)
        if len(waiting) > 1:
            self.stats["client batches of several"] += 1

        async def send() -> None:
            try:
                outcomes = await process.node.propose_entries([entry for entry, _ in waiting])
            except Exception as e:  # NotLeaderError, OverloadedError: nothing appended
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(e)
                return
            for (_, future), outcome in zip(waiting, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

        process.spawn(send(), "a batch of client writes")

    def _client_reply(
        self,
        process: Process,
        client: int,
        reply: ClientReply,
        future: asyncio.Future[ClientReply],
    ) -> None:
        world = self.world
        node_id = process.host.node_id
        if self.client_drop and self.rng.random() < self.client_drop:
            self.stats["client messages dropped"] += 1
            world.trace.event("net", f"{node_id}->c{client} reply {reply.status} dropped")
            return

        def deliver() -> None:
            if not future.done():
                future.set_result(reply)

        world.loop.call_at(world.loop.time() + self._delay(_HEALTHY), deliver)
