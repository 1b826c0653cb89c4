"""Bundle verification: one streaming pass over the tar, failing closed at the first doubt.

The checklist, in order:
  1. the input opens as a plain tar;
  2. the leading entries are signature files (and nothing else comes before them);
  3. the signatures carry one identical Statement, and at least `threshold` distinct
     trusted, unrevoked keys signed it;
  4. every following member is a safe archive entry (archive.classify_member), is listed
     in the signed manifest, has the signed size and sha256, and appears once;
  5. the archive ends cleanly: after the last member only zero bytes (the end marker of at
     least two blocks and the record padding), so nothing hides behind the end;
  6. no signed file is missing;
  7. the GGUF header passes our own bounded check (only after its hash matched).
Content is hashed as it streams by; with `extract_to` it is also written there, but the
caller must treat that directory as untrusted until this function returns.
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
import os
import shutil
import stat
import tarfile
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from appliance.errors import (
    IntegrityError,
    SignatureError,
    ThresholdError,
    UnreadableInputError,
    UnsafeArchiveError,
    UntrustedKeyError,
    UsageError,
)
from appliance.trust.archive import (
    MAX_SIGNATURES,
    MODEL_FILE,
    ArchiveLimits,
    classify_member,
    is_allowed_directory,
    is_allowed_file_name,
    is_signature_name,
)
from appliance.trust.digest import sha256_file
from appliance.trust.gguf_check import (
    FIRST_TRY_BYTES,
    MAX_HEADER_BYTES,
    GGUFHeaderPastHead,
    GGUFSummary,
    check_gguf_head,
    check_gguf_header,
)
from appliance.trust.manifest import Manifest, parse_statement
from appliance.trust.signature import (
    MAX_SIGNATURE_FILE_BYTES,
    SignedEnvelope,
    parse_signature_file,
)
from appliance.trust.truststore import TrustStore

Progress = Callable[[int], None]
# After the last member: a two-block end marker, then zeros up to a whole record (10 KiB
# by default; 1 MiB allows any usual blocking factor), and nothing else.
END_MARKER_BYTES = 2 * tarfile.BLOCKSIZE
MAX_TRAILER_BYTES = 1 << 20
# tarfile reads the file in pieces of this size, and we read members in pieces of it.
# Its default, one 10 KiB record, costs a system call and a copy every 10 KiB (three times
# the time of hashing the bytes). 1 MiB pieces cost more still: tarfile's joins and slices
# of them are over glibc's mmap threshold (128 KiB), so every piece is fresh memory, and a
# fresh page costs ~4 us on a VM (1 MiB reads took 3-4x the hashing). At 48 KiB its joins
# stay under the threshold and reuse heap memory.
STREAM_BUFFER_BYTES = 48 << 10
# The reads fill batches of this size that a second thread hashes while the next is read;
# past the kept head, a ring of HASH_RING_BATCHES buffers is reused.
HASH_BATCH_BYTES = 1 << 20
HASH_RING_BATCHES = 3
# tarfile reads ahead by up to one piece; keeping the last few pieces read lets the
# verifier see the bytes after the end that tarfile already took from the file.
TAIL_KEEP_BYTES = 2 * STREAM_BUFFER_BYTES + tarfile.RECORDSIZE
# Besides TarError, tarfile's header parser raises these on hostile headers: ValueError
# (a pax 1.0 sparse map that is not a number), IndexError, RecursionError (a long chain
# of pax headers).
_HOSTILE_HEADER_ERRORS = (ValueError, LookupError, RecursionError)


@dataclass(frozen=True)
class VerifiedBundle:
    manifest: Manifest
    signers: tuple[str, ...]  # distinct trusted key ids whose signatures counted
    ignored_signers: tuple[tuple[str, str], ...]  # (key id, "untrusted" | "revoked")
    gguf: GGUFSummary
    signature_files: dict[str, bytes]


def verify_bundle(
    path: Path,
    trust: TrustStore,
    *,
    limits: ArchiveLimits | None = None,
    extract_to: Path | None = None,
    progress: Progress | None = None,
    on_manifest: Callable[[Manifest], None] | None = None,
) -> VerifiedBundle:
    """Verify a bundle file; return what was verified or raise a VerificationError.

    `on_manifest` sees the signed manifest as soon as the signatures check out, before any
    content is read, so a caller can refuse early (a replayed release, say) by raising.
    """
    limits = limits or ArchiveLimits()
    on_manifest = on_manifest or (lambda _m: None)

    def verify(model_keep: int) -> VerifiedBundle:
        try:
            source = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise UnreadableInputError(f"cannot read {path}: {exc.strerror}") from exc
        with source, ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:
            verifier = _StreamVerifier(trust, limits, extract_to, progress, hasher, model_keep)
            return verifier.run(_CountingReader(source), on_manifest)

    try:
        return verify(model_keep=FIRST_TRY_BYTES)
    except GGUFHeaderPastHead:
        # A GGUF header longer than the bytes kept (rare): verify again from the start,
        # keeping up to the cap. The first pass's result, and what it extracted, go.
        if extract_to is not None:
            _empty_directory(extract_to)
        return verify(model_keep=MAX_HEADER_BYTES)


def _empty_directory(directory: Path) -> None:
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def unpack_bundle(
    path: Path, trust: TrustStore, out_dir: Path, progress: Progress | None = None
) -> VerifiedBundle:
    """Verify and lay out a bundle's files in out_dir, which appears only if all checks pass."""
    if out_dir.exists():
        raise UsageError(f"{out_dir} already exists")
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        verified = verify_bundle(path, trust, extract_to=staging, progress=progress)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return verified


