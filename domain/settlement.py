"""Settlement per epoch: recorded usage -> priced lease charges, fees and checker rewards.

Pure: no I/O, no clock reads. `settle_epoch` is a function of its arguments only, and the
`EpochSettlement` it returns is a value: the caller records it (one event per epoch) and
turns each `LeaseCharge` into `domain.lease.charge_usage` (whose `UsageCharged` the posting
rules split into provider earnings and protocol fee). All numbers are configuration
(`SettlementRules`); money is an integer in the token's smallest unit, never a float.

Epochs
------

Time is cut into epochs of `epoch_s` seconds aligned on the Unix epoch (like verdict
windows): `epoch_start` is a whole multiple of `epoch_s` seconds after
1970-01-01T00:00Z (timezone-aware, whole seconds) and `epoch_end = epoch_start + epoch_s`.
`epoch_containing(moment)` names the epoch a moment falls in.

Which usage an epoch settles
----------------------------

A usage record (`domain.usage.UsageRecorded`) is keyed by (lease_id, sequence), its place
in the lease's usage stream. It belongs to the epoch of its `received_at` (the broker's
timestamp, identical on every redelivery), so usage that arrives after its interval's epoch
closed lands in the next one. The settlement of an epoch takes every record with
``received_at < epoch_end`` whose key is not in `settled` (the keys every earlier settlement
returned): a record that reached the log only after its own epoch was settled (ingest lag)
is swept into the next settlement instead of being lost, and no key is ever settled twice.
Records received at or after `epoch_end` are left for a later epoch. The same record given
twice (a redelivery, a re-read) counts once; two different records under one key are a
caller's bug (`ValueError`). A record whose lease is not in `leases` is not settled: its key
is reported in `EpochSettlement.unknown_lease_usage` (and stays unsettled, so a later run
that knows the lease settles it). Re-running an epoch with the accumulated `settled` set
charges nothing again.

Pricing (per record)
--------------------

Each record is priced on its own, at its lease's agreed price, for all the lease's GPUs::

    interval_us = interval_end - interval_start                        (microseconds)
    billable_s  = interval_us // 1_000_000                            (whole seconds, floored)
    amount      = lease_cost(lease.gpu_count, lease.price_per_gpu_hour, billable_s)
                                                                      (rounded up, per record)
    excluded_us = the part of the interval inside failed windows of the lease's node
    withheld    = min(amount, lease_cost(gpu_count, price, excluded_us // 1_000_000))

A lease's charge in an epoch is the exact sum of its records' amounts. Rounding per record
(rather than once per lease and epoch) makes a record's price independent of which epoch or
which run settles it: late arrivals, retries and re-runs leave the total over all epochs
equal to the sum of the records' prices, exactly. The cost of that choice is at most one
smallest unit per record. A record of under a second is settled at 0; a `LeaseCharge` may
therefore be 0 (the caller records no `UsageCharged` for it: `charge_usage` refuses zero).

Failed windows (`domain.verdicts.QuorumFailed` of the lease's node, any decided_at, repeats
counted once, overlapping windows merged): with `SettlementRules.withhold_failed_windows`
(default) the usage inside them is charged to the consumer like any other but WITHHELD from
the provider: that part goes to the insurance pool (`UsageCharged.withheld`), and the slash
of the failed window refunds the consumer its cost out of that pool
(`domain.slashing.refunds_for`). So the provider is not paid for service the checkers
failed, and the consumer is compensated exactly once: charged, then refunded (never "not
charged" AND refunded). The parts are listed per record and window (`WindowExclusion`). A
failed window decided after a record was settled does not re-price it (settled records are
final): the provider was paid, and the slash (always larger than a window's price) and its
refund are the correction.

Fees and checker rewards
------------------------

For each charge, fee = `PostingRules.fee_of(amount - withheld)` (floor((amount - withheld) *
protocol_fee_bps / 10_000), as the ledger postings split `UsageCharged`), provider share =
amount - withheld - fee. The
epoch's fee is the sum over its charges. Of that fee, a reward pool::

    pool = fee * checker_reward_bps // 10_000                          (rounded down)

is split among checkers in proportion to their verdicts that agreed with the quorums decided
in the epoch: every `QuorumPassed` / `QuorumFailed` with epoch_start <= decided_at <
epoch_end counts once (repeats of a node-window ignored; `QuorumNotReached` and decisions of
other epochs ignored), and each id in its `agreeing_checker_ids` is one agreeing verdict.
With a_c agreeing verdicts of checker c and A of all checkers::

    reward_c    = pool * a_c // A                                     (rounded down)
    treasury_net = fee - sum(reward_c)                                (the pool's remainder too)

Contradicted verdicts (`contradicting_checker_ids`) earn nothing. With no agreeing verdict
(A == 0) the whole fee stays with the treasury.

Totals and invariants (checked when an `EpochSettlement` is built)
------------------------------------------------------------------

    charged       == sum of the charges' amounts == provider_share + fee + withheld
    fee           == checker_rewards + treasury_net
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from domain.checks import require_int
from domain.lease import Lease
from domain.orderbook import lease_cost
from domain.postings import BPS_MAX, DEFAULT_POSTING_RULES, PostingRules
from domain.usage import UsageRecorded
from domain.verdicts import Decision, QuorumFailed, QuorumNotReached

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SECONDS_PER_DAY = 86_400
MICROSECONDS_PER_SECOND = 1_000_000
_MICROSECOND = timedelta(microseconds=1)
EPOCH_S_MAX = 31 * SECONDS_PER_DAY
"""Longest epoch: a month."""
DEFAULT_EPOCH_S = 3_600
"""One settlement an hour."""
DEFAULT_CHECKER_REWARD_BPS = 1_000
"""A tenth of the protocol fee rewards the checkers."""

UsageKey = tuple[UUID, int]
"""(lease_id, sequence): a usage record's place in its lease's usage stream."""


@dataclass(frozen=True, slots=True)
class SettlementRules:
    """The numbers of settlement. Validated at construction."""

    epoch_s: int = DEFAULT_EPOCH_S
    """Epoch length in seconds; 1..EPOCH_S_MAX."""
    checker_reward_bps: int = DEFAULT_CHECKER_REWARD_BPS
    """Share of the epoch's protocol fee paid to checkers; 0..BPS_MAX."""
    withhold_failed_windows: bool = True
    """Withhold from the provider the part of usage inside failed windows of the lease's
    node (it goes to the insurance pool, out of which the slash refunds the consumer)."""
    posting: PostingRules = DEFAULT_POSTING_RULES
    """The protocol fee (`PostingRules.fee_of`)."""

    def __post_init__(self) -> None:
        require_int("epoch_s", self.epoch_s)
        if not 1 <= self.epoch_s <= EPOCH_S_MAX:
            raise ValueError(f"epoch_s must be within 1..{EPOCH_S_MAX}, got {self.epoch_s}")
        require_int("checker_reward_bps", self.checker_reward_bps)
        if not 0 <= self.checker_reward_bps <= BPS_MAX:
            raise ValueError(f"checker_reward_bps must be within 0..{BPS_MAX}")
        if type(self.withhold_failed_windows) is not bool:
            raise TypeError("withhold_failed_windows must be a bool")


