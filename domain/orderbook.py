"""The order book of one GPU model: asks, bids, and price-time priority matching.

Pure: no I/O and no clock reads. Time (`now`) is passed in by the caller. Every accepted
command is turned into facts (past tense); applying those facts in log order to an empty
`OrderBook` of the same GPU model rebuilds exactly the live book (`replay`).

Orders
------
- An **ask** offers `gpu_count` GPUs of one node at `price_per_gpu_hour` until `expires_at`.
- A **bid** wants `gpu_count` GPUs for `duration_s` seconds at no more than
  `max_price_per_gpu_hour`, and arrives with its `escrow` already held.
- Money is an integer in the token's smallest unit; never a float.
- The cost of a lease is `lease_cost(gpu_count, price_per_gpu_hour, duration_s)`:
  `gpu_count * price_per_gpu_hour * duration_s / 3600`, rounded up to a whole unit.
- A bid's escrow must cover its worst case, `escrow_required(...)`:
  `gpu_count * ceil(max_price_per_gpu_hour * duration_s / 3600)`. The rounding is per GPU,
  not of the whole product, because a bid may be filled in parts, each fill opens its own
  lease, and each lease's cost is rounded up on its own; rounding the whole product only
  could leave the last fill one unit short. The difference is below `gpu_count` units.

Matching rules
--------------
1. Before any command, every resting ask whose `expires_at` is at or before `now` expires
   (`AskExpired`). An expired ask never matches. Bids do not expire; they rest until filled
   or cancelled.
2. Price-time priority. A new bid matches the resting asks with
   `price_per_gpu_hour <= max_price_per_gpu_hour`, cheapest first, and among equal prices
   the one placed first. A new ask matches the resting bids with
   `max_price_per_gpu_hour >= price_per_gpu_hour`, highest max price first, and among
   equal max prices the one placed first. "Placed first" is the book's own sequence number
   (`AskPlaced.sequence`, `BidPlaced.sequence`), never the clock.
3. A match (`OrderMatched`) fills `min(ask remaining, bid remaining)` GPUs, always at the
   **ask's** price (the lease opens at the ask price), for the bid's `duration_s`, and
   moves `lease_cost(count, ask price, duration_s)` of the bid's escrow to the lease. A bid
   is never matched above its max price.
4. Partial fills: whatever is left of the new order after matching rests in the book. So
   the book never crosses: after every command, best bid max price < best ask price.
5. When a bid leaves the book (fully filled or cancelled) with escrow it no longer needs,
   that escrow is released back to the consumer (`BidRemainderRefunded`).
6. Cancelling is done by the order's owner only, and cancels whatever remains.
7. The book's time never runs backwards: a command whose `now` is earlier than the latest
   fact is decided, and recorded, at the time of that fact.

Not the book's business (left to the services around it): whether the provider is bonded
and its node has the GPUs it offers, whether the escrow is really held in the ledger, and
self-trade (a provider's ask meeting a bid of the same party).

Idempotency: placing an order whose id exists with equal fields is `ok` and records
nothing new, whatever became of the order since. Cancelling an order already cancelled is
`ok` and records nothing new.

GPU counts are conserved: for every order, gpu_count = filled + resting + expired (or
cancelled). For every bid, escrow = escrow of its fills + refunded + held while resting.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum
from uuid import UUID

from ledger.limits import AMOUNT_MAX

# -- limits -------------------------------------------------------------------------------

SECONDS_PER_HOUR = 3_600
GPU_MODEL_LENGTH_MAX = 64
"""Longest GPU model name, e.g. "H100-SXM5-80GB"."""
GPU_COUNT_MAX = 1_024
"""Most GPUs in one order."""
PRICE_MAX = 10**24
"""Highest price per GPU-hour, in the smallest unit (one million tokens at 18 decimals)."""
DURATION_S_MAX = 365 * 24 * 3_600
"""Longest lease a bid may ask for."""
ESCROW_MAX = AMOUNT_MAX
"""Largest escrow (the ledger's largest amount). The largest escrow required by the other
limits, GPU_COUNT_MAX * PRICE_MAX * DURATION_S_MAX / 3600 (about 9e30), stays well below."""
ASK_TTL_S_MAX = 90 * 24 * 3_600
"""Furthest an ask's expires_at may lie after the time it is placed."""
ORDERS_PER_BOOK_MAX = 10_000
"""Most resting orders (asks and bids together) in one book; a new order beyond is refused
even when it would have matched at once."""
DEPTH_LEVELS_MAX = 1_000
"""Most price levels a depth query returns."""


def lease_cost(gpu_count: int, price_per_gpu_hour: int, duration_s: int) -> int:
    """gpu_count * price_per_gpu_hour * duration_s / 3600, rounded up, in integers."""
    return -(-(gpu_count * price_per_gpu_hour * duration_s) // SECONDS_PER_HOUR)


def escrow_required(gpu_count: int, max_price_per_gpu_hour: int, duration_s: int) -> int:
    """The escrow that covers a bid however it is filled: gpu_count leases of one GPU each
    at the max price, each rounded up. At least lease_cost() of the whole bid."""
    return gpu_count * lease_cost(1, max_price_per_gpu_hour, duration_s)


# -- result codes -------------------------------------------------------------------------


class PlaceOrderResult(IntEnum):
    """Result of placing an ask or a bid, in the order the rules are checked. Never renumber.

    Codes that concern one side only are skipped for the other (`node_id_...` and
    `expiry_...` are for asks, `consumer_id_...`, `duration_...` and `escrow_...` for bids).
    `ok` is also the answer to a retry whose fields equal the placed order; it records
    nothing new. Exists-checks come before the checks that depend on `now` or on the book's
    contents, so a retry gets `ok` however late it comes.
    """

    ok = 0
    id_must_not_be_zero = 1
    provider_id_must_not_be_zero = 2
    node_id_must_not_be_zero = 3
    consumer_id_must_not_be_zero = 4
    gpu_model_must_not_be_empty = 5
    gpu_model_exceeds_max_length = 6
    gpu_model_must_match_book = 7
    gpu_count_must_be_positive = 8
    gpu_count_exceeds_max = 9
    price_must_be_positive = 10
    """The ask's price_per_gpu_hour or the bid's max_price_per_gpu_hour."""
    price_exceeds_max = 11
    duration_must_be_positive = 12
    duration_exceeds_max = 13
    escrow_below_cost = 14
    """escrow < escrow_required(gpu_count, max_price_per_gpu_hour, duration_s)."""
    escrow_exceeds_max = 15
    exists_with_different_fields = 16
    exists_with_different_side = 17
    """The id is taken by an order of the other side (an ask id reused for a bid, or back)."""
    expiry_must_be_in_the_future = 18
    """expires_at <= now."""
    expiry_exceeds_max = 19
    """expires_at - now > ASK_TTL_S_MAX."""
    book_full = 20
    """ORDERS_PER_BOOK_MAX orders already rest in the book."""


class CancelOrderResult(IntEnum):
    """Result of cancelling an ask or a bid, in the order the rules are checked. Never
    renumber. Cancelling an order already cancelled is `ok` and records nothing new."""

    ok = 0
    id_must_not_be_zero = 1
    order_not_found = 2
    """No order of this side with this id was ever placed in this book."""
    canceller_must_be_owner = 3
    """The provider_id (for an ask) or consumer_id (for a bid) is not the order's owner."""
    order_already_filled = 4
    order_already_expired = 5


class OrderStatus(IntEnum):
    """Where an order stands."""

    resting = 1
    """In the book, with gpu_count_remaining > 0 (it may have been partly filled)."""
    filled = 2
    cancelled = 3
    expired = 4


# -- commands -----------------------------------------------------------------------------


def _require_types(
    kind: str,
    order_id: object,
    gpu_model: object,
    uuids: dict[str, object],
    ints: dict[str, object],
) -> None:
    """Raise TypeError for a field of the wrong type: a caller's bug (pydantic validates what
    users send), which must never reach the log. Money is an int, never a float or a bool."""
    for name, value in uuids.items():
        if not isinstance(value, UUID):
            raise TypeError(f"{kind} {order_id}: {name} must be a UUID, got {value!r}")
    for name, value in ints.items():
        if type(value) is not int:
            raise TypeError(f"{kind} {order_id}: {name} must be an int, got {value!r}")
    if not isinstance(gpu_model, str):
        raise TypeError(f"{kind} {order_id}: gpu_model must be a str, got {gpu_model!r}")


@dataclass(frozen=True, slots=True)
class Ask:
    """A provider's offer to rent out GPUs of one node. `id` is the idempotency key."""

    id: UUID
    provider_id: UUID
    node_id: UUID
    """The node whose GPUs are offered; the lease runs there."""
    gpu_model: str
    """Must equal the book's GPU model, exactly (case-sensitive)."""
    gpu_count: int
    """1..GPU_COUNT_MAX."""
    price_per_gpu_hour: int
    """1..PRICE_MAX, in the token's smallest unit. Every fill of this ask is at this price."""
    expires_at: datetime
    """After now and at most ASK_TTL_S_MAX later. At this instant what remains expires."""

    def __post_init__(self) -> None:
        _require_types(
            "ask",
            self.id,
            self.gpu_model,
            {"id": self.id, "provider_id": self.provider_id, "node_id": self.node_id},
            {"gpu_count": self.gpu_count, "price_per_gpu_hour": self.price_per_gpu_hour},
        )
        if not isinstance(self.expires_at, datetime):
            raise TypeError(f"ask {self.id}: expires_at must be a datetime")


@dataclass(frozen=True, slots=True)
class Bid:
    """A consumer's order for GPUs of one model, with its escrow. `id` is the idempotency
    key."""

    id: UUID
    consumer_id: UUID
    gpu_model: str
    """Must equal the book's GPU model, exactly (case-sensitive)."""
    gpu_count: int
    """1..GPU_COUNT_MAX; may be filled by several asks (one lease each)."""
    max_price_per_gpu_hour: int
    """1..PRICE_MAX, in the token's smallest unit. No fill is ever above it."""
    duration_s: int
    """1..DURATION_S_MAX: how long each lease opened for this bid runs."""
    escrow: int
    """Funds already held for this bid: at least escrow_required(gpu_count,
    max_price_per_gpu_hour, duration_s), at most ESCROW_MAX. What fills do not use is
    refunded when the bid leaves the book."""

    def __post_init__(self) -> None:
        _require_types(
            "bid",
            self.id,
            self.gpu_model,
            {"id": self.id, "consumer_id": self.consumer_id},
            {
                "gpu_count": self.gpu_count,
                "max_price_per_gpu_hour": self.max_price_per_gpu_hour,
                "duration_s": self.duration_s,
                "escrow": self.escrow,
            },
        )


@dataclass(frozen=True, slots=True)
class CancelAsk:
    """Command: cancel what remains of an ask."""

    ask_id: UUID
    provider_id: UUID
    """Who asks to cancel; must be the ask's provider."""


@dataclass(frozen=True, slots=True)
class CancelBid:
    """Command: cancel what remains of a bid and release its unused escrow."""

    bid_id: UUID
    consumer_id: UUID
    """Who asks to cancel; must be the bid's consumer."""


# -- facts --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AskPlaced:
    """Fact: an ask entered the book (and rests there until matches say otherwise)."""

    ask: Ask
    sequence: int
    """The book's sequence number, one more than the order placed before: time priority."""
    placed_at: datetime


@dataclass(frozen=True, slots=True)
class BidPlaced:
    """Fact: a bid entered the book with its escrow."""

    bid: Bid
    sequence: int
    """The book's sequence number, one more than the order placed before: time priority."""
    placed_at: datetime


@dataclass(frozen=True, slots=True)
class OrderMatched:
    """Fact: part or all of an ask filled part or all of a bid. Opens one lease."""

    ask_id: UUID
    bid_id: UUID
    provider_id: UUID
    node_id: UUID
    consumer_id: UUID
    gpu_model: str
    gpu_count: int
    """GPUs leased: min(ask remaining, bid remaining) at the time of the match."""
    price_per_gpu_hour: int
    """The ask's price (never above the bid's max price)."""
    duration_s: int
    """The bid's duration."""
    escrow_amount: int
    """Escrow moved from the bid to the lease: lease_cost(gpu_count, price_per_gpu_hour,
    duration_s)."""
    matched_at: datetime


@dataclass(frozen=True, slots=True)
class AskExpired:
    """Fact: an ask's expires_at passed; what remained of it left the book."""

    ask_id: UUID
    gpu_count: int
    """GPUs that were still resting and now are not."""
    expired_at: datetime
    """When the book noticed (the `now` of the command), at or after the ask's expires_at."""


@dataclass(frozen=True, slots=True)
class AskCancelled:
    """Fact: the provider cancelled what remained of an ask."""

    ask_id: UUID
    gpu_count: int
    """GPUs that were still resting and now are not."""
    cancelled_at: datetime


@dataclass(frozen=True, slots=True)
class BidCancelled:
    """Fact: the consumer cancelled what remained of a bid. Its unused escrow follows as
    `BidRemainderRefunded`."""

    bid_id: UUID
    gpu_count: int
    """GPUs that were still wanted and now are not."""
    cancelled_at: datetime


@dataclass(frozen=True, slots=True)
class BidRemainderRefunded:
    """Fact: a bid left the book (filled or cancelled) and the escrow its fills did not use
    goes back to the consumer. Recorded only when that amount is above zero."""

    bid_id: UUID
    escrow_amount: int
    refunded_at: datetime


OrderBookFact = (
    AskPlaced
    | BidPlaced
    | OrderMatched
    | AskExpired
    | AskCancelled
    | BidCancelled
    | BidRemainderRefunded
)
"""What the order book records."""


# -- views --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AskStanding:
    """Where an ask stands now."""

    ask: Ask
    sequence: int
    status: OrderStatus
    gpu_count_remaining: int
    """GPUs still resting (0 unless status is resting)."""


@dataclass(frozen=True, slots=True)
class BidStanding:
    """Where a bid stands now."""

    bid: Bid
    sequence: int
    status: OrderStatus
    gpu_count_remaining: int
    """GPUs still wanted (0 unless status is resting)."""
    escrow_remaining: int
    """Escrow still held for this bid (0 once it left the book)."""


@dataclass(frozen=True, slots=True)
class DepthLevel:
    """One price level of one side of the book."""

    price_per_gpu_hour: int
    gpu_count: int
    """Sum of the GPUs resting at this price."""


@dataclass(slots=True)
class _AskState:
    ask: Ask
    sequence: int
    status: OrderStatus
    gpu_count_remaining: int


@dataclass(slots=True)
class _BidState:
    bid: Bid
    sequence: int
    status: OrderStatus
    gpu_count_remaining: int
    escrow_remaining: int


def _ask_priority(state: _AskState) -> tuple[int, int]:
    return state.ask.price_per_gpu_hour, state.sequence


def _ask_expiry(state: _AskState) -> tuple[datetime, int]:
    return state.ask.expires_at, state.sequence


def _bid_priority(state: _BidState) -> tuple[int, int]:
    return -state.bid.max_price_per_gpu_hour, state.sequence


# -- the book -----------------------------------------------------------------------------


class OrderBook:
    """The asks and bids of one GPU model, every order ever placed in it, and the rules
    that match them (see the module docstring).

    `place_ask`, `place_bid`, `cancel_ask`, `cancel_bid` and `expire` decide and apply at
    once, returning the facts to persist in order; `apply` is the replay path for facts read
    back from the log. Two books are equal when their whole state is.
    """

    def __init__(self, gpu_model: str) -> None:
        if not gpu_model or len(gpu_model) > GPU_MODEL_LENGTH_MAX:
            raise ValueError(f"gpu_model must be 1..{GPU_MODEL_LENGTH_MAX} characters")
        self.gpu_model = gpu_model
        self.sequence = 0
        """The sequence number of the last order placed (0: none yet)."""
        self.now: datetime | None = None
        """The latest time recorded in a fact. A command with an earlier `now` is treated as
        happening at this time, so the book's time never runs backwards."""
        self._asks: dict[UUID, _AskState] = {}
        self._bids: dict[UUID, _BidState] = {}
        self._asks_by_priority: list[_AskState] = []
        """Resting asks, best first: (price, sequence) ascending."""
        self._bids_by_priority: list[_BidState] = []
        """Resting bids, best first: (-max price, sequence) ascending."""
        self._asks_by_expiry: list[_AskState] = []
        """Resting asks, (expires_at, sequence) ascending."""
        self._ask_depth: dict[int, int] = {}
        self._bid_depth: dict[int, int] = {}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OrderBook):
            return NotImplemented
        return (
            self.gpu_model == other.gpu_model
            and self.sequence == other.sequence
            and self.now == other.now
            and self._asks == other._asks
            and self._bids == other._bids
            and [s.ask.id for s in self._asks_by_priority]
            == [s.ask.id for s in other._asks_by_priority]
            and [s.bid.id for s in self._bids_by_priority]
            == [s.bid.id for s in other._bids_by_priority]
            and [s.ask.id for s in self._asks_by_expiry]
            == [s.ask.id for s in other._asks_by_expiry]
            and self._ask_depth == other._ask_depth
            and self._bid_depth == other._bid_depth
        )

    # -- queries ------------------------------------------------------------------------

    def ask(self, ask_id: UUID) -> AskStanding | None:
        state = self._asks.get(ask_id)
        if state is None:
            return None
        return AskStanding(state.ask, state.sequence, state.status, state.gpu_count_remaining)

    def bid(self, bid_id: UUID) -> BidStanding | None:
        state = self._bids.get(bid_id)
        if state is None:
            return None
        return BidStanding(
            state.bid,
            state.sequence,
            state.status,
            state.gpu_count_remaining,
            state.escrow_remaining,
        )

    def resting_asks(self) -> list[AskStanding]:
        """Resting asks in priority order: cheapest first, then placed first."""
        return [
            AskStanding(s.ask, s.sequence, s.status, s.gpu_count_remaining)
            for s in self._asks_by_priority
        ]

    def resting_bids(self) -> list[BidStanding]:
        """Resting bids in priority order: highest max price first, then placed first."""
        return [
            BidStanding(s.bid, s.sequence, s.status, s.gpu_count_remaining, s.escrow_remaining)
            for s in self._bids_by_priority
        ]

    def resting_count(self) -> int:
        """Orders resting in the book, asks and bids together."""
        return len(self._asks_by_priority) + len(self._bids_by_priority)

    def ask_depth(self, levels_max: int = DEPTH_LEVELS_MAX) -> list[DepthLevel]:
        """GPUs resting per ask price, cheapest first, at most `levels_max` levels."""
        prices = sorted(self._ask_depth)[: max(0, min(levels_max, DEPTH_LEVELS_MAX))]
        return [DepthLevel(price, self._ask_depth[price]) for price in prices]

    def bid_depth(self, levels_max: int = DEPTH_LEVELS_MAX) -> list[DepthLevel]:
        """GPUs wanted per bid max price, highest first, at most `levels_max` levels."""
        prices = sorted(self._bid_depth, reverse=True)[: max(0, min(levels_max, DEPTH_LEVELS_MAX))]
        return [DepthLevel(price, self._bid_depth[price]) for price in prices]

    def best_ask(self) -> int | None:
        """The lowest resting ask price per GPU-hour, or None when no ask rests."""
        return self._asks_by_priority[0].ask.price_per_gpu_hour if self._asks_by_priority else None

    def best_bid(self) -> int | None:
        """The highest resting bid max price per GPU-hour, or None when no bid rests."""
        if not self._bids_by_priority:
            return None
        return self._bids_by_priority[0].bid.max_price_per_gpu_hour

    def spread(self) -> int | None:
        """best_ask - best_bid (always > 0: the book never crosses), or None when a side is
        empty."""
        best_ask, best_bid = self.best_ask(), self.best_bid()
        if best_ask is None or best_bid is None:
            return None
        return best_ask - best_bid

    def next_expiry_at(self) -> datetime | None:
        """When the next resting ask expires, or None when no ask rests."""
        return self._asks_by_expiry[0].ask.expires_at if self._asks_by_expiry else None

    # -- commands -----------------------------------------------------------------------

    def place_ask(self, ask: Ask, now: datetime) -> tuple[PlaceOrderResult, list[OrderBookFact]]:
        """Expire what is due at `now`, then check the ask, place it and match it against
        the resting bids. Returns the result and the facts to persist, in order (expiries
        are returned even when the ask is refused)."""
        now = self._clock(now)
        facts: list[OrderBookFact] = list(self.expire(now))
        result = self._check_ask(ask, now)
        if result is not PlaceOrderResult.ok or ask.id in self._asks:
            return result, facts
        self._record(AskPlaced(ask, self.sequence + 1, now), facts)
        taker = self._asks[ask.id]
        for _ in range(ORDERS_PER_BOOK_MAX + 1):
            if taker.gpu_count_remaining == 0 or not self._bids_by_priority:
                return result, facts
            maker = self._bids_by_priority[0]
            if maker.bid.max_price_per_gpu_hour < ask.price_per_gpu_hour:
                return result, facts
            self._fill(taker, maker, now, facts)
        raise AssertionError(f"ask {ask.id}: matching did not end")

    def place_bid(self, bid: Bid, now: datetime) -> tuple[PlaceOrderResult, list[OrderBookFact]]:
        """Expire what is due at `now`, then check the bid, place it and match it against
        the resting asks. Returns the result and the facts to persist, in order (expiries
        are returned even when the bid is refused)."""
        now = self._clock(now)
        facts: list[OrderBookFact] = list(self.expire(now))
        result = self._check_bid(bid)
        if result is not PlaceOrderResult.ok or bid.id in self._bids:
            return result, facts
        self._record(BidPlaced(bid, self.sequence + 1, now), facts)
        taker = self._bids[bid.id]
        for _ in range(ORDERS_PER_BOOK_MAX + 1):
            if taker.gpu_count_remaining == 0 or not self._asks_by_priority:
                return result, facts
            maker = self._asks_by_priority[0]
            if maker.ask.price_per_gpu_hour > bid.max_price_per_gpu_hour:
                return result, facts
            self._fill(maker, taker, now, facts)
        raise AssertionError(f"bid {bid.id}: matching did not end")

    def cancel_ask(
        self, command: CancelAsk, now: datetime
    ) -> tuple[CancelOrderResult, list[OrderBookFact]]:
        """Expire what is due at `now`, then cancel what remains of the ask."""
        r = CancelOrderResult
        now = self._clock(now)
        facts: list[OrderBookFact] = list(self.expire(now))
        if not command.ask_id.int:
            return r.id_must_not_be_zero, facts
        state = self._asks.get(command.ask_id)
        if state is None:
            return r.order_not_found, facts
        if state.ask.provider_id != command.provider_id:
            return r.canceller_must_be_owner, facts
        if state.status is OrderStatus.filled:
            return r.order_already_filled, facts
        if state.status is OrderStatus.expired:
            return r.order_already_expired, facts
        if state.status is OrderStatus.resting:
            self._record(AskCancelled(state.ask.id, state.gpu_count_remaining, now), facts)
        return r.ok, facts

    def cancel_bid(
        self, command: CancelBid, now: datetime
    ) -> tuple[CancelOrderResult, list[OrderBookFact]]:
        """Expire what is due at `now`, then cancel what remains of the bid and refund its
        unused escrow."""
        r = CancelOrderResult
        now = self._clock(now)
        facts: list[OrderBookFact] = list(self.expire(now))
        if not command.bid_id.int:
            return r.id_must_not_be_zero, facts
        state = self._bids.get(command.bid_id)
        if state is None:
            return r.order_not_found, facts
        if state.bid.consumer_id != command.consumer_id:
            return r.canceller_must_be_owner, facts
        if state.status is OrderStatus.filled:
            return r.order_already_filled, facts
        assert state.status is not OrderStatus.expired, "bids do not expire"
        if state.status is OrderStatus.resting:
            self._record(BidCancelled(state.bid.id, state.gpu_count_remaining, now), facts)
            self._refund_remainder(state, now, facts)
        return r.ok, facts

    def expire(self, now: datetime) -> list[AskExpired]:
        """Expire every resting ask whose expires_at is at or before `now`, earliest first."""
        now = self._clock(now)
        expired: list[AskExpired] = []
        for _ in range(len(self._asks_by_expiry)):
            first = self._asks_by_expiry[0]
            if first.ask.expires_at > now:
                break
            fact = AskExpired(first.ask.id, first.gpu_count_remaining, now)
            self.apply(fact)
            expired.append(fact)
        return expired

    # -- replay -------------------------------------------------------------------------

    def apply(self, fact: OrderBookFact) -> None:
        """Apply a fact read back from the log (already validated when it was decided)."""
        if isinstance(fact, OrderMatched):
            ask, bid = self._asks[fact.ask_id], self._bids[fact.bid_id]
            assert fact.price_per_gpu_hour == ask.ask.price_per_gpu_hour
            assert fact.price_per_gpu_hour <= bid.bid.max_price_per_gpu_hour
            assert fact.escrow_amount <= bid.escrow_remaining
            self._take_ask(ask, fact.gpu_count, OrderStatus.filled)
            self._take_bid(bid, fact.gpu_count, OrderStatus.filled)
            bid.escrow_remaining -= fact.escrow_amount
            self._see(fact.matched_at)
        elif isinstance(fact, AskPlaced):
            self._apply_ask_placed(fact)
        elif isinstance(fact, BidPlaced):
            self._apply_bid_placed(fact)
        elif isinstance(fact, AskExpired):
            ask = self._asks[fact.ask_id]
            assert fact.gpu_count == ask.gpu_count_remaining
            self._take_ask(ask, fact.gpu_count, OrderStatus.expired)
            self._see(fact.expired_at)
        elif isinstance(fact, AskCancelled):
            ask = self._asks[fact.ask_id]
            assert fact.gpu_count == ask.gpu_count_remaining
            self._take_ask(ask, fact.gpu_count, OrderStatus.cancelled)
            self._see(fact.cancelled_at)
        elif isinstance(fact, BidCancelled):
            bid = self._bids[fact.bid_id]
            assert fact.gpu_count == bid.gpu_count_remaining
            self._take_bid(bid, fact.gpu_count, OrderStatus.cancelled)
            self._see(fact.cancelled_at)
        else:
            bid = self._bids[fact.bid_id]
            assert bid.status is not OrderStatus.resting, "a resting bid keeps its escrow"
            assert fact.escrow_amount == bid.escrow_remaining
            bid.escrow_remaining = 0
            self._see(fact.refunded_at)

    # -- rules --------------------------------------------------------------------------

    def _check_order(self, gpu_model: str, gpu_count: int, price: int) -> PlaceOrderResult:
        """The checks asks and bids share, from gpu_model to price."""
        r = PlaceOrderResult
        if not gpu_model:
            return r.gpu_model_must_not_be_empty
        if len(gpu_model) > GPU_MODEL_LENGTH_MAX:
            return r.gpu_model_exceeds_max_length
        if gpu_model != self.gpu_model:
            return r.gpu_model_must_match_book
        if gpu_count <= 0:
            return r.gpu_count_must_be_positive
        if gpu_count > GPU_COUNT_MAX:
            return r.gpu_count_exceeds_max
        if price <= 0:
            return r.price_must_be_positive
        if price > PRICE_MAX:
            return r.price_exceeds_max
        return r.ok

    def _check_ask(self, ask: Ask, now: datetime) -> PlaceOrderResult:
        r = PlaceOrderResult
        if not ask.id.int:
            return r.id_must_not_be_zero
        if not ask.provider_id.int:
            return r.provider_id_must_not_be_zero
        if not ask.node_id.int:
            return r.node_id_must_not_be_zero
        result = self._check_order(ask.gpu_model, ask.gpu_count, ask.price_per_gpu_hour)
        if result is not r.ok:
            return result
        existing = self._asks.get(ask.id)
        if existing is not None:
            return r.ok if existing.ask == ask else r.exists_with_different_fields
        if ask.id in self._bids:
            return r.exists_with_different_side
        if ask.expires_at <= now:
            return r.expiry_must_be_in_the_future
        if ask.expires_at - now > timedelta(seconds=ASK_TTL_S_MAX):
            return r.expiry_exceeds_max
        if self.resting_count() >= ORDERS_PER_BOOK_MAX:
            return r.book_full
        return r.ok

    def _check_bid(self, bid: Bid) -> PlaceOrderResult:
        r = PlaceOrderResult
        if not bid.id.int:
            return r.id_must_not_be_zero
        if not bid.consumer_id.int:
            return r.consumer_id_must_not_be_zero
        result = self._check_order(bid.gpu_model, bid.gpu_count, bid.max_price_per_gpu_hour)
        if result is not r.ok:
            return result
        if bid.duration_s <= 0:
            return r.duration_must_be_positive
        if bid.duration_s > DURATION_S_MAX:
            return r.duration_exceeds_max
        if bid.escrow < escrow_required(bid.gpu_count, bid.max_price_per_gpu_hour, bid.duration_s):
            return r.escrow_below_cost
        if bid.escrow > ESCROW_MAX:
            return r.escrow_exceeds_max
        existing = self._bids.get(bid.id)
        if existing is not None:
            return r.ok if existing.bid == bid else r.exists_with_different_fields
        if bid.id in self._asks:
            return r.exists_with_different_side
        if self.resting_count() >= ORDERS_PER_BOOK_MAX:
            return r.book_full
        return r.ok

    def _fill(
        self, ask: _AskState, bid: _BidState, now: datetime, facts: list[OrderBookFact]
    ) -> None:
        """Match a resting ask with a resting bid for as many GPUs as both still have."""
        price = ask.ask.price_per_gpu_hour
        assert price <= bid.bid.max_price_per_gpu_hour, "never above the bid's max price"
        assert ask.ask.expires_at > now, "an expired ask never matches"
        gpu_count = min(ask.gpu_count_remaining, bid.gpu_count_remaining)
        escrow_amount = lease_cost(gpu_count, price, bid.bid.duration_s)
        assert escrow_amount <= bid.escrow_remaining, "escrow_required covers every split"
        self._record(
            OrderMatched(
                ask_id=ask.ask.id,
                bid_id=bid.bid.id,
                provider_id=ask.ask.provider_id,
                node_id=ask.ask.node_id,
                consumer_id=bid.bid.consumer_id,
                gpu_model=self.gpu_model,
                gpu_count=gpu_count,
                price_per_gpu_hour=price,
                duration_s=bid.bid.duration_s,
                escrow_amount=escrow_amount,
                matched_at=now,
            ),
            facts,
        )
        if bid.gpu_count_remaining == 0:
            self._refund_remainder(bid, now, facts)

    def _refund_remainder(self, bid: _BidState, now: datetime, facts: list[OrderBookFact]) -> None:
        if bid.escrow_remaining > 0:
            self._record(BidRemainderRefunded(bid.bid.id, bid.escrow_remaining, now), facts)

    # -- appliers (shared by decisions and replay) --------------------------------------

    def _record(self, fact: OrderBookFact, facts: list[OrderBookFact]) -> None:
        self.apply(fact)
        facts.append(fact)

    def _clock(self, now: datetime) -> datetime:
        """The time of the next facts: `now`, but never before the latest recorded."""
        return now if self.now is None or now > self.now else self.now

    def _see(self, at: datetime) -> None:
        if self.now is None or at > self.now:
            self.now = at

    def _apply_ask_placed(self, fact: AskPlaced) -> None:
        ask = fact.ask
        assert fact.sequence == self.sequence + 1, "sequence numbers have no gaps"
        assert ask.gpu_model == self.gpu_model
        assert ask.id not in self._asks and ask.id not in self._bids
        state = _AskState(ask, fact.sequence, OrderStatus.resting, ask.gpu_count)
        self._asks[ask.id] = state
        insort(self._asks_by_priority, state, key=_ask_priority)
        insort(self._asks_by_expiry, state, key=_ask_expiry)
        price = ask.price_per_gpu_hour
        self._ask_depth[price] = self._ask_depth.get(price, 0) + ask.gpu_count
        self.sequence = fact.sequence
        self._see(fact.placed_at)

    def _apply_bid_placed(self, fact: BidPlaced) -> None:
        bid = fact.bid
        assert fact.sequence == self.sequence + 1, "sequence numbers have no gaps"
        assert bid.gpu_model == self.gpu_model
        assert bid.id not in self._bids and bid.id not in self._asks
        state = _BidState(bid, fact.sequence, OrderStatus.resting, bid.gpu_count, bid.escrow)
        self._bids[bid.id] = state
        insort(self._bids_by_priority, state, key=_bid_priority)
        price = bid.max_price_per_gpu_hour
        self._bid_depth[price] = self._bid_depth.get(price, 0) + bid.gpu_count
        self.sequence = fact.sequence
        self._see(fact.placed_at)

    def _take_ask(self, state: _AskState, gpu_count: int, status_when_empty: OrderStatus) -> None:
        """Take GPUs off a resting ask; once none remain it leaves the book."""
        assert state.status is OrderStatus.resting
        assert 0 < gpu_count <= state.gpu_count_remaining
        state.gpu_count_remaining -= gpu_count
        _take_depth(self._ask_depth, state.ask.price_per_gpu_hour, gpu_count)
        if state.gpu_count_remaining == 0:
            state.status = status_when_empty
            index = bisect_left(self._asks_by_priority, _ask_priority(state), key=_ask_priority)
            assert self._asks_by_priority[index] is state
            del self._asks_by_priority[index]
            index = bisect_left(self._asks_by_expiry, _ask_expiry(state), key=_ask_expiry)
            assert self._asks_by_expiry[index] is state
            del self._asks_by_expiry[index]

    def _take_bid(self, state: _BidState, gpu_count: int, status_when_empty: OrderStatus) -> None:
        """Take GPUs off a resting bid; once none remain it leaves the book."""
        assert state.status is OrderStatus.resting
        assert 0 < gpu_count <= state.gpu_count_remaining
        state.gpu_count_remaining -= gpu_count
        _take_depth(self._bid_depth, state.bid.max_price_per_gpu_hour, gpu_count)
        if state.gpu_count_remaining == 0:
            state.status = status_when_empty
            index = bisect_left(self._bids_by_priority, _bid_priority(state), key=_bid_priority)
            assert self._bids_by_priority[index] is state
            del self._bids_by_priority[index]


def _take_depth(depth: dict[int, int], price: int, gpu_count: int) -> None:
    left = depth[price] - gpu_count
    assert left >= 0
    if left:
        depth[price] = left
    else:
        del depth[price]


def replay(gpu_model: str, facts: Iterable[OrderBookFact]) -> OrderBook:
    """Rebuild the order book of one GPU model from its facts in log order."""
    book = OrderBook(gpu_model)
    for fact in facts:
        book.apply(fact)
    return book


__all__ = [
    "ASK_TTL_S_MAX",
    "DEPTH_LEVELS_MAX",
    "DURATION_S_MAX",
    "ESCROW_MAX",
    "GPU_COUNT_MAX",
    "GPU_MODEL_LENGTH_MAX",
    "ORDERS_PER_BOOK_MAX",
    "PRICE_MAX",
    "SECONDS_PER_HOUR",
    "Ask",
    "AskCancelled",
    "AskExpired",
    "AskPlaced",
    "AskStanding",
    "Bid",
    "BidCancelled",
    "BidPlaced",
    "BidRemainderRefunded",
    "BidStanding",
    "CancelAsk",
    "CancelBid",
    "CancelOrderResult",
    "DepthLevel",
    "OrderBook",
    "OrderBookFact",
    "OrderMatched",
    "OrderStatus",
    "PlaceOrderResult",
    "escrow_required",
    "lease_cost",
    "replay",
]
