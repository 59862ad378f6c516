"""The key-value state machine: seed mappings, commands (batches, delete, compare-and-swap), and the
client sessions that make writes exactly-once, expire by log time and stay bounded."""

from __future__ import annotations

from typing import Any

import pytest

import state_machine
from rpc import raft_pb2
from state_machine import CasResult, KeyValueStateMachine, SessionExpired

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


@pytest.fixture
def log() -> Log:
    return Log()


def test_seed_mappings_and_noops_apply_as_before(log: Log) -> None:
    assert log.entry(kind=raft_pb2.ENTRY_KIND_MAPPING, key="k", value="v") is None
    assert log.entry(kind=raft_pb2.ENTRY_KIND_NOOP) is None
    assert log.sm.get("k") == "v" and log.sm.last_applied == 2
    with pytest.raises(ValueError, match="out of order"):
        log.sm.apply(raft_pb2.LogEntry(index=5))


def test_a_batch_applies_every_mapping_and_later_ones_win(log: Log) -> None:
    assert log.put({"a": "1", "b": "2"}) is None
    assert (log.sm.get("a"), log.sm.get("b")) == ("1", "2")


def test_delete_reports_whether_the_key_existed(log: Log) -> None:
    log.put({"k": "v"})
    assert log.delete("k") is True
    assert log.sm.get("k") is None
    assert log.delete("k") is False


def test_compare_and_swap_on_a_value_and_on_absence(log: Log) -> None:
    assert log.cas("k", None, "first") == CasResult(True, "first")
    assert log.cas("k", None, "again") == CasResult(False, "first")
    assert log.cas("k", "wrong", "x") == CasResult(False, "first")
    assert log.cas("k", "first", "second") == CasResult(True, "second")
    assert log.sm.get("k") == "second"
    log.delete("k")
    assert log.cas("k", "second", "x") == CasResult(False, None)
    # An empty string is a value, not absence.
    assert log.cas("k", "", "x") == CasResult(False, None)


def test_register_gives_each_client_the_index_of_its_entry(log: Log) -> None:
    log.entry(kind=raft_pb2.ENTRY_KIND_NOOP)
    assert log.register() == 2
    assert log.register() == 3
    assert log.sm.has_session(2) and log.sm.has_session(3)


def test_a_retried_write_returns_the_original_reply_without_applying_again(log: Log) -> None:
    client = log.register()
    assert log.cas("k", None, "mine", session(client, 1)) == CasResult(True, "mine")
    log.put({"k": "theirs"})
    # The same request again (its first reply was lost): the original outcome, and no new effect.
    assert log.cas("k", None, "mine", session(client, 1)) == CasResult(True, "mine")
    assert log.sm.get("k") == "theirs"
    assert log.delete("k", session(client, 2)) is True
    log.put({"k": "back"})
    assert log.delete("k", session(client, 2)) is True
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
    assert log.put({"c": "again"}, session(client, 3)) is None
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
    assert log.put({"k": "x"}, session(client, 3, 1)) is None
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
