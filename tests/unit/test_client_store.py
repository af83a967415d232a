"""Rows to clients and back, and which set to serve: pure, in milliseconds."""

from __future__ import annotations

from runtime.clients.store import client_to_row, merge, parse_rows, refused, row_to_client


def good(row_id: str = "acme", **changes) -> dict:
    return {
        "id": row_id, "name": "Acme", "api_token": f"{row_id}-token-0123456789abcdef",
        "livekit_url": "ws://127.0.0.1:7880", "livekit_api_key": "key", "livekit_api_secret": "s3cret-value",
        "pool": {"min_idle": 1, "max_size": 2}, "agents": [{"name": "support", "system_prompt": "Hi."}],
        "image": None, "knowledge_dir": None, "active": True, "updated_at": "2026-11-24T00:00:00Z", **changes,
    }


def test_a_row_is_a_client_and_back():
    client = row_to_client(good())
    assert client.id == "acme" and client.pool.max_size == 2 and client.agent("support")
    row = client_to_row(client)
    assert row_to_client(row) == client


def test_a_bad_row_is_skipped_naming_its_column_and_reason_never_its_value():
    snap = parse_rows([good(), good("globex", livekit_api_secret=""), good("initech", pool={"min_idle": -1})])
    assert list(snap.clients) == ["acme"]
    assert str(snap.errors["globex"]).startswith("row 'globex': livekit_api_secret:")
    assert snap.errors["initech"].field == "pool.min_idle"
    assert all("s3cret" not in str(e) for e in snap.errors.values())


def test_a_missing_field_and_a_shared_token_are_row_errors():
    row = good("globex")
    del row["agents"]
    twin = good("twin", api_token=good()["api_token"])
    snap = parse_rows([good(), row, twin])
    assert snap.errors["globex"].field == "agents"
    assert snap.errors["twin"].field == "api_token" and "acme" in snap.errors["twin"].reason


def test_inactive_rows_are_not_served():
    snap = parse_rows([good(), good("globex", active=False)])
    assert list(snap.clients) == ["acme"] and snap.inactive == {"globex"}


def test_a_row_that_turns_bad_keeps_its_last_good_configuration_a_deleted_one_goes():
    last = parse_rows([good(), good("globex")]).clients
    now = parse_rows([good(), good("globex", agents=[])])  # globex broke; nothing deleted
    assert set(merge(last, now)) == {"acme", "globex"} and merge(last, now)["globex"] == last["globex"]
    gone = parse_rows([good()])
    assert set(merge(last, gone)) == {"acme"}
    never_good = parse_rows([good(), good("new", agents=[])])
    assert set(merge(last, never_good)) == {"acme"}


# -- whose token: deterministic, and the client that holds it keeps it --------------------


def tokens(clients) -> list[str]:
    return [c.api_token.get_secret_value() for c in clients.values()]


def served(rows: list[dict], last_good: dict) -> tuple[dict, object]:
    snap = parse_rows(rows, last_good)
    return merge(last_good, snap), snap


def test_a_row_copying_a_live_clients_token_never_takes_it_in_either_order():
    alpha = good("alpha")
    live = parse_rows([alpha]).clients
    renamed, dup = {**alpha, "name": "Alpha Renamed"}, good("dup", api_token=alpha["api_token"])
    for rows in ([renamed, dup], [dup, renamed]):  # PostgreSQL returns an updated row last
        now, snap = served(rows, live)
        assert set(now) == {"alpha"} and now["alpha"].name == "Alpha Renamed"
        assert snap.errors["dup"].field == "api_token" and snap.errors["dup"].reason == "shared with client 'alpha'"
        assert "alpha" not in snap.errors


def test_a_token_nobody_holds_goes_to_none_of_the_rows_sharing_it_whatever_their_order():
    a, b, c = good("a"), good("b", api_token=good("a")["api_token"]), good("c")
    for rows in ([a, b, c], [c, b, a]):
        snap = parse_rows(rows)
        assert list(snap.clients) == ["c"]
        assert snap.errors["a"].reason == "shared with client 'b'" and snap.errors["b"].reason == "shared with client 'a'"


def test_a_holder_whose_row_turned_bad_keeps_its_token_from_a_copy():
    live = parse_rows([good("alpha")]).clients
    now, snap = served([good("alpha", agents=[]), good("dup", api_token=good("alpha")["api_token"])], live)
    assert set(now) == {"alpha"} and now["alpha"] == live["alpha"]
    assert snap.errors["dup"].reason == "shared with client 'alpha'"


