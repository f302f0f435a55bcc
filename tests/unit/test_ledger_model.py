"""Unit tests of the pure ledger state machine (`ledger.model.LedgerState`). No database.

Every result code that can occur has a test asserting the exact code. A rejection for a
reason that depends on the ledger's state (`TRANSIENT_RESULTS`) returns exactly one
`Rejection` fact and changes nothing but the spent id and the clock; any other rejection
changes nothing (balances, transfers, holds, rejections, expiry queue, clock) and returns no
facts.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from uuid import UUID

import orjson
import pytest

from ledger.events import event_for
from ledger.limits import (
    AMOUNT_MAX,
    REFERENCE_KEY_LENGTH_MAX,
    REFERENCE_VALUE_LENGTH_MAX,
    REFERENCES_COUNT_MAX,
    TIMEOUT_S_MAX,
)
from ledger.model import (
    NIL_ID,
    TRANSIENT_RESULTS,
    Account,
    AccountFlags,
    CreateAccountResult,
    CreateTransferResult,
    Fact,
    LedgerState,
    NewAccount,
    NewTransfer,
    PendingExpiry,
    PendingStatus,
    Rejection,
    Transfer,
    TransferFlags,
    TransferOutcome,
    replay,
)

R = CreateTransferResult
A = CreateAccountResult
F = TransferFlags

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(hours=1)
TICK = timedelta(microseconds=1)

BANK = UUID(int=1)
"""Unconstrained: the source of funds, may go negative."""
ALICE = UUID(int=2)
"""debits_must_not_exceed_credits, funded with 1000."""
BOB = UUID(int=3)
"""Unconstrained."""
CAPPED = UUID(int=4)
"""credits_must_not_exceed_debits, debited 100 (so it may be credited up to 100)."""
EURO = UUID(int=5)
"""Unconstrained, asset EUR."""
EURO2 = UUID(int=6)
"""Unconstrained, asset EUR."""
CAROL = UUID(int=7)
"""debits_must_not_exceed_credits, never funded."""
MISSING = UUID(int=999)

FUND_ALICE = UUID(int=90)
FUND_CAPPED = UUID(int=91)

ASSET = "AETH"
CODE = 10
ALICE_FUNDS = 1000
CAPPED_DEBITS = 100


def tid(n: int) -> UUID:
    return UUID(int=1000 + n)


def xfer(
    n: int | UUID,
    debit: UUID,
    credit: UUID,
    amount: int,
    *,
    asset: str = ASSET,
    code: int = CODE,
    flags: TransferFlags = F.none,
    pending_id: UUID = NIL_ID,
    timeout_s: int = 0,
    references: tuple[tuple[str, str], ...] = (),
    effective_at: datetime | None = None,
) -> NewTransfer:
    return NewTransfer(
        id=n if isinstance(n, UUID) else tid(n),
        debit_account_id=debit,
        credit_account_id=credit,
        amount=amount,
        asset=asset,
        code=code,
        flags=flags,
        pending_id=pending_id,
        timeout_s=timeout_s,
        references=references,
        effective_at=effective_at,
    )


def post(n: int, pending: UUID, amount: int, **kw) -> NewTransfer:
    return xfer(n, NIL_ID, NIL_ID, amount, flags=F.post_pending_transfer, pending_id=pending, **kw)


def void(n: int, pending: UUID, amount: int = 0, **kw) -> NewTransfer:
    return xfer(n, NIL_ID, NIL_ID, amount, flags=F.void_pending_transfer, pending_id=pending, **kw)


def snapshot(state: LedgerState) -> tuple[object, ...]:
    """Everything observable about a state (plus its expiry queue), by value:
    (accounts, transfers, pending statuses, rejections, expiry queue, clock)."""
    return (
        {
            i: (a.asset, a.code, int(a.flags), a.shard, a.opened_at, a.balances())
            for i, a in state.accounts.items()
        },
        dict(state.transfers),
        {i: state.pending_status(i) for i in state.transfers},
        dict(state.rejected),
        sorted(e for e in state._expiries if state.pending_status(e[1]) is PendingStatus.pending),
        state.last_recorded_at,
    )


def with_rejection(before: tuple[object, ...], rejection: Rejection) -> tuple[object, ...]:
    """A snapshot as `before`, plus one recorded rejection (and the clock at its time)."""
    accounts, transfers, statuses, rejected, expiries, _clock = before
    assert isinstance(rejected, dict)
    return (
        accounts,
        transfers,
        statuses,
        {**rejected, rejection.transfer.id: rejection},
        expiries,
        rejection.recorded_at,
    )


def balances(state: LedgerState, account_id: UUID) -> tuple[int, int, int, int]:
    """(debits_pending, debits_posted, credits_pending, credits_posted)."""
    return state.accounts[account_id].balances()


def assert_rejected(
    state: LedgerState, command: NewTransfer, code: CreateTransferResult, now: datetime = T1
) -> None:
    """A rejection that does not depend on the state: nothing recorded, nothing changed."""
    assert code not in TRANSIENT_RESULTS
    before = snapshot(state)
    outcomes, facts = state.create_transfers([command], now)
    assert outcomes == [TransferOutcome(command.id, code)]
    assert outcomes[0].recorded_at is None
    assert not outcomes[0].ok
    assert facts == []
    assert snapshot(state) == before


def assert_recorded(
    state: LedgerState, command: NewTransfer, code: CreateTransferResult, now: datetime = T1
) -> Rejection:
    """A rejection that depends on the state: exactly one Rejection fact, recorded at the next
    ledger time; nothing else changes (no balance, transfer, hold or expiry). An identical
    retry then answers the same outcome and records nothing."""
    assert code in TRANSIENT_RESULTS
    before = snapshot(state)
    at = state.clock(now)
    outcomes, facts = state.create_transfers([command], now)
    rejection = Rejection(command, code, at)
    assert outcomes == [TransferOutcome(command.id, code, at)]
    assert not outcomes[0].ok
    assert facts == [rejection]
    assert state.rejected[command.id] == rejection
    after = snapshot(state)
    assert after == with_rejection(before, rejection)
    assert state.create_transfers([command], now) == (outcomes, [])
    assert snapshot(state) == after
    return rejection


def accept(state: LedgerState, commands: list[NewTransfer], now: datetime = T1) -> list[Fact]:
    outcomes, facts = state.create_transfers(commands, now)
    assert [o.result for o in outcomes] == [R.ok] * len(commands)
    return facts


@pytest.fixture
def state() -> LedgerState:
    s = LedgerState()
    results, _opened = s.open_accounts(
        [
            NewAccount(BANK, ASSET, 1),
            NewAccount(ALICE, ASSET, 2, AccountFlags.debits_must_not_exceed_credits),
            NewAccount(BOB, ASSET, 2),
            NewAccount(CAPPED, ASSET, 3, AccountFlags.credits_must_not_exceed_debits),
            NewAccount(EURO, "EUR", 2),
            NewAccount(EURO2, "EUR", 2),
            NewAccount(CAROL, ASSET, 2, AccountFlags.debits_must_not_exceed_credits),
        ],
        T0,
    )
    assert results == [A.ok] * 7
    outcomes, _facts = s.create_transfers(
        [
            xfer(FUND_ALICE, BANK, ALICE, ALICE_FUNDS),
            xfer(FUND_CAPPED, CAPPED, BANK, CAPPED_DEBITS),
        ],
        T0,
    )
    assert [o.result for o in outcomes] == [R.ok, R.ok]
    s.commit()
    assert balances(s, ALICE) == (0, 0, 0, ALICE_FUNDS)
    assert balances(s, CAPPED) == (0, CAPPED_DEBITS, 0, 0)
    return s


# -- accounts ---------------------------------------------------------------------------


def test_a_valid_account_is_opened_with_zero_balances_and_returned_as_a_fact() -> None:
    s = LedgerState()
    results, opened = s.open_accounts(
        [NewAccount(BANK, ASSET, 1, AccountFlags.debits_must_not_exceed_credits, shard=3)], T0
    )
    assert results == [A.ok]
    assert opened == [
        Account(BANK, ASSET, 1, AccountFlags.debits_must_not_exceed_credits, 3, opened_at=T0)
    ]
    assert s.accounts[BANK].balances() == (0, 0, 0, 0)
    assert s.last_recorded_at == T0


def test_opening_the_same_account_again_with_identical_fields_is_ok_and_opens_nothing(
    state: LedgerState,
) -> None:
    before = snapshot(state)
    results, opened = state.open_accounts(
        [NewAccount(ALICE, ASSET, 2, AccountFlags.debits_must_not_exceed_credits)], T1
    )
    assert results == [A.ok]
    assert opened == []
    assert snapshot(state) == before
    assert state.accounts[ALICE].opened_at == T0 + TICK


def test_an_account_opened_twice_in_one_batch_is_opened_once() -> None:
    s = LedgerState()
    results, opened = s.open_accounts([NewAccount(BANK, ASSET, 1), NewAccount(BANK, ASSET, 1)], T0)
    assert results == [A.ok, A.ok]
    assert [a.id for a in opened] == [BANK]


ACCOUNT_REJECTIONS = [
    pytest.param(NewAccount(NIL_ID, ASSET, 1), A.id_must_not_be_zero, id="id_must_not_be_zero"),
    pytest.param(
        NewAccount(
            UUID(int=50),
            ASSET,
            1,
            AccountFlags.debits_must_not_exceed_credits
            | AccountFlags.credits_must_not_exceed_debits,
        ),
        A.flags_are_mutually_exclusive,
        id="flags_are_mutually_exclusive",
    ),
    pytest.param(NewAccount(UUID(int=50), "", 1), A.asset_must_not_be_empty, id="asset_empty"),
    pytest.param(
        NewAccount(UUID(int=50), "A" * 17, 1), A.asset_exceeds_max_length, id="asset_too_long"
    ),
    pytest.param(NewAccount(UUID(int=50), ASSET, 0), A.code_must_not_be_zero, id="code_zero"),
    pytest.param(
        NewAccount(ALICE, ASSET, 2), A.exists_with_different_flags, id="exists_different_flags"
    ),
    pytest.param(
        NewAccount(BOB, "EUR", 2), A.exists_with_different_asset, id="exists_different_asset"
    ),
    pytest.param(NewAccount(BOB, ASSET, 9), A.exists_with_different_code, id="exists_diff_code"),
    pytest.param(
        NewAccount(BOB, ASSET, 2, shard=1), A.exists_with_different_shard, id="exists_diff_shard"
    ),
]


@pytest.mark.parametrize(("command", "code"), ACCOUNT_REJECTIONS)
def test_an_invalid_or_conflicting_account_is_rejected_with_its_code_and_opens_nothing(
    state: LedgerState, command: NewAccount, code: CreateAccountResult
) -> None:
    before = snapshot(state)
    results, opened = state.open_accounts([command], T1)
    assert results == [code]
    assert opened == []
    assert snapshot(state) == before


def test_an_asset_of_exactly_the_maximum_length_is_accepted() -> None:
    s = LedgerState()
    results, opened = s.open_accounts([NewAccount(BANK, "A" * 16, 1)], T0)
    assert results == [A.ok]
    assert len(opened) == 1


def test_account_checks_run_in_the_declared_order() -> None:
    s = LedgerState()
    both = AccountFlags.debits_must_not_exceed_credits | AccountFlags.credits_must_not_exceed_debits
    results, opened = s.open_accounts(
        [
            NewAccount(NIL_ID, "", 0, both),  # id before everything
            NewAccount(UUID(int=51), "", 0, both),  # flags before asset and code
            NewAccount(UUID(int=52), "", 0),  # asset before code
            NewAccount(UUID(int=53), "A" * 17, 0),  # asset length before code
        ],
        T0,
    )
    assert results == [
        A.id_must_not_be_zero,
        A.flags_are_mutually_exclusive,
        A.asset_must_not_be_empty,
        A.asset_exceeds_max_length,
    ]
    assert opened == []
    assert s.accounts == {}


def test_a_conflicting_account_reports_the_first_differing_field_in_order(
    state: LedgerState,
) -> None:
    # Differs in flags, asset, code and shard: flags is checked first.
    results, _ = state.open_accounts([NewAccount(ALICE, "EUR", 9, shard=2)], T1)
    assert results == [A.exists_with_different_flags]
    # Differs in asset, code and shard: asset next.
    results, _ = state.open_accounts([NewAccount(BOB, "EUR", 9, shard=2)], T1)
    assert results == [A.exists_with_different_asset]
    results, _ = state.open_accounts([NewAccount(BOB, ASSET, 9, shard=2)], T1)
    assert results == [A.exists_with_different_code]


# -- a plain transfer ---------------------------------------------------------------------


def test_a_valid_transfer_is_accepted_moves_money_and_returns_exactly_one_fact(
    state: LedgerState,
) -> None:
    command = xfer(1, ALICE, BOB, 400, references=(("lease", "L-1"),))
    outcomes, facts = state.create_transfers([command], T1)
    assert outcomes == [TransferOutcome(tid(1), R.ok, T1)]
    assert outcomes[0].ok
    assert facts == [
        Transfer(
            id=tid(1),
            debit_account_id=ALICE,
            credit_account_id=BOB,
            amount=400,
            asset=ASSET,
            code=CODE,
            flags=F.none,
            pending_id=NIL_ID,
            timeout_s=0,
            references=(("lease", "L-1"),),
            effective_at=T1,
            recorded_at=T1,
        )
    ]
    assert balances(state, ALICE) == (0, 400, 0, ALICE_FUNDS)
    assert balances(state, BOB) == (0, 0, 0, 400)
    assert state.accounts[ALICE].available == ALICE_FUNDS - 400
    assert state.transfers[tid(1)] == facts[0]
    assert state.trial_balance() == {ASSET: (ALICE_FUNDS + CAPPED_DEBITS + 400,) * 2, "EUR": (0, 0)}


def test_an_explicit_effective_at_is_kept_and_recorded_at_is_the_ledger_time(
    state: LedgerState,
) -> None:
    effective = T0 - timedelta(days=3)
    [fact] = accept(state, [xfer(1, BANK, BOB, 5, effective_at=effective)])
    assert isinstance(fact, Transfer)
    assert fact.effective_at == effective
    assert fact.recorded_at == T1


def test_recorded_at_strictly_increases_even_when_now_does_not(state: LedgerState) -> None:
    facts = accept(state, [xfer(1, BANK, BOB, 1), xfer(2, BANK, BOB, 1)], T1)
    facts += accept(state, [xfer(3, BANK, BOB, 1)], T1 - timedelta(minutes=5))
    assert [f.recorded_at for f in facts] == [T1, T1 + TICK, T1 + 2 * TICK]
    assert state.last_recorded_at == T1 + 2 * TICK


# -- one test per rejection code, in declared order ------------------------------------


def test_a_transfer_with_a_zero_id_is_rejected_with_id_must_not_be_zero(state):
    assert_rejected(state, xfer(NIL_ID, BANK, BOB, 1), R.id_must_not_be_zero)


@pytest.mark.parametrize(
    "flags",
    [
        F.pending | F.post_pending_transfer,
        F.pending | F.void_pending_transfer,
        F.post_pending_transfer | F.void_pending_transfer,
    ],
    ids=["pending+post", "pending+void", "post+void"],
)
def test_a_transfer_with_two_two_phase_flags_is_rejected_with_flags_are_mutually_exclusive(
    state, flags
):
    command = xfer(1, BANK, BOB, 1, flags=flags, pending_id=tid(99))
    assert_rejected(state, command, R.flags_are_mutually_exclusive)


def test_a_transfer_with_a_zero_debit_account_is_rejected_with_debit_account_id_must_not_be_zero(
    state,
):
    assert_rejected(state, xfer(1, NIL_ID, BOB, 1), R.debit_account_id_must_not_be_zero)


def test_a_transfer_with_a_zero_credit_account_is_rejected_with_credit_account_id_must_not_be_zero(
    state,
):
    assert_rejected(state, xfer(1, BANK, NIL_ID, 1), R.credit_account_id_must_not_be_zero)


def test_a_transfer_from_an_account_to_itself_is_rejected_with_accounts_must_be_different(state):
    assert_rejected(state, xfer(1, BOB, BOB, 1), R.accounts_must_be_different)


def test_a_plain_transfer_naming_a_pending_id_is_rejected_with_pending_id_must_be_zero(state):
    assert_rejected(state, xfer(1, BANK, BOB, 1, pending_id=tid(50)), R.pending_id_must_be_zero)


def test_a_pending_transfer_naming_a_pending_id_is_rejected_with_pending_id_must_be_zero(state):
    command = xfer(1, BANK, BOB, 1, flags=F.pending, pending_id=tid(50))
    assert_rejected(state, command, R.pending_id_must_be_zero)


@pytest.mark.parametrize("flags", [F.post_pending_transfer, F.void_pending_transfer])
def test_a_post_or_void_without_pending_id_is_rejected_with_pending_id_must_not_be_zero(
    state, flags
):
    command = xfer(1, BANK, BOB, 1, flags=flags)
    assert_rejected(state, command, R.pending_id_must_not_be_zero)


def test_a_post_naming_itself_as_pending_is_rejected_with_pending_id_must_be_different(state):
    assert_rejected(state, post(1, tid(1), 1), R.pending_id_must_be_different)


def test_a_timeout_on_a_non_pending_transfer_is_rejected_with_timeout_reserved_for_pending_transfer(
    state,
):
    assert_rejected(
        state, xfer(1, BANK, BOB, 1, timeout_s=60), R.timeout_reserved_for_pending_transfer
    )


@pytest.mark.parametrize("timeout_s", [TIMEOUT_S_MAX + 1, -1], ids=["too_long", "negative"])
def test_a_pending_timeout_out_of_range_is_rejected_with_timeout_exceeds_max(state, timeout_s):
    command = xfer(1, BANK, BOB, 1, flags=F.pending, timeout_s=timeout_s)
    assert_rejected(state, command, R.timeout_exceeds_max)


def test_a_pending_timeout_of_exactly_the_maximum_is_accepted(state):
    [fact] = accept(state, [xfer(1, BANK, BOB, 1, flags=F.pending, timeout_s=TIMEOUT_S_MAX)])
    assert isinstance(fact, Transfer)
    assert fact.expires_at == T1 + timedelta(seconds=TIMEOUT_S_MAX)


def test_a_negative_amount_is_rejected_with_amount_must_not_be_negative(state):
    assert_rejected(state, xfer(1, BANK, BOB, -1), R.amount_must_not_be_negative)


def test_a_zero_amount_is_rejected_with_amount_must_not_be_zero(state):
    assert_rejected(state, xfer(1, BANK, BOB, 0), R.amount_must_not_be_zero)


def test_a_post_of_amount_zero_is_rejected_with_amount_must_not_be_zero(state):
    accept(state, [xfer(1, BANK, BOB, 10, flags=F.pending)])
    assert_rejected(state, post(2, tid(1), 0), R.amount_must_not_be_zero)


def test_an_amount_above_the_maximum_is_rejected_with_amount_exceeds_max(state):
    assert_rejected(state, xfer(1, BANK, BOB, AMOUNT_MAX + 1), R.amount_exceeds_max)


def test_an_empty_asset_is_rejected_with_asset_must_not_be_empty(state):
    assert_rejected(state, xfer(1, BANK, BOB, 1, asset=""), R.asset_must_not_be_empty)


def test_a_zero_code_is_rejected_with_code_must_not_be_zero(state):
    assert_rejected(state, xfer(1, BANK, BOB, 1, code=0), R.code_must_not_be_zero)


@pytest.mark.parametrize(
    "references",
    [
        tuple((f"k{i}", "v") for i in range(REFERENCES_COUNT_MAX + 1)),
        (("k" * (REFERENCE_KEY_LENGTH_MAX + 1), "v"),),
        (("k", "v" * (REFERENCE_VALUE_LENGTH_MAX + 1)),),
    ],
    ids=["too_many", "key_too_long", "value_too_long"],
)
def test_oversized_references_are_rejected_with_references_exceed_max(state, references):
    assert_rejected(state, xfer(1, BANK, BOB, 1, references=references), R.references_exceed_max)


def test_references_at_exactly_the_maximum_sizes_are_accepted(state):
    references = tuple(
        (f"{i}".ljust(REFERENCE_KEY_LENGTH_MAX, "k"), "v" * REFERENCE_VALUE_LENGTH_MAX)
        for i in range(REFERENCES_COUNT_MAX)
    )
    [fact] = accept(state, [xfer(1, BANK, BOB, 1, references=references)])
    assert isinstance(fact, Transfer)
    assert fact.references == references


# -- same id, different fields ------------------------------------------------------------


@pytest.fixture
def accepted(state: LedgerState) -> LedgerState:
    """State with: tid(1) a plain transfer, tid(2) a pending with timeout, tid(3) its post,
    tid(4) another pending, all recorded at T1."""
    accept(
        state,
        [
            xfer(1, BANK, BOB, 50, references=(("lease", "L-1"),)),
            xfer(2, BANK, BOB, 70, flags=F.pending, timeout_s=3600),
            post(3, tid(2), 70),
            xfer(4, BANK, BOB, 80, flags=F.pending),
        ],
    )
    state.commit()
    return state


def test_a_retry_with_a_different_flags_is_rejected_with_exists_with_different_flags(accepted):
    assert_rejected(
        accepted,
        xfer(1, BANK, BOB, 50, flags=F.pending, references=(("lease", "L-1"),)),
        R.exists_with_different_flags,
    )


def test_a_retry_with_a_different_debit_account_is_rejected_with_exists_with_different_debit_account_id(
    accepted,
):
    assert_rejected(
        accepted,
        xfer(1, ALICE, BOB, 50, references=(("lease", "L-1"),)),
        R.exists_with_different_debit_account_id,
    )


def test_a_retry_with_a_different_credit_account_is_rejected_with_exists_with_different_credit_account_id(
    accepted,
):
    assert_rejected(
        accepted,
        xfer(1, BANK, ALICE, 50, references=(("lease", "L-1"),)),
        R.exists_with_different_credit_account_id,
    )


def test_a_retry_with_a_different_amount_is_rejected_with_exists_with_different_amount(accepted):
    assert_rejected(
        accepted,
        xfer(1, BANK, BOB, 51, references=(("lease", "L-1"),)),
        R.exists_with_different_amount,
    )


def test_a_retried_post_naming_another_pending_is_rejected_with_exists_with_different_pending_id(
    accepted,
):
    assert_rejected(accepted, post(3, tid(4), 70), R.exists_with_different_pending_id)


def test_a_retried_pending_with_another_timeout_is_rejected_with_exists_with_different_timeout(
    accepted,
):
    command = xfer(2, BANK, BOB, 70, flags=F.pending, timeout_s=3601)
    assert_rejected(accepted, command, R.exists_with_different_timeout)


def test_a_retry_in_another_asset_is_rejected_with_exists_with_different_asset(accepted):
    assert_rejected(
        accepted,
        xfer(1, BANK, BOB, 50, asset="EUR", references=(("lease", "L-1"),)),
        R.exists_with_different_asset,
    )


def test_a_retry_with_a_different_code_is_rejected_with_exists_with_different_code(accepted):
    assert_rejected(
        accepted,
        xfer(1, BANK, BOB, 50, code=CODE + 1, references=(("lease", "L-1"),)),
        R.exists_with_different_code,
    )


def test_a_retry_with_different_references_is_rejected_with_exists_with_different_references(
    accepted,
):
    assert_rejected(
        accepted,
        xfer(1, BANK, BOB, 50, references=(("lease", "L-2"),)),
        R.exists_with_different_references,
    )
    assert_rejected(accepted, xfer(1, BANK, BOB, 50), R.exists_with_different_references)


def test_a_retry_with_a_different_effective_at_is_rejected_with_exists_with_different_effective_at(
    accepted,
):
    assert_rejected(
        accepted,
        xfer(1, BANK, BOB, 50, references=(("lease", "L-1"),), effective_at=T0),
        R.exists_with_different_effective_at,
    )


def test_a_retry_that_differs_in_many_fields_reports_the_first_in_declared_order(accepted):
    # Differs in credit account, amount, asset, code and references: credit comes first.
    assert_rejected(
        accepted,
        xfer(1, BANK, ALICE, 7, asset="EUR", code=3),
        R.exists_with_different_credit_account_id,
    )
    # Differs in amount, code and references: amount comes first.
    assert_rejected(accepted, xfer(1, BANK, BOB, 7, code=3), R.exists_with_different_amount)
    # Differs in timeout and code: timeout comes first.
    assert_rejected(
        accepted,
        xfer(2, BANK, BOB, 70, flags=F.pending, timeout_s=5, code=3),
        R.exists_with_different_timeout,
    )


# -- a retry with identical fields ------------------------------------------------------


def test_an_identical_retry_returns_ok_with_the_original_recorded_at_and_no_new_facts(accepted):
    before = snapshot(accepted)
    later = T1 + timedelta(days=1)
    commands = [
        xfer(1, BANK, BOB, 50, references=(("lease", "L-1"),)),
        xfer(2, BANK, BOB, 70, flags=F.pending, timeout_s=3600),
        post(3, tid(2), 70),
    ]
    outcomes, facts = accepted.create_transfers(commands, later)
    assert outcomes == [
        TransferOutcome(tid(1), R.ok, T1),
        TransferOutcome(tid(2), R.ok, T1 + TICK),
        TransferOutcome(tid(3), R.ok, T1 + 2 * TICK),
    ]
    assert facts == []
    assert snapshot(accepted) == before


def test_an_identical_retry_in_the_same_batch_returns_the_same_recorded_at_once(state):
    outcomes, facts = state.create_transfers([xfer(1, BANK, BOB, 5), xfer(1, BANK, BOB, 5)], T1)
    assert outcomes == [TransferOutcome(tid(1), R.ok, T1), TransferOutcome(tid(1), R.ok, T1)]
    assert [f.id for f in facts] == [tid(1)]
    assert balances(state, BOB) == (0, 0, 0, 5)


def test_a_retry_may_leave_effective_at_unset_or_restate_it(accepted):
    before = snapshot(accepted)
    outcomes, facts = accepted.create_transfers(
        [
            xfer(1, BANK, BOB, 50, references=(("lease", "L-1"),)),
            xfer(1, BANK, BOB, 50, references=(("lease", "L-1"),), effective_at=T1),
        ],
        T1 + timedelta(minutes=1),
    )
    assert outcomes == [TransferOutcome(tid(1), R.ok, T1)] * 2
    assert facts == []
    assert snapshot(accepted) == before


def test_a_retried_void_of_amount_zero_matches_the_original_void(state):
    accept(state, [xfer(1, BANK, BOB, 40, flags=F.pending), void(2, tid(1))])
    assert state.transfers[tid(2)].amount == 40
    before = snapshot(state)
    outcomes, facts = state.create_transfers([void(2, tid(1)), void(2, tid(1), 40)], T1 + TICK)
    assert outcomes == [TransferOutcome(tid(2), R.ok, T1 + TICK)] * 2
    assert facts == []
    assert snapshot(state) == before


def test_the_existence_check_comes_after_field_validation(accepted):
    # Same id as an accepted transfer, but amount 0: validation answers first.
    assert_rejected(
        accepted, xfer(1, BANK, BOB, 0, references=(("lease", "L-1"),)), R.amount_must_not_be_zero
    )


def test_the_existence_check_comes_before_balance_checks(state):
    accept(state, [xfer(1, ALICE, BOB, 10)])
    # Retry with a different amount that would also overdraw Alice.
    assert_rejected(state, xfer(1, ALICE, BOB, 5000), R.exists_with_different_amount)


# -- accounts and assets --------------------------------------------------------------------


def test_a_transfer_from_an_unknown_account_is_rejected_with_debit_account_not_found(state):
    assert_recorded(state, xfer(1, MISSING, BOB, 1), R.debit_account_not_found)


def test_a_transfer_to_an_unknown_account_is_rejected_with_credit_account_not_found(state):
    assert_recorded(state, xfer(1, BANK, MISSING, 1), R.credit_account_not_found)


def test_a_transfer_between_assets_is_rejected_with_accounts_must_have_the_same_asset(state):
    assert_rejected(state, xfer(1, BANK, EURO, 1), R.accounts_must_have_the_same_asset)


def test_a_transfer_in_another_asset_than_its_accounts_is_rejected_with_transfer_must_have_the_same_asset_as_accounts(
    state,
):
    assert_rejected(
        state, xfer(1, EURO, EURO2, 1, asset=ASSET), R.transfer_must_have_the_same_asset_as_accounts
    )


# -- resolving a pending transfer -----------------------------------------------------


def test_a_post_of_an_unknown_pending_is_rejected_with_pending_transfer_not_found(state):
    assert_recorded(state, post(2, tid(1), 1), R.pending_transfer_not_found)


def test_a_post_of_a_plain_transfer_is_rejected_with_pending_transfer_not_pending(state):
    accept(state, [xfer(1, BANK, BOB, 10)])
    assert_rejected(state, post(2, tid(1), 10), R.pending_transfer_not_pending)
    assert_rejected(state, void(3, tid(1)), R.pending_transfer_not_pending)


def test_a_post_naming_another_debit_account_is_rejected_with_pending_transfer_has_different_debit_account_id(
    state,
):
    accept(state, [xfer(1, BANK, BOB, 10, flags=F.pending)])
    command = xfer(2, ALICE, BOB, 10, flags=F.post_pending_transfer, pending_id=tid(1))
    assert_rejected(state, command, R.pending_transfer_has_different_debit_account_id)


def test_a_post_naming_another_credit_account_is_rejected_with_pending_transfer_has_different_credit_account_id(
    state,
):
    accept(state, [xfer(1, BANK, BOB, 10, flags=F.pending)])
    command = xfer(2, BANK, ALICE, 10, flags=F.post_pending_transfer, pending_id=tid(1))
    assert_rejected(state, command, R.pending_transfer_has_different_credit_account_id)


def test_a_post_naming_the_pending_accounts_explicitly_is_accepted(state):
    accept(state, [xfer(1, BANK, BOB, 10, flags=F.pending)])
    command = xfer(2, BANK, BOB, 10, flags=F.post_pending_transfer, pending_id=tid(1))
    [fact] = accept(state, [command])
    assert isinstance(fact, Transfer)
    assert (fact.debit_account_id, fact.credit_account_id) == (BANK, BOB)


def test_a_post_in_another_asset_is_caught_by_the_account_asset_check_before_pending_transfer_has_different_asset(
    state,
):
    # pending_transfer_has_different_asset cannot occur: the post's accounts must equal the
    # pending's, whose asset is the pending's, so the account asset check answers first.
    accept(state, [xfer(1, EURO, EURO2, 10, asset="EUR", flags=F.pending)])
    assert_rejected(
        state, post(2, tid(1), 10, asset=ASSET), R.transfer_must_have_the_same_asset_as_accounts
    )
    command = xfer(2, BANK, BOB, 10, flags=F.post_pending_transfer, pending_id=tid(1))
    assert_rejected(state, command, R.pending_transfer_has_different_debit_account_id)


def test_a_post_with_another_code_is_rejected_with_pending_transfer_has_different_code(state):
    accept(state, [xfer(1, BANK, BOB, 10, flags=F.pending)])
    assert_rejected(
        state, post(2, tid(1), 10, code=CODE + 1), R.pending_transfer_has_different_code
    )
    assert_rejected(state, void(3, tid(1), code=CODE + 1), R.pending_transfer_has_different_code)


def test_a_post_above_the_pending_amount_is_rejected_with_exceeds_pending_transfer_amount(state):
    accept(state, [xfer(1, BANK, BOB, 10, flags=F.pending)])
    assert_rejected(state, post(2, tid(1), 11), R.exceeds_pending_transfer_amount)


def test_a_void_of_a_partial_amount_is_rejected_with_pending_transfer_has_different_amount(state):
    accept(state, [xfer(1, BANK, BOB, 10, flags=F.pending)])
    assert_rejected(state, void(2, tid(1), 9), R.pending_transfer_has_different_amount)
    assert_rejected(state, void(3, tid(1), 11), R.pending_transfer_has_different_amount)


def test_a_post_after_a_post_is_rejected_with_pending_transfer_already_posted(state):
    accept(state, [xfer(1, BANK, BOB, 10, flags=F.pending), post(2, tid(1), 4)])
    assert_rejected(state, post(3, tid(1), 4), R.pending_transfer_already_posted)
    assert_rejected(state, void(4, tid(1)), R.pending_transfer_already_posted)


def test_a_post_after_a_void_is_rejected_with_pending_transfer_already_voided(state):
    accept(state, [xfer(1, BANK, BOB, 10, flags=F.pending), void(2, tid(1))])
    assert_rejected(state, post(3, tid(1), 10), R.pending_transfer_already_voided)
    assert_rejected(state, void(4, tid(1)), R.pending_transfer_already_voided)


def test_a_post_after_the_timeout_is_rejected_with_pending_transfer_expired(state):
    accept(state, [xfer(1, BANK, BOB, 10, flags=F.pending, timeout_s=60)])
    state.expire_pending(T1 + timedelta(seconds=60))
    assert_rejected(
        state, post(2, tid(1), 10), R.pending_transfer_expired, T1 + timedelta(minutes=2)
    )
    assert_rejected(state, void(3, tid(1)), R.pending_transfer_expired, T1 + timedelta(minutes=2))


# -- balance limits -----------------------------------------------------------------------


def open_plain(state: LedgerState, *numbers: int) -> list[UUID]:
    ids = [UUID(int=n) for n in numbers]
    results, _ = state.open_accounts([NewAccount(i, ASSET, 1) for i in ids], T0)
    assert results == [A.ok] * len(ids)
    return ids


def test_a_transfer_that_would_overflow_the_debit_balances_is_rejected_with_overflows_debits(
    state,
):
    x, y, z = open_plain(state, 60, 61, 62)
    accept(state, [xfer(1, x, y, AMOUNT_MAX - 10), xfer(2, x, z, 5, flags=F.pending)])
    # debits_posted + debits_pending + amount = MAX - 10 + 5 + 6 > MAX
    assert_recorded(state, xfer(3, x, z, 6), R.overflows_debits)
    accept(state, [xfer(4, x, z, 5)])
    assert balances(state, x) == (5, AMOUNT_MAX - 5, 0, 0)


def test_a_transfer_that_would_overflow_the_credit_balances_is_rejected_with_overflows_credits(
    state,
):
    x, y, z, w = open_plain(state, 60, 61, 62, 63)
    accept(state, [xfer(1, x, y, AMOUNT_MAX - 10), xfer(2, z, y, 5, flags=F.pending)])
    assert_recorded(state, xfer(3, w, y, 6), R.overflows_credits)
    accept(state, [xfer(4, w, y, 5)])
    assert balances(state, y) == (0, 0, 5, AMOUNT_MAX - 5)
    assert balances(state, w) == (0, 5, 0, 0)


def test_a_transfer_that_would_overdraw_a_constrained_account_is_rejected_with_exceeds_credits(
    state,
):
    assert_recorded(state, xfer(1, ALICE, BOB, ALICE_FUNDS + 1), R.exceeds_credits)
    assert_recorded(state, xfer(2, CAROL, BOB, 1), R.exceeds_credits)
    accept(state, [xfer(3, ALICE, BOB, ALICE_FUNDS)])
    assert balances(state, ALICE) == (0, ALICE_FUNDS, 0, ALICE_FUNDS)
    assert state.accounts[ALICE].available == 0


def test_a_transfer_that_would_overcredit_a_capped_account_is_rejected_with_exceeds_debits(state):
    assert_recorded(state, xfer(1, BANK, CAPPED, CAPPED_DEBITS + 1), R.exceeds_debits)
    accept(state, [xfer(2, BANK, CAPPED, 60, flags=F.pending)])
    # credits_pending counts too: 60 + 41 > 100.
    assert_recorded(state, xfer(3, BANK, CAPPED, 41), R.exceeds_debits)
    accept(state, [xfer(4, BANK, CAPPED, 40)])
    assert balances(state, CAPPED) == (0, CAPPED_DEBITS, 60, 40)


# -- checks run in the declared order ----------------------------------------------------


ORDER_CASES = [
    pytest.param(xfer(NIL_ID, BOB, BOB, 0, code=0), R.id_must_not_be_zero, id="id<accounts"),
    pytest.param(
        xfer(1, NIL_ID, NIL_ID, 0, flags=F.pending | F.post_pending_transfer),
        R.flags_are_mutually_exclusive,
        id="flags<debit_zero",
    ),
    pytest.param(
        xfer(1, NIL_ID, NIL_ID, 1), R.debit_account_id_must_not_be_zero, id="debit<credit_zero"
    ),
    pytest.param(xfer(1, BOB, BOB, 0, asset=""), R.accounts_must_be_different, id="same<amount"),
    pytest.param(
        xfer(1, BANK, BOB, -1, timeout_s=5),
        R.timeout_reserved_for_pending_transfer,
        id="timeout<neg",
    ),
    pytest.param(xfer(1, BANK, BOB, 0, code=0), R.amount_must_not_be_zero, id="amount<code"),
    pytest.param(
        xfer(1, BANK, BOB, AMOUNT_MAX + 1, asset=""), R.amount_exceeds_max, id="max<asset"
    ),
    pytest.param(
        xfer(1, MISSING, UUID(int=998), 1), R.debit_account_not_found, id="debit<credit_missing"
    ),
    pytest.param(
        xfer(1, MISSING, BOB, 1, code=0), R.code_must_not_be_zero, id="code<account_missing"
    ),
    pytest.param(
        xfer(1, BANK, EURO, 1, asset="XYZ"), R.accounts_must_have_the_same_asset, id="assets<asset"
    ),
    pytest.param(
        xfer(1, CAROL, CAPPED, 5000), R.exceeds_credits, id="exceeds_credits<exceeds_debits"
    ),
    pytest.param(
        post(1, tid(77), 1, asset="EUR"), R.pending_transfer_not_found, id="not_found<asset"
    ),
]


@pytest.mark.parametrize(("command", "code"), ORDER_CASES)
def test_a_transfer_breaking_two_rules_gets_the_earlier_code(state, command, code):
    if code in TRANSIENT_RESULTS:
        assert_recorded(state, command, code)
    else:
        assert_rejected(state, command, code)


def test_overflow_is_checked_before_the_balance_constraint(state):
    # Alice holds AMOUNT_MAX and spends it all; one more unit both overflows her debits and
    # exceeds her credits: overflows_debits is declared first.
    accept(state, [xfer(1, BANK, ALICE, AMOUNT_MAX - ALICE_FUNDS)])
    accept(state, [xfer(2, ALICE, BOB, AMOUNT_MAX)])
    assert balances(state, ALICE) == (0, AMOUNT_MAX, 0, AMOUNT_MAX)
    assert_recorded(state, xfer(3, ALICE, BOB, 1), R.overflows_debits)


def test_resolution_checks_run_in_the_declared_order(state):
    accept(state, [xfer(1, BANK, BOB, 10, flags=F.pending), post(2, tid(1), 10)])
    # Already posted, and also a different code and too large: code is declared first.
    assert_rejected(
        state, post(3, tid(1), 11, code=CODE + 1), R.pending_transfer_has_different_code
    )
    # Already posted and too large: exceeds_pending_transfer_amount is declared first.
    assert_rejected(state, post(4, tid(1), 11), R.exceeds_pending_transfer_amount)
    # Already posted and a void of the wrong amount: the amount is declared first.
    assert_rejected(state, void(5, tid(1), 3), R.pending_transfer_has_different_amount)


# -- two-phase transfers ------------------------------------------------------------------


def test_a_pending_transfer_reserves_the_amount_without_posting_it(state):
    [fact] = accept(state, [xfer(1, ALICE, BOB, 300, flags=F.pending, timeout_s=60)])
    assert isinstance(fact, Transfer)
    assert fact.flags == F.pending
    assert fact.expires_at == T1 + timedelta(seconds=60)
    assert balances(state, ALICE) == (300, 0, 0, ALICE_FUNDS)
    assert balances(state, BOB) == (0, 0, 300, 0)
    assert state.accounts[ALICE].available == ALICE_FUNDS - 300
    assert state.accounts[ALICE].balance == ALICE_FUNDS
    assert state.pending_status(tid(1)) is PendingStatus.pending
    assert state.pending_holds() == [fact]
    assert state.next_expiry_at() == T1 + timedelta(seconds=60)


def test_a_pending_transfer_without_timeout_never_expires(state):
    [fact] = accept(state, [xfer(1, ALICE, BOB, 300, flags=F.pending)])
    assert isinstance(fact, Transfer)
    assert fact.expires_at is None
    assert state.next_expiry_at() is None
    assert state.expire_pending(T1 + timedelta(days=10_000)) == []
    assert state.pending_status(tid(1)) is PendingStatus.pending


def test_posting_a_pending_transfer_in_full_moves_the_held_amount(state):
    accept(state, [xfer(1, ALICE, BOB, 300, flags=F.pending, timeout_s=60)])
    [fact] = accept(state, [post(2, tid(1), 300)], T1 + timedelta(seconds=30))
    assert fact == Transfer(
        id=tid(2),
        debit_account_id=ALICE,
        credit_account_id=BOB,
        amount=300,
        asset=ASSET,
        code=CODE,
        flags=F.post_pending_transfer,
        pending_id=tid(1),
        timeout_s=0,
        references=(),
        effective_at=T1 + timedelta(seconds=30),
        recorded_at=T1 + timedelta(seconds=30),
    )
    assert balances(state, ALICE) == (0, 300, 0, ALICE_FUNDS)
    assert balances(state, BOB) == (0, 0, 0, 300)
    assert state.pending_status(tid(1)) is PendingStatus.posted
    assert state.pending_holds() == []
    assert state.next_expiry_at() is None
    # A posted hold does not expire later.
    assert state.expire_pending(T1 + timedelta(hours=1)) == []
    assert balances(state, ALICE) == (0, 300, 0, ALICE_FUNDS)


def test_posting_part_of_a_pending_transfer_releases_the_rest(state):
    accept(state, [xfer(1, ALICE, BOB, ALICE_FUNDS, flags=F.pending)])
    assert state.accounts[ALICE].available == 0
    accept(state, [post(2, tid(1), 400)])
    assert balances(state, ALICE) == (0, 400, 0, ALICE_FUNDS)
    assert balances(state, BOB) == (0, 0, 0, 400)
    assert state.accounts[ALICE].available == ALICE_FUNDS - 400
    assert state.transfers[tid(2)].amount == 400
    # The released 600 may be spent; one more unit may not.
    assert_recorded(state, xfer(3, ALICE, BOB, 601), R.exceeds_credits)
    accept(state, [xfer(4, ALICE, BOB, 600)])
    assert state.accounts[ALICE].available == 0


@pytest.mark.parametrize("amount", [0, 300], ids=["amount_zero", "pending_amount"])
def test_voiding_a_pending_transfer_releases_the_hold(state, amount):
    accept(state, [xfer(1, ALICE, BOB, 300, flags=F.pending, timeout_s=60)])
    [fact] = accept(state, [void(2, tid(1), amount)])
    assert isinstance(fact, Transfer)
    assert fact.amount == 300
    assert (fact.debit_account_id, fact.credit_account_id) == (ALICE, BOB)
    assert balances(state, ALICE) == (0, 0, 0, ALICE_FUNDS)
    assert balances(state, BOB) == (0, 0, 0, 0)
    assert state.pending_status(tid(1)) is PendingStatus.voided
    assert state.pending_holds() == []
    assert state.expire_pending(T1 + timedelta(hours=1)) == []


def test_a_hold_reduces_what_may_be_spent(state):
    accept(state, [xfer(1, ALICE, BOB, 800, flags=F.pending)])
    assert_recorded(state, xfer(2, ALICE, BOB, 201), R.exceeds_credits)
    assert_recorded(state, xfer(3, ALICE, BOB, 201, flags=F.pending), R.exceeds_credits)
    accept(state, [xfer(4, ALICE, BOB, 200)])
    assert state.accounts[ALICE].available == 0
    assert_recorded(state, xfer(5, ALICE, BOB, 1), R.exceeds_credits)


def test_a_hold_can_never_be_spent_twice(state):
    accept(state, [xfer(1, ALICE, BOB, 800, flags=F.pending)])
    outcomes, facts = state.create_transfers(
        [post(2, tid(1), 800), post(3, tid(1), 800), void(4, tid(1)), post(5, tid(1), 1)], T1
    )
    assert [o.result for o in outcomes] == [
        R.ok,
        R.pending_transfer_already_posted,
        R.pending_transfer_already_posted,
        R.pending_transfer_already_posted,
    ]
    assert [f.id for f in facts] == [tid(2)]
    assert balances(state, ALICE) == (0, 800, 0, ALICE_FUNDS)
    assert balances(state, BOB) == (0, 0, 0, 800)
    assert state.accounts[ALICE].available == 200
    # The posted hold is gone; what remains is exactly what was left.
    assert_recorded(state, xfer(6, ALICE, BOB, 201), R.exceeds_credits)


def test_a_partly_posted_hold_cannot_be_posted_again_for_the_rest(state):
    accept(state, [xfer(1, ALICE, BOB, 800, flags=F.pending), post(2, tid(1), 300)])
    assert_rejected(state, post(3, tid(1), 500), R.pending_transfer_already_posted)
    assert balances(state, ALICE) == (0, 300, 0, ALICE_FUNDS)


def test_a_pending_transfer_expires_exactly_at_its_timeout_when_transfers_are_created(state):
    accept(state, [xfer(1, ALICE, BOB, 300, flags=F.pending, timeout_s=60)])
    at = T1 + timedelta(seconds=60)
    outcomes, facts = state.create_transfers([post(2, tid(1), 300)], at)
    assert outcomes == [TransferOutcome(tid(2), R.pending_transfer_expired)]
    assert facts == [PendingExpiry(pending_id=tid(1), expired_at=at)]
    assert state.pending_status(tid(1)) is PendingStatus.expired
    assert balances(state, ALICE) == (0, 0, 0, ALICE_FUNDS)
    assert balances(state, BOB) == (0, 0, 0, 0)
    assert tid(2) not in state.transfers


def test_a_pending_transfer_can_still_be_posted_just_before_its_timeout(state):
    accept(state, [xfer(1, ALICE, BOB, 300, flags=F.pending, timeout_s=60)])
    at = T1 + timedelta(seconds=60) - TICK
    outcomes, facts = state.create_transfers([post(2, tid(1), 300)], at)
    assert outcomes == [TransferOutcome(tid(2), R.ok, at)]
    assert [type(f) for f in facts] == [Transfer]
    assert state.pending_status(tid(1)) is PendingStatus.posted


def test_expire_pending_releases_holds_whose_timeout_passed(state):
    accept(
        state,
        [
            xfer(1, ALICE, BOB, 300, flags=F.pending, timeout_s=60),
            xfer(2, ALICE, BOB, 200, flags=F.pending, timeout_s=120),
            xfer(3, ALICE, BOB, 100, flags=F.pending, timeout_s=30),
        ],
    )
    assert balances(state, ALICE) == (600, 0, 0, ALICE_FUNDS)
    assert state.expire_pending(T1 + timedelta(seconds=29)) == []
    later = T1 + timedelta(seconds=90)
    expired = state.expire_pending(later)
    assert expired == [
        PendingExpiry(pending_id=tid(3), expired_at=later),
        PendingExpiry(pending_id=tid(1), expired_at=later + TICK),
    ]
    assert balances(state, ALICE) == (200, 0, 0, ALICE_FUNDS)
    assert balances(state, BOB) == (0, 0, 200, 0)
    assert state.pending_status(tid(1)) is PendingStatus.expired
    assert state.pending_status(tid(2)) is PendingStatus.pending
    assert state.next_expiry_at() == T1 + TICK + timedelta(seconds=120)
    # Expiring is idempotent.
    assert state.expire_pending(later) == []
    assert_rejected(state, post(4, tid(1), 300), R.pending_transfer_expired, later)


def test_an_expired_hold_frees_the_funds_for_other_transfers(state):
    accept(state, [xfer(1, ALICE, BOB, ALICE_FUNDS, flags=F.pending, timeout_s=10)])
    assert_recorded(state, xfer(2, ALICE, BOB, 1), R.exceeds_credits)
    at = T1 + timedelta(seconds=11)
    # tid(2) is spent by its rejection: the spending transfer takes a new id.
    outcomes, facts = state.create_transfers([xfer(3, ALICE, BOB, ALICE_FUNDS)], at)
    assert outcomes == [TransferOutcome(tid(3), R.ok, at + TICK)]
    assert facts[0] == PendingExpiry(tid(1), at)
    assert isinstance(facts[1], Transfer)
    assert facts[1].id == tid(3)
    assert len(facts) == 2
    assert balances(state, ALICE) == (0, ALICE_FUNDS, 0, ALICE_FUNDS)


def test_a_pending_timeout_counts_from_its_recorded_at(state):
    # Two pendings in one batch: the second is recorded one tick later, so expires later.
    accept(
        state,
        [
            xfer(1, BANK, BOB, 1, flags=F.pending, timeout_s=60),
            xfer(2, BANK, BOB, 1, flags=F.pending, timeout_s=60),
        ],
    )
    at = T1 + timedelta(seconds=60)
    assert state.expire_pending(at) == [PendingExpiry(tid(1), at)]
    assert state.pending_status(tid(2)) is PendingStatus.pending
    assert state.expire_pending(at + TICK) == [PendingExpiry(tid(2), at + TICK)]


# -- linked chains ------------------------------------------------------------------------


def test_a_linked_chain_applies_in_full_when_every_transfer_is_valid(state):
    outcomes, facts = state.create_transfers(
        [
            xfer(1, ALICE, BOB, 100, flags=F.linked),
            xfer(2, BOB, CAPPED, 50, flags=F.linked),
            xfer(3, BOB, BANK, 25),
        ],
        T1,
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.ok, T1),
        TransferOutcome(tid(2), R.ok, T1 + TICK),
        TransferOutcome(tid(3), R.ok, T1 + 2 * TICK),
    ]
    assert [f.id for f in facts] == [tid(1), tid(2), tid(3)]
    assert balances(state, BOB) == (0, 75, 0, 100)


def test_a_linked_chain_whose_last_transfer_fails_applies_nothing(state):
    before = snapshot(state)
    outcomes, facts = state.create_transfers(
        [
            xfer(1, BANK, BOB, 100, flags=F.linked),
            xfer(2, BOB, ALICE, 50, flags=F.linked),
            xfer(3, ALICE, BOB, 5000),
        ],
        T1,
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.linked_event_failed),
        TransferOutcome(tid(2), R.linked_event_failed),
        TransferOutcome(tid(3), R.exceeds_credits, T1),
    ]
    # Only the failing member's rejection is recorded, at the time the chain started.
    rejection = Rejection(xfer(3, ALICE, BOB, 5000), R.exceeds_credits, T1)
    assert facts == [rejection]
    assert snapshot(state) == with_rejection(before, rejection)


def test_a_linked_chain_failing_in_the_middle_fails_the_rest_with_linked_event_failed(state):
    before = snapshot(state)
    outcomes, facts = state.create_transfers(
        [
            xfer(1, BANK, BOB, 100, flags=F.linked),
            xfer(2, BOB, BOB, 50, flags=F.linked),
            xfer(3, BOB, ALICE, 5),
        ],
        T1,
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.linked_event_failed),
        TransferOutcome(tid(2), R.accounts_must_be_different),
        TransferOutcome(tid(3), R.linked_event_failed),
    ]
    assert facts == []
    assert snapshot(state) == before


def test_a_failed_chain_undoes_a_pending_transfer_and_its_post_made_inside_it(state):
    before = snapshot(state)
    outcomes, facts = state.create_transfers(
        [
            xfer(1, ALICE, BOB, 300, flags=F.pending | F.linked, timeout_s=60),
            xfer(
                2, NIL_ID, NIL_ID, 200, flags=F.post_pending_transfer | F.linked, pending_id=tid(1)
            ),
            xfer(3, CAROL, BOB, 1),
        ],
        T1,
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.linked_event_failed),
        TransferOutcome(tid(2), R.linked_event_failed),
        TransferOutcome(tid(3), R.exceeds_credits, T1),
    ]
    rejection = Rejection(xfer(3, CAROL, BOB, 1), R.exceeds_credits, T1)
    assert facts == [rejection]
    assert snapshot(state) == with_rejection(before, rejection)
    assert state.pending_status(tid(1)) is None
    assert state.expire_pending(T1 + timedelta(hours=1)) == []


def test_transfers_before_a_failed_chain_in_the_same_batch_still_apply(state):
    outcomes, facts = state.create_transfers(
        [
            xfer(1, BANK, BOB, 10),
            xfer(2, BANK, BOB, 20, flags=F.linked),
            xfer(3, MISSING, BOB, 30),
        ],
        T1,
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.ok, T1),
        TransferOutcome(tid(2), R.linked_event_failed),
        TransferOutcome(tid(3), R.debit_account_not_found, T1 + TICK),
    ]
    assert facts == [
        state.transfers[tid(1)],
        Rejection(xfer(3, MISSING, BOB, 30), R.debit_account_not_found, T1 + TICK),
    ]
    assert set(state.transfers) == {FUND_ALICE, FUND_CAPPED, tid(1)}
    assert set(state.rejected) == {tid(3)}
    assert state.last_recorded_at == T1 + TICK
    assert balances(state, BOB) == (0, 0, 0, 10)


def test_a_transfer_after_a_failed_chain_in_the_same_batch_is_judged_on_its_own(state):
    outcomes, facts = state.create_transfers(
        [
            xfer(1, BANK, BOB, 20, flags=F.linked),
            xfer(2, BOB, BOB, 30),
            xfer(3, BANK, BOB, 10),
        ],
        T1,
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.linked_event_failed),
        TransferOutcome(tid(2), R.accounts_must_be_different),
        TransferOutcome(tid(3), R.ok, T1),
    ]
    assert [f.id for f in facts] == [tid(3)]
    assert balances(state, BOB) == (0, 0, 0, 10)


def test_a_chain_after_a_failed_chain_in_the_same_batch_is_judged_on_its_own(state):
    outcomes, facts = state.create_transfers(
        [
            xfer(1, BANK, BOB, 20, flags=F.linked),
            xfer(2, BOB, BOB, 30),
            xfer(3, BANK, BOB, 10, flags=F.linked),
            xfer(4, BOB, ALICE, 5),
        ],
        T1,
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.linked_event_failed),
        TransferOutcome(tid(2), R.accounts_must_be_different),
        TransferOutcome(tid(3), R.ok, T1),
        TransferOutcome(tid(4), R.ok, T1 + TICK),
    ]
    assert [f.id for f in facts] == [tid(3), tid(4)]
    assert balances(state, BOB) == (0, 5, 0, 10)


def test_a_chain_left_open_at_the_end_of_a_batch_fails_with_linked_event_chain_open(state):
    outcomes, facts = state.create_transfers(
        [
            xfer(1, BANK, BOB, 10),
            xfer(2, BANK, BOB, 20, flags=F.linked),
            xfer(3, BANK, BOB, 30, flags=F.linked),
        ],
        T1,
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.ok, T1),
        TransferOutcome(tid(2), R.linked_event_failed),
        TransferOutcome(tid(3), R.linked_event_chain_open),
    ]
    assert [f.id for f in facts] == [tid(1)]
    assert balances(state, BOB) == (0, 0, 0, 10)
    assert set(state.transfers) == {FUND_ALICE, FUND_CAPPED, tid(1)}


def test_a_single_linked_transfer_is_an_open_chain(state):
    assert_rejected(state, xfer(1, BANK, BOB, 10, flags=F.linked), R.linked_event_chain_open)


def test_expiries_due_before_a_failed_chain_are_kept(state):
    accept(state, [xfer(1, ALICE, BOB, 300, flags=F.pending, timeout_s=60)])
    at = T1 + timedelta(minutes=5)
    outcomes, facts = state.create_transfers(
        [xfer(2, BANK, BOB, 5, flags=F.linked), xfer(3, BOB, BOB, 5)], at
    )
    assert [o.result for o in outcomes] == [R.linked_event_failed, R.accounts_must_be_different]
    assert facts == [PendingExpiry(tid(1), at)]
    assert state.pending_status(tid(1)) is PendingStatus.expired
    assert balances(state, ALICE) == (0, 0, 0, ALICE_FUNDS)


# -- recorded rejections: a refused transfer's id is spent ----------------------------------


def test_the_codes_recorded_as_rejections_are_exactly_those_that_depend_on_the_state():
    assert {
        R.debit_account_not_found,
        R.credit_account_not_found,
        R.pending_transfer_not_found,
        R.overflows_debits,
        R.overflows_credits,
        R.exceeds_credits,
        R.exceeds_debits,
    } == TRANSIENT_RESULTS


def test_a_retried_refused_transfer_gets_the_original_code_and_recorded_at_even_after_the_funds_arrived(
    state,
):
    command = xfer(1, CAROL, BOB, 50)
    assert state.create_transfers([command], T1) == (
        [TransferOutcome(tid(1), R.exceeds_credits, T1)],
        [Rejection(command, R.exceeds_credits, T1)],
    )
    funded_at = T1 + timedelta(minutes=1)
    accept(state, [xfer(2, BANK, CAROL, 500)], funded_at)
    assert state.accounts[CAROL].available == 500
    funded = snapshot(state)

    later = T1 + timedelta(days=1)
    assert state.create_transfers([command], later) == (
        [TransferOutcome(tid(1), R.exceeds_credits, T1)],
        [],
    )
    assert snapshot(state) == funded
    assert balances(state, CAROL) == (0, 0, 0, 500)
    # The funds are there: the same transfer under a fresh id goes through.
    outcomes, _facts = state.create_transfers([xfer(3, CAROL, BOB, 50)], later)
    assert outcomes == [TransferOutcome(tid(3), R.ok, later)]
    assert balances(state, CAROL) == (0, 50, 0, 500)


def _refuse_unknown_debit(state: LedgerState) -> NewTransfer:
    return xfer(1, UUID(int=60), BOB, 5)


def _refuse_unknown_credit(state: LedgerState) -> NewTransfer:
    return xfer(1, BANK, UUID(int=60), 5)


def _open_the_unknown_account(state: LedgerState) -> None:
    open_plain(state, 60)


def _refuse_unknown_pending(state: LedgerState) -> NewTransfer:
    return post(1, tid(51), 5)


def _create_the_pending(state: LedgerState) -> None:
    accept(state, [xfer(51, BANK, BOB, 5, flags=F.pending)])


def _refuse_overflowing_debits(state: LedgerState) -> NewTransfer:
    x, y, z = open_plain(state, 60, 61, 62)
    accept(state, [xfer(51, x, y, AMOUNT_MAX - 10), xfer(52, x, z, 5, flags=F.pending)])
    return xfer(1, x, z, 6)


def _refuse_overflowing_credits(state: LedgerState) -> NewTransfer:
    x, y, z, w = open_plain(state, 60, 61, 62, 63)
    accept(state, [xfer(51, x, y, AMOUNT_MAX - 10), xfer(52, z, y, 5, flags=F.pending)])
    return xfer(1, w, y, 6)


def _void_the_pending(state: LedgerState) -> None:
    accept(state, [void(53, tid(52))])


def _refuse_overdraft(state: LedgerState) -> NewTransfer:
    return xfer(1, CAROL, BOB, 5)


def _fund_carol(state: LedgerState) -> None:
    accept(state, [xfer(51, BANK, CAROL, 5)])


def _refuse_overcredit(state: LedgerState) -> NewTransfer:
    return xfer(1, BANK, CAPPED, CAPPED_DEBITS + 1)


def _debit_capped(state: LedgerState) -> None:
    accept(state, [xfer(51, CAPPED, BANK, 1)])


REFUSALS = [
    pytest.param(
        _refuse_unknown_debit, R.debit_account_not_found, _open_the_unknown_account, id="debit"
    ),
    pytest.param(
        _refuse_unknown_credit, R.credit_account_not_found, _open_the_unknown_account, id="credit"
    ),
    pytest.param(
        _refuse_unknown_pending, R.pending_transfer_not_found, _create_the_pending, id="pending"
    ),
    pytest.param(
        _refuse_overflowing_debits, R.overflows_debits, _void_the_pending, id="overflows_debits"
    ),
    pytest.param(
        _refuse_overflowing_credits, R.overflows_credits, _void_the_pending, id="overflows_credits"
    ),
    pytest.param(_refuse_overdraft, R.exceeds_credits, _fund_carol, id="exceeds_credits"),
    pytest.param(_refuse_overcredit, R.exceeds_debits, _debit_capped, id="exceeds_debits"),
]


@pytest.mark.parametrize(("refuse", "code", "change"), REFUSALS)
def test_a_refused_transfer_retried_after_the_state_changed_still_gets_its_original_answer(
    state, refuse, code, change
):
    command = refuse(state)
    rejection = assert_recorded(state, command, code)
    change(state)
    changed = snapshot(state)

    later = T1 + timedelta(days=1)
    outcomes, facts = state.create_transfers([command], later)
    assert outcomes == [TransferOutcome(command.id, code, rejection.recorded_at)]
    assert facts == []
    assert snapshot(state) == changed
    # The change is real: the same transfer under a fresh id is accepted now.
    accept(state, [replace(command, id=tid(2))], later)


@pytest.fixture
def refused(state: LedgerState) -> LedgerState:
    """State with three refused transfers, recorded at T1: tid(1) a plain overdraft of Carol
    with references, tid(2) a post of an unknown pending, tid(3) a pending overdraft with a
    timeout."""
    outcomes, facts = state.create_transfers(
        [
            xfer(1, CAROL, BOB, 50, references=(("lease", "L-1"),)),
            post(2, tid(77), 5),
            xfer(3, CAROL, BOB, 70, flags=F.pending, timeout_s=3600),
        ],
        T1,
    )
    assert [o.result for o in outcomes] == [
        R.exceeds_credits,
        R.pending_transfer_not_found,
        R.exceeds_credits,
    ]
    assert [type(f) for f in facts] == [Rejection] * 3
    state.commit()
    return state


def test_a_refused_transfer_retried_with_a_different_amount_gets_exists_with_different_amount(
    refused,
):
    original = refused.rejected[tid(1)]
    assert_rejected(
        refused,
        xfer(1, CAROL, BOB, 51, references=(("lease", "L-1"),)),
        R.exists_with_different_amount,
    )
    # Even once the transfer would fit: the id is spent.
    accept(refused, [xfer(4, BANK, CAROL, 1000)])
    assert_rejected(
        refused,
        xfer(1, CAROL, BOB, 40, references=(("lease", "L-1"),)),
        R.exists_with_different_amount,
    )
    assert refused.rejected[tid(1)] == original
    assert tid(1) not in refused.transfers


REFUSED_RETRIES = [
    pytest.param(
        xfer(1, CAROL, BOB, 50, flags=F.pending, references=(("lease", "L-1"),)),
        R.exists_with_different_flags,
        id="flags",
    ),
    pytest.param(
        xfer(1, ALICE, BOB, 50, references=(("lease", "L-1"),)),
        R.exists_with_different_debit_account_id,
        id="debit_account_id",
    ),
    pytest.param(
        xfer(1, CAROL, BANK, 50, references=(("lease", "L-1"),)),
        R.exists_with_different_credit_account_id,
        id="credit_account_id",
    ),
    pytest.param(post(2, tid(78), 5), R.exists_with_different_pending_id, id="pending_id"),
    pytest.param(
        xfer(3, CAROL, BOB, 70, flags=F.pending, timeout_s=3601),
        R.exists_with_different_timeout,
        id="timeout",
    ),
    pytest.param(
        xfer(1, CAROL, BOB, 50, asset="EUR", references=(("lease", "L-1"),)),
        R.exists_with_different_asset,
        id="asset",
    ),
    pytest.param(
        xfer(1, CAROL, BOB, 50, code=CODE + 1, references=(("lease", "L-1"),)),
        R.exists_with_different_code,
        id="code",
    ),
    pytest.param(
        xfer(1, CAROL, BOB, 50, references=(("lease", "L-2"),)),
        R.exists_with_different_references,
        id="references",
    ),
    pytest.param(xfer(1, CAROL, BOB, 50), R.exists_with_different_references, id="no_references"),
    pytest.param(
        xfer(1, CAROL, BOB, 50, references=(("lease", "L-1"),), effective_at=T0),
        R.exists_with_different_effective_at,
        id="effective_at",
    ),
]


@pytest.mark.parametrize(("command", "code"), REFUSED_RETRIES)
def test_a_refused_transfer_retried_with_another_field_gets_exists_with_different_that_field(
    refused, command, code
):
    assert_rejected(refused, command, code)


def test_a_retry_of_a_refused_transfer_that_differs_in_many_fields_reports_the_first_in_declared_order(
    refused,
):
    # Differs in credit account, amount, asset, code and references: credit comes first.
    assert_rejected(
        refused,
        xfer(1, CAROL, ALICE, 7, asset="EUR", code=3),
        R.exists_with_different_credit_account_id,
    )
    # Differs in amount, code and references: amount comes first.
    assert_rejected(refused, xfer(1, CAROL, BOB, 7, code=3), R.exists_with_different_amount)
    # Differs in timeout and code: timeout comes first.
    assert_rejected(
        refused,
        xfer(3, CAROL, BOB, 70, flags=F.pending, timeout_s=5, code=3),
        R.exists_with_different_timeout,
    )


def test_the_refused_id_check_comes_after_field_validation(refused):
    assert_rejected(
        refused, xfer(1, CAROL, BOB, 0, references=(("lease", "L-1"),)), R.amount_must_not_be_zero
    )


def test_an_identical_refused_transfer_twice_in_one_batch_is_recorded_once(state):
    command = xfer(1, CAROL, BOB, 5)
    outcomes, facts = state.create_transfers([command, command], T1)
    assert outcomes == [TransferOutcome(tid(1), R.exceeds_credits, T1)] * 2
    assert facts == [Rejection(command, R.exceeds_credits, T1)]


def test_a_refused_id_stays_refused_when_the_state_changes_later_in_the_same_batch(state):
    command = xfer(1, CAROL, BOB, 5)
    outcomes, facts = state.create_transfers([command, xfer(2, BANK, CAROL, 5), command], T1)
    assert outcomes == [
        TransferOutcome(tid(1), R.exceeds_credits, T1),
        TransferOutcome(tid(2), R.ok, T1 + TICK),
        TransferOutcome(tid(1), R.exceeds_credits, T1),
    ]
    assert facts == [Rejection(command, R.exceeds_credits, T1), state.transfers[tid(2)]]
    assert balances(state, CAROL) == (0, 0, 0, 5)


@pytest.fixture
def resolved(state: LedgerState) -> LedgerState:
    """State with tid(50) a posted pending (posted by tid(51)) and tid(52) a plain transfer."""
    accept(
        state,
        [
            xfer(50, BANK, BOB, 10, flags=F.pending),
            post(51, tid(50), 10),
            xfer(52, BANK, BOB, 10),
        ],
    )
    state.commit()
    return state


NON_TRANSIENT = [
    pytest.param(xfer(1, BOB, BOB, 5), R.accounts_must_be_different, id="same_accounts"),
    pytest.param(xfer(1, BANK, BOB, 0), R.amount_must_not_be_zero, id="amount_zero"),
    pytest.param(xfer(1, BANK, EURO, 5), R.accounts_must_have_the_same_asset, id="assets"),
    pytest.param(xfer(1, BANK, BOB, 5, flags=F.linked), R.linked_event_chain_open, id="open"),
    pytest.param(post(1, tid(50), 10), R.pending_transfer_already_posted, id="posted"),
    pytest.param(post(1, tid(52), 10), R.pending_transfer_not_pending, id="not_pending"),
    pytest.param(xfer(51, BANK, BOB, 5), R.exists_with_different_flags, id="exists"),
]


@pytest.mark.parametrize(("command", "code"), NON_TRANSIENT)
def test_a_non_transient_rejection_records_nothing_and_the_id_may_be_used_again(
    resolved, command, code
):
    assert_rejected(resolved, command, code)
    # Asked again, it answers the same, and still records nothing.
    assert_rejected(resolved, command, code, T1 + timedelta(days=1))
    if command.id not in resolved.transfers:
        later = T1 + timedelta(days=2)
        outcomes, _facts = resolved.create_transfers([xfer(command.id, BANK, BOB, 5)], later)
        assert outcomes == [TransferOutcome(command.id, R.ok, later)]


def test_a_failing_chain_records_only_the_failing_member(state):
    before = snapshot(state)
    chain = [
        xfer(1, BANK, BOB, 100, flags=F.linked),
        xfer(2, CAROL, BOB, 5, flags=F.linked),
        xfer(3, BOB, BANK, 1),
    ]
    outcomes, facts = state.create_transfers(chain, T1)
    assert outcomes == [
        TransferOutcome(tid(1), R.linked_event_failed),
        TransferOutcome(tid(2), R.exceeds_credits, T1),
        TransferOutcome(tid(3), R.linked_event_failed),
    ]
    rejection = Rejection(chain[1], R.exceeds_credits, T1)
    assert facts == [rejection]
    assert state.rejected == {tid(2): rejection}
    assert snapshot(state) == with_rejection(before, rejection)

    # Carol is funded; the same chain sent again still fails on its spent member, as before.
    accept(state, [xfer(4, BANK, CAROL, 5)], T1 + timedelta(minutes=1))
    funded = snapshot(state)
    later = T1 + timedelta(days=1)
    assert state.create_transfers(chain, later) == (outcomes, [])
    assert snapshot(state) == funded
    # The other members' ids were not spent.
    outcomes, _facts = state.create_transfers(
        [xfer(1, BANK, BOB, 100), xfer(3, BOB, BANK, 1)], later
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.ok, later),
        TransferOutcome(tid(3), R.ok, later + TICK),
    ]


def test_a_chain_failing_on_a_spent_id_with_other_fields_records_nothing(state):
    assert_recorded(state, xfer(2, CAROL, BOB, 5), R.exceeds_credits)
    before = snapshot(state)
    outcomes, facts = state.create_transfers(
        [xfer(1, BANK, BOB, 100, flags=F.linked), xfer(2, CAROL, BOB, 6)], T1
    )
    assert outcomes == [
        TransferOutcome(tid(1), R.linked_event_failed),
        TransferOutcome(tid(2), R.exists_with_different_amount),
    ]
    assert facts == []
    assert snapshot(state) == before


def test_rolling_back_undoes_a_recorded_rejection_and_its_clock_tick(state):
    before = snapshot(state)
    mark = state.mark()
    command = xfer(1, CAROL, BOB, 5)
    assert_recorded(state, command, R.exceeds_credits)
    state.rollback(mark)
    assert snapshot(state) == before
    assert tid(1) not in state.rejected
    # Decided again from scratch, it is recorded anew at the later time.
    later = T1 + timedelta(seconds=1)
    assert assert_recorded(state, command, R.exceeds_credits, later).recorded_at == later


@pytest.mark.parametrize(("refuse", "code", "change"), REFUSALS)
def test_a_recorded_rejection_belongs_to_the_shard_whose_state_recorded_it(
    state, refuse, code, change
):
    command = refuse(state)
    rejection = assert_recorded(state, command, code)
    assert rejection.shard == 0
    assert state.owns(rejection)
    # A state of another shard does not take it.
    other = LedgerState(shard=1)
    other.open_accounts([NewAccount(UUID(int=500), ASSET, 1, shard=1)], T0)
    assert not other.owns(rejection)


def test_a_rejection_read_back_from_its_event_is_the_same_fact():
    full = Rejection(
        xfer(
            1,
            ALICE,
            BOB,
            AMOUNT_MAX,
            flags=F.pending | F.linked,
            timeout_s=60,
            references=(("lease", "L-1"), ("epoch", "7")),
            effective_at=T0,
        ),
        R.overflows_debits,
        T1,
    )
    minimal = Rejection(xfer(2, MISSING, BOB, 1), R.debit_account_not_found, T1 + TICK)
    resolving = Rejection(void(3, tid(77)), R.pending_transfer_not_found, T1 + 2 * TICK)
    for rejection in (full, minimal, resolving):
        event = event_for(rejection)
        assert (event.originator_id, event.originator_version) == (rejection.transfer.id, 1)
        assert event.timestamp == rejection.recorded_at
        assert event.to_fact() == rejection
        stored = orjson.loads(orjson.dumps(event.to_state()))
        assert type(event).from_state(rejection.transfer.id, 1, stored).to_fact() == rejection


# -- rollback -------------------------------------------------------------------------------


def test_rollback_to_a_mark_restores_the_state_exactly(state):
    accept(state, [xfer(1, ALICE, BOB, 100, flags=F.pending, timeout_s=30)])
    accept(state, [xfer(2, ALICE, BOB, 100, flags=F.pending, timeout_s=600)])
    state.commit()
    before = snapshot(state)
    mark = state.mark()

    state.open_accounts([NewAccount(UUID(int=60), ASSET, 1)], T1)
    later = T1 + timedelta(minutes=1)
    outcomes, facts = state.create_transfers(
        [
            xfer(3, UUID(int=60), ALICE, 500),
            xfer(4, ALICE, BOB, 900, flags=F.pending, timeout_s=10),
            post(5, tid(2), 50),
            xfer(6, BANK, CAPPED, 10),
        ],
        later,
    )
    assert [o.result for o in outcomes] == [R.ok] * 4
    assert isinstance(facts[0], PendingExpiry)  # tid(1) expired on the way
    assert state.next_expiry_at() == later + 2 * TICK + timedelta(seconds=10)
    state.expire_pending(later + timedelta(hours=1))
    assert snapshot(state) != before

    state.rollback(mark)
    assert snapshot(state) == before
    assert state.mark() == mark
    assert state.pending_status(tid(1)) is PendingStatus.pending
    assert state.pending_status(tid(4)) is None
    assert UUID(int=60) not in state.accounts
    # And the restored state decides as before: tid(1) still expires at T1 + 30 s.
    assert state.next_expiry_at() == T1 + timedelta(seconds=30)
    assert state.expire_pending(T1 + timedelta(seconds=30)) == [
        PendingExpiry(tid(1), T1 + timedelta(seconds=30))
    ]


def test_rollback_to_a_nested_mark_keeps_what_came_before_it(state):
    accept(state, [xfer(1, BANK, BOB, 10)])
    middle = snapshot(state)
    mark = state.mark()
    accept(state, [xfer(2, BANK, BOB, 20), xfer(3, BOB, ALICE, 5)], T1 + timedelta(seconds=1))
    state.rollback(mark)
    assert snapshot(state) == middle
    state.rollback()
    assert balances(state, BOB) == (0, 0, 0, 0)
    assert tid(1) not in state.transfers


def test_rollback_after_commit_undoes_nothing(state):
    accept(state, [xfer(1, BANK, BOB, 10)])
    state.commit()
    before = snapshot(state)
    state.rollback()
    assert snapshot(state) == before


# -- replay ---------------------------------------------------------------------------------


def _scenario() -> tuple[LedgerState, list[Fact]]:
    """Every kind of fact, and rejected commands: a state-dependent rejection leaves exactly
    its Rejection fact, any other rejection leaves no trace."""
    s = LedgerState()
    facts: list[Fact] = []
    results, opened = s.open_accounts(
        [
            NewAccount(BANK, ASSET, 1),
            NewAccount(ALICE, ASSET, 2, AccountFlags.debits_must_not_exceed_credits),
            NewAccount(BOB, ASSET, 2),
            NewAccount(CAPPED, ASSET, 3, AccountFlags.credits_must_not_exceed_debits),
            NewAccount(EURO, "EUR", 2),
            NewAccount(EURO2, "EUR", 2),
            NewAccount(BOB, "EUR", 2),  # rejected
        ],
        T0,
    )
    assert results[-1] is A.exists_with_different_asset
    facts += opened
    steps = [
        (
            [
                xfer(1, BANK, ALICE, 1000),
                xfer(2, CAPPED, BANK, 100),
                xfer(3, EURO, EURO2, 7, asset="EUR", references=(("k", "v"),)),
                xfer(4, ALICE, BOB, 5000),  # refused: recorded
            ],
            T1,
        ),
        (
            [
                xfer(5, ALICE, BOB, 300, flags=F.pending, timeout_s=60),
                xfer(6, ALICE, BOB, 200, flags=F.pending, timeout_s=600),
                xfer(7, ALICE, BOB, 100, flags=F.pending),
                xfer(8, BANK, CAPPED, 40, effective_at=T0),
            ],
            T1 + timedelta(seconds=1),
        ),
        ([post(9, tid(6), 150), void(10, tid(7))], T1 + timedelta(seconds=2)),
        (
            [
                xfer(11, BANK, BOB, 1, flags=F.linked),
                xfer(12, BOB, BOB, 1),  # the chain fails
            ],
            T1 + timedelta(seconds=3),
        ),
        ([xfer(13, ALICE, BOB, 10), xfer(1, BANK, ALICE, 1000)], T1 + timedelta(minutes=2)),
        (
            [
                xfer(17, MISSING, BOB, 1),  # refused: recorded
                post(18, tid(77), 1),  # refused: recorded
                xfer(4, ALICE, BOB, 5000),  # a retry of a refused transfer: records nothing
            ],
            T1 + timedelta(minutes=3),
        ),
    ]
    for commands, now in steps:
        _outcomes, new = s.create_transfers(commands, now)
        facts += new
    facts += s.expire_pending(T1 + timedelta(hours=1))
    s.commit()
    assert sum(isinstance(f, PendingExpiry) for f in facts) == 1
    assert [f for f in facts if isinstance(f, Rejection)] == [
        Rejection(xfer(4, ALICE, BOB, 5000), R.exceeds_credits, T1 + 3 * TICK),
        Rejection(xfer(17, MISSING, BOB, 1), R.debit_account_not_found, T1 + timedelta(minutes=3)),
        Rejection(
            post(18, tid(77), 1), R.pending_transfer_not_found, T1 + timedelta(minutes=3) + TICK
        ),
    ]
    return s, facts


def _state_view(state: LedgerState) -> tuple[object, ...]:
    """(accounts, transfers, pending statuses, rejections, clock, trial balance)."""
    return (*snapshot(state)[:4], state.last_recorded_at, state.trial_balance())


def test_replaying_the_facts_as_returned_reproduces_identical_balances():
    live, facts = _scenario()
    expected = _state_view(live)
    rebuilt = replay(facts)
    assert _state_view(rebuilt) == expected
    assert _state_view(live) == expected


def test_replaying_the_facts_as_read_back_from_the_log_reproduces_identical_state():
    live, facts = _scenario()
    expected = _state_view(live)
    logged = [event_for(f).to_fact() for f in facts]
    rebuilt = replay(logged)
    assert _state_view(rebuilt) == expected
    assert balances(rebuilt, ALICE) == (0, 160, 0, 1000)
    assert balances(rebuilt, BOB) == (0, 0, 0, 160)
    assert rebuilt.pending_status(tid(5)) is PendingStatus.expired
    assert rebuilt.pending_status(tid(6)) is PendingStatus.posted
    assert rebuilt.pending_status(tid(7)) is PendingStatus.voided
    assert rebuilt.trial_balance() == {ASSET: (1000 + 100 + 40 + 160,) * 2, "EUR": (7, 7)}
    assert set(rebuilt.rejected) == {tid(4), tid(17), tid(18)}
    # The rebuilt state decides exactly as the live one would.
    later = T1 + timedelta(hours=2)
    commands = [
        xfer(1, BANK, ALICE, 1000),
        post(14, tid(5), 1),
        xfer(15, ALICE, BOB, 841),
        xfer(16, ALICE, BOB, 840),
        xfer(4, ALICE, BOB, 5000),
        xfer(4, ALICE, BOB, 10),
        xfer(17, MISSING, BOB, 1),
        post(18, tid(77), 1),
    ]
    rebuilt_outcomes, rebuilt_facts = rebuilt.create_transfers(commands, later)
    live_outcomes, live_facts = live.create_transfers(commands, later)
    assert rebuilt_outcomes == live_outcomes
    assert rebuilt_facts == live_facts
    assert rebuilt_outcomes[4:] == [
        TransferOutcome(tid(4), R.exceeds_credits, T1 + 3 * TICK),
        TransferOutcome(tid(4), R.exists_with_different_amount),
        TransferOutcome(tid(17), R.debit_account_not_found, T1 + timedelta(minutes=3)),
        TransferOutcome(tid(18), R.pending_transfer_not_found, T1 + timedelta(minutes=3) + TICK),
    ]
    assert _state_view(rebuilt) == _state_view(live)


@pytest.mark.parametrize("amount", [1.5, 10.0, True, "100"])
def test_an_amount_that_is_not_an_int_is_refused_before_it_reaches_the_ledger(amount):
    with pytest.raises(TypeError, match="amount must be an int"):
        NewTransfer(UUID(int=1), BANK, BOB, amount, ASSET, CODE)


def test_an_id_that_is_not_a_uuid_is_refused_before_it_reaches_the_ledger():
    with pytest.raises(TypeError, match="debit_account_id must be a UUID"):
        NewTransfer(UUID(int=1), "bank", BOB, 1, ASSET, CODE)