DEFAULT_SETTLEMENT_RULES = SettlementRules()


def _epoch_seconds(moment: datetime) -> tuple[int, int]:
    delta = moment - EPOCH
    return delta.days * SECONDS_PER_DAY + delta.seconds, delta.microseconds


def epoch_containing(
    moment: datetime, rules: SettlementRules = DEFAULT_SETTLEMENT_RULES
) -> datetime:
    """The start of the epoch `moment` (timezone-aware) falls in."""
    if moment.utcoffset() is None:
        raise ValueError("moment must be timezone-aware")
    seconds, _ = _epoch_seconds(moment)
    return EPOCH + timedelta(seconds=seconds - seconds % rules.epoch_s)


def epoch_end_of(
    epoch_start: datetime, rules: SettlementRules = DEFAULT_SETTLEMENT_RULES
) -> datetime:
    """The end of the epoch starting at `epoch_start`."""
    return epoch_start + timedelta(seconds=rules.epoch_s)


def is_epoch_start(moment: datetime, rules: SettlementRules = DEFAULT_SETTLEMENT_RULES) -> bool:
    """Whether `moment` is timezone-aware and on the epoch grid."""
    if moment.utcoffset() is None:
        return False
    seconds, microseconds = _epoch_seconds(moment)
    return microseconds == 0 and seconds % rules.epoch_s == 0


@dataclass(frozen=True, slots=True)
class WindowExclusion:
    """The part of one usage record inside one failed window: withheld from the provider."""

    sequence: int
    node_id: UUID
    window_start: datetime
    window_end: datetime
    excluded_us: int
    """> 0: microseconds of the record's interval inside the window."""


@dataclass(frozen=True, slots=True)
class PricedUsage:
    """One usage record, priced (see the module docstring)."""

    sequence: int
    envelope_id: UUID
    interval_us: int
    excluded_us: int
    """Inside failed windows (their union): withheld from the provider."""
    billable_s: int
    amount: int
    """What the consumer is charged for the whole interval."""
    withheld: int = 0
    """Of amount: the part inside failed windows, not the provider's; <= amount."""


