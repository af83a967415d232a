"""The docker backend: each worker is a container on a Docker engine (docker SDK).

Containers are labelled (client, pool, worker, agent name, status port, config
fingerprint, and the runtime instance that owns them) and named
``autonomite-<client>-<worker id>``, so a restarted runtime finds and adopts its own, and
leaves every other runtime's alone. They use host networking (to reach LiveKit and serve
the status port on loopback), carry only their own client's credentials in their
environment, run hardened as ``containers.py`` says (their client's uid, no capability,
no new privileges, a read-only root, CPU, memory and pids limits), and have no restart
policy: the pool replaces dead workers itself. When a container exits its log is saved to
``<log_dir>/<client>/<worker>.log`` (best effort, at most a few seconds: ``worker_logs.py``)
and the container removed, whether or not its log could be saved.
"""

from __future__ import annotations

import logging
from pathlib import Path

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container

from runtime.backends import containers
from runtime.backends.base import LABEL_CLIENT, LABEL_WORKER, BackendError, WorkerHandle, WorkerSpec, short_error
from runtime.backends.uids import UidBook
from runtime.backends.worker_logs import WorkerLogs
from runtime.instance import Instance
from runtime.settings import CLIENT_UIDS, UidRange

logger = logging.getLogger("autonomite.docker")


def _engine() -> docker.DockerClient:
    return docker.from_env(version="auto", timeout=60)


class DockerBackend:
    name = "docker"

    def __init__(self, log_dir: Path, instance: Instance, volumes: list[str] | None = None,
                 client_uids: UidRange = CLIENT_UIDS) -> None:
        self._logs = WorkerLogs(log_dir)
        self._instance = instance
        self._uids = UidBook(client_uids)
        self._volumes = volumes or []
        try:
            self._docker = _engine()
            self._docker.ping()
        except DockerException as e:
            raise BackendError(f"docker backend: cannot reach the Docker engine ({short_error(e)})") from None

    def start(self, spec: WorkerSpec) -> WorkerHandle:
        uid, volumes = self._uids.uid(spec.client_id), list(self._volumes)
        if spec.knowledge_dir:  # only this client's documents are mounted, read-only
            volumes.append(f"{spec.knowledge_dir}:{containers.KNOWLEDGE}:ro")
        try:
            # create + start, not run: run would try to pull a missing image from a registry.
            container = self._docker.containers.create(
                spec.image,
                name=f"autonomite-{spec.client_id}-{spec.worker_id}",
                labels=containers.labels(spec, self._instance.id),
                environment=containers.environment(spec),
                user=f"{uid}:{uid}",
                network_mode="host",
                nano_cpus=int(spec.cpu * 1e9),
                mem_limit=f"{spec.memory_mb}m",
                memswap_limit=f"{spec.memory_mb}m",  # no swap: past the limit is the OOM killer
                pids_limit=spec.pids,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges:true"],
                read_only=True,
                tmpfs={"/tmp": containers.TMP_OPTIONS},  # the job runner's IPC, and HOME
                restart_policy={"Name": "no"},
                volumes=volumes,
            )
            try:
                container.start()
            except DockerException:
                container.remove(force=True)
                raise
        except ImageNotFound:
            raise BackendError(f"docker image {spec.image!r} not found on this engine (build or load it)") from None
        except DockerException as e:
            raise BackendError(f"docker could not start worker {spec.worker_id}: {short_error(e)}") from None
        return WorkerHandle.from_labels(spec.labels, ref=container.id[:12])

    def stop(self, handle: WorkerHandle, timeout: float = 10.0) -> None:
        try:
            container = self._docker.containers.get(handle.ref)
            container.stop(timeout=int(timeout))
            self._save_and_remove(container)  # no exited container is left behind
        except NotFound:
            pass
        except APIError as e:
            logger.warning("stopping %s: %s", handle.ref, short_error(e))

    def list(self, client_id: str | None = None) -> list[WorkerHandle]:
        """Running containers with our labels. Dead ones found on the way are removed."""
        handles = []
        for c in self._docker.containers.list(all=True, filters={"label": containers.owned(self._instance.id, client_id)},
                                              ignore_removed=True):
            if c.status == "running":
                handles.append(WorkerHandle.from_labels(c.labels, ref=c.id[:12]))
                uid = (c.attrs["Config"].get("User") or "").partition(":")[0]
                if uid.isdigit():  # an adopted container keeps its uid: it stays its client's
                    self._uids.note(c.labels[LABEL_CLIENT], int(uid))
            else:
                self._save_and_remove(c)
        return handles

    def wait(self, handle: WorkerHandle) -> int:
        # A wait holds an HTTP connection for the container's whole life: give it its own
        # client, so waits never starve the shared connection pool.
        engine = _engine()
        try:
            container = engine.containers.get(handle.ref)
            code = int(container.wait().get("StatusCode", -1))
            self._save_and_remove(container)
            return code
        except NotFound:
            return -1
        finally:
            engine.close()

    def logs(self, handle: WorkerHandle, tail: int = 100) -> str:
        try:
            log: bytes = self._docker.containers.get(handle.ref).logs(tail=tail)
            return log.decode(errors="replace")
        except NotFound:
            return self._logs.tail(handle.client_id, handle.worker_id, tail)

    def warm(self) -> bool:
        return True  # nothing to warm: a container starts from the image on the engine

    def close(self) -> None:
        """Give up the instance id, and forget it if none of its containers is left."""
        try:
            left = bool(self.list())
        except DockerException:
            left = True
        self._instance.release(forget=not left)
        self._docker.close()

    def _save_and_remove(self, container: Container) -> None:
        """Save the log if it can be, then remove the container in any case: a full or
        read-only log directory must not leave exited containers behind."""
        labels = container.labels
        self._logs.save(labels.get(LABEL_CLIENT, "unknown"), labels.get(LABEL_WORKER, container.id[:12]), container.logs)
        try:
            container.remove(force=True)
        except NotFound:
            pass
        except APIError as e:
            logger.warning("removing container %s: %s", container.id[:12], short_error(e))
