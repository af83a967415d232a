"""The swarm backend on two nodes: two network namespaces, one dockerd each, one swarm.

Node A (the manager) runs the runtime, livekit-server and this module's test code (the
fixture moves the test thread into A's namespace); node B is a worker node. They reach
each other only over the veth pair the fixture made, at 10.231.0.1 and 10.231.0.2, so a
worker on B registers with LiveKit and answers its status probes across a real link.

Everything the test thread starts while in A's namespace stays there: request no
session-wide fixture here (``lk_a``, ``lk_b``) that this module would be first to start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from runtime.dev.devserver import LiveKitServer
from tests.netns import NetNs, inside, link
from tests.support import Client, LiveKitProject, Serve, new_secret, wait_until
from tests.swarm_stack import PrivateSwarm, save_image

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and iproute2")


@dataclass
class Nodes:
    a: PrivateSwarm  # the manager, where the runtime runs
    b: PrivateSwarm  # a worker node, labelled tier=voice
    livekit: LiveKitProject
    image: str

    @property
    def backend(self) -> dict:
        return {"backend": "swarm", "workers": {"image": self.image, "engine_url": self.a.url}}


@pytest.fixture(scope="module")
def nodes(docker_worker_image, log_root):
    with contextlib.ExitStack() as teardown:  # in reverse: LiveKit, node B, node A, the namespaces
        ns_a, ns_b = NetNs().create(teardown), NetNs().create(teardown)
        link(ns_a, ns_b)
        a = PrivateSwarm(log_root / "dockerd-node-a.log", ns_a)
        teardown.callback(a.stop)
        b = PrivateSwarm(log_root / "dockerd-node-b.log", ns_b)
        teardown.callback(b.stop)
        a.start()
        b.start(init=False).join(a)
        node_b = a.engine.nodes.get(b.node_id)
        node_b.update({**node_b.attrs["Spec"], "Labels": {"tier": "voice"}})
        image = docker_worker_image["image"]
        with contextlib.closing(docker.from_env(version="auto", timeout=600)) as shared, \
                tempfile.TemporaryDirectory(prefix="asw-image-") as folder:
            archive = save_image(shared, image, Path(folder) / "image.tar")
            a.load(archive, image), b.load(archive, image)  # Swarm ships no images: every node loads it
        with inside(ns_a):
            key = "nodeskey"
            server = LiveKitServer({key: (secret := new_secret("nodes-lk-secret"))}, host=ns_a.address,
                                   log_path=log_root / "livekit-nodes.log")
            teardown.callback(server.stop)
            server.start()
            yield Nodes(a, b, LiveKitProject(server, key, secret), image)
    # Nothing is left: no namespace (with it the veth and swarm's bridges), no engine root.
    assert not {ns_a.name, ns_b.name} & set(os.listdir("/var/run/netns"))
    assert not a.root.exists() and not b.root.exists()


def placement(nodes: Nodes, client_id: str) -> dict[str, str]:
    """worker id -> the node ("a" or "b") its running task is on, as the manager sees it."""
    names = {nodes.a.node_id: "a", nodes.b.node_id: "b"}
    placed = {}
    for service in nodes.a.engine.services.list(filters={"label": f"autonomite.client={client_id}"}):
        running = [t for t in service.tasks() if t["Status"]["State"] == "running"]
        if running:
            placed[service.attrs["Spec"]["Labels"]["autonomite.worker"]] = names.get(running[0]["NodeID"], "?")
    return placed


def in_room(nodes: Nodes, room: str, worker_id: str) -> bool:
    return f"agent-{worker_id}" in [p.identity for p in nodes.livekit.active_agents(room)]


def no_workers_left(nodes: Nodes) -> bool:
    return not nodes.a.engine.services.list() and not nodes.a.engine.secrets.list() \
        and not nodes.a.containers() and not nodes.b.containers()


def test_placement_puts_a_clients_workers_on_the_node_it_names(nodes, run_serve):
    bravo = Client("bravo", nodes.livekit, min_idle=2, max_size=3, placement=["node.labels.tier==voice"])
    serve = run_serve([bravo], **nodes.backend)
    placed = placement(nodes, "bravo")
    assert len(placed) == 2 and set(placed.values()) == {"b"}, placed
    assert len(nodes.b.containers()) == 2 and not nodes.a.containers()

    r = serve.trigger(bravo, "room-node-b")
    assert r.status == 200, r.body
    assert placed[r.body["worker_id"]] == "b"
    # The agent on node B joined over the link: signalling and media to LiveKit on node A.
    wait_until(lambda: in_room(nodes, "room-node-b", r.body["worker_id"]), 30, "the agent from node B in the room")
    nodes.livekit.delete_room("room-node-b")
    serve.stop()
    wait_until(lambda: no_workers_left(nodes), 90, "every service and container of the test gone")


def node_b_state(nodes: Nodes) -> str:
    return nodes.a.engine.nodes.get(nodes.b.node_id).attrs["Status"]["State"]


@contextlib.contextmanager
def partitioned(nodes: Nodes):
    """Node B cut off for the block: its end of the link down, its dockerd and containers
    still running. Then the link is back, and so is B (ready) before the next test."""
    nodes.b.netns.cut()
    try:
        yield
    finally:
        nodes.b.netns.cut(False)
        wait_until(lambda: node_b_state(nodes) == "ready", 90, "node B back in the swarm", interval=0.5)


def two_workers_one_on_each_node(nodes: Nodes, run_serve) -> tuple[Client, Serve, str]:
    """alpha with 2 idle workers, unconstrained: Swarm puts one on each node. Returns B's."""
    wait_until(lambda: no_workers_left(nodes), 90, "a clean swarm")
    alpha = Client("alpha", nodes.livekit, min_idle=2, max_size=3)
    serve = run_serve([alpha], **nodes.backend)
    placed = wait_until(lambda: len(p := placement(nodes, "alpha")) == 2 and p, 30, "two placed workers")
    # Swarm spreads by the nodes' task counts: one worker on each node.
    assert sorted(placed.values()) == ["a", "b"], placed
    [on_b] = [w for w, node in placed.items() if node == "b"]
    return alpha, serve, on_b


