"""BM25 retrieval over a folder of documents (``bm25s``: numpy only, no service), for the rag columns.

Every ``.md``/``.txt`` file under the folder is one document (or each record of a ``.jsonl`` file with
``title`` and ``text``); documents are split into passages at blank lines, each passage prefixed by its
document's title (first heading or file name) so a retrieved paragraph keeps its context. Queries and
passages are tokenized by ``bm25s.tokenize`` (lower-cased words, English stop words removed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DOC_SUFFIXES = (".md", ".txt", ".markdown", ".rst")


class DocsError(ValueError):
    """The docs folder is missing or holds no documents; the message names it."""


@dataclass
class Passage:
    source: str
    text: str


def _documents(root: Path) -> list[tuple[str, str, str]]:
    """(source, title, text) of each document in the folder or .jsonl file ``root``."""
    if root.is_file() and root.suffix == ".jsonl":
        import json

        docs = []
        for line_no, line in enumerate(root.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                docs.append((f"{root.name}:{line_no}", str(rec.get("title") or ""), str(rec["text"])))
            except (ValueError, KeyError, AttributeError):
                raise DocsError(f"{root}:{line_no}: a docs record needs a 'text' field (and may have 'title')"
                                ) from None
        return docs
    if not root.is_dir():
        raise DocsError(f"--docs {root}: folder not found (a folder of .md/.txt documents for the rag columns)")
    out = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in DOC_SUFFIXES and p.is_file()):
        text = path.read_text(errors="replace")
        title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.strip()), path.stem)
        out.append((str(path.relative_to(root)), title, text))
    return out


def load_passages(folder: str | Path) -> list[Passage]:
    root = Path(folder)
    passages = []
    for source, title, text in _documents(root):
        blocks = [b.strip() for b in text.split("\n\n") if b.strip() and b.strip().lstrip("# ").strip() != title]
        passages += [Passage(source, f"{title}: {b}" if title else b) for b in blocks]
    if not passages:
        raise DocsError(f"--docs {root}: no .md or .txt documents in the folder")
    return passages


class Retriever:
    """Top-k passages for a query by BM25 (Okapi, bm25s defaults k1=1.5, b=0.75)."""

    def __init__(self, folder: str | Path) -> None:
        import logging

        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)     # it logs each index build at DEBUG/INFO
        self.passages = load_passages(folder)
        self._bm25s = bm25s
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize([p.text for p in self.passages], show_progress=False), show_progress=False)

    def top(self, query: str, k: int = 2) -> list[Passage]:
        k = min(k, len(self.passages))
        tokens = self._bm25s.tokenize([query], show_progress=False)
        if not tokens.vocab:          # only stop words: nothing to match
            return self.passages[:k]
        docs, scores = self.index.retrieve(tokens, k=k, show_progress=False)
        return [self.passages[int(i)] for i in docs[0]]
