"""Result codes through the real write path: `LedgerWriter` on real PostgreSQL.

A transfer refused for a reason that depends on the ledger's state (`TRANSIENT_RESULTS`)
writes exactly one TransferRejected event (plus the batch's BatchCommitted) and moves no
money; any other rejection writes nothing. A retry answers the original outcome and writes
nothing; a fresh writer on the same log (a restart) sees exactly the same ledger.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

import orjson
import pytest

from ledger.limits import AMOUNT_MAX
from ledger.model import (
    NIL_ID,
    TRANSIENT_RESULTS,
    AccountFlags,
    CreateAccountResult,
    CreateTransferResult,
    NewAccount,
    NewTransfer,
    PendingStatus,
    Rejection,
    TransferFlags,
    TransferOutcome,
    replay,
)
from ledger.queries import read_facts, state_as_of
from ledger.store import LedgerApplication
from ledger.writer import LedgerWriter

R = CreateTransferResult
F = TransferFlags

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(hours=1)
TICK = timedelta(microseconds=1)

BANK = UUID(int=1)
ALICE = UUID(int=2)
"""debits_must_not_exceed_credits, funded with 1000."""
BOB = UUID(int=3)
CAPPED = UUID(int=4)
"""credits_must_not_exceed_debits, never debited (opened only by the tests that need it)."""
MISSING = UUID(int=999)
FUND = UUID(int=90)
ASSET = "AETH"
CODE = 10
FUNDS = 1000


class FakeClock:
    """A settable clock for the writer."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def tid(n: int) -> UUID:
    return UUID(int=1000 + n)


def xfer(
    n: int,
    debit: UUID,
    credit: UUID,
    amount: int,
    *,
    flags: TransferFlags = F.none,
    pending_id: UUID = NIL_ID,
    timeout_s: int = 0,
    code: int = CODE,
    references: tuple[tuple[str, str], ...] = (),
    effective_at: datetime | None = None,
) -> NewTransfer:
    return NewTransfer(
        id=tid(n),
        debit_account_id=debit,
        credit_account_id=credit,
        amount=amount,
        asset=ASSET,
        code=code,
        flags=flags,
        pending_id=pending_id,
        timeout_s=timeout_s,
        references=references,
        effective_at=effective_at,
    )


def post(n: int, pending: UUID, amount: int) -> NewTransfer:
    return xfer(n, NIL_ID, NIL_ID, amount, flags=F.post_pending_transfer, pending_id=pending)


def void(n: int, pending: UUID, amount: int = 0) -> NewTransfer:
    return xfer(n, NIL_ID, NIL_ID, amount, flags=F.void_pending_transfer, pending_id=pending)


def event_topics(app: LedgerApplication) -> list[str]:
    """The topic of every row of the events table, in log order."""
    notifications = app.recorder.select_notifications(start=1, limit=100_000)
    return [n.topic.rsplit(":", 1)[-1] for n in notifications]


def events_count(app: LedgerApplication) -> int:
    count = len(event_topics(app))
    assert (app.recorder.max_notification_id() or 0) == count
    return count


def balances(writer: LedgerWriter, account_id: UUID) -> tuple[int, int, int, int]:
    """(debits_pending, debits_posted, credits_pending, credits_posted)."""
    account = writer.account(account_id)
    assert account is not None
    return account.balances()


def view(writer: LedgerWriter) -> tuple[object, ...]:
    """(accounts, transfers, pending statuses, rejections, clock, trial balance)."""
    state = writer.state
    return (
        dict(state.accounts),
        dict(state.transfers),
        {i: state.pending_status(i) for i in state.transfers},
        dict(state.rejected),
        state.last_recorded_at,
        state.trial_balance(),
    )


def with_rejections(before: tuple[object, ...], *rejections: Rejection) -> tuple[object, ...]:
    """A view as `before`, plus recorded rejections (and the clock at the last one's time)."""
    accounts, transfers, statuses, rejected, _clock, trial_balance = before
    assert isinstance(rejected, dict)
    added = {r.transfer.id: r for r in rejections}
    return (
        accounts,
        transfers,
        statuses,
        {**rejected, **added},
        rejections[-1].recorded_at,
        trial_balance,
    )


