"""Retrieval over one client's own documents: BM25 (bm25s), indexed once per worker start.

The worker builds its index before it registers with LiveKit, so it reports idle only with
the index ready and no session ever waits for indexing. It reads only the directory its
runtime handed it (``AUTONOMITE_KNOWLEDGE_DIR``): its own client's documents.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import bm25s

logger = logging.getLogger("autonomite.agent.rag")

DOCUMENT_SUFFIXES = (".txt", ".md")
_PARAGRAPH = re.compile(r"\n\s*\n")


def _tokens(texts: list[str]) -> list[list[str]]:
    # Plain token strings (not ids), so queries and corpus share no hidden vocabulary state.
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class KnowledgeBase:
    def __init__(self, passages: list[str]) -> None:
        self.passages = passages
        self._index = bm25s.BM25()
        if passages:
            self._index.index(_tokens(passages), show_progress=False)

    @classmethod
    def from_dir(cls, path: Path) -> "KnowledgeBase":
        """Every paragraph of every .txt and .md file below ``path`` is one passage."""
        started = time.perf_counter()
        passages = []
        for file in sorted(p for p in path.rglob("*") if p.suffix in DOCUMENT_SUFFIXES and p.is_file()):
            text = file.read_text(encoding="utf-8", errors="replace")
            passages += [" ".join(p.split()) for p in _PARAGRAPH.split(text) if p.strip()]
        kb = cls(passages)
        logger.info("indexed %d passages in %.3f s", len(passages), time.perf_counter() - started)
        return kb

    def search(self, query: str, k: int = 3) -> list[str]:
        """The best passages for ``query``, best first; only those that share a term with it."""
        if not self.passages or not query.strip():
            return []
        docs, scores = self._index.retrieve(_tokens([query]), k=min(k, len(self.passages)), show_progress=False)
        return [self.passages[int(i)] for i, score in zip(docs[0], scores[0], strict=True) if score > 0]
