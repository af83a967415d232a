"""The gateway's guards against hostile input, in milliseconds: pure helpers, an injected clock.

Plus two pins on aiohttp itself: the JSON error middleware, and the keep-alive timer that
the gateway's header timeout rests on (``runtime.http.gateway.create_runner``).
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from aiohttp import web

from runtime.http.guard import (
    AuthFailureLimiter,
    RecentIds,
    bearer_token,
    invalid_unicode_path,
    is_json_object,
    nested_deeper_than,
    retry_after_header,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- bearer tokens -----------------------------------------------------------------------


@pytest.mark.parametrize("header,token", [
    ("Bearer abc-123_XYZ", "abc-123_XYZ"),
    ("bearer abc", "abc"),
    ("Bearer  abc ", "abc"),
    ("Bearer", None),
    ("Bearer ", None),
    ("Basic abc", None),
    ("abc", None),
    ("Bearer caf\u00e9", None),  # non-ASCII text
    ("Bearer \udcff\udcfe", None),  # bytes that were not UTF-8, as aiohttp hands them over
    ("Bearer a b", None),
    ("Bearer a\tb", None),
])
def test_a_bearer_token_is_printable_ascii_or_nothing(header, token):
    assert bearer_token(header) == token


# -- JSON depth and Unicode -----------------------------------------------------------------


def test_nesting_is_allowed_up_to_the_limit_and_refused_beyond():
    assert not nested_deeper_than("[" * 32 + "]" * 32, 32)
    assert nested_deeper_than("[" * 33 + "]" * 33, 32)
    assert nested_deeper_than('{"a":' * 33 + "1" + "}" * 33, 32)
    assert nested_deeper_than("[" * 990, 32)  # unclosed, as an attacker sends it
    assert not nested_deeper_than('{"a": [1, {"b": [2]}], "c": {}}', 4)
    assert nested_deeper_than('{"a": [1, {"b": [2]}], "c": {}}', 3)


def test_brackets_inside_strings_are_text_not_nesting():
    assert not nested_deeper_than('{"s": "' + "[" * 100 + '"}', 1)
    assert not nested_deeper_than('{"s": "a \\" [[[[ \\\\", "t": "{{{{"}', 1)


def test_a_deep_body_is_refused_before_json_loads_could_recurse():
    from runtime.http.errors import Refusal
    from runtime.http.gateway import parse_trigger

    with pytest.raises(Refusal) as e:
        parse_trigger(b"[" * 100_000)
    assert (e.value.status, e.value.code) == (400, "malformed_json") and "deeper than 32" in e.value.detail


def test_a_json_object_is_told_from_other_json_by_its_first_byte():
    assert is_json_object(b'{"event": "room_finished"}') and is_json_object(b" \r\n\t{}")
    assert not any(is_json_object(b) for b in (b'"+0.0"', b'["room_finished"]', b"5", b"null", b" []", b""))


def test_lone_surrogates_are_found_wherever_they_are():
    assert invalid_unicode_path({"a": ["ok", {"b": "\ud800"}]}) == ".a[1].b"
    assert invalid_unicode_path({"ok": 1, "\udc00": "x"}) == ".<key 1>"
    assert invalid_unicode_path({"name": "Dana \u00e9 \U0001f600", "n": [1, None, True]}) is None


# -- failed authentications ------------------------------------------------------------


def test_an_address_is_refused_after_max_failures_until_the_window_passes():
    clock = FakeClock()
    limiter = AuthFailureLimiter(max_failures=3, window_s=60, clock=clock)
    for _ in range(2):
        limiter.failed("10.0.0.1")
        clock.now += 1
    assert limiter.retry_after("10.0.0.1") == 0
    limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == pytest.approx(58)  # the first failure leaves at +60
    clock.now += 57.5
    assert limiter.retry_after("10.0.0.1") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.retry_after("10.0.0.1") == 0


def test_other_addresses_are_never_throttled():
    clock = FakeClock()
    limiter = AuthFailureLimiter(max_failures=2, window_s=60, clock=clock)
    for _ in range(10):
        limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") > 0
    assert limiter.retry_after("10.0.0.2") == 0
    limiter.failed("10.0.0.2")
    assert limiter.retry_after("10.0.0.2") == 0


def test_failures_slide_out_of_the_window():
    clock = FakeClock()
    limiter = AuthFailureLimiter(max_failures=3, window_s=10, clock=clock)
    for _ in range(10):  # one failure every 5 s: never 3 within 10 s
        limiter.failed("10.0.0.1")
        assert limiter.retry_after("10.0.0.1") == 0
        clock.now += 5


def test_memory_is_bounded_and_the_stalest_address_goes_first():
    clock = FakeClock()
    limiter = AuthFailureLimiter(max_failures=1, window_s=60, clock=clock, max_addresses=3)
    for i in range(5):
        limiter.failed(f"10.0.0.{i}")
        clock.now += 1
    assert len(limiter) == 3
    assert [limiter.retry_after(f"10.0.0.{i}") > 0 for i in range(5)] == [False, False, True, True, True]
    clock.now += 60
    assert [limiter.retry_after(f"10.0.0.{i}") for i in range(5)] == [0] * 5
    assert len(limiter) == 0  # expired addresses are dropped as they are looked at


def test_retry_after_is_whole_seconds_rounded_up():
    assert [retry_after_header(s) for s in (0.0, 0.2, 1.0, 59.1)] == ["1", "1", "1", "60"]


# -- webhook ids -------------------------------------------------------------------------


def test_recent_ids_are_per_key_and_bounded():
    ids = RecentIds(per_key=2)
    ids.add("alpha", "EV_1")
    assert ("alpha", "EV_1") in ids and ("beta", "EV_1") not in ids
    ids.add("alpha", "EV_2")
    ids.add("alpha", "EV_3")
    assert [("alpha", f"EV_{i}") in ids for i in (1, 2, 3)] == [False, True, True]


# -- aiohttp, as the gateway uses it ------------------------------------------------------


async def _serve(app: web.Application, **runner_options) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site.port


def test_the_middleware_answers_json_for_aiohttp_errors_and_hides_crashes():
    from runtime.http.errors import json_errors

    async def crash(request: web.Request) -> web.Response:
        raise RuntimeError("internal detail: /srv/secret/path")

    async def run() -> list:
        import aiohttp

        app = web.Application(middlewares=[json_errors])
        app.router.add_post("/crash", crash)
        runner, port = await _serve(app)
        answers = []
        try:
            async with aiohttp.ClientSession() as http:
                for method, path in (("POST", "/crash"), ("GET", "/nowhere"), ("GET", "/crash")):
                    async with http.request(method, f"http://127.0.0.1:{port}{path}") as r:
                        answers.append((r.status, r.content_type, await r.text(), r.headers.get("Allow")))
        finally:
            await runner.cleanup()
        return answers

    crashed, missing, wrong_method = asyncio.run(run())
    assert crashed[:2] == (500, "application/json") and '"error": "internal"' in crashed[2]
    assert "secret" not in crashed[2] and "Traceback" not in crashed[2] and "RuntimeError" not in crashed[2]
    assert missing[:2] == (404, "application/json") and '"error": "not_found"' in missing[2]
    assert wrong_method[:2] == (405, "application/json") and '"error": "method_not_allowed"' in wrong_method[2]
    assert wrong_method[3] == "POST"


def test_aiohttp_closes_a_connection_whose_request_head_is_late():
    """The header timeout is aiohttp's keep-alive timer, armed when a connection opens.

    If an aiohttp upgrade or downgrade changes that, this fails, and the gateway is open to
    slowloris again: see ``runtime.http.gateway.create_runner``.
    """
    timeout = 0.3

    def hold(port: int, trickle: bool) -> float:
        with socket.create_connection(("127.0.0.1", port)) as s:
            started = time.monotonic()
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            s.settimeout(0.05)
            while time.monotonic() - started < 5:
                try:
                    if s.recv(1024) == b"":
                        return time.monotonic() - started
                except TimeoutError:
                    if trickle:
                        s.sendall(b"X")  # one byte of a header name, again and again
                except ConnectionResetError:
                    return time.monotonic() - started
            return float("inf")

    async def run() -> list[float]:
        runner, port = await _serve(web.Application(), keepalive_timeout=timeout)
        try:
            loop = asyncio.get_running_loop()
            return list(await asyncio.gather(*(loop.run_in_executor(None, hold, port, t) for t in (False, True))))
        finally:
            await runner.cleanup()

    for held in asyncio.run(run()):
        assert timeout * 0.9 <= held < timeout + 1.0


@pytest.mark.timeout(5)  # a guard against a hang, not a benchmark: quadratic took 12 s on 64 KiB
def test_the_depth_check_stays_linear_on_an_unclosed_string_of_escaped_quotes():
    text = '{"a":"' + '\\"' * 32_000
    assert not nested_deeper_than(text, 32)
    assert nested_deeper_than('{"s": "\\\\", "t": ' + "[" * 40 + "]" * 40 + "}", 32)  # an escaped backslash ends no string early
