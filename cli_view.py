"""How the command line shows what changes: the nodes' events as narrated lines (coloured by kind)
and `status --watch` as a live table redrawn in place, both with rich on a terminal and as plain
lines when stdout is not one."""

from __future__ import annotations

import datetime
import heapq
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from rpc import raft_pb2

# Each kind's colour on a terminal (rich style names).
KIND_STYLES = {
    "state": "bold",
    "role": "bold magenta",
    "timer": "dim",
    "pre_vote": "yellow",
    "vote": "bold yellow",
    "leader": "bold green",
    "append": "cyan",
    "commit": "green",
    "apply": "dim green",
    "replicate": "blue",
    "snapshot": "magenta",
    "membership": "bold blue",
    "transfer": "bold cyan",
    "client": "white",
    "dropped": "bold red",
}
# Events from several nodes are held this long before printing, so that they come out in time
# order although each node's stream arrives on its own.
MERGE_DELAY = 0.25


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def event_line(event: raft_pb2.NodeEvent) -> str:
    """One event in the narration's voice: `HH:MM:SS.mmm [node role t=N] text`."""
    when = datetime.datetime.fromtimestamp(event.time).strftime("%H:%M:%S.%f")[:-3]
    return f"{when} [{event.node_id} {event.role} t={event.term}] {event.text}"


def event_json(event: raft_pb2.NodeEvent) -> str:
    """One event as a JSON object: every field of NodeEvent by name (numbers as numbers; an
    unset leader_id or voted_for as null)."""
    fields: dict[str, Any] = {}
    for field in raft_pb2.NodeEvent.DESCRIPTOR.fields:
        value = getattr(event, field.name)
        if field.name in ("leader_id", "voted_for") and not event.HasField(field.name):
            value = None
        elif not isinstance(value, (str, int, float, bool)):
            value = list(value)
        fields[field.name] = value
    return json.dumps(fields)


class EventPrinter:
    """Prints events as lines, coloured by kind on a terminal; with `merge`, held for
    MERGE_DELAY and printed in time order."""

    def __init__(self, as_json: bool, merge: bool, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stdout
        self._json = as_json
        self._merge = merge
        self._held: list[tuple[float, int, raft_pb2.NodeEvent]] = []
        self._arrivals = 0
        self._console: Any = None
        if not as_json and is_terminal(self._stream):
            from rich.console import Console

            self._console = Console(file=self._stream, highlight=False, soft_wrap=True)

    def add(self, event: raft_pb2.NodeEvent, now: float) -> None:
        if not self._merge:
            self._print(event)
            return
        self._arrivals += 1
        heapq.heappush(self._held, (event.time, self._arrivals, event))
        self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Print what has been held long enough (None: everything)."""
        while self._held and (now is None or self._held[0][0] <= now - MERGE_DELAY):
            self._print(heapq.heappop(self._held)[2])

    def note(self, text: str) -> None:
        """A line of the command's own (an unreachable node), on stderr."""
        print(text, file=sys.stderr, flush=True)

    def _print(self, event: raft_pb2.NodeEvent) -> None:
        if self._json:
            print(event_json(event), file=self._stream, flush=True)
        elif self._console is not None:
            from rich.text import Text

            line = Text(event_line(event), style=KIND_STYLES.get(event.kind, ""))
            self._console.print(line)
        else:
            print(event_line(event), file=self._stream, flush=True)


class LiveTable:
    """`status --watch` on a terminal: the table redrawn in place, roles and lag in colour."""

    def __init__(self, columns: Sequence[str]) -> None:
        from rich.console import Console
        from rich.live import Live

        self._columns = columns
        self._console = Console(highlight=False)
        self._live = Live(console=self._console, auto_refresh=False, transient=False)
        self._live.start()

    def show(
        self,
        rows: Sequence[Sequence[str]],
        styles: Sequence[Callable[[int], str]],
        footer: Sequence[str],
    ) -> None:
        """Redraw with `rows`; `styles[i](column)` is row i's style for a cell."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(*self._columns, title_justify="left")
        for i, column in enumerate(table.columns):
            if 4 <= i <= 7:
                column.justify = "right"
        for row, style in zip(rows, styles, strict=True):
            table.add_row(*(Text(cell, style=style(c)) for c, cell in enumerate(row)))
        now = datetime.datetime.now().strftime("%H:%M:%S")
        notes = [Text(line, style="red") for line in footer]
        heading = Text(f"raft-demo cluster at {now} (Ctrl-C to stop)", style="dim")
        self._live.update(Group(heading, table, *notes), refresh=True)

    def stop(self) -> None:
        self._live.stop()


def lag_style(lag: int | None) -> str:
    if lag is None:
        return "dim"
    return "green" if lag == 0 else ("yellow" if lag < 100 else "bold red")


def contact_style(seconds: float | None) -> str:
    if seconds is None:
        return "dim"
    return "green" if seconds < 0.5 else ("yellow" if seconds < 2 else "bold red")
