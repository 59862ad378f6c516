"""The client library's ranges, revisions and watches: the part of `Client` (cluster_client.py)
that reads keys in order, deletes ranges, compares by revision and follows changes."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from client_errors import (
    DENIED,
    ClientCore,
    Done,
    PermissionDeniedError,
    RequestRejectedError,
    WatchCompactedError,
    one_line,
)
from rpc import raft_pb2, raft_pb2_grpc

_T = TypeVar("_T")

# A watch whose node went away asks the next node after this many seconds, doubling up to the most.
WATCH_RETRY_MIN = 0.05
WATCH_RETRY_MAX = 2.0


@dataclass(frozen=True)
class KeyValue:
    """A key with its value (None when only keys were asked for) and revisions: the log index of
    the write that created it and of the last that changed it, and its writes since created."""

    key: str
    value: str | None
    create_revision: int
    mod_revision: int
    version: int


@dataclass(frozen=True)
class RangePage:
    """One page of a range: `more` when keys follow, from `next_key`; `count` keys in the whole
    range; `revision` the store's when read."""

    kvs: list[KeyValue]
    more: bool
    next_key: str | None
    count: int
    revision: int


@dataclass(frozen=True)
class CasOutcome:
    """A compare-and-swap's outcome: whether it swapped, the key's value and mod_revision after
    it (None and 0: absent), and the revision of the operation."""

    swapped: bool
    value: str | None
    mod_revision: int
    revision: int


@dataclass(frozen=True)
class WatchEvent:
    """One change: "put" (with the value) or "delete"; its revision and the key's revisions after
    it (0 after a delete); the previous value when asked for (None: the key did not exist)."""

    type: str
    key: str
    value: str | None
    revision: int
    create_revision: int
    version: int
    prev_value: str | None


def _range_request(
    key: str, range_end: str | None, prefix: bool
) -> dict[str, Any]:  # the fields RangeRequest, DeleteRangeRequest and WatchRequest share
    fields: dict[str, Any] = {"key": key, "prefix": prefix}
    if range_end is not None:
        fields["range_end"] = range_end
    return fields


