"""Replay: every read model rebuilt from zero in a fresh schema, and compared with the live one.

`replay(projections, schema, stops=...)` builds each view again from its log into `schema`
(an empty schema), up to a position per view, and returns each view's state hash there.
`live_points(projections)` reads each live view's position and state hash (from a moment
when the position did not move), so `compare` can tell, view by view, whether a rebuild to
the live position equals the live view bit for bit. `stops_as_of(...)` turns "as of time T"
or "as of log position N" into the position of each log to stop at.

The replay path is the views' own: every page is applied by the view recorder's
`apply_page` (the same code `aether project` runs, so equal input gives equal rows), with
its `Tracking` in the same transaction and the same exactly-once checks. What differs is
the shape of the work:

- each log is read once for all its views (not once per view), in big pages
  (`REPLAY_PAGE_SIZE`), and only the rows of the topics some view reads: the database skips
  the rest (commands handled, facts no view reads), whose positions are tracked all the
  same (a view's write tracks the position it was read up to; a page holding nothing a
  view reads costs that view no transaction: its next write tracks those positions);
- a page is a range of positions read in binary without ORDER BY (sorted here), so no
  plan ever sorts the log on disk; the next page is read (by a thread) while the current
  one is applied;
- each event is decoded once, by decoders generated per fact class
  (`view.MarketDecoder`, `balances.LedgerDecoder`: equal to the codecs by test), and
  handed to every view that reads its type;
- a view applies a big page in one transaction: the views that fold state (leases,
  providers, balances, the order book) load the rows a page touches once and write back
  each changed row once, so thousands of heartbeats of one lease cost one row write; the
  rebuilt views commit without waiting for the disk (a rebuild that does not finish is
  redone), and share one connection pool;
- the views' tables are created (and the logs counted) by a few threads at once;
- Python's cyclic collector is off during a replay (the young generation is collected
  after each page): it would otherwise walk the replay's long-lived objects again and again;
- the logs but the biggest are replayed by a forked worker process meanwhile
  (`parallel`), each log by one process, each view written by one process.

Positions are per log: a notification id of `marketplace_events` or `ledger_events`.
"""

from __future__ import annotations

import contextlib
import gc
import operator
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TextIO
from uuid import UUID

import psycopg
from eventsourcing.persistence import Notification, Tracking
from eventsourcing.postgres import PostgresDatastore
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier

from domain.usage import UsageRecorded
from ledger.events import BatchCommitted, LedgerEvent
from ledger.market.store import MarketplaceApplication
from ledger.settlement import SETTLEMENT_APPLICATION_NAME
from ledger.store import LedgerApplication
from ledger.usage import USAGE_APPLICATION_NAME
from projections import balances, view

REPLAY_PAGE_SIZE = 20_000
"""Log events read, and applied by each view in one transaction, per page."""
REPLAY_PAGE_SIZE_MAX = 100_000
SETUP_THREADS_MAX = 4
"""Threads that create the rebuilt views' tables (and count the logs) at once."""
LIVE_POINT_TRIES_MAX = 5
"""Tries at reading a live view's position and hash while a projector moves it on."""
PROGRESS_INTERVAL_S = 0.5
"""Least time between two progress updates on a terminal (1 s between lines otherwise)."""
PROGRESS_BAR_WIDTH = 24

TIME_FIELDS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    MarketplaceApplication.name: ("recorded_at", ()),
    LedgerApplication.name: ("timestamp", (f"{BatchCommitted.__module__}:BatchCommitted",)),
    SETTLEMENT_APPLICATION_NAME: ("recorded_at", ()),
    USAGE_APPLICATION_NAME: ("received_at", ()),
}
"""Per log: the field of an event's stored JSON that holds its recorded time, and the
topics whose time does not cut the log (the ledger's batch records, as `ledger.queries`)."""


class ReplayError(Exception):
    """A replay cannot be done as asked (a bad position, a schema not empty, ...)."""


class AnyProjection(Protocol):
    """What replay needs of a projection (`MarketProjection`, `BalancesProjection`)."""

    @property
    def app(self) -> Any: ...

    @property
    def view(self) -> Any: ...

    def position(self) -> int: ...

    def state_hash(self) -> str: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LivePoint:
    """A live view's position and its state hash there."""

    position: int
    state_hash: str


