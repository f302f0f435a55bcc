"""Leases: one row per lease, kept from the marketplace log's lease facts.

A row is the lease's state as `domain.lease.apply` gives it: a page loads the leases it
touches, folds each fact into them with the domain's own applier (its assertions included)
and writes back the rows that changed. So a row equals `domain.lease.replay(facts)` by
construction (the tests compare them), plus who closed the lease (`LeaseClosed.closed_by`,
not part of the domain's state).

Table `market_leases` (schema of the view recorder): the parties (provider, consumer), the node,
the order pair, GPU model and count, price, escrow held / charged / released and usage not
covered (NUMERIC(78,0), Python ints), status (`LeaseStatus`), opened_at, ends_at,
updated_at, alive_at, the liveness state (downtime_open, downtime_s, last heartbeat time and
sequence), grace_ends_at while paused, and once closed: closed_at, close reason
(`CloseReason`) and closed_by; escrow_final once the unused escrow went back (at the close,
or by `EscrowReleased` after settlement's last charge).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Composable, Identifier

from domain import lease as lease_rules
from domain.lease import (
    CloseReason,
    DowntimeDetected,
    EscrowReleased,
    EscrowToppedUp,
    HeartbeatRecorded,
    Lease,
    LeaseClosed,
    LeaseOpened,
    LeasePaused,
    LeaseResumed,
    LeaseStatus,
    UsageCharged,
)
from projections.view import (
    ROWS_LISTED_MAX,
    MarketProjection,
    MarketProjectionError,
    MarketViewRecorder,
    Page,
    table,
)

VIEW_NAME = "market_leases"
"""Name of the view: the prefix of its tracking table."""
LEASES_TABLE_NAME = "market_leases"

_LEASE_FIELDS = tuple(f.name for f in fields(Lease))


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """One lease: its domain state, who closed it, and the last position that changed it."""

    lease: Lease
    closed_by: UUID | None
    """The consumer, the provider, or the service acting for the rules; None while open."""
    updated_position: int


class LeasesRecorder(MarketViewRecorder):
    """The leases view's table and its tracking table; every write is tracked."""

    view_name = VIEW_NAME
    fact_types = (
        LeaseOpened,
        EscrowToppedUp,
        HeartbeatRecorded,
        DowntimeDetected,
        UsageCharged,
        LeasePaused,
        LeaseResumed,
        LeaseClosed,
        EscrowReleased,
    )
    tables = (
        table(
            LEASES_TABLE_NAME,
            ("lease_id",),
            indexes=(("provider_id",), ("consumer_id",), ("node_id",)),
            lease_id="uuid NOT NULL",
            ask_id="uuid NOT NULL",
            bid_id="uuid NOT NULL",
            provider_id="uuid NOT NULL",
            node_id="uuid NOT NULL",
            consumer_id="uuid NOT NULL",
            gpu_model="text NOT NULL",
            gpu_count="int NOT NULL",
            price_per_gpu_hour="numeric(78,0) NOT NULL",
            escrow_held="numeric(78,0) NOT NULL",
            escrow_charged="numeric(78,0) NOT NULL",
            escrow_released="numeric(78,0) NOT NULL",
            usage_uncovered="numeric(78,0) NOT NULL",
            status="smallint NOT NULL",
            opened_at="timestamptz NOT NULL",
            ends_at="timestamptz NOT NULL",
            updated_at="timestamptz NOT NULL",
            alive_at="timestamptz NOT NULL",
            downtime_open="boolean NOT NULL",
            downtime_s="bigint NOT NULL",
            last_heartbeat_at="timestamptz",
            heartbeat_sequence="bigint NOT NULL",
            grace_ends_at="timestamptz",
            close_reason="smallint",
            closed_at="timestamptz",
            closed_by="uuid",
            escrow_final="boolean NOT NULL",
            updated_position="bigint NOT NULL",
        ),
    )

    # -- writing ----------------------------------------------------------------------------

    def _apply_page(self, curs: Cursor[DictRow], events: Page) -> None:
        """Group the page's facts by lease (in log order within each: a lease's row depends
        on its own facts only), load the leases once, fold each lease's facts into it and
        write back each lease that changed once. Leases are grouped by the integer of their
        id (hashed in C, not by `UUID.__hash__`)."""
        by_lease: dict[int, list[tuple[int, Any]]] = {}
        ids: dict[int, UUID] = {}
        for position, event in events:
            fact = event.fact
            key = fact.lease_id.int
            facts = by_lease.get(key)
            if facts is None:
                facts = by_lease[key] = []
                ids[key] = fact.lease_id
            facts.append((position, fact))
        found = self.select(
            curs, LEASES_TABLE_NAME, SQL("lease_id = ANY(%s)"), (list(ids.values()),)
        )
        rows = {r.lease.id.int: r for r in map(_row_lease, found)}
        updates: list[dict[str, Any]] = []
        for key, facts in by_lease.items():
            row = rows.get(key)
            state = None if row is None else row.lease
            closed_by = None if row is None else row.closed_by
            run: list[tuple[int, HeartbeatRecorded | UsageCharged]] = []
            """Heartbeats and charges not folded in yet: a run is folded in one step."""
            for position, fact in facts:
                if state is not None and isinstance(fact, FOLDED_FACTS):
                    run.append((position, fact))
                    continue
                if run:
                    state, run = fold(state, run), []
                try:
                    state = lease_rules.apply(state, fact)
                except AssertionError as e:
                    raise MarketProjectionError(
                        f"notification {position}: {type(fact).__name__} does not apply to "
                        f"lease {fact.lease_id}: {e}"
                    ) from e
                if isinstance(fact, LeaseClosed):
                    closed_by = fact.closed_by
            if run:
                state = fold(state, run)
            assert state is not None
            updates.append(_lease_row(state, closed_by, facts[-1][0]))
        self.upsert(curs, LEASES_TABLE_NAME, updates)

    # -- queries ----------------------------------------------------------------------------

    def _rows(
        self, curs: Cursor[DictRow], where: Composable, params: Sequence[Any]
    ) -> list[LeaseRow]:
        rows = self.select(
            curs,
            LEASES_TABLE_NAME,
            where,
            params,
            order_by=("opened_at", "lease_id"),
            limit=ROWS_LISTED_MAX,
        )
        return [_row_lease(r) for r in rows]

    def lease(self, lease_id: UUID) -> LeaseRow | None:
        with self.datastore.transaction() as curs:
            rows = self._rows(curs, SQL("lease_id = %s"), (lease_id,))
        return rows[0] if rows else None

    def leases(
        self,
        *,
        provider_id: UUID | None = None,
        consumer_id: UUID | None = None,
        node_id: UUID | None = None,
        status: LeaseStatus | None = None,
    ) -> list[LeaseRow]:
        """Leases in the order they opened (then by id), filtered by party, node or status;
        at most ROWS_LISTED_MAX."""
        conditions: list[Composable] = [SQL("TRUE")]
        params: list[Any] = []
        for column, value in (
            ("provider_id", provider_id),
            ("consumer_id", consumer_id),
            ("node_id", node_id),
        ):
            if value is not None:
                conditions.append(SQL("{} = %s").format(Identifier(column)))
                params.append(value)
        if status is not None:
            conditions.append(SQL("status = %s"))
            params.append(int(status))
        with self.datastore.transaction() as curs:
            return self._rows(curs, SQL(" AND ").join(conditions), params)


