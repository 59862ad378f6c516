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
    Invocations and completions go into one time-ordered linked list. The search repeatedly takes an
    invocation that comes before the first pending completion, applies it to the register if its result
    allows, lifts it out of the list and starts again; when it meets a completion whose operation is not
    yet linearized it backtracks. ``(set of operations done, register value)`` pairs already explored are
    cached, which is what keeps the search small. Unknown operations complete at +infinity, so reaching
    their completions means every definite operation was placed. Before searching, operations that
    cannot change the verdict are removed: failed ones, unknown reads, and unknown writes of a value that
    nothing after their invocation could observe (placing such a write can never help a later result, so
    "never took effect" is always as good). ``max_steps`` bounds the search; when it runs out the result
    is *inconclusive* instead of a verdict.

Failing window
    For a time window ``[start, end]`` on one key, the window's operations are those overlapping it
    (invoked at or before ``end`` and completed at or after ``start``; unknown ones never complete). Those
    lying wholly inside it must take effect inside the window; those crossing an edge may instead have
    taken effect outside it (before ``start``, or after ``end``), and so may be left out. The register at
    ``start`` may hold missing or any value written by an operation invoked before ``start``. This is
    sound: any linearization of the whole history, cut at ``start`` and ``end``, satisfies these rules,
    so a window that fails proves the whole history fails; and as every operation of a failing window is
    then forced inside with the register starting missing, ``check(result.window)`` fails too. Windows
    only grow more permissive as they shrink, so the checker finds the earliest ``end`` whose window from
    the beginning of time fails, then the latest ``start`` that still fails with that ``end``: moving
    either edge past one more operation makes the window pass (:func:`check_window` re-checks one).
