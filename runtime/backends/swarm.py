"""The swarm backend: each warm worker is a one-replica Docker Swarm service, on any node.

Why one service per worker: a worker serves one session and exits, so it needs its own
identity (agent name, status port, token), its own exit and its own removal. A service
of 1 replica with restart condition ``none`` gives exactly that (``replicated-job`` is
avoided: on Docker 20.10 it leaves containers behind, moby/moby#44312 and #42789).

Each service runs the image **by ID** (with a tag, every task would first ask a registry),
with host networking, service and container labels (``autonomite.client/pool/worker``...,
and the runtime instance that owns it: a runtime lists, adopts and removes only its own),
the client's placement constraints (``pool.placement``; by default Swarm spreads the
tasks), and the same hardening as the docker backend (``containers.py``). Swarm does not
ship images between nodes: every node must have the image (``docker save | docker load``
it, see the README); a node without it rejects the task, and that rejection is the start's
error.

**Credentials as a Docker secret.** Everything the worker is told (its client's LiveKit
secret, its agents' provider keys, its status token, its settings) goes into one secret per
worker, mounted at ``/run/secrets/autonomite-worker``, owned by the client's uid, mode 0400
(``agent/boot.py`` reads it). The service spec holds only the file's path: ``docker service
inspect`` shows no secret. Swarm keeps secrets encrypted in its Raft log and sends one only
to the node that runs a task using it, on a tmpfs. The secret is removed with its service.

The runtime reaches each worker's status port at its node's address (``WorkerHandle
.status_host``), so the worker listens on all interfaces there, and answers only callers
with its token (``agent/contract.py``). A worker whose node is lost stops answering its
probes (so nobody leases it), and its task never reports an end: Swarm leaves it
"running" on a node it marks ``down`` (after the node misses its heartbeats, about 15 s).
So a task on a down node counts as ended: :meth:`wait` returns, the pool replaces the
worker on a node that is up, and adoption does not take it back. The same holds for a node
that is cut off but still runs (a partition): no log can be read from it (``docker service
logs`` on the manager never answers for its tasks), so none is asked for, and a worker's
log never holds up its end or its removal (``worker_logs.py``). When the node is back,
Swarm stops the task of the service we removed.

Ends and placements are read from one shared board (``swarm_board.py``), not polled per
worker. Every call may take seconds (the manager schedules, the node pulls nothing but starts a
container): the pool calls them from helper threads, never from its mailbox.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime
from pathlib import Path

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import Mount, Privileges, Resources, RestartPolicy, SecretReference, ServiceMode

from agent.contract import Env
from runtime.backends import containers
from runtime.backends.base import LABEL_INSTANCE, BackendError, WorkerHandle, WorkerSpec, short_error
from runtime.backends.swarm_board import Board, Ended, Placed, Unplaceable, current_task, ended, placed
from runtime.backends.uids import UidBook
from runtime.backends.worker_logs import WorkerLogs
from runtime.instance import Instance
from runtime.settings import CLIENT_UIDS, UidRange

logger = logging.getLogger("autonomite.swarm")

PLACED_TIMEOUT_S = 60.0  # a task not running on a node by then is a failed start
NODE_CHECK_S = 1.0  # how often the manager is asked which nodes are down, whoever asks
STARTING = {"new", "pending", "assigned", "accepted", "preparing", "ready", "starting"}
SETTINGS_FILE = "autonomite-worker"  # the secret's file name under /run/secrets
NO_NEW_PRIVILEGES_API = (1, 46)  # the first Engine API whose services take NoNewPrivileges (Engine 25)


class SwarmBackend:
    name = "swarm"

    def __init__(self, log_dir: Path, instance: Instance, engine_url: str | None = None,
                 client_uids: UidRange = CLIENT_UIDS) -> None:
        self._logs = WorkerLogs(log_dir)
        self._instance = instance
        self._uids = UidBook(client_uids)
        self._url = engine_url
        try:
            self._docker = self._engine()
            info = self._docker.info()
            api = tuple(int(n) for n in self._docker.version()["ApiVersion"].split("."))
        except DockerException as e:
            raise BackendError(f"swarm backend: cannot reach the Docker engine ({short_error(e)})") from None
        if info.get("Swarm", {}).get("ControlAvailable") is not True:
            raise BackendError("swarm backend: this Docker engine is not a swarm manager (docker swarm init)")
        self._no_new_privileges = api >= NO_NEW_PRIVILEGES_API  # older: the worker sets it itself (agent/boot.py)
        self._nodes: dict[str, str] = {}  # node id -> address, cached
        self._node_states = NodeStates(self._docker)
        # every wait() and every placement read one listing, of this runtime's services only
        self._board = Board(self._engine, f"{LABEL_INSTANCE}={instance.id}")

    def start(self, spec: WorkerSpec) -> WorkerHandle:
        uid, name = self._uids.uid(spec.client_id), _name(spec.client_id, spec.worker_id)
        settings = {**containers.environment(spec), Env.STATUS_HOST: "0.0.0.0"}  # reached at its node's address
        mounts = [Mount("/tmp", None, type="tmpfs", tmpfs_size=containers.TMP_MB * 2**20, tmpfs_mode=0o1777)]
        if spec.knowledge_dir:  # must exist at this path on the node: only this client's documents
            mounts.append(Mount(containers.KNOWLEDGE, spec.knowledge_dir, type="bind", read_only=True))
        try:
            image_id = self._docker.images.get(spec.image).id
        except ImageNotFound:
            raise BackendError(
                f"docker image {spec.image!r} not found on the manager (build it, and docker load it on every node)"
            ) from None
        labels = containers.labels(spec, self._instance.id)
        resources = Resources(cpu_limit=int(spec.cpu * 1e9), mem_limit=spec.memory_mb * 2**20)
        resources["Limits"]["Pids"] = spec.pids  # API 1.41; docker-py has no argument for it
        privileges = None
        if self._no_new_privileges:
            privileges = Privileges()
            privileges["NoNewPrivileges"] = True
        try:
            secret = self._docker.secrets.create(name=name, data=json.dumps(settings).encode(), labels=labels)
            service = self._docker.services.create(
                image_id,
                name=name,
                env=["HOME=/tmp", f"{Env.SETTINGS_FILE}=/run/secrets/{SETTINGS_FILE}"],  # no secret here
                secrets=[SecretReference(secret.id, name, filename=SETTINGS_FILE, uid=str(uid), gid=str(uid),
                                         mode=0o400)],
                user=f"{uid}:{uid}",
                cap_drop=["ALL"],
                read_only=True,
                privileges=privileges,
                labels=labels,
                container_labels=labels,
                mode=ServiceMode("replicated", replicas=1),
                restart_policy=RestartPolicy(condition="none"),
                resources=resources,
                constraints=list(spec.placement),
                networks=["host"],
                mounts=mounts,
                stop_grace_period=15 * 10**9,
            )
        except DockerException as e:
            self._remove(None, name)  # the secret, if it was made
            raise BackendError(f"swarm could not create worker {spec.worker_id}: {short_error(e)}") from None
        try:
            node = self._wait_placed(service.id)
        except BackendError:
            self._remove(service.id, name)
            raise
        return WorkerHandle.from_labels(spec.labels, ref=service.id[:12], status_host=node)

    def stop(self, handle: WorkerHandle, timeout: float = 10.0) -> None:
        """Remove the service: Swarm stops its task (SIGTERM, then SIGKILL after the grace
        period). Its log is saved first if it can be, in at most a few seconds."""
        self._retire(handle)

    def list(self, client_id: str | None = None) -> list[WorkerHandle]:
        """This runtime's services whose task still runs; ended ones found on the way are
        removed (and, listing every client, secrets whose service is gone)."""
        handles, names = [], set()
        for service in self._docker.services.list(filters={"label": containers.owned(self._instance.id, client_id)}):
            task = current_task(service.tasks())
            state = task["Status"]["State"] if task else "none"
            if task and (state == "running" or state in STARTING) and not self._node_states.down(task.get("NodeID")):
                node = self._node_address(task["NodeID"]) if task.get("NodeID") else "127.0.0.1"
                handles.append(WorkerHandle.from_labels(service.attrs["Spec"]["Labels"], ref=service.id[:12],
                                                        status_host=node))
                names.add(service.name)
                user = service.attrs["Spec"]["TaskTemplate"]["ContainerSpec"].get("User", "").partition(":")[0]
                if user.isdigit():  # an adopted worker keeps its uid: it stays its client's
                    self._uids.note(handles[-1].client_id, int(user))
            else:
                self._remove(service.id, service.name)
        if client_id is None:
            for secret in self._docker.secrets.list(filters={"label": containers.owned(self._instance.id)}):
                # A young one may belong to a start between its secret and its service.
                if secret.name not in names and _age_s(secret.attrs.get("CreatedAt")) > PLACED_TIMEOUT_S:
                    self._remove(None, secret.name)
        return handles

    def wait(self, handle: WorkerHandle) -> int:
        """Block until the worker's task ended, its service was removed, or its node is
        down (read from the board every worker shares), and return at once: its log is saved
        and its service removed on a thread of their own, so the end is never held up (and
        a last sweep at shutdown removes what that thread had no time for). An unreachable
        manager is waited out: returning early would have the pool start a replacement
        beside a service that may still run."""
        end = self._board.wait(lambda snap: ended(handle.ref[:12], snap, self._node_states.down))
        assert isinstance(end, Ended)  # no timeout: the board answers or waits on
        if end.why == "node_down":
            logger.warning("worker %s: its node is down; the worker counts as gone", handle.worker_id)
        if end.why != "removed":
            threading.Thread(target=self._retire, args=(handle, end.why != "node_down"), name=f"retire-{handle.worker_id}",
                             daemon=True).start()
        return end.code

    def logs(self, handle: WorkerHandle, tail: int = 100) -> str:
        try:
            chunks = self._docker.services.get(handle.ref).logs(stdout=True, stderr=True, tail=tail)
            return b"".join(chunks).decode(errors="replace")
        except (DockerException, StopIteration):
            return self._logs.tail(handle.client_id, handle.worker_id, tail)

    # -- internals -----------------------------------------------------------------------

    def _engine(self) -> docker.DockerClient:
        if self._url:
            return docker.DockerClient(base_url=self._url, version="auto", timeout=60)
        return docker.from_env(version="auto", timeout=60)

    def _wait_placed(self, service_id: str) -> str:
        """The address of the node the task runs on, once it runs; a rejection is an error."""
        where = self._board.wait(lambda snap: placed(service_id[:12], snap, self._node_states.down), PLACED_TIMEOUT_S)
        if where is None:
            raise BackendError(f"swarm task of service {service_id[:12]} not running within {PLACED_TIMEOUT_S:g} s")
        if isinstance(where, Unplaceable):
            raise BackendError(where.reason)
        assert isinstance(where, Placed)
        return self._node_address(where.node_id)

    def _node_address(self, node_id: str) -> str:
        if node_id not in self._nodes:
            self._nodes[node_id] = self._docker.nodes.get(node_id).attrs["Status"]["Addr"]
        return self._nodes[node_id]

    def _retire(self, handle: WorkerHandle, save_log: bool = True) -> None:
        """Save the worker's log (it goes with the service) unless its node is down, then
        remove the service whatever became of the log."""
        if save_log and not self._on_down_node(handle.ref[:12]):
            self._logs.save(handle.client_id, handle.worker_id, lambda: self._read_log(handle.ref))
        self._remove(handle.ref, _name(handle.client_id, handle.worker_id))

    def _on_down_node(self, service: str) -> bool:
        task = self._board.task(service)
        return task is not None and self._node_states.down(task.get("NodeID"))

    def _read_log(self, service_id: str) -> bytes:
        """The service's whole log, on a connection of its own: a read that hangs (a node the
        manager cannot reach) holds nothing but its own thread."""
        engine = self._engine()
        try:
            return b"".join(engine.services.get(service_id).logs(stdout=True, stderr=True))
        finally:
            engine.close()

    def _remove(self, service_id: str | None, name: str) -> None:
        """Remove a worker's service, then its secret (Swarm refuses to remove a secret a
        service still uses). Both share ``name``."""
        for what, remove, ref in (("service", self._docker.api.remove_service, service_id),
                                  ("secret", self._docker.api.remove_secret, name)):
            if ref is None:
                continue
            try:
                remove(ref)
            except NotFound:
                pass
            except APIError as e:
                logger.warning("removing %s %s: %s", what, ref[:40], short_error(e))

    def warm(self) -> bool:
        return True  # nothing to warm: a task starts from the image on its node

    def close(self) -> None:
        """Give up the instance id, and forget it if none of its workers is left."""
        try:
            left = bool(self.list())
        except DockerException:
            left = True
        self._instance.release(forget=not left)
        self._docker.close()


def _name(client_id: str, worker_id: str) -> str:
    """A worker's service and secret name."""
    return f"autonomite-{client_id}-{worker_id}"


