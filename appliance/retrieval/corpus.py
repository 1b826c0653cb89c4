"""A release's corpus: the documents signed in its bundle (corpus/*.md and corpus/*.jsonl),
cut into the passages that retrieval returns.

A Markdown file gives one passage per section with text (a heading and the text under it,
up to the next heading of any level), with the id `FILE#slug-of-the-heading` and the title
"Document title: Section"; text before the first heading is `FILE#top`. A JSONL file
gives one passage per line: {"id", "title", "text"}. Ids are unique across the corpus; a
duplicate is refused, since an eval case names passages by id.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import UsageError

CORPUS_DIR = "corpus"
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


def load_corpus(corpus_dir: Path) -> list[Passage]:
    """Every passage of the corpus files in `corpus_dir` (none if it has none)."""
    return passages_of(list(corpus_dir.iterdir()) if corpus_dir.is_dir() else [])


def passages_of(files: list[Path]) -> list[Passage]:
    """Every passage of these corpus files, in file-name order; UsageError on a file that
    is not one, or on two passages with one id."""
    passages: list[Passage] = []
    for path in sorted(files, key=lambda f: f.name):
        if path.suffix == ".md":
            passages += markdown_passages(path.stem, path.read_text())
        elif path.suffix == ".jsonl":
            passages += jsonl_passages(path)
        else:
            raise UsageError(f"a corpus file is Markdown (.md) or JSONL (.jsonl), not {path.name}")
    seen: set[str] = set()
    for passage in passages:
        if passage.id in seen:
            raise UsageError(f"the corpus has two passages with the id {passage.id!r}")
        seen.add(passage.id)
    return passages


def corpus_hash(corpus_dir: Path) -> str:
    """sha256 over the corpus files' names and bytes: names the corpus a record was made on."""
    digest = hashlib.sha256()
    for path in sorted(corpus_dir.iterdir()) if corpus_dir.is_dir() else ():
        data = path.read_bytes()
        digest.update(f"{path.name}\n{len(data)}\n".encode() + data)
    return digest.hexdigest()


def markdown_passages(name: str, text: str) -> list[Passage]:
    sections: list[tuple[str, list[str]]] = [("", [])]
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        heading = None if fenced else _HEADING.match(line)
        if heading:
            sections.append((heading.group(2).strip(), []))
        else:
            sections[-1][1].append(line)
    document = next((title for title, _lines in sections if title), name)
    passages, slugs = [], set()
    for title, lines in sections:
        body = "\n".join(lines).strip()
        if not body:
            continue
        slug = slugify(title) if title else "top"
        unique, n = slug, 2
        while unique in slugs:  # GitHub's rule for repeated headings
            unique, n = f"{slug}-{n - 1}", n + 1
        slugs.add(unique)
        # a section's title says little alone ("Commands"): its document's title goes first
        shown = title if title in ("", document) else f"{document}: {title}"
        passages.append(Passage(f"{name}#{unique}", shown or document, body))
    return passages


def jsonl_passages(path: Path) -> list[Passage]:
    passages = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            passages.append(Passage(str(raw["id"]), str(raw.get("title", "")), str(raw["text"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{path.name} line {number}: not a passage ({exc})") from exc
    return passages


def slugify(title: str) -> str:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    kept = re.sub(r"[^\w\- ]", "", title.lower())
    return kept.replace(" ", "-")
