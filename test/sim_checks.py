"""The Raft safety properties the simulation checks as it runs, and the light wrappers (a RaftNode,
RaftLog and state machine subclass each) through which it watches the nodes without changing them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import text_format

from log import RaftLog
from membership import Membership
from node_status import NodeEvents
from raft_node import RaftNode
from rpc import raft_pb2
from state_machine import ApplyResult, KeyValueStateMachine
from test.sim_watch import WatchHistory

# What identifies an entry's command: (kind, key, value).
Command = tuple[int, str, str]
Fail = Callable[[str, str], None]


@dataclass(frozen=True)
class LogView:
    """A log a node could present in an election: its in-memory log (if it does not crash) or what
    is durable (if it crashes now), given by its length and the term of each entry."""

    what: str
    length: int
    term_at: Callable[[int], int]
    # The configuration that log puts in use (None: not known, so never a candidate).
    config: Membership | None = None

    @property
    def last(self) -> tuple[int, int]:
        """(last term, last index): a candidate wins a vote iff its pair is at least the voter's."""
        return (self.term_at(self.length), self.length)

    def holds(self, index: int, term: int) -> bool:
        return index <= self.length and self.term_at(index) == term


def views_of(node: RaftNode, log: ObservedRaftLog) -> list[LogView]:
    """A running node's possible logs: all of it, or (after a crash now) its durable prefix."""
    return [
        LogView("in memory", log.last_index, log.known_term, node.configs.latest),
        LogView("durable", log.durable_index, log.known_term, node.configs.at(log.durable_index)),
    ]


def view_of_terms(what: str, terms: Sequence[int], config: Membership | None) -> LogView:
    return LogView(what, len(terms), lambda i: terms[i - 1] if i else 0, config)


# Each node's possible logs, by node id.
Views = Callable[[], dict[int, list[LogView]]]


def show_entry(index: int, term: int, command: Command) -> str:
    kind, key, value = command
    if kind == raft_pb2.ENTRY_KIND_NOOP:
        what = "no-op"
    elif kind == raft_pb2.ENTRY_KIND_CONFIG:
        what = f"config {value}"
    else:
        what = f"{key}={value}"
    return f"[{index} t{term} {what}]"


def _command(entry: raft_pb2.LogEntry) -> Command:
    if entry.kind == raft_pb2.ENTRY_KIND_COMMAND:
        # Commands carry no key or value of their own; compare them by their whole content.
        return (entry.kind, "command", text_format.MessageToString(entry.command, as_one_line=True))
    if entry.kind == raft_pb2.ENTRY_KIND_CONFIG:
        return (entry.kind, "config", Membership.from_proto(entry.config).describe())
    return (entry.kind, entry.key, entry.value)


def voters_differ(a: Membership, b: Membership) -> int:
    """How many voters one configuration has that the other has not."""
    return len(a.voters.keys() ^ b.voters.keys())


