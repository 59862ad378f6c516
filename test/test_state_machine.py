"""The key-value state machine: seed mappings, commands (batches, delete, compare-and-swap), and the
client sessions that make writes exactly-once, expire by log time and stay bounded."""

from __future__ import annotations

from typing import Any

import pytest

import state_machine
from rpc import raft_pb2
from state_machine import (
    CasResult,
    DeleteResult,
    KeyValueStateMachine,
    PutResult,
    SessionExpired,
)
from watch_window import Change, ChangeWindow, CompactedError

HOUR_MS = 60 * 60 * 1000


class Log:
    """Feeds a state machine consecutive entries, with a log time the test controls."""

    def __init__(self) -> None:
        self.sm = KeyValueStateMachine()
        self.time_ms = 1_700_000_000_000

    def entry(self, **fields: Any) -> state_machine.ApplyResult:
        entry = raft_pb2.LogEntry(
            term=1, index=self.sm.last_applied + 1, leader_time_ms=self.time_ms, **fields
        )
        return self.sm.apply(entry)

    def command(self, command: raft_pb2.Command) -> state_machine.ApplyResult:
        return self.entry(kind=raft_pb2.ENTRY_KIND_COMMAND, command=command)

    def register(self) -> int:
        result = self.command(raft_pb2.Command(register_client=raft_pb2.RegisterClientRequest()))
        assert isinstance(result, int)
        return result

    def put(
        self, mappings: dict[str, str], session: raft_pb2.Session | None = None
    ) -> state_machine.ApplyResult:
        batch = raft_pb2.MappingBatch(
            mappings=[raft_pb2.Mapping(key=k, value=v) for k, v in mappings.items()],
            session=session,
        )
        return self.command(raft_pb2.Command(put=batch))

    def delete(
        self, key: str, session: raft_pb2.Session | None = None
    ) -> state_machine.ApplyResult:
        return self.command(
            raft_pb2.Command(delete=raft_pb2.DeleteRequest(key=key, session=session))
        )

    def cas(
        self, key: str, expected: str | None, new: str, session: raft_pb2.Session | None = None
    ) -> state_machine.ApplyResult:
        request = raft_pb2.CompareAndSwapRequest(key=key, new_value=new, session=session)
        if expected is not None:
            request.expected_value = expected
        return self.command(raft_pb2.Command(compare_and_swap=request))


def session(
    client_id: int, sequence: int, first_outstanding: int | None = None
) -> raft_pb2.Session:
    return raft_pb2.Session(
        client_id=client_id,
        sequence=sequence,
        first_outstanding=sequence if first_outstanding is None else first_outstanding,
    )


def swap(result: state_machine.ApplyResult) -> tuple[bool, str | None]:
    assert isinstance(result, CasResult)
    return result.swapped, result.value


def existed(result: state_machine.ApplyResult) -> bool:
    assert isinstance(result, DeleteResult)
    return result.existed


@pytest.fixture
def log() -> Log:
    return Log()


def test_seed_mappings_and_noops_apply_as_before(log: Log) -> None:
    assert log.entry(kind=raft_pb2.ENTRY_KIND_MAPPING, key="k", value="v") == PutResult(1)
    assert log.entry(kind=raft_pb2.ENTRY_KIND_NOOP) is None
    assert log.sm.get("k") == "v" and log.sm.last_applied == 2
    with pytest.raises(ValueError, match="out of order"):
        log.sm.apply(raft_pb2.LogEntry(index=5))


def test_a_batch_applies_every_mapping_and_later_ones_win(log: Log) -> None:
    assert isinstance(log.put({"a": "1", "b": "2"}), PutResult)
    assert (log.sm.get("a"), log.sm.get("b")) == ("1", "2")


def test_delete_reports_whether_the_key_existed(log: Log) -> None:
    log.put({"k": "v"})
    assert existed(log.delete("k")) is True
    assert log.sm.get("k") is None
    assert existed(log.delete("k")) is False


