"""What every container worker gets, on the docker and swarm backends alike.

One place for the hardening, so the two backends cannot drift apart:

- **its client's uid** (``uids.py``), gid the same, no supplementary group;
- **every capability dropped** and **no new privileges** (setuid bits, file capabilities:
  the image has none either, ``agent/Dockerfile`` strips them);
- **a read-only root filesystem**, with a small ``/tmp`` tmpfs (the job runner's IPC, and
  ``HOME``): ``nosuid,nodev,noexec``, counted in the container's memory limit;
- **a pids limit** (``clients[].pool.pids``) beside the CPU and memory limits, and no swap
  beyond the memory limit, so an allocation past it is killed, not swapped;
- **the label of the runtime instance that owns it** (``runtime/instance.py``): a runtime
  lists, adopts, removes and stops only containers with its own instance label.
"""

from __future__ import annotations

from agent.contract import Env
from runtime.backends.base import LABEL_CLIENT, LABEL_INSTANCE, LABEL_WORKER, WorkerSpec

TMP_MB = 64
TMP_OPTIONS = f"rw,nosuid,nodev,noexec,size={TMP_MB}m,mode=1777"
KNOWLEDGE = "/knowledge"  # where a client's documents are mounted, read-only


def labels(spec: WorkerSpec, instance_id: str) -> dict[str, str]:
    return {**spec.labels, LABEL_INSTANCE: instance_id}


def owned(instance_id: str, client_id: str | None = None) -> list[str]:
    """The label filter for this runtime's workers (of one client)."""
    client = f"{LABEL_CLIENT}={client_id}" if client_id else LABEL_CLIENT
    return [f"{LABEL_INSTANCE}={instance_id}", client, LABEL_WORKER]


def environment(spec: WorkerSpec) -> dict[str, str]:
    """The worker's settings and credentials, plus what a read-only root needs."""
    env = {**spec.env, "HOME": "/tmp"}  # the image's home is read-only, and not this uid's
    if spec.knowledge_dir:
        env[Env.KNOWLEDGE_DIR] = KNOWLEDGE
    return env
