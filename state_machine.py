"""The replicated state machine: a key-value store that committed log entries are applied to, in
order, with client sessions (thesis section 6.3) that make writes exactly-once, revisions on every
key (a write's revision is its entry's log index), keys held in order for ranges, and the window of
recent changes that watches are served from (watch_window.py), and leases (leases.py)."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeAlias

from sortedcontainers import SortedList

from leases import LeaseGranted, LeaseRefused, LeaseRevoked, LeaseTable, decode_leases
from rpc import raft_pb2
from watch_window import Change, ChangeWindow, decode_change, encode_change

# How many sessions the store keeps; registering one more evicts the least recently used.
MAX_SESSIONS = 10_000
# How many unacknowledged replies one session keeps; a client with more in flight loses the oldest.
MAX_REPLIES_PER_SESSION = 1_000
# A session unused for this long, in log time (the leaders' clocks stamped on entries), expires.
SESSION_TIMEOUT_MS = 60 * 60 * 1000


class CasResult(NamedTuple):
    """A compare-and-swap's outcome: whether it swapped, the key's value after it (None: absent),
    the revision of the entry that carried it, and the key's mod_revision after it (0: absent)."""

    swapped: bool
    value: str | None
    revision: int = 0
    mod_revision: int = 0


class PutResult(NamedTuple):
    """A put's (or a batch's) outcome: the revision it produced (0: unknown, a reply kept from
    before revisions existed)."""

    revision: int


class DeleteResult(NamedTuple):
    """A delete's outcome: whether the key existed (and so was removed), and its revision."""

    existed: bool
    revision: int = 0


class DeleteRangeResult(NamedTuple):
    """A delete-range's outcome: how many keys it removed, and its revision."""

    deleted: int
    revision: int


class KeyRevisions(NamedTuple):
    """When a key was created and last modified (log indices), and how many times it was written
    since it was created; all 0 for an absent key."""

    create_revision: int
    mod_revision: int
    version: int


class KeyValue(NamedTuple):
    """One key of a range, with its value (None when only keys were asked for) and revisions."""

    key: str
    value: str | None
    create_revision: int
    mod_revision: int
    version: int


@dataclass(frozen=True)
class RangePage:
    """A page of a range: its keys in order; `more` when keys beyond them remain in the range,
    the first of them `next_key`; `count` the keys in the whole range; `revision` the store's."""

    kvs: list[KeyValue]
    more: bool
    next_key: str | None
    count: int
    revision: int


@dataclass(frozen=True)
class SessionExpired:
    """The write was not applied: its session is unknown (never registered, or expired or evicted),
    or its reply was already discarded. Whether an earlier attempt of it was applied is unknown."""

    reason: str


# What applying one entry returns to whoever proposed it: None (a no-op), a PutResult, a
# DeleteResult, a DeleteRangeResult, a CasResult, the new client id (a registration), a
# LeaseGranted, a LeaseRevoked, LeaseRefused (a write refused for its lease) or SessionExpired.
# (A delete's reply kept in a session from before revisions is a bare bool.)
ApplyResult: TypeAlias = (
    None
    | bool
    | int
    | PutResult
    | DeleteResult
    | DeleteRangeResult
    | CasResult
    | LeaseGranted
    | LeaseRevoked
    | LeaseRefused
    | SessionExpired
)

_NO_REVISIONS = KeyRevisions(0, 0, 0)
# Makes a Change without the keyword handling of its generated constructor (every write makes one).
_new_tuple = tuple.__new__


class ChangeListener(Protocol):
    """Told of every change as it is applied (the node's watchers, watch.py); not replicated."""

    def changed(self, revision: int, changes: list[Change]) -> None: ...

    def reset(self) -> None:
        """The whole state was replaced (a snapshot was installed)."""


def range_bounds(key: str, prefix: bool, range_end: str | None) -> tuple[str, str | None]:
    """The [start, end) a request names (end None: to the last key): with `prefix`, every key
    that starts with `key`; else with `range_end` unset, `key` alone; with it empty, every key
    from `key` on; else [key, range_end)."""
    if prefix:
        return key, prefix_end(key)
    if range_end is None:
        return key, key + "\0"  # the first string after `key`
    return key, range_end or None


