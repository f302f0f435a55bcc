"""Account balances: a read model of every account's four balances, kept from the ledger's log.

The view lives in two tables of a schema: `account_balances` (one row per account) and
`pending_holds` (the pending transfers not yet posted, voided or expired: a post, a void or
an expiry names only its pending transfer, so the projection keeps the hold's accounts and
amount to release it). Both are written, page by page, in the same transaction as the
view's tracking position (the library's single-row tracking table), so the view is
exactly-once and resumable: a restart continues from the stored position, and a page whose
position is already tracked is refused by the tracking upsert and its transaction rolled back.

Extension points used (nothing is written around the library):
- `BalancesRecorder`: the library's `PostgresTrackingRecorder` with the view's tables added to
  its create statements and one method that writes a page of changes together with its
  `Tracking` (the library's `_insert_tracking`, inside the same transaction).
- `BalancesProjection`: the library's `Projection`; `process_event` handles one event (so a
  `ProjectionRunner` can drive it), `catch_up` reads the log a page at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.persistence import IntegrityError, Notification, Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresFactory, PostgresTrackingRecorder
from eventsourcing.projection import Projection
from eventsourcing.utils import Environment, get_topic
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier

from ledger.events import AccountOpened, LedgerEvent, PendingTransferExpired, TransferCreated
from ledger.model import NIL_ID, TransferFlags
from ledger.store import LedgerApplication
from projections.view import catch_up_pages

VIEW_NAME = "account_balances"
"""Name of the view: its table, and the prefix of its tracking table."""
HOLDS_TABLE_NAME = "pending_holds"
TRACKING_TABLE_NAME = f"{VIEW_NAME}_tracking"
PAGE_SIZE_MAX = 1_000
"""Most log events applied in one transaction of the view."""

FACT_TOPICS = tuple(get_topic(c) for c in (AccountOpened, TransferCreated, PendingTransferExpired))
"""Topics of the events that change the view; the others (rejections, batch records) are
only tracked."""

_ASYNCHRONOUS_COMMIT = SQL("SET LOCAL synchronous_commit TO off")
_PENDING = int(TransferFlags.pending)
_POST = int(TransferFlags.post_pending_transfer)
_VOID = int(TransferFlags.void_pending_transfer)


class BalancesProjectionError(Exception):
    """The ledger's log holds something the balances view cannot apply (a bug upstream)."""


class PageAlreadyTrackedError(IntegrityError):
    """The view's tracked position is not the one the page was read after: another
    projection of the view applied (some of) these events first. Nothing was written."""


@dataclass(frozen=True, slots=True)
class AccountBalance:
    """One row of the view; amounts are integers in the asset's smallest unit."""

    account_id: UUID
    asset: str
    code: int
    flags: int
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int
    updated_position: int
    """Notification id of the last event that opened the account or changed its balances."""

    def balances(self) -> tuple[int, int, int, int]:
        return (self.debits_pending, self.debits_posted, self.credits_pending, self.credits_posted)


@dataclass(frozen=True, slots=True)
class Hold:
    """A pending transfer's reservation, kept until it is posted, voided or expired."""

    transfer_id: UUID
    debit_account_id: UUID
    credit_account_id: UUID
    amount: int


@dataclass(slots=True)
class _Delta:
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0
    position: int = 0


@dataclass(slots=True)
class PageChanges:
    """What one page of the log does to the view: computed before, written in one go."""

    opened: list[tuple[AccountOpened, int]] = field(default_factory=list)
    """Accounts opened, with the notification id that opened them."""
    deltas: dict[UUID, _Delta] = field(default_factory=dict)
    holds_added: dict[UUID, Hold] = field(default_factory=dict)
    holds_released: set[UUID] = field(default_factory=set)
    """Holds that existed before this page and are posted, voided or expired in it."""
    events_count: int = 0


