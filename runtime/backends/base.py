"""The worker-backend interface: the only thing a pool knows about where workers run.

It is deliberately narrow (start, stop, list by labels, wait for exit, logs) so that a
cluster engine can implement it later. Every call may be slow; pools call them from
helper threads, never from their mailbox.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

LABEL_CLIENT = "autonomite.client"
LABEL_POOL = "autonomite.pool"
LABEL_WORKER = "autonomite.worker"
LABEL_AGENT_NAME = "autonomite.agent_name"
LABEL_PORT = "autonomite.port"
LABEL_CREDENTIALS = "autonomite.credentials"  # a fingerprint, never the secret
LABEL_INSTANCE = "autonomite.instance"  # the runtime that owns the worker (runtime/instance.py)


class BackendError(Exception):
    """A backend call failed; the message is safe to log (it carries no secret)."""


def short_error(error: Exception) -> str:
    """The first line of an error (a Docker engine's, an OSError), cut to 300 characters, for a
    BackendError or a log; its type's name when it has no message."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


@dataclass(frozen=True)
class WorkerSpec:
    """Everything needed to start one worker. ``env`` holds secrets: never log it."""

    client_id: str
    worker_id: str
    agent_name: str
    status_port: int
    credentials_fp: str
    env: Mapping[str, str] = field(repr=False)
    cpu: float = 1.0
    memory_mb: int = 1024
    pids: int = 512  # processes and threads
    image: str = ""
    knowledge_dir: str | None = None  # the client's documents, read-only; no other client's
    placement: tuple[str, ...] = ()  # swarm backend: placement constraints

    @property
    def labels(self) -> dict[str, str]:
        return {
            LABEL_CLIENT: self.client_id,
            LABEL_POOL: self.client_id,
            LABEL_WORKER: self.worker_id,
            LABEL_AGENT_NAME: self.agent_name,
            LABEL_PORT: str(self.status_port),
            LABEL_CREDENTIALS: self.credentials_fp,
        }


@dataclass(frozen=True)
class WorkerHandle:
    """A running worker as the backend knows it: enough to stop, wait for or adopt it."""

    worker_id: str
    client_id: str
    agent_name: str
    status_port: int
    credentials_fp: str
    ref: str  # pid for processes, container id for containers
    status_host: str = "127.0.0.1"  # the node the worker runs on, as the runtime reaches it
    # A worker adopted from a dead runtime answers to the token that runtime gave it, which
    # differs from ours if the admin token changed meanwhile; empty: ours (the usual case).
    status_token: str = field(default="", repr=False, compare=False)

    @classmethod
    def from_labels(cls, labels: Mapping[str, str], ref: str, status_host: str = "127.0.0.1") -> WorkerHandle:
        return cls(
            worker_id=labels[LABEL_WORKER],
            client_id=labels[LABEL_CLIENT],
            agent_name=labels[LABEL_AGENT_NAME],
            status_port=int(labels[LABEL_PORT]),
            credentials_fp=labels.get(LABEL_CREDENTIALS, ""),
            ref=ref,
            status_host=status_host,
        )


class WorkerBackend(Protocol):
    name: str

    def start(self, spec: WorkerSpec) -> WorkerHandle:
        """Start a worker and return once it runs (not once it is ready)."""

    def stop(self, handle: WorkerHandle, timeout: float = 10.0) -> None:
        """Ask the worker to finish, and kill it after ``timeout``. Idempotent."""

    def list(self, client_id: str | None = None) -> list[WorkerHandle]:
        """Live workers this runtime started, optionally of one client."""

    def wait(self, handle: WorkerHandle) -> int:
        """Block until the worker exits; return its exit code."""

    def logs(self, handle: WorkerHandle, tail: int = 100) -> str:
        """The last lines the worker wrote."""

    def close(self) -> None:
        """Release the backend's own resources (not the workers)."""

    def warm(self) -> bool:
        """True once a worker starts at this backend's normal speed; until then the runtime
        is not ready (``/readyz``), even with every client at zero. Cheap: read on the
        gateway's event loop."""