def prefix_end(prefix: str) -> str | None:
    """The first string after every string that starts with `prefix` (None: no such bound, every
    key from `prefix` on starts with it). Code-point order is UTF-8's byte order, as on the wire."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            following = last + 1
            if 0xD800 <= following <= 0xDFFF:
                following = 0xE000  # surrogates are not characters a key can hold
            return prefix[:-1] + chr(following)
        prefix = prefix[:-1]
    return None


@dataclass
class _Session:
    last_used_ms: int
    # Replies to the writes not yet known to be acknowledged, by sequence number.
    replies: dict[int, ApplyResult] = field(default_factory=dict)
    # Every sequence number below this has had its reply discarded.
    discarded_below: int = 0


class KeyValueStateMachine:
    """Applies committed entries; the node calls `apply` exactly once per index, in index order.

    Every decision depends only on the entries applied, so every node makes the same ones. The
    store's revision is the index of the last entry applied; a write's revision is its entry's.
    """

    def __init__(self, watch_window: ChangeWindow | None = None) -> None:
        self._data: dict[str, str] = {}
        # The same keys in order, for ranges; only creating or deleting a key touches it.
        self._keys: SortedList = SortedList()
        # (create_revision, mod_revision, version) by key. A key without one here was restored
        # from a snapshot that predates revisions: it counts as created at `_base_revision`.
        self._meta: dict[str, tuple[int, int, int]] = {}
        self._base_revision = 0
        self.last_applied = 0
        # Least recently used first: log time only grows, so this is also oldest-use-first.
        self._sessions: OrderedDict[int, _Session] = OrderedDict()
        self._log_time_ms = 0
        self.window = watch_window if watch_window is not None else ChangeWindow()
        self.listener: ChangeListener | None = None
        # The changes the entry being applied makes, in order.
        self._changes: list[Change] = []
        self.leases = LeaseTable()

    def apply(self, entry: raft_pb2.LogEntry) -> ApplyResult:
        """Apply the next committed entry and return its result for the proposer."""
        index = entry.index
        if index != self.last_applied + 1:
            raise ValueError(
                f"entry {index} applied out of order (last applied {self.last_applied})"
            )
        # Entries written before log time existed carry 0; taking the maximum keeps time monotonic.
        self._log_time_ms = max(self._log_time_ms, entry.leader_time_ms)
        self._expire_sessions()
        result: ApplyResult = None
        kind = entry.kind
        if kind == raft_pb2.ENTRY_KIND_MAPPING:
            self._put(entry.key, entry.value, index)
            result = _new_tuple(PutResult, (index,))
        elif kind == raft_pb2.ENTRY_KIND_COMMAND:
            result = self._apply_command(index, entry.command)
        self.last_applied = index
        if self._changes:
            changes, self._changes = self._changes, []
            self.window.add(changes)
            if self.listener is not None:
                self.listener.changed(index, changes)
        return result

    def get(self, key: str) -> str | None:
        return self._data.get(key)

    def revisions(self, key: str) -> KeyRevisions:
        """The key's revisions; all 0 when it is absent."""
        meta = self._meta.get(key)
        if meta is not None:
            return KeyRevisions(*meta)
        if key in self._data:
            return KeyRevisions(self._base_revision, self._base_revision, 1)
        return _NO_REVISIONS

    @property
    def revision(self) -> int:
        """The store's revision: every change up to it is applied, none after it."""
        return self.last_applied

    def range(
        self,
        start: str,
        end: str | None,
        limit: int,
        max_bytes: int,
        keys_only: bool = False,
        resume_key: str | None = None,
    ) -> RangePage:
        """The keys in [start, end) (end None: to the last key), in order, from `resume_key` on
        when given, at most `limit` of them and, after the first, no more than `max_bytes` of
        keys and values."""
        keys = self._keys
        first = start if resume_key is None or resume_key < start else resume_key
        count = self.count(start, end)
        kvs: list[KeyValue] = []
        size = 0
        more = False
        next_key = None
        data = self._data
        meta = self._meta.get
        default = (self._base_revision, self._base_revision, 1)
        append = kvs.append
        for key in keys.irange(first, end, inclusive=(True, False)):
            value = data[key]
            size += len(key) + (0 if keys_only else len(value))
            if len(kvs) >= limit or (kvs and size > max_bytes):
                more, next_key = True, key
                break
            create, mod, version = meta(key, default)
            append(_new_tuple(KeyValue, (key, None if keys_only else value, create, mod, version)))
        return RangePage(kvs, more, next_key, count, self.last_applied)

    def count(self, start: str, end: str | None) -> int:
        """How many keys [start, end) holds (end None: to the last key)."""
        keys = self._keys
        last: int = len(keys) if end is None else keys.bisect_left(end)
        first: int = keys.bisect_left(start)
        return max(0, last - first)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def has_session(self, client_id: int) -> bool:
        return client_id in self._sessions

    # ---- changing keys (every change goes through these two, and so to watchers) -----------

    def _put(self, key: str, value: str, revision: int, lease: int = 0) -> tuple[int, int]:
        """Set the key (attached to `lease`, 0: none); its (create_revision, version) after."""
        # On every write's path: kept to plain operations.
        previous = self._data.get(key)
        if previous is None:
            self._keys.add(key)
            create, version = revision, 1
        else:
            meta = self._meta.get(key)
            if meta is None:  # restored from a snapshot that predates revisions
                create, version = self._base_revision, 2
            else:
                create, version = meta[0], meta[2] + 1
        self._data[key] = value
        self._meta[key] = (create, revision, version)
        if lease or key in self.leases.key_lease:
            self.leases.attach(key, lease)
        self._changes.append(_new_tuple(Change, (revision, key, value, previous, create, version)))
        return create, version

    def _delete(self, key: str, revision: int) -> bool:
        """Remove the key; whether it existed. Every way a key goes (a delete, a delete-range,
        a lease's revoke or expiry) is this, so a watcher sees each as a delete."""
        previous = self._data.pop(key, None)
        if previous is None:
            return False
        self.leases.detach(key)
        self._keys.remove(key)
        self._meta.pop(key, None)
        self._changes.append(Change(revision, key, None, previous, 0, 0))
        return True

    # ---- commands --------------------------------------------------------------------------

    def _apply_command(self, index: int, command: raft_pb2.Command) -> ApplyResult:
        op = command.WhichOneof("op")
        if op == "register_client":
            return self._register(index)
        if op == "put":
            session = command.put.session
        elif op == "delete":
            session = command.delete.session
        elif op == "compare_and_swap":
            session = command.compare_and_swap.session
        elif op == "delete_range":
            session = command.delete_range.session
        elif op == "lease_grant":
            session = command.lease_grant.session
        elif op == "lease_revoke":
            session = command.lease_revoke.session
        elif op == "lease_expire":
            # Only a leader appends it, once per decision: it needs no session.
            for lease_id in command.lease_expire.ids:
                self._end_lease(lease_id, index)
            return None
        else:
            return None  # an empty command changes nothing
        if session.client_id == 0:
            return self._execute(index, command, op)
        known = self._sessions.get(session.client_id)
        if known is None:
            return SessionExpired(
                f"client session {session.client_id} is unknown (it expired or was never "
                "registered)"
            )
        known.last_used_ms = self._log_time_ms
        self._sessions.move_to_end(session.client_id)
        sequence = session.sequence
        if sequence in known.replies:
            return known.replies[sequence]  # a retry: the original reply, applied once
        if sequence < known.discarded_below:
            return SessionExpired(
                f"the reply to request {sequence} of client session {session.client_id} was "
                "already discarded"
            )
        result = self._execute(index, command, op)
        known.replies[sequence] = result
        # The client has seen every reply below first_outstanding; never drop the one just made.
        self._discard_below(known, min(session.first_outstanding, sequence))
        if len(known.replies) > MAX_REPLIES_PER_SESSION:
            self._discard_below(known, sorted(known.replies)[-MAX_REPLIES_PER_SESSION])
        return result

    def _execute(self, index: int, command: raft_pb2.Command, op: str) -> ApplyResult:
        if op == "put":
            mappings = command.put.mappings
            for mapping in mappings:
                if mapping.lease and (refused := self.leases.unknown(mapping.lease)):
                    return refused  # none of the batch, as it is one write
            # One entry, so every mapping of the batch takes effect at the same point of the log.
            for mapping in mappings:
                self._put(mapping.key, mapping.value, index, mapping.lease)
            return PutResult(index)
        if op == "lease_grant":
            grant = command.lease_grant
            return self.leases.grant(index, grant.ttl, grant.id)
        if op == "lease_revoke":
            lease_id = command.lease_revoke.id
            if (refused := self.leases.unknown(lease_id)) or not lease_id:
                return refused or LeaseRefused("lease 0 is no lease")
            return LeaseRevoked(self._end_lease(lease_id, index), index)
        if op == "delete":
            return DeleteResult(self._delete(command.delete.key, index), index)
        if op == "delete_range":
            request = command.delete_range
            start, end = range_bounds(
                request.key,
                request.prefix,
                request.range_end if request.HasField("range_end") else None,
            )
            doomed = list(self._keys.irange(start, end, inclusive=(True, False)))
            for key in doomed:
                self._delete(key, index)
            return DeleteRangeResult(len(doomed), index)
        cas = command.compare_and_swap
        if cas.lease and (refused := self.leases.unknown(cas.lease)):
            return refused
        current = self._data.get(cas.key)
        if cas.HasField("expected_mod_revision"):
            # By revision (0: absent), and by value too when one is given.
            matches = self.revisions(cas.key).mod_revision == cas.expected_mod_revision and (
                not cas.HasField("expected_value") or current == cas.expected_value
            )
        else:
            matches = current == (cas.expected_value if cas.HasField("expected_value") else None)
        if matches:
            self._put(cas.key, cas.new_value, index, cas.lease)
            return CasResult(True, cas.new_value, index, index)
        return CasResult(False, current, index, self.revisions(cas.key).mod_revision)

    def _end_lease(self, lease_id: int, index: int) -> int:
        """Revoke or expire a lease: each of its keys is deleted (a delete to watchers); how many."""
        doomed = self.leases.remove(lease_id)
        for key in doomed:
            self._delete(key, index)
        return len(doomed)

    # ---- sessions --------------------------------------------------------------------------

    def _register(self, index: int) -> int:
        # The entry's index is unique in the log, so it makes a client id every node agrees on.
        self._sessions[index] = _Session(last_used_ms=self._log_time_ms)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return index

    def _expire_sessions(self) -> None:
        cutoff = self._log_time_ms - SESSION_TIMEOUT_MS
        while self._sessions:
            client_id, oldest = next(iter(self._sessions.items()))
            if oldest.last_used_ms >= cutoff:
                return
            del self._sessions[client_id]

    # ---- snapshots (thesis chapter 5) -------------------------------------------------------

    @property
    def log_time_ms(self) -> int:
        """The log time of the last entry applied (the newest leader clock stamped so far)."""
        return self._log_time_ms

    def snapshot(self) -> SnapshotState:
        """A copy of the whole state, cheap enough to take between two applies; encoding it
        (`SnapshotState.encode`) can then run elsewhere while this state machine moves on."""
        sessions = [
            (cid, s.last_used_ms, s.discarded_below, list(s.replies.items()))
            for cid, s in self._sessions.items()
        ]
        # copy(), not dict(): dict() of a dict that has had deletions takes the slow path.
        return SnapshotState(
            self._data.copy(),
            sessions,
            self._log_time_ms,
            self.last_applied,
            meta=self._meta.copy(),
            base_revision=self._base_revision,
            window=self.window.copy(),
            compacted=self.window.compacted,
            leases=self.leases.copy(),
        )

    def restore(self, data: bytes | bytearray | memoryview | SnapshotState) -> None:
        """Replace the whole state with a snapshot's, encoded or already decoded; ValueError if
        it does not decode."""
        self.install(data if isinstance(data, SnapshotState) else decode_state(data))

    def install(self, state: SnapshotState) -> None:
        """Replace the whole state with a decoded snapshot's (which this state machine then owns);
        quick, so a large state can be decoded in small steps first (`StateDecoder`, which also
        puts the keys in order as they arrive)."""
        self._data = state.data
        self._keys = state.keys if state.keys is not None else SortedList(state.data)
        self._meta = state.meta
        self._base_revision = state.base_revision
        self._sessions = OrderedDict(
            (cid, _Session(last_used, dict(replies), below))
            for cid, last_used, below, replies in state.sessions
        )
        self._log_time_ms = state.log_time_ms
        self.last_applied = state.last_applied
        self._changes = []
        self.leases = LeaseTable.from_state(state.leases)
        self.window.reset(state.window, state.compacted)
        if self.listener is not None:
            self.listener.reset()

    @staticmethod
    def _discard_below(session: _Session, first_kept: int) -> None:
        if first_kept <= session.discarded_below:
            return
        session.discarded_below = first_kept
        for sequence in [s for s in session.replies if s < first_kept]:
            del session.replies[sequence]


