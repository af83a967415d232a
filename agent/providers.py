"""Model providers from the agent's config: real plugins when configured, offline otherwise.

livekit-agents plugins must be imported on the main thread (they register themselves),
and jobs run on a job thread, so :func:`preload` imports whatever a client's catalog
names at worker start, before the worker reports idle.
"""

from __future__ import annotations

import importlib
from typing import Any

from agent.offline_llm import OfflineLLM

PLUGIN_MODULES = {
    "openai": "livekit.plugins.openai",
    "deepgram": "livekit.plugins.deepgram",
    "cartesia": "livekit.plugins.cartesia",
    "elevenlabs": "livekit.plugins.elevenlabs",
}


class ProviderError(Exception):
    """A configured provider cannot be used (its plugin is not installed)."""


def _plugin(provider: str) -> Any:
    try:
        return importlib.import_module(PLUGIN_MODULES[provider])
    except ImportError as e:
        raise ProviderError(f"provider {provider!r} needs {PLUGIN_MODULES[provider]} ({e})") from None


def preload(catalog: list[dict]) -> None:
    for agent in catalog:
        for kind in ("llm", "stt", "tts"):
            chosen = agent.get(kind) or {}
            if chosen.get("provider") in PLUGIN_MODULES:
                _plugin(chosen["provider"])


def make_llm(config: dict | None) -> Any:
    config = config or {}
    if config.get("provider", "offline") == "offline":
        return OfflineLLM()
    openai = _plugin("openai")
    return openai.LLM(model=config.get("model") or "gpt-4o-mini", api_key=config["api_key"])


def make_stt(config: dict | None) -> Any:
    if not config:
        return None
    plugin = _plugin(config["provider"])
    model = config.get("model") or ("nova-3" if config["provider"] == "deepgram" else "gpt-4o-mini-transcribe")
    return plugin.STT(model=model, api_key=config["api_key"])


def make_tts(config: dict | None, voice_id: str) -> Any:
    if not config:
        return None
    plugin = _plugin(config["provider"])
    voice = config.get("voice_id") or voice_id
    if config["provider"] == "elevenlabs":
        return plugin.TTS(voice_id=voice, api_key=config["api_key"])
    return plugin.TTS(voice=voice, api_key=config["api_key"])
