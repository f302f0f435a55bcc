"""What follows a failed quorum: the slash's refunds, the checkers' penalties and the SLA
closes. Pure: no I/O, no clock reads (`now` is passed in).

`domain.verdicts.decide_window` fails a node-window (`QuorumFailed`); `domain.stake.slash`
sizes the provider's slash (downtime 1/3 of K per GPU, fraud or under-spec all of K, bonded
stake first, then unbonding stake). The slashed stake goes to the insurance pool. Then:

Refunds (`refunds_for`). Slashed funds refund the affected consumers first. A lease is
affected when it ran on the failed node during the window: opened before window_end and
not closed (or ended) before window_start. Its consumer is owed what the failed part of the
window cost at the lease's price::

    overlap_s = min(window_end, lease end) - max(window_start, opened_at)     (whole seconds)
    owed      = lease_cost(gpu_count, price_per_gpu_hour, overlap_s)          (rounded up)

where lease end is min(closed_at, ends_at) for a closed lease (a lease closed for expiry
after its end stopped serving at ends_at), else ends_at. Leases are refunded in the
order they opened (then by lease id), each in full while the slash lasts; the lease at
which the slash runs out gets what is left; the others get nothing. What the refunds do not
use stays in the insurance pool. A refund moves insurance_pool -> consumer_available
(`ConsumerRefunded`); it never exceeds the slash, so the pool never goes negative.

Checker penalties (`checker_penalty`). Each checker whose verdict the quorum contradicted
(`CheckerContradicted`) loses `checker_penalty_bps` of the stake it registered with
(rounded down), at most what is left of its stake. The penalty moves checker_stake ->
insurance_pool (`CheckerPenalized`). A checker penalised down to zero keeps its
registration; its verdicts still count (a later issue may retire it).

SLA closes. A failure whose kind is in `close_leases_on` (default: fraud and under_spec)
closes every open lease on the node with reason sla_breach, releasing the unused escrow;
downtime alone does not close leases (the lease's own heartbeat rules pause or close it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from domain.checks import require_int
from domain.lease import Lease, LeaseStatus
from domain.orderbook import lease_cost
from domain.verdicts import BPS_MAX, FailureKind, QuorumFailed

DEFAULT_CHECKER_PENALTY_BPS = 1_000
"""A contradicted checker loses a tenth of its registered stake."""


@dataclass(frozen=True, slots=True)
class SlashingRules:
    """The numbers of what follows a failed quorum. Validated at construction."""

    refund_consumers: bool = True
    """Refund the affected consumers out of the slash (design: refunds come first)."""
    checker_penalty_bps: int = DEFAULT_CHECKER_PENALTY_BPS
    """Share of its registered stake a contradicted checker loses; 0..BPS_MAX (0: none)."""
    close_leases_on: frozenset[FailureKind] = field(
        default_factory=lambda: frozenset({FailureKind.fraud, FailureKind.under_spec})
    )
    """Failure kinds that close the node's open leases with reason sla_breach."""

    def __post_init__(self) -> None:
        require_int("checker_penalty_bps", self.checker_penalty_bps)
        if not 0 <= self.checker_penalty_bps <= BPS_MAX:
            raise ValueError(f"checker_penalty_bps must be within 0..{BPS_MAX}")
        if FailureKind.none in self.close_leases_on:
            raise ValueError("close_leases_on cannot hold FailureKind.none")


@dataclass(frozen=True, slots=True)
class ConsumerRefunded:
    """Fact: a consumer affected by a failed window was refunded out of the slash."""

    lease_id: UUID
    consumer_id: UUID
    provider_id: UUID
    node_id: UUID
    window_start: datetime
    amount: int
    """> 0; insurance_pool -> consumer_available."""
    owed: int
    """What the failed part of the window cost; amount < owed when the slash ran out."""
    refunded_at: datetime


@dataclass(frozen=True, slots=True)
class CheckerPenalized:
    """Fact: a checker whose verdict the quorum contradicted lost part of its stake."""

    checker_id: UUID
    node_id: UUID
    window_start: datetime
    amount: int
    """> 0; checker_stake -> insurance_pool."""
    penalized_at: datetime


def _seconds(start: datetime, end: datetime) -> int:
    return max(0, int((end - start).total_seconds()))


def lease_end(lease: Lease) -> datetime:
    """When a lease stops serving: closed_at once closed, else ends_at."""
    if lease.status is LeaseStatus.closed and lease.closed_at is not None:
        return min(lease.closed_at, lease.ends_at)
    return lease.ends_at


def owed_for_window(lease: Lease, window_start: datetime, window_end: datetime) -> int:
    """What the lease's part of the window cost at its price (0 when it did not overlap)."""
    start = max(window_start, lease.opened_at)
    end = min(window_end, lease_end(lease))
    overlap_s = _seconds(start, end)
    if overlap_s == 0:
        return 0
    return lease_cost(lease.gpu_count, lease.price_per_gpu_hour, overlap_s)


def refunds_for(
    failed: QuorumFailed,
    slashed_amount: int,
    leases: Iterable[Lease],
    rules: SlashingRules,
    now: datetime,
) -> tuple[ConsumerRefunded, ...]:
    """The refunds a failed window owes, out of `slashed_amount` (what the slash took).
    `leases`: the leases of the failed node (others are ignored)."""
    require_int("slashed_amount", slashed_amount)
    if not rules.refund_consumers or slashed_amount <= 0:
        return ()
    affected = sorted(
        (lease for lease in leases if lease.node_id == failed.node_id),
        key=lambda lease: (lease.opened_at, lease.id),
    )
    left = slashed_amount
    refunds: list[ConsumerRefunded] = []
    for lease in affected:
        if left == 0:
            break
        owed = owed_for_window(lease, failed.window_start, failed.window_end)
        amount = min(owed, left)
        if amount == 0:
            continue
        refunds.append(
            ConsumerRefunded(
                lease_id=lease.id,
                consumer_id=lease.consumer_id,
                provider_id=lease.provider_id,
                node_id=lease.node_id,
                window_start=failed.window_start,
                amount=amount,
                owed=owed,
                refunded_at=now,
            )
        )
        left -= amount
    assert sum(r.amount for r in refunds) <= slashed_amount
    return tuple(refunds)


def checker_penalty(stake_registered: int, stake_left: int, rules: SlashingRules) -> int:
    """What a contradicted checker loses: floor(stake_registered * bps / BPS_MAX), at most
    what is left of its stake."""
    require_int("stake_registered", stake_registered)
    require_int("stake_left", stake_left)
    if not 0 <= stake_left <= stake_registered:
        raise ValueError(f"stake_left must be within 0..{stake_registered}, got {stake_left}")
    return min(stake_left, stake_registered * rules.checker_penalty_bps // BPS_MAX)


def closes_leases(failed: QuorumFailed, rules: SlashingRules) -> bool:
    """Whether this failure closes the node's open leases (reason sla_breach)."""
    return failed.kind in rules.close_leases_on
