"""The ledger's event store: the `eventsourcing` application, its Postgres recorder and mapper.

Extension points used (nothing is written around the library):
- `AppendOnlyRecorder`: the library's Postgres application recorder plus triggers that make
  the database itself refuse UPDATE, DELETE and TRUNCATE on the events table.
  Events are written with binary COPY (the library's INSERT of a composite array spends
  most of its time in text escaping); the EXCLUSIVE table lock the library takes makes the
  batch's notification ids contiguous, so they are read back from the sequence.
- `LedgerMapper`: maps the ledger's events to compact JSON with orjson (the library's
  JSON transcoder is kept for any other event type).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cache
from typing import Any, cast
from uuid import UUID

import orjson
from eventsourcing.application import Application
from eventsourcing.persistence import (
    IntegrityError,
    InterfaceError,
    Mapper,
    OperationalError,
    ProgrammingError,
    StoredEvent,
)
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.utils import get_topic, resolve_topic, retry
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier, Literal

from ledger.events import LedgerEvent, stored_state_of
from ledger.model import Fact

LEDGER_APPLICATION_NAME = "ledger"
CREATE_TABLE_ATTEMPTS_MAX = 5
"""Tries at creating the tables when other processes create them at the same moment."""


class AppendOnlyRecorder(PostgresApplicationRecorder):
    """Postgres application recorder whose events table is append-only, enforced by triggers.

    Corrections are compensating events. A superuser could drop the triggers; the hash chain
    over the log (a later issue) is what detects that kind of tampering.
    """

    def __init__(
        self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"
    ) -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        schema = Identifier(self.datastore.schema)
        table = Identifier(self.events_table_name)
        function = Identifier(f"{self.events_table_name}_refuse_change")
        self.sql_create_statements.append(
            SQL(
                "CREATE OR REPLACE FUNCTION {schema}.{function}() RETURNS trigger "
                "LANGUAGE plpgsql AS $BODY$ BEGIN "
                "RAISE EXCEPTION 'events are append-only: % on %.% refused', "
                "TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME "
                "USING ERRCODE = 'insufficient_privilege'; "
                "END; $BODY$"
            ).format(schema=schema, function=function)
        )
        for suffix, when in (
            ("no_update_delete", SQL("BEFORE UPDATE OR DELETE ON {schema}.{table} FOR EACH ROW")),
            ("no_truncate", SQL("BEFORE TRUNCATE ON {schema}.{table} FOR EACH STATEMENT")),
        ):
            trigger = Identifier(f"{self.events_table_name}_{suffix}")
            self.sql_create_statements.append(
                SQL(
                    "CREATE OR REPLACE TRIGGER {trigger} {when} EXECUTE FUNCTION {schema}.{function}()"
                ).format(
                    trigger=trigger,
                    when=when.format(schema=schema, table=table),
                    schema=schema,
                    function=function,
                )
            )

        self._copy_statement = SQL(
            "COPY {schema}.{table} (originator_id, originator_version, topic, state) "
            "FROM STDIN (FORMAT BINARY)"
        ).format(schema=schema, table=table)
        self._last_id_statement = SQL(
            "SELECT currval(pg_get_serial_sequence({qualified}, 'notification_id')) AS last_id"
        ).format(qualified=Literal(f"{self.datastore.schema}.{self.events_table_name}"))

    def create_table(self) -> None:
        # The library creates the composite type in its own transaction first; two processes
        # starting together can both try, and the loser gets a unique violation on pg_type
        # or "relation ... already exists" (DuplicateTable), not the DuplicateObject the
        # library expects. Trying again finds it created.
        for attempt in range(CREATE_TABLE_ATTEMPTS_MAX):
            try:
                super().create_table()
                return
            except (IntegrityError, OperationalError, ProgrammingError) as e:
                if isinstance(e, ProgrammingError) and "already exists" not in str(e):
                    raise
                if attempt == CREATE_TABLE_ATTEMPTS_MAX - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _create_table(self, curs: Cursor[DictRow]) -> None:
        # Processes that start together would otherwise deadlock on CREATE OR REPLACE of the
        # trigger functions and triggers, or collide on the library's functions shared by
        # every events table of a schema ("tuple concurrently updated"): one at a time, per
        # schema.
        curs.execute(
            SQL("SELECT pg_advisory_xact_lock(hashtext({name}))").format(
                name=Literal(f"aether-create:{self.datastore.schema}")
            )
        )
        super()._create_table(curs)

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(
        self,
        stored_events: Sequence[StoredEvent],
        *,
        also: Sequence[tuple[AppendOnlyRecorder, Sequence[StoredEvent]]] = (),
        **kwargs: Any,
    ) -> Sequence[int] | None:
        """Insert the events in one transaction; returns their notification ids, in order.

        `also`: events of other applications' tables in the same database (another
        recorder on the same datastore), committed in the same transaction, after ours:
        all of them or none. Tables are always locked in this order (ours, then each of
        `also`), and a recorder writing only its own table takes one lock, so two such
        transactions cannot deadlock.
        """
        for other, _ in also:
            if other.datastore is not self.datastore:
                raise ValueError(
                    f"{other.events_table_name} is not on this recorder's datastore: "
                    "one transaction needs one connection"
                )
        if not stored_events and not any(events for _, events in also):
            return []
        with self.datastore.get_connection() as conn, conn.transaction(), conn.cursor() as curs:
            ids = self._copy_events(curs, stored_events, **kwargs) if stored_events else []
            for other, events in also:
                if events:
                    other._copy_events(curs, events)
        return ids

    def _copy_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> list[int]:
        """Lock the table and COPY the events in, inside the caller's transaction."""
        self._insert_events(curs, stored_events, **kwargs)
        self._lock_table(curs)
        self._notify_channel(curs)
        with curs.copy(self._copy_statement) as copy:
            copy.set_types(["uuid", "int8", "text", "bytea"])
            write_row = copy.write_row
            for e in stored_events:
                write_row((e.originator_id, e.originator_version, e.topic, e.state))
        curs.execute(self._last_id_statement, prepare=True)
        row = curs.fetchone()
        assert row is not None
        last_id = int(row["last_id"])
        return list(range(last_id - len(stored_events) + 1, last_id + 1))


