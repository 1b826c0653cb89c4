"""One named test per attack on the trust store file (trust.json): each is refused on load.

Every command that reads the store refuses an invalid one with exit code 4 and a
one-line reason; nothing is verified against a store that was edited into nonsense.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from bundlecraft import Member, read_members, write_members
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from appliance.paths import appliance_paths
from appliance.trust.crypto import PublicKey
from appliance.trust.signature import parse_signature_file, sign_payload


@pytest.fixture
def store_file() -> Path:
    return appliance_paths().trust_store


def edit_store(path: Path, **changes: object) -> None:
    """Rewrite trust.json by hand, as someone with write access to /etc could."""
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, **changes}))


def key_entry(pem: bytes, key_id: str | None = None, name: str = "k") -> dict[str, object]:
    key_id = key_id or hashlib.sha256(pem).hexdigest()
    return {"key_id": key_id, "name": name, "pem": pem.decode(), "added": "x", "revoked": None}


def spki_pem(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def refused(run_cli, *args: object) -> str:
    """Run a command that must refuse the store; return its one-line reason."""
    result = run_cli(*args, "--json")
    assert result.exit_code == 4, result.output
    message = json.loads(result.stdout)["error"]
    assert "\n" not in message
    return message


def test_untouched_store_loads(run_cli, trusted_key):
    listed = json.loads(run_cli("keys", "list", "--json").output)
    assert listed["threshold"] == 1 and len(listed["keys"]) == 1


@pytest.mark.parametrize("threshold", [0, -1])
def test_threshold_that_lets_any_signature_pass(
    run_cli, store_file, tiny_bundle_toml, make_key, tmp_path, trusted_key, threshold
):
    """With k <= 0, a bundle signed only by a stranger counted as verified."""
    stranger = make_key("stranger")
    built = run_cli(
        "bundle", "build", tiny_bundle_toml, "--key", stranger.private, "--out", tmp_path
    )
    assert built.exit_code == 0, built.output
    edit_store(store_file, threshold=threshold)
    message = refused(run_cli, "bundle", "verify", tmp_path / "demo-1.0.0.tar")
    assert "threshold" in message


@pytest.mark.parametrize("threshold", ["1", 1.0, True, None, 2])
def test_threshold_not_an_integer_up_to_the_keys_listed(
    run_cli, store_file, trusted_key, threshold
):
    edit_store(store_file, threshold=threshold)
    assert "threshold" in refused(run_cli, "keys", "list")


def test_one_key_listed_under_two_ids(run_cli, store_file, tiny_bundle, trusted_key, tmp_path):
    """The same public key under a second, made-up id: two signatures by one private key,
    one per id, met k=2."""
    pem = trusted_key.public.read_bytes()
    fake_id = "f" * 64
    edit_store(store_file, threshold=2, keys=[key_entry(pem), key_entry(pem, fake_id)])
    members = read_members(tiny_bundle)
    second = json.loads(
        sign_payload(parse_signature_file(members[0].data).payload, trusted_key.signing_key)
    )
    second["verificationMaterial"]["publicKey"]["hint"] = fake_id
    attacked = [members[0], Member("signatures/01.sig", json.dumps(second).encode()), *members[1:]]
    bundle = write_members(tmp_path / "attacked.tar", attacked)
    assert "not the sha256 of its public key" in refused(run_cli, "bundle", "verify", bundle)


def test_same_key_listed_twice(run_cli, store_file, trusted_key):
    pem = trusted_key.public.read_bytes()
    edit_store(store_file, keys=[key_entry(pem), key_entry(pem, name="again")])
    assert "listed twice" in refused(run_cli, "keys", "list")


def test_same_key_in_another_pem_text(run_cli, store_file, trusted_key):
    """One key twice, the second copy's PEM text changed (and its id computed from that)."""
    pem = trusted_key.public.read_bytes()
    variant = pem.replace(b"\n", b"\r\n")
    edit_store(store_file, threshold=2, keys=[key_entry(pem), key_entry(variant)])
    assert "not the sha256" in refused(run_cli, "keys", "list")


