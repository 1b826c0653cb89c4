"""One named test per attack on a signed bundle: each is refused with its own exit code.

Exit codes: 10 bad or missing signature, 11 untrusted or revoked key, 12 threshold not
met, 13 hash or size mismatch, 14 unsafe archive, 15 bad GGUF, 16 unreadable input.
"""

from __future__ import annotations

import json
import struct
import tarfile
from pathlib import Path

import pytest
from bundlecraft import Member, content, read_members, replaced, signed_bundle, write_members
from conftest import write_bundle_dir
from test_bundle import SIGNED_FILES
from tinymodel import write_tiny_gguf

from appliance.build.builder import build_bundle
from appliance.build.spec import load_bundle_spec


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


def test_signature_after_content(verify, members, tmp_path):
    code, _ = verify(rewrite(tmp_path, members[1:] + members[:1]))
    assert code == 10


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


def test_one_keys_signature_counted_twice(verify, run_cli, members, make_key, tmp_path):
    make_key("second").trust()
    assert run_cli("keys", "threshold", "2").exit_code == 0
    duplicate = Member("signatures/01.sig", members[0].data)
    code, message = verify(rewrite(tmp_path, [members[0], duplicate, *members[1:]]))
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