def test_compare_and_swap_on_a_value_and_on_absence(log: Log) -> None:
    assert swap(log.cas("k", None, "first")) == (True, "first")
    assert swap(log.cas("k", None, "again")) == (False, "first")
    assert swap(log.cas("k", "wrong", "x")) == (False, "first")
    assert swap(log.cas("k", "first", "second")) == (True, "second")
    assert log.sm.get("k") == "second"
    log.delete("k")
    assert swap(log.cas("k", "second", "x")) == (False, None)
    # An empty string is a value, not absence.
    assert swap(log.cas("k", "", "x")) == (False, None)


def test_register_gives_each_client_the_index_of_its_entry(log: Log) -> None:
    log.entry(kind=raft_pb2.ENTRY_KIND_NOOP)
    assert log.register() == 2
    assert log.register() == 3
    assert log.sm.has_session(2) and log.sm.has_session(3)


def test_a_retried_write_returns_the_original_reply_without_applying_again(log: Log) -> None:
    client = log.register()
    assert swap(log.cas("k", None, "mine", session(client, 1))) == (True, "mine")
    log.put({"k": "theirs"})
    # The same request again (its first reply was lost): the original outcome, and no new effect.
    assert swap(log.cas("k", None, "mine", session(client, 1))) == (True, "mine")
    assert log.sm.get("k") == "theirs"
    assert existed(log.delete("k", session(client, 2))) is True
    log.put({"k": "back"})
    assert existed(log.delete("k", session(client, 2))) is True
    assert log.sm.get("k") == "back"


def test_replies_below_first_outstanding_are_discarded_and_their_retries_refused(
    log: Log,
) -> None:
    client = log.register()
    log.put({"a": "1"}, session(client, 1))
    log.put({"b": "2"}, session(client, 2, first_outstanding=1))
    # Request 3 says the client has seen every reply below 3.
    log.put({"c": "3"}, session(client, 3, first_outstanding=3))
    result = log.put({"a": "again"}, session(client, 1))
    assert isinstance(result, SessionExpired) and "discarded" in result.reason
    assert log.sm.get("a") == "1"
    # The reply to 3 itself is kept until a later request acknowledges it.
    assert isinstance(log.put({"c": "again"}, session(client, 3)), PutResult)
    assert log.sm.get("c") == "3"


def test_a_write_for_an_unknown_client_applies_nothing(log: Log) -> None:
    result = log.put({"k": "v"}, session(12345, 1))
    assert isinstance(result, SessionExpired) and "unknown" in result.reason
    assert log.sm.get("k") is None
    assert isinstance(log.cas("k", None, "v", session(12345, 2)), SessionExpired)
    assert log.sm.get("k") is None


def test_a_session_idle_longer_than_the_timeout_in_log_time_expires(log: Log) -> None:
    idle = log.register()
    busy = log.register()
    for _ in range(3):
        log.time_ms += HOUR_MS // 2
        log.put({"k": "busy"}, session(busy, log.sm.last_applied))
    assert not log.sm.has_session(idle)
    assert log.sm.has_session(busy)
    assert isinstance(log.put({"k": "v"}, session(idle, 1)), SessionExpired)


def test_expiry_follows_log_time_never_going_backwards(log: Log) -> None:
    client = log.register()
    log.time_ms += HOUR_MS + 1
    log.entry(kind=raft_pb2.ENTRY_KIND_NOOP)
    # An entry stamped earlier (say, by a leader whose clock is behind) does not revive it.
    log.time_ms -= 2 * HOUR_MS
    assert isinstance(log.put({"k": "v"}, session(client, 1)), SessionExpired)


def test_sessions_are_bounded_and_the_least_recently_used_is_evicted(
    log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_machine, "MAX_SESSIONS", 3)
    first, second, third = log.register(), log.register(), log.register()
    # Using the first makes the second the least recently used.
    log.put({"k": "1"}, session(first, 1))
    fourth = log.register()
    assert log.sm.session_count == 3
    assert not log.sm.has_session(second)
    assert all(log.sm.has_session(c) for c in (first, third, fourth))