@dataclass(frozen=True, slots=True)
class ViewReplayed:
    """One view rebuilt from zero."""

    name: str
    log: str
    """The application whose log the view reads (`marketplace`, `ledger`)."""
    position: int
    """The log position the view was rebuilt to (inclusive)."""
    events: int
    """Events of the log up to `position` (all of them, read or skipped)."""
    applied: int
    """Of those, the events of the facts the view reads."""
    state_hash: str
    tables: Mapping[str, int]
    """Rows per table of the rebuilt view."""
    write_s: float
    """Time spent in the view's transactions (its writes and their round trips)."""


@dataclass(frozen=True, slots=True)
class ReplayResult:
    schema: str
    views: tuple[ViewReplayed, ...]
    events_total: int
    """Events of the logs read up to the furthest stop (each log counted once)."""
    elapsed_s: float
    timings: Mapping[str, float]
    """Where the time went: read (waiting for the database), decode, apply, hash."""


@dataclass(frozen=True, slots=True)
class Comparison:
    name: str
    position: int
    events: int
    live_hash: str
    replay_hash: str

    @property
    def equal(self) -> bool:
        return self.live_hash == self.replay_hash


# -- where to stop ----------------------------------------------------------------------------


def _table_name(app: Any) -> str:
    recorder = app.recorder
    name: str = recorder.events_table_name
    return name


def log_heads(projections: Mapping[str, AnyProjection]) -> dict[str, int]:
    """Per log, the position of its last event (0 when empty)."""
    heads: dict[str, int] = {}
    for p in projections.values():
        if p.app.name not in heads:
            heads[p.app.name] = p.app.recorder.max_notification_id() or 0
    return heads


