"""Watches under the fault suite: one watcher on every node (resuming on that same node) and one
through the library (which moves from node to node), each recording every change it is sent while
the nemesis works. At the end each is checked against the others, against the acknowledged puts
and against the final values: complete, in order, no duplicates, across leader changes, crashes and
reconnects."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cluster_client import Client, ClientError, WatchCompactedError
from test.cluster_process import LocalCluster

# What the watchers follow: every key.
WATCHED_PREFIX = ""
# The watcher that moves between nodes, as an application's would.
LIBRARY = "library"


@dataclass(frozen=True)
class Change:
    """One change as a watcher was sent it."""

    revision: int
    key: str
    type: str
    value: str | None


@dataclass
class _Watcher:
    """One watcher's record: the runs of changes it was sent, a new run after each compaction
    (its node no longer held the changes it had missed, and said so)."""

    name: str
    client: Client
    runs: list[list[Change]] = field(default_factory=lambda: [[]])
    compactions: int = 0
    reconnects: int = 0
    error: str | None = None

    @property
    def last_revision(self) -> int:
        for run in reversed(self.runs):
            if run:
                return run[-1].revision
        return 0


class WatchRecorder:
    """Watchers started before the load and stopped after the marker write at the end."""

    def __init__(self, cluster: LocalCluster, library: Client) -> None:
        """`library` knows every node; each node's own watcher gets a client of that node alone."""
        self._cluster = cluster
        self._watchers: dict[str, _Watcher] = {LIBRARY: _Watcher(LIBRARY, library)}
        self._tasks: list[asyncio.Task[None]] = []
        self._nodes: dict[str, int] = {}
        # When a watcher was first sent each key's first delete (loop time), for the lease probe.
        self.deleted_at: dict[str, float] = {}
        tls = cluster.tls.client_config() if cluster.tls is not None else None
        for node_id in cluster.node_ids:
            name = f"node {node_id}"
            only = Client.from_endpoints([cluster.client_address(node_id)], tls=tls)
            self._watchers[name] = _Watcher(name, only)
            self._nodes[name] = node_id

    def start(self) -> None:
        for watcher in self._watchers.values():
            self._tasks.append(asyncio.create_task(self._follow(watcher)))

    async def _follow(self, watcher: _Watcher) -> None:
        start = 1  # every change since the cluster began: the keys start absent

        def reconnected(address: str, reason: str) -> None:
            watcher.reconnects += 1

        while True:
            try:
                async for event in watcher.client.watch(
                    WATCHED_PREFIX, prefix=True, start_revision=start, on_reconnect=reconnected
                ):
                    watcher.runs[-1].append(
                        Change(event.revision, event.key, event.type, event.value)
                    )
                    if event.type == "delete" and event.key not in self.deleted_at:
                        self.deleted_at[event.key] = asyncio.get_running_loop().time()
            except WatchCompactedError:
                # Explicit, as promised: what this node missed is no longer kept. Go on from now
                # in a new run (checked on its own).
                watcher.compactions += 1
                watcher.runs.append([])
                start = 0
            except ClientError as e:
                watcher.error = f"{type(e).__name__}: {e}"
                return

    async def finish(self, through: int, timeout: float) -> list[str]:
        """Wait until every watcher whose node still runs has been sent revision `through`, then
        stop them all; what did not get there, said in one line each."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        problems: list[str] = []

        def expected(name: str) -> bool:
            node_id = self._nodes.get(name)
            return node_id is None or (
                node_id in self._cluster.node_ids and self._cluster.is_running(node_id)
            )

        try:
            while loop.time() < give_up:
                behind = [
                    w
                    for w in self._watchers.values()
                    if expected(w.name) and w.error is None and w.last_revision < through
                ]
                if not behind:
                    break
                await asyncio.sleep(0.05)
            for watcher in self._watchers.values():
                if watcher.error is not None:
                    problems.append(f"watcher on {watcher.name} ended: {watcher.error}")
                elif expected(watcher.name) and watcher.last_revision < through:
                    problems.append(
                        f"watcher on {watcher.name} was sent changes up to revision "
                        f"{watcher.last_revision}, not {through}, within {timeout:g} s"
                    )
        finally:
            await self.close()
        return problems

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for watcher in self._watchers.values():
            await watcher.client.close()

    def summary(self) -> str:
        changes = len(_union(self._watchers.values())[0])
        parts = [
            f"{w.name} {sum(len(r) for r in w.runs)}"
            + (f" ({w.reconnects} reconnects)" if w.reconnects else "")
            + (f" ({w.compactions} compacted)" if w.compactions else "")
            for w in self._watchers.values()
        ]
        return f"{changes} changes; sent to each watcher: " + ", ".join(parts)

    def check(
        self, acknowledged_puts: Mapping[int, tuple[str, str]], final: Mapping[str, str | None]
    ) -> list[str]:
        """Every problem found (empty: every promise of Watch held)."""
        return check_watchers(list(self._watchers.values()), acknowledged_puts, final)


def _union(watchers: Iterable[_Watcher]) -> tuple[dict[tuple[int, str], Change], list[str]]:
    """Every change any watcher was sent, by (revision, key), and where two disagree."""
    union: dict[tuple[int, str], Change] = {}
    problems: list[str] = []
    for watcher in watchers:
        for run in watcher.runs:
            for change in run:
                seen = union.setdefault((change.revision, change.key), change)
                if seen != change:
                    problems.append(
                        f"revision {change.revision} of {change.key!r}: {watcher.name} was sent "
                        f"{change.type} {change.value!r}, another watcher {seen.type} {seen.value!r}"
                    )
    return union, problems


def check_watchers(
    watchers: Sequence[_Watcher],
    acknowledged_puts: Mapping[int, tuple[str, str]],
    final: Mapping[str, str | None],
) -> list[str]:
    union, problems = _union(watchers)
    ordered = sorted(union)
    for watcher in watchers:
        for run in watcher.runs:
            # In revision order, each (revision, key) once.
            for before, after in zip(run, run[1:], strict=False):
                if after.revision < before.revision:
                    problems.append(
                        f"{watcher.name} was sent revision {after.revision} ({after.key!r}) "
                        f"after revision {before.revision} ({before.key!r})"
                    )
                    break
            if len({(c.revision, c.key) for c in run}) != len(run):
                problems.append(f"{watcher.name} was sent a change twice")
            # Complete: every change any watcher saw within this run's span, this run has too.
            if run:
                first, last = run[0].revision, run[-1].revision
                mine = {(c.revision, c.key) for c in run}
                missing = [k for k in ordered if first <= k[0] <= last and k not in mine]
                if missing:
                    problems.append(
                        f"{watcher.name} missed {len(missing)} change(s) between revisions "
                        f"{first} and {last}, first: revision {missing[0][0]} of {missing[0][1]!r}"
                    )
    library = next((w for w in watchers if w.name == LIBRARY), None)
    if library is not None and ordered:
        if library.compactions:
            problems.append("the library's watch was told every node had compacted its changes")
        if library.runs[0] and library.runs[0][0].revision > ordered[0][0]:
            problems.append(
                f"the library's watch began at revision {library.runs[0][0].revision}, after "
                f"revision {ordered[0][0]} that another watcher was sent"
            )
    for revision, (key, value) in sorted(acknowledged_puts.items()):
        change = union.get((revision, key))
        if change is None or change.type != "put" or change.value != value:
            problems.append(
                f"the put of {key!r}={value!r} acknowledged at revision {revision} reached no "
                f"watcher as such (watchers were sent {change})"
            )
    # Applied in order, the changes leave every key as the final reads found it.
    state: dict[str, str | None] = {}
    for revision_key in ordered:
        change = union[revision_key]
        state[change.key] = change.value if change.type == "put" else None
    for key, held in final.items():
        if state.get(key) != held:
            problems.append(
                f"the changes watched leave {key!r} at {state.get(key)!r}; it holds {held!r}"
            )
    return problems
