"""Rows to clients and back, and which set to serve: pure, in milliseconds."""

from __future__ import annotations

from runtime.client_store import client_to_row, merge, parse_rows, row_to_client


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
