"""Range reads for the linearizability checker (linearizability.py), checked per key.

A range read is recorded in a `History` as a "get" of a `RangeKey` whose result is the tuple of
(key, value) pairs it returned, in key order. `expand_ranges` turns each successful one into a get
of every key of the history that falls in the range, with the range's own invocation and
completion: the value it returned, or missing for a key it did not return. A range is linearizable
only if each of those gets is (each key's register must have held that value at one instant of the
range's interval), so a history whose expansion fails is not linearizable. The converse does not
hold: the per-key check does not require one instant for all the keys of a range (that every key
was read at the same point is the node's business: one read of its state after one read index)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from test.linearizability import HistoryError, Operation


@dataclass(frozen=True)
class RangeKey:
    """The keys a range read covers: [start, end), end None for every key from start on."""

    start: str
    end: str | None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.start <= key and (self.end is None or key < self.end)


def expand_ranges(operations: Iterable[Operation]) -> list[Operation]:
    """The operations with every range read replaced by one get per key of the history in its
    range; a range that did not end ok constrains nothing and is dropped."""
    operations = list(operations)
    keys: set[str] = set()
    for op in operations:
        if isinstance(op.key, RangeKey):
            if op.outcome == "ok":
                keys.update(_pairs(op).keys())
        elif isinstance(op.key, str):
            keys.add(op.key)
    next_id = max((op.id for op in operations if isinstance(op.id, int)), default=-1) + 1
    expanded: list[Operation] = []
    for op in operations:
        if not isinstance(op.key, RangeKey):
            expanded.append(op)
            continue
        if op.outcome != "ok":
            continue
        found = _pairs(op)
        for key in sorted(k for k in keys if k in op.key):
            expanded.append(replace(op, id=next_id, kind="get", key=key, result=found.get(key)))
            next_id += 1
    return expanded


def _pairs(op: Operation) -> dict[str, Any]:
    result = op.result
    if not isinstance(result, tuple) or not all(
        isinstance(p, tuple) and len(p) == 2 for p in result
    ):
        raise HistoryError(f"operation {op.id!r}: a range's result must be (key, value) pairs")
    return dict(result)
