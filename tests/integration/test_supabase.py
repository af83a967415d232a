"""Clients kept in Supabase: a real PostgREST over a real PostgreSQL behind nginx
(``tests/supabase_stack.py``), real livekit-servers, a real ``autonomite serve``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.supabase_stack import SupabaseStack, missing
from tests.support import ISSUED_SECRETS, Client, metric_value, pid_alive, wait_until, write_config


@pytest.fixture(scope="module")
def stack(log_root: Path):
    why = missing()
    if why:
        pytest.fail(f"the Supabase stack cannot run here: {why}")
    s = SupabaseStack(log_root).start()
    ISSUED_SECRETS.append(s.service_key)
    yield s
    s.stop()


@pytest.fixture
def table(stack: SupabaseStack):
    """The ``clients`` table through supabase-py with the service key, emptied for each test."""
    from supabase import create_client

    stack.sql("delete from public.clients")
    return create_client(stack.url, stack.service_key).table("clients")


def row(c: Client, **changes) -> dict:
    return {
        "id": c.id, "name": f"{c.id.title()} Inc", "api_token": c.token, "livekit_url": c.project.url,
        "livekit_api_key": c.project.key, "livekit_api_secret": c.project.secret,
        "pool": {"min_idle": c.min_idle, "max_size": c.max_size}, "agents": c.agents, **changes,
    }


def source_config(path: Path, stack: SupabaseStack, poll_interval_s: float = 0.5, **source) -> dict[str, str]:
    """A config with no clients of its own: they come from Supabase."""
    env = write_config(path, [])
    config = yaml.safe_load(path.read_text())
    del config["clients"]
    config["clients_source"] = {"supabase": {"url": "${SUPABASE_URL}", "service_key": "${SUPABASE_SERVICE_KEY}",
                                             "poll_interval_s": poll_interval_s, **source}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return {**env, "SUPABASE_URL": stack.url, "SUPABASE_SERVICE_KEY": stack.service_key}


@pytest.fixture
def serve_from(tmp_path_factory, log_root: Path, stack: SupabaseStack):
    from tests.support import Serve

    started = []

    def start(wait_ready: bool = True, service_key: str | None = None, exits: bool = False, **source) -> Serve:
        """A serve reading its clients from the stack; with ``exits``, one that must exit 1 at start."""
        workdir = tmp_path_factory.mktemp("sbserve", numbered=True)
        env = source_config(workdir / "clients.yaml", stack, **source)
        if service_key is not None:
            env["SUPABASE_SERVICE_KEY"] = service_key
        (log_root / workdir.name).mkdir(exist_ok=True)
        serve = Serve(workdir / "clients.yaml", env, log_root / workdir.name / "serve.log")
        started.append(serve)
        if exits:
            with pytest.raises(AssertionError, match="serve exited with 1"):
                serve.start()
            return serve
        return serve.start(wait_ready=wait_ready)

    yield start
    for s in started:
        s.stop()


def test_clients_in_supabase_get_pools_and_triggers_land_on_their_own_livekit(table, serve_from, lk_a, lk_b):
    alpha, beta = Client("alpha", lk_a), Client("beta", lk_b)
    table.insert([row(alpha), row(beta)]).execute()
    serve = serve_from()
    for c in (alpha, beta):
        serve.start_session(c, f"room-{c.id}")  # the agent is active on that client's own server
    assert not lk_b.active_agents("room-alpha") and not lk_a.active_agents("room-beta")

    gamma = Client("gamma", lk_a)
    table.insert(row(gamma)).execute()
    wait_until(lambda: serve.pool("gamma").get("idle", 0) >= 1, 60, "the inserted client's pool to be ready")
    serve.start_session(gamma, "room-gamma")


def test_with_the_database_url_a_change_arrives_by_notify_not_at_the_next_poll(table, serve_from, stack, lk_a):
    serve = serve_from(poll_interval_s=3600, database_url=stack.database_url)
    wait_until(lambda: "listening for changes to the clients table" in serve.log(), 30, "the LISTEN")
    gamma = Client("gamma", lk_a)
    table.insert(row(gamma)).execute()  # the next poll is an hour away
    wait_until(lambda: serve.pool("gamma").get("idle", 0) >= 1, 60, "the notified client's pool to be ready")
    serve.start_session(gamma, "room-notified")


def test_a_changed_row_replaces_idle_workers_and_leaves_the_leased_session(table, serve_from, lk_a):
    alpha = Client("alpha", lk_a, min_idle=1, max_size=3)
    table.insert(row(alpha)).execute()
    serve = serve_from()
    held = serve.start_session(alpha, "room-held").body
    wait_until(lambda: serve.pool("alpha")["idle"] == 1, 60, "the idle floor refilled")
    before = {w["id"] for w in serve.pool("alpha")["workers"] if w["state"] == "idle"}
    agents = [{"name": "support", "system_prompt": "You are the updated agent."}]
    table.update({"agents": agents}).eq("id", "alpha").execute()
    wait_until(
        lambda: (idle := {w["id"] for w in serve.pool("alpha")["workers"] if w["state"] == "idle"})
        and not idle & before, 60, "idle workers replaced with the new agents",
    )
    assert any(p.identity == f"agent-{held['worker_id']}" for p in lk_a.active_agents("room-held"))
    lk_a.delete_room("room-held")


def test_a_deleted_row_drains_its_pool_and_its_token_stops_working(table, serve_from, lk_a, lk_b):
    alpha, beta = Client("alpha", lk_a), Client("beta", lk_b)
    table.insert([row(alpha), row(beta)]).execute()
    serve = serve_from()
    refs = [int(w["ref"]) for w in serve.pool("beta")["workers"]]
    table.delete().eq("id", "beta").execute()
    wait_until(lambda: "beta" not in serve.stats(), 60, "the deleted client's pool to drain and stop")
    wait_until(lambda: not any(pid_alive(p) for p in refs), 30, "its workers to be gone")
    r = serve.trigger(beta, "room-beta")
    assert r.status == 401 and r.body["error"] == "unauthorized"
    assert serve.trigger(alpha, "room-alpha").status == 200


def test_a_bad_row_is_reported_and_the_others_are_untouched(table, serve_from, lk_a, lk_b):
    alpha, beta = Client("alpha", lk_a), Client("beta", lk_b)
    broken = Client("broken", lk_a)
    table.insert([row(alpha), row(beta), row(broken, pool={"min_idle": -1, "max_size": 2})]).execute()
    serve = serve_from()
    source = serve.get("/api/v1/containers/pool/stats", token=serve.admin).body["source"]
    assert source["up"] is True and list(source["bad_rows"]) == ["broken"]
    assert source["bad_rows"]["broken"].startswith("pool.min_idle:")
    assert metric_value(serve.metrics(), "autonomite_client_source_bad_rows", client="broken") == 1
    assert "broken" not in serve.stats() and serve.trigger(broken, "room-x").status == 401

    # A good row that turns bad keeps its last good configuration, and says so.
    workers = {w["id"] for w in serve.pool("beta")["workers"]}
    table.update({"livekit_api_secret": ""}).eq("id", "beta").execute()
    wait_until(lambda: "beta" in serve.get("/api/v1/containers/pool/stats", token=serve.admin).body["source"]["bad_rows"],
               30, "the row that turned bad to be reported")
    assert {w["id"] for w in serve.pool("beta")["workers"]} == workers
    assert serve.trigger(beta, "room-beta").status == 200
    assert "last good configuration stays" in serve.log()
    assert beta.project.secret not in serve.log()


def test_a_supabase_outage_changes_nothing_served_and_shows(table, serve_from, stack, lk_a):
    alpha = Client("alpha", lk_a)
    table.insert(row(alpha)).execute()
    serve = serve_from()
    stack.stop_postgrest()
    try:
        wait_until(lambda: metric_value(serve.metrics(), "autonomite_client_source_up") == 0, 30, "the outage to show")
        assert serve.get("/readyz").status == 200
        serve.start_session(alpha, "room-outage")
        assert serve.stats()["alpha"]["leased"] == 1
        wait_until(  # several polls fail while it lasts: the log must still say it once
            lambda: serve.get("/api/v1/containers/pool/stats", token=serve.admin).body["source"]["last_read_s_ago"] > 3,
            30, "a few polls into the outage",
        )
    finally:
        stack.start_postgrest()
    wait_until(lambda: metric_value(serve.metrics(), "autonomite_client_source_up") == 1, 30, "the recovery")
    assert serve.log().count("Supabase unreachable") == 1, "one log line per state change, not per poll"


def test_supabase_unreachable_at_start_exits_1_unless_a_cache_file_stands_in(table, serve_from, stack, lk_a, tmp_path):
    alpha = Client("alpha", lk_a)
    table.insert(row(alpha)).execute()
    cache = tmp_path / "clients-cache.json"
    first = serve_from(cache_file=str(cache))  # writes the cache on its first read
    wait_until(cache.exists, 10, "the cache file")
    assert oct(cache.stat().st_mode & 0o777) == "0o600"
    first.stop()
    stack.stop_postgrest()
    try:
        failed = serve_from(exits=True)
        assert "cannot start: cannot read clients from Supabase" in failed.log()
        assert not zygote_started(failed), "the source is read before anything is booted"
        second = serve_from(cache_file=str(cache))
        assert second.trigger(alpha, "room-cached").status == 200
        assert metric_value(second.metrics(), "autonomite_client_source_up") == 0
    finally:
        stack.start_postgrest()


def zygote_started(serve) -> bool:  # a tests.support.Serve
    """Whether this serve booted its zygote (whose log sits in the workers' log_dir)."""
    return (serve.config.parent / "workers" / "zygote.log").exists() or "autonomite.zygote" in serve.log()


def source_status(serve) -> dict:  # a tests.support.Serve
    return serve.get("/api/v1/containers/pool/stats", token=serve.admin).body["source"]


def reload(serve) -> dict:  # a tests.support.Serve
    """Read the table now (the admin reload polls synchronously) and return what changed."""
    r = serve.request("POST", "/api/v1/admin/reload", token=serve.admin)
    assert r.status == 200, r.body
    return r.body


@pytest.mark.parametrize("order", ["copy, then rename the holder", "rename the holder, then copy"])
def test_a_copied_token_stays_with_the_client_that_held_it(table, serve_from, lk_a, order):
    alpha = Client("alpha", lk_a)
    table.insert(row(alpha)).execute()
    serve = serve_from(poll_interval_s=3600)  # only the reloads below read the table
    dup = Client("dup", lk_a, token=alpha.token)

    def copy() -> None:
        table.insert(row(dup)).execute()
        assert reload(serve) == {"added": [], "removed": [], "changed": []}

    def rename() -> None:  # PostgreSQL then returns alpha's row after dup's
        table.update({"name": "Alpha Renamed"}).eq("id", "alpha").execute()
        assert reload(serve)["changed"] == ["alpha"], "the holder's own edit is applied"

    for step in (copy, rename) if order.startswith("copy") else (rename, copy):
        step()
    for _ in range(3):  # the verdict holds poll after poll
        assert reload(serve) == {"added": [], "removed": [], "changed": []}
    assert source_status(serve)["bad_rows"] == {"dup": "api_token: shared with client 'alpha'"}
    assert "dup" not in serve.stats()
    assert serve.trigger(dup, "room-dup").body["error"] == "unknown_client"
    serve.start_session(alpha, "room-alpha")


TOO_LONG = "/" + "k" * 5000  # Path.is_dir() raises OSError (file name too long)


def test_a_knowledge_dir_too_long_to_check_is_a_bad_row_at_start(table, serve_from, lk_a, lk_b):
    alpha, beta = Client("alpha", lk_a), Client("beta", lk_b)
    table.insert([row(alpha), row(beta, knowledge_dir=TOO_LONG)]).execute()
    serve = serve_from()
    assert source_status(serve)["bad_rows"]["beta"].startswith("knowledge_dir: ")
    assert "beta" not in serve.stats() and serve.trigger(alpha, "room-alpha").status == 200


def test_a_knowledge_dir_too_long_to_check_is_a_bad_row_live_and_later_changes_arrive(table, serve_from, lk_a):
    alpha = Client("alpha", lk_a)
    table.insert(row(alpha)).execute()
    serve = serve_from()
    table.update({"knowledge_dir": TOO_LONG}).eq("id", "alpha").execute()  # alpha keeps its last good one
    wait_until(lambda: "alpha" in source_status(serve)["bad_rows"], 30, "alpha's row reported bad")
    assert source_status(serve)["bad_rows"]["alpha"].startswith("knowledge_dir: ")
    gamma = Client("gamma", lk_a)
    table.insert(row(gamma)).execute()
    wait_until(lambda: serve.pool("gamma").get("idle", 0) >= 1, 60, "a later change to be applied")
    status = source_status(serve)
    assert status["up"] and status["down_reason"] is None and status["last_read_s_ago"] < 5
    assert serve.trigger(alpha, "room-alpha").status == 200
    assert "Traceback" not in serve.log()


def test_a_start_from_the_cache_serves_a_rows_last_good_configuration(table, serve_from, stack, lk_a, lk_b, tmp_path):
    alpha, beta = Client("alpha", lk_a), Client("beta", lk_b)
    table.insert([row(alpha), row(beta)]).execute()
    cache = tmp_path / "clients-cache.json"
    first = serve_from(cache_file=str(cache))
    table.update({"livekit_api_secret": ""}).eq("id", "beta").execute()
    wait_until(lambda: "beta" in source_status(first)["bad_rows"], 30, "beta's row reported bad")
    gamma = Client("gamma", lk_a, min_idle=0)  # a change after beta turned bad: the cache is rewritten
    table.insert(row(gamma)).execute()
    wait_until(lambda: cache.exists() and "gamma" in {r["id"] for r in json.loads(cache.read_text())}, 30,
               "the cache rewritten after beta turned bad")
    first.stop()
    stack.stop_postgrest()
    try:
        second = serve_from(cache_file=str(cache))
        assert source_status(second)["down_reason"].startswith("unreachable: ")
        assert set(second.stats()) == {"alpha", "beta", "gamma"}
        second.start_session(beta, "room-beta-cached")
    finally:
        stack.start_postgrest()


def test_the_anon_key_stops_serve_at_start_even_with_a_cache(table, serve_from, stack, lk_a, tmp_path):
    alpha = Client("alpha", lk_a)
    table.insert(row(alpha)).execute()
    cache = tmp_path / "clients-cache.json"
    serve_from(cache_file=str(cache)).stop()
    assert cache.exists()
    failed = serve_from(exits=True, service_key=stack.anon_key, cache_file=str(cache))
    errors = [line for line in failed.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot start: Supabase at" in errors[0], errors
    assert "refused the key (HTTP 401, 42501: permission denied for table clients)" in errors[0]
    assert "starting from the cache" not in failed.log(), "the cache never stands in for a wrong key"
    assert not zygote_started(failed), "the source is read before anything is booted"


def test_clients_push_then_list_round_trips_a_yaml_file(table, stack, lk_a, lk_b, tmp_path):
    alpha, beta = Client("alpha", lk_a), Client("beta", lk_b, min_idle=2, max_size=5)
    fleet = tmp_path / "fleet.yaml"
    env = source_config(fleet, stack)
    config = yaml.safe_load(fleet.read_text())
    write_config(tmp_path / "plain.yaml", [alpha, beta])
    plain = yaml.safe_load((tmp_path / "plain.yaml").read_text())
    config["clients"] = plain["clients"]
    fleet.write_text(yaml.safe_dump(config, sort_keys=False))
    env.update({"ALPHA_TOKEN": alpha.token, "ALPHA_LK_SECRET": lk_a.secret,
                "BETA_TOKEN": beta.token, "BETA_LK_SECRET": lk_b.secret})

    def cli(*args: str) -> subprocess.CompletedProcess:
        import os

        return subprocess.run([sys.executable, "-m", "runtime.server.cli", "clients", *args], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=60)

    pushed = cli("push", str(fleet))
    assert pushed.returncode == 0, pushed.stderr
    listed = cli("list", "--source", str(fleet))
    assert listed.returncode == 0, listed.stderr
    lines = sorted(listed.stdout.splitlines())
    assert [line.split()[1] for line in lines] == ["alpha", "beta"]
    assert "pool=min_idle 2, max_size 5" in lines[1]
    for secret in (alpha.token, beta.token, lk_a.secret, lk_b.secret, stack.service_key):
        assert secret not in listed.stdout + listed.stderr + pushed.stdout + pushed.stderr
    rows = {r["id"]: r for r in table.select("*").execute().data}
    assert rows["beta"]["api_token"] == beta.token and rows["alpha"]["livekit_url"] == lk_a.url


def test_with_two_thousand_rows_a_change_to_one_is_read_alone_within_the_poll_interval(table, serve_from, lk_a):
    import time
    from datetime import UTC, datetime, timedelta

    rows = [row(Client("warm", lk_a, min_idle=1, max_size=1))]
    rows += [row(Client(f"c{i:04d}", lk_a, min_idle=0, max_size=1)) for i in range(1999)]
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    for i, r in enumerate(rows):  # written over the last two hours, a second apart
        r["updated_at"] = (long_ago + timedelta(seconds=i)).isoformat()
    for i in range(0, len(rows), 500):
        table.insert(rows[i:i + 500]).execute()
    serve = serve_from(poll_interval_s=2.0)
    read = lambda: metric_value(serve.metrics(), "autonomite_client_source_rows_read_total")  # noqa: E731
    assert read() >= 2000 and serve.pool("c1234")["max_size"] == 1

    before, changed_at = read(), time.monotonic()
    table.update({"pool": {"min_idle": 0, "max_size": 3}}).eq("id", "c1234").execute()
    wait_until(lambda: serve.pool("c1234")["max_size"] == 3, 2.0 + 5, "the change, at the next poll")
    assert time.monotonic() - changed_at < 2.0 + 5
    # The read that found it, and every poll since, read that row (and at most the few
    # written within the overlap: runtime/clients/changes.py): never the other 1,999.
    assert read() - before <= 10, read() - before


def test_session_records_reach_supabase_once_each_through_an_outage(table, serve_from, stack, lk_a):
    """Records written while PostgREST is down wait in the local store and arrive, one row
    each with its final values, once it is back."""
    from supabase import create_client

    stack.sql("delete from public.sessions")
    alpha = Client("alpha", lk_a, min_idle=1, max_size=2)
    table.insert(row(alpha)).execute()
    serve = serve_from()
    before = serve.start_session(alpha, "room-before").body["session_id"]
    lk_a.delete_room("room-before")
    sessions = create_client(stack.url, stack.service_key).table("sessions")

    def shipped() -> dict[str, dict]:
        return {r["id"]: r for r in sessions.select("*").execute().data}

    wait_until(lambda: shipped().get(before, {}).get("end_cause") == "room_deleted", 60, "the first record, ended")
    stack.stop_postgrest()
    try:
        during = []
        for n in range(2):
            during.append(serve.start_session(alpha, f"room-outage-{n}").body["session_id"])
            lk_a.delete_room(f"room-outage-{n}")
        local = lambda: serve.get("/api/v1/sessions", token=serve.admin).body["sessions"]  # noqa: E731
        wait_until(lambda: len(r := local()) == 3 and all(s["ended_at"] for s in r), 60,
                   "the sessions to end, on the local record, during the outage")
    finally:
        stack.start_postgrest()
    rows = wait_until(lambda: (r := shipped()) and all(r.get(s, {}).get("end_cause") for s in during) and r, 90,
                      "the outage's records to arrive")
    assert sorted(rows) == sorted([before, *during])  # each once: the id is the key
    assert stack.sql("select count(*) from public.sessions").strip() == "3"
    assert {rows[s]["end_cause"] for s in during} == {"room_deleted"} and rows[before]["status"] == 200
