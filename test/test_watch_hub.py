"""A node's watchers without the network (watch.py): backlog then live changes with no gap or
repeat, only the keys watched, the watermark each message carries, a slow watcher cut off naming
where to resume, and what a snapshot install does to watchers (sent what they missed, or cut off
as compacted)."""

from __future__ import annotations

from rpc import raft_pb2
from state_machine import KeyValueStateMachine, prefix_end
from watch import KeyRange, SlowWatcherError, WatchHub
from watch_window import CompactedError


def put(machine: KeyValueStateMachine, *pairs: tuple[str, str]) -> int:
    batch = raft_pb2.MappingBatch(mappings=[raft_pb2.Mapping(key=k, value=v) for k, v in pairs])
    index = machine.last_applied + 1
    machine.apply(
        raft_pb2.LogEntry(
            index=index, kind=raft_pb2.ENTRY_KIND_COMMAND, command=raft_pb2.Command(put=batch)
        )
    )
    return index


def noop(machine: KeyValueStateMachine) -> None:
    machine.apply(raft_pb2.LogEntry(index=machine.last_applied + 1, kind=raft_pb2.ENTRY_KIND_NOOP))


def prefix(p: str) -> KeyRange:
    return KeyRange(p, prefix_end(p))


def events(message: raft_pb2.WatchResponse | None) -> list[tuple[int, str, str]]:
    assert message is not None
    return [(e.revision, e.key, e.value) for e in message.events]


def test_backlog_then_live_changes_of_the_watched_keys_only() -> None:
    machine = KeyValueStateMachine()
    hub = WatchHub(machine)
    first = put(machine, ("a/1", "x"), ("b/1", "y"))
    put(machine, ("a/2", "z"))
    watcher = hub.watch(prefix("a/"), first, prev_value=False)
    created = watcher.created_message()
    # Nothing sent yet: the backlog starts at `first`.
    assert created.created and created.revision == first - 1
    live = put(machine, ("a/1", "w"), ("c", "v"))
    noop(machine)
    message = watcher.next_message()
    assert events(message) == [(1, "a/1", "x"), (2, "a/2", "z"), (live, "a/1", "w")]
    # Everything up to the store's revision was sent, the no-op's included.
    assert message is not None and message.revision == machine.revision
    assert watcher.next_message() is None
    noop(machine)
    progress = watcher.next_message(progress=True)
    assert progress is not None and not progress.events
    assert progress.revision == machine.revision


def test_a_watch_from_now_and_one_from_a_later_revision() -> None:
    machine = KeyValueStateMachine()
    hub = WatchHub(machine)
    put(machine, ("k", "old"))
    now = hub.watch(KeyRange("k", "k\0"), 0, prev_value=True)
    later = hub.watch(KeyRange("k", "k\0"), 4, prev_value=False)
    put(machine, ("k", "new"))
    put(machine, ("k", "newer"))
    put(machine, ("k", "newest"))
    message = now.next_message()
    assert events(message) == [(2, "k", "new"), (3, "k", "newer"), (4, "k", "newest")]
    assert message is not None and message.events[0].prev_value == "old"
    assert events(later.next_message()) == [(4, "k", "newest")]


def test_a_slow_watcher_is_cut_off_naming_the_first_revision_it_was_not_sent() -> None:
    machine = KeyValueStateMachine()
    hub = WatchHub(machine, queue_limit=3)
    watcher = hub.watch(prefix(""), 0, prev_value=False)
    watcher.created_message()
    sent = put(machine, ("a", "1"))
    assert events(watcher.next_message()) == [(sent, "a", "1")]
    # One entry's changes are taken whole while nothing waits, however many.
    put(machine, *[(f"b{i}", "x") for i in range(5)])
    unsent = put(machine, ("c", "1"))
    assert isinstance(watcher.failure, SlowWatcherError)
    assert watcher.failure.resume_revision == sent + 1 < unsent
    assert "resume from revision 2" in str(watcher.failure)
    # Cut off: it holds nothing more, and is told of nothing more.
    put(machine, ("d", "1"))
    assert watcher.next_message() is None


def test_a_snapshot_install_sends_watchers_what_they_missed_from_the_new_window() -> None:
    leader = KeyValueStateMachine()
    put(leader, ("a", "1"))
    follower = KeyValueStateMachine()
    follower.restore(leader.snapshot())
    hub = WatchHub(follower)
    watcher = hub.watch(prefix(""), 0, prev_value=False)
    watcher.created_message()
    missed = [put(leader, (f"k{i}", "v")) for i in range(3)]
    follower.restore(leader.snapshot().encode())
    assert [r for r, _, _ in events(watcher.next_message())] == missed


def test_a_snapshot_install_past_the_window_cuts_watchers_off_as_compacted() -> None:
    leader = KeyValueStateMachine()
    leader.window.limit = 2
    follower = KeyValueStateMachine()
    hub = WatchHub(follower)
    watcher = hub.watch(prefix(""), 0, prev_value=False)
    for i in range(5):
        put(leader, (f"k{i}", "v"))
    follower.restore(leader.snapshot())
    assert isinstance(watcher.failure, CompactedError)
    assert watcher.failure.oldest == 4


def test_removed_watchers_are_told_nothing_more() -> None:
    machine = KeyValueStateMachine()
    hub = WatchHub(machine)
    watcher = hub.watch(prefix(""), 0, prev_value=False)
    assert len(hub) == 1
    hub.remove(watcher)
    hub.remove(watcher)
    assert len(hub) == 0
    put(machine, ("a", "1"))
    assert watcher.next_message() is None
