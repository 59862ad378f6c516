"""What one node's replication costs, counted where it happens: messages to and from peers,
entries per AppendEntries message, fsyncs. Plain integer increments (no allocation, no lock), read
when `/metrics` is scraped, so that a benchmark can say what each write cost each node."""

from __future__ import annotations

from node_types import MAX_ENTRIES_PER_MESSAGE


class Counters:
    """One node's counters since it started. Each is only ever incremented on the event loop."""

    __slots__ = (
        "appends_sent",
        "entries_sent",
        "appends_received",
        "entries_received",
        "messages_sent",
        "messages_received",
        "read_rounds",
        "entries_per_append",
    )

    def __init__(self) -> None:
        # AppendEntries requests this node sent as leader, and the entries they carried.
        self.appends_sent = 0
        self.entries_sent = 0
        # AppendEntries requests this node received as follower, and their entries.
        self.appends_received = 0
        self.entries_received = 0
        # Every Raft message (a request or a reply) that left or reached this node: AppendEntries,
        # InstallSnapshot and ReadIndex, both ways.
        self.messages_sent = 0
        self.messages_received = 0
        # Rounds of heartbeats a leader started to confirm it still leads for reads.
        self.read_rounds = 0
        # Leader: how many AppendEntries messages carried n entries, at [n] (heartbeats at [0]).
        self.entries_per_append = [0] * (MAX_ENTRIES_PER_MESSAGE + 1)

    def sent_append(self, entries: int) -> None:
        self.appends_sent += 1
        self.entries_sent += entries
        self.messages_sent += 1
        self.entries_per_append[entries] += 1

    def received_append(self, entries: int) -> None:
        self.appends_received += 1
        self.entries_received += entries
        self.messages_received += 1
        # Its reply.
        self.messages_sent += 1
