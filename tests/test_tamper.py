"""One named test per attack on a signed bundle: each is refused with its own exit code.

Exit codes: 10 bad or missing signature, 11 untrusted or revoked key, 12 threshold not
met, 13 hash or size mismatch, 14 unsafe archive, 15 bad GGUF, 16 unreadable input.
"""

from __future__ import annotations

import hashlib
import json
import struct
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from bundlecraft import (
    CRAFTED_RELEASE,
    Member,
    bundle_signing,
    content,
    read_members,
    replaced,
    signed_bundle,
    write_members,
)
from conftest import write_bundle_dir
from gguf import GGUFWriter
from test_bundle import SIGNED_FILES
from tinymodel import write_tiny_gguf

from appliance.bundler.builder import build_bundle
from appliance.bundler.spec import load_bundle_spec
from appliance.errors import GGUFError
from appliance.trust.gguf_check import FIRST_TRY_BYTES, _Cursor, _packed_strings_end
from appliance.trust.manifest import FileEntry, Manifest, statement_bytes
from appliance.trust.signature import parse_signature_file, sign_payload


@pytest.fixture
def verify(run_cli):
    """Verify a bundle; return (exit code, one-line message)."""

    def run(path: Path) -> tuple[int, str]:
        result = run_cli("bundle", "verify", path, "--json")
        if result.exit_code == 0:
            return 0, "verified"
        message = json.loads(result.stdout)["error"]
        assert "\n" not in message, "errors are one line"
        return result.exit_code, message

    return run


@pytest.fixture
def members(tiny_bundle):
    return read_members(tiny_bundle)


def rewrite(tmp_path: Path, members: list[Member]) -> Path:
    return write_members(tmp_path / "attacked.tar", members)


def resigned(members: list[Member], key) -> bytes:
    """A fresh signature file over the bundle's own signed Statement."""
    return sign_payload(parse_signature_file(members[0].data).payload, key.signing_key)


