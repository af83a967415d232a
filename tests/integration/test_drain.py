"""A deploy hangs up on nobody: SIGTERM drains, a second runtime takes over the address,
and what cannot work stops ``serve`` at start. Real livekit-server, a real ``serve``, a real
end user in the room (the livekit rtc SDK, text on ``lk.chat``, the agent's answers on
``lk.transcription``), process backend."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from contextlib import suppress

import pytest
from livekit import rtc

from runtime.dev.chat import agent_replies
from tests.support import Client, Serve, children_of, pid_alive, wait_until, worker_alive

END_MESSAGE = "We are closing this line for maintenance, goodbye."


class Caller:
    """The end user of one session: joins, asks and hears the answer, sees the agent leave."""

    def __init__(self, session: dict) -> None:
        self.session, self.room = session, rtc.Room()
        self.replies = agent_replies(self.room)
        self.agent_left = asyncio.Event()
        agent = f"agent-{session['worker_id']}"
        self.room.on("participant_disconnected", lambda p: p.identity == agent and self.agent_left.set())

    async def join(self) -> str:
        await self.room.connect(self.session["livekit_url"], self.session["participant_token"])
        return await self.heard(30)  # the greeting

    async def heard(self, timeout: float) -> str:
        return (await asyncio.wait_for(self.replies.get(), timeout))[1]

    async def ask(self, text: str, timeout: float = 15) -> str:
        await self.room.local_participant.send_text(text, topic="lk.chat")
        return await self.heard(timeout)

    async def leave(self) -> None:
        await self.room.disconnect()


def _running_ids(serve: Serve, client_id: str, state: str) -> dict[str, str]:
    return {w["id"]: w["ref"] for w in serve.pool(client_id)["workers"] if w["state"] == state}


def _log_lines(serve: Serve, level: str) -> list[str]:
    return [line for line in serve.log().splitlines() if f" {level} " in line]


def test_sigterm_lets_a_live_call_go_on_then_exits_0_leaving_nothing(run_serve, backend, lk_a):
    alpha = Client("alpha", lk_a, min_idle=2, max_size=3)
    serve = run_serve([alpha], **backend)
    session = serve.start_session(alpha, "room-drain").body
    wait_until(lambda: len(_running_ids(serve, "alpha", "idle")) == 2, 60, "the idle floor refilled")
    idle = _running_ids(serve, "alpha", "idle")
    workers = [w["ref"] for w in serve.pool("alpha")["workers"]]  # pids or container ids
    processes = children_of(serve.proc.pid)  # the zygote and every worker (process backend)
    assert len(workers) == 3
    answers: list[tuple[float, str]] = []

    async def call() -> None:
        caller = Caller(session)
        await caller.join()
        serve.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        ready = await asyncio.to_thread(serve.get, "/readyz")
        assert (ready.status, ready.body) == (503, {"status": "draining"}), ready
        assert time.monotonic() - sent < 5, "/readyz must say draining at once"
        late = await asyncio.to_thread(serve.trigger, alpha, "room-late")
        assert late.status == 503 and late.body["error"] == "draining" and late.headers.get("Retry-After"), late
        assert set(late.body) == {"error", "detail"}
        assert (await asyncio.to_thread(serve.get, "/healthz")).status == 200  # alive: no restart by a prober
        # Idle workers stop at once; the leased one does not.
        await asyncio.to_thread(wait_until, lambda: not any(worker_alive(serve, r) for r in idle.values()), 20,
                                "the idle workers to stop")
        n = 0
        while time.monotonic() - sent < 22:  # the caller talks on, well past the old 8.8 s cut
            answer = await caller.ask(f"question number {n}")
            answers.append((time.monotonic() - sent, answer))
            assert f"question number {n}" in answer, answer
            n += 1
            await asyncio.sleep(2)  # the caller's pace: the input under test, not a synchronisation
        assert serve.proc.poll() is None, "serve exited while a session was live"
        assert not caller.agent_left.is_set()
        await caller.leave()

    asyncio.run(asyncio.wait_for(call(), 90))
    # The deadline is generous (a worker's end, its log and its cgroup, on a busy machine):
    # the behaviour under test is that serve exits by itself once the last session ends.
    code = serve.proc.wait(30)
    assert code == 0
    assert answers[-1][0] >= 20 and len(answers) >= 5, answers
    wait_until(lambda: not any(pid_alive(p) for p in processes) and not any(worker_alive(serve, r) for r in workers),
               5, "nothing left behind")
    log = serve.log()
    assert "shutdown: SIGTERM: draining" in log and "shutdown: drained: every session has ended" in log
    assert "draining: 1 sessions in progress" in log


def test_the_drain_timeout_ends_the_call_with_a_reason_the_agent_says(run_serve, lk_a):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=2)
    serve = run_serve([alpha], shutdown={"drain_timeout_s": 4, "end_message": END_MESSAGE})
    session = serve.start_session(alpha, "room-timeout").body

    async def call() -> tuple[float, float, str]:
        caller = Caller(session)
        await caller.join()
        serve.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        said = await caller.heard(20)  # the caller says nothing more: only the end can come
        heard_at = time.monotonic() - sent
        await asyncio.wait_for(caller.agent_left.wait(), 15)
        left_at = time.monotonic() - sent
        await caller.leave()
        return heard_at, left_at, said

    heard_at, left_at, said = asyncio.run(call())
    assert said == END_MESSAGE
    assert 4 <= heard_at < 4 + 3, f"ended {heard_at:.1f} s after SIGTERM, not at the 4 s bound"
    assert left_at < 4 + 8
    assert serve.proc.wait(20) == 0
    assert "shutdown: drain timeout (4 s) reached: ending the sessions still running" in serve.log()


@pytest.mark.parametrize("second", ["SIGTERM", "SIGINT", "admin"])
def test_insisting_during_the_drain_ends_the_call_and_stops_at_once(run_serve, lk_a, second):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=2)
    serve = run_serve([alpha], shutdown={"end_message": END_MESSAGE})
    session = serve.start_session(alpha, f"room-now-{second.lower()}").body

    async def call() -> float:
        caller = Caller(session)
        await caller.join()
        serve.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(wait_until, lambda: serve.get("/readyz").body == {"status": "draining"}, 5,
                                "the drain to begin")
        assert (await caller.ask("still there?")).endswith("still there?")  # the call goes on meanwhile
        insisted = time.monotonic()
        if second == "admin":
            r = await asyncio.to_thread(serve.request, "POST", "/api/v1/admin/shutdown?now=1", token=serve.admin)
            assert (r.status, r.body) == (202, {"shutdown": "now"}), r
        else:
            serve.proc.send_signal(getattr(signal, second))
        assert await caller.heard(10) == END_MESSAGE
        await asyncio.wait_for(caller.agent_left.wait(), 15)
        await caller.leave()
        return insisted

    insisted = asyncio.run(call())
    assert serve.proc.wait(30) == 0
    assert time.monotonic() - insisted < 20
    said = {"SIGTERM": "SIGTERM during the drain", "SIGINT": "SIGINT during the drain",
            "admin": "POST /api/v1/admin/shutdown?now=1"}[second]
    assert f"shutdown: {said}: ending every session and stopping now" in serve.log()


def test_signals_that_keep_coming_on_the_way_down_never_turn_exit_0_into_a_death_by_signal(run_serve, lk_a):
    # An impatient operator (or a supervisor repeating its stop, and a reload on top): SIGTERM
    # and SIGHUP every few ms until serve exits. The first SIGTERM drains, the second stops;
    # the rest, at any moment of the way down (listeners handed over, the loop closed, the
    # runtime stopping its workers, Python exiting), change nothing.
    alpha = Client("alpha", lk_a, min_idle=1, max_size=1)
    serve = run_serve([alpha])
    worker = serve.pool("alpha")["workers"][0]["ref"]
    deadline = time.monotonic() + 60
    sent = 0
    while serve.proc.poll() is None and time.monotonic() < deadline:
        with suppress(ProcessLookupError):
            serve.proc.send_signal(signal.SIGHUP if sent % 3 == 2 else signal.SIGTERM)
            sent += 1
        time.sleep(0.002)  # the cadence of the signals, not a wait for anything
    assert serve.proc.wait(5) == 0, serve.log()[-2000:]
    assert "on the way down: ignored" in serve.log()
    assert not worker_alive(serve, worker)


def test_the_admin_shutdown_needs_the_admin_token_and_a_valid_now(run_serve, lk_a):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=1)
    serve = run_serve([alpha])
    assert serve.request("POST", "/api/v1/admin/shutdown", token=alpha.token).status == 401
    r = serve.request("POST", "/api/v1/admin/shutdown?now=yes", token=serve.admin)
    assert r.status == 422 and r.body["error"] == "invalid_body" and serve.get("/readyz").status == 200
    r = serve.request("POST", "/api/v1/admin/shutdown", token=serve.admin)
    assert (r.status, r.body) == (202, {"shutdown": "draining"})
    assert serve.proc.wait(20) == 0  # nothing in session: drained at once
    assert "shutdown: POST /api/v1/admin/shutdown: draining" in serve.log()


def test_an_unwritable_log_directory_stops_serve_at_start_with_one_line(tmp_path, log_root, lk_a):
    """The directory is really read-only: a read-only bind mount in a mount namespace of
    serve's own (root ignores permission bits, not a read-only mount)."""
    from tests.support import write_config

    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    config = tmp_path / "clients.yaml"
    env = write_config(config, [Client("alpha", lk_a)], workers={"log_dir": str(log_dir)})
    read_only = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                 f'mount --bind "{log_dir}" "{log_dir}" && mount -o remount,bind,ro "{log_dir}" && exec "$0" "$@"')
    (log_root / tmp_path.name).mkdir(exist_ok=True)
    serve = Serve(config, env, log_root / tmp_path.name / "serve-ro.log", prefix=read_only)
    started = time.monotonic()
    serve.start(wait_up=False)
    try:
        code = serve.proc.wait(20)
    finally:
        serve.stop()
    assert code == 1 and time.monotonic() - started < 15
    errors = _log_lines(serve, "ERROR")
    assert errors == [line for line in serve.log().splitlines() if line.strip()][-1:], serve.log()  # one, last
    assert errors[0].endswith(f"cannot start: runtime.workers.log_dir {log_dir}: cannot write there "
                              "(Read-only file system)"), errors
    assert "zygote" not in serve.log() and "pool" not in serve.log()  # nothing started