@dataclass
class SnapshotState:
    """The state machine's content at one applied index, detached from it. Keys missing from
    `meta` count as created and modified at `base_revision` (0: at last_applied), version 1;
    `window` holds every change after revision `compacted`."""

    data: dict[str, str]
    sessions: list[tuple[int, int, int, list[tuple[int, ApplyResult]]]]
    log_time_ms: int
    last_applied: int
    meta: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    base_revision: int = 0
    window: list[Change] = field(default_factory=list)
    compacted: int = -1  # -1: no window (a state from before watches): compacted at last_applied
    # (id, ttl, keys) of every lease; none in a state from before leases.
    leases: list[tuple[int, int, list[str]]] = field(default_factory=list)
    # The keys of `data` in order, when whoever made this state had them (the decoder does).
    keys: SortedList | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.base_revision == 0:
            self.base_revision = self.last_applied
        if self.compacted < 0:
            self.compacted = self.last_applied

    def encode(self) -> bytes:
        return b"".join(self.encode_pieces())

    # The encoding is lines of JSON objects (JSON escapes every newline inside a string, so a
    # newline only ever ends a line). The first line holds last_applied, log_time_ms, sessions,
    # data, and (since revisions) base_revision and compacted; each further line adds more
    # sessions, more data with each key's [create_revision, mod_revision, version] in "meta",
    # or more of the watch window's changes, or (since leases) more leases as [id, ttl, keys].
    # A state encoded as one JSON document is the
    # one-line case; one without "compacted" predates revisions (see __post_init__).
    def encode_pieces(
        self, keys_per_piece: int = 1000, bytes_per_piece: int = 256 * 1024
    ) -> Iterator[bytes]:
        """The encoding in lines of a few keys each, so that a caller can let other work run
        between them (one call to json.dumps on a large state would hold the interpreter)."""
        yield _line(
            {
                "last_applied": self.last_applied,
                "log_time_ms": self.log_time_ms,
                "sessions": [],
                "data": {},
                "base_revision": self.base_revision,
                "compacted": self.compacted,
            }
        )
        sessions: list[Any] = []
        count = 0
        for cid, last_used, below, replies in self.sessions:
            sessions.append([cid, last_used, below, [[s, _encode_result(r)] for s, r in replies]])
            count += len(replies) + 1
            if count >= keys_per_piece:
                yield _line({"sessions": sessions})
                sessions, count = [], 0
        if sessions:
            yield _line({"sessions": sessions})
        piece: dict[str, str] = {}
        meta_piece: dict[str, tuple[int, int, int]] = {}
        meta = self.meta
        default = (self.base_revision, self.base_revision, 1)
        size = 0
        for key, value in self.data.items():
            piece[key] = value
            meta_piece[key] = meta.get(key, default)
            size += len(key) + len(value)
            if len(piece) >= keys_per_piece or size >= bytes_per_piece:
                yield _line({"data": piece, "meta": meta_piece})
                piece, meta_piece, size = {}, {}, 0
        if piece:
            yield _line({"data": piece, "meta": meta_piece})
        changes: list[Any] = []
        size = 0
        for change in self.window:
            changes.append(encode_change(change))
            size += change.size
            if len(changes) >= keys_per_piece or size >= bytes_per_piece:
                yield _line({"window": changes})
                changes, size = [], 0
        if changes:
            yield _line({"window": changes})
        leases: list[Any] = []
        count = 0
        for lease in self.leases:
            leases.append(lease)
            count += len(lease[2]) + 1
            if count >= keys_per_piece:
                yield _line({"leases": leases})
                leases, count = [], 0
        if leases:
            yield _line({"leases": leases})