def stored_state(app: LedgerApplication, stream: UUID) -> tuple[str, int, dict[str, object]]:
    """The one event stored on a stream: (topic's class name, version, JSON state)."""
    [stored] = app.recorder.select_events(stream)
    return stored.topic.rsplit(":", 1)[-1], stored.originator_version, orjson.loads(stored.state)


def set_up(writer: LedgerWriter) -> None:
    """BANK, ALICE (constrained, funded 1000) and BOB."""
    results = writer.open_accounts(
        [
            NewAccount(BANK, ASSET, 1),
            NewAccount(ALICE, ASSET, 2, AccountFlags.debits_must_not_exceed_credits),
            NewAccount(BOB, ASSET, 2),
        ]
    )
    assert results == [CreateAccountResult.ok] * 3
    [outcome] = writer.create_transfers([NewTransfer(FUND, BANK, ALICE, FUNDS, ASSET, CODE)])
    assert outcome.ok
    assert balances(writer, ALICE) == (0, 0, 0, FUNDS)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def ledger(ledger_app: LedgerApplication, clock: FakeClock) -> LedgerWriter:
    """A writer on a fake clock, with the accounts set up at T0; the clock then reads T1."""
    w = LedgerWriter(ledger_app, clock=clock)
    set_up(w)
    clock.now = T1
    return w


def restart(app: LedgerApplication, clock: FakeClock) -> LedgerWriter:
    return LedgerWriter(app, clock=clock)


# -- set-up and accepted transfers ---------------------------------------------------------


def test_opening_accounts_and_a_transfer_write_one_event_each_plus_one_batch_event(
    writer, ledger_app
):
    set_up(writer)
    assert event_topics(ledger_app) == [
        "AccountOpened",
        "AccountOpened",
        "AccountOpened",
        "BatchCommitted",
        "TransferCreated",
        "BatchCommitted",
    ]
    assert writer.batch_number == 2
    assert writer.position == 6


def test_an_accepted_transfer_is_recorded_at_the_clock_time_and_survives_a_restart(
    ledger, ledger_app, clock
):
    before = events_count(ledger_app)
    outcomes = ledger.create_transfers([xfer(1, ALICE, BOB, 400)])
    assert outcomes == [TransferOutcome(tid(1), R.ok, T1)]
    assert events_count(ledger_app) == before + 2
    assert event_topics(ledger_app)[-2:] == ["TransferCreated", "BatchCommitted"]
    assert balances(ledger, ALICE) == (0, 400, 0, FUNDS)
    assert balances(ledger, BOB) == (0, 0, 0, 400)

    again = restart(ledger_app, clock)
    assert view(again) == view(ledger)
    assert again.batch_number == ledger.batch_number == 3
    assert balances(again, ALICE) == (0, 400, 0, FUNDS)


# -- rejections: a state-dependent one is recorded, any other writes nothing ------------------


def test_an_overdraft_is_rejected_with_exceeds_credits_and_writes_only_its_rejection(
    ledger, ledger_app, clock
):
    before_events = events_count(ledger_app)
    before = view(ledger)
    outcomes = ledger.create_transfers([xfer(1, ALICE, BOB, FUNDS + 1)])
    assert outcomes == [TransferOutcome(tid(1), R.exceeds_credits, T1)]
    assert event_topics(ledger_app)[before_events:] == ["TransferRejected", "BatchCommitted"]
    rejection = Rejection(xfer(1, ALICE, BOB, FUNDS + 1), R.exceeds_credits, T1)
    assert view(ledger) == with_rejections(before, rejection)
    assert balances(ledger, ALICE) == (0, 0, 0, FUNDS)
    assert balances(ledger, BOB) == (0, 0, 0, 0)
    # Exactly the funds may be spent.
    assert ledger.create_transfers([xfer(2, ALICE, BOB, FUNDS)]) == [
        TransferOutcome(tid(2), R.ok, T1 + TICK)
    ]
    assert events_count(ledger_app) == before_events + 4
    assert view(restart(ledger_app, clock)) == view(ledger)


