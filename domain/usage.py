"""Metered usage: which usage reports are recorded. Pure rules: no I/O, `now` passed in.

A GPU worker reports, per lease and per interval, what it measured (`workers.messages.
UsageReport`, signed by the node's key). Ingest verifies the signature and then asks
`check_usage` whether the report may be recorded, against the lease (from the marketplace)
and the last report recorded for that lease (`LastUsage`). An accepted report is recorded
as one `UsageRecorded` fact in the lease's usage stream, at version = its sequence, so the
store's unique (stream, version) key can never hold a sequence twice.

Rules, checked in this order (the first that fails is the answer; the codes are those of
`RejectReason` below, declared in the same order):

1. `unknown_lease`: the marketplace knows no lease with the report's id.
2. `lease_closed`: the lease is closed and the interval ends after it closed (usage of
   served time that arrives late is still recorded: it is billed in the next epoch).
3. `node_mismatch`: the report's node is not the node that serves the lease.
4. `duplicate`: the sequence is the last one recorded, by the very same message (same
   envelope id): a redelivery. Nothing is recorded twice.
5. `replayed`: the sequence is at or below the last one recorded, by another message (a
   resend under a new id, or an old report played again). An exact redelivery of an *older*
   report is also reported as replayed: only the last recorded message's id is remembered.
6. `out_of_order`: the sequence runs ahead of the last recorded one by more than
   `1 + sequence_gap_max` (each gap is reports lost on the way; a few are tolerated, a jump
   is not). A lease's first report counts from sequence 0.
7. `impossible_interval`: the interval is empty or negative (end <= start), starts before
   the lease opened, or ends later than `now + future_tolerance_s` (clock skew allowed).
8. `overlapping_interval`: the interval starts before the last recorded one ended (time
   is never billed twice).
9. `impossible_device_time`: the report claims more GPUs than the lease has, more wall
   time than the interval lasted (plus `wall_time_tolerance_us` for timer granularity), or
   more device time than wall time x GPUs.

Everything else is recorded. All times are microseconds or timezone-aware datetimes; all
counters are non-negative integers (the message schema bounds them).

`check_usage` takes a `UsageRecorded`; `check_report` is the same rules (the one
implementation) on the report's fields one by one as integers (ids as `UUID.int`, times as
microseconds since the Unix epoch, the lease as its `LeaseTerms`), for ingest's hot loop,
which decides reports before it makes anything of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import NamedTuple
from uuid import UUID

from domain.lease import Lease, LeaseStatus

SEQUENCE_GAP_MAX_DEFAULT = 16
FUTURE_TOLERANCE_S_MAX = 3_600
SEQUENCE_GAP_MAX_MAX = 1_000_000
WALL_TIME_TOLERANCE_US_MAX = 60_000_000
_MICROSECOND = timedelta(microseconds=1)


class RejectReason(StrEnum):
    """Why ingest turned a message away (it goes to the dead-letter topic with this)."""

    oversized = "oversized"
    malformed = "malformed"
    unknown_type = "unknown_type"
    unsigned = "unsigned"
    signature_invalid = "signature_invalid"
    unknown_lease = "unknown_lease"
    lease_closed = "lease_closed"
    node_mismatch = "node_mismatch"
    duplicate = "duplicate"
    replayed = "replayed"
    out_of_order = "out_of_order"
    impossible_interval = "impossible_interval"
    overlapping_interval = "overlapping_interval"
    impossible_device_time = "impossible_device_time"
    refused = "refused"
    """The marketplace refused the command the message carries (its code is in detail)."""


@dataclass(frozen=True, slots=True)
class UsageRules:
    """The numbers of the rules above (configuration)."""

    sequence_gap_max: int = SEQUENCE_GAP_MAX_DEFAULT
    """Most sequence numbers that may be missing between two recorded reports
    (0: none may be lost); 0..SEQUENCE_GAP_MAX_MAX."""
    future_tolerance_s: int = 5
    """How far an interval may end after `now` (the node's clock runs ahead);
    0..FUTURE_TOLERANCE_S_MAX."""
    wall_time_tolerance_us: int = 1_000
    """How much wall time may exceed the interval's length (timer granularity);
    0..WALL_TIME_TOLERANCE_US_MAX."""

    def __post_init__(self) -> None:
        for name, maximum in (
            ("sequence_gap_max", SEQUENCE_GAP_MAX_MAX),
            ("future_tolerance_s", FUTURE_TOLERANCE_S_MAX),
            ("wall_time_tolerance_us", WALL_TIME_TOLERANCE_US_MAX),
        ):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= maximum:
                raise ValueError(f"{name} must be an int within 0..{maximum}, got {value!r}")


DEFAULT_USAGE_RULES = UsageRules()


@dataclass(frozen=True, slots=True)
class UsageRecorded:
    """Fact: one usage report was recorded (stream: the lease id; version: the sequence)."""

    envelope_id: UUID
    """The id of the message that carried the report (its idempotency key)."""
    lease_id: UUID
    node_id: UUID
    sequence: int
    """Per lease, 1, 2, 3...; the event's version in the lease's usage stream."""
    interval_start: datetime
    interval_end: datetime
    """The interval measured, [start, end), as the node's clock saw it."""
    gpu_count: int
    wall_time_us: int
    device_time_us: int
    """Time the devices were busy, summed over the lease's GPUs."""
    flops: int
    samples: int
    tokens: int
    steps: int
    peak_memory_bytes: int
    workload: str
    device: str
    received_at: datetime
    """When the message reached the broker (its record timestamp): the same on every
    redelivery, so re-reading a message records the very same fact."""


class LastUsage(NamedTuple):
    """What the rules remember of a lease's last recorded report (a tuple of integers:
    ingest makes one per recorded report)."""

    sequence: int
    envelope: int
    """The id of the message that carried it, as its integer (`UUID.int`)."""
    interval_end_us: int
    """When its interval ended, in microseconds since the Unix epoch (`epoch_us`)."""

    @classmethod
    def of(cls, fact: UsageRecorded) -> LastUsage:
        return cls(fact.sequence, fact.envelope_id.int, epoch_us(fact.interval_end))


class LeaseTerms(NamedTuple):
    """What the rules read of a lease, as integers (times in microseconds since the Unix
    epoch): made once per lease by a caller deciding many reports."""

    id: UUID
    node_id: UUID
    gpu_count: int
    opened_us: int
    closed_us: int | None
    """When it closed; None while it is open (or closed without a time)."""

    @classmethod
    def of(cls, lease: Lease) -> LeaseTerms:
        closed = lease.closed_at if lease.status is LeaseStatus.closed else None
        return cls(
            lease.id,
            lease.node_id,
            lease.gpu_count,
            epoch_us(lease.opened_at),
            None if closed is None else epoch_us(closed),
        )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_us(value: datetime) -> int:
    """A timezone-aware time as microseconds since the Unix epoch (exact)."""
    since = value - _EPOCH
    return (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds


def _iso(us: int) -> str:
    return (_EPOCH + timedelta(microseconds=us)).isoformat()


@dataclass(frozen=True, slots=True)
class UsageRejected:
    """Why a report is not recorded: the rule's code and what was wrong, with the ids."""

    reason: RejectReason
    detail: str


def check_usage(
    lease: Lease | None,
    last: LastUsage | None,
    usage: UsageRecorded,
    now: datetime,
    rules: UsageRules = DEFAULT_USAGE_RULES,
) -> UsageRejected | None:
    """None when `usage` may be recorded; else the first rule it breaks (see the module
    docstring for the rules, in this order)."""
    return check_report(
        None if lease is None else LeaseTerms.of(lease),
        last,
        usage.envelope_id.int,
        usage.lease_id.int,
        usage.node_id.int,
        usage.sequence,
        epoch_us(usage.interval_start),
        epoch_us(usage.interval_end),
        usage.gpu_count,
        usage.wall_time_us,
        usage.device_time_us,
        epoch_us(now) + rules.future_tolerance_s * 1_000_000,
        rules,
    )


def check_report(
    lease: LeaseTerms | None,
    last: LastUsage | None,
    envelope: int,
    lease_id: int,
    node_id: int,
    sequence: int,
    start_us: int,
    end_us: int,
    gpu_count: int,
    wall_time_us: int,
    device_time_us: int,
    latest_end_us: int,
    rules: UsageRules = DEFAULT_USAGE_RULES,
) -> UsageRejected | None:
    """`check_usage` on a report's fields as integers, for ingest's hot loop: ids as their
    `UUID.int`, the interval as microseconds since the Unix epoch (`epoch_us`) and
    `latest_end_us` = now + rules.future_tolerance_s (the latest an interval may end),
    computed once by a caller deciding many."""
    if lease is None or lease.id.int != lease_id:
        return UsageRejected(RejectReason.unknown_lease, f"no lease {UUID(int=lease_id)}")
    closed_us = lease.closed_us
    if closed_us is not None and end_us > closed_us:
        return UsageRejected(
            RejectReason.lease_closed,
            f"lease {lease.id} closed at {_iso(closed_us)}, the interval ends at {_iso(end_us)}",
        )
    if node_id != lease.node_id.int:
        return UsageRejected(
            RejectReason.node_mismatch,
            f"node {UUID(int=node_id)} reports for lease {lease.id}, served by node "
            f"{lease.node_id}",
        )
    if last is not None:
        last_sequence = last.sequence
        if sequence <= last_sequence:
            if sequence == last_sequence and envelope == last.envelope:
                return UsageRejected(
                    RejectReason.duplicate,
                    f"message {UUID(int=envelope)} (lease {lease.id} sequence {sequence}) is "
                    "already recorded",
                )
            return UsageRejected(
                RejectReason.replayed,
                f"lease {lease.id} sequence {sequence} is at or below the last recorded "
                f"{last_sequence}",
            )
    else:
        last_sequence = 0
    if sequence > last_sequence + 1 + rules.sequence_gap_max:
        return UsageRejected(
            RejectReason.out_of_order,
            f"lease {lease.id} sequence {sequence} runs ahead of the last recorded "
            f"{last_sequence} by more than {1 + rules.sequence_gap_max}",
        )
    if end_us <= start_us:
        return UsageRejected(
            RejectReason.impossible_interval,
            f"interval ends at {_iso(end_us)}, not after its start {_iso(start_us)}",
        )
    if start_us < lease.opened_us:
        return UsageRejected(
            RejectReason.impossible_interval,
            f"interval starts at {_iso(start_us)}, before lease {lease.id} "
            f"opened at {_iso(lease.opened_us)}",
        )
    if end_us > latest_end_us:
        now_us = latest_end_us - rules.future_tolerance_s * 1_000_000
        return UsageRejected(
            RejectReason.impossible_interval,
            f"interval ends at {_iso(end_us)}, more than "
            f"{rules.future_tolerance_s} s after now ({_iso(now_us)})",
        )
    if last is not None and start_us < last.interval_end_us:
        return UsageRejected(
            RejectReason.overlapping_interval,
            f"interval starts at {_iso(start_us)}, before the last "
            f"recorded one ended ({_iso(last.interval_end_us)})",
        )
    if gpu_count > lease.gpu_count:
        return UsageRejected(
            RejectReason.impossible_device_time,
            f"{gpu_count} GPUs reported, lease {lease.id} has {lease.gpu_count}",
        )
    interval_us = end_us - start_us
    if wall_time_us > interval_us + rules.wall_time_tolerance_us:
        return UsageRejected(
            RejectReason.impossible_device_time,
            f"wall time {wall_time_us} us exceeds the interval's {interval_us} us",
        )
    if device_time_us > wall_time_us * gpu_count:
        return UsageRejected(
            RejectReason.impossible_device_time,
            f"device time {device_time_us} us exceeds wall time {wall_time_us} us "
            f"x {gpu_count} GPUs",
        )
    return None