"""

from __future__ import annotations

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
            return (
                f"linearizable: {self.operations} operations on {self.keys} keys "
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
        if self.edge_ids:
            lines.append(
                "  * crosses the window's edge: it may have taken effect outside the window"
            )
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
        mark = "*" if op.id in edge_ids else ""
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
    initial_values: tuple[Value, ...]


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


def _prune(candidates: list[_Candidate]) -> list[_Candidate]:
    """Drop optional operations that cannot change the verdict.

    An optional read changes nothing. An optional write X of v can go too when no other operation that
    may follow it could be satisfied by the register holding v: take any linearization that places X,
    then between X and the next write only such operations run, so removing X (and any optional no-op
    cas in that stretch) leaves every remaining result valid.
    """
    kept = [c for c in candidates if c.required or not _is_read_only(c.op)]
    exact: dict[Value, list[_Candidate]] = {}
    any_present: list[_Candidate] = []  # deletes that found the key present
    any_but: list[tuple[_Candidate, Value]] = []  # bare-bool cas that did not swap
    for c in kept:
        op = c.op
        if op.outcome != "ok":
            if op.kind == "cas":
                # Its effect from v differs from its effect from other values.
                exact.setdefault(op.expected, []).append(c)
            continue
        if op.kind == "get":
            exact.setdefault(op.result, []).append(c)
        elif op.kind == "delete":
            if op.result:
                any_present.append(c)
            else:
                exact.setdefault(None, []).append(c)
        elif op.kind == "cas":
            swapped, current = _cas_result(op.result)
            if current is _NOT_REPORTED:
                if swapped:
                    exact.setdefault(op.expected, []).append(c)
                else:
                    any_but.append((c, op.expected))
            elif swapped == (current == op.expected):
                exact.setdefault(current, []).append(c)

    removed: set[int] = set()

    def blocked(x: _Candidate) -> bool:
        v = _written(x.op)
        blockers = list(exact.get(v, ()))
        if v is not None:
            blockers.extend(any_present)
        blockers.extend(c for c, expected in any_but if v != expected)
        return any(c is not x and id(c) not in removed and c.ret >= x.op.invoke for c in blockers)

    changed = True
    while changed:
        changed = False
        for c in kept:
            if not c.required and id(c) not in removed and not blocked(c):
                removed.add(id(c))
                changed = True
    return [c for c in kept if id(c) not in removed]


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


def _search(
    candidates: Sequence[_Candidate], initial: Sequence[Value], max_steps: int | None
) -> tuple[bool | None, int]:
    """Is there a linearization of ``candidates`` from one of the ``initial`` register values?"""
    count = len(candidates)
    codes = [_CODES[c.op.kind] for c in candidates]
    values = [c.op.value for c in candidates]
    expecteds = [c.op.expected for c in candidates]
    constrained = [c.op.outcome == "ok" for c in candidates]
    required = [c.required for c in candidates]
    deadline = [c.ret for c in candidates]
    # First and second parts of each result: a get's value, a delete's existed, a cas's swapped and
    # current (or _NOT_REPORTED).
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
            second.append(None)
    bit = [1 << index for index in range(count)]

    events = sorted(
        [(c.op.invoke, 0, index) for index, c in enumerate(candidates)]
        + [(c.ret, 1, index) for index, c in enumerate(candidates)]
    )
    size = len(events)
    head = size
    is_return = [kind == 1 for _, kind, _ in events]
    owner = [index for _, _, index in events]
    call_at = [0] * count
    return_at = [0] * count
    for position, (_, kind, index) in enumerate(events):
        if kind:
            return_at[index] = position
        else:
            call_at[index] = position
    following = [position + 1 for position in range(size)] + [0 if size else -1]
    if size:
        following[size - 1] = -1
    preceding = [position - 1 for position in range(size)] + [-1]
    if size:
        preceding[0] = head

    def lift(index: int) -> None:
        for position in (call_at[index], return_at[index]):
            before, after = preceding[position], following[position]
            following[before] = after
            if after != -1:
                preceding[after] = before

    def unlift(index: int) -> None:
        for position in (return_at[index], call_at[index]):
            before, after = preceding[position], following[position]
            following[before] = position
            if after != -1:
                preceding[after] = position

    explored: set[tuple[int, Value]] = set()
    steps = 0
    for start in initial:
        state: Value = start
        done = 0
        # Each entry: (operation, register before it, whether it was left out rather than applied).
        stack: list[tuple[int, Value, bool]] = []
        position = following[head]
        while True:
            steps += 1
            if max_steps is not None and steps > max_steps:
                return None, steps
            if position == -1:
                return True, steps
            index = owner[position]
            if not is_return[position]:
                code = codes[index]
                if code == _PUT:
                    allowed, after = True, values[index]
                elif code == _GET:
                    allowed, after = state == first[index], state
                elif code == _DELETE:
                    allowed = not constrained[index] or (state is not None) == first[index]
                    after = None
                else:
                    swapped = state == expecteds[index]
                    after = values[index] if swapped else state
                    allowed = not constrained[index] or (
                        swapped == first[index]
                        and (second[index] is _NOT_REPORTED or state == second[index])
                    )
                if allowed:
                    marker = (done | bit[index], after)
                    if marker not in explored:
                        explored.add(marker)
                        stack.append((index, state, False))
                        done |= bit[index]
                        state = after
                        lift(index)
                        position = following[head]
                        continue
                position = following[position]
                continue
            if not required[index]:
                if deadline[index] == _INF:
                    # Only open-ended completions remain: every required operation is placed.
                    return True, steps
                # An optional operation due now: it took effect before the window, so leave it out.
                marker = (done | bit[index], state)
                if marker not in explored:
                    explored.add(marker)
                    stack.append((index, state, True))
                    done |= bit[index]
                    lift(index)
                    position = following[head]
                    continue
            if not stack:
                break
            index, state, left_out = stack.pop()
            done &= ~bit[index]
            unlift(index)
            position = return_at[index] if left_out else following[call_at[index]]
    return False, steps


def _probe(
    operations: Sequence[Operation], start: float, end: float, max_steps: int | None
) -> _Probe:
    """Check the window ``[start, end]`` of one key's operations (see the module docstring)."""
    candidates: list[_Candidate] = []
    possible: set[Value] = {None}
    for op in operations:
        if op.outcome == "fail":
            continue
        if op.invoke < start and op.kind in ("put", "cas") and not _is_read_only(op):
            possible.add(op.value)
        if op.invoke > end or op.completes < start:
            continue
        inside = op.outcome == "ok" and op.invoke >= start and op.completes <= end
        ret = op.completes if op.completes <= end else _INF
        candidates.append(_Candidate(op, inside, ret))
    kept = _prune(candidates)
    mentioned = _mentioned(kept)
    initial: list[Value] = [None]
    initial.extend(value for value in possible if value is not None and value in mentioned)
    if any(value is not None and value not in mentioned for value in possible):
        initial.append(_OTHER)
    verdict, steps = _search(kept, initial, max_steps)
    shown = tuple(
        sorted((value for value in possible if value is not None), key=repr)
        if start != -_INF
        else ()
    )
    return _Probe(verdict, steps, kept, (None, *shown))


def _by_key(operations: Iterable[Operation]) -> dict[Hashable, list[Operation]]:
    keyed: dict[Hashable, list[Operation]] = {}
    seen: set[int] = set()
    for op in operations:
        _validate(op)
        if op.id in seen:
            raise HistoryError(f"operation id {op.id!r} appears twice")
        seen.add(op.id)
        keyed.setdefault(op.key, []).append(op)
    for ops in keyed.values():
        ops.sort(key=lambda op: (op.invoke, op.id))
    return keyed


def _operations_of(history: History | Iterable[Operation]) -> list[Operation]:
    return history.operations if isinstance(history, History) else list(history)


