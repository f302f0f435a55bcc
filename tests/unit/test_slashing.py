"""What follows a failed quorum (domain.slashing): refunds, checker penalties, SLA closes.

Leases are built by the lease rules themselves (`open_lease` of an `OrderMatched`, then
`close` and `apply`); failed quorums come out of `domain.verdicts` (registered checkers,
submitted verdicts, `decide_window`). No database, no clock.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain import lease as ls
from domain import orderbook as ob
from domain import verdicts as vd
from domain.slashing import (
    DEFAULT_CHECKER_PENALTY_BPS,
    CheckerPenalized,
    ConsumerRefunded,
    SlashingRules,
    checker_penalty,
    closes_leases,
    lease_end,
    owed_for_window,
    refunds_for,
)
from domain.verdicts import FailureKind, QuorumFailed

WINDOW_S = 900
GRACE_S = 60
VRULES = vd.VerdictRules(checker_stake_min=100, verdict_window_s=WINDOW_S, verdict_grace_s=GRACE_S)
LRULES = ls.LeaseRules()
RULES = SlashingRules()
W0 = datetime(2026, 11, 23, 18, 0, tzinfo=UTC)
"""On the window grid: a multiple of 900 s after the Unix epoch."""
W0_END = W0 + timedelta(seconds=WINDOW_S)
DECIDED = W0_END + timedelta(seconds=GRACE_S)
NODE = UUID(int=0xD1)
OTHER_NODE = UUID(int=0xD2)
PROVIDER = UUID(int=0xA1)
CONSUMER = UUID(int=0xC1)
CHECKERS = tuple(UUID(int=0xCC0 + i) for i in range(1, 4))
ADDRESS = "0x" + "ab" * 20
HASH = "0f" * 32
PRICE = 3_600
"""At 3600 per GPU-hour one GPU costs exactly 1 per second: owed == overlap seconds."""

_ids = count(1)


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def failed_quorum(
    kind: FailureKind = FailureKind.downtime,
    *,
    node: UUID = NODE,
    window_start: datetime = W0,
    passing: int = 0,
) -> tuple[QuorumFailed, tuple[vd.CheckerContradicted, ...]]:
    """Three registered checkers; the first `passing` pass the node, the others fail it."""
    state = vd.VerdictState()
    for checker in CHECKERS:
        command = vd.RegisterChecker(checker, ADDRESS, 1_000)
        result, facts = vd.register_checker(state, command, VRULES, window_start)
        assert result is vd.RegisterCheckerResult.ok
        state = vd.apply_all(state, facts)
    window_end = vd.window_end_of(window_start, VRULES)
    for i, checker in enumerate(CHECKERS):
        passed = i < passing
        verdict = vd.Verdict(
            verdict_id=UUID(int=0x7E000 + next(_ids)),
            checker_id=checker,
            node_id=node,
            provider_id=PROVIDER,
            window_start=window_start,
            window_end=window_end,
            latency_ms_p99=100,
            throughput_milli_per_s=1_000,
            uptime_ppm=vd.UPTIME_PPM_MAX if passed else 0,
            passed=passed,
            failure_kind=FailureKind.none if passed else kind,
            evidence_hash=HASH,
        )
        result, facts = vd.submit_verdict(state, verdict, VRULES, window_end)
        assert result is vd.SubmitVerdictResult.ok
        state = vd.apply_all(state, facts)
    result, facts = vd.decide_window(state, node, window_start, VRULES, DECIDED)
    assert result is vd.DecideWindowResult.ok
    decision, *contradicted = facts
    assert isinstance(decision, QuorumFailed), decision
    assert all(isinstance(c, vd.CheckerContradicted) for c in contradicted)
    return decision, tuple(contradicted)  # type: ignore[arg-type]


FAILED, _ = failed_quorum()


def lease(
    opened_at: datetime,
    duration_s: int,
    *,
    node: UUID = NODE,
    gpu_count: int = 1,
    price: int = PRICE,
    closed_at: datetime | None = None,
    consumer: UUID = CONSUMER,
) -> ls.Lease:
    """A lease opened by the lease rules from a match; closed at `closed_at` if given (by
    expiry when that is at or after its end, else by its consumer)."""
    match = ob.OrderMatched(
        ask_id=UUID(int=0xE0000 + next(_ids)),
        bid_id=UUID(int=0xF0000 + next(_ids)),
        provider_id=PROVIDER,
        node_id=node,
        consumer_id=consumer,
        gpu_model="H100",
        gpu_count=gpu_count,
        price_per_gpu_hour=price,
        duration_s=duration_s,
        escrow_amount=ob.lease_cost(gpu_count, price, duration_s),
        matched_at=opened_at,
    )
    result, (opened,) = ls.open_lease(match, opened_at)
    assert result is ls.OpenLeaseResult.ok
    state = ls.apply(None, opened)
    if closed_at is not None:
        expired = closed_at >= state.ends_at
        reason = ls.CloseReason.expiry if expired else ls.CloseReason.consumer
        result, facts = ls.close(state, reason, consumer, closed_at, LRULES)
        assert result is ls.CloseResult.ok
        for fact in facts:
            state = ls.apply(state, fact)
        assert state.closed_at == closed_at
    return state


def amounts(refunds: tuple[ConsumerRefunded, ...]) -> list[tuple[UUID, int, int]]:
    return [(r.lease_id, r.amount, r.owed) for r in refunds]


# -- the failed quorum these tests start from ---------------------------------------------


def test_the_failed_quorum_comes_from_the_verdict_rules():
    failed, contradicted = failed_quorum(FailureKind.fraud, passing=1)
    assert (failed.node_id, failed.window_start, failed.window_end) == (NODE, W0, W0_END)
    assert failed.kind is FailureKind.fraud
    assert failed.contradicting_checker_ids == (CHECKERS[0],)
    assert [c.checker_id for c in contradicted] == [CHECKERS[0]]


# -- overlap and what is owed -------------------------------------------------------------


def test_a_lease_running_through_the_whole_window_is_owed_the_whole_window():
    running = lease(W0 - s(600), 3_600)
    assert owed_for_window(running, W0, W0_END) == WINDOW_S


@pytest.mark.parametrize(
    ("opened", "duration_s", "closed", "owed"),
    [
        (s(300), 3_600, None, 600),  # opened mid-window
        (s(-300), 3_600, s(200), 200),  # closed mid-window
        (s(100), 3_600, s(250), 150),  # opened and closed inside
        (s(-600), 900, None, 300),  # ended (ends_at) mid-window, never closed
        (s(-600), 900, s(700), 300),  # closed by expiry after its end: serves until ends_at
        (s(-600), 300, None, 0),  # ended before the window
        (s(-600), 3_600, s(-1), 0),  # closed before the window
        (s(-600), 3_600, s(0), 0),  # closed at window_start
        (s(WINDOW_S), 600, None, 0),  # opened at window_end
        (s(WINDOW_S + 60), 600, None, 0),  # opened after the window
        (s(0.5), 3_600, None, 899),  # whole seconds: 899.5 s is 899
    ],
)
def test_what_a_lease_is_owed_is_its_overlap_with_the_window(opened, duration_s, closed, owed):
    closed_at = None if closed is None else W0 + closed
    affected = lease(W0 + opened, duration_s, closed_at=closed_at)
    assert owed_for_window(affected, W0, W0_END) == owed


def test_what_is_owed_is_the_overlaps_cost_at_the_lease_price_rounded_up():
    # 2 GPUs at 1000 per GPU-hour over 600 s: 2 * 1000 * 600 / 3600 = 333.33.. -> 334.
    affected = lease(W0 + s(300), 3_600, gpu_count=2, price=1_000)
    assert owed_for_window(affected, W0, W0_END) == ob.lease_cost(2, 1_000, 600) == 334
    # One second at 1 per GPU-hour still costs one unit.
    tiny = lease(W0 + s(WINDOW_S - 1), 3_600, price=1)
    assert owed_for_window(tiny, W0, W0_END) == 1


def test_a_lease_ends_when_it_closes_or_else_at_its_end():
    running = lease(W0, 600)
    assert lease_end(running) == running.ends_at
    closed_early = lease(W0, 600, closed_at=W0 + s(100))
    assert lease_end(closed_early) == W0 + s(100)
    closed_late = lease(W0, 600, closed_at=W0 + s(1_000))
    assert lease_end(closed_late) == closed_late.ends_at == W0 + s(600)


# -- refunds ------------------------------------------------------------------------------


def test_each_affected_lease_is_refunded_what_it_is_owed_when_the_slash_covers_it():
    early = lease(W0 - s(100), 3_600)
    late = lease(W0 + s(300), 3_600, consumer=UUID(int=0xC2))
    refunds = refunds_for(FAILED, 10_000, [late, early], RULES, DECIDED)
    assert amounts(refunds) == [(early.id, 900, 900), (late.id, 600, 600)]
    first = refunds[0]
    assert first == ConsumerRefunded(
        lease_id=early.id,
        consumer_id=CONSUMER,
        provider_id=PROVIDER,
        node_id=NODE,
        window_start=W0,
        amount=900,
        owed=900,
        refunded_at=DECIDED,
    )
    assert refunds[1].consumer_id == UUID(int=0xC2)


def test_only_leases_on_the_failed_node_are_refunded():
    here = lease(W0, 3_600)
    elsewhere = lease(W0 - s(10), 3_600, node=OTHER_NODE)
    refunds = refunds_for(FAILED, 10_000, [elsewhere, here], RULES, DECIDED)
    assert amounts(refunds) == [(here.id, 900, 900)]
    assert refunds_for(FAILED, 10_000, [elsewhere], RULES, DECIDED) == ()


def test_leases_that_did_not_overlap_the_window_get_nothing():
    before = lease(W0 - s(1_000), 500)
    closed_before = lease(W0 - s(1_000), 3_600, closed_at=W0 - s(10))
    after = lease(W0_END, 600)
    during = lease(W0 + s(10), 100)
    refunds = refunds_for(FAILED, 10_000, [before, closed_before, after, during], RULES, DECIDED)
    assert amounts(refunds) == [(during.id, 100, 100)]


def test_refunds_go_in_the_order_the_leases_opened_then_by_lease_id():
    third = lease(W0 + s(200), 3_600)
    tied = [lease(W0 + s(100), 3_600) for _ in range(3)]
    first = lease(W0 - s(50), 3_600)
    refunds = refunds_for(FAILED, 10**6, [third, *tied, first], RULES, DECIDED)
    expected = [first, *sorted(tied, key=lambda x: x.id), third]
    assert [r.lease_id for r in refunds] == [x.id for x in expected]


def test_the_lease_at_which_the_slash_runs_out_gets_the_rest_and_later_ones_nothing():
    a = lease(W0 - s(10), 3_600)  # owed 900
    b = lease(W0 + s(100), 3_600)  # owed 800
    c = lease(W0 + s(200), 3_600)  # owed 700
    refunds = refunds_for(FAILED, 1_000, [c, b, a], RULES, DECIDED)
    assert amounts(refunds) == [(a.id, 900, 900), (b.id, 100, 800)]
    assert sum(r.amount for r in refunds) == 1_000


def test_between_leases_opened_at_the_same_time_the_lower_lease_id_is_refunded_first():
    tied = sorted((lease(W0 + s(100), 3_600) for _ in range(2)), key=lambda x: x.id)
    refunds = refunds_for(FAILED, 1_000, list(reversed(tied)), RULES, DECIDED)
    assert amounts(refunds) == [(tied[0].id, 800, 800), (tied[1].id, 200, 800)]


def test_a_slash_used_up_exactly_by_one_lease_refunds_nobody_after_it():
    a = lease(W0 - s(10), 3_600)
    b = lease(W0 + s(100), 3_600)
    assert amounts(refunds_for(FAILED, 900, [a, b], RULES, DECIDED)) == [(a.id, 900, 900)]


def test_a_lease_owed_nothing_does_not_stop_the_refunds_after_it():
    ended = lease(W0 - s(1_000), 100)  # opened first, but owed nothing
    later = lease(W0 + s(100), 3_600)
    assert amounts(refunds_for(FAILED, 5_000, [ended, later], RULES, DECIDED)) == [
        (later.id, 800, 800)
    ]


def test_refunds_are_off_when_the_rules_say_so():
    rules = SlashingRules(refund_consumers=False)
    assert refunds_for(FAILED, 10_000, [lease(W0, 3_600)], rules, DECIDED) == ()


def test_a_slash_that_took_nothing_refunds_nothing():
    assert refunds_for(FAILED, 0, [lease(W0, 3_600)], RULES, DECIDED) == ()


def test_refunds_of_no_leases_are_none():
    assert refunds_for(FAILED, 10_000, [], RULES, DECIDED) == ()
    assert refunds_for(FAILED, 10_000, iter(()), RULES, DECIDED) == ()


def test_the_refunds_are_the_same_whatever_order_the_leases_come_in():
    leases = [lease(W0 + s(offset), 3_600) for offset in (300, -20, 100, 50)]
    first = refunds_for(FAILED, 1_500, leases, RULES, DECIDED)
    assert refunds_for(FAILED, 1_500, list(reversed(leases)), RULES, DECIDED) == first


def test_a_slashed_amount_that_is_not_an_int_is_a_caller_error():
    with pytest.raises(TypeError):
        refunds_for(FAILED, 10.0, [], RULES, DECIDED)  # type: ignore[arg-type]


def _expected_owed(lease_: ls.Lease, start: datetime, end: datetime) -> int:
    """The docstring's formula, computed independently of the module."""
    stop = lease_.ends_at
    if lease_.status is ls.LeaseStatus.closed:
        assert lease_.closed_at is not None
        stop = min(stop, lease_.closed_at)
    overlap = (min(end, stop) - max(start, lease_.opened_at)) // timedelta(seconds=1)
    if overlap <= 0:
        return 0
    return -(-(lease_.gpu_count * lease_.price_per_gpu_hour * overlap) // 3_600)


LEASE_SPECS = st.tuples(
    st.booleans(),  # on the failed node
    st.integers(-2_000, 1_200),  # opened, seconds after window_start
    st.integers(1, 3_000),  # duration_s
    st.none() | st.integers(0, 3_500),  # closed, seconds after opening
    st.integers(1, 4),  # gpu_count
    st.integers(1, 20_000),  # price per GPU-hour
)


@settings(max_examples=150, deadline=None)
@given(specs=st.lists(LEASE_SPECS, max_size=8), slashed=st.integers(0, 40_000))
def test_refunds_never_exceed_the_slash_and_follow_the_opening_order(specs, slashed):
    leases = [
        lease(
            W0 + s(opened),
            duration_s,
            node=NODE if on_node else OTHER_NODE,
            gpu_count=gpu_count,
            price=price,
            closed_at=None if closed is None else W0 + s(opened + closed),
        )
        for on_node, opened, duration_s, closed, gpu_count, price in specs
    ]
    refunds = refunds_for(FAILED, slashed, leases, RULES, DECIDED)

    assert sum(r.amount for r in refunds) <= slashed
    assert all(0 < r.amount <= r.owed for r in refunds)
    # The model: affected leases in opening order, each in full while the slash lasts.
    by_id = {x.id: x for x in leases}
    affected = sorted((x for x in leases if x.node_id == NODE), key=lambda x: (x.opened_at, x.id))
    expected: list[tuple[UUID, int, int]] = []
    left = slashed
    for x in affected:
        owed = _expected_owed(x, W0, W0_END)
        if left == 0:
            break
        if owed:
            expected.append((x.id, min(owed, left), owed))
            left -= min(owed, left)
    assert amounts(refunds) == expected
    # Every refund but the last is in full; a partial refund uses up the slash.
    assert all(r.amount == r.owed for r in refunds[:-1])
    if refunds and refunds[-1].amount < refunds[-1].owed:
        assert sum(r.amount for r in refunds) == slashed
    for r in refunds:
        x = by_id[r.lease_id]
        assert (r.consumer_id, r.provider_id, r.node_id) == (x.consumer_id, PROVIDER, NODE)
        assert (r.window_start, r.refunded_at) == (W0, DECIDED)


# -- checker penalties --------------------------------------------------------------------


def test_a_contradicted_checker_loses_a_tenth_of_its_registered_stake_by_default():
    assert DEFAULT_CHECKER_PENALTY_BPS == 1_000
    assert checker_penalty(1_000, 1_000, RULES) == 100


def test_the_penalty_is_rounded_down():
    assert checker_penalty(999, 999, RULES) == 99
    assert checker_penalty(9, 9, RULES) == 0
    assert checker_penalty(10_001, 10_001, SlashingRules(checker_penalty_bps=1)) == 1


def test_the_penalty_counts_from_the_registered_stake_not_what_is_left():
    assert checker_penalty(1_000, 500, RULES) == 100


def test_the_penalty_is_capped_by_the_stake_left():
    assert checker_penalty(1_000, 50, RULES) == 50
    assert checker_penalty(1_000, 0, RULES) == 0
    assert checker_penalty(1_000, 700, SlashingRules(checker_penalty_bps=10_000)) == 700


def test_penalties_take_a_checker_down_to_zero_and_no_further():
    left, taken = 1_000, []
    for _ in range(12):
        penalty = checker_penalty(1_000, left, RULES)
        taken.append(penalty)
        left -= penalty
    assert taken == [100] * 10 + [0, 0]
    assert left == 0


def test_no_penalty_when_the_rules_set_none():
    assert checker_penalty(1_000, 1_000, SlashingRules(checker_penalty_bps=0)) == 0


@pytest.mark.parametrize(("registered", "left"), [(10.0, 5), (10, True)])
def test_a_stake_that_is_not_an_int_is_a_caller_error(registered, left):
    with pytest.raises(TypeError):
        checker_penalty(registered, left, RULES)


def test_a_penalty_fact_names_the_checker_and_the_window():
    failed, (contradicted,) = failed_quorum(passing=1)
    penalty = checker_penalty(1_000, 1_000, RULES)
    fact = CheckerPenalized(
        contradicted.checker_id, failed.node_id, failed.window_start, penalty, DECIDED
    )
    assert (fact.checker_id, fact.node_id, fact.window_start) == (CHECKERS[0], NODE, W0)


# -- rules and SLA closes -----------------------------------------------------------------


def test_the_default_rules_refund_first_and_close_on_fraud_and_under_spec():
    assert RULES.refund_consumers is True
    assert RULES.checker_penalty_bps == DEFAULT_CHECKER_PENALTY_BPS
    assert RULES.close_leases_on == frozenset({FailureKind.fraud, FailureKind.under_spec})


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"checker_penalty_bps": -1}, ValueError),
        ({"checker_penalty_bps": 10_001}, ValueError),
        ({"checker_penalty_bps": 1_000.0}, TypeError),
        ({"checker_penalty_bps": True}, TypeError),
        ({"close_leases_on": frozenset({FailureKind.none})}, ValueError),
        ({"close_leases_on": frozenset({FailureKind.fraud, FailureKind.none})}, ValueError),
    ],
)
def test_slashing_rules_with_an_impossible_value_are_refused(kwargs, error):
    with pytest.raises(error):
        SlashingRules(**kwargs)


