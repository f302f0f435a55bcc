"""The usage event store: recorded usage reports, and the ingest's consumed offsets.

Usage events live in the table `usage_events`, beside `ledger_events` and
`marketplace_events` in the same database and on the same connection pool (the ledger's
datastore). The table is append-only (the ledger's triggers, `ledger.store.
AppendOnlyRecorder`) and its notification log is gap-free and commit-ordered.

An event records one `domain.usage.UsageRecorded` fact in the stream of its lease, at
originator_version = the report's sequence: the table's unique (stream, version) key
refuses a sequence recorded twice, whatever ingest's memory says. Its stored state is the
fact as plain JSON, exactly as `ledger.market.codec` encodes it (UUIDs and ISO 8601 times
as strings, integers past 2**53 as decimal strings), written by `state_of` without the
codec's per-field dispatch (the hot loop); its topic is ``domain.usage:UsageRecorded``. The
fact is at version 1; a later version would carry ``"class_version"`` and be upcast on read,
as the marketplace's events are.

Ingest's hot path writes rows, not facts (`UsageRecorder.record_copy`: each event as a
binary COPY row, `copy_row` of (lease id, sequence, state), made where the report is
decoded), and makes each state with `ReportStates` from the report as validated
(a dict in the message schema's field order): orjson writes the report, and the
message's envelope id, node id and receive time are spliced in, byte for byte the state
`state_of` writes (tested); a report with a counter past 2**53 takes `state_of`.

Consumed offsets (exactly-once ingest). The table `ingest_offsets` holds, per consumer group,
topic and partition, the offset of the next message to read. `UsageRecorder.record` writes
the events of a batch and the batch's offsets in ONE transaction (through the library's
`_insert_events` hook, which the COPY path calls inside the transaction), so after any crash
the stored offsets say exactly which messages are in the store. An offset only moves forward
from the value the writer last saw (compare and set): a consumer that lost its partitions in
a rebalance and still commits (a zombie) is refused with `UsageConflictError`, as is a batch
whose events another consumer already stored; the refused transaction writes nothing.
Offsets are a tracking table, not events: their rows are updated in place.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from uuid import UUID

import orjson
from eventsourcing.application import Application
from eventsourcing.persistence import (
    IntegrityError,
    InterfaceError,
    Mapper,
    OperationalError,
    StoredEvent,
)
from eventsourcing.postgres import PostgresDatastore
from eventsourcing.utils import get_topic, retry
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier

from domain.usage import LastUsage, UsageRecorded
from ledger.errors import LedgerError
from ledger.limits import CATCH_UP_PAGE_SIZE
from ledger.market.codec import JSON_SAFE_INT_MAX, CodecError, decode
from ledger.store import AppendOnlyRecorder

USAGE_APPLICATION_NAME = "usage"
USAGE_EVENTS_TABLE_NAME = "usage_events"
INGEST_OFFSETS_TABLE_NAME = "ingest_offsets"
USAGE_TOPIC = get_topic(UsageRecorded)
LEASES_PER_READ_MAX = 10_000
"""Most leases whose last usage one query reads."""

TopicPartitionKey = tuple[str, int]
"""(topic, partition)."""
UsageRow = tuple[UUID, int, bytes]
"""A usage event to append: (lease id, sequence, stored state)."""


class UsageConflictError(LedgerError):
    """Another consumer stored these offsets or these events first; nothing was written.
    Read the stored offsets again and go on from there."""


@dataclass(frozen=True, slots=True)
class OffsetAdvance:
    """Move one partition's stored offset from `expected` to `next_offset`."""

    topic: str
    partition: int
    expected: int | None
    """The stored next offset this writer last saw; None when none is stored yet."""
    next_offset: int
    """The offset of the next message to read (the batch's last offset + 1)."""

    def __post_init__(self) -> None:
        assert self.partition >= 0 and self.next_offset >= 0, self
        assert self.expected is None or self.expected <= self.next_offset, self


class UsageMapper(Mapper[UUID]):
    """Maps `UsageRecorded` facts to stored events as plain JSON (see the module docstring)."""

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        if not isinstance(domain_event, UsageRecorded):
            return super().to_stored_event(domain_event)
        return self.fact_to_stored_event(domain_event)

    def fact_to_stored_event(self, fact: UsageRecorded) -> StoredEvent:
        return StoredEvent(
            originator_id=fact.lease_id,
            originator_version=fact.sequence,
            topic=USAGE_TOPIC,
            state=state_of(fact),
        )

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        if stored_event.topic != USAGE_TOPIC:
            raise CodecError(f"not a usage event topic: {stored_event.topic!r}")
        return usage_of_state(stored_event.state)