def test_a_transfer_to_the_same_account_is_rejected_with_accounts_must_be_different_and_writes_nothing(
    ledger, ledger_app
):
    before_events = events_count(ledger_app)
    before = view(ledger)
    outcomes = ledger.create_transfers([xfer(1, BOB, BOB, 5)])
    assert outcomes == [TransferOutcome(tid(1), R.accounts_must_be_different)]
    assert events_count(ledger_app) == before_events
    assert view(ledger) == before


def test_a_batch_mixing_accepted_and_rejected_transfers_writes_the_accepted_and_the_recorded_rejections(
    ledger, ledger_app, clock
):
    before_events = events_count(ledger_app)
    outcomes = ledger.create_transfers(
        [
            xfer(1, ALICE, BOB, 100),
            xfer(2, ALICE, BOB, 5000),
            xfer(3, BANK, MISSING, 1),
            xfer(4, BANK, BOB, 7),
            xfer(5, BOB, BOB, 1),
        ]
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.ok, T1),
        TransferOutcome(tid(2), R.exceeds_credits, T1 + TICK),
        TransferOutcome(tid(3), R.credit_account_not_found, T1 + 2 * TICK),
        TransferOutcome(tid(4), R.ok, T1 + 3 * TICK),
        TransferOutcome(tid(5), R.accounts_must_be_different),
    ]
    assert event_topics(ledger_app)[before_events:] == [
        "TransferCreated",
        "TransferRejected",
        "TransferRejected",
        "TransferCreated",
        "BatchCommitted",
    ]
    assert balances(ledger, ALICE) == (0, 100, 0, FUNDS)
    assert balances(ledger, BOB) == (0, 0, 0, 107)
    again = restart(ledger_app, clock)
    assert set(again.state.transfers) == {FUND, tid(1), tid(4)}
    assert again.state.rejected == {
        tid(2): Rejection(xfer(2, ALICE, BOB, 5000), R.exceeds_credits, T1 + TICK),
        tid(3): Rejection(xfer(3, BANK, MISSING, 1), R.credit_account_not_found, T1 + 2 * TICK),
    }
    assert view(again) == view(ledger)


def test_a_failed_linked_chain_applies_nothing_and_writes_only_the_failing_members_rejection(
    ledger, ledger_app, clock
):
    before_events = events_count(ledger_app)
    before = view(ledger)
    outcomes = ledger.create_transfers(
        [
            xfer(1, BANK, BOB, 100, flags=F.linked),
            xfer(2, BOB, ALICE, 50, flags=F.linked),
            xfer(3, ALICE, BOB, 5000),
        ]
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.linked_event_failed),
        TransferOutcome(tid(2), R.linked_event_failed),
        TransferOutcome(tid(3), R.exceeds_credits, T1),
    ]
    assert event_topics(ledger_app)[before_events:] == ["TransferRejected", "BatchCommitted"]
    assert stored_state(ledger_app, tid(3))[:2] == ("TransferRejected", 1)
    assert ledger_app.recorder.select_events(tid(1)) == []
    assert ledger_app.recorder.select_events(tid(2)) == []
    expected = with_rejections(before, Rejection(xfer(3, ALICE, BOB, 5000), R.exceeds_credits, T1))
    assert view(ledger) == expected
    assert view(restart(ledger_app, clock)) == expected


def test_a_chain_left_open_writes_nothing(ledger, ledger_app):
    before_events = events_count(ledger_app)
    outcomes = ledger.create_transfers(
        [xfer(1, BANK, BOB, 1, flags=F.linked), xfer(2, BANK, BOB, 1, flags=F.linked)]
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.linked_event_failed),
        TransferOutcome(tid(2), R.linked_event_chain_open),
    ]
    assert events_count(ledger_app) == before_events


def test_a_valid_linked_chain_is_written_in_one_batch(ledger, ledger_app, clock):
    before_events = events_count(ledger_app)
    outcomes = ledger.create_transfers(
        [xfer(1, ALICE, BOB, 100, flags=F.linked), xfer(2, BOB, BANK, 30)]
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.ok, T1),
        TransferOutcome(tid(2), R.ok, T1 + TICK),
    ]
    assert event_topics(ledger_app)[before_events:] == [
        "TransferCreated",
        "TransferCreated",
        "BatchCommitted",
    ]
    assert balances(restart(ledger_app, clock), BOB) == (0, 30, 0, 100)


