"""`aether replay` on real PostgreSQL: a rebuild from zero equals the live views (state
hashes), `--as-of` a position or a time gives the state the live views had then, a live view
that differs is reported, progress is shown; and the replay path's speed-ups (the compiled
decoder, the folded heartbeats) equal what they replace."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import uuid4

import orjson
import psycopg
import pytest
from eventsourcing.persistence import Tracking
from eventsourcing.utils import get_topic
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql

from domain import lease as lease_rules
from domain.lease import CloseReason, HeartbeatRecorded, Lease, LeaseStatus, UsageCharged
from domain.orderbook import (
    Ask,
    AskCancelled,
    AskPlaced,
    Bid,
    BidPlaced,
    BidRemainderRefunded,
    OrderStatus,
)
from domain.verdicts import FailureKind
from ledger.events import TransferCreated, event_for
from ledger.market import service as m
from ledger.market.codec import CodecError, decode, encode
from ledger.market.store import MarketEvent, MarketplaceApplication
from ledger.model import NIL_ID, Account, AccountFlags, Transfer, TransferFlags
from ledger.money import units
from ledger.store import LedgerApplication
from ledger.writer import LedgerWriter
from projections import replay as replay_module
from projections.balances import BalancesProjectionError, LedgerDecoder, state_hash
from projections.balances import construct_view as balances_view
from projections.leases import FOLDED_FACTS, fold
from projections.orderbook import OrderBookRecorder
from projections.replay import (
    REPLAY_PAGE_SIZE_MAX,
    ReplayError,
    live_points,
    replay,
    stops_as_of,
)
from projections.view import MarketDecoder, MarketProjectionError, construct_view
from tests.market import RULES, Clock, Market, uid
from tests.schemas import fresh_schema
from workers import replay as replay_cli
from workers.cli import main
from workers.projector import Views, open_views


@pytest.fixture
def market(ledger_app: LedgerApplication, ledger_env: dict[str, str]) -> Iterator[Market]:
    """The real service, its ledger writer on the same clock (so both logs' times agree)."""
    clock = Clock()
    writer = LedgerWriter(ledger_app, clock=clock)
    app = MarketplaceApplication(ledger_app.app_recorder.datastore, env=ledger_env)
    service = m.Marketplace(app, writer, rules=RULES, clock=clock)
    yield Market(service, clock, writer, app)
    app.close()


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, database_url: str, schema: str) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("POSTGRES_SCHEMA", schema)


@pytest.fixture
def replay_schema(database_url: str) -> Iterator[str]:
    with fresh_schema(database_url) as name:
        yield name


def first_half(market: Market) -> list[uuid.UUID]:
    market.provider("p1", market.node("n1", gpu_count=2), bond=units(200))
    market.provider("p2", market.node("n2", gpu_count=4), bond=units(400))
    market.deposit("c1", units(100))
    market.deposit("c2", units(50))
    market.ask("a1", "p1", "n1", units(2), gpu_count=2)
    market.ask("a2", "p2", "n2", units(3), gpu_count=4)
    (l1,) = market.bid("b1", "c1", units(3), gpu_count=2).lease_ids
    market.bid("b2", "c2", units(2), gpu_count=3)  # rests
    (l2,) = market.bid("b3", "c2", units(4), gpu_count=1).lease_ids
    for name in ("k1", "k2", "k3"):
        market.checker(name)
    for _ in range(4):
        market.clock.advance(5)
        market.heartbeat(l1)
        market.heartbeat(l2)
    market.send(m.ChargeUsage(uuid4(), l1, units(1), "u1"))
    return [l1, l2]


