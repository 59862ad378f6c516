"""The node's event stream (`Cluster.Events`): what the node does, as it happens, handed to every
subscriber through a bounded queue of its own, so a slow subscriber loses events (and is told how
many) instead of slowing the node. With nobody subscribed it costs one attribute check.

The node calls `feed.emit(...)` (or `narrate.tell(...)`, which also narrates the line) only behind
`if feed.active:` where the call would build anything, so a node nobody watches formats no text
and builds no message. Each event carries the node's state after it.

Sequence numbers count per subscription from 1. An event that finds its subscriber's queue full
is dropped but keeps its number; before the next event that fits (or as soon as the subscriber
reads again) the subscriber gets one "dropped" event whose `count` says how many it missed and
whose `seq` is the last missed one's. So for every event `seq == previous seq + 1`, except a
"dropped" one, for which `seq == previous seq + count`: a gap never goes unsaid.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, Protocol

from membership import Membership
from rpc import raft_pb2

# Events one subscriber may have waiting; beyond them it is sent a "dropped" count instead.
QUEUE_EVENTS = 4096
# Events sent in one message at most (each is a few hundred bytes).
BATCH_EVENTS = 512
# After sending a batch, a subscriber's stream rests this long, so that under a steady flow each message
# carries what a twentieth of a second brings rather than one or two events: the per-message cost of
# a gRPC stream is most of what a watcher costs the node. An event after a quiet spell leaves at once.
SEND_PACE = 0.05
# Subscribers one node serves at once (each costs a copy of every event); more are refused.
MAX_SUBSCRIBERS = 64

_ENTRY_KINDS = {
    raft_pb2.ENTRY_KIND_MAPPING: "mapping",
    raft_pb2.ENTRY_KIND_NOOP: "noop",
    raft_pb2.ENTRY_KIND_CONFIG: "config",
    raft_pb2.ENTRY_KIND_COMMAND: "command",
}


class EventSource(Protocol):
    """What the feed reads of its node to describe the node's state after each event."""

    @property
    def node_id(self) -> int: ...
    @property
    def role(self) -> str: ...
    @property
    def current_term(self) -> int: ...
    @property
    def voted_for(self) -> int | None: ...
    @property
    def last_applied(self) -> int: ...
    @property
    def config(self) -> Membership: ...

    leader_id: int | None
    commit_index: int
    wall_clock: Callable[[], float]

    def log_position(self) -> tuple[int, int, int]:
        """(last index, last term, index the newest snapshot covers)."""
        ...

    @property
    def time_scale(self) -> float: ...


class NarratedNode(EventSource, Protocol):
    """A node that narrates: what it says also goes to its feed."""

    feed: EventFeed


class TooManySubscribersError(Exception):
    """The node already serves MAX_SUBSCRIBERS event streams."""


class Subscription:
    """One subscriber's queue of events, in the order the node emitted them."""

    def __init__(self, feed: EventFeed, capacity: int) -> None:
        self._feed = feed
        self._capacity = capacity
        self._queue: deque[raft_pb2.NodeEvent] = deque()
        # The last sequence number given out, delivered or dropped.
        self._seq = 0
        # Events missed since the last one queued.
        self._dropped = 0
        self._wake = asyncio.Event()

    def offer(self, event: raft_pb2.NodeEvent) -> None:
        """Queue `event` (numbered here) or, if the queue is full, count it as dropped."""
        self._seq += 1
        if len(self._queue) >= self._capacity:
            self._dropped += 1
            return
        if self._dropped:
            self._queue.append(self._marker(self._seq - 1))
        event.seq = self._seq
        self._queue.append(event)
        self._wake.set()

    def _marker(self, seq: int) -> raft_pb2.NodeEvent:
        count, self._dropped = self._dropped, 0
        marker = self._feed.build(
            "dropped", f"this subscriber fell behind: {count} events were dropped", count=count
        )
        marker.seq = seq
        return marker

    async def next(self) -> raft_pb2.NodeEvent:
        """The next event, waiting for one if need be."""
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._dropped:
                return self._marker(self._seq)
            self._wake.clear()
            await self._wake.wait()

    async def next_batch(self, most: int = BATCH_EVENTS) -> list[raft_pb2.NodeEvent]:
        """Every event queued now (at most `most`), waiting for the first if need be: one message
        on the wire per batch, not per event."""
        batch = [await self.next()]
        queue = self._queue
        while queue and len(batch) < most:
            batch.append(queue.popleft())
        if not queue and self._dropped and len(batch) < most:
            batch.append(self._marker(self._seq))
        return batch

    def close(self) -> None:
        self._feed.unsubscribe(self)


