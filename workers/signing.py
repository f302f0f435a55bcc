"""Ed25519 signatures of node reports: the node signs, ingest verifies against the public key
its provider registered for the node (`domain.providers.Node.public_key`, 64 hex digits).

What is signed is the report's canonical bytes (`canonical_bytes`): the JSON of its fields
without the signature, keys sorted, no spaces, so any client in any language can produce it.
"""

from __future__ import annotations

from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SIGNATURE_HEX_LENGTH = 128
"""An Ed25519 signature is 64 bytes: 128 hex digits."""


def canonical_bytes(fields: dict[str, Any]) -> bytes:
    """The bytes a signature covers: sorted-key compact JSON of `fields` (no signature)."""
    return orjson.dumps(
        {k: v for k, v in fields.items() if k != "signature"}, option=orjson.OPT_SORT_KEYS
    )


class NodeKey:
    """A node's signing key (the private half stays on the node)."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeKey:
        """A deterministic key from a 32-byte seed (tests and demos)."""
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def public_key_hex(self) -> str:
        raw = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return raw.hex()

    def sign(self, fields: dict[str, Any]) -> str:
        """The hex signature of `fields`' canonical bytes."""
        return self._private.sign(canonical_bytes(fields)).hex()


def verify(public_key_hex: str, fields: dict[str, Any], signature_hex: str) -> bool:
    """Whether `signature_hex` is the node's signature of `fields` (never raises)."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
        key.verify(bytes.fromhex(signature_hex), canonical_bytes(fields))
    except (ValueError, InvalidSignature):
        return False
    return True
