"""Signatures in the OpenSSF model-signing v1.0 "key" format.

A signature file is a sigstore bundle v0.3 (JSON) whose DSSE envelope carries the
Statement as payload; the signature covers the DSSE pre-authentication encoding (PAE) of
the payload, with ECDSA P-256 + SHA-256. The public key is named by its hint: the sha256
hex of its SubjectPublicKeyInfo PEM. `model_signing verify key` reads these files.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from appliance.errors import SignatureError
from appliance.trust.crypto import PublicKey, SigningKey

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
MAX_SIGNATURE_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class SignedEnvelope:
    key_hint: str
    payload: bytes
    signature: bytes

    def verify_with(self, key: PublicKey) -> bool:
        return key.verify(self.signature, pae(self.payload))


def pae(payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding (lengths are byte lengths)."""
    type_bytes = PAYLOAD_TYPE.encode()
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def sign_payload(payload: bytes, key: SigningKey) -> bytes:
    """Return the signature file (sigstore bundle JSON) for one key over the payload."""
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": key.public_key.key_id},
            "tlogEntries": [],
        },
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(key.sign(pae(payload))).decode(), "keyid": ""}],
        },
    }
    return json.dumps(bundle, indent=2).encode()


def parse_signature_file(data: bytes) -> SignedEnvelope:
    """Parse a signature file strictly; it is not yet verified."""
    try:
        bundle = json.loads(data)
        if bundle["mediaType"] != BUNDLE_MEDIA_TYPE:
            raise SignatureError(f"unsupported signature media type {bundle['mediaType']!r}")
        envelope = bundle["dsseEnvelope"]
        if envelope["payloadType"] != PAYLOAD_TYPE:
            raise SignatureError(f"unsupported payload type {envelope['payloadType']!r}")
        signatures = envelope["signatures"]
        if len(signatures) != 1:
            raise SignatureError("a signature file must hold exactly one signature")
        hint = bundle["verificationMaterial"]["publicKey"]["hint"]
        if not isinstance(hint, str) or len(hint) != 64:
            raise SignatureError("signature has no valid public key hint")
        return SignedEnvelope(
            key_hint=hint.lower(),
            payload=base64.b64decode(envelope["payload"], validate=True),
            signature=base64.b64decode(signatures[0]["sig"], validate=True),
        )
    except SignatureError:
        raise
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise SignatureError(f"signature file is malformed: {exc}") from exc