def test_a_token_is_free_once_its_holder_is_deleted_or_serves_another():
    live = parse_rows([good("alpha")]).clients
    old_token = good("alpha")["api_token"]
    dup = good("dup", api_token=old_token)
    now, _ = served([dup], live)  # alpha deleted
    assert set(now) == {"dup"}
    now, snap = served([good("alpha", active=False), dup], live)  # alpha deactivated
    assert set(now) == {"dup"}
    rotated = good("alpha", api_token="alpha-new-token-0123456789")
    now, snap = served([rotated, dup], live)  # alpha moves to a new token: dup waits one read
    assert set(now) == {"alpha"} and "dup" in snap.errors
    now, snap = served([rotated, dup], now)
    assert set(now) == {"alpha", "dup"} and not snap.errors


def test_served_tokens_stay_unique_and_the_verdict_ignores_row_order_over_random_edits():
    import random

    rng = random.Random(17)
    pool = [f"token-{i}-0123456789abcdef" for i in range(4)]
    ids = ["a", "b", "c", "d", "e"]
    last: dict = {}
    for _ in range(2000):
        rows = [good(i, api_token=rng.choice(pool), agents=[] if rng.random() < 0.15 else good()["agents"],
                      active=rng.random() > 0.1) for i in rng.sample(ids, rng.randint(0, len(ids)))]
        now, snap = served(rows, last)
        assert len(set(tokens(now))) == len(now), "two served clients share a token"
        held = {t: cid for cid, c in last.items() for t in [c.api_token.get_secret_value()]}
        for cid, c in now.items():  # nobody takes a token from a client still in the table
            holder = held.get(c.api_token.get_secret_value())
            assert holder in (None, cid) or holder not in {r["id"] for r in rows if r["active"]}
        shuffled = rows[:]
        rng.shuffle(shuffled)
        assert parse_rows(shuffled, last) == snap
        last = now


# -- any error while validating a row makes that row bad, nothing more ---------------------


def test_a_knowledge_dir_too_long_to_check_is_that_rows_error():
    snap = parse_rows([good(), good("globex", knowledge_dir="/" + "k" * 5000)])
    assert list(snap.clients) == ["acme"]
    assert snap.errors["globex"].field == "knowledge_dir"
    assert "File name too long" in snap.errors["globex"].reason and "kkkk" not in snap.errors["globex"].reason


def test_a_row_that_is_not_an_object_is_a_bad_row():
    snap = parse_rows([good(), ["not", "a", "row"], None])
    assert list(snap.clients) == ["acme"] and snap.errors["?"].field == "(row)"


# -- an answer that refuses the key is not an outage ---------------------------------------


def test_refusals_are_told_from_outages_by_status_or_postgrest_code():
    assert refused(401, "42501")  # the anon key: permission denied for table clients
    assert refused(401, "PGRST301")  # a key signed with another project's secret
    assert refused(401, None)  # a gateway's "Invalid API key", a JSON body with no code
    assert refused(None, "42501") and refused(403, "403")
    assert not refused(502, "502") and not refused(503, "PGRST001") and not refused(None, None)


# -- the cache holds the served set ---------------------------------------------------------


def test_the_cache_holds_the_served_set_with_last_good_configurations(tmp_path):
    from runtime.clients.store import load_cache, save_cache

    last = parse_rows([good(), good("globex")]).clients
    now = merge(last, parse_rows([good(), good("globex", livekit_api_secret="")]))
    save_cache(tmp_path / "cache.json", list(now.values()))
    assert oct((tmp_path / "cache.json").stat().st_mode & 0o777) == "0o600"
    assert parse_rows(load_cache(tmp_path / "cache.json")).clients == now


def test_a_rows_webhook_to_a_private_address_is_a_bad_row_unless_allowed():
    hook = {"url": "http://10.1.2.3/hooks", "secret": "hook-secret-0123456789"}
    snap = parse_rows([good(), good("globex", webhook=hook)])
    assert list(snap.clients) == ["acme"]
    assert snap.errors["globex"].field == "webhook.url" and "private" in snap.errors["globex"].reason
    assert "hook-secret" not in str(snap.errors["globex"])
    allowed = parse_rows([good("globex", webhook=hook)], allow_private=True).clients["globex"]
    assert allowed.webhook is not None and allowed.webhook.url == hook["url"]
    assert row_to_client(client_to_row(allowed)) == allowed  # and back, for clients push
