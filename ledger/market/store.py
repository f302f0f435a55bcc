"""The marketplace's event store: its `eventsourcing` application, events and mapper.

Its events live in the table `marketplace_events`, beside the ledger's `ledger_events` in the
same database and on the same connection pool, so that one Postgres transaction can append
marketplace events together with the ledger events of the money they move
(`ledger.store.AppendOnlyRecorder.insert_events(..., also=...)`). The table is append-only
(the same triggers as the ledger's), and its notification log is gap-free and commit-ordered.

An event records one fact of `domain` (or a `CommandHandled`, the service's record of a
command it handled) in the stream of the aggregate it belongs to. Its stored state is plain
JSON: ``{"recorded_at": <ISO 8601>, "fact": <the fact, see ledger.market.codec>}``, plus
``"class_version"`` when the fact's class declares one above 1 (old states are upcast on read
by the class's ``upcast_vN_vN+1(state)`` static methods). The topic is the fact's class
(``domain.orderbook:AskPlaced``), so any reader can tell what it is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, cast
from uuid import UUID

import orjson
from eventsourcing.application import Application
from eventsourcing.persistence import Mapper, StoredEvent
from eventsourcing.postgres import PostgresDatastore
from eventsourcing.utils import get_topic, resolve_topic

from ledger.limits import CATCH_UP_PAGE_SIZE
from ledger.market.codec import CodecError, decode, encode
from ledger.store import AppendOnlyRecorder

MARKETPLACE_APPLICATION_NAME = "marketplace"
MARKETPLACE_EVENTS_TABLE_NAME = "marketplace_events"


@dataclass(frozen=True, slots=True)
class CommandHandled:
    """Fact: the service handled a command (stream: the command id, version 1). A retry
    with the same id and the same content gets this record's answer; other content is
    refused. Refused commands record nothing (a retry is decided again)."""

    command_id: UUID
    kind: str
    """The command's class name, e.g. "PlaceBid"."""
    digest: str
    """sha256 of the command's canonical JSON: what "the same content" means."""
    facts_count: int
    """How many facts the command recorded (besides this one)."""
    lease_ids: tuple[UUID, ...]
    """Leases the command opened, in order."""
    handled_at: datetime


@dataclass(frozen=True, slots=True)
class MarketEvent:
    """One stored fact: `fact` in stream `originator_id` at `originator_version`."""

    originator_id: UUID
    originator_version: int
    timestamp: datetime
    """When the service recorded it (its clock at the command)."""
    fact: Any


@cache
def _resolve(topic: str) -> type[Any]:
    return cast(type[Any], resolve_topic(topic))


_TOPICS: dict[type[Any], str] = {}


def _topic(cls: type[Any]) -> str:
    topic = _TOPICS.get(cls)
    if topic is None:
        topic = _TOPICS[cls] = get_topic(cls)
    return topic


class MarketMapper(Mapper[UUID]):
    """Maps `MarketEvent`s to stored events as plain JSON (see the module docstring)."""

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        if not isinstance(domain_event, MarketEvent):
            return super().to_stored_event(domain_event)
        cls: type[Any] = type(domain_event.fact)
        state: dict[str, Any] = {
            "recorded_at": domain_event.timestamp.isoformat(),
            "fact": encode(domain_event.fact),
        }
        version = getattr(cls, "class_version", 1)
        if version > 1:
            state["class_version"] = version
        return StoredEvent(
            originator_id=domain_event.originator_id,
            originator_version=domain_event.originator_version,
            topic=_topic(cls),
            state=orjson.dumps(state),
        )

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        try:
            cls = _resolve(stored_event.topic)
        except Exception as e:
            raise CodecError(f"unknown event topic {stored_event.topic!r}") from e
        state = orjson.loads(stored_event.state)
        fact_state = state["fact"]
        from_version = state.get("class_version", 1)
        while from_version < getattr(cls, "class_version", 1):
            getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(fact_state)
            from_version += 1
        originator_id = stored_event.originator_id
        if not isinstance(originator_id, UUID):
            originator_id = UUID(str(originator_id))
        return MarketEvent(
            originator_id=originator_id,
            originator_version=stored_event.originator_version,
            timestamp=datetime.fromisoformat(state["recorded_at"]),
            fact=decode(cls, fact_state),
        )


class MarketplaceApplication(Application[UUID]):
    """The marketplace's bounded context: table `marketplace_events`, on a given datastore
    (the ledger's, so both can be written in one transaction)."""

    name = MARKETPLACE_APPLICATION_NAME
    events_table_name = MARKETPLACE_EVENTS_TABLE_NAME

    def __init__(self, datastore: PostgresDatastore, env: Mapping[str, str] | None = None) -> None:
        """`datastore`: the ledger's (its pool and schema). The library's own persistence
        factory is only asked for the transcoder, so it is the in-memory one: it opens no
        second pool."""
        self._datastore = datastore
        super().__init__(env={**(env or {}), "PERSISTENCE_MODULE": "eventsourcing.popo"})

    def construct_mapper(self) -> MarketMapper:
        return MarketMapper(transcoder=self.construct_transcoder())

    def construct_recorder(self) -> AppendOnlyRecorder:
        recorder = AppendOnlyRecorder(self._datastore, events_table_name=self.events_table_name)
        recorder.create_table()
        return recorder

    @property
    def market_mapper(self) -> MarketMapper:
        assert isinstance(self.mapper, MarketMapper)
        return self.mapper

    @property
    def app_recorder(self) -> AppendOnlyRecorder:
        assert isinstance(self.recorder, AppendOnlyRecorder)
        return self.recorder

    def read(
        self, *, after: int = 0, stop: int | None = None, page_size: int = CATCH_UP_PAGE_SIZE
    ) -> Iterator[tuple[int, MarketEvent]]:
        """The events after log position `after` (up to `stop`, inclusive), in log order,
        with their positions, a page at a time."""
        position = after
        while True:
            notifications = self.recorder.select_notifications(
                start=position, limit=page_size, stop=stop, inclusive_of_start=False
            )
            for n in notifications:
                position = n.id
                yield n.id, self.market_mapper.to_domain_event(n)
            if len(notifications) < page_size:
                return
