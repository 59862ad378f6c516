"""The replicated state machine: a key-value dict that committed log entries are applied to, in order."""

from __future__ import annotations

from rpc import raft_pb2


class KeyValueStateMachine:
    """Applies committed entries; the node calls `apply` exactly once per index, in index order."""

    def __init__(self) -> None:
        self._data: dict[str, str] = {}
        self.last_applied = 0

    def apply(self, entry: raft_pb2.LogEntry) -> None:
        if entry.index != self.last_applied + 1:
            raise ValueError(
                f"entry {entry.index} applied out of order (last applied {self.last_applied})"
            )
        if entry.kind == raft_pb2.ENTRY_KIND_MAPPING:
            self._data[entry.key] = entry.value
        self.last_applied = entry.index

    def get(self, key: str) -> str | None:
        return self._data.get(key)

    def __len__(self) -> int:
        return len(self._data)
