"""A linearizability checker for histories of key-value operations (put, get, delete, cas): it checks
each key on its own with Wing & Gong's search plus Lowe's memoisation, and shrinks a failure to a window.

Model
    Each key is a register that starts missing (``None``). ``put`` sets it; ``get`` returns it (``None``
    when missing); ``delete`` removes it and returns whether it existed; ``cas`` with ``expected`` (a value,
    or ``None`` for "missing") and ``value`` sets the key to ``value`` if it held ``expected`` and returns
    ``(swapped, current)``, where ``current`` is what the key held when the cas ran (so ``current ==
    expected`` when it swapped); a bare ``swapped`` bool is accepted when the current value is not known.
    ``None`` therefore means "missing" and is never a value that can be written.

    An operation ends ``ok`` (it took effect at one instant between its invocation and completion and its
    result is known), ``fail`` (it certainly took no effect; it is ignored) or ``unknown`` (timed out or
    lost: it took effect at one instant after its invocation, or never, and its result is unconstrained).
    Operation A precedes B only if A completed strictly before B was invoked; equal times mean concurrent.
    :class:`History` records events in the order they happen and keeps its clock readings strictly
    increasing, so the order it observed is the order the checker sees.

Why per key
    Every operation touches one key, and linearizability is compositional (Herlihy & Wing), so the
    history is linearizable iff each key's sub-history is. Each key is searched separately.

Search
    Invocations and completions sit in time-ordered linked lists. At each node of the search (the set
    of operations done, the register's value) it tries every invocation that precedes the first
    pending completion, applies it if its result allows, lifts it out of the lists and goes deeper;
    when nothing works it backtracks. Nodes already seen are not searched again (Lowe's memoisation).
    Unknown operations never complete, so they may be placed at any later point or never. Operations
    that cannot change the verdict are dropped first: failed ones, unknown reads, and unknown writes
    of a value that nothing after their invocation could observe (placing such a write can never help
    a later result, so "never took effect" is as good). ``_search`` lists the further reductions.

Cost
    Fast for the histories a test suite records: a few thousand operations spread over several keys,
    with a few percent unknown outcomes, check in well under a second. The problem is NP-complete,
    though, and a key hammered by many concurrent clients with deletes, cas and unknown outcomes can
    need millions of steps to prove a violation; ``max_steps`` bounds each search, and a search that
    runs out yields an *inconclusive* result instead of a verdict.

Failing window
    For a time window ``[start, end]`` on one key, the window's operations are those overlapping it
    (invoked at or before ``end`` and completed at or after ``start``; unknown ones never complete).
    Those wholly inside it must take effect inside it; those crossing an edge may instead have taken
    effect outside it (before ``start`` or after ``end``) and so may be left out. At ``start`` the key
    may be missing or hold any value written by an operation invoked before ``start`` (other than a
    failed one or a cas that reported not swapping). These rules are sound: any linearization of the
    whole history, cut at ``start`` and ``end``, obeys them, so a window that fails proves the history
    is not linearizable. Checking the window's operations on their own only adds constraints (each
    must then take effect, starting from a missing key), so ``check(result.window)`` fails too.
    A window only grows more permissive as it shrinks, so shrinking is a search along each edge. The
    checker first looks for a failing window of a few dozen operations ending at each completion in
    turn (cheap, and it can prove a violation even when the whole search ran out of steps), or else
    takes the earliest ``end`` whose window from the beginning of time fails; it then pulls ``end``
    in and pushes ``start`` out as far as the window still fails. Moving either edge of the result
    past one more operation makes the window pass (unless a probe ran out of steps).
    :func:`check_window` checks one window by these rules.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, TypeAlias, get_args

__all__ = [
    "CheckResult",
    "History",
    "HistoryError",
    "Kind",
    "Operation",
    "Outcome",
    "Value",
    "check",
    "check_window",
]

Kind: TypeAlias = Literal["put", "get", "delete", "cas"]
Outcome: TypeAlias = Literal["ok", "fail", "unknown"]
# A register value; None means "missing" and is never written.
Value: TypeAlias = Hashable

_KINDS: tuple[str, ...] = get_args(Kind)
_OUTCOMES: tuple[str, ...] = get_args(Outcome)
_INF = math.inf


class HistoryError(ValueError):
    """A malformed operation or history (the message says which operation and why)."""


@dataclass(frozen=True, kw_only=True)
class Operation:
    """One client operation on one key, with when it was invoked and how it ended.

    ``value`` is the value a put writes or a cas writes on success; ``expected`` is what a cas compares
    with (``None``: missing). ``result`` (``ok`` only): a get's value read (``None``: missing), a delete's
    ``existed`` bool, a cas's ``(swapped, current)`` or bare ``swapped``; puts have none.
    ``complete`` is ``None`` for unknown operations, which never complete.
    """

    id: int
    client: Hashable
    kind: Kind
    key: Hashable
    invoke: float
    outcome: Outcome
    complete: float | None = None
    value: Value = None
    expected: Value = None
    result: Hashable = None

    @property
    def completes(self) -> float:
        """The completion time as the checker uses it: +infinity for an unknown operation."""
        if self.outcome == "unknown" or self.complete is None:
            return _INF
        return self.complete

    def arguments(self) -> str:
        if self.kind == "put":
            return _show(self.value)
        if self.kind == "cas":
            return f"{_show(self.expected)} -> {_show(self.value)}"
        return ""

    def result_text(self) -> str:
        if self.outcome == "fail":
            return "failed"
        if self.outcome == "unknown":
            return "unknown"
        if self.kind == "get":
            return _show(self.result)
        if self.kind == "delete":
            return "existed" if self.result else "was missing"
        if self.kind == "cas":
            swapped, current = _cas_result(self.result)
            verdict = "swapped" if swapped else "not swapped"
            return verdict if current is _NOT_REPORTED else f"{verdict}, was {_show(current)}"
        return "ok"

    def describe(self) -> str:
        """A short phrase naming this operation, e.g. ``put 'v3' by client 2 (op 17)``."""
        arguments = self.arguments()
        what = f"{self.kind} {arguments}" if arguments else self.kind
        return f"{what} by client {self.client} (op {self.id})"


class _NotReported:
    def __repr__(self) -> str:
        return "<not reported>"


_NOT_REPORTED = _NotReported()


class _Other:
    """A register value that no operation in a window mentions; it stands for all such values."""

    def __repr__(self) -> str:
        return "<other>"


_OTHER = _Other()


def _show(value: object) -> str:
    return "missing" if value is None else repr(value)


def _cas_result(result: object) -> tuple[bool, object]:
    if isinstance(result, bool):
        return result, _NOT_REPORTED
    assert isinstance(result, tuple)
    return bool(result[0]), result[1]


def _validate(op: Operation) -> None:
    where = f"operation {op.id!r} ({op.kind!r} by client {op.client!r})"
    if op.kind not in _KINDS:
        raise HistoryError(f"{where}: kind must be one of {', '.join(_KINDS)}")
    if op.outcome not in _OUTCOMES:
        raise HistoryError(f"{where}: outcome must be one of {', '.join(_OUTCOMES)}")
    if not isinstance(op.invoke, int | float) or math.isnan(op.invoke) or math.isinf(op.invoke):
        raise HistoryError(f"{where}: invocation time {op.invoke!r} is not a finite number")
    if op.kind in ("put", "cas") and op.value is None:
        raise HistoryError(f"{where}: a {op.kind} must write a value (None means missing)")
    if op.outcome == "unknown":
        return
    if op.complete is None:
        raise HistoryError(f"{where}: an {op.outcome!r} operation needs a completion time")
    if not isinstance(op.complete, int | float) or math.isnan(op.complete):
        raise HistoryError(f"{where}: completion time {op.complete!r} is not a number")
    if op.complete < op.invoke:
        raise HistoryError(
            f"{where}: completed at {op.complete!r}, before it was invoked at {op.invoke!r}"
        )
    if op.outcome != "ok":
        return
    if op.kind == "delete" and not isinstance(op.result, bool):
        raise HistoryError(f"{where}: a delete's result must be a bool (whether the key existed)")
    if op.kind == "cas" and not (
        isinstance(op.result, bool)
        or (isinstance(op.result, tuple) and len(op.result) == 2 and isinstance(op.result[0], bool))
    ):
        raise HistoryError(f"{where}: a cas's result must be (swapped, current) or a swapped bool")


class History:
    """Records operations as clients run them: ``invoke`` before sending, then ``ok``/``fail``/``unknown``.

    Times come from ``clock`` unless given with ``at=``. Clock readings are made strictly increasing, so
    an operation completed before another was invoked (in recording order) is seen to precede it. An
    operation still pending when the history is read counts as unknown. Not thread-safe; meant for one
    event loop or one simulation.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._operations: dict[int, Operation] = {}
        self._pending: set[int] = set()
        self._latest = -_INF

    def _now(self, at: float | None) -> float:
        if at is not None:
            moment = float(at)
        else:
            moment = max(float(self._clock()), math.nextafter(self._latest, _INF))
        if math.isnan(moment) or math.isinf(moment):
            raise HistoryError(f"time {moment!r} is not a finite number")
        self._latest = max(self._latest, moment)
        return moment

    def invoke(
        self,
        client: Hashable,
        kind: Kind,
        key: Hashable,
        value: Value = None,
        expected: Value = None,
        *,
        at: float | None = None,
    ) -> int:
        """Record that ``client`` is about to send an operation; returns its id."""
        op = Operation(
            id=len(self._operations),
            client=client,
            kind=kind,
            key=key,
            invoke=self._now(at),
            outcome="unknown",
            value=value,
            expected=expected,
        )
        _validate(op)
        self._operations[op.id] = op
        self._pending.add(op.id)
        return op.id

    def _finish(
        self, op_id: int, outcome: Outcome, result: Hashable, at: float | None
    ) -> Operation:
        if op_id not in self._operations:
            raise HistoryError(f"operation {op_id!r} was never invoked")
        if op_id not in self._pending:
            raise HistoryError(f"operation {op_id!r} has already been completed")
        complete = None if outcome == "unknown" else self._now(at)
        op = replace(self._operations[op_id], outcome=outcome, complete=complete, result=result)
        _validate(op)
        self._operations[op_id] = op
        self._pending.discard(op_id)
        return op

    def ok(self, op_id: int, result: Hashable = None, *, at: float | None = None) -> Operation:
        """The operation took effect and returned ``result`` (see :class:`Operation`)."""
        return self._finish(op_id, "ok", result, at)

    def fail(self, op_id: int, *, at: float | None = None) -> Operation:
        """The operation certainly did not take effect (e.g. rejected before anything was appended)."""
        return self._finish(op_id, "fail", None, at)

    def unknown(self, op_id: int) -> Operation:
        """The operation may or may not have taken effect (timed out, connection lost)."""
        return self._finish(op_id, "unknown", None, None)

    @property
    def operations(self) -> list[Operation]:
        """Every recorded operation in invocation order; pending ones appear as unknown."""
        return list(self._operations.values())

    @property
    def pending(self) -> list[int]:
        return sorted(self._pending)

    def __len__(self) -> int:
        return len(self._operations)