class EventFeed:
    """The node's events, to every current subscriber. `active` is true while anyone subscribes:
    the one check a hook makes before it builds anything."""

    def __init__(self, node: EventSource, capacity: int = QUEUE_EVENTS) -> None:
        self._node = node
        self._capacity = capacity
        self._subscribers: list[Subscription] = []
        self.active = False
        self._config: Membership | None = None
        self._members: list[int] = []

    def subscribe(self) -> Subscription:
        """A new subscription whose first event is a "state" event: the node as it stands."""
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise TooManySubscribersError(
                f"node {self._node.node_id} already serves {MAX_SUBSCRIBERS} event streams"
            )
        subscription = Subscription(self, self._capacity)
        node = self._node
        leader = node.leader_id
        subscription.offer(
            self.build(
                "state",
                f"{node.role} in term {node.current_term}, "
                + (f"leader {leader}" if leader is not None else "no leader known")
                + f", commit index {node.commit_index}",
            )
        )
        self._subscribers.append(subscription)
        self.active = True
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)
        self.active = bool(self._subscribers)

    def _members_of(self, config: Membership) -> list[int]:
        """The configuration's members in order, sorted once per configuration, not per event."""
        if config is not self._config:
            self._config, self._members = config, sorted(config.members)
        return self._members

    def build(
        self,
        kind: str,
        text: str,
        *,
        action: str = "",
        peer: int = 0,
        index: int = 0,
        count: int = 0,
        ok: bool = False,
        detail: str = "",
        deadline: float = 0.0,
        entry_terms: Iterable[int] = (),
    ) -> raft_pb2.NodeEvent:
        """An event of `kind` with the node's state as it is now (no sequence number yet)."""
        node = self._node
        last_index, last_term, snapshot_index = node.log_position()
        event = raft_pb2.NodeEvent(
            node_id=node.node_id,
            time=node.wall_clock(),
            kind=kind,
            action=action,
            text=text,
            role=node.role,
            term=node.current_term,
            last_index=last_index,
            last_term=last_term,
            commit_index=node.commit_index,
            applied_index=node.last_applied,
            snapshot_index=snapshot_index,
            peer=peer,
            index=index,
            count=count,
            ok=ok,
            detail=detail,
            deadline=deadline,
            entry_terms=entry_terms,
            time_scale=node.time_scale,
            members=self._members_of(node.config),
        )
        if node.leader_id is not None:
            event.leader_id = node.leader_id
        if node.voted_for is not None:
            event.voted_for = node.voted_for
        return event

    def emit(
        self,
        kind: str,
        text: str,
        *,
        action: str = "",
        peer: int = 0,
        index: int = 0,
        count: int = 0,
        ok: bool = False,
        detail: str = "",
        deadline: float = 0.0,
        entry_terms: Iterable[int] = (),
    ) -> None:
        """Hand an event to every subscriber; never waits. Call only when `active`."""
        event = self.build(
            kind,
            text,
            action=action,
            peer=peer,
            index=index,
            count=count,
            ok=ok,
            detail=detail,
            deadline=deadline,
            entry_terms=entry_terms,
        )
        first = True
        for subscription in self._subscribers:
            if first:
                subscription.offer(event)
                first = False
            else:
                copy = raft_pb2.NodeEvent()
                copy.CopyFrom(event)
                subscription.offer(copy)

    # What the core reports, worded here so the core stays short. Call only when `active`.

    def timer_armed(self, timeout: float, deadline: float) -> None:
        """The election timer was armed: it fires at `deadline` (wall clock) unless a leader speaks."""
        self.emit(
            "timer",
            f"election timer armed: {timeout * 1000:.0f} ms without a leader and I stand",
            action="armed",
            deadline=deadline,
        )

    def candidate(self, term: int, transfer: bool) -> None:
        """This node became a candidate in `term`, at a leader's request when `transfer`."""
        how = " to take over from the leader" if transfer else ""
        self.emit(
            "role",
            f"became candidate in term {term}{how}, voting for myself",
            detail="transfer" if transfer else "",
        )

    def received(
        self,
        request: raft_pb2.AppendEntriesRequest,
        reply: raft_pb2.AppendEntriesResponse,
        deadline: float = 0.0,
    ) -> None:
        """A leader's AppendEntries arrived, and this is how it was answered; `deadline`: when the
        election timer it re-armed fires (no separate "timer" event for that)."""
        count = len(request.log_entries)
        what = (
            f"{count} {'entry' if count == 1 else 'entries'} after index {request.prev_log_index}"
            if count
            else "heartbeat"
        )
        self.emit(
            "replicate",
            f"{what} from {request.requester_id}: {'ok' if reply.success else 'refused'}",
            action="receive",
            peer=request.requester_id,
            index=request.prev_log_index + 1,
            count=count,
            ok=reply.success,
            deadline=deadline,
        )

    def applied(self, first: int, last: int) -> None:
        """Entries `first` to `last` were applied to the state machine."""
        span = f"entry {last}" if first == last else f"entries {first} to {last}"
        self.emit("apply", f"applied {span}", index=last, count=last - first + 1)

    def appended(self, entries: list[raft_pb2.LogEntry]) -> None:
        """Entries were appended to the log: one "append" event for them all."""
        if not entries:
            return
        first, last = entries[0].index, entries[-1].index
        span = f"entry {first}" if first == last else f"entries {first} to {last}"
        self.emit(
            "append",
            f"appended {span} (term {entries[-1].term})",
            action="append",
            index=first,
            count=len(entries),
            detail=entry_summary(entries),
            entry_terms=[e.term for e in entries],
        )


