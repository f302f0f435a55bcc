"""The embedded default: a private PostgreSQL started from the `pgserver` package."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from ledger.errors import StoreUnavailableError

log = logging.getLogger(__name__)


def start_embedded_postgres(data_dir: Path) -> tuple[str, Any]:
    """Start (or reuse) a private PostgreSQL whose data lives in data_dir/postgres.

    Returns the libpq URL (Unix socket) and the server handle; the server stops when the
    last process holding a handle exits.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "postgres"
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    except Exception as e:
        raise StoreUnavailableError(
            f"could not start the embedded PostgreSQL in {pgdata}: {e}"
        ) from e
    url = str(server.get_uri())
    log.info("embedded PostgreSQL running in %s", pgdata)
    return url, server