def test_replies_kept_per_session_are_bounded(log: Log, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_machine, "MAX_REPLIES_PER_SESSION", 2)
    client = log.register()
    for sequence in (1, 2, 3):
        # A client that never acknowledges anything.
        log.put({"k": str(sequence)}, session(client, sequence, first_outstanding=1))
    assert isinstance(log.put({"k": "x"}, session(client, 1, 1)), SessionExpired)
    assert isinstance(log.put({"k": "x"}, session(client, 3, 1)), PutResult)
    assert log.sm.get("k") == "3"


def test_two_replicas_fed_the_same_log_make_the_same_decisions() -> None:
    entries: list[raft_pb2.LogEntry] = []
    builder = Log()
    original_apply = builder.sm.apply

    def recording(entry: raft_pb2.LogEntry) -> state_machine.ApplyResult:
        entries.append(entry)
        return original_apply(entry)

    builder.sm.apply = recording  # type: ignore[method-assign]
    client = builder.register()
    results = [
        builder.cas("k", None, "a", session(client, 1)),
        builder.cas("k", None, "a", session(client, 1)),
        builder.delete("k", session(client, 2, 2)),
    ]
    builder.time_ms += 2 * HOUR_MS
    results.append(builder.delete("k", session(client, 3)))
    replica = KeyValueStateMachine()
    replayed = [replica.apply(e) for e in entries]
    assert replayed[1:] == results
    assert isinstance(results[-1], SessionExpired)


# ---- revisions, ranges, delete-range, compare by revision, the watch window -------------------


def revs(log: Log, key: str) -> tuple[int, int, int]:
    return tuple(log.sm.revisions(key))  # type: ignore[return-value]


def delete_range(log: Log, key: str, prefix: bool = False, end: str | None = None) -> Any:
    request = raft_pb2.DeleteRangeRequest(key=key, prefix=prefix)
    if end is not None:
        request.range_end = end
    return log.command(raft_pb2.Command(delete_range=request))


def cas_rev(log: Log, key: str, mod_revision: int, new: str) -> CasResult:
    request = raft_pb2.CompareAndSwapRequest(
        key=key, new_value=new, expected_mod_revision=mod_revision
    )
    result = log.command(raft_pb2.Command(compare_and_swap=request))
    assert isinstance(result, CasResult)
    return result


def test_every_write_gets_its_index_as_revision_and_keys_keep_create_mod_and_version(
    log: Log,
) -> None:
    assert log.entry(kind=raft_pb2.ENTRY_KIND_MAPPING, key="a", value="1") == PutResult(1)
    assert log.entry(kind=raft_pb2.ENTRY_KIND_NOOP) is None
    assert log.put({"a": "2", "b": "1"}) == PutResult(3)
    assert revs(log, "a") == (1, 3, 2)
    assert revs(log, "b") == (3, 3, 1)
    assert log.delete("a") == DeleteResult(True, 4)
    assert revs(log, "a") == (0, 0, 0)
    assert log.delete("a") == DeleteResult(False, 5)
    # Created again: a new life, its version counted afresh.
    log.put({"a": "3"})
    assert revs(log, "a") == (6, 6, 1)
    assert log.sm.revision == 6


def test_a_retried_write_gets_the_revision_of_its_one_application(log: Log) -> None:
    client = log.register()
    first = log.put({"k": "v"}, session(client, 1))
    log.put({"other": "x"})
    assert log.put({"k": "v"}, session(client, 1)) == first == PutResult(2)
    assert revs(log, "k") == (2, 2, 1)


