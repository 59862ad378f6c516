"""What the benchmark shows: its result rows, the printed table, the JSON file, the PNG charts and
the progress bar on stderr."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

# Mappings per call of the batch workload (etcd: puts per transaction).
BATCH_SIZE = 100
COLORS = {"raft-demo": "tab:red", "etcd": "tab:blue", "pysyncobj": "tab:green", "null": "tab:gray"}
COLORS["baseline"] = "tab:orange"
COLORS["raft-demo-client"] = "tab:purple"


@dataclass
class Cell:
    """One measurement: a system, a workload, a cluster size, a value size, a client count."""

    system: str
    workload: str
    nodes: int
    value_size: int
    clients: int
    ops: int = 0
    errors: int = 0
    seconds: float = 0.0
    ops_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float = 0.0
    cpu_s_per_1000_ops: float | None = None
    client_cpu_percent: float = 0.0
    note: str = ""
    # One dict per process of the system: see `node_costs`.
    node_costs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Report:
    machine: str
    command: str
    duration_s: float
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    skipped: dict[str, str] = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


M = "raft_demo_"


def _counts_by_entries(metrics: dict[str, float]) -> dict[int, float]:
    prefix = M + 'append_messages_by_entries_total{entries="'
    return {int(k[len(prefix) : -2]): v for k, v in metrics.items() if k.startswith(prefix)}


def _percentile_of_counts(counts: dict[int, float], fraction: float) -> int:
    """Nearest-rank percentile of values given as {value: how many times}."""
    total = sum(counts.values())
    if total <= 0:
        return 0
    rank, seen = fraction * total, 0.0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= rank:
            return value
    return max(counts)


def node_costs(before: list[Any], after: list[Any], ops: int, wall: float) -> list[dict[str, Any]]:
    """What each process of a system spent on one cell, from two `NodeSample` lists: CPU ms per
    operation, its main thread's (the event loop's) busy share, and, for this project (from its
    /metrics counters), Raft messages sent and received and fsyncs per committed entry (per
    operation when nothing was committed, as for reads) and entries per AppendEntries message."""
    earlier = {s.name: s for s in before}
    rows: list[dict[str, Any]] = []
    # Entries the cell committed, as the leader counts them (a follower may still be learning of
    # commits from before the cell when it starts).
    committed = 0.0
    for s in after:
        if s.name in earlier and s.metrics.get(M + 'role{role="leader"}') == 1.0:
            delta = s.metrics.get(M + "commit_index", 0) - earlier[s.name].metrics.get(
                M + "commit_index", 0
            )
            committed = max(committed, delta)
    for s in after:
        b = earlier.get(s.name)
        if b is None:
            continue
        row: dict[str, Any] = {
            "node": s.name,
            "cpu_ms_per_op": round(1000 * (s.cpu - b.cpu) / ops, 4) if ops else None,
            "cpu_percent": round(100 * (s.cpu - b.cpu) / wall, 1) if wall else None,
            "loop_busy_percent": round(100 * (s.loop_cpu - b.loop_cpu) / wall, 1) if wall else None,
            "loop_wait_percent": (
                round(100 * (s.loop_wait - b.loop_wait) / wall, 1) if wall else None
            ),
        }
        if s.metrics and b.metrics:

            def d(
                name: str, now: dict[str, float] = s.metrics, then: dict[str, float] = b.metrics
            ) -> float:
                return now.get(M + name, 0.0) - then.get(M + name, 0.0)

            leader = s.metrics.get(M + 'role{role="leader"}', 0.0) == 1.0
            row["role"] = "leader" if leader else "follower"
            per, unit = (committed, "entry") if committed > 0 else (float(ops), "op")
            row["per"] = unit
            if per > 0:
                row["msgs_sent_per"] = round(d("raft_messages_sent_total") / per, 3)
                row["msgs_received_per"] = round(d("raft_messages_received_total") / per, 3)
                row["fsyncs_per"] = round(d("log_fsyncs_total") / per, 3)
            counts = _counts_by_entries(s.metrics)
            for size, n in _counts_by_entries(b.metrics).items():
                counts[size] = counts.get(size, 0.0) - n
            with_entries = {k: v for k, v in counts.items() if k > 0 and v > 0}
            messages = sum(with_entries.values())
            if messages:
                row["appends_with_entries"] = int(messages)
                row["entries_per_append_mean"] = round(
                    sum(k * v for k, v in with_entries.items()) / messages, 2
                )
                row["entries_per_append_p99"] = _percentile_of_counts(with_entries, 0.99)
            row["committed_entries"] = int(committed)
            writes = d("proposal_duration_seconds_count")
            if writes:
                # From a write's arrival at the node to its apply there: the rest of the client's
                # latency is spent in gRPC, the client and waiting for a CPU.
                row["write_ms_in_node"] = round(
                    1000 * d("proposal_duration_seconds_sum") / writes, 2
                )
        rows.append(row)
    # The leader first, then the others, as the report reads them.
    rows.sort(key=lambda r: (r.get("role") != "leader", r["node"]))
    return rows


def format_node_cost(row: dict[str, Any]) -> str:
    """One process's line under its cell."""
    role = row.get("role", "process")
    parts = [
        f"  {role} {row['node']}: {_num(row.get('cpu_ms_per_op'))} ms CPU/op, "
        f"loop busy {_num(row.get('loop_busy_percent'), 0)}% "
        f"(process {_num(row.get('cpu_percent'), 0)}%, "
        f"loop waiting for a CPU {_num(row.get('loop_wait_percent'), 0)}%)"
    ]
    if "write_ms_in_node" in row:
        parts.append(f"a write {row['write_ms_in_node']:.2f} ms in the node")
    unit = row.get("per")
    if unit is not None and "msgs_sent_per" in row:
        parts.append(
            f"msgs/{unit} sent {_num(row['msgs_sent_per'], 2)} "
            f"received {_num(row['msgs_received_per'], 2)}, "
            f"fsyncs/{unit} {_num(row['fsyncs_per'], 3)}"
        )
    if "entries_per_append_mean" in row:
        parts.append(
            f"entries/append mean {_num(row['entries_per_append_mean'], 1)} "
            f"p99 {row['entries_per_append_p99']}"
        )
    return ", ".join(parts)


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def node_cost_table(cells: list[Cell]) -> str:
    """Per process of each measured cell (Markdown), for bench/results.md."""
    lines = [
        "| system | workload | nodes | value B | clients | process | CPU ms / op | loop busy % "
        "| msgs sent / entry | msgs received / entry | entries / append (mean, p99) "
        "| fsyncs / entry |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        for r in c.node_costs:
            unit = r.get("per", "entry")
            suffix = "" if unit == "entry" else f" (per {unit})"
            sizes = (
                f"{r['entries_per_append_mean']:.1f}, {r['entries_per_append_p99']}"
                if "entries_per_append_mean" in r
                else "-"
            )
            lines.append(
                f"| {c.system} | {c.workload} | {c.nodes} | {c.value_size} | {c.clients} "
                f"| {r.get('role', 'process')} {r['node']} | {_num(r.get('cpu_ms_per_op'))} "
                f"| {_num(r.get('loop_busy_percent'), 0)} "
                f"| {_num(r.get('msgs_sent_per'), 2)}{suffix} "
                f"| {_num(r.get('msgs_received_per'), 2)}{suffix} | {sizes} "
                f"| {_num(r.get('fsyncs_per'), 3)}{suffix} |"
            )
    return "\n".join(lines)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, int(-(-fraction * len(sorted_values) // 1)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


HEADER = (
    f"{'system':<17}{'workload':<11}{'nodes':>5}{'value':>6}{'clients':>8}{'ops/s':>10}"
    f"{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'cpu s/1k ops':>13}{'errors':>7}"
)


def format_cell(c: Cell) -> str:
    if c.note:
        return (
            f"{c.system:<17}{c.workload:<11}{c.nodes:>5}{c.value_size:>6}{c.clients:>8}  {c.note}"
        )
    cpu = "-" if c.cpu_s_per_1000_ops is None else f"{c.cpu_s_per_1000_ops:.3f}"
    return (
        f"{c.system:<17}{c.workload:<11}{c.nodes:>5}{c.value_size:>6}{c.clients:>8}"
        f"{c.ops_per_s:>10.1f}{c.p50_ms:>9.2f}{c.p99_ms:>9.2f}{c.p999_ms:>10.2f}{cpu:>13}"
        f"{c.errors:>7}"
    )


def format_table(cells: list[Cell]) -> str:
    return "\n".join([HEADER, *(format_cell(c) for c in cells)])


def markdown_table(cells: list[Cell]) -> str:
    """The same rows as a Markdown table, for bench/results.md and docs/benchmarks.md."""
    lines = [
        "| system | workload | nodes | value B | clients | ops/s | p50 ms | p99 ms | p99.9 ms "
        "| cluster CPU s / 1,000 ops | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        if c.note:
            continue
        cpu = "-" if c.cpu_s_per_1000_ops is None else f"{c.cpu_s_per_1000_ops:.3f}"
        lines.append(
            f"| {c.system} | {c.workload} | {c.nodes} | {c.value_size} | {c.clients} "
            f"| {c.ops_per_s:,.0f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} | {c.p999_ms:.2f} | {cpu} "
            f"| {c.errors} |"
        )
    return "\n".join(lines)


def _find(cells: list[Cell], system: str, workload: str, clients: int) -> Cell | None:
    for c in cells:
        if (c.system, c.workload, c.clients) == (system, workload, clients) and c.ops:
            return c
    return None


def headline_table(cells: list[Cell], nodes: int, value_size: int = 64) -> str:
    """The issue's comparison, one row per system (Markdown): writes from 1 and 64 clients,
    linearizable reads and 100-put batches from 64 clients, and CPU per 1,000 writes at 64."""
    chosen = [c for c in cells if c.nodes == nodes and c.value_size == value_size and not c.note]
    lines = [
        f"| system ({nodes} nodes, {value_size} B) | 1 client: writes/s, p50 | 64 clients: writes/s "
        "| 64 clients: linearizable reads/s | 64 clients: 100-put batches, puts/s "
        "| cluster CPU s / 1,000 writes (64 clients) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for system in dict.fromkeys(c.system for c in chosen):
        one = _find(chosen, system, "write", 1)
        many = _find(chosen, system, "write", 64)
        reads = _find(chosen, system, "read", 64)
        batch = _find(chosen, system, "batch", 64)
        cpu = many.cpu_s_per_1000_ops if many else None
        lines.append(
            f"| {system} "
            f"| {f'{one.ops_per_s:,.0f}/s, {one.p50_ms:.1f} ms' if one else 'n/a'} "
            f"| {f'{many.ops_per_s:,.0f}/s' if many else 'n/a'} "
            f"| {f'{reads.ops_per_s:,.0f}/s' if reads else 'n/a'} "
            f"| {f'{batch.ops_per_s * 100:,.0f}/s' if batch else 'n/a'} "
            f"| {f'{cpu:.2f}' if cpu is not None else 'n/a'} |"
        )
    return "\n".join(lines)


def draw_charts(cells: list[Cell], folder: Path) -> list[Path]:
    """One PNG per workload, cluster size and value size: throughput and p50/p99 latency against
    the number of clients, one line per system. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, int, int], list[Cell]] = {}
    for c in cells:
        if not c.note and c.ops:
            groups.setdefault((c.workload, c.nodes, c.value_size), []).append(c)
    written: list[Path] = []
    for (workload, nodes, value_size), group in sorted(groups.items()):
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for system in sorted({c.system for c in group}):
            points = sorted((c for c in group if c.system == system), key=lambda c: c.clients)
            x = [c.clients for c in points]
            # One colour per system in every chart, whichever systems a chart has.
            color = COLORS.get(system)
            left.plot(x, [c.ops_per_s for c in points], marker="o", color=color, label=system)
            right.plot(
                x, [c.p50_ms for c in points], marker="o", color=color, label=f"{system} p50"
            )
            right.plot(
                x,
                [c.p99_ms for c in points],
                marker="x",
                linestyle="--",
                color=color,
                label=f"{system} p99",
            )
        ops = f"calls of {BATCH_SIZE} puts/s" if workload == "batch" else "operations/s"
        ticks = sorted({c.clients for c in group})
        for axes, label in ((left, ops), (right, "latency, ms")):
            axes.set_xscale("log", base=2)
            axes.set_xticks(ticks, [str(t) for t in ticks])
            axes.set_xlabel("concurrent clients")
            axes.set_ylabel(label)
            axes.grid(True, alpha=0.3)
            axes.legend(fontsize=8)
        right.set_yscale("log")
        figure.suptitle(f"{workload}, {nodes} nodes, {value_size}-byte values")
        figure.tight_layout()
        path = folder / f"{workload}-{nodes}nodes-{value_size}B.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written


class Progress:
    """A progress bar on stderr, drawn by rich on a terminal (plain lines when not a terminal)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream
        self.width = width
        self.started = time.monotonic()
        self.tty = stream.isatty()
        self._bar: Any = None
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self._bar = Bar(
                BarColumn(bar_width=width),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeRemainingColumn(),
                console=Console(file=stream, highlight=False),
            )
            self._task = self._bar.add_task("", total=self.total)
            self._bar.start()

    def print(self, row: str) -> None:
        """A line of results on stdout, above the bar."""
        if self._bar is not None:
            self._bar.stop()
            print(row, flush=True)
            self._bar.start()
        else:
            print(row, flush=True)

    def show(self, label: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, description=label)
            return
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self.started
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        text = f"[{bar}] {self.done}/{self.total} {label}"
        if self.done:
            text += f" (about {left:.0f} s left)"
        if not self.tty:
            # A log file gets a line now and then rather than a redraw per step.
            if self.done == 0:
                return
            self.stream.write(text + "\n")
        else:
            self.stream.write("\r\033[K" + text)
        self.stream.flush()

    def step(self, label: str) -> None:
        self.done += 1
        if self.tty or self.done == self.total or self.done % 10 == 0:
            self.show(label)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