class Invariants:
    """Everything seen so far, and the checks against it. `fail(invariant, detail)` reports a violation.

    - election safety: at most one leader per term;
    - log matching: an (index, term) pair always names the same command after the same previous term,
      which by induction makes logs that share an entry identical up to it;
    - leader append-only: a leader never removes entries from its log;
    - state machine safety: no two nodes apply different entries at one index;
    - leader completeness: a new leader holds every entry committed in an earlier term;
    - commit safety: when a leader commits an entry, no node lacking it could win an election, even
      if any nodes crashed at that instant and lost what they had not made durable (a committed entry
      can never be lost, which is what leader completeness needs); each candidate needs a majority
      of the voters of the configuration its own log puts in use;
    - acknowledged writes: a put acknowledged to a client has been applied (and, at the end, is in the
      final committed log).

    Membership (thesis chapter 4):

    - one change at a time: a leader appends a configuration only when every configuration in its
      log is committed (by its own commit index) and it has committed an entry of its own term;
    - one voter per change: a configuration differs from the one before it in the log by at most
      one voter, and an id once removed never returns;
    - removed nodes stay out: no node accepts a message from an id whose removal it knows has
      committed (but from a leader that removed itself, in the term it leads), and no node whose
      removal has committed is elected;
    - configuration matches the log: every node uses the latest configuration in its log, or the
      one in force at its snapshot point, or (with neither) the one it was started with.
    """

    def __init__(self, fail: Fail, views: Views, initial: Membership) -> None:
        self._fail = fail
        self._views = views
        # The configuration the cluster was started with (in force before any in the log).
        self.initial = initial
        self.leaders: dict[int, int] = {}
        # (index, term) -> (previous entry's term, command), as first seen in any log.
        self.entries: dict[tuple[int, int], tuple[int, Command]] = {}
        self.first_holder: dict[tuple[int, int], int] = {}
        # index -> (term, command) of every entry some node applied (so, committed).
        self.committed: dict[int, tuple[int, Command]] = {}
        # index -> the lowest term a node was in when applying it: the entry was committed by then.
        self.commit_term: dict[int, int] = {}
        self.applied_by: dict[int, int] = {}
        self.committed_values: dict[str, int] = {}
        self.acknowledged: dict[str, str] = {}
        # index -> configuration, for every configuration entry some node applied.
        self.committed_configs: dict[int, Membership] = {}
        # (index, term) -> the configuration that entry holds (decoded once).
        self._configs: dict[tuple[int, int], Membership] = {}
        self.config_changes = 0
        # Revisions and watches: every node's changes against the committed log's (sim_watch.py).
        self.watches = WatchHistory(fail)
        # Told of each entry the first time any node applies it (so: committed), in index order.
        self.first_applied: list[Callable[[raft_pb2.LogEntry], None]] = []

    def config_of(self, entry: raft_pb2.LogEntry) -> Membership:
        key = (entry.index, entry.term)
        config = self._configs.get(key)
        if config is None:
            config = self._configs[key] = Membership.from_proto(entry.config)
        return config

    def committed_config_at(self, index: int) -> Membership:
        """The configuration in force at `index` as the committed entries tell it."""
        best = 0
        for i in self.committed_configs:
            if best < i <= index:
                best = i
        return self.committed_configs[best] if best else self.initial

    def implied_config(self, log: ObservedRaftLog, index: int, bootstrap: Membership) -> Membership:
        """The configuration `log` puts in use at `index`: its latest configuration entry at or
        before it, else the one in force at the log's snapshot point, else (a log from index 1 with
        none) the configuration its node was started with."""
        found = [i for i in log.config_indices() if i <= index]
        if found:
            return self.config_of(log.entry(found[-1]))
        if log.base_index == 0:
            return bootstrap
        return self.committed_config_at(log.base_index)

    # ---- hooks -------------------------------------------------------------------------------

    def became_leader(self, node: RaftNode) -> None:
        term = node.current_term
        earlier = self.leaders.setdefault(term, node.node_id)
        if earlier != node.node_id:
            self._fail(
                "election safety",
                f"nodes {earlier} and {node.node_id} were both elected leader of term {term}",
            )
            return
        if self.committed:
            config = self.committed_config_at(max(self.committed))
            if node.node_id in config.removed:
                self._fail(
                    "removed nodes stay out",
                    f"node {node.node_id} was elected leader of term {term} after the "
                    f"configuration removing it committed ({config.describe()})",
                )
                return
        log = node.log
        for index, (entry_term, command) in self.committed.items():
            if self.commit_term[index] >= term or index < log.base_index:
                continue  # entries a snapshot holds are present with their committed content
            if index > log.last_index or log.term_at(index) != entry_term:
                held = (
                    f"its log ends at index {log.last_index}"
                    if index > log.last_index
                    else f"its entry {index} has term {log.term_at(index)}"
                )
                self._fail(
                    "leader completeness",
                    f"node {node.node_id} became leader of term {term} without committed entry "
                    f"{show_entry(index, entry_term, command)} (applied by node "
                    f"{self.applied_by[index]} in term {self.commit_term[index]}): {held}",
                )
                return

    def check_log(self, node_id: int, log: ObservedRaftLog) -> None:
        """Check the entries added to `log` since it was last checked."""
        for index in range(max(log.verified, log.base_index) + 1, log.last_index + 1):
            entry = log.entry(index)
            seen = (log.term_at(index - 1), _command(entry))
            key = (index, entry.term)
            first = self.entries.get(key)
            if first is None:
                self.entries[key] = first = seen
                if entry.kind == raft_pb2.ENTRY_KIND_CONFIG:
                    self._check_config_step(node_id, log, entry)
            if first != seen:
                holder = self.first_holder[key]
                self._fail(
                    "log matching",
                    f"node {node_id} holds {show_entry(index, entry.term, seen[1])} after an entry "
                    f"of term {seen[0]}, but node {holder} held {show_entry(index, entry.term, first[1])} "
                    f"after an entry of term {first[0]}",
                )
                return
            self.first_holder.setdefault(key, node_id)
        log.verified = log.last_index

    def truncating(self, node: RaftNode | None, node_id: int, index: int) -> None:
        if node is not None and node.role == "leader":
            self._fail(
                "leader append-only",
                f"node {node_id}, leader of term {node.current_term}, removed its entries from "
                f"index {index} on",
            )

    def applying(self, node: RaftNode | None, node_id: int, entry: raft_pb2.LogEntry) -> None:
        command = _command(entry)
        index = entry.index
        earlier = self.committed.get(index)
        term = node.current_term if node is not None else entry.term
        if earlier is None:
            self.watches.committed(entry)
            for hook in self.first_applied:
                hook(entry)
            self.committed[index] = (entry.term, command)
            self.commit_term[index] = term
            self.applied_by[index] = node_id
            if entry.kind == raft_pb2.ENTRY_KIND_MAPPING:
                self.committed_values[entry.value] = index
            elif entry.kind == raft_pb2.ENTRY_KIND_CONFIG:
                self.committed_configs[index] = self.config_of(entry)
        elif earlier != (entry.term, command):
            self._fail(
                "state machine safety",
                f"node {node_id} applied {show_entry(index, entry.term, command)}, but node "
                f"{self.applied_by[index]} applied {show_entry(index, *earlier)} at that index",
            )
        else:
            self.commit_term[index] = min(self.commit_term[index], term)
        if node is not None and node.role == "leader" and index == node.commit_index:
            self._check_commit(node_id, index, entry.term, command)

    def _check_commit(self, leader_id: int, index: int, term: int, command: Command) -> None:
        """A leader just committed up to (index, term): could some node lacking it still be elected?

        A node wins with votes from a majority of the voters of the configuration its own log puts
        in use, each with a log no more up to date than its own; each node may present its
        in-memory log or, if it crashes now, only its durable log.
        """
        views = self._views()
        # The least up-to-date log each node could present: it votes for any candidate at least
        # as up to date as that.
        lowest = {node_id: min(v.last for v in options) for node_id, options in views.items()}
        for candidate, options in views.items():
            for mine in options:
                config = mine.config
                if mine.holds(index, term) or config is None or not config.is_voter(candidate):
                    continue
                mine_last = mine.last
                voters = [
                    v for v in sorted(config.voters) if v in lowest and lowest[v] <= mine_last
                ]
                if len(voters) >= config.quorum:
                    self._fail(
                        "commit safety",
                        f"leader {leader_id} committed {show_entry(index, term, command)}, but node "
                        f"{candidate} lacks it ({mine.what} log ends at index {mine_last[1]}, term "
                        f"{mine_last[0]}) and could be elected by nodes {voters} of its "
                        f"configuration ({config.describe()}), each of which has (or after a "
                        f"crash would have) a log no more up to date",
                    )
                    return

    # ---- membership --------------------------------------------------------------------------

    def appending_config(self, node: RaftNode, log: ObservedRaftLog) -> None:
        """Leader `node` is about to append a configuration entry (one change at a time)."""
        self.config_changes += 1
        commit = node.commit_index
        pending = [i for i in log.config_indices() if i > commit]
        if pending:
            self._fail(
                "one change at a time",
                f"leader {node.node_id} of term {node.current_term} appended a configuration at "
                f"index {log.last_index + 1} while the one at index {pending[-1]} was not yet "
                f"committed (its commit index is {commit})",
            )
        elif log.term_at(commit) != node.current_term:
            self._fail(
                "one change at a time",
                f"leader {node.node_id} of term {node.current_term} appended a configuration "
                f"before committing an entry of its own term (its commit index {commit} is of "
                f"term {log.term_at(commit)})",
            )

    def _check_config_step(
        self, node_id: int, log: ObservedRaftLog, entry: raft_pb2.LogEntry
    ) -> None:
        """A configuration entry seen for the first time, against the one before it in the log."""
        index = entry.index
        config = self.config_of(entry)
        earlier = [i for i in log.config_indices() if i < index]
        if earlier:
            before = self.config_of(log.entry(earlier[-1]))
        elif log.base_index > 0:
            before = self.committed_config_at(log.base_index)
        else:
            before = self.initial
        what = f"{show_entry(index, entry.term, _command(entry))} (in node {node_id}'s log)"
        if voters_differ(before, config) > 1:
            self._fail(
                "one voter per change",
                f"{what} changes more than one voter from the configuration before it "
                f"({before.describe()})",
            )
        elif before.removed - config.removed or config.members.keys() & before.removed:
            self._fail(
                "one voter per change",
                f"{what} brings back an id the configuration before it had removed "
                f"({before.describe()})",
            )

    def check_config_in_use(self, node: RaftNode, log: ObservedRaftLog) -> None:
        """The node's configuration is the one its log implies (after appends, truncations,
        snapshot installs and restarts)."""
        implied = self.implied_config(log, log.last_index, node.bootstrap_config)
        if node.configs.latest != implied:
            self._fail(
                "configuration matches the log",
                f"node {node.node_id} uses configuration ({node.configs.latest.describe()}) "
                f"from index {node.configs.latest_index}, but its log (snapshot point "
                f"{log.base_index}, last index {log.last_index}) implies ({implied.describe()})",
            )

    def message_accepted(
        self, node: RaftNode, src: int, what: str, term: int, leading: bool, removed: frozenset[int]
    ) -> None:
        """`node` accepted a request of `term` from `src`, knowing (when it arrived) that the
        removal of the ids `removed` had committed. A leader that removed itself may still lead
        the term it was elected in (it replicates, and hands over with TimeoutNow, thesis section
        4.2.2): `leading` says whether the request is one a leader sends."""
        if src in removed and not (leading and self.leaders.get(term) == src):
            self._fail(
                "removed nodes stay out",
                f"node {node.node_id} accepted {what} of term {term} from {src}, though it knew "
                f"that the removal of {src} had committed",
            )

    def acknowledged_put(self, node_id: int, key: str, value: str) -> None:
        """A put of `value` was acknowledged to a client by node `node_id`."""
        self.acknowledged[value] = key
        if value not in self.committed_values:
            self._fail(
                "acknowledged writes",
                f"node {node_id} acknowledged put {key}={value} but no node has applied it",
            )

    # ---- final checks ------------------------------------------------------------------------

    def check_final(self, leader_id: int, logs: Sequence[tuple[int, RaftLog, int]]) -> None:
        """At the end: every log holds the same committed entries; no acknowledged write was lost.

        `logs` holds (node id, log, commit index) of every node; `leader_id` names the final leader.
        """
        by_id = {node_id: (log, commit) for node_id, log, commit in logs}
        leader_log, leader_commit = by_id[leader_id]
        for node_id, log, commit in logs:
            if commit != leader_commit or log.last_index != leader_log.last_index:
                self._fail(
                    "convergence",
                    f"node {node_id} has last index {log.last_index} and commit index {commit}; "
                    f"leader {leader_id} has {leader_log.last_index} and {leader_commit}",
                )
                return
            first = max(log.base_index, leader_log.base_index) + 1
            for index in range(first, log.last_index + 1):
                if log.entry(index) != leader_log.entry(index):
                    self._fail(
                        "log matching",
                        f"at the end node {node_id}'s entry {index} differs from leader "
                        f"{leader_id}'s",
                    )
                    return
        final: dict[str, int] = {}
        for index in range(1, leader_commit + 1):
            if index <= leader_log.base_index:
                # In the leader's snapshot: the entry some node applied at that index.
                kind, _, value = self.committed[index][1]
                if kind == raft_pb2.ENTRY_KIND_MAPPING:
                    final[value] = index
                continue
            entry = leader_log.entry(index)
            if entry.kind == raft_pb2.ENTRY_KIND_MAPPING:
                final[entry.value] = index
            committed = self.committed.get(index)
            if committed is not None and committed != (entry.term, _command(entry)):
                self._fail(
                    "state machine safety",
                    f"entry {index} was applied as {show_entry(index, *committed)} but the final "
                    f"log holds {show_entry(index, entry.term, _command(entry))}",
                )
                return
        for value, key in self.acknowledged.items():
            if value not in final:
                self._fail(
                    "no acknowledged write lost",
                    f"put {key}={value} was acknowledged but is not in the final committed log "
                    f"(committed index {leader_commit})",
                )
                return