@cache
def _resolve(topic: str) -> type[Any]:
    return cast(type[Any], resolve_topic(topic))


@cache
def _topic(cls: type[Any]) -> str:
    return get_topic(cls)


class LedgerMapper(Mapper[UUID]):
    """Maps ledger events to stored events as compact JSON (see `ledger.events`)."""

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        if not isinstance(domain_event, LedgerEvent):
            return super().to_stored_event(domain_event)
        cls = type(domain_event)
        state = domain_event.to_state()
        if cls.class_version > 1:
            state["class_version"] = cls.class_version
        return StoredEvent(
            originator_id=domain_event.originator_id,
            originator_version=domain_event.originator_version,
            topic=_topic(cls),
            state=orjson.dumps(state),
        )

    def fact_to_stored_event(self, fact: Fact) -> StoredEvent:
        """The stored event that records a ledger fact (the write path's hot loop)."""
        originator_id, version, cls, state = stored_state_of(fact)
        if cls.class_version > 1:
            state["class_version"] = cls.class_version
        return StoredEvent(
            originator_id=originator_id,
            originator_version=version,
            topic=_topic(cls),
            state=orjson.dumps(state),
        )

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        cls = _resolve(stored_event.topic)
        if not issubclass(cls, LedgerEvent):
            return super().to_domain_event(stored_event)
        state = orjson.loads(stored_event.state)
        from_version = state.pop("class_version", 1)
        while from_version < cls.class_version:
            getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(state)
            from_version += 1
        originator_id = stored_event.originator_id
        if not isinstance(originator_id, UUID):
            originator_id = UUID(str(originator_id))
        return cls.from_state(originator_id, stored_event.originator_version, state)


class LedgerApplication(Application[UUID]):
    """The ledger's bounded context: its events live in the table `ledger_events`."""

    name = LEDGER_APPLICATION_NAME
    env = {
        "APPLICATION_RECORDER_TOPIC": get_topic(AppendOnlyRecorder),
        "CREATE_TABLE": "true",
    }

    def construct_mapper(self) -> LedgerMapper:
        return LedgerMapper(transcoder=self.construct_transcoder())

    @property
    def ledger_mapper(self) -> LedgerMapper:
        assert isinstance(self.mapper, LedgerMapper)
        return self.mapper

    @property
    def app_recorder(self) -> AppendOnlyRecorder:
        assert isinstance(self.recorder, AppendOnlyRecorder)
        return self.recorder