@dataclass(frozen=True)
class CheckResult:
    """A verdict; when a key is not linearizable, a small window of its operations that shows why."""

    ok: bool
    inconclusive: bool = False
    key: Hashable = None
    window: list[Operation] = field(default_factory=list)
    window_start: float = -_INF
    window_end: float = _INF
    explanation: str = ""
    # Operations in the window that cross its edges and so may have taken effect outside it.
    edge_ids: frozenset[int] = frozenset()
    # What the key could hold at window_start (None: missing); empty when no window is reported.
    initial_values: tuple[Value, ...] = ()
    key_operations: int = 0
    operations: int = 0
    keys: int = 0
    steps: int = 0

    def report(self) -> str:
        """A person-readable account: the verdict, and for a violation one line per window operation."""
        if self.ok:
            keys = "key" if self.keys == 1 else "keys"
            return (
                f"linearizable: {self.operations} operations on {self.keys} {keys} "
                f"({self.steps} search steps)"
            )
        if self.inconclusive:
            return (
                f"inconclusive: the search on key {self.key!r} ran out of steps "
                f"({self.steps} taken); give check() a larger max_steps"
            )
        lines = [f"not linearizable on key {self.key!r}: {self.explanation}"]
        span = (
            "from the start of the history"
            if self.window_start == -_INF
            else f"from t={_time_text(self.window_start)}"
        )
        lines.append(
            f"smallest failing window: {len(self.window)} of {self.key_operations} operations on "
            f"this key, {span} to t={_time_text(self.window_end)}"
        )
        if self.window_start != -_INF:
            lines.append(f"  at its start the key could hold: {_values_text(self.initial_values)}")
        lines.append(_table(self.window, self.edge_ids))
        if any(op.id in self.edge_ids and op.outcome != "unknown" for op in self.window):
            lines.append("  * crosses an edge of the window: it may have taken effect outside it")
        return "\n".join(lines)


