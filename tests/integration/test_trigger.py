"""A trigger end to end: real gateway, real actors, real worker processes, real livekit-servers."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from tests.support import Client, kill_worker, metric_value, wait_until, worker_alive, worker_environ


def test_trigger_dispatches_on_the_clients_own_server_and_the_pool_refills(run_serve, backend, lk_a, lk_b):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=3)
    beta = Client("beta", lk_b, min_idle=1, max_size=2)
    serve = run_serve([alpha, beta], **backend)

    r = serve.trigger(alpha, "room-e2e", user_email="dana@example.com", context={"name": "Dana"})
    assert r.status == 200, r.body
    assert set(r.body) >= {"dispatch_id", "room_name", "worker_id", "livekit_url", "participant_token"}
    assert r.body["livekit_url"] == lk_a.url
    worker_id = r.body["worker_id"]

    # The dispatch exists on alpha's server, for the leased worker's own agent name...
    # (the server also lists the room's default dispatch, with an empty agent name)
    dispatches = [d for d in lk_a.dispatches("room-e2e") if d.agent_name]
    assert [d.agent_name for d in dispatches] == [f"alpha--{worker_id}"]
    metadata = json.loads(dispatches[0].metadata)
    assert metadata["client_name"] == "Alpha Inc" and metadata["user_email"] == "dana@example.com"
    assert metadata["is_preview"] is False and metadata["has_conversation_history"] is False
    # ...and nothing reached beta's server.
    assert lk_b.participants("room-e2e") == []

    # The leased worker really joins the room.
    wait_until(lambda: lk_a.active_agents("room-e2e"), 30, "the agent to be active in the room")
    assert serve.pool("alpha")["leased"] == 1

    # The room ends, the worker exits, and the pool is back at min_idle.
    lk_a.delete_room("room-e2e")
    wait_until(lambda: worker_id not in {w["id"] for w in serve.pool("alpha")["workers"]}, 30, "the worker to exit")
    wait_until(lambda: serve.pool("alpha")["idle"] == 1 and serve.pool("alpha")["leased"] == 0, 60, "refill")
    assert metric_value(serve.metrics(), "autonomite_worker_exits_total", client="alpha", cause="session_end") == 1
    assert metric_value(serve.metrics(), "autonomite_triggers_total", client="alpha", outcome="dispatched") == 1


def test_workers_hold_only_their_own_clients_credentials(run_serve, backend, lk_a, lk_b):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=1, agents=[{"name": "a", "system_prompt": "Alpha's own prompt"}])
    beta = Client("beta", lk_b, min_idle=1, max_size=1, agents=[{"name": "b", "system_prompt": "Beta's own prompt"}])
    serve = run_serve([alpha, beta], **backend)
    for client, own, other in ((alpha, lk_a, lk_b), (beta, lk_b, lk_a)):
        for worker in serve.pool(client.id)["workers"]:
            environ = worker_environ(serve, worker["ref"])
            assert own.secret in environ
            assert other.secret not in environ
            # The agent catalog is the client's own, too.
            assert f"{client.id.title()}'s own prompt" in environ
            assert ("Beta's own prompt" if client is alpha else "Alpha's own prompt") not in environ
            assert alpha.token not in environ and beta.token not in environ  # gateway tokens stay in the runtime
            assert serve.admin not in environ


def test_concurrent_triggers_never_lease_a_worker_twice(run_serve, backend, lk_a):
    alpha = Client("alpha", lk_a, min_idle=2, max_size=3)
    serve = run_serve([alpha], **backend)
    rooms = [f"room-burst-{i}" for i in range(12)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(lambda room: serve.trigger(alpha, room), rooms))

    ok = [r for r in responses if r.status == 200]
    refused = [r for r in responses if r.status != 200]
    assert ok, "at least the warm workers must be leased"
    worker_ids = [r.body["worker_id"] for r in ok]
    assert len(worker_ids) == len(set(worker_ids)), f"a worker was leased twice: {worker_ids}"
    assert all(r.status == 503 and r.headers.get("Retry-After") for r in refused)
    assert all(r.body["error"] == "no_idle_worker" for r in refused)
    assert len(ok) <= 3

    for r in ok:
        wait_until(lambda: lk_a.active_agents(r.body["room_name"]), 30, f"agent in {r.body['room_name']}")
        lk_a.delete_room(r.body["room_name"])
    wait_until(lambda: serve.pool("alpha")["leased"] == 0, 60, "every lease to end with its session")
    text = serve.metrics()
    assert metric_value(text, "autonomite_worker_exits_total", client="alpha", cause="session_end") == len(ok)
    assert metric_value(text, "autonomite_triggers_total", client="alpha", outcome="no_idle_worker") == len(refused)


def test_a_burst_within_max_size_waits_for_its_workers_and_beyond_it_is_refused(run_serve, backend, lk_a):
    alpha = Client("alpha", lk_a, min_idle=2, max_size=6)
    # The wait is generous here: this tests who gets served, not how fast (bench/burst.py does).
    serve = run_serve([alpha], dispatch={"max_wait_s": 30}, **backend)
    rooms = [f"room-wave-{i}" for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda room: serve.trigger(alpha, room), rooms))

    ok = [r for r in responses if r.status == 200]
    refused = [r for r in responses if r.status != 200]
    assert len(ok) == 6, [r.body for r in responses]  # 2 idle, 4 started for the waiting triggers
    assert len({r.body["worker_id"] for r in ok}) == 6, "a worker was leased twice"
    assert len(refused) == 2 and all(r.status == 503 and r.headers.get("Retry-After") for r in refused)
    for r in ok:  # every 200 has its own worker's agent in its room
        room, identity = r.body["room_name"], f"agent-{r.body['worker_id']}"
        wait_until(lambda: identity in [p.identity for p in lk_a.active_agents(room)], 30, f"agent in {room}")
        lk_a.delete_room(room)
    text = serve.metrics()
    assert metric_value(text, "autonomite_triggers_total", client="alpha", outcome="no_idle_worker") == 2
    assert serve.pool("alpha")["missed_total"] >= 6  # the scaler saw the burst
    wait_until(lambda: serve.pool("alpha")["leased"] == 0, 60, "every lease to end with its session")


def test_sigterm_leaves_no_worker_behind(run_serve, backend, lk_a):
    alpha = Client("alpha", lk_a, min_idle=2, max_size=3)
    serve = run_serve([alpha], **backend)
    serve.start_session(alpha, "room-sigterm")
    refs = [w["ref"] for w in serve.pool("alpha")["workers"] if w["ref"]]
    assert len(refs) >= 2
    assert serve.stop() == 0
    assert [r for r in refs if worker_alive(serve, r)] == []
    assert "runtime stopped" in serve.log()


def test_end_user_joins_with_the_token_and_leaving_ends_the_session(run_serve, backend, lk_a):
    import asyncio

    from livekit import rtc

    alpha = Client("alpha", lk_a, min_idle=1, max_size=2)
    serve = run_serve([alpha], **backend)
    r = serve.trigger(alpha, "room-user", user_email="dana@example.com")
    assert r.status == 200
    worker_id = r.body["worker_id"]

    async def visit() -> list[str]:
        room = rtc.Room()
        await room.connect(r.body["livekit_url"], r.body["participant_token"])
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while not any(p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT for p in room.remote_participants.values()):
                assert asyncio.get_running_loop().time() < deadline, "the agent never showed up"
                await asyncio.sleep(0.05)
            return [room.local_participant.identity, *[p.identity for p in room.remote_participants.values()]]
        finally:
            await room.disconnect()

    identities = asyncio.run(visit())
    assert identities[0] == r.body["participant_identity"]
    assert f"agent-{worker_id}" in identities
    # The user left: the session ends and the worker exits, although the room was never deleted.
    wait_until(lambda: worker_id not in {w["id"] for w in serve.pool("alpha")["workers"]}, 30, "the worker to exit")
    assert metric_value(serve.metrics(), "autonomite_worker_exits_total", client="alpha", cause="session_end") == 1


def test_a_worker_killed_mid_session_ends_its_lease_as_a_failure_and_its_dispatch(run_serve, backend, lk_a):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=2)
    serve = run_serve([alpha], **backend)
    r = serve.start_session(alpha, "room-killed")
    leased = next(w for w in serve.pool("alpha")["workers"] if w["id"] == r.body["worker_id"])
    assert [d.agent_name for d in lk_a.dispatches("room-killed") if d.agent_name] == [leased["agent_name"]]

    kill_worker(serve, leased["ref"])
    wait_until(lambda: serve.pool("alpha")["leased"] == 0, 30, "the lease to end")
    assert metric_value(serve.metrics(), "autonomite_worker_exits_total", client="alpha", cause="session_failed") == 1
    # LiveKit keeps a dead worker's dispatch active; the runtime deletes it.
    wait_until(lambda: not [d for d in lk_a.dispatches("room-killed") if d.agent_name], 10, "the dispatch deleted")
    lk_a.delete_room("room-killed")