def entry_summary(entries: list[raft_pb2.LogEntry]) -> str:
    """What the entries are, briefly: each one's kind, and the key for a mapping or command."""
    parts: list[str] = []
    for entry in entries[:20]:
        kind = _ENTRY_KINDS.get(entry.kind, "entry")
        if entry.kind == raft_pb2.ENTRY_KIND_MAPPING:
            parts.append(f"mapping {entry.key}")
        elif entry.kind == raft_pb2.ENTRY_KIND_COMMAND:
            parts.append(f"command {command_summary(entry.command)}")
        else:
            parts.append(kind)
    if len(entries) > 20:
        parts.append(f"... {len(entries) - 20} more")
    return "; ".join(parts)


def command_summary(command: raft_pb2.Command) -> str:
    """A command as a few words: the operation and its key(s)."""
    op = command.WhichOneof("op")
    if op == "put":
        keys = [m.key for m in command.put.mappings]
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        return f"put {shown}"
    if op == "delete":
        return f"delete {command.delete.key}"
    if op == "compare_and_swap":
        return f"cas {command.compare_and_swap.key}"
    if op == "register_client":
        return "register client"
    return op or "empty"


class EventNarrator(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The node's narration (lines at INFO, each prefixed with the node's id, role and term);
    `tell` says a line and, when anyone subscribes, reports the same words as an event."""

    def __init__(self, node: NarratedNode) -> None:
        super().__init__(logging.getLogger("raft"), {})
        self.node = node

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        n = self.node
        # The same fields ride on the record, so a structured log format need not parse the prefix.
        fields = {"node": n.node_id, "role": n.role, "term": n.current_term}
        kwargs["extra"] = {**(kwargs.get("extra") or {}), **fields}
        return f"[{n.node_id} {n.role} t={n.current_term}] {msg}", kwargs

    def tell(
        self,
        kind: str,
        msg: str,
        *args: object,
        action: str = "",
        peer: int = 0,
        index: int = 0,
        count: int = 0,
        ok: bool = False,
        detail: str = "",
    ) -> None:
        """Narrate `msg % args` at INFO; also an event of `kind` while anyone subscribes."""
        self.info(msg, *args, stacklevel=2)
        feed = self.node.feed
        if feed.active:
            feed.emit(
                kind,
                msg % args if args else msg,
                action=action,
                peer=peer,
                index=index,
                count=count,
                ok=ok,
                detail=detail,
            )
