"""Prometheus metrics of one node, served over HTTP by `raft_node.py --metrics-port`: its state read
when scraped, and counters and histograms updated where the events happen."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from counters import Counters
from log import RaftLog
from node_status import NodeObserver, NodeStatus
from node_types import Role

PREFIX = "raft_demo"


class MetricsNode(Protocol):
    """What the metrics read of the node."""

    log: RaftLog
    leader_id: int | None
    counters: Counters

    def status(self) -> NodeStatus: ...


# Latencies on a loaded machine run from well under a millisecond (an fsync on a fast disk) to
# seconds (a write waiting out an election): buckets doubling from 0.25 ms to about 8 s.
_LATENCY_BUCKETS = tuple(0.00025 * 2**i for i in range(16))

# A scrape gets this long to send its request line and headers.
_REQUEST_TIMEOUT = 5.0
_MAX_REQUEST_BYTES = 16 * 1024


class NodeMetrics(NodeObserver):
    """The metrics of one node in a registry of their own (never the process-wide default), so
    several nodes in one process, as in tests, keep theirs apart. Made before the node (the log's
    fsyncs are observed from its opening on), then `attach`ed to it."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.node: MetricsNode | None = None
        self._leader: int | None = None
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.elections_started = Counter(
            f"{PREFIX}_elections_started",
            "Elections this node started as a candidate (after a successful pre-vote, or on a "
            "leadership transfer).",
            registry=r,
        )
        self.elections_won = Counter(
            f"{PREFIX}_elections_won", "Elections this node won, becoming leader.", registry=r
        )
        self.leader_changes = Counter(
            f"{PREFIX}_leader_changes",
            "Times this node learned of a leader other than the one it knew before.",
            registry=r,
        )
        self.snapshots_taken = Counter(
            f"{PREFIX}_snapshots_taken", "Snapshots this node wrote of its own state.", registry=r
        )
        self.snapshots_installed = Counter(
            f"{PREFIX}_snapshots_installed",
            "Snapshots this node installed from a leader (InstallSnapshot).",
            registry=r,
        )
        self.proposal_seconds = Histogram(
            f"{PREFIX}_proposal_duration_seconds",
            "Leader: from a write's arrival to its commit and apply.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.read_seconds = Histogram(
            f"{PREFIX}_read_duration_seconds",
            "From a linearizable read's arrival to its answer (ReadIndex, then apply).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.fsync_seconds = Histogram(
            f"{PREFIX}_fsync_duration_seconds",
            "One fsync of the log by its writer thread (one per group commit).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def attach(self, node: MetricsNode) -> None:
        """Report this node's state; make this the node's observer (or one of them) too."""
        self.node = node
        self._leader = node.leader_id
        self.registry.register(_StateCollector(node))

    def observe_fsync(self, seconds: float) -> None:
        """Called from the log's writer thread; a Histogram is safe to observe from any thread."""
        self.fsync_seconds.observe(seconds)

    def state_changed(self) -> None:
        if self.node is None:
            return
        leader = self.node.leader_id
        if leader != self._leader:
            if leader is not None:
                self.leader_changes.inc()
            self._leader = leader

    def election_started(self) -> None:
        self.elections_started.inc()

    def election_won(self) -> None:
        self.elections_won.inc()

    def proposal_committed(self, seconds: float) -> None:
        self.proposal_seconds.observe(seconds)

    def read_served(self, seconds: float) -> None:
        self.read_seconds.observe(seconds)

    def snapshot_taken(self) -> None:
        self.snapshots_taken.inc()

    def snapshot_installed(self) -> None:
        self.snapshots_installed.inc()

    def exposition(self) -> bytes:
        """The metrics in Prometheus's text format, as a scrape returns them."""
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """The node's state, read when a scrape asks for it: nothing on the node's own path."""

    def __init__(self, node: MetricsNode) -> None:
        self._node = node

    def collect(self) -> Iterable[Metric]:
        node = self._node
        status = node.status()
        log = node.log

        def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)

        role = GaugeMetricFamily(
            f"{PREFIX}_role", "1 for this node's current role, 0 for the others.", labels=["role"]
        )
        for each in Role:
            role.add_metric([each.value], 1.0 if each.value == status.role else 0.0)
        yield role
        yield gauge("term", "The node's current term.", status.term)
        yield gauge(
            "has_leader",
            "1 while the node is a voter that leads or has heard from its leader since its last "
            "election timeout (its health check then reports SERVING).",
            1.0 if status.serving else 0.0,
        )
        yield gauge(
            "voter", "1 if the node votes, 0 if it is a learner or no member.", status.voter
        )
        yield gauge(
            "commit_index", "The highest log index known to be committed.", status.commit_index
        )
        yield gauge(
            "applied_index", "The highest log index applied to the store.", status.applied_index
        )
        yield gauge(
            "last_log_index", "The index of the last entry in the log.", status.last_log_index
        )
        yield gauge(
            "snapshot_index", "The last index the newest snapshot covers.", status.snapshot_index
        )
        yield gauge(
            "log_entries",
            "Entries held in the log (after the compacted prefix).",
            log.last_index - log.base_index,
        )
        yield gauge(
            "log_bytes",
            "Bytes the log file's records take (after the compacted prefix).",
            log.bytes_after(log.base_index),
        )
        lag = GaugeMetricFamily(
            f"{PREFIX}_peer_lag_entries",
            "Leader only: entries the leader holds that each follower has not acknowledged.",
            labels=["peer"],
        )
        contact = GaugeMetricFamily(
            f"{PREFIX}_peer_last_contact_seconds",
            "Leader only: seconds since each follower last answered in this term.",
            labels=["peer"],
        )
        for peer in status.peers:
            lag.add_metric([str(peer.id)], peer.lag)
            if peer.last_contact is not None:
                contact.add_metric([str(peer.id)], peer.last_contact)
        yield lag
        yield contact
        yield from _cost_counters(node.counters, log)


