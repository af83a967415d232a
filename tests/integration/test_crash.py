"""A crash of ``serve`` cuts no call (process backend). Real livekit-server, a real ``serve``
killed with SIGKILL, a real end user in the room who keeps talking to the agent.

- the worker in the session outlives serve, the next serve adopts it as leased, never
  leases it again, and removes it (process, cgroup, record) once the call ends;
- the idle workers of the dead serve exit by themselves within seconds;
- a session that no runtime adopts ends at ``runtime.workers.orphan_timeout_s``, its agent
  saying why, and its worker exits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from agent.orphan import END_MESSAGE
from runtime.backends.instance_state import start_time
from runtime.cgroups import sweep_stale
from tests.integration.test_drain import Caller
from tests.support import Client, Serve, pid_alive, wait_until

IDLE_EXIT_S = 5.0  # "within a few seconds": the lifeline's end of file is immediate; the rest is the exit


def _workers(serve: Serve, state: str | None = None) -> dict[str, int]:
    return {w["id"]: int(w["ref"]) for w in serve.pool("alpha").get("workers", ())
            if state is None or w["state"] == state}


def _cgroups(pid: int) -> list[Path]:
    """The worker's own cgroup directories (v1: one per controller; v2: one)."""
    found = []
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:  # it has just exited
        return []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers in ("memory", "pids") or (controllers == "" and len(line.split(":")[0]) == 1):
            found.append(Path("/sys/fs/cgroup", controllers, path.lstrip("/")))
    return [p for p in found if p.name.startswith("worker-")]


def _records(serve: Serve) -> list[dict]:
    r = serve.get("/api/v1/sessions", token=serve.admin)
    assert r.status == 200, r.body
    return r.body["sessions"]


def _state_files(serve: Serve) -> list[Path]:
    return sorted((serve.config.parent / "state").glob("*.json"))  # runtime.state_dir (tests/support.py)


def _kill(serve: Serve) -> None:
    serve.proc.send_signal(signal.SIGKILL)
    serve.proc.wait(10)


def test_sigkill_of_serve_cuts_no_call_and_the_next_serve_adopts_it(run_serve, lk_a):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=4)
    serve = run_serve([alpha])
    session = serve.start_session(alpha, "room-crash").body
    worker_id = session["worker_id"]
    wait_until(lambda: len(_workers(serve, "idle")) == 1, 60, "the idle floor refilled")
    pid = _workers(serve)[worker_id]
    idle = list(_workers(serve, "idle").values())
    cgroups = _cgroups(pid)
    assert cgroups, "isolation gives each worker a cgroup"
    first_pid = serve.proc.pid
    assert [p.name for p in _state_files(serve)][:1] == [f"{first_pid}-{start_time(first_pid)}.json"]
    given: list[str] = []

    async def call() -> None:
        caller = Caller(session)
        await caller.join()
        await asyncio.to_thread(_kill, serve)
        killed = time.monotonic()
        assert (await caller.ask("are you there without a runtime?")).endswith("are you there without a runtime?")
        await asyncio.to_thread(wait_until, lambda: not any(pid_alive(p) for p in idle), IDLE_EXIT_S,
                                "the idle worker to exit by itself")
        assert time.monotonic() - killed < IDLE_EXIT_S + 5
        await asyncio.to_thread(serve.start)  # the next serve: same config, as systemd restarts it
        await asyncio.to_thread(wait_until, lambda: _workers(serve, "leased") == {worker_id: pid}, 10,
                                "the new serve to list the adopted worker as leased")
        assert f"adopted worker {worker_id} of client alpha (pid {pid})" in serve.log()
        for n in range(3):  # new triggers: never the adopted worker
            r = await asyncio.to_thread(serve.trigger, alpha, f"room-after-{n}")
            assert r.status == 200, r.body
            given.append(r.body["worker_id"])
            await asyncio.to_thread(wait_until, lambda: lk_a.active_agents(f"room-after-{n}"), 30, "the agent")
            await asyncio.to_thread(lk_a.delete_room, f"room-after-{n}")
            assert (await caller.ask(f"still here {n}")).endswith(f"still here {n}")
        assert not caller.agent_left.is_set()
        await caller.leave()

    asyncio.run(asyncio.wait_for(call(), 180))
    assert worker_id not in given and len(set(given)) == 3
    # The call ended: the adopted worker exits, and what it had goes with it.
    wait_until(lambda: not pid_alive(pid) and worker_id not in _workers(serve), 30, "the adopted worker to end")
    wait_until(lambda: not any(p.exists() for p in cgroups), 10, "its cgroup removed")
    assert not any(p.parent.exists() for p in cgroups), "the dead runtime's parent cgroup is removed"
    assert serve.get("/readyz").status == 200 and _workers(serve, "idle")
    # Its record and exit cause are kept: its log, and the pool's account of how it ended.
    assert f"pool alpha: worker {worker_id} exited (session_end, code 0)" in serve.log()
    # No session record is lost to the SIGKILL: the one the dead serve answered is closed by
    # the next one, with the end its adopted worker reported.
    records = wait_until(lambda: len(r := _records(serve)) == 4 and all(s["ended_at"] for s in r) and r, 30,
                         "every record closed")
    assert {s["room"]: s["end_cause"] for s in records} == {
        "room-crash": "user_left", **{f"room-after-{n}": "room_deleted" for n in range(3)}}
    assert next(s for s in records if s["room"] == "room-crash")["id"] == session["session_id"]
    assert (serve.config.parent / "workers" / "alpha" / f"{worker_id}.log").stat().st_size > 0
    everyone = list(_workers(serve).values())
    parents = {c.parent for p in everyone for c in _cgroups(p)}
    assert parents and not any(p.name.startswith(f"autonomite-{first_pid}-") for p in parents)
    assert serve.stop() == 0
    wait_until(lambda: not any(pid_alive(p) for p in everyone), 10, "every worker gone")
    assert _state_files(serve) == [], "a clean stop leaves no state file"
    assert not any(p.exists() for p in parents), "the runtime's cgroups are removed"


