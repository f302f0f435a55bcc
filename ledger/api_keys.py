"""API keys of the HTTP API: one per party, stored hashed.

A key reads ``aek_<key id: 32 hex digits>_<secret: 43 url-safe characters>``. The table
`api_keys` (in the service's schema) holds, per key id, the party it speaks for (its kind:
provider, consumer, finance or auditor, and its id), the sha256 of the whole key, when it
was created and, once revoked, when. The key itself is shown once, at creation, and never
stored: a request's key is hashed and compared with the stored digest in constant time
(`hmac.compare_digest`), found by its key id (which is not secret).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from ledger.errors import LedgerError

API_KEYS_TABLE_NAME = "api_keys"
KEY_PREFIX = "aek_"
SECRET_BYTES = 32
KEY_LENGTH_MAX = 128
"""Longer header values are refused before any hashing or lookup."""
_KEY_RE = re.compile(r"^aek_([0-9a-f]{32})_([A-Za-z0-9_-]{43})$")


class PartyKind(enum.StrEnum):
    """Who a key speaks for."""

    provider = "provider"
    consumer = "consumer"
    finance = "finance"
    auditor = "auditor"


class ApiKeyError(LedgerError):
    """An API key cannot be created or revoked as asked."""


@dataclass(frozen=True, slots=True)
class Party:
    """The authenticated caller."""

    kind: PartyKind
    id: UUID
    key_id: UUID


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: UUID
    key: str
    """Shown once; only its sha256 is stored."""
    party: Party


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_key(text: str) -> UUID | None:
    """The key id of a well-formed key; None when `text` is not one."""
    if len(text) > KEY_LENGTH_MAX:
        return None
    found = _KEY_RE.match(text)
    return None if found is None else UUID(hex=found.group(1))


def matches(key: str, stored_digest: bytes) -> bool:
    """Whether `key` hashes to `stored_digest` (constant-time comparison)."""
    return hmac.compare_digest(digest(key), bytes(stored_digest))


def create_statement(schema: str) -> sql.Composed:
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {}.{} ("
        "key_id uuid PRIMARY KEY, "
        "party_kind text NOT NULL CHECK (party_kind IN "
        "('provider', 'consumer', 'finance', 'auditor')), "
        "party_id uuid NOT NULL, "
        "key_sha256 bytea NOT NULL CHECK (length(key_sha256) = 32), "
        "created_at timestamptz NOT NULL DEFAULT now(), "
        "revoked_at timestamptz)"
    ).format(sql.Identifier(schema), sql.Identifier(API_KEYS_TABLE_NAME))


def create_table(conn: psycopg.Connection[Any], schema: str) -> None:
    conn.execute(create_statement(schema))


def create_key(conninfo: str, schema: str, kind: PartyKind, party_id: UUID) -> NewKey:
    """A new key for the party, its digest stored."""
    key_id = uuid.uuid4()
    key = f"{KEY_PREFIX}{key_id.hex}_{secrets.token_urlsafe(SECRET_BYTES)}"
    assert parse_key(key) == key_id
    try:
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
            create_table(conn, schema)
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.{} (key_id, party_kind, party_id, key_sha256) "
                    "VALUES (%s, %s, %s, %s)"
                ).format(sql.Identifier(schema), sql.Identifier(API_KEYS_TABLE_NAME)),
                (key_id, kind.value, party_id, digest(key)),
            )
    except psycopg.Error as e:
        raise ApiKeyError(f"cannot store the key for {kind.value} {party_id}: {e}") from e
    return NewKey(key_id, key, Party(kind, party_id, key_id))


def revoke_key(conninfo: str, schema: str, key_id: UUID, at: datetime) -> bool:
    """Revoke a key; whether it existed and was not revoked yet."""
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
        create_table(conn, schema)
        cursor = conn.execute(
            sql.SQL(
                "UPDATE {}.{} SET revoked_at = %s WHERE key_id = %s AND revoked_at IS NULL"
            ).format(sql.Identifier(schema), sql.Identifier(API_KEYS_TABLE_NAME)),
            (at, key_id),
        )
        return cursor.rowcount == 1