def test_a_rolling_restart_on_one_address_refuses_no_trigger_and_cuts_no_call(run_serve, lk_a, log_root, tmp_path):
    alpha = Client("alpha", lk_a, min_idle=2, max_size=4)
    first = run_serve([alpha])
    held = first.start_session(alpha, "room-held").body
    first_workers = {w["id"]: int(w["ref"]) for w in first.pool("alpha")["workers"]}
    # The new runtime: the same config and address, started as the README's one-liner does,
    # and told to notify "systemd" (this test) once ready.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    second = Serve(first.config, {**first.env, "NOTIFY_SOCKET": str(tmp_path / "notify")},
                   first.log_path.with_name("serve-2.log"), args=("--replace",))
    outcomes: list[tuple[float, int | str, str]] = []  # (when, status or error, worker id or error code)
    answers: list[tuple[float, str]] = []
    marks: dict[str, float] = {}

    async def triggers(stop: asyncio.Event) -> None:
        k = 0
        while not stop.is_set():
            k += 1
            asyncio.ensure_future(one_trigger(f"roll-{k}"))
            await asyncio.sleep(1.0)  # one trigger a second: the input under test

    async def one_trigger(room: str) -> None:
        at = time.monotonic()
        try:
            r = await asyncio.to_thread(first.trigger, alpha, room)
        except OSError as e:
            outcomes.append((at, "refused", type(e).__name__))
            return
        outcomes.append((at, r.status, r.body.get("worker_id") or r.body.get("error")))
        if r.status == 200:
            joined = await asyncio.to_thread(wait_until, lambda: lk_a.active_agents(room), 20, f"the agent in {room}")
            assert joined
            await asyncio.to_thread(lk_a.delete_room, room)

    async def scenario() -> None:
        caller = Caller(held)
        await caller.join()
        stop = asyncio.Event()
        load = asyncio.create_task(triggers(stop))
        await asyncio.sleep(3)  # a few triggers answered by the first runtime alone
        marks["second"] = time.monotonic()
        second.start(wait_up=False)
        notify.settimeout(90)
        assert await asyncio.to_thread(notify.recv, 100) == b"READY=1"
        marks["ready"] = time.monotonic()
        await asyncio.to_thread(wait_until, lambda: "SIGTERM: draining" in first.log(), 10, "the first to drain")
        marks["drain"] = time.monotonic()
        n = 0
        while time.monotonic() - marks["drain"] < 12:  # the held call goes on across the handover
            answer = await caller.ask(f"still with me {n}")
            assert answer.endswith(f"still with me {n}"), answer
            answers.append((time.monotonic(), answer))
            n += 1
            await asyncio.sleep(2)
        assert first.proc.poll() is None and not caller.agent_left.is_set()
        await caller.leave()
        await asyncio.to_thread(first.proc.wait, 20)
        marks["first_gone"] = time.monotonic()
        await asyncio.sleep(3)
        stop.set()
        await load
        await asyncio.sleep(2)  # the last triggers' answers

    try:
        asyncio.run(asyncio.wait_for(scenario(), 240))
        assert first.proc.returncode == 0
        assert answers and answers[-1][0] - marks["drain"] >= 10
        assert f"--replace: sending SIGTERM to the runtime (pid {first.proc.pid})" in second.log()
        # No trigger refused: not while the second warmed, nor across the handover.
        refused = [o for o in outcomes if o[1] != 200]
        assert refused == [], refused
        assert len(outcomes) >= 15 and any(o[0] > marks["first_gone"] for o in outcomes)
        ok = [o[2] for o in outcomes if o[1] == 200]
        assert len(ok) == len(set(ok)), "a worker was leased twice"
        # The two runtimes never touched each other's workers.
        second_ids = {w["id"] for w in second.pool("alpha")["workers"]}
        assert not second_ids & set(first_workers)
        assert all(not pid_alive(p) for p in first_workers.values()), "the first runtime left a worker behind"
        assert all(pid_alive(int(w["ref"])) for w in second.pool("alpha")["workers"]), "the first stopped the second's"
        assert second.get("/readyz").status == 200
        # The records, kept in the file both runtimes share: the held call ended by its caller
        # (closed by the first runtime as it drained, not as runtime_restart by the second),
        # and every trigger of either runtime on the record once, with its answer.
        records = wait_until(lambda: (r := second.get("/api/v1/sessions?limit=1000", token=second.admin).body[
            "sessions"]) and all(s["ended_at"] for s in r) and r, 60, "every record closed")
        by_room = {s["room"]: s for s in records}
        assert by_room["room-held"]["end_cause"] == "user_left" and by_room["room-held"]["id"] == held["session_id"]
        assert len(records) == len(by_room) == 1 + len(outcomes)
        assert not [s for s in records if s["end_cause"] == "runtime_restart"]
    finally:
        notify.close()
        with suppress(Exception):
            second.stop()
