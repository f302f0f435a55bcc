"""Consumer funds arriving from the chain. Pure: no I/O, no clock reads.

A consumer pays into the protocol's contract on chain; once the deposit is confirmed, the
chain side (chain_custody) credits the consumer's `consumer_available` account. The chain
watcher (a later issue) produces these confirmations from contract events, keyed by
(transaction hash, log index); here a deposit is named by its `deposit_id`, and confirming
the same deposit again with the same fields is `ok` and records nothing new. Deposits are
told apart by `deposit_id` only: whoever confirms them must derive it from the chain event
(transaction hash and log index), or one chain event under two ids is credited twice.

Ledger mirror: `DepositConfirmed`: `amount` chain_custody -> consumer_available (deposit).

Settlement and payouts move funds too: `CheckerRewarded` (an epoch's reward to a checker,
protocol_treasury -> checker_rewards) and `PayoutClaimed` (a provider's claim paid on chain
against a posted payout root, provider_earnings -> chain_custody), each recorded once: a
reward per (checker, epoch), a claim per chain event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from uuid import UUID

from domain.checks import require_int, require_uuid
from ledger.limits import AMOUNT_MAX

REFERENCE_LENGTH_MAX = 128
"""Longest deposit reference (e.g. "0x<tx hash>:<log index>")."""


@dataclass(frozen=True, slots=True)
class DepositConfirmed:
    """Fact: a consumer's deposit on chain is confirmed and credited."""

    deposit_id: UUID
    consumer_id: UUID
    amount: int
    """> 0, in the token's smallest unit."""
    reference: str
    """Where it comes from on chain, e.g. "0x<tx hash>:<log index>"; 1..REFERENCE_LENGTH_MAX."""
    confirmed_at: datetime


class ConfirmDepositResult(IntEnum):
    """Result of `confirm_deposit`, in the order the rules are checked. Never renumber."""

    ok = 0
    deposit_id_must_not_be_zero = 1
    consumer_id_must_not_be_zero = 2
    amount_must_not_be_negative = 3
    amount_must_not_be_zero = 4
    amount_exceeds_max = 5
    reference_must_not_be_empty = 6
    reference_exceeds_max_length = 7
    exists_with_different_fields = 8


def confirm_deposit(
    confirmed: Mapping[UUID, DepositConfirmed],
    deposit_id: UUID,
    consumer_id: UUID,
    amount: int,
    reference: str,
    now: datetime,
) -> tuple[ConfirmDepositResult, tuple[DepositConfirmed, ...]]:
    """Confirm a deposit; `confirmed` holds the deposits confirmed before (by id)."""
    r = ConfirmDepositResult
    require_uuid("deposit_id", deposit_id)
    require_uuid("consumer_id", consumer_id)
    require_int("amount", amount)
    if not isinstance(reference, str):
        raise TypeError(f"reference must be a str, got {reference!r}")
    if not deposit_id.int:
        return r.deposit_id_must_not_be_zero, ()
    if not consumer_id.int:
        return r.consumer_id_must_not_be_zero, ()
    if amount < 0:
        return r.amount_must_not_be_negative, ()
    if amount == 0:
        return r.amount_must_not_be_zero, ()
    if amount > AMOUNT_MAX:
        return r.amount_exceeds_max, ()
    if not reference:
        return r.reference_must_not_be_empty, ()
    if len(reference) > REFERENCE_LENGTH_MAX:
        return r.reference_exceeds_max_length, ()
    existing = confirmed.get(deposit_id)
    if existing is not None:
        same = (existing.consumer_id, existing.amount, existing.reference) == (
            consumer_id,
            amount,
            reference,
        )
        return (r.ok, ()) if same else (r.exists_with_different_fields, ())
    return r.ok, (DepositConfirmed(deposit_id, consumer_id, amount, reference, now),)


@dataclass(frozen=True, slots=True)
class CheckerRewarded:
    """Fact: settlement paid a checker its share of an epoch's reward pool
    (`domain.settlement.CheckerReward`): protocol_treasury -> checker_rewards."""

    checker_id: UUID
    epoch_start: datetime
    agreed_verdicts: int
    amount: int
    """> 0."""
    rewarded_at: datetime