def test_rsa_key_in_trust_store(run_cli, store_file, tiny_bundle, tmp_path):
    """An RSA key (hand-added) named by a signature's hint crashed verification with an
    AssertionError."""
    pem = spki_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())
    store_file.write_text(json.dumps({"format": 1, "threshold": 1, "keys": [key_entry(pem)]}))
    members = read_members(tiny_bundle)
    signature = json.loads(members[0].data)
    signature["verificationMaterial"]["publicKey"]["hint"] = hashlib.sha256(pem).hexdigest()
    attacked = [Member("signatures/00.sig", json.dumps(signature).encode()), *members[1:]]
    bundle = write_members(tmp_path / "attacked.tar", attacked)
    assert "P-256" in refused(run_cli, "bundle", "verify", bundle)


def test_rsa_public_key_verifies_nothing():
    pem = spki_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())
    assert PublicKey(pem).verify(b"\x30\x06\x02\x01\x01\x02\x01\x01", b"message") is False
    assert PublicKey(b"not a key").verify(b"sig", b"message") is False


@pytest.mark.parametrize(
    ("attack", "text", "reason"),
    [
        ("not_json", "{", "cannot read"),
        ("not_an_object", "[]", "unknown format"),
        ("unknown_format", '{"format": 2, "threshold": 1, "keys": []}', "unknown format"),
        ("keys_not_a_list", '{"format": 1, "threshold": 1, "keys": {}}', "fields"),
        ("extra_field", '{"format": 1, "threshold": 1, "keys": [], "x": 1}', "fields"),
        ("key_not_an_object", '{"format": 1, "threshold": 1, "keys": [1]}', "fields"),
        ("key_without_fields", '{"format": 1, "threshold": 1, "keys": [{}]}', "fields"),
    ],
)
def test_malformed_trust_store(run_cli, store_file, attack, text, reason):
    store_file.parent.mkdir(parents=True, exist_ok=True)
    store_file.write_text(text)
    assert reason in refused(run_cli, "keys", "list"), attack


def test_key_with_a_wrong_field_type(run_cli, store_file, trusted_key):
    entry = {**key_entry(trusted_key.public.read_bytes()), "revoked": 0}
    edit_store(store_file, keys=[entry])
    assert "wrong type" in refused(run_cli, "keys", "list")


def test_garbage_pem_in_trust_store(run_cli, store_file):
    store_file.parent.mkdir(parents=True, exist_ok=True)
    entry = key_entry(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    store_file.write_text(json.dumps({"format": 1, "threshold": 1, "keys": [entry]}))
    assert "not a PEM public key" in refused(run_cli, "keys", "list")


def test_empty_store_with_threshold_one_is_valid(run_cli, store_file):
    store_file.parent.mkdir(parents=True, exist_ok=True)
    store_file.write_text('{"format": 1, "threshold": 1, "keys": []}')
    assert json.loads(run_cli("keys", "list", "--json").output)["threshold"] == 1


def test_threshold_above_unrevoked_keys_is_refused(run_cli, make_key):
    first, second = make_key("first"), make_key("second")
    first.trust()
    second.trust()
    assert "exceeds the 2 unrevoked" in refused(run_cli, "keys", "threshold", "3")
    assert run_cli("keys", "revoke", second.key_id).exit_code == 0
    assert "exceeds the 1 unrevoked" in refused(run_cli, "keys", "threshold", "2")


def test_revoking_below_the_threshold_is_allowed_and_fails_closed(
    run_cli, tiny_bundle_toml, make_key, tmp_path
):
    """Revoking a compromised key is never blocked; bundles then miss the threshold."""
    first, second = make_key("first"), make_key("second")
    first.trust()
    second.trust()
    assert run_cli("keys", "threshold", "2").exit_code == 0
    args = ("--key", first.private, "--key", second.private, "--out", tmp_path)
    assert run_cli("bundle", "build", tiny_bundle_toml, *args).exit_code == 0
    assert run_cli("keys", "revoke", second.key_id).exit_code == 0
    assert json.loads(run_cli("keys", "list", "--json").output)["threshold"] == 2
    result = run_cli("bundle", "verify", tmp_path / "demo-1.0.0.tar")
    assert result.exit_code == 12
    assert "requires 2" in result.output