def verify_directory(root: Path, trust: TrustStore) -> VerifiedBundle:
    """Verify a laid-out release (an installed one) as strictly as verify_bundle a tar:
    signatures, then every file's size and sha256, nothing missing or extra, the GGUF."""
    signature_files, contents = _scan_release_dir(root)
    manifest, signers, ignored = check_signatures(signature_files, trust)
    if set(contents) != set(manifest.files):
        extra, missing = set(contents) - set(manifest.files), set(manifest.files) - set(contents)
        raise IntegrityError(
            f"release files differ from the signed manifest: "
            f"missing {sorted(missing)}, extra {sorted(extra)}"
        )
    for name, path in contents.items():
        expected = manifest.files[name]
        if path.stat().st_size != expected.size or sha256_file(path) != expected.sha256:
            raise IntegrityError(f"sha256 or size mismatch for {name}")
    model = contents[MODEL_FILE]
    with open(model, "rb") as f:
        gguf = check_gguf_header(f.read(MAX_HEADER_BYTES), model.stat().st_size)
    return VerifiedBundle(manifest, signers, ignored, gguf, signature_files)


def _scan_release_dir(root: Path) -> tuple[dict[str, bytes], dict[str, Path]]:
    signature_files: dict[str, bytes] = {}
    contents: dict[str, Path] = {}
    try:
        walk = list(os.walk(root, onerror=_raise))
    except OSError as exc:
        raise UnreadableInputError(f"cannot read release directory {root}: {exc}") from exc
    for directory, subdirs, files in walk:
        for name in subdirs + files:
            path = Path(directory) / name
            relative = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode) and is_allowed_directory(relative):
                continue
            if not stat.S_ISREG(mode):
                raise UnsafeArchiveError(f"not a regular file in release: {relative!r}")
            if is_signature_name(relative):
                signature_files[relative] = path.read_bytes()
            elif is_allowed_file_name(relative):
                contents[relative] = path
            else:
                raise UnsafeArchiveError(f"name not allowed in a release: {relative!r}")
    if not signature_files:
        raise SignatureError(f"release directory {root} holds no signature")
    return dict(sorted(signature_files.items())), contents


def _raise(error: OSError) -> None:
    raise error


