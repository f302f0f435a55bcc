"""Replay throughput: the whole log into every projection from zero, events per second.

The log (built once, then reused from schema `--schema` while it holds at least `--events`
events) is a realistic market: providers with nodes and bonded stake, checkers, consumers
with deposits, asks and bids over three GPU models matched into leases, resting and
cancelled bids, a verdict round with a failed downtime quorum (a slash, refunds), closes,
all through the real `Marketplace` service. Then many hours of heartbeats and usage
charges on every lease: decided by the domain's own functions (`domain.lease.
record_heartbeat`, `charge_usage`) on the leases' real state, recorded as the service
records them (each command's facts, then its `CommandHandled` with the command's digest;
the usage charges' ledger transfers from `domain.postings`), and saved through the real
writer and recorders (`LedgerWriter.execute(..., events=...)`), many commands per
transaction; a few of those hours go through the service itself, which first reads back
everything written in bulk (its catch-up checks every stream version). The live views are
projected once at build time (`aether project`'s path), so each run can check the
replay's state hashes against them; a view registered after the log was built is
projected live at the start of the next run (once, not timed).

Each run: `projections.replay.replay` into a fresh schema (every view of both logs, from
zero, to the live views' positions) is timed, then, in the same run, a raw scan of the
same tables: every row of `marketplace_events` and `ledger_events` (notification id, topic,
state) read through a server-side cursor, nothing decoded. Also printed: where the
replay's time went.

Last line: RESULT events_per_s=<n> scan_rows_per_s=<n> ratio=<x>
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from domain import lease as lease_rules
from domain.orderbook import Ask, Bid, escrow_required
from domain.postings import postings_for
from domain.providers import Node
from domain.verdicts import FailureKind, Verdict, window_containing, window_end_of
from ledger.config import eventsourcing_env
from ledger.embedded import start_embedded_postgres
from ledger.market import service as m
from ledger.market.store import CommandHandled, MarketEvent, MarketplaceApplication
from ledger.model import NewTransfer
from ledger.money import units
from ledger.store import LedgerApplication
from ledger.writer import LedgerWriter
from projections.replay import live_points, replay
from workers.projector import open_views

NAMES = uuid.UUID("7b4c2e10-8d3f-4a61-b5e9-2f0a6c1d3e42")
START = datetime(2026, 6, 1, 0, 0, tzinfo=UTC)
MODELS = (("H100", units(3)), ("A100", units(2)), ("RTX4090", units(1) // 2))
PROVIDERS_COUNT = 24
CONSUMERS_COUNT = 16
CHECKERS_COUNT = 5
GPUS_PER_NODE = 8
CHARGE_EVERY_ROUNDS = 5
"""A usage charge per lease every this many heartbeat rounds."""
COMMANDS_PER_SAVE = 2_000
"""Bulk commands saved per transaction (their transfers stay under the writer's batch)."""
SERVICE_ROUNDS = 3
"""Heartbeat rounds sent through the service itself at the end."""
META_TABLE = "bench_replay_meta"


def uid(name: str) -> uuid.UUID:
    return uuid.uuid5(NAMES, name)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def address(name: str) -> str:
    return "0x" + uuid.uuid5(NAMES, "address:" + name).hex + "00000000"


def shape(service: m.Marketplace, clock: Clock) -> list[uuid.UUID]:
    """The market, through the service; returns the leases opened."""

    def send(command: m.Command) -> m.Handled:
        return service.handle(command)

    leases: list[uuid.UUID] = []
    nodes: list[tuple[uuid.UUID, uuid.UUID, str]] = []  # provider, node, model
    for p in range(PROVIDERS_COUNT):
        model = MODELS[p % len(MODELS)][0]
        node = Node(
            uid(f"n{p}"),
            model,
            GPUS_PER_NODE,
            81_920,
            ("eu-west", "us-east", "ap-south")[p % 3],
            uid(f"key{p}").hex * 2,
        )
        pid = uid(f"p{p}")
        send(m.RegisterProvider(uuid.uuid4(), pid, address(f"p{p}"), (node,)))
        send(m.BondStake(uuid.uuid4(), pid, units(1_000)))
        nodes.append((pid, node.node_id, model))
    for c in range(CONSUMERS_COUNT):
        send(
            m.ConfirmDeposit(
                uuid.uuid4(), uuid.uuid4(), uid(f"c{c}"), units(1_000_000), f"0xdep{c}:0"
            )
        )
    for k in range(CHECKERS_COUNT):
        send(m.RegisterChecker(uuid.uuid4(), uid(f"k{k}"), address(f"k{k}"), units(10)))
    prices = dict(MODELS)
    for p, (pid, node_id, model) in enumerate(nodes):
        price = prices[model] + units(1) // 100 * (p % 4)
        ask = Ask(
            uid(f"a{p}"), pid, node_id, model, GPUS_PER_NODE, price, clock.now + timedelta(days=30)
        )
        send(m.PlaceAsk(uuid.uuid4(), ask))
        clock.advance(1)
    bid_index = 0
    for p, (_, _, model) in enumerate(nodes):
        for gpus in (1, 2, 1, 3):
            consumer = uid(f"c{bid_index % CONSUMERS_COUNT}")
            max_price = prices[model] * 2
            duration_s = 3 * 86_400
            bid = Bid(
                uid(f"b{bid_index}"),
                consumer,
                model,
                gpus,
                max_price,
                duration_s,
                escrow_required(gpus, max_price, duration_s),
            )
            bid_index += 1
            leases += send(m.PlaceBid(uuid.uuid4(), bid)).lease_ids
            clock.advance(1)
        if p % 6 == 0:  # a bid below every ask: it rests, and is cancelled
            low = Bid(uid(f"low{p}"), uid("c0"), model, 1, 1, 3_600, escrow_required(1, 1, 3_600))
            send(m.PlaceBid(uuid.uuid4(), low))
            send(m.CancelBid(uuid.uuid4(), low.id, uid("c0")))
    # A verdict round: every node passes but node 0, which fails a downtime quorum.
    window = window_containing(clock.now, service.rules.verdicts)
    clock.now = window_end_of(window, service.rules.verdicts) + timedelta(seconds=1)
    for p, (pid, node_id, _) in enumerate(nodes):
        for k in range(CHECKERS_COUNT):
            failed = p == 0 and k < 3
            verdict = Verdict(
                uuid.uuid4(),
                uid(f"k{k}"),
                node_id,
                pid,
                window,
                window_end_of(window, service.rules.verdicts),
                5_000 if failed else 120,
                1_000_000,
                100_000 if failed else 1_000_000,
                not failed,
                FailureKind.downtime if failed else FailureKind.none,
                "ab" * 32,
            )
            send(m.SubmitVerdict(uuid.uuid4(), verdict))
    for pos, lease_id in enumerate(list(leases)):
        if pos % 17 == 5:  # a few leases heartbeat then close early
            current = service.lease(lease_id)
            assert current is not None
            send(m.RecordHeartbeat(uuid.uuid4(), lease_id, current.node_id, 1, clock.now))
            send(
                m.CloseLease(
                    uuid.uuid4(), lease_id, lease_rules.CloseReason.consumer, current.consumer_id
                )
            )
    return leases


class Bulk:
    """Commands decided by the domain on the leases' real state and saved as the service
    saves them, COMMANDS_PER_SAVE per transaction."""

    def __init__(self, service: m.Marketplace, writer: LedgerWriter) -> None:
        self.service = service
        self.writer = writer
        self.app = service.app
        self.rules = service.rules
        self.leases = {
            i: lease
            for i, lease in service.state.leases.items()
            if lease.status is lease_rules.LeaseStatus.open
        }
        self.versions = dict(service.state.versions)
        self.stored: list[Any] = []
        self.transfers: list[NewTransfer] = []
        self.commands = 0

    def heartbeats(self, now: datetime) -> None:
        for lease_id, current in self.leases.items():
            command = m.RecordHeartbeat(
                uuid.uuid4(), lease_id, current.node_id, current.heartbeat_sequence + 1, now
            )
            result, facts = lease_rules.record_heartbeat(
                current, command.node_id, command.sequence, command.at, now, self.rules.lease
            )
            assert result is lease_rules.RecordHeartbeatResult.ok, result
            self._record(command, now, facts)

    def charges(self, now: datetime, seconds: int) -> None:
        for lease_id, current in self.leases.items():
            amount = current.price_per_gpu_hour * current.gpu_count * seconds // 3_600
            command = m.ChargeUsage(uuid.uuid4(), lease_id, amount, f"usage:{uuid.uuid4()}")
            result, facts = lease_rules.charge_usage(
                current, amount, command.usage_ref, now, self.rules.lease
            )
            assert result is lease_rules.ChargeUsageResult.ok, result
            self._record(command, now, facts)

    def _record(self, command: m.Command, now: datetime, facts: Sequence[Any]) -> None:
        mapper = self.app.market_mapper
        for fact in facts:
            stream = fact.lease_id
            version = self.versions.get(stream, 0) + 1
            self.versions[stream] = version
            lease = lease_rules.apply(self.leases[stream], fact)
            self.leases[stream] = lease
            self.transfers += postings_for(
                fact, key=f"{stream}:{version}", parties=lease, rules=self.rules.postings
            )
            self.stored.append(mapper.to_stored_event(MarketEvent(stream, version, now, fact)))
        handled = CommandHandled(
            command.command_id,
            type(command).__name__,
            m.command_digest(command),
            len(facts),
            (),
            now,
        )
        self.stored.append(mapper.to_stored_event(MarketEvent(command.command_id, 1, now, handled)))
        self.commands += 1
        if self.commands % COMMANDS_PER_SAVE == 0:
            self.save()

    def save(self) -> None:
        if not self.stored:
            return
        outcome = self.writer.execute(
            (), self.transfers, events=self.stored, events_recorder=self.app.app_recorder
        )
        assert outcome.applied, outcome.first_failure()
        self.stored, self.transfers = [], []


def count_events(url: str, schema: str) -> int:
    with psycopg.connect(url) as conn:
        total = 0
        for table in ("marketplace_events", "ledger_events"):
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(table)
                )
            ).fetchone()
            assert row is not None
            total += int(row[0])
        return total