def stops_as_of(
    projections: Mapping[str, AnyProjection],
    *,
    at: datetime | None = None,
    positions: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Per view, the log position to replay to: the prefix of its log recorded at or before
    `at` (up to the first event recorded after it, as `ledger.queries` cuts the ledger), or
    the position given for its log in `positions` (log name -> position). Views of a log
    that `positions` does not name are left out. A position past the log's end is refused."""
    if (at is None) == (positions is None):
        raise ReplayError("give a time or log positions, not both")
    heads = log_heads(projections)
    cuts: dict[str, int] = {}
    if positions is not None:
        unknown = sorted(set(positions) - set(heads))
        if unknown:
            raise ReplayError(f"no log named {', '.join(unknown)}: logs are {', '.join(heads)}")
        for log, position in positions.items():
            if position < 0 or position > heads[log]:
                raise ReplayError(
                    f"position {position} is not in the {log} log (its positions: 0..{heads[log]})"
                )
            cuts[log] = position
    else:
        assert at is not None
        if at.tzinfo is None:
            raise ReplayError("give the time with its offset")
        for p in projections.values():
            log = p.app.name
            if log not in cuts:
                cuts[log] = _cut_at(p.app, at, heads[log])
    return {name: cuts[p.app.name] for name, p in projections.items() if p.app.name in cuts}


def _cut_at(app: Any, at: datetime, head: int) -> int:
    """The last position before the first event recorded after `at` (the head if none)."""
    time_field, ignored = TIME_FIELDS[app.name]
    datastore = app.recorder.datastore
    statement = SQL(
        "SELECT min(notification_id) AS first FROM {schema}.{table} "
        "WHERE NOT (topic = ANY(%s)) "
        "AND (convert_from(state, 'UTF8')::jsonb ->> %s)::timestamptz > %s"
    ).format(schema=Identifier(datastore.schema), table=Identifier(_table_name(app)))
    with datastore.transaction(commit=False) as curs:
        curs.execute(statement, (list(ignored), time_field, at))
        row = curs.fetchone()
    first = None if row is None else row["first"]
    if first is None:
        return head
    curs_statement = SQL(
        "SELECT COALESCE(max(notification_id), 0) AS last FROM {schema}.{table} "
        "WHERE notification_id < %s"
    ).format(schema=Identifier(datastore.schema), table=Identifier(_table_name(app)))
    with datastore.transaction(commit=False) as curs:
        curs.execute(curs_statement, (first,))
        found = curs.fetchone()
    assert found is not None
    return int(found["last"])


def live_points(projections: Mapping[str, AnyProjection]) -> dict[str, LivePoint]:
    """Each live view's position and state hash, read while the position stayed put (the
    hash is read between two equal readings of the position)."""
    points: dict[str, LivePoint] = {}
    for name, p in projections.items():
        for _ in range(LIVE_POINT_TRIES_MAX):
            before = p.position()
            digest = p.state_hash()
            if p.position() == before:
                points[name] = LivePoint(before, digest)
                break
        else:
            raise ReplayError(
                f"view {name} kept moving on while its hash was read: stop its projector"
            )
    return points


# -- the replay -------------------------------------------------------------------------------


@dataclass
class _Target:
    """One view being rebuilt."""

    name: str
    projection: AnyProjection
    rebuilt: AnyProjection
    topics: frozenset[str] | None
    """Topics the view reads; None: every topic."""
    stop: int
    tracked: int = 0
    """The position the rebuilt view tracks (written with its rows)."""
    read: int = 0
    """The position the view's log was read up to for it: past `tracked` while the pages
    since held nothing it reads (their positions are tracked with its next write)."""
    applied: int = 0
    write_s: float = 0.0
    writer: Any = None
    """The recorder pages are written through (None: `rebuilt.view`; a worker process
    writes through recorders of its own connections)."""


@dataclass
class _Log:
    """One log and the views rebuilt from it."""

    app: Any
    targets: list[_Target] = field(default_factory=list)
    decoder: view.MarketDecoder = field(default_factory=view.MarketDecoder)
    ledger_decoder: balances.LedgerDecoder | None = None
    """The ledger log's decoder (its caches kept from page to page)."""

    @property
    def name(self) -> str:
        name: str = self.app.name
        return name

    @property
    def stop(self) -> int:
        return max(t.stop for t in self.targets)

    def topics(self) -> list[str]:
        """Topics to read: the union of the views' (empty: every topic)."""
        found: set[str] = set()
        for t in self.targets:
            if t.topics is None:
                return []
            found |= t.topics
        return sorted(found)

    def decoder_of(self) -> Callable[[_Row], Any]:
        """Row -> event (None: not an event of the log's views)."""
        if isinstance(self.app, MarketplaceApplication):
            event = self.decoder.event
            return lambda row: event(row[1], row[2], row[3], row[4])
        if isinstance(self.app, LedgerApplication):
            if self.ledger_decoder is None:
                self.ledger_decoder = balances.LedgerDecoder(self.app.mapper)
            ledger = self.ledger_decoder.event

            def ledger_event_fast(row: _Row) -> Any:
                found = ledger(row[0], row[1], row[2], row[3], row[4])
                return found if isinstance(found, LedgerEvent) else None

            return ledger_event_fast
        mapper = self.app.mapper

        def ledger_event(row: _Row) -> Any:
            n = Notification(
                id=row[0],
                originator_id=row[1],
                originator_version=row[2],
                topic=row[3],
                state=row[4],
            )
            found = mapper.to_domain_event(n)
            return found if isinstance(found, LedgerEvent | UsageRecorded) else None

        return ledger_event


def _topics_of(projection: AnyProjection) -> frozenset[str] | None:
    if isinstance(projection, balances.BalancesProjection):
        return frozenset(balances.FACT_TOPICS)
    if isinstance(projection, view.MarketProjection):
        return frozenset(projection.topics)
    return None


def _rebuilt(
    projection: AnyProjection,
    schema: str,
    *,
    pools: dict[tuple[tuple[str, str], ...], Any] | None = None,
) -> AnyProjection:
    """A projection of the same log into the view's tables in `schema` (created). Views of
    the same database share one connection pool, kept in `pools` (by the POSTGRES_*
    settings): the first view opens it, as `construct_view` does; closing any view closes
    it (the others' closes then do nothing)."""
    env = projection.app.env
    key = tuple(sorted((k, str(v)) for k, v in env.items() if k.startswith("POSTGRES_")))
    shared = None if pools is None else pools.get(key)
    if isinstance(projection, balances.BalancesProjection):
        if shared is None:
            recorder: Any = balances.construct_view(env, schema=schema)
        else:
            recorder = balances.BalancesRecorder(shared)
            recorder.create_table()
        rebuilt: AnyProjection = balances.BalancesProjection(projection.app, recorder)
    elif isinstance(projection, view.MarketProjection):
        if shared is None:
            recorder = view.construct_view(type(projection.view), env, schema=schema)
        else:
            recorder = type(projection.view)(shared)
            recorder.create_table()
        rebuilt = type(projection)(projection.app, recorder)
    else:
        raise ReplayError(f"cannot rebuild a {type(projection).__name__}")
    if pools is not None:
        pools.setdefault(key, recorder.datastore)
    # A rebuild is thrown away if it does not finish: its pages need not wait for the disk.
    recorder.synchronous_commit = False
    return rebuilt


def table_names(recorder: Any) -> tuple[str, ...]:
    """The tables of a view recorder, in state hash order."""
    if isinstance(recorder, view.MarketViewRecorder):
        return tuple(t.name for t in recorder.tables)
    if isinstance(recorder, balances.BalancesRecorder):
        return (balances.VIEW_NAME, balances.HOLDS_TABLE_NAME)
    raise ReplayError(f"no tables known for a {type(recorder).__name__}")


def _rows_per_table(recorder: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    with recorder.datastore.transaction(commit=False) as curs:
        for name in table_names(recorder):
            curs.execute(
                SQL("SELECT count(*) AS n FROM {}.{}").format(
                    Identifier(recorder.datastore.schema), Identifier(name)
                )
            )
            row = curs.fetchone()
            counts[name] = int(row["n"]) if row is not None else 0
    return counts


def _count_topics(app: Any, stop: int) -> dict[str, int]:
    """Events of a log up to `stop`, per topic."""
    datastore = app.recorder.datastore
    with datastore.transaction(commit=False) as curs:
        curs.execute(
            SQL(
                "SELECT topic, count(*) AS n FROM {}.{} WHERE notification_id <= %s GROUP BY topic"
            ).format(Identifier(datastore.schema), Identifier(_table_name(app))),
            (stop,),
        )
        return {row["topic"]: int(row["n"]) for row in curs.fetchall()}


def _split(
    targets: Sequence[_Target], topic_rows: Mapping[str, Mapping[str, int]]
) -> tuple[list[_Target], list[_Target]]:
    """The views of the log with the most rows to read (of the topics its views read), and
    the views of the other logs. Split by log, each log is read and decoded once (by one
    process): splitting a log's views between processes was measured slower on a busy
    2-core machine (the log scanned and its shared topics decoded twice)."""

    def rows_read(log: str) -> int:
        topics: set[str] = set()
        for t in targets:
            if t.projection.app.name == log:
                if t.topics is None:
                    return sum(topic_rows.get(log, {}).values())
                topics |= t.topics
        return sum(topic_rows.get(log, {}).get(topic, 0) for topic in topics)

    names = list(dict.fromkeys(t.projection.app.name for t in targets))
    if not names:
        return [], []
    biggest = max(names, key=rows_read)
    here = [t for t in targets if t.projection.app.name == biggest]
    return here, [t for t in targets if t.projection.app.name != biggest]


def _run_now(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
    """`fn(*args, **kwargs)` called here, its outcome as a done `Future`."""
    future: Future[Any] = Future()
    try:
        future.set_result(fn(*args, **kwargs))
    except Exception as e:
        future.set_exception(e)
    return future


def _logs_of(targets: Sequence[_Target]) -> dict[str, _Log]:
    """The logs `targets` read, each with its views among them (in their order)."""
    logs: dict[str, _Log] = {}
    for t in targets:
        logs.setdefault(t.projection.app.name, _Log(t.projection.app)).targets.append(t)
    return logs


def _count_events(app: Any, stop: int) -> int:
    datastore = app.recorder.datastore
    with datastore.transaction(commit=False) as curs:
        curs.execute(
            SQL("SELECT count(*) AS n FROM {}.{} WHERE notification_id <= %s").format(
                Identifier(datastore.schema), Identifier(_table_name(app))
            ),
            (stop,),
        )
        row = curs.fetchone()
    return int(row["n"]) if row is not None else 0


def check_schema_empty(database_url: str, schema: str) -> bool:
    """Whether `schema` exists (False: it does not); raises ReplayError if it holds tables."""
    with psycopg.connect(database_url) as conn:
        exists = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)
        ).fetchone()
        if not exists or not exists[0]:
            return False
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = %s", (schema,)
        ).fetchone()
    if tables and tables[0]:
        raise ReplayError(f"schema {schema} holds {tables[0]} tables: replay needs an empty one")
    return True