def _cost_counters(counters: Counters, log: RaftLog) -> Iterable[Metric]:
    """What replication cost this node so far (counters.py), for per-write figures."""

    def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
        return CounterMetricFamily(f"{PREFIX}_{name}", documentation, value=value)

    yield counter(
        "append_messages_sent",
        "Leader: AppendEntries requests sent to followers (heartbeats included).",
        counters.appends_sent,
    )
    yield counter(
        "append_entries_sent", "Leader: log entries those requests carried.", counters.entries_sent
    )
    yield counter(
        "append_messages_received",
        "Follower: AppendEntries requests received from leaders.",
        counters.appends_received,
    )
    yield counter(
        "append_entries_received",
        "Follower: log entries those requests carried.",
        counters.entries_received,
    )
    yield counter(
        "raft_messages_sent",
        "Raft messages (AppendEntries and ReadIndex requests and replies) this node sent.",
        counters.messages_sent,
    )
    yield counter(
        "raft_messages_received",
        "Raft messages (AppendEntries and ReadIndex requests and replies) this node received.",
        counters.messages_received,
    )
    yield counter(
        "read_rounds", "Leader: heartbeat rounds started to confirm reads.", counters.read_rounds
    )
    yield counter("log_fsyncs", "fsyncs of the log and state files (and their folder).", log.fsyncs)
    sizes = CounterMetricFamily(
        f"{PREFIX}_append_messages_by_entries",
        "Leader: AppendEntries requests sent, by the number of entries they carried.",
        labels=["entries"],
    )
    for entries, count in enumerate(counters.entries_per_append):
        if count:
            sizes.add_metric([str(entries)], count)
    yield sizes


async def serve_metrics(metrics: NodeMetrics, host: str, port: int) -> asyncio.Server:
    """Serve `GET /metrics` over HTTP on the running event loop, so the state collector reads the
    node between two of its steps, never in the middle of one. OSError if it cannot listen."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            path = path.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, kind, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path in ("/metrics", "/"):
                status, kind, body = "200 OK", CONTENT_TYPE_LATEST, metrics.exposition()
            else:
                status, kind, body = "404 Not Found", "text/plain", b"see /metrics\n"
            header = (
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(header.encode("latin-1") + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass  # a scraper that went away or sent nonsense gets nothing
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, limit=_MAX_REQUEST_BYTES)