class KeyValueMethods(ClientCore):
    """Ranges, revisions and watches, mixed into `Client`."""

    async def get_kv(self, key: str, *, stale: bool = False) -> KeyValue | None:
        """The key with its value and revisions, or None when it is not set (linearizable unless
        `stale`, as get_value)."""

        async def attempt(
            address: str, stub: raft_pb2_grpc.ClusterStub, seconds: float
        ) -> Done[KeyValue | None]:
            response: raft_pb2.GetValueResponse = await stub.GetValue(
                raft_pb2.Key(key=key, allow_stale=stale), timeout=seconds
            )
            if not response.HasField("value"):
                return Done(None)
            return Done(
                KeyValue(
                    key,
                    response.value,
                    response.create_revision,
                    response.mod_revision,
                    response.version,
                )
            )

        return await self._retry(f"get {key!r}", self._read_attempt_timeout, attempt)

    async def get_range(
        self,
        key: str = "",
        range_end: str | None = None,
        *,
        prefix: bool = False,
        limit: int = 0,
        resume_key: str | None = None,
        stale: bool = False,
        keys_only: bool = False,
        count_only: bool = False,
        node: str | None = None,
    ) -> RangePage:
        """One page of keys in order: with `prefix`, those starting with `key` ("": every key);
        else [key, range_end) (range_end "": to the last key; None: `key` alone). At most
        `limit` keys (0: as many as a reply carries); the page may stop sooner (by size), so
        follow `more` from `next_key` (as `resume_key`). Linearizable unless `stale`. With
        `node` ("host:port") only that node is asked."""
        request = raft_pb2.RangeRequest(
            limit=limit,
            allow_stale=stale,
            keys_only=keys_only,
            count_only=count_only,
            **_range_request(key, range_end, prefix),
        )
        if resume_key is not None:
            request.resume_key = resume_key

        async def attempt(
            address: str, stub: raft_pb2_grpc.ClusterStub, seconds: float
        ) -> Done[RangePage]:
            response: raft_pb2.RangeResponse = await stub.Range(request, timeout=seconds)
            kvs = [
                KeyValue(
                    kv.key,
                    None if keys_only else kv.value,
                    kv.create_revision,
                    kv.mod_revision,
                    kv.version,
                )
                for kv in response.kvs
            ]
            return Done(
                RangePage(
                    kvs,
                    response.more,
                    response.next_key if response.more else None,
                    response.count,
                    response.revision,
                )
            )

        return await self._retry(
            f"range from {key!r}",
            self._read_attempt_timeout,
            attempt,
            only=None if node is None else [node],
        )

    async def get_prefix(
        self,
        prefix: str,
        *,
        limit: int | None = None,
        stale: bool = False,
        keys_only: bool = False,
    ) -> list[KeyValue]:
        """Every key starting with `prefix` (at most `limit`), in order, a page at a time. Each
        page is linearizable on its own; a write between two pages may show in the later one."""
        found: list[KeyValue] = []
        resume: str | None = None
        while limit is None or len(found) < limit:
            want = 0 if limit is None else min(limit - len(found), 10_000)
            page = await self.get_range(
                prefix,
                prefix=True,
                limit=want,
                resume_key=resume,
                stale=stale,
                keys_only=keys_only,
            )
            found.extend(page.kvs)
            if not page.more:
                break
            resume = page.next_key
        return found

    async def delete_range(
        self, key: str, range_end: str | None = None, *, prefix: bool = False
    ) -> tuple[int, int]:
        """Delete every key of a prefix or range (as get_range names them) in one write;
        (how many were deleted, the revision of the delete). Exactly-once, as every write."""

        def request(session: raft_pb2.Session | None) -> raft_pb2.DeleteRangeRequest:
            return raft_pb2.DeleteRangeRequest(
                session=session, **_range_request(key, range_end, prefix)
            )

        def outcome(response: Any) -> tuple[int, int]:
            return int(response.deleted), int(response.revision)

        return await self._write(f"delete from {key!r}", "DeleteRange", request, outcome)

    async def delete_prefix(self, prefix: str) -> tuple[int, int]:
        """Delete every key starting with `prefix` in one write; (how many, its revision)."""
        return await self.delete_range(prefix, prefix=True)

    async def compare_and_swap_revision(
        self,
        key: str,
        mod_revision: int,
        new: str,
        *,
        expected: str | None = None,
        lease: int = 0,
    ) -> CasOutcome:
        """Set `key` to `new` only if its mod_revision is `mod_revision` (0: only if absent) and,
        with `expected`, its value too: a read-modify-write that nobody else's write slipped
        into. A failed swap's outcome carries the key's current mod_revision to retry with.
        With `lease`, the new value is attached to it (as in propose_mapping)."""

        def request(session: raft_pb2.Session | None) -> raft_pb2.CompareAndSwapRequest:
            made = raft_pb2.CompareAndSwapRequest(
                key=key,
                new_value=new,
                session=session,
                expected_mod_revision=mod_revision,
                lease=lease,
            )
            if expected is not None:
                made.expected_value = expected
            return made

        def outcome(response: Any) -> CasOutcome:
            current = response.current_value if response.HasField("current_value") else None
            return CasOutcome(
                bool(response.swapped), current, response.mod_revision, response.revision
            )

        return await self._write(f"compare-and-swap {key!r}", "CompareAndSwap", request, outcome)

    async def watch(
        self,
        key: str,
        range_end: str | None = None,
        *,
        prefix: bool = False,
        start_revision: int = 0,
        prev_value: bool = False,
        on_reconnect: Callable[[str, str], None] | None = None,
    ) -> AsyncGenerator[WatchEvent, None]:
        """Every change to a key, prefix or range (named as in get_range) from `start_revision`
        on (0: from now), in revision order, each exactly once; never ends by itself.

        Any node serves it. When the node goes away (or cuts this watcher off for reading too
        slowly), the watch resumes on the next node from the last revision it completed, so no
        change is missed or repeated; `on_reconnect(address, reason)` is told each time. Raises
        WatchCompactedError when every node has moved its window past that revision,
        RequestRejectedError for a malformed watch, PermissionDeniedError when refused."""
        request = raft_pb2.WatchRequest(
            prev_value=prev_value, **_range_request(key, range_end, prefix)
        )
        # The first revision not yet complete here: where a resumed watch starts.
        next_revision = start_revision
        pause = WATCH_RETRY_MIN
        compacted: dict[str, str] = {}
        while True:
            addresses = self._round()
            for address in addresses:
                request.start_revision = next_revision
                call = self._stub(address).Watch(request)
                # Changes of a revision whose last change has not arrived yet.
                held: list[raft_pb2.WatchEvent] = []
                try:
                    async for response in call:
                        pause = WATCH_RETRY_MIN
                        compacted.clear()
                        if response.created and next_revision == 0:
                            next_revision = response.revision + 1
                        held.extend(response.events)
                        complete = response.revision
                        if held and held[-1].revision > complete:
                            ready = [e for e in held if e.revision <= complete]
                            held = [e for e in held if e.revision > complete]
                        else:
                            ready, held = held, []
                        for event in ready:
                            yield _event(event)
                        next_revision = max(next_revision, complete + 1)
                    reason = "the node ended the watch"
                except grpc.aio.AioRpcError as e:
                    code: grpc.StatusCode = e.code()
                    details = one_line(e.details())
                    if code in DENIED:
                        raise PermissionDeniedError(details or code.name) from None
                    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED):
                        raise RequestRejectedError(details or code.name) from None
                    if code == grpc.StatusCode.OUT_OF_RANGE:
                        compacted[address] = details
                        if len(compacted) >= len(set(addresses)):
                            raise WatchCompactedError(details) from None
                    reason = f"{code.name}: {details}" if details else code.name
                finally:
                    call.cancel()
                if on_reconnect is not None:
                    on_reconnect(address, reason)
            await asyncio.sleep(random.uniform(pause / 2, pause))
            pause = min(pause * 2, WATCH_RETRY_MAX)


def _event(event: raft_pb2.WatchEvent) -> WatchEvent:
    deleted = event.type == raft_pb2.WATCH_EVENT_DELETE
    return WatchEvent(
        "delete" if deleted else "put",
        event.key,
        None if deleted else event.value,
        event.revision,
        event.create_revision,
        event.version,
        event.prev_value if event.HasField("prev_value") else None,
    )