class ObservedRaftLog(RaftLog):
    """A RaftLog that reports every append and truncation to the checks, and keeps (on its own,
    apart from the node's ConfigHistory) the indices of its configuration entries."""

    invariants: Invariants | None = None
    owner: ObservedRaftNode | None = None
    node_id = 0
    # Entries up to here have passed the log-matching check.
    verified = 0
    _config_indices: list[int] | None = None

    def config_indices(self) -> list[int]:
        """The indices of the configuration entries after the snapshot point, in order."""
        if self._config_indices is None:
            self._config_indices = [
                i
                for i in range(self.base_index + 1, self.last_index + 1)
                if self.entry(i).kind == raft_pb2.ENTRY_KIND_CONFIG
            ]
        return self._config_indices

    def _keep_config_indices(self) -> None:
        if self._config_indices is not None:
            base, last = self.base_index, self.last_index
            self._config_indices = [i for i in self._config_indices if base < i <= last]

    def append(self, entries: Sequence[raft_pb2.LogEntry]) -> None:
        super().append(entries)
        if self._config_indices is not None:
            self._config_indices.extend(
                e.index for e in entries if e.kind == raft_pb2.ENTRY_KIND_CONFIG
            )
        if self.invariants is not None:
            self.invariants.check_log(self.node_id, self)

    def truncate_from(self, index: int) -> None:
        if self.invariants is not None:
            self.invariants.truncating(self.owner, self.node_id, index)
        super().truncate_from(index)
        self._keep_config_indices()
        self.verified = min(self.verified, index - 1)

    def compact(self, index: int) -> None:
        super().compact(index)
        self._keep_config_indices()

    def reset(self, index: int, term: int) -> None:
        if not self.holds(index, term) and index < self.last_index:
            if self.invariants is not None:
                self.invariants.truncating(self.owner, self.node_id, self.base_index + 1)
        super().reset(index, term)
        self._keep_config_indices()
        self.verified = min(self.verified, index)

    def known_term(self, index: int) -> int:
        """The term at index; below the snapshot point, the term of the entry committed there."""
        if index >= self.base_index or self.invariants is None:
            return self.term_at(index)
        return self.invariants.committed[index][0]