def state_of(fact: UsageRecorded) -> bytes:
    """The stored state of a fact: the bytes of `orjson.dumps(codec.encode(fact))`, written
    out field by field (the write path's hot loop; equality with the codec is tested).
    UUIDs and times are left to orjson, whose text of them is `str(uuid)` and
    `datetime.isoformat()` (a UTC offset with seconds, which orjson would cut, is written
    by isoformat)."""
    m = JSON_SAFE_INT_MAX
    sequence = fact.sequence
    gpu_count = fact.gpu_count
    wall = fact.wall_time_us
    device_time = fact.device_time_us
    flops = fact.flops
    samples = fact.samples
    tokens = fact.tokens
    steps = fact.steps
    memory = fact.peak_memory_bytes
    return orjson.dumps(
        {
            "envelope_id": fact.envelope_id,
            "lease_id": fact.lease_id,
            "node_id": fact.node_id,
            "sequence": sequence if -m <= sequence <= m else str(sequence),
            "interval_start": _time(fact.interval_start),
            "interval_end": _time(fact.interval_end),
            "gpu_count": gpu_count if -m <= gpu_count <= m else str(gpu_count),
            "wall_time_us": wall if -m <= wall <= m else str(wall),
            "device_time_us": device_time if -m <= device_time <= m else str(device_time),
            "flops": flops if -m <= flops <= m else str(flops),
            "samples": samples if -m <= samples <= m else str(samples),
            "tokens": tokens if -m <= tokens <= m else str(tokens),
            "steps": steps if -m <= steps <= m else str(steps),
            "peak_memory_bytes": memory if -m <= memory <= m else str(memory),
            "workload": fact.workload,
            "device": fact.device,
            "received_at": _time(fact.received_at),
        }
    )


def time_text(value: datetime) -> str:
    """A time's text in a stored state (what `state_of` writes of it, without the quotes)."""
    return orjson.dumps(_time(value))[1:-1].decode()


def _time(value: datetime) -> datetime | str:
    offset = value.utcoffset()
    if offset is None:
        raise ValueError(f"naive datetime {value!r}: times are stored with their offset")
    if offset.seconds % 60 or offset.microseconds:
        return value.isoformat()
    return value


RULE_FIELDS = struct.Struct("<IQqqIQQ")
"""What the usage rules read of a report (`domain.usage.check_report`), packed: the index
of its lease among its message's leases, sequence, interval start and end (microseconds
since the epoch), gpu_count, wall_time_us, device_time_us (little-endian; counters up to
2**64-1, as the fast path of decoding admits them)."""

LeaseText = tuple[UUID, str, bytes, int]
"""A validated lease id text's UUID, stored text (`str(UUID)`), bytes and integer."""
TimeText = tuple[datetime, int, str]
"""A validated time text's aware datetime, microseconds since the epoch and stored text
(`time_text`)."""

_LEASE_END = len(b'{"lease_id":"') + 36 + 1
"""Where the lease id's text ends in orjson's bytes of a report dict that starts with it."""


