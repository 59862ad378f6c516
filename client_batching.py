"""Sharing calls among a client's tasks: what the tasks of one `Client` ask of one node in one
event-loop turn travels as one `Batch` call, so 64 concurrent writers cost the leader a few calls
instead of 64. Each op keeps its own request, session and retries; to its caller a batched op looks
exactly like its own call (the same reply, or the same status error). Nodes that do not offer
`Batch` (the seed's) are asked with each op's own call."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from rpc import raft_pb2, raft_pb2_grpc

# One Batch call carries at most this many ops and about this many bytes of requests (the nodes
# take messages of up to 4 MiB and at most 1,000 ops); what is left goes in further calls.
MAX_CALL_OPS = 256
MAX_CALL_BYTES = 2 * 1024 * 1024

# Which op of a BatchOp each unary method's request becomes; other methods are never batched.
BATCHED_METHODS = {
    "ProposeMapping": "put",
    "ProposeMappings": "put_many",
    "DeleteKey": "delete",
    "GetValue": "get",
}

_STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}


class _AskAlone(Exception):
    """This op cannot travel in a batch: send it in its own call."""


_Waiting = tuple[raft_pb2.BatchOp, "asyncio.Future[Any]", float]


class CallBatcher:
    """Coalesces ops for each node address until the end of the current event-loop turn."""

    def __init__(self) -> None:
        self._pending: dict[str, list[_Waiting]] = {}
        # Nodes that answered Batch with UNIMPLEMENTED: asked op by op from then on.
        self._unbatched: set[str] = set()
        self._calls: set[asyncio.Task[None]] = set()

    async def call(
        self,
        address: str,
        stub: raft_pb2_grpc.ClusterStub,
        method: str,
        request: Any,
        seconds: float,
    ) -> Any:
        """What `stub.<method>(request, timeout=seconds)` would return (or raise), batched with
        whatever else this turn asks of `address`."""
        field = BATCHED_METHODS.get(method)
        if field is not None and address not in self._unbatched:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[Any] = loop.create_future()
            waiting = self._pending.get(address)
            if waiting is None:
                waiting = self._pending[address] = []
                loop.call_soon(self._send, address, stub)
            waiting.append((raft_pb2.BatchOp(**{field: request}), future, seconds))
            try:
                return await future
            except _AskAlone:
                pass
        return await getattr(stub, method)(request, timeout=seconds)

    async def close(self) -> None:
        """Abandon the calls in flight (their callers see them cancelled)."""
        calls = list(self._calls)
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)

    def _send(self, address: str, stub: raft_pb2_grpc.ClusterStub) -> None:
        waiting = self._pending.pop(address, [])
        chunk: list[_Waiting] = []
        size = 0
        for item in waiting:
            if item[1].done():
                continue  # its caller gave up before it was sent
            op_size = item[0].ByteSize()
            if chunk and (len(chunk) == MAX_CALL_OPS or size + op_size > MAX_CALL_BYTES):
                self._start(address, stub, chunk)
                chunk, size = [], 0
            chunk.append(item)
            size += op_size
        if chunk:
            self._start(address, stub, chunk)

    def _start(self, address: str, stub: raft_pb2_grpc.ClusterStub, chunk: list[_Waiting]) -> None:
        task = asyncio.get_running_loop().create_task(self._call(address, stub, chunk))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _call(
        self, address: str, stub: raft_pb2_grpc.ClusterStub, chunk: list[_Waiting]
    ) -> None:
        # The call waits as long as its most patient op would have; an op's own deadline is
        # still kept by its caller's retry loop, which never asks once the deadline has passed.
        seconds = max(item[2] for item in chunk)
        try:
            response: raft_pb2.BatchResponse = await stub.Batch(
                raft_pb2.BatchRequest(ops=[item[0] for item in chunk]), timeout=seconds
            )
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), e.details() or ""
            if code == grpc.StatusCode.UNIMPLEMENTED:
                self._unbatched.add(address)
                _settle_all(chunk, _AskAlone)
            else:
                _settle_all(chunk, lambda: _status_error(code, details))
            return
        except asyncio.CancelledError:
            for item in chunk:
                item[1].cancel()
            raise
        except Exception as e:  # a broken channel, say: every op fails as its own call would
            broken = f"{address}: {e}"
            _settle_all(chunk, lambda: _status_error(grpc.StatusCode.UNAVAILABLE, broken))
            return
        if len(response.results) != len(chunk):
            problem = f"{address} answered {len(response.results)} of {len(chunk)} batched ops"
            _settle_all(chunk, lambda: _status_error(grpc.StatusCode.INTERNAL, problem))
            return
        for (_, future, _), result in zip(chunk, response.results, strict=True):
            if future.done():
                continue
            if result.resend_alone:
                future.set_exception(_AskAlone())
            elif result.code:
                status = _STATUS_BY_NUMBER.get(result.code, grpc.StatusCode.UNKNOWN)
                future.set_exception(_status_error(status, result.details))
            else:
                reply = result.WhichOneof("reply")
                if reply is None:
                    future.set_exception(
                        _status_error(grpc.StatusCode.INTERNAL, f"{address} sent an empty reply")
                    )
                else:
                    future.set_result(getattr(result, reply))


def _status_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error the op's own call would have raised."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def _settle_all(chunk: list[_Waiting], error: Any) -> None:
    for _, future, _ in chunk:
        if not future.done():
            future.set_exception(error())
