"""Unit tests of the pure checker-verdict rules (`domain.verdicts`). No database, no clock.

Every result code has a test asserting the exact code; a refusal returns no facts. Property
tests drive random checkers and verdicts through quorum decisions and reputation.
"""

from __future__ import annotations

import random
from dataclasses import FrozenInstanceError, replace
from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.stake import Ratio, SlashKind, StakeSlashed
from domain.verdicts import (
    BPS_MAX,
    LATENCY_MS_P99_MAX,
    THROUGHPUT_MILLI_PER_S_MAX,
    UPTIME_PPM_MAX,
    VERDICTS_PER_WINDOW_MAX,
    CheckerContradicted,
    CheckerRegistered,
    DecideWindowResult,
    Fact,
    FailureKind,
    ProviderHistory,
    QuorumFailed,
    QuorumNotReached,
    QuorumPassed,
    RegisterChecker,
    RegisterCheckerResult,
    SubmitVerdictResult,
    Verdict,
    VerdictRecorded,
    VerdictRules,
    VerdictState,
    apply,
    apply_all,
    decide_window,
    register_checker,
    replay,
    reputation,
    reputations,
    slash_kind_of,
    submit_verdict,
    window_containing,
    window_end_of,
)
from ledger.money import units

WINDOW_S = 60
GRACE_S = 30
RULES = VerdictRules(checker_stake_min=100, verdict_window_s=WINDOW_S, verdict_grace_s=GRACE_S)
W0 = datetime(2026, 1, 1, tzinfo=UTC)
"""A window start on the grid (a multiple of 60 s after the epoch)."""
W0_END = W0 + timedelta(seconds=WINDOW_S)
IN_GRACE = W0_END + timedelta(seconds=1)
CLOSED = W0_END + timedelta(seconds=GRACE_S)
NODE = UUID(int=0xA1)
PROVIDER = UUID(int=0xB1)
OTHER_PROVIDER = UUID(int=0xB2)
ADDRESS = "0x" + "ab" * 20
HASH = "0f" * 32
CHECKERS = tuple(UUID(int=0xC00 + i) for i in range(1, 11))


def checker_id(i: int) -> UUID:
    return CHECKERS[i]


def with_checkers(count: int = 5, state: VerdictState | None = None) -> VerdictState:
    state = state or VerdictState()
    for i in range(count):
        result, facts = register_checker(
            state, RegisterChecker(checker_id(i), ADDRESS, 100), RULES, W0
        )
        assert result is RegisterCheckerResult.ok
        state = apply_all(state, facts)
    return state


_verdict_ids = iter(range(1, 10**9))


def verdict(
    checker: int = 0,
    *,
    passed: bool = True,
    kind: FailureKind | None = None,
    node_id: UUID = NODE,
    provider_id: UUID = PROVIDER,
    window_start: datetime = W0,
    uptime_ppm: int = UPTIME_PPM_MAX,
    latency_ms_p99: int = 100,
    verdict_id: UUID | None = None,
) -> Verdict:
    if kind is None:
        kind = FailureKind.none if passed else FailureKind.downtime
    return Verdict(
        verdict_id=verdict_id or UUID(int=next(_verdict_ids)),
        checker_id=checker_id(checker),
        node_id=node_id,
        provider_id=provider_id,
        window_start=window_start,
        window_end=window_end_of(window_start, RULES),
        latency_ms_p99=latency_ms_p99,
        throughput_milli_per_s=1_500_000,
        uptime_ppm=uptime_ppm,
        passed=passed,
        failure_kind=kind,
        evidence_hash=HASH,
    )


def submit(state: VerdictState, command: Verdict, now: datetime = IN_GRACE) -> VerdictState:
    result, facts = submit_verdict(state, command, RULES, now)
    assert result is SubmitVerdictResult.ok, result
    return apply_all(state, facts)


def voted(*verdicts: Verdict, state: VerdictState | None = None) -> VerdictState:
    state = state or with_checkers()
    for v in verdicts:
        state = submit(state, v)
    return state


def decide(
    state: VerdictState, node_id: UUID = NODE, window_start: datetime = W0
) -> tuple[DecideWindowResult, tuple[Fact, ...]]:
    return decide_window(
        state,
        node_id,
        window_start,
        RULES,
        window_end_of(window_start, RULES) + timedelta(seconds=GRACE_S),
    )


# -- rules --------------------------------------------------------------------------------


