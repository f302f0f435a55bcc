"""The usage rules (domain.usage): each rule, its code, and the order they are checked."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest

from domain.lease import CloseReason, Lease, LeaseStatus
from domain.usage import LastUsage, UsageRecorded, UsageRules, check_usage
from workers.messages import RejectReason

OPENED = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
NOW = OPENED + timedelta(hours=1)
LEASE_ID = UUID("00000000-0000-4000-8000-0000000000a1")
NODE_ID = UUID("00000000-0000-4000-8000-0000000000b1")
RULES = UsageRules(sequence_gap_max=2, future_tolerance_s=5, wall_time_tolerance_us=1_000)


def lease(**changes: object) -> Lease:
    base = Lease(
        id=LEASE_ID,
        ask_id=uuid4(),
        bid_id=uuid4(),
        provider_id=uuid4(),
        node_id=NODE_ID,
        consumer_id=uuid4(),
        gpu_model="H100",
        gpu_count=2,
        price_per_gpu_hour=10**18,
        escrow_held=10**19,
        escrow_charged=0,
        escrow_released=0,
        opened_at=OPENED,
        ends_at=OPENED + timedelta(hours=2),
        status=LeaseStatus.open,
        updated_at=OPENED,
        alive_at=OPENED,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def usage(
    sequence: int = 1, start_s: int = 0, length_s: int = 10, **changes: object
) -> UsageRecorded:
    start = OPENED + timedelta(seconds=start_s)
    base = UsageRecorded(
        envelope_id=uuid4(),
        lease_id=LEASE_ID,
        node_id=NODE_ID,
        sequence=sequence,
        interval_start=start,
        interval_end=start + timedelta(seconds=length_s),
        gpu_count=2,
        wall_time_us=length_s * 1_000_000,
        device_time_us=2 * length_s * 1_000_000,
        flops=10**15,
        samples=100,
        tokens=0,
        steps=10,
        peak_memory_bytes=10**9,
        workload="train",
        device="cuda",
        received_at=NOW,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def reason(
    fact: UsageRecorded, last: LastUsage | None = None, on: Lease | None = None
) -> RejectReason | None:
    rejected = check_usage(lease() if on is None else on, last, fact, NOW, RULES)
    return None if rejected is None else rejected.reason


def test_a_first_report_within_the_lease_is_recorded():
    assert reason(usage()) is None


def test_the_next_report_after_the_last_one_is_recorded():
    first = usage(1)
    assert reason(usage(2, start_s=10), LastUsage.of(first)) is None


def test_an_unknown_lease_is_refused():
    rejected = check_usage(None, None, usage(), NOW, RULES)
    assert rejected is not None and rejected.reason is RejectReason.unknown_lease
    assert str(LEASE_ID) in rejected.detail


def test_usage_after_the_lease_closed_is_refused_but_late_usage_of_served_time_is_recorded():
    closed = lease(
        status=LeaseStatus.closed,
        closed_at=OPENED + timedelta(seconds=5),
        close_reason=CloseReason.consumer,
    )
    assert reason(usage(length_s=10), on=closed) is RejectReason.lease_closed
    assert reason(usage(length_s=5), on=closed) is None


def test_a_report_from_another_node_than_the_leases_is_refused():
    assert reason(usage(node_id=uuid4())) is RejectReason.node_mismatch


def test_the_same_message_again_is_a_duplicate():
    first = usage(1)
    assert reason(first, LastUsage.of(first)) is RejectReason.duplicate


def test_another_message_at_or_below_the_last_sequence_is_replayed():
    first, second = usage(1), usage(2, start_s=10)
    assert reason(usage(2, start_s=20), LastUsage.of(second)) is RejectReason.replayed
    assert reason(first, LastUsage.of(second)) is RejectReason.replayed


def test_gaps_up_to_sequence_gap_max_are_tolerated_and_a_larger_jump_is_out_of_order():
    last = LastUsage.of(usage(1))
    assert reason(usage(4, start_s=10), last) is None  # 2 and 3 lost: gap of 2
    assert reason(usage(5, start_s=10), last) is RejectReason.out_of_order
    assert reason(usage(4)) is RejectReason.out_of_order  # the first report counts from 0
    assert reason(usage(3)) is None


def test_no_gaps_at_all_when_sequence_gap_max_is_zero():
    strict = UsageRules(sequence_gap_max=0)
    assert check_usage(lease(), None, usage(1), NOW, strict) is None
    rejected = check_usage(lease(), None, usage(2), NOW, strict)
    assert rejected is not None and rejected.reason is RejectReason.out_of_order


def test_an_empty_or_negative_interval_is_impossible():
    assert reason(usage(length_s=0)) is RejectReason.impossible_interval
    assert (
        reason(usage(length_s=-5, wall_time_us=0, device_time_us=0))
        is RejectReason.impossible_interval
    )


def test_an_interval_that_starts_before_the_lease_opened_is_impossible():
    assert reason(usage(start_s=-1)) is RejectReason.impossible_interval


def test_an_interval_that_ends_in_the_future_beyond_the_tolerance_is_impossible():
    ahead_s = int((NOW - OPENED).total_seconds())
    assert reason(usage(start_s=ahead_s - 5, length_s=10)) is None  # ends 5 s ahead
    assert reason(usage(start_s=ahead_s - 5, length_s=11)) is RejectReason.impossible_interval


def test_an_interval_that_starts_before_the_last_one_ended_overlaps():
    last = LastUsage.of(usage(1, start_s=0, length_s=10))
    assert reason(usage(2, start_s=9), last) is RejectReason.overlapping_interval
    assert reason(usage(2, start_s=10), last) is None


def test_more_gpus_than_the_lease_has_is_impossible():
    assert reason(usage(gpu_count=3, device_time_us=0)) is RejectReason.impossible_device_time


def test_more_wall_time_than_the_interval_lasted_is_impossible():
    assert reason(usage(wall_time_us=10_001_000)) is None  # within the tolerance
    assert reason(usage(wall_time_us=10_001_001)) is RejectReason.impossible_device_time


def test_more_device_time_than_wall_time_times_gpus_is_impossible():
    assert reason(usage(device_time_us=20_000_000)) is None
    assert reason(usage(device_time_us=20_000_001)) is RejectReason.impossible_device_time
    assert (
        reason(usage(gpu_count=1, device_time_us=10_000_001)) is RejectReason.impossible_device_time
    )


def test_rules_are_checked_in_the_order_of_their_codes():
    last = LastUsage.of(usage(1))
    closed = lease(
        status=LeaseStatus.closed,
        closed_at=OPENED - timedelta(seconds=60),
        close_reason=CloseReason.consumer,
    )
    everything_wrong = usage(1, start_s=-5, length_s=-1, node_id=uuid4(), device_time_us=10**12)
    assert reason(everything_wrong, last, on=closed) is RejectReason.lease_closed
    assert reason(everything_wrong, last) is RejectReason.node_mismatch
    assert reason(replace(everything_wrong, node_id=NODE_ID), last) is RejectReason.replayed
    assert (
        reason(replace(everything_wrong, node_id=NODE_ID, sequence=9), last)
        is RejectReason.out_of_order
    )
    assert (
        reason(replace(everything_wrong, node_id=NODE_ID, sequence=2), last)
        is RejectReason.impossible_interval
    )


@pytest.mark.parametrize(
    "changes",
    [{"sequence_gap_max": -1}, {"future_tolerance_s": 10**6}, {"wall_time_tolerance_us": 1.5}],
)
def test_rules_out_of_their_bounds_are_refused(changes):
    with pytest.raises(ValueError, match="must be an int within"):
        UsageRules(**changes)
