"""What a new runtime does with the workers a dead one left: pure decisions, no I/O.

The process backend records every worker it runs in a state file of its own
(``runtime/backends/instance_state.py``). A runtime that starts reads the files of runtimes
that are gone (killed, crashed) and, for each worker in them, decides here from what it
found: the process (is it still the one recorded, or was the pid reused?) and what the
worker says on its status port (with the token recorded for it).

- **adopt**: the worker is in a session (it has a job): it goes on, and this runtime
  follows it as leased until the session ends. It is never leased again: the worker
  itself refuses every claim once its runtime died (``agent/worker.py``).
- **remove**: alive but in no session (idle, starting, claimed with no job), or its
  status port does not say which worker it is: it would exit by itself
  (``agent/orphan.py``); removing it now frees its uid and cgroup before this runtime hands
  them out again.
- **gone**: it exited already; only what it left (its cgroup) is removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from agent.contract import Status
from runtime.backends.base import WorkerHandle

Verdict = Literal["adopt", "remove", "gone"]


@dataclass(frozen=True)
class WorkerRecord:
    """One worker as its runtime recorded it: enough to find, follow and clean up after it."""

    worker_id: str
    client_id: str
    agent_name: str
    status_port: int
    credentials_fp: str
    pid: int
    started: int  # the process's start time (/proc/PID/stat, clock ticks): tells a reused pid apart
    token: str = field(default="", repr=False)  # its status token: the state file is the runtime's alone
    uid: int | None = None
    cgroups: tuple[str, ...] = ()  # its cgroup directories
    cgroup_version: int = 1

    def handle(self) -> WorkerHandle:
        return WorkerHandle(self.worker_id, self.client_id, self.agent_name, self.status_port, self.credentials_fp,
                            ref=str(self.pid), status_token=self.token)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerRecord:
        """Raises KeyError, TypeError or ValueError for a record that is not one."""
        return cls(
            worker_id=str(data["worker_id"]), client_id=str(data["client_id"]), agent_name=str(data["agent_name"]),
            status_port=int(data["status_port"]), credentials_fp=str(data.get("credentials_fp", "")),
            pid=int(data["pid"]), started=int(data["started"]), token=str(data.get("token", "")),
            uid=None if data.get("uid") is None else int(data["uid"]),
            cgroups=tuple(str(c) for c in data.get("cgroups", ())), cgroup_version=int(data.get("cgroup_version", 1)),
        )


def runtime_gone(recorded_start: int, current_start: int | None) -> bool:
    """A runtime is gone when its pid is free or is another process's now."""
    return current_start != recorded_start


def verdict(record: WorkerRecord, current_start: int | None, status: Status | None) -> Verdict:
    """``current_start``: the start time of the process now at the recorded pid (None: no
    process). ``status``: what its status port answered (None: no answer)."""
    if current_start != record.started:
        return "gone"
    if status is None or status.get("worker_id") != record.worker_id:
        return "remove"
    if status.get("job_id") and status.get("state") in ("busy", "draining"):
        return "adopt"
    return "remove"
