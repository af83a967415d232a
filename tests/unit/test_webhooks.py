"""Session webhooks against a real HTTP receiver on loopback: signed, retried, in order per
session, one client's hanging endpoint delaying no other, surviving a restart."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import SecretStr

from runtime.metrics import Metrics
from runtime.sessions.store import connect
from runtime.sessions.webhooks import (
    OUTBOX_INSERT,
    OUTBOX_SCHEMA,
    Deliverer,
    OutboxEvent,
    check_url,
    outbox_rows,
    sign,
    verify,
)
from runtime.settings import ConfigError, WebhookSettings, WebhookTarget, load_settings
from tests.support import WebhookReceiver

SECRET = "whsec-0123456789-abcdef-must-not-leak"
FAST = {"allow_private": True, "retry_base_s": 0.05, "retry_max_s": 0.2, "timeout_s": 2.0}
EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "clients.example.yaml"


@pytest.fixture
def receiver():
    r = WebhookReceiver()
    yield r
    r.close()


@pytest.fixture
def deliverers():
    started: list[Deliverer] = []

    def make(path: Path, targets: dict[str, WebhookTarget], metrics: Metrics | None = None, **settings) -> Deliverer:
        d = Deliverer(path, targets.get, WebhookSettings(**{**FAST, **settings}), metrics=metrics)
        d.start()
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


def target(url: str, secret: str = SECRET) -> WebhookTarget:
    return WebhookTarget(url=url, secret=SecretStr(secret))


def insert(path: Path, *events: OutboxEvent) -> None:
    db = connect(path)
    db.executescript(OUTBOX_SCHEMA)
    db.execute("begin")
    db.executemany(OUTBOX_INSERT, outbox_rows(events))
    db.execute("commit")
    db.close()


def rows(path: Path) -> list[tuple]:
    db = connect(path)
    try:
        return db.execute("select seq, client, event, state, attempts, last_error from webhook_outbox order by seq").fetchall()
    finally:
        db.close()


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def started(client: str = "a", session: str = "s1", **data) -> OutboxEvent:
    return OutboxEvent(client, session, "session.started", {"room": "r1", **data})


def ended(client: str = "a", session: str = "s1") -> OutboxEvent:
    return OutboxEvent(client, session, "session.ended", {"end_cause": "user_left"})


def test_a_delivery_is_signed_and_carries_its_idempotency_key(tmp_path, receiver, deliverers):
    path = tmp_path / "sessions.sqlite"
    insert(path, started())
    deliverers(path, {"a": target(receiver.url("/a"))})
    receiver.wait(lambda: len(receiver.seen) == 1)
    _, headers, body, _ = receiver.of("/a")[0]
    assert verify(SECRET, body, headers["Autonomite-Signature"])
    assert not verify(SECRET, body.replace(b"r1", b"r2"), headers["Autonomite-Signature"])  # tampered
    assert not verify("another-secret-0123456789", body, headers["Autonomite-Signature"])
    sent = json.loads(body)
    assert headers["Idempotency-Key"] == sent["id"] == "s1:session.started"
    assert (sent["type"], sent["client"], sent["session_id"], sent["data"]) == ("session.started", "a", "s1", {"room": "r1"})
    assert headers["Content-Type"] == "application/json" and headers["User-Agent"] == "autonomite-webhooks"


def test_a_signature_is_stripe_style_and_expires():
    header = sign("k" * 16, b"{}", 1_700_000_000)
    assert header.startswith("t=1700000000,v1=") and len(header.rpartition("v1=")[2]) == 64
    assert verify("k" * 16, b"{}", header, now=1_700_000_000 + 299)
    assert not verify("k" * 16, b"{}", header, now=1_700_000_000 + 301)  # a replay, too late
    assert not verify("k" * 16, b"{}", "v1=" + header.rpartition("v1=")[2], now=1_700_000_000)  # no timestamp


def test_a_replayed_event_is_inserted_once(tmp_path):
    path = tmp_path / "sessions.sqlite"
    insert(path, started())
    insert(path, started(), ended())
    assert [(r[2], r[3]) for r in rows(path)] == [("session.started", "pending"), ("session.ended", "pending")]


def test_an_endpoint_failing_three_times_gets_the_event_on_the_fourth_try(tmp_path, receiver, deliverers):
    path = tmp_path / "sessions.sqlite"
    receiver.answers["/a"] = lambda n: 500 if n <= 3 else 204
    metrics = Metrics()
    d = deliverers(path, {"a": target(receiver.url("/a"))}, metrics=metrics)
    insert(path, started())
    d.wake()
    receiver.wait(lambda: len(receiver.of("/a")) == 4)
    eventually(lambda: rows(path)[0][3] == "delivered")
    assert rows(path)[0][3:] == ("delivered", 4, None)
    assert len({r[1]["Autonomite-Signature"] for r in receiver.of("/a")}) >= 1
    assert {r[2] for r in receiver.of("/a")} == {receiver.of("/a")[0][2]}  # the same body each time
    eventually(lambda: d.stats("a")["delivered_total"] == 1)
    assert d.stats("a") == {"pending": 0, "delivered_total": 1, "failed_total": 0, "last_error": "HTTP 500"}
    text = metrics.render().decode()
    assert 'autonomite_session_webhooks_total{client="a",outcome="retried"} 3.0' in text
    assert 'autonomite_session_webhooks_total{client="a",outcome="delivered"} 1.0' in text


def test_a_hanging_endpoint_of_one_client_does_not_delay_another(tmp_path, receiver, deliverers):
    path = tmp_path / "sessions.sqlite"
    receiver.answers["/a"] = lambda n: None  # hangs
    d = deliverers(path, {"a": target(receiver.url("/a")), "b": target(receiver.url("/b"))}, timeout_s=10.0)
    insert(path, started("a", "sa"), ended("a", "sa"), started("a", "sa2"))
    d.wake()
    receiver.wait(lambda: len(receiver.of("/a")) == 1)  # A's request is in flight, and stays
    t0 = time.monotonic()
    insert(path, started("b", "sb"), ended("b", "sb"))
    d.wake()
    receiver.wait(lambda: len(receiver.of("/b")) == 2, timeout=3.0)
    assert receiver.of("/b")[-1][3] - t0 < 3.0
    assert len(receiver.of("/a")) == 1  # one request in flight per client: A's others wait for it
    receiver.release.set()  # A answers nothing and hangs up: the deliverer stops at once


def test_a_session_ends_after_it_started_even_when_the_start_needed_retries(tmp_path, receiver, deliverers):
    path = tmp_path / "sessions.sqlite"
    receiver.answers["/a"] = lambda n: 503 if n <= 2 else 200
    insert(path, started(), ended())
    deliverers(path, {"a": target(receiver.url("/a"))})
    eventually(lambda: [r[3] for r in rows(path)] == ["delivered", "delivered"])
    kinds = [json.loads(r[2])["type"] for r in receiver.of("/a")]
    assert kinds == ["session.started"] * 3 + ["session.ended"]


def test_sessions_do_not_wait_on_each_other(tmp_path, receiver, deliverers):
    path = tmp_path / "sessions.sqlite"
    receiver.answers["/a"] = lambda n: 500 if n == 1 else 200  # s1's start fails once
    insert(path, started(session="s1"), started(session="s2"))
    deliverers(path, {"a": target(receiver.url("/a"))}, retry_base_s=5.0, retry_max_s=5.0)
    receiver.wait(lambda: len(receiver.of("/a")) == 2)  # s2 goes while s1 backs off
    assert [json.loads(r[2])["session_id"] for r in receiver.of("/a")] == ["s1", "s2"]


@pytest.mark.parametrize("url", ["http://127.0.0.1/", "http://10.1.2.3/hook", "http://192.168.1.1/",
                                 "http://169.254.169.254/latest/meta-data", "http://[::1]:8080/", "http://localhost/",
                                 "http://0.0.0.0/", "http://[::ffff:10.0.0.1]/", "http://224.0.0.1/"])
def test_a_url_to_a_private_address_is_refused_unless_allowed(url):
    with pytest.raises(ValueError, match="refused"):
        check_url(url, allow_private=False)
    check_url(url, allow_private=True)


@pytest.mark.parametrize("url,reason", [("ftp://127.0.0.1/x", "http or https"), ("file:///etc/passwd", "http or https"),
                                        ("http:///nohost", "no host"), ("http://user:pw@127.0.0.1/", "user or password")])
def test_a_url_that_is_not_http_to_a_host_is_refused_even_if_private_is_allowed(url, reason):
    with pytest.raises(ValueError, match=reason):
        check_url(url, allow_private=True)


def test_a_public_address_is_accepted():
    check_url("https://8.8.8.8/hook", allow_private=False)  # an address literal: no DNS


ENV = {"AUTONOMITE_ADMIN_TOKEN": "admin-token-0123456789", "ACME_API_TOKEN": "acme-token-0123456789",
       "ACME_LK_KEY": "acmekey", "ACME_LK_SECRET": "acme-secret-which-must-not-leak",
       "GLOBEX_API_TOKEN": "globex-token-0123456789", "GLOBEX_LK_KEY": "globexkey",
       "GLOBEX_LK_SECRET": "globex-secret-which-must-not-leak"}
ACME_POOL = "    pool: {min_idle: 2, max_size: 8}"


def config(tmp_path: Path, url: str, runtime_line: str = "") -> Path:
    text = EXAMPLE.read_text()
    assert ACME_POOL in text
    text = text.replace(ACME_POOL, ACME_POOL + f"\n    webhook: {{url: '{url}', secret: {SECRET}}}", 1)
    if runtime_line:
        text = text.replace("  backend: process", "  backend: process\n" + runtime_line, 1)
    path = tmp_path / "clients.yaml"
    path.write_text(text)
    return path


def test_a_config_with_a_private_webhook_url_is_refused_at_load(tmp_path):
    path = config(tmp_path, "http://10.1.2.3/hook")
    with pytest.raises(ConfigError) as e:
        load_settings(path, ENV)
    message = str(e.value)
    assert message.startswith(f"{path}: clients[0].webhook.url: 10.1.2.3 is a private address"), message
    assert "runtime.webhooks.allow_private" in message and SECRET not in message
    allowed = load_settings(config(tmp_path, "http://10.1.2.3/hook", "  webhooks: {allow_private: true}"), ENV)
    assert allowed.client("acme").webhook.url == "http://10.1.2.3/hook"
    assert allowed.client("globex").webhook is None
    assert load_settings(config(tmp_path, "https://8.8.8.8/hook"), ENV).runtime.webhooks.timeout_s == 5.0


def test_events_survive_a_restart_and_arrive_once(tmp_path, receiver, deliverers):
    path = tmp_path / "sessions.sqlite"
    with socket.socket() as s:  # a port nobody listens on: the receiver is down
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}/a"
    insert(path, started())
    first = deliverers(path, {"a": target(down)}, retry_base_s=0.01, retry_max_s=0.01)
    eventually(lambda: first.stats("a")["last_error"] is not None)
    first.stop()
    assert rows(path)[0][3] == "pending" and receiver.seen == []
    second = deliverers(path, {"a": target(receiver.url("/a"))})
    receiver.wait(lambda: len(receiver.of("/a")) == 1)
    eventually(lambda: rows(path)[0][3] == "delivered")
    second.stop()
    assert len(receiver.of("/a")) == 1


def test_a_removed_clients_events_are_retried_then_fail_and_are_sent_nowhere(tmp_path, receiver, deliverers):
    path = tmp_path / "sessions.sqlite"
    insert(path, started("gone", "sg"), started("a"))
    d = deliverers(path, {"a": target(receiver.url("/a"))}, retry_for_s=0.5)  # retried that long, then given up
    eventually(lambda: [r[3] for r in rows(path)] == ["failed", "delivered"])
    assert rows(path)[0][5] == "client has no webhook"
    assert d.stats("gone") == {"pending": 0, "delivered_total": 0, "failed_total": 1, "last_error": "client has no webhook"}
    assert [json.loads(r[2])["client"] for r in receiver.seen] == ["a"]


def test_the_queue_is_bounded_per_client_and_the_oldest_fail(tmp_path, deliverers):
    path = tmp_path / "sessions.sqlite"
    insert(path, *[started(session=f"s{i}") for i in range(5)])
    d = deliverers(path, {"a": target("http://127.0.0.1:9/")}, max_pending_per_client=2, retry_base_s=60, retry_max_s=60)
    eventually(lambda: d.stats("a")["failed_total"] == 3)
    assert [(r[0], r[3], r[5]) for r in rows(path) if r[3] == "failed"] == [(i, "failed", "queue full") for i in (1, 2, 3)]
    assert d.stats("a")["pending"] == 2


def test_the_secret_and_the_bodys_values_never_reach_the_logs(tmp_path, receiver, deliverers, caplog):
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "sessions.sqlite"
    receiver.answers["/a"] = lambda n: 500 if n == 1 else 200
    insert(path, started(caller="private-value-42"), started("gone", "sg"))
    d = deliverers(path, {"a": target(receiver.url("/a"))}, retry_for_s=0.5)  # "gone": retried, then given up
    eventually(lambda: d.stats("a")["delivered_total"] == 1 and d.stats("gone")["failed_total"] == 1)
    body = receiver.of("/a")[-1][2].decode()
    assert SECRET not in body and "private-value-42" in body
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("runtime.sessions")]
    assert any("s1:session.started" in m and "delivered" in m for m in logged), logged
    for message in logged:
        assert SECRET not in message and "private-value-42" not in message and "/a" not in message


def test_each_attempt_asks_for_the_clients_current_url_and_secret(tmp_path, receiver, deliverers):
    path = tmp_path / "sessions.sqlite"
    receiver.answers["/old"] = lambda n: 500
    targets = {"a": target(receiver.url("/old"), secret="old-secret-0123456789")}
    insert(path, started())
    deliverers(path, targets, retry_base_s=0.3, retry_max_s=0.3)
    receiver.wait(lambda: len(receiver.of("/old")) == 1)
    targets["a"] = target(receiver.url("/new"))  # rotated: the retry goes to the new URL, signed with the new secret
    receiver.wait(lambda: len(receiver.of("/new")) == 1)
    _, headers, body, _ = receiver.of("/new")[0]
    assert verify(SECRET, body, headers["Autonomite-Signature"])
    assert not verify("old-secret-0123456789", body, headers["Autonomite-Signature"])


def test_a_name_is_checked_again_at_delivery_and_the_checked_address_is_the_one_used(tmp_path, receiver, deliverers,
                                                                                       monkeypatch):
    import runtime.outbound

    answers = ["127.0.0.1", "192.0.2.1"]  # the first lookup, then every later one (unroutable)
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "hooks.example":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers.pop(0) if len(answers) > 1 else answers[0], port))]

    monkeypatch.setattr(runtime.outbound.socket, "getaddrinfo", getaddrinfo)
    path = tmp_path / "sessions.sqlite"
    insert(path, started())
    d = deliverers(path, {"a": target(f"http://hooks.example:{receiver.port}/a")})
    receiver.wait(lambda: len(receiver.of("/a")) == 1)  # connected to the address it checked, not to a new lookup's
    assert receiver.of("/a")[0][1]["Host"] == f"hooks.example:{receiver.port}"
    eventually(lambda: d.stats("a")["delivered_total"] == 1)
    d.stop()
    # Later the name resolves to a private address (DNS rebinding): refused at delivery, nothing sent.
    answers[:] = ["10.0.0.7"]
    insert(path, ended())
    d = deliverers(path, {"a": target(f"http://hooks.example:{receiver.port}/a")}, allow_private=False)
    eventually(lambda: d.stats("a")["last_error"] is not None)
    assert "resolves to 10.0.0.7, a private address" in d.stats("a")["last_error"]
    assert len(receiver.of("/a")) == 1 and rows(path)[1][3] == "pending"
