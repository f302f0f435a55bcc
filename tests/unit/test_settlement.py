"""Settlement per epoch (domain.settlement): epochs, pricing, failed windows, fees, checker
rewards, and property tests over random usage streams with late arrivals, retries and
re-runs. No database, no clock."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.lease import Lease, LeaseStatus
from domain.orderbook import lease_cost
from domain.postings import PostingRules
from domain.settlement import (
    EpochSettlement,
    SettlementRules,
    checker_rewards_for,
    epoch_containing,
    epoch_end_of,
    is_epoch_start,
    price_usage,
    settle_epoch,
)
from domain.stake import SlashKind
from domain.usage import UsageRecorded
from domain.verdicts import FailureKind, QuorumFailed, QuorumNotReached, QuorumPassed

EPOCH_S = 600
WINDOW_S = 300
RULES = SettlementRules(
    epoch_s=EPOCH_S, checker_reward_bps=1_000, posting=PostingRules(protocol_fee_bps=500)
)
T0 = datetime(2026, 1, 1, tzinfo=UTC)
"""On the 600 s epoch grid and the 300 s window grid."""
NODE = UUID(int=0xD1)
OTHER_NODE = UUID(int=0xD2)
PROVIDER = UUID(int=0xA1)
CONSUMER = UUID(int=0xC1)
LEASE = UUID(int=0x1E1)
CHECKERS = tuple(UUID(int=0xCC0 + i) for i in range(1, 5))
PRICE = 3_600
"""At 3600 per GPU-hour one GPU costs exactly 1 per second."""


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def make_lease(
    lease_id: UUID = LEASE, node_id: UUID = NODE, gpu_count: int = 1, price: int = PRICE
) -> Lease:
    return Lease(
        id=lease_id,
        ask_id=UUID(int=1),
        bid_id=UUID(int=2),
        provider_id=PROVIDER,
        node_id=node_id,
        consumer_id=CONSUMER,
        gpu_model="H100",
        gpu_count=gpu_count,
        price_per_gpu_hour=price,
        escrow_held=10**30,
        escrow_charged=0,
        escrow_released=0,
        opened_at=T0 - s(86_400),
        ends_at=T0 + s(365 * 86_400),
        status=LeaseStatus.open,
        updated_at=T0 - s(86_400),
        alive_at=T0 - s(86_400),
    )


def rec(
    seq: int,
    start: timedelta,
    end: timedelta,
    received: timedelta | None = None,
    lease: Lease | None = None,
) -> UsageRecorded:
    lease = lease or make_lease()
    return UsageRecorded(
        envelope_id=UUID(int=(lease.id.int << 32) + seq),
        lease_id=lease.id,
        node_id=lease.node_id,
        sequence=seq,
        interval_start=T0 + start,
        interval_end=T0 + end,
        gpu_count=lease.gpu_count,
        wall_time_us=0,
        device_time_us=0,
        flops=0,
        samples=0,
        tokens=0,
        steps=0,
        peak_memory_bytes=0,
        workload="matmul",
        device="cuda:0",
        received_at=T0 + (end if received is None else received),
    )


def failed(
    window: timedelta,
    node_id: UUID = NODE,
    agreeing: tuple[UUID, ...] = (),
    contradicting: tuple[UUID, ...] = (),
    decided: timedelta | None = None,
) -> QuorumFailed:
    start = T0 + window
    return QuorumFailed(
        node_id=node_id,
        provider_id=PROVIDER,
        window_start=start,
        window_end=start + s(WINDOW_S),
        verdicts_count=len(agreeing) + len(contradicting),
        kind=FailureKind.downtime,
        slash_kind=SlashKind.downtime,
        failing_checker_ids=agreeing,
        agreeing_checker_ids=agreeing,
        contradicting_checker_ids=contradicting,
        uptime_ppm_median=0,
        latency_ms_p99_median=0,
        decided_at=start + s(WINDOW_S + 60) if decided is None else T0 + decided,
    )


def passed(
    window: timedelta,
    agreeing: tuple[UUID, ...],
    contradicting: tuple[UUID, ...] = (),
    node_id: UUID = NODE,
    decided: timedelta | None = None,
) -> QuorumPassed:
    start = T0 + window
    return QuorumPassed(
        node_id=node_id,
        provider_id=PROVIDER,
        window_start=start,
        window_end=start + s(WINDOW_S),
        verdicts_count=len(agreeing) + len(contradicting),
        failing_checker_ids=contradicting,
        agreeing_checker_ids=agreeing,
        contradicting_checker_ids=contradicting,
        uptime_ppm_median=1_000_000,
        latency_ms_p99_median=10,
        decided_at=start + s(WINDOW_S + 60) if decided is None else T0 + decided,
    )


def settle(
    usage: list[UsageRecorded],
    settled: frozenset[tuple[UUID, int]] = frozenset(),
    epoch: int = 0,
    leases: dict[UUID, Lease] | None = None,
    failed_windows: tuple[QuorumFailed, ...] = (),
    decisions: tuple[QuorumPassed | QuorumFailed | QuorumNotReached, ...] = (),
    rules: SettlementRules = RULES,
) -> EpochSettlement:
    lease_map = {LEASE: make_lease()} if leases is None else leases
    return settle_epoch(
        T0 + s(epoch * rules.epoch_s),
        usage,
        lease_map,
        settled,
        failed_windows,
        decisions,
        rules,
    )


# -- rules and epochs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"epoch_s": 0}, ValueError),
        ({"epoch_s": 31 * 86_400 + 1}, ValueError),
        ({"epoch_s": 60.0}, TypeError),
        ({"checker_reward_bps": -1}, ValueError),
        ({"checker_reward_bps": 10_001}, ValueError),
        ({"withhold_failed_windows": 1}, TypeError),
    ],
)
def test_rules_are_validated(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        SettlementRules(**kwargs)  # type: ignore[arg-type]


def test_epochs_are_aligned_on_the_unix_epoch() -> None:
    assert epoch_containing(T0 + s(599.999), RULES) == T0
    assert epoch_containing(T0 + s(600), RULES) == T0 + s(600)
    assert epoch_containing(T0 - s(0.5), RULES) == T0 - s(600)
    assert epoch_end_of(T0, RULES) == T0 + s(600)
    assert is_epoch_start(T0, RULES)
    assert not is_epoch_start(T0 + s(300), RULES)
    assert not is_epoch_start(T0 + timedelta(microseconds=1), RULES)
    assert not is_epoch_start(T0.replace(tzinfo=None), RULES)


def test_a_misaligned_epoch_start_is_refused() -> None:
    with pytest.raises(ValueError, match="epoch grid"):
        settle_epoch(T0 + s(1), [], {}, frozenset(), rules=RULES)


# -- which usage an epoch settles -------------------------------------------------------------


def test_usage_belongs_to_the_epoch_it_was_received_in() -> None:
    on_time = rec(1, s(0), s(100), received=s(100))
    late = rec(2, s(100), s(200), received=s(600))
    """Measured in epoch 0, received at the start of epoch 1."""
    first = settle([on_time, late])
    assert first.settled_keys == {(LEASE, 1)}
    assert first.charged == 100
    second = settle([on_time, late], settled=first.settled_keys, epoch=1)
    assert second.settled_keys == {(LEASE, 2)}
    assert second.charged == 100


def test_usage_missed_by_its_epoch_is_swept_into_the_next() -> None:
    """Received in epoch 0 but reaching the log after epoch 0 was settled: never lost."""
    missed = rec(1, s(0), s(100), received=s(100))
    first = settle([])
    assert first.settled_keys == frozenset()
    second = settle([missed], settled=first.settled_keys, epoch=1)
    assert second.settled_keys == {(LEASE, 1)}
    assert second.charged == 100


def test_settled_keys_are_skipped_and_a_rerun_charges_nothing() -> None:
    usage = [rec(1, s(0), s(100)), rec(2, s(100), s(250))]
    first = settle(usage)
    assert first.charged == 250
    rerun = settle(usage, settled=first.settled_keys)
    assert rerun.charges == ()
    assert rerun.charged == rerun.fee == rerun.treasury_net == 0
    assert rerun.settled_keys == frozenset()


def test_a_redelivered_record_counts_once() -> None:
    one = rec(1, s(0), s(100))
    result = settle([one, one, one])
    assert result.charged == 100
    assert result.charges[0].sequences == (1,)


def test_two_different_records_under_one_key_are_refused() -> None:
    one = rec(1, s(0), s(100))
    with pytest.raises(ValueError, match="two different usage records"):
        settle([one, replace(one, interval_end=T0 + s(200), received_at=T0 + s(200))])


def test_usage_of_an_unknown_lease_is_reported_not_settled() -> None:
    stranger = make_lease(UUID(int=0x999))
    usage = [rec(1, s(0), s(100)), rec(1, s(0), s(100), lease=stranger)]
    result = settle(usage)
    assert result.unknown_lease_usage == ((stranger.id, 1),)
    assert result.settled_keys == {(LEASE, 1)}
    later = settle(
        usage,
        settled=result.settled_keys,
        epoch=1,
        leases={LEASE: make_lease(), stranger.id: stranger},
    )
    assert later.settled_keys == {(stranger.id, 1)}
    assert later.unknown_lease_usage == ()


# -- pricing ---------------------------------------------------------------------------------


def test_billable_seconds_are_floored_and_priced_for_all_the_lease_gpus() -> None:
    lease = make_lease(gpu_count=2)
    line, exclusions = price_usage(rec(1, s(0), s(90.7), lease=lease), lease, (), RULES)
    assert (line.interval_us, line.billable_s, line.amount) == (90_700_000, 90, 180)
    assert exclusions == ()


def test_each_record_is_rounded_up_on_its_own() -> None:
    """1 per GPU-hour: a second costs 1/3600, rounded up to 1 per record."""
    lease = make_lease(price=1)
    usage = [rec(i, s(i * 10), s(i * 10 + 1), lease=lease) for i in range(1, 4)]
    result = settle(usage, leases={LEASE: lease})
    assert [line.amount for line in result.charges[0].lines] == [1, 1, 1]
    assert result.charged == 3


def test_a_record_under_a_second_is_settled_at_zero() -> None:
    result = settle([rec(1, s(0), s(0.5))])
    assert result.settled_keys == {(LEASE, 1)}
    assert result.charges[0].amount == 0
    assert result.charged == 0


def test_the_part_inside_a_failed_window_of_the_node_is_withheld_from_the_provider() -> None:
    usage = [rec(1, s(0), s(600), received=s(599))]
    window = failed(s(300))
    result = settle(usage, failed_windows=(window, window, failed(s(0), node_id=OTHER_NODE)))
    charge = result.charges[0]
    assert charge.amount == 600
    """The consumer is charged all of it; the slash refunds the failed part (slashing)."""
    assert charge.withheld == result.withheld == 300
    assert charge.fee == RULES.posting.fee_of(300)
    assert charge.provider_share == 300 - charge.fee
    assert result.provider_share + result.fee + result.withheld == result.charged == 600
    assert charge.lines[0].excluded_us == 300_000_000
    assert len(charge.exclusions) == 1
    exclusion = charge.exclusions[0]
    assert (exclusion.sequence, exclusion.window_start) == (1, T0 + s(300))
    assert exclusion.excluded_us == 300_000_000


def test_overlapping_failed_windows_are_excluded_once() -> None:
    usage = [rec(1, s(0), s(600), received=s(599))]
    odd = replace(failed(s(300)), window_start=T0 + s(200), window_end=T0 + s(500))
    result = settle(usage, failed_windows=(failed(s(300)), odd))
    assert result.charges[0].lines[0].excluded_us == 400_000_000
    assert (result.charged, result.withheld) == (600, 400)


def test_usage_wholly_inside_a_failed_window_pays_the_provider_nothing() -> None:
    result = settle([rec(1, s(310), s(400))], failed_windows=(failed(s(300)),))
    assert result.settled_keys == {(LEASE, 1)}
    assert (result.charged, result.withheld, result.provider_share, result.fee) == (90, 90, 0, 0)


def test_failed_windows_may_be_charged_by_configuration() -> None:
    rules = replace(RULES, withhold_failed_windows=False)
    result = settle(
        [rec(1, s(0), s(600), received=s(599))], failed_windows=(failed(s(300)),), rules=rules
    )
    assert (result.charged, result.withheld) == (600, 0)
    assert result.charges[0].exclusions == ()


# -- fees and checker rewards ----------------------------------------------------------------


def test_fee_and_provider_share_follow_the_posting_rules() -> None:
    other = make_lease(UUID(int=0x1E2), gpu_count=3)
    usage = [rec(1, s(0), s(333)), rec(1, s(0), s(101), lease=other)]
    result = settle(usage, leases={LEASE: make_lease(), other.id: other})
    fees = [RULES.posting.fee_of(c.amount) for c in result.charges]
    assert [c.amount for c in result.charges] == [333, 303]
    assert [c.fee for c in result.charges] == fees == [16, 15]
    assert result.fee == 31
    assert result.provider_share == 636 - 31
    assert result.charged == 636
    assert result.reward_pool == 3
    assert result.treasury_net == 31


def test_rewards_split_in_proportion_to_agreeing_verdicts() -> None:
    a, b, c, d = CHECKERS
    decisions = (
        passed(s(0), agreeing=(a, b), contradicting=(c,)),
        failed(s(300), agreeing=(a, c), contradicting=(d,), decided=s(590)),
        failed(s(300), agreeing=(a, c), contradicting=(d,), decided=s(590)),
    )
    """The repeat of a node-window counts once; d was contradicted twice: nothing."""
    lease = make_lease(price=PRICE * 100)
    result = settle(
        [rec(1, s(0), s(100), lease=lease)],
        leases={LEASE: lease},
        decisions=decisions,
        rules=replace(RULES, withhold_failed_windows=False),
    )
    assert result.charged == 10_000
    assert result.fee == 500
    assert result.reward_pool == 50
    rewards = {r.checker_id: (r.agreed_verdicts, r.amount) for r in result.checker_rewards}
    assert rewards == {a: (2, 25), b: (1, 12), c: (1, 12)}
    assert result.checker_rewards_total == 49
    assert result.treasury_net == 451


def test_only_decisions_of_the_epoch_earn() -> None:
    a, b, _, _ = CHECKERS
    decisions = (
        passed(s(0), agreeing=(a,), decided=s(599)),
        passed(s(300), agreeing=(b,), decided=s(600)),
        QuorumNotReached(NODE, PROVIDER, T0, T0 + s(300), 1, (b,), T0 + s(10)),
    )
    rewards = checker_rewards_for(10, decisions, T0, T0 + s(600))
    assert [(r.checker_id, r.amount) for r in rewards] == [(a, 10)]


def test_without_agreeing_verdicts_the_fee_stays_with_the_treasury() -> None:
    result = settle([rec(1, s(0), s(400))])
    assert result.fee == 20
    assert result.checker_rewards == ()
    assert result.treasury_net == 20


def test_an_inconsistent_settlement_cannot_be_built() -> None:
    result = settle([rec(1, s(0), s(400))])
    with pytest.raises(ValueError, match="inconsistent"):
        replace(result, treasury_net=result.treasury_net + 1)
    with pytest.raises(ValueError, match="inconsistent"):
        replace(result, charged=result.charged + 1)


# -- properties ------------------------------------------------------------------------------

LEASE_IDS = tuple(UUID(int=0x1E0 + i) for i in range(3))
NODES = (NODE, OTHER_NODE)


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[dict[UUID, Lease], list[tuple[UsageRecorded, int]], tuple[QuorumFailed, ...]]:
    """Leases, their usage (each with the epoch from which ingest has it: late, lagging
    records) and failed windows."""
    leases: dict[UUID, Lease] = {}
    usage: list[tuple[UsageRecorded, int]] = []
    for lease_id in LEASE_IDS[: draw(st.integers(1, len(LEASE_IDS)))]:
        lease = make_lease(
            lease_id,
            node_id=draw(st.sampled_from(NODES)),
            gpu_count=draw(st.integers(1, 4)),
            price=draw(st.integers(1, 10**6)),
        )
        leases[lease_id] = lease
        at_us = draw(st.integers(0, 600_000_000))
        for seq in range(1, draw(st.integers(0, 8)) + 1):
            at_us += draw(st.integers(0, 50_000_000))
            length_us = draw(st.integers(1, 400_000_000))
            delay_us = draw(st.integers(0, 1_500_000_000))
            record = rec(
                seq,
                timedelta(microseconds=at_us),
                timedelta(microseconds=at_us + length_us),
                received=timedelta(microseconds=at_us + length_us + delay_us),
                lease=lease,
            )
            received_epoch = (at_us + length_us + delay_us) // (EPOCH_S * 1_000_000)
            lag = draw(st.integers(0, 2))
            usage.append((record, received_epoch + lag))
            at_us += length_us
    windows = tuple(
        failed(s(WINDOW_S * w), node_id=node)
        for w, node in draw(
            st.lists(st.tuples(st.integers(0, 20), st.sampled_from(NODES)), max_size=4)
        )
    )
    return leases, usage, windows


def expected_price(
    record: UsageRecorded, lease: Lease, windows: tuple[QuorumFailed, ...]
) -> tuple[int, int]:
    """The oracle, independent of the module, second by microsecond: (charged, withheld)."""
    starts = {w.window_start for w in windows if w.node_id == lease.node_id}
    start_us = (record.interval_start - T0) // timedelta(microseconds=1)
    end_us = (record.interval_end - T0) // timedelta(microseconds=1)
    excluded = 0
    for window_start in starts:
        ws = (window_start - T0) // timedelta(microseconds=1)
        excluded += max(0, min(end_us, ws + WINDOW_S * 1_000_000) - max(start_us, ws))
    charged = lease_cost(lease.gpu_count, lease.price_per_gpu_hour, (end_us - start_us) // 10**6)
    withheld = lease_cost(lease.gpu_count, lease.price_per_gpu_hour, excluded // 1_000_000)
    return charged, min(charged, withheld)


@settings(max_examples=200, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False))
def test_every_record_is_charged_exactly_once_across_epochs_retries_and_reruns(
    scenario: tuple[dict[UUID, Lease], list[tuple[UsageRecorded, int]], tuple[QuorumFailed, ...]],
    rnd: random.Random,
) -> None:
    leases, usage, windows = scenario
    last_epoch = max((visible for _, visible in usage), default=0) + 1
    settled: frozenset[tuple[UUID, int]] = frozenset()
    charged_by_lease: dict[UUID, int] = {}
    total = withheld_total = 0
    for epoch in range(last_epoch + 1):
        visible = [record for record, from_epoch in usage if from_epoch <= epoch]
        retried = visible + rnd.sample(visible, k=len(visible) // 2)
        rnd.shuffle(retried)
        for run in range(2):
            result = settle(
                retried,
                settled=settled,
                epoch=epoch,
                leases=leases,
                failed_windows=windows,
                decisions=windows,
            )
            assert not result.settled_keys & settled
            assert result.unknown_lease_usage == ()
            if run == 1:
                assert result.charges == ()
            assert result.provider_share + result.fee + result.withheld == result.charged
            assert result.checker_rewards_total + result.treasury_net == result.fee
            assert result.reward_pool == result.fee * RULES.checker_reward_bps // 10_000
            for record_key in result.settled_keys:
                record = next(r for r, _ in usage if (r.lease_id, r.sequence) == record_key)
                assert record.received_at < result.epoch_end
            settled |= result.settled_keys
            total += result.charged
            withheld_total += result.withheld
            for charge in result.charges:
                charged_by_lease[charge.lease_id] = (
                    charged_by_lease.get(charge.lease_id, 0) + charge.amount
                )
    assert settled == {(r.lease_id, r.sequence) for r, _ in usage}
    priced = {
        lease_id: sum(
            expected_price(r, leases[lease_id], windows)[0]
            for r, _ in usage
            if r.lease_id == lease_id
        )
        for lease_id in leases
    }
    assert withheld_total == sum(
        expected_price(r, leases[r.lease_id], windows)[1] for r, _ in usage
    )
    for lease_id, amount in charged_by_lease.items():
        assert amount <= priced[lease_id]
    assert total == sum(priced.values())
    assert charged_by_lease == {k: v for k, v in priced.items() if k in charged_by_lease}


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 10**24),
    st.lists(
        st.tuples(
            st.integers(0, 40),
            st.lists(st.sampled_from(CHECKERS), unique=True, max_size=4),
            st.booleans(),
        ),
        max_size=8,
    ),
)
def test_rewards_never_exceed_the_pool_and_follow_agreement(
    pool: int, spec: list[tuple[int, list[UUID], bool]]
) -> None:
    decisions = tuple(
        (passed if ok else failed)(s(WINDOW_S * w), agreeing=tuple(ids)) for w, ids, ok in spec
    )
    rewards = checker_rewards_for(pool, decisions, T0, T0 + s(100 * WINDOW_S))
    total = sum(r.amount for r in rewards)
    assert 0 <= total <= pool
    agreed = sum(r.agreed_verdicts for r in rewards)
    if rewards:
        assert pool - total < len(rewards)
    else:
        assert total == 0
    for r in rewards:
        assert r.amount == pool * r.agreed_verdicts // agreed