def test_a_non_transient_rejection_writes_nothing_and_the_id_may_be_used_again(
    ledger, ledger_app, clock
):
    ledger.create_transfers([xfer(50, BANK, BOB, 10, flags=F.pending), post(51, tid(50), 10)])
    before_events = events_count(ledger_app)
    before = view(ledger)
    outcomes = ledger.create_transfers(
        [xfer(1, BOB, BOB, 5), xfer(2, BANK, BOB, 0), post(3, tid(50), 10)]
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.accounts_must_be_different),
        TransferOutcome(tid(2), R.amount_must_not_be_zero),
        TransferOutcome(tid(3), R.pending_transfer_already_posted),
    ]
    assert not any(o.result in TRANSIENT_RESULTS for o in outcomes)
    assert events_count(ledger_app) == before_events
    assert view(ledger) == before
    assert ledger.state.rejected == {}

    clock.now = T1 + timedelta(minutes=1)
    outcomes = ledger.create_transfers(
        [xfer(1, BANK, BOB, 5), xfer(2, BANK, BOB, 5), xfer(3, BANK, BOB, 5)]
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.ok, clock.now),
        TransferOutcome(tid(2), R.ok, clock.now + TICK),
        TransferOutcome(tid(3), R.ok, clock.now + 2 * TICK),
    ]
    assert view(restart(ledger_app, clock)) == view(ledger)


def test_a_failing_chain_records_only_the_failing_member(ledger, ledger_app, clock):
    chain = [
        xfer(1, BANK, BOB, 100, flags=F.linked),
        xfer(2, ALICE, BOB, 5000, flags=F.linked),
        xfer(3, BOB, BANK, 1),
    ]
    before_events = events_count(ledger_app)
    before = view(ledger)
    outcomes = ledger.create_transfers(chain)
    assert outcomes == [
        TransferOutcome(tid(1), R.linked_event_failed),
        TransferOutcome(tid(2), R.exceeds_credits, T1),
        TransferOutcome(tid(3), R.linked_event_failed),
    ]
    assert event_topics(ledger_app)[before_events:] == ["TransferRejected", "BatchCommitted"]
    assert stored_state(ledger_app, tid(2))[:2] == ("TransferRejected", 1)
    assert ledger_app.recorder.select_events(tid(1)) == []
    assert ledger_app.recorder.select_events(tid(3)) == []
    assert view(ledger) == with_rejections(before, Rejection(chain[1], R.exceeds_credits, T1))

    # Alice is funded; the chain sent again still fails on its spent member, writing nothing.
    clock.now = T1 + timedelta(minutes=1)
    ledger.create_transfers([xfer(4, BANK, ALICE, 5000)])
    funded_events = events_count(ledger_app)
    clock.now = T1 + timedelta(days=1)
    assert ledger.create_transfers(chain) == outcomes
    again = restart(ledger_app, clock)
    assert again.create_transfers(chain) == outcomes
    assert events_count(ledger_app) == funded_events
    # The other members' ids were not spent.
    assert again.create_transfers([xfer(1, BANK, BOB, 100), xfer(3, BOB, BANK, 1)]) == [
        TransferOutcome(tid(1), R.ok, clock.now),
        TransferOutcome(tid(3), R.ok, clock.now + TICK),
    ]
    assert again.races_lost == 0


# -- retries --------------------------------------------------------------------------------


def test_a_retry_returns_the_original_outcome_and_writes_nothing(ledger, ledger_app, clock):
    [original] = ledger.create_transfers([xfer(1, ALICE, BOB, 250)])
    assert original == TransferOutcome(tid(1), R.ok, T1)
    before_events = events_count(ledger_app)
    before = view(ledger)

    clock.now = T1 + timedelta(days=1)
    assert ledger.create_transfers([xfer(1, ALICE, BOB, 250)]) == [original]
    assert events_count(ledger_app) == before_events
    assert view(ledger) == before

    # After a restart the retry still answers the original, read back from the log.
    again = restart(ledger_app, clock)
    assert again.create_transfers([xfer(1, ALICE, BOB, 250)]) == [original]
    assert events_count(ledger_app) == before_events
    assert balances(again, ALICE) == (0, 250, 0, FUNDS)


