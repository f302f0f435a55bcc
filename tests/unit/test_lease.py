"""Unit tests of the pure lease rules (`domain.lease`). No database, no clock.

Every result code has a test asserting the exact code; a refusal returns no facts (except
`escrow_exhausted`, which comes with the facts of the charge and of the pause or close).
Property tests drive random sequences of heartbeats (with gaps, duplicates, reordering and
skew), downtime checks, usage charges, top-ups, time moves and closes, and check the escrow,
downtime and replay invariants after every step.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid5

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.lease import (
    DEMO_LEASE_RULES,
    ESCROW_MAX,
    HEARTBEAT_SEQUENCE_MAX,
    LEASE_DURATION_S_MAX,
    LEASE_ID_NAMESPACE,
    PROTOCOL_ID,
    USAGE_REF_LENGTH_MAX,
    ChargeUsageResult,
    CloseReason,
    CloseResult,
    DetectDowntimeResult,
    DowntimeDetected,
    EscrowExhaustedAction,
    EscrowToppedUp,
    HeartbeatRecorded,
    Lease,
    LeaseClosed,
    LeaseFact,
    LeaseOpened,
    LeasePaused,
    LeaseResumed,
    LeaseRules,
    LeaseStatus,
    OpenLeaseResult,
    RecordHeartbeatResult,
    TopUpResult,
    UsageCharged,
    apply,
    charge_usage,
    close,
    close_due,
    detect_downtime,
    lease_id_for,
    open_lease,
    record_heartbeat,
    replay,
    top_up,
)
from domain.orderbook import DURATION_S_MAX, GPU_COUNT_MAX, PRICE_MAX, OrderMatched, lease_cost

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ASK = UUID(int=0xA5)
BID = UUID(int=0xB1)
PROVIDER = UUID(int=0xA1)
NODE = UUID(int=0xA0)
OTHER_NODE = UUID(int=0xA9)
CONSUMER = UUID(int=0xC1)
STRANGER = UUID(int=0xEE)
ZERO = UUID(int=0)

MATCH = OrderMatched(
    ask_id=ASK,
    bid_id=BID,
    provider_id=PROVIDER,
    node_id=NODE,
    consumer_id=CONSUMER,
    gpu_model="H100",
    gpu_count=2,
    price_per_gpu_hour=3_600,
    duration_s=600,
    escrow_amount=1_200,
    matched_at=T0,
)
"""2 GPUs at 3600 per GPU-hour: the lease costs 2 units a second; 600 s = 1200 units."""

RULES = LeaseRules(heartbeat_interval_s=10, heartbeat_future_tolerance_s=5, escrow_grace_s=60)
"""Timeout 30 s (3 x 10 s); a paused lease waits 60 s."""
CLOSING = replace(RULES, on_escrow_exhausted=EscrowExhaustedAction.close)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def step(lease: Lease | None, outcome: tuple[object, tuple[LeaseFact, ...]]) -> Lease:
    _, facts = outcome
    assert facts, "the decision recorded nothing"
    for fact in facts:
        lease = apply(lease, fact)
    assert lease is not None
    return lease


def opened(match: OrderMatched = MATCH, now: datetime = T0) -> Lease:
    return step(None, open_lease(match, now))


LEASE = opened()


def beat(lease: Lease, sequence: int, seconds: int, now_s: int | None = None) -> Lease:
    now = at(seconds if now_s is None else now_s)
    return step(lease, record_heartbeat(lease, NODE, sequence, at(seconds), now, RULES))


def closed(lease: Lease = LEASE) -> Lease:
    return step(lease, close(lease, CloseReason.consumer, CONSUMER, at(10), RULES))


def paused() -> Lease:
    """LEASE with its escrow used up by one charge at 100 s, paused until 160 s."""
    return step(LEASE, charge_usage(LEASE, 1_200, "u-all", at(100), RULES))


# -- ids and rules ------------------------------------------------------------------------


def test_the_lease_id_is_the_uuid5_of_the_ask_and_bid_ids():
    assert lease_id_for(ASK, BID) == uuid5(LEASE_ID_NAMESPACE, f"{ASK}:{BID}")
    assert lease_id_for(ASK, BID) == lease_id_for(ASK, BID)
    assert lease_id_for(ASK, BID) != lease_id_for(BID, ASK)
    assert LEASE.id == lease_id_for(ASK, BID)


def test_the_lease_id_namespace_never_changes():
    assert UUID("159d28d8-ee20-58ec-abe7-bdd76150f020") == LEASE_ID_NAMESPACE


def test_the_heartbeat_timeout_defaults_to_three_intervals_of_sixty_seconds():
    assert LeaseRules().heartbeat_interval_s == 60
    assert LeaseRules().heartbeat_timeout_s == 180
    assert LeaseRules(heartbeat_interval_s=5).heartbeat_timeout_s == 15
    assert LeaseRules(heartbeat_interval_s=5, heartbeat_timeout_s=7).heartbeat_timeout_s == 7


def test_demo_rules_show_downtime_and_grace_within_a_minute():
    assert DEMO_LEASE_RULES.heartbeat_timeout_s <= 60
    assert DEMO_LEASE_RULES.escrow_grace_s <= 60


@pytest.mark.parametrize(
    "fields",
    [
        {"heartbeat_interval_s": 0},
        {"heartbeat_interval_s": 3_601},
        {"heartbeat_interval_s": 60, "heartbeat_timeout_s": 59},
        {"heartbeat_timeout_s": 24 * 3_600 + 1},
        {"heartbeat_future_tolerance_s": -1},
        {"heartbeat_future_tolerance_s": 301},
        {"escrow_grace_s": -1},
        {"escrow_grace_s": 7 * 24 * 3_600 + 1},
    ],
)
def test_rules_out_of_their_limits_are_refused_at_construction(fields):
    with pytest.raises(ValueError, match="must be within"):
        LeaseRules(**fields)


def test_rules_with_a_float_or_a_wrong_action_are_a_type_error():
    with pytest.raises(TypeError):
        LeaseRules(heartbeat_interval_s=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        LeaseRules(on_escrow_exhausted=2)  # type: ignore[arg-type]


def test_a_lease_is_immutable():
    with pytest.raises(FrozenInstanceError):
        LEASE.escrow_held = 0  # type: ignore[misc]


# -- open_lease ---------------------------------------------------------------------------


def test_a_lease_opens_from_a_match_at_the_ask_price_with_the_match_escrow_held():
    result, facts = open_lease(MATCH, at(5))
    assert result is OpenLeaseResult.ok
    assert facts == (
        LeaseOpened(
            lease_id=lease_id_for(ASK, BID),
            ask_id=ASK,
            bid_id=BID,
            provider_id=PROVIDER,
            node_id=NODE,
            consumer_id=CONSUMER,
            gpu_model="H100",
            gpu_count=2,
            price_per_gpu_hour=3_600,
            duration_s=600,
            escrow_amount=1_200,
            opened_at=at(5),
            ends_at=at(605),
        ),
    )
    lease = step(None, (result, facts))
    assert lease.status is LeaseStatus.open
    assert (lease.escrow_held, lease.escrow_charged, lease.escrow_released) == (1_200, 0, 0)
    assert lease.escrow_available == 1_200
    assert lease.heartbeat_sequence == 0 and lease.last_heartbeat_at is None
    assert lease.alive_at == at(5) and lease.downtime_s == 0


def test_a_lease_never_opens_before_its_match():
    lease = opened(replace(MATCH, matched_at=at(50)), now=at(10))
    assert lease.opened_at == at(50) and lease.ends_at == at(650)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"ask_id": ZERO}, OpenLeaseResult.ids_must_not_be_zero),
        ({"bid_id": ZERO}, OpenLeaseResult.ids_must_not_be_zero),
        ({"provider_id": ZERO}, OpenLeaseResult.ids_must_not_be_zero),
        ({"node_id": ZERO}, OpenLeaseResult.ids_must_not_be_zero),
        ({"consumer_id": ZERO}, OpenLeaseResult.ids_must_not_be_zero),
        ({"gpu_count": 0}, OpenLeaseResult.gpu_count_must_be_positive),
        ({"gpu_count": GPU_COUNT_MAX + 1}, OpenLeaseResult.gpu_count_exceeds_max),
        ({"price_per_gpu_hour": 0}, OpenLeaseResult.price_must_be_positive),
        ({"price_per_gpu_hour": PRICE_MAX + 1}, OpenLeaseResult.price_exceeds_max),
        ({"duration_s": 0}, OpenLeaseResult.duration_must_be_positive),
        ({"duration_s": DURATION_S_MAX + 1}, OpenLeaseResult.duration_exceeds_max),
        ({"escrow_amount": 1_199}, OpenLeaseResult.escrow_below_cost),
        ({"escrow_amount": ESCROW_MAX + 1}, OpenLeaseResult.escrow_exceeds_max),
    ],
)
def test_a_match_that_breaks_a_rule_opens_no_lease(fields, code):
    assert open_lease(replace(MATCH, **fields), T0) == (code, ())


def test_a_match_with_a_float_amount_is_a_type_error():
    with pytest.raises(TypeError, match="escrow_amount"):
        open_lease(replace(MATCH, escrow_amount=1_200.0), T0)


# -- top_up -------------------------------------------------------------------------------


def test_a_top_up_extends_the_lease_by_the_whole_seconds_it_buys_at_the_lease_price():
    # 2 units a second: 101 units buy 50 s; the odd unit stays in escrow.
    result, facts = top_up(LEASE, 101, at(10))
    assert result is TopUpResult.ok
    assert facts == (EscrowToppedUp(LEASE.id, 101, 50, at(650), at(10)),)
    lease = step(LEASE, (result, facts))
    assert lease.escrow_held == 1_301 and lease.ends_at == at(650)
    assert lease_cost(2, 3_600, 50) <= 101


def test_a_top_up_too_small_to_buy_a_second_adds_escrow_only():
    lease = step(LEASE, top_up(LEASE, 1, at(10)))
    assert lease.escrow_held == 1_201 and lease.ends_at == LEASE.ends_at


def test_a_top_up_resumes_a_paused_lease():
    lease = paused()
    result, facts = top_up(lease, 10, at(120))
    assert result is TopUpResult.ok
    assert facts[1:] == (LeaseResumed(lease.id, at(120)),)
    lease = step(lease, (result, facts))
    assert lease.status is LeaseStatus.open and lease.grace_ends_at is None
    assert lease.escrow_available == 10


@pytest.mark.parametrize(
    ("lease", "amount", "now_s", "code"),
    [
        (LEASE, -1, 10, TopUpResult.amount_must_not_be_negative),
        (LEASE, 0, 10, TopUpResult.amount_must_not_be_zero),
        (LEASE, ESCROW_MAX + 1, 10, TopUpResult.amount_exceeds_max),
        (closed(), 10, 20, TopUpResult.lease_already_closed),
        (LEASE, 10, 600, TopUpResult.lease_expired),
        (LEASE, ESCROW_MAX, 10, TopUpResult.escrow_held_exceeds_max),
        (LEASE, (LEASE_DURATION_S_MAX - 599) * 2, 10, TopUpResult.lease_duration_exceeds_max),
    ],
)
def test_a_top_up_that_breaks_a_rule_records_nothing(lease, amount, now_s, code):
    assert top_up(lease, amount, at(now_s)) == (code, ())


def test_a_top_up_up_to_the_longest_lease_is_accepted():
    result, _ = top_up(LEASE, (LEASE_DURATION_S_MAX - 600) * 2, at(10))
    assert result is TopUpResult.ok


# -- record_heartbeat ---------------------------------------------------------------------


def test_a_heartbeat_from_the_lease_node_is_recorded():
    result, facts = record_heartbeat(LEASE, NODE, 1, at(9), at(10), RULES)
    assert result is RecordHeartbeatResult.ok
    assert facts == (HeartbeatRecorded(LEASE.id, NODE, 1, at(9), at(10), 0),)
    lease = step(LEASE, (result, facts))
    assert lease.heartbeat_sequence == 1 and lease.last_heartbeat_at == at(9)
    assert lease.alive_at == at(9)


def test_heartbeat_sequences_may_skip_numbers():
    lease = beat(beat(LEASE, 1, 10), 5, 20)
    assert lease.heartbeat_sequence == 5


def test_a_heartbeat_within_the_future_tolerance_is_recorded():
    result, _ = record_heartbeat(LEASE, NODE, 1, at(15), at(10), RULES)
    assert result is RecordHeartbeatResult.ok


def test_a_paused_lease_still_records_heartbeats():
    lease = paused()
    assert beat(lease, 1, 110).heartbeat_sequence == 1


@pytest.mark.parametrize(
    ("node", "sequence", "at_s", "now_s", "code"),
    [
        (NODE, 0, 20, 20, RecordHeartbeatResult.sequence_must_be_positive),
        (NODE, HEARTBEAT_SEQUENCE_MAX + 1, 20, 20, RecordHeartbeatResult.sequence_exceeds_max),
        (OTHER_NODE, 3, 20, 20, RecordHeartbeatResult.node_must_be_lease_node),
        (NODE, 3, -1, 20, RecordHeartbeatResult.heartbeat_must_not_be_before_lease_opened),
        (NODE, 3, 26, 20, RecordHeartbeatResult.heartbeat_must_not_be_in_the_future),
        (NODE, 2, 20, 20, RecordHeartbeatResult.sequence_already_recorded),
        (NODE, 1, 20, 20, RecordHeartbeatResult.sequence_out_of_order),
        (NODE, 3, 14, 20, RecordHeartbeatResult.heartbeat_must_not_go_back_in_time),
    ],
)
def test_a_heartbeat_that_breaks_a_rule_records_nothing(node, sequence, at_s, now_s, code):
    lease = beat(LEASE, 2, 15)
    assert record_heartbeat(lease, node, sequence, at(at_s), at(now_s), RULES) == (code, ())


def test_a_heartbeat_on_a_closed_lease_is_refused():
    result = record_heartbeat(closed(), NODE, 1, at(20), at(20), RULES)
    assert result == (RecordHeartbeatResult.lease_already_closed, ())


def test_a_late_heartbeat_after_an_undetected_gap_records_the_gap_first():
    lease = beat(LEASE, 1, 10)
    result, facts = record_heartbeat(lease, NODE, 2, at(55), at(56), RULES)
    assert result is RecordHeartbeatResult.ok
    assert facts == (
        DowntimeDetected(lease.id, at(10), at(55), 45),
        HeartbeatRecorded(lease.id, NODE, 2, at(55), at(56), 0),
    )
    lease = step(lease, (result, facts))
    assert lease.downtime_s == 45 and not lease.downtime_open


def test_a_heartbeat_after_a_detected_gap_counts_the_rest_of_the_gap():
    lease = beat(LEASE, 1, 10)
    lease = step(lease, detect_downtime(lease, at(41), RULES))
    assert lease.downtime_s == 31 and lease.downtime_open
    result, facts = record_heartbeat(lease, NODE, 2, at(70), at(71), RULES)
    assert facts == (HeartbeatRecorded(lease.id, NODE, 2, at(70), at(71), 29),)
    lease = step(lease, (result, facts))
    assert lease.downtime_s == 60 and not lease.downtime_open


def test_a_heartbeat_sent_before_the_gap_was_detected_counts_no_more_downtime():
    lease = step(LEASE, detect_downtime(LEASE, at(40), RULES))
    _, facts = record_heartbeat(lease, NODE, 1, at(35), at(45), RULES)
    assert facts == (HeartbeatRecorded(lease.id, NODE, 1, at(35), at(45), 0),)
    lease = step(lease, (RecordHeartbeatResult.ok, facts))
    # The next gap is measured from the end of the counted downtime, never overlapping it.
    assert lease.alive_at == at(40)


# -- detect_downtime ----------------------------------------------------------------------


def test_downtime_is_detected_after_the_timeout_without_a_heartbeat():
    lease = beat(LEASE, 1, 10)
    assert detect_downtime(lease, at(40), RULES) == (DetectDowntimeResult.heartbeat_not_overdue, ())
    result, facts = detect_downtime(lease, at(41), RULES)
    assert result is DetectDowntimeResult.ok
    assert facts == (DowntimeDetected(lease.id, at(10), at(41), 31),)


def test_downtime_is_measured_from_the_open_before_the_first_heartbeat():
    _, facts = detect_downtime(LEASE, at(31), RULES)
    assert facts == (DowntimeDetected(LEASE.id, T0, at(31), 31),)


def test_a_gap_is_detected_only_once():
    lease = step(LEASE, detect_downtime(LEASE, at(31), RULES))
    assert detect_downtime(lease, at(500), RULES) == (
        DetectDowntimeResult.downtime_already_detected,
        (),
    )
    # A heartbeat ends the gap; the next gap is a new one.
    lease = beat(lease, 1, 100)
    assert detect_downtime(lease, at(130), RULES)[0] is DetectDowntimeResult.heartbeat_not_overdue
    assert detect_downtime(lease, at(131), RULES)[0] is DetectDowntimeResult.ok


def test_downtime_is_not_detected_on_a_closed_lease():
    assert detect_downtime(closed(), at(500), RULES) == (
        DetectDowntimeResult.lease_already_closed,
        (),
    )


def test_a_short_timeout_makes_a_demo_show_downtime_within_seconds():
    assert detect_downtime(LEASE, at(16), DEMO_LEASE_RULES)[0] is DetectDowntimeResult.ok


# -- charge_usage -------------------------------------------------------------------------


def test_a_usage_charge_draws_escrow():
    result, facts = charge_usage(LEASE, 200, "u-1", at(100), RULES)
    assert result is ChargeUsageResult.ok
    assert facts == (UsageCharged(LEASE.id, "u-1", 200, 200, at(100)),)
    lease = step(LEASE, (result, facts))
    assert lease.escrow_charged == 200 and lease.escrow_available == 1_000
    assert facts[0].amount_uncovered == 0


def test_an_exhausted_escrow_pauses_the_lease_with_a_grace_period():
    result, facts = charge_usage(LEASE, 1_500, "u-1", at(100), RULES)
    assert result is ChargeUsageResult.escrow_exhausted
    assert facts == (
        UsageCharged(LEASE.id, "u-1", 1_500, 1_200, at(100)),
        LeasePaused(LEASE.id, at(100), at(160)),
    )
    assert facts[0].amount_uncovered == 300
    lease = step(LEASE, (result, facts))
    assert lease.status is LeaseStatus.paused and lease.escrow_available == 0
    assert lease.usage_uncovered == 300 and lease.grace_ends_at == at(160)


def test_a_charge_of_exactly_the_available_escrow_exhausts_it():
    result, facts = charge_usage(LEASE, 1_200, "u-1", at(100), RULES)
    assert result is ChargeUsageResult.escrow_exhausted
    assert isinstance(facts[-1], LeasePaused)


def test_an_exhausted_escrow_closes_the_lease_under_the_close_rule():
    result, facts = charge_usage(LEASE, 1_500, "u-1", at(20), CLOSING)
    assert result is ChargeUsageResult.escrow_exhausted
    assert facts == (
        UsageCharged(LEASE.id, "u-1", 1_500, 1_200, at(20)),
        LeaseClosed(LEASE.id, CloseReason.escrow_exhausted, PROTOCOL_ID, at(20), 0, 0),
    )
    lease = step(LEASE, (result, facts))
    assert lease.status is LeaseStatus.closed and lease.close_reason is CloseReason.escrow_exhausted


def test_a_charge_on_a_paused_lease_records_what_it_could_not_cover_and_pauses_no_more():
    lease = paused()
    result, facts = charge_usage(lease, 50, "u-late", at(110), RULES)
    assert result is ChargeUsageResult.escrow_exhausted
    assert facts == (UsageCharged(lease.id, "u-late", 50, 0, at(110)),)
    lease = step(lease, (result, facts))
    assert lease.usage_uncovered == 50 and lease.grace_ends_at == at(160)


@pytest.mark.parametrize(
    ("lease", "amount", "ref", "code"),
    [
        (LEASE, -1, "u", ChargeUsageResult.amount_must_not_be_negative),
        (LEASE, 0, "u", ChargeUsageResult.amount_must_not_be_zero),
        (LEASE, ESCROW_MAX + 1, "u", ChargeUsageResult.amount_exceeds_max),
        (LEASE, 1, "", ChargeUsageResult.usage_ref_must_not_be_empty),
        (
            LEASE,
            1,
            "u" * (USAGE_REF_LENGTH_MAX + 1),
            ChargeUsageResult.usage_ref_exceeds_max_length,
        ),
        (closed(), 1, "u", ChargeUsageResult.lease_already_closed),
    ],
)
def test_a_usage_charge_that_breaks_a_rule_records_nothing(lease, amount, ref, code):
    assert charge_usage(lease, amount, ref, at(100), RULES) == (code, ())


def test_a_float_charge_is_a_type_error():
    with pytest.raises(TypeError, match="amount"):
        charge_usage(LEASE, 1.0, "u", at(1), RULES)  # type: ignore[arg-type]


# -- close --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "by", "now_s"),
    [
        (CloseReason.consumer, CONSUMER, 100),
        (CloseReason.provider, PROVIDER, 100),
        (CloseReason.sla_breach, STRANGER, 100),
        (CloseReason.expiry, STRANGER, 600),
    ],
)
def test_a_close_releases_the_unused_escrow_exactly(reason, by, now_s):
    lease = beat(LEASE, 1, now_s - 1)
    lease = step(lease, charge_usage(lease, 333, "u-1", at(now_s), RULES))
    result, facts = close(lease, reason, by, at(now_s), RULES)
    assert result is CloseResult.ok
    assert facts == (LeaseClosed(lease.id, reason, by, at(now_s), 1_200 - 333, 0),)
    lease = step(lease, (result, facts))
    assert lease.status is LeaseStatus.closed and lease.close_reason is reason
    assert lease.escrow_released == 867 and lease.escrow_available == 0


def test_a_paused_lease_closes_for_an_exhausted_escrow_once_its_grace_ended():
    lease = beat(paused(), 1, 150)
    assert close(lease, CloseReason.escrow_exhausted, STRANGER, at(159), RULES) == (
        CloseResult.escrow_grace_not_over,
        (),
    )
    result, facts = close(lease, CloseReason.escrow_exhausted, STRANGER, at(160), RULES)
    assert result is CloseResult.ok
    assert facts == (LeaseClosed(lease.id, CloseReason.escrow_exhausted, STRANGER, at(160), 0, 0),)


def test_a_close_records_the_gap_nobody_detected_yet():
    result, facts = close(LEASE, CloseReason.consumer, CONSUMER, at(100), RULES)
    assert result is CloseResult.ok
    assert facts == (
        DowntimeDetected(LEASE.id, T0, at(100), 100),
        LeaseClosed(LEASE.id, CloseReason.consumer, CONSUMER, at(100), 1_200, 0),
    )
    assert step(LEASE, (result, facts)).downtime_s == 100


def test_a_close_counts_the_downtime_of_a_gap_still_open():
    lease = step(LEASE, detect_downtime(LEASE, at(40), RULES))
    _, facts = close(lease, CloseReason.provider, PROVIDER, at(100), RULES)
    assert facts == (LeaseClosed(lease.id, CloseReason.provider, PROVIDER, at(100), 1_200, 60),)
    assert step(lease, (CloseResult.ok, facts)).downtime_s == 100


@pytest.mark.parametrize(
    ("lease", "reason", "by", "now_s", "code"),
    [
        (LEASE, CloseReason.consumer, ZERO, 10, CloseResult.closed_by_must_not_be_zero),
        (closed(), CloseReason.consumer, CONSUMER, 20, CloseResult.lease_already_closed),
        (closed(), CloseReason.expiry, STRANGER, 900, CloseResult.lease_already_closed),
        (LEASE, CloseReason.consumer, PROVIDER, 10, CloseResult.closer_must_be_consumer),
        (LEASE, CloseReason.provider, CONSUMER, 10, CloseResult.closer_must_be_provider),
        (LEASE, CloseReason.expiry, STRANGER, 599, CloseResult.lease_not_yet_expired),
        (LEASE, CloseReason.escrow_exhausted, STRANGER, 10, CloseResult.escrow_not_exhausted),
        (paused(), CloseReason.escrow_exhausted, STRANGER, 120, CloseResult.escrow_grace_not_over),
    ],
)
def test_a_close_that_breaks_a_rule_records_nothing(lease, reason, by, now_s, code):
    assert close(lease, reason, by, at(now_s), RULES) == (code, ())


def test_nothing_happens_on_a_closed_lease():
    lease = closed()
    assert top_up(lease, 5, at(20))[0] is TopUpResult.lease_already_closed
    assert record_heartbeat(lease, NODE, 1, at(20), at(20), RULES)[1] == ()
    assert detect_downtime(lease, at(999), RULES)[1] == ()
    assert charge_usage(lease, 5, "u", at(20), RULES)[1] == ()
    for reason in CloseReason:
        assert close(lease, reason, CONSUMER, at(999), RULES) == (
            CloseResult.lease_already_closed,
            (),
        )
    assert close_due(lease, at(999)) is None


def test_close_due_names_expiry_first_then_an_ended_grace():
    assert close_due(LEASE, at(599)) is None
    assert close_due(LEASE, at(600)) is CloseReason.expiry
    lease = paused()
    assert close_due(lease, at(159)) is None
    assert close_due(lease, at(160)) is CloseReason.escrow_exhausted
    assert close_due(lease, at(600)) is CloseReason.expiry


# -- time and replay ----------------------------------------------------------------------


def test_a_decision_dated_before_the_latest_fact_is_recorded_at_that_fact():
    lease = step(LEASE, charge_usage(LEASE, 10, "u-1", at(100), RULES))
    _, facts = charge_usage(lease, 10, "u-2", at(50), RULES)
    assert facts == (UsageCharged(lease.id, "u-2", 10, 10, at(100)),)


def test_replay_of_no_facts_is_refused():
    with pytest.raises(ValueError, match="LeaseOpened"):
        replay([])


def test_replay_rebuilds_the_live_lease():
    facts: list[LeaseFact] = []
    lease: Lease | None = None
    for outcome in (
        lambda s: open_lease(MATCH, T0),
        lambda s: record_heartbeat(s, NODE, 1, at(10), at(10), RULES),
        lambda s: detect_downtime(s, at(60), RULES),
        lambda s: charge_usage(s, 2_000, "u-1", at(70), RULES),
        lambda s: top_up(s, 500, at(80)),
        lambda s: record_heartbeat(s, NODE, 2, at(90), at(90), RULES),
        lambda s: close(s, CloseReason.consumer, CONSUMER, at(100), RULES),
    ):
        _, new = outcome(lease)
        facts += new
        for fact in new:
            lease = apply(lease, fact)
    assert lease is not None
    assert replay(facts) == lease
    assert lease.escrow_released == lease.escrow_held - lease.escrow_charged == 500


# -- properties ---------------------------------------------------------------------------

advance = st.tuples(st.just("advance"), st.integers(0, 120))
heartbeat = st.tuples(
    st.just("heartbeat"),
    st.sampled_from(["next", "next", "next", "skip", "same", "lower"]),
    st.one_of(st.integers(-3, 3), st.integers(-40, 8)),
    st.integers(0, 9).map(lambda n: n > 0),
)
"""Mostly the next sequence from the lease's node; sometimes a duplicate, a reordered or
skipped sequence, a stranger node, or an `at` far in the past or in the future."""
operation = st.one_of(
    advance,
    advance,
    heartbeat,
    heartbeat,
    heartbeat,
    st.tuples(st.just("detect")),
    st.tuples(st.just("charge"), st.integers(1, 400)),
    st.tuples(st.just("top_up"), st.integers(1, 600)),
    st.tuples(
        st.just("close"),
        st.sampled_from(CloseReason),
        st.sampled_from([CONSUMER, PROVIDER, STRANGER]),
    ),
)

rules_strategy = st.builds(
    LeaseRules,
    heartbeat_interval_s=st.integers(1, 20),
    heartbeat_timeout_s=st.integers(20, 60),
    heartbeat_future_tolerance_s=st.integers(0, 5),
    on_escrow_exhausted=st.sampled_from(EscrowExhaustedAction),
    escrow_grace_s=st.integers(0, 100),
)

match_strategy = st.builds(
    lambda gpu_count, price, duration_s, extra: replace(
        MATCH,
        gpu_count=gpu_count,
        price_per_gpu_hour=price,
        duration_s=duration_s,
        escrow_amount=lease_cost(gpu_count, price, duration_s) + extra,
    ),
    st.integers(1, 4),
    st.integers(1, 5_000),
    st.integers(60, 1_500),
    st.integers(0, 50),
)


@dataclass
class Run:
    rules: LeaseRules
    lease: Lease
    now_s: int = 0
    facts: list[LeaseFact] = field(default_factory=list)


def play(run: Run, op: tuple[object, ...]) -> tuple[object, tuple[LeaseFact, ...]]:
    lease, now = run.lease, at(run.now_s)
    kind = op[0]
    if kind == "advance":
        assert isinstance(op[1], int)
        run.now_s += op[1]
        return "advance", ()
    if kind == "heartbeat":
        _, which, offset_s, right_node = op
        assert isinstance(offset_s, int)
        sequence = {
            "next": lease.heartbeat_sequence + 1,
            "skip": lease.heartbeat_sequence + 3,
            "same": lease.heartbeat_sequence,
            "lower": lease.heartbeat_sequence - 1,
        }[str(which)]
        node = NODE if right_node else OTHER_NODE
        sent_at = now + timedelta(seconds=offset_s)
        return record_heartbeat(lease, node, sequence, sent_at, now, run.rules)
    if kind == "detect":
        return detect_downtime(lease, now, run.rules)
    if kind == "charge":
        assert isinstance(op[1], int)
        return charge_usage(lease, op[1], f"u-{len(run.facts)}", now, run.rules)
    if kind == "top_up":
        assert isinstance(op[1], int)
        return top_up(lease, op[1], now)
    _, reason, by = op
    assert isinstance(reason, CloseReason) and isinstance(by, UUID)
    return close(lease, reason, by, now, run.rules)


@settings(max_examples=250, deadline=None)
@given(
    rules=rules_strategy, match=match_strategy, ops=st.lists(operation, min_size=10, max_size=80)
)
def test_random_sequences_keep_every_lease_invariant(rules, match, ops):
    _, opening = open_lease(match, T0)
    run = Run(rules, step(None, (OpenLeaseResult.ok, opening)), facts=list(opening))
    gaps = 0
    heartbeats_since_gap = 1
    for op in ops:
        before = run.lease
        result, facts = play(run, op)
        if before.status is LeaseStatus.closed:
            # Nothing happens on a closed lease.
            assert facts == ()
            # Refused: the closed-lease code, or a rule on the command's fields checked first.
            assert result == "advance" or result.name not in ("ok", "escrow_exhausted")  # type: ignore[attr-defined]
            continue
        if result != "advance" and result.name not in ("ok", "escrow_exhausted"):  # type: ignore[attr-defined]
            assert facts == (), f"a refusal recorded {facts}"
        lease = before
        for fact in facts:
            if isinstance(fact, DowntimeDetected):
                # Once per gap: a heartbeat ended the previous gap first, and the new gap
                # starts where the counted downtime ended.
                assert heartbeats_since_gap > 0
                assert fact.from_at >= lease.alive_at
                assert fact.to_at - fact.from_at > timedelta(seconds=rules.heartbeat_timeout_s)
                gaps += 1
                heartbeats_since_gap = 0
            if isinstance(fact, HeartbeatRecorded):
                heartbeats_since_gap += 1
            if isinstance(fact, LeaseClosed):
                # The release is exactly what was held and not charged.
                assert fact.escrow_released == lease.escrow_held - lease.escrow_charged
                assert fact.escrow_released >= 0
            lease = apply(lease, fact)
            assert lease.escrow_charged <= lease.escrow_held
        if op[0] == "detect" and result is DetectDowntimeResult.ok:
            assert detect_downtime(lease, at(run.now_s), rules)[0] is (
                DetectDowntimeResult.downtime_already_detected
            )
        run.lease = lease
        run.facts += facts
        # Downtime is the sum of what the facts counted, never more than the elapsed time.
        counted = sum(
            f.downtime_s
            for f in run.facts
            if isinstance(f, DowntimeDetected | HeartbeatRecorded | LeaseClosed)
        )
        assert counted == lease.downtime_s
        elapsed_s = (max(at(run.now_s), lease.updated_at) - lease.opened_at) // timedelta(seconds=1)
        assert lease.downtime_s <= elapsed_s
        assert sum(isinstance(f, DowntimeDetected) for f in run.facts) == gaps
        # Charged never exceeds held; an open lease always has escrow to draw.
        assert 0 <= lease.escrow_charged <= lease.escrow_held
        if lease.status is LeaseStatus.open:
            assert lease.escrow_available > 0
        # Replay equals live state, at every step.
        assert replay(run.facts) == run.lease
    charged = sum(f.amount for f in run.facts if isinstance(f, UsageCharged))
    held = match.escrow_amount + sum(f.amount for f in run.facts if isinstance(f, EscrowToppedUp))
    assert (charged, held) == (run.lease.escrow_charged, run.lease.escrow_held)
    if run.lease.status is LeaseStatus.closed:
        assert run.lease.escrow_released == held - charged


@settings(max_examples=150, deadline=None)
@given(
    beats=st.lists(st.tuples(st.integers(1, 90), st.integers(-5, 0)), min_size=1, max_size=30),
    timeout_s=st.integers(10, 60),
)
def test_each_gap_between_heartbeats_longer_than_the_timeout_is_detected_exactly_once(
    beats, timeout_s
):
    # Heartbeats `wait_s` apart (each sent up to 5 s before it arrives), with a downtime
    # check every second in between: each silence longer than the timeout is one gap.
    rules = LeaseRules(heartbeat_interval_s=10, heartbeat_timeout_s=timeout_s)
    lease, now_s, facts = LEASE, 0, list[LeaseFact]()
    expected_gaps = 0
    for sequence, (wait_s, skew_s) in enumerate(beats, start=1):
        silence_start = lease.alive_at
        for second in range(now_s + 1, now_s + wait_s):
            _, found = detect_downtime(lease, at(second), rules)
            facts += found
            for fact in found:
                lease = apply(lease, fact)
        now_s += wait_s
        sent_at = max(at(now_s + skew_s), silence_start)
        if sent_at - silence_start > timedelta(seconds=timeout_s) or any(
            at(s) - silence_start > timedelta(seconds=timeout_s)
            for s in range(now_s - wait_s + 1, now_s)
        ):
            expected_gaps += 1
        result, new = record_heartbeat(lease, NODE, sequence, sent_at, at(now_s), rules)
        assert result is RecordHeartbeatResult.ok
        facts += new
        for fact in new:
            lease = apply(lease, fact)
    assert sum(isinstance(f, DowntimeDetected) for f in facts) == expected_gaps
    assert lease.downtime_s <= now_s
    assert replay([*opening_facts(), *facts]) == lease


def opening_facts() -> tuple[LeaseFact, ...]:
    return open_lease(MATCH, T0)[1]


def test_a_heartbeat_dated_slightly_ahead_does_not_turn_a_gap_of_exactly_the_timeout_into_downtime():
    # Found by the property test: the gap must be measured to what the ledger has seen (now),
    # as detect_downtime and close do, not to the heartbeat's own (future) time.
    rules = LeaseRules(
        heartbeat_interval_s=1, heartbeat_timeout_s=20, heartbeat_future_tolerance_s=1
    )
    lease = opened()
    result, facts = record_heartbeat(
        lease,
        NODE,
        1,
        lease.alive_at + timedelta(seconds=21),
        lease.alive_at + timedelta(seconds=20),
        rules,
    )
    assert result is RecordHeartbeatResult.ok
    assert not any(isinstance(f, DowntimeDetected) for f in facts)