@dataclass(frozen=True, slots=True)
class LeaseCharge:
    """What one lease's usage settled in an epoch costs, and what it covers."""

    lease_id: UUID
    provider_id: UUID
    consumer_id: UUID
    amount: int
    """Sum of the lines' amounts (may be 0)."""
    fee: int
    """`PostingRules.fee_of(amount - withheld)`."""
    provider_share: int
    """amount - withheld - fee."""
    sequences: tuple[int, ...]
    """The usage sequences covered, ascending."""
    lines: tuple[PricedUsage, ...]
    exclusions: tuple[WindowExclusion, ...]
    withheld: int = 0
    """Sum of the lines' withheld parts: lease_escrow -> insurance_pool."""

    @property
    def billable_s(self) -> int:
        return sum(line.billable_s for line in self.lines)


@dataclass(frozen=True, slots=True)
class CheckerReward:
    """A checker's share of the epoch's reward pool."""

    checker_id: UUID
    agreed_verdicts: int
    """Its verdicts that agreed with the quorums decided in the epoch."""
    amount: int
    """pool * agreed_verdicts // all agreed verdicts; may be 0."""


@dataclass(frozen=True, slots=True)
class EpochSettlement:
    """One epoch's settlement (a value). Its totals are checked at construction."""

    epoch_start: datetime
    epoch_end: datetime
    charges: tuple[LeaseCharge, ...]
    """One per lease with usage settled here, by lease id."""
    settled_keys: frozenset[UsageKey]
    """The usage keys this settlement settles (add them to `settled`)."""
    unknown_lease_usage: tuple[UsageKey, ...]
    """Records of leases not in `leases`: not settled, reported."""
    checker_rewards: tuple[CheckerReward, ...]
    """By checker id."""
    charged: int
    provider_share: int
    fee: int
    withheld: int
    reward_pool: int
    checker_rewards_total: int
    treasury_net: int

    def __post_init__(self) -> None:
        keys = {(c.lease_id, s) for c in self.charges for s in c.sequences}
        problems = [
            ("charged != sum of charges", self.charged != sum(c.amount for c in self.charges)),
            (
                "charged != provider_share + fee + withheld",
                self.charged != self.provider_share + self.fee + self.withheld,
            ),
            ("withheld != sum of charges'", self.withheld != sum(c.withheld for c in self.charges)),
            ("fee != sum of charges' fees", self.fee != sum(c.fee for c in self.charges)),
            (
                "a charge's provider_share + fee + withheld != amount",
                any(c.provider_share + c.fee + c.withheld != c.amount for c in self.charges),
            ),
            (
                "checker_rewards_total != sum of rewards",
                self.checker_rewards_total != sum(r.amount for r in self.checker_rewards),
            ),
            ("rewards exceed the pool", self.checker_rewards_total > self.reward_pool),
            ("pool exceeds the fee", self.reward_pool > self.fee),
            (
                "fee != checker_rewards_total + treasury_net",
                self.fee != self.checker_rewards_total + self.treasury_net,
            ),
            ("settled_keys != the charges' keys", keys != self.settled_keys),
        ]
        for what, broken in problems:
            if broken:
                raise ValueError(f"inconsistent settlement: {what}")