def test_the_default_rules_are_the_demo_numbers():
    rules = VerdictRules()
    assert rules.verdict_window_s == 900
    assert rules.quorum_checkers_min == 3
    assert rules.quorum_fail_ratio == Ratio(2, 3)
    assert rules.checker_stake_min == units(10)
    assert rules.under_spec_slash_kind is SlashKind.fraud
    assert (
        rules.uptime_weight_bps
        + rules.pass_weight_bps
        + rules.latency_weight_bps
        + rules.age_weight_bps
        == BPS_MAX
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"verdict_window_s": 0},
        {"verdict_grace_s": 0},
        {"quorum_checkers_min": 0},
        {"checker_stake_min": 0},
        {"uptime_weight_bps": 5_000},
        {"age_days_max": 0},
        {"slash_penalty_bps": BPS_MAX + 1},
        {"quorum_fail_ratio": Ratio(0, 1)},
    ],
    ids=str,
)
def test_rules_outside_their_bounds_are_refused(changes):
    with pytest.raises(ValueError, match=r"must"):
        VerdictRules(**changes)


def test_rules_of_the_wrong_type_are_refused():
    with pytest.raises(TypeError):
        VerdictRules(verdict_window_s=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        VerdictRules(quorum_fail_ratio=0.66)  # type: ignore[arg-type]


def test_rules_facts_and_state_are_immutable():
    with pytest.raises(FrozenInstanceError):
        RULES.verdict_window_s = 1  # type: ignore[misc]
    state = with_checkers(1)
    with pytest.raises(TypeError):
        state.checkers[UUID(int=1)] = state.checkers[checker_id(0)]  # type: ignore[index]


def test_fraud_and_downtime_map_to_their_slash_and_under_spec_follows_the_rules():
    assert slash_kind_of(FailureKind.fraud, RULES) is SlashKind.fraud
    assert slash_kind_of(FailureKind.downtime, RULES) is SlashKind.downtime
    assert slash_kind_of(FailureKind.under_spec, RULES) is SlashKind.fraud
    lenient = replace(RULES, under_spec_slash_kind=SlashKind.downtime)
    assert slash_kind_of(FailureKind.under_spec, lenient) is SlashKind.downtime


def test_windows_are_aligned_on_the_epoch():
    assert window_containing(W0 + timedelta(seconds=59), RULES) == W0
    assert window_containing(W0 + timedelta(seconds=60), RULES) == W0_END
    assert window_end_of(W0, VerdictRules()) == W0 + timedelta(minutes=15)


# -- checker registration -----------------------------------------------------------------


def test_a_checker_registers_with_a_stake_at_or_above_the_minimum():
    result, facts = register_checker(
        VerdictState(), RegisterChecker(checker_id(0), ADDRESS, 100), RULES, W0
    )
    assert result is RegisterCheckerResult.ok
    assert facts == (CheckerRegistered(checker_id(0), ADDRESS, 100, W0),)


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (RegisterChecker(UUID(int=0), ADDRESS, 100), "checker_id_must_not_be_zero"),
        (RegisterChecker(CHECKERS[0], "0x1234", 100), "operator_address_malformed"),
        (RegisterChecker(CHECKERS[0], "ab" * 21, 100), "operator_address_malformed"),
        (RegisterChecker(CHECKERS[0], ADDRESS, -1), "stake_amount_must_not_be_negative"),
        (RegisterChecker(CHECKERS[0], ADDRESS, 0), "stake_amount_must_not_be_zero"),
        (RegisterChecker(CHECKERS[0], ADDRESS, 2**128), "stake_amount_exceeds_max"),
        (RegisterChecker(CHECKERS[0], ADDRESS, 99), "stake_amount_below_minimum"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_an_invalid_registration_is_refused_with_its_code(command, code):
    result, facts = register_checker(VerdictState(), command, RULES, W0)
    assert result is RegisterCheckerResult[code]
    assert facts == ()


def test_registering_again_with_the_same_fields_is_ok_and_records_nothing():
    state = with_checkers(1)
    result, facts = register_checker(
        state, RegisterChecker(checker_id(0), ADDRESS, 100), RULES, IN_GRACE
    )
    assert (result, facts) == (RegisterCheckerResult.ok, ())


def test_registering_again_with_other_fields_is_refused():
    state = with_checkers(1)
    other_address = "0x" + "cd" * 20
    assert (
        register_checker(state, RegisterChecker(checker_id(0), other_address, 100), RULES, W0)[0]
        is RegisterCheckerResult.exists_with_different_operator_address
    )
    assert (
        register_checker(state, RegisterChecker(checker_id(0), ADDRESS, 200), RULES, W0)[0]
        is RegisterCheckerResult.exists_with_different_stake_amount
    )


def test_a_registration_with_a_float_stake_is_a_type_error():
    with pytest.raises(TypeError):
        register_checker(
            VerdictState(),
            RegisterChecker(checker_id(0), ADDRESS, 100.0),  # type: ignore[arg-type]
            RULES,
            W0,
        )


# -- verdicts -----------------------------------------------------------------------------


def test_a_valid_verdict_is_recorded_with_its_fields_and_time():
    command = verdict(0)
    result, facts = submit_verdict(with_checkers(), command, RULES, IN_GRACE)
    assert result is SubmitVerdictResult.ok
    (fact,) = facts
    assert isinstance(fact, VerdictRecorded)
    assert fact.command() == command
    assert fact.recorded_at == IN_GRACE


def test_a_verdict_is_accepted_from_the_window_end_until_the_grace_elapses():
    state = with_checkers()
    assert submit_verdict(state, verdict(0), RULES, W0_END)[0] is SubmitVerdictResult.ok
    last = CLOSED - timedelta(microseconds=1)
    assert submit_verdict(state, verdict(0), RULES, last)[0] is SubmitVerdictResult.ok


ZERO = UUID(int=0)


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"verdict_id": ZERO}, "verdict_id_must_not_be_zero"),
        ({"checker_id": ZERO}, "checker_id_must_not_be_zero"),
        ({"node_id": ZERO}, "node_id_must_not_be_zero"),
        ({"provider_id": ZERO}, "provider_id_must_not_be_zero"),
        ({"window_start": W0 + timedelta(seconds=1)}, "window_start_must_be_aligned"),
        ({"window_start": W0.replace(tzinfo=None)}, "window_start_must_be_aligned"),
        ({"window_start": W0 + timedelta(microseconds=60_000_000)}, "ok"),
        (
            {"window_end": W0_END + timedelta(seconds=1)},
            "window_end_must_be_window_start_plus_window_s",
        ),
        ({"latency_ms_p99": -1}, "latency_ms_p99_must_not_be_negative"),
        ({"latency_ms_p99": LATENCY_MS_P99_MAX + 1}, "latency_ms_p99_exceeds_max"),
        ({"throughput_milli_per_s": -1}, "throughput_must_not_be_negative"),
        ({"throughput_milli_per_s": THROUGHPUT_MILLI_PER_S_MAX + 1}, "throughput_exceeds_max"),
        ({"uptime_ppm": -1}, "uptime_ppm_out_of_range"),
        ({"uptime_ppm": UPTIME_PPM_MAX + 1}, "uptime_ppm_out_of_range"),
        ({"failure_kind": FailureKind.fraud}, "failure_kind_must_be_none_when_passed"),
        ({"passed": False}, "failure_kind_must_not_be_none_when_failed"),
        ({"evidence_hash": "0f" * 31}, "evidence_hash_malformed"),
        ({"evidence_hash": "0F" * 32}, "evidence_hash_malformed"),
        ({"evidence_hash": "zz" * 32}, "evidence_hash_malformed"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_an_invalid_verdict_is_refused_with_its_code(changes, code):
    command = replace(verdict(0), **changes)
    if "window_start" in changes and code == "ok":
        command = replace(command, window_end=window_end_of(command.window_start, RULES))
    now = command.window_end + timedelta(seconds=1) if code == "ok" else IN_GRACE
    result, facts = submit_verdict(with_checkers(), command, RULES, now)
    assert result is SubmitVerdictResult[code]
    assert (facts == ()) is (code != "ok")


def test_a_verdict_for_a_window_not_yet_ended_is_refused():
    state = with_checkers()
    for now in (W0, W0_END - timedelta(seconds=1), W0 - timedelta(days=1)):
        result, facts = submit_verdict(state, verdict(0), RULES, now)
        assert (result, facts) == (SubmitVerdictResult.window_must_have_ended, ())


def test_a_verdict_from_an_unregistered_checker_is_refused():
    result, facts = submit_verdict(with_checkers(1), verdict(3), RULES, IN_GRACE)
    assert (result, facts) == (SubmitVerdictResult.verdict_from_unregistered_checker, ())


def test_a_verdict_after_the_window_closed_is_refused():
    result, facts = submit_verdict(with_checkers(), verdict(0), RULES, CLOSED)
    assert (result, facts) == (SubmitVerdictResult.window_closed, ())


def test_a_retry_with_the_same_id_and_fields_is_ok_and_records_nothing_even_when_closed():
    command = verdict(0)
    state = voted(command)
    assert submit_verdict(state, command, RULES, IN_GRACE) == (SubmitVerdictResult.ok, ())
    assert submit_verdict(state, command, RULES, CLOSED) == (SubmitVerdictResult.ok, ())


def test_the_same_id_with_other_fields_is_refused():
    command = verdict(0)
    state = voted(command)
    result, facts = submit_verdict(state, replace(command, uptime_ppm=5), RULES, IN_GRACE)
    assert (result, facts) == (SubmitVerdictResult.exists_with_different_fields, ())


def test_a_checker_gives_one_verdict_per_node_per_window():
    state = voted(verdict(0))
    result, facts = submit_verdict(state, verdict(0, passed=False), RULES, IN_GRACE)
    assert (result, facts) == (SubmitVerdictResult.verdict_exists_for_checker_node_window, ())
    other_node = verdict(0, node_id=UUID(int=0xA2))
    assert submit_verdict(state, other_node, RULES, IN_GRACE)[0] is SubmitVerdictResult.ok
    next_window = verdict(0, window_start=W0_END)
    later = W0_END + timedelta(seconds=WINDOW_S + 1)
    assert submit_verdict(state, next_window, RULES, later)[0] is SubmitVerdictResult.ok


def test_verdicts_of_one_node_window_must_name_the_same_provider():
    state = voted(verdict(0))
    result, facts = submit_verdict(state, verdict(1, provider_id=OTHER_PROVIDER), RULES, IN_GRACE)
    assert (result, facts) == (SubmitVerdictResult.provider_differs_from_earlier_verdicts, ())


def test_a_window_holds_a_bounded_number_of_verdicts():
    state = VerdictState()
    facts: list[Fact] = []
    for i in range(VERDICTS_PER_WINDOW_MAX + 1):
        checker = UUID(int=0xD000 + i)
        facts.append(CheckerRegistered(checker, ADDRESS, 100, W0))
    state = apply_all(state, facts)
    for i in range(VERDICTS_PER_WINDOW_MAX):
        command = replace(verdict(0), checker_id=UUID(int=0xD000 + i))
        state = submit(state, command)
    last = replace(verdict(0), checker_id=UUID(int=0xD000 + VERDICTS_PER_WINDOW_MAX))
    result, facts_ = submit_verdict(state, last, RULES, IN_GRACE)
    assert (result, facts_) == (SubmitVerdictResult.verdicts_per_window_exceed_max, ())


def test_a_verdict_with_a_float_or_a_non_bool_is_a_type_error():
    with pytest.raises(TypeError):
        submit_verdict(with_checkers(), replace(verdict(0), uptime_ppm=1.0), RULES, IN_GRACE)
    with pytest.raises(TypeError):
        submit_verdict(with_checkers(), replace(verdict(0), passed=1), RULES, IN_GRACE)


# -- quorum -------------------------------------------------------------------------------


def test_a_window_is_decided_only_once_it_closed():
    state = voted(verdict(0), verdict(1), verdict(2))
    result, facts = decide_window(state, NODE, W0, RULES, CLOSED - timedelta(microseconds=1))
    assert (result, facts) == (DecideWindowResult.window_not_closed, ())
    assert decide_window(state, NODE, W0, RULES, CLOSED)[0] is DecideWindowResult.ok


def test_deciding_an_unaligned_window_is_refused():
    state = voted(verdict(0))
    result, facts = decide_window(state, NODE, W0 + timedelta(seconds=1), RULES, CLOSED)
    assert (result, facts) == (DecideWindowResult.window_start_must_be_aligned, ())


def test_a_window_without_verdicts_has_nothing_to_decide():
    assert decide(with_checkers()) == (DecideWindowResult.no_verdicts_for_window, ())


def test_too_few_checkers_do_not_reach_a_quorum_and_nobody_is_contradicted():
    state = voted(verdict(0, passed=False), verdict(1, passed=False))
    result, facts = decide(state)
    assert result is DecideWindowResult.ok
    (fact,) = facts
    assert isinstance(fact, QuorumNotReached)
    assert fact.checker_ids == (checker_id(0), checker_id(1))
    assert fact.verdicts_count == 2


def test_a_quorum_of_passing_verdicts_passes_and_records_the_medians():
    state = voted(
        verdict(0, uptime_ppm=900_000, latency_ms_p99=300),
        verdict(1, uptime_ppm=1_000_000, latency_ms_p99=100),
        verdict(2, uptime_ppm=950_000, latency_ms_p99=200),
        verdict(3, uptime_ppm=10, latency_ms_p99=9_000),
    )
    result, facts = decide(state)
    assert result is DecideWindowResult.ok
    (fact,) = facts
    assert isinstance(fact, QuorumPassed)
    assert fact.agreeing_checker_ids == CHECKERS[:4]
    assert fact.contradicting_checker_ids == ()
    assert fact.uptime_ppm_median == 900_000
    assert fact.latency_ms_p99_median == 200
    assert fact.provider_id == PROVIDER
    assert fact.window_end == W0_END


def test_two_of_three_failing_verdicts_fail_the_window_and_the_passing_checker_is_contradicted():
    v0, v1, v2 = verdict(0, passed=False), verdict(1), verdict(2, passed=False)
    state = voted(v0, v1, v2)
    result, facts = decide(state)
    assert result is DecideWindowResult.ok
    failed, contradicted = facts
    assert isinstance(failed, QuorumFailed)
    assert failed.kind is FailureKind.downtime
    assert failed.slash_kind is SlashKind.downtime
    assert failed.failing_checker_ids == (checker_id(0), checker_id(2))
    assert failed.agreeing_checker_ids == failed.failing_checker_ids
    assert failed.contradicting_checker_ids == (checker_id(1),)
    assert contradicted == CheckerContradicted(
        checker_id(1), v1.verdict_id, NODE, W0, verdict_passed=True, decided_at=CLOSED
    )


def test_one_failing_verdict_of_three_passes_the_window_and_the_failing_checker_is_contradicted():
    v0 = verdict(0, passed=False, kind=FailureKind.fraud)
    state = voted(v0, verdict(1), verdict(2))
    _, facts = decide(state)
    passed, contradicted = facts
    assert isinstance(passed, QuorumPassed)
    assert passed.failing_checker_ids == (checker_id(0),)
    assert passed.contradicting_checker_ids == (checker_id(0),)
    assert passed.agreeing_checker_ids == (checker_id(1), checker_id(2))
    assert isinstance(contradicted, CheckerContradicted)
    assert contradicted.verdict_id == v0.verdict_id
    assert contradicted.verdict_passed is False


@pytest.mark.parametrize(
    ("kinds", "expected", "slash_kind"),
    [
        (
            (FailureKind.downtime, FailureKind.under_spec, FailureKind.downtime),
            "under_spec",
            "fraud",
        ),
        ((FailureKind.downtime, FailureKind.fraud, FailureKind.under_spec), "fraud", "fraud"),
        (
            (FailureKind.downtime, FailureKind.downtime, FailureKind.downtime),
            "downtime",
            "downtime",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_a_failed_quorum_takes_the_most_severe_failure_kind(kinds, expected, slash_kind):
    state = voted(*(verdict(i, passed=False, kind=k) for i, k in enumerate(kinds)))
    _, (failed,) = decide(state)
    assert isinstance(failed, QuorumFailed)
    assert failed.kind is FailureKind[expected]
    assert failed.slash_kind is SlashKind[slash_kind]


def test_deciding_a_window_twice_is_a_no_op_with_its_code():
    state = voted(verdict(0), verdict(1), verdict(2))
    result, facts = decide(state)
    assert result is DecideWindowResult.ok
    state = apply_all(state, facts)
    assert decide(state) == (DecideWindowResult.window_already_decided, ())
    assert state.decisions[(NODE, W0)] == facts[0]


def test_agreeing_and_contradicting_checkers_are_counted_in_the_state():
    state = voted(verdict(0, passed=False), verdict(1), verdict(2), verdict(3))
    state = apply_all(state, decide(state)[1])
    assert state.agreed_counts == {checker_id(1): 1, checker_id(2): 1, checker_id(3): 1}
    assert state.contradicted_counts == {checker_id(0): 1}


def test_a_failed_quorum_feeds_the_stake_slash():
    from domain.stake import ProviderStake, SlashResult, StakeRules, bond, slash
    from domain.stake import apply as apply_stake

    state = voted(*(verdict(i, passed=False, kind=FailureKind.fraud) for i in range(3)))
    _, (failed,) = decide(state)
    assert isinstance(failed, QuorumFailed)
    rules = StakeRules(stake_per_gpu={"H100": 300})
    stake = ProviderStake(PROVIDER)
    stake = apply_stake(stake, bond(stake, 1_000, W0)[1][0])
    result, (slashed,) = slash(
        stake,
        rules,
        kind=failed.slash_kind,
        gpu_model="H100",
        gpu_count=1,
        offence_at=failed.window_start,
        now=failed.decided_at,
    )
    assert result is SlashResult.ok
    assert isinstance(slashed, StakeSlashed)
    assert slashed.amount == 300


# -- reputation ---------------------------------------------------------------------------


def passed_window(i: int, uptime_ppm: int = UPTIME_PPM_MAX, latency: int = 100) -> QuorumPassed:
    start = W0 + timedelta(seconds=WINDOW_S * i)
    return QuorumPassed(
        NODE, PROVIDER, start, window_end_of(start, RULES), 3, (), CHECKERS[:3], (),
        uptime_ppm, latency, start,
    )  # fmt: skip


def failed_window(i: int, uptime_ppm: int = 0, latency: int = 100) -> QuorumFailed:
    start = W0 + timedelta(seconds=WINDOW_S * i)
    return QuorumFailed(
        NODE, PROVIDER, start, window_end_of(start, RULES), 3, FailureKind.downtime,
        SlashKind.downtime, CHECKERS[:3], CHECKERS[:3], (), uptime_ppm, latency, start,
    )  # fmt: skip


def stake_slash(at: datetime, provider_id: UUID = PROVIDER) -> StakeSlashed:
    return StakeSlashed(provider_id, SlashKind.downtime, "H100", 1, 100, 100, 100, (), at, at)


def test_a_new_provider_has_only_its_age_bonus():
    score = reputation(ProviderHistory(PROVIDER, W0), W0 + timedelta(days=15), RULES)
    assert score.windows_decided_count == 0
    assert score.uptime_points_bps == score.pass_points_bps == score.latency_points_bps == 0
    assert score.age_days == 15
    assert score.age_points_bps == 500
    assert score.score_bps == 500


def test_a_perfect_old_provider_scores_the_maximum():
    history = ProviderHistory(PROVIDER, W0, tuple(passed_window(i) for i in range(4)))
    score = reputation(history, W0 + timedelta(days=365), RULES)
    assert score.score_bps == BPS_MAX
    assert (score.uptime_points_bps, score.pass_points_bps) == (4_000, 3_000)
    assert (score.latency_points_bps, score.age_points_bps) == (2_000, 1_000)


def test_each_reputation_component_follows_the_documented_formula():
    decisions = (
        passed_window(0, uptime_ppm=1_000_000, latency=400),
        passed_window(1, uptime_ppm=800_000, latency=600),
        failed_window(2, uptime_ppm=300_000, latency=500),
        QuorumNotReached(NODE, PROVIDER, W0, W0_END, 1, (CHECKERS[0],), W0),
    )
    now = W0 + timedelta(days=3, hours=5)
    slashes = (stake_slash(now), stake_slash(now - timedelta(days=15)))
    score = reputation(ProviderHistory(PROVIDER, W0, decisions, slashes), now, RULES)
    assert score.windows_decided_count == 3
    assert score.windows_passed_count == 2
    assert score.uptime_ppm_mean == 700_000
    assert score.uptime_points_bps == 4_000 * 700_000 // 1_000_000
    assert score.pass_points_bps == 3_000 * 2 // 3
    assert score.latency_ms_p99_mean == 500
    assert score.latency_points_bps == 2_000 * 250 // 500
    assert score.age_days == 3
    assert score.age_points_bps == 1_000 * 3 // 30
    assert score.slashes_count == 2
    assert score.slash_penalty_bps == 2_500 + 2_500 // 2
    positive = 2_800 + 2_000 + 1_000 + 100
    assert score.score_bps == positive - 3_750


def test_a_slash_penalty_decays_to_nothing_and_never_decays_when_decay_is_off():
    history = ProviderHistory(PROVIDER, W0, (), (stake_slash(W0),))
    later = W0 + timedelta(days=40)
    assert reputation(history, later, RULES).slash_penalty_bps == 0
    no_decay = replace(RULES, slash_penalty_decay_s=0)
    assert reputation(history, later, no_decay).slash_penalty_bps == 2_500


def test_reputation_never_goes_below_zero_and_ignores_other_providers_facts():
    slashes = tuple(stake_slash(W0) for _ in range(10))
    others = (stake_slash(W0, OTHER_PROVIDER),)
    history = ProviderHistory(PROVIDER, W0, (passed_window(0),), slashes + others)
    score = reputation(history, W0, RULES)
    assert score.score_bps == 0
    assert score.slashes_count == 10


# -- properties ---------------------------------------------------------------------------

vote = st.tuples(
    st.integers(0, 5),  # checker
    st.booleans(),  # passed
    st.sampled_from([FailureKind.downtime, FailureKind.under_spec, FailureKind.fraud]),
    st.integers(0, UPTIME_PPM_MAX),
    st.integers(0, 2_000),
)


def cast_votes(votes: list[tuple[int, bool, FailureKind, int, int]], window: int = 0):
    """Submit each vote (refusals skipped); return the state and the facts recorded."""
    facts: list[Fact] = [CheckerRegistered(checker_id(i), ADDRESS, 100, W0) for i in range(6)]
    state = replay(facts)
    start = W0 + timedelta(seconds=2 * WINDOW_S * window)
    for checker, passed, kind, uptime, latency in votes:
        command = verdict(
            checker,
            passed=passed,
            kind=None if passed else kind,
            window_start=start,
            uptime_ppm=uptime,
            latency_ms_p99=latency,
        )
        result, new = submit_verdict(state, command, RULES, window_end_of(start, RULES))
        assert result in (
            SubmitVerdictResult.ok,
            SubmitVerdictResult.verdict_exists_for_checker_node_window,
        )
        state = apply_all(state, new)
        facts.extend(new)
    return state, facts


@settings(max_examples=150, deadline=None)
@given(st.lists(vote, max_size=12))
def test_a_quorum_counts_each_checker_once_and_fails_only_at_the_fail_ratio(votes):
    state, _ = cast_votes(votes)
    first: dict[int, bool] = {}
    for checker, passed, *_ in votes:
        first.setdefault(checker, passed)
    result, facts = decide(state)
    if not first:
        assert result is DecideWindowResult.no_verdicts_for_window
        return
    (decision, *contradictions) = facts
    assert decision.verdicts_count == len(first)
    failing = sum(1 for p in first.values() if not p)
    if len(first) < RULES.quorum_checkers_min:
        assert isinstance(decision, QuorumNotReached)
        assert contradictions == []
    elif 3 * failing >= 2 * len(first):
        assert isinstance(decision, QuorumFailed)
        assert len(decision.failing_checker_ids) == failing
        assert len(contradictions) == len(first) - failing
    else:
        assert isinstance(decision, QuorumPassed)
        assert len(contradictions) == failing
    if not isinstance(decision, QuorumNotReached):
        everyone = decision.agreeing_checker_ids + decision.contradicting_checker_ids
        assert sorted(everyone) == sorted(checker_id(c) for c in first)


@settings(max_examples=100, deadline=None)
@given(st.lists(vote, max_size=8), st.integers(1, 4))
def test_each_window_is_decided_at_most_once_and_replay_equals_live_state(votes, attempts):
    state, facts = cast_votes(votes)
    decided = 0
    for _ in range(attempts):
        result, new = decide(state)
        decided += result is DecideWindowResult.ok
        state = apply_all(state, new)
        facts.extend(new)
        for fact in new:
            assert not isinstance(fact, VerdictRecorded)
    assert decided == (1 if votes else 0)
    assert len(state.decisions) == decided
    assert replay(facts) == state
    one_by_one = VerdictState()
    for fact in facts:
        one_by_one = apply(one_by_one, fact)
    assert one_by_one == state


decision_st = st.builds(
    lambda i, passed, uptime, latency: (
        passed_window(i, uptime, latency) if passed else failed_window(i, uptime, latency)
    ),
    st.integers(0, 50),
    st.booleans(),
    st.integers(0, UPTIME_PPM_MAX),
    st.integers(0, LATENCY_MS_P99_MAX),
)
history_st = st.builds(
    lambda decisions, slash_ages, age_s: ProviderHistory(
        PROVIDER,
        W0 - timedelta(seconds=age_s),
        tuple(decisions),
        tuple(stake_slash(W0 - timedelta(seconds=s)) for s in slash_ages),
    ),
    st.lists(decision_st, max_size=10),
    st.lists(st.integers(-1_000, 60 * 86_400), max_size=5),
    st.integers(-86_400, 400 * 86_400),
)


@settings(max_examples=200, deadline=None)
@given(history_st, st.randoms(use_true_random=False))
def test_reputation_is_bounded_and_independent_of_fact_order(history, rnd):
    score = reputation(history, W0, RULES)
    assert 0 <= score.score_bps <= BPS_MAX
    decisions, slashes = list(history.decisions), list(history.slashes)
    rnd.shuffle(decisions)
    rnd.shuffle(slashes)
    shuffled = replace(history, decisions=tuple(decisions), slashes=tuple(slashes))
    assert reputation(shuffled, W0, RULES) == score


@settings(max_examples=50, deadline=None)
@given(st.lists(history_st, min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_reputations_of_independent_providers_do_not_depend_on_their_order(histories, rnd):
    histories = [replace(h, provider_id=UUID(int=0xB000 + i)) for i, h in enumerate(histories)]
    histories = [
        replace(
            h,
            decisions=tuple(replace(d, provider_id=h.provider_id) for d in h.decisions),
            slashes=tuple(replace(s, provider_id=h.provider_id) for s in h.slashes),
        )
        for h in histories
    ]
    scores = reputations(histories, W0, RULES)
    rnd.shuffle(histories)
    assert reputations(histories, W0, RULES) == scores
    assert list(scores) == sorted(scores)


@settings(max_examples=200, deadline=None)
@given(history_st, st.integers(-1_000, 60 * 86_400))
def test_adding_a_slash_never_raises_reputation(history, slash_age_s):
    before = reputation(history, W0, RULES).score_bps
    slashed = replace(
        history, slashes=(*history.slashes, stake_slash(W0 - timedelta(seconds=slash_age_s)))
    )
    assert reputation(slashed, W0, RULES).score_bps <= before


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.lists(vote, min_size=1, max_size=6), min_size=1, max_size=4),
    st.data(),
)
def test_a_passing_verdict_turning_failing_never_raises_reputation(windows, data):
    def score_of(windows_votes):
        decisions = []
        for w, votes in enumerate(windows_votes):
            state, _ = cast_votes(votes, window=w)
            start = W0 + timedelta(seconds=2 * WINDOW_S * w)
            result, facts = decide(state, NODE, start)
            assert result is DecideWindowResult.ok
            decisions.append(facts[0])
        history = ProviderHistory(PROVIDER, W0 - timedelta(days=5), tuple(decisions))
        return reputation(history, W0, RULES).score_bps

    passing = [(w, i) for w, votes in enumerate(windows) for i, v in enumerate(votes) if v[1]]
    if not passing:
        return
    w, i = data.draw(st.sampled_from(passing))
    flipped = [list(votes) for votes in windows]
    checker, _, kind, uptime, latency = flipped[w][i]
    flipped[w][i] = (checker, False, kind, uptime, latency)
    assert score_of(flipped) <= score_of(windows)


def test_replay_of_a_shuffled_log_of_independent_nodes_gives_the_same_decisions():
    rng = random.Random(7)
    base = with_checkers(4)
    per_node: list[list[Fact]] = []
    for n in range(3):
        node = UUID(int=0xE00 + n)
        state = base
        facts: list[Fact] = []
        for c in range(4):
            command = verdict(c, node_id=node, passed=rng.random() < 0.5)
            result, new = submit_verdict(state, command, RULES, IN_GRACE)
            assert result is SubmitVerdictResult.ok
            state = apply_all(state, new)
            facts.extend(new)
        result, new = decide(state, node)
        facts.extend(new)
        per_node.append(facts)
    registrations = [CheckerRegistered(checker_id(i), ADDRESS, 100, W0) for i in range(4)]
    forward = replay([*registrations, *(f for facts in per_node for f in facts)])
    backward = replay([*registrations, *(f for facts in reversed(per_node) for f in facts)])
    assert dict(forward.decisions) == dict(backward.decisions)
    assert dict(forward.contradicted_counts) == dict(backward.contradicted_counts)
