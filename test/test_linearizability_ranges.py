"""Range reads checked per key (linearizability_ranges.py): a range that misses a write completed
before it, or shows one undone before it, is caught; one that runs alongside a write may show it
or not."""

from __future__ import annotations

from test.linearizability import History, check
from test.linearizability_ranges import RangeKey, expand_ranges

EVERY = RangeKey("", None)


def clock() -> History:
    ticks = iter(range(1, 10_000))
    return History(clock=lambda: float(next(ticks)))


def test_a_range_that_shows_every_completed_write_is_linearizable() -> None:
    history = clock()
    put = history.invoke(1, "put", "a", "1")
    history.ok(put)
    read = history.invoke(2, "get", EVERY)
    history.ok(read, (("a", "1"),))
    assert check(expand_ranges(history.operations)).ok


def test_a_range_missing_a_write_completed_before_it_is_caught() -> None:
    history = clock()
    put = history.invoke(1, "put", "b", "1")
    history.ok(put)
    other = history.invoke(1, "put", "a", "1")
    history.ok(other)
    read = history.invoke(2, "get", RangeKey("a", "c"))
    history.ok(read, (("a", "1"),))  # b is missing from it
    result = check(expand_ranges(history.operations))
    assert not result.ok and not result.inconclusive and result.key == "b"


def test_a_range_showing_a_key_deleted_before_it_is_caught() -> None:
    history = clock()
    put = history.invoke(1, "put", "a", "1")
    history.ok(put)
    delete = history.invoke(1, "delete", "a")
    history.ok(delete, True)
    read = history.invoke(2, "get", EVERY)
    history.ok(read, (("a", "1"),))
    assert not check(expand_ranges(history.operations)).ok


def test_a_range_alongside_a_write_may_show_it_or_not_and_keys_outside_it_do_not_count() -> None:
    for shown in ((("a", "1"),), ()):
        history = clock()
        put = history.invoke(1, "put", "a", "1")
        read = history.invoke(2, "get", RangeKey("a", "b"))
        history.ok(put)
        history.ok(read, shown)
        outside = history.invoke(1, "put", "z", "9")
        history.ok(outside)
        failed = history.invoke(3, "get", EVERY)
        history.fail(failed)
        assert check(expand_ranges(history.operations)).ok, shown