class ReportStates:
    """The stored states of the reports one message carries, from the reports as
    validated: dicts whose keys are, in this order, lease_id (a UUID), sequence,
    interval_start, interval_end, gpu_count, wall_time_us, device_time_us, flops, samples,
    tokens, steps, peak_memory_bytes, workload, device (`workers.messages.BatchedUsage`:
    UsageRecorded's fields between node_id and received_at, after lease_id) and times
    whose UTC offsets are whole minutes (as every time parsed from ISO 8601 text is)."""

    __slots__ = ("_envelope_id", "_head", "_node", "_node_id", "_received_at", "_tail")

    def __init__(self, envelope_id: UUID, node_id: UUID, received_at: datetime) -> None:
        self._envelope_id = envelope_id
        self._node_id = node_id
        self._received_at = received_at
        self._head = b'{"envelope_id":' + orjson.dumps(envelope_id) + b","
        self._node = b',"node_id":' + orjson.dumps(node_id)
        self._tail = b',"received_at":' + orjson.dumps(_time(received_at)) + b"}"

    def state(self, report: Mapping[str, Any]) -> bytes:
        try:
            written = orjson.dumps(report, option=orjson.OPT_STRICT_INTEGER)
        except orjson.JSONEncodeError:  # an integer past 2**53: the codec writes a string
            return state_of(self.fact(report))
        return self._head + written[1:_LEASE_END] + self._node + written[_LEASE_END:-1] + self._tail

    def copy_rows(self, reports: Iterable[Mapping[str, Any]]) -> tuple[bytes, list[int]]:
        """The reports' usage events as binary COPY rows (`copy_row` of each one's lease,
        sequence and `state`), concatenated, and where each row ends in them."""
        parts: list[bytes] = []
        ends: list[int] = []
        end = 0
        head, node, tail = self._head, self._node, self._tail
        fixed = len(head) + len(node) + len(tail) - 2
        prefix = _ROW_PREFIX.pack
        for report in reports:
            lease_id: UUID = report["lease_id"]
            try:
                written = orjson.dumps(report, option=orjson.OPT_STRICT_INTEGER)
            except orjson.JSONEncodeError:  # an integer past 2**53: the codec writes a string
                row = copy_row(lease_id.bytes, report["sequence"], state_of(self.fact(report)))
                parts.append(row)
                end += len(row)
                ends.append(end)
                continue
            size = fixed + len(written)
            parts += (
                prefix(4, 16, lease_id.bytes, 8, report["sequence"], *_TOPIC_FIELDS, size),
                head,
                written[1:_LEASE_END],
                node,
                written[_LEASE_END:-1],
                tail,
            )
            end += _ROW_PREFIX.size + size
            ends.append(end)
        return b"".join(parts), ends

    def copy_rows_of_text(
        self,
        reports: Sequence[dict[str, Any]],
        lease_of: Callable[[str], LeaseText],
        time_of: Callable[[str], TimeText],
        leases: Mapping[str, LeaseText],
        times: Mapping[str, TimeText],
    ) -> tuple[bytearray, list[int], bytearray, list[int]]:
        """`copy_rows` of reports whose lease id and times are text, in one pass with what
        the usage rules need of each: the rows, where each ends, the reports' `RULE_FIELDS`
        packed one after the other, and the integers of the leases those index (each
        lease once, in order of appearance).

        Each text is looked up in `leases` / `times` (a caller's cache of validated texts)
        or else given to `lease_of` / `time_of` (which validate it, raising on a bad one);
        a report's texts are rewritten in their stored form where they differ (`str(UUID)`,
        `time_text`)."""
        out = bytearray()
        ends: list[int] = []
        fields = bytearray()
        lease_ints: list[int] = []
        head, node, tail = self._head, self._node, self._tail
        fixed = len(head) + len(node) + len(tail) - 2
        prefix = _ROW_PREFIX.pack
        pack_fields = RULE_FIELDS.pack
        topic_length, topic = _TOPIC_FIELDS
        dumps = orjson.dumps
        strict = orjson.OPT_STRICT_INTEGER
        # Per lease: its index in `lease_ints` and the state's bytes up to its node id.
        heads: dict[str, tuple[int, bytes]] = {}
        for report in reports:
            text = report["lease_id"]
            lease = leases.get(text) or lease_of(text)
            if lease[1] != text:
                report["lease_id"] = text = lease[1]
            seen = heads.get(text)
            if seen is None:
                seen = heads[text] = (
                    len(lease_ints),
                    head + b'"lease_id":"' + text.encode() + b'"' + node,
                )
                lease_ints.append(lease[3])
            text = report["interval_start"]
            start = times.get(text) or time_of(text)
            if start[2] != text:
                report["interval_start"] = start[2]
            text = report["interval_end"]
            end = times.get(text) or time_of(text)
            if end[2] != text:
                report["interval_end"] = end[2]
            sequence = report["sequence"]
            fields += pack_fields(
                seen[0],
                sequence,
                start[1],
                end[1],
                report["gpu_count"],
                report["wall_time_us"],
                report["device_time_us"],
            )
            try:
                written = dumps(report, option=strict)
            except orjson.JSONEncodeError:  # an integer past 2**53: the codec writes a string
                typed = {
                    **report,
                    "lease_id": lease[0],
                    "interval_start": start[0],
                    "interval_end": end[0],
                }
                out += copy_row(lease[2], sequence, state_of(self.fact(typed)))
                ends.append(len(out))
                continue
            out += prefix(4, 16, lease[2], 8, sequence, topic_length, topic, fixed + len(written))
            out += seen[1]
            out += written[_LEASE_END:-1]
            out += tail
            ends.append(len(out))
        return out, ends, fields, lease_ints

    def fact(self, report: Mapping[str, Any]) -> UsageRecorded:
        """The fact `report` records (what `state` writes)."""
        return UsageRecorded(
            envelope_id=self._envelope_id,
            node_id=self._node_id,
            received_at=self._received_at,
            **report,
        )


