"""Tests of test/linearizability.py: verdicts on hand-built and generated histories, failing windows,
the step budget, the history recorder and the report a person reads."""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from functools import cache

import pytest

from test import linearizability
from test.linearizability import (
    CheckResult,
    History,
    HistoryError,
    Kind,
    Operation,
    Outcome,
    Value,
    check,
    check_window,
)

_ids = itertools.count()
KINDS: tuple[Kind, ...] = ("put", "get", "delete", "cas")
OUTCOMES: tuple[Outcome, ...] = ("ok", "ok", "ok", "unknown", "fail")


def op(
    client: int,
    kind: Kind,
    invoke: float,
    complete: float | None,
    *,
    key: str = "x",
    value: Value = None,
    expected: Value = None,
    result: Hashable = None,
    outcome: Outcome = "ok",
) -> Operation:
    return Operation(
        id=next(_ids),
        client=client,
        kind=kind,
        key=key,
        invoke=invoke,
        complete=None if outcome == "unknown" else complete,
        outcome=outcome,
        value=value,
        expected=expected,
        result=result,
    )


def put(
    client: int,
    value: str,
    invoke: float,
    complete: float | None,
    *,
    key: str = "x",
    outcome: Outcome = "ok",
) -> Operation:
    return op(client, "put", invoke, complete, key=key, value=value, outcome=outcome)


def get(client: int, result: Value, invoke: float, complete: float, *, key: str = "x") -> Operation:
    return op(client, "get", invoke, complete, key=key, result=result)


def assert_violation(result: CheckResult, key: Hashable = "x") -> None:
    assert not result.ok and not result.inconclusive, result.report()
    assert result.key == key
    # The reported window is itself a failing history.
    assert not check(result.window).ok, result.report()


# --- hand-built histories -------------------------------------------------------------------------


def test_sequential_history_is_linearizable() -> None:
    history = [
        get(1, None, 0, 1),
        put(1, "a", 2, 3),
        get(2, "a", 4, 5),
        put(2, "b", 6, 7),
        get(1, "b", 8, 9),
    ]
    result = check(history)
    assert result.ok and not result.inconclusive, result.report()
    assert "linearizable" in result.report()


@pytest.mark.parametrize("read", ["a", "b"])
def test_get_overlapping_a_put_may_return_the_old_or_the_new_value(read: str) -> None:
    history = [put(1, "a", 0, 1), put(1, "b", 2, 6), get(2, read, 3, 5)]
    assert check(history).ok


def test_operations_meeting_at_the_same_instant_count_as_concurrent() -> None:
    # "b" was invoked at the very time "a" completed, so either may have taken effect last.
    assert check([put(1, "a", 0, 1), put(2, "b", 1, 2), get(3, "a", 3, 4)]).ok
    assert_violation(check([put(1, "a", 0, 1), put(2, "b", 1.5, 2), get(3, "a", 3, 4)]))


def test_concurrent_puts_may_take_effect_in_either_order() -> None:
    for last in ("a", "b"):
        history = [put(1, "a", 0, 4), put(2, "b", 1, 5), get(3, last, 6, 7)]
        assert check(history).ok, last
    # But every reader then agrees on one order.
    history = [put(1, "a", 0, 4), put(2, "b", 1, 5), get(3, "a", 6, 7), get(3, "b", 8, 9)]
    assert_violation(check(history))


def test_stale_read_is_reported_with_the_newer_put_and_the_get() -> None:
    older, newer, stale = put(1, "a", 0, 1), put(1, "b", 2, 3), get(2, "a", 4, 5)
    result = check([older, newer, stale])
    assert_violation(result)
    assert newer in result.window and stale in result.window
    assert older not in result.window
    assert "'a'" in result.explanation and "put 'b'" in result.explanation


def test_read_of_a_value_never_written_is_a_violation() -> None:
    result = check([put(1, "a", 0, 1), get(2, "ghost", 2, 3)])
    assert_violation(result)
    assert "no operation on this key ever wrote 'ghost'" in result.explanation


def test_read_of_a_value_written_only_after_the_read_completed_is_a_violation() -> None:
    assert_violation(check([get(2, "a", 0, 1), put(1, "a", 2, 3)]))


def test_unknown_put_whose_value_is_read_later_took_effect() -> None:
    history = [
        put(1, "a", 0, None, outcome="unknown"),
        put(2, "b", 5, 6),
        get(3, "b", 7, 8),
        # The lost put may take effect long after it was sent.
        get(3, "a", 100, 101),
    ]
    assert check(history).ok