class NodeStates:
    """Which nodes the manager has marked ``down``, read with one ``nodes.list()`` at most
    every NODE_CHECK_S however many workers ask (hundreds of waiters share it).

    Only ``down`` counts: Swarm says so after missed heartbeats and then gives up on the
    node's tasks itself. ``disconnected`` is a node looking for a manager for a moment;
    its workers are fine and must not be removed. A node the manager no longer lists has
    left the swarm: lost too. Called from helper threads; the lock guards the snapshot."""

    def __init__(self, engine: docker.DockerClient) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._states: dict[str, str] = {}
        self._read_at = -NODE_CHECK_S

    def down(self, node_id: str | None) -> bool:
        if not node_id:
            return False
        with self._lock:
            if time.monotonic() - self._read_at >= NODE_CHECK_S:
                try:
                    self._states = {n.id: n.attrs["Status"]["State"] for n in self._engine.nodes.list()}
                    self._read_at = time.monotonic()
                except (DockerException, OSError) as e:  # keep the last view; the next call retries
                    logger.warning("reading the swarm's nodes: %s", short_error(e))
            return bool(self._states) and self._states.get(node_id, "down") == "down"


def _age_s(created_at: str | None) -> float:
    """Seconds since an engine timestamp (RFC 3339); unreadable counts as old."""
    try:
        return time.time() - datetime.fromisoformat((created_at or "").replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("inf")
