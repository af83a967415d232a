"""Every trigger on the record: real serve, real workers, a real livekit-server, the
embedded SQLite store. Each outcome a caller can meet gets one record with the right end,
the records add up to the counters, and each client reads only its own."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

from runtime.backends.ports import free_port
from runtime.sessions.webhooks import verify
from tests.support import Client, WebhookReceiver, metric_value, wait_until

EMAIL = "dana@example.com"
CONTEXT_VALUE = "likes-the-blue-plan"


def _records(serve, token: str, **query: str) -> list[dict]:
    from urllib.parse import urlencode

    r = serve.get(f"/api/v1/sessions?{urlencode(query)}", token=token)
    assert r.status == 200, r.body
    return r.body["sessions"]


def _record(serve, room: str) -> dict:
    """Its record, or {} if it is not written yet; never two."""
    found = [s for s in _records(serve, serve.admin, limit="1000") if s["room"] == room]
    assert len(found) <= 1, found
    return found[0] if found else {}


def _answered(serve, room: str) -> dict:
    """Its record once it has the trigger's answer (records are written a moment after)."""
    return wait_until(lambda: (r := _record(serve, room)).get("status") and r, 10, f"the answer in {room}'s record")


def _ended(serve, room: str, timeout: float = 60) -> dict:
    return wait_until(lambda: (r := _record(serve, room)).get("ended_at") and r, timeout, f"the session in {room} to end")


async def _visit(url: str, token: str, seen) -> None:
    """An end user joins, waits for the agent and for ``seen()``, and leaves."""
    from livekit import rtc

    room = rtc.Room()
    await room.connect(url, token)
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while not any(p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT for p in room.remote_participants.values()):
            assert asyncio.get_running_loop().time() < deadline, "the agent never showed up"
            await asyncio.sleep(0.05)
        await asyncio.to_thread(wait_until, seen, 30, "the user's arrival on the record")
    finally:
        await room.disconnect()