def second_half(market: Market, leases: Sequence[uuid.UUID]) -> None:
    l1, l2 = leases
    window = market.window()
    for _ in range(3):
        market.clock.advance(5)
        market.heartbeat(l1)
        market.heartbeat(l2)
    market.send(m.ChargeUsage(uuid4(), l2, units(1) // 2, "u2"))
    market.clock.advance(900)
    for name in ("k1", "k2"):
        market.verdict(name, "n1", "p1", window, passed=False, kind=FailureKind.downtime)
    market.verdict("k3", "n1", "p1", window, passed=True)
    market.clock.advance(60)
    market.tick()
    market.send(m.CloseLease(uuid4(), l1, CloseReason.consumer, uid("c1")))
    market.send(m.CancelBid(uuid4(), uid("b2"), uid("c2")))


@dataclass(frozen=True)
class Midpoint:
    hashes: dict[str, str]
    positions: dict[str, int]
    at: datetime
    """A moment after the midpoint's last event and before the next one (the ledger's
    times are strictly increasing, a microsecond apart within a moment of the clock)."""


def run_story(market: Market, ledger_app: LedgerApplication) -> Midpoint:
    """Both halves, the live views caught up after each; the midpoint as the views saw it."""
    with open_views(ledger_app, market.app) as views:
        leases = first_half(market)
        views.catch_up()
        at = market.clock.now + timedelta(milliseconds=500)
        mid = Midpoint(views.state_hashes(), views.positions(), at)
        market.clock.advance(1)  # everything after the midpoint is recorded later
        second_half(market, leases)
        views.catch_up()
        assert views.state_hashes() != mid.hashes
    return mid


def replay_cli_run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["replay", *args])
    out, err = capsys.readouterr()
    return code, out, err


VIEW_NAMES = frozenset(Views.__dataclass_fields__)
"""Every view `aether replay` rebuilds (those `open_views` opens)."""


def table_rows(out: str) -> dict[str, list[str]]:
    names = VIEW_NAMES
    return {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.split()[:1] and line.split()[0] in names
    }


def schema_exists(database_url: str, name: str) -> bool:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (name,)
        ).fetchone()
    return bool(row and row[0])


# -- replay equals live -------------------------------------------------------------------------