_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
"""The binary COPY header: signature, flags, header extension length."""
_COPY_TRAILER = b"\xff\xff"
_ROW_HEAD = struct.Struct("!hi16siq")
_TOPIC_FIELD = struct.pack("!i", len(USAGE_TOPIC.encode())) + USAGE_TOPIC.encode()
_TOPIC_FIELDS = (len(USAGE_TOPIC.encode()), USAGE_TOPIC.encode())
_ROW_PREFIX = struct.Struct(f"!hi16siqi{len(USAGE_TOPIC.encode())}si")
"""A row up to its state's bytes: the fields' count, the lease id, the sequence, the topic
and the state's length."""
_STATE_LENGTH = struct.Struct("!i").pack


def copy_row(lease_id: bytes, sequence: int, state: bytes) -> bytes:
    """One usage event as a row of PostgreSQL's binary COPY format, in the columns
    (originator_id uuid, originator_version int8, topic text, state bytea): `lease_id` is
    the lease's 16 bytes (`UUID.bytes`), the topic USAGE_TOPIC."""
    return (
        _ROW_HEAD.pack(4, 16, lease_id, 8, sequence)
        + _TOPIC_FIELD
        + _STATE_LENGTH(len(state))
        + state
    )


def usage_of_state(state: bytes) -> UsageRecorded:
    fact = decode(UsageRecorded, orjson.loads(state))
    assert isinstance(fact, UsageRecorded)
    return fact