def built(url: str, schema: str) -> int | None:
    """Events of the log built in `schema` before, or None if there is none complete."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}".{META_TABLE}',)
        ).fetchone()
        if row is None or not row[0]:
            return None
        found = conn.execute(
            sql.SQL("SELECT events FROM {}.{}").format(
                sql.Identifier(schema), sql.Identifier(META_TABLE)
            )
        ).fetchone()
        return None if found is None else int(found[0])


def build(url: str, schema: str, events_target: int) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    started = time.perf_counter()
    clock = Clock(START)
    app = LedgerApplication(env=eventsourcing_env(url, schema, 4))
    try:
        writer = LedgerWriter(app, clock=clock)
        market_app = MarketplaceApplication(app.app_recorder.datastore, env=app.env)
        service = m.Marketplace(market_app, writer, clock=clock)
        leases = shape(service, clock)
        clock.advance(service.rules.verdicts.verdict_grace_s + 1)
        service.handle(m.Tick(uuid.uuid4()))  # decides the window: slash and refunds
        shaped = count_events(url, schema)
        print(
            f"market: {len(leases)} leases, {shaped} events through the service in "
            f"{time.perf_counter() - started:.1f}s"
        )
        started = time.perf_counter()
        bulk = Bulk(service, writer)
        interval = service.rules.lease.heartbeat_interval_s
        per_round = 2 * len(bulk.leases)
        rounds = 0
        while shaped + rounds * per_round * (1 + 1.2 / CHARGE_EVERY_ROUNDS) < events_target:
            clock.advance(interval)
            bulk.heartbeats(clock.now)
            rounds += 1
            if rounds % CHARGE_EVERY_ROUNDS == 0:
                bulk.charges(clock.now, interval * CHARGE_EVERY_ROUNDS)
        bulk.save()
        print(
            f"bulk: {bulk.commands} commands ({rounds} heartbeat rounds of {len(bulk.leases)} "
            f"leases, a charge every {CHARGE_EVERY_ROUNDS}) in {time.perf_counter() - started:.1f}s"
        )
        started = time.perf_counter()
        service.refresh()
        for _ in range(SERVICE_ROUNDS):
            clock.advance(interval)
            for lease_id, current in list(service.state.leases.items()):
                if current.status is lease_rules.LeaseStatus.open:
                    service.handle(
                        m.RecordHeartbeat(
                            uuid.uuid4(),
                            lease_id,
                            current.node_id,
                            current.heartbeat_sequence + 1,
                            clock.now,
                        )
                    )
        for lease_id in list(bulk.leases)[:3]:
            consumer_id = bulk.leases[lease_id].consumer_id
            service.handle(
                m.CloseLease(uuid.uuid4(), lease_id, lease_rules.CloseReason.consumer, consumer_id)
            )
        service.handle(m.Tick(uuid.uuid4()))
        print(
            f"service: read the bulk back and sent {SERVICE_ROUNDS} more rounds in "
            f"{time.perf_counter() - started:.1f}s"
        )
        started = time.perf_counter()
        with open_views(app, market_app) as views:
            views.catch_up()
        print(
            f"live views projected (aether project's path) in {time.perf_counter() - started:.1f}s"
        )
    finally:
        app.close()
    total = count_events(url, schema)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {}.{} (events bigint NOT NULL)").format(
                sql.Identifier(schema), sql.Identifier(META_TABLE)
            )
        )
        conn.execute(
            sql.SQL("INSERT INTO {}.{} VALUES (%s)").format(
                sql.Identifier(schema), sql.Identifier(META_TABLE)
            ),
            (total,),
        )
    return total


def raw_scan(url: str, schema: str, fetch_size: int) -> tuple[int, float]:
    """Rows of both events tables read through a server-side cursor: (rows, seconds)."""
    rows = 0
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        for table in ("marketplace_events", "ledger_events"):
            with conn.cursor(name=f"scan_{table}") as curs:
                curs.itersize = fetch_size
                curs.execute(
                    sql.SQL(
                        "SELECT notification_id, topic, state FROM {}.{} ORDER BY notification_id"
                    ).format(sql.Identifier(schema), sql.Identifier(table))
                )
                while batch := curs.fetchmany(fetch_size):
                    rows += len(batch)
        conn.rollback()
    return rows, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=220_000, help="log size (at least)")
    parser.add_argument("--schema", default="bench_replay", help="schema of the log (reused)")
    parser.add_argument("--rebuild", action="store_true", help="build the log again")
    parser.add_argument("--page-size", type=int, default=None, help="events per page")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    url = os.environ.get("DATABASE_URL")
    if not url:
        url, _server = start_embedded_postgres(Path(".aether/bench"))
    total = None if args.rebuild else built(url, args.schema)
    if total is None or total < args.events:
        total = build(url, args.schema, args.events)
    print(f"log: {total} events in schema {args.schema} ({url.split('@')[-1]})")

    app = LedgerApplication(env=eventsourcing_env(url, args.schema, 4))
    market_app = MarketplaceApplication(app.app_recorder.datastore, env=app.env)
    target = f"{args.schema}_r_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(target)))
        with open_views(app, market_app) as views:
            # Views registered after the log was built are projected live now (once).
            began = time.perf_counter()
            caught_up = {name: n for name, n in views.catch_up().items() if n}
            if caught_up:
                print(f"live views caught up {caught_up} in {time.perf_counter() - began:.1f}s")
            points = live_points(views.all())
            live = {name: p.state_hash for name, p in points.items()}
            stops = {name: p.position for name, p in points.items()}
            kwargs: dict[str, Any] = {}
            if args.page_size:
                kwargs["page_size"] = args.page_size
            started = time.perf_counter()
            result = replay(views.all(), target, stops=stops, progress=sys.stderr, **kwargs)
            elapsed = time.perf_counter() - started
        events = result.events_total
        rate = events / elapsed
        for v in result.views:
            equal = "equal" if live[v.name] == v.state_hash else "DIFFERENT"
            print(
                f"  {v.name:<12} position {v.position:>7}  applied {v.applied:>7}  "
                f"write {v.write_s:5.2f}s  {equal}"
            )
        print(
            f"replay: {events} events in {elapsed:.2f}s -> {rate:,.0f} events/s; time in: "
            + ", ".join(f"{k} {s:.2f}s" for k, s in result.timings.items())
        )
        assert all(live[v.name] == v.state_hash for v in result.views), "replay differs"
    finally:
        app.close()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(target)))
    rows, seconds = raw_scan(url, args.schema, 10_000)
    scan_rate = rows / seconds
    print(f"raw scan: {rows} rows (server-side cursor, 10,000 per fetch) in {seconds:.2f}s")
    print(
        f"RESULT events_per_s={rate:.0f} scan_rows_per_s={scan_rate:.0f} "
        f"ratio={rate / scan_rate:.3f}"
    )


if __name__ == "__main__":
    main()
