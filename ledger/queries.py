"""Reads over the ledger's log: its facts up to a point, and the state as of then."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from uuid import UUID

from ledger.events import AccountOpened, BatchCommitted, LedgerEvent, TransferCreated
from ledger.limits import CATCH_UP_PAGE_SIZE
from ledger.model import Account, Fact, LedgerState, replay
from ledger.store import LedgerApplication


def read_events(
    app: LedgerApplication, *, after: int = 0, stop: int | None = None
) -> Iterator[tuple[int, LedgerEvent]]:
    """The ledger's events after log position `after` (up to `stop`, inclusive), in log order,
    with their positions; read CATCH_UP_PAGE_SIZE at a time."""
    position = after
    while True:
        notifications = app.recorder.select_notifications(
            start=position, limit=CATCH_UP_PAGE_SIZE, stop=stop, inclusive_of_start=False
        )
        for n in notifications:
            position = n.id
            event = app.mapper.to_domain_event(n)
            if isinstance(event, LedgerEvent):
                yield n.id, event
        if len(notifications) < CATCH_UP_PAGE_SIZE:
            return


def read_facts(
    app: LedgerApplication,
    *,
    shard: int = 0,
    stop_position: int | None = None,
    stop_at: datetime | None = None,
) -> list[Fact]:
    """The shard's facts in log order, up to a log position and/or a recorded time."""
    facts: list[Fact] = []
    accounts: set[UUID] = set()
    for _position, event in read_events(app, stop=stop_position):
        if isinstance(event, BatchCommitted):
            continue
        if stop_at is not None and event.timestamp > stop_at:
            break
        fact = event.to_fact()
        if isinstance(event, AccountOpened):
            assert isinstance(fact, Account)
            if fact.shard != shard:
                continue
            accounts.add(fact.id)
        elif isinstance(event, TransferCreated) and event.debit_account_id not in accounts:
            continue
        if fact is not None:
            facts.append(fact)
    return facts


def state_as_of(
    app: LedgerApplication,
    *,
    shard: int = 0,
    position: int | None = None,
    at: datetime | None = None,
) -> LedgerState:
    """The shard's state as it was at a log position (notification id, inclusive) and/or at a
    recorded time (inclusive): every account with its four balances, every pending hold."""
    return replay(read_facts(app, shard=shard, stop_position=position, stop_at=at))


def account_as_of(
    app: LedgerApplication,
    account_id: UUID,
    *,
    shard: int = 0,
    position: int | None = None,
    at: datetime | None = None,
) -> Account | None:
    """One account's balances as they were at a log position and/or a recorded time."""
    return state_as_of(app, shard=shard, position=position, at=at).accounts.get(account_id)