class BalancesRecorder(PostgresTrackingRecorder):
    """The view's tables and its tracking table, in one schema; every write is tracked."""

    synchronous_commit: bool = True
    """False: a page's transaction commits without waiting for the disk (a crash may lose
    the last pages, rows and tracking together); for a rebuild in a fresh schema."""

    def __init__(
        self,
        datastore: PostgresDatastore,
        *,
        tracking_table_name: str = TRACKING_TABLE_NAME,
        **kwargs: Any,
    ) -> None:
        super().__init__(datastore, tracking_table_name=tracking_table_name, **kwargs)
        schema = Identifier(self.datastore.schema)
        balances = Identifier(VIEW_NAME)
        holds = Identifier(HOLDS_TABLE_NAME)
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {schema}.{balances} ("
                "account_id uuid PRIMARY KEY, "
                "asset text NOT NULL, "
                "code int NOT NULL, "
                "flags int NOT NULL, "
                "debits_pending numeric(78,0) NOT NULL, "
                "debits_posted numeric(78,0) NOT NULL, "
                "credits_pending numeric(78,0) NOT NULL, "
                "credits_posted numeric(78,0) NOT NULL, "
                "updated_position bigint NOT NULL)"
            ).format(schema=schema, balances=balances)
        )
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {schema}.{holds} ("
                "transfer_id uuid PRIMARY KEY, "
                "debit_account_id uuid NOT NULL, "
                "credit_account_id uuid NOT NULL, "
                "amount numeric(78,0) NOT NULL)"
            ).format(schema=schema, holds=holds)
        )
        self._insert_account = SQL(
            "INSERT INTO {schema}.{balances} VALUES "
            "(%s, %s, %s, %s, 0, 0, 0, 0, %s) ON CONFLICT (account_id) DO NOTHING"
        ).format(schema=schema, balances=balances)
        self._update_balances = SQL(
            "UPDATE {schema}.{balances} AS b SET "
            "debits_pending = b.debits_pending + d.debits_pending, "
            "debits_posted = b.debits_posted + d.debits_posted, "
            "credits_pending = b.credits_pending + d.credits_pending, "
            "credits_posted = b.credits_posted + d.credits_posted, "
            "updated_position = d.position "
            "FROM unnest(%s::uuid[], %s::numeric[], %s::numeric[], %s::numeric[], "
            "%s::numeric[], %s::bigint[]) "
            "AS d(account_id, debits_pending, debits_posted, credits_pending, credits_posted, "
            "position) "
            "WHERE b.account_id = d.account_id RETURNING b.account_id"
        ).format(schema=schema, balances=balances)
        """Every changed account's deltas in one statement; the accounts it found returned."""
        self._select_holds = SQL(
            "SELECT transfer_id, debit_account_id, credit_account_id, amount "
            "FROM {schema}.{holds} WHERE transfer_id = ANY(%s)"
        ).format(schema=schema, holds=holds)
        self._insert_hold = SQL(
            "INSERT INTO {schema}.{holds} VALUES (%s, %s, %s, %s::numeric)"
        ).format(schema=schema, holds=holds)
        self._delete_holds = SQL("DELETE FROM {schema}.{holds} WHERE transfer_id = ANY(%s)").format(
            schema=schema, holds=holds
        )
        self._lock_key = int.from_bytes(
            hashlib.sha256(f"aether-view:{self.datastore.schema}.{VIEW_NAME}".encode()).digest()[
                :8
            ],
            "big",
            signed=True,
        )
        self._lock_statement = SQL("SELECT pg_advisory_xact_lock(%s)")
        self._select_rows = SQL(
            "SELECT account_id, asset, code, flags, debits_pending, debits_posted, "
            "credits_pending, credits_posted, updated_position "
            "FROM {schema}.{balances} ORDER BY account_id"
        ).format(schema=schema, balances=balances)

    def apply_page(
        self,
        events: Sequence[tuple[int, LedgerEvent]],
        tracking: Tracking,
        *,
        after: int | None = None,
    ) -> int:
        """Apply a page of the log (notification id, event) and record `tracking`, all in one
        transaction. Returns how many events were applied.

        `after`: the position the page was read after. The page is refused
        (`PageAlreadyTrackedError`, nothing written) unless the view's tracked position
        still is that one: a second projection of the view that read an overlapping page
        would otherwise pass the library's upsert (its tracking is after the stored one)
        and apply the overlap twice. None (one event at a time) skips that check.

        Raises IntegrityError (and changes nothing) when `tracking` is not after the stored
        position: that page, or a later one, was already applied.
        """
        with self.datastore.transaction(commit=True) as curs:
            if not self.synchronous_commit:
                curs.execute(_ASYNCHRONOUS_COMMIT, prepare=True)
            if after is not None:
                # A transaction-level advisory lock serialises the view's pages (it holds
                # before the tracking row exists), then the position is checked.
                curs.execute(self._lock_statement, (self._lock_key,), prepare=True)
                tracked = self._max_tracking_id(tracking.application_name, curs) or 0
                if tracked != after:
                    raise PageAlreadyTrackedError(
                        f"{VIEW_NAME}: page after {after} refused, the view is at {tracked}"
                    )
            # The upsert locks the tracking row and refuses a position not after the stored
            # one; nothing below runs twice for a position.
            self._insert_tracking(curs, tracking)
            changes = self._changes(curs, events)
            self._write(curs, changes)
        return changes.events_count

    def holds(self) -> list[Hold]:
        """Every hold still pending, ordered by transfer id."""
        with self.datastore.transaction() as curs:
            curs.execute(
                SQL(
                    "SELECT transfer_id, debit_account_id, credit_account_id, amount "
                    "FROM {schema}.{holds} ORDER BY transfer_id"
                ).format(
                    schema=Identifier(self.datastore.schema), holds=Identifier(HOLDS_TABLE_NAME)
                )
            )
            return [_hold(row) for row in curs.fetchall()]

    def rows(self) -> list[AccountBalance]:
        """Every account of the view, ordered by account id."""
        with self.datastore.transaction() as curs:
            curs.execute(self._select_rows)
            return [
                AccountBalance(
                    account_id=row["account_id"],
                    asset=row["asset"],
                    code=row["code"],
                    flags=row["flags"],
                    debits_pending=int(row["debits_pending"]),
                    debits_posted=int(row["debits_posted"]),
                    credits_pending=int(row["credits_pending"]),
                    credits_posted=int(row["credits_posted"]),
                    updated_position=row["updated_position"],
                )
                for row in curs.fetchall()
            ]

    def _changes(
        self, curs: Cursor[DictRow], events: Sequence[tuple[int, LedgerEvent]]
    ) -> PageChanges:
        changes = PageChanges()
        resolved = [
            e.pending_id
            for _, e in events
            if isinstance(e, TransferCreated) and int(e.flags) & (_POST | _VOID)
        ] + [e.originator_id for _, e in events if isinstance(e, PendingTransferExpired)]
        stored: dict[UUID, Hold] = {}
        if resolved:
            curs.execute(self._select_holds, (resolved,))
            stored = {hold.transfer_id: hold for hold in map(_hold, curs.fetchall())}

        def delta(account_id: UUID, position: int) -> _Delta:
            d = changes.deltas.setdefault(account_id, _Delta())
            d.position = position
            return d

        def release(pending_id: UUID, position: int) -> Hold:
            hold = changes.holds_added.pop(pending_id, None)
            if hold is None:
                hold = stored.pop(pending_id, None)
                if hold is None:
                    raise BalancesProjectionError(
                        f"notification {position}: pending transfer {pending_id} has no hold"
                    )
                changes.holds_released.add(pending_id)
            delta(hold.debit_account_id, position).debits_pending -= hold.amount
            delta(hold.credit_account_id, position).credits_pending -= hold.amount
            return hold

        for position, event in events:
            changes.events_count += 1
            if isinstance(event, AccountOpened):
                changes.opened.append((event, position))
            elif isinstance(event, TransferCreated):
                flags = int(event.flags)
                if flags & _PENDING:
                    changes.holds_added[event.originator_id] = Hold(
                        event.originator_id,
                        event.debit_account_id,
                        event.credit_account_id,
                        event.amount,
                    )
                    delta(event.debit_account_id, position).debits_pending += event.amount
                    delta(event.credit_account_id, position).credits_pending += event.amount
                elif flags & (_POST | _VOID):
                    release(event.pending_id, position)
                    if flags & _POST:
                        delta(event.debit_account_id, position).debits_posted += event.amount
                        delta(event.credit_account_id, position).credits_posted += event.amount
                else:
                    delta(event.debit_account_id, position).debits_posted += event.amount
                    delta(event.credit_account_id, position).credits_posted += event.amount
            elif isinstance(event, PendingTransferExpired):
                release(event.originator_id, position)
            # TransferRejected and BatchCommitted change no balance; their position is tracked.
        return changes

    def _write(self, curs: Cursor[DictRow], changes: PageChanges) -> None:
        if changes.opened:
            curs.executemany(
                self._insert_account,
                [(e.originator_id, e.asset, e.code, e.flags, p) for e, p in changes.opened],
            )
        if changes.holds_released:
            curs.execute(self._delete_holds, (list(changes.holds_released),))
        if changes.holds_added:
            curs.executemany(
                self._insert_hold,
                [
                    (h.transfer_id, h.debit_account_id, h.credit_account_id, h.amount)
                    for h in changes.holds_added.values()
                ],
            )
        if changes.deltas:
            deltas = changes.deltas
            curs.execute(
                self._update_balances,
                (
                    list(deltas),
                    [d.debits_pending for d in deltas.values()],
                    [d.debits_posted for d in deltas.values()],
                    [d.credits_pending for d in deltas.values()],
                    [d.credits_posted for d in deltas.values()],
                    [d.position for d in deltas.values()],
                ),
                prepare=True,
            )
            found = {row["account_id"] for row in curs.fetchall()}
            if len(found) != len(deltas):
                account_id, d = next((a, d) for a, d in deltas.items() if a not in found)
                raise BalancesProjectionError(
                    f"notification {d.position}: account {account_id} was never opened"
                )


