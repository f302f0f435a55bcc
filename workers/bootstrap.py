"""The composition root: builds the ledger from Settings (embedded default when unset)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from domain.lease import LeaseRules
from ledger.config import Settings, eventsourcing_env
from ledger.embedded import start_embedded_postgres
from ledger.errors import StoreUnavailableError
from ledger.market.service import Clock, Marketplace, MarketRules, utc_now
from ledger.market.store import MarketplaceApplication
from ledger.store import LedgerApplication
from ledger.writer import LedgerWriter

log = logging.getLogger(__name__)


@dataclass
class Ledger:
    """What a process needs to use the ledger."""

    settings: Settings
    database_url: str
    app: LedgerApplication
    writer: LedgerWriter
    embedded: bool


@contextmanager
def open_ledger(settings: Settings) -> Iterator[Ledger]:
    """Connect to DATABASE_URL, or start the private PostgreSQL; build the ledger writer."""
    server: Any = None
    url = settings.database_url
    if url is None:
        url, server = start_embedded_postgres(settings.aether_data_dir)
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(
                psycopg.sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                    psycopg.sql.Identifier(settings.postgres_schema)
                )
            )
    except psycopg.OperationalError as e:
        raise StoreUnavailableError(f"cannot reach PostgreSQL at {_redact(url)}: {e}") from e
    app = LedgerApplication(
        env=eventsourcing_env(url, settings.postgres_schema, settings.postgres_pool_size)
    )
    try:
        writer = LedgerWriter(app, shard=settings.ledger_shard)
        yield Ledger(settings, url, app, writer, embedded=server is not None)
    finally:
        app.close()


@dataclass
class Market:
    """What a process needs to run the marketplace on the ledger."""

    ledger: Ledger
    app: MarketplaceApplication
    service: Marketplace


DEPLOYED_MARKET_RULES = MarketRules(lease=LeaseRules(release_escrow_at_close=False))
"""The marketplace rules every process of a deployment runs (they must agree): the default
rules, except that a close keeps the lease's escrow until settlement has charged its last
usage (`aether worker settle` releases it)."""


@contextmanager
def open_market(
    settings: Settings, *, rules: MarketRules | None = None, clock: Clock = utc_now
) -> Iterator[Market]:
    """The ledger (see `open_ledger`) and the marketplace service of its shard, on the same
    database and connection pool (one transaction writes both). `rules`: by default
    `DEPLOYED_MARKET_RULES`."""
    with open_ledger(settings) as ledger:
        app = MarketplaceApplication(ledger.app.app_recorder.datastore, env=ledger.app.env)
        service = Marketplace(app, ledger.writer, rules=rules or DEPLOYED_MARKET_RULES, clock=clock)
        yield Market(ledger, app, service)


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    params = psycopg.conninfo.conninfo_to_dict(url)
    params.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in params.items())
