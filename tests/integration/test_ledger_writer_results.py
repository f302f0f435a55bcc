"""Result codes through the real write path: `LedgerWriter` on real PostgreSQL.

A rejected transfer writes nothing; a retry answers the original outcome and writes nothing;
a fresh writer on the same log (a restart) sees exactly the same ledger.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest

from ledger.model import (
    NIL_ID,
    AccountFlags,
    CreateAccountResult,
    CreateTransferResult,
    NewAccount,
    NewTransfer,
    PendingStatus,
    TransferFlags,
    TransferOutcome,
)
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
    state = writer.state
    return (
        dict(state.accounts),
        dict(state.transfers),
        {i: state.pending_status(i) for i in state.transfers},
        state.last_recorded_at,
        state.trial_balance(),
    )


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
    [outcome] = writer.create_transfers(
        [NewTransfer(FUND, BANK, ALICE, FUNDS, ASSET, CODE)]
    )
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


def test_opening_accounts_and_a_transfer_write_one_event_each_plus_one_batch_event(writer, ledger_app):
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


# -- rejections write nothing ---------------------------------------------------------------


def test_an_overdraft_is_rejected_with_exceeds_credits_and_writes_no_events(
    ledger, ledger_app, clock
):
    before_events = events_count(ledger_app)
    before = view(ledger)
    outcomes = ledger.create_transfers([xfer(1, ALICE, BOB, FUNDS + 1)])
    assert outcomes == [TransferOutcome(tid(1), R.exceeds_credits)]
    assert events_count(ledger_app) == before_events
    assert view(ledger) == before
    assert balances(ledger, ALICE) == (0, 0, 0, FUNDS)
    # Exactly the funds may be spent.
    assert ledger.create_transfers([xfer(2, ALICE, BOB, FUNDS)]) == [
        TransferOutcome(tid(2), R.ok, T1)
    ]
    assert events_count(ledger_app) == before_events + 2
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


def test_a_batch_mixing_accepted_and_rejected_transfers_writes_only_the_accepted(
    ledger, ledger_app, clock
):
    before_events = events_count(ledger_app)
    outcomes = ledger.create_transfers(
        [
            xfer(1, ALICE, BOB, 100),
            xfer(2, ALICE, BOB, 5000),
            xfer(3, BANK, UUID(int=999), 1),
            xfer(4, BANK, BOB, 7),
        ]
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.ok, T1),
        TransferOutcome(tid(2), R.exceeds_credits),
        TransferOutcome(tid(3), R.credit_account_not_found),
        TransferOutcome(tid(4), R.ok, T1 + TICK),
    ]
    assert event_topics(ledger_app)[before_events:] == [
        "TransferCreated",
        "TransferCreated",
        "BatchCommitted",
    ]
    again = restart(ledger_app, clock)
    assert set(again.state.transfers) == {FUND, tid(1), tid(4)}
    assert view(again) == view(ledger)


def test_a_failed_linked_chain_applies_nothing_and_writes_no_events(ledger, ledger_app, clock):
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
        TransferOutcome(tid(3), R.exceeds_credits),
    ]
    assert events_count(ledger_app) == before_events
    assert view(ledger) == before
    assert view(restart(ledger_app, clock)) == before


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
    assert ledger.create_transfers([xfer(3, ALICE, BOB, 101)]) == [
        TransferOutcome(tid(3), R.exceeds_credits)
    ]

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

