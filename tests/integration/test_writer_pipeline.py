"""The pipelined writer (decide the next batch while the last one commits) under a racing
second writer: every answer is right, nothing is lost, nothing is spent twice."""

from __future__ import annotations

import threading
import time
import uuid

from ledger.model import AccountFlags, CreateTransferResult, NewAccount, NewTransfer
from ledger.queries import state_as_of
from ledger.store import LedgerApplication
from ledger.writer import LedgerWriter

FUNDS = 300


def test_a_pipelined_writer_racing_another_writer_never_overspends_and_answers_every_request(
    ledger_env: dict[str, str], ledger_app: LedgerApplication
) -> None:
    piped = LedgerWriter(ledger_app)
    bank, source, sink = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    piped.open_accounts(
        [
            NewAccount(bank, "AETH", 1),
            NewAccount(source, "AETH", 2, AccountFlags.debits_must_not_exceed_credits),
            NewAccount(sink, "AETH", 2),
        ]
    )
    assert piped.create_transfers([NewTransfer(uuid.uuid4(), bank, source, FUNDS, "AETH", 1)])[0].ok

    other_app = LedgerApplication(env=ledger_env)
    other = LedgerWriter(other_app)
    piped.start()

    def spend() -> NewTransfer:
        return NewTransfer(uuid.uuid4(), source, sink, 1, "AETH", 2)

    other_results: list[CreateTransferResult] = []

    def race() -> None:
        # A second writer of the same shard, committing one transfer at a time with a short
        # pause (one writer per shard is the design; this one keeps the first one honest).
        for _ in range(FUNDS):
            other_results.append(other.create_transfers([spend()])[0].result)
            time.sleep(0.002)

    racer = threading.Thread(target=race)
    racer.start()
    futures = [piped.submit([spend(), spend()]) for _ in range(FUNDS)]
    piped_results = [o.result for f in futures for o in f.result(timeout=120)]
    racer.join(timeout=120)
    piped.stop()

    everything = piped_results + other_results
    assert len(everything) == 3 * FUNDS
    assert set(everything) <= {CreateTransferResult.ok, CreateTransferResult.exceeds_credits}
    assert everything.count(CreateTransferResult.ok) == FUNDS  # exactly the funds, no more
    assert piped.races_lost + other.races_lost > 0  # the race really happened

    rebuilt = state_as_of(ledger_app)
    assert rebuilt.accounts[source].balance == 0
    assert rebuilt.accounts[sink].balance == FUNDS
    assert rebuilt.trial_balance()["AETH"][0] == rebuilt.trial_balance()["AETH"][1]
    piped.refresh()
    other.refresh()
    for writer in (piped, other):
        assert {a: acc.balances() for a, acc in writer.state.accounts.items()} == {
            a: acc.balances() for a, acc in rebuilt.accounts.items()
        }
    other_app.close()
