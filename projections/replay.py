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
  same (a page's tracking is the position it was read up to);
- each event is decoded once, and handed to every view that reads its type;
- the next page is read (by a thread, from the database) while the current one is applied;
- a view applies a big page in one transaction: the views that fold state (leases,
  providers, balances) load the rows a page touches once and write back each changed row
  once, so thousands of heartbeats of one lease cost one row write.

Positions are per log: a notification id of `marketplace_events` or `ledger_events`.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TextIO

import psycopg
from eventsourcing.persistence import Notification, Tracking
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier

from ledger.events import BatchCommitted, LedgerEvent
from ledger.market.store import MarketplaceApplication
from ledger.store import LedgerApplication
from projections import balances, view

REPLAY_PAGE_SIZE = 20_000
"""Log events read, and applied by each view in one transaction, per page."""
REPLAY_PAGE_SIZE_MAX = 100_000
LIVE_POINT_TRIES_MAX = 5
"""Tries at reading a live view's position and hash while a projector moves it on."""
PROGRESS_INTERVAL_S = 0.5
"""Least time between two progress updates on a terminal (1 s between lines otherwise)."""
PROGRESS_BAR_WIDTH = 24

TIME_FIELDS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    MarketplaceApplication.name: ("recorded_at", ()),
    LedgerApplication.name: ("timestamp", (f"{BatchCommitted.__module__}:BatchCommitted",)),
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
    applied: int = 0
    write_s: float = 0.0


@dataclass
class _Log:
    """One log and the views rebuilt from it."""

    app: Any
    targets: list[_Target] = field(default_factory=list)
    decoder: view.MarketDecoder = field(default_factory=view.MarketDecoder)

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
            return found if isinstance(found, LedgerEvent) else None

        return ledger_event


def _topics_of(projection: AnyProjection) -> frozenset[str] | None:
    if isinstance(projection, balances.BalancesProjection):
        return frozenset(balances.FACT_TOPICS)
    if isinstance(projection, view.MarketProjection):
        return frozenset(projection.topics)
    return None


def _rebuilt(projection: AnyProjection, schema: str) -> AnyProjection:
    """A projection of the same log into the view's tables in `schema` (created)."""
    if isinstance(projection, balances.BalancesProjection):
        return balances.BalancesProjection(
            projection.app, balances.construct_view(projection.app.env, schema=schema)
        )
    if isinstance(projection, view.MarketProjection):
        recorder = view.construct_view(type(projection.view), projection.app.env, schema=schema)
        rebuilt: AnyProjection = type(projection)(projection.app, recorder)
        return rebuilt
    raise ReplayError(f"cannot rebuild a {type(projection).__name__}")


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


_Row = tuple[int, str, int, str, bytes]
"""notification_id, originator_id (text), originator_version, topic, state."""


def _pages(
    log: _Log, page_size: int, timings: dict[str, float]
) -> Iterator[tuple[list[_Row], int]]:
    """The log's rows of the topics read, up to its stop, a page at a time, with the
    position each page covers up to; the next page is read (by a thread) while this one is
    applied."""
    stop = log.stop
    topics = log.topics()
    datastore = log.app.recorder.datastore
    statement = SQL(
        "SELECT notification_id, originator_id::text, originator_version, topic, state "
        "FROM {schema}.{table} WHERE notification_id > %s AND notification_id <= %s {topics}"
        "ORDER BY notification_id LIMIT %s"
    ).format(
        schema=Identifier(datastore.schema),
        table=Identifier(_table_name(log.app)),
        topics=SQL("AND topic = ANY(%s) " if topics else ""),
    )
    pages: queue.Queue[tuple[list[_Row], int] | BaseException | None] = queue.Queue(2)
    halt = threading.Event()

    def read() -> None:
        start = 0
        try:
            with datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as curs:
                while not halt.is_set() and start < stop:
                    began = time.perf_counter()
                    params: tuple[Any, ...] = (
                        (start, stop, topics, page_size) if topics else (start, stop, page_size)
                    )
                    curs.execute(statement, params, prepare=True)
                    rows: list[_Row] = curs.fetchall()
                    conn.rollback()
                    timings["read (thread)"] += time.perf_counter() - began
                    end = rows[-1][0] if len(rows) == page_size else stop
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


def replay(
    projections: Mapping[str, AnyProjection],
    schema: str,
    *,
    stops: Mapping[str, int] | None = None,
    page_size: int = REPLAY_PAGE_SIZE,
    progress: TextIO | None = None,
) -> ReplayResult:
    """Rebuild each view of `projections` (name -> live projection) from zero into `schema`
    (an existing, empty schema), up to `stops[name]` (inclusive; default: its log's last
    event; views not in a given `stops` are left out). The rebuilt views stay in `schema`."""
    if not 0 < page_size <= REPLAY_PAGE_SIZE_MAX:
        raise ReplayError(f"page size must be within 1..{REPLAY_PAGE_SIZE_MAX}, got {page_size}")
    started = time.perf_counter()
    heads = log_heads(projections)
    timings: dict[str, float] = defaultdict(float)
    logs: dict[str, _Log] = {}
    rebuilt: list[_Target] = []
    try:
        for name, p in projections.items():
            if stops is not None and name not in stops:
                continue
            stop = heads[p.app.name] if stops is None else stops[name]
            if not 0 <= stop <= heads[p.app.name]:
                raise ReplayError(
                    f"{name}: position {stop} is not in the {p.app.name} log "
                    f"(0..{heads[p.app.name]})"
                )
            target = _Target(name, p, _rebuilt(p, schema), _topics_of(p), stop)
            rebuilt.append(target)
            logs.setdefault(p.app.name, _Log(p.app)).targets.append(target)
        events = {log.name: _count_events(log.app, log.stop) for log in logs.values()}
        bar = Progress(progress, sum(events.values()), started)
        done_before = 0
        for log in logs.values():
            offset = log.stop - events[log.name]  # positions not taken (gaps in the ids)
            for notifications, end in _pages(log, page_size, timings):
                _apply(log, notifications, end, timings)
                bar.update(done_before + max(0, min(events[log.name], end - offset)))
            for target in log.targets:  # views whose stop no page reached (nothing to read)
                if target.tracked < target.stop:
                    _apply_to(target, log, [], target.stop, timings)
            done_before += events[log.name]
            bar.update(done_before)
        bar.finish()
        began = time.perf_counter()
        views = tuple(
            ViewReplayed(
                name=t.name,
                log=t.projection.app.name,
                position=t.rebuilt.position(),
                events=_count_events(t.projection.app, t.stop),
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


def _apply(log: _Log, rows: Sequence[_Row], end: int, timings: dict[str, float]) -> None:
    """Decode a page once and hand each view the events of its topics, in log order."""
    began = time.perf_counter()
    decode = log.decoder_of()
    active = [t for t in log.targets if t.tracked < t.stop]
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
        _apply_to(target, log, page, min(end, stop), timings)


def _apply_to(
    target: _Target,
    log: _Log,
    page: Sequence[tuple[int, Any]],
    end: int,
    timings: dict[str, float],
) -> None:
    began = time.perf_counter()
    target.applied += target.rebuilt.view.apply_page(
        page, Tracking(log.name, end), after=target.tracked
    )
    spent = time.perf_counter() - began
    target.write_s += spent
    timings["apply"] += spent
    target.tracked = end


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