class StateDecoder:
    """Decodes an encoded state as its bytes arrive, a line at a time (`feed`), so that a large
    state is decoded in small steps while it is received; `result()` once every byte has come."""

    def __init__(self) -> None:
        self._state: SnapshotState | None = None
        self._partial = bytearray()  # the start of a line whose end has not arrived yet

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Decode every line `data` completes; ValueError if one does not decode."""
        view = memoryview(data).cast("B")
        start = 0
        while (found := _NEWLINE.search(view, start)) is not None:
            if self._partial:
                self._partial += view[start : found.start()]
                line = bytes(self._partial)
                self._partial.clear()
            else:
                line = bytes(view[start : found.start()])
            self._decode(line)
            start = found.end()
        self._partial += view[start:]

    def result(self) -> SnapshotState:
        """The state, once all of it was fed; ValueError if it is incomplete or does not decode."""
        if self._partial:
            # A state encoded as one JSON document has no newline at its end.
            line = bytes(self._partial)
            self._partial.clear()
            self._decode(line)
        if self._state is None:
            raise ValueError("snapshot state does not decode: it is empty")
        return self._state

    def _decode(self, line: bytes) -> None:
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict):
                raise ValueError("a line is not a JSON object")
            if self._state is None:
                for name in ("last_applied", "log_time_ms", "sessions", "data"):
                    if name not in doc:
                        raise ValueError(f"its first line has no {name}")
                self._state = SnapshotState(
                    {},
                    [],
                    int(doc["log_time_ms"]),
                    int(doc["last_applied"]),
                    base_revision=int(doc.get("base_revision", 0)),
                    compacted=int(doc.get("compacted", -1)),
                    keys=SortedList(),
                )
            state = self._state
            values = doc.get("data", {})
            if not isinstance(values, dict):
                raise ValueError("data is not a mapping")
            if not all(isinstance(v, str) for v in values.values()):
                raise ValueError("a value is not a string")
            fresh = [k for k in values if k not in state.data]
            state.data.update(values)
            assert state.keys is not None
            # Puts the keys in order as they arrive, so installing the state is quick.
            state.keys.update(fresh)
            for key, (create, mod, version) in doc.get("meta", {}).items():
                state.meta[key] = (int(create), int(mod), int(version))
            state.window.extend(decode_change(c) for c in doc.get("window", ()))
            state.leases.extend(decode_leases(doc.get("leases", ())))
            for cid, last_used, below, replies in doc.get("sessions", ()):
                state.sessions.append(
                    (
                        int(cid),
                        int(last_used),
                        int(below),
                        [(int(seq), _decode_result(r)) for seq, r in replies],
                    )
                )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"snapshot state does not decode: {e}") from e


_NEWLINE = re.compile(b"\n")


def decode_state(data: bytes | bytearray | memoryview) -> SnapshotState:
    """Decode an encoded state at once; ValueError if it does not decode."""
    decoder = StateDecoder()
    decoder.feed(data)
    return decoder.result()


def _line(doc: Any) -> bytes:
    return _dumps(doc) + b"\n"


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _encode_result(result: ApplyResult) -> Any:
    # bool before int: a bool is an int in Python, and a delete's reply must stay a bool.
    if result is None:
        return None
    if isinstance(result, bool):
        return {"b": result}
    if isinstance(result, int):
        return {"i": result}
    if isinstance(result, CasResult):
        return {"cas": list(result)}
    if isinstance(result, PutResult):
        return {"p": result.revision}
    if isinstance(result, DeleteResult):
        return {"d": list(result)}
    if isinstance(result, DeleteRangeResult):
        return {"dr": list(result)}
    if isinstance(result, LeaseGranted):
        return {"lg": list(result)}
    if isinstance(result, LeaseRevoked):
        return {"lr": list(result)}
    if isinstance(result, LeaseRefused):
        return {"lx": result.reason, "s": result.status}
    return {"x": result.reason}


def _decode_result(doc: Any) -> ApplyResult:
    if doc is None:
        return None
    if "b" in doc:
        return bool(doc["b"])
    if "i" in doc:
        return int(doc["i"])
    if "cas" in doc:
        # Two fields before revisions, four since.
        swapped, value, *revisions = doc["cas"]
        return CasResult(bool(swapped), value, *(int(r) for r in revisions[:2]))
    if "p" in doc:
        return PutResult(int(doc["p"]))
    if "d" in doc:
        existed, revision = doc["d"]
        return DeleteResult(bool(existed), int(revision))
    if "dr" in doc:
        deleted, revision = doc["dr"]
        return DeleteRangeResult(int(deleted), int(revision))
    if "lg" in doc:
        return LeaseGranted(*(int(n) for n in doc["lg"]))
    if "lr" in doc:
        return LeaseRevoked(*(int(n) for n in doc["lr"]))
    if "lx" in doc:
        return LeaseRefused(str(doc["lx"]), str(doc.get("s", "FAILED_PRECONDITION")))
    return SessionExpired(str(doc["x"]))