def written(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "attacked.tar"
    path.write_bytes(data)
    return path


def member_end(path: Path, index: int) -> int:
    """Where the member after this one starts (for the last one: the end marker)."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[index]
    return member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def test_untouched_bundle_verifies(verify, tiny_bundle):
    assert verify(tiny_bundle) == (0, "verified")


@pytest.mark.parametrize("name", sorted(SIGNED_FILES))
def test_flipped_byte_in_each_file(verify, members, tmp_path, name):
    data = bytearray(next(m.data for m in members if m.name == name))
    data[len(data) // 2] ^= 0x01
    code, message = verify(rewrite(tmp_path, replaced(members, name, data=bytes(data))))
    assert code == 13
    assert f"sha256 mismatch for {name}" in message


def test_flipped_byte_in_signature(verify, members, tmp_path):
    signature = json.loads(members[0].data)
    sig = signature["dsseEnvelope"]["signatures"][0]["sig"]
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    signature["dsseEnvelope"]["signatures"][0]["sig"] = flipped
    attacked = replaced(members, "signatures/00.sig", data=json.dumps(signature).encode())
    code, message = verify(rewrite(tmp_path, attacked))
    assert code == 10
    assert "does not match" in message


def test_altered_signed_statement(verify, members, tmp_path):
    """Raise the sequence inside the signed payload, keeping the old signature."""
    import base64

    signature = json.loads(members[0].data)
    statement = json.loads(base64.b64decode(signature["dsseEnvelope"]["payload"]))
    statement["predicate"]["appliance"]["sequence"] = 999
    signature["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    attacked = replaced(members, "signatures/00.sig", data=json.dumps(signature).encode())
    assert verify(rewrite(tmp_path, attacked))[0] == 10


def test_truncated_bundle(verify, tiny_bundle, tmp_path):
    data = tiny_bundle.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    code, message = verify(cut)
    assert code == 13
    assert "truncated" in message or "missing" in message


def test_added_file_with_allowed_name(verify, members, tmp_path):
    attacked = members + [Member("eval/golden/extra.jsonl", b'{"id": "x"}\n')]
    code, message = verify(rewrite(tmp_path, attacked))
    assert code == 13
    assert "not in the signed manifest" in message


def test_added_file_with_unknown_name(verify, members, tmp_path):
    code, message = verify(rewrite(tmp_path, members + [Member("run.sh", b"#!/bin/sh\n")]))
    assert code == 14
    assert "not allowed" in message


def test_removed_file(verify, members, tmp_path):
    attacked = [m for m in members if m.name != "cards/data-card.md"]
    code, message = verify(rewrite(tmp_path, attacked))
    assert code == 13
    assert "missing" in message and "cards/data-card.md" in message


def test_gguf_swapped_from_another_signed_bundle(
    verify, members, tmp_path, trusted_key, tiny_bundle
):
    other_model = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    other_spec = load_bundle_spec(write_bundle_dir(tmp_path / "other-src", other_model))
    other = build_bundle(other_spec, [trusted_key.signing_key], tmp_path / "other-out").path
    assert verify(other) == (0, "verified")
    swapped_model = content(read_members(other))["model.gguf"]
    attacked = replaced(members, "model.gguf", data=swapped_model)
    code, message = verify(rewrite(tmp_path, attacked))
    assert code == 13
    assert "model.gguf" in message


def test_signature_removed(verify, members, tmp_path):
    code, message = verify(rewrite(tmp_path, members[1:]))
    assert code == 10
    assert "not signed" in message


def test_content_before_signature(verify, members, tmp_path):
    code, message = verify(rewrite(tmp_path, members[1:] + members[:1]))
    assert code == 10
    assert "not signed" in message


def test_signature_after_content(verify, members, tmp_path, trusted_key):
    """Signed first as it should be, then a fresh valid signature after the content."""
    late = Member("signatures/01.sig", resigned(members, trusted_key))
    code, message = verify(rewrite(tmp_path, [*members, late]))
    assert code == 10
    assert "signatures/01.sig after bundle content" in message


def test_signed_by_untrusted_key(verify, tiny_bundle_toml, make_key, tmp_path, trusted_key):
    stranger = make_key("stranger")
    spec = load_bundle_spec(tiny_bundle_toml)
    bundle = build_bundle(spec, [stranger.signing_key], tmp_path / "out").path
    code, message = verify(bundle)
    assert code == 11
    assert "untrusted" in message and stranger.key_id[:16] in message


def test_signed_by_revoked_key(verify, run_cli, tiny_bundle, trusted_key):
    assert run_cli("keys", "revoke", trusted_key.key_id).exit_code == 0
    code, message = verify(tiny_bundle)
    assert code == 11
    assert "revoked" in message


def test_threshold_not_met(verify, run_cli, tiny_bundle, make_key):
    make_key("second").trust()
    assert run_cli("keys", "threshold", "2").exit_code == 0
    code, message = verify(tiny_bundle)
    assert code == 12
    assert "requires 2" in message


def test_one_keys_signature_counted_twice(
    verify, run_cli, members, make_key, tmp_path, trusted_key
):
    """A second, fresh signature by the same key: ECDSA signatures differ each time, so
    only counting signers by key id (not by signature bytes) stops it."""
    make_key("second").trust()
    assert run_cli("keys", "threshold", "2").exit_code == 0
    again = Member("signatures/01.sig", resigned(members, trusted_key))
    assert again.data != members[0].data
    code, message = verify(rewrite(tmp_path, [members[0], again, *members[1:]]))
    assert code == 12
    assert "1 distinct" in message


def test_signatures_over_different_statements(verify, members, tmp_path, trusted_key):
    other = read_members(
        signed_bundle(tmp_path / "other.tar", content(members), [trusted_key.signing_key])
    )
    mixed = [members[0], Member("signatures/01.sig", other[0].data), *members[1:]]
    code, message = verify(rewrite(tmp_path, mixed))
    assert code == 10
    assert "different statements" in message


@pytest.mark.parametrize(
    ("attack", "member", "reason"),
    [
        ("dot_dot", Member("../x", b"x"), "traversal"),
        ("nested_dot_dot", Member("eval/../../x", b"x"), "traversal"),
        ("absolute_path", Member("/etc/cron.d/x", b"x"), "absolute"),
        ("symlink", Member("model.gguf", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "link"),
        ("hardlink", Member("model.gguf", type=tarfile.LNKTYPE, linkname="serving.json"), "link"),
        ("char_device", Member("model.gguf", type=tarfile.CHRTYPE), "regular"),
        ("block_device", Member("model.gguf", type=tarfile.BLKTYPE), "regular"),
        ("fifo", Member("model.gguf", type=tarfile.FIFOTYPE), "regular"),
        ("control_characters", Member("cards/model-card.md\x1b[2J", b"x"), "control character"),
        ("unexpected_directory", Member("bin", type=tarfile.DIRTYPE), "directory"),
        ("oversized_member", Member("model.gguf", size=40 << 30), "too large"),
    ],
)
def test_unsafe_archive_member(verify, members, tmp_path, attack, member, reason):
    # The hostile member comes right after the signature, before the real content.
    code, message = verify(rewrite(tmp_path, [members[0], member, *members[1:]]))
    assert code == 14, attack
    assert reason in message


def test_duplicate_names(verify, members, tmp_path):
    code, message = verify(rewrite(tmp_path, members + [members[-1]]))
    assert code == 14
    assert "duplicate" in message


def test_too_many_members(tiny_bundle):
    # The default cap (512) is reached only by very large archives; a small cap shows it.
    from appliance.errors import UnsafeArchiveError
    from appliance.paths import appliance_paths
    from appliance.trust.archive import ArchiveLimits
    from appliance.trust.truststore import load_trust_store
    from appliance.trust.verify import verify_bundle

    trust = load_trust_store(appliance_paths().trust_store)
    with pytest.raises(UnsafeArchiveError, match="more than 5 archive members"):
        verify_bundle(tiny_bundle, trust, limits=ArchiveLimits(max_members=5))
    with pytest.raises(UnsafeArchiveError, match="exceeds 1000 bytes"):
        verify_bundle(tiny_bundle, trust, limits=ArchiveLimits(max_total_bytes=1000))


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt) :]


def _alignment_value_offset(data: bytes) -> int:
    return data.index(b"general.alignment") + len(b"general.alignment") + 4


MALFORMED_GGUFS = {
    "bad_magic": (lambda d: b"GGUX" + d[4:], "bad magic"),
    "bad_version": (lambda d: _patched(d, 4, "<I", 99), "version"),
    "huge_tensor_count": (lambda d: _patched(d, 8, "<Q", 1 << 40), "tensor count"),
    "huge_kv_count": (lambda d: _patched(d, 16, "<Q", 1 << 40), "key/value count"),
    "huge_string_length": (lambda d: _patched(d, 24, "<Q", 1 << 40), "string length"),
    "tensor_data_beyond_eof": (lambda d: d[: len(d) - 4096], "beyond the end"),
    "bad_alignment": (lambda d: _patched(d, _alignment_value_offset(d), "<I", 48), "alignment"),
    "truncated_header": (lambda d: d[:200], "truncated"),
    "truncated_in_a_token_length": (lambda d: d[: d.index(b"<0x41>") - 3], "truncated"),
    "truncated_in_a_token": (lambda d: d[: d.index(b"<0x41>") + 3], "truncated"),
}


@pytest.mark.parametrize("attack", sorted(MALFORMED_GGUFS))
def test_malformed_gguf_in_validly_signed_bundle(verify, members, tmp_path, trusted_key, attack):
    corrupt, reason = MALFORMED_GGUFS[attack]
    model = write_tiny_gguf(tmp_path / "aligned.gguf", alignment=64).read_bytes()
    files = {**content(members), "model.gguf": corrupt(model)}
    bundle = signed_bundle(tmp_path / "crafted.tar", files, [trusted_key.signing_key])
    code, message = verify(bundle)
    assert code == 15, message
    assert reason in message


def test_duplicate_gguf_key(verify, members, tmp_path, trusted_key):
    def string(text: bytes) -> bytes:
        return struct.pack("<Q", len(text)) + text

    kv = string(b"general.architecture") + struct.pack("<I", 8) + string(b"llama")
    model = b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + kv + kv
    files = {**content(members), "model.gguf": model}
    code, message = verify(signed_bundle(tmp_path / "c.tar", files, [trusted_key.signing_key]))
    assert code == 15
    assert "duplicate GGUF key" in message


def test_missing_input_file(verify, tmp_path):
    code, message = verify(tmp_path / "nope.tar")
    assert code == 16
    assert "cannot read" in message


def test_not_a_tar(verify, tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x89PNG" + bytes(range(256)) * 8)
    code, _ = verify(junk)
    assert code == 16


def test_compressed_tar_is_not_accepted(verify, tiny_bundle, tmp_path):
    import gzip

    gz = tmp_path / "bundle.tar.gz"
    gz.write_bytes(gzip.compress(tiny_bundle.read_bytes()))
    assert verify(gz)[0] == 16


def test_empty_trust_store_refuses(verify, tiny_bundle, appliance_home):
    (appliance_home / "etc" / "trust.json").unlink()
    code, message = verify(tiny_bundle)
    assert code == 11
    assert "holds no keys" in message


# -- the end of the archive -------------------------------------------------------------


def test_data_after_end_marker(verify, tiny_bundle, tmp_path):
    code, message = verify(written(tmp_path, tiny_bundle.read_bytes() + b"hidden"))
    assert code == 14
    assert "after the end of the archive" in message


def test_member_hidden_after_end_marker(verify, tiny_bundle, tmp_path):
    """A second tar appended: `tar --ignore-zeros` would extract its member."""
    extra = write_members(tmp_path / "extra.tar", [Member("run.sh", b"#!/bin/sh\n")])
    code, message = verify(written(tmp_path, tiny_bundle.read_bytes() + extra.read_bytes()))
    assert code == 14
    assert "after the end of the archive" in message


def test_junk_block_instead_of_end_marker(verify, tiny_bundle, tmp_path):
    """tarfile takes any invalid header after the first member for the end of the archive."""
    data, end = tiny_bundle.read_bytes(), member_end(tiny_bundle, -1)
    attacked = data[:end] + b"x" * tarfile.BLOCKSIZE + data[end + tarfile.BLOCKSIZE :]
    code, message = verify(written(tmp_path, attacked))
    assert code == 14
    assert "after the end of the archive" in message


def test_unpack_with_data_after_end_marker_leaves_nothing(run_cli, tiny_bundle, tmp_path):
    """The end is judged after the content was written to staging: staging must go."""
    attacked = written(tmp_path, tiny_bundle.read_bytes() + b"hidden")
    result = run_cli("bundle", "unpack", attacked, "--out", tmp_path / "files")
    assert result.exit_code == 14
    assert not (tmp_path / "files").exists()
    assert not list(tmp_path.glob(".files*"))


def test_missing_end_marker(verify, tiny_bundle, tmp_path):
    end = member_end(tiny_bundle, -1)
    code, message = verify(written(tmp_path, tiny_bundle.read_bytes()[:end]))
    assert code == 13
    assert "truncated" in message


def test_end_marker_without_record_padding_verifies(verify, tiny_bundle, tmp_path):
    end = member_end(tiny_bundle, -1)
    data = tiny_bundle.read_bytes()[: end + 2 * tarfile.BLOCKSIZE]
    assert verify(written(tmp_path, data)) == (0, "verified")


def test_megabytes_of_zeros_after_end_marker(verify, tiny_bundle, tmp_path):
    code, message = verify(written(tmp_path, tiny_bundle.read_bytes() + bytes(2 << 20)))
    assert code == 14
    assert "after the archive's end" in message


# -- tar headers that break tarfile's parser -------------------------------------------


def test_malformed_pax_sparse_header(verify, members, tmp_path):
    """A pax 1.0 sparse header whose map is not a number: tarfile raises ValueError."""
    sparse = Member(
        "model.gguf",
        b"not a number" * 64,
        pax_headers={
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.name": "model.gguf",
            "GNU.sparse.realsize": "1024",
        },
    )
    code, message = verify(rewrite(tmp_path, [members[0], sparse, *members[1:]]))
    assert code == 14
    assert "malformed tar header" in message


def _pax_header_block() -> bytes:
    info = tarfile.TarInfo("pax")
    info.type, record = tarfile.XHDTYPE, b"13 comment=a\n"
    info.size = len(record)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + record.ljust(tarfile.BLOCKSIZE, b"\0")


def test_chain_of_pax_headers(verify, tiny_bundle, tmp_path):
    """Thousands of pax headers in a row: tarfile recurses once per header."""
    data, after_signature = tiny_bundle.read_bytes(), member_end(tiny_bundle, 0)
    chain = _pax_header_block() * 3000
    code, message = verify(
        written(tmp_path, data[:after_signature] + chain + data[after_signature:])
    )
    assert code == 14
    assert "malformed tar header" in message


def test_negative_member_size(verify, tiny_bundle, tmp_path):
    """tarfile accepts a negative base-256 size, which would undercount the size caps."""
    info = tarfile.TarInfo("eval/golden/extra.jsonl")
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[124:136] = tarfile.itn(-512, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    data, after_signature = tiny_bundle.read_bytes(), member_end(tiny_bundle, 0)
    code, message = verify(
        written(tmp_path, data[:after_signature] + header + data[after_signature:])
    )
    assert code == 14
    assert "negative size" in message


# -- signed statements with hostile values ---------------------------------------------


@pytest.mark.parametrize(
    ("attack", "changes", "reason"),
    [
        ("sequence_beyond_int64", {"sequence": 1 << 63}, "sequence exceeds"),
        ("min_sequence_beyond_int64", {"min_sequence": 1 << 63}, "min_sequence exceeds"),
        ("min_sequence_above_sequence", {"sequence": 2, "min_sequence": 3}, "exceeds sequence"),
        ("name_with_newline", {"name": "demo\n"}, "invalid name"),
        ("name_with_control_character", {"name": "demo\x1b"}, "invalid name"),
        ("version_with_newline", {"version": "1.0.0\n"}, "invalid version"),
        ("version_with_control_character", {"version": "1.0\x00"}, "invalid version"),
    ],
)
def test_hostile_signed_release_metadata(
    verify, members, tmp_path, trusted_key, attack, changes, reason
):
    release = replace(CRAFTED_RELEASE, **changes)
    files = content(members)
    bundle = signed_bundle(tmp_path / "c.tar", files, [trusted_key.signing_key], release)
    code, message = verify(bundle)
    assert code == 10, attack
    assert reason in message


def test_crafted_release_metadata_verifies(verify, members, tmp_path, trusted_key):
    release = replace(CRAFTED_RELEASE, sequence=(1 << 63) - 1, name="demo", version="1.0.0")
    files = content(members)
    bundle = signed_bundle(tmp_path / "c.tar", files, [trusted_key.signing_key], release)
    assert verify(bundle) == (0, "verified")


def test_install_refuses_sequence_beyond_int64(run_cli, members, tmp_path, trusted_key):
    """Such a sequence used to pass verification and crash in SQLite with a traceback."""
    release = replace(CRAFTED_RELEASE, sequence=1 << 63)
    files = content(members)
    bundle = signed_bundle(tmp_path / "c.tar", files, [trusted_key.signing_key], release)
    result = run_cli("release", "install", bundle, "--json")
    assert result.exit_code == 10, result.output
    assert "sequence exceeds" in json.loads(result.stdout)["error"]


def test_signed_file_name_with_newline(verify, members, tmp_path, trusted_key):
    files = {**content(members), "eval/golden/extra.jsonl\n": b"{}\n"}
    code, message = verify(signed_bundle(tmp_path / "c.tar", files, [trusted_key.signing_key]))
    assert code == 10
    assert "bad or duplicate file" in message


def test_signed_digest_with_newline(verify, members, tmp_path, trusted_key):
    files = content(members)
    entries = {n: FileEntry(hashlib.sha256(d).hexdigest(), len(d)) for n, d in files.items()}
    entries["serving.json"] = replace(
        entries["serving.json"], sha256=entries["serving.json"].sha256 + "\n"
    )
    payload = statement_bytes(Manifest(CRAFTED_RELEASE, entries))
    bundle = bundle_signing(tmp_path / "c.tar", payload, files, [trusted_key.signing_key])
    code, message = verify(bundle)
    assert code == 10
    assert "bad or duplicate file" in message


def test_signed_statement_in_another_serialization_is_refused(
    verify, members, tmp_path, trusted_key
):
    """The same Statement re-serialized (indented, validly signed) is refused: a release's
    manifest digest is the sha256 of exactly the bytes its signatures cover."""
    files = content(members)
    entries = {n: FileEntry(hashlib.sha256(d).hexdigest(), len(d)) for n, d in files.items()}
    canonical = statement_bytes(Manifest(CRAFTED_RELEASE, entries))
    indented = json.dumps(json.loads(canonical), indent=1).encode()
    key = [trusted_key.signing_key]
    assert verify(bundle_signing(tmp_path / "a.tar", canonical, files, key)) == (0, "verified")
    bundle = bundle_signing(tmp_path / "b.tar", indented, files, key)
    assert verify(bundle) == (10, "signed statement is not in canonical form")


# -- GGUF metadata that aborts llama.cpp -------------------------------------------------

TINY_HPARAMS = {
    "block_count": 2,
    "context_length": 256,
    "embedding_length": 64,
    "attention.head_count": 4,
    "attention.head_count_kv": 4,
}


def gguf_with(
    path: Path, tokens: tuple[str | bytes, ...] = ("<unk>", "a", "b"), **hparams
) -> bytes:
    """A small llama GGUF with the tiny model's hyperparameters, changed by `hparams`
    (a value of None drops the key; a list is written as an array)."""
    writer = GGUFWriter(str(path), "llama")
    for name, value in {**TINY_HPARAMS, **hparams}.items():
        key = f"llama.{name}"
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        elif value is not None and 0 <= value < 1 << 32:
            writer.add_uint32(key, value)
        elif value is not None:
            writer.add_int64(key, value)
    writer.add_token_list(list(tokens))
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


HOSTILE_HPARAMS = {
    "no_layers": ({"block_count": 0}, "block_count"),
    "too_many_layers": ({"block_count": 513}, "block_count"),
    "negative_layers": ({"block_count": -1}, "block_count"),
    "block_count_missing": ({"block_count": None}, "block_count"),
    "block_count_as_array": ({"block_count": [2, 2]}, "block_count"),
    "nextn_layers_beyond_layers": ({"nextn_predict_layers": 3}, "nextn_predict_layers"),
    "zero_context": ({"context_length": 0}, "context_length"),
    "huge_context": ({"context_length": 1 << 40}, "context_length"),
    "zero_embedding": ({"embedding_length": 0}, "embedding_length"),
    "more_kv_heads_than_heads": ({"attention.head_count_kv": 8}, "key/value heads"),
    "kv_heads_not_dividing_heads": ({"attention.head_count_kv": 3}, "key/value heads"),
    "no_kv_heads_for_attention": ({"attention.head_count_kv": 0}, "key/value heads"),
    "too_many_experts": ({"expert_count": 2048, "expert_used_count": 2}, "expert_count"),
    "more_experts_used_than_exist": (
        {"expert_count": 8, "expert_used_count": 9},
        "expert_used_count",
    ),
    "experts_but_none_used": ({"expert_count": 8}, "uses none"),
    "experts_used_without_experts": ({"expert_used_count": 2}, "expert_used_count"),
    "expert_groups_not_dividing": (
        {
            "expert_count": 8,
            "expert_used_count": 2,
            "expert_group_count": 3,
            "expert_group_used_count": 1,
        },
        "groups",
    ),
    "unknown_rope_scaling": ({"rope.scaling.type": "quadratic"}, "rope scaling"),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE_HPARAMS))
def test_gguf_hyperparameters_that_abort_llama_cpp(verify, members, tmp_path, trusted_key, attack):
    hparams, reason = HOSTILE_HPARAMS[attack]
    model = gguf_with(tmp_path / "hostile.gguf", **hparams)
    files = {**content(members), "model.gguf": model}
    code, message = verify(signed_bundle(tmp_path / "c.tar", files, [trusted_key.signing_key]))
    assert code == 15, message
    assert reason in message


def test_gguf_vocabulary_with_a_token_twice(verify, members, tmp_path, trusted_key):
    model = gguf_with(tmp_path / "hostile.gguf", tokens=("<unk>", "a", "b", "a"))
    files = {**content(members), "model.gguf": model}
    code, message = verify(signed_bundle(tmp_path / "c.tar", files, [trusted_key.signing_key]))
    assert code == 15
    assert "token 'a' twice" in message


HOSTILE_VOCABULARIES = {
    "invalid_utf8": ((b"<unk>", b"a", b"\xff"), "UTF-8"),
    "invalid_utf8_in_a_long_token": ((b"<unk>", b"a" * 200 + b"\xc3"), "UTF-8"),
    "a_long_token_twice": ((b"<unk>", b"x" * 200, b"y", b"x" * 200), "token 'xxx"),
    "an_empty_token_named_like_another": ((b"<unk>", b"", b"[EMPTY_1]"), "'[EMPTY_1]' twice"),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE_VOCABULARIES))
def test_gguf_vocabularies_refused(verify, members, tmp_path, trusted_key, attack):
    """Vocabularies the packed check cannot decide (a long or empty token, a duplicate,
    bad UTF-8) go to the exact loop, which refuses them with the reason."""
    tokens, reason = HOSTILE_VOCABULARIES[attack]
    model = gguf_with(tmp_path / "hostile.gguf", tokens=tokens)
    files = {**content(members), "model.gguf": model}
    code, message = verify(signed_bundle(tmp_path / "c.tar", files, [trusted_key.signing_key]))
    assert code == 15, message
    assert reason in message


WORDS = [f"t{i}".encode() for i in range(5000)]
# tokens; whether the packed check decides them (else the exact loop does); valid or not
PACKED_VOCABULARIES = {
    "ordinary": ([b"<unk>", "h\u00e9llo".encode(), "\u65e5\u672c".encode(), *WORDS], True, True),
    "longest_under_128": ([b"a" * 127, b"b"], True, True),
    "one_of_128": ([b"a" * 128, b"b"], False, True),
    "a_token_holding_a_length": ([b"a\x05" + bytes(7) + b"b", b"c"], False, True),
    "an_empty_token": ([b"a", b"", b"b"], False, True),
    "long_tokens_alike_at_both_ends": (
        [b"a" * 24 + b"X" + b"b" * 8, b"a" * 24 + b"Y" + b"b" * 8],
        True,
        True,
    ),
    "a_token_twice": ([b"a", b"b", b"a"], False, False),
    "a_long_token_twice": (
        [b"a" * 24 + b"X" + b"b" * 8, b"c", b"a" * 24 + b"X" + b"b" * 8],
        False,
        False,
    ),
    "invalid_utf8": ([b"a", b"\xe6\x97"], False, False),
}


@pytest.mark.parametrize("case", sorted(PACKED_VOCABULARIES))
def test_packed_vocabulary_check_decides_only_what_the_exact_loop_accepts(case):
    """The packed check (numpy, ~4x faster on Gemma's 262k tokens) must never accept what
    the exact loop refuses, nor place the end elsewhere; and it must decide the common
    case, or verification silently falls back to the slow loop."""
    tokens, decided, valid = PACKED_VOCABULARIES[case]
    data = b"".join(struct.pack("<Q", len(t)) + t for t in tokens) + bytes(64)
    packed_end = _packed_strings_end(data, 0, len(tokens), unique=True)
    try:
        exact_end = _Cursor(data, complete=True)._strings_one_by_one(len(tokens), unique=True)
    except GGUFError:
        exact_end = None
    assert (packed_end is not None, exact_end is not None) == (decided, valid)
    if decided:
        assert packed_end == exact_end == len(data) - 64


@pytest.mark.parametrize("twice", [False, True])
def test_gguf_header_longer_than_the_first_try(
    verify, run_cli, members, tmp_path, trusted_key, twice
):
    """The verifier keeps the model's first FIRST_TRY_BYTES for the header check; a header
    that goes on past them (a large vocabulary) has the bundle verified again, keeping up
    to the cap, and checked whole (a token twice near its end too). Unpacking extracts
    again on that second pass."""
    tokens = [f"{i:07d}" + "x" * 120 for i in range((FIRST_TRY_BYTES >> 7) + 1000)]
    if twice:
        tokens[-1] = tokens[-2]
    model = gguf_with(tmp_path / "big-vocab.gguf", tokens=tuple(tokens))
    assert len(model) > FIRST_TRY_BYTES + 64 * 1024
    files = {**content(members), "model.gguf": model}
    bundle = signed_bundle(tmp_path / "c.tar", files, [trusted_key.signing_key])
    code, message = verify(bundle)
    assert (code, "twice" in message) == ((15, True) if twice else (0, False)), message
    result = run_cli("bundle", "unpack", bundle, "--out", tmp_path / "files")
    assert result.exit_code == code, result.output
    if not twice:
        unpacked = {p.name: p.read_bytes() for p in (tmp_path / "files").rglob("*") if p.is_file()}
        assert unpacked["model.gguf"] == model
        assert len(unpacked) == len(files) + 1  # and the signature
    assert not (tmp_path / ".files.partial").exists()


@pytest.mark.parametrize(
    "hparams",
    [
        {},
        {"expert_count": 8, "expert_used_count": 2},
        {
            "expert_count": 8,
            "expert_used_count": 2,
            "expert_group_count": 4,
            "expert_group_used_count": 2,
        },
        {"attention.head_count": 0, "attention.head_count_kv": None},  # recurrent: no heads
        {"attention.head_count_kv": 1, "rope.scaling.type": "yarn"},
        {"attention.head_count_kv": [4, 0]},  # per layer: llama.cpp checks arrays itself
    ],
)
def test_gguf_with_plausible_hyperparameters_verifies(
    verify, members, tmp_path, trusted_key, hparams
):
    model = gguf_with(tmp_path / "plausible.gguf", **hparams)
    files = {**content(members), "model.gguf": model}
    bundle = signed_bundle(tmp_path / "c.tar", files, [trusted_key.signing_key])
    assert verify(bundle) == (0, "verified")