def test_a_partitioned_node_s_workers_leave_the_pool_once_it_is_down(nodes, run_serve):
    """The link is cut, not the node stopped: B's dockerd and its worker run on, unreachable,
    and the manager cannot read that worker's log. Its end and removal must not wait on it."""
    alpha, serve, lost = two_workers_one_on_each_node(nodes, run_serve)
    with partitioned(nodes):
        cut_at = time.monotonic()
        wait_until(lambda: node_b_state(nodes) == "down", 60, "the manager to mark node B down", interval=0.25)
        down_at = time.monotonic()
        wait_until(lambda: lost not in {w["id"] for w in serve.pool("alpha")["workers"]}, 5,
                   "the partitioned node's worker out of the pool within 5 s of `down`")
        left_at = time.monotonic()

        def replaced() -> bool:
            pool, where = serve.pool("alpha"), placement(nodes, "alpha")
            return pool["idle"] >= 2 and all(where.get(w["id"]) == "a" for w in pool["workers"])

        wait_until(replaced, 30, "min_idle again, on node A only", interval=0.25)
        print(f"partition: B down {down_at - cut_at:.1f} s after the cut; its worker left the pool "
              f"{left_at - down_at:.1f} s later; min_idle on A {time.monotonic() - down_at:.1f} s after down")
        assert len(serve.pool("alpha")["workers"]) <= 3
        r = serve.trigger(alpha, "room-partition")
        assert r.status == 200, r.body
        wait_until(lambda: in_room(nodes, "room-partition", r.body["worker_id"]), 30, "the agent in the room")
        nodes.livekit.delete_room("room-partition")
    # Back on the link, B learns that the lost worker's service is gone and stops its task.
    wait_until(lambda: not [c for c in nodes.b.containers() if c.labels.get("autonomite.worker") == lost], 60,
               "the lost worker's container gone from node B", interval=0.5)
    assert serve.stop() == 0
    wait_until(lambda: no_workers_left(nodes), 90, "every service and container of the test gone")


def test_a_runtime_stopped_during_a_partition_exits_promptly_and_leaves_no_service(nodes, run_serve):
    """Stopped just after the cut, before B is marked down: the worker on B cannot give its
    log, and stopping it must not wait for it longer than the log's bound."""
    _, serve, _ = two_workers_one_on_each_node(nodes, run_serve)
    with partitioned(nodes):
        began = time.monotonic()
        code = serve.stop(timeout=60)
        took = time.monotonic() - began
        print(f"serve stopped {took:.1f} s after SIGTERM with node B cut off")
        assert code == 0 and took < 20, (code, took)
        assert nodes.a.engine.services.list() == [], "every service removed on the manager"
    wait_until(lambda: no_workers_left(nodes), 90, "node B's container stopped once it is back")


def test_a_lost_node_s_workers_are_replaced_on_the_node_that_is_left(nodes, run_serve):
    """Runs last: it stops node B for good."""
    alpha, serve, lost = two_workers_one_on_each_node(nodes, run_serve)

    nodes.b.stop_engine()  # node B is gone: its dockerd stops, and with it its containers
    gone_at = time.monotonic()
    # A trigger now gets an agent in the room, never the lost worker; or a clear refusal.
    r = serve.trigger(alpha, "room-during-loss")
    if r.status == 200:
        assert r.body["worker_id"] != lost
        wait_until(lambda: in_room(nodes, "room-during-loss", r.body["worker_id"]), 30, "the agent in the room")
        nodes.livekit.delete_room("room-during-loss")
    else:
        assert r.status == 503 and r.body["error"], r.body

    def replaced() -> bool:
        pool = serve.pool("alpha")
        ids = {w["id"] for w in pool["workers"]}
        return lost not in ids and pool["idle"] >= 2 and set(placement(nodes, "alpha").values()) == {"a"}

    # Bounded by Swarm's own verdict (a node that misses its heartbeats is down, ~10-15 s)
    # and a start on A; well under the 60 s after which a worker that lost LiveKit would be
    # replaced anyway, so this waits on the node-loss path itself.
    wait_until(replaced, 40, "the lost worker replaced on node A")
    print(f"node B lost: its worker replaced on node A after {time.monotonic() - gone_at:.1f} s")
    assert nodes.a.engine.nodes.get(nodes.b.node_id).attrs["Status"]["State"] == "down"

    r = serve.trigger(alpha, "room-after-loss")
    assert r.status == 200, r.body
    assert placement(nodes, "alpha")[r.body["worker_id"]] == "a"
    wait_until(lambda: in_room(nodes, "room-after-loss", r.body["worker_id"]), 30, "the agent in the room")
    nodes.livekit.delete_room("room-after-loss")
