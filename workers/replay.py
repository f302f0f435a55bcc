"""`aether replay`: every read model rebuilt from zero in a fresh schema, checked against the
live views (state hashes), or shown as it was at a time or log position (`--as-of`).

Nothing is written to the logs or to the live views: the logs are read, the live views'
positions and hashes are read, and the rebuilt views live in their own schema
(`replay_<UTC time>` unless `--schema` names an empty or new one), dropped at the end unless
`--keep`.

Exit status: 0 when every rebuilt view equals its live view (or after `--as-of`), 1 when
one differs, 2 on a bad argument or a replay that cannot be done as asked.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ledger.config import Settings

if TYPE_CHECKING:
    from ledger.market.store import MarketplaceApplication
    from ledger.store import LedgerApplication
    from projections.replay import LivePoint, ReplayResult

PAGE_SIZE_MAX = 100_000
"""`projections.replay.REPLAY_PAGE_SIZE_MAX` (a test checks they are equal; kept here so
that `aether --help` does not import the projections)."""
SCHEMA_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
POSITION_RE = re.compile(r"^([a-z_]+):(\d+)$")
HASH_SHOWN = 16
"""Hex digits of a state hash shown in the table (the comparison uses all 64)."""


@dataclass(frozen=True, slots=True)
class AsOf:
    """A point of history: a time (every log cut there), or positions of named logs."""

    at: datetime | None = None
    positions: dict[str, int] | None = None

    def describe(self) -> str:
        if self.at is not None:
            return self.at.isoformat()
        assert self.positions is not None
        return ", ".join(f"{log}:{p}" for log, p in self.positions.items())


def parse_as_of(text: str) -> AsOf:
    """`TIME` (ISO 8601 with offset) or `LOG:N[,LOG:N...]` (a position of a log)."""
    text = text.strip()
    if text.isdigit():
        raise argparse.ArgumentTypeError(
            f"a log position names its log: marketplace:{text} or ledger:{text} "
            "(several: marketplace:N,ledger:M)"
        )
    parts = [p.strip() for p in text.split(",")]
    if all(POSITION_RE.match(p) for p in parts):
        positions: dict[str, int] = {}
        for part in parts:
            match = POSITION_RE.match(part)
            assert match is not None
            log, position = match.group(1), int(match.group(2))
            if log in positions:
                raise argparse.ArgumentTypeError(f"log {log} named twice in {text!r}")
            positions[log] = position
        return AsOf(positions=positions)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time or a log position: {text!r} "
            "(give e.g. 2026-12-01T12:00:00+00:00 or marketplace:1200)"
        ) from None
    if at.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give the time with its offset, e.g. {text}+00:00")
    return AsOf(at=at)


def _schema_name(text: str) -> str:
    if not SCHEMA_NAME_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"not a schema name: {text!r} (lower-case letters, digits, _; at most 63)"
        )
    return text


def _page_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= PAGE_SIZE_MAX:
        raise argparse.ArgumentTypeError(f"page size must be within 1..{PAGE_SIZE_MAX}")
    return value


def add_parser(commands: Any) -> None:
    """The `replay` subcommand, on `aether`'s subparsers."""
    parser = commands.add_parser(
        "replay",
        help="rebuild every read model from zero in a fresh schema and compare it with the "
        "live views (state hashes); --as-of shows the state at a time or log position",
        description=" ".join(__doc__.split("\n\n")[0].split()) if __doc__ else None,
    )
    parser.add_argument(
        "--as-of",
        type=parse_as_of,
        default=None,
        metavar="TIME|LOG:N",
        help="rebuild only up to then and print the views' state then (no comparison): an "
        "ISO 8601 time with offset, or log positions, e.g. marketplace:1200,ledger:300",
    )
    parser.add_argument(
        "--schema",
        type=_schema_name,
        default=None,
        help="schema for the rebuilt views (new or empty; default replay_<UTC time>)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the replay schema afterwards")
    parser.add_argument(
        "--page-size",
        type=_page_size,
        default=None,
        metavar="N",
        help="log events per transaction of each view (default 20000)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(run=run)


@dataclass
class _Logs:
    url: str
    schema: str
    ledger: LedgerApplication
    market: MarketplaceApplication


@contextmanager
def _open_logs(settings: Settings) -> Iterator[_Logs]:
    """The ledger's and the marketplace's logs, read only: no writer, no service."""
    import psycopg

    from ledger.config import eventsourcing_env
    from ledger.embedded import start_embedded_postgres
    from ledger.market.store import MarketplaceApplication
    from ledger.store import LedgerApplication
    from projections.replay import ReplayError

    server: Any = None
    url = settings.database_url
    if url is None:
        url, server = start_embedded_postgres(settings.aether_data_dir)
    schema = settings.postgres_schema
    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename = ANY(%s)",
            (schema, ["ledger_events", "marketplace_events"]),
        ).fetchone()
    if row is None or row[0] != 2:
        raise ReplayError(f"no ledger and marketplace logs in schema {schema}: nothing to replay")
    ledger = LedgerApplication(
        env=eventsourcing_env(url, schema, max(settings.postgres_pool_size, 3))
    )
    try:
        market = MarketplaceApplication(ledger.app_recorder.datastore, env=ledger.env)
        yield _Logs(url, schema, ledger, market)
    finally:
        ledger.close()
        del server


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run `aether replay` (see the module docstring); returns the exit status."""
    from projections.replay import ReplayError

    try:
        return _run(settings, args)
    except ReplayError as e:
        print(f"aether replay: {e}", file=sys.stderr)
        return 2


def _run(settings: Settings, args: argparse.Namespace) -> int:
    import psycopg
    from psycopg import sql

    from projections.replay import (
        REPLAY_PAGE_SIZE,
        ReplayError,
        check_schema_empty,
        live_points,
        replay,
        stops_as_of,
    )
    from workers.projector import open_views

    page_size = args.page_size or REPLAY_PAGE_SIZE
    target = args.schema or "replay_" + datetime.now(UTC).strftime("%Y%m%d_%H%M%S_%f")
    with _open_logs(settings) as logs:
        if target == logs.schema:
            raise ReplayError("the replay schema must not be the live one")
        existed = check_schema_empty(logs.url, target)
        if not existed:
            with psycopg.connect(logs.url, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(target)))
        try:
            with open_views(logs.ledger, logs.market) as views:
                projections = views.all()
                progress = None if args.quiet else sys.stderr
                if args.as_of is not None:
                    as_of: AsOf = args.as_of
                    stops = stops_as_of(projections, at=as_of.at, positions=as_of.positions)
                    result = replay(
                        projections,
                        target,
                        stops=stops,
                        page_size=page_size,
                        progress=progress,
                    )
                    _print_state(result, as_of)
                    code = 0
                else:
                    points = live_points(projections)
                    stops = {name: p.position for name, p in points.items()}
                    result = replay(
                        projections,
                        target,
                        stops=stops,
                        page_size=page_size,
                        progress=progress,
                    )
                    code = _print_comparison(result, points)
        finally:
            if args.keep:
                print(f"replay schema kept: {target}")
            elif not existed:
                with psycopg.connect(logs.url, autocommit=True) as conn:
                    conn.execute(
                        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(target))
                    )
    return code


def _print_comparison(result: ReplayResult, points: dict[str, LivePoint]) -> int:
    from projections.replay import compare

    rows = compare(result, points)
    print(
        f"{'view':<20} {'position':>9} {'events':>9}  {'live hash':<{HASH_SHOWN}}  "
        f"{'replay hash':<{HASH_SHOWN}}  equal"
    )
    for c in rows:
        print(
            f"{c.name:<20} {c.position:>9} {c.events:>9}  {c.live_hash[:HASH_SHOWN]}  "
            f"{c.replay_hash[:HASH_SHOWN]}  {'yes' if c.equal else 'NO'}"
        )
    rate = result.events_total / max(result.elapsed_s, 1e-9)
    differ = [c.name for c in rows if not c.equal]
    print(
        f"{result.events_total} events replayed in {result.elapsed_s:.2f}s ({rate:,.0f}/s); "
        + (f"DIFFERENT: {', '.join(differ)}" if differ else "every view equals the live one")
    )
    not_projected = [c.name for c in rows if c.position == 0]
    if not_projected:
        print(f"note: not projected live yet (position 0): {', '.join(not_projected)}")
    return 1 if differ else 0


def _print_state(result: ReplayResult, as_of: AsOf) -> None:
    print(f"state as of {as_of.describe()}")
    print(f"{'view':<20} {'log':<12} {'position':>9} {'events':>9}  state hash        tables")
    for v in result.views:
        tables = ", ".join(f"{name} {count}" for name, count in v.tables.items())
        print(
            f"{v.name:<20} {v.log:<12} {v.position:>9} {v.events:>9}  "
            f"{v.state_hash[:HASH_SHOWN]}  {tables}"
        )