def test_a_session_nobody_adopts_ends_at_the_bound_and_idle_workers_exit_at_once(run_serve, lk_a):
    alpha = Client("alpha", lk_a, min_idle=2, max_size=3)
    bound = 8
    serve = run_serve([alpha], workers={"orphan_timeout_s": bound})
    session = serve.start_session(alpha, "room-orphan").body
    wait_until(lambda: len(_workers(serve, "idle")) == 2, 60, "the idle floor refilled")
    pid = _workers(serve)[session["worker_id"]]
    idle = list(_workers(serve, "idle").values())
    cgroups = _cgroups(pid)

    async def call() -> tuple[float, float, float, str]:
        caller = Caller(session)
        await caller.join()
        killed = time.monotonic()  # before the signal: the bound counts from the worker's noticing
        await asyncio.to_thread(_kill, serve)
        await asyncio.to_thread(wait_until, lambda: not any(pid_alive(p) for p in idle), IDLE_EXIT_S,
                                "the idle workers to exit by themselves")
        idle_gone = time.monotonic() - killed
        assert (await caller.ask("hello?")).endswith("hello?")  # the call goes on meanwhile
        said = await caller.heard(bound + 10)  # nothing more is asked: only the end can come
        heard_at = time.monotonic() - killed
        await asyncio.wait_for(caller.agent_left.wait(), 15)
        await caller.leave()
        return idle_gone, heard_at, time.monotonic() - killed, said

    try:
        idle_gone, heard_at, left_at, said = asyncio.run(asyncio.wait_for(call(), 90))
        assert said == END_MESSAGE
        # Not before the bound; after it, as soon as a busy machine says it (generous).
        assert bound <= heard_at < bound + 12, f"ended {heard_at:.1f} s after the crash, not at the {bound} s bound"
        wait_until(lambda: not pid_alive(pid), 15, "the orphan to exit")
        print(f"idle workers gone {idle_gone:.2f} s after SIGKILL; the orphan's session ended at {heard_at:.1f} s")
    finally:
        for p in {c.parent for c in cgroups}:  # nobody adopted it: nobody removed its cgroup
            sweep_stale(p.parent, f"autonomite-{os.getpid()}-x")
    assert not any(c.exists() for c in cgroups)
    # The next start finds the session open on the record and its worker gone: it closes it.
    serve.start()
    closed = wait_until(lambda: (r := _records(serve)) and r[0]["ended_at"] and r, 30, "the record closed")
    assert [(s["room"], s["end_cause"]) for s in closed] == [("room-orphan", "runtime_restart")]
