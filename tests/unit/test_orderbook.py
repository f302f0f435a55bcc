"""Unit tests of the pure order book (`domain.orderbook.OrderBook`). No I/O.

Every result code has a test asserting the exact code; a refused command records nothing
and changes nothing (beyond the asks that expire at its `now`). Property tests drive the
book with random sequences of asks, bids, cancels and time moves, and check each step's
facts against a shadow model kept by the test.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain import orderbook
from domain.orderbook import (
    ASK_TTL_S_MAX,
    DURATION_S_MAX,
    ESCROW_MAX,
    GPU_COUNT_MAX,
    GPU_MODEL_LENGTH_MAX,
    PRICE_MAX,
    Ask,
    AskCancelled,
    AskExpired,
    AskPlaced,
    AskStanding,
    Bid,
    BidCancelled,
    BidPlaced,
    BidRemainderRefunded,
    BidStanding,
    CancelAsk,
    CancelBid,
    CancelOrderResult,
    DepthLevel,
    OrderBook,
    OrderBookFact,
    OrderMatched,
    OrderStatus,
    PlaceOrderResult,
    escrow_required,
    lease_cost,
    replay,
)

P = PlaceOrderResult
C = CancelOrderResult

MODEL = "H100-SXM5-80GB"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
ZERO = UUID(int=0)
PROVIDER = UUID(int=0xA1)
OTHER_PROVIDER = UUID(int=0xA2)
NODE = UUID(int=0xB1)
CONSUMER = UUID(int=0xC1)
OTHER_CONSUMER = UUID(int=0xC2)


def oid(n: int) -> UUID:
    return UUID(int=1000 + n)


def ask(
    n: int,
    price: int = 100,
    count: int = 1,
    *,
    expires_at: datetime = T0 + HOUR,
    provider_id: UUID = PROVIDER,
    node_id: UUID = NODE,
    gpu_model: str = MODEL,
    id: UUID | None = None,
) -> Ask:
    return Ask(
        id=oid(n) if id is None else id,
        provider_id=provider_id,
        node_id=node_id,
        gpu_model=gpu_model,
        gpu_count=count,
        price_per_gpu_hour=price,
        expires_at=expires_at,
    )


def bid(
    n: int,
    max_price: int = 100,
    count: int = 1,
    *,
    duration_s: int = 3_600,
    escrow: int | None = None,
    consumer_id: UUID = CONSUMER,
    gpu_model: str = MODEL,
    id: UUID | None = None,
) -> Bid:
    return Bid(
        id=oid(n) if id is None else id,
        consumer_id=consumer_id,
        gpu_model=gpu_model,
        gpu_count=count,
        max_price_per_gpu_hour=max_price,
        duration_s=duration_s,
        escrow=escrow_required(count, max_price, duration_s) if escrow is None else escrow,
    )


def place(book: OrderBook, order: Ask | Bid, now: datetime = T0) -> list[OrderBookFact]:
    """Place an order that must be accepted; returns its facts."""
    if isinstance(order, Ask):
        result, facts = book.place_ask(order, now)
    else:
        result, facts = book.place_bid(order, now)
    assert result is P.ok
    return facts


def matches(facts: list[OrderBookFact]) -> list[tuple[UUID, UUID, int, int]]:
    """(ask_id, bid_id, gpu_count, price_per_gpu_hour) of each OrderMatched, in order."""
    return [
        (f.ask_id, f.bid_id, f.gpu_count, f.price_per_gpu_hour)
        for f in facts
        if isinstance(f, OrderMatched)
    ]


def assert_refused(
    book: OrderBook, order: Ask | Bid, code: PlaceOrderResult, now: datetime = T0
) -> None:
    """Refused: the exact code, no facts, and the book unchanged."""
    before = copy.deepcopy(book)
    if isinstance(order, Ask):
        result, facts = book.place_ask(order, now)
    else:
        result, facts = book.place_bid(order, now)
    assert result is code
    assert facts == []
    assert book == before


@pytest.fixture
def book() -> OrderBook:
    return OrderBook(MODEL)


# -- money arithmetic ---------------------------------------------------------------------


def test_lease_cost_rounds_up_to_a_whole_unit():
    assert lease_cost(1, 1, 1) == 1
    assert lease_cost(1, 3_600, 1) == 1
    assert lease_cost(1, 3_601, 1) == 2
    assert lease_cost(2, 100, 3_600) == 200
    assert lease_cost(3, 7, 1_800) == 11  # 10.5 rounds up


def test_lease_cost_is_exact_for_numbers_a_float_cannot_hold():
    price = 2 * 10**18 + 1
    assert lease_cost(GPU_COUNT_MAX, price, DURATION_S_MAX) == -(
        -(GPU_COUNT_MAX * price * DURATION_S_MAX) // 3_600
    )
    assert isinstance(lease_cost(1, price, 1), int)


def test_escrow_required_rounds_up_per_gpu_so_that_every_split_of_the_bid_is_covered():
    # The whole product would be 1 (2 * 1 * 1800 / 3600), but two one-GPU leases cost 1 each.
    assert lease_cost(2, 1, 1_800) == 1
    assert escrow_required(2, 1, 1_800) == 2
    assert escrow_required(4, 100, 3_600) == lease_cost(4, 100, 3_600) == 400


# -- construction -------------------------------------------------------------------------


def test_a_book_needs_a_gpu_model_name_within_the_limit():
    with pytest.raises(ValueError, match="gpu_model"):
        OrderBook("")
    with pytest.raises(ValueError, match="gpu_model"):
        OrderBook("x" * (GPU_MODEL_LENGTH_MAX + 1))


def test_an_ask_with_a_float_price_is_a_type_error_at_construction():
    with pytest.raises(TypeError, match="price_per_gpu_hour must be an int"):
        replace(ask(1), price_per_gpu_hour=1.5)


def test_a_bid_with_a_bool_count_or_a_float_escrow_is_a_type_error_at_construction():
    with pytest.raises(TypeError, match="gpu_count must be an int"):
        replace(bid(1), gpu_count=True)
    with pytest.raises(TypeError, match="escrow must be an int"):
        replace(bid(1), escrow=100.0)


def test_an_order_with_an_id_that_is_not_a_uuid_is_a_type_error_at_construction():
    with pytest.raises(TypeError, match="node_id must be a UUID"):
        replace(ask(1), node_id=5)
    with pytest.raises(TypeError, match="consumer_id must be a UUID"):
        replace(bid(1), consumer_id="c")
    with pytest.raises(TypeError, match="expires_at must be a datetime"):
        replace(ask(1), expires_at=0)
    with pytest.raises(TypeError, match="gpu_model must be a str"):
        replace(bid(1), gpu_model=None)


# -- place: result codes ------------------------------------------------------------------


def test_placing_an_ask_in_an_empty_book_records_ask_placed_with_sequence_one(book):
    a = ask(1, price=100, count=2)
    assert book.place_ask(a, T0) == (P.ok, [AskPlaced(a, 1, T0)])
    standing = book.ask(a.id)
    assert standing is not None
    assert (standing.status, standing.gpu_count_remaining, standing.sequence) == (
        OrderStatus.resting,
        2,
        1,
    )


def test_placing_a_bid_in_an_empty_book_records_bid_placed_and_holds_its_escrow(book):
    b = bid(1, max_price=100, count=2)
    assert book.place_bid(b, T0) == (P.ok, [BidPlaced(b, 1, T0)])
    standing = book.bid(b.id)
    assert standing is not None
    assert (standing.status, standing.gpu_count_remaining, standing.escrow_remaining) == (
        OrderStatus.resting,
        2,
        200,
    )


def test_an_order_with_a_zero_id_is_refused(book):
    assert_refused(book, ask(1, id=ZERO), P.id_must_not_be_zero)
    assert_refused(book, bid(1, id=ZERO), P.id_must_not_be_zero)


def test_an_ask_with_a_zero_provider_id_is_refused(book):
    assert_refused(book, ask(1, provider_id=ZERO), P.provider_id_must_not_be_zero)


def test_an_ask_with_a_zero_node_id_is_refused(book):
    assert_refused(book, ask(1, node_id=ZERO), P.node_id_must_not_be_zero)


def test_a_bid_with_a_zero_consumer_id_is_refused(book):
    assert_refused(book, bid(1, consumer_id=ZERO), P.consumer_id_must_not_be_zero)


def test_an_order_with_an_empty_gpu_model_is_refused(book):
    assert_refused(book, ask(1, gpu_model=""), P.gpu_model_must_not_be_empty)
    assert_refused(book, bid(1, gpu_model=""), P.gpu_model_must_not_be_empty)


def test_an_order_with_a_gpu_model_longer_than_the_limit_is_refused(book):
    long_name = "x" * (GPU_MODEL_LENGTH_MAX + 1)
    assert_refused(book, ask(1, gpu_model=long_name), P.gpu_model_exceeds_max_length)
    assert_refused(book, bid(1, gpu_model=long_name), P.gpu_model_exceeds_max_length)


def test_an_order_for_another_gpu_model_is_refused(book):
    assert_refused(book, ask(1, gpu_model="A100"), P.gpu_model_must_match_book)
    assert_refused(book, bid(1, gpu_model=MODEL.lower()), P.gpu_model_must_match_book)


@pytest.mark.parametrize("count", [0, -1])
def test_an_order_for_no_gpus_or_fewer_is_refused(book, count):
    assert_refused(book, ask(1, count=count), P.gpu_count_must_be_positive)
    assert_refused(book, replace(bid(1), gpu_count=count), P.gpu_count_must_be_positive)


def test_an_order_for_more_gpus_than_the_limit_is_refused_and_the_limit_itself_is_accepted(book):
    assert_refused(book, ask(1, count=GPU_COUNT_MAX + 1), P.gpu_count_exceeds_max)
    assert_refused(book, bid(2, count=GPU_COUNT_MAX + 1), P.gpu_count_exceeds_max)
    place(book, ask(3, price=200, count=GPU_COUNT_MAX))
    place(book, bid(4, max_price=100, count=GPU_COUNT_MAX))


@pytest.mark.parametrize("price", [0, -5])
def test_an_order_with_a_price_of_zero_or_less_is_refused(book, price):
    assert_refused(book, ask(1, price=price), P.price_must_be_positive)
    assert_refused(book, replace(bid(1), max_price_per_gpu_hour=price), P.price_must_be_positive)


def test_an_order_priced_above_the_limit_is_refused_and_the_limit_itself_is_accepted(book):
    assert_refused(book, ask(1, price=PRICE_MAX + 1), P.price_exceeds_max)
    assert_refused(book, bid(2, max_price=PRICE_MAX + 1), P.price_exceeds_max)
    place(book, ask(3, price=PRICE_MAX))
    place(book, bid(4, max_price=PRICE_MAX - 1))


@pytest.mark.parametrize("duration_s", [0, -3_600])
def test_a_bid_with_a_duration_of_zero_or_less_is_refused(book, duration_s):
    assert_refused(book, replace(bid(1), duration_s=duration_s), P.duration_must_be_positive)


def test_a_bid_longer_than_the_limit_is_refused_and_the_limit_itself_is_accepted(book):
    assert_refused(book, bid(1, duration_s=DURATION_S_MAX + 1), P.duration_exceeds_max)
    place(book, bid(2, duration_s=DURATION_S_MAX))


def test_a_bid_whose_escrow_is_one_unit_short_of_the_cost_is_refused(book):
    required = escrow_required(3, 7, 1_800)
    assert required == 12  # 3 GPUs * ceil(3.5)
    assert_refused(
        book,
        bid(1, max_price=7, count=3, duration_s=1_800, escrow=required - 1),
        P.escrow_below_cost,
    )
    place(book, bid(1, max_price=7, count=3, duration_s=1_800, escrow=required))


def test_a_bid_with_escrow_above_the_limit_is_refused(book):
    assert_refused(book, bid(1, escrow=ESCROW_MAX + 1), P.escrow_exceeds_max)


def test_placing_the_same_ask_again_is_ok_and_records_nothing(book):
    a = ask(1, count=2)
    place(book, a)
    before = copy.deepcopy(book)
    assert book.place_ask(a, T0 + timedelta(minutes=1)) == (P.ok, [])
    assert book == before


def test_placing_the_same_bid_again_after_it_was_filled_is_ok_and_records_nothing(book):
    place(book, ask(1, price=90))
    b = bid(2, max_price=100)
    place(book, b)
    before = copy.deepcopy(book)
    assert book.place_bid(b, T0) == (P.ok, [])
    assert book == before


def test_placing_the_same_ask_again_after_its_expiry_passed_is_still_ok(book):
    a = ask(1, expires_at=T0 + HOUR)
    place(book, a)
    later = T0 + 2 * HOUR
    result, facts = book.place_ask(a, later)
    assert result is P.ok
    assert facts == [AskExpired(a.id, 1, later)]


def test_an_ask_with_a_known_id_and_other_fields_is_refused(book):
    place(book, ask(1, price=100))
    assert_refused(book, ask(1, price=101), P.exists_with_different_fields)
    assert_refused(book, ask(1, node_id=UUID(int=0xB2)), P.exists_with_different_fields)


def test_a_bid_with_a_known_id_and_other_fields_is_refused(book):
    place(book, bid(1, max_price=100))
    assert_refused(book, bid(1, max_price=100, escrow=101), P.exists_with_different_fields)


def test_an_order_whose_id_is_taken_by_the_other_side_is_refused(book):
    place(book, ask(1, price=200))
    place(book, bid(2, max_price=100))
    assert_refused(book, bid(1, max_price=100), P.exists_with_different_side)
    assert_refused(book, ask(2, price=200), P.exists_with_different_side)


def test_an_ask_expiring_now_or_earlier_is_refused(book):
    assert_refused(book, ask(1, expires_at=T0), P.expiry_must_be_in_the_future)
    assert_refused(book, ask(1, expires_at=T0 - HOUR), P.expiry_must_be_in_the_future)


def test_an_ask_expiring_beyond_the_ttl_limit_is_refused_and_the_limit_itself_is_accepted(book):
    limit = T0 + timedelta(seconds=ASK_TTL_S_MAX)
    assert_refused(book, ask(1, expires_at=limit + timedelta(seconds=1)), P.expiry_exceeds_max)
    place(book, ask(1, expires_at=limit))


def test_an_order_is_refused_when_the_book_is_full_but_a_retry_of_a_resting_order_is_ok(
    book, monkeypatch
):
    monkeypatch.setattr(orderbook, "ORDERS_PER_BOOK_MAX", 2)
    place(book, ask(1, price=200))
    place(book, bid(2, max_price=100))
    assert_refused(book, ask(3, price=300), P.book_full)
    assert_refused(book, bid(4, max_price=50), P.book_full)
    assert book.place_ask(ask(1, price=200), T0) == (P.ok, [])


def test_an_order_fits_again_once_an_order_left_the_full_book(book, monkeypatch):
    monkeypatch.setattr(orderbook, "ORDERS_PER_BOOK_MAX", 1)
    place(book, ask(1, price=200, expires_at=T0 + HOUR))
    assert_refused(book, ask(2, price=300), P.book_full)
    place(book, ask(2, price=300, expires_at=T0 + 3 * HOUR), T0 + HOUR)  # ask 1 expired first


def test_the_rule_checked_first_decides_the_code_when_an_order_breaks_several(book):
    assert_refused(book, ask(1, id=ZERO, count=0, price=0), P.id_must_not_be_zero)
    assert_refused(book, ask(1, provider_id=ZERO, node_id=ZERO), P.provider_id_must_not_be_zero)
    assert_refused(book, ask(1, gpu_model="", count=0), P.gpu_model_must_not_be_empty)
    assert_refused(book, ask(1, count=0, price=0), P.gpu_count_must_be_positive)
    assert_refused(book, ask(1, price=0, expires_at=T0), P.price_must_be_positive)
    assert_refused(book, replace(bid(1), duration_s=0, escrow=0), P.duration_must_be_positive)
    place(book, ask(2, price=200))
    # Exists-checks come before the time-dependent ones: a late retry is not an expiry error.
    assert_refused(book, ask(2, price=201, expires_at=T0), P.exists_with_different_fields)


def test_result_codes_are_numbered_in_check_order_from_zero():
    for enum in (PlaceOrderResult, CancelOrderResult):
        assert [int(m) for m in enum] == list(range(len(enum)))


# -- matching rules -----------------------------------------------------------------------


def test_a_bid_below_the_best_ask_rests_and_does_not_match(book):
    place(book, ask(1, price=100))
    facts = place(book, bid(2, max_price=99))
    assert matches(facts) == []
    assert (book.best_ask(), book.best_bid(), book.spread()) == (100, 99, 1)


def test_a_bid_matches_at_the_ask_price_not_at_its_max_price(book):
    a = ask(1, price=80, count=2)
    place(book, a)
    b = bid(2, max_price=100, count=2, duration_s=1_800)
    facts = place(book, b, T0 + timedelta(minutes=5))
    now = T0 + timedelta(minutes=5)
    assert facts == [
        BidPlaced(b, 2, now),
        OrderMatched(
            ask_id=a.id,
            bid_id=b.id,
            provider_id=PROVIDER,
            node_id=NODE,
            consumer_id=CONSUMER,
            gpu_model=MODEL,
            gpu_count=2,
            price_per_gpu_hour=80,
            duration_s=1_800,
            escrow_amount=80,
            matched_at=now,
        ),
        BidRemainderRefunded(b.id, 100 - 80, now),
    ]
    assert book.bid(b.id) == BidStanding(b, 2, OrderStatus.filled, 0, 0)
    assert book.ask(a.id) == AskStanding(a, 1, OrderStatus.filled, 0)
    assert book.resting_count() == 0


def test_an_ask_matches_a_resting_bid_at_the_ask_price(book):
    b = bid(1, max_price=150, count=1)
    place(book, b)
    facts = place(book, ask(2, price=120))
    assert matches(facts) == [(oid(2), b.id, 1, 120)]
    assert facts[-1] == BidRemainderRefunded(b.id, 30, T0)


def test_a_bid_takes_the_cheapest_ask_first(book):
    place(book, ask(1, price=110))
    place(book, ask(2, price=100))
    place(book, ask(3, price=105))
    facts = place(book, bid(4, max_price=120, count=2))
    assert matches(facts) == [(oid(2), oid(4), 1, 100), (oid(3), oid(4), 1, 105)]
    assert book.best_ask() == 110


def test_among_equal_asks_a_bid_takes_the_one_placed_first(book):
    place(book, ask(1, price=100))
    place(book, ask(2, price=100))
    facts = place(book, bid(3, max_price=100))
    assert matches(facts) == [(oid(1), oid(3), 1, 100)]


def test_time_priority_follows_the_sequence_not_the_clock(book):
    place(book, ask(1, price=100), T0 + timedelta(minutes=10))
    # Placed later with an earlier clock: still second in line (and recorded at the book's time).
    facts = place(book, ask(2, price=100), T0)
    assert facts == [AskPlaced(ask(2, price=100), 2, T0 + timedelta(minutes=10))]
    assert matches(place(book, bid(3, max_price=100), T0)) == [(oid(1), oid(3), 1, 100)]


def test_an_ask_takes_the_highest_bid_first_and_among_equals_the_one_placed_first(book):
    place(book, bid(1, max_price=100))
    place(book, bid(2, max_price=120))
    place(book, bid(3, max_price=120))
    facts = place(book, ask(4, price=90, count=3))
    assert matches(facts) == [
        (oid(4), oid(2), 1, 90),
        (oid(4), oid(3), 1, 90),
        (oid(4), oid(1), 1, 90),
    ]


def test_an_ask_never_matches_a_bid_whose_max_price_is_below_it(book):
    place(book, bid(1, max_price=99))
    assert matches(place(book, ask(2, price=100))) == []
    assert book.spread() == 1


def test_a_bid_sweeps_several_price_levels_up_to_its_max_and_rests_the_remainder(book):
    place(book, ask(1, price=100, count=2))
    place(book, ask(2, price=110, count=1))
    place(book, ask(3, price=130, count=5))
    b = bid(4, max_price=120, count=5)
    facts = place(book, b)
    assert matches(facts) == [(oid(1), b.id, 2, 100), (oid(2), b.id, 1, 110)]
    standing = book.bid(b.id)
    assert standing.status is OrderStatus.resting
    assert standing.gpu_count_remaining == 2
    assert standing.escrow_remaining == 600 - 200 - 110
    assert book.ask_depth() == [DepthLevel(130, 5)]
    assert book.bid_depth() == [DepthLevel(120, 2)]


def test_a_larger_ask_fills_a_smaller_bid_and_its_remainder_rests(book):
    place(book, bid(1, max_price=100, count=1))
    facts = place(book, ask(2, price=100, count=3))
    assert matches(facts) == [(oid(2), oid(1), 1, 100)]
    assert book.ask(oid(2)).gpu_count_remaining == 2
    assert book.ask_depth() == [DepthLevel(100, 2)]
    assert book.best_bid() is None


def test_an_expired_ask_is_expired_first_and_never_matched(book):
    place(book, ask(1, price=50, expires_at=T0 + HOUR))
    place(book, ask(2, price=100, expires_at=T0 + 2 * HOUR))
    b = bid(3, max_price=100)
    facts = place(book, b, T0 + HOUR)  # exactly at ask 1's expiry: it is expired
    assert facts[0] == AskExpired(oid(1), 1, T0 + HOUR)
    assert isinstance(facts[1], BidPlaced)
    assert matches(facts) == [(oid(2), b.id, 1, 100)]
    assert book.ask(oid(1)).status is OrderStatus.expired


def test_escrow_for_a_fill_is_the_lease_cost_rounded_up(book):
    place(book, ask(1, price=7, count=3))
    b = bid(2, max_price=7, count=3, duration_s=1_800)
    facts = place(book, b)
    matched = [f for f in facts if isinstance(f, OrderMatched)]
    assert [m.escrow_amount for m in matched] == [11]  # 10.5 up
    assert facts[-1] == BidRemainderRefunded(b.id, 12 - 11, T0)


def test_a_bid_filled_in_one_gpu_parts_still_has_escrow_for_each_part(book):
    b = bid(1, max_price=1, count=2, duration_s=1_800)
    assert b.escrow == 2
    place(book, b)
    assert [
        f.escrow_amount for f in place(book, ask(2, price=1)) if isinstance(f, OrderMatched)
    ] == [1]
    facts = place(book, ask(3, price=1))
    assert [f.escrow_amount for f in facts if isinstance(f, OrderMatched)] == [1]
    assert not any(isinstance(f, BidRemainderRefunded) for f in facts)  # nothing left over
    assert book.bid(b.id).escrow_remaining == 0


def test_a_bid_with_exactly_enough_escrow_filled_at_its_max_records_no_refund(book):
    place(book, ask(1, price=100, count=2))
    facts = place(book, bid(2, max_price=100, count=2))
    assert [type(f) for f in facts] == [BidPlaced, OrderMatched]


# -- cancel -------------------------------------------------------------------------------


def test_cancelling_a_resting_ask_takes_its_remainder_off_the_book(book):
    place(book, ask(1, price=100, count=3))
    place(book, bid(2, max_price=100, count=1))
    result, facts = book.cancel_ask(CancelAsk(oid(1), PROVIDER), T0)
    assert (result, facts) == (C.ok, [AskCancelled(oid(1), 2, T0)])
    assert book.ask(oid(1)).status is OrderStatus.cancelled
    assert book.ask_depth() == []


def test_cancelling_a_resting_bid_refunds_the_escrow_its_fills_did_not_use(book):
    place(book, ask(1, price=80, count=1))
    place(book, bid(2, max_price=100, count=3))
    result, facts = book.cancel_bid(CancelBid(oid(2), CONSUMER), T0)
    assert (result, facts) == (
        C.ok,
        [BidCancelled(oid(2), 2, T0), BidRemainderRefunded(oid(2), 300 - 80, T0)],
    )
    assert book.bid(oid(2)).escrow_remaining == 0
    assert book.best_bid() is None


def test_cancelling_an_order_already_cancelled_is_ok_and_records_nothing(book):
    place(book, ask(1, price=100))
    place(book, bid(2, max_price=90))
    book.cancel_ask(CancelAsk(oid(1), PROVIDER), T0)
    book.cancel_bid(CancelBid(oid(2), CONSUMER), T0)
    before = copy.deepcopy(book)
    assert book.cancel_ask(CancelAsk(oid(1), PROVIDER), T0) == (C.ok, [])
    assert book.cancel_bid(CancelBid(oid(2), CONSUMER), T0) == (C.ok, [])
    assert book == before


def test_cancelling_with_a_zero_id_is_refused(book):
    assert book.cancel_ask(CancelAsk(ZERO, PROVIDER), T0) == (C.id_must_not_be_zero, [])
    assert book.cancel_bid(CancelBid(ZERO, CONSUMER), T0) == (C.id_must_not_be_zero, [])


def test_cancelling_an_unknown_order_or_one_of_the_other_side_is_refused(book):
    place(book, ask(1, price=100))
    place(book, bid(2, max_price=90))
    assert book.cancel_ask(CancelAsk(oid(9), PROVIDER), T0) == (C.order_not_found, [])
    assert book.cancel_ask(CancelAsk(oid(2), PROVIDER), T0) == (C.order_not_found, [])
    assert book.cancel_bid(CancelBid(oid(1), CONSUMER), T0) == (C.order_not_found, [])


def test_only_the_owner_may_cancel_an_order(book):
    place(book, ask(1, price=100))
    place(book, bid(2, max_price=90))
    before = copy.deepcopy(book)
    assert book.cancel_ask(CancelAsk(oid(1), OTHER_PROVIDER), T0) == (C.canceller_must_be_owner, [])
    assert book.cancel_bid(CancelBid(oid(2), OTHER_CONSUMER), T0) == (C.canceller_must_be_owner, [])
    assert book == before


def test_cancelling_a_filled_order_is_refused(book):
    place(book, ask(1, price=100))
    place(book, bid(2, max_price=100))
    assert book.cancel_ask(CancelAsk(oid(1), PROVIDER), T0) == (C.order_already_filled, [])
    assert book.cancel_bid(CancelBid(oid(2), CONSUMER), T0) == (C.order_already_filled, [])


def test_cancelling_an_ask_past_its_expiry_expires_it_and_is_refused(book):
    place(book, ask(1, price=100, expires_at=T0 + HOUR))
    later = T0 + 2 * HOUR
    assert book.cancel_ask(CancelAsk(oid(1), PROVIDER), later) == (
        C.order_already_expired,
        [AskExpired(oid(1), 1, later)],
    )
    assert book.cancel_ask(CancelAsk(oid(1), PROVIDER), later) == (C.order_already_expired, [])


# -- expiry, time and queries ------------------------------------------------------------


def test_expire_removes_every_ask_due_in_expiry_order_and_nothing_else(book):
    place(book, ask(1, price=100, expires_at=T0 + 2 * HOUR))
    place(book, ask(2, price=110, count=2, expires_at=T0 + HOUR))
    place(book, ask(3, price=120, expires_at=T0 + 3 * HOUR))
    assert book.next_expiry_at() == T0 + HOUR
    now = T0 + 2 * HOUR
    assert book.expire(now) == [AskExpired(oid(2), 2, now), AskExpired(oid(1), 1, now)]
    assert book.ask_depth() == [DepthLevel(120, 1)]
    assert book.next_expiry_at() == T0 + 3 * HOUR
    assert book.expire(now) == []


def test_the_book_time_never_runs_backwards(book):
    place(book, ask(1, price=100), T0 + HOUR / 2)
    facts = place(book, ask(2, price=100, expires_at=T0 + HOUR), T0)
    assert facts == [AskPlaced(ask(2, price=100, expires_at=T0 + HOUR), 2, T0 + HOUR / 2)]
    # An expiry at or before the book's time is refused even if the caller's clock is behind.
    assert_refused(book, ask(3, expires_at=T0 + HOUR / 4), P.expiry_must_be_in_the_future, T0)
    assert book.now == T0 + HOUR / 2


def test_an_empty_book_has_no_best_prices_spread_depth_or_expiry(book):
    assert (book.best_ask(), book.best_bid(), book.spread(), book.next_expiry_at()) == (
        None,
        None,
        None,
        None,
    )
    assert (book.ask_depth(), book.bid_depth(), book.resting_count()) == ([], [], 0)
    assert book.ask(oid(1)) is None
    assert book.bid(oid(1)) is None


def test_depth_sums_gpus_per_price_level_best_first_and_honours_the_level_limit(book):
    place(book, ask(1, price=110, count=2))
    place(book, ask(2, price=100, count=1))
    place(book, ask(3, price=110, count=3))
    place(book, bid(4, max_price=90, count=4))
    place(book, bid(5, max_price=95, count=1))
    place(book, bid(6, max_price=90, count=2))
    assert book.ask_depth() == [DepthLevel(100, 1), DepthLevel(110, 5)]
    assert book.bid_depth() == [DepthLevel(95, 1), DepthLevel(90, 6)]
    assert book.ask_depth(levels_max=1) == [DepthLevel(100, 1)]
    assert book.bid_depth(levels_max=0) == []
    assert (book.best_ask(), book.best_bid(), book.spread()) == (100, 95, 5)
    assert [s.ask.id for s in book.resting_asks()] == [oid(2), oid(1), oid(3)]
    assert [s.bid.id for s in book.resting_bids()] == [oid(5), oid(4), oid(6)]
    assert book.resting_count() == 6


def test_replaying_the_facts_rebuilds_an_equal_book(book):
    facts: list[OrderBookFact] = []
    facts += place(book, ask(1, price=100, count=2, expires_at=T0 + HOUR))
    facts += place(book, ask(2, price=90, count=1, expires_at=T0 + 3 * HOUR))
    facts += place(book, bid(3, max_price=95, count=2))
    facts += place(book, bid(4, max_price=120, count=1), T0 + HOUR)
    facts += book.cancel_bid(CancelBid(oid(3), CONSUMER), T0 + HOUR)[1]
    assert replay(MODEL, facts) == book
    assert replay(MODEL, facts[:-1]) != book


def test_a_book_is_not_equal_to_something_that_is_not_a_book(book):
    assert book != "book"


# -- properties over random sequences -----------------------------------------------------

OWNERS = [UUID(int=0xD0 + i) for i in range(2)]


@dataclass(frozen=True)
class PlaceAskOp:
    n: int
    owner: int
    count: int
    price: int
    ttl_s: int


@dataclass(frozen=True)
class PlaceBidOp:
    n: int
    owner: int
    count: int
    max_price: int
    duration_s: int
    extra_escrow: int


@dataclass(frozen=True)
class CancelOp:
    side: str
    n: int
    owner: int


@dataclass(frozen=True)
class AdvanceOp:
    seconds: int
    expire: bool
    """Call expire() at the new time; else the next command meets the time move."""


order_numbers = st.integers(1, 16)
owner_indexes = st.integers(0, len(OWNERS) - 1)
operations = st.lists(
    st.one_of(
        st.builds(
            PlaceAskOp,
            n=order_numbers,
            owner=owner_indexes,
            count=st.integers(1, 4),
            price=st.integers(1, 5),
            ttl_s=st.integers(1, 600),
        ),
        st.builds(
            PlaceBidOp,
            n=order_numbers,
            owner=owner_indexes,
            count=st.integers(1, 4),
            max_price=st.integers(1, 5),
            duration_s=st.integers(1, 7_200),
            extra_escrow=st.integers(-1, 3),
        ),
        st.builds(
            CancelOp, side=st.sampled_from(["ask", "bid"]), n=order_numbers, owner=owner_indexes
        ),
        st.builds(AdvanceOp, seconds=st.integers(0, 400), expire=st.booleans()),
    ),
    max_size=40,
)


@dataclass
class Shadow:
    """What the test believes about each order, built from the facts alone."""

    asks: dict[UUID, Ask] = field(default_factory=dict)
    bids: dict[UUID, Bid] = field(default_factory=dict)
    sequence: dict[UUID, int] = field(default_factory=dict)
    remaining: dict[UUID, int] = field(default_factory=dict)
    filled: dict[UUID, int] = field(default_factory=dict)
    removed: dict[UUID, int] = field(default_factory=dict)
    """GPUs that left the book expired or cancelled."""
    escrow_used: dict[UUID, int] = field(default_factory=dict)
    refunded: dict[UUID, int] = field(default_factory=dict)
    last_sequence: int = 0

    def resting_asks(self) -> list[Ask]:
        return [a for i, a in self.asks.items() if self.remaining[i] > 0]

    def resting_bids(self) -> list[Bid]:
        return [b for i, b in self.bids.items() if self.remaining[i] > 0]

    def check(self, fact: OrderBookFact) -> None:
        """Check one fact against what came before it, then take it in."""
        if isinstance(fact, AskPlaced | BidPlaced):
            order = fact.ask if isinstance(fact, AskPlaced) else fact.bid
            assert fact.sequence == self.last_sequence + 1
            assert order.id not in self.sequence
            self.last_sequence = fact.sequence
            self.sequence[order.id] = fact.sequence
            self.remaining[order.id] = order.gpu_count
            self.filled[order.id] = self.removed[order.id] = 0
            if isinstance(fact, AskPlaced):
                assert fact.ask.expires_at > fact.placed_at
                self.asks[order.id] = fact.ask
            else:
                self.bids[order.id] = fact.bid
                self.escrow_used[order.id] = self.refunded[order.id] = 0
        elif isinstance(fact, OrderMatched):
            a, b = self.asks[fact.ask_id], self.bids[fact.bid_id]
            assert self.remaining[a.id] > 0 and self.remaining[b.id] > 0
            # Every fill is at the ask's price, never above the bid's max, never of an expired ask.
            assert fact.price_per_gpu_hour == a.price_per_gpu_hour
            assert fact.price_per_gpu_hour <= b.max_price_per_gpu_hour
            assert fact.matched_at < a.expires_at
            assert fact.gpu_count == min(self.remaining[a.id], self.remaining[b.id])
            assert fact.escrow_amount == lease_cost(
                fact.gpu_count, a.price_per_gpu_hour, b.duration_s
            )
            assert (fact.provider_id, fact.node_id, fact.consumer_id, fact.duration_s) == (
                a.provider_id,
                a.node_id,
                b.consumer_id,
                b.duration_s,
            )
            # Price-time priority: the newer order is the taker; the maker it met is the best
            # resting order of the other side (cheaper, or as cheap and earlier, is never skipped).
            if self.sequence[b.id] > self.sequence[a.id]:
                best = min(
                    self.resting_asks(), key=lambda x: (x.price_per_gpu_hour, self.sequence[x.id])
                )
                assert best.id == a.id
            else:
                best_bid = min(
                    self.resting_bids(),
                    key=lambda x: (-x.max_price_per_gpu_hour, self.sequence[x.id]),
                )
                assert best_bid.id == b.id
            for order_id in (a.id, b.id):
                self.remaining[order_id] -= fact.gpu_count
                self.filled[order_id] += fact.gpu_count
            self.escrow_used[b.id] += fact.escrow_amount
            assert self.escrow_used[b.id] <= b.escrow
        elif isinstance(fact, AskExpired):
            a = self.asks[fact.ask_id]
            assert a.expires_at <= fact.expired_at
            assert fact.gpu_count == self.remaining[a.id] > 0
            self.remaining[a.id] = 0
            self.removed[a.id] += fact.gpu_count
        elif isinstance(fact, AskCancelled | BidCancelled):
            order_id = fact.ask_id if isinstance(fact, AskCancelled) else fact.bid_id
            assert fact.gpu_count == self.remaining[order_id] > 0
            self.remaining[order_id] = 0
            self.removed[order_id] += fact.gpu_count
        else:
            b = self.bids[fact.bid_id]
            assert self.remaining[b.id] == 0 and self.refunded[b.id] == 0
            assert fact.escrow_amount == b.escrow - self.escrow_used[b.id] > 0
            self.refunded[b.id] = fact.escrow_amount


def fact_time(fact: OrderBookFact) -> datetime:
    if isinstance(fact, AskPlaced | BidPlaced):
        return fact.placed_at
    if isinstance(fact, OrderMatched):
        return fact.matched_at
    if isinstance(fact, AskExpired):
        return fact.expired_at
    if isinstance(fact, AskCancelled | BidCancelled):
        return fact.cancelled_at
    return fact.refunded_at


def run_step(
    book: OrderBook, op: object, now: datetime
) -> tuple[datetime, list[OrderBookFact], bool]:
    """Apply one operation; returns the new caller time, the facts, and whether it was ok."""
    if isinstance(op, AdvanceOp):
        now += timedelta(seconds=op.seconds)
        return now, list(book.expire(now)) if op.expire else [], True
    if isinstance(op, PlaceAskOp):
        result, facts = book.place_ask(
            ask(
                op.n,
                price=op.price,
                count=op.count,
                provider_id=OWNERS[op.owner],
                expires_at=now + timedelta(seconds=op.ttl_s),
            ),
            now,
        )
        return now, facts, result is P.ok
    if isinstance(op, PlaceBidOp):
        required = escrow_required(op.count, op.max_price, op.duration_s)
        result, facts = book.place_bid(
            bid(
                op.n,
                max_price=op.max_price,
                count=op.count,
                duration_s=op.duration_s,
                escrow=required + op.extra_escrow,
                consumer_id=OWNERS[op.owner],
            ),
            now,
        )
        assert (result is P.escrow_below_cost) == (op.extra_escrow < 0)
        return now, facts, result is P.ok
    assert isinstance(op, CancelOp)
    if op.side == "ask":
        cancelled, facts = book.cancel_ask(CancelAsk(oid(op.n), OWNERS[op.owner]), now)
    else:
        cancelled, facts = book.cancel_bid(CancelBid(oid(op.n), OWNERS[op.owner]), now)
    return now, facts, cancelled is C.ok


@settings(max_examples=200, deadline=None)
@given(
    resting=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3)), min_size=1, max_size=12),
    taker_price=st.integers(1, 3),
    taker_count=st.integers(1, 12),
    taker_is_bid=st.booleans(),
)
def test_a_new_order_meets_the_resting_orders_in_price_time_order(
    resting, taker_price, taker_count, taker_is_bid
):
    book = OrderBook(MODEL)
    # Resting orders of one side, (price, count) each, placed in list order (none cross).
    for n, (price, count) in enumerate(resting, start=1):
        place(
            book,
            ask(n, price=price, count=count)
            if taker_is_bid
            else bid(n, max_price=price, count=count),
        )
    # The expected fills: eligible resting orders sorted by price, then placement; greedy.
    if taker_is_bid:
        eligible = sorted(
            (price, n, count)
            for n, (price, count) in enumerate(resting, start=1)
            if price <= taker_price
        )
    else:
        eligible = sorted(
            (-price, n, count)
            for n, (price, count) in enumerate(resting, start=1)
            if price >= taker_price
        )
    expected = []
    wanted = taker_count
    taker = oid(100)
    for key, n, count in eligible:
        if wanted == 0:
            break
        filled = min(wanted, count)
        wanted -= filled
        if taker_is_bid:
            expected.append((oid(n), taker, filled, key))
        else:
            expected.append((taker, oid(n), filled, taker_price))
    if taker_is_bid:
        facts = place(book, bid(100, max_price=taker_price, count=taker_count))
    else:
        facts = place(book, ask(100, price=taker_price, count=taker_count))
    assert matches(facts) == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_random_sequences_keep_every_rule_of_the_book(ops):
    book = OrderBook(MODEL)
    shadow = Shadow()
    log: list[OrderBookFact] = []
    now = T0
    for op in ops:
        book_now_before, sequence_before = book.now, book.sequence
        now, facts, ok = run_step(book, op, now)
        step_now = now if book_now_before is None else max(now, book_now_before)
        # Every fact carries the step's time; expiries come first, and exactly the asks due.
        assert all(fact_time(f) == step_now for f in facts)
        expiries = [f for f in facts if isinstance(f, AskExpired)]
        assert facts[: len(expiries)] == expiries
        if not isinstance(op, AdvanceOp) or op.expire:
            assert {f.ask_id for f in expiries} == {
                a.id for a in shadow.resting_asks() if a.expires_at <= step_now
            }
        for fact in facts:
            shadow.check(fact)
        retried = isinstance(op, PlaceAskOp | PlaceBidOp) and book.sequence == sequence_before
        if not ok or retried:
            # Refused, or an idempotent retry: nothing but expiries was recorded.
            assert len(facts) == len(expiries)
        log += facts

        # The book never crosses.
        best_ask, best_bid = book.best_ask(), book.best_bid()
        if best_ask is not None and best_bid is not None:
            assert best_bid < best_ask
            assert book.spread() == best_ask - best_bid > 0
        # The book's view of every order agrees with the facts; GPUs and escrow are conserved.
        for order_id, a in shadow.asks.items():
            ask_standing = book.ask(order_id)
            assert ask_standing is not None
            assert ask_standing.gpu_count_remaining == shadow.remaining[order_id]
            assert (ask_standing.status is OrderStatus.resting) == (shadow.remaining[order_id] > 0)
            assert a.gpu_count == (
                shadow.filled[order_id] + shadow.remaining[order_id] + shadow.removed[order_id]
            )
        for order_id, b in shadow.bids.items():
            bid_standing = book.bid(order_id)
            assert bid_standing is not None
            assert bid_standing.gpu_count_remaining == shadow.remaining[order_id]
            assert b.gpu_count == (
                shadow.filled[order_id] + shadow.remaining[order_id] + shadow.removed[order_id]
            )
            assert shadow.escrow_used[order_id] <= b.escrow
            assert b.escrow == (
                shadow.escrow_used[order_id]
                + shadow.refunded[order_id]
                + bid_standing.escrow_remaining
            )
            if bid_standing.status is OrderStatus.resting:
                assert bid_standing.escrow_remaining >= escrow_required(
                    bid_standing.gpu_count_remaining, b.max_price_per_gpu_hour, b.duration_s
                )
            else:
                assert bid_standing.escrow_remaining == 0
        assert sum(level.gpu_count for level in book.ask_depth()) == sum(
            shadow.remaining[a.id] for a in shadow.resting_asks()
        )
        assert sum(level.gpu_count for level in book.bid_depth()) == sum(
            shadow.remaining[b.id] for b in shadow.resting_bids()
        )
        assert book.resting_count() == len(shadow.resting_asks()) + len(shadow.resting_bids())
    # Replaying the facts rebuilds the live book.
    assert replay(MODEL, log) == book
