"""ECDSA P-256 keys and signatures. The only module that imports `cryptography`.

A key's id is the sha256 hex of its SubjectPublicKeyInfo PEM, which is the "hint" the
OpenSSF model-signing v1.0 key format puts in a signature's verification material.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from appliance.errors import UsageError


class WrongPassphrase(Exception):
    """The key is encrypted and the passphrase is missing or wrong."""


@dataclass(frozen=True)
class PublicKey:
    pem: bytes

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.pem).hexdigest()

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True only for a valid ECDSA P-256 / SHA-256 signature by this key. Fails closed:
        a key that does not parse or is not P-256 verifies nothing (it never asserts)."""
        try:
            key = serialization.load_pem_public_key(self.pem)
        except (ValueError, UnsupportedAlgorithm):
            return False
        if not _is_p256(key):
            return False
        try:
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class SigningKey:
    _key: ec.EllipticCurvePrivateKey

    @property
    def public_key(self) -> PublicKey:
        return PublicKey(_spki_pem(self._key.public_key()))

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message, ec.ECDSA(hashes.SHA256()))

    def sign_sha256_digest(self, digest: bytes) -> bytes:
        """DER ECDSA signature over a precomputed SHA-256 digest (a large file's), which
        `openssl dgst -sha256 -verify PUB -signature SIG FILE` accepts."""
        return self._key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))

    def private_pem(self, passphrase: bytes | None) -> bytes:
        encryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )


def generate_signing_key() -> SigningKey:
    return SigningKey(ec.generate_private_key(ec.SECP256R1()))


def load_signing_key(pem: bytes, passphrase: bytes | None) -> SigningKey:
    """Load a PEM private key; raise WrongPassphrase if it needs (another) passphrase."""
    try:
        key = serialization.load_pem_private_key(pem, passphrase)
    except TypeError as exc:  # encrypted without a passphrase, or a passphrase for a plain key
        if passphrase is None:
            raise WrongPassphrase("the key is encrypted: a passphrase is needed") from exc
        raise UsageError("the key is not encrypted: do not give a passphrase") from exc
    except ValueError as exc:
        if passphrase is not None and b"ENCRYPTED" in pem:
            raise WrongPassphrase("wrong passphrase for the key") from exc
        raise UsageError(f"not a PEM private key: {exc}") from exc
    _require_p256(key)
    return SigningKey(key)


def key_is_encrypted(pem: bytes) -> bool:
    return b"ENCRYPTED" in pem.split(b"\n", 1)[0]


def load_public_key(pem: bytes) -> PublicKey:
    """Parse a PEM public key, require ECDSA P-256, and return it in canonical SPKI PEM."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"not a PEM public key: {exc}") from exc
    _require_p256(key)
    return PublicKey(_spki_pem(key))


def _is_p256(key: object) -> bool:
    return isinstance(getattr(key, "curve", None), ec.SECP256R1)


def _require_p256(key: object) -> None:
    if not _is_p256(key):
        raise UsageError("only ECDSA P-256 keys are supported")


def _spki_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
