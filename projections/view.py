"""The shared base of the marketplace's read models: declared tables, tracked pages, hashes.

Each marketplace view (order book, providers, leases, reputation) is two classes, as
`projections.balances` is, built on the library's extension points:

- a view recorder, a subclass of `MarketViewRecorder` (itself the library's
  `PostgresTrackingRecorder`): it declares its tables (`tables`, added to the library's
  `sql_create_statements`) and the fact types it reads (`fact_types`), and writes a page of
  the marketplace log in `_apply_page`, inside the transaction that records the page's
  `Tracking` (the library's `_insert_tracking`, before any write of the view);
- a projection, a subclass of `MarketProjection` (the library's `Projection`):
  `process_event` applies one event (so a `ProjectionRunner` can drive it), `catch_up`
  reads the log a page at a time, `state_hash` digests every table of the view,
  `rebuild_into` builds the view from zero in another schema.

Exactly once. A page read after position P is applied only while the view's tracked position
is still P: the transaction takes a lock of the view's tracking first (a transaction-level
advisory lock, so it also holds before the tracking row exists), checks the position, then
upserts the tracking row. A second projection of the same view that read the same (or an
overlapping) page waits on the lock and is refused with `PageAlreadyTrackedError` (an
`IntegrityError`): nothing it would have written is written, and it reads on from the
position the first one tracked. The library's upsert (`... WHERE notification_id < new`)
refuses any page not after the stored position as well.

Facts the view does not read (other views' facts, `CommandHandled`, fact types added later)
are skipped without being decoded; their positions are tracked all the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum, IntEnum
from typing import Any, ClassVar, Self, TypeVar
from uuid import UUID

import orjson
from eventsourcing.persistence import ApplicationRecorder, IntegrityError, Notification, Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresFactory, PostgresTrackingRecorder
from eventsourcing.projection import Projection
from eventsourcing.utils import Environment, get_topic, resolve_topic
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Composable, Composed, Identifier, Literal, Placeholder

from ledger.market.codec import CodecError
from ledger.market.store import MarketEvent, MarketplaceApplication

PAGE_SIZE_MAX = 1_000
"""Most log events read and applied in one transaction of a view."""

ROWS_LISTED_MAX = 10_000
"""Most rows one listing query of a view returns."""
STATE_HASH_FETCH_SIZE = 2_000
"""Rows fetched per round trip while a state hash streams a table."""

Page = Sequence[tuple[int, MarketEvent]]
"""Events of the marketplace log with their notification ids, in log order."""


class MarketProjectionError(Exception):
    """The marketplace log holds something a view cannot apply (a bug upstream)."""


class PageAlreadyTrackedError(IntegrityError):
    """The view's tracked position is not the one the page was read after: another
    projection of the same view applied (some of) these events first. Nothing was written."""


# -- tables -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    sql_type: str
    """A constant of the module that declares the table, e.g. "numeric(78,0) NOT NULL"."""


@dataclass(frozen=True, slots=True)
class Table:
    """One table of a view: its columns in order, its key (also the order of its rows in the
    state hash and in listings) and its secondary indexes."""

    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    indexes: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        names = self.column_names
        assert len(set(names)) == len(names), f"{self.name}: a column declared twice"
        for column in (*self.key, *(c for index in self.indexes for c in index)):
            assert column in names, f"{self.name}: no column {column}"

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


def table(
    name: str,
    key: tuple[str, ...],
    /,
    *,
    indexes: tuple[tuple[str, ...], ...] = (),
    **columns: str,
) -> Table:
    """A `Table` from its columns as keyword arguments, in order: `id="uuid NOT NULL"`."""
    return Table(name, tuple(Column(n, t) for n, t in columns.items()), key, indexes)


def _columns(names: Iterable[str]) -> Composed:
    return SQL(", ").join(Identifier(n) for n in names)


# -- values -------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A value read from PostgreSQL as the views use it: NUMERIC as int (never float or
    Decimal), timestamps in UTC, arrays element by element."""
    if isinstance(value, Decimal):
        as_int = int(value)
        assert as_int == value, f"amount {value} is not a whole number"
        return as_int
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def canonical(value: Any) -> Any:
    """The form of a value in a state hash line: JSON null, booleans and strings only;
    integers and amounts as decimal strings, timestamps as UTC ISO 8601, UUIDs canonical."""
    value = plain(value)
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, Enum):
        return canonical(value.value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    raise TypeError(f"no canonical form for {type(value).__name__}: {value!r}")


# -- the view recorder ----------------------------------------------------------------------

_ASYNCHRONOUS_COMMIT = SQL("SET LOCAL synchronous_commit TO off")


class MarketViewRecorder(PostgresTrackingRecorder, ABC):
    """A view's tables and its tracking table, in one schema; every write is tracked.

    Subclasses declare `view_name` (also the prefix of the tracking table), `tables` and
    `fact_types`, and implement `_apply_page`.
    """

    view_name: ClassVar[str]
    tables: ClassVar[tuple[Table, ...]]
    fact_types: ClassVar[tuple[type[Any], ...]]
    """The facts of the log this view reads; all others are skipped (and tracked)."""
    synchronous_commit: bool = True
    """False: a page's transaction commits without waiting for its WAL to reach the disk
    (`SET LOCAL synchronous_commit TO off`). A crash may then lose the last pages, rows
    and tracking together (the view stays at an earlier position, exactly once); for a
    rebuild in a fresh schema, which is redone if it does not finish."""

    def __init__(
        self,
        datastore: PostgresDatastore,
        *,
        tracking_table_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        tracking_table_name = tracking_table_name or f"{self.view_name}_tracking"
        super().__init__(datastore, tracking_table_name=tracking_table_name, **kwargs)
        self._tables = {t.name: t for t in self.tables}
        for t in self.tables:
            self.check_identifier_length(t.name)
            self.sql_create_statements.append(
                SQL("CREATE TABLE IF NOT EXISTS {table} ({columns}, PRIMARY KEY ({key}))").format(
                    table=self.table_sql(t.name),
                    columns=SQL(", ").join(
                        SQL("{} {}").format(Identifier(c.name), SQL(c.sql_type)) for c in t.columns
                    ),
                    key=_columns(t.key),
                )
            )
            for index in t.indexes:
                index_name = f"{t.name}_{'_'.join(index)}_idx"
                self.check_identifier_length(index_name)
                self.sql_create_statements.append(
                    SQL("CREATE INDEX IF NOT EXISTS {index} ON {table} ({columns})").format(
                        index=Identifier(index_name),
                        table=self.table_sql(t.name),
                        columns=_columns(index),
                    )
                )
        digest = hashlib.sha256(f"{self.datastore.schema}.{tracking_table_name}".encode())
        self._lock_key = int.from_bytes(digest.digest()[:8], "big", signed=True)
        """Key of the transaction-level advisory lock that serialises the view's pages."""
        self._lock_statement = SQL("SELECT pg_advisory_xact_lock(%s)")

    # -- writing ----------------------------------------------------------------------------

    def apply_page(self, events: Page, tracking: Tracking, *, after: int | None = None) -> int:
        """Apply a page of the log and record `tracking`, all in one transaction. Facts of
        types the view does not read are skipped. Returns how many events were applied.

        `after`: the position the page was read after; the page is refused
        (`PageAlreadyTrackedError`) unless the view's tracked position still is that one.
        None (one event at a time, as a `ProjectionRunner` sends them) skips that check.

        Raises IntegrityError (and changes nothing) when `tracking` is not after the stored
        position: that page, or a later one, was already applied.
        """
        page = [(p, e) for p, e in events if isinstance(e.fact, self.fact_types)]
        with self.datastore.transaction(commit=True) as curs:
            if not self.synchronous_commit:
                curs.execute(_ASYNCHRONOUS_COMMIT, prepare=True)
            if after is not None:
                curs.execute(self._lock_statement, (self._lock_key,), prepare=True)
                tracked = self._max_tracking_id(tracking.application_name, curs) or 0
                if tracked != after:
                    raise PageAlreadyTrackedError(
                        f"{self.view_name}: page after {after} refused, the view is at {tracked}"
                    )
            # First write: the tracking upsert locks the tracking row, and refuses a position
            # that is not after the stored one.
            self._insert_tracking(curs, tracking)
            if page:
                self._apply_page(curs, page)
        return len(page)

    @abstractmethod
    def _apply_page(self, curs: Cursor[DictRow], events: Page) -> None:
        """Write what `events` (facts of `fact_types` only, in log order) do to the view."""

    # -- SQL helpers for subclasses ---------------------------------------------------------

    def table_sql(self, name: str) -> Composed:
        """The schema-qualified name of one of the view's tables."""
        return SQL("{}.{}").format(Identifier(self.datastore.schema), Identifier(name))

    def upsert(self, curs: Cursor[DictRow], name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert rows (every column given) or replace the rows with the same key."""
        if not rows:
            return
        t = self._tables[name]
        others = [c for c in t.column_names if c not in t.key]
        statement = SQL(
            "INSERT INTO {table} ({columns}) VALUES ({values}) "
            "ON CONFLICT ({key}) DO UPDATE SET {updates}"
        ).format(
            table=self.table_sql(name),
            columns=_columns(t.column_names),
            values=SQL(", ").join(Placeholder(c) for c in t.column_names),
            key=_columns(t.key),
            updates=SQL(", ").join(SQL("{0} = EXCLUDED.{0}").format(Identifier(c)) for c in others),
        )
        curs.executemany(statement, [dict(r) for r in rows])

    def insert(self, curs: Cursor[DictRow], name: str, row: Mapping[str, Any]) -> bool:
        """Insert one row (every column given) unless its key exists; whether it was new."""
        t = self._tables[name]
        curs.execute(
            SQL("INSERT INTO {table} ({columns}) VALUES ({values}) ON CONFLICT DO NOTHING").format(
                table=self.table_sql(name),
                columns=_columns(t.column_names),
                values=SQL(", ").join(Placeholder(c) for c in t.column_names),
            ),
            dict(row),
        )
        return curs.rowcount == 1

    def select_statement(
        self,
        name: str,
        where: Composable | None = None,
        *,
        order_by: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> Composed:
        """SELECT every column of a table, in key order unless `order_by`."""
        t = self._tables[name]
        statement = SQL("SELECT {columns} FROM {table}").format(
            columns=_columns(t.column_names), table=self.table_sql(name)
        )
        if where is not None:
            statement = SQL("{} WHERE {}").format(statement, where)
        statement = SQL("{} ORDER BY {}").format(statement, _columns(order_by or t.key))
        if limit is not None:
            statement = SQL("{} LIMIT {}").format(statement, Literal(limit))
        return statement

    def select(
        self,
        curs: Cursor[DictRow],
        name: str,
        where: Composable | None = None,
        params: Sequence[Any] = (),
        *,
        order_by: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Rows of a table (all columns, values `plain`), in key order unless `order_by`."""
        curs.execute(self.select_statement(name, where, order_by=order_by, limit=limit), params)
        return [{k: plain(v) for k, v in row.items()} for row in curs.fetchall()]

    def read(
        self,
        name: str,
        where: Composable | None = None,
        params: Sequence[Any] = (),
        *,
        order_by: Sequence[str] | None = None,
        limit: int = ROWS_LISTED_MAX,
    ) -> list[dict[str, Any]]:
        """`select` in a read-only transaction of its own, at most `limit` rows."""
        assert 0 <= limit <= ROWS_LISTED_MAX, limit
        with self.datastore.transaction() as curs:
            return self.select(curs, name, where, params, order_by=order_by, limit=limit)

    # -- state hash ------------------------------------------------------------------------

    def state_hash(self) -> str:
        """sha256 over every table of the view, in declaration order, each in key order: one
        line per row, the JSON array [table name, canonical value of each column...]. Read
        from one snapshot, streamed (a server-side cursor per table)."""
        digest = hashlib.sha256()
        with self.datastore.transaction() as curs:
            curs.execute(SQL("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
            for t in self.tables:
                with curs.connection.cursor(name=f"state_hash_{t.name}") as rows:
                    rows.itersize = STATE_HASH_FETCH_SIZE
                    rows.execute(self.select_statement(t.name))
                    for row in rows:
                        line = [t.name, *(canonical(row[c]) for c in t.column_names)]
                        digest.update(orjson.dumps(line) + b"\n")
        return digest.hexdigest()


TView = TypeVar("TView", bound=MarketViewRecorder)


def construct_view(
    recorder_class: type[TView], env: Mapping[str, str], *, schema: str | None = None
) -> TView:
    """A view recorder from eventsourcing environment keys (POSTGRES_*), in `schema` when
    given; its tables are created. Its own connection pool: close with `datastore.close()`."""
    values = dict(env)
    if schema is not None:
        values["POSTGRES_SCHEMA"] = schema
    values["CREATE_TABLE"] = "true"
    factory = PostgresFactory(Environment(recorder_class.view_name, values))
    return factory.tracking_recorder(recorder_class)


# -- decoding ---------------------------------------------------------------------------------

DECODER_CACHE_MAX = 100_000
"""Most UUIDs and times a `MarketDecoder` keeps parsed (then it starts afresh)."""

_Convert = Callable[[Any], Any]


class MarketDecoder:
    """Decodes stored marketplace events as `MarketMapper.to_domain_event` does (same facts,
    same upcasts, `CodecError` on a state that does not fit its type), faster: each fact
    type's decoder is compiled once from its type hints, and the UUIDs and times a log
    repeats (lease ids, the moment of a round of heartbeats) are parsed once.

    Equal to the codec by test (every fact of a market run, and the codec's property tests'
    facts); it reads the same stored JSON (`ledger.market.codec`)."""

    def __init__(self) -> None:
        self._facts: dict[str, tuple[type[Any], _Convert, int]] = {}
        """Per topic: the fact's class, its decoder, its class version."""
        self._classes: dict[type[Any], _Convert] = {}
        self._uuids: dict[str, UUID] = {}
        self._times: dict[str, datetime] = {}

    def event(
        self, originator_id: UUID | str, version: int, topic: str, state: bytes
    ) -> MarketEvent:
        found = self._facts.get(topic)
        if found is None:
            try:
                cls = resolve_topic(topic)
            except Exception as e:
                raise CodecError(f"unknown event topic {topic!r}") from e
            found = self._facts[topic] = (cls, self._compile(cls), getattr(cls, "class_version", 1))
        cls, convert, class_version = found
        values = orjson.loads(state)
        fact_state = values["fact"]
        from_version = values.get("class_version", 1)
        while from_version < class_version:
            getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(fact_state)
            from_version += 1
        if not isinstance(originator_id, UUID):
            text = str(originator_id)
            originator_id = self._uuids.get(text) or self.uuid(text)
        recorded_at = values["recorded_at"]
        event: MarketEvent = _new_market_event(
            originator_id,
            version,
            self._times.get(recorded_at) or self.time(recorded_at),
            convert(fact_state),
        )
        return event

    def uuid(self, text: Any) -> UUID:
        found = self._uuids.get(text)
        if found is None:
            if not isinstance(text, str):
                raise TypeError(f"expected a string, got {text!r}")
            if len(self._uuids) >= DECODER_CACHE_MAX:
                self._uuids.clear()
            found = self._uuids[text] = UUID(text)
        return found

    def time(self, text: Any) -> datetime:
        found = self._times.get(text)
        if found is None:
            if not isinstance(text, str):
                raise TypeError(f"expected a string, got {text!r}")
            found = datetime.fromisoformat(text)
            if found.tzinfo is None:
                raise ValueError(f"time without offset: {text!r}")
            if len(self._times) >= DECODER_CACHE_MAX:
                self._times.clear()
            self._times[text] = found
        return found

    def _compile(self, cls: type[Any]) -> _Convert:
        """The decoder of dataclass `cls`: `_generate`'s, falling back on `_unrolled`'s."""
        found = self._classes.get(cls)
        if found is not None:
            return found
        self._classes[cls] = lambda state: self._classes[cls](state)  # recursive types
        checked = self._unrolled(cls)
        self._classes[cls] = self._generate(cls, checked)
        return self._classes[cls]

    def _unrolled(self, cls: type[Any]) -> _Convert:
        """The decoder of dataclass `cls` (the codec's `decode`, unrolled): checks every
        field and raises `CodecError` naming what does not fit."""
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        defaulted = frozenset(
            f.name
            for f in fields
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        )
        converters: list[tuple[str, _Convert]] = []
        for f in fields:
            converters.append((f.name, self._converter(hints[f.name])))

        def decode_fields(state: Any) -> Any:
            if not isinstance(state, dict):
                raise CodecError(f"{cls.__name__}: expected an object, got {type(state).__name__}")
            values: dict[str, Any] = {}
            for name, convert in converters:
                try:
                    raw = state[name]
                except KeyError:
                    if name in defaulted:
                        continue
                    raise CodecError(f"{cls.__name__}: field {name!r} is missing") from None
                try:
                    values[name] = convert(raw)
                except CodecError:
                    raise
                except (TypeError, ValueError, KeyError) as e:
                    raise CodecError(f"{cls.__name__}.{name}: {e}") from e
            if len(state) != len(values):
                extra = sorted(set(state) - set(values))
                raise CodecError(f"{cls.__name__}: unknown fields {extra}")
            return cls(**values)

        return decode_fields

    def _generate(self, cls: type[Any], checked: _Convert) -> _Convert:
        """A decoder of dataclass `cls` generated as Python source: one function, every
        field read and converted inline (no call per field, the caches read in place). It
        takes the plain path only: a state of exactly the declared shape, every value of
        the exact JSON type its field expects. Anything else (a missing or unknown field, a
        wrong type, a bad value, a refusal by the class) is handed to `checked`, which
        decodes it the same way or raises the error that names what does not fit. So the
        result is `checked`'s, always (tested on every fact of a market run)."""
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        names: dict[str, Any] = {
            "cls": cls,
            "checked": checked,
            "uuids_get": self._uuids.get,
            "uuid": self.uuid,
            "times_get": self._times.get,
            "time": self.time,
            "integer": _integer,
            "Unfit": _UnfitError,
            "unfit": _unfit,
        }
        counter = iter(range(1_000_000))

        def expression(hint: Any, var: str) -> str:
            origin = typing.get_origin(hint)
            if origin in (types.UnionType, typing.Union):
                arms = typing.get_args(hint)
                real = [a for a in arms if a is not type(None)]
                inner = expression(real[0], var)
                if type(None) not in arms:
                    return inner
                return f"(None if {var} is None else {inner})"
            if origin is tuple or origin is frozenset:
                item = f"_v{next(counter)}"
                make = "tuple" if origin is tuple else "frozenset"
                each = expression(typing.get_args(hint)[0], item)
                return f"({make}([{each} for {item} in {var}]) if type({var}) is list else unfit())"
            if hint is str or hint is bool:
                return f"({var} if type({var}) is {hint.__name__} else unfit())"
            if isinstance(hint, type) and issubclass(hint, IntEnum):
                enum = f"enum{next(counter)}"
                names[enum] = hint
                return f"({enum}[{var}] if type({var}) is str else unfit())"
            if hint is int:
                return f"({var} if type({var}) is int else integer({var}))"
            if hint is UUID:
                return f"(uuids_get({var}) or uuid({var}))"
            if hint is datetime:
                return f"(times_get({var}) or time({var}))"
            assert isinstance(hint, type) and dataclasses.is_dataclass(hint), hint
            nested = f"nested{next(counter)}"
            names[nested] = self._compile(hint)
            return f"{nested}({var})"

        required = [f for f in fields if f.name not in _defaulted_fields(cls)]
        optional = [f for f in fields if f.name in _defaulted_fields(cls)]
        lines = ["def decode(state):", "    try:"]
        lines.append("        if type(state) is not dict: raise Unfit")
        for i, f in enumerate(required):
            lines.append(f"        a{i} = state[{f.name!r}]")
        setters = _slot_setters(cls)
        if setters is not None:
            # Built as the generated __init__ builds it (each slot set), without its call.
            names["new"] = object.__new__
            lines.append("        o = new(cls)")
            for i, f in enumerate(required):
                names[f"set_{f.name}"] = setters[f.name]
                lines.append(f"        set_{f.name}(o, {expression(hints[f.name], f'a{i}')})")
            lines.append(f"        n = {len(required)}")
            for f in optional:
                names[f"set_{f.name}"] = setters[f.name]
                if f.default is not dataclasses.MISSING:
                    names[f"default_{f.name}"] = f.default
                    default = f"default_{f.name}"
                else:
                    names[f"default_{f.name}"] = f.default_factory
                    default = f"default_{f.name}()"
                lines.append(f"        if {f.name!r} in state:")
                lines.append(f"            b = state[{f.name!r}]")
                lines.append(f"            set_{f.name}(o, {expression(hints[f.name], 'b')})")
                lines.append("            n += 1")
                lines.append("        else:")
                lines.append(f"            set_{f.name}(o, {default})")
            lines.append("        if len(state) != n: raise Unfit")
            lines.append("        return o")
        elif optional:
            lines.append("        extra = {}")
            for f in optional:
                lines.append(f"        if {f.name!r} in state:")
                lines.append(f"            b = state[{f.name!r}]")
                lines.append(f"            extra[{f.name!r}] = {expression(hints[f.name], 'b')}")
            lines.append(f"        if len(state) != {len(required)} + len(extra): raise Unfit")
        else:
            lines.append(f"        if len(state) != {len(required)}: raise Unfit")
        arguments = (
            []
            if setters is not None
            else [f"{f.name}={expression(hints[f.name], f'a{i}')}" for i, f in enumerate(required)]
        )
        if setters is None:
            if optional:
                arguments.append("**extra")
            lines.append(f"        return cls({', '.join(arguments)})")
        lines.append("    except Exception:")
        lines.append("        return checked(state)")
        exec("\n".join(lines), names)  # noqa: S102 - source built above from type hints
        decode: _Convert = names["decode"]
        return decode

    def _converter(self, hint: Any) -> _Convert:
        origin = typing.get_origin(hint)
        if origin in (types.UnionType, typing.Union):
            arms = typing.get_args(hint)
            real = [a for a in arms if a is not type(None)]
            if len(real) != 1:
                raise TypeError(f"cannot decode a union of several types: {hint}")
            inner = self._converter(real[0])
            if type(None) not in arms:
                return inner
            return lambda value: None if value is None else inner(value)
        if origin is tuple:
            args = typing.get_args(hint)
            if len(args) != 2 or args[1] is not Ellipsis:
                raise TypeError(f"only tuple[X, ...] is supported, got {hint}")
            item = self._converter(args[0])
            return lambda value: tuple(item(v) for v in _array(value))
        if origin is frozenset:
            (arg,) = typing.get_args(hint)
            member = self._converter(arg)
            return lambda value: frozenset(member(v) for v in _array(value))
        if hint is str:
            return _text
        if hint is bool:
            return _flag
        if isinstance(hint, type) and issubclass(hint, IntEnum):
            enum = hint
            return lambda value: _member(enum, value)
        if hint is int:
            return _integer
        if hint is UUID:
            return self.uuid
        if hint is datetime:
            return self.time
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return self._compile(hint)
        raise TypeError(f"cannot decode {hint}")


def _slot_setters(cls: type[Any]) -> dict[str, Callable[[Any, Any], None]] | None:
    """The slot of each field of dataclass `cls`, as setters, when an instance is exactly
    its fields set in order: slots for every field, every field set by `__init__`, no
    `__post_init__` (nothing checked or derived). None otherwise (it is called)."""
    if hasattr(cls, "__post_init__"):
        return None
    setters: dict[str, Callable[[Any, Any], None]] = {}
    for f in dataclasses.fields(cls):
        slot = cls.__dict__.get(f.name)
        if not f.init or not isinstance(slot, types.MemberDescriptorType):
            return None
        setters[f.name] = slot.__set__
    return setters


def _slot_constructor(cls: type[Any]) -> Callable[..., Any]:
    """`cls` itself, or a function of its fields in order that builds the same instance
    from its slots (see `_slot_setters`)."""
    setters = _slot_setters(cls)
    if setters is None:
        return cls
    names = list(setters)
    source = (
        f"def make({', '.join(names)}):\n    o = new(cls)\n"
        + "".join(f"    set_{n}(o, {n})\n" for n in names)
        + "    return o\n"
    )
    scope: dict[str, Any] = {"new": object.__new__, "cls": cls}
    scope.update({f"set_{n}": setter for n, setter in setters.items()})
    exec(source, scope)  # noqa: S102 - source built above from the dataclass's fields
    make: Callable[..., Any] = scope["make"]
    return make


_new_market_event = _slot_constructor(MarketEvent)


class _UnfitError(Exception):
    """A state off a generated decoder's plain path (the checked decoder takes it)."""


def _unfit() -> Any:
    raise _UnfitError


def _defaulted_fields(cls: type[Any]) -> frozenset[str]:
    return frozenset(
        f.name
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    )


def _array(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected an array, got {value!r}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def _integer(value: Any) -> int:
    if type(value) is int:
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"expected an integer, got {value!r}")
    return int(value)


def _member(enum: type[IntEnum], value: Any) -> IntEnum:
    if not isinstance(value, str):
        raise TypeError(f"expected a {enum.__name__} name, got {value!r}")
    return enum[value]


# -- the projection ---------------------------------------------------------------------------


def catch_up_pages(
    log: ApplicationRecorder,
    application_name: str,
    position: Callable[[], int],
    page_size: int,
    pages_max: int | None,
    apply: Callable[[Sequence[Notification], Tracking, int], int],
) -> int:
    """The catch-up loop every view shares: read a page of `log` after the view's
    `position()`, hand it to `apply(notifications, tracking, after)` (one transaction with
    its tracking), again until the log's end or `pages_max` pages. A page refused because
    another projection of the view moved its position on is skipped (reading on from
    there); any other refusal is raised. Returns what `apply` reported, summed."""
    applied = 0
    pages = 0
    while pages_max is None or pages < pages_max:
        start = position()
        notifications = log.select_notifications(
            start=start, limit=page_size, inclusive_of_start=False
        )
        if not notifications:
            break
        pages += 1
        try:
            applied += apply(notifications, Tracking(application_name, notifications[-1].id), start)
        except IntegrityError:
            # Refused: fine when another projection of this view moved its position on
            # (read on from there); else a real conflict, not to be retried.
            if position() <= start:
                raise
            continue
        if len(notifications) < page_size:
            break
    return applied


class MarketProjection(Projection[TView], ABC):
    """Keeps a view up to date with the marketplace log, a page per transaction."""

    def __init__(
        self,
        app: MarketplaceApplication,
        view: TView | None = None,
        *,
        page_size: int = PAGE_SIZE_MAX,
    ) -> None:
        """`view` defaults to the view's tables in the marketplace's own schema and pool."""
        assert 0 < page_size <= PAGE_SIZE_MAX, page_size
        if view is None:
            view = self.recorder_class()(app.app_recorder.datastore)
            view.create_table()
        super().__init__(view)
        self.app = app
        self.page_size = page_size
        self.topics = tuple(sorted({get_topic(t) for t in view.fact_types}))
        self._topics = frozenset(self.topics)
        self._decoder = MarketDecoder()

    @classmethod
    @abstractmethod
    def recorder_class(cls) -> type[TView]:
        """The view recorder this projection writes."""

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        """Apply one event with its tracking (the library's per-event entry point)."""
        events = [(tracking.notification_id, domain_event)]
        if not isinstance(domain_event, MarketEvent):
            events = []
        self.view.apply_page(events, tracking)

    def position(self) -> int:
        """Notification id of the last event the view tracked (0: none yet)."""
        return self.view.max_tracking_id(self.app.name) or 0

    def catch_up(self, *, pages_max: int | None = None) -> int:
        """Apply the log's events after `position()`, a page per transaction, until the log's
        end (or `pages_max` pages). Returns how many events of the view's facts were applied
        (by this call; pages another projection of the view applied first do not count)."""

        def apply(notifications: Sequence[Notification], tracking: Tracking, after: int) -> int:
            page = [(n.id, self._decode(n)) for n in notifications if n.topic in self._topics]
            return self.view.apply_page(page, tracking, after=after)

        return catch_up_pages(
            self.app.recorder,
            self.app.name,
            self.position,
            self.page_size,
            pages_max,
            apply,
        )

    def _decode(self, notification: Notification) -> MarketEvent:
        n = notification
        return self._decoder.event(n.originator_id, n.originator_version, n.topic, n.state)

    def state_hash(self) -> str:
        """sha256 over every row of every table of the view (see the recorder's)."""
        return self.view.state_hash()

    def rebuild_into(self, schema: str) -> Self:
        """A projection of the same log into the view's tables in `schema` (an existing,
        empty schema), built from zero. Close it with `close()`."""
        view = construct_view(type(self.view), self.app.env, schema=schema)
        rebuilt = type(self)(self.app, view, page_size=self.page_size)
        rebuilt.catch_up()
        return rebuilt

    def close(self) -> None:
        """Close the view's pool, unless it is the marketplace's own."""
        if self.view.datastore is not self.app.app_recorder.datastore:
            self.view.datastore.close()