@dataclass(frozen=True, slots=True)
class PayoutClaimed:
    """Fact: a provider claimed earnings on chain against a posted payout root; the chain
    paid `amount` (the claim's cumulative amount less what it had claimed before):
    provider_earnings -> chain_custody."""

    provider_id: UUID
    epoch: int
    """The payout root's epoch number the proof was for."""
    cumulative: int
    """The cumulative amount claimed by the provider after this claim."""
    amount: int
    """> 0: paid by this claim."""
    reference: str
    """The chain event, "0x<tx hash>:<log index>"."""
    claimed_at: datetime


class RewardCheckerResult(IntEnum):
    """Result of `reward_checker`, in the order the rules are checked. Never renumber."""

    ok = 0
    amount_must_be_positive = 1
    amount_exceeds_max = 2
    already_rewarded = 3
    """This checker was rewarded for this epoch with other fields."""


def reward_checker(
    rewarded: Mapping[tuple[UUID, datetime], CheckerRewarded],
    checker_id: UUID,
    epoch_start: datetime,
    agreed_verdicts: int,
    amount: int,
    now: datetime,
) -> tuple[RewardCheckerResult, tuple[CheckerRewarded, ...]]:
    """Reward a checker for one epoch, once: the same reward again records nothing."""
    r = RewardCheckerResult
    require_uuid("checker_id", checker_id)
    require_int("amount", amount)
    require_int("agreed_verdicts", agreed_verdicts)
    if amount <= 0:
        return r.amount_must_be_positive, ()
    if amount > AMOUNT_MAX:
        return r.amount_exceeds_max, ()
    existing = rewarded.get((checker_id, epoch_start))
    if existing is not None:
        same = (existing.amount, existing.agreed_verdicts) == (amount, agreed_verdicts)
        return (r.ok, ()) if same else (r.already_rewarded, ())
    return r.ok, (CheckerRewarded(checker_id, epoch_start, agreed_verdicts, amount, now),)


class ClaimPayoutResult(IntEnum):
    """Result of `claim_payout`, in the order the rules are checked. Never renumber."""

    ok = 0
    amount_must_be_positive = 1
    amount_exceeds_max = 2
    reference_must_not_be_empty = 3
    reference_exceeds_max_length = 4
    cumulative_below_claimed = 5
    """cumulative < what the provider had claimed before + amount."""
    exists_with_different_fields = 6


def claim_payout(
    claims: Mapping[str, PayoutClaimed],
    claimed_before: int,
    provider_id: UUID,
    epoch: int,
    cumulative: int,
    amount: int,
    reference: str,
    now: datetime,
) -> tuple[ClaimPayoutResult, tuple[PayoutClaimed, ...]]:
    """Record a claim seen on chain, once per chain event (`reference`). `claimed_before`:
    what the provider's earlier claims paid in all."""
    r = ClaimPayoutResult
    require_uuid("provider_id", provider_id)
    for name, value in (("epoch", epoch), ("cumulative", cumulative), ("amount", amount)):
        require_int(name, value)
    if not isinstance(reference, str):
        raise TypeError(f"reference must be a str, got {reference!r}")
    if amount <= 0:
        return r.amount_must_be_positive, ()
    if amount > AMOUNT_MAX or cumulative > AMOUNT_MAX:
        return r.amount_exceeds_max, ()
    if not reference:
        return r.reference_must_not_be_empty, ()
    if len(reference) > REFERENCE_LENGTH_MAX:
        return r.reference_exceeds_max_length, ()
    existing = claims.get(reference)
    if existing is not None:
        same = (existing.provider_id, existing.epoch, existing.cumulative, existing.amount) == (
            provider_id,
            epoch,
            cumulative,
            amount,
        )
        return (r.ok, ()) if same else (r.exists_with_different_fields, ())
    if cumulative < claimed_before + amount:
        return r.cumulative_below_claimed, ()
    return r.ok, (PayoutClaimed(provider_id, epoch, cumulative, amount, reference, now),)