def _merge(spans: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _overlap_us(start: datetime, end: datetime, span_start: datetime, span_end: datetime) -> int:
    return max(0, (min(end, span_end) - max(start, span_start)) // _MICROSECOND)


def price_usage(
    record: UsageRecorded,
    lease: Lease,
    failed_windows: Iterable[QuorumFailed] = (),
    rules: SettlementRules = DEFAULT_SETTLEMENT_RULES,
) -> tuple[PricedUsage, tuple[WindowExclusion, ...]]:
    """One record's price at its lease's price, less the failed windows of the lease's
    node (see the module docstring)."""
    start, end = record.interval_start, record.interval_end
    interval_us = max(0, (end - start) // _MICROSECOND)
    windows: dict[tuple[UUID, datetime], QuorumFailed] = {}
    if rules.withhold_failed_windows:
        for failed in failed_windows:
            if failed.node_id == lease.node_id:
                windows.setdefault((failed.node_id, failed.window_start), failed)
    exclusions = tuple(
        WindowExclusion(record.sequence, w.node_id, w.window_start, w.window_end, us)
        for w in sorted(windows.values(), key=lambda w: w.window_start)
        if (us := _overlap_us(start, end, w.window_start, w.window_end)) > 0
    )
    spans = _merge((w.window_start, w.window_end) for w in windows.values())
    excluded_us = min(interval_us, sum(_overlap_us(start, end, a, b) for a, b in spans))
    billable_s = interval_us // MICROSECONDS_PER_SECOND
    amount = lease_cost(lease.gpu_count, lease.price_per_gpu_hour, billable_s)
    excluded_s = excluded_us // MICROSECONDS_PER_SECOND
    withheld = min(amount, lease_cost(lease.gpu_count, lease.price_per_gpu_hour, excluded_s))
    line = PricedUsage(
        record.sequence, record.envelope_id, interval_us, excluded_us, billable_s, amount, withheld
    )
    return line, exclusions


def checker_rewards_for(
    pool: int, decisions: Iterable[Decision], epoch_start: datetime, epoch_end: datetime
) -> tuple[CheckerReward, ...]:
    """Split `pool` among the checkers that agreed with the quorums decided in
    [epoch_start, epoch_end), in proportion to their agreeing verdicts, rounded down."""
    require_int("pool", pool)
    if pool < 0:
        raise ValueError("pool must not be negative")
    seen: set[tuple[UUID, datetime]] = set()
    agreed: dict[UUID, int] = {}
    for decision in decisions:
        if isinstance(decision, QuorumNotReached):
            continue
        if not epoch_start <= decision.decided_at < epoch_end:
            continue
        key = (decision.node_id, decision.window_start)
        if key in seen:
            continue
        seen.add(key)
        for checker_id in decision.agreeing_checker_ids:
            agreed[checker_id] = agreed.get(checker_id, 0) + 1
    total = sum(agreed.values())
    if total == 0:
        return ()
    return tuple(
        CheckerReward(checker_id, count, pool * count // total)
        for checker_id, count in sorted(agreed.items())
    )


def settle_epoch(
    epoch_start: datetime,
    usage: Iterable[UsageRecorded],
    leases: Mapping[UUID, Lease],
    settled: AbstractSet[UsageKey],
    failed_windows: Iterable[QuorumFailed] = (),
    decisions: Iterable[Decision] = (),
    rules: SettlementRules = DEFAULT_SETTLEMENT_RULES,
) -> EpochSettlement:
    """Settle the epoch starting at `epoch_start` (see the module docstring).

    `usage`: recorded usage (any superset of what is due: later records are left alone,
    settled keys skipped, repeats counted once). `leases`: by id. `settled`: every key the
    earlier settlements returned. `failed_windows`: failed quorums known now (only those of
    a lease's node apply to it). `decisions`: quorum decisions (only those decided in the
    epoch earn rewards)."""
    if not is_epoch_start(epoch_start, rules):
        raise ValueError(
            f"epoch_start {epoch_start.isoformat()} is not on the {rules.epoch_s} s epoch grid"
        )
    epoch_end = epoch_end_of(epoch_start, rules)
    due: dict[UsageKey, UsageRecorded] = {}
    for record in usage:
        key = (record.lease_id, record.sequence)
        if key in settled or record.received_at >= epoch_end:
            continue
        first = due.setdefault(key, record)
        if first != record:
            raise ValueError(f"two different usage records under lease {key[0]} sequence {key[1]}")
    failed = tuple(failed_windows)
    by_lease: dict[UUID, list[UsageRecorded]] = {}
    unknown: list[UsageKey] = []
    for key in sorted(due):
        if key[0] in leases:
            by_lease.setdefault(key[0], []).append(due[key])
        else:
            unknown.append(key)
    charges: list[LeaseCharge] = []
    for lease_id in sorted(by_lease):
        lease = leases[lease_id]
        lines: list[PricedUsage] = []
        exclusions: list[WindowExclusion] = []
        for record in by_lease[lease_id]:
            line, excluded = price_usage(record, lease, failed, rules)
            lines.append(line)
            exclusions.extend(excluded)
        amount = sum(line.amount for line in lines)
        withheld = sum(line.withheld for line in lines)
        fee = rules.posting.fee_of(amount - withheld)
        charges.append(
            LeaseCharge(
                lease_id=lease_id,
                provider_id=lease.provider_id,
                consumer_id=lease.consumer_id,
                amount=amount,
                fee=fee,
                provider_share=amount - withheld - fee,
                sequences=tuple(line.sequence for line in lines),
                lines=tuple(lines),
                exclusions=tuple(exclusions),
                withheld=withheld,
            )
        )
    charged = sum(c.amount for c in charges)
    fee_total = sum(c.fee for c in charges)
    withheld_total = sum(c.withheld for c in charges)
    pool = fee_total * rules.checker_reward_bps // BPS_MAX
    rewards = checker_rewards_for(pool, decisions, epoch_start, epoch_end)
    rewards_total = sum(r.amount for r in rewards)
    assert rewards_total <= pool <= fee_total
    return EpochSettlement(
        epoch_start=epoch_start,
        epoch_end=epoch_end,
        charges=tuple(charges),
        settled_keys=frozenset((c.lease_id, sequence) for c in charges for sequence in c.sequences),
        unknown_lease_usage=tuple(unknown),
        checker_rewards=rewards,
        charged=charged,
        provider_share=charged - fee_total - withheld_total,
        fee=fee_total,
        withheld=withheld_total,
        reward_pool=pool,
        checker_rewards_total=rewards_total,
        treasury_net=fee_total - rewards_total,
    )
