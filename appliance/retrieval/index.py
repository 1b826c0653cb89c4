"""The corpus index: SQLite FTS5, built from a verified release's corpus, no extension to load.

Two full-text tables over the same passages:
- `words` (porter stemming over unicode61 tokens): BM25 with column weights, so a match
  in a section's title counts TITLE_WEIGHT times one in its text;
- `grams` (the trigram tokenizer): substrings, for codes and identifiers that word
  tokenizing splits apart (`demo@1.0.0`, `x-appliance-route`, exit code `23`).
A query runs on both and the two rankings are fused by reciprocal rank (RRF, k = 60), the
usual way to merge rankings whose scores are not comparable.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.retrieval.corpus import CORPUS_DIR, Passage, load_corpus

TITLE_WEIGHT = 4.0
RRF_K = 60
CANDIDATES = 20  # taken from each ranking before they are fused
_WORD = re.compile(r"\w+")
# Question words and glue: in a small corpus BM25 gives a rare one ("it", "how") more weight
# than the words that carry the question.
STOPWORDS = frozenset(
    "a an and are as at be by can could do does for from how i if in is it its me my of on "  # noqa: SIM905
    "or our should so that the their this to was we what when where which who why will with "
    "would you your".split()
)
_IDENTIFIER = re.compile(r"[\w.@/:-]*[\d@._/:-][\w.@/:-]*")  # has a digit or a joiner


@dataclass(frozen=True)
class Hit:
    id: str
    title: str
    text: str
    score: float  # fused: higher is better


@dataclass(frozen=True)
class Retrieval:
    """One search: what was asked, what came back, how long it took."""

    query: str
    k: int
    hits: tuple[Hit, ...]
    seconds: float

    @property
    def ids(self) -> list[str]:
        return [hit.id for hit in self.hits]


def index_corpus(release_dir: Path, target: Path) -> int:
    """Index a verified release's corpus into `target`; the number of passages (0, and no
    index, when the release has no corpus)."""
    corpus = release_dir / CORPUS_DIR
    if not corpus.is_dir():
        return 0
    passages = load_corpus(corpus)
    target.parent.mkdir(parents=True, exist_ok=True)
    build_index(passages, target)
    return len(passages)


def build_index(passages: list[Passage], target: Path) -> None:
    """Write the index to `target` (replaced whole: written beside it, then renamed)."""
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    with sqlite3.connect(partial) as db:
        db.execute("CREATE TABLE passages (rowid INTEGER PRIMARY KEY, id TEXT UNIQUE, title, text)")
        db.execute(
            "CREATE VIRTUAL TABLE words USING fts5(title, text, content='passages', "
            "content_rowid='rowid', tokenize='porter unicode61')"
        )
        db.execute(
            "CREATE VIRTUAL TABLE grams USING fts5(title, text, content='passages', "
            "content_rowid='rowid', tokenize='trigram')"
        )
        db.executemany(
            "INSERT INTO passages (id, title, text) VALUES (?, ?, ?)",
            [(p.id, p.title, p.text) for p in passages],
        )
        db.execute("INSERT INTO words (words) VALUES ('rebuild')")
        db.execute("INSERT INTO grams (grams) VALUES ('rebuild')")
    db.close()
    partial.replace(target)


class Index:
    """A read-only handle on a built index."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)

    def close(self) -> None:
        self._db.close()

    def search(self, query: str, k: int) -> Retrieval:
        started = time.perf_counter()
        fused: dict[int, float] = {}
        for ranking in (self._words(query), self._grams(query)):
            for rank, rowid in enumerate(ranking):
                fused[rowid] = fused.get(rowid, 0.0) + 1.0 / (RRF_K + rank + 1)
        best = sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:k]
        hits = []
        for rowid, score in best:
            id_, title, text = self._db.execute(
                "SELECT id, title, text FROM passages WHERE rowid = ?", [rowid]
            ).fetchone()
            hits.append(Hit(id_, title, text, score))
        return Retrieval(query, k, tuple(hits), time.perf_counter() - started)

    def _words(self, query: str) -> list[int]:
        return self._ranked(
            "words", [t for t in _WORD.findall(query.lower()) if t not in STOPWORDS]
        )

    def _grams(self, query: str) -> list[int]:
        return self._ranked("grams", [c for c in _IDENTIFIER.findall(query) if len(c) >= 3])

    def _ranked(self, table: str, terms: list[str]) -> list[int]:
        """Row ids of `table`'s best CANDIDATES for any of the terms, by weighted BM25."""
        if not terms:
            return []
        match = " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)
        rows = self._db.execute(
            f"SELECT rowid FROM {table} WHERE {table} MATCH ? "
            f"ORDER BY bm25({table}, {TITLE_WEIGHT}, 1.0) LIMIT {CANDIDATES}",
            [match],
        )
        return [row[0] for row in rows]
