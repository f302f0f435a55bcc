"""Consumer deposits confirmed from the chain (domain.funds). Pure: no database, no clock.

Every result code of `confirm_deposit` has a test asserting the exact code, and each rule is
checked with every later rule broken too, so the order the rules are checked in is pinned.
A refusal records nothing.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest

from domain.funds import (
    REFERENCE_LENGTH_MAX,
    ConfirmDepositResult,
    DepositConfirmed,
    confirm_deposit,
)
from ledger.limits import AMOUNT_MAX

R = ConfirmDepositResult
T0 = datetime(2026, 11, 23, 18, 0, tzinfo=UTC)
DEPOSIT = UUID(int=0xDE1)
CONSUMER = UUID(int=0xC1)
OTHER_CONSUMER = UUID(int=0xC2)
ZERO = UUID(int=0)
REFERENCE = "0x" + "ab" * 32 + ":7"


def confirm(
    confirmed: dict[UUID, DepositConfirmed] | None = None,
    deposit_id: UUID = DEPOSIT,
    consumer_id: UUID = CONSUMER,
    amount: int = 1_000,
    reference: str = REFERENCE,
    now: datetime = T0,
) -> tuple[ConfirmDepositResult, tuple[DepositConfirmed, ...]]:
    return confirm_deposit(confirmed or {}, deposit_id, consumer_id, amount, reference, now)


def confirmed_once() -> dict[UUID, DepositConfirmed]:
    result, (fact,) = confirm()
    assert result is R.ok
    return {fact.deposit_id: fact}


# -- ok -----------------------------------------------------------------------------------


def test_a_new_deposit_is_confirmed_with_its_fields_and_now():
    result, facts = confirm()
    assert result is R.ok
    assert facts == (DepositConfirmed(DEPOSIT, CONSUMER, 1_000, REFERENCE, T0),)


def test_the_fact_is_immutable():
    _, (fact,) = confirm()
    with pytest.raises(FrozenInstanceError):
        fact.amount = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("amount", "reference"),
    [(1, "x"), (AMOUNT_MAX, "r" * REFERENCE_LENGTH_MAX)],
)
def test_the_bounds_themselves_are_accepted(amount, reference):
    result, (fact,) = confirm(amount=amount, reference=reference)
    assert result is R.ok
    assert (fact.amount, fact.reference) == (amount, reference)


def test_the_result_codes_are_numbered_in_the_order_they_are_checked():
    assert [code.value for code in R] == list(range(len(R)))
    assert [code.name for code in R] == [
        "ok",
        "deposit_id_must_not_be_zero",
        "consumer_id_must_not_be_zero",
        "amount_must_not_be_negative",
        "amount_must_not_be_zero",
        "amount_exceeds_max",
        "reference_must_not_be_empty",
        "reference_exceeds_max_length",
        "exists_with_different_fields",
    ]


# -- every refusal, in order --------------------------------------------------------------

TOO_LONG = "r" * (REFERENCE_LENGTH_MAX + 1)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # Each case also breaks every rule checked after it: the first broken rule answers.
        (
            {"deposit_id": ZERO, "consumer_id": ZERO, "amount": -1, "reference": ""},
            R.deposit_id_must_not_be_zero,
        ),
        ({"consumer_id": ZERO, "amount": -1, "reference": ""}, R.consumer_id_must_not_be_zero),
        ({"amount": -1, "reference": ""}, R.amount_must_not_be_negative),
        ({"amount": -(AMOUNT_MAX + 5), "reference": TOO_LONG}, R.amount_must_not_be_negative),
        ({"amount": 0, "reference": ""}, R.amount_must_not_be_zero),
        ({"amount": AMOUNT_MAX + 1, "reference": ""}, R.amount_exceeds_max),
        ({"reference": ""}, R.reference_must_not_be_empty),
        ({"reference": TOO_LONG}, R.reference_exceeds_max_length),
    ],
)
def test_each_refusal_records_nothing_and_the_first_broken_rule_answers(kwargs, expected):
    # Against a deposit already confirmed with other fields: the field checks come first.
    assert confirm(confirmed_once(), **kwargs) == (expected, ())
    assert confirm(**kwargs) == (expected, ())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"consumer_id": OTHER_CONSUMER},
        {"amount": 1_001},
        {"reference": REFERENCE + "0"},
        {"consumer_id": OTHER_CONSUMER, "amount": 1, "reference": "elsewhere"},
    ],
)
def test_the_same_deposit_id_with_other_fields_is_refused(kwargs):
    assert confirm(confirmed_once(), **kwargs) == (R.exists_with_different_fields, ())


# -- idempotency --------------------------------------------------------------------------


def test_confirming_the_same_deposit_again_is_ok_and_records_nothing_new():
    confirmed = confirmed_once()
    before = dict(confirmed)
    assert confirm(confirmed) == (R.ok, ())
    # Even later: the confirmation time is not part of what names the deposit.
    assert confirm(confirmed, now=T0 + timedelta(days=3)) == (R.ok, ())
    assert confirmed == before


def test_another_deposit_id_with_equal_fields_is_a_second_deposit():
    confirmed = confirmed_once()
    other = UUID(int=0xDE2)
    result, (fact,) = confirm(confirmed, deposit_id=other)
    assert result is R.ok
    assert fact == DepositConfirmed(other, CONSUMER, 1_000, REFERENCE, T0)


def test_a_caller_that_folds_the_facts_in_gets_the_same_answers():
    confirmed: dict[UUID, DepositConfirmed] = {}
    answers = []
    for deposit_id, amount in [(1, 10), (2, 20), (1, 10), (1, 11), (3, 0), (2, 20)]:
        result, facts = confirm(confirmed, deposit_id=UUID(int=deposit_id), amount=amount)
        confirmed.update((f.deposit_id, f) for f in facts)
        answers.append((result, len(facts)))
    assert answers == [
        (R.ok, 1),
        (R.ok, 1),
        (R.ok, 0),
        (R.exists_with_different_fields, 0),
        (R.amount_must_not_be_zero, 0),
        (R.ok, 0),
    ]
    assert sorted(f.amount for f in confirmed.values()) == [10, 20]


# -- caller's bugs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"deposit_id": str(DEPOSIT)},
        {"consumer_id": 7},
        {"amount": 10.0},
        {"amount": True},
        {"reference": b"0xab"},
        {"reference": None},
    ],
)
def test_a_wrongly_typed_argument_is_a_caller_error(kwargs):
    with pytest.raises(TypeError):
        confirm(**kwargs)