class _CountingReader:
    """The input as tarfile reads it: counts the bytes and keeps the last ones, so the
    verifier judges the very bytes it read, including those after the archive's end."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.consumed = 0
        self._tail: deque[bytes] = deque()
        self._tail_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.consumed += len(data)
        self._tail.append(data)
        self._tail_bytes += len(data)
        while self._tail_bytes - len(self._tail[0]) >= TAIL_KEEP_BYTES:
            self._tail_bytes -= len(self._tail.popleft())
        return data

    def bytes_from(self, offset: int, at_most: int) -> bytes:
        """The input from `offset` (read already, or not yet) on, at most `at_most` bytes."""
        buffered = self.consumed - offset
        if not 0 <= buffered <= self._tail_bytes:  # never expected; refuse rather than guess
            raise UnsafeArchiveError("cannot check the bytes after the archive's end")
        kept = b"".join(self._tail)[self._tail_bytes - buffered :]
        return kept + self.read(max(0, at_most - len(kept)))


class _StreamVerifier:
    def __init__(
        self,
        trust: TrustStore,
        limits: ArchiveLimits,
        extract_to: Path | None,
        progress: Progress | None,
        hasher: ThreadPoolExecutor,
        model_keep: int,
    ) -> None:
        self.trust, self.limits, self.extract_to = trust, limits, extract_to
        self.progress = progress or (lambda _n: None)
        self.hasher = hasher  # one thread: sha256 of a batch while the next one is read
        self.model_keep = model_keep  # the model's first bytes kept for the GGUF check
        self.seen: set[str] = set()
        self.members = 0
        self.total_bytes = 0

    def run(
        self, source: _CountingReader, on_manifest: Callable[[Manifest], None]
    ) -> VerifiedBundle:
        # 1. A plain tar, read forward only.
        try:
            tar = tarfile.open(fileobj=source, mode="r|", bufsize=STREAM_BUFFER_BYTES)  # noqa: SIM115
        except tarfile.TarError as exc:
            raise UnreadableInputError(f"not a plain tar archive: {exc}") from exc
        except _HOSTILE_HEADER_ERRORS as exc:
            raise UnsafeArchiveError(f"malformed tar header: {_short(exc)}") from exc
        with tar:
            members = self._members(tar)
            # 2. + 3. Leading signatures, checked before any content is read.
            signature_files, first_content = self._read_signatures(tar, members)
            manifest, signers, ignored = check_signatures(signature_files, self.trust)
            on_manifest(manifest)
            # 4. Every content member against the manifest.
            hashed, gguf_head = self._hash_content(tar, members, first_content, manifest)
            # 5. Only the end marker and zero padding after the last member.
            _check_archive_end(source, end=tar.offset)
        # 6. Nothing missing.
        missing = sorted(set(manifest.files) - hashed)
        if missing:
            raise IntegrityError(f"signed file missing from the bundle: {', '.join(missing)}")
        # 7. Our GGUF header check, on bytes whose hash already matched.
        gguf = check_gguf_head(gguf_head, manifest.files[MODEL_FILE].size)
        return VerifiedBundle(manifest, signers, ignored, gguf, signature_files)

    def _members(self, tar: tarfile.TarFile):
        while True:
            try:
                info = tar.next()
            except tarfile.TarError as exc:
                if self.members == 0:
                    raise UnreadableInputError(f"not a plain tar archive: {exc}") from exc
                raise IntegrityError(f"archive is truncated or corrupt: {exc}") from exc
            except _HOSTILE_HEADER_ERRORS as exc:
                raise UnsafeArchiveError(f"malformed tar header: {_short(exc)}") from exc
            if info is None:
                return
            self.members += 1
            if self.members > self.limits.max_members:
                raise UnsafeArchiveError(f"more than {self.limits.max_members} archive members")
            kind = classify_member(info, self.limits)
            if info.name in self.seen:
                raise UnsafeArchiveError(f"duplicate name in archive: {info.name!r}")
            self.seen.add(info.name)
            self.total_bytes += info.size
            if self.total_bytes > self.limits.max_total_bytes:
                raise UnsafeArchiveError(
                    f"archive content exceeds {self.limits.max_total_bytes} bytes"
                )
            if kind == "dir":
                continue
            yield kind, info

    def _read_signatures(self, tar, members):
        signatures: dict[str, bytes] = {}
        for kind, info in members:
            if kind != "signature":
                if not signatures:
                    raise SignatureError("bundle is not signed: it has no signature entry first")
                return signatures, info
            if len(signatures) >= MAX_SIGNATURES:
                raise UnsafeArchiveError(f"more than {MAX_SIGNATURES} signature entries")
            if info.size > MAX_SIGNATURE_FILE_BYTES:
                raise SignatureError(f"signature entry {info.name} is implausibly large")
            signatures[info.name] = bytes(self._read_member(tar, info, keep=info.size)[1])
        raise SignatureError("bundle holds signatures but no content")

    def _hash_content(self, tar, members, first: tarfile.TarInfo, manifest: Manifest):
        hashed: set[str] = set()
        gguf_head: bytes | mmap.mmap = b""
        for kind, info in itertools.chain([("file", first)], members):
            if kind == "signature":
                raise SignatureError(f"signature entry {info.name} after bundle content")
            expected = manifest.files.get(info.name)
            if expected is None:
                raise IntegrityError(f"file not in the signed manifest: {info.name}")
            if info.size != expected.size:
                raise IntegrityError(
                    f"size mismatch for {info.name}: {info.size} bytes, signed {expected.size}"
                )
            keep = self.model_keep if info.name == MODEL_FILE else 0
            digest, head = self._read_member(tar, info, keep)
            if digest != expected.sha256:
                raise IntegrityError(f"sha256 mismatch for {info.name}")
            if info.name == MODEL_FILE:
                gguf_head = head
            hashed.add(info.name)
        return hashed, gguf_head

    def _read_member(self, tar, info: tarfile.TarInfo, keep: int) -> tuple[str, bytes | mmap.mmap]:
        """Stream one member through sha256 (and to extract_to); keep its first bytes."""
        reader = tar.extractfile(info)
        hashing = _HashQueue(self.hasher)
        # anonymous memory, faulted in as the reads fill it: a bytearray would zero all of
        # it before the first batch could be read and hashed
        kept = min(keep, info.size)
        head = mmap.mmap(-1, kept) if kept else b""
        sink = self._open_sink(info.name)
        offset = 0
        try:
            while offset < info.size:
                if offset < kept:
                    view, reusable = memoryview(head)[offset : offset + HASH_BATCH_BYTES], None
                else:
                    reusable = hashing.ring_buffer()
                    view = memoryview(reusable)[: info.size - offset]
                _fill(reader, view, info, offset)
                hashing.submit(view, reusable)
                if sink is not None:
                    sink.write(view)
                self.progress(len(view))
                offset += len(view)
            digest = hashing.hexdigest()
            if sink is not None:
                sink.flush()
                os.fsync(sink.fileno())
        finally:
            hashing.cancel()  # never leave one running
            if sink is not None:
                sink.close()
        return digest, head

    def _open_sink(self, name: str):
        if self.extract_to is None:
            return None
        target = self.extract_to / name
        target.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        return os.fdopen(os.open(target, flags, 0o644), "wb")


def _fill(reader: BinaryIO, view: memoryview, info: tarfile.TarInfo, offset: int) -> None:
    """Fill `view` from the member, STREAM_BUFFER_BYTES at a time (see there)."""
    filled = 0
    while filled < len(view):
        try:
            n = reader.readinto(view[filled : filled + STREAM_BUFFER_BYTES])
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise IntegrityError(f"archive truncated inside {info.name}: {exc}") from exc
        if not n:
            raise IntegrityError(
                f"archive truncated inside {info.name}: {offset + filled} of {info.size} bytes"
            )
        filled += n


class _HashQueue:
    """sha256 of one member in a second thread (hashlib releases the GIL on large buffers),
    batches in order, while the next batch is read. Batches that are not kept come from a
    ring and are reused once hashed, so the pass touches no fresh memory past the head."""

    def __init__(self, hasher: ThreadPoolExecutor) -> None:
        self.hasher = hasher
        self.digest = hashlib.sha256()
        self.in_flight: deque[tuple[Future[None], bytearray | None]] = deque()
        self.free: list[bytearray] = []
        self.ring_size = 0

    def ring_buffer(self) -> bytearray:
        while not self.free and self.ring_size == HASH_RING_BATCHES:
            self._finish_oldest()
        if self.free:
            return self.free.pop()
        self.ring_size += 1
        return bytearray(HASH_BATCH_BYTES)

    def submit(self, view: memoryview, reusable: bytearray | None) -> None:
        """Hash `view` after the batches before it; `reusable` returns to the ring then."""
        self.in_flight.append((self.hasher.submit(self.digest.update, view), reusable))

    def hexdigest(self) -> str:
        while self.in_flight:
            self._finish_oldest()
        return self.digest.hexdigest()

    def cancel(self) -> None:
        for future, _ in self.in_flight:
            future.cancel() or future.exception()

    def _finish_oldest(self) -> None:
        future, reusable = self.in_flight.popleft()
        future.result()
        if reusable is not None:
            self.free.append(reusable)


def _check_archive_end(source: _CountingReader, end: int) -> None:
    """tarfile stops at the first zero block, or at any bad header after the first member;
    what follows must be nothing but zeros, or a member could hide behind the end."""
    trailer = source.bytes_from(end, MAX_TRAILER_BYTES + 1)
    if trailer.count(0) != len(trailer):
        raise UnsafeArchiveError(f"data after the end of the archive (at byte {end})")
    if len(trailer) > MAX_TRAILER_BYTES:
        raise UnsafeArchiveError(f"more than {MAX_TRAILER_BYTES} bytes after the archive's end")
    if len(trailer) < END_MARKER_BYTES:
        raise IntegrityError("archive is truncated: it has no end-of-archive marker")


def _short(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def check_signatures(
    signature_files: dict[str, bytes], trust: TrustStore
) -> tuple[Manifest, tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Check signature files against the trust store; return the manifest and signers."""
    envelopes = [parse_signature_file(data) for data in signature_files.values()]
    payload = envelopes[0].payload
    if any(e.payload != payload for e in envelopes):
        raise SignatureError("the signatures in the bundle sign different statements")
    signers, ignored = _count_signers(envelopes, trust)
    manifest = parse_statement(payload)
    if MODEL_FILE not in manifest.files:
        raise IntegrityError(f"the signed manifest lists no {MODEL_FILE}")
    return manifest, signers, ignored


def _count_signers(envelopes: list[SignedEnvelope], trust: TrustStore):
    if not trust.keys:
        raise UntrustedKeyError("the trust store holds no keys (appliance keys trust PUB.pem)")
    signers: list[str] = []
    ignored: list[tuple[str, str]] = []
    for envelope in envelopes:
        key = trust.active_key(envelope.key_hint)
        if key is None:
            status = "revoked" if trust.is_revoked(envelope.key_hint) else "untrusted"
            ignored.append((envelope.key_hint, status))
            continue
        if not envelope.verify_with(key.public_key):
            raise SignatureError(
                f"signature by trusted key {key.key_id[:16]} does not match its payload"
            )
        if key.key_id not in signers:  # each key counts once, however often it signed
            signers.append(key.key_id)
    if len(signers) >= trust.threshold:
        return tuple(signers), tuple(ignored)
    if not signers:
        described = ", ".join(f"{kid[:16]} ({status})" for kid, status in ignored)
        raise UntrustedKeyError(f"no trusted key signed this bundle; signed by {described}")
    raise ThresholdError(
        f"signed by {len(signers)} distinct trusted key(s); "
        f"the trust store requires {trust.threshold}"
    )
