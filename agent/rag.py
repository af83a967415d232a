"""Retrieval over one client's own documents: BM25 (bm25s), indexed once per worker start.

The worker builds its index before it registers with LiveKit, so it reports idle only with
the index ready and no session ever waits for indexing. It reads only the directory its
runtime handed it (``AUTONOMITE_KNOWLEDGE_DIR``): its own client's documents. On the
process backend the worker cannot read that directory at all (only the runtime can): the
runtime reads the documents and hands them over in a memfd (``AUTONOMITE_KNOWLEDGE_FD``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

logger = logging.getLogger("autonomite.agent.rag")

DOCUMENT_SUFFIXES = (".txt", ".md")
_PARAGRAPH = re.compile(r"\n\s*\n")


def read_documents(path: Path) -> list[tuple[str, str]]:
    """Every .txt and .md file below ``path``: (its path below ``path``, its text)."""
    return [(str(file.relative_to(path)), file.read_text(encoding="utf-8", errors="replace"))
            for file in sorted(p for p in path.rglob("*") if p.suffix in DOCUMENT_SUFFIXES and p.is_file())]


def documents_memfd(path: Path) -> int:
    """The documents below ``path`` as JSON in a memfd, for a worker that may not read ``path``."""
    fd = os.memfd_create("autonomite-documents", os.MFD_CLOEXEC)
    data = json.dumps(read_documents(path)).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    # Plain token strings (not ids), so queries and corpus share no hidden vocabulary state.
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class KnowledgeBase:
    def __init__(self, passages: list[str]) -> None:
        import bm25s

        self.passages = passages
        self._index = bm25s.BM25()
        if passages:
            self._index.index(_tokens(passages), show_progress=False)

    @classmethod
    def from_dir(cls, path: Path) -> KnowledgeBase:
        return cls.from_documents(read_documents(path))

    @classmethod
    def from_fd(cls, fd: int) -> KnowledgeBase:
        """The documents the runtime handed over in a memfd (see :func:`documents_memfd`)."""
        with os.fdopen(fd, "rb") as f:
            return cls.from_documents([tuple(d) for d in json.loads(f.read())])

    @classmethod
    def from_documents(cls, documents: list[tuple[str, str]]) -> KnowledgeBase:
        """Every paragraph of every document is one passage."""
        started = time.perf_counter()
        passages = []
        for _, text in documents:
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
