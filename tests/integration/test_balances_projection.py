"""The account balances view, kept from the ledger's log in real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from eventsourcing.persistence import IntegrityError, Tracking

from ledger.events import PendingTransferExpired, TransferRejected
from ledger.model import AccountFlags, CreateTransferResult, NewAccount, NewTransfer, TransferFlags
from ledger.queries import read_events
from ledger.store import LedgerApplication
from ledger.writer import LedgerWriter
from projections.balances import BalancesProjection, PageAlreadyTrackedError
from tests.schemas import fresh_schema

ASSET = "AETH"


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def other_schema(database_url: str) -> Iterator[str]:
    """A second fresh schema, for a view built from zero."""
    with fresh_schema(database_url) as name:
        yield name


class Story:
    """A realistic sequence through the real writer, in steps."""

    def __init__(self, app: LedgerApplication) -> None:
        self.clock = FakeClock()
        self.writer = LedgerWriter(app, clock=self.clock)
        self.bank, self.alice, self.bob, self.whale = (uuid.uuid4() for _ in range(4))

    def tick(self, seconds: int = 1) -> None:
        self.clock.now += timedelta(seconds=seconds)

    def transfer(self, *transfers: NewTransfer) -> list[CreateTransferResult]:
        self.tick()
        return [o.result for o in self.writer.create_transfers(list(transfers))]

    def opens_and_funds(self) -> None:
        limited = AccountFlags.debits_must_not_exceed_credits
        self.writer.open_accounts(
            [
                NewAccount(self.bank, ASSET, 1),
                NewAccount(self.alice, ASSET, 2, limited),
                NewAccount(self.bob, ASSET, 2, limited),
                NewAccount(self.whale, ASSET, 3),
            ]
        )
        ok = CreateTransferResult.ok
        assert self.transfer(
            NewTransfer(uuid.uuid4(), self.bank, self.alice, 1_000, ASSET, 1),
            NewTransfer(uuid.uuid4(), self.bank, self.bob, 500, ASSET, 1),
        ) == [ok, ok]

    def pending_post_void_expire_reject(self) -> None:
        ok = CreateTransferResult.ok
        held, voided, expiring = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        pending = TransferFlags.pending
        assert self.transfer(
            NewTransfer(held, self.alice, self.bob, 300, ASSET, 4, flags=pending),
            NewTransfer(voided, self.alice, self.bob, 200, ASSET, 4, flags=pending),
            NewTransfer(expiring, self.bob, self.alice, 100, ASSET, 4, flags=pending, timeout_s=60),
        ) == [ok, ok, ok]
        assert self.transfer(
            NewTransfer(
                uuid.uuid4(),
                self.alice,
                self.bob,
                250,
                ASSET,
                4,
                flags=TransferFlags.post_pending_transfer,
                pending_id=held,
            ),
            NewTransfer(
                uuid.uuid4(),
                self.alice,
                self.bob,
                0,
                ASSET,
                4,
                flags=TransferFlags.void_pending_transfer,
                pending_id=voided,
            ),
        ) == [ok, ok]
        self.tick(61)
        assert [o.result for o in self.writer.expire_pending()] == []
        assert self.transfer(NewTransfer(uuid.uuid4(), self.bob, self.alice, 10_000, ASSET, 5)) == [
            CreateTransferResult.exceeds_credits
        ]

    def more(self) -> None:
        ok = CreateTransferResult.ok
        big = 2**100 + 7
        pending = uuid.uuid4()
        assert self.transfer(
            NewTransfer(uuid.uuid4(), self.bank, self.whale, big, ASSET, 1),
            NewTransfer(
                pending, self.whale, self.bank, 2**70 + 3, ASSET, 6, flags=TransferFlags.pending
            ),
            NewTransfer(uuid.uuid4(), self.alice, self.bob, 50, ASSET, 4),
        ) == [ok, ok, ok]
        assert self.transfer(
            NewTransfer(
                uuid.uuid4(),
                self.whale,
                self.bank,
                2**70,
                ASSET,
                6,
                flags=TransferFlags.post_pending_transfer,
                pending_id=pending,
            )
        ) == [ok]


def assert_view_equals_writer(projection: BalancesProjection, writer: LedgerWriter) -> None:
    rows = {r.account_id: r for r in projection.rows()}
    accounts = writer.state.accounts
    assert rows.keys() == accounts.keys()
    for account_id, account in accounts.items():
        row = rows[account_id]
        assert row.balances() == account.balances(), account_id
        assert (row.asset, row.code, row.flags) == (account.asset, account.code, int(account.flags))


def test_the_view_equals_the_writers_balances_account_by_account(
    ledger_app: LedgerApplication,
) -> None:
    story = Story(ledger_app)
    story.opens_and_funds()
    story.pending_post_void_expire_reject()
    story.more()
    projection = BalancesProjection(ledger_app, page_size=3)

    assert projection.catch_up() == ledger_app.recorder.max_notification_id()

    assert_view_equals_writer(projection, story.writer)
    assert projection.view.holds() == []
    assert projection.rows()[0].updated_position > 0


def test_the_expiry_and_the_rejection_are_applied_as_the_writer_applied_them(
    ledger_app: LedgerApplication,
) -> None:
    story = Story(ledger_app)
    story.opens_and_funds()
    story.pending_post_void_expire_reject()
    kinds = {type(e) for _, e in read_events(ledger_app)}
    assert {PendingTransferExpired, TransferRejected} <= kinds
    projection = BalancesProjection(ledger_app)
    projection.catch_up()

    rows = {r.account_id: r for r in projection.rows()}
    # alice: 1000 in, 250 posted out; the void and bob's expired hold released.
    assert rows[story.alice].balances() == (0, 250, 0, 1_000)
    assert rows[story.bob].balances() == (0, 0, 0, 750)
    assert_view_equals_writer(projection, story.writer)


def test_catching_up_twice_applies_nothing_the_second_time(
    ledger_app: LedgerApplication,
) -> None:
    story = Story(ledger_app)
    story.opens_and_funds()
    story.pending_post_void_expire_reject()
    projection = BalancesProjection(ledger_app, page_size=2)

    assert projection.catch_up() > 0
    before = projection.state_hash()
    assert projection.catch_up() == 0
    assert projection.state_hash() == before


def test_a_page_already_tracked_is_refused_and_changes_nothing(
    ledger_app: LedgerApplication,
) -> None:
    story = Story(ledger_app)
    story.opens_and_funds()
    projection = BalancesProjection(ledger_app)
    projection.catch_up()
    before = projection.state_hash()
    position = projection.position()
    events = [
        (n.id, ledger_app.mapper.to_domain_event(n))
        for n in ledger_app.recorder.select_notifications(start=1, limit=100)
    ]

    with pytest.raises(IntegrityError):
        projection.view.apply_page(events, Tracking(ledger_app.name, position))

    assert projection.state_hash() == before
    assert projection.position() == position


def test_a_restarted_projection_gives_the_same_hash_as_one_built_from_zero(
    ledger_app: LedgerApplication, other_schema: str
) -> None:
    story = Story(ledger_app)
    story.opens_and_funds()
    story.pending_post_void_expire_reject()
    first = BalancesProjection(ledger_app, page_size=4)
    first.catch_up(pages_max=2)
    assert 0 < first.position() < ledger_app.recorder.max_notification_id()
    first.catch_up()
    story.more()

    restarted = BalancesProjection(ledger_app, page_size=4)
    assert restarted.position() == first.position()
    assert restarted.catch_up() > 0
    rebuilt = restarted.rebuild_into(other_schema)
    try:
        assert rebuilt.view.datastore.schema == other_schema
        assert rebuilt.position() == restarted.position()
        assert rebuilt.state_hash() == restarted.state_hash()
        assert rebuilt.rows() == restarted.rows()
    finally:
        rebuilt.close()
    assert_view_equals_writer(restarted, story.writer)


def test_amounts_above_2_to_the_64_survive_exactly(ledger_app: LedgerApplication) -> None:
    story = Story(ledger_app)
    story.opens_and_funds()
    story.more()
    projection = BalancesProjection(ledger_app)
    projection.catch_up()

    rows = {r.account_id: r for r in projection.rows()}
    assert rows[story.whale].credits_posted == 2**100 + 7
    assert rows[story.whale].debits_posted == 2**70
    assert rows[story.bank].debits_posted == 2**100 + 7 + 1_500
    assert rows[story.bank].credits_posted == 2**70
    assert_view_equals_writer(projection, story.writer)


def test_the_views_tracking_position_is_the_last_notification_id(
    ledger_app: LedgerApplication,
) -> None:
    story = Story(ledger_app)
    projection = BalancesProjection(ledger_app)
    assert projection.position() == 0
    story.opens_and_funds()
    story.pending_post_void_expire_reject()
    projection.catch_up()

    last = ledger_app.recorder.max_notification_id()
    assert last is not None
    assert projection.position() == last
    assert projection.view.max_tracking_id(ledger_app.name) == last


def test_an_overlapping_page_read_by_a_second_projection_is_refused_not_applied_twice(
    ledger_app: LedgerApplication,
) -> None:
    story = Story(ledger_app)
    story.opens_and_funds()
    story.pending_post_void_expire_reject()
    ahead = BalancesProjection(ledger_app, page_size=3)
    ahead.catch_up(pages_max=1)
    behind_position = 0
    # A second projection read the log from 0 and tracks a page beyond what `ahead` tracked:
    # the library's upsert alone would take it and apply the first three events twice.
    notifications = ledger_app.recorder.select_notifications(start=None, limit=6)
    page = [(n.id, ledger_app.mapper.to_domain_event(n)) for n in notifications]
    before = ahead.state_hash()
    with pytest.raises(PageAlreadyTrackedError):
        ahead.view.apply_page(
            page, Tracking(ledger_app.name, notifications[-1].id), after=behind_position
        )
    assert ahead.state_hash() == before


def test_projections_of_one_view_racing_in_threads_apply_every_event_once(
    ledger_app: LedgerApplication, other_schema: str
) -> None:
    story = Story(ledger_app)
    story.opens_and_funds()
    story.pending_post_void_expire_reject()
    story.more()
    racers = [BalancesProjection(ledger_app, page_size=size) for size in (2, 3, 5)]
    with ThreadPoolExecutor(len(racers)) as pool:
        list(pool.map(lambda p: p.catch_up(), racers))
    alone = BalancesProjection(ledger_app).rebuild_into(other_schema)
    try:
        assert racers[0].state_hash() == alone.state_hash()
    finally:
        alone.close()
    assert_view_equals_writer(racers[0], story.writer)
