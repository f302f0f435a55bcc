"""Shared fixtures: a real PostgreSQL (DATABASE_URL, or a private one from pgserver)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger.config import eventsourcing_env
from ledger.embedded import start_embedded_postgres
from ledger.store import LedgerApplication
from ledger.writer import LedgerWriter
from tests.schemas import fresh_schema


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """DATABASE_URL when set (CI: the machine's PostgreSQL); else a private pgserver."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="aether-test-pg-") as folder:
        os.chmod(folder, 0o755)
        url, server = start_embedded_postgres(Path(folder))
        yield url
        server.cleanup()


@pytest.fixture
def schema(database_url: str) -> Iterator[str]:
    """A fresh schema per test, dropped afterwards."""
    with fresh_schema(database_url) as name:
        yield name


@pytest.fixture
def ledger_env(database_url: str, schema: str) -> dict[str, str]:
    return eventsourcing_env(database_url, schema, pool_size=2)


@pytest.fixture
def ledger_app(ledger_env: dict[str, str]) -> Iterator[LedgerApplication]:
    app = LedgerApplication(env=ledger_env)
    yield app
    app.close()


@pytest.fixture
def writer(ledger_app: LedgerApplication) -> LedgerWriter:
    return LedgerWriter(ledger_app)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """KAFKA_BOOTSTRAP_SERVERS when set; else one private Tansu broker for the whole session
    (started on first use, topics created). Tests share it: use fresh group ids and keys."""
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if servers:
        import asyncio

        from workers.broker import create_topics

        asyncio.run(create_topics(servers))
        yield servers
        return
    from workers.broker import embedded_broker

    with embedded_broker() as bootstrap:
        yield bootstrap