def test_every_trigger_gets_one_record_with_its_outcome_and_they_add_up(run_serve, lk_a, lk_b):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=2)
    beta = Client("beta", lk_b, min_idle=0, max_size=1)
    serve = run_serve([alpha, beta], workers={"user_join_timeout_s": 4, "rejoin_grace_s": 1},
                      dispatch={"max_wait_s": 0.5})

    # A session: the user comes and goes.
    r = serve.trigger(alpha, "room-normal", user_email=EMAIL, context={"plan": CONTEXT_VALUE})
    assert r.status == 200, r.body
    asyncio.run(_visit(r.body["livekit_url"], r.body["participant_token"],
                       lambda: _record(serve, "room-normal").get("user_joined_at")))
    normal = _ended(serve, "room-normal")
    assert (normal["id"], normal["status"], normal["end_cause"]) == (r.body["session_id"], 200, "user_left")
    assert normal["worker_id"] == r.body["worker_id"] and normal["livekit_url"] == lk_a.url
    assert normal["user_hash"] == r.body["participant_identity"] and normal["backend"] == "process"
    assert normal["received_at"] <= normal["answered_at"] <= normal["ended_at"]
    assert normal["joined_at"] and normal["user_joined_at"] and normal["seconds"] > 0

    # A no-show: nobody joins within user_join_timeout_s.
    assert serve.trigger(alpha, "room-noshow").status == 200
    noshow = _ended(serve, "room-noshow")
    assert noshow["end_cause"] == "no_show" and noshow["user_joined_at"] is None

    # The room is deleted under the agent.
    serve.start_session(alpha, "room-deleted")
    lk_a.delete_room("room-deleted")
    assert _ended(serve, "room-deleted")["end_cause"] == "room_deleted"

    # A burst past max_size: the ones no worker took are refused, and recorded as such.
    wait_until(lambda: serve.pool("alpha")["idle"] >= 1, 60, "a warm worker again")
    with ThreadPoolExecutor(4) as pool:
        burst = list(pool.map(lambda n: serve.trigger(alpha, f"room-burst-{n}"), range(4)))
    assert {b.status for b in burst} <= {200, 503} and 503 in {b.status for b in burst}
    for n, b in enumerate(burst):
        rec = _answered(serve, f"room-burst-{n}")
        assert rec["status"] == b.status
        assert rec["error"] == (None if b.status == 200 else "no_idle_worker")
        if b.status == 200:  # a room deleted before its agent joins may end as a no-show: wait for it
            wait_until(lambda n=n: lk_a.active_agents(f"room-burst-{n}"), 60, f"the agent in room-burst-{n}")
            lk_a.delete_room(f"room-burst-{n}")
    # An unknown agent is refused by the gateway: on the record too.
    assert serve.trigger(alpha, "room-unknown", agent="nobody").status == 404
    assert _answered(serve, "room-unknown")["error"] == "unknown_agent"

    # Every session over: the records, the usage and the counters agree.
    wait_until(lambda: not [s for s in _records(serve, serve.admin, limit="1000")
                            if s["status"] == 200 and not s["ended_at"]], 60, "every session to end")
    records = _records(serve, alpha.token)
    assert len(records) == 3 + 4 + 1 and {s["client"] for s in records} == {"alpha"}
    usage = serve.get("/api/v1/usage", token=alpha.token).body["clients"]["alpha"]
    assert sum(usage["sessions"].values()) == len(records)
    assert usage["refused"] == sum(1 for s in records if s["status"] != 200)
    assert usage["sessions"]["user_left"] == 1 and usage["sessions"]["no_show"] == 1
    assert abs(usage["session_seconds"] - sum(s["seconds"] or 0 for s in records)) < 0.01
    text = serve.metrics()
    dispatched = metric_value(text, "autonomite_triggers_total", client="alpha", outcome="dispatched")
    assert dispatched == sum(1 for s in records if s["status"] == 200)
    counted = metric_value(text, "autonomite_session_seconds_total", client="alpha")
    assert abs(counted - usage["session_seconds"]) < 0.01
    wait_until(lambda: serve.get("/api/v1/usage", token=alpha.token).body["clients"]["alpha"]["idle_worker_seconds"]
               > 0, 30, "idle worker seconds on the record")
    assert metric_value(serve.metrics(), "autonomite_idle_worker_seconds_total", client="alpha") > 0

    # Each client reads its own: another's is a 403, no token a 401; the admin reads all.
    assert serve.get("/api/v1/sessions?client=alpha", token=beta.token).status == 403
    assert serve.get("/api/v1/usage?client=alpha", token=beta.token).status == 403
    assert _records(serve, beta.token) == []
    assert serve.get("/api/v1/usage", token=beta.token).body["clients"] == {
        "beta": {"sessions": {}, "session_seconds": 0.0, "idle_worker_seconds": 0.0, "refused": 0}}
    assert serve.get("/api/v1/sessions").status == 401
    assert serve.get("/api/v1/usage?to=not-a-time").status == 401  # who asks, before what is asked
    bad = serve.get("/api/v1/usage?to=99999999999999", token=alpha.token)
    assert (bad.status, bad.body["error"]) == (400, "invalid_query")
    assert len(_records(serve, serve.admin, client="alpha")) == len(records)
    # Pages follow each other without a gap or a repeat.
    first = serve.get("/api/v1/sessions?limit=3", token=alpha.token).body
    rest = serve.get(f"/api/v1/sessions?limit=100&cursor={first['next_cursor']}", token=alpha.token).body
    assert [s["id"] for s in first["sessions"] + rest["sessions"]] == [s["id"] for s in records]

    # No email, no context value in any record or usage answer.
    everything = json.dumps([records, usage])
    assert EMAIL not in everything and CONTEXT_VALUE not in everything


FAST_WEBHOOKS = {"allow_private": True, "retry_base_s": 0.1, "retry_max_s": 0.5}  # the receivers are on loopback


def _events(receiver: WebhookReceiver, path: str, client: Client) -> list[dict]:
    """What the receiver accepted (a 2xx), each checked against the client's secret."""
    out = []
    for _, headers, body, _ in receiver.of(path):
        assert verify(client.webhook_secret, body, headers["Autonomite-Signature"]), "a bad signature"
        event = json.loads(body)
        assert headers["Idempotency-Key"] == event["id"]
        out.append(event)
    return out