def test_ranges_come_in_key_order_by_prefix_or_bounds_with_limits_and_continuation(
    log: Log,
) -> None:
    keys = ["b/2", "a", "b/10", "b/1", "b0", "c", "b/", "b"]
    for key in keys:
        log.put({key: key.upper()})
    sm = log.sm
    start, end = state_machine.range_bounds("b/", True, None)
    page = sm.range(start, end, 10, 1 << 20)
    assert [kv.key for kv in page.kvs] == ["b/", "b/1", "b/10", "b/2"]
    assert page.kvs[1] == state_machine.KeyValue("b/1", "B/1", 4, 4, 1)
    assert (page.more, page.next_key, page.count, page.revision) == (False, None, 4, 8)
    # A limit, then the rest from next_key.
    page = sm.range(start, end, 3, 1 << 20)
    assert [kv.key for kv in page.kvs] == ["b/", "b/1", "b/10"]
    assert (page.more, page.next_key, page.count) == (True, "b/2", 4)
    rest = sm.range(start, end, 3, 1 << 20, resume_key=page.next_key)
    assert [kv.key for kv in rest.kvs] == ["b/2"] and not rest.more
    # [start, end), to the end, one key, keys only, and every key.
    assert [kv.key for kv in sm.range("b", "b0", 10, 1 << 20).kvs] == [
        "b",
        "b/",
        "b/1",
        "b/10",
        "b/2",
    ]
    assert [
        kv.key for kv in sm.range(*state_machine.range_bounds("b0", False, ""), 10, 99).kvs
    ] == [
        "b0",
        "c",
    ]
    assert [
        kv.key for kv in sm.range(*state_machine.range_bounds("b", False, None), 9, 99).kvs
    ] == ["b"]
    assert sm.range("a", None, 10, 1 << 20, keys_only=True).kvs[0].value is None
    assert sm.range(*state_machine.range_bounds("", True, None), 100, 1 << 20).count == len(keys)
    # A byte budget cuts a page short, but never below one key.
    assert len(sm.range("", None, 100, 1).kvs) == 1
    assert sm.count("b/", "b0") == 4 and sm.count("x", None) == 0


def test_prefix_end_is_the_first_string_after_every_string_with_the_prefix() -> None:
    assert state_machine.prefix_end("ab") == "ac"
    assert state_machine.prefix_end("a\U0010ffff") == "b"
    assert state_machine.prefix_end("\U0010ffff") is None
    assert state_machine.prefix_end("") is None
    assert state_machine.prefix_end("a\ud7ff") == "a\ue000"


def test_delete_range_deletes_every_key_of_the_range_in_one_revision(log: Log) -> None:
    log.put({"job/1": "a", "job/2": "b", "jobs": "c", "x": "d"})
    assert delete_range(log, "job/", prefix=True) == state_machine.DeleteRangeResult(2, 2)
    assert log.sm.get("job/1") is None and log.sm.get("jobs") == "c"
    assert [c.key for c in log.sm.window if c.revision == 2] == ["job/1", "job/2"]
    assert delete_range(log, "a", end="y") == state_machine.DeleteRangeResult(2, 3)
    assert len(log.sm) == 0
    assert delete_range(log, "", prefix=True) == state_machine.DeleteRangeResult(0, 4)


def test_compare_and_swap_by_mod_revision(log: Log) -> None:
    # 0: only if absent.
    assert cas_rev(log, "k", 0, "first") == CasResult(True, "first", 1, 1)
    assert cas_rev(log, "k", 0, "again") == CasResult(False, "first", 2, 1)
    # The revision the key was last written at, and only that one.
    assert cas_rev(log, "k", 1, "second") == CasResult(True, "second", 3, 3)
    assert cas_rev(log, "k", 1, "stale") == CasResult(False, "second", 4, 3)
    # Value and revision together: both must match.
    request = raft_pb2.CompareAndSwapRequest(
        key="k", new_value="x", expected_mod_revision=3, expected_value="wrong"
    )
    result = log.command(raft_pb2.Command(compare_and_swap=request))
    assert isinstance(result, CasResult) and not result.swapped
    assert log.sm.get("k") == "second"


