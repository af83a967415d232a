"""Model providers from the agent's config: real plugins when configured, offline otherwise.

livekit-agents plugins must be imported on the main thread (they register themselves),
and jobs run on a job thread, so :func:`preload` imports whatever a client's catalog
names at worker start, before the worker reports idle. It also builds what voice needs
once per worker, not per session or turn: the silero VAD (any agent with speech input)
and the offline recognizer with its client's domain model. Both live in ``_voice``,
written once on the main thread before any session starts, then only read.
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

from agent.contract import DEFAULT_END_OF_TURN_S, CatalogAgent, ProviderChoice
from agent.offline_llm import OfflineLLM

logger = logging.getLogger("autonomite.agent")

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


_voice: dict[str, Any] = {}


def preload(catalog: list[CatalogAgent], knowledge: list[str] | None = None) -> None:
    for agent in catalog:
        for chosen in (agent.llm, agent.stt, agent.tts):
            if chosen is not None and chosen.provider in PLUGIN_MODULES:
                _plugin(chosen.provider)
    if any(agent.stt for agent in catalog):
        started = time.perf_counter()
        from livekit.plugins import silero

        # One VAD per silence window the catalog asks for (most catalogs: one). A VAD's
        # options are shared by all its streams, so agents that differ need their own.
        windows = sorted({silence_window(agent) for agent in catalog if agent.stt})
        _voice["vads"] = {w: silero.VAD.load(min_silence_duration=w) for w in windows}
        from agent.offline_voice import check_voice

        for agent in catalog:
            if agent.tts is not None and agent.tts.provider == "offline":
                try:
                    check_voice(agent.tts.voice_id or "en-us")
                except (RuntimeError, OSError) as e:
                    raise ProviderError(f"agent {agent.name!r}: {e}") from None
        if any(agent.offline_speech for agent in catalog):
            from agent.offline_voice import Recognizer

            texts = [a.system_prompt for a in catalog] + list(knowledge or [])
            _voice["recognizer"] = Recognizer(texts)
        logger.info("voice ready in %.2f s: silero VAD loaded (silence windows %s s)%s", time.perf_counter() - started,
                    ", ".join(f"{w:g}" for w in windows), ", offline recognizer built" if "recognizer" in _voice else "")


def silence_window(agent: CatalogAgent) -> float:
    """The VAD silence window an agent's sessions use: its end_of_turn_s with offline STT.
    A cloud STT keeps livekit-agents' own turn detection, whose end-of-turn model needs a
    window it accepts (at least 0.25 s in 1.8.9): it gets silero's default."""
    return agent.end_of_turn_s if agent.offline_speech else DEFAULT_END_OF_TURN_S


def vad(end_of_turn_s: float = DEFAULT_END_OF_TURN_S) -> Any:
    """The worker's VAD for this silence window, or None in a worker whose agents take no speech."""
    return _voice.get("vads", {}).get(float(end_of_turn_s))


def make_llm(config: ProviderChoice) -> Any:
    if config.provider == "offline":
        return OfflineLLM(config.first_token_s or 0.0)
    openai = _plugin("openai")
    return openai.LLM(model=config.model or "gpt-4o-mini", api_key=config.api_key)


def make_stt(config: ProviderChoice | None) -> Any:
    if config is None:
        return None
    if config.provider == "offline":
        from agent.offline_voice import OfflineSTT

        return OfflineSTT(_voice["recognizer"])
    plugin = _plugin(config.provider)
    model = config.model or ("nova-3" if config.provider == "deepgram" else "gpt-4o-mini-transcribe")
    return plugin.STT(model=model, api_key=config.api_key)


def audio_input(agent: CatalogAgent) -> Any:
    """The session's audio input (livekit-agents' ``RoomOptions.audio_input``): none without
    an STT; with the offline STT, none of livekit-agents' automatic gain control. pocketsphinx
    normalises a steady gain itself (CMN), and the AGC's boost at a session's start clipped
    the caller's first words ("seven three one nine" heard as "seven three one i"). A cloud
    STT keeps livekit-agents' default."""
    if agent.stt is None:
        return False
    if agent.offline_speech:
        from livekit.agents.voice.room_io import AudioInputOptions

        return AudioInputOptions(auto_gain_control=False)
    return True


def make_tts(config: ProviderChoice | None, voice_id: str) -> Any:
    if config is None:
        return None
    if config.provider == "offline":  # the agent's voice_id names a cloud voice: not for espeak-ng
        from agent.offline_voice import TTS_VOICE, OfflineTTS

        return OfflineTTS(config.voice_id or TTS_VOICE)
    plugin = _plugin(config.provider)
    voice = config.voice_id or voice_id
    if config.provider == "elevenlabs":
        return plugin.TTS(voice_id=voice, api_key=config.api_key)
    return plugin.TTS(voice=voice, api_key=config.api_key)
