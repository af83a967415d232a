"""A LiveKit webhook: the signature is checked apart from the event, so each failure gets its own answer."""

from __future__ import annotations

import pytest
from livekit import api
from pydantic import SecretStr

from runtime.livekit.client import InvalidEvent, parse_webhook, verify_webhook
from runtime.settings import LiveKitSettings
from tests.support import livekit_signature

LK = LiveKitSettings(url="ws://127.0.0.1:7880", api_key=SecretStr("APIkey"), api_secret=SecretStr("s" * 32))


def _signed(body: str, secret: str = "s" * 32) -> str:
    return livekit_signature("APIkey", secret, body)


def test_a_body_signed_with_the_clients_key_verifies():
    verify_webhook(LK, '{"event": "room_started"}', _signed('{"event": "room_started"}'))


@pytest.mark.parametrize("authorization", [
    _signed('{"event": "room_finished"}'),  # signed, but another body
    _signed('{"event": "room_started"}', secret="t" * 32),  # another key pair
    api.AccessToken("APIkey", "s" * 32).to_jwt(),  # no body hash at all
    "",
])
def test_anything_else_does_not(authorization):
    with pytest.raises(Exception) as refused:
        verify_webhook(LK, '{"event": "room_started"}', authorization)
    assert not isinstance(refused.value, (TypeError, AttributeError, KeyError)), "a refusal, not a bug"


@pytest.mark.parametrize("body, field", [
    ("{}", "event"),
    ('{"room": {"name": "r"}}', "event"),
    ('{"event": 5}', "event"),
    ('{"event": "room_started", "createdAt": "soon"}', "createdAt"),
    ('{"event": "room_started", "room": {"name": ["a"]}}', "room.name"),
])
def test_a_body_that_is_no_event_names_the_field(body, field):
    with pytest.raises(InvalidEvent) as caught:
        parse_webhook(body)
    assert caught.value.field == field and caught.value.reason


def test_an_event_parses_with_unknown_fields_ignored():
    event = parse_webhook('{"event": "participant_left", "room": {"name": "r"}, "someNewField": 1}')
    assert (event.event, event.room.name) == ("participant_left", "r")
