"""`python -m test.test_harness up --web [PORT]`: five nodes behind per-link proxies (so that a cut is
real) with the live view of web_view.py, whose buttons here also kill, restart, pause, resume, cut
off, heal, add and remove nodes."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import cluster_client
import web_view
from test.cluster_process import HOST, ClusterTls, HostCluster
from test.nemesis import ProxyNetwork

LEADER_TIMEOUT = 15.0
ACTIONS = ["kill", "restart", "pause", "resume", "cut", "heal", "add", "remove"]


class LiveCluster:
    """A cluster the view's buttons act on (web_view.Controls): node ids 1..nodes on free ports of
    127.0.0.1, each reaching the others only through a proxy per directed link. Nodes added later
    get free ports and talk to the others directly, so they cannot be cut off."""

    def __init__(
        self,
        nodes: int,
        data_root: Path,
        tls: ClusterTls | None = None,
        time_scale: float = 1.0,
    ) -> None:
        self.network = ProxyNetwork(list(range(1, nodes + 1)))
        try:
            files = self.network.cluster_files(data_root)
            extra = ["--time-scale", f"{time_scale:g}"]
            self.cluster = HostCluster(self.network.config, files, None, data_root, extra)
        except BaseException:
            self.network.close()
            raise
        self.cluster.cleanups.append(self.network.close)
        self.cluster.tls = tls
        self.time_scale = time_scale
        self.paused: set[int] = set()
        self.isolated: set[int] = set()
        self._client: cluster_client.Client | None = None

    def client(self, deadline: float) -> cluster_client.Client:
        if self._client is None:
            self._client = self.cluster.client(deadline=deadline)
        return self._client

    # -- web_view.Controls --------------------------------------------------------------------

    def actions(self) -> list[str]:
        return list(ACTIONS)

    def addresses(self) -> list[str]:
        return [self.cluster.client_address(n) for n in self._every_node()]

    def _every_node(self) -> list[int]:
        return sorted({*self.cluster.node_ids, *self.cluster.removed})

    def processes(self) -> dict[int, str]:
        states: dict[int, str] = {}
        for node_id in self._every_node():
            if node_id in self.cluster.removed and not self.cluster.is_running(node_id):
                state = "removed"
            elif not self.cluster.is_running(node_id):
                state = "exited"
            elif node_id in self.paused:
                state = "paused"
            else:
                state = "running"
            if node_id in self.isolated:
                state += " isolated"
            states[node_id] = state
        return states

    def can_cut(self) -> list[int]:
        return list(self.network.node_ids)

    async def act(self, action: str, node_id: object) -> str:
        if action == "heal" and node_id is None:
            self.isolated.clear()
            self.network.heal()
            return "healed every link"
        if action == "add":
            return await self._add()
        if not isinstance(node_id, int) or node_id not in self._every_node():
            raise ValueError(f"no node {node_id!r} in this cluster")
        cluster = self.cluster
        running = cluster.is_running(node_id)
        if action == "kill":
            if not running:
                raise ValueError(f"node {node_id} is not running")
            cluster.kill_node(node_id, signal.SIGKILL)
            self.paused.discard(node_id)
            return f"node {node_id} killed (SIGKILL)"
        if action == "restart":
            if node_id in cluster.removed:
                raise ValueError(f"node {node_id} was removed; its id is never used again")
            if running:
                await asyncio.to_thread(cluster.stop_node, node_id)
            self.paused.discard(node_id)
            cluster.start_node(node_id)
            return f"node {node_id} started again on its data directory"
        if action in ("pause", "resume"):
            if not running:
                raise ValueError(f"node {node_id} is not running")
            if action == "pause":
                cluster.pause_node(node_id)
                self.paused.add(node_id)
                return f"node {node_id} paused (SIGSTOP)"
            cluster.resume_node(node_id)
            self.paused.discard(node_id)
            return f"node {node_id} resumed (SIGCONT)"
        if action == "cut":
            if node_id not in self.network.node_ids:
                raise ValueError(f"node {node_id} joined later and talks to the others directly")
            self.isolated.add(node_id)
            self._apply_cuts()
            return f"node {node_id} cut off from the others, both ways"
        if action == "heal":
            self.isolated.discard(node_id)
            self._apply_cuts()
            return f"node {node_id}'s links healed"
        if action == "remove":
            listed = await self.client(10.0).remove_member(node_id)
            if node_id in cluster.node_ids:
                cluster.forget_node(node_id)
            return f"node {node_id} removed; members now {sorted(m.id for m in listed.members)}"
        raise ValueError(f"no action {action!r}")

    def _apply_cuts(self) -> None:
        self.network.heal()
        for node_id in self.isolated:
            for other in self.network.node_ids:
                if other != node_id:
                    self.network.cut(node_id, other)
                    self.network.cut(other, node_id)

    async def _add(self) -> str:
        address = self.cluster.place_node()
        client = self.client(10.0)
        await client.add_member(
            address.id, address.raft_address, address.client_address, wait_until_voter=False
        )
        self.cluster.join_node(address.id)
        return (
            f"node {address.id} added as a learner and started with --join "
            f"(raft {address.raft_address}, client {address.client_address}); "
            "the leader promotes it once it has caught up"
        )


async def run_up_web(
    nodes: int, data_root: Path, port: int, tls: ClusterTls | None, time_scale: float
) -> None:
    """Start the nodes and the view; keep both until Ctrl-C (or SIGTERM), then stop every node."""
    live = LiveCluster(nodes, data_root, tls, time_scale)
    cluster = live.cluster
    deadline = 10.0 * max(1.0, time_scale)
    try:
        cluster.start()
        leader = await cluster.wait_for_leader(LEADER_TIMEOUT * max(1.0, time_scale))
        print(f"{nodes} nodes are up; node {leader} leads. Data in {data_root}")
        for node_id in cluster.node_ids:
            print(
                f"  node {node_id}: client {cluster.client_address(node_id)}, "
                f"pid {cluster.pid(node_id)}, log {cluster.log_path(node_id)}"
            )
        print(f"  {live.network.describe()}")
        client = live.client(deadline)
        view = web_view.View(
            client,
            live.addresses(),
            None if tls is None else tls.client_config(),
            live,
            title=f"{nodes} nodes on {HOST} (harness)",
            ids={cluster.client_address(n): n for n in cluster.node_ids},
        )
        print("Ctrl-C stops the view and every node.", flush=True)
        await web_view.run_until_stopped(view, port, say=lambda s: print(s, flush=True))
    finally:
        if live._client is not None:
            await live._client.close()
        running = cluster.running_nodes()
        if running:
            print(f"\nstopping {len(running)} nodes", flush=True)
        for node_id in running:
            if node_id in live.paused:
                cluster.resume_node(node_id)
            cluster.stop_node(node_id)
        cluster.stop()
