"""Clients at zero: no worker, no pool, no thread until a trigger needs one, and back after.

A client with ``min_idle: 0`` is served from a worker started for its trigger (the zygote
makes that about as fast as a warm one). Its pool runs only while it has work: once it has
been at rest for ``runtime.scaler.stop_idle_pool_after_s`` the pool stops, and the client's
next trigger starts it again. Real serve, real workers, real livekit-server.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import yaml

from tests.support import Client, wait_until

QUICK_REST = {"scaler": {"interval_s": 0.2, "high_water": 0.8, "low_water": 0.3, "scale_down_after_s": 1,
                         "stop_idle_pool_after_s": 1}}


def series_of(serve, client_id: str) -> list[str]:
    return [line for line in serve.metrics().splitlines() if f'client="{client_id}"' in line]


def test_a_client_at_zero_is_served_and_goes_back_to_zero_workers_and_no_pool(run_serve, lk_a):
    zed = Client("zed", lk_a, min_idle=0, max_size=2)
    serve = run_serve([zed], **QUICK_REST)
    assert serve.pool("zed")["pool"] == "stopped" and serve.pool("zed")["total"] == 0
    assert series_of(serve, "zed") == []  # a client at zero costs a scrape nothing

    r = serve.trigger(zed, "room-zero")
    assert r.status == 200, r.body
    wait_until(lambda: lk_a.active_agents("room-zero"), 30, "the agent in the room")
    assert serve.pool("zed")["pool"] == "running" and serve.pool("zed")["leased"] == 1

    lk_a.delete_room("room-zero")  # the session ends; the worker with it
    wait_until(lambda: serve.pool("zed").get("pool") == "stopped", 60, "zero workers, then the pool stopped")
    assert "pool zed at rest: stopping it until its next trigger" in serve.log()
    assert series_of(serve, "zed") == []

    r = serve.trigger(zed, "room-zero-again")  # and its next trigger starts it again
    assert r.status == 200, r.body
    wait_until(lambda: lk_a.active_agents("room-zero-again"), 30, "the agent in the second room")
    lk_a.delete_room("room-zero-again")


def test_a_runtime_with_every_client_at_zero_is_ready_only_once_its_zygote_is(run_serve, lk_a):
    # Ready means a trigger is served at full speed. With no pool to warm, that is the
    # zygote: before its first boot is over, the first worker waits for it (seconds).
    zed = Client("zed", lk_a, min_idle=0, max_size=1)
    serve = run_serve([zed])  # returns once /readyz says ready
    assert re.search(r"autonomite.zygote: zygote \d+ ready", serve.log()), "ready before the zygote booted"
    r = serve.trigger(zed, "room-first")
    assert r.status == 200, r.body
    wait_until(lambda: lk_a.active_agents("room-first"), 30, "the agent in the room")
    lk_a.delete_room("room-first")


def test_twenty_triggers_across_twenty_clients_at_zero_are_each_served_by_their_own_worker(run_serve, lk_a):
    clients = [Client(f"z{i:02d}", lk_a, min_idle=0, max_size=1) for i in range(20)]
    # Twenty workers start at once on two cores: max_wait_s is the budget they share.
    serve = run_serve(clients, dispatch={"max_wait_s": 45})
    with ThreadPoolExecutor(len(clients)) as pool:
        answers = list(pool.map(lambda c: (c, serve.trigger(c, f"room-{c.id}")), clients))
    for client, r in answers:
        assert r.status == 200, (client.id, r.body)
        pool_workers = {w["id"] for w in serve.pool(client.id)["workers"]}
        assert r.body["worker_id"] in pool_workers  # its own client's worker
        dispatched = [d.agent_name for d in lk_a.dispatches(f"room-{client.id}") if d.agent_name]
        assert dispatched == [f"{client.id}--{r.body['worker_id']}"]
    for client in clients:
        lk_a.delete_room(f"room-{client.id}")


def test_a_reload_that_moves_a_stopped_client_takes_effect_on_its_next_trigger(run_serve, lk_a, lk_b):
    zed = Client("zed", lk_a, min_idle=0, max_size=1)
    serve = run_serve([zed])
    assert serve.pool("zed")["pool"] == "stopped"
    config = yaml.safe_load(serve.config.read_text())
    config["clients"][0]["livekit"] = {"url": lk_b.url, "api_key": lk_b.key, "api_secret": lk_b.secret}
    serve.config.write_text(yaml.safe_dump(config, sort_keys=False))
    r = serve.request("POST", "/api/v1/admin/reload", token=serve.admin)
    assert r.status == 200 and r.body["changed"] == ["zed"], r.body
    assert serve.pool("zed")["pool"] == "stopped"  # a reload does not start a client at zero

    r = serve.trigger(zed, "room-moved")
    assert r.status == 200, r.body
    assert r.body["livekit_url"] == lk_b.url
    wait_until(lambda: lk_b.active_agents("room-moved"), 30, "the agent in the room on the new project")
    assert lk_a.participants("room-moved") == []
    lk_b.delete_room("room-moved")


def test_two_thousand_clients_at_zero_cost_no_thread_and_one_client_s_stats_list_no_other(run_serve, lk_a):
    warm = Client("warm", lk_a, min_idle=1, max_size=1)
    idle = [Client(f"c{i:04d}", lk_a, min_idle=0, max_size=1) for i in range(2000)]
    serve = run_serve([warm, *idle])
    threads = len(os.listdir(f"/proc/{serve.proc.pid}/task"))
    # One pool runs (warm's); the rest is the runtime's own: gateway, supervisor, scaler,
    # dispatcher, LiveKit adapter, zygote keeper, helpers. A thread per client would be 2,000.
    assert threads < 100, threads

    one = serve.get("/api/v1/containers/pool/stats?client=c1234", token=serve.admin)
    assert one.status == 200 and list(one.body["clients"]) == ["c1234"], one.body
    assert one.body["clients"]["c1234"]["pool"] == "stopped"

    page = serve.get("/api/v1/containers/pool/stats?limit=3", token=serve.admin).body
    assert list(page["clients"]) == ["c0000", "c0001", "c0002"] and page["next_cursor"] == "c0002"
    assert page["summary"]["clients"] == 2001 and page["summary"]["running_pools"] == 1
    following = serve.get(f"/api/v1/containers/pool/stats?limit=3&cursor={page['next_cursor']}", token=serve.admin)
    assert list(following.body["clients"]) == ["c0003", "c0004", "c0005"]

    assert sum(1 for line in serve.metrics().splitlines() if 'client="c' in line) == 0
    r = serve.get("/api/v1/containers/pool/stats?limit=5000", token=serve.admin)
    assert r.status == 400 and r.body["error"] == "invalid_query"

