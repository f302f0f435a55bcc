"""Two OS processes, each with its own writer, racing to spend the same funds."""

from __future__ import annotations

import multiprocessing as mp
import uuid
from typing import Any

import pytest

from ledger.model import AccountFlags, CreateTransferResult, NewAccount, NewTransfer
from ledger.store import LedgerApplication
from ledger.writer import LedgerWriter

ROUNDS = 12
FUNDS = 100


def _racer(
    env: dict[str, str], source: str, sink: str, barrier: Any, results: Any, name: str
) -> None:
    app = LedgerApplication(env=env)
    writer = LedgerWriter(app)
    for round_number in range(ROUNDS):
        barrier.wait(timeout=60)  # the test funded the source: go
        [outcome] = writer.create_transfers(
            [NewTransfer(uuid.uuid4(), uuid.UUID(source), uuid.UUID(sink), FUNDS, "AETH", 7)]
        )
        results.put((round_number, name, int(outcome.result)))
        barrier.wait(timeout=60)  # round over
    app.close()


@pytest.mark.slow
def test_two_writer_processes_can_never_both_spend_the_same_funds(
    ledger_env: dict[str, str], writer: LedgerWriter
) -> None:
    source, sink, bank = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    writer.open_accounts(
        [
            NewAccount(bank, "AETH", 1),
            NewAccount(source, "AETH", 2, AccountFlags.debits_must_not_exceed_credits),
            NewAccount(sink, "AETH", 2, AccountFlags.debits_must_not_exceed_credits),
        ]
    )
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    results = ctx.Queue()
    racers = [
        ctx.Process(
            target=_racer, args=(ledger_env, str(source), str(sink), barrier, results, name)
        )
        for name in ("left", "right")
    ]
    for p in racers:
        p.start()
    try:
        for _ in range(ROUNDS):
            # Fund exactly one spend per round.
            assert writer.create_transfers(
                [NewTransfer(uuid.uuid4(), bank, source, FUNDS, "AETH", 1)]
            )[0].ok
            barrier.wait(timeout=60)
            barrier.wait(timeout=60)
        outcomes = [results.get(timeout=60) for _ in range(2 * ROUNDS)]
    finally:
        for p in racers:
            p.join(timeout=60)
    for p in racers:
        assert p.exitcode == 0

    by_round: dict[int, list[int]] = {}
    for round_number, _name, result in outcomes:
        by_round.setdefault(round_number, []).append(result)
    for round_number, results_of_round in by_round.items():
        assert sorted(results_of_round) == [
            CreateTransferResult.ok,
            CreateTransferResult.exceeds_credits,
        ], f"round {round_number}: {results_of_round}"

    writer.refresh()
    assert writer.state.accounts[source].balance == 0
    assert writer.state.accounts[sink].balance == FUNDS * ROUNDS
    debits, credits = writer.state.trial_balance()["AETH"]
    assert debits == credits


def test_an_event_written_around_the_writer_is_a_state_error_not_a_lost_race(
    writer: LedgerWriter,
) -> None:
    from datetime import UTC, datetime

    from ledger.errors import WriterStateError
    from ledger.model import Transfer, TransferFlags

    a, b = uuid.uuid4(), uuid.uuid4()
    writer.open_accounts([NewAccount(a, "AETH", 1), NewAccount(b, "AETH", 1)])
    sneaky = uuid.uuid4()
    now = datetime.now(UTC)
    stored = writer.app.ledger_mapper.fact_to_stored_event(
        Transfer(sneaky, a, b, 1, "AETH", 1, TransferFlags.none, uuid.UUID(int=0), 0, (), now, now)
    )
    writer.app.recorder.insert_events([stored])  # no BatchCommitted: not another writer's batch

    with pytest.raises(WriterStateError, match="already stored but unknown to the writer"):
        writer.create_transfers([NewTransfer(sneaky, a, b, 1, "AETH", 1)])
    assert writer.races_lost == 0
    assert writer.state.accounts[b].credits_posted == 0  # nothing applied