class UsageRecorder(AppendOnlyRecorder):
    """The append-only `usage_events` table plus the `ingest_offsets` tracking table."""

    def __init__(
        self,
        datastore: PostgresDatastore,
        *,
        events_table_name: str = USAGE_EVENTS_TABLE_NAME,
        offsets_table_name: str = INGEST_OFFSETS_TABLE_NAME,
    ) -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        self.offsets_table_name = offsets_table_name
        schema = Identifier(datastore.schema)
        events = Identifier(events_table_name)
        offsets = Identifier(offsets_table_name)
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {schema}.{offsets} ("
                "group_id text NOT NULL, "
                "topic text NOT NULL, "
                "partition integer NOT NULL CHECK (partition >= 0), "
                "next_offset bigint NOT NULL CHECK (next_offset >= 0), "
                "PRIMARY KEY (group_id, topic, partition))"
            ).format(schema=schema, offsets=offsets)
        )
        self._advance_statement = SQL(
            "INSERT INTO {schema}.{offsets} AS o (group_id, topic, partition, next_offset) "
            "VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (group_id, topic, partition) DO UPDATE "
            "SET next_offset = EXCLUDED.next_offset WHERE o.next_offset = %s"
        ).format(schema=schema, offsets=offsets)
        self._select_offsets_statement = SQL(
            "SELECT topic, partition, next_offset FROM {schema}.{offsets} "
            "WHERE group_id = %s AND topic = ANY(%s)"
        ).format(schema=schema, offsets=offsets)
        self._last_usage_statement = SQL(
            "SELECT DISTINCT ON (originator_id) originator_id, state FROM {schema}.{events} "
            "WHERE originator_id = ANY(%s) ORDER BY originator_id, originator_version DESC"
        ).format(schema=schema, events=events)
        self._stream_statement = SQL(
            "SELECT state FROM {schema}.{events} WHERE originator_id = %s "
            "ORDER BY originator_version"
        ).format(schema=schema, events=events)

    # -- writes --------------------------------------------------------------------------

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def record(
        self, stored_events: Sequence[StoredEvent], group_id: str, offsets: Sequence[OffsetAdvance]
    ) -> Sequence[int]:
        """Append the events and advance the group's offsets in one transaction; returns the
        events' notification ids. `UsageConflictError` (nothing written) when an offset is
        not where `expected` says or an event's (lease, sequence) is already stored."""
        if not stored_events and not offsets:
            return []
        try:
            with (
                self.datastore.get_connection() as conn,
                conn.transaction(),
                conn.cursor() as curs,
            ):
                if stored_events:
                    return self._copy_events(
                        curs, stored_events, group_id=group_id, offsets=offsets
                    )
                self._advance_offsets(curs, group_id, offsets)
                return []
        except IntegrityError as e:
            raise UsageConflictError(
                f"group {group_id}: a usage report of this batch is already stored ({e})"
            ) from e

    def record_rows(
        self, rows: Sequence[UsageRow], group_id: str, offsets: Sequence[OffsetAdvance]
    ) -> Sequence[int]:
        """`record` of rows (lease id, sequence, state) of topic USAGE_TOPIC (see
        `record_copy`)."""
        copy_rows = [
            copy_row(lease_id.bytes, sequence, state) for lease_id, sequence, state in rows
        ]
        ids: Sequence[int] = self.record_copy(copy_rows, len(copy_rows), group_id, offsets)
        return ids

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def record_copy(
        self,
        rows: Sequence[bytes | bytearray | memoryview],
        count: int,
        group_id: str,
        offsets: Sequence[OffsetAdvance],
    ) -> Sequence[int]:
        """`record` of `count` usage events given as binary COPY rows (`copy_row`; each
        item of `rows` holds one or more whole rows): the same transaction (offsets first,
        then the table lock, the notification, ONE binary COPY of all the rows and the
        notification ids read back), with nothing made per row."""
        if not count and not offsets:
            return []
        try:
            with (
                self.datastore.get_connection() as conn,
                conn.transaction(),
                conn.cursor() as curs,
            ):
                self._advance_offsets(curs, group_id, offsets)
                if not count:
                    return []
                self._lock_table(curs)
                self._notify_channel(curs)
                with curs.copy(self._copy_statement) as copy:
                    copy.write(b"".join((_COPY_SIGNATURE, *rows, _COPY_TRAILER)))
                curs.execute(self._last_id_statement, prepare=True)
                row = curs.fetchone()
                assert row is not None
                last_id = int(row["last_id"])
                return range(last_id - count + 1, last_id + 1)
        except IntegrityError as e:
            raise UsageConflictError(
                f"group {group_id}: a usage report of this batch is already stored ({e})"
            ) from e

    def _insert_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> None:
        """The library's hook inside the events' transaction: advance the offsets first."""
        offsets: Sequence[OffsetAdvance] = kwargs.get("offsets", ())
        if offsets:
            self._advance_offsets(curs, cast(str, kwargs["group_id"]), offsets)
        super()._insert_events(curs, stored_events, **kwargs)

    def _advance_offsets(
        self, curs: Cursor[DictRow], group_id: str, offsets: Sequence[OffsetAdvance]
    ) -> None:
        # Sorted, so two writers lock the same rows in the same order (no deadlock).
        for advance in sorted(offsets, key=lambda a: (a.topic, a.partition)):
            curs.execute(
                self._advance_statement,
                (
                    group_id,
                    advance.topic,
                    advance.partition,
                    advance.next_offset,
                    advance.expected,
                ),
                prepare=True,
            )
            if curs.rowcount != 1:
                raise UsageConflictError(
                    f"group {group_id}: {advance.topic}[{advance.partition}] is no longer at "
                    f"offset {advance.expected}: another consumer moved it"
                )

    # -- reads ---------------------------------------------------------------------------

    def stored_offsets(
        self, group_id: str, partitions: Iterable[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]:
        """The next offset to read of each of `partitions` that has one stored."""
        wanted = set(partitions)
        if not wanted:
            return {}
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(
                self._select_offsets_statement,
                (group_id, sorted({topic for topic, _ in wanted})),
                prepare=True,
            )
            rows = curs.fetchall()
        found = {(str(r["topic"]), int(r["partition"])): int(r["next_offset"]) for r in rows}
        return {tp: offset for tp, offset in found.items() if tp in wanted}

    def last_usages(self, lease_ids: Iterable[UUID]) -> dict[UUID, LastUsage]:
        """The last recorded report of each lease that has one."""
        ids = sorted(set(lease_ids))
        found: dict[UUID, LastUsage] = {}
        for start in range(0, len(ids), LEASES_PER_READ_MAX):
            chunk = ids[start : start + LEASES_PER_READ_MAX]
            with self.datastore.transaction(commit=False) as curs:
                curs.execute(self._last_usage_statement, (chunk,), prepare=True)
                rows = curs.fetchall()
            for row in rows:
                fact = usage_of_state(bytes(row["state"]))
                found[fact.lease_id] = LastUsage.of(fact)
        return found

    def usage_of_lease(self, lease_id: UUID) -> list[UsageRecorded]:
        """Every recorded report of a lease, by sequence."""
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(self._stream_statement, (lease_id,), prepare=True)
            return [usage_of_state(bytes(row["state"])) for row in curs.fetchall()]


class UsageApplication(Application[UUID]):
    """Recorded usage: table `usage_events` (and `ingest_offsets`), on a given datastore
    (the ledger's, beside the marketplace's events)."""

    name = USAGE_APPLICATION_NAME

    def __init__(self, datastore: PostgresDatastore, env: Mapping[str, str] | None = None) -> None:
        """`datastore`: the ledger's (its pool and schema). The library's persistence
        factory is only asked for the transcoder, so it is the in-memory one."""
        self._datastore = datastore
        super().__init__(env={**(env or {}), "PERSISTENCE_MODULE": "eventsourcing.popo"})

    def construct_mapper(self) -> UsageMapper:
        return UsageMapper(transcoder=self.construct_transcoder())

    def construct_recorder(self) -> UsageRecorder:
        recorder = UsageRecorder(self._datastore)
        recorder.create_table()
        return recorder

    @property
    def usage_mapper(self) -> UsageMapper:
        assert isinstance(self.mapper, UsageMapper)
        return self.mapper

    @property
    def usage_recorder(self) -> UsageRecorder:
        assert isinstance(self.recorder, UsageRecorder)
        return self.recorder

    def record(
        self, facts: Sequence[UsageRecorded], group_id: str, offsets: Sequence[OffsetAdvance]
    ) -> Sequence[int]:
        """Store the facts and advance the offsets in one transaction (see `UsageRecorder.
        record`)."""
        rows = [(f.lease_id, f.sequence, state_of(f)) for f in facts]
        return self.record_rows(rows, group_id, offsets)

    def record_rows(
        self, rows: Sequence[UsageRow], group_id: str, offsets: Sequence[OffsetAdvance]
    ) -> Sequence[int]:
        """Store the rows (lease id, sequence, state; see `ReportStates`) and advance the
        offsets in one transaction (see `UsageRecorder.record_rows`)."""
        ids: Sequence[int] = self.usage_recorder.record_rows(rows, group_id, offsets)
        return ids

    def record_copy(
        self,
        rows: Sequence[bytes | bytearray | memoryview],
        count: int,
        group_id: str,
        offsets: Sequence[OffsetAdvance],
    ) -> Sequence[int]:
        """Store `count` events given as binary COPY rows (`copy_row`) and advance the
        offsets in one transaction (see `UsageRecorder.record_copy`)."""
        ids: Sequence[int] = self.usage_recorder.record_copy(rows, count, group_id, offsets)
        return ids

    def stored_offsets(
        self, group_id: str, partitions: Iterable[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]:
        return self.usage_recorder.stored_offsets(group_id, partitions)

    def last_usage(self, lease_id: UUID) -> LastUsage | None:
        return self.usage_recorder.last_usages([lease_id]).get(lease_id)

    def last_usages(self, lease_ids: Iterable[UUID]) -> dict[UUID, LastUsage]:
        return self.usage_recorder.last_usages(lease_ids)

    def usage_of_lease(self, lease_id: UUID) -> list[UsageRecorded]:
        return self.usage_recorder.usage_of_lease(lease_id)

    def read(
        self, *, after: int = 0, page_size: int = CATCH_UP_PAGE_SIZE
    ) -> Iterator[tuple[int, UsageRecorded]]:
        """The usage events after log position `after`, in log order, with their positions,
        a page at a time."""
        position = after
        while True:
            notifications = self.recorder.select_notifications(
                start=position, limit=page_size, inclusive_of_start=False
            )
            for n in notifications:
                position = n.id
                yield n.id, usage_of_state(n.state)
            if len(notifications) < page_size:
                return
