"""Pure helpers that keep hostile HTTP input away from the runtime.

Nothing here knows aiohttp, actors or settings files, so each piece is unit-tested in
milliseconds (``tests/unit/test_http_guard.py``); the gateway wires them to requests.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable

Clock = Callable[[], float]

MAX_JSON_DEPTH = 32

# A bearer token is printable ASCII without spaces (RFC 6750's b64token is narrower still).
# Anything else (non-ASCII text, bytes that are not UTF-8) is no token at all, so it can
# never reach a comparison that would raise on it.
_TOKEN = re.compile(r"[\x21-\x7e]{1,4096}")
# A JSON string literal (escapes included); its brackets are text, not nesting.
# Escapes first, then strings: each pass is linear, whatever the input. (One regex for a
# string with escapes inside backtracks quadratically on an unclosed '"\\"\\"\\"...'.)
_JSON_ESCAPE = re.compile(r"\\.", re.DOTALL)
_JSON_STRING = re.compile(r'"[^"]*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None.

    aiohttp hands header bytes that are not UTF-8 over as lone surrogates; such a header,
    like any token that is not printable ASCII, yields None: the caller answers 401.
    """
    scheme, _, token = authorization.partition(" ")
    token = token.strip(" ")
    if scheme.lower() != "bearer" or not _TOKEN.fullmatch(token):
        return None
    return token


def nested_deeper_than(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON ``text`` nests arrays and objects more than ``limit`` levels deep.

    Checked before ``json.loads``, whose recursion would otherwise end in RecursionError on
    a body like ``[[[[...``. Brackets inside strings do not count. On text that is not
    valid JSON the answer may be either; the parser refuses such text anyway.
    """
    depth = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', _JSON_ESCAPE.sub("", text))):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > limit:
            return True
    return False


def is_json_object(valid_json: bytes) -> bool:
    """Whether a body already known to be valid JSON is an object, from its first byte.

    LiveKit's webhook parser (protobuf's) reads a JSON string, or a list of strings, as an
    empty event instead of failing; the gateway refuses such a body itself, without parsing
    it a second time.
    """
    return valid_json.lstrip(b" \t\n\r").startswith(b"{")


def invalid_unicode_path(value: object, path: str = "") -> str | None:
    """Where in a parsed JSON value a string is not valid Unicode, or None if none is.

    ``json.loads`` accepts ``"\\ud800"`` and returns a lone surrogate, which cannot be
    encoded as UTF-8 and would fail later, far from the request that carried it. A key
    that is itself invalid is named by position (``<key 2>``). The recursion is bounded:
    the body was checked by ``nested_deeper_than`` first.
    """
    if isinstance(value, str):
        return None if _is_unicode(value) else (path or "(value)")
    if isinstance(value, dict):
        for i, (k, v) in enumerate(value.items()):
            if not _is_unicode(k):
                return f"{path}.<key {i}>"
            found = invalid_unicode_path(v, f"{path}.{k}")
            if found:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = invalid_unicode_path(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class AuthFailureLimiter:
    """Counts failed authentications per source address, in bounded memory.

    An address with ``max_failures`` failures within the last ``window_s`` seconds is
    refused (429) until its oldest failure leaves the window, even with a right token:
    otherwise a blocked guesser would still learn which guess was right. Refusals are not
    failures, so the block ends on time. Other addresses are never affected. At most
    ``max_addresses`` are remembered; the one whose last failure is oldest goes first.
    """

    def __init__(self, max_failures: int, window_s: float, clock: Clock = time.monotonic,
                 max_addresses: int = 10_000) -> None:
        self.max_failures, self.window_s, self.max_addresses = max_failures, window_s, max_addresses
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()  # oldest last-failure first

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again; 0 when it is not blocked."""
        times = self._recent(address)
        if len(times) < self.max_failures:
            return 0.0
        return max(times[0] + self.window_s - self._clock(), 0.0)

    def failed(self, address: str) -> None:
        """Record one failed authentication from ``address``."""
        times = self._recent(address)
        times.append(self._clock())
        while len(times) > self.max_failures:  # more than this is never needed to decide
            times.popleft()
        self._failures[address] = times
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)

    def _recent(self, address: str) -> deque[float]:
        times = self._failures.get(address, deque())
        horizon = self._clock() - self.window_s
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            self._failures.pop(address, None)
        return times

    def __len__(self) -> int:
        return len(self._failures)


def retry_after_header(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


class RecentIds:
    """The last ``per_key`` ids seen under each key: webhook event ids, per client.

    LiveKit retries a webhook it believes failed, and a captured request could be sent
    again while its signature is still valid; an id seen before is a duplicate.
    """

    def __init__(self, per_key: int = 10_000) -> None:
        self.per_key = per_key
        self._seen: dict[str, OrderedDict[str, None]] = {}

    def __contains__(self, key_and_id: tuple[str, str]) -> bool:
        key, id_ = key_and_id
        return id_ in self._seen.get(key, ())

    def add(self, key: str, id_: str) -> None:
        ids = self._seen.setdefault(key, OrderedDict())
        ids[id_] = None
        ids.move_to_end(id_)
        while len(ids) > self.per_key:
            ids.popitem(last=False)