def check(history: History | Iterable[Operation], max_steps: int | None = None) -> CheckResult:
    """Decide whether ``history`` is linearizable; for a violation, include its smallest failing window.

    ``max_steps`` bounds every single search (one key, or one window while shrinking); a key whose
    search runs out makes the result inconclusive unless another key is found to fail.
    """
    operations = _operations_of(history)
    keyed = _by_key(operations)
    steps = 0
    out_of_steps: Hashable = None
    gave_up = False
    for key, ops in keyed.items():
        probe = _probe(ops, -_INF, _INF, max_steps)
        steps += probe.steps
        if probe.verdict is None and not gave_up:
            gave_up, out_of_steps = True, key
        if probe.verdict is False:
            return _shrink(key, ops, max_steps, steps, len(operations), len(keyed))
    if gave_up:
        return CheckResult(
            ok=False,
            inconclusive=True,
            key=out_of_steps,
            operations=len(operations),
            keys=len(keyed),
            steps=steps,
        )
    return CheckResult(ok=True, operations=len(operations), keys=len(keyed), steps=steps)


def check_window(
    history: History | Iterable[Operation],
    key: Hashable,
    start: float,
    end: float,
    max_steps: int | None = None,
) -> CheckResult:
    """Check the window ``[start, end]`` of one key alone, with the rules in the module docstring."""
    operations = _operations_of(history)
    ops = _by_key(operations).get(key, [])
    probe = _probe(ops, start, end, max_steps)
    result = _window_result(key, ops, start, end, probe)
    return replace(
        result,
        ok=probe.verdict is True,
        inconclusive=probe.verdict is None,
        operations=len(operations),
        keys=1,
    )


def _window_result(
    key: Hashable, ops: list[Operation], start: float, end: float, probe: _Probe
) -> CheckResult:
    window = sorted((c.op for c in probe.kept), key=lambda op: (op.invoke, op.id))
    edges = frozenset(c.op.id for c in probe.kept if not c.required)
    return CheckResult(
        ok=False,
        key=key,
        window=window,
        window_start=start,
        window_end=end,
        explanation=_explain(ops, [c for c in probe.kept if c.required], end),
        edge_ids=edges,
        initial_values=probe.initial_values,
        key_operations=len(ops),
        steps=probe.steps,
    )


def _shrink(
    key: Hashable,
    ops: list[Operation],
    max_steps: int | None,
    steps: int,
    operation_count: int,
    key_count: int,
) -> CheckResult:
    """Find the earliest failing end, then the latest failing start (see the module docstring)."""

    probes: dict[tuple[float, float], _Probe] = {}

    def fails(start: float, end: float) -> _Probe | None:
        nonlocal steps
        if (start, end) not in probes:
            probes[start, end] = _probe(ops, start, end, max_steps)
            steps += probes[start, end].steps
        probe = probes[start, end]
        return probe if probe.verdict is False else None

    ends = sorted({op.completes for op in ops if op.outcome == "ok"})
    low, high = 0, len(ends) - 1
    while low < high:
        middle = (low + high) // 2
        if fails(-_INF, ends[middle]):
            high = middle
        else:
            low = middle + 1
    end = ends[high] if ends else _INF
    best = fails(-_INF, end)
    if best is None:
        # Cannot happen for a sound search; fall back to the whole key.
        end = _INF
        best = _probe(ops, -_INF, _INF, max_steps)
        steps += best.steps
    start = -_INF

    starts = sorted({op.invoke for op in ops if op.outcome != "fail" and op.invoke <= end})
    # Gallop back from the end (small windows are cheap to check), then bisect.
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
    result = _window_result(key, ops, start, end, best)
    return replace(result, operations=operation_count, keys=key_count, steps=steps)


def _explain(ops: list[Operation], required: list[_Candidate], end: float) -> str:
    """One line saying why the window fails, from the operation whose completion closes it."""
    closing = [c.op for c in required if c.op.completes == end]
    culprit = next((op for op in closing if op.kind != "put"), closing[0] if closing else None)
    if culprit is None:
        return "no order of these operations explains every result"
    generic = (
        f"no order of the window's operations, each taking effect at one instant between its "
        f"invocation and completion, explains {culprit.describe()} ending {culprit.result_text()}"
    )
    if culprit.kind == "get":
        seen: Value = culprit.result
        phrase = f"{culprit.describe()} returned {_show(seen)}"
    elif culprit.kind == "cas" and _cas_result(culprit.result)[1] is not _NOT_REPORTED:
        seen = _cas_result(culprit.result)[1]
        phrase = f"{culprit.describe()} found {_show(seen)}"
    else:
        return generic
    others = [op for op in ops if op is not culprit]
    if seen is None:
        return _explain_missing(others, culprit, phrase) or generic
    writers = [op for op in others if op.kind in ("put", "cas") and op.value == seen]
    live = [op for op in writers if op.outcome != "fail"]
    if not writers:
        return f"{phrase}, but no operation on this key ever wrote {_show(seen)}"
    if not live:
        failed = ", ".join(f"op {op.id}" for op in writers)
        return f"{phrase}, but every write of {_show(seen)} failed ({failed}), so none took effect"
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