DECODER_CACHE_MAX = 100_000
"""Most account ids and times a `LedgerDecoder` keeps parsed (then it starts afresh)."""
_TRANSFER_CREATED_TOPIC = get_topic(TransferCreated)


class LedgerDecoder:
    """Decodes stored ledger events as the ledger's mapper (`LedgerMapper.to_domain_event`)
    does, faster for the event a ledger log is made of: a `TransferCreated` of the current
    class version is read by `TransferCreated.from_state`'s rules inline, with the account
    ids and times a log repeats parsed once (a few hundred accounts carry every transfer).
    Every other event (and any state off that plain path) goes to the mapper itself.

    Equal to the mapper by test (every event of a ledger run: same class, same fields)."""

    def __init__(self, mapper: Any) -> None:
        self._mapper = mapper
        self._uuids: dict[str, UUID] = {}
        self._times: dict[str, datetime] = {}
        self._plain = TransferCreated.class_version == 1

    def event(
        self, position: int, originator_id: UUID, version: int, topic: str, state: bytes
    ) -> Any:
        if topic == _TRANSFER_CREATED_TOPIC and self._plain:
            values = orjson.loads(state)
            if type(values) is dict and "class_version" not in values:
                with contextlib.suppress(Exception):
                    return self._transfer_created(originator_id, version, values)
        return self._mapper.to_domain_event(
            Notification(
                id=position,
                originator_id=originator_id,
                originator_version=version,
                topic=topic,
                state=state,
            )
        )

    def _transfer_created(self, originator_id: UUID, version: int, state: dict[str, Any]) -> Any:
        """`TransferCreated.from_state` (and its `_movement_fields`), with the caches."""
        timestamp = datetime.fromisoformat(state["timestamp"])  # unique: not cached
        effective_at = state.get("effective_at")
        pending_id = state.get("pending_id")
        references = state.get("references")
        event = object.__new__(TransferCreated)
        object.__setattr__(
            event,
            "__dict__",
            {
                "originator_id": originator_id,
                "originator_version": version,
                "timestamp": timestamp,
                "debit_account_id": self._uuid(state["debit_account_id"]),
                "credit_account_id": self._uuid(state["credit_account_id"]),
                "amount": int(state["amount"]),
                "asset": state["asset"],
                "code": state["code"],
                "flags": state.get("flags", 0),
                "pending_id": NIL_ID if pending_id is None else self._uuid(pending_id),
                "timeout_s": state.get("timeout_s", 0),
                "references": () if references is None else tuple([(k, v) for k, v in references]),
                "effective_at": timestamp if effective_at is None else self._time(effective_at),
            },
        )
        return event

    def _uuid(self, text: str) -> UUID:
        found = self._uuids.get(text)
        if found is None:
            if len(self._uuids) >= DECODER_CACHE_MAX:
                self._uuids.clear()
            found = self._uuids[text] = UUID(text)
        return found

    def _time(self, text: str) -> datetime:
        found = self._times.get(text)
        if found is None:
            if len(self._times) >= DECODER_CACHE_MAX:
                self._times.clear()
            found = self._times[text] = datetime.fromisoformat(text)
        return found