class RecordingStateMachine(KeyValueStateMachine):
    """The node's own state machine, reporting each entry it applies."""

    def __init__(self, invariants: Invariants, node: RaftNode) -> None:
        super().__init__()
        self._invariants = invariants
        self._node = node
        # What a watcher of this node would be sent, checked against the committed log.
        self.listener = invariants.watches.watcher(node.node_id, self)

    def apply(self, entry: raft_pb2.LogEntry) -> ApplyResult:
        self._invariants.applying(self._node, self._node.node_id, entry)
        return super().apply(entry)


class LeadershipChecks:
    """Checks that pre-vote and check quorum do their job, from what the network delivered, each
    against the configuration the node has in use:

    - no disruptive elections: a node raises its term by its own election only after hearing, while
      in its previous term, from a majority of its voters (counting itself). So a node cut off from
      the others never drives the term up, and cannot depose a healthy leader with it when it
      returns (pre-vote, thesis section 9.6). Elections a leader asked for (TimeoutNow) are counted
      apart;
    - check quorum: a leader from which no majority of its voters (counting itself if it votes) has
      heard for `bound` seconds has stepped down, so a leader cut off from the others stops serving.
      A voter added while it leads counts as heard from when it was added.
    """

    def __init__(
        self, fail: Fail, now: Callable[[], float], bound: float, stats: Counter[str]
    ) -> None:
        self._fail = fail
        self._now = now
        self.bound = bound
        self._stats = stats
        # node id -> (its term, the peers that reached it while it was in that term)
        self._heard_in_term: dict[int, tuple[int, set[int]]] = {}
        # leader id -> (its term, peer -> when it joined the leader's configuration, or the
        # election, peer -> when a message from it arrived)
        self._leading: dict[int, tuple[int, dict[int, float], dict[int, float]]] = {}

    def heard(self, node: RaftNode, src: int) -> None:
        """A message from `src` reached `node`."""
        term = node.current_term
        entry = self._heard_in_term.get(node.node_id)
        if entry is None or entry[0] != term:
            entry = self._heard_in_term[node.node_id] = (term, set())
        entry[1].add(src)
        leading = self._leading.get(node.node_id)
        if leading is not None and leading[0] == term:
            leading[2][src] = self._now()

    def standing(self, node: RaftNode, term: int, transfer: bool) -> None:
        """`node` just raised its term to `term` by its own election."""
        if transfer:
            self._stats["elections by transfer"] += 1
            return
        self._stats["elections"] += 1
        entry = self._heard_in_term.get(node.node_id)
        heard = entry[1] if entry is not None and entry[0] == term - 1 else set()
        config = node.config
        voters = heard & (config.voters.keys() - {node.node_id})
        if len(voters) + 1 < config.quorum:
            self._fail(
                "no disruptive elections",
                f"node {node.node_id} started an election for term {term} after hearing from "
                f"only {sorted(heard) or 'no other node'} in term {term - 1}, of its voters "
                f"{sorted(config.voters)}: a node cut off from a majority must not raise its term "
                f"(pre-vote, thesis section 9.6)",
            )

    def elected(self, node: RaftNode) -> None:
        now = self._now()
        self._leading[node.node_id] = (
            node.current_term,
            {p: now for p in node.config.members},
            {},
        )

    def config_changed(self, node: RaftNode) -> None:
        """Leader `node` has a new configuration in use: its new members count from now."""
        leading = self._leading.get(node.node_id)
        if leading is not None and leading[0] == node.current_term:
            now = self._now()
            for p in node.config.members:
                leading[1].setdefault(p, now)

    def check_leaders(self, leaders: Sequence[RaftNode]) -> None:
        """Check quorum, for the leaders given (those running, not paused lately)."""
        now = self._now()
        for node in leaders:
            leading = self._leading.get(node.node_id)
            if leading is None or leading[0] != node.current_term:
                continue
            term, joined, heard = leading
            config = node.config
            times = [
                max(joined.get(p, now), heard.get(p, float("-inf")))
                for p in config.voters
                if p != node.node_id
            ]
            if config.is_voter(node.node_id):
                times.append(now)
            times.sort(reverse=True)
            silent = now - times[config.quorum - 1]
            if silent > self.bound:
                self._fail(
                    "check quorum",
                    f"node {node.node_id} still leads term {term}, but no majority of its voters "
                    f"({config.describe()}) has reached it for {silent:.3f} s (it must step down "
                    f"within {self.bound:.3f} s)",
                )
                return