def test_a_retry_with_a_different_amount_is_rejected_and_writes_nothing(ledger, ledger_app, clock):
    ledger.create_transfers([xfer(1, ALICE, BOB, 250)])
    before_events = events_count(ledger_app)
    assert ledger.create_transfers([xfer(1, ALICE, BOB, 251)]) == [
        TransferOutcome(tid(1), R.exists_with_different_amount)
    ]
    again = restart(ledger_app, clock)
    assert again.create_transfers([xfer(1, ALICE, BOB, 251)]) == [
        TransferOutcome(tid(1), R.exists_with_different_amount)
    ]
    assert events_count(ledger_app) == before_events


def test_a_retried_refused_transfer_gets_the_original_code_and_recorded_at_even_after_the_funds_arrived(
    ledger, ledger_app, clock
):
    command = xfer(1, ALICE, BOB, 1500)
    [original] = ledger.create_transfers([command])
    assert original == TransferOutcome(tid(1), R.exceeds_credits, T1)

    clock.now = T1 + timedelta(minutes=1)
    assert ledger.create_transfers([xfer(2, BANK, ALICE, FUNDS)]) == [
        TransferOutcome(tid(2), R.ok, clock.now)
    ]
    assert balances(ledger, ALICE) == (0, 0, 0, 2 * FUNDS)
    before_events = events_count(ledger_app)
    before = view(ledger)

    clock.now = T1 + timedelta(days=1)
    assert ledger.create_transfers([command]) == [original]
    assert events_count(ledger_app) == before_events
    assert view(ledger) == before

    # After a restart the retry still answers the original, read back from the log.
    again = restart(ledger_app, clock)
    assert again.create_transfers([command]) == [original]
    assert events_count(ledger_app) == before_events
    assert view(again) == before
    # The funds are there: the same transfer under a fresh id goes through.
    assert again.create_transfers([xfer(3, ALICE, BOB, 1500)]) == [
        TransferOutcome(tid(3), R.ok, clock.now)
    ]
    assert balances(again, ALICE) == (0, 1500, 0, 2 * FUNDS)
    assert again.races_lost == 0


def test_a_refused_transfer_retried_with_a_different_amount_gets_exists_with_different_amount(
    ledger, ledger_app, clock
):
    ledger.create_transfers([xfer(1, ALICE, BOB, 1500)])
    before_events = events_count(ledger_app)
    before = view(ledger)
    # 500 would fit, but the id is spent.
    assert ledger.create_transfers([xfer(1, ALICE, BOB, 500)]) == [
        TransferOutcome(tid(1), R.exists_with_different_amount)
    ]
    assert events_count(ledger_app) == before_events
    assert view(ledger) == before
    again = restart(ledger_app, clock)
    assert again.create_transfers([xfer(1, ALICE, BOB, 500)]) == [
        TransferOutcome(tid(1), R.exists_with_different_amount)
    ]
    assert events_count(ledger_app) == before_events
    assert view(again) == before
    assert balances(again, ALICE) == (0, 0, 0, FUNDS)


def test_reopening_an_account_is_ok_and_writes_nothing(ledger, ledger_app):
    before_events = events_count(ledger_app)
    results = ledger.open_accounts(
        [
            NewAccount(ALICE, ASSET, 2, AccountFlags.debits_must_not_exceed_credits),
            NewAccount(BOB, ASSET, 3),
        ]
    )
    assert results == [CreateAccountResult.ok, CreateAccountResult.exists_with_different_code]
    assert events_count(ledger_app) == before_events


# -- two-phase transfers with an injected clock ---------------------------------------------


