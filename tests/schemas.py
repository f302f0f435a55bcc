"""Fresh PostgreSQL schemas for tests: one name each, dropped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql


def create_schema(database_url: str) -> str:
    """Create a schema with a new name and return the name."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    return name


def drop_schema(database_url: str, name: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@contextmanager
def fresh_schema(database_url: str) -> Iterator[str]:
    name = create_schema(database_url)
    try:
        yield name
    finally:
        drop_schema(database_url, name)
