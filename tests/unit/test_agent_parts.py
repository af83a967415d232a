from __future__ import annotations

import os
from unittest import mock

import pytest

from agent import priming, providers
from agent.contract import DEFAULT_END_OF_TURN_S, CatalogAgent, ProviderChoice
from agent.offline_llm import KNOWLEDGE_HEADER, OfflineLLM, compose_reply
from agent.rag import KnowledgeBase


def prompt(**meta) -> str:
    import json

    return priming.build_prompt("You are the support agent.", priming.parse_metadata(json.dumps(meta)))


def test_the_offline_llm_greets_from_the_primed_prompt():
    system = prompt(client_name="Acme Corp", user_context={"name": "Dana"})
    assert compose_reply([("system", system)]) == "Hello Dana, I'm the assistant for Acme Corp. How can I help you today?"
    assert compose_reply([("system", prompt())]) == "Hello. How can I help you today?"
    assert compose_reply([("system", prompt(has_conversation_history=True))]).startswith("Welcome back")
    assert compose_reply([("system", prompt(is_preview=True))]).startswith("(Preview session) ")


def test_the_offline_llm_answers_from_retrieved_passages_or_echoes():
    system = prompt(user_context={"name": "Dana"})
    assert compose_reply([("system", system), ("user", "hi there")]) == "Dana, you said: hi there"
    found = [("system", system), ("user", "warranty?"), ("system", f"{KNOWLEDGE_HEADER}\n- Seven years.\n- Other.")]
    assert compose_reply(found) == "Dana, here is what I found: Seven years."


def test_knowledge_base_finds_the_passage_that_shares_terms():
    kb = KnowledgeBase(["The Zephyr-9 warranty lasts seven years.", "Returns within 30 days.", "Office in Springfield."])
    assert kb.search("how long is the zephyr warranty")[0].startswith("The Zephyr-9 warranty")
    assert kb.search("banana smoothie") == []
    assert KnowledgeBase([]).search("anything") == []


def test_knowledge_base_reads_paragraphs_of_text_and_markdown(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\nFirst paragraph\nwraps here.\n\nSecond one.\n")
    (tmp_path / "skip.pdf").write_bytes(b"%PDF")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("Third.")
    kb = KnowledgeBase.from_dir(tmp_path)
    assert kb.passages == ["# Title", "First paragraph wraps here.", "Second one.", "Third."]


def test_providers_default_to_offline_and_build_real_plugins_when_configured():
    assert isinstance(providers.make_llm(CatalogAgent("a").llm), OfflineLLM)
    assert providers.make_stt(None) is None and providers.make_tts(None, "alloy") is None
    openai = pytest.importorskip("livekit.plugins.openai")
    assert isinstance(providers.make_llm(ProviderChoice("openai", model="gpt-4o-mini", api_key="sk-test")), openai.LLM)
    elevenlabs = pytest.importorskip("livekit.plugins.elevenlabs")
    tts = providers.make_tts(ProviderChoice("elevenlabs", api_key="el-test"), "voice-1")
    assert isinstance(tts, elevenlabs.TTS)


def test_the_offline_stt_hears_the_caller_without_livekit_agents_gain_control():
    """Its start-of-session boost clipped a caller's first words (see providers.audio_input)."""
    offline = providers.audio_input(CatalogAgent("a", stt=ProviderChoice("offline")))
    assert offline.auto_gain_control is False
    cloud = CatalogAgent("a", stt=ProviderChoice("deepgram", api_key="dg"))
    assert providers.audio_input(cloud) is True  # livekit-agents' default
    assert providers.audio_input(CatalogAgent("typed")) is False  # no STT: no audio in


def test_only_an_offline_stt_agent_chooses_its_silence_window():
    from agent.providers import silence_window

    offline = CatalogAgent("a", stt=ProviderChoice("offline"), end_of_turn_s=0.2)
    cloud = CatalogAgent("a", stt=ProviderChoice("deepgram"), end_of_turn_s=0.2)  # its turn detector needs >= 0.25 s
    assert silence_window(offline) == 0.2
    assert silence_window(cloud) == DEFAULT_END_OF_TURN_S
    assert silence_window(CatalogAgent("a", stt=ProviderChoice("offline"))) == DEFAULT_END_OF_TURN_S


def test_the_catalog_crosses_to_the_worker_typed_and_whole():
    """What AgentSettings.for_worker gives is what the worker reads back from its environment."""
    from agent.contract import WorkerConfig
    from runtime.settings import AgentSettings

    settings = AgentSettings.model_validate({
        "name": "support", "system_prompt": "Be brief.", "enable_rag": True, "end_of_turn_s": 0.3,
        "llm": {"provider": "openai", "api_key": "sk-client", "model": "gpt-4o-mini"},
        "stt": {"provider": "offline"}, "tts": {"provider": "offline", "voice_id": "en-gb"},
    })
    sent = settings.for_worker()
    assert sent.llm.api_key == "sk-client"  # revealed for this client's own worker only
    config = WorkerConfig("w1", "acme", "support", 9000, catalog=[sent])
    with mock.patch.dict(os.environ, config.to_env()):
        received = WorkerConfig.from_env().catalog
    assert received == [sent]
    assert received[0].offline_speech and received[0].end_of_turn_s == 0.3 and received[0].tts.voice_id == "en-gb"
