"""The order books: every order ever placed and the depth of each side, per GPU model.

Read from the marketplace log's order book facts (`domain.orderbook`), applied with the
semantics of `OrderBook.apply`, so that the view of a GPU model equals
`domain.orderbook.replay(gpu_model, facts)`: the same orders with the same status, GPUs
remaining and escrow remaining, the same depth per price level, the same sequence and time.

Tables (schema of the view recorder):

- `market_orderbook_books`: one row per GPU model: the last sequence number given out and the
  book's time (the latest time of its facts).
- `market_orderbook_orders`: one row per ask or bid: side, owner (provider or consumer),
  node (asks), price (the ask's price, the bid's max price), GPUs placed and remaining,
  status (`OrderStatus`), and for bids the duration and escrow placed, remaining, refunded.
- `market_orderbook_depth`: GPUs resting per (gpu_model, side, price_per_gpu_hour); a level whose
  count reaches zero is deleted, as the book deletes it.

Money (prices, escrow) is NUMERIC(78,0) and an int in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL

from domain.orderbook import (
    DEPTH_LEVELS_MAX,
    AskCancelled,
    AskExpired,
    AskPlaced,
    BidCancelled,
    BidPlaced,
    BidRemainderRefunded,
    DepthLevel,
    OrderMatched,
    OrderStatus,
)
from projections.view import (
    MarketProjection,
    MarketProjectionError,
    MarketViewRecorder,
    Page,
    table,
)

VIEW_NAME = "market_orderbook"
"""Name of the view: the prefix of its tracking table."""
BOOKS_TABLE_NAME = "market_orderbook_books"
ORDERS_TABLE_NAME = "market_orderbook_orders"
DEPTH_TABLE_NAME = "market_orderbook_depth"


class Side(StrEnum):
    """The side of an order, as stored."""

    ask = "ask"
    bid = "bid"


@dataclass(frozen=True, slots=True)
class BookRow:
    """One GPU model's book."""

    gpu_model: str
    sequence: int
    """The sequence number of the last order placed."""
    latest_at: datetime
    """The latest time recorded in a fact of this book (`OrderBook.now`)."""
    updated_position: int


@dataclass(frozen=True, slots=True)
class OrderRow:
    """One ask or bid and where it stands. Amounts in the token's smallest unit."""

    order_id: UUID
    side: Side
    gpu_model: str
    owner_id: UUID
    """The ask's provider or the bid's consumer."""
    node_id: UUID | None
    """The ask's node; None for a bid."""
    sequence: int
    price_per_gpu_hour: int
    """The ask's price, or the bid's max price."""
    gpu_count: int
    gpu_count_remaining: int
    """GPUs still resting (0 unless status is resting)."""
    status: OrderStatus
    duration_s: int | None
    """The bid's duration; None for an ask."""
    escrow: int | None
    """The bid's escrow when placed; None for an ask."""
    escrow_remaining: int | None
    """Escrow still held for the bid (0 once it left the book and was refunded)."""
    escrow_refunded: int | None
    """Escrow given back to the consumer when the bid left the book."""
    expires_at: datetime | None
    """The ask's expiry; None for a bid."""
    placed_at: datetime
    updated_position: int


@dataclass(frozen=True, slots=True)
class BookDepth:
    """Both sides of one GPU model's book, per price level."""

    gpu_model: str
    asks: tuple[DepthLevel, ...]
    """Cheapest first."""
    bids: tuple[DepthLevel, ...]
    """Highest max price first."""


_RESTING = int(OrderStatus.resting)


