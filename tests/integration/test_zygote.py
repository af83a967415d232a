"""The zygote (process backend): forked workers are real, isolated, and never orphaned."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

from actors._watch import read_status
from agent.contract import StatusAddress, WorkerConfig
from runtime.backends import ProcessBackend, WorkerSpec
from runtime.backends.ports import free_port
from tests.support import (
    Client,
    children_of,
    comm,
    kill_worker,
    pid_alive,
    proc_stat,
    process_memory,
    wait_until,
)


def zygote_of(pid: int) -> int:
    return wait_until(lambda: next((p for p in children_of(pid) if comm(p) == "zygote"), None), 60, "the zygote")


def refs(serve, client_id: str) -> set[str]:
    return {w["ref"] for w in serve.pool(client_id)["workers"]}


def assert_forked(pid: int, runtime_pid: int) -> None:
    state, ppid, session = proc_stat(pid)
    assert comm(pid) == "worker", "not forked by the zygote"
    assert ppid == runtime_pid, "a forked worker is the runtime's child, not the zygote's"
    assert session == pid, "a forked worker leads its own session"
    ignored = int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("SigIgn:")).split()[1], 16)
    assert ignored & (1 << (signal.SIGPIPE - 1)), "SIGPIPE stays ignored, as in a fresh interpreter"


def test_a_worker_forked_for_one_client_never_holds_another_clients_secrets(run_serve, lk_a, lk_b):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=2, agents=[{"name": "a", "system_prompt": "Alpha's own prompt"}])
    beta = Client("beta", lk_b, min_idle=1, max_size=2, agents=[{"name": "b", "system_prompt": "Beta's own prompt"}])
    serve = run_serve([alpha, beta])
    first_alpha = refs(serve, "alpha").pop()
    # Replace alpha's worker: the zygote has forked beta's worker by now, then forks alpha's again.
    kill_worker(serve, first_alpha)
    wait_until(lambda: (r := refs(serve, "alpha")) and first_alpha not in r and serve.pool("alpha")["idle"] == 1,
               60, "alpha's worker replaced")
    forbidden_everywhere = [alpha.token, beta.token, serve.admin]
    for client, own, other in ((alpha, lk_a, lk_b), (beta, lk_b, lk_a)):
        ref = refs(serve, client.id).pop()
        assert_forked(int(ref), serve.proc.pid)
        memory = process_memory(int(ref))
        assert own.secret.encode() in memory and f"{client.id.title()}'s own prompt".encode() in memory
        assert other.secret.encode() not in memory
        assert ("Beta's own prompt" if client is alpha else "Alpha's own prompt").encode() not in memory
        assert not any(s.encode() in memory for s in forbidden_everywhere)
    zygote = zygote_of(serve.proc.pid)
    memory = process_memory(zygote)
    for secret in (lk_a.secret, lk_b.secret, *forbidden_everywhere, "Alpha's own prompt", "Beta's own prompt"):
        assert secret.encode() not in memory, "the zygote holds no client data"
    assert len(os.listdir(f"/proc/{zygote}/task")) == 1
    log = (serve.config.parent / "workers" / "zygote.log").read_text()
    forks = [line for line in log.splitlines() if line.startswith("forked worker")]
    assert len(forks) >= 3 and all("with 1 thread(s)" in line for line in forks), log


def spec_for(project, worker_id: str) -> WorkerSpec:
    port = free_port()
    agent_name = f"z--{worker_id}"
    return WorkerSpec(
        client_id="z", worker_id=worker_id, agent_name=agent_name, status_port=port, credentials_fp="",
        env={
            "LIVEKIT_URL": project.url, "LIVEKIT_API_KEY": project.key, "LIVEKIT_API_SECRET": project.secret,
            **WorkerConfig(worker_id, "z", agent_name, port, []).to_env(),
        },
    )


def test_a_dead_zygote_falls_back_to_plain_starts_comes_back_and_orphans_nothing(lk_a, tmp_path: Path):
    backend = ProcessBackend(tmp_path / "workers", zygote=True)
    handles = []
    try:
        def start_registered() -> int:
            spec = spec_for(lk_a, uuid.uuid4().hex[:8])
            handles.append(backend.start(spec))
            address = StatusAddress("127.0.0.1", spec.status_port)
            wait_until(lambda: (read_status(address) or {}).get("registered"), 60, "the worker registered")
            return int(handles[-1].ref)

        forked = start_registered()
        assert_forked(forked, os.getpid())
        first_zygote = backend.zygote.pid
        os.kill(first_zygote, signal.SIGKILL)
        plain = start_registered()  # at once: the zygote is dead and not back yet
        assert comm(plain) != "worker" and b"-m\0agent\0" in Path(f"/proc/{plain}/cmdline").read_bytes()
        wait_until(lambda: backend.zygote.pid not in (None, first_zygote), 60, "the zygote to come back")
        assert_forked(start_registered(), os.getpid())
        # The worker forked by the dead zygote lives on, as the runtime's child.
        assert pid_alive(forked) and proc_stat(forked)[1] == os.getpid()
        assert backend.list("z") == handles
        for h in handles:
            backend.stop(h)
        assert [backend.wait(h) for h in handles] == [0, 0, 0]
    finally:
        for h in handles:
            backend.stop(h)
        zygote = backend.zygote.pid
        backend.close()
    wait_until(lambda: zygote is None or not pid_alive(zygote), 10, "the zygote to exit once the runtime lets go")


def test_sigkill_of_serve_leaves_no_zygote_and_no_worker(run_serve, lk_a):
    alpha = Client("alpha", lk_a, min_idle=2, max_size=3)
    serve = run_serve([alpha])
    zygote = zygote_of(serve.proc.pid)
    workers = [int(r) for r in refs(serve, "alpha")]
    for pid in workers:
        assert_forked(pid, serve.proc.pid)
    cgroups = [Path(f"/sys/fs/cgroup/{c}{line.split(':', 2)[2]}").parent for c in ("memory", "pids")
               for line in Path(f"/proc/{workers[0]}/cgroup").read_text().splitlines() if line.split(":")[1] == c]
    assert all(p.name.startswith(f"autonomite-{serve.proc.pid}-") for p in cgroups), cgroups
    serve.proc.send_signal(signal.SIGKILL)
    serve.proc.wait(10)
    wait_until(lambda: not any(pid_alive(p) for p in [zygote, *workers]), 30, "the zygote and every worker gone")
    # Its cgroups outlive it (nobody was left to remove them); the next runtime removes them.
    from runtime.cgroups import sweep_stale

    for parent in cgroups:
        sweep_stale(parent.parent, f"autonomite-{os.getpid()}-x")
    assert not any(p.exists() for p in cgroups)


def test_serve_keeps_its_pools_full_while_the_zygote_is_down_and_gets_it_back(run_serve, lk_a):
    alpha = Client("alpha", lk_a, min_idle=2, max_size=3)
    serve = run_serve([alpha])
    first_zygote = zygote_of(serve.proc.pid)
    survivor, victim = sorted(refs(serve, "alpha"))
    os.kill(first_zygote, signal.SIGKILL)
    kill_worker(serve, victim)
    wait_until(lambda: (r := refs(serve, "alpha")) and victim not in r and serve.pool("alpha")["idle"] == 2,
               60, "the pool refilled")
    wait_until(lambda: zygote_of(serve.proc.pid) != first_zygote, 60, "a new zygote")
    # The worker forked by the dead zygote was never orphaned: still the runtime's, still serving.
    assert pid_alive(int(survivor)) and proc_stat(int(survivor))[1] == serve.proc.pid
    serve.start_session(alpha, "room-after-zygote-death")
