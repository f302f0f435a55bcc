"""The outbox relay: every committed event, published to Kafka for outside readers.

The event store is the outbox. The relay reads each application's notification log (gap-free,
in commit order) a page at a time, produces every event to that application's topic keyed by
its aggregate id (so one aggregate's events stay ordered on one partition), waits until Kafka
acknowledged the whole page (acks=all), and only then records the page's last position in
Postgres (the library's tracking table `relay_tracking`, one row per application). On start
it resumes after the recorded position.

Delivery is at least once: a crash after Kafka took a page and before its position was
recorded sends that page again. Every message carries what a reader needs to drop those
duplicates: the event's id (`uuid5(EVENT_ID_NAMESPACE, "<application>:<stream>:<version>")`,
the same on every resend) and its log position. Per aggregate, positions only increase.

A message (JSON)::

    {"id": "<event id>", "type": "<event class topic>", "source": "aether/<application>",
     "subject": "<aggregate id>", "time": "<recorded at>",
     "data": {"application": "marketplace", "position": 812, "stream": "<aggregate id>",
              "version": 3, "state": {...the stored event's JSON state...}}}
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid5

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from eventsourcing.application import Application
from eventsourcing.persistence import IntegrityError, Notification, Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder

log = logging.getLogger(__name__)

EVENT_ID_NAMESPACE = UUID("9a7c1f0e-3d2b-5e4f-8a6b-7c8d9e0f1a2b")
"""Namespace of the relayed events' ids. Never change."""
RELAY_TRACKING_TABLE = "relay_tracking"
PAGE_SIZE_MAX = 2_000
"""Most events produced before their positions are recorded."""
IDLE_PAUSE_S = 0.2
"""Pause when every log is relayed, before looking again."""
CONNECT_RETRY_S_MAX = 5.0
"""Longest pause between attempts to reach Kafka."""


def event_id(application: str, stream: UUID, version: int) -> UUID:
    """The relayed id of an event: the same however often it is sent."""
    return uuid5(EVENT_ID_NAMESPACE, f"{application}:{stream}:{version}")


@dataclass(frozen=True, slots=True)
class Source:
    """One application's log and the topic its events go to."""

    app: Application[UUID]
    topic: str


def message_of(application: str, notification: Notification) -> tuple[bytes, bytes]:
    """The (key, value) relayed for one stored event."""
    state: Any = orjson.loads(notification.state)
    stream = notification.originator_id
    assert isinstance(stream, UUID)
    recorded_at = state.get("recorded_at") if isinstance(state, dict) else None
    value = {
        "id": str(event_id(application, stream, notification.originator_version)),
        "type": notification.topic,
        "source": f"aether/{application}",
        "subject": str(stream),
        "time": recorded_at or datetime.now(UTC).isoformat(),
        "data": {
            "application": application,
            "position": notification.id,
            "stream": str(stream),
            "version": notification.originator_version,
            "state": state,
        },
    }
    return str(stream).encode(), orjson.dumps(value)


class Relay:
    """Publishes the logs of `sources` to Kafka, resuming from positions kept in Postgres."""

    def __init__(
        self,
        datastore: PostgresDatastore,
        sources: Sequence[Source],
        bootstrap_servers: str,
        *,
        page_size: int = PAGE_SIZE_MAX,
    ) -> None:
        assert 0 < page_size <= PAGE_SIZE_MAX, page_size
        self.sources = list(sources)
        self.bootstrap_servers = bootstrap_servers
        self.page_size = page_size
        self.tracking = PostgresTrackingRecorder(
            datastore, tracking_table_name=RELAY_TRACKING_TABLE
        )
        self.tracking.create_table()
        self._producer: AIOKafkaProducer | None = None

    def position(self, source: Source) -> int:
        """The last position of `source`'s log known to be in Kafka."""
        return self.tracking.max_tracking_id(source.app.name) or 0

    async def start(self) -> None:
        """Connect to Kafka, retrying with a clear log line until it answers."""
        pause_s = 0.2
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap_servers,
                acks="all",
                enable_idempotence=False,
                linger_ms=5,
                max_batch_size=1 << 20,
            )
            try:
                await producer.start()
            except (KafkaError, OSError) as e:
                await producer.stop()
                log.warning(
                    "relay: waiting for Kafka at %s: %s; retrying in %.1f s",
                    self.bootstrap_servers,
                    e,
                    pause_s,
                )
                await asyncio.sleep(pause_s)
                pause_s = min(pause_s * 2, CONNECT_RETRY_S_MAX)
                continue
            self._producer = producer
            return

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def relay_page(self, source: Source) -> int:
        """Relay the next page of one log; returns how many events were published."""
        assert self._producer is not None, "start() first"
        start = self.position(source)
        notifications = source.app.recorder.select_notifications(
            start=start, limit=self.page_size, inclusive_of_start=False
        )
        if not notifications:
            return 0
        sends = []
        for n in notifications:
            key, value = message_of(source.app.name, n)
            sends.append(await self._producer.send(source.topic, value, key=key))
        # Every message of the page acknowledged by Kafka before the position moves on.
        await asyncio.gather(*sends)
        last = notifications[-1].id
        try:
            self.tracking.insert_tracking(Tracking(source.app.name, last))
        except IntegrityError:
            # Another relay recorded this far first: its readers got the page twice, which
            # the event ids let them drop. Anything else is a real conflict.
            if self.position(source) < last:
                raise
        return len(notifications)

    async def relay_all(self) -> int:
        """Relay every log to its end; returns how many events were published."""
        total = 0
        while True:
            published = 0
            for source in self.sources:
                published += await self.relay_page(source)
            total += published
            if published == 0:
                return total

    async def run(self, *, stop: asyncio.Event | None = None) -> None:
        """Relay for ever (or until `stop` is set), pausing when every log is relayed."""
        await self.start()
        try:
            while stop is None or not stop.is_set():
                if await self.relay_all() == 0:
                    await asyncio.sleep(IDLE_PAUSE_S)
        finally:
            await self.stop()