def test_pending_post_in_part_and_void_through_the_writer(ledger, ledger_app, clock):
    outcomes = ledger.create_transfers(
        [
            xfer(1, ALICE, BOB, 600, flags=F.pending, timeout_s=60),
            xfer(2, ALICE, BOB, 300, flags=F.pending, timeout_s=60),
        ]
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.ok, T1),
        TransferOutcome(tid(2), R.ok, T1 + TICK),
    ]
    assert balances(ledger, ALICE) == (900, 0, 0, FUNDS)
    assert balances(ledger, BOB) == (0, 0, 900, 0)
    # The holds limit what may still be spent.
    before_events = events_count(ledger_app)
    assert ledger.create_transfers([xfer(3, ALICE, BOB, 101)]) == [
        TransferOutcome(tid(3), R.exceeds_credits, T1 + 2 * TICK)
    ]
    assert event_topics(ledger_app)[before_events:] == ["TransferRejected", "BatchCommitted"]
    assert balances(ledger, ALICE) == (900, 0, 0, FUNDS)
    assert balances(ledger, BOB) == (0, 0, 900, 0)

    clock.now = T1 + timedelta(seconds=30)
    before_events = events_count(ledger_app)
    outcomes = ledger.create_transfers([post(4, tid(1), 200), void(5, tid(2))])
    assert outcomes == [
        TransferOutcome(tid(4), R.ok, clock.now),
        TransferOutcome(tid(5), R.ok, clock.now + TICK),
    ]
    assert events_count(ledger_app) == before_events + 3
    assert balances(ledger, ALICE) == (0, 200, 0, FUNDS)
    assert balances(ledger, BOB) == (0, 0, 0, 200)
    assert ledger.state.transfers[tid(5)].amount == 300

    # A hold is never spent twice, and resolving it again writes nothing.
    before_events = events_count(ledger_app)
    outcomes = ledger.create_transfers([post(6, tid(1), 400), post(7, tid(2), 300)])
    assert outcomes == [
        TransferOutcome(tid(6), R.pending_transfer_already_posted),
        TransferOutcome(tid(7), R.pending_transfer_already_voided),
    ]
    assert events_count(ledger_app) == before_events

    # Past the timeout nothing expires: both holds were resolved.
    clock.now = T1 + timedelta(hours=1)
    assert ledger.expire_pending() == []
    assert events_count(ledger_app) == before_events

    again = restart(ledger_app, clock)
    assert view(again) == view(ledger)
    assert again.state.pending_status(tid(1)) is PendingStatus.posted
    assert again.state.pending_status(tid(2)) is PendingStatus.voided
    assert again.create_transfers([post(6, tid(1), 400)]) == [
        TransferOutcome(tid(6), R.pending_transfer_already_posted)
    ]


def test_expire_pending_writes_the_expiry_and_releases_the_hold(ledger, ledger_app, clock):
    [outcome] = ledger.create_transfers([xfer(1, ALICE, BOB, 700, flags=F.pending, timeout_s=60)])
    assert outcome == TransferOutcome(tid(1), R.ok, T1)

    clock.now = T1 + timedelta(seconds=59)
    before_events = events_count(ledger_app)
    assert ledger.expire_pending() == []
    assert events_count(ledger_app) == before_events
    assert balances(ledger, ALICE) == (700, 0, 0, FUNDS)

    clock.now = T1 + timedelta(seconds=60)
    assert ledger.expire_pending() == []
    assert event_topics(ledger_app)[before_events:] == ["PendingTransferExpired", "BatchCommitted"]
    assert ledger.state.pending_status(tid(1)) is PendingStatus.expired
    assert balances(ledger, ALICE) == (0, 0, 0, FUNDS)
    assert balances(ledger, BOB) == (0, 0, 0, 0)

    # Expiring again writes nothing.
    after_expiry = events_count(ledger_app)
    assert ledger.expire_pending() == []
    assert events_count(ledger_app) == after_expiry

    clock.now = T1 + timedelta(minutes=5)
    assert ledger.create_transfers([post(2, tid(1), 700)]) == [
        TransferOutcome(tid(2), R.pending_transfer_expired)
    ]
    assert events_count(ledger_app) == after_expiry

    again = restart(ledger_app, clock)
    assert view(again) == view(ledger)
    assert again.state.pending_status(tid(1)) is PendingStatus.expired
    assert again.create_transfers([void(3, tid(1))]) == [
        TransferOutcome(tid(3), R.pending_transfer_expired)
    ]
    # The released funds may be spent in full.
    assert again.create_transfers([xfer(4, ALICE, BOB, FUNDS)]) == [
        TransferOutcome(tid(4), R.ok, clock.now)
    ]
    assert again.races_lost == 0


