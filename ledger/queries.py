"""Reads over the ledger's log: its facts up to a point, and the state as of then."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from uuid import UUID

from ledger.events import BatchCommitted, LedgerEvent
from ledger.limits import CATCH_UP_PAGE_SIZE
from ledger.model import Account, Fact, LedgerState
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


def _read(
    app: LedgerApplication, shard: int, stop_position: int | None, stop_at: datetime | None
) -> tuple[list[Fact], LedgerState]:
    facts: list[Fact] = []
    state = LedgerState(shard)
    for _position, event in read_events(app, stop=stop_position):
        if isinstance(event, BatchCommitted):
            continue
        if stop_at is not None and event.timestamp > stop_at:
            break
        fact = event.to_fact()
        if fact is not None and state.owns(fact):
            state.apply(fact)
            facts.append(fact)
            if len(facts) % CATCH_UP_PAGE_SIZE == 0:
                state.commit()
    state.commit()
    return facts, state


def read_facts(
    app: LedgerApplication,
    *,
    shard: int = 0,
    stop_position: int | None = None,
    stop_at: datetime | None = None,
) -> list[Fact]:
    """The shard's facts in log order, up to a log position and/or a recorded time."""
    return _read(app, shard, stop_position, stop_at)[0]


def state_as_of(
    app: LedgerApplication,
    *,
    shard: int = 0,
    position: int | None = None,
    at: datetime | None = None,
) -> LedgerState:
    """The shard's state as it was at a log position (notification id, inclusive) and/or at a
    recorded time (inclusive): every account with its four balances, every pending hold."""
    return _read(app, shard, position, at)[1]


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