_NO_TIME = timedelta(0)
_SECOND = timedelta(seconds=1)
FOLDED_FACTS = (HeartbeatRecorded, UsageCharged)
"""The facts a lease gets most of, folded a run at a time (`fold`)."""


def fold(lease: Lease | None, run: Sequence[tuple[int, HeartbeatRecorded | UsageCharged]]) -> Lease:
    """`domain.lease.apply` of each fact of `run` (position, heartbeat or usage charge) in
    turn, with one copy of the lease instead of one per fact: every fact but the last is
    checked as `apply` checks it (a heartbeat: the lease not closed, its node, a sequence
    after the last, the downtime it ends; a charge: escrow not final, the amount drawn is
    min(requested, available), withheld within it, time not going back) and folded into the
    fields it changes; the last one goes through `apply` itself, which checks it and the
    lease's invariants. Equal to `apply` one by one (tested)."""
    if lease is None or not run:
        raise MarketProjectionError(f"facts folded into no lease: {run[:1]}")
    *folded, (last_position, last) = run
    if folded:
        sequence = lease.heartbeat_sequence
        alive_at = lease.alive_at
        downtime_open = lease.downtime_open
        downtime_s = lease.downtime_s
        updated_at = lease.updated_at
        last_at = lease.last_heartbeat_at
        charged = lease.escrow_charged
        uncovered = lease.usage_uncovered
        closed = lease.status is LeaseStatus.closed
        lease_id = lease.id.int
        node_id = lease.node_id.int
        for position, f in folded:
            if isinstance(f, HeartbeatRecorded):
                at = f.at
                seen_at = at if at < f.recorded_at else f.recorded_at
                ended = max(seen_at - alive_at, _NO_TIME) // _SECOND if downtime_open else 0
                if not (
                    not closed
                    and f.lease_id.int == lease_id
                    and f.node_id.int == node_id
                    and f.sequence > sequence
                    and f.downtime_s == ended
                ):
                    raise MarketProjectionError(
                        f"notification {position}: HeartbeatRecorded does not apply to lease "
                        f"{f.lease_id} (closed, another node, an old sequence or a wrong "
                        "downtime)"
                    )
                sequence = f.sequence
                last_at = at
                if at > alive_at:
                    alive_at = at
                downtime_open = False
                downtime_s += f.downtime_s
                if f.recorded_at > updated_at:
                    updated_at = f.recorded_at
            else:
                available = lease.escrow_held - charged - lease.escrow_released
                if not (
                    not (closed and lease.escrow_final)
                    and f.lease_id.int == lease_id
                    and 0 <= f.amount <= f.amount_requested
                    and 0 <= f.withheld <= f.amount
                    and f.amount == min(f.amount_requested, available)
                    and f.charged_at >= updated_at
                ):
                    raise MarketProjectionError(
                        f"notification {position}: UsageCharged does not apply to lease "
                        f"{f.lease_id} (escrow final, an amount that does not fit the escrow "
                        "or time going back)"
                    )
                charged += f.amount
                uncovered += f.amount_requested - f.amount
                updated_at = f.charged_at
        lease = replace(
            lease,
            heartbeat_sequence=sequence,
            last_heartbeat_at=last_at,
            alive_at=alive_at,
            downtime_open=downtime_open,
            downtime_s=downtime_s,
            updated_at=updated_at,
            escrow_charged=charged,
            usage_uncovered=uncovered,
        )
    try:
        return lease_rules.apply(lease, last)
    except AssertionError as e:
        raise MarketProjectionError(
            f"notification {last_position}: {type(last).__name__} does not apply to lease "
            f"{last.lease_id}: {e}"
        ) from e


