"""Ed25519 signatures of node reports: the node signs, ingest verifies against the public key
its provider registered for the node (`domain.providers.Node.public_key`, 64 hex digits).

What is signed is the report's canonical bytes (`canonical_bytes`): the JSON of its fields
without the signature, keys sorted, no spaces, so any client in any language can produce it.
A usage batch (`workers.messages`) is signed the same way, once: its `data` (node_id and
every report) without the signature.

Verifying: `public_key` loads a registered key once (cached: the loaded
`Ed25519PublicKey`, keyed by its hex) and `verify_bytes` checks a signature of given bytes
with it; cryptography releases the GIL while it verifies, so a verify thread runs beside
the event loop's work.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SIGNATURE_HEX_LENGTH = 128
"""An Ed25519 signature is 64 bytes: 128 hex digits."""
PUBLIC_KEYS_CACHED_MAX = 1 << 16
"""Most loaded public keys kept (one per node)."""


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
    key = public_key(public_key_hex)
    if key is None:
        return False
    try:
        signature = bytes.fromhex(signature_hex)
    except ValueError:
        return False
    return verify_bytes(key, canonical_bytes(fields), signature)


@lru_cache(maxsize=PUBLIC_KEYS_CACHED_MAX)
def public_key(public_key_hex: str) -> Ed25519PublicKey | None:
    """The loaded key of 64 hex digits (cached); None when it is not an Ed25519 key."""
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
    except ValueError:
        return None


def verify_bytes(key: Ed25519PublicKey, message: bytes, signature: bytes) -> bool:
    """Whether `signature` (64 bytes) is `key`'s signature of `message` (never raises)."""
    try:
        key.verify(signature, message)
    except (ValueError, InvalidSignature):
        return False
    return True