def _hold(row: DictRow) -> Hold:
    return Hold(
        transfer_id=row["transfer_id"],
        debit_account_id=row["debit_account_id"],
        credit_account_id=row["credit_account_id"],
        amount=int(row["amount"]),
    )


def construct_view(env: Mapping[str, str], *, schema: str | None = None) -> BalancesRecorder:
    """A view recorder from eventsourcing environment keys (POSTGRES_*), in `schema` when
    given; its tables are created. Its own connection pool: close with `view.datastore.close()`.
    """
    values = dict(env)
    if schema is not None:
        values["POSTGRES_SCHEMA"] = schema
    values["CREATE_TABLE"] = "true"
    factory = PostgresFactory(Environment(VIEW_NAME, values))
    return factory.tracking_recorder(BalancesRecorder)


class BalancesProjection(Projection[BalancesRecorder]):
    """Keeps `account_balances` up to date with the ledger's log, a page at a time."""

    name = VIEW_NAME

    def __init__(
        self,
        app: LedgerApplication,
        view: BalancesRecorder | None = None,
        *,
        page_size: int = PAGE_SIZE_MAX,
    ) -> None:
        """`view` defaults to the view's tables in the ledger's own schema and pool."""
        assert 0 < page_size <= PAGE_SIZE_MAX, page_size
        if view is None:
            view = BalancesRecorder(app.app_recorder.datastore)
            view.create_table()
        super().__init__(view)
        self.app = app
        self.page_size = page_size

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        """Apply one event with its tracking (the library's per-event entry point)."""
        events = [(tracking.notification_id, domain_event)]
        if not isinstance(domain_event, LedgerEvent):
            events = []
        self.view.apply_page(events, tracking)

    def position(self) -> int:
        """Notification id of the last event applied to the view (0: none yet)."""
        return self.view.max_tracking_id(self.app.name) or 0

    def catch_up(self, *, pages_max: int | None = None) -> int:
        """Apply the log's events after `position()`, a page per transaction, until the log's
        end (or `pages_max` pages). Returns how many events were applied."""

        def apply(notifications: Sequence[Notification], tracking: Tracking, after: int) -> int:
            events = [(n.id, self.app.mapper.to_domain_event(n)) for n in notifications]
            page = [(i, e) for i, e in events if isinstance(e, LedgerEvent)]
            return self.view.apply_page(page, tracking, after=after)

        return catch_up_pages(
            self.app.recorder, self.app.name, self.position, self.page_size, pages_max, apply
        )

    def rows(self) -> list[AccountBalance]:
        return self.view.rows()

    def state_hash(self) -> str:
        """sha256 over the view's rows ordered by account id, amounts as decimal text."""
        return state_hash(self.rows())

    def rebuild_into(self, schema: str) -> BalancesProjection:
        """A projection of the same log into the view's tables in `schema` (an existing,
        empty schema), built from zero. Close it with `close()`."""
        rebuilt = BalancesProjection(
            self.app, construct_view(self.app.env, schema=schema), page_size=self.page_size
        )
        rebuilt.catch_up()
        return rebuilt

    def close(self) -> None:
        """Close the view's pool, unless it is the ledger's own."""
        if self.view.datastore is not self.app.app_recorder.datastore:
            self.view.datastore.close()


def state_hash(rows: Iterable[AccountBalance]) -> str:
    """sha256 over rows (expected ordered by account id), one line per row."""
    digest = hashlib.sha256()
    for r in rows:
        line = "|".join(
            (
                str(r.account_id),
                r.asset,
                str(r.code),
                str(r.flags),
                str(r.debits_pending),
                str(r.debits_posted),
                str(r.credits_pending),
                str(r.credits_posted),
                str(r.updated_position),
            )
        )
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()
