"""The replicated state machine: a key-value dict that committed log entries are applied to, in order,
with client sessions (thesis section 6.3) that make writes exactly-once."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeAlias

from rpc import raft_pb2

# How many sessions the store keeps; registering one more evicts the least recently used.
MAX_SESSIONS = 10_000
# How many unacknowledged replies one session keeps; a client with more in flight loses the oldest.
MAX_REPLIES_PER_SESSION = 1_000
# A session unused for this long, in log time (the leaders' clocks stamped on entries), expires.
SESSION_TIMEOUT_MS = 60 * 60 * 1000


class CasResult(NamedTuple):
    """A compare-and-swap's outcome: whether it swapped, and the key's value after it (None: absent)."""

    swapped: bool
    value: str | None


@dataclass(frozen=True)
class SessionExpired:
    """The write was not applied: its session is unknown (never registered, or expired or evicted),
    or its reply was already discarded. Whether an earlier attempt of it was applied is unknown."""

    reason: str


# What applying one entry returns to whoever proposed it: None (a put, a no-op), whether the key
# existed (a delete), a CasResult, the new client id (a registration), or SessionExpired.
ApplyResult: TypeAlias = None | bool | int | CasResult | SessionExpired


@dataclass
class _Session:
    last_used_ms: int
    # Replies to the writes not yet known to be acknowledged, by sequence number.
    replies: dict[int, ApplyResult] = field(default_factory=dict)
    # Every sequence number below this has had its reply discarded.
    discarded_below: int = 0


class KeyValueStateMachine:
    """Applies committed entries; the node calls `apply` exactly once per index, in index order.

    Every decision depends only on the entries applied, so every node makes the same ones.
    """

    def __init__(self) -> None:
        self._data: dict[str, str] = {}
        self.last_applied = 0
        # Least recently used first: log time only grows, so this is also oldest-use-first.
        self._sessions: OrderedDict[int, _Session] = OrderedDict()
        self._log_time_ms = 0

    def apply(self, entry: raft_pb2.LogEntry) -> ApplyResult:
        """Apply the next committed entry and return its result for the proposer."""
        if entry.index != self.last_applied + 1:
            raise ValueError(
                f"entry {entry.index} applied out of order (last applied {self.last_applied})"
            )
        # Entries written before log time existed carry 0; taking the maximum keeps time monotonic.
        self._log_time_ms = max(self._log_time_ms, entry.leader_time_ms)
        self._expire_sessions()
        result: ApplyResult = None
        if entry.kind == raft_pb2.ENTRY_KIND_MAPPING:
            self._data[entry.key] = entry.value
        elif entry.kind == raft_pb2.ENTRY_KIND_COMMAND:
            result = self._apply_command(entry.index, entry.command)
        self.last_applied = entry.index
        return result

    def get(self, key: str) -> str | None:
        return self._data.get(key)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def has_session(self, client_id: int) -> bool:
        return client_id in self._sessions

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
        else:
            return None  # an empty command changes nothing
        if session.client_id == 0:
            return self._execute(command, op)
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
        result = self._execute(command, op)
        known.replies[sequence] = result
        # The client has seen every reply below first_outstanding; never drop the one just made.
        self._discard_below(known, min(session.first_outstanding, sequence))
        if len(known.replies) > MAX_REPLIES_PER_SESSION:
            self._discard_below(known, sorted(known.replies)[-MAX_REPLIES_PER_SESSION])
        return result

    def _execute(self, command: raft_pb2.Command, op: str) -> ApplyResult:
        if op == "put":
            # One entry, so every mapping of the batch takes effect at the same point of the log.
            for mapping in command.put.mappings:
                self._data[mapping.key] = mapping.value
            return None
        if op == "delete":
            return self._data.pop(command.delete.key, None) is not None
        cas = command.compare_and_swap
        current = self._data.get(cas.key)
        expected = cas.expected_value if cas.HasField("expected_value") else None
        if current == expected:
            self._data[cas.key] = cas.new_value
            return CasResult(True, cas.new_value)
        return CasResult(False, current)

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
        return SnapshotState(self._data.copy(), sessions, self._log_time_ms, self.last_applied)

    def restore(self, data: bytes | bytearray | memoryview | SnapshotState) -> None:
        """Replace the whole state with a snapshot's, encoded or already decoded; ValueError if
        it does not decode."""
        self.install(data if isinstance(data, SnapshotState) else decode_state(data))

    def install(self, state: SnapshotState) -> None:
        """Replace the whole state with a decoded snapshot's (which this state machine then owns);
        quick, so a large state can be decoded in small steps first (`StateDecoder`)."""
        self._data = state.data
        self._sessions = OrderedDict(
            (cid, _Session(last_used, dict(replies), below))
            for cid, last_used, below, replies in state.sessions
        )
        self._log_time_ms = state.log_time_ms
        self.last_applied = state.last_applied

    @staticmethod
    def _discard_below(session: _Session, first_kept: int) -> None:
        if first_kept <= session.discarded_below:
            return
        session.discarded_below = first_kept
        for sequence in [s for s in session.replies if s < first_kept]:
            del session.replies[sequence]


@dataclass
class SnapshotState:
    """The state machine's content at one applied index, detached from it."""

    data: dict[str, str]
    sessions: list[tuple[int, int, int, list[tuple[int, ApplyResult]]]]
    log_time_ms: int
    last_applied: int

    def encode(self) -> bytes:
        return b"".join(self.encode_pieces())

    # The encoding is lines of JSON objects (JSON escapes every newline inside a string, so a
    # newline only ever ends a line). The first line holds last_applied, log_time_ms, sessions
    # and data; each further line adds more sessions or more data. A state encoded as one JSON
    # document is the one-line case.
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
        size = 0
        for key, value in self.data.items():
            piece[key] = value
            size += len(key) + len(value)
            if len(piece) >= keys_per_piece or size >= bytes_per_piece:
                yield _line({"data": piece})
                piece, size = {}, 0
        if piece:
            yield _line({"data": piece})


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
                    {}, [], int(doc["log_time_ms"]), int(doc["last_applied"])
                )
            values = doc.get("data", {})
            if not isinstance(values, dict):
                raise ValueError("data is not a mapping")
            self._state.data.update(values)
            for cid, last_used, below, replies in doc.get("sessions", ()):
                self._state.sessions.append(
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
        return {"cas": [result.swapped, result.value]}
    return {"x": result.reason}


def _decode_result(doc: Any) -> ApplyResult:
    if doc is None:
        return None
    if "b" in doc:
        return bool(doc["b"])
    if "i" in doc:
        return int(doc["i"])
    if "cas" in doc:
        swapped, value = doc["cas"]
        return CasResult(bool(swapped), value)
    return SessionExpired(str(doc["x"]))