def test_a_post_at_the_timeout_is_rejected_as_expired_and_only_the_expiry_is_written(
    ledger, ledger_app, clock
):
    ledger.create_transfers([xfer(1, ALICE, BOB, 700, flags=F.pending, timeout_s=60)])
    before_events = events_count(ledger_app)
    clock.now = T1 + timedelta(seconds=60)
    assert ledger.create_transfers([post(2, tid(1), 700)]) == [
        TransferOutcome(tid(2), R.pending_transfer_expired)
    ]
    assert event_topics(ledger_app)[before_events:] == ["PendingTransferExpired", "BatchCommitted"]
    assert balances(ledger, ALICE) == (0, 0, 0, FUNDS)
    assert tid(2) not in ledger.state.transfers
    assert view(restart(ledger_app, clock)) == view(ledger)


def test_a_hold_expires_after_a_restart_from_the_log(ledger, ledger_app, clock):
    ledger.create_transfers([xfer(1, ALICE, BOB, 700, flags=F.pending, timeout_s=60)])
    clock.now = T1 + timedelta(minutes=2)
    again = restart(ledger_app, clock)
    assert balances(again, ALICE) == (700, 0, 0, FUNDS)
    assert again.state.next_expiry_at() == T1 + timedelta(seconds=60)
    before_events = events_count(ledger_app)
    assert again.create_transfers([post(2, tid(1), 700)]) == [
        TransferOutcome(tid(2), R.pending_transfer_expired)
    ]
    assert event_topics(ledger_app)[before_events:] == ["PendingTransferExpired", "BatchCommitted"]
    assert balances(again, ALICE) == (0, 0, 0, FUNDS)
    # The first writer, behind the log, catches up to the same view.
    ledger.refresh()
    assert view(ledger) == view(again)


# -- recorded rejections in the log -----------------------------------------------------------


REFUSALS = [
    pytest.param(xfer(1, MISSING, BOB, 5), R.debit_account_not_found, id="debit_not_found"),
    pytest.param(xfer(1, BANK, MISSING, 5), R.credit_account_not_found, id="credit_not_found"),
    pytest.param(post(1, tid(50), 5), R.pending_transfer_not_found, id="pending_not_found"),
    pytest.param(xfer(1, BANK, BOB, AMOUNT_MAX), R.overflows_debits, id="overflows_debits"),
    pytest.param(xfer(1, BOB, ALICE, AMOUNT_MAX), R.overflows_credits, id="overflows_credits"),
    pytest.param(xfer(1, ALICE, BOB, FUNDS + 1), R.exceeds_credits, id="exceeds_credits"),
    pytest.param(xfer(1, BANK, CAPPED, 1), R.exceeds_debits, id="exceeds_debits"),
]


@pytest.mark.parametrize(("command", "code"), REFUSALS)
def test_a_recorded_rejection_survives_a_restart_and_a_replay_of_the_log(
    ledger, ledger_app, clock, command, code
):
    assert ledger.open_accounts(
        [NewAccount(CAPPED, ASSET, 3, AccountFlags.credits_must_not_exceed_debits)]
    ) == [CreateAccountResult.ok]
    before_events = events_count(ledger_app)
    before = view(ledger)
    [original] = ledger.create_transfers([command])
    at = T1 + TICK  # CAPPED was opened at T1
    assert original == TransferOutcome(tid(1), code, at)
    assert event_topics(ledger_app)[before_events:] == ["TransferRejected", "BatchCommitted"]
    rejection = Rejection(command, code, at)
    assert view(ledger) == with_rejections(before, rejection)
    after_events = events_count(ledger_app)

    assert replay(read_facts(ledger_app)).rejected == {tid(1): rejection}
    assert state_as_of(ledger_app).rejected == {tid(1): rejection}
    clock.now = T1 + timedelta(days=1)
    again = restart(ledger_app, clock)
    assert again.state.rejected == {tid(1): rejection}
    assert view(again) == view(ledger)
    assert again.create_transfers([command]) == [original]
    assert ledger.create_transfers([command]) == [original]
    assert events_count(ledger_app) == after_events
    assert again.races_lost == ledger.races_lost == 0