class OrderBookRecorder(MarketViewRecorder):
    """The order book view's tables and its tracking table; every write is tracked."""

    view_name = VIEW_NAME
    fact_types = (
        AskPlaced,
        BidPlaced,
        OrderMatched,
        AskExpired,
        AskCancelled,
        BidCancelled,
        BidRemainderRefunded,
    )
    tables = (
        table(
            BOOKS_TABLE_NAME,
            ("gpu_model",),
            gpu_model="text NOT NULL",
            sequence="bigint NOT NULL",
            latest_at="timestamptz NOT NULL",
            updated_position="bigint NOT NULL",
        ),
        table(
            ORDERS_TABLE_NAME,
            ("order_id",),
            indexes=(("gpu_model", "side", "sequence"),),
            order_id="uuid NOT NULL",
            side="text NOT NULL CHECK (side IN ('ask', 'bid'))",
            gpu_model="text NOT NULL",
            owner_id="uuid NOT NULL",
            node_id="uuid",
            sequence="bigint NOT NULL",
            price_per_gpu_hour="numeric(78,0) NOT NULL",
            gpu_count="int NOT NULL",
            gpu_count_remaining="int NOT NULL CHECK (gpu_count_remaining >= 0)",
            status="smallint NOT NULL",
            duration_s="bigint",
            escrow="numeric(78,0)",
            escrow_remaining="numeric(78,0) CHECK (escrow_remaining >= 0)",
            escrow_refunded="numeric(78,0)",
            expires_at="timestamptz",
            placed_at="timestamptz NOT NULL",
            updated_position="bigint NOT NULL",
        ),
        table(
            DEPTH_TABLE_NAME,
            ("gpu_model", "side", "price_per_gpu_hour"),
            gpu_model="text NOT NULL",
            side="text NOT NULL",
            price_per_gpu_hour="numeric(78,0) NOT NULL",
            gpu_count="int NOT NULL CHECK (gpu_count > 0)",
        ),
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        depth = self.table_sql(DEPTH_TABLE_NAME)
        self._best = {
            side: SQL(
                "SELECT {agg}(price_per_gpu_hour) AS price FROM {depth} "
                "WHERE gpu_model = %s AND side = %s"
            ).format(agg=SQL("min" if side is Side.ask else "max"), depth=depth)
            for side in Side
        }

    # -- writing ----------------------------------------------------------------------------

    def _apply_page(self, curs: Cursor[DictRow], events: Page) -> None:
        """Apply a page in memory: load the books, orders and depth levels it touches (one
        query each), apply every fact with the checks below, then write back each row that
        changed once (and delete the depth levels that emptied)."""
        _PageBooks(self, curs, events).apply()

    # -- queries ----------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Every GPU model that has a book, sorted."""
        return [r["gpu_model"] for r in self.read(BOOKS_TABLE_NAME)]

    def book(self, gpu_model: str) -> BookRow | None:
        rows = self.read(BOOKS_TABLE_NAME, SQL("gpu_model = %s"), (gpu_model,))
        return BookRow(**rows[0]) if rows else None

    def depth(self, gpu_model: str, levels_max: int = DEPTH_LEVELS_MAX) -> BookDepth:
        """Both sides of the book, at most `levels_max` levels each (DEPTH_LEVELS_MAX)."""
        limit = max(0, min(levels_max, DEPTH_LEVELS_MAX))
        sides: dict[Side, tuple[DepthLevel, ...]] = {}
        with self.datastore.transaction() as curs:
            curs.execute(SQL("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
            for side, direction in ((Side.ask, SQL("ASC")), (Side.bid, SQL("DESC"))):
                curs.execute(
                    SQL(
                        "SELECT price_per_gpu_hour, gpu_count FROM {depth} "
                        "WHERE gpu_model = %s AND side = %s "
                        "ORDER BY price_per_gpu_hour {direction} LIMIT %s"
                    ).format(depth=self.table_sql(DEPTH_TABLE_NAME), direction=direction),
                    (gpu_model, side.value, limit),
                )
                sides[side] = tuple(
                    DepthLevel(int(r["price_per_gpu_hour"]), r["gpu_count"])
                    for r in curs.fetchall()
                )
        return BookDepth(gpu_model, sides[Side.ask], sides[Side.bid])

    def best_ask(self, gpu_model: str) -> int | None:
        """The lowest resting ask price per GPU-hour, or None when no ask rests."""
        return self._best_price(gpu_model, Side.ask)

    def best_bid(self, gpu_model: str) -> int | None:
        """The highest resting bid max price per GPU-hour, or None when no bid rests."""
        return self._best_price(gpu_model, Side.bid)

    def _best_price(self, gpu_model: str, side: Side) -> int | None:
        with self.datastore.transaction() as curs:
            curs.execute(self._best[side], (gpu_model, side.value))
            row = curs.fetchone()
        price = None if row is None else row["price"]
        return None if price is None else int(price)

    def order(self, order_id: UUID) -> OrderRow | None:
        rows = self.read(ORDERS_TABLE_NAME, SQL("order_id = %s"), (order_id,))
        return _order(rows[0]) if rows else None

    def orders(self, gpu_model: str, *, resting_only: bool = False) -> list[OrderRow]:
        """The book's orders, asks then bids, each in placement order (at most
        ROWS_LISTED_MAX)."""
        where = SQL("gpu_model = %s")
        params: tuple[Any, ...] = (gpu_model,)
        if resting_only:
            where = SQL("gpu_model = %s AND status = %s")
            params = (gpu_model, _RESTING)
        rows = self.read(ORDERS_TABLE_NAME, where, params, order_by=("side", "sequence"))
        return [_order(r) for r in rows]


_DepthKey = tuple[str, str, int]
"""gpu_model, side, price_per_gpu_hour."""


class _PageBooks:
    """One page of order book facts applied to the rows they touch, then written back.

    The rules are the view's: a placed order takes its book's next sequence number (1 opens
    the book) and must be new; GPUs are taken only off a resting order of that side that
    has them (all it has left when `whole`) and, for a bid, the escrow they draw; an order
    with none left leaves the book; a depth level leaves the book with its last GPUs; a
    remainder is refunded only off a bid out of the book that holds exactly it; every fact
    moves its book's time on (the latest of its facts'). A fact that breaks one of them is
    `MarketProjectionError`, and the page's transaction writes nothing."""

    def __init__(self, recorder: OrderBookRecorder, curs: Cursor[DictRow], events: Page) -> None:
        self.recorder = recorder
        self.curs = curs
        self.events = events
        self.books: dict[str, dict[str, Any]] = {}
        self.orders: dict[UUID, dict[str, Any]] = {}
        self.depth: dict[_DepthKey, int] = {}
        self.depth_stored: set[_DepthKey] = set()
        self.books_changed: set[str] = set()
        self.orders_changed: set[UUID] = set()
        self.depth_changed: set[_DepthKey] = set()

    # -- loading ----------------------------------------------------------------------------

    def _load(self) -> None:
        order_ids: set[UUID] = set()
        models: set[str] = set()
        for _, event in self.events:
            fact = event.fact
            if isinstance(fact, AskPlaced):
                order_ids.add(fact.ask.id)
                models.add(fact.ask.gpu_model)
            elif isinstance(fact, BidPlaced):
                order_ids.add(fact.bid.id)
                models.add(fact.bid.gpu_model)
            elif isinstance(fact, OrderMatched):
                order_ids.update((fact.ask_id, fact.bid_id))
                models.add(fact.gpu_model)
            elif isinstance(fact, AskExpired | AskCancelled):
                order_ids.add(fact.ask_id)
            else:
                assert isinstance(fact, BidCancelled | BidRemainderRefunded)
                order_ids.add(fact.bid_id)
        r = self.recorder
        for row in r.select(
            self.curs, ORDERS_TABLE_NAME, SQL("order_id = ANY(%s)"), (list(order_ids),)
        ):
            self.orders[row["order_id"]] = row
            models.add(row["gpu_model"])
        for row in r.select(
            self.curs, BOOKS_TABLE_NAME, SQL("gpu_model = ANY(%s)"), (sorted(models),)
        ):
            self.books[row["gpu_model"]] = row
        for row in r.select(
            self.curs, DEPTH_TABLE_NAME, SQL("gpu_model = ANY(%s)"), (sorted(models),)
        ):
            key = (row["gpu_model"], row["side"], row["price_per_gpu_hour"])
            self.depth[key] = row["gpu_count"]
            self.depth_stored.add(key)

    # -- applying ---------------------------------------------------------------------------

    def apply(self) -> None:
        self._load()
        for position, event in self.events:
            self._apply(position, event.fact)
        self._write()

    def _apply(self, position: int, fact: Any) -> None:
        if isinstance(fact, OrderMatched):
            ask_model, ask_price, _ = self._take_order(
                position, Side.ask, fact.ask_id, fact.gpu_count, OrderStatus.filled
            )
            bid_model, bid_price, escrow_left = self._take_order(
                position,
                Side.bid,
                fact.bid_id,
                fact.gpu_count,
                OrderStatus.filled,
                escrow=fact.escrow_amount,
            )
            if not (
                ask_model == bid_model == fact.gpu_model
                and ask_price == fact.price_per_gpu_hour <= bid_price
                and escrow_left is not None
                and escrow_left >= 0
            ):
                raise MarketProjectionError(
                    f"notification {position}: match of ask {fact.ask_id} and bid "
                    f"{fact.bid_id} does not fit the orders"
                )
            self._see_at(position, fact.gpu_model, fact.matched_at)
        elif isinstance(fact, AskPlaced):
            ask = fact.ask
            self._place(
                position,
                sequence=fact.sequence,
                placed_at=fact.placed_at,
                order_id=ask.id,
                side=Side.ask,
                gpu_model=ask.gpu_model,
                owner_id=ask.provider_id,
                node_id=ask.node_id,
                price=ask.price_per_gpu_hour,
                gpu_count=ask.gpu_count,
                duration_s=None,
                escrow=None,
                refunded=None,
                expires_at=ask.expires_at,
            )
        elif isinstance(fact, BidPlaced):
            bid = fact.bid
            self._place(
                position,
                sequence=fact.sequence,
                placed_at=fact.placed_at,
                order_id=bid.id,
                side=Side.bid,
                gpu_model=bid.gpu_model,
                owner_id=bid.consumer_id,
                node_id=None,
                price=bid.max_price_per_gpu_hour,
                gpu_count=bid.gpu_count,
                duration_s=bid.duration_s,
                escrow=bid.escrow,
                refunded=0,
                expires_at=None,
            )
        elif isinstance(fact, AskExpired | AskCancelled):
            status, at = (
                (OrderStatus.expired, fact.expired_at)
                if isinstance(fact, AskExpired)
                else (OrderStatus.cancelled, fact.cancelled_at)
            )
            model, _, _ = self._take_order(
                position, Side.ask, fact.ask_id, fact.gpu_count, status, whole=True
            )
            self._see_at(position, model, at)
        elif isinstance(fact, BidCancelled):
            model, _, _ = self._take_order(
                position, Side.bid, fact.bid_id, fact.gpu_count, OrderStatus.cancelled, whole=True
            )
            self._see_at(position, model, fact.cancelled_at)
        else:
            assert isinstance(fact, BidRemainderRefunded)
            order = self.orders.get(fact.bid_id)
            if (
                order is None
                or order["side"] != Side.bid.value
                or order["status"] == _RESTING
                or order["escrow_remaining"] != fact.escrow_amount
            ):
                raise MarketProjectionError(
                    f"notification {position}: bid {fact.bid_id} has no remainder of "
                    f"{fact.escrow_amount} to refund"
                )
            order["escrow_refunded"] = order["escrow_remaining"]
            order["escrow_remaining"] = 0
            order["updated_position"] = position
            self.orders_changed.add(fact.bid_id)
            self._see_at(position, order["gpu_model"], fact.refunded_at)

    def _place(
        self,
        position: int,
        *,
        sequence: int,
        placed_at: datetime,
        order_id: UUID,
        side: Side,
        gpu_model: str,
        owner_id: UUID,
        node_id: UUID | None,
        price: int,
        gpu_count: int,
        duration_s: int | None,
        escrow: int | None,
        refunded: int | None,
        expires_at: datetime | None,
    ) -> None:
        """An order enters its book: the next sequence number, a row, its depth."""
        book = self.books.get(gpu_model)
        if book is not None and book["sequence"] == sequence - 1:
            book["sequence"] = sequence
            book["latest_at"] = max(book["latest_at"], placed_at)
            book["updated_position"] = position
        elif book is None and sequence == 1:
            self.books[gpu_model] = {
                "gpu_model": gpu_model,
                "sequence": sequence,
                "latest_at": placed_at,
                "updated_position": position,
            }
        else:
            raise MarketProjectionError(
                f"notification {position}: order {order_id} has sequence "
                f"{sequence}, not the next of book {gpu_model!r}"
            )
        self.books_changed.add(gpu_model)
        if order_id in self.orders:
            raise MarketProjectionError(f"notification {position}: order {order_id} placed twice")
        if gpu_count < 0 or (escrow is not None and escrow < 0):
            raise MarketProjectionError(
                f"notification {position}: order {order_id} placed with a negative amount"
            )
        self.orders[order_id] = {
            "order_id": order_id,
            "side": side.value,
            "gpu_model": gpu_model,
            "owner_id": owner_id,
            "node_id": node_id,
            "sequence": sequence,
            "price_per_gpu_hour": price,
            "gpu_count": gpu_count,
            "gpu_count_remaining": gpu_count,
            "status": _RESTING,
            "duration_s": duration_s,
            "escrow": escrow,
            "escrow_remaining": escrow,
            "escrow_refunded": refunded,
            "expires_at": expires_at,
            "placed_at": placed_at,
            "updated_position": position,
        }
        self.orders_changed.add(order_id)
        key = (gpu_model, side.value, price)
        count = self.depth.get(key, 0) + gpu_count
        if count <= 0:
            raise MarketProjectionError(
                f"notification {position}: depth of {gpu_model!r} {side.value} {price} "
                f"would hold {count} GPUs"
            )
        self.depth[key] = count
        self.depth_changed.add(key)

    def _take_order(
        self,
        position: int,
        side: Side,
        order_id: UUID,
        gpu_count: int,
        status_when_empty: OrderStatus,
        *,
        escrow: int = 0,
        whole: bool = False,
    ) -> tuple[str, int, int | None]:
        """Take GPUs off a resting order (all it has left when `whole`), and off its depth
        level; once none remain the order leaves the book with `status_when_empty`.
        Returns the order's GPU model, price and escrow remaining (None for an ask)."""
        order = self.orders.get(order_id)
        if order is None or not (
            order["side"] == side.value
            and order["status"] == _RESTING
            and gpu_count > 0
            and order["gpu_count_remaining"] >= gpu_count
            and (not whole or order["gpu_count_remaining"] == gpu_count)
            and (order["escrow_remaining"] is None or order["escrow_remaining"] >= escrow)
        ):
            raise MarketProjectionError(
                f"notification {position}: {side.value} {order_id} is not resting with "
                f"{gpu_count} GPUs to take"
            )
        if order["gpu_count_remaining"] == gpu_count:
            order["status"] = int(status_when_empty)
        order["gpu_count_remaining"] -= gpu_count
        if order["escrow_remaining"] is not None:
            order["escrow_remaining"] -= escrow
        order["updated_position"] = position
        self.orders_changed.add(order_id)
        gpu_model: str = order["gpu_model"]
        price: int = order["price_per_gpu_hour"]
        key = (gpu_model, side.value, price)
        level = self.depth.get(key, 0)
        if level < gpu_count:
            raise MarketProjectionError(
                f"notification {position}: depth of {gpu_model!r} {side.value} {price} "
                f"below {gpu_count}"
            )
        # The level leaves the book with its last GPUs, as the book deletes it.
        if level == gpu_count:
            del self.depth[key]
        else:
            self.depth[key] = level - gpu_count
        self.depth_changed.add(key)
        left: int | None = order["escrow_remaining"]
        return gpu_model, price, left

    def _see_at(self, position: int, gpu_model: str, at: datetime) -> None:
        book = self.books.get(gpu_model)
        if book is not None:
            book["latest_at"] = max(book["latest_at"], at)
            book["updated_position"] = position
            self.books_changed.add(gpu_model)

    # -- writing ----------------------------------------------------------------------------

    def _write(self) -> None:
        r = self.recorder
        r.upsert(self.curs, BOOKS_TABLE_NAME, [self.books[m] for m in sorted(self.books_changed)])
        r.upsert(self.curs, ORDERS_TABLE_NAME, [self.orders[i] for i in self.orders_changed])
        emptied = sorted(
            k for k in self.depth_changed if k not in self.depth and k in self.depth_stored
        )
        if emptied:
            self.curs.execute(
                SQL(
                    "DELETE FROM {depth} WHERE (gpu_model, side, price_per_gpu_hour) IN "
                    "(SELECT * FROM unnest(%s::text[], %s::text[], %s::numeric[]))"
                ).format(depth=r.table_sql(DEPTH_TABLE_NAME)),
                ([k[0] for k in emptied], [k[1] for k in emptied], [k[2] for k in emptied]),
            )
        levels = sorted(k for k in self.depth_changed if k in self.depth)
        r.upsert(
            self.curs,
            DEPTH_TABLE_NAME,
            [
                {
                    "gpu_model": k[0],
                    "side": k[1],
                    "price_per_gpu_hour": k[2],
                    "gpu_count": self.depth[k],
                }
                for k in levels
            ],
        )


def _order(row: dict[str, Any]) -> OrderRow:
    return OrderRow(
        **{**row, "side": Side(row["side"]), "status": OrderStatus(row["status"])},
    )


class OrderBookProjection(MarketProjection[OrderBookRecorder]):
    """Keeps the order books up to date with the marketplace log, a page at a time."""

    name = VIEW_NAME

    @classmethod
    def recorder_class(cls) -> type[OrderBookRecorder]:
        return OrderBookRecorder

    def models(self) -> list[str]:
        return self.view.models()

    def depth(self, gpu_model: str, levels_max: int = DEPTH_LEVELS_MAX) -> BookDepth:
        return self.view.depth(gpu_model, levels_max)

    def best_ask(self, gpu_model: str) -> int | None:
        return self.view.best_ask(gpu_model)

    def best_bid(self, gpu_model: str) -> int | None:
        return self.view.best_bid(gpu_model)

    def order(self, order_id: UUID) -> OrderRow | None:
        return self.view.order(order_id)

    def orders(self, gpu_model: str, *, resting_only: bool = False) -> list[OrderRow]:
        return self.view.orders(gpu_model, resting_only=resting_only)
