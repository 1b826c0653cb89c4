"""The signed manifest: an in-toto Statement in the OpenSSF model-signing v1.0 layout.

The predicate lists every file with its sha256 ("resources", sorted by name) and the
serialization that `model_signing verify` re-creates. Our release metadata rides in an
extra predicate field, "appliance", which v1.0 verifiers ignore and we enforce.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from appliance.errors import SignatureError
from appliance.trust.archive import SIGNATURE_DIR, is_allowed_file_name

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
METADATA_FORMAT = 1
# Sequences are stored as SQLite INTEGERs: signed 64-bit.
MAX_SEQUENCE = (1 << 63) - 1
# Validate with fullmatch: "$" also matches before a trailing newline ("demo\n").
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_PATTERN = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class ReleaseMetadata:
    name: str
    version: str
    sequence: int
    min_sequence: int
    created: str
    source_model_sha256: str
    quant_type: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Manifest:
    release: ReleaseMetadata
    files: dict[str, FileEntry]


def statement_bytes(manifest: Manifest) -> bytes:
    """Serialize a manifest as the Statement that gets signed (canonical JSON)."""
    names = sorted(manifest.files)
    resources = [
        {"name": n, "algorithm": "sha256", "digest": manifest.files[n].sha256} for n in names
    ]
    release = manifest.release
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [
            {
                "name": f"{release.name}-{release.version}",
                "digest": {"sha256": _root_digest(resources)},
            }
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {
                "method": "files",
                "hash_type": "sha256",
                "allow_symlinks": False,
                "ignore_paths": [SIGNATURE_DIR],
            },
            "resources": resources,
            "appliance": {
                "format": METADATA_FORMAT,
                "name": release.name,
                "version": release.version,
                "sequence": release.sequence,
                "min_sequence": release.min_sequence,
                "created": release.created,
                "source_model_sha256": release.source_model_sha256,
                "quant_type": release.quant_type,
                "sizes": {n: manifest.files[n].size for n in names},
            },
        },
    }
    return json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()


def parse_statement(payload: bytes) -> Manifest:
    """Parse a signed Statement strictly; any deviation is a SignatureError. The payload
    must be in canonical form (what statement_bytes writes), so the sha256 of
    statement_bytes(manifest), the release's manifest digest, is that of the signed bytes."""
    try:
        manifest = _parse(json.loads(payload))
    except SignatureError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SignatureError(f"signed statement is malformed: {exc}") from exc
    if statement_bytes(manifest) != payload:
        raise SignatureError("signed statement is not in canonical form")
    return manifest


def _parse(statement: dict[str, Any]) -> Manifest:
    if statement["_type"] != STATEMENT_TYPE or statement["predicateType"] != PREDICATE_TYPE:
        raise SignatureError("signed statement has an unexpected type")
    predicate = statement["predicate"]
    serialization = predicate["serialization"]
    if serialization.get("method") != "files" or serialization.get("hash_type") != "sha256":
        raise SignatureError("signed statement uses an unsupported serialization")
    meta = predicate["appliance"]
    if meta["format"] != METADATA_FORMAT:
        raise SignatureError(f"unsupported metadata format {meta['format']!r}")
    sizes = meta["sizes"]
    files: dict[str, FileEntry] = {}
    for resource in predicate["resources"]:
        name, digest = resource["name"], resource["digest"]
        valid = (
            isinstance(name, str)
            and is_allowed_file_name(name)
            and resource["algorithm"] == "sha256"
            and isinstance(digest, str)
            and _HEX64.fullmatch(digest)
        )
        if not valid or name in files:
            raise SignatureError(f"signed statement lists a bad or duplicate file: {name!r}")
        files[name] = FileEntry(digest, _non_negative_int(sizes[name], "size"))
    if set(sizes) != set(files):
        raise SignatureError("signed statement: sizes and resources list different files")
    resources = predicate["resources"]
    if statement["subject"][0]["digest"]["sha256"] != _root_digest(resources):
        raise SignatureError("signed statement: subject digest does not match its resources")
    release = ReleaseMetadata(
        name=_matching(meta["name"], NAME_PATTERN, "name"),
        version=_matching(meta["version"], VERSION_PATTERN, "version"),
        sequence=_sequence(meta["sequence"], "sequence"),
        min_sequence=_sequence(meta["min_sequence"], "min_sequence"),
        created=str(meta["created"]),
        source_model_sha256=str(meta["source_model_sha256"]),
        quant_type=str(meta["quant_type"]),
    )
    if release.min_sequence > release.sequence:
        raise SignatureError("signed statement: min_sequence exceeds sequence")
    return Manifest(release, files)


def _root_digest(resources: list[dict[str, str]]) -> str:
    """sha256 over the raw file digests in manifest order, as model_signing computes it."""
    hasher = hashlib.sha256()
    for resource in resources:
        hasher.update(bytes.fromhex(resource["digest"]))
    return hasher.hexdigest()


def _non_negative_int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SignatureError(f"signed statement: {what} must be a non-negative integer")
    return value


def _sequence(value: object, what: str) -> int:
    number = _non_negative_int(value, what)
    if number > MAX_SEQUENCE:
        raise SignatureError(f"signed statement: {what} exceeds {MAX_SEQUENCE}")
    return number


def _matching(value: object, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise SignatureError(f"signed statement: invalid {what} {value!r}")
    return value
