"""The marketplace's account and transfer codes: what each ledger account and transfer is for.

Codes are stored in every account and transfer; never renumber a member.
"""

from __future__ import annotations

from enum import IntEnum


class AccountCode(IntEnum):
    """What an account holds. User-owned accounts may not go below zero; the chain's custody
    mirror (external) may, as it is the other side of every deposit and withdrawal."""

    chain_custody = 1
    """Mirror of the tokens held by the contracts on chain (external, unconstrained)."""
    consumer_available = 2
    """A consumer's funds not yet committed to any lease."""
    lease_escrow = 3
    """Funds held for a lease's usage."""
    provider_earnings = 4
    """What the protocol owes a provider (payable, claimable on chain)."""
    provider_stake_bonded = 5
    provider_stake_unbonding = 6
    checker_stake = 7
    checker_rewards = 8
    protocol_treasury = 9
    """Protocol fees."""
    insurance_pool = 10
    """Slashed stake, out of which affected consumers are refunded."""
    bid_escrow = 11
    """Funds held for a resting bid (owner: the bid), until its fills move them to lease
    escrows and the remainder goes back to the consumer."""


class TransferCode(IntEnum):
    """Why money moved."""

    deposit = 1
    withdrawal = 2
    escrow_hold = 3
    """A pending transfer from consumer funds into lease escrow."""
    usage_charge = 4
    protocol_fee = 5
    escrow_release = 6
    stake_bond = 7
    stake_unbond = 8
    slash = 9
    refund = 10
    checker_reward = 11
    payout = 12