def test_each_client_gets_its_signed_events_in_order_and_a_hanging_endpoint_delays_nobody(run_serve, lk_a, lk_b):
    receiver = WebhookReceiver()
    try:
        alpha = Client("alpha", lk_a, min_idle=1, max_size=2, webhook_url=receiver.url("/alpha"))
        beta = Client("beta", lk_b, min_idle=1, max_size=2, webhook_url=receiver.url("/beta"))
        receiver.answers["/alpha"] = lambda n: 500 if n <= 3 else 200  # down for three tries
        receiver.answers["/beta"] = lambda n: None  # hangs, well past this test's deadlines
        serve = run_serve([alpha, beta], webhooks={**FAST_WEBHOOKS, "timeout_s": 60})

        serve.start_session(beta, "room-beta")
        receiver.wait(lambda: len(receiver.of("/beta")) == 1, 30)  # beta's endpoint now holds a request
        r = serve.start_session(alpha, "room-alpha", user_email=EMAIL, context={"plan": CONTEXT_VALUE})
        lk_a.delete_room("room-alpha")
        receiver.wait(lambda: len(receiver.of("/alpha")) == 5, 45)  # 3 failures, then started and ended
        assert len(receiver.of("/beta")) == 1, "beta's hanging request is still the only one"

        sent = _events(receiver, "/alpha", alpha)
        assert [e["type"] for e in sent] == ["session.started"] * 4 + ["session.ended"]
        assert len({e["id"] for e in sent[:4]}) == 1, "a retry is the same event, the same key"
        ended = sent[-1]
        assert ended["session_id"] == r.body["session_id"] and ended["client"] == "alpha"
        assert ended["data"]["end_cause"] == "room_deleted" and ended["data"]["status"] == 200
        everything = b"".join(body for _, _, body, _ in receiver.seen).decode()
        for secret in (EMAIL, CONTEXT_VALUE, alpha.webhook_secret, beta.webhook_secret, alpha.token, lk_a.secret):
            assert secret not in everything
        hooks = serve.get("/api/v1/containers/pool/stats?client=alpha", token=serve.admin).body
        assert hooks["clients"]["alpha"]["webhooks"]["delivered_total"] == 2
        assert metric_value(serve.metrics(), "autonomite_session_webhooks_total", client="alpha",
                            outcome="retried") == 3
    finally:
        receiver.close()


def test_webhook_events_wait_out_a_down_endpoint_and_a_restart_of_serve(run_serve, lk_a):
    port = free_port()
    alpha = Client("alpha", lk_a, min_idle=1, max_size=2, webhook_url=f"http://127.0.0.1:{port}/alpha")
    serve = run_serve([alpha], webhooks=FAST_WEBHOOKS)
    r = serve.start_session(alpha, "room-down")
    lk_a.delete_room("room-down")
    wait_until(lambda: _record(serve, "room-down").get("ended_at"), 60, "the session to end")
    stats = lambda: serve.get("/api/v1/containers/pool/stats?client=alpha", token=serve.admin).body  # noqa: E731
    wait_until(lambda: stats()["clients"]["alpha"]["webhooks"]["last_error"], 30, "a failed delivery to show")
    assert stats()["clients"]["alpha"]["webhooks"]["pending"] == 2
    assert serve.stop() == 0

    receiver = WebhookReceiver(port)  # the endpoint is back, and so is serve
    try:
        serve.start()
        receiver.wait(lambda: len(receiver.of("/alpha")) >= 2, 60)
        sent = _events(receiver, "/alpha", alpha)
        assert [(e["type"], e["session_id"]) for e in sent] == [
            ("session.started", r.body["session_id"]), ("session.ended", r.body["session_id"])]
        wait_until(lambda: stats()["clients"]["alpha"]["webhooks"]["pending"] == 0, 30, "nothing pending")
        assert len(receiver.of("/alpha")) == 2, "each event once"
    finally:
        receiver.close()