def test_the_window_holds_every_change_in_order_with_previous_values(log: Log) -> None:
    log.put({"a": "1"})
    log.put({"a": "2", "b": "1"})
    log.delete("a")
    changes = log.sm.window.since(1)
    assert changes == [
        Change(1, "a", "1", None, 1, 1),
        Change(2, "a", "2", "1", 1, 2),
        Change(2, "b", "1", None, 2, 1),
        Change(3, "a", None, "2", 0, 0),
    ]
    assert log.sm.window.since(3) == changes[3:]
    assert log.sm.window.since(4) == []


def test_the_window_is_bounded_and_says_which_revisions_it_no_longer_holds() -> None:
    log = Log()
    log.sm.window.limit = 3
    for i in range(5):
        log.put({f"k{i}": "v"})
    assert [c.revision for c in log.sm.window] == [3, 4, 5]
    assert log.sm.window.oldest_revision == 3
    with pytest.raises(CompactedError, match="oldest revision .* is 3"):
        log.sm.window.since(2)
    # A byte budget too: a big value pushes older changes out.
    window = ChangeWindow(limit=100, max_bytes=10)
    window.add([Change(1, "a", "12345", None, 1, 1)])
    window.add([Change(2, "b", "123456789", None, 2, 1)])
    assert [c.revision for c in window] == [2] and window.compacted == 1


def test_revisions_and_the_window_survive_a_snapshot() -> None:
    log = Log()
    log.put({"a": "1", "b": "2"})
    log.put({"a": "3"})
    delete_range(log, "b", prefix=True)
    restored = KeyValueStateMachine()
    restored.restore(log.sm.snapshot().encode())
    assert restored.revisions("a") == log.sm.revisions("a") == (1, 2, 2)
    assert list(restored.window) == list(log.sm.window)
    assert restored.window.compacted == 0
    assert [kv.key for kv in restored.range("", None, 10, 100).kvs] == ["a"]
    # The restored one goes on as the original would.
    entry = raft_pb2.LogEntry(index=4, kind=raft_pb2.ENTRY_KIND_MAPPING, key="a", value="4")
    restored.apply(entry)
    assert restored.revisions("a") == (1, 4, 3)


def test_a_snapshot_from_before_revisions_restores_with_its_index_as_every_keys_revision() -> None:
    old = b'{"last_applied":7,"log_time_ms":0,"sessions":[[7,0,0,[[1,{"b":true}],[2,{"cas":[true,"v"]}]]]],"data":{"k":"v"}}'
    restored = KeyValueStateMachine()
    restored.restore(old)
    assert restored.revisions("k") == (7, 7, 1)
    assert restored.window.oldest_revision == 8
    with pytest.raises(CompactedError):
        restored.window.since(7)
    # Sessions' old replies still answer retries.
    delete = raft_pb2.DeleteRequest(key="k", session=session(7, 1))
    entry = raft_pb2.LogEntry(
        index=8, kind=raft_pb2.ENTRY_KIND_COMMAND, command=raft_pb2.Command(delete=delete)
    )
    assert restored.apply(entry) is True
    # And a snapshot taken now carries the revisions on.
    again = KeyValueStateMachine()
    again.restore(restored.snapshot().encode())
    assert again.revisions("k") == (7, 7, 1)


def test_the_listener_hears_each_entry_s_changes_once_in_order(log: Log) -> None:
    heard: list[tuple[int, list[Change]]] = []

    class Listener:
        def changed(self, revision: int, changes: list[Change]) -> None:
            heard.append((revision, list(changes)))

        def reset(self) -> None:
            heard.append((-1, []))

    log.sm.listener = Listener()
    log.put({"a": "1", "b": "2"})
    log.entry(kind=raft_pb2.ENTRY_KIND_NOOP)
    log.delete("a")
    assert [(r, [c.key for c in cs]) for r, cs in heard] == [(1, ["a", "b"]), (3, ["a"])]
    log.sm.restore(log.sm.snapshot())
    assert heard[-1] == (-1, [])