def _lease_row(lease: Lease, closed_by: UUID | None, position: int) -> dict[str, Any]:
    row = {name: getattr(lease, name) for name in _LEASE_FIELDS}
    row["lease_id"] = row.pop("id")
    row["status"] = int(lease.status)
    row["close_reason"] = None if lease.close_reason is None else int(lease.close_reason)
    row["closed_by"] = closed_by
    row["updated_position"] = position
    return row


def _row_lease(row: dict[str, Any]) -> LeaseRow:
    values = {name: row[name] for name in _LEASE_FIELDS if name != "id"}
    values["status"] = LeaseStatus(row["status"])
    reason = row["close_reason"]
    values["close_reason"] = None if reason is None else CloseReason(reason)
    return LeaseRow(
        lease=Lease(id=row["lease_id"], **values),
        closed_by=row["closed_by"],
        updated_position=row["updated_position"],
    )


class LeasesProjection(MarketProjection[LeasesRecorder]):
    """Keeps the leases view up to date with the marketplace log, a page at a time."""

    name = VIEW_NAME

    @classmethod
    def recorder_class(cls) -> type[LeasesRecorder]:
        return LeasesRecorder

    def lease(self, lease_id: UUID) -> LeaseRow | None:
        return self.view.lease(lease_id)

    def leases(
        self,
        *,
        provider_id: UUID | None = None,
        consumer_id: UUID | None = None,
        node_id: UUID | None = None,
        status: LeaseStatus | None = None,
    ) -> list[LeaseRow]:
        return self.view.leases(
            provider_id=provider_id, consumer_id=consumer_id, node_id=node_id, status=status
        )
