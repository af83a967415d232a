"""Usage and session queries: the HTTP routes' parameters (pure) and ``autonomite usage``,
read from a real SQLite store."""

from __future__ import annotations

import csv
import io

import pytest

from runtime.http.models import encode_cursor, parse_sessions_query, parse_time, parse_usage_query
from runtime.server.cli import main
from runtime.sessions.store import FILE_NAME, SessionRecord, SqliteStore

NOV_1 = 1_793_491_200.0  # 2026-11-01T00:00:00Z


def test_times_are_unix_seconds_or_iso_8601_utc_unless_they_say_otherwise():
    assert parse_time("since", "1793491200") == NOV_1
    assert parse_time("since", "2026-11-01") == NOV_1
    assert parse_time("since", "2026-11-01T01:00:00+01:00") == NOV_1
    with pytest.raises(ValueError, match="since must be Unix seconds or an ISO 8601 time"):
        parse_time("since", "last tuesday")


def test_the_sessions_query_refuses_what_it_does_not_know_and_round_trips_its_cursor():
    q = parse_sessions_query({"client": "acme", "since": "2026-11-01", "limit": "5",
                              "cursor": encode_cursor(12.5, "abc")})
    assert (q.client, q.since, q.limit, q.after) == ("acme", NOV_1, 5, (12.5, "abc"))
    for bad, says in (({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"), ({"cursor": "nope"}, "cursor"),
                      ({"clients": "a"}, "unknown parameter 'clients'"), ({"client": "x" * 65}, "client")):
        with pytest.raises(ValueError, match=says):
            parse_sessions_query(bad)


def test_usage_defaults_to_the_month_to_date_and_wants_from_before_to():
    q = parse_usage_query({}, now=NOV_1 + 86400 * 5.5)
    assert (q.since, q.until) == (NOV_1, NOV_1 + 86400 * 5.5)
    with pytest.raises(ValueError, match="to must come after from"):
        parse_usage_query({"from": "2026-11-02", "to": "2026-11-01"}, now=NOV_1)


@pytest.fixture
def state(tmp_path):
    store = SqliteStore(tmp_path / FILE_NAME)
    store.put(SessionRecord("a", "acme", status=200, received_at=NOV_1 + 10, joined_at=NOV_1 + 11,
                            ended_at=NOV_1 + 71, end_cause="user_left"))
    store.put(SessionRecord("b", "acme", status=503, error="no_idle_worker", received_at=NOV_1 + 20))
    store.put(SessionRecord("c", "globex", status=200, received_at=NOV_1 + 30, joined_at=NOV_1 + 30,
                            ended_at=NOV_1 + 40, end_cause="no_show"))
    store.put(SessionRecord("d", "acme", status=200, received_at=NOV_1 - 10, joined_at=NOV_1 - 9,
                            ended_at=NOV_1 + 1, end_cause="user_left"))  # October's
    store.write([], {("acme", int(NOV_1 // 60)): 120.0})
    store.close()
    return tmp_path


def test_autonomite_usage_prints_csv_one_row_per_client(state, capsys):
    assert main(["usage", "--state-dir", str(state), "--from", "2026-11-01", "--to", "2026-12-01", "--csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    by = {r["client"]: r for r in table}
    assert set(by) == {"acme", "globex"}
    assert (by["acme"]["sessions"], by["acme"]["user_left"], by["acme"]["refused"]) == ("2", "1", "1")
    assert (by["acme"]["session_seconds"], by["acme"]["idle_worker_seconds"]) == ("60.0", "120.0")
    assert (by["globex"]["no_show"], by["globex"]["session_seconds"]) == ("1", "10.0")


def test_autonomite_usage_for_one_client_as_a_table_and_its_errors(state, capsys, tmp_path_factory):
    assert main(["usage", "--state-dir", str(state), "--client", "globex", "--from", "2026-11-01",
                 "--to", "2026-12-01"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["client", "sessions", "no_show", "session_seconds", "idle_worker_seconds"]
    assert out[1].split() == ["globex", "1", "1", "10.0", "0.0"]
    assert main(["usage", "--state-dir", str(state), "--from", "whenever"]) == 2
    assert "from must be Unix seconds" in capsys.readouterr().err
    assert main(["usage", "--state-dir", str(tmp_path_factory.mktemp("empty"))]) == 1
    assert "no session records" in capsys.readouterr().err


def test_autonomite_usage_reads_the_state_dir_of_a_config_that_takes_secrets_from_the_environment(
        state, capsys, tmp_path, monkeypatch):
    # The shape of config/clients.example.yaml: ${VAR} inside a flow mapping, secrets unset.
    config = tmp_path / "clients.yaml"
    config.write_text("runtime:\n  admin_token: ${NOT_SET_HERE}\n  state_dir: ${RECORDS}\n"
                      "clients:\n  - {id: acme, livekit: {url: ws://x, api_key: ${K}, api_secret: ${S}}}\n")
    monkeypatch.setenv("RECORDS", str(state))
    assert main(["usage", "--config", str(config), "--from", "2026-11-01", "--to", "2026-12-01", "--csv"]) == 0
    assert {r["client"] for r in csv.DictReader(io.StringIO(capsys.readouterr().out))} == {"acme", "globex"}
    monkeypatch.delenv("RECORDS")
    assert main(["usage", "--config", str(config)]) == 1
    assert "runtime.state_dir: environment variable RECORDS is not set" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["99999999999999", "9" * 400, "0001-01-01T00:00:00+14:00", "nan", "-5"])
def test_a_time_outside_1970_to_9999_is_refused_not_a_crash(value):
    with pytest.raises(ValueError, match="from 1970 to 9999"):
        parse_time("to", value)
