"""Leases in the state machine (grant, revoke, expiry from the log, puts with a lease, snapshots
old and new) and the leader's lease clock (lease_keeper.py) on a fake node and clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from lease_keeper import LeaseKeeper
from leases import LeaseGranted, LeaseRefused, LeaseRevoked
from node_events import EventNarrator
from node_types import Clock
from rpc import raft_pb2
from state_machine import KeyValueStateMachine, PutResult, SessionExpired
from test.test_state_machine import Log, session
from watch_window import Change


def grant(log: Log, ttl: int, lease_id: int = 0, sess: raft_pb2.Session | None = None) -> Any:
    return log.command(
        raft_pb2.Command(lease_grant=raft_pb2.LeaseGrantRequest(ttl=ttl, id=lease_id, session=sess))
    )


def revoke(log: Log, lease_id: int) -> Any:
    return log.command(raft_pb2.Command(lease_revoke=raft_pb2.LeaseRevokeRequest(id=lease_id)))


def expire(log: Log, *ids: int) -> Any:
    return log.command(raft_pb2.Command(lease_expire=raft_pb2.LeaseExpire(ids=ids)))


def put(
    log: Log, key: str, value: str, lease: int = 0, sess: raft_pb2.Session | None = None
) -> Any:
    batch = raft_pb2.MappingBatch(
        mappings=[raft_pb2.Mapping(key=key, value=value, lease=lease)], session=sess
    )
    return log.command(raft_pb2.Command(put=batch))


def cas(log: Log, key: str, mod_revision: int, new: str, lease: int) -> Any:
    request = raft_pb2.CompareAndSwapRequest(
        key=key, new_value=new, expected_mod_revision=mod_revision, lease=lease
    )
    return log.command(raft_pb2.Command(compare_and_swap=request))


@pytest.fixture
def log() -> Log:
    return Log()


def test_a_grant_takes_its_entry_s_index_as_id_or_the_id_asked_for(log: Log) -> None:
    log.entry(kind=raft_pb2.ENTRY_KIND_NOOP)
    assert grant(log, 10) == LeaseGranted(2, 10, 2)
    assert grant(log, 5, lease_id=100) == LeaseGranted(100, 5, 3)
    refused = grant(log, 5, lease_id=100)
    assert isinstance(refused, LeaseRefused) and "already exists" in refused.reason
    assert refused.status == "ALREADY_EXISTS"
    assert sorted(log.sm.leases.leases) == [2, 100]


def test_keys_put_with_a_lease_go_when_it_is_revoked_each_as_a_delete_at_its_revision(
    log: Log,
) -> None:
    lease = grant(log, 10).id
    other = grant(log, 10).id
    put(log, "a", "1", lease)
    put(log, "b", "2", lease)
    put(log, "c", "3", other)
    put(log, "d", "4")
    changes: list[tuple[int, list[Change]]] = []

    class Listener:
        def changed(self, revision: int, made: list[Change]) -> None:
            changes.append((revision, made))

        def reset(self) -> None:
            pass

    log.sm.listener = Listener()
    result = revoke(log, lease)
    assert result == LeaseRevoked(2, log.sm.last_applied)
    assert [(c.key, c.value, c.prev_value, c.revision) for c in changes[0][1]] == [
        ("a", None, "1", 7),
        ("b", None, "2", 7),
    ]
    assert log.sm.get("a") is None and log.sm.get("b") is None
    assert log.sm.get("c") == "3" and log.sm.get("d") == "4"
    assert lease not in log.sm.leases
    again = revoke(log, lease)
    assert isinstance(again, LeaseRefused) and "not found" in again.reason


def test_expiry_from_the_log_deletes_the_keys_and_the_leases_and_skips_gone_ones(
    log: Log,
) -> None:
    first, second = grant(log, 1).id, grant(log, 1).id
    put(log, "x", "1", first)
    put(log, "y", "2", second)
    assert expire(log, first, 999) is None
    assert log.sm.get("x") is None and log.sm.get("y") == "2"
    assert first not in log.sm.leases and second in log.sm.leases
    last = log.sm.window.since(1)[-1]
    assert (last.key, last.value, last.revision) == ("x", None, log.sm.last_applied)


def test_a_put_with_an_unknown_lease_is_refused_and_applies_nothing(log: Log) -> None:
    lease = grant(log, 10).id
    batch = raft_pb2.MappingBatch(
        mappings=[
            raft_pb2.Mapping(key="ok", value="1", lease=lease),
            raft_pb2.Mapping(key="bad", value="2", lease=12345),
        ]
    )
    refused = log.command(raft_pb2.Command(put=batch))
    assert isinstance(refused, LeaseRefused)
    assert refused.reason.startswith("lease 12345 not found")
    assert log.sm.get("ok") is None and log.sm.get("bad") is None
    assert isinstance(cas(log, "k", 0, "v", 777), LeaseRefused)
    assert log.sm.get("k") is None
    # A put with the lease revoked is refused too: the lease is gone for good.
    revoke(log, lease)
    assert isinstance(put(log, "late", "1", lease), LeaseRefused)


def test_a_key_put_again_without_a_lease_or_with_another_leaves_its_old_one(log: Log) -> None:
    first, second = grant(log, 10).id, grant(log, 10).id
    put(log, "k", "1", first)
    put(log, "k", "2")  # no lease now
    put(log, "j", "1", first)
    put(log, "j", "2", second)
    assert cas(log, "m", 0, "v", first).swapped
    revoke(log, first)
    assert log.sm.get("k") == "2" and log.sm.get("j") == "2"
    assert log.sm.get("m") is None
    assert log.sm.leases.get(second) is not None
    assert log.sm.leases.get(second).keys == {"j"}  # type: ignore[union-attr]
    # A deleted key leaves its lease as well.
    log.delete("j")
    assert log.sm.leases.get(second).keys == set()  # type: ignore[union-attr]


def test_grants_and_revokes_are_exactly_once_under_a_session(log: Log) -> None:
    client = log.register()
    granted = grant(log, 10, sess=session(client, 1))
    assert grant(log, 10, sess=session(client, 1)) == granted
    assert len(log.sm.leases) == 1
    refused = put(log, "k", "v", 4242, sess=session(client, 2))
    assert isinstance(refused, LeaseRefused)
    # A refusal kept in the session answers a retry the same, through a snapshot too.
    restored = KeyValueStateMachine()
    restored.restore(log.sm.snapshot().encode())
    again = raft_pb2.Command(
        put=raft_pb2.MappingBatch(
            mappings=[raft_pb2.Mapping(key="k", value="v", lease=4242)],
            session=session(client, 2),
        )
    )
    entry = raft_pb2.LogEntry(
        index=restored.last_applied + 1, kind=raft_pb2.ENTRY_KIND_COMMAND, command=again
    )
    assert restored.apply(entry) == refused
    assert isinstance(grant(log, 10, sess=session(12345, 1)), SessionExpired)


def test_leases_survive_a_snapshot_and_a_retried_grant_s_reply_too(log: Log) -> None:
    client = log.register()
    lease = grant(log, 7, sess=session(client, 1)).id
    put(log, "a", "1", lease)
    put(log, "b", "2")
    restored = KeyValueStateMachine()
    restored.restore(log.sm.snapshot().encode())
    assert restored.leases.copy() == log.sm.leases.copy() == [(lease, 7, ["a"])]
    retry = raft_pb2.Command(
        lease_grant=raft_pb2.LeaseGrantRequest(ttl=7, session=session(client, 1))
    )
    entry = raft_pb2.LogEntry(
        index=restored.last_applied + 1, kind=raft_pb2.ENTRY_KIND_COMMAND, command=retry
    )
    assert restored.apply(entry) == LeaseGranted(lease, 7, lease)
    revoked = raft_pb2.LogEntry(
        index=restored.last_applied + 1,
        kind=raft_pb2.ENTRY_KIND_COMMAND,
        command=raft_pb2.Command(lease_revoke=raft_pb2.LeaseRevokeRequest(id=lease)),
    )
    assert isinstance(restored.apply(revoked), LeaseRevoked)
    assert restored.get("a") is None and restored.get("b") == "2"
    # A snapshot in small pieces carries every lease too.
    many = Log()
    ids = [grant(many, 5).id for _ in range(30)]
    for i, lease_id in enumerate(ids):
        put(many, f"k{i}", "v", lease_id)
    pieces = list(many.sm.snapshot().encode_pieces(keys_per_piece=4))
    assert sum(b'"leases"' in p for p in pieces) > 1
    again = KeyValueStateMachine()
    again.restore(b"".join(pieces))
    assert again.leases.copy() == many.sm.leases.copy()


def test_a_snapshot_from_before_leases_restores_with_none() -> None:
    old = b'{"last_applied":7,"log_time_ms":0,"sessions":[],"data":{"k":"v"},"base_revision":7,"compacted":7}'
    restored = KeyValueStateMachine()
    restored.restore(old)
    assert len(restored.leases) == 0 and restored.get("k") == "v"
    entry = raft_pb2.LogEntry(
        index=8,
        kind=raft_pb2.ENTRY_KIND_COMMAND,
        command=raft_pb2.Command(lease_grant=raft_pb2.LeaseGrantRequest(ttl=3)),
    )
    assert restored.apply(entry) == LeaseGranted(8, 3, 8)


def test_a_malformed_snapshot_lease_is_refused() -> None:
    bad = b'{"last_applied":1,"log_time_ms":0,"sessions":[],"data":{}}\n{"leases":[[1,5,[3]]]}\n'
    with pytest.raises(ValueError, match="does not decode"):
        KeyValueStateMachine().restore(bad)


# ---- the leader's lease clock ----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.time = 100.0

    def now(self) -> float:
        return self.time

    def call_at(self, when: float, callback: Callable[[], object]) -> Any:
        return asyncio.get_running_loop().call_later(0, callback)


class KeeperNode:
    """A leader with a clock the test moves and a log it records appends in."""

    node_id = 1
    current_term = 3
    is_leader = True

    def __init__(self) -> None:
        self.fake = FakeClock()
        self.clock: Clock = self.fake
        self.state_machine = KeyValueStateMachine()
        self.appended: list[raft_pb2.LogEntry] = []

    @property
    def narrate(self) -> EventNarrator:
        return EventNarrator(self)  # type: ignore[arg-type]

    @property
    def role(self) -> str:
        return "leader"

    @property
    def leader_id(self) -> int:
        return 1

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        coro.close()  # the test ticks by hand

    def append_as_leader(self, entry: raft_pb2.LogEntry) -> int:
        self.appended.append(entry)
        return len(self.appended)

    async def wait_for_change(self) -> None:
        pass

    def apply(self, command: raft_pb2.Command) -> Any:
        return self.state_machine.apply(
            raft_pb2.LogEntry(
                index=self.state_machine.last_applied + 1,
                kind=raft_pb2.ENTRY_KIND_COMMAND,
                command=command,
            )
        )


def grant_on(node: KeeperNode, ttl: int) -> int:
    result = node.apply(raft_pb2.Command(lease_grant=raft_pb2.LeaseGrantRequest(ttl=ttl)))
    assert isinstance(result, LeaseGranted)
    return result.id


def test_the_clock_starts_at_election_and_a_keepalive_extends_from_its_arrival() -> None:
    node = KeeperNode()
    kept, abandoned = grant_on(node, 10), grant_on(node, 10)
    keeper = LeaseKeeper(node, 3)
    keeper.start()  # elected at 100: both live until 110 at least
    node.fake.time = 109.9
    assert keeper.tick() == []
    assert keeper.keep_alive(kept, arrived=109.0) == 10
    node.fake.time = 110.0
    assert keeper.tick() == [abandoned]
    assert [list(e.command.lease_expire.ids) for e in node.appended] == [[abandoned]]
    # Once proposed, it is not proposed again, nor can a keepalive save it.
    assert keeper.tick() == []
    assert keeper.keep_alive(abandoned, arrived=110.0) is None
    assert keeper.remaining(abandoned) is None
    assert keeper.remaining(kept) == pytest.approx(9.0)
    node.fake.time = 119.0
    assert keeper.tick() == [kept]
    assert keeper.keep_alive(12345, arrived=119.0) is None


def test_a_lease_first_seen_after_election_gets_its_full_ttl_from_then() -> None:
    node = KeeperNode()
    keeper = LeaseKeeper(node, 3)
    keeper.start()
    node.fake.time = 200.0
    late = grant_on(node, 5)
    assert keeper.tick() == []
    node.fake.time = 204.9
    assert keeper.tick() == []
    node.fake.time = 205.0
    assert keeper.tick() == [late]


def test_an_expiry_names_each_lease_once_per_entry_and_forgets_gone_ones() -> None:
    node = KeeperNode()
    ids = [grant_on(node, 1) for _ in range(3)]
    keeper = LeaseKeeper(node, 3)
    keeper.start()
    node.fake.time = 102.0
    assert keeper.tick() == ids
    assert len(node.appended) == 1
    node.apply(node.appended[0].command)
    assert len(node.state_machine.leases) == 0
    assert keeper.tick() == []
    assert keeper._deadline == {} and keeper._expiring == set()


def test_a_deposed_keeper_proposes_nothing() -> None:
    node = KeeperNode()
    grant_on(node, 1)
    keeper = LeaseKeeper(node, 3)
    keeper.start()
    node.is_leader = False
    node.fake.time = 200.0
    assert keeper.tick() == [] and node.appended == []


def test_put_results_stay_put_results(log: Log) -> None:
    assert put(log, "k", "v") == PutResult(1)
