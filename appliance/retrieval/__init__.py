"""Retrieval: a release's signed corpus, indexed with SQLite FTS5, searched, and judged."""