def test_unknown_put_never_read_may_never_have_taken_effect() -> None:
    history = [
        put(1, "a", 0, 1),
        put(2, "b", 2, None, outcome="unknown"),
        get(3, "a", 5, 6),
        get(3, "a", 7, 8),
    ]
    assert check(history).ok


def test_unknown_put_cannot_take_effect_before_it_was_invoked() -> None:
    history = [get(3, "a", 0, 1), put(1, "a", 2, None, outcome="unknown")]
    assert_violation(check(history))


def test_failed_put_whose_value_is_read_is_a_violation() -> None:
    failed = put(1, "a", 0, 1, outcome="fail")
    read = get(2, "a", 2, 3)
    result = check([failed, read])
    assert_violation(result)
    assert read in result.window
    assert "failed" in result.explanation


def test_failed_put_is_ignored_when_nothing_reads_it() -> None:
    history = [put(1, "a", 0, 1), put(1, "b", 2, 3, outcome="fail"), get(2, "a", 4, 5)]
    assert check(history).ok


def cas(
    client: int, expected: Value, new: str, invoke: float, complete: float, result: Hashable
) -> Operation:
    return op(client, "cas", invoke, complete, value=new, expected=expected, result=result)


def delete(client: int, existed: bool | None, invoke: float, complete: float) -> Operation:
    return op(client, "delete", invoke, complete, result=existed)


def test_cas_swaps_only_when_the_value_matches() -> None:
    good = [
        put(1, "a", 0, 1),
        cas(2, "a", "b", 2, 3, (True, "a")),
        cas(3, "a", "c", 4, 5, (False, "b")),
        get(1, "b", 6, 7),
    ]
    assert check(good).ok
    claimed_swap = [put(1, "a", 0, 1), cas(2, "z", "b", 2, 3, (True, "z"))]
    assert_violation(check(claimed_swap))
    missed_swap = [put(1, "a", 0, 1), cas(2, "a", "b", 2, 3, (False, "a"))]
    assert_violation(check(missed_swap))
    wrong_current = [put(1, "a", 0, 1), cas(2, "q", "b", 2, 3, (False, "zz"))]
    assert_violation(check(wrong_current))


def test_cas_with_expected_missing_creates_the_key_once() -> None:
    history = [
        cas(1, None, "a", 0, 1, (True, None)),
        cas(2, None, "b", 2, 3, (False, "a")),
        get(3, "a", 4, 5),
    ]
    assert check(history).ok
    both_created = [cas(1, None, "a", 0, 1, True), cas(2, None, "b", 2, 3, True)]
    assert_violation(check(both_created))


def test_unknown_cas_may_have_taken_effect() -> None:
    history = [
        put(1, "a", 0, 1),
        op(2, "cas", 2, None, value="b", expected="a", outcome="unknown"),
        get(3, "b", 5, 6),
    ]
    assert check(history).ok
    # It can only have swapped from the value it expected.
    history = [
        put(1, "a", 0, 1),
        op(2, "cas", 2, None, value="b", expected="z", outcome="unknown"),
        get(3, "b", 5, 6),
    ]
    assert_violation(check(history))


def test_delete_removes_the_key_and_reports_whether_it_existed() -> None:
    history = [
        put(1, "a", 0, 1),
        delete(2, True, 2, 3),
        get(3, None, 4, 5),
        delete(1, False, 6, 7),
    ]
    assert check(history).ok
    assert_violation(check([put(1, "a", 0, 1), delete(2, True, 2, 3), get(3, "a", 4, 5)]))
    assert_violation(check([put(1, "a", 0, 1), delete(2, False, 2, 3)]))
    assert_violation(check([delete(2, True, 0, 1)]))


def test_get_of_a_missing_key_after_a_completed_put_is_a_violation() -> None:
    result = check([put(1, "a", 0, 1), get(2, None, 2, 3)])
    assert_violation(result)
    assert "missing" in result.explanation


