"""Balances as of a past log position and a past time, read back from the log."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from ledger.model import AccountFlags, NewAccount, NewTransfer
from ledger.queries import account_as_of
from ledger.store import LedgerApplication
from ledger.writer import LedgerWriter


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_an_accounts_balance_can_be_read_as_of_a_past_position_and_a_past_time(
    ledger_app: LedgerApplication,
) -> None:
    clock = FakeClock()
    writer = LedgerWriter(ledger_app, clock=clock)
    bank, alice = uuid.uuid4(), uuid.uuid4()
    writer.open_accounts(
        [
            NewAccount(bank, "AETH", 1),
            NewAccount(alice, "AETH", 2, AccountFlags.debits_must_not_exceed_credits),
        ]
    )
    positions, times = [], []
    for day, amount in enumerate((100, 250, 40)):
        clock.now += timedelta(days=1)
        assert writer.create_transfers([NewTransfer(uuid.uuid4(), bank, alice, amount, "AETH", 1)])[
            0
        ].ok
        positions.append(writer.position)
        times.append(clock.now)
        assert day == len(positions) - 1
    pending = uuid.uuid4()
    clock.now += timedelta(days=1)
    assert writer.create_transfers([NewTransfer(pending, alice, bank, 90, "AETH", 3, flags=2)])[
        0
    ].ok

    assert account_as_of(ledger_app, alice, position=positions[0]).credits_posted == 100
    assert account_as_of(ledger_app, alice, position=positions[1]).credits_posted == 350
    assert account_as_of(ledger_app, alice, at=times[1] + timedelta(hours=1)).credits_posted == 350
    assert account_as_of(ledger_app, alice, at=times[0] - timedelta(hours=1)).credits_posted == 0
    latest = account_as_of(ledger_app, alice)
    assert latest is not None
    assert latest.balances() == writer.state.accounts[alice].balances() == (90, 0, 0, 390)
    assert latest.available == 300
    assert account_as_of(ledger_app, uuid.uuid4()) is None