def test_replay_equals_the_live_views_shows_progress_and_drops_its_schema(
    market: Market,
    ledger_app: LedgerApplication,
    cli_env: None,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_story(market, ledger_app)
    with open_views(ledger_app, market.app) as views:
        live = views.state_hashes()
        positions = views.positions()
        logs = {view_name: p.app.name for view_name, p in views.all().items()}
    name = "replay_" + uuid.uuid4().hex[:10]
    code, out, err = replay_cli_run(capsys, "--schema", name, "--page-size", "7")
    assert code == 0, out + err
    rows = table_rows(out)
    assert set(rows) == set(live)
    for view_name, row in rows.items():
        _, position, events, live_hash, replay_hash, equal = row
        assert int(position) == positions[view_name]
        # The story writes the marketplace's and the ledger's logs (not usage, settlement).
        filled = logs[view_name] in (market.app.name, ledger_app.name)
        assert int(events) >= 1 if filled else int(events) >= 0
        assert live_hash == replay_hash == live[view_name][:16]
        assert equal == "yes"
    assert "every view equals the live one" in out
    # Progress on stderr: events done / total, a rate and an ETA, ending at the total.
    lines = [line for line in err.splitlines() if line.startswith("replay [")]
    assert lines, err
    total = sum(int(rows[v][2]) for v in ("balances", "leases"))  # one view per log
    assert f"{total:,}/{total:,} events 100%" in lines[-1]
    assert "events/s" in lines[-1] and "ETA" in lines[-1]
    assert not schema_exists(database_url, name)


def test_replay_into_a_kept_schema_holds_views_equal_to_the_live_ones(
    market: Market, ledger_app: LedgerApplication, replay_schema: str
) -> None:
    run_story(market, ledger_app)
    with open_views(ledger_app, market.app) as views:
        points = live_points(views.all())
        result = replay(
            views.all(), replay_schema, stops={n: p.position for n, p in points.items()}
        )
        for v in result.views:
            assert v.state_hash == points[v.name].state_hash, v.name
            assert v.position == points[v.name].position
            if v.log in (market.app.name, ledger_app.name):  # the logs the story writes
                assert sum(v.tables.values()) > 0
        # The rebuilt views are real views: projections over the replay schema agree.
        rebuilt = Views(**{name: p.rebuild_into(replay_schema) for name, p in views.all().items()})
        try:
            assert rebuilt.state_hashes() == views.state_hashes()
        finally:
            for p in rebuilt.all().values():
                p.close()


# -- as of a position, as of a time ---------------------------------------------------------------


def test_as_of_a_position_and_a_time_give_the_state_the_live_views_had_then(
    market: Market,
    ledger_app: LedgerApplication,
    cli_env: None,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mid = run_story(market, ledger_app)
    market_position = mid.positions["leases"]
    ledger_position = mid.positions["balances"]
    assert all(
        mid.positions[v] == market_position for v in ("orderbook", "providers", "reputation")
    )

    with open_views(ledger_app, market.app) as views:
        projections = views.all()
        # Positions of two logs name the views of those two; a time cuts every log.
        named = {n for n, p in projections.items() if p.app.name in ("marketplace", "ledger")}
        by_position = stops_as_of(
            projections, positions={"marketplace": market_position, "ledger": ledger_position}
        )
        assert by_position == {n: p for n, p in mid.positions.items() if n in named}
        by_time = stops_as_of(projections, at=mid.at)
        assert by_time == mid.positions
        for stops in (by_position, by_time):
            with fresh_schema(database_url) as target:
                result = replay(projections, target, stops=stops)
            assert {v.name: v.state_hash for v in result.views} == {
                n: h for n, h in mid.hashes.items() if n in stops
            }

    for as_of, shown in (
        (f"marketplace:{market_position},ledger:{ledger_position}", named),
        (mid.at.isoformat(), set(mid.hashes)),
    ):
        code, out, _ = replay_cli_run(capsys, "--as-of", as_of, "--quiet")
        assert code == 0, out
        rows = table_rows(out)
        assert set(rows) == shown
        for view_name, row in rows.items():
            assert row[2] == str(mid.positions[view_name])
            assert row[4] == mid.hashes[view_name][:16]
        assert "state as of" in out

    # One log only: the other's views are left out.
    code, out, _ = replay_cli_run(capsys, "--as-of", f"ledger:{ledger_position}", "--quiet")
    assert code == 0
    assert set(table_rows(out)) == {"balances"}


def test_as_of_a_time_before_anything_gives_empty_views(
    market: Market, ledger_app: LedgerApplication, database_url: str
) -> None:
    mid = run_story(market, ledger_app)
    with open_views(ledger_app, market.app) as views, fresh_schema(database_url) as target:
        stops = stops_as_of(views.all(), at=mid.at - timedelta(days=1))
        assert set(stops.values()) == {0}
        result = replay(views.all(), target, stops=stops)
    assert all(sum(v.tables.values()) == 0 and v.events == 0 for v in result.views)


# -- a view that differs ------------------------------------------------------------------------


def test_a_tampered_live_view_is_reported_unequal(
    market: Market,
    ledger_app: LedgerApplication,
    cli_env: None,
    database_url: str,
    schema: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_story(market, ledger_app)
    with psycopg.connect(database_url, autocommit=True) as conn:
        changed = conn.execute(
            sql.SQL(
                "UPDATE {}.market_leases SET escrow_charged = escrow_charged + 1 "
                "WHERE lease_id = (SELECT lease_id FROM {}.market_leases ORDER BY lease_id LIMIT 1)"
            ).format(sql.Identifier(schema), sql.Identifier(schema))
        ).rowcount
    assert changed == 1
    code, out, _ = replay_cli_run(capsys, "--quiet")
    assert code == 1
    rows = table_rows(out)
    assert rows["leases"][-1] == "NO"
    assert rows["leases"][3] != rows["leases"][4]
    assert all(rows[v][-1] == "yes" for v in rows if v != "leases")
    assert "DIFFERENT: leases" in out


def test_a_live_view_behind_the_log_is_compared_at_its_own_position(
    market: Market, ledger_app: LedgerApplication, replay_schema: str
) -> None:
    mid = run_story(market, ledger_app)
    del mid
    market.clock.advance(5)
    market.send(m.ConfirmDeposit(uuid4(), uuid4(), uid("c3"), units(5), "0xfeed:7"))
    with open_views(ledger_app, market.app) as views:
        points = live_points(views.all())
        head = market.app.recorder.max_notification_id()
        assert points["leases"].position < head
        result = replay(
            views.all(), replay_schema, stops={n: p.position for n, p in points.items()}
        )
    assert all(v.state_hash == points[v.name].state_hash for v in result.views)


# -- bad requests ------------------------------------------------------------------------------


def test_bad_requests_are_refused_with_a_clear_message(
    market: Market,
    ledger_app: LedgerApplication,
    cli_env: None,
    database_url: str,
    schema: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_story(market, ledger_app)
    for bad in ("1200", "yesterday", "2026-12-01T12:00:00", "marketplace:1,marketplace:2"):
        with pytest.raises(SystemExit) as exit_:
            main(["replay", "--as-of", bad])
        assert exit_.value.code == 2
        assert "--as-of" in capsys.readouterr().err
    code, _, err = replay_cli_run(capsys, "--as-of", "marketplace:999999", "--quiet")
    assert code == 2 and "not in the marketplace log" in err
    code, _, err = replay_cli_run(capsys, "--as-of", "chain:5", "--quiet")
    assert code == 2 and "no log named chain" in err
    code, _, err = replay_cli_run(capsys, "--schema", schema, "--quiet")
    assert code == 2 and "not be the live one" in err
    with fresh_schema(database_url) as taken:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE TABLE {}.t (x int)").format(sql.Identifier(taken)))
        code, _, err = replay_cli_run(capsys, "--schema", taken, "--quiet")
        assert code == 2 and "holds 1 tables" in err
        assert schema_exists(database_url, taken)  # not ours: left as it was
    with pytest.raises(SystemExit):
        main(["replay", "--schema", "Bad-Name"])
    with pytest.raises(SystemExit):
        main(["replay", "--page-size", "0"])
    with open_views(ledger_app, market.app) as views, pytest.raises(ReplayError):
        replay(views.all(), "unused", page_size=REPLAY_PAGE_SIZE_MAX + 1)
    assert replay_cli.PAGE_SIZE_MAX == REPLAY_PAGE_SIZE_MAX


def test_no_logs_in_the_schema_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    replay_schema: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("POSTGRES_SCHEMA", replay_schema)
    code, _, err = replay_cli_run(capsys, "--quiet")
    assert code == 2 and "nothing to replay" in err


# -- the speed-ups equal what they replace ----------------------------------------------------------


def test_the_compiled_decoder_equals_the_codec_on_every_event_of_a_market(
    market: Market, ledger_app: LedgerApplication
) -> None:
    run_story(market, ledger_app)
    decoder = MarketDecoder()
    notifications = market.app.recorder.select_notifications(start=1, limit=10_000)
    assert len(notifications) > 50
    for n in notifications:
        expected = market.app.market_mapper.to_domain_event(n)
        found = decoder.event(n.originator_id, n.originator_version, n.topic, n.state)
        assert found == expected
        assert str(n.originator_id) == str(found.originator_id)
    heartbeat = next(n for n in notifications if n.topic.endswith(":HeartbeatRecorded"))
    import orjson

    state = orjson.loads(heartbeat.state)
    for broken in (
        {**state["fact"], "extra": 1},
        {k: v for k, v in state["fact"].items() if k != "sequence"},
        {**state["fact"], "sequence": "x"},
        {**state["fact"], "lease_id": 5},
        {**state["fact"], "at": "2026-12-01T12:00:00"},
    ):
        raw = orjson.dumps({**state, "fact": broken})
        with pytest.raises(CodecError):
            decoder.event(heartbeat.originator_id, 1, heartbeat.topic, raw)
        with pytest.raises(CodecError):
            market.app.market_mapper.to_domain_event(
                type(heartbeat)(
                    originator_id=heartbeat.originator_id,
                    originator_version=1,
                    topic=heartbeat.topic,
                    state=raw,
                    id=heartbeat.id,
                )
            )
    with pytest.raises(CodecError):
        decoder.event(heartbeat.originator_id, 1, "domain.lease:NoSuchFact", heartbeat.state)


T0 = datetime.fromisoformat("2026-12-01T12:00:00+00:00")


def a_lease() -> Lease:
    return Lease(
        id=uid("lease"),
        ask_id=uid("ask"),
        bid_id=uid("bid"),
        provider_id=uid("p"),
        node_id=uid("node"),
        consumer_id=uid("c"),
        gpu_model="H100",
        gpu_count=1,
        price_per_gpu_hour=units(2),
        escrow_held=units(100),
        escrow_charged=0,
        escrow_released=0,
        opened_at=T0,
        ends_at=T0 + timedelta(days=1),
        status=LeaseStatus.open,
        updated_at=T0,
        alive_at=T0,
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 60), st.integers(-3, 3), st.booleans(), st.booleans()),
        min_size=1,
        max_size=30,
    )
)
def test_folded_heartbeats_and_charges_equal_the_domains_apply_one_by_one(
    steps: list[tuple[int, int, bool, bool]],
) -> None:
    """Heartbeats (some late, some early, some after a detected gap) and usage charges (up
    to the escrow's exhaustion and a pause) decided by the domain: folding each run of them
    gives the state `apply` gives one fact at a time."""
    rules = lease_rules.LeaseRules(heartbeat_interval_s=5, heartbeat_timeout_s=15)
    lease, now, sequence = a_lease(), T0, 0
    facts: list[Any] = []
    for wait_s, skew_s, detect, charge in steps:
        now += timedelta(seconds=wait_s)
        if detect:
            _, found = lease_rules.detect_downtime(lease, now, rules)
        elif charge:
            _, found = lease_rules.charge_usage(lease, units(7), "u", now, rules)
        else:
            sequence += 1
            at = max(now + timedelta(seconds=skew_s), lease.last_heartbeat_at or T0)
            result, found = lease_rules.record_heartbeat(
                lease, lease.node_id, sequence, at, now, rules
            )
            assert result is lease_rules.RecordHeartbeatResult.ok, result
        for f in found:
            lease = lease_rules.apply(lease, f)
            facts.append(f)
    folded, run = a_lease(), []
    for position, f in enumerate(facts, 1):
        if isinstance(f, FOLDED_FACTS):
            run.append((position, f))
            continue
        if run:
            folded, run = fold(folded, run), []
        folded = lease_rules.apply(folded, f)
    if run:
        folded = fold(folded, run)
    assert folded == lease


def test_a_fact_that_does_not_apply_is_refused_by_the_fold() -> None:
    lease = a_lease()
    ok = HeartbeatRecorded(lease.id, lease.node_id, 1, T0, T0, 0)
    later = T0 + timedelta(seconds=1)
    for bad in (
        HeartbeatRecorded(lease.id, lease.node_id, 1, T0, T0, 0),  # sequence not after
        HeartbeatRecorded(lease.id, uid("other node"), 2, T0, T0, 0),
        HeartbeatRecorded(lease.id, lease.node_id, 2, T0, T0, 7),  # no gap was open
        UsageCharged(lease.id, "u", units(1), units(1) - 1, later),  # escrow was enough
        UsageCharged(lease.id, "u", units(200), units(200), later),  # more than held
        UsageCharged(lease.id, "u", units(1), units(1), later, units(2)),  # withheld > amount
        UsageCharged(lease.id, "u", units(1), units(1), T0 - timedelta(seconds=1)),
    ):
        with pytest.raises(MarketProjectionError):
            fold(lease, [(1, ok), (2, bad)])
        with pytest.raises(MarketProjectionError):
            fold(lease, [(1, ok), (2, bad), (3, ok)])


def test_the_fast_ledger_decoder_equals_the_ledger_mapper_on_every_event_of_a_run(
    market: Market, ledger_app: LedgerApplication
) -> None:
    run_story(market, ledger_app)
    mapper = ledger_app.mapper
    decoder = LedgerDecoder(mapper)
    notifications = ledger_app.recorder.select_notifications(start=1, limit=10_000)
    transfers = [n for n in notifications if n.topic == get_topic(TransferCreated)]
    assert len(transfers) > 20
    for n in notifications:
        expected = mapper.to_domain_event(n)
        found = decoder.event(n.id, n.originator_id, n.originator_version, n.topic, n.state)
        assert type(found) is type(expected)
        assert vars(found) == vars(expected)
    # Off the plain path (a later class version's state, a field that does not fit): the
    # mapper's own answer, its error included.
    sample = transfers[0]
    state = orjson.loads(sample.state)
    for changed in (
        {**state, "class_version": 1},
        {**state, "amount": "x"},
        {**state, "debit_account_id": 5},
    ):
        raw = orjson.dumps(changed)
        stored = type(sample)(
            id=sample.id,
            originator_id=sample.originator_id,
            originator_version=1,
            topic=sample.topic,
            state=raw,
        )
        try:
            expected = mapper.to_domain_event(stored)
        except Exception as e:
            with pytest.raises(type(e)):
                decoder.event(sample.id, sample.originator_id, 1, sample.topic, raw)
        else:
            found = decoder.event(sample.id, sample.originator_id, 1, sample.topic, raw)
            assert vars(found) == vars(expected)


def test_the_order_book_refuses_a_fact_that_does_not_fit_and_writes_nothing(
    ledger_app: LedgerApplication, database_url: str
) -> None:
    at = T0
    ask = Ask(uid("ask"), uid("p"), uid("node"), "H100", 4, units(2), at + timedelta(days=1))
    bid = Bid(uid("bid"), uid("c"), "H100", 1, units(3), 3_600, units(3))

    def page(*facts: Any) -> list[tuple[int, MarketEvent]]:
        return [(0, MarketEvent(uid("stream"), 1, at, f)) for f in facts]

    with fresh_schema(database_url) as target:
        recorder = construct_view(OrderBookRecorder, ledger_app.env, schema=target)
        try:
            recorder.apply_page(page(AskPlaced(ask, 1, at)), Tracking("marketplace", 1), after=0)
            before = recorder.state_hash()
            other = Ask(uid("ask 2"), uid("p"), uid("node"), "H100", 1, units(2), ask.expires_at)
            for bad in (
                [AskPlaced(other, 3, at)],  # not the book's next sequence
                [AskPlaced(ask, 2, at)],  # placed twice
                [AskCancelled(uid("no such ask"), 1, at)],
                [AskCancelled(ask.id, 3, at)],  # not all it has left
                [BidRemainderRefunded(ask.id, 0, at)],  # an ask, not a bid
                [BidPlaced(bid, 2, at), BidRemainderRefunded(bid.id, units(3), at)],  # resting
            ):
                # A good fact first: the refusal takes the whole page back.
                good = AskPlaced(other, 2, at)
                with pytest.raises(MarketProjectionError):
                    recorder.apply_page(page(good, *bad), Tracking("marketplace", 2), after=1)
                assert recorder.state_hash() == before
                assert recorder.max_tracking_id("marketplace") == 1
            recorder.apply_page(
                page(AskCancelled(ask.id, 4, at + timedelta(seconds=1))),
                Tracking("marketplace", 2),
                after=1,
            )
            order = recorder.order(ask.id)
            assert order is not None and order.status is OrderStatus.cancelled
            assert order.gpu_count_remaining == 0
            assert recorder.depth("H100").asks == ()
            book = recorder.book("H100")
            assert book is not None and book.sequence == 1
            assert book.latest_at == at + timedelta(seconds=1) and book.updated_position == 0
        finally:
            recorder.datastore.close()


def test_the_compiled_decoder_fills_a_defaulted_field_a_state_lacks_as_the_codec_does() -> None:
    charged = UsageCharged(uid("lease"), "usage:1", units(1), units(1), T0, units(1) // 2)
    state = {"recorded_at": T0.isoformat(), "fact": encode(charged)}
    del state["fact"]["withheld"]  # written before the field was added
    topic = get_topic(UsageCharged)
    decoder = MarketDecoder()
    for fact_state in (state["fact"], {**state["fact"], "withheld": 7}):
        raw = orjson.dumps({**state, "fact": fact_state})
        found = decoder.event(uid("lease"), 3, topic, raw)
        assert found.fact == decode(UsageCharged, dict(fact_state))
        assert found == MarketEvent(uid("lease"), 3, T0, found.fact)
    assert decoder.event(uid("lease"), 3, topic, orjson.dumps(state)).fact.withheld == 0
    with pytest.raises(CodecError):  # an unknown field beside a missing defaulted one
        decoder.event(
            uid("lease"), 3, topic, orjson.dumps({**state, "fact": {**state["fact"], "x": 1}})
        )


def test_balances_refuse_a_transfer_of_an_account_never_opened_and_write_nothing(
    ledger_app: LedgerApplication, database_url: str
) -> None:
    opened = Account(uid("a"), "AETH", 1, AccountFlags(0), 0, T0)
    other = Account(uid("b"), "AETH", 1, AccountFlags(0), 0, T0)

    def transfer(name: str, credit: Account) -> Transfer:
        return Transfer(
            uid(name), opened.id, credit.id, 5, "AETH", 1, TransferFlags(0), NIL_ID, 0, (), T0, T0
        )

    with fresh_schema(database_url) as target:
        recorder = balances_view(ledger_app.env, schema=target)
        try:
            recorder.apply_page(
                [(1, event_for(opened)), (2, event_for(other))],
                Tracking("ledger", 2),
                after=0,
            )
            recorder.apply_page(
                [(3, event_for(transfer("t1", other)))], Tracking("ledger", 3), after=2
            )
            before = state_hash(recorder.rows())
            never = Account(uid("never opened"), "AETH", 1, AccountFlags(0), 0, T0)
            with pytest.raises(BalancesProjectionError, match="never opened"):
                recorder.apply_page(
                    [(4, event_for(transfer("t2", other))), (5, event_for(transfer("t3", never)))],
                    Tracking("ledger", 5),
                    after=3,
                )
            assert state_hash(recorder.rows()) == before
            assert recorder.max_tracking_id("ledger") == 3
            rows = {r.account_id: r.balances() for r in recorder.rows()}
            assert rows == {opened.id: (0, 5, 0, 0), other.id: (0, 0, 0, 5)}
        finally:
            recorder.datastore.close()


def test_a_replay_with_a_worker_process_equals_one_without(
    market: Market, ledger_app: LedgerApplication, database_url: str
) -> None:
    run_story(market, ledger_app)
    with open_views(ledger_app, market.app) as views:
        points = live_points(views.all())
        stops = {n: p.position for n, p in points.items()}
        found = []
        for parallel in (True, False):
            with fresh_schema(database_url) as target:
                result = replay(views.all(), target, stops=stops, page_size=5, parallel=parallel)
            found.append({v.name: (v.position, v.applied, v.state_hash) for v in result.views})
            assert any(k.startswith("worker: ") for k in result.timings) is parallel
    assert found[0] == found[1]
    assert {n: h for n, (_, _, h) in found[0].items()} == {
        n: p.state_hash for n, p in points.items()
    }


def test_a_failure_in_the_worker_process_fails_the_replay_with_its_error(
    market: Market,
    ledger_app: LedgerApplication,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_story(market, ledger_app)

    def fails(logs: Sequence[Any], page_size: int) -> dict[str, Any]:
        raise MarketProjectionError(f"refused in the worker: {[log.name for log in logs]}")

    monkeypatch.setattr(replay_module, "_replay_in_worker", fails)
    with (
        open_views(ledger_app, market.app) as views,
        fresh_schema(database_url) as target,
        pytest.raises(MarketProjectionError, match="refused in the worker: "),
    ):
        replay(views.all(), target)
