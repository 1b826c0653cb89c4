"""Archive safety rules for release bundles: which tar members may exist at all.

A bundle is a plain tar whose members are regular files (and optionally directories)
with names from a fixed allow-list. Everything else (links, devices, FIFOs, sparse
files, '..', absolute paths, control characters, duplicates, oversized members) is
refused before a single byte of its content is read. Files are never extracted with
tarfile's extraction code: callers write the bytes themselves to names validated here.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass

from appliance.errors import UnsafeArchiveError

SIGNATURE_DIR = "signatures"
MODEL_FILE = "model.gguf"
MAX_SIGNATURES = 16
GIB = 1 << 30

# Matched with fullmatch: "$" would also accept a name with a trailing newline.
_CONTENT_NAME = re.compile(
    r"^(serving\.json|model\.gguf|policy\.toml|cards/(model|data)-card\.md|eval/spec\.toml"
    r"|eval/golden/[a-z0-9][a-z0-9_-]{0,63}\.jsonl|corpus/[a-z0-9][a-z0-9_-]{0,63}\.(md|jsonl))$"
)
_SIGNATURE_NAME = re.compile(r"^signatures/[0-9]{2}\.sig$")
_DIRECTORY_NAMES = frozenset({"cards", "corpus", "eval", "eval/golden", SIGNATURE_DIR})
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 512
    max_member_bytes: int = 32 * GIB
    max_total_bytes: int = 64 * GIB


def is_allowed_file_name(name: str) -> bool:
    """True for the names a content file (not a signature) may have in a bundle."""
    return _CONTENT_NAME.fullmatch(name) is not None


def is_signature_name(name: str) -> bool:
    return _SIGNATURE_NAME.fullmatch(name) is not None


def is_allowed_directory(name: str) -> bool:
    return name in _DIRECTORY_NAMES


def signature_entry_name(index: int) -> str:
    return f"{SIGNATURE_DIR}/{index:02d}.sig"


def classify_member(info: tarfile.TarInfo, limits: ArchiveLimits) -> str:
    """Return "dir", "signature" or "file" for a safe member; raise UnsafeArchiveError."""
    name = info.name
    _check_name_shape(name)
    if info.size < 0:  # tarfile accepts a negative base-256 size; it would undercount caps
        raise UnsafeArchiveError(f"negative size in archive header: {name!r}")
    if info.issym() or info.islnk():
        raise UnsafeArchiveError(f"link in archive: {name!r} -> {info.linkname!r}")
    if info.isdir():
        if not is_allowed_directory(name):
            raise UnsafeArchiveError(f"unexpected directory in archive: {name!r}")
        return "dir"
    if info.type not in _REGULAR_TYPES or info.sparse is not None:
        raise UnsafeArchiveError(
            f"not a regular file: {name!r} (tar type {info.type!r}: device, FIFO or sparse)"
        )
    if info.size > limits.max_member_bytes:
        raise UnsafeArchiveError(
            f"member too large: {name!r} is {info.size} bytes (cap {limits.max_member_bytes})"
        )
    if is_signature_name(name):
        return "signature"
    if not is_allowed_file_name(name):
        raise UnsafeArchiveError(f"name not allowed in a bundle: {name!r}")
    return "file"


def _check_name_shape(name: str) -> None:
    if not name or name.startswith("/") or "\\" in name:
        raise UnsafeArchiveError(f"absolute or malformed path in archive: {name!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise UnsafeArchiveError(f"control character in archive name: {name!r}")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise UnsafeArchiveError(f"path traversal in archive: {name!r}")