_Row = tuple[int, UUID, int, str, bytes]
"""notification_id, originator_id, originator_version, topic, state."""
_position_of = operator.itemgetter(0)


def _pages(
    log: _Log,
    page_size: int,
    timings: dict[str, float],
    connect: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> Iterator[tuple[list[_Row], int]]:
    """The log's rows of the topics read, up to its stop, a page at a time, with the
    position each page covers up to; the next page is read (by a thread) while this one is
    applied.

    A page is a range of `page_size` positions (so at most that many rows), read without
    ORDER BY and sorted here: the database scans the range however its planner likes
    (never a sort spilled to disk, whatever the table's statistics say), and the rows come
    in binary (bytes as they are stored, no hex to undo). `connect`: where the reader's
    connection comes from (default: the log's pool)."""
    stop = log.stop
    topics = log.topics()
    datastore = log.app.recorder.datastore
    connect = connect or datastore.get_connection
    statement = SQL(
        "SELECT notification_id, originator_id, originator_version, topic, state "
        "FROM {schema}.{table} WHERE notification_id > %s AND notification_id <= %s {topics}"
    ).format(
        schema=Identifier(datastore.schema),
        table=Identifier(_table_name(log.app)),
        topics=SQL("AND topic = ANY(%s)" if topics else ""),
    )
    pages: queue.Queue[tuple[list[_Row], int] | BaseException | None] = queue.Queue(2)
    halt = threading.Event()

    def read() -> None:
        start = 0
        try:
            with connect() as conn, conn.cursor(row_factory=tuple_row, binary=True) as curs:
                while not halt.is_set() and start < stop:
                    began = time.perf_counter()
                    end = min(start + page_size, stop)
                    params: tuple[Any, ...] = (start, end, topics) if topics else (start, end)
                    curs.execute(statement, params, prepare=True)
                    rows: list[_Row] = curs.fetchall()
                    conn.rollback()
                    rows.sort(key=_position_of)
                    timings["read (thread)"] += time.perf_counter() - began
                    pages.put((rows, end))
                    start = end
            pages.put(None)
        except BaseException as e:  # handed to the consumer, raised there
            pages.put(e)

    reader = threading.Thread(target=read, name=f"replay-read-{log.name}", daemon=True)
    reader.start()
    try:
        while True:
            began = time.perf_counter()
            item = pages.get()
            timings["wait for reads"] += time.perf_counter() - began
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        halt.set()
        while reader.is_alive():
            with contextlib.suppress(queue.Empty):
                pages.get(timeout=0.05)
        reader.join()


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (and back as it was after).

    A replay allocates millions of short-lived, acyclic objects (rows, events, facts: freed
    by reference counting) while holding caches and pages that live long: the collector
    would be triggered every few hundred allocations and keep walking the long-lived ones
    (about half the replay's time in a measured run). It is switched off instead, and the
    young generation is collected after each page (`_collect_young`), which frees any cycle
    a page left behind: memory stays bounded by a page, as before."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _collect_young(timings: dict[str, float]) -> None:
    began = time.perf_counter()
    gc.collect(0)
    timings["collect"] += time.perf_counter() - began


@_collector_paused()
def replay(
    projections: Mapping[str, AnyProjection],
    schema: str,
    *,
    stops: Mapping[str, int] | None = None,
    page_size: int = REPLAY_PAGE_SIZE,
    progress: TextIO | None = None,
    parallel: bool = True,
) -> ReplayResult:
    """Rebuild each view of `projections` (name -> live projection) from zero into `schema`
    (an existing, empty schema), up to `stops[name]` (inclusive; default: its log's last
    event; views not in a given `stops` are left out). The rebuilt views stay in `schema`.

    `parallel`: the views of the logs but the biggest are replayed by a worker process
    meanwhile (where the platform can fork); False: all here, one log after the other."""
    if not 0 < page_size <= REPLAY_PAGE_SIZE_MAX:
        raise ReplayError(f"page size must be within 1..{REPLAY_PAGE_SIZE_MAX}, got {page_size}")
    started = time.perf_counter()
    heads = log_heads(projections)
    timings: dict[str, float] = defaultdict(float)
    rebuilt: list[_Target] = []
    pools: dict[tuple[tuple[str, str], ...], Any] = {}
    try:
        chosen: list[tuple[str, AnyProjection, int]] = []
        for name, p in projections.items():
            if stops is not None and name not in stops:
                continue
            stop = heads[p.app.name] if stops is None else stops[name]
            if not 0 <= stop <= heads[p.app.name]:
                raise ReplayError(
                    f"{name}: position {stop} is not in the {p.app.name} log "
                    f"(0..{heads[p.app.name]})"
                )
            chosen.append((name, p, stop))
        furthest: dict[str, tuple[Any, int]] = {}
        for _, p, stop in chosen:
            if stop >= furthest.get(p.app.name, (None, -1))[1]:
                furthest[p.app.name] = (p.app, stop)
        # The views' tables are created and the logs counted at once (each a few round trips
        # and a commit, waiting on the database); the first view opens the shared pool.
        with ThreadPoolExecutor(SETUP_THREADS_MAX, thread_name_prefix="replay-setup") as setup:
            counting = {
                log: setup.submit(_count_topics, app, stop) for log, (app, stop) in furthest.items()
            }
            building = [
                # The first, here, opens the shared pool the others then take connections of.
                (_run_now if i == 0 else setup.submit)(_rebuilt, p, schema, pools=pools)
                for i, (_, p, _) in enumerate(chosen)
            ]
            failure: BaseException | None = None
            for (name, p, stop), future in zip(chosen, building, strict=True):
                if future.exception() is not None:
                    failure = failure or future.exception()
                    continue
                rebuilt.append(_Target(name, p, future.result(), _topics_of(p), stop))
            if failure is not None:
                raise failure
            topic_rows = {log: future.result() for log, future in counting.items()}
        counts = {(log, furthest[log][1]): sum(rows.values()) for log, rows in topic_rows.items()}

        def counted(app: Any, stop: int) -> int:
            """Events of a log up to `stop` (counted once per log and stop)."""
            key = (app.name, stop)
            if key not in counts:
                counts[key] = _count_events(app, stop)
            return counts[key]

        events = {log: counted(app, stop) for log, (app, stop) in furthest.items()}
        timings["setup"] += time.perf_counter() - started
        bar = Progress(progress, sum(events.values()), started)
        # With `parallel`, the views of the log with the most rows to read are replayed
        # here, those of the other logs meanwhile by a worker process (forked: it starts at
        # once, with the views as they are here). Each view is written by one process only.
        here, there = list(rebuilt), list[_Target]()
        if parallel and hasattr(os, "fork"):
            here, there = _split(rebuilt, topic_rows)
        here_logs = _logs_of(here)
        worker = _Worker.start(list(_logs_of(there).values()), page_size) if there else None
        try:
            done_before = 0
            for log in here_logs.values():
                # Events of the log up to its stop, and the positions not taken (id gaps).
                log_events = counted(log.app, log.stop)
                offset = log.stop - log_events

                def shown(
                    end: int,
                    total: int = log_events,
                    offset: int = offset,
                    before: int = done_before,
                ) -> None:
                    bar.update(before + max(0, min(total, end - offset)))

                _replay_log(log, page_size, timings, shown)
                done_before += log_events
                bar.update(done_before)
            if worker is not None:
                worker.join(timings)
        finally:
            if worker is not None:
                worker.stop()
        bar.finish()
        began = time.perf_counter()
        views = tuple(
            ViewReplayed(
                name=t.name,
                log=t.projection.app.name,
                position=t.rebuilt.position(),
                events=counted(t.projection.app, t.stop),
                applied=t.applied,
                state_hash=t.rebuilt.state_hash(),
                tables=_rows_per_table(t.rebuilt.view),
                write_s=t.write_s,
            )
            for t in rebuilt
        )
        timings["hash"] += time.perf_counter() - began
    finally:
        for t in rebuilt:
            t.rebuilt.close()
    return ReplayResult(
        schema=schema,
        views=views,
        events_total=sum(events.values()),
        elapsed_s=time.perf_counter() - started,
        timings=dict(timings),
    )


def _replay_log(
    log: _Log,
    page_size: int,
    timings: dict[str, float],
    shown: Callable[[int], None] = lambda end: None,
    connect: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> None:
    """Every page of one log applied to its views, then each view's tracking brought to its
    stop (views whose last pages held nothing they read, or that no page reached)."""
    for rows, end in _pages(log, page_size, timings, connect):
        _apply(log, rows, end, timings)
        del rows
        _collect_young(timings)
        shown(end)
    for target in log.targets:
        if target.tracked < target.stop:
            _apply_to(target, log, [], target.stop, timings)


class _Worker:
    """A forked process that replays some logs into their rebuilt views and reports, per
    view, what it applied (the views' rows are in the database, where the parent reads
    their hashes).

    The child uses nothing of the parent's connections (they are the parent's: a child
    that closed one would end the parent's session): it opens its own, for reading and for
    writing, never frees an object it inherited (the collector is off, the inherited
    objects frozen), and leaves by `os._exit`, which runs no finalizer and flushes no
    inherited buffer."""

    def __init__(self, pid: int, results: int, logs: Sequence[_Log]) -> None:
        self.pid = pid
        self.results = results
        self.logs = logs

    @classmethod
    def start(cls, logs: Sequence[_Log], page_size: int) -> _Worker:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read_end)
            code = 0
            try:
                gc.freeze()
                try:
                    report: Any = ("done", _replay_in_worker(logs, page_size))
                except BaseException as e:
                    code = 1
                    report = ("failed", e)
                try:
                    payload = pickle.dumps(report)
                except Exception:
                    payload = pickle.dumps(("failed", ReplayError(f"worker: {report[1]!r}")))
                view_of_payload = memoryview(payload)
                while view_of_payload:
                    view_of_payload = view_of_payload[os.write(write_end, view_of_payload) :]
            finally:
                os._exit(code)
        os.close(write_end)
        return cls(pid, read_end, logs)

    def join(self, timings: dict[str, float]) -> None:
        """Wait for the worker; take its views' counts and positions, or raise its error."""
        chunks = []
        while chunk := os.read(self.results, 1 << 16):
            chunks.append(chunk)
        os.close(self.results)
        self.results = -1
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        if not chunks:
            raise ReplayError(f"the replay worker ended with status {status} and no report")
        outcome, found = pickle.loads(b"".join(chunks))  # noqa: S301 - our own child's
        if outcome != "done":
            raise found
        by_name = {t.name: t for log in self.logs for t in log.targets}
        for name, (applied, tracked, write_s) in found["views"].items():
            target = by_name[name]
            target.applied, target.tracked, target.read = applied, tracked, tracked
            target.write_s = write_s
        for key, seconds in found["timings"].items():
            timings[f"worker: {key}"] += seconds

    def stop(self) -> None:
        """End the worker if it still runs (the replay failed here first)."""
        if self.results >= 0:
            os.close(self.results)
            self.results = -1
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0


def _replay_in_worker(logs: Sequence[_Log], page_size: int) -> dict[str, Any]:
    """In the worker: each log replayed through connections of its own."""
    timings: dict[str, float] = defaultdict(float)
    opened: dict[int, Any] = {}
    try:
        for log in logs:
            reading = _connection_kwargs(log.app.recorder.datastore)
            for target in log.targets:
                inherited = target.rebuilt.view.datastore
                if id(inherited) not in opened:
                    opened[id(inherited)] = _datastore_like(inherited)
                target.writer = type(target.rebuilt.view)(opened[id(inherited)])
                target.writer.synchronous_commit = target.rebuilt.view.synchronous_commit

            def connect(reading: dict[str, Any] = reading) -> psycopg.Connection[Any]:
                return psycopg.connect(**reading)

            _replay_log(log, page_size, timings, connect=connect)
    finally:
        for datastore in opened.values():
            datastore.close()
    views = {t.name: (t.applied, t.tracked, t.write_s) for log in logs for t in log.targets}
    return {"views": views, "timings": dict(timings)}


def _connection_kwargs(datastore: Any) -> dict[str, Any]:
    """How the datastore's pool connects (dbname, host, port, user, password)."""
    kwargs: dict[str, Any] = dict(datastore.pool.kwargs)
    kwargs.pop("row_factory", None)
    return kwargs


def _datastore_like(datastore: PostgresDatastore) -> PostgresDatastore:
    """A datastore with its own pool, to the same database and schema as `datastore`."""
    kwargs = _connection_kwargs(datastore)
    return PostgresDatastore(
        dbname=kwargs["dbname"],
        host=kwargs["host"],
        port=kwargs["port"],
        user=kwargs["user"],
        password=kwargs["password"],
        schema=datastore.schema,
        lock_timeout=datastore.lock_timeout,
        idle_in_transaction_session_timeout=datastore.idle_in_transaction_session_timeout,
        single_row_tracking=datastore.single_row_tracking,
        originator_id_type=datastore.originator_id_type,  # type: ignore[arg-type]
        enable_db_functions=datastore.enable_db_functions,
    )


def _apply(log: _Log, rows: Sequence[_Row], end: int, timings: dict[str, float]) -> None:
    """Decode a page once and hand each view the events of its topics, in log order."""
    began = time.perf_counter()
    decode = log.decoder_of()
    active = [t for t in log.targets if t.read < t.stop]
    pages: list[list[tuple[int, Any]]] = [[] for _ in active]
    readers: dict[str, list[list[tuple[int, Any]]]] = {}
    for row in rows:
        topic = row[3]
        found = readers.get(topic)
        if found is None:
            found = readers[topic] = [
                pages[i] for i, t in enumerate(active) if t.topics is None or topic in t.topics
            ]
        if not found:
            continue
        event = decode(row)
        if event is None:
            continue
        item = (row[0], event)
        for page in found:
            page.append(item)
    timings["decode"] += time.perf_counter() - began
    for target, page in zip(active, pages, strict=True):
        stop = target.stop
        if end > stop:
            page = [item for item in page if item[0] <= stop]
        if not page and end < stop:
            # Nothing the view reads: no transaction, its next page tracks these positions.
            target.read = end
            continue
        _apply_to(target, log, page, min(end, stop), timings)


def _apply_to(
    target: _Target,
    log: _Log,
    page: Sequence[tuple[int, Any]],
    end: int,
    timings: dict[str, float],
) -> None:
    began = time.perf_counter()
    writer = target.writer or target.rebuilt.view
    target.applied += writer.apply_page(page, Tracking(log.name, end), after=target.tracked)
    spent = time.perf_counter() - began
    target.write_s += spent
    timings["apply"] += spent
    target.tracked = target.read = end


def compare(result: ReplayResult, live: Mapping[str, LivePoint]) -> list[Comparison]:
    """Each rebuilt view against its live point (rebuilt to the live view's position)."""
    found: list[Comparison] = []
    for v in result.views:
        point = live[v.name]
        if point.position != v.position:
            raise ReplayError(
                f"{v.name}: rebuilt to {v.position}, the live view is at {point.position}"
            )
        found.append(Comparison(v.name, v.position, v.events, point.state_hash, v.state_hash))
    return found


# -- progress ---------------------------------------------------------------------------------


class Progress:
    """A progress bar as plain text on a stream: events done / total, events/s, ETA. On a
    terminal one line redrawn (carriage return); else a line per second, and the last."""

    def __init__(
        self,
        stream: TextIO | None,
        total: int,
        started: float,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.stream = stream
        self.total = total
        self.started = started
        self.clock = clock
        self.done = 0
        self._shown_at: float | None = None
        self._tty = stream is not None and stream.isatty()

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        interval = PROGRESS_INTERVAL_S if self._tty else 1.0
        if self._shown_at is not None and now - self._shown_at < interval:
            return
        self._show(now, final=False)

    def finish(self) -> None:
        self.done = self.total
        self._show(self.clock(), final=True)

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        share = 1.0 if self.total == 0 else self.done / self.total
        filled = round(PROGRESS_BAR_WIDTH * share)
        left = self.total - self.done
        eta = "0s" if left <= 0 else ("?" if rate <= 0 else _duration(left / rate))
        return (
            f"replay [{'#' * filled}{'.' * (PROGRESS_BAR_WIDTH - filled)}] "
            f"{self.done:,}/{self.total:,} events {share:4.0%}  "
            f"{rate:,.0f} events/s  ETA {eta}"
        )

    def _show(self, now: float, *, final: bool) -> None:
        self._shown_at = now
        if self.stream is None:
            return
        text = self.line(now)
        if self._tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    whole = int(seconds + 0.5)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def default_progress() -> TextIO:
    return sys.stderr
