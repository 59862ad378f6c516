"""Backups on the leader (`cluster_client.py snapshot save`): a consistent copy of the whole state
machine at one applied index, streamed to a client as a backup file (backup_file.py).

Why a fresh copy rather than the leader's latest snapshot file: that file may be thousands of
entries old, so a backup made from it would miss writes already acknowledged to clients. Instead
the leader confirms it still leads with a read index round (thesis section 6.4, as for a
linearizable read), waits until it has applied up to that index, and copies its state between two
applies: the backup then holds every write acknowledged before it was asked for, and each key's
value as of one and the same index. Copying is quick (what a snapshot does); encoding and sending
happen in small pieces afterwards, while the node goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from backup_file import BackupMeta, backup_chunks, now_ms
from log import RaftLog
from membership import ConfigHistory
from node_types import NodeBasics, OverloadedError, Timing, UnavailableError, size_text
from reads import Reads
from state_machine import KeyValueStateMachine, SnapshotState

# Backups one node takes at the same time: each holds a copy of the whole state until it is sent.
MAX_BACKUPS = 2


class BackupNode(NodeBasics, Protocol):
    """What a backup needs of its node."""

    log: RaftLog
    timing: Timing
    configs: ConfigHistory
    state_machine: KeyValueStateMachine
    reads: Reads

    @property
    def last_applied(self) -> int: ...

    def check_still_leader(self, term: int) -> None: ...
    async def wait_until(self, condition: Callable[[], bool], term: int) -> None: ...


@dataclass(frozen=True)
class BackupPoint:
    """The state machine's content at one applied index, with what a backup file says of it."""

    meta: BackupMeta
    state: SnapshotState


class Backups:
    """Takes backups of one node's state for clients; `cluster_id` says which cluster it is in
    (None while a joining node has not learnt it)."""

    def __init__(self, node: BackupNode, cluster_id: Callable[[], str | None]) -> None:
        self.node = node
        self._cluster_id = cluster_id
        self._in_progress = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the MAX_BACKUPS places for a backup from taking it to sending its last
        byte; OverloadedError when all are taken (memory stays bounded, whoever asks)."""
        if self._in_progress >= MAX_BACKUPS:
            raise OverloadedError(
                f"{self._in_progress} backups are already being taken on this node; try again "
                "once they are done"
            )
        self._in_progress += 1
        try:
            yield
        finally:
            self._in_progress -= 1

    async def take(self) -> BackupPoint:
        """The state at the leader's applied index once a read index round confirmed it leads:
        NotLeaderError on a node that does not lead (or stops leading meanwhile),
        UnavailableError if leadership cannot be confirmed within the proposal timeout."""
        node = self.node
        term = node.current_term
        node.check_still_leader(term)
        cluster_id = self._cluster_id()
        if cluster_id is None:
            raise UnavailableError("this node does not know its cluster's id yet")
        try:
            async with asyncio.timeout(node.timing.proposal_timeout):
                read_index = await node.reads.confirm_read_index(term)
                await node.wait_until(lambda: node.last_applied >= read_index, term)
        except TimeoutError:
            raise UnavailableError(
                f"could not confirm leadership within {node.timing.proposal_timeout:g} s"
            ) from None
        # No await from here to the copy: the state, its index, term and members are of one
        # and the same point of the log.
        index = node.last_applied
        state = node.state_machine.snapshot()
        meta = BackupMeta(
            cluster_id, index, node.log.term_at(index), now_ms(), node.configs.at(index)
        )
        node.narrate.info(
            "taking a backup for a client: the state at index %d (term %d, %d keys, %d sessions)",
            index,
            meta.term,
            len(state.data),
            len(state.sessions),
        )
        return BackupPoint(meta, state)

    async def chunks(self, point: BackupPoint) -> AsyncIterator[bytes]:
        """The backup file's bytes, in pieces encoded as they are sent."""
        sent = 0
        async for chunk in backup_chunks(point.meta, point.state):
            sent += len(chunk)
            yield chunk
        self.node.narrate.info(
            "sent a backup up to index %d to a client (%s)", point.meta.index, size_text(sent)
        )
