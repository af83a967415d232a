from __future__ import annotations

from datetime import UTC, datetime

from actors.dispatch import build_metadata
from actors.messages import TriggerRequest
from runtime.settings import ClientSettings

CLIENT = ClientSettings.model_validate(
    {
        "id": "acme",
        "name": "Acme Corp",
        "api_token": "acme-token-0123456789",
        "livekit": {"url": "ws://127.0.0.1:7880", "api_key": "k", "api_secret": "s"},
        "agents": [{"name": "support", "system_prompt": "x" * 500, "voice_id": "nova", "enable_rag": True}],
    }
)


def test_metadata_carries_what_primes_the_agent():
    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    req = TriggerRequest("acme", "support", "preview_demo", "dana@example.com", {"plan": "gold"}, "conv-1")
    m = build_metadata(CLIENT, CLIENT.agents[0], req, now)
    assert m["client_name"] == "Acme Corp" and m["agent_name"] == "support"
    assert m["user_email"] == "dana@example.com" and m["user_context"] == {"plan": "gold"}
    assert m["system_prompt"] == "x" * 200
    assert m["enable_rag"] is True and m["voice_id"] == "nova"
    assert m["session_started_at"] == "2026-11-23T12:00:00+00:00"
    assert m["is_preview"] is True and m["has_conversation_history"] is True


def test_defaults_without_optional_fields():
    m = build_metadata(CLIENT, CLIENT.agents[0], TriggerRequest("acme", "support", "room-1"))
    assert m["is_preview"] is False and m["has_conversation_history"] is False
    assert m["user_context"] == {} and m["user_email"] is None
    assert "api_secret" not in str(m) and "acme-token" not in str(m)