@pytest.mark.parametrize("bps", [0, 1, 10_000])
def test_the_bounds_of_the_penalty_share_are_accepted(bps):
    assert SlashingRules(checker_penalty_bps=bps).checker_penalty_bps == bps


@pytest.mark.parametrize(
    ("kind", "closes"),
    [(FailureKind.fraud, True), (FailureKind.under_spec, True), (FailureKind.downtime, False)],
)
def test_fraud_and_under_spec_close_the_nodes_leases_but_downtime_alone_does_not(kind, closes):
    failed, _ = failed_quorum(kind)
    assert failed.kind is kind
    assert closes_leases(failed, RULES) is closes


def test_the_kinds_that_close_leases_are_the_rules_choice():
    downtime, _ = failed_quorum(FailureKind.downtime)
    fraud, _ = failed_quorum(FailureKind.fraud)
    only_downtime = SlashingRules(close_leases_on=frozenset({FailureKind.downtime}))
    assert closes_leases(downtime, only_downtime) is True
    assert closes_leases(fraud, only_downtime) is False
    never = SlashingRules(close_leases_on=frozenset())
    assert closes_leases(fraud, never) is False


def test_an_sla_close_releases_the_unused_escrow_of_the_nodes_open_leases():
    failed, _ = failed_quorum(FailureKind.fraud)
    open_lease = lease(W0 - s(100), 3_600)
    assert closes_leases(failed, RULES)
    result, facts = ls.close(open_lease, ls.CloseReason.sla_breach, ls.PROTOCOL_ID, DECIDED, LRULES)
    assert result is ls.CloseResult.ok
    closed = facts[-1]
    assert isinstance(closed, ls.LeaseClosed)
    assert closed.reason is ls.CloseReason.sla_breach
    assert closed.escrow_released == open_lease.escrow_held
