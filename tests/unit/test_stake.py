"""Unit tests of the pure provider-stake rules (`domain.stake`). No database, no clock.

Every result code has a test asserting the exact code; a refusal returns no facts. Property
tests drive random sequences of bonds, unbond requests, time, completions, slashes of both
kinds and node listings, and check the invariants after every step.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.stake import (
    DEMO_STAKE_PER_GPU,
    GPU_COUNT_MAX,
    UNBOND_DELAY_S_MAX,
    UNBONDING_ENTRIES_MAX,
    BondResult,
    CompleteUnbondResult,
    Fact,
    NodeGpus,
    ProviderStake,
    Ratio,
    RequestUnbondResult,
    RequiredStakeResult,
    SlashKind,
    SlashResult,
    StakeBonded,
    StakeRules,
    StakeSlashed,
    UnbondCompleted,
    UnbondingEntry,
    UnbondingSlash,
    UnbondRequested,
    apply,
    bond,
    can_place_asks,
    complete_unbond,
    replay,
    request_unbond,
    required_stake,
    slash,
)
from ledger.limits import AMOUNT_MAX
from ledger.money import units

PROVIDER = UUID(int=7)
OTHER_PROVIDER = UUID(int=8)
T0 = datetime(2026, 1, 1, tzinfo=UTC)
DELAY_S = 120
RULES = StakeRules(stake_per_gpu={"H100": 300, "A100": 100}, unbond_delay_s=DELAY_S)
"""Small K so the numbers are readable: H100 300 per GPU, A100 100 per GPU."""
EMPTY = ProviderStake(PROVIDER)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def step(state: ProviderStake, outcome: tuple[int, tuple[Fact, ...]]) -> ProviderStake:
    """Apply the facts of a decision; return the new state."""
    _, facts = outcome
    for fact in facts:
        state = apply(state, fact)
    return state


def bonded(amount: int) -> ProviderStake:
    return step(EMPTY, bond(EMPTY, amount, T0))


def unbonding(bonded_amount: int, *amounts: int, every_s: int = 10) -> ProviderStake:
    """Bond, then request one unbond per amount, `every_s` apart from T0 on."""
    state = bonded(bonded_amount)
    for i, amount in enumerate(amounts):
        result, facts = request_unbond(state, amount, [], RULES, at(i * every_s))
        assert result is RequestUnbondResult.ok
        state = step(state, (result, facts))
    return state


def do_slash(
    state: ProviderStake,
    kind: SlashKind = SlashKind.fraud,
    gpu_model: str = "H100",
    gpu_count: int = 1,
    offence_at: datetime = T0,
    now: datetime = T0,
    rules: StakeRules = RULES,
) -> tuple[SlashResult, tuple[Fact, ...]]:
    return slash(
        state,
        rules,
        kind=kind,
        gpu_model=gpu_model,
        gpu_count=gpu_count,
        offence_at=offence_at,
        now=now,
    )


def total(state: ProviderStake) -> int:
    return state.bonded + state.unbonding_total + state.released + state.slashed


# -- rules and ratios ---------------------------------------------------------------------


def test_a_ratio_rounds_down_in_integers():
    assert Ratio(1, 3).floor_of(100) == 33
    assert Ratio(2, 3).floor_of(100) == 66
    assert Ratio(1, 1).floor_of(units(100)) == units(100)
    assert Ratio(0, 1).floor_of(1_000) == 0


@pytest.mark.parametrize(("numerator", "denominator"), [(1, 0), (1, -3), (-1, 3), (4, 3)], ids=str)
def test_a_ratio_outside_zero_to_one_is_refused(numerator, denominator):
    with pytest.raises(ValueError, match=r"denominator|numerator"):
        Ratio(numerator, denominator)


def test_a_ratio_of_floats_is_refused():
    with pytest.raises(TypeError):
        Ratio(0.5, 1)  # type: ignore[arg-type]


def test_the_default_rules_are_the_demo_numbers():
    rules = StakeRules()
    assert rules.unbond_delay_s == 120
    assert rules.downtime_slash_fraction == Ratio(1, 3)
    assert rules.fraud_slash_fraction == Ratio(1, 1)
    assert rules.stake_per_gpu == dict(DEMO_STAKE_PER_GPU)
    assert rules.stake_per_gpu["H100"] == units(100)
    assert rules.slash_fraction(SlashKind.downtime) == Ratio(1, 3)
    assert rules.slash_fraction(SlashKind.fraud) == Ratio(1, 1)


def test_live_network_unbonding_delays_are_accepted():
    assert StakeRules(unbond_delay_s=14 * 24 * 3600).unbond_delay_s == 1_209_600
    assert StakeRules(unbond_delay_s=180 * 24 * 3600).unbond_delay_s == 15_552_000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stake_per_gpu": {"H100": 0}},
        {"stake_per_gpu": {"H100": -1}},
        {"stake_per_gpu": {"H100": AMOUNT_MAX + 1}},
        {"stake_per_gpu": {"": 10}},
        {"unbond_delay_s": -1},
        {"unbond_delay_s": UNBOND_DELAY_S_MAX + 1},
    ],
    ids=str,
)
def test_rules_with_an_impossible_number_are_refused(kwargs):
    with pytest.raises(ValueError, match="must be"):
        StakeRules(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stake_per_gpu": {"H100": 1.5}},
        {"stake_per_gpu": {"H100": True}},
        {"unbond_delay_s": 120.0},
        {"downtime_slash_fraction": (1, 3)},
    ],
    ids=str,
)
def test_rules_with_a_float_or_a_wrong_type_are_refused(kwargs):
    with pytest.raises(TypeError):
        StakeRules(**kwargs)


def test_the_rules_cannot_be_changed_after_construction():
    k = {"H100": 300}
    rules = StakeRules(stake_per_gpu=k)
    k["H100"] = 1
    assert rules.stake_per_gpu["H100"] == 300
    with pytest.raises(TypeError):
        rules.stake_per_gpu["H100"] = 1  # type: ignore[index]
    with pytest.raises(FrozenInstanceError):
        rules.unbond_delay_s = 1  # type: ignore[misc]


# -- required stake -----------------------------------------------------------------------


def test_required_stake_is_gpu_count_times_k_summed_over_nodes():
    nodes = [NodeGpus("H100", 8), NodeGpus("A100", 4), NodeGpus("H100", 2)]
    assert required_stake(nodes, RULES) == (RequiredStakeResult.ok, 8 * 300 + 4 * 100 + 2 * 300)


def test_no_listed_nodes_require_no_stake():
    assert required_stake([], RULES) == (RequiredStakeResult.ok, 0)


def test_a_node_with_no_gpus_requires_no_stake():
    assert required_stake([NodeGpus("H100", 0)], RULES) == (RequiredStakeResult.ok, 0)


def test_required_stake_of_an_unknown_gpu_model_is_gpu_model_not_found():
    result = required_stake([NodeGpus("H100", 1), NodeGpus("TPUv5", 1)], RULES)
    assert result == (RequiredStakeResult.gpu_model_not_found, 0)


def test_required_stake_of_a_negative_gpu_count_is_refused():
    result = required_stake([NodeGpus("H100", -1)], RULES)
    assert result == (RequiredStakeResult.gpu_count_must_not_be_negative, 0)


def test_required_stake_of_too_many_gpus_is_refused():
    result = required_stake([NodeGpus("H100", GPU_COUNT_MAX + 1)], RULES)
    assert result == (RequiredStakeResult.gpu_count_exceeds_max, 0)
    assert required_stake([NodeGpus("H100", GPU_COUNT_MAX)], RULES)[0] is RequiredStakeResult.ok


def test_the_first_failing_node_decides_the_required_stake_result():
    nodes = [NodeGpus("TPUv5", 1), NodeGpus("H100", -1)]
    assert required_stake(nodes, RULES)[0] is RequiredStakeResult.gpu_model_not_found
    nodes = [NodeGpus("H100", -1), NodeGpus("TPUv5", 1)]
    assert required_stake(nodes, RULES)[0] is RequiredStakeResult.gpu_count_must_not_be_negative


def test_within_one_node_the_gpu_count_is_checked_before_the_model():
    result = required_stake([NodeGpus("TPUv5", -1)], RULES)
    assert result[0] is RequiredStakeResult.gpu_count_must_not_be_negative


def test_any_node_type_with_gpu_model_and_gpu_count_is_accepted():
    @dataclass(frozen=True)
    class Node:
        node_id: str
        gpu_model: str
        gpu_count: int
        region: str = "eu"

    assert required_stake([Node("n1", "A100", 3)], RULES) == (RequiredStakeResult.ok, 300)


def test_result_codes_are_never_renumbered():
    # Pinned: a code is stored and compared by number; add new members at the end only.
    def names(enum: type[IntEnum]) -> list[tuple[int, str]]:
        return [(int(member), member.name) for member in enum]

    assert names(SlashKind) == [(1, "downtime"), (2, "fraud")]
    assert names(RequiredStakeResult) == list(
        enumerate(
            ["ok", "gpu_count_must_not_be_negative", "gpu_count_exceeds_max", "gpu_model_not_found"]
        )
    )
    assert names(BondResult) == list(
        enumerate(
            [
                "ok",
                "amount_must_not_be_negative",
                "amount_must_not_be_zero",
                "amount_exceeds_max",
                "overflows_bonded_total",
            ]
        )
    )
    assert names(RequestUnbondResult) == list(
        enumerate(
            [
                "ok",
                "amount_must_not_be_negative",
                "amount_must_not_be_zero",
                "gpu_count_must_not_be_negative",
                "gpu_count_exceeds_max",
                "gpu_model_not_found",
                "amount_exceeds_bonded",
                "unbonding_entries_exceed_max",
                "unbond_would_leave_stake_below_required",
            ]
        )
    )
    assert names(CompleteUnbondResult) == list(
        enumerate(["ok", "nothing_unbonding", "unbonding_not_yet_available"])
    )
    assert names(SlashResult) == list(
        enumerate(
            [
                "ok",
                "gpu_count_must_not_be_negative",
                "gpu_count_must_not_be_zero",
                "gpu_count_exceeds_max",
                "gpu_model_not_found",
                "offence_must_not_be_after_now",
                "slash_amount_must_not_be_zero",
                "no_stake_to_slash",
            ]
        )
    )


# -- can place asks -----------------------------------------------------------------------


def test_a_provider_may_place_asks_when_bonded_stake_covers_its_nodes():
    nodes = [NodeGpus("H100", 2)]
    assert can_place_asks(bonded(600), nodes, RULES)
    assert can_place_asks(bonded(601), nodes, RULES)


def test_a_provider_may_not_place_asks_below_the_required_stake():
    assert not can_place_asks(bonded(599), [NodeGpus("H100", 2)], RULES)
    assert not can_place_asks(EMPTY, [NodeGpus("A100", 1)], RULES)


def test_a_provider_may_not_place_asks_for_an_unknown_gpu_model():
    assert not can_place_asks(bonded(10_000), [NodeGpus("TPUv5", 1)], RULES)


def test_unbonding_stake_does_not_count_towards_the_required_stake():
    state = unbonding(600, 300)
    assert state.slashable == 600
    assert not can_place_asks(state, [NodeGpus("H100", 2)], RULES)
    assert can_place_asks(state, [NodeGpus("H100", 1)], RULES)


def test_listing_more_gpus_raises_the_required_stake():
    state = bonded(600)
    assert can_place_asks(state, [NodeGpus("H100", 2)], RULES)
    assert not can_place_asks(state, [NodeGpus("H100", 2), NodeGpus("A100", 1)], RULES)


# -- bond ---------------------------------------------------------------------------------


def test_bonding_adds_the_amount_to_bonded_stake():
    result, facts = bond(EMPTY, 500, at(5))
    assert result is BondResult.ok
    assert facts == (StakeBonded(PROVIDER, 500, at(5)),)
    state = step(EMPTY, (result, facts))
    assert (state.bonded, state.bonded_total) == (500, 500)
    state = step(state, bond(state, 250, at(6)))
    assert (state.bonded, state.bonded_total) == (750, 750)


def test_bonding_a_negative_amount_is_refused():
    assert bond(EMPTY, -1, T0) == (BondResult.amount_must_not_be_negative, ())


def test_bonding_zero_is_refused():
    assert bond(EMPTY, 0, T0) == (BondResult.amount_must_not_be_zero, ())


def test_bonding_more_than_the_max_amount_is_refused():
    assert bond(EMPTY, AMOUNT_MAX + 1, T0) == (BondResult.amount_exceeds_max, ())
    assert bond(EMPTY, AMOUNT_MAX, T0)[0] is BondResult.ok


def test_bonding_past_the_max_total_is_refused_even_after_unbonding():
    state = bonded(AMOUNT_MAX - 10)
    state = step(state, request_unbond(state, AMOUNT_MAX - 10, [], RULES, T0))
    state = step(state, complete_unbond(state, at(DELAY_S)))
    assert state.bonded == 0
    assert bond(state, 11, T0) == (BondResult.overflows_bonded_total, ())
    assert bond(state, 10, T0)[0] is BondResult.ok


@pytest.mark.parametrize("amount", [1.0, True, "5"], ids=repr)
def test_bonding_a_non_int_amount_is_a_bug_that_raises(amount):
    with pytest.raises(TypeError, match="amount must be an int"):
        bond(EMPTY, amount, T0)


# -- request unbond -----------------------------------------------------------------------


def test_requesting_an_unbond_moves_stake_into_an_entry_available_after_the_delay():
    state = bonded(1_000)
    result, facts = request_unbond(state, 400, [NodeGpus("H100", 2)], RULES, at(30))
    assert result is RequestUnbondResult.ok
    assert facts == (UnbondRequested(PROVIDER, 1, 400, at(30), at(30 + DELAY_S)),)
    state = step(state, (result, facts))
    assert state.bonded == 600
    assert state.unbonding == (UnbondingEntry(1, 400, at(30), at(30 + DELAY_S)),)
    assert state.unbonding_total == 400
    assert total(state) == state.bonded_total == 1_000


def test_unbond_ids_count_up_per_provider():
    state = unbonding(1_000, 100, 200, 300)
    assert [e.unbond_id for e in state.unbonding] == [1, 2, 3]
    assert state.unbond_requests_count == 3


def test_unbonding_down_to_exactly_the_required_stake_is_allowed():
    state = bonded(1_000)
    result, _ = request_unbond(state, 400, [NodeGpus("H100", 2)], RULES, T0)
    assert result is RequestUnbondResult.ok


def test_unbonding_everything_is_allowed_with_no_nodes_listed():
    state = bonded(1_000)
    assert request_unbond(state, 1_000, [], RULES, T0)[0] is RequestUnbondResult.ok


def test_unbonding_a_negative_amount_is_refused():
    result = request_unbond(bonded(1_000), -5, [], RULES, T0)
    assert result == (RequestUnbondResult.amount_must_not_be_negative, ())


def test_unbonding_zero_is_refused():
    result = request_unbond(bonded(1_000), 0, [], RULES, T0)
    assert result == (RequestUnbondResult.amount_must_not_be_zero, ())


def test_unbonding_with_a_negative_gpu_count_listed_is_refused():
    result = request_unbond(bonded(1_000), 5, [NodeGpus("H100", -2)], RULES, T0)
    assert result == (RequestUnbondResult.gpu_count_must_not_be_negative, ())


def test_unbonding_with_too_many_gpus_listed_is_refused():
    result = request_unbond(bonded(1_000), 5, [NodeGpus("H100", GPU_COUNT_MAX + 1)], RULES, T0)
    assert result == (RequestUnbondResult.gpu_count_exceeds_max, ())


def test_unbonding_with_an_unknown_gpu_model_listed_is_refused():
    result = request_unbond(bonded(1_000), 5, [NodeGpus("TPUv5", 1)], RULES, T0)
    assert result == (RequestUnbondResult.gpu_model_not_found, ())


def test_unbonding_more_than_bonded_is_refused():
    result = request_unbond(bonded(1_000), 1_001, [], RULES, T0)
    assert result == (RequestUnbondResult.amount_exceeds_bonded, ())


def test_unbonding_stake_already_unbonding_is_refused():
    state = unbonding(1_000, 600)
    result = request_unbond(state, 401, [], RULES, T0)
    assert result == (RequestUnbondResult.amount_exceeds_bonded, ())


def test_unbonding_past_the_max_pending_entries_is_refused():
    state = unbonding(1_000, *([1] * UNBONDING_ENTRIES_MAX))
    result = request_unbond(state, 1, [], RULES, T0)
    assert result == (RequestUnbondResult.unbonding_entries_exceed_max, ())
    state = step(state, complete_unbond(state, at(DELAY_S)))
    assert request_unbond(state, 1, [], RULES, T0)[0] is RequestUnbondResult.ok


def test_unbonding_below_the_required_stake_is_refused():
    state = bonded(1_000)
    result = request_unbond(state, 401, [NodeGpus("H100", 2)], RULES, T0)
    assert result == (RequestUnbondResult.unbond_would_leave_stake_below_required, ())


def test_after_a_slash_below_the_required_stake_no_unbond_is_allowed():
    state = step(bonded(600), do_slash(bonded(600), SlashKind.downtime))
    assert state.bonded == 500
    result = request_unbond(state, 1, [NodeGpus("H100", 2)], RULES, T0)
    assert result == (RequestUnbondResult.unbond_would_leave_stake_below_required, ())


def test_unbond_checks_run_in_the_declared_order():
    state = unbonding(1_000, *([1] * UNBONDING_ENTRIES_MAX))
    r = RequestUnbondResult
    bad_node = [NodeGpus("TPUv5", 1)]
    assert request_unbond(state, 0, bad_node, RULES, T0)[0] is r.amount_must_not_be_zero
    assert request_unbond(state, 10_000, bad_node, RULES, T0)[0] is r.gpu_model_not_found
    assert request_unbond(state, 10_000, [], RULES, T0)[0] is r.amount_exceeds_bonded
    assert request_unbond(state, 1, [NodeGpus("H100", 9)], RULES, T0)[0] is (
        r.unbonding_entries_exceed_max
    )


# -- complete unbond ----------------------------------------------------------------------


def test_completing_with_nothing_unbonding_is_refused():
    assert complete_unbond(bonded(100), at(1_000)) == (CompleteUnbondResult.nothing_unbonding, ())


def test_completing_before_the_delay_is_refused():
    state = unbonding(1_000, 400)
    result = complete_unbond(state, at(DELAY_S - 1))
    assert result == (CompleteUnbondResult.unbonding_not_yet_available, ())


def test_an_unbond_completes_exactly_when_available():
    state = unbonding(1_000, 400)
    result, facts = complete_unbond(state, at(DELAY_S))
    assert result is CompleteUnbondResult.ok
    assert facts == (UnbondCompleted(PROVIDER, 1, 400, at(DELAY_S)),)
    state = step(state, (result, facts))
    assert (state.bonded, state.unbonding, state.released) == (600, (), 400)
    assert total(state) == 1_000


def test_completing_releases_only_the_entries_that_are_available():
    state = unbonding(1_000, 100, 200, 300, every_s=60)
    result, facts = complete_unbond(state, at(60 + DELAY_S))
    assert result is CompleteUnbondResult.ok
    assert [(f.unbond_id, f.amount) for f in facts if isinstance(f, UnbondCompleted)] == [
        (1, 100),
        (2, 200),
    ]
    state = step(state, (result, facts))
    assert [e.unbond_id for e in state.unbonding] == [3]
    assert state.released == 300


def test_the_delay_in_force_at_the_request_decides_availability():
    state = bonded(1_000)
    state = step(state, request_unbond(state, 100, [], StakeRules(unbond_delay_s=10), T0))
    state = step(state, request_unbond(state, 100, [], StakeRules(unbond_delay_s=1_000), T0))
    _, facts = complete_unbond(state, at(10))
    assert [f.unbond_id for f in facts if isinstance(f, UnbondCompleted)] == [1]


# -- slash --------------------------------------------------------------------------------


def test_a_downtime_slash_takes_a_third_of_k_per_affected_gpu():
    state = bonded(1_000)
    result, facts = do_slash(state, SlashKind.downtime, "H100", 2, offence_at=at(-30), now=T0)
    assert result is SlashResult.ok
    assert facts == (
        StakeSlashed(
            provider_id=PROVIDER,
            kind=SlashKind.downtime,
            gpu_model="H100",
            gpu_count=2,
            amount_sized=200,
            amount=200,
            from_bonded=200,
            from_unbonding=(),
            offence_at=at(-30),
            slashed_at=T0,
        ),
    )
    state = step(state, (result, facts))
    assert (state.bonded, state.slashed) == (800, 200)


def test_a_fraud_slash_takes_all_of_k_per_affected_gpu():
    result, facts = do_slash(bonded(1_000), SlashKind.fraud, "A100", 3)
    assert result is SlashResult.ok
    assert isinstance(facts[0], StakeSlashed)
    assert facts[0].amount == 300


def test_a_slash_rounds_down_once_on_the_total():
    # A100: K = 100; a third of 4 GPUs is floor(400 / 3) = 133, not 4 * floor(100 / 3) = 132.
    _, facts = do_slash(bonded(1_000), SlashKind.downtime, "A100", 4)
    assert isinstance(facts[0], StakeSlashed)
    assert facts[0].amount_sized == facts[0].amount == 133


def test_a_slash_with_the_demo_numbers_takes_a_third_of_100_aeth_rounded_down():
    rules = StakeRules()
    state = bonded(units(1_000))
    _, facts = do_slash(state, SlashKind.downtime, "H100", 1, rules=rules)
    assert isinstance(facts[0], StakeSlashed)
    assert facts[0].amount == units(100) // 3 == 33_333_333_333_333_333_333


def test_a_slash_takes_from_bonded_first_then_unbonding_oldest_first():
    state = unbonding(1_000, 100, 200, 300)
    assert state.bonded == 400
    result, facts = do_slash(state, SlashKind.fraud, "H100", 2)  # 600
    assert result is SlashResult.ok
    fact = facts[0]
    assert isinstance(fact, StakeSlashed)
    assert fact.from_bonded == 400
    assert fact.from_unbonding == (UnbondingSlash(1, 100), UnbondingSlash(2, 100))
    state = step(state, (result, facts))
    assert state.bonded == 0
    assert [(e.unbond_id, e.amount) for e in state.unbonding] == [(2, 100), (3, 300)]
    assert state.slashed == 600
    assert total(state) == 1_000


def test_a_slash_is_capped_at_bonded_plus_unbonding_and_records_the_shortfall():
    state = unbonding(500, 100)
    result, facts = do_slash(state, SlashKind.fraud, "H100", 3)  # 900 asked
    assert result is SlashResult.ok
    fact = facts[0]
    assert isinstance(fact, StakeSlashed)
    assert (fact.amount_sized, fact.amount) == (900, 500)
    assert (fact.from_bonded, fact.from_unbonding) == (400, (UnbondingSlash(1, 100),))
    state = step(state, (result, facts))
    assert (state.bonded, state.unbonding, state.slashed) == (0, (), 500)


def test_an_entry_slashed_to_zero_is_dropped_and_never_completes():
    state = unbonding(300, 300)
    state = step(state, do_slash(state, SlashKind.fraud, "H100", 1))
    assert state.unbonding == ()
    assert complete_unbond(state, at(DELAY_S)) == (CompleteUnbondResult.nothing_unbonding, ())


def test_a_partly_slashed_entry_completes_with_what_is_left():
    state = unbonding(300, 300)
    state = step(state, do_slash(state, SlashKind.downtime, "H100", 1))
    _, facts = complete_unbond(state, at(DELAY_S))
    assert facts == (UnbondCompleted(PROVIDER, 1, 200, at(DELAY_S)),)
    state = step(state, complete_unbond(state, at(DELAY_S)))
    assert (state.released, state.slashed, total(state)) == (200, 100, 300)


def test_an_offence_during_unbonding_is_slashed_from_the_pending_entry():
    state = unbonding(300, 300)
    _, facts = do_slash(state, offence_at=at(DELAY_S - 1), now=at(DELAY_S - 1))
    assert isinstance(facts[0], StakeSlashed)
    assert facts[0].from_unbonding == (UnbondingSlash(1, 300),)


def test_an_available_entry_not_yet_completed_can_still_be_slashed():
    state = unbonding(300, 300)
    _, facts = do_slash(state, offence_at=at(10), now=at(DELAY_S * 5))
    assert isinstance(facts[0], StakeSlashed)
    assert facts[0].from_unbonding == (UnbondingSlash(1, 300),)


def test_an_entry_already_completed_cannot_be_slashed():
    state = unbonding(300, 300)
    state = step(state, complete_unbond(state, at(DELAY_S)))
    result = do_slash(state, offence_at=at(10), now=at(DELAY_S + 1))
    assert result == (SlashResult.no_stake_to_slash, ())
    assert state.released == 300


def test_a_slash_with_a_negative_gpu_count_is_refused():
    result = do_slash(bonded(1_000), gpu_count=-1)
    assert result == (SlashResult.gpu_count_must_not_be_negative, ())


def test_a_slash_of_zero_gpus_is_refused():
    assert do_slash(bonded(1_000), gpu_count=0) == (SlashResult.gpu_count_must_not_be_zero, ())


def test_a_slash_of_too_many_gpus_is_refused():
    result = do_slash(bonded(1_000), gpu_count=GPU_COUNT_MAX + 1)
    assert result == (SlashResult.gpu_count_exceeds_max, ())


def test_a_slash_for_an_unknown_gpu_model_is_refused():
    result = do_slash(bonded(1_000), gpu_model="TPUv5")
    assert result == (SlashResult.gpu_model_not_found, ())


def test_a_slash_for_an_offence_after_now_is_refused():
    result = do_slash(bonded(1_000), offence_at=at(1), now=T0)
    assert result == (SlashResult.offence_must_not_be_after_now, ())


def test_a_slash_that_rounds_to_zero_is_refused():
    rules = StakeRules(stake_per_gpu={"GTX": 2})
    result = do_slash(bonded(1_000), SlashKind.downtime, "GTX", 1, rules=rules)
    assert result == (SlashResult.slash_amount_must_not_be_zero, ())
    off = StakeRules(stake_per_gpu={"H100": 300}, downtime_slash_fraction=Ratio(0, 1))
    result = do_slash(bonded(1_000), SlashKind.downtime, rules=off)
    assert result == (SlashResult.slash_amount_must_not_be_zero, ())


def test_a_slash_of_a_provider_with_no_stake_is_refused():
    assert do_slash(EMPTY) == (SlashResult.no_stake_to_slash, ())


def test_slash_checks_run_in_the_declared_order():
    r = SlashResult
    assert do_slash(EMPTY, gpu_model="TPUv5", gpu_count=0)[0] is r.gpu_count_must_not_be_zero
    assert do_slash(EMPTY, gpu_model="TPUv5", offence_at=at(1))[0] is r.gpu_model_not_found
    rules = StakeRules(stake_per_gpu={"GTX": 2})
    assert do_slash(EMPTY, SlashKind.downtime, "GTX", 1, offence_at=at(1), rules=rules)[0] is (
        r.offence_must_not_be_after_now
    )
    assert do_slash(EMPTY, SlashKind.downtime, "GTX", 1, rules=rules)[0] is (
        r.slash_amount_must_not_be_zero
    )


@pytest.mark.parametrize("gpu_count", [1.0, True], ids=repr)
def test_a_slash_with_a_non_int_gpu_count_is_a_bug_that_raises(gpu_count):
    with pytest.raises(TypeError, match="gpu_count must be an int"):
        do_slash(bonded(1_000), gpu_count=gpu_count)


# -- apply and replay ---------------------------------------------------------------------


def test_replaying_no_facts_gives_an_empty_stake():
    assert replay(PROVIDER, []) == EMPTY


def test_replaying_the_facts_rebuilds_the_live_state():
    state = EMPTY
    facts: list[Fact] = []
    for outcome in (
        lambda s: bond(s, 1_000, T0),
        lambda s: request_unbond(s, 300, [NodeGpus("H100", 2)], RULES, at(1)),
        lambda s: do_slash(s, SlashKind.downtime, "H100", 2, at(2), at(3)),
        lambda s: request_unbond(s, 100, [NodeGpus("H100", 1)], RULES, at(4)),
        lambda s: complete_unbond(s, at(1 + DELAY_S)),
        lambda s: do_slash(s, SlashKind.fraud, "H100", 3, at(5), at(200)),
    ):
        result, new = outcome(state)
        assert result == 0
        facts.extend(new)
        state = step(state, (result, new))
    assert replay(PROVIDER, facts) == state
    assert (state.bonded, state.unbonding, state.released, state.slashed) == (0, (), 300, 700)


def test_a_fact_of_another_provider_is_never_applied():
    fact = StakeBonded(OTHER_PROVIDER, 5, T0)
    with pytest.raises(AssertionError, match="applied to provider"):
        apply(EMPTY, fact)


def test_completing_an_unbond_early_is_caught_on_replay():
    state = unbonding(300, 300)
    with pytest.raises(AssertionError, match="completed early"):
        apply(state, UnbondCompleted(PROVIDER, 1, 300, at(DELAY_S - 1)))


def test_states_and_facts_are_immutable():
    with pytest.raises(FrozenInstanceError):
        EMPTY.bonded = 5  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        StakeBonded(PROVIDER, 5, T0).amount = 6  # type: ignore[misc]


# -- properties over random sequences ---------------------------------------------------------

MODELS = sorted(RULES.stake_per_gpu)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("bond"), st.integers(-5, 1_500)),
        st.tuples(st.just("unbond"), st.integers(-5, 1_500)),
        st.tuples(
            st.just("advance"),
            st.one_of(st.sampled_from([1, DELAY_S - 1, DELAY_S]), st.integers(0, 2 * DELAY_S)),
        ),
        st.tuples(st.just("complete")),
        st.tuples(
            st.just("slash"),
            st.sampled_from(SlashKind),
            st.sampled_from([*MODELS, "TPUv5"]),
            st.integers(0, 4),
            st.integers(0, 3 * DELAY_S),
        ),
        st.tuples(st.just("list"), st.sampled_from(MODELS), st.integers(1, 4)),
        st.tuples(st.just("unlist"), st.integers(0, 7)),
    ),
    max_size=50,
)


@dataclass
class Run:
    """A random sequence played against the rules, with what an observer can check."""

    state: ProviderStake = EMPTY
    now: datetime = T0
    nodes: list[NodeGpus] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)
    requests: dict[int, UnbondRequested] = field(default_factory=dict)
    bonded_ever: int = 0


def play(run: Run, op: tuple[object, ...]) -> None:
    """Play one operation and check every property that concerns it."""
    before = run.state
    if op[0] == "advance":
        assert isinstance(op[1], int)
        run.now += timedelta(seconds=op[1])
        return
    if op[0] == "list":
        assert isinstance(op[1], str) and isinstance(op[2], int)
        run.nodes.append(NodeGpus(op[1], op[2]))
        return
    if op[0] == "unlist":
        assert isinstance(op[1], int)
        if run.nodes:
            del run.nodes[op[1] % len(run.nodes)]
        return
    outcome: tuple[int, tuple[Fact, ...]]
    if op[0] == "bond":
        assert isinstance(op[1], int)
        outcome = bond(before, op[1], run.now)
    elif op[0] == "unbond":
        assert isinstance(op[1], int)
        outcome = request_unbond(before, op[1], run.nodes, RULES, run.now)
    elif op[0] == "complete":
        outcome = complete_unbond(before, run.now)
    else:
        _, kind, model, count, back_s = op
        assert isinstance(kind, SlashKind) and isinstance(model, str)
        assert isinstance(count, int) and isinstance(back_s, int)
        outcome = do_slash(before, kind, model, count, run.now - timedelta(seconds=back_s), run.now)
    result, facts = outcome
    assert (result == 0) == bool(facts), "a refusal records nothing, a success something"
    after = step(before, outcome)
    run.state = after
    run.facts.extend(facts)

    for fact in facts:
        if isinstance(fact, StakeBonded):
            run.bonded_ever += fact.amount
        elif isinstance(fact, UnbondRequested):
            run.requests[fact.unbond_id] = fact
            assert fact.available_at - fact.requested_at == timedelta(seconds=DELAY_S)
        elif isinstance(fact, UnbondCompleted):
            # Completed unbonds only after the delay.
            request = run.requests[fact.unbond_id]
            assert fact.completed_at - request.requested_at >= timedelta(seconds=DELAY_S)
            assert fact.amount <= request.amount
        else:
            check_slash(before, after, fact)

    if op[0] == "unbond" and result == 0:
        _, required = required_stake(run.nodes, RULES)
        assert after.bonded >= required
    if op[0] == "complete":
        # Everything available was released; nothing else was.
        assert all(e.available_at > run.now for e in after.unbonding)
        assert after.released - before.released == sum(
            e.amount for e in before.unbonding if e.available_at <= run.now
        )

    # Stake never negative.
    assert min(after.bonded, after.released, after.slashed) >= 0
    assert all(e.amount > 0 for e in after.unbonding)
    # Total conservation: every unit ever bonded is in exactly one place.
    assert total(after) == after.bonded_total == run.bonded_ever
    # Slashes and releases only ever grow.
    assert after.slashed >= before.slashed and after.released >= before.released


def check_slash(before: ProviderStake, after: ProviderStake, fact: StakeSlashed) -> None:
    k = RULES.stake_per_gpu[fact.gpu_model]
    sized = k * fact.gpu_count * RULES.slash_fraction(fact.kind).numerator
    sized //= RULES.slash_fraction(fact.kind).denominator
    assert fact.amount_sized == sized
    # A slash never exceeds bonded + unbonding at that moment, nor what the rule asked for.
    assert 0 < fact.amount == min(sized, before.bonded + before.unbonding_total)
    assert fact.amount == fact.from_bonded + sum(p.amount for p in fact.from_unbonding)
    # Bonded first.
    assert fact.from_bonded == min(fact.amount, before.bonded)
    # Unbonding never escapes a slash for an earlier offence: every entry pending at the
    # slash, whenever it was requested, is liable; a shortfall means nothing was left.
    pending = {e.unbond_id: e for e in before.unbonding}
    for part in fact.from_unbonding:
        assert part.unbond_id in pending
        assert 0 < part.amount <= pending[part.unbond_id].amount
    if fact.amount < fact.amount_sized:
        assert after.bonded == 0 and after.unbonding == ()
    assert after.slashed - before.slashed == fact.amount


@settings(max_examples=300, deadline=None)
@given(operations)
def test_random_sequences_keep_every_stake_invariant(ops):
    run = Run()
    for op in ops:
        play(run, op)
        # Replay equals the live state, at every step.
        assert replay(PROVIDER, run.facts) == run.state
    assert can_place_asks(run.state, run.nodes, RULES) == (
        run.state.bonded >= required_stake(run.nodes, RULES)[1]
    )


@settings(max_examples=200, deadline=None)
@given(
    bonded_amount=st.integers(1, 2_000),
    unbond_share=st.integers(1, 100),
    requested_s=st.integers(0, 1_000),
    offence_s=st.integers(-500, 2_000),
    wait_s=st.integers(0, 3 * DELAY_S),
    kind=st.sampled_from(SlashKind),
    gpu_count=st.integers(1, 8),
)
def test_an_offence_before_an_unbond_completes_is_slashed_from_that_entry(
    bonded_amount, unbond_share, requested_s, offence_s, wait_s, kind, gpu_count
):
    # Bond, unbond a share, wait any time (the entry may already be available) and slash an
    # offence committed at any time up to now, before the entry completed.
    unbond_amount = max(1, bonded_amount * unbond_share // 100)
    state = bonded(bonded_amount)
    state = step(state, request_unbond(state, unbond_amount, [], RULES, at(requested_s)))
    now = at(requested_s + wait_s)
    offence_at = min(at(offence_s), now)
    result, facts = do_slash(state, kind, "H100", gpu_count, offence_at, now)
    assert result is SlashResult.ok
    fact = facts[0]
    assert isinstance(fact, StakeSlashed)
    from_bonded_max = bonded_amount - unbond_amount
    expected_from_entry = min(unbond_amount, max(0, fact.amount_sized - from_bonded_max))
    taken = sum(p.amount for p in fact.from_unbonding if p.unbond_id == 1)
    assert taken == expected_from_entry
    state = step(state, (result, facts))
    # What completes afterwards is what the slash left of the entry.
    if state.unbonding:
        _, done = complete_unbond(state, now + timedelta(seconds=DELAY_S))
        assert [f.amount for f in done if isinstance(f, UnbondCompleted)] == [unbond_amount - taken]
    else:
        assert taken == unbond_amount
