"""Take signed bundles apart and put them back together, for the attack tests.

A Member is one tar entry with its header fields and content. Tests read a real signed
bundle, change it the way an attacker would, and write it out again with tarfile.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

from appliance.trust.crypto import SigningKey
from appliance.trust.manifest import FileEntry, Manifest, ReleaseMetadata, statement_bytes
from appliance.trust.signature import sign_payload


@dataclass(frozen=True)
class Member:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    size: int | None = None  # a header size that differs from len(data)
    pax_headers: dict[str, str] | None = None  # extra pax records written before the header


def read_members(path: Path) -> list[Member]:
    members = []
    with tarfile.open(path, "r:") as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read() if info.isfile() else b""
            members.append(Member(info.name, data, info.type, info.linkname))
    return members


def write_members(path: Path, members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type, info.linkname = member.type, member.linkname
            info.mode = 0o644
            info.pax_headers = dict(member.pax_headers or {})
            if member.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(member.data) if member.size is None else member.size
                content = None if member.size is not None else io.BytesIO(member.data)
                tar.addfile(info, content)
            else:
                tar.addfile(info)
    return path


def content(members: list[Member]) -> dict[str, bytes]:
    return {m.name: m.data for m in members if not m.name.startswith("signatures/")}


CRAFTED_RELEASE = ReleaseMetadata("crafted", "1.0.0", 1, 0, "2026-01-01T00:00:00Z", "0" * 64, "F32")


def signed_bundle(
    path: Path,
    files: dict[str, bytes],
    keys: list[SigningKey],
    release: ReleaseMetadata = CRAFTED_RELEASE,
) -> Path:
    """A validly signed bundle of exactly these files (which may be hostile)."""
    entries = {n: FileEntry(hashlib.sha256(d).hexdigest(), len(d)) for n, d in files.items()}
    payload = statement_bytes(Manifest(release, entries))
    return bundle_signing(path, payload, files, keys)


def bundle_signing(
    path: Path, payload: bytes, files: dict[str, bytes], keys: list[SigningKey]
) -> Path:
    """A bundle of these files whose signatures (one per key) sign exactly this payload,
    which may be any Statement at all."""
    signatures = [
        Member(f"signatures/{i:02d}.sig", sign_payload(payload, k)) for i, k in enumerate(keys)
    ]
    return write_members(path, signatures + [Member(n, d) for n, d in sorted(files.items())])


def replaced(members: list[Member], name: str, **changes: object) -> list[Member]:
    return [replace(m, **changes) if m.name == name else m for m in members]
