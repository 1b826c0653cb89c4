"""Retrieval in the service: the release's settings for it, and how the passages it finds
enter a request, one path for the API and the eval runner.

The settings ride in the signed serving.json (`[retrieval]` in bundle.toml, beside the
corpus): which endpoints may retrieve, whether a request gets passages always or only
when it asks (header x-appliance-retrieval: on), k, and a token budget for the passages.
Chat requests get the passages as a system message, rendered by the release's chat
template (after a system message of the client's own, in the same turn); a completion's
prompt gets them as a prefix. The query is the client's last user message, or the prompt,
as the input policy let it through.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from appliance.errors import UsageError
from appliance.retrieval.corpus import CORPUS_DIR, corpus_hash
from appliance.retrieval.index import Hit, Index, Retrieval, index_corpus

ENDPOINTS = ("chat", "completions")
ALWAYS, ASKED = "always", "asked"
RETRIEVAL_HEADER = "x-appliance-retrieval"  # a request's on/off; a response's passage ids
RETRIEVAL_FIELD = "appliance_retrieval"  # the response body's {"ids", "corpus_sha256"}
QUERY_CHARS = 1000  # the end of a long message is what it asks
MIN_CUT_TOKENS = 32  # a passage cut shorter than this to fit the budget is left out
DEFAULT_PREAMBLE = "Passages from the documents that may help (cite their ids):"


@dataclass(frozen=True)
class RetrievalSettings:
    endpoints: tuple[str, ...] = ()  # none: no request retrieves
    when: str = ASKED  # always, or asked (the request says x-appliance-retrieval: on)
    k: int = 3
    budget_tokens: int = 512  # the passages' share of the prompt, in the model's tokens
    preamble: str = DEFAULT_PREAMBLE

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> RetrievalSettings:
        known = {name for name in cls.__dataclass_fields__}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UsageError(f"{where}: unknown retrieval settings: {', '.join(unknown)}")
        settings = cls(**{**raw, "endpoints": tuple(raw.get("endpoints", ()))})
        wrong = [e for e in settings.endpoints if e not in ENDPOINTS]
        if wrong:
            raise UsageError(f"{where}: endpoints are {' or '.join(ENDPOINTS)}, not {wrong}")
        if settings.when not in (ALWAYS, ASKED):
            raise UsageError(f"{where}: when is {ALWAYS!r} or {ASKED!r}, not {settings.when!r}")
        if not (isinstance(settings.k, int) and 1 <= settings.k <= 20):
            raise UsageError(f"{where}: k must be an integer from 1 to 20")
        budget = settings.budget_tokens
        if not (isinstance(budget, int) and budget >= MIN_CUT_TOKENS):
            raise UsageError(f"{where}: budget_tokens must be an integer, {MIN_CUT_TOKENS} or more")
        return settings

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "endpoints": list(self.endpoints)}

    def applies(self, endpoint: str, asked: str | None) -> bool:
        """Whether a request to `endpoint` retrieves, given its header (on, off or None);
        UsageError when it asks for retrieval where the release offers none."""
        if asked not in (None, "on", "off"):
            raise UsageError(f"{RETRIEVAL_HEADER} is 'on' or 'off', not {asked!r}")
        if asked == "off":
            return False
        if endpoint not in self.endpoints:
            if asked == "on":
                raise UsageError(f"this release offers no retrieval on {endpoint}")
            return False
        return asked == "on" or self.when == ALWAYS


NO_RETRIEVAL = RetrievalSettings()  # a release without a corpus or endpoints


@dataclass(frozen=True)
class Augmented:
    """What retrieval added to one request."""

    retrieval: Retrieval  # the search, hits cut to the budget
    block: str  # the text that entered the prompt ("" when nothing matched)
    corpus_sha256: str

    def said(self) -> dict[str, Any]:
        """The response body's account of it."""
        return {"ids": self.retrieval.ids, "corpus_sha256": self.corpus_sha256}

    def header(self) -> str:
        """The ids for the response header: comma-separated, each percent-encoded (a JSONL
        id may hold any character)."""
        return ",".join(quote(i, safe="#@._-/:+") for i in self.retrieval.ids)


class Retriever:
    """A release's corpus index with its settings; `tokens` counts a text in the model's
    tokens (the budget is the model's, not characters)."""

    def __init__(
        self,
        index: Index,
        settings: RetrievalSettings,
        corpus_sha256: str,
        tokens: Callable[[str], list[int]],
        piece: Callable[[int], bytes],
    ) -> None:
        self.index, self.settings, self.corpus_sha256 = index, settings, corpus_sha256
        self._tokens, self._piece = tokens, piece

    @classmethod
    def open(
        cls,
        release_dir: Path,
        index_path: Path,
        settings: RetrievalSettings,
        tokens: Callable[[str], list[int]],
        piece: Callable[[int], bytes],
    ) -> Retriever | None:
        """The retriever of a just-verified release, its index built afresh from the
        corpus (the index is not signed: what the service searches is what was verified);
        None when its settings name no endpoint or it has no corpus."""
        if not settings.endpoints or not index_corpus(release_dir, index_path):
            return None
        digest = corpus_hash(release_dir / CORPUS_DIR)
        return cls(Index(index_path), settings, digest, tokens, piece)

    def close(self) -> None:
        self.index.close()

    def fetch(self, query: str) -> Augmented:
        """The top k passages for `query`, as many as the token budget holds (the last one
        cut to fit, when enough of it does), and the text that carries them."""
        started = time.perf_counter()
        found = self.index.search(query[-QUERY_CHARS:], self.settings.k)
        room = self.settings.budget_tokens
        kept: list[Hit] = []
        for hit in found.hits:
            text = f"[{hit.id}] {hit.title}\n{hit.text}"
            tokens = self._tokens(text)
            if len(tokens) > room:
                if room >= MIN_CUT_TOKENS:
                    cut = b"".join(self._piece(t) for t in tokens[:room])
                    kept.append(replace(hit, text=cut.decode(errors="ignore")))
                break
            kept.append(replace(hit, text=text))
            room -= len(tokens)
        block = "\n\n".join([self.settings.preamble, *(h.text for h in kept)]) if kept else ""
        found = replace(found, hits=tuple(kept), seconds=time.perf_counter() - started)
        return Augmented(found, block, self.corpus_sha256)


def retrieves(retriever: Retriever | None, endpoint: str, asked: str | None) -> bool:
    """Whether a request to `endpoint` gets passages: the release's settings (none when it
    has no retriever) and the request's ask; UsageError for an ask it cannot honour."""
    settings = retriever.settings if retriever is not None else NO_RETRIEVAL
    return settings.applies(endpoint, asked)


def with_passages_in_messages(messages: list[tuple[str, str]], block: str) -> list[tuple[str, str]]:
    """The passages as a system message: after the client's own system text (one system
    turn, which every template accepts), else as the first message."""
    if not block:
        return messages
    if messages and messages[0][0] == "system":
        return [("system", f"{messages[0][1]}\n\n{block}"), *messages[1:]]
    return [("system", block), *messages]


def with_passages_in_prompt(prompt: str, block: str) -> str:
    return f"{block}\n\n{prompt}" if block else prompt


def chat_query(messages: list[tuple[str, str]]) -> str:
    """What a chat asks: its last user message."""
    return next((text for role, text in reversed(messages) if role == "user"), "")
