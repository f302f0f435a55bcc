from __future__ import annotations

import uuid

from ledger.model import AccountFlags, NewAccount, NewTransfer
from ledger.writer import LedgerWriter


def test_a_transfer_moves_money_and_survives_a_restart(writer: LedgerWriter, ledger_app) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    writer.open_accounts(
        [
            NewAccount(a, "AETH", 1),
            NewAccount(b, "AETH", 2, AccountFlags.debits_must_not_exceed_credits),
        ]
    )
    [outcome] = writer.create_transfers([NewTransfer(uuid.uuid4(), a, b, 500, "AETH", 1)])
    assert outcome.ok
    again = LedgerWriter(ledger_app)
    assert again.state.accounts[b].credits_posted == 500