def _time_text(moment: float) -> str:
    if moment == _INF:
        return "never"
    if moment == int(moment) and abs(moment) < 1e15:
        return str(int(moment))
    return f"{moment:.6f}".rstrip("0").rstrip(".")


def _values_text(values: Sequence[Value], limit: int = 6) -> str:
    shown = [_show(value) for value in values[:limit]]
    if len(values) > limit:
        shown.append(f"or any of {len(values) - limit} other values")
    return ", ".join(shown)


def _table(window: Sequence[Operation], edge_ids: frozenset[int]) -> str:
    header = ("op", "client", "kind", "key", "arguments", "result", "invoked", "completed")
    rows = [header]
    for op in window:
        mark = "*" if op.id in edge_ids and op.outcome != "unknown" else ""
        completed = _time_text(op.completes) if op.outcome != "unknown" else "never (unknown)"
        rows.append(
            (
                f"{op.id}{mark}",
                str(op.client),
                op.kind,
                repr(op.key),
                op.arguments(),
                op.result_text(),
                _time_text(op.invoke),
                completed,
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join(
        "  "
        + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


# Operation codes for the search's inner loop.
_PUT, _GET, _DELETE, _CAS = range(4)
_CODES = {"put": _PUT, "get": _GET, "delete": _DELETE, "cas": _CAS}


@dataclass(frozen=True)
class _Candidate:
    """An operation as one search sees it."""

    op: Operation
    required: bool  # must be linearized; otherwise it may be left out
    ret: float  # when it must have taken effect by, if at all (+infinity: no deadline)


@dataclass(frozen=True)
class _Probe:
    verdict: bool | None  # None: ran out of steps
    steps: int
    kept: list[_Candidate]


def _is_read_only(op: Operation) -> bool:
    """True if the operation cannot change the register in any linearization consistent with it."""
    if op.kind == "get":
        return True
    if op.outcome != "ok":
        return False
    if op.kind == "delete":
        return op.result is False
    if op.kind == "cas":
        return not _cas_result(op.result)[0]
    return False


def _written(op: Operation) -> Value:
    return None if op.kind == "delete" else op.value


def _blockers(candidates: Sequence[_Candidate]) -> list[list[int] | None]:
    """For each optional write, the operations that react to the value it writes: constrained ones
    that value would satisfy, and unknown cas expecting it.

    A write X of v matters only through them. Take a linearization that places X when none of them
    remains to be placed: until the next write only unknown operations run (any other would have to
    accept v), changing nothing, so they may as well be left out; and that next write is a put or an
    unknown write (a constrained one would accept v), so its effect does not depend on the value.
    Removing X leaves a valid linearization, so leaving X out (it never took effect, or took effect
    before the window) is as good as placing it. ``None`` for operations that are not optional writes.
    """
    exact: dict[Value, list[int]] = {}
    any_present: list[int] = []  # deletes that found the key present
    any_but: list[tuple[int, Value]] = []  # bare-bool cas that did not swap
    for index, c in enumerate(candidates):
        op = c.op
        if op.outcome != "ok":
            if op.kind == "cas":
                # Its effect from its expected value differs from its effect from any other.
                exact.setdefault(op.expected, []).append(index)
            continue
        if op.kind == "get":
            exact.setdefault(op.result, []).append(index)
        elif op.kind == "delete":
            if op.result:
                any_present.append(index)
            else:
                exact.setdefault(None, []).append(index)
        elif op.kind == "cas":
            swapped, current = _cas_result(op.result)
            if current is _NOT_REPORTED:
                if swapped:
                    exact.setdefault(op.expected, []).append(index)
                else:
                    any_but.append((index, op.expected))
            elif swapped == (current == op.expected):
                exact.setdefault(current, []).append(index)

    blockers: list[list[int] | None] = []
    for index, c in enumerate(candidates):
        if c.required or _is_read_only(c.op):
            blockers.append(None)
            continue
        written = _written(c.op)
        found = list(exact.get(written, ()))
        if written is not None:
            found.extend(any_present)
        found.extend(other for other, expected in any_but if written != expected)
        blockers.append(
            sorted(
                {
                    other
                    for other in found
                    if other != index and candidates[other].ret >= c.op.invoke
                }
            )
        )
    return blockers


def _prune(candidates: list[_Candidate]) -> list[_Candidate]:
    """Drop optional operations that cannot change the verdict: reads, and writes nothing can observe."""
    kept = [c for c in candidates if c.required or not _is_read_only(c.op)]
    blockers = _blockers(kept)
    removed: set[int] = set()
    changed = True
    while changed:
        changed = False
        for index, watched in enumerate(blockers):
            if watched is not None and index not in removed and removed.issuperset(watched):
                removed.add(index)
                changed = True
    return [c for index, c in enumerate(kept) if index not in removed]


def _mentioned(candidates: Iterable[_Candidate]) -> set[Value]:
    """Values the operations compare the register with; all other values behave alike."""
    mentioned: set[Value] = set()
    for c in candidates:
        op = c.op
        if op.kind == "cas":
            mentioned.add(op.expected)
            if op.outcome == "ok":
                current = _cas_result(op.result)[1]
                if current is not _NOT_REPORTED:
                    mentioned.add(current)
        elif op.kind == "get" and op.outcome == "ok":
            mentioned.add(op.result)
    return mentioned


# How a search move was made, so backtracking knows whether the node it returns to has alternatives.
_PLACED, _LEFT_OUT, _FORCED = range(3)
# Positions in the search's walk that are not list entries.
_END, _BACKTRACK, _NEW_NODE = -1, -2, -3


# Steps for each search's first turn; and the search orders taking turns: eager, then lazy.
_FIRST_BUDGET = 20_000
_STRATEGIES = (True, False)


def _decide(
    candidates: Sequence[_Candidate], initial: Sequence[Value], max_steps: int | None
) -> tuple[bool | None, int]:
    """Run the eager and the lazy search in turns, with doubling step budgets, until one concludes.

    Eager placement finds a linearization fast when unknown operations took effect soon after they
    were invoked, as they usually do; lazy placement with dominance proves violations faster. Taking
    turns costs at most a small factor over the better of the two.
    """
    spent, budget = 0, _FIRST_BUDGET
    while True:
        for eager in _STRATEGIES:
            allowed = budget if max_steps is None else min(budget, max_steps - spent)
            if allowed <= 0:
                return None, spent
            verdict, steps = _search(candidates, initial, allowed, eager)
            spent += steps
            if verdict is not None:
                return verdict, spent
        budget *= 2


def _search(
    candidates: Sequence[_Candidate], initial: Sequence[Value], max_steps: int, eager: bool
) -> tuple[bool | None, int]:
    """Is there a linearization of ``candidates`` from one of the ``initial`` register values?

    Invocations and completions sit in time order in linked lists. At each node (operations done,
    register value) the search tries the invocations that precede the first pending completion, and
    backtracks when none leads anywhere; an optional operation is done once placed or left out.
    Nodes already visited are skipped (Lowe). An ``eager`` search tries invocations in time order;
    otherwise optional operations' invocations sit in a list of their own and are tried only after
    every required one, and nodes dominated by one that failed are skipped too: same required
    operations done, same value, and more of the optional ones done (an optional operation still
    available never hurts, as it can be left out).

    Three reductions keep the tree small. A read (a get, a delete that found the key missing, a cas
    that did not swap) that its result allows now is placed at once, with no alternatives: whatever
    must precede it is done and it changes nothing, so any linearization from here can be reordered
    to place it first. An optional write that would not change the value is not tried, and one is
    left out as soon as nothing that could observe it remains to be placed (see ``_blockers``). And
    a value that no remaining operation compares with is recorded as ``_OTHER``, as all such values
    behave alike.
    """
    count = len(candidates)
    codes = [_CODES[c.op.kind] for c in candidates]
    values = [c.op.value for c in candidates]
    expecteds = [c.op.expected for c in candidates]
    constrained = [c.op.outcome == "ok" for c in candidates]
    required = [c.required for c in candidates]
    reader = [c.required and _is_read_only(c.op) for c in candidates]
    # A get's value read, a delete's existed, a cas's swapped; and a cas's current (or _NOT_REPORTED).
    first: list[object] = []
    second: list[object] = []
    for c in candidates:
        op = c.op
        if op.kind == "cas" and op.outcome == "ok":
            swapped, current = _cas_result(op.result)
            first.append(swapped)
            second.append(current)
        else:
            first.append(op.result)
            second.append(_NOT_REPORTED)
    bit = [1 << index for index in range(count)]
    required_bits = sum(bit[index] for index in range(count) if required[index])
    optional_bits = ((1 << count) - 1) ^ required_bits
    blocker_bits = [0] * count
    watchers: list[list[int]] = [[] for _ in range(count)]
    for index, watched in enumerate(_blockers(candidates)):
        for other in watched or ():
            blocker_bits[index] |= bit[other]
            watchers[other].append(index)

    # Positions are ranks in time order (invocations before completions at equal times). Open-ended
    # completions are in neither list: only required operations have to be placed.
    events = sorted(
        [(c.op.invoke, 0, index) for index, c in enumerate(candidates)]
        + [(c.ret, 1, index) for index, c in enumerate(candidates) if c.ret != _INF]
    )
    size = len(events)
    main_head, optional_head = size, size + 1
    is_return = [kind == 1 for _, kind, _ in events]
    owner = [index for _, _, index in events]
    call_at = [0] * count
    return_at = [_END] * count
    following = [_END] * (size + 2)
    preceding = [_END] * (size + 2)
    tails = {main_head: main_head, optional_head: optional_head}
    for position, (_, kind, index) in enumerate(events):
        if kind:
            return_at[index] = position
        else:
            call_at[index] = position
        chain = main_head if eager or kind or required[index] else optional_head
        following[tails[chain]] = position
        preceding[position] = tails[chain]
        tails[chain] = position

    def lift(index: int) -> None:
        for position in (call_at[index], return_at[index]):
            if position != _END:
                before, after = preceding[position], following[position]
                following[before] = after
                if after != _END:
                    preceding[after] = before

    def unlift(index: int) -> None:
        for position in (return_at[index], call_at[index]):
            if position != _END:
                before, after = preceding[position], following[position]
                following[before] = position
                if after != _END:
                    preceding[after] = position

    def settle(done: int, index: int) -> tuple[int, list[int]]:
        """Leave out the optional writes that ``index`` being done has made useless."""
        useless: list[int] = []
        queue = watchers[index]
        while queue:
            later: list[int] = []
            for watcher in queue:
                needed = blocker_bits[watcher]
                if not done & bit[watcher] and done & needed == needed:
                    done |= bit[watcher]
                    useless.append(watcher)
                    later.extend(watchers[watcher])
            queue = later
        return done, useless

    # How many operations still to be done compare the register with each value.
    mentions = [tuple(_mentioned([c])) for c in candidates]
    live: dict[Value, int] = {}
    for mentioned in mentions:
        for value in mentioned:
            live[value] = live.get(value, 0) + 1

    def canonical(value: Value, index: int, useless: list[int]) -> Value:
        if value is None or value is _OTHER:
            return value
        remaining = live.get(value, 0) - mentions[index].count(value)
        for other in useless:
            remaining -= mentions[other].count(value)
        return value if remaining > 0 else _OTHER

    visited: set[tuple[int, Value]] = set()
    failed: dict[tuple[int, Value], list[int]] = {}

    def fresh(done: int, value: Value) -> bool:
        if (done, value) in visited:
            return False
        if not eager:
            done_optional = done & optional_bits
            for other in failed.get((done & required_bits, value), ()):
                if other & done_optional == other:
                    return False
        visited.add((done, value))
        return True

    steps = 0
    for start in initial:
        state: Value = start
        done = 0
        # Each move: (operation, how, the useless writes left out with it, and the node it left:
        # value, operations done, position of its first pending completion).
        stack: list[tuple[int, int, list[int], Value, int, int]] = []
        first_return = _END
        position = _NEW_NODE
        while True:
            steps += 1
            if steps > max_steps:
                return None, steps
            move, how, after = -1, _PLACED, state
            if position == _NEW_NODE:
                position = following[main_head]
                while position != _END and not is_return[position]:
                    index = owner[position]
                    if move == -1 and reader[index]:
                        code = codes[index]
                        if code == _GET:
                            possible = state == first[index]
                        elif code == _DELETE:
                            possible = state is None
                        else:
                            possible = state != expecteds[index] and (
                                second[index] is _NOT_REPORTED or state == second[index]
                            )
                        if possible:
                            move, how = index, _FORCED
                    position = following[position]
                if position == _END:
                    # No completion is pending, so every required operation is placed.
                    return True, steps
                first_return = position
                position = following[main_head]
            elif position == _BACKTRACK:
                if not stack:
                    break
                if not eager:
                    failed.setdefault((done & required_bits, state), []).append(
                        done & optional_bits
                    )
                index, how, useless, state, done, first_return = stack.pop()
                for other in reversed(useless):
                    unlift(other)
                    for value in mentions[other]:
                        live[value] += 1
                unlift(index)
                for value in mentions[index]:
                    live[value] += 1
                position = following[call_at[index]] if how == _PLACED else _BACKTRACK
                continue
            if move == -1:
                if position == first_return:
                    # Every required invocation has been tried; now the optional ones.
                    position = following[optional_head]
                    continue
                if position == _END or position > first_return:
                    index = owner[first_return]
                    if required[index]:
                        position = _BACKTRACK
                        continue
                    # An optional operation due now took effect before the window, if at all.
                    move, how = index, _LEFT_OUT
                else:
                    index = owner[position]
                    position = following[position]
                    if reader[index]:
                        # Its result does not allow it now, or it would have been placed already.
                        continue
                    code = codes[index]
                    if code == _PUT:
                        allowed, after = True, values[index]
                    elif code == _DELETE:
                        allowed = not constrained[index] or (state is not None) == first[index]
                        after = None
                    elif code == _CAS:
                        swapped = state == expecteds[index]
                        after = values[index] if swapped else state
                        allowed = not constrained[index] or (
                            swapped == first[index]
                            and (second[index] is _NOT_REPORTED or state == second[index])
                        )
                    else:
                        allowed, after = not constrained[index] or state == first[index], state
                    if not allowed:
                        continue
                    move = index
            now_done, useless = settle(done | bit[move], move)
            after = canonical(after, move, useless)
            if (how == _PLACED and not required[move] and after == state) or not fresh(
                now_done, after
            ):
                # Explored already, or an optional write that changes nothing: nothing to gain.
                if how != _PLACED:
                    position = _BACKTRACK
                continue
            stack.append((move, how, useless, state, done, first_return))
            done, state = now_done, after
            lift(move)
            for value in mentions[move]:
                live[value] -= 1
            for other in useless:
                lift(other)
                for value in mentions[other]:
                    live[value] -= 1
            position = _NEW_NODE
    return False, steps


class _KeyOps:
    """One key's operations, indexed by invocation time so that a window's are found quickly."""

    def __init__(self, operations: list[Operation]) -> None:
        self.operations = operations
        self.live = sorted(
            (op for op in operations if op.outcome != "fail"), key=lambda op: (op.invoke, op.id)
        )
        self.invokes = [op.invoke for op in self.live]
        self.open = [op for op in self.live if op.outcome == "unknown"]
        self.open_invokes = [op.invoke for op in self.open]
        self.longest = max(
            (op.completes - op.invoke for op in self.live if op.outcome == "ok"), default=0.0
        )
        # Writes that may have taken effect, in invocation order, and when each value was first
        # written.
        self.writes = [
            (op.invoke, op.value)
            for op in self.live
            if op.kind in ("put", "cas") and not _is_read_only(op)
        ]
        self.first_written: dict[Value, float] = {}
        for moment, value in self.writes:
            self.first_written.setdefault(value, moment)
        self.ends = sorted({op.completes for op in self.live if op.outcome == "ok"})

    def members(self, start: float, end: float) -> list[Operation]:
        """The operations overlapping ``[start, end]``."""
        last = bisect.bisect_right(self.invokes, end)
        if start == -_INF:
            return self.live[:last]
        first = bisect.bisect_left(self.invokes, start)
        # Invoked before start, but perhaps still running then: within the longest definite
        # duration before it, or unknown.
        horizon = start - self.longest
        earlier = [
            op
            for op in self.live[bisect.bisect_left(self.invokes, horizon) : first]
            if op.completes >= start
        ]
        lost = self.open[: bisect.bisect_left(self.open_invokes, horizon)]
        return lost + earlier + self.live[first:last]

    def written_before(self, start: float) -> list[Value]:
        return sorted({value for moment, value in self.writes if moment < start}, key=repr)

    def initial(self, start: float, mentioned: set[Value]) -> list[Value]:
        """The values the key may hold at ``start``, with unmentioned ones folded into _OTHER."""
        values: list[Value] = [None]
        if start == -_INF:
            return values
        values.extend(
            value
            for value in mentioned
            if value is not None and self.first_written.get(value, _INF) < start
        )
        for moment, value in self.writes:
            if moment >= start:
                break
            if value not in mentioned:
                values.append(_OTHER)
                break
        return values


def _probe(key_ops: _KeyOps, start: float, end: float, max_steps: int | None) -> _Probe:
    """Check the window ``[start, end]`` of one key's operations (see the module docstring)."""
    candidates = []
    for op in key_ops.members(start, end):
        inside = op.outcome == "ok" and op.invoke >= start and op.completes <= end
        candidates.append(_Candidate(op, inside, op.completes if op.completes <= end else _INF))
    kept = _prune(candidates)
    verdict, steps = _decide(kept, key_ops.initial(start, _mentioned(kept)), max_steps)
    return _Probe(verdict, steps, kept)


def _by_key(operations: Iterable[Operation]) -> dict[Hashable, list[Operation]]:
    keyed: dict[Hashable, list[Operation]] = {}
    seen: set[int] = set()
    for op in operations:
        _validate(op)
        if op.id in seen:
            raise HistoryError(f"operation id {op.id!r} appears twice")
        seen.add(op.id)
        keyed.setdefault(op.key, []).append(op)
    return keyed


def _operations_of(history: History | Iterable[Operation]) -> list[Operation]:
    return history.operations if isinstance(history, History) else list(history)


def check(history: History | Iterable[Operation], max_steps: int | None = None) -> CheckResult:
    """Decide whether ``history`` is linearizable; for a violation, include its smallest failing window.

    ``max_steps`` bounds every single search (of a whole key, or of one window while looking for
    the smallest failing one), not their total. A key whose search runs out makes the result
    inconclusive, unless a small failing window is found anyway or another key fails.
    """
    operations = _operations_of(history)
    keyed = _by_key(operations)
    steps = 0
    out_of_steps: Hashable = None
    for key, ops in keyed.items():
        key_ops = _KeyOps(ops)
        found, spent = _check_key(key, key_ops, max_steps)
        steps += spent
        if isinstance(found, CheckResult):
            return replace(found, operations=len(operations), keys=len(keyed), steps=steps)
        if found is None and out_of_steps is None:
            out_of_steps = key
    if out_of_steps is not None:
        return CheckResult(
            ok=False,
            inconclusive=True,
            key=out_of_steps,
            operations=len(operations),
            keys=len(keyed),
            steps=steps,
        )
    return CheckResult(ok=True, operations=len(operations), keys=len(keyed), steps=steps)


def _check_key(
    key: Hashable, key_ops: _KeyOps, max_steps: int | None
) -> tuple[CheckResult | bool | None, int]:
    """True if the key's history is linearizable, a failing window if not, None if out of steps."""
    whole = _probe(key_ops, -_INF, _INF, max_steps)
    if whole.verdict is True:
        return True, whole.steps
    # A violation usually shows within a few operations: look near each completion first, which is
    # cheap, and proves a violation even when the whole search ran out of steps.
    local, spent = _local_window(key_ops, max_steps)
    spent += whole.steps
    if local is not None:
        start, end, probe = local
        return _minimal_window(key, key_ops, start, end, probe, max_steps, spent)
    if whole.verdict is False:
        return _minimal_window(key, key_ops, -_INF, _INF, whole, max_steps, spent)
    return None, spent


def _bounded(steps: int, max_steps: int | None) -> int:
    return steps if max_steps is None else min(steps, max_steps)


def check_window(
    history: History | Iterable[Operation],
    key: Hashable,
    start: float,
    end: float,
    max_steps: int | None = None,
) -> CheckResult:
    """Check the window ``[start, end]`` of one key alone, with the rules in the module docstring."""
    operations = _operations_of(history)
    key_ops = _KeyOps(_by_key(operations).get(key, []))
    probe = _probe(key_ops, start, end, max_steps)
    if probe.verdict is False:
        return replace(
            _window_result(key, key_ops, start, end, probe), operations=len(operations), keys=1
        )
    return CheckResult(
        ok=probe.verdict is True,
        inconclusive=probe.verdict is None,
        key=key,
        window_start=start,
        window_end=end,
        operations=len(operations),
        keys=1,
        steps=probe.steps,
    )


def _window_result(
    key: Hashable, key_ops: _KeyOps, start: float, end: float, probe: _Probe
) -> CheckResult:
    window = sorted((c.op for c in probe.kept), key=lambda op: (op.invoke, op.id))
    return CheckResult(
        ok=False,
        key=key,
        window=window,
        window_start=start,
        window_end=end,
        explanation=_explain(key_ops.operations, [c for c in probe.kept if c.required], end),
        edge_ids=frozenset(c.op.id for c in probe.kept if not c.required),
        initial_values=(None, *key_ops.written_before(start)),
        key_operations=len(key_ops.operations),
        steps=probe.steps,
    )


# Window widths (in operations) tried when looking for a failing window near each completion, and
# the steps each of those probes, and all of them together, may take.
_LOCAL_WIDTHS = (16, 64)
_LOCAL_STEPS = 20_000
_LOCAL_TOTAL = 1_000_000


def _local_window(
    key_ops: _KeyOps, max_steps: int | None
) -> tuple[tuple[float, float, _Probe] | None, int]:
    """The first failing window of a few operations ending at a completion: (start, end, probe)."""
    budget = _bounded(_LOCAL_STEPS, max_steps)
    spent = 0
    for width in _LOCAL_WIDTHS:
        for end in key_ops.ends:
            if spent > _LOCAL_TOTAL:
                return None, spent
            invoked = bisect.bisect_right(key_ops.invokes, end)
            start = key_ops.invokes[max(0, invoked - width)]
            probe = _probe(key_ops, start, end, budget)
            spent += probe.steps
            if probe.verdict is False:
                return (start, end, probe), spent
    return None, spent


def _minimal_window(
    key: Hashable,
    key_ops: _KeyOps,
    start: float,
    end: float,
    known: _Probe,
    max_steps: int | None,
    spent: int,
) -> tuple[CheckResult, int]:
    """Shrink the window ``[start, end]``, known to fail by ``known``, until both edges are minimal.

    The end is pulled in as far as the window still fails, then the start pushed out likewise; a
    window only grows more permissive as it shrinks, so both edges end up minimal.
    """
    probes: dict[tuple[float, float], _Probe] = {(start, end): known}

    def fails(start: float, end: float) -> _Probe | None:
        nonlocal spent
        if (start, end) not in probes:
            probes[start, end] = _probe(key_ops, start, end, max_steps)
            spent += probes[start, end].steps
        probe = probes[start, end]
        return probe if probe.verdict is False else None

    ends = key_ops.ends
    low, high = bisect.bisect_left(ends, start), bisect.bisect_left(ends, end)
    while low < high:
        middle = (low + high) // 2
        if fails(start, ends[middle]):
            high = middle
        else:
            low = middle + 1
    if high < len(ends) and fails(start, ends[high]):
        end = ends[high]
    best = probes[start, end]

    # Gallop back from the end, where windows are small and cheap to check, then bisect.
    starts = sorted({moment for moment in key_ops.invokes if start < moment <= end})
    passing, failing = len(starts), -1
    distance = 1
    while distance <= len(starts):
        index = len(starts) - distance
        probe = fails(starts[index], end)
        if probe:
            failing, best = index, probe
            break
        passing = index
        distance *= 2
    if failing == -1 and passing > 0:
        probe = fails(starts[0], end)
        if probe:
            failing, best = 0, probe
    if failing != -1:
        low, high = failing, passing
        while high - low > 1:
            middle = (low + high) // 2
            probe = fails(starts[middle], end)
            if probe:
                low, best = middle, probe
            else:
                high = middle
        start = starts[low]
    return _window_result(key, key_ops, start, end, best), spent


def _explain(ops: list[Operation], required: list[_Candidate], end: float) -> str:
    """One line saying why the window fails, from the operation whose completion closes it."""
    closing = [c.op for c in required if c.op.completes == end]
    culprit = next((op for op in closing if op.kind != "put"), closing[0] if closing else None)
    if culprit is None:
        return "no order of these operations explains every result"
    generic = (
        f"no order of the window's operations, each taking effect at one instant between its "
        f"invocation and completion, gives {culprit.describe()} its result ({culprit.result_text()})"
    )
    if culprit.kind == "get":
        seen: Value = culprit.result
        phrase = f"{culprit.describe()} returned {_show(seen)}"
    elif culprit.kind == "cas" and _cas_result(culprit.result)[1] is not _NOT_REPORTED:
        swapped, seen = _cas_result(culprit.result)
        phrase = f"{culprit.describe()} found {_show(seen)}"
        if swapped != (seen == culprit.expected):
            return (
                f"{phrase} and {'swapped' if swapped else 'did not swap'}, but a cas swaps exactly "
                f"when it finds its expected value"
            )
    else:
        return generic
    others = [op for op in ops if op is not culprit]
    if seen is None:
        return _explain_missing(others, culprit, phrase) or generic
    writers = [op for op in others if op.kind in ("put", "cas") and op.value == seen]
    live = [op for op in writers if op.outcome != "fail" and not _is_read_only(op)]
    if not writers:
        return f"{phrase}, but no operation on this key ever wrote {_show(seen)}"
    if not live:
        how = ", ".join(
            f"op {op.id} {'failed' if op.outcome == 'fail' else 'did not swap'}" for op in writers
        )
        return f"{phrase}, but nothing that took effect wrote {_show(seen)} ({how})"
    if all(op.invoke > culprit.completes for op in live):
        return f"{phrase}, but {_show(seen)} was only written after it had completed"
    if all(op.outcome == "ok" for op in live):
        latest_writer = max(op.completes for op in live)
        overwrites = [
            op
            for op in others
            if op.outcome == "ok"
            and not _is_read_only(op)
            and _written(op) != seen
            and op.invoke > latest_writer
            and op.completes < culprit.invoke
        ]
        if overwrites:
            last = max(overwrites, key=lambda op: op.completes)
            only = "the only operation" if len(live) == 1 else "every operation"
            return (
                f"{phrase}, but {only} that could have written {_show(seen)} completed before "
                f"{last.describe()} was invoked, which completed before the {culprit.kind} was invoked"
            )
    return generic


def _explain_missing(others: list[Operation], culprit: Operation, phrase: str) -> str | None:
    """Why the key cannot have been missing: a write completed before, and no delete fits between."""
    removers = [op for op in others if op.kind == "delete" and op.outcome != "fail"]
    writes = [
        op
        for op in others
        if op.outcome == "ok"
        and not _is_read_only(op)
        and op.kind != "delete"
        and op.completes < culprit.invoke
        and not any(
            remover.completes >= op.invoke and remover.invoke <= culprit.completes
            for remover in removers
        )
    ]
    if not writes:
        return None
    last = max(writes, key=lambda op: op.completes)
    return (
        f"{phrase}, but {last.describe()} completed before it was invoked and no delete could "
        f"have run in between"
    )
