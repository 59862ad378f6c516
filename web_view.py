"""The live view of a running cluster: a small web server that follows every node's event stream
(Cluster.Events) and pushes each event to the page in web/ over a WebSocket, with JSON endpoints
behind the page's buttons. `python cluster_client.py web [PORT]` and `python -m test.test_harness
up --web [PORT]` start it; docs/live-view.md says what the page shows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from aiohttp import WSMsgType, web

from cluster_client import Client, ClientError
from rpc import raft_pb2, raft_pb2_grpc
from tls import TlsConfig, open_channel

WEB_DIR = Path(__file__).resolve().parent / "web"
HOST = "127.0.0.1"
# A node whose stream broke is asked again after this long, doubling up to the cap.
RECONNECT_FIRST = 0.2
RECONNECT_CAP = 2.0
# A node whose stream is open but that answers no GetLeader within this long is shown as not
# answering (a paused process keeps its sockets open and its stream silent).
PROBE_EVERY = 1.0
PROBE_TIMEOUT = 1.0
# Members are asked for the configuration this often, to follow nodes added later.
MEMBERS_EVERY = 2.0
NARRATION_KEPT = 300
# Entry terms kept per node: the page draws the newest entries only.
LOG_WINDOW = 64
# A page that cannot keep up is disconnected (it reconnects and starts from a fresh picture)
# rather than holding the view's memory.
PAGE_QUEUE = 5000
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class Controls(Protocol):
    """What a view started by the harness may also do to the nodes it owns: the process and
    network buttons (kill, restart, pause, resume, cut, heal, add, remove)."""

    def actions(self) -> list[str]: ...

    def addresses(self) -> list[str]:
        """The client addresses of every node started so far."""
        ...

    def processes(self) -> dict[int, str]:
        """Each node's process as the harness knows it: running, paused, exited, removed; with
        "isolated" added (as "running isolated") for a node cut off from the others."""
        ...

    def can_cut(self) -> list[int]: ...

    async def act(self, action: str, node_id: int | None) -> str:
        """Do it and say what was done; ValueError with a message for what cannot be done."""
        ...


def event_json(event: raft_pb2.NodeEvent) -> dict[str, Any]:
    """A NodeEvent as the page reads it (64-bit numbers as JSON numbers, absent ids as null)."""
    return {
        "seq": event.seq,
        "node_id": event.node_id,
        "time": event.time,
        "kind": event.kind,
        "text": event.text,
        "role": event.role,
        "term": event.term,
        "leader_id": event.leader_id if event.HasField("leader_id") else None,
        "voted_for": event.voted_for if event.HasField("voted_for") else None,
        "last_index": event.last_index,
        "last_term": event.last_term,
        "commit_index": event.commit_index,
        "applied_index": event.applied_index,
        "snapshot_index": event.snapshot_index,
        "peer": event.peer,
        "index": event.index,
        "count": event.count,
        "ok": event.ok,
        "detail": event.detail,
        "deadline": event.deadline,
        "entry_terms": list(event.entry_terms),
        "time_scale": event.time_scale,
        "members": list(event.members),
        "action": event.action,
    }


def is_routine(ev: dict[str, Any]) -> bool:
    """Heartbeats and election timer resets: many a second, narrated only when asked for."""
    return bool(ev["kind"] == "timer" or (ev["kind"] == "replicate" and ev["count"] == 0))


@dataclass
class NodeModel:
    """What the view knows of one node: its latest event and the term of each log entry seen."""

    address: str
    node_id: int | None = None
    last: dict[str, Any] | None = None
    # Index -> term of the entries this view saw appended (or the node's last entry at subscribe).
    terms: dict[int, int] = field(default_factory=dict)
    reachable: bool = False
    problem: str = "not connected yet"
    # When the node last told of contact with a leader (any event naming one, seen here).
    leader_contact: float | None = None
    # The election timer as the node last set it: when, and when it fires.
    timer_start: float = 0.0
    timer_deadline: float = 0.0

    def apply(self, ev: dict[str, Any]) -> None:
        self.node_id = ev["node_id"]
        self.last = ev
        last_index = ev["last_index"]
        if ev["kind"] == "append" and ev["entry_terms"]:
            for offset, term in enumerate(ev["entry_terms"]):
                self.terms[ev["index"] + offset] = term
        if ev["kind"] == "state" and last_index and ev["last_term"]:
            self.terms.setdefault(last_index, ev["last_term"])
        # Entries past the end were truncated (a conflicting suffix) or never kept (a restart);
        # the page shows only the newest LOG_WINDOW.
        low = max(ev["snapshot_index"], last_index - LOG_WINDOW)
        for index in [i for i in self.terms if i > last_index or i <= low]:
            del self.terms[index]
        # A timer event, or a leader's batch received (which re-arms the timer), says when it fires.
        if ev["deadline"]:
            self.timer_start, self.timer_deadline = ev["time"], ev["deadline"]
        if ev["role"] != "leader" and ev["leader_id"] is not None:
            if ev["kind"] in ("replicate", "timer", "append", "commit", "snapshot", "leader"):
                self.leader_contact = ev["time"]

    def picture(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "node_id": self.node_id,
            "last": self.last,
            "terms": self.terms,
            "reachable": self.reachable,
            "problem": self.problem,
            "leader_contact": self.leader_contact,
            "timer_start": self.timer_start,
            "timer_deadline": self.timer_deadline,
        }


class View:
    """The view's state and its pages: one watcher per node address, what each node said last,
    the narration so far, and the open pages that every update is pushed to."""

    def __init__(
        self,
        client: Client,
        addresses: list[str],
        tls: TlsConfig | None,
        controls: Controls | None = None,
        title: str = "",
        ids: dict[str, int] | None = None,
    ) -> None:
        self.client = client
        self.tls = tls
        self.controls = controls
        self.title = title
        self.nodes: dict[str, NodeModel] = {}
        self.narration: deque[dict[str, Any]] = deque(maxlen=NARRATION_KEPT)
        self.requests: deque[dict[str, Any]] = deque(maxlen=50)
        self._pages: set[asyncio.Queue[str | None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._initial = list(dict.fromkeys(addresses))
        # Node ids by client address where known before a node speaks (cards then show the id).
        self._ids = dict(ids or {})
        self._members_wanted = asyncio.Event()

    # -- following the nodes ------------------------------------------------------------------

    def start(self) -> None:
        for address in self._initial:
            self.watch(address)
        self._tasks.append(asyncio.create_task(self._follow_members()))
        self._tasks.append(asyncio.create_task(self._follow_processes()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for page in list(self._pages):
            page.put_nowait(None)

    def watch(self, address: str) -> None:
        if address in self.nodes:
            return
        self.nodes[address] = NodeModel(address, self._ids.get(address))
        self._tasks.append(asyncio.create_task(self._watch(self.nodes[address])))

    async def _watch(self, node: NodeModel) -> None:
        """Follow one node's event stream for as long as the view runs, reconnecting with
        backoff, and tell the pages whenever it stops or starts answering."""
        backoff = RECONNECT_FIRST
        while True:
            channel = open_channel(node.address, CHANNEL_OPTIONS, self.tls)
            probe = asyncio.create_task(self._probe(node, channel))
            try:
                stub = raft_pb2_grpc.ClusterStub(channel)
                call = stub.Events(raft_pb2.EventsRequest())
                async for batch in call:
                    backoff = RECONNECT_FIRST
                    self._set_reachable(node, True, "")
                    for event in batch.events:
                        self._event(node, event_json(event))
                problem = "its event stream ended"
            except grpc.aio.AioRpcError as e:
                problem = f"{e.code().name}: {(e.details() or '')[:100]}".strip()
            finally:
                probe.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probe
                await channel.close()
            self._set_reachable(node, False, problem)
            await asyncio.sleep(backoff)
            backoff = min(RECONNECT_CAP, backoff * 2)

    async def _probe(self, node: NodeModel, channel: grpc.aio.Channel) -> None:
        stub = raft_pb2_grpc.ClusterStub(channel)
        while True:
            await asyncio.sleep(PROBE_EVERY)
            if node.last is None:
                continue
            try:
                await stub.GetLeader(raft_pb2.LeaderRequest(), timeout=PROBE_TIMEOUT)
            except grpc.aio.AioRpcError as e:
                self._set_reachable(node, False, f"not answering ({e.code().name})")
            else:
                self._set_reachable(node, True, "")

    def _set_reachable(self, node: NodeModel, reachable: bool, problem: str) -> None:
        if node.reachable == reachable and node.problem == problem:
            return
        node.reachable, node.problem = reachable, problem
        self.push({"type": "reach", "node": node.picture()})

    def _event(self, node: NodeModel, ev: dict[str, Any]) -> None:
        node.apply(ev)
        ev["routine"] = is_routine(ev)
        if ev["text"] and not ev["routine"]:
            self.narration.append(
                {"node_id": ev["node_id"], "time": ev["time"], "text": ev["text"]}
            )
        self.push({"type": "event", "address": node.address, "event": ev, "node": node.picture()})
        for member in ev["members"]:
            if not any(n.node_id == member for n in self.nodes.values()):
                self._learn_members_soon()

    def _learn_members_soon(self) -> None:
        self._members_wanted.set()

    async def _follow_members(self) -> None:
        """Start watching nodes added later: ask for the configuration now and then, and at once
        when an event names a member this view does not know."""
        while True:
            sources: list[str] = []
            if self.controls is not None:
                sources = self.controls.addresses()
            with contextlib.suppress(ClientError, grpc.aio.AioRpcError):
                listed = await self.client.members(stale=True)
                sources += [m.client_address for m in listed.members]
            for address in sources:
                self.watch(address)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._members_wanted.wait(), MEMBERS_EVERY)
            self._members_wanted.clear()

    async def _follow_processes(self) -> None:
        if self.controls is None:
            return
        last: dict[int, str] = {}
        while True:
            now = self.controls.processes()
            if now != last:
                last = now
                self.push({"type": "processes", "processes": now})
            await asyncio.sleep(0.25)

    # -- pages --------------------------------------------------------------------------------

    def picture(self) -> dict[str, Any]:
        """Everything a page needs to draw the cluster as it stands now."""
        controls = self.controls
        return {
            "type": "picture",
            "title": self.title,
            "nodes": [n.picture() for n in self.nodes.values()],
            "narration": list(self.narration),
            "requests": list(self.requests),
            "actions": controls.actions() if controls else [],
            "can_cut": controls.can_cut() if controls else [],
            "processes": controls.processes() if controls else {},
            "now": time.time(),
        }

    def push(self, message: dict[str, Any]) -> None:
        text = json.dumps(message)
        for page in list(self._pages):
            if page.qsize() >= PAGE_QUEUE:
                self._pages.discard(page)
                page.put_nowait(None)
            else:
                page.put_nowait(text)

    async def page_socket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(heartbeat=20)
        await socket.prepare(request)
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._pages.add(queue)
        queue.put_nowait(json.dumps(self.picture()))

        async def drain_incoming() -> None:
            async for message in socket:
                if message.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                    break
            queue.put_nowait(None)

        reader = asyncio.create_task(drain_incoming())
        try:
            while (text := await queue.get()) is not None:
                await socket.send_str(text)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self._pages.discard(queue)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await socket.close()
        return socket

    # -- actions ------------------------------------------------------------------------------

    async def action(self, request: web.Request) -> web.Response:
        """POST /api/<action> with a JSON body: {"ok": true|false, "text": what happened}."""
        name = request.match_info["action"]
        try:
            body = await request.json() if request.can_read_body else {}
        except json.JSONDecodeError:
            return web.json_response({"ok": False, "text": "the body is not JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"ok": False, "text": "the body is not an object"}, status=400)
        started = time.time()
        try:
            ok, text = True, await self._do(name, body)
        except (ValueError, KeyError, TypeError) as e:
            ok, text = False, f"refused: {e}"
        except ClientError as e:
            ok, text = False, f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - a button's failure is shown, not a crash
            ok, text = False, f"{type(e).__name__}: {e}"
        done = {
            "action": name,
            "ok": ok,
            "text": text,
            "time": started,
            "took": time.time() - started,
        }
        self.requests.append(done)
        self.push({"type": "request", "request": done})
        return web.json_response({"ok": ok, "text": text}, status=200 if ok else 409)

    async def _do(self, name: str, body: dict[str, Any]) -> str:
        client = self.client
        if name == "put":
            key, value = _text(body, "key"), _text(body, "value", empty=True)
            await client.propose_mapping(key, value)
            return f"put {key}={value}: committed"
        if name == "get":
            key = _text(body, "key")
            got = await client.get_value(key, None)
            return f"get {key}: " + ("(not set)" if got is None else repr(got))
        if name == "delete":
            key = _text(body, "key")
            existed = await client.delete(key)
            return f"delete {key}: " + ("deleted" if existed else "was not set")
        if name == "cas":
            key, new = _text(body, "key"), _text(body, "value", empty=True)
            expected = body.get("expected")
            if expected is not None and not isinstance(expected, str):
                raise ValueError("expected must be a string or null (absent)")
            swapped, current = await client.compare_and_swap(key, expected, new)
            was = "absent" if expected is None else repr(expected)
            if swapped:
                return f"cas {key} {was} -> {new!r}: swapped"
            return f"cas {key} {was} -> {new!r}: not swapped, it holds " + (
                "nothing" if current is None else repr(current)
            )
        if name == "transfer":
            target = _node(body, allow_zero=True)
            leader = await client.transfer_leadership(target)
            return f"leadership handed to node {leader}"
        if self.controls is not None and name in self.controls.actions():
            return await self.controls.act(name, body.get("node"))
        raise ValueError(f"no action {name!r} here")


def _text(body: dict[str, Any], name: str, empty: bool = False) -> str:
    value = body.get(name)
    if not isinstance(value, str) or (not value and not empty):
        raise ValueError(f"{name} must be a {'' if empty else 'non-empty '}string")
    return value


def _node(body: dict[str, Any], allow_zero: bool = False) -> int:
    value = body.get("node", 0 if allow_zero else None)
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise ValueError("node must be a node id")
    return value


@web.middleware
async def same_origin_only(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The view's page may use the view; another site's page in the same browser may not. Without
    this, any page a user visits could read the cluster's events over a WebSocket, or press the
    view's buttons (kill a node, write a key) with a form post, since the view listens on
    localhost without a password. A browser always says where a page came from (Origin) on
    WebSocket and POST requests; tools that send none (curl) are let in. Actions also need a JSON
    body, which no cross-site form can send without the browser asking first."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return web.json_response(
            {
                "ok": False,
                "text": f"requests from {origin[:100]} are refused: not this view's page",
            },
            status=403,
        )
    if request.method == "POST" and request.content_type != "application/json":
        return web.json_response(
            {"ok": False, "text": "actions take a JSON body (Content-Type: application/json)"},
            status=415,
        )
    return await handler(request)


def make_app(view: View) -> web.Application:
    app = web.Application(middlewares=[same_origin_only])

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / "index.html")

    async def picture(request: web.Request) -> web.Response:
        return web.json_response(view.picture())

    app.router.add_get("/", index)
    app.router.add_get("/events", view.page_socket)
    app.router.add_get("/api/picture", picture)
    app.router.add_post("/api/{action}", view.action)
    app.router.add_static("/static/", WEB_DIR)
    return app


async def serve(
    view: View, port: int, say: Callable[[str], None] = print
) -> tuple[web.AppRunner, str]:
    """Start the view and its web server on localhost:`port` (0: any free port); the runner
    (`await runner.cleanup()` ends it) and the page's URL."""
    view.start()
    runner = web.AppRunner(make_app(view), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        await view.stop()
        raise OSError(f"cannot serve the live view on {HOST}:{port}: {e.strerror}") from None
    bound = runner.addresses[0][1] if runner.addresses else port
    url = f"http://{HOST}:{bound}/"
    say(f"live view: {url}")
    return runner, url


async def run_until_stopped(
    view: View, port: int, until: Awaitable[Any] | None = None, say: Callable[[str], None] = print
) -> None:
    """Serve the view until `until` completes (default: forever, i.e. Ctrl-C), then close it."""
    runner, _ = await serve(view, port, say)
    try:
        if until is None:
            await asyncio.Event().wait()
        else:
            await until
    finally:
        await runner.cleanup()
        await view.stop()


def run_for_client(client: Client, port: int, tls: TlsConfig | None) -> int:
    """`python cluster_client.py web [PORT]`: the view of any running cluster, until Ctrl-C."""

    async def main() -> None:
        async with client:
            known = {a: i for i, a in client._address_of.items()}
            title = ", ".join(client.addresses)
            view = View(client, client.addresses, tls, title=title, ids=known)
            print("Ctrl-C stops the view (the cluster goes on).", flush=True)
            await run_until_stopped(view, port, say=lambda s: print(s, flush=True))

    try:
        asyncio.run(main())
    except OSError as e:
        print(f"cluster_client.py web: {e}", flush=True)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0
