"""A small deterministic LLM behind the real ``livekit.agents.llm.LLM`` interface.

It stands in for a cloud LLM where none can be reached (the demo, the tests, the
benchmarks). It is honest about what it is: no model, just rules that read the same chat
context a real LLM gets (the primed system prompt, retrieved passages, the user's turn) and
answer from it, so the tests can see that priming and retrieval reached the model.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any

from livekit.agents import llm
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions

KNOWLEDGE_HEADER = "Relevant passages from the knowledge base:"
_CONTEXT_BLOCK = re.compile(r"```json\n(.*?)\n```", re.S)
_SPEAKS_FOR = re.compile(r"^- You speak for: (.+)$", re.M)


def _text(item: Any) -> str:
    return (getattr(item, "text_content", None) or "") if getattr(item, "type", "message") == "message" else ""


def compose_reply(messages: list[tuple[str, str]]) -> str:
    """The reply for a conversation of (role, text) pairs, as the rules above read it."""
    instructions = "\n".join(t for r, t in messages if r in ("system", "developer") and not t.startswith(KNOWLEDGE_HEADER))
    passages = [t for r, t in messages if r in ("system", "developer") and t.startswith(KNOWLEDGE_HEADER)]
    user_turns = [t for r, t in messages if r == "user"]
    context: dict[str, Any] = {}
    if (block := _CONTEXT_BLOCK.search(instructions)) is not None:
        try:
            context = json.loads(block.group(1))
        except ValueError:
            context = {}
    name = context.get("name") if isinstance(context.get("name"), str) else None
    company = m.group(1) if (m := _SPEAKS_FOR.search(instructions)) else None

    opening = "(Preview session) " if "Preview mode:" in instructions else ""
    if not user_turns:
        welcome = "Welcome back" if "Conversation history:" in instructions else "Hello"
        who = f" {name}" if name else ""
        for_whom = f", I'm the assistant for {company}" if company else ""
        return f"{opening}{welcome}{who}{for_whom}. How can I help you today?"
    address = f"{name}, " if name else ""
    if passages:
        first = passages[-1][len(KNOWLEDGE_HEADER):].strip().split("\n")[0].lstrip("- ").strip()
        return f"{opening}{address}here is what I found: {first}"
    return f"{opening}{address}you said: {user_turns[-1].strip()[:200]}"


class OfflineLLM(llm.LLM):
    def __init__(self, first_token_s: float = 0.0) -> None:
        super().__init__()
        self.first_token_s = first_token_s  # a cloud LLM's time to first token, if asked to stand in for it

    @property
    def model(self) -> str:
        return "autonomite-offline"

    @property
    def provider(self) -> str:
        return "offline"

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[Any] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        **_: Any,
    ) -> llm.LLMStream:
        return _OfflineStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class _OfflineStream(llm.LLMStream):
    async def _run(self) -> None:
        messages = [(item.role, _text(item)) for item in self._chat_ctx.items if hasattr(item, "role")]
        reply = compose_reply(messages)
        request_id = uuid.uuid4().hex
        first_token_s = getattr(self._llm, "first_token_s", 0.0)  # an OfflineLLM's, by construction
        if first_token_s:
            await asyncio.sleep(first_token_s)
        for i, word in enumerate(reply.split(" ")):
            piece = word if i == 0 else " " + word
            self._event_ch.send_nowait(
                llm.ChatChunk(id=request_id, delta=llm.ChoiceDelta(role="assistant", content=piece))
            )
