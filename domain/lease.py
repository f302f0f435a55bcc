"""Leases: escrow, heartbeats, downtime, usage charges and closing. Pure rules.

No I/O and no clock reads: the caller passes `now`. Each decision is a plain function from a
`Lease` (and the command's fields) to a result code and the facts to record; the result
codes are declared in the order they are checked and never renumbered. A refusal records
nothing, with one exception: `ChargeUsageResult.escrow_exhausted` comes with the facts of
the charge it could (partly) cover and of the pause or close that follows. `apply` folds
one fact into a new state and `replay` rebuilds a lease from its facts in log order, so the
live state and the replayed state are always equal.

Money is an integer in the token's smallest unit; never a float. Durations are whole
seconds (`..._s`), measured exactly with `timedelta` floor division.

Opening
-------

A lease opens from one `OrderMatched` fact of `domain.orderbook`, at the ask's price, for
the bid's duration, with the match's `escrow_amount` held (`escrow_held`). Its id is
deterministic: `lease_id_for(ask_id, bid_id)` = uuid5(LEASE_ID_NAMESPACE,
"<ask_id>:<bid_id>"). An ask and a bid match at most once (every match empties one of the
two), so the pair names one lease, and a retried open lands on the same id: the store's
"stream already exists" refuses the second open. `opened_at` is `now`, but never before
`matched_at`; `ends_at = opened_at + duration_s`.

Escrow
------

- `escrow_held`: everything reserved for the lease: the match's escrow plus every top-up.
- `escrow_charged`: what usage charges drew from it. Always 0 <= charged <= held.
- `escrow_released`: on close, held - charged goes back to the consumer, exactly; the
  `LeaseClosed` fact carries it. 0 while the lease is not closed. With settlement
  (`LeaseRules.release_escrow_at_close` False) the close keeps the escrow
  (`LeaseClosed.escrow_kept`): the lease serves no more, but settlement may still charge
  the usage it served, and then releases the rest (`release_escrow` -> `EscrowReleased`).
  `escrow_final` marks that the release happened: no charge after it.
- `escrow_available` = held - charged - released.

Top-up (`top_up`). Adds `amount` > 0 to escrow_held and extends `ends_at` by what the extra
escrow buys at the lease price, rounded DOWN to whole seconds::

    extension_s = amount * 3600 // (gpu_count * price_per_gpu_hour)

so `lease_cost(gpu_count, price, extension_s) <= amount` always: the extension is paid for
in full, and the remainder of less than one second's cost stays in escrow (released on
close if unused). The extension counts from the current `ends_at`, not from now. A lease
whose `ends_at` has passed cannot be topped up (`lease_expired`): it must close (expiry). A
top-up of a paused lease resumes it (`LeaseResumed`), as it makes escrow available again;
this holds until the lease is closed, even after its grace ended. `ends_at` does not move
while a lease is paused.

Usage (`charge_usage`). Draws `amount` from the available escrow, never below zero. When the
charge uses up what is available (amount >= available), the escrow is exhausted: the
covered part is charged (`UsageCharged.amount`, possibly 0; the rest is
`amount_uncovered`), the result is `escrow_exhausted`, and, per
`LeaseRules.on_escrow_exhausted`, the lease either closes at once (reason escrow_exhausted,
closed_by `PROTOCOL_ID`, nothing left to release) or pauses (`LeasePaused`) with `escrow_grace_s` to top up. Between
decisions an open lease therefore always has escrow available. A paused lease still accepts charges (late usage of
served time); they are recorded with what they could not cover. Usage ids are deduplicated
at ingest; `usage_ref` is carried for tracing, and a lease does not remember past refs.

Liveness
--------

Heartbeats (`record_heartbeat`) come from the lease's node with a strictly increasing
`sequence` (gaps are allowed: missed beats; a repeat is `sequence_already_recorded`, a lower
one `sequence_out_of_order`), an `at` (the node's time) not before the lease opened, not
before the previous heartbeat's, and not later than `now + heartbeat_future_tolerance_s`.

Downtime. `alive_at` is the instant the next gap is measured from: the latest of
opened_at, the last heartbeat's `at` and the end of the downtime already counted. A gap
is a stretch of more than `heartbeat_timeout_s` (default 3 x heartbeat_interval_s) after
`alive_at` without a heartbeat. Each gap is recorded exactly once, by one
`DowntimeDetected(from_at=alive_at, to_at)` fact, whichever comes first:

- `detect_downtime(now)`: now - alive_at > heartbeat_timeout_s; to_at = now;
- `record_heartbeat` of a late heartbeat: at - alive_at > heartbeat_timeout_s; to_at =
  min(at, now); the same heartbeat ends the gap;
- `close` of a lease whose gap nobody detected yet: to_at = now.

A detected gap stays open until a heartbeat ends it; the downtime between `to_at` and that
heartbeat, min(at, now) - to_at (0 if negative), is counted by `HeartbeatRecorded.downtime_s`,
and, if the lease closes first, until the close by `LeaseClosed.downtime_s`. The counted
stretches never overlap and lie between opened_at and the lease's latest time, so the sum
(`Lease.downtime_s`, each stretch floored to whole seconds) never exceeds the elapsed time.
Liveness is tracked while a lease is paused too: the node is still reserved.

Closing
-------

`close(reason, by, now)`: consumer (by must be the consumer), provider (by must be the
provider), expiry (now >= ends_at), escrow_exhausted (the lease is paused and its grace
ended), sla_breach (decided outside, by the checkers' quorum; `by` is recorded). Closing a
closed lease is `lease_already_closed`. Nothing happens on a closed lease: every decision
refuses, with `lease_already_closed` once the command's own fields pass their checks. `close_due(lease, now)` says which automatic close is
due (expiry first, then escrow_exhausted), for the service that drives time.

Time never runs backwards: a decision whose `now` is earlier than the lease's latest fact
(`updated_at`) is decided, and recorded, at that time.

Ledger mirror
-------------

- `LeaseOpened`: the match's escrow moves from the bid's hold into lease_escrow
  (escrow_hold).
- `EscrowToppedUp`: `amount` consumer_available -> lease_escrow (escrow_hold).
- `UsageCharged`: `amount` lease_escrow -> provider earnings / fees at settlement
  (usage_charge); `amount_uncovered` is never moved.
- `LeaseClosed`: `escrow_released` lease_escrow -> consumer_available (escrow_release).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import IntEnum
from uuid import UUID, uuid5

from domain.checks import require_int
from domain.orderbook import DURATION_S_MAX, GPU_COUNT_MAX, PRICE_MAX, OrderMatched, lease_cost
from ledger.limits import AMOUNT_MAX

# -- limits -------------------------------------------------------------------------------

SECONDS_PER_HOUR = 3_600
ONE_SECOND = timedelta(seconds=1)

LEASE_ID_NAMESPACE = UUID("159d28d8-ee20-58ec-abe7-bdd76150f020")
"""uuid5(NAMESPACE_URL, "urn:aether-ledger:lease"): the namespace of lease ids. Never change."""
ESCROW_MAX = AMOUNT_MAX
"""Largest escrow a lease may hold (the ledger's largest amount)."""
LEASE_DURATION_S_MAX = 10 * DURATION_S_MAX
"""Longest a lease may run, from opened_at to ends_at, top-ups included (ten years)."""
HEARTBEAT_SEQUENCE_MAX = 2**63 - 1
"""Highest heartbeat sequence number (a signed 64-bit integer, as stored)."""
USAGE_REF_LENGTH_MAX = 128
"""Longest usage reference (the usage report's id)."""
HEARTBEAT_INTERVAL_S_MAX = 3_600
HEARTBEAT_TIMEOUT_S_MAX = 24 * 3_600
HEARTBEAT_FUTURE_TOLERANCE_S_MAX = 300
ESCROW_GRACE_S_MAX = 7 * 24 * 3_600

HEARTBEAT_INTERVAL_S_DEFAULT = 60
"""Heartbeats once a minute (the starting number of design.md)."""
HEARTBEAT_TIMEOUT_INTERVALS_DEFAULT = 3
"""Without a timeout given, three missed heartbeats are downtime."""
PROTOCOL_ID = UUID(int=1)
"""`closed_by` of a close the rules decide by themselves (an escrow exhausted under the
`close` rule)."""


def lease_id_for(ask_id: UUID, bid_id: UUID) -> UUID:
    """The id of the lease opened by the match of `ask_id` with `bid_id`: uuid5 of the pair."""
    return uuid5(LEASE_ID_NAMESPACE, f"{ask_id}:{bid_id}")


def _whole_seconds(delta: timedelta) -> int:
    """A non-negative duration in whole seconds, rounded down, exactly (no floats)."""
    return max(delta, timedelta(0)) // ONE_SECOND


# -- rules --------------------------------------------------------------------------------


class EscrowExhaustedAction(IntEnum):
    """What an exhausted escrow does to an open lease. Never renumber."""

    close = 1
    """Close at once, reason escrow_exhausted."""
    pause = 2
    """Pause; a top-up within `escrow_grace_s` resumes it, else it may close."""


@dataclass(frozen=True, slots=True)
class LeaseRules:
    """Liveness and escrow rules of leases. Validated at construction (ValueError or
    TypeError names what is wrong)."""

    heartbeat_interval_s: int = HEARTBEAT_INTERVAL_S_DEFAULT
    """How often a node sends heartbeats; 1..HEARTBEAT_INTERVAL_S_MAX."""
    heartbeat_timeout_s: int = 0
    """Silence after which a gap is downtime; heartbeat_interval_s..HEARTBEAT_TIMEOUT_S_MAX.
    0 at construction means 3 x heartbeat_interval_s (and is replaced by that value)."""
    heartbeat_future_tolerance_s: int = 5
    """How far a heartbeat's `at` may lie after `now` (clock skew);
    0..HEARTBEAT_FUTURE_TOLERANCE_S_MAX."""
    on_escrow_exhausted: EscrowExhaustedAction = EscrowExhaustedAction.pause
    escrow_grace_s: int = 120
    """With `pause`: how long a paused lease waits for a top-up before it may close;
    0..ESCROW_GRACE_S_MAX."""
    release_escrow_at_close: bool = True
    """True: the close releases the unused escrow at once. False (with settlement): the
    close keeps it, so settlement can still charge the lease's last usage, and settlement
    releases it (`release_escrow`) once that usage is charged."""

    def __post_init__(self) -> None:
        for name in (
            "heartbeat_interval_s",
            "heartbeat_timeout_s",
            "heartbeat_future_tolerance_s",
            "escrow_grace_s",
        ):
            require_int(name, getattr(self, name))
        if type(self.release_escrow_at_close) is not bool:
            raise TypeError("release_escrow_at_close must be a bool")
        if not isinstance(self.on_escrow_exhausted, EscrowExhaustedAction):
            raise TypeError("on_escrow_exhausted must be an EscrowExhaustedAction")
        if not 1 <= self.heartbeat_interval_s <= HEARTBEAT_INTERVAL_S_MAX:
            raise ValueError(
                f"heartbeat_interval_s must be within 1..{HEARTBEAT_INTERVAL_S_MAX}, "
                f"got {self.heartbeat_interval_s}"
            )
        if self.heartbeat_timeout_s == 0:
            timeout_s = HEARTBEAT_TIMEOUT_INTERVALS_DEFAULT * self.heartbeat_interval_s
            object.__setattr__(self, "heartbeat_timeout_s", timeout_s)
        if not self.heartbeat_interval_s <= self.heartbeat_timeout_s <= HEARTBEAT_TIMEOUT_S_MAX:
            raise ValueError(
                f"heartbeat_timeout_s must be within heartbeat_interval_s.."
                f"{HEARTBEAT_TIMEOUT_S_MAX}, got {self.heartbeat_timeout_s}"
            )
        if not 0 <= self.heartbeat_future_tolerance_s <= HEARTBEAT_FUTURE_TOLERANCE_S_MAX:
            raise ValueError(
                f"heartbeat_future_tolerance_s must be within "
                f"0..{HEARTBEAT_FUTURE_TOLERANCE_S_MAX}, got {self.heartbeat_future_tolerance_s}"
            )
        if not 0 <= self.escrow_grace_s <= ESCROW_GRACE_S_MAX:
            raise ValueError(
                f"escrow_grace_s must be within 0..{ESCROW_GRACE_S_MAX}, got {self.escrow_grace_s}"
            )


DEMO_LEASE_RULES = LeaseRules(
    heartbeat_interval_s=5,
    heartbeat_timeout_s=15,
    heartbeat_future_tolerance_s=2,
    escrow_grace_s=30,
)
"""Short numbers, so a demo shows downtime within seconds and a grace close within a minute."""


# -- state --------------------------------------------------------------------------------


class LeaseStatus(IntEnum):
    """Where a lease stands. Never renumber."""

    open = 1
    """Serving; escrow is available."""
    paused = 2
    """Escrow exhausted; waiting for a top-up until grace_ends_at."""
    closed = 3
    """Final. Unused escrow released."""


class CloseReason(IntEnum):
    """Why a lease closed. Never renumber."""

    consumer = 1
    provider = 2
    escrow_exhausted = 3
    sla_breach = 4
    expiry = 5


@dataclass(frozen=True, slots=True)
class Lease:
    """One lease. Immutable: `apply` returns a new state."""

    id: UUID
    """lease_id_for(ask_id, bid_id)."""
    ask_id: UUID
    bid_id: UUID
    provider_id: UUID
    node_id: UUID
    """The node that serves the lease; the only one whose heartbeats count."""
    consumer_id: UUID
    gpu_model: str
    gpu_count: int
    price_per_gpu_hour: int
    """The ask's price, in the token's smallest unit."""
    escrow_held: int
    """Reserved for the lease: the match's escrow plus every top-up."""
    escrow_charged: int
    """Drawn by usage charges; 0 <= escrow_charged <= escrow_held."""
    escrow_released: int
    """Returned to the consumer on close: escrow_held - escrow_charged; 0 before."""
    opened_at: datetime
    ends_at: datetime
    """opened_at + duration_s + every top-up's extension_s."""
    status: LeaseStatus
    updated_at: datetime
    """The time of the latest fact: decisions are never dated earlier."""
    alive_at: datetime
    """Where the next gap is measured from: latest of opened_at, the last heartbeat's `at`
    and the end of the downtime counted so far."""
    downtime_open: bool = False
    """A gap was detected and no heartbeat has ended it yet."""
    downtime_s: int = 0
    """Downtime counted so far, in whole seconds."""
    last_heartbeat_at: datetime | None = None
    """The node's `at` of the latest accepted heartbeat."""
    heartbeat_sequence: int = 0
    """The latest accepted heartbeat's sequence; 0 before the first."""
    usage_uncovered: int = 0
    """Usage charged against an exhausted escrow that it could not cover."""
    grace_ends_at: datetime | None = None
    """While paused: when the lease may be closed for escrow_exhausted."""
    close_reason: CloseReason | None = None
    closed_at: datetime | None = None
    escrow_final: bool = False
    """The unused escrow went back to the consumer: nothing more may be charged. Set by the
    close (`release_escrow_at_close`) or by `EscrowReleased`."""

    @property
    def escrow_available(self) -> int:
        """What usage may still draw: held - charged - released."""
        return self.escrow_held - self.escrow_charged - self.escrow_released


# -- facts --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseOpened:
    """Fact: a lease opened from a match, with the match's escrow held."""

    lease_id: UUID
    ask_id: UUID
    bid_id: UUID
    provider_id: UUID
    node_id: UUID
    consumer_id: UUID
    gpu_model: str
    gpu_count: int
    price_per_gpu_hour: int
    duration_s: int
    escrow_amount: int
    """The match's escrow: the lease's first escrow_held."""
    opened_at: datetime
    """`now` of the open, never before the match."""
    ends_at: datetime
    """opened_at + duration_s."""


@dataclass(frozen=True, slots=True)
class EscrowToppedUp:
    """Fact: the consumer added escrow; the lease runs longer by what it buys."""

    lease_id: UUID
    amount: int
    """> 0; added to escrow_held."""
    extension_s: int
    """amount * 3600 // (gpu_count * price_per_gpu_hour): whole seconds the amount buys."""
    ends_at: datetime
    """The new ends_at: the previous one + extension_s."""
    topped_up_at: datetime


@dataclass(frozen=True, slots=True)
class HeartbeatRecorded:
    """Fact: the lease's node showed it was alive at `at`."""

    lease_id: UUID
    node_id: UUID
    sequence: int
    """> the previous heartbeat's sequence."""
    at: datetime
    """The node's time; <= recorded_at + heartbeat_future_tolerance_s."""
    recorded_at: datetime
    downtime_s: int
    """Downtime this heartbeat ends: from the open gap's detection to min(at, recorded_at),
    in whole seconds; 0 when no gap was open."""


@dataclass(frozen=True, slots=True)
class DowntimeDetected:
    """Fact: no heartbeat for more than heartbeat_timeout_s. Once per gap."""

    lease_id: UUID
    from_at: datetime
    """The lease's alive_at: the last evidence of life."""
    to_at: datetime
    """When the gap was noticed (at most the time of the decision that noticed it)."""
    downtime_s: int
    """to_at - from_at, in whole seconds."""


@dataclass(frozen=True, slots=True)
class UsageCharged:
    """Fact: metered usage drew escrow. amount + amount_uncovered == amount_requested."""

    lease_id: UUID
    usage_ref: str
    """The usage report (or settlement line) charged."""
    amount_requested: int
    """> 0: the price of the usage."""
    amount: int
    """Drawn from escrow: min(amount_requested, escrow available); 0 only when none was."""
    charged_at: datetime
    withheld: int = 0
    """Of `amount`: the part not paid to the provider (usage inside a window the checkers
    failed); it goes to the insurance pool, out of which the slash refunds the consumer.
    0 <= withheld <= amount."""

    @property
    def amount_uncovered(self) -> int:
        """What the exhausted escrow could not cover (never moved, only recorded)."""
        return self.amount_requested - self.amount


@dataclass(frozen=True, slots=True)
class LeasePaused:
    """Fact: the escrow is exhausted; the lease waits for a top-up."""

    lease_id: UUID
    paused_at: datetime
    grace_ends_at: datetime
    """paused_at + escrow_grace_s: from then on it may close for escrow_exhausted."""


@dataclass(frozen=True, slots=True)
class LeaseResumed:
    """Fact: a top-up made escrow available again; the paused lease serves again."""

    lease_id: UUID
    resumed_at: datetime


@dataclass(frozen=True, slots=True)
class LeaseClosed:
    """Fact: the lease closed; its unused escrow goes back to the consumer."""

    lease_id: UUID
    reason: CloseReason
    closed_by: UUID
    """Who closed it: the consumer, the provider, or the service acting for the rules."""
    closed_at: datetime
    escrow_released: int
    """escrow_held - escrow_charged, exactly; >= 0. 0 when `escrow_kept`."""
    downtime_s: int
    """Downtime of a gap still open at the close, from its detection to closed_at."""
    escrow_kept: bool = False
    """The unused escrow stays for settlement (`LeaseRules.release_escrow_at_close` False):
    it goes back by a later `EscrowReleased`."""


@dataclass(frozen=True, slots=True)
class EscrowReleased:
    """Fact: settlement charged a closed lease's last usage; the unused escrow goes back to
    the consumer and nothing more may be charged."""

    lease_id: UUID
    amount: int
    """escrow_held - escrow_charged, exactly; >= 0."""
    released_at: datetime


LeaseFact = (
    LeaseOpened
    | EscrowToppedUp
    | HeartbeatRecorded
    | DowntimeDetected
    | UsageCharged
    | LeasePaused
    | LeaseResumed
    | LeaseClosed
    | EscrowReleased
)
"""What the lease rules record."""


def _clock(lease: Lease, now: datetime) -> datetime:
    """The time of the next facts: `now`, but never before the lease's latest fact."""
    return now if now > lease.updated_at else lease.updated_at


# -- decisions ----------------------------------------------------------------------------


class OpenLeaseResult(IntEnum):
    """Result of `open_lease`, in the order the rules are checked. Never renumber.

    The match is a fact of the order book and passes these checks; they guard against a
    match built by hand."""

    ok = 0
    ids_must_not_be_zero = 1
    """ask_id, bid_id, provider_id, node_id or consumer_id is zero."""
    gpu_count_must_be_positive = 2
    gpu_count_exceeds_max = 3
    price_must_be_positive = 4
    price_exceeds_max = 5
    duration_must_be_positive = 6
    duration_exceeds_max = 7
    escrow_below_cost = 8
    """escrow_amount < lease_cost(gpu_count, price_per_gpu_hour, duration_s)."""
    escrow_exceeds_max = 9


def open_lease(match: OrderMatched, now: datetime) -> tuple[OpenLeaseResult, tuple[LeaseFact, ...]]:
    """Open the lease of `match`, at `now` (never before matched_at)."""
    r = OpenLeaseResult
    for name in ("gpu_count", "price_per_gpu_hour", "duration_s", "escrow_amount"):
        require_int(name, getattr(match, name))
    ids = (match.ask_id, match.bid_id, match.provider_id, match.node_id, match.consumer_id)
    if not all(i.int for i in ids):
        return r.ids_must_not_be_zero, ()
    if match.gpu_count <= 0:
        return r.gpu_count_must_be_positive, ()
    if match.gpu_count > GPU_COUNT_MAX:
        return r.gpu_count_exceeds_max, ()
    if match.price_per_gpu_hour <= 0:
        return r.price_must_be_positive, ()
    if match.price_per_gpu_hour > PRICE_MAX:
        return r.price_exceeds_max, ()
    if match.duration_s <= 0:
        return r.duration_must_be_positive, ()
    if match.duration_s > DURATION_S_MAX:
        return r.duration_exceeds_max, ()
    cost = lease_cost(match.gpu_count, match.price_per_gpu_hour, match.duration_s)
    if match.escrow_amount < cost:
        return r.escrow_below_cost, ()
    if match.escrow_amount > ESCROW_MAX:
        return r.escrow_exceeds_max, ()
    opened_at = now if now > match.matched_at else match.matched_at
    fact = LeaseOpened(
        lease_id=lease_id_for(match.ask_id, match.bid_id),
        ask_id=match.ask_id,
        bid_id=match.bid_id,
        provider_id=match.provider_id,
        node_id=match.node_id,
        consumer_id=match.consumer_id,
        gpu_model=match.gpu_model,
        gpu_count=match.gpu_count,
        price_per_gpu_hour=match.price_per_gpu_hour,
        duration_s=match.duration_s,
        escrow_amount=match.escrow_amount,
        opened_at=opened_at,
        ends_at=opened_at + timedelta(seconds=match.duration_s),
    )
    return r.ok, (fact,)


class TopUpResult(IntEnum):
    """Result of `top_up`, in the order the rules are checked. Never renumber."""

    ok = 0
    amount_must_not_be_negative = 1
    amount_must_not_be_zero = 2
    amount_exceeds_max = 3
    lease_already_closed = 4
    lease_expired = 5
    """now >= ends_at: the lease must close (expiry); a top-up cannot revive it."""
    escrow_held_exceeds_max = 6
    """escrow_held + amount > ESCROW_MAX."""
    lease_duration_exceeds_max = 7
    """The extended ends_at would lie more than LEASE_DURATION_S_MAX after opened_at."""


def top_up(lease: Lease, amount: int, now: datetime) -> tuple[TopUpResult, tuple[LeaseFact, ...]]:
    """Add `amount` to the escrow and extend ends_at by the whole seconds it buys; resume a
    paused lease."""
    r = TopUpResult
    require_int("amount", amount)
    now = _clock(lease, now)
    if amount < 0:
        return r.amount_must_not_be_negative, ()
    if amount == 0:
        return r.amount_must_not_be_zero, ()
    if amount > ESCROW_MAX:
        return r.amount_exceeds_max, ()
    if lease.status is LeaseStatus.closed:
        return r.lease_already_closed, ()
    if now >= lease.ends_at:
        return r.lease_expired, ()
    if lease.escrow_held + amount > ESCROW_MAX:
        return r.escrow_held_exceeds_max, ()
    extension_s = amount * SECONDS_PER_HOUR // (lease.gpu_count * lease.price_per_gpu_hour)
    duration_s = _whole_seconds(lease.ends_at - lease.opened_at)
    if duration_s + extension_s > LEASE_DURATION_S_MAX:
        return r.lease_duration_exceeds_max, ()
    assert lease_cost(lease.gpu_count, lease.price_per_gpu_hour, extension_s) <= amount
    facts: list[LeaseFact] = [
        EscrowToppedUp(
            lease.id, amount, extension_s, lease.ends_at + timedelta(seconds=extension_s), now
        )
    ]
    if lease.status is LeaseStatus.paused:
        facts.append(LeaseResumed(lease.id, now))
    return r.ok, tuple(facts)


class RecordHeartbeatResult(IntEnum):
    """Result of `record_heartbeat`, in the order the rules are checked. Never renumber."""

    ok = 0
    sequence_must_be_positive = 1
    sequence_exceeds_max = 2
    node_must_be_lease_node = 3
    """The heartbeat comes from another node than the one serving the lease."""
    lease_already_closed = 4
    heartbeat_must_not_be_before_lease_opened = 5
    heartbeat_must_not_be_in_the_future = 6
    """at > now + heartbeat_future_tolerance_s."""
    sequence_already_recorded = 7
    """sequence == the latest accepted sequence: a duplicate."""
    sequence_out_of_order = 8
    """sequence < the latest accepted sequence."""
    heartbeat_must_not_go_back_in_time = 9
    """at < the latest accepted heartbeat's at, though its sequence is higher."""


def record_heartbeat(
    lease: Lease,
    node_id: UUID,
    sequence: int,
    at: datetime,
    now: datetime,
    rules: LeaseRules,
) -> tuple[RecordHeartbeatResult, tuple[LeaseFact, ...]]:
    """Record a heartbeat of `node_id` sent at `at`, received at `now`. A heartbeat after a
    gap nobody detected yet records the gap first (`DowntimeDetected`)."""
    r = RecordHeartbeatResult
    require_int("sequence", sequence)
    now = _clock(lease, now)
    if sequence <= 0:
        return r.sequence_must_be_positive, ()
    if sequence > HEARTBEAT_SEQUENCE_MAX:
        return r.sequence_exceeds_max, ()
    if node_id != lease.node_id:
        return r.node_must_be_lease_node, ()
    if lease.status is LeaseStatus.closed:
        return r.lease_already_closed, ()
    if at < lease.opened_at:
        return r.heartbeat_must_not_be_before_lease_opened, ()
    if at > now + timedelta(seconds=rules.heartbeat_future_tolerance_s):
        return r.heartbeat_must_not_be_in_the_future, ()
    if sequence == lease.heartbeat_sequence:
        return r.sequence_already_recorded, ()
    if sequence < lease.heartbeat_sequence:
        return r.sequence_out_of_order, ()
    if lease.last_heartbeat_at is not None and at < lease.last_heartbeat_at:
        return r.heartbeat_must_not_go_back_in_time, ()
    facts: list[LeaseFact] = []
    seen_at = at if at < now else now
    timeout = timedelta(seconds=rules.heartbeat_timeout_s)
    if not lease.downtime_open and seen_at - lease.alive_at > timeout:
        gap = _downtime(lease, seen_at)
        facts.append(gap)
        lease = apply(lease, gap)
    downtime_s = _whole_seconds(seen_at - lease.alive_at) if lease.downtime_open else 0
    facts.append(HeartbeatRecorded(lease.id, node_id, sequence, at, now, downtime_s))
    return r.ok, tuple(facts)


def _downtime(lease: Lease, to_at: datetime) -> DowntimeDetected:
    return DowntimeDetected(lease.id, lease.alive_at, to_at, _whole_seconds(to_at - lease.alive_at))


class DetectDowntimeResult(IntEnum):
    """Result of `detect_downtime`, in the order the rules are checked. Never renumber."""

    ok = 0
    lease_already_closed = 1
    downtime_already_detected = 2
    """The current gap was recorded already; only a heartbeat ends it."""
    heartbeat_not_overdue = 3
    """now - alive_at <= heartbeat_timeout_s."""


def detect_downtime(
    lease: Lease, now: datetime, rules: LeaseRules
) -> tuple[DetectDowntimeResult, tuple[LeaseFact, ...]]:
    """Record the current gap if no heartbeat came for more than heartbeat_timeout_s."""
    r = DetectDowntimeResult
    now = _clock(lease, now)
    if lease.status is LeaseStatus.closed:
        return r.lease_already_closed, ()
    if lease.downtime_open:
        return r.downtime_already_detected, ()
    if now - lease.alive_at <= timedelta(seconds=rules.heartbeat_timeout_s):
        return r.heartbeat_not_overdue, ()
    return r.ok, (_downtime(lease, now),)


class ChargeUsageResult(IntEnum):
    """Result of `charge_usage`, in the order the rules are checked. Never renumber."""

    ok = 0
    amount_must_not_be_negative = 1
    amount_must_not_be_zero = 2
    amount_exceeds_max = 3
    usage_ref_must_not_be_empty = 4
    usage_ref_exceeds_max_length = 5
    lease_already_closed = 6
    """Closed, and its unused escrow was released: nothing more may be charged."""
    escrow_exhausted = 7
    """amount >= escrow available. Comes WITH facts: the charge of what was covered, then a
    pause or a close as the rules say (none when the lease was paused or closed already)."""
    withheld_out_of_range = 8
    """withheld < 0 or withheld > amount."""


def charge_usage(
    lease: Lease,
    amount: int,
    usage_ref: str,
    now: datetime,
    rules: LeaseRules,
    withheld: int = 0,
) -> tuple[ChargeUsageResult, tuple[LeaseFact, ...]]:
    """Draw `amount` from the escrow for the usage `usage_ref`, never below zero; of it,
    `withheld` is not the provider's (see `UsageCharged.withheld`). A closed lease whose
    escrow was kept for settlement still accepts charges until `release_escrow`."""
    r = ChargeUsageResult
    require_int("amount", amount)
    require_int("withheld", withheld)
    if not isinstance(usage_ref, str):
        raise TypeError(f"usage_ref must be a str, got {usage_ref!r}")
    now = _clock(lease, now)
    if amount < 0:
        return r.amount_must_not_be_negative, ()
    if amount == 0:
        return r.amount_must_not_be_zero, ()
    if amount > ESCROW_MAX:
        return r.amount_exceeds_max, ()
    if not usage_ref:
        return r.usage_ref_must_not_be_empty, ()
    if len(usage_ref) > USAGE_REF_LENGTH_MAX:
        return r.usage_ref_exceeds_max_length, ()
    if lease.escrow_final:
        return r.lease_already_closed, ()
    if not 0 <= withheld <= amount:
        return r.withheld_out_of_range, ()
    available = lease.escrow_available
    charged = min(amount, available)
    charge = UsageCharged(lease.id, usage_ref, amount, charged, now, min(withheld, charged))
    facts: list[LeaseFact] = [charge]
    if amount < available:
        return r.ok, tuple(facts)
    if lease.status is LeaseStatus.closed:
        return r.escrow_exhausted, tuple(facts)
    if lease.status is LeaseStatus.open:
        if rules.on_escrow_exhausted is EscrowExhaustedAction.close:
            reason = CloseReason.escrow_exhausted
            facts += _close_facts(apply(lease, charge), reason, PROTOCOL_ID, now, rules)
        else:
            grace_ends_at = now + timedelta(seconds=rules.escrow_grace_s)
            facts.append(LeasePaused(lease.id, now, grace_ends_at))
    return r.escrow_exhausted, tuple(facts)


def _close_facts(
    lease: Lease, reason: CloseReason, by: UUID, now: datetime, rules: LeaseRules
) -> list[LeaseFact]:
    """The facts of closing `lease` at `now`: the gap nobody detected yet (if any), then the
    close, releasing escrow_held - escrow_charged and counting the open gap's downtime."""
    facts: list[LeaseFact] = []
    if not lease.downtime_open and now - lease.alive_at > timedelta(
        seconds=rules.heartbeat_timeout_s
    ):
        gap = _downtime(lease, now)
        facts.append(gap)
        lease = apply(lease, gap)
    keep = not rules.release_escrow_at_close
    facts.append(
        LeaseClosed(
            lease_id=lease.id,
            reason=reason,
            closed_by=by,
            closed_at=now,
            escrow_released=0 if keep else lease.escrow_held - lease.escrow_charged,
            downtime_s=_whole_seconds(now - lease.alive_at) if lease.downtime_open else 0,
            escrow_kept=keep,
        )
    )
    return facts


class ReleaseEscrowResult(IntEnum):
    """Result of `release_escrow`, in the order the rules are checked. Never renumber."""

    ok = 0
    lease_not_closed = 1
    escrow_already_released = 2


def release_escrow(
    lease: Lease, now: datetime
) -> tuple[ReleaseEscrowResult, tuple[LeaseFact, ...]]:
    """After settlement charged a closed lease's last usage: its unused escrow
    (held - charged, possibly 0) goes back to the consumer; no charge after it."""
    r = ReleaseEscrowResult
    if lease.status is not LeaseStatus.closed:
        return r.lease_not_closed, ()
    if lease.escrow_final:
        return r.escrow_already_released, ()
    amount = lease.escrow_held - lease.escrow_charged
    return r.ok, (EscrowReleased(lease.id, amount, _clock(lease, now)),)


class CloseResult(IntEnum):
    """Result of `close`, in the order the rules are checked. Never renumber."""

    ok = 0
    closed_by_must_not_be_zero = 1
    lease_already_closed = 2
    closer_must_be_consumer = 3
    """reason consumer, but `by` is not the lease's consumer."""
    closer_must_be_provider = 4
    """reason provider, but `by` is not the lease's provider."""
    lease_not_yet_expired = 5
    """reason expiry, but now < ends_at."""
    escrow_not_exhausted = 6
    """reason escrow_exhausted, but the lease is not paused for an exhausted escrow."""
    escrow_grace_not_over = 7
    """reason escrow_exhausted, but now < grace_ends_at."""


def close(
    lease: Lease, reason: CloseReason, by: UUID, now: datetime, rules: LeaseRules
) -> tuple[CloseResult, tuple[LeaseFact, ...]]:
    """Close the lease for `reason`, releasing escrow_held - escrow_charged to the consumer.
    A gap nobody detected yet is recorded first (`DowntimeDetected`)."""
    r = CloseResult
    if not isinstance(reason, CloseReason):
        raise TypeError(f"reason must be a CloseReason, got {reason!r}")
    now = _clock(lease, now)
    if not by.int:
        return r.closed_by_must_not_be_zero, ()
    if lease.status is LeaseStatus.closed:
        return r.lease_already_closed, ()
    if reason is CloseReason.consumer and by != lease.consumer_id:
        return r.closer_must_be_consumer, ()
    if reason is CloseReason.provider and by != lease.provider_id:
        return r.closer_must_be_provider, ()
    if reason is CloseReason.expiry and now < lease.ends_at:
        return r.lease_not_yet_expired, ()
    if reason is CloseReason.escrow_exhausted:
        if lease.status is not LeaseStatus.paused:
            return r.escrow_not_exhausted, ()
        assert lease.grace_ends_at is not None
        if now < lease.grace_ends_at:
            return r.escrow_grace_not_over, ()
    return r.ok, tuple(_close_facts(lease, reason, by, now, rules))


def close_due(lease: Lease, now: datetime) -> CloseReason | None:
    """The automatic close due at `now`, if any: expiry (now >= ends_at) first, then
    escrow_exhausted (paused and now >= grace_ends_at). None for a closed lease."""
    if lease.status is LeaseStatus.closed:
        return None
    now = _clock(lease, now)
    if now >= lease.ends_at:
        return CloseReason.expiry
    if lease.status is LeaseStatus.paused:
        assert lease.grace_ends_at is not None
        if now >= lease.grace_ends_at:
            return CloseReason.escrow_exhausted
    return None


# -- appliers (shared by decisions and replay) --------------------------------------------


def apply(lease: Lease | None, fact: LeaseFact) -> Lease:
    """The state after `fact` (a fact decided for this state, or read back from the log).
    `lease` is None only before the `LeaseOpened` fact."""
    if isinstance(fact, LeaseOpened):
        assert lease is None, f"lease {fact.lease_id} opened twice"
        assert fact.lease_id == lease_id_for(fact.ask_id, fact.bid_id)
        after = Lease(
            id=fact.lease_id,
            ask_id=fact.ask_id,
            bid_id=fact.bid_id,
            provider_id=fact.provider_id,
            node_id=fact.node_id,
            consumer_id=fact.consumer_id,
            gpu_model=fact.gpu_model,
            gpu_count=fact.gpu_count,
            price_per_gpu_hour=fact.price_per_gpu_hour,
            escrow_held=fact.escrow_amount,
            escrow_charged=0,
            escrow_released=0,
            opened_at=fact.opened_at,
            ends_at=fact.ends_at,
            status=LeaseStatus.open,
            updated_at=fact.opened_at,
            alive_at=fact.opened_at,
        )
        _assert_invariants(after)
        return after
    assert lease is not None, f"fact of lease {fact.lease_id} before it opened"
    assert fact.lease_id == lease.id, f"fact of lease {fact.lease_id} applied to {lease.id}"
    assert lease.status is not LeaseStatus.closed or (
        isinstance(fact, UsageCharged | EscrowReleased) and not lease.escrow_final
    ), f"lease {lease.id}: fact after close"
    if isinstance(fact, EscrowToppedUp):
        assert fact.amount > 0
        assert fact.ends_at == lease.ends_at + timedelta(seconds=fact.extension_s)
        after = replace(
            lease,
            escrow_held=lease.escrow_held + fact.amount,
            ends_at=fact.ends_at,
            updated_at=fact.topped_up_at,
        )
    elif isinstance(fact, HeartbeatRecorded):
        assert fact.node_id == lease.node_id
        assert fact.sequence > lease.heartbeat_sequence
        assert fact.downtime_s == 0 or lease.downtime_open
        seen_at = min(fact.at, fact.recorded_at)
        after = replace(
            lease,
            heartbeat_sequence=fact.sequence,
            last_heartbeat_at=fact.at,
            alive_at=max(lease.alive_at, fact.at),
            downtime_open=False,
            downtime_s=lease.downtime_s + fact.downtime_s,
            updated_at=max(lease.updated_at, fact.recorded_at),
        )
        assert fact.downtime_s == (
            _whole_seconds(seen_at - lease.alive_at) if lease.downtime_open else 0
        )
    elif isinstance(fact, DowntimeDetected):
        assert not lease.downtime_open, f"lease {lease.id}: gap detected twice"
        assert fact.from_at == lease.alive_at
        assert fact.downtime_s == _whole_seconds(fact.to_at - fact.from_at)
        after = replace(
            lease,
            alive_at=max(fact.from_at, fact.to_at),
            downtime_open=True,
            downtime_s=lease.downtime_s + fact.downtime_s,
            updated_at=max(lease.updated_at, fact.to_at),
        )
    elif isinstance(fact, UsageCharged):
        assert 0 <= fact.amount <= fact.amount_requested
        assert 0 <= fact.withheld <= fact.amount
        assert fact.amount == min(fact.amount_requested, lease.escrow_available)
        after = replace(
            lease,
            escrow_charged=lease.escrow_charged + fact.amount,
            usage_uncovered=lease.usage_uncovered + fact.amount_uncovered,
            updated_at=fact.charged_at,
        )
    elif isinstance(fact, LeasePaused):
        assert lease.status is LeaseStatus.open and lease.escrow_available == 0
        after = replace(
            lease,
            status=LeaseStatus.paused,
            grace_ends_at=fact.grace_ends_at,
            updated_at=fact.paused_at,
        )
    elif isinstance(fact, LeaseResumed):
        assert lease.status is LeaseStatus.paused and lease.escrow_available > 0
        after = replace(
            lease, status=LeaseStatus.open, grace_ends_at=None, updated_at=fact.resumed_at
        )
    elif isinstance(fact, EscrowReleased):
        assert lease.status is LeaseStatus.closed and not lease.escrow_final
        assert fact.amount == lease.escrow_held - lease.escrow_charged
        after = replace(
            lease,
            escrow_released=fact.amount,
            escrow_final=True,
            updated_at=max(lease.updated_at, fact.released_at),
        )
    else:
        assert fact.escrow_released == (
            0 if fact.escrow_kept else lease.escrow_held - lease.escrow_charged
        )
        assert fact.downtime_s == 0 or lease.downtime_open
        after = replace(
            lease,
            status=LeaseStatus.closed,
            close_reason=fact.reason,
            closed_at=fact.closed_at,
            escrow_released=fact.escrow_released,
            escrow_final=not fact.escrow_kept,
            grace_ends_at=None,
            downtime_s=lease.downtime_s + fact.downtime_s,
            downtime_open=False,
            updated_at=fact.closed_at,
        )
    assert after.updated_at >= lease.updated_at, f"lease {lease.id}: time ran backwards"
    _assert_invariants(after)
    return after


def _assert_invariants(lease: Lease) -> None:
    assert 0 <= lease.escrow_charged <= lease.escrow_held <= ESCROW_MAX, (
        f"lease {lease.id}: escrow charged {lease.escrow_charged} of {lease.escrow_held}"
    )
    assert lease.escrow_available >= 0
    if lease.escrow_final:
        assert lease.status is LeaseStatus.closed
        assert lease.escrow_released == lease.escrow_held - lease.escrow_charged
        assert lease.escrow_available == 0
    else:
        assert lease.escrow_released == 0
    assert (lease.grace_ends_at is not None) == (lease.status is LeaseStatus.paused)
    assert 0 <= lease.downtime_s <= _whole_seconds(lease.updated_at - lease.opened_at), (
        f"lease {lease.id}: downtime {lease.downtime_s}s beyond the elapsed time"
    )
    assert 0 <= lease.heartbeat_sequence <= HEARTBEAT_SEQUENCE_MAX
    assert lease.opened_at <= lease.ends_at


def replay(facts: Iterable[LeaseFact]) -> Lease:
    """Rebuild a lease from its facts in log order (the first must be `LeaseOpened`)."""
    lease: Lease | None = None
    for fact in facts:
        lease = apply(lease, fact)
    if lease is None:
        raise ValueError("no facts: a lease starts with LeaseOpened")
    return lease


__all__ = [
    "DEMO_LEASE_RULES",
    "ESCROW_GRACE_S_MAX",
    "ESCROW_MAX",
    "HEARTBEAT_FUTURE_TOLERANCE_S_MAX",
    "HEARTBEAT_INTERVAL_S_DEFAULT",
    "HEARTBEAT_INTERVAL_S_MAX",
    "HEARTBEAT_SEQUENCE_MAX",
    "HEARTBEAT_TIMEOUT_INTERVALS_DEFAULT",
    "HEARTBEAT_TIMEOUT_S_MAX",
    "LEASE_DURATION_S_MAX",
    "LEASE_ID_NAMESPACE",
    "PROTOCOL_ID",
    "USAGE_REF_LENGTH_MAX",
    "ChargeUsageResult",
    "CloseReason",
    "CloseResult",
    "DetectDowntimeResult",
    "DowntimeDetected",
    "EscrowExhaustedAction",
    "EscrowToppedUp",
    "HeartbeatRecorded",
    "Lease",
    "LeaseClosed",
    "LeaseFact",
    "LeaseOpened",
    "LeasePaused",
    "LeaseResumed",
    "LeaseRules",
    "LeaseStatus",
    "OpenLeaseResult",
    "RecordHeartbeatResult",
    "TopUpResult",
    "UsageCharged",
    "apply",
    "charge_usage",
    "close",
    "close_due",
    "detect_downtime",
    "lease_id_for",
    "open_lease",
    "record_heartbeat",
    "replay",
]