def test_the_stored_transfer_rejected_event_carries_the_result_and_the_command_fields(
    ledger, ledger_app
):
    full = xfer(
        1,
        ALICE,
        BOB,
        AMOUNT_MAX,
        flags=F.pending,
        timeout_s=60,
        references=(("lease", "L-1"), ("epoch", "7")),
        effective_at=T0,
    )
    minimal = xfer(2, BANK, MISSING, 5)
    resolving = post(3, tid(77), 5)
    outcomes = ledger.create_transfers([full, minimal, resolving])
    assert outcomes == [
        TransferOutcome(tid(1), R.exceeds_credits, T1),
        TransferOutcome(tid(2), R.credit_account_not_found, T1 + TICK),
        TransferOutcome(tid(3), R.pending_transfer_not_found, T1 + 2 * TICK),
    ]
    assert stored_state(ledger_app, tid(1)) == (
        "TransferRejected",
        1,
        {
            "timestamp": T1.isoformat(),
            "result": "exceeds_credits",
            "shard": 0,
            "debit_account_id": str(ALICE),
            "credit_account_id": str(BOB),
            "amount": str(AMOUNT_MAX),
            "asset": ASSET,
            "code": CODE,
            "flags": int(F.pending),
            "timeout_s": 60,
            "references": [["lease", "L-1"], ["epoch", "7"]],
            "effective_at": T0.isoformat(),
        },
    )
    # Fields equal to their defaults are left out.
    assert stored_state(ledger_app, tid(2)) == (
        "TransferRejected",
        1,
        {
            "timestamp": (T1 + TICK).isoformat(),
            "result": "credit_account_not_found",
            "shard": 0,
            "debit_account_id": str(BANK),
            "credit_account_id": str(MISSING),
            "amount": "5",
            "asset": ASSET,
            "code": CODE,
        },
    )
    assert stored_state(ledger_app, tid(3)) == (
        "TransferRejected",
        1,
        {
            "timestamp": (T1 + 2 * TICK).isoformat(),
            "result": "pending_transfer_not_found",
            "shard": 0,
            "debit_account_id": str(NIL_ID),
            "credit_account_id": str(NIL_ID),
            "amount": "5",
            "asset": ASSET,
            "code": CODE,
            "flags": int(F.post_pending_transfer),
            "pending_id": str(tid(77)),
        },
    )
    # Read back through the mapper, each event is the rejection that was decided.
    for command, outcome in zip([full, minimal, resolving], outcomes, strict=True):
        [stored] = ledger_app.recorder.select_events(command.id)
        event = ledger_app.mapper.to_domain_event(stored)
        assert event.to_fact() == Rejection(command, outcome.result, outcome.recorded_at)


# -- restart ----------------------------------------------------------------------------------


def test_a_restarted_writer_sees_identical_balances_after_a_mixed_history(
    ledger, ledger_app, clock
):
    ledger.create_transfers(
        [
            xfer(1, ALICE, BOB, 100),
            xfer(2, ALICE, BOB, 200, flags=F.pending, timeout_s=10),
            xfer(3, ALICE, BOB, 300, flags=F.pending),
            xfer(4, ALICE, BOB, 9999),
        ]
    )
    clock.now = T1 + timedelta(seconds=5)
    ledger.create_transfers([post(5, tid(3), 120), xfer(6, BANK, BOB, 1, flags=F.linked)])
    clock.now = T1 + timedelta(seconds=20)
    ledger.expire_pending()
    ledger.create_transfers([xfer(7, BOB, BANK, 50)])

    assert balances(ledger, ALICE) == (0, 220, 0, FUNDS)
    assert balances(ledger, BOB) == (0, 50, 0, 220)
    assert balances(ledger, BANK) == (0, FUNDS, 0, 50)
    assert ledger.state.trial_balance() == {ASSET: (FUNDS + 270, FUNDS + 270)}

    again = restart(ledger_app, clock)
    assert view(again) == view(ledger)
    assert again.batch_number == ledger.batch_number
    assert again.position == ledger.position == events_count(ledger_app)
    assert {i: again.state.pending_status(i) for i in (tid(2), tid(3))} == {
        tid(2): PendingStatus.expired,
        tid(3): PendingStatus.posted,
    }
    assert again.state.transfers[tid(1)].recorded_at == T1
    assert again.state.rejected == {
        tid(4): Rejection(xfer(4, ALICE, BOB, 9999), R.exceeds_credits, T1 + 3 * TICK)
    }