@pytest.fixture(params=[(True, False), (True,), (False,)], ids=str)
def strategies(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a test with each search order (eager, lazy) alone too: each must be right on its own."""
    monkeypatch.setattr(linearizability, "_STRATEGIES", request.param)


@pytest.mark.usefixtures("strategies")
def test_operations_crossing_the_start_of_a_window_may_take_effect_inside_it() -> None:
    history = [
        cas(1, "b", "c", 0, 3, (True, "b")),
        put(2, "b", 1, 4),
        delete(3, True, 2, 3),
        cas(3, "a", "c", 5, 7, (False, "c")),
    ]
    # In [2, 7] the delete empties the key, then the put and the cas invoked before 2 take effect,
    # leaving 'c' for the last cas to find.
    assert check_window(history, "x", 2, 7).ok
    # Without the put, nothing can write 'c' after the delete.
    assert not check_window([history[0], *history[2:]], "x", 2, 7).ok


def test_unknown_operation_invoked_long_before_a_window_may_take_effect_inside_it() -> None:
    lost = put(2, "u", 2, None, outcome="unknown")
    history = [put(1, "a", 0, 1), lost, put(1, "c", 26, 27), get(3, "u", 30, 31)]
    assert check(history).ok
    assert check_window(history, "x", 25, 31).ok
    definite = [replace(lost, outcome="ok", complete=3) if o is lost else o for o in history]
    assert not check_window(definite, "x", 25, 31).ok


def test_keys_are_checked_independently() -> None:
    history = [
        put(1, "a", 0, 10, key="k1"),
        put(2, "b", 1, 2, key="k2"),
        get(3, "a", 3, 4, key="k1"),
        get(3, "b", 5, 6, key="k2"),
        # A value written to another key is not a value of this one.
        get(4, "a", 7, 8, key="k2"),
    ]
    result = check(history)
    assert_violation(result, key="k2")
    assert {o.key for o in result.window} == {"k2"}
    assert check(history[:4]).ok


# --- generated histories --------------------------------------------------------------------------


def run_register(
    rng: random.Random,
    count: int,
    clients: int = 10,
    keys: int = 5,
    unknown: float = 0.03,
    fail: float = 0.02,
    values: Sequence[str] = (),
    length: float = 1.0,
) -> list[Operation]:
    """Execute random operations on a real sequential store, each at a random instant inside a random
    interval (up to twice ``length`` long) of its client's timeline. Writes take values from ``values``, or unique ones; with
    ``values`` the intervals are widened to whole numbers, so that many times coincide."""
    timelines = [rng.uniform(0, 1) for _ in range(clients)]
    plans = []
    for number in range(count):
        client = number % clients
        invoke = timelines[client] + rng.uniform(0, 0.3)
        instant = invoke + rng.uniform(0, length)
        complete = instant + rng.uniform(0, length)
        if values:
            invoke, complete = math.floor(invoke), math.ceil(complete)
        timelines[client] = complete
        plans.append((instant, number, client, invoke, complete))
    plans.sort()
    store: dict[str, str] = {}
    history = []
    for _, number, client, invoke, complete in plans:
        key = f"k{rng.randrange(keys)}"
        current = store.get(key)
        kind = rng.choice(KINDS[:2] * 2 + KINDS[2:])
        value = f"v{number}" if kind in ("put", "cas") else None
        expected = (
            (current if rng.random() < 0.5 else f"v{rng.randrange(count)}")
            if kind == "cas"
            else None
        )
        draw = rng.random()
        outcome: Outcome = (
            "unknown" if draw < unknown else "fail" if draw < unknown + fail else "ok"
        )
        result: Hashable = None
        if outcome == "ok" or (outcome == "unknown" and rng.random() < 0.5):
            if kind == "put":
                store[key] = str(value)
            elif kind == "get":
                result = current
            elif kind == "delete":
                result = store.pop(key, None) is not None
            else:
                result = (current == expected, current)
                if current == expected:
                    store[key] = str(value)
        history.append(
            Operation(
                id=number,
                client=client,
                kind=kind,
                key=key,
                invoke=invoke,
                complete=None if outcome == "unknown" else complete,
                outcome=outcome,
                value=value,
                expected=expected,
                result=result if outcome == "ok" else None,
            )
        )
    return sorted(history, key=lambda o: o.id)


def impossible_reads(history: Sequence[Operation]) -> list[tuple[Operation, str]]:
    """Gets, each with a value it cannot have read in any order (write values must be unique):
    written only after the get completed, or only by a write that completed before an overwrite
    that completed before the get began."""
    found = []
    for read in history:
        if read.kind != "get" or read.outcome != "ok":
            continue
        same_key = [o for o in history if o.key == read.key and o is not read]
        # When the last overwrite known to precede the get began.
        overwritten = max(
            (
                o.invoke
                for o in same_key
                if o.outcome == "ok"
                and o.completes < read.invoke
                and (o.kind in ("put", "delete") or o.result == (True, o.expected))
            ),
            default=-math.inf,
        )
        for writer in same_key:
            if writer.kind not in ("put", "cas") or writer.value == read.result:
                continue
            future = writer.outcome != "fail" and writer.invoke > read.completes
            stale = writer.outcome == "ok" and writer.completes < overwritten
            if future or stale:
                found.append((read, str(writer.value)))
    return found


def test_histories_of_a_real_register_are_linearizable() -> None:
    rng = random.Random(20240611)
    for _ in range(200):
        history = run_register(rng, rng.randint(5, 60), clients=rng.randint(1, 6), keys=2)
        result = check(history)
        assert result.ok, result.report()


def test_one_impossible_read_makes_a_real_register_history_fail_with_it_in_the_window() -> None:
    rng = random.Random(99)
    checked = 0
    while checked < 200:
        history = run_register(rng, rng.randint(10, 60), clients=rng.randint(2, 6), keys=2)
        choices = impossible_reads(history)
        if not choices:
            continue
        read, value = rng.choice(choices)
        mutated = replace(read, result=value)
        broken = [mutated if o is read else o for o in history]
        result = check(broken)
        assert_violation(result, key=read.key)
        # Every other result is from a real run, so the failure has to involve the mutated read.
        assert mutated in result.window, result.report()
        checked += 1


def test_violation_buried_in_500_operations_is_shown_in_a_small_failing_window() -> None:
    rng = random.Random(7)
    history = run_register(rng, 500, clients=8, keys=5, unknown=0.02, fail=0.01)
    assert check(history).ok
    choices = [c for c in impossible_reads(history) if 200 < c[0].id < 400]
    read, value = choices[0]
    mutated = replace(read, result=value)
    broken = [mutated if o is read else o for o in history]

    result = check(broken)

    assert_violation(result, key=read.key)
    assert mutated in result.window
    assert len(result.window) <= 6, result.report()
    # Minimal: moving either edge of the window past one more operation makes it pass.
    assert not check_window(broken, read.key, result.window_start, result.window_end).ok
    key_ops = [o for o in broken if o.key == read.key and o.outcome != "fail"]
    next_start = min(o.invoke for o in key_ops if o.invoke > result.window_start)
    assert check_window(broken, read.key, next_start, result.window_end).ok
    previous_end = max(
        o.completes for o in key_ops if o.outcome == "ok" and o.completes < result.window_end
    )
    assert check_window(broken, read.key, result.window_start, previous_end).ok


def brute_force(history: Sequence[Operation]) -> bool:
    """The definition, checked by trying every order of every subset of the unknown operations."""
    definite = [o for o in history if o.outcome == "ok"]
    unknown = [o for o in history if o.outcome == "unknown"]

    def feasible(order: tuple[int, ...]) -> bool:
        state: Value = None
        ops = [history[index] for index in order]
        for position, o in enumerate(ops):
            if any(later.completes < o.invoke for later in ops[position + 1 :]):
                return False
            seen: Hashable
            if o.kind == "put":
                state, seen = o.value, None
            elif o.kind == "get":
                seen = state
            elif o.kind == "delete":
                state, seen = None, state is not None
            else:
                swapped = state == o.expected
                seen = (swapped, state) if isinstance(o.result, tuple) else swapped
                state = o.value if swapped else state
            if o.outcome == "ok" and o.kind != "put" and seen != o.result:
                return False
        return True

    positions = {id(o): index for index, o in enumerate(history)}
    for size in range(len(unknown) + 1):
        for chosen in itertools.combinations(unknown, size):
            for order in itertools.permutations([*definite, *chosen]):
                if feasible(tuple(positions[id(o)] for o in order)):
                    return True
    return False


def test_verdicts_agree_with_brute_force_on_small_random_histories() -> None:
    rng = random.Random(5)
    verdicts = []
    for _ in range(300):
        history = []
        for number in range(rng.randint(1, 6)):
            invoke = rng.randint(0, 8)
            kind = rng.choice(KINDS)
            outcome = rng.choice(OUTCOMES)
            value = rng.choice("ab") if kind in ("put", "cas") else None
            expected = rng.choice(["a", "b", None]) if kind == "cas" else None
            result: Hashable = None
            if outcome == "ok" and kind == "get":
                result = rng.choice(["a", "b", None])
            elif outcome == "ok" and kind == "delete":
                result = rng.random() < 0.5
            elif outcome == "ok" and kind == "cas":
                swapped = rng.random() < 0.5
                result = (swapped, expected if swapped else rng.choice(["a", "b", None]))
            history.append(
                Operation(
                    id=number,
                    client=number,
                    kind=kind,
                    key="x",
                    invoke=invoke,
                    complete=None if outcome == "unknown" else invoke + rng.randint(0, 4),
                    outcome=outcome,
                    value=value,
                    expected=expected,
                    result=result,
                )
            )
        expected_verdict = brute_force(history)
        assert check(history).ok == expected_verdict, history
        verdicts.append(expected_verdict)
    # Both verdicts were exercised.
    assert verdicts.count(True) > 50 and verdicts.count(False) > 50


def apply(state: Value, o: Operation) -> tuple[bool, Value]:
    """Whether ``o``'s result is what the register would answer from ``state``, and the new state."""
    seen: Hashable
    if o.kind == "put":
        return True, o.value
    if o.kind == "get":
        after, seen = state, state
    elif o.kind == "delete":
        after, seen = None, state is not None
    else:
        swapped = state == o.expected
        after = o.value if swapped else state
        seen = (swapped, state) if isinstance(o.result, tuple) else swapped
    return o.outcome != "ok" or seen == o.result, after


def swapped(result: object) -> bool:
    return bool(result[0]) if isinstance(result, tuple) else bool(result)


def window_by_definition(history: Sequence[Operation], start: float, end: float) -> bool:
    """The window rules of the module docstring, searched naively: repeatedly place any operation
    whose predecessors are all placed or left out, or leave out any optional one."""
    starting = {None} | {
        o.value
        for o in history
        if o.invoke < start and o.kind in ("put", "cas") and o.outcome != "fail"
        # A cas that reported not swapping wrote nothing.
        and not (o.kind == "cas" and o.outcome == "ok" and not swapped(o.result))
    }
    members = [
        o for o in history if o.outcome != "fail" and o.invoke <= end and o.completes >= start
    ]
    required = [o.outcome == "ok" and o.invoke >= start and o.completes <= end for o in members]
    deadline = [o.completes if o.completes <= end else math.inf for o in members]

    @cache
    def search(done: int, state: Value) -> bool:
        waiting = [index for index in range(len(members)) if not done >> index & 1]
        if not any(required[index] for index in waiting):
            return True
        for index in waiting:
            if not required[index] and search(done | 1 << index, state):
                return True
            if any(deadline[other] < members[index].invoke for other in waiting):
                continue
            allowed, after = apply(state, members[index])
            if allowed and search(done | 1 << index, after):
                return True
        return False

    return any(search(0, value) for value in starting)


@pytest.mark.usefixtures("strategies")
def test_verdicts_and_windows_agree_with_the_definition_on_small_runs() -> None:
    rng = random.Random(11)
    verdicts = []
    for _ in range(300):
        history = run_register(rng, rng.randint(1, 10), clients=3, keys=1, unknown=0.2, values="ab")
        if rng.random() < 0.5:
            target = rng.choice(history)
            if target.outcome == "ok" and target.kind == "get":
                history[history.index(target)] = replace(target, result=rng.choice("ab"))
            elif target.outcome == "ok" and target.kind == "delete":
                history[history.index(target)] = replace(target, result=not target.result)
        verdict = window_by_definition(history, -math.inf, math.inf)
        result = check(history)
        assert result.ok == verdict, history
        if not result.ok:
            assert not window_by_definition(history, result.window_start, result.window_end)
        start, end = sorted(rng.uniform(-1, 12) for _ in range(2))
        assert check_window(history, "k0", start, end).ok == window_by_definition(
            history, start, end
        ), (history, start, end)
        verdicts.append(verdict)
    assert verdicts.count(True) > 50 and verdicts.count(False) > 50


def test_step_budget_gives_an_inconclusive_result_instead_of_a_verdict() -> None:
    rng = random.Random(3)
    history = run_register(rng, 1000, clients=4, keys=1, unknown=0.0, fail=0.0)
    # Placing 1000 operations takes at least 1000 steps.
    result = check(history, max_steps=800)
    assert result.inconclusive and not result.ok
    assert "inconclusive" in result.report() and "max_steps" in result.report()
    assert check(history).ok


def test_small_failing_window_is_found_even_when_the_whole_search_runs_out_of_steps() -> None:
    rng = random.Random(3)
    history = run_register(rng, 1000, clients=4, keys=1, unknown=0.0, fail=0.0)
    read, value = next(c for c in impossible_reads(history) if 400 < c[0].id < 600)
    mutated = replace(read, result=value)
    broken = [mutated if o is read else o for o in history]
    result = check(broken, max_steps=800)
    assert_violation(result, key="k0")
    assert mutated in result.window


def test_checking_a_2000_operation_history() -> None:
    rng = random.Random(2000)
    history = run_register(rng, 2000, clients=10, keys=8)
    started = time.perf_counter()
    result = check(history)
    elapsed = time.perf_counter() - started
    print(f"\n2000 operations on 8 keys, 10 clients: {elapsed * 1000:.0f} ms, {result.steps} steps")
    assert result.ok, result.report()


# --- the recorder and the report ------------------------------------------------------------------


def test_history_records_operations_as_clients_run_them() -> None:
    history = History()
    first = history.invoke(1, "put", "x", "a")
    history.ok(first)
    second = history.invoke(2, "put", "x", "b")
    lost = history.invoke(3, "put", "x", "c")
    history.unknown(lost)
    rejected = history.invoke(4, "put", "x", "d")
    history.fail(rejected)
    history.ok(second)
    pending = history.invoke(5, "cas", "x", "e", expected="b")
    read = history.invoke(1, "get", "x")
    history.ok(read, "e")

    outcomes = {o.id: o.outcome for o in history.operations}
    assert outcomes == {
        first: "ok",
        second: "ok",
        lost: "unknown",
        rejected: "fail",
        pending: "unknown",
        read: "ok",
    }
    assert history.pending == [pending]
    # The cas still in flight may have swapped 'b' for 'e'.
    assert check(history).ok


def test_history_orders_events_as_recorded_even_when_the_clock_stands_still() -> None:
    history = History(clock=lambda: 42.0)
    write = history.invoke(1, "put", "x", "a")
    history.ok(write)
    overwrite = history.invoke(1, "put", "x", "b")
    history.ok(overwrite)
    read = history.invoke(2, "get", "x")
    history.ok(read, "a")
    result = check(history)
    assert_violation(result)


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (lambda h: h.ok(99), "never invoked"),
        (lambda h: (h.ok(h.invoke(1, "get", "x"), "a"), h.ok(0)), "already been completed"),
        (lambda h: h.invoke(1, "put", "x", None), "must write a value"),
        (lambda h: h.invoke(1, "scan", "x"), "kind must be one of"),
        (lambda h: h.ok(h.invoke(1, "delete", "x"), "yes"), "must be a bool"),
        (lambda h: h.ok(h.invoke(1, "cas", "x", "a"), "swapped"), "(swapped, current)"),
        (lambda h: h.ok(h.invoke(1, "get", "x", at=5.0), at=4.0), "before it was invoked"),
    ],
    ids=["unknown id", "twice", "put None", "bad kind", "delete result", "cas result", "time"],
)
def test_history_rejects_malformed_operations_with_a_one_line_message(
    action: Callable[[History], object], message: str
) -> None:
    history = History()
    with pytest.raises(HistoryError) as raised:
        action(history)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_check_rejects_duplicate_operation_ids() -> None:
    twice = put(1, "a", 0, 1)
    with pytest.raises(HistoryError, match="appears twice"):
        check([twice, twice])


def test_report_shows_the_window_as_a_table() -> None:
    history = [
        put(1, "a", 0, 1),
        put(2, "b", 2, 3),
        put(4, "c", 2.5, None, outcome="unknown", key="y"),
        get(3, "a", 4, 5),
    ]
    report = check(history).report()
    lines = report.splitlines()
    assert lines[0].startswith("not linearizable on key 'x': get by client 3")
    assert "returned 'a'" in lines[0] and "put 'b' by client 2" in lines[0]
    header = next(line for line in lines if line.split()[:2] == ["op", "client"])
    for column in ("kind", "key", "arguments", "result", "invoked", "completed"):
        assert column in header
    rows = lines[lines.index(header) + 1 :]
    assert [row.split() for row in rows] == [
        [str(history[1].id), "2", "put", "'x'", "'b'", "ok", "2", "3"],
        [str(history[3].id), "3", "get", "'x'", "'a'", "4", "5"],
    ]