class ObservedRaftNode(RaftNode):
    """The project's RaftNode, unchanged: the checks learn through its event hooks (NodeEvents)
    when it stands for election, when it wins one, when it appends a configuration as leader, and
    when its configuration may have changed."""

    invariants: Invariants | None = None
    leadership_checks: LeadershipChecks | None = None
    on_elected: Callable[[RaftNode], None] | None = None
    stats: Counter[str] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events = _Observed(self)

    @property
    def observed_log(self) -> ObservedRaftLog:
        assert isinstance(self.log, ObservedRaftLog)
        return self.log


class _Observed(NodeEvents):
    """Tells one node's checks what it just decided."""

    def __init__(self, node: ObservedRaftNode) -> None:
        self.node = node

    def standing(self, term: int, transfer: bool) -> None:
        if self.node.leadership_checks is not None:
            self.node.leadership_checks.standing(self.node, term, transfer)

    def elected(self) -> None:
        # Checked on the log as the election left it, before the new leader appends its no-op.
        node = self.node
        if node.invariants is not None:
            node.invariants.became_leader(node)
        if node.leadership_checks is not None:
            node.leadership_checks.elected(node)

    def leading(self) -> None:
        if self.node.on_elected is not None:
            self.node.on_elected(self.node)

    def appending_config(self) -> None:
        if self.node.invariants is not None:
            self.node.invariants.appending_config(self.node, self.node.observed_log)

    def log_changed(self) -> None:
        if self.node.invariants is not None:
            self.node.invariants.check_config_in_use(self.node, self.node.observed_log)

    def config_changed(self) -> None:
        node = self.node
        if node.leadership_checks is not None and node.role == "leader":
            node.leadership_checks.config_changed(node)

    def snapshot_restored(self, at_start: bool) -> None:
        if self.node.stats is not None:
            self.node.stats["snapshot restores" if at_start else "snapshots installed"] += 1

    def snapshot_writing(self) -> None:
        if self.node.stats is not None:
            self.node.stats["snapshots taken"] += 1
