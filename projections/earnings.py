"""Earnings and usage: what each provider earned, what is pending, settled and claimed, and
what each consumer's leases metered and cost; kept from three logs, one view per log.

A view reads one log, so that it is exactly-once with its own tracking and rebuilds bit for
bit from its log alone (a rebuild applies one log after the other, the live projector
interleaves them: a table written from two logs would differ). The queries
(`projections.queries`) join the three views.

`EarningsProjection` (the marketplace log, view `earnings`):

- `earnings_leases`: one row per lease (from `LeaseOpened`): parties, node, GPUs, price;
  what its `UsageCharged` facts drew (charged), withheld (failed windows), the protocol fee
  (`PostingRules.fee_of(amount - withheld)`, as the ledger postings split a charge), the
  provider's share (earned = charged - withheld - fee), what the escrow could not cover,
  and the refunds (`ConsumerRefunded`) its consumer got for it.
- `earnings_lease_epochs`: the same sums per lease and settlement epoch (the epoch is read
  from the charge's usage_ref, ``epoch N: usage a..b (k reports)``; -1 for a charge not
  made by settlement).
- `earnings_provider_epochs`: the same sums per provider and epoch.
- `earnings_providers`: per provider: operator address, stake (bonded, unbonding,
  unbonded, slashed), slashes, claims (`PayoutClaimed`), the charge sums of all its leases.
- `earnings_slashes`, `earnings_claims`, `earnings_refunds`: one row per fact, keyed by its
  log position.

`EarningsSettlementProjection` (the settlement log, view `earnings_settlement`):

- `earnings_epochs`: per epoch the plan's totals, its outcome (drawn, uncovered, payout
  root and totals) once settled, and the root's posting on chain.
- `earnings_epoch_charges`: per lease and epoch the planned charge (amount, withheld, fee,
  provider share, reports and billable seconds it covers) and, once settled, what it drew.
- `earnings_epoch_payouts`: per epoch and provider the cumulative amount in the payout root.

`EarningsUsageProjection` (the usage log, view `earnings_usage`):

- `earnings_usage`: per lease the sums of its recorded reports: count, last sequence,
  interval span, billable seconds (sum of each report's whole interval seconds, as
  settlement prices them), wall and device time, FLOPs, samples, tokens, steps, peak memory.

Pending usage of a lease is what it recorded less what the epochs' plans settled (reports
and billable seconds), computed by the queries. Amounts are NUMERIC(78,0) (Python ints).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast
from uuid import UUID

from eventsourcing.persistence import Notification, Tracking
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Composable, Composed, Identifier, Placeholder

from domain.funds import PayoutClaimed
from domain.lease import LeaseOpened, UsageCharged
from domain.postings import DEFAULT_POSTING_RULES, PostingRules
from domain.providers import ProviderRegistered
from domain.slashing import ConsumerRefunded
from domain.stake import StakeBonded, StakeSlashed, UnbondCompleted, UnbondRequested
from domain.usage import UsageRecorded
from ledger.market.store import MarketEvent, MarketplaceApplication
from ledger.settlement import EpochPlanned, EpochSettled, PayoutRootPosted
from ledger.usage import UsageApplication, usage_of_state
from projections.view import (
    MarketProjection,
    MarketProjectionError,
    MarketViewRecorder,
    Page,
    table,
)

VIEW_NAME = "earnings"
SETTLEMENT_VIEW_NAME = "earnings_settlement"
USAGE_VIEW_NAME = "earnings_usage"

LEASES_TABLE_NAME = "earnings_leases"
LEASE_EPOCHS_TABLE_NAME = "earnings_lease_epochs"
PROVIDER_EPOCHS_TABLE_NAME = "earnings_provider_epochs"
PROVIDERS_TABLE_NAME = "earnings_providers"
SLASHES_TABLE_NAME = "earnings_slashes"
CLAIMS_TABLE_NAME = "earnings_claims"
REFUNDS_TABLE_NAME = "earnings_refunds"
EPOCHS_TABLE_NAME = "earnings_epochs"
EPOCH_CHARGES_TABLE_NAME = "earnings_epoch_charges"
EPOCH_PAYOUTS_TABLE_NAME = "earnings_epoch_payouts"
USAGE_TABLE_NAME = "earnings_usage"

NO_EPOCH = -1
"""The epoch of a charge whose usage_ref names none (not made by settlement)."""
EPOCH_REF = re.compile(r"^epoch (\d+): ")
"""How settlement names a charge's epoch in its usage_ref (`workers.settle`)."""
MICROSECONDS_PER_SECOND = 1_000_000

_AMOUNT = "numeric(78,0) NOT NULL"
CHARGE_SUMS = ("charged", "withheld", "fee", "earned", "uncovered", "charges_count")
"""The sums every charge adds to its lease, lease-epoch, provider-epoch and provider rows."""
_CHARGE_COLUMNS: dict[str, Any] = {
    "charged": _AMOUNT,
    "withheld": _AMOUNT,
    "fee": _AMOUNT,
    "earned": _AMOUNT,
    "uncovered": _AMOUNT,
    "charges_count": "bigint NOT NULL",
}


class EarningsRecorderBase(MarketViewRecorder):
    """The earnings views' shared SQL: a merge of rows into the stored ones."""

    def merge(
        self,
        curs: Cursor[DictRow],
        name: str,
        rows: Sequence[Mapping[str, Any]],
        *,
        add: Sequence[str] = (),
        greatest: Sequence[str] = (),
        least: Sequence[str] = (),
        keep: Sequence[str] = (),
    ) -> None:
        """Insert rows (every column given), or merge each into the stored row with its key:
        `add` columns are summed, `greatest`/`least` keep the larger/smaller, `keep` keep
        the stored value unless it is NULL; the others take the new value."""
        if not rows:
            return
        t = self._tables[name]
        updates: list[Composed] = []
        for c in t.column_names:
            if c in t.key:
                continue
            col = Identifier(c)
            if c in add:
                update = SQL("{0} = t.{0} + EXCLUDED.{0}").format(col)
            elif c in greatest:
                update = SQL("{0} = GREATEST(t.{0}, EXCLUDED.{0})").format(col)
            elif c in least:
                update = SQL("{0} = LEAST(t.{0}, EXCLUDED.{0})").format(col)
            elif c in keep:
                update = SQL("{0} = COALESCE(t.{0}, EXCLUDED.{0})").format(col)
            else:
                update = SQL("{0} = EXCLUDED.{0}").format(col)
            updates.append(update)
        statement = SQL(
            "INSERT INTO {table} AS t ({columns}) VALUES ({values}) "
            "ON CONFLICT ({key}) DO UPDATE SET {updates}"
        ).format(
            table=self.table_sql(name),
            columns=SQL(", ").join(Identifier(c) for c in t.column_names),
            values=SQL(", ").join(Placeholder(c) for c in t.column_names),
            key=SQL(", ").join(Identifier(c) for c in t.key),
            updates=SQL(", ").join(updates),
        )
        curs.executemany(statement, [dict(r) for r in rows])

    def add_to(
        self,
        curs: Cursor[DictRow],
        name: str,
        rows: Sequence[Mapping[str, Any]],
        add: Sequence[str],
    ) -> None:
        """Add the `add` columns of each row to its stored row (which must exist); the
        table's updated_position takes the row's."""
        if not rows:
            return
        t = self._tables[name]
        sets: list[Composable] = [
            SQL("{0} = {0} + {1}").format(Identifier(c), Placeholder(c)) for c in add
        ]
        if "updated_position" in t.column_names:
            sets.append(SQL("updated_position = %(updated_position)s"))
        statement = SQL("UPDATE {table} SET {sets} WHERE {where}").format(
            table=self.table_sql(name),
            sets=SQL(", ").join(sets),
            where=SQL(" AND ").join(
                SQL("{} = {}").format(Identifier(k), Placeholder(k)) for k in t.key
            ),
        )
        curs.executemany(statement, [dict(r) for r in rows])


# -- the marketplace log ----------------------------------------------------------------------


def epoch_of_ref(usage_ref: str) -> int:
    """The settlement epoch a charge's usage_ref names (NO_EPOCH when none)."""
    found = EPOCH_REF.match(usage_ref)
    return int(found.group(1)) if found else NO_EPOCH


def _charge_sums() -> dict[str, int]:
    return dict.fromkeys(CHARGE_SUMS, 0)


def _new_provider(provider_id: UUID, position: int) -> dict[str, Any]:
    return {
        "provider_id": provider_id,
        "operator_address": None,
        "registered_at": None,
        "bonded": 0,
        "unbonding": 0,
        "unbonded": 0,
        "slashed": 0,
        "slashes_count": 0,
        "claimed": 0,
        "claims_count": 0,
        "claimed_cumulative": 0,
        **_charge_sums(),
        "updated_position": position,
    }


class EarningsRecorder(EarningsRecorderBase):
    """The marketplace side of earnings (see the module docstring); every write is tracked."""

    view_name = VIEW_NAME
    posting_rules: ClassVar[PostingRules] = DEFAULT_POSTING_RULES
    """The fee split of a charge, as the marketplace's postings make it."""
    fact_types = (
        ProviderRegistered,
        LeaseOpened,
        UsageCharged,
        ConsumerRefunded,
        StakeBonded,
        UnbondRequested,
        UnbondCompleted,
        StakeSlashed,
        PayoutClaimed,
    )
    tables = (
        table(
            LEASES_TABLE_NAME,
            ("lease_id",),
            indexes=(("provider_id",), ("consumer_id",)),
            lease_id="uuid NOT NULL",
            provider_id="uuid NOT NULL",
            consumer_id="uuid NOT NULL",
            node_id="uuid NOT NULL",
            gpu_model="text NOT NULL",
            gpu_count="int NOT NULL",
            price_per_gpu_hour=_AMOUNT,
            opened_at="timestamptz NOT NULL",
            **_CHARGE_COLUMNS,
            refunded=_AMOUNT,
            refunds_count="bigint NOT NULL",
            updated_position="bigint NOT NULL",
        ),
        table(
            LEASE_EPOCHS_TABLE_NAME,
            ("lease_id", "epoch"),
            indexes=(("provider_id", "epoch"), ("consumer_id",)),
            lease_id="uuid NOT NULL",
            epoch="bigint NOT NULL",
            provider_id="uuid NOT NULL",
            consumer_id="uuid NOT NULL",
            **_CHARGE_COLUMNS,
            updated_position="bigint NOT NULL",
        ),
        table(
            PROVIDER_EPOCHS_TABLE_NAME,
            ("provider_id", "epoch"),
            provider_id="uuid NOT NULL",
            epoch="bigint NOT NULL",
            **_CHARGE_COLUMNS,
            updated_position="bigint NOT NULL",
        ),
        table(
            PROVIDERS_TABLE_NAME,
            ("provider_id",),
            provider_id="uuid NOT NULL",
            operator_address="text",
            registered_at="timestamptz",
            bonded=_AMOUNT,
            unbonding=_AMOUNT,
            unbonded=_AMOUNT,
            slashed=_AMOUNT,
            slashes_count="bigint NOT NULL",
            claimed=_AMOUNT,
            claims_count="bigint NOT NULL",
            claimed_cumulative=_AMOUNT,
            **_CHARGE_COLUMNS,
            updated_position="bigint NOT NULL",
        ),
        table(
            SLASHES_TABLE_NAME,
            ("position",),
            indexes=(("provider_id",),),
            position="bigint NOT NULL",
            provider_id="uuid NOT NULL",
            kind="smallint NOT NULL",
            gpu_model="text NOT NULL",
            gpu_count="int NOT NULL",
            amount_sized=_AMOUNT,
            amount=_AMOUNT,
            from_bonded=_AMOUNT,
            offence_at="timestamptz NOT NULL",
            slashed_at="timestamptz NOT NULL",
        ),
        table(
            CLAIMS_TABLE_NAME,
            ("position",),
            indexes=(("provider_id",),),
            position="bigint NOT NULL",
            provider_id="uuid NOT NULL",
            epoch="bigint NOT NULL",
            cumulative=_AMOUNT,
            amount=_AMOUNT,
            reference="text NOT NULL",
            claimed_at="timestamptz NOT NULL",
        ),
        table(
            REFUNDS_TABLE_NAME,
            ("position",),
            indexes=(("lease_id",), ("consumer_id",), ("provider_id",)),
            position="bigint NOT NULL",
            lease_id="uuid NOT NULL",
            consumer_id="uuid NOT NULL",
            provider_id="uuid NOT NULL",
            node_id="uuid NOT NULL",
            window_start="timestamptz NOT NULL",
            amount=_AMOUNT,
            owed=_AMOUNT,
            refunded_at="timestamptz NOT NULL",
        ),
    )

    def _apply_page(self, curs: Cursor[DictRow], events: Page) -> None:
        # Charges name only their lease: its parties come from the page's opens or the table.
        wanted = {
            e.fact.lease_id
            for _, e in events
            if isinstance(e.fact, UsageCharged | ConsumerRefunded)
        }
        parties: dict[UUID, tuple[UUID, UUID]] = {}
        if wanted:
            curs.execute(
                SQL(
                    "SELECT lease_id, provider_id, consumer_id FROM {} WHERE lease_id = ANY(%s)"
                ).format(self.table_sql(LEASES_TABLE_NAME)),
                (list(wanted),),
            )
            parties = {r["lease_id"]: (r["provider_id"], r["consumer_id"]) for r in curs.fetchall()}
        leases: dict[UUID, dict[str, Any]] = {}
        lease_epochs: dict[tuple[UUID, int], dict[str, Any]] = {}
        provider_epochs: dict[tuple[UUID, int], dict[str, Any]] = {}
        providers: dict[UUID, dict[str, Any]] = {}

        def provider(provider_id: UUID, position: int) -> dict[str, Any]:
            row = providers.get(provider_id)
            if row is None:
                row = providers[provider_id] = _new_provider(provider_id, position)
            row["updated_position"] = position
            return row

        def lease_delta(lease_id: UUID, position: int) -> dict[str, Any]:
            row = leases.get(lease_id)
            if row is None:
                provider_id, consumer_id = parties[lease_id]
                row = leases[lease_id] = {
                    "lease_id": lease_id,
                    "provider_id": provider_id,
                    "consumer_id": consumer_id,
                    "node_id": None,
                    "gpu_model": None,
                    "gpu_count": None,
                    "price_per_gpu_hour": None,
                    "opened_at": None,
                    **_charge_sums(),
                    "refunded": 0,
                    "refunds_count": 0,
                    "updated_position": position,
                }
            row["updated_position"] = position
            return row

        for position, event in events:
            fact = event.fact
            if isinstance(fact, LeaseOpened):
                parties[fact.lease_id] = (fact.provider_id, fact.consumer_id)
                row = lease_delta(fact.lease_id, position)
                row.update(
                    node_id=fact.node_id,
                    gpu_model=fact.gpu_model,
                    gpu_count=fact.gpu_count,
                    price_per_gpu_hour=fact.price_per_gpu_hour,
                    opened_at=fact.opened_at,
                )
            elif isinstance(fact, UsageCharged):
                if fact.lease_id not in parties:
                    raise MarketProjectionError(
                        f"notification {position}: usage charged to unknown lease {fact.lease_id}"
                    )
                provider_id, consumer_id = parties[fact.lease_id]
                fee = self.posting_rules.fee_of(fact.amount - fact.withheld)
                sums = {
                    "charged": fact.amount,
                    "withheld": fact.withheld,
                    "fee": fee,
                    "earned": fact.amount - fact.withheld - fee,
                    "uncovered": fact.amount_uncovered,
                    "charges_count": 1,
                }
                epoch = epoch_of_ref(fact.usage_ref)
                lease_epoch = lease_epochs.setdefault(
                    (fact.lease_id, epoch),
                    {
                        "lease_id": fact.lease_id,
                        "epoch": epoch,
                        "provider_id": provider_id,
                        "consumer_id": consumer_id,
                        **_charge_sums(),
                    },
                )
                provider_epoch = provider_epochs.setdefault(
                    (provider_id, epoch),
                    {"provider_id": provider_id, "epoch": epoch, **_charge_sums()},
                )
                for row in (
                    lease_delta(fact.lease_id, position),
                    lease_epoch,
                    provider_epoch,
                    provider(provider_id, position),
                ):
                    for name, value in sums.items():
                        row[name] += value
                    row["updated_position"] = position
            elif isinstance(fact, ConsumerRefunded):
                if fact.lease_id in parties:
                    row = lease_delta(fact.lease_id, position)
                    row["refunded"] += fact.amount
                    row["refunds_count"] += 1
                self._insert_once(
                    curs,
                    REFUNDS_TABLE_NAME,
                    position,
                    {
                        "position": position,
                        "lease_id": fact.lease_id,
                        "consumer_id": fact.consumer_id,
                        "provider_id": fact.provider_id,
                        "node_id": fact.node_id,
                        "window_start": fact.window_start,
                        "amount": fact.amount,
                        "owed": fact.owed,
                        "refunded_at": fact.refunded_at,
                    },
                )
            elif isinstance(fact, ProviderRegistered):
                row = provider(fact.provider_id, position)
                row["operator_address"] = fact.operator_address
                row["registered_at"] = fact.registered_at
            elif isinstance(fact, StakeBonded):
                provider(fact.provider_id, position)["bonded"] += fact.amount
            elif isinstance(fact, UnbondRequested):
                row = provider(fact.provider_id, position)
                row["bonded"] -= fact.amount
                row["unbonding"] += fact.amount
            elif isinstance(fact, UnbondCompleted):
                row = provider(fact.provider_id, position)
                row["unbonding"] -= fact.amount
                row["unbonded"] += fact.amount
            elif isinstance(fact, StakeSlashed):
                row = provider(fact.provider_id, position)
                row["bonded"] -= fact.from_bonded
                row["unbonding"] -= sum(p.amount for p in fact.from_unbonding)
                row["slashed"] += fact.amount
                row["slashes_count"] += 1
                self._insert_once(
                    curs,
                    SLASHES_TABLE_NAME,
                    position,
                    {
                        "position": position,
                        "provider_id": fact.provider_id,
                        "kind": int(fact.kind),
                        "gpu_model": fact.gpu_model,
                        "gpu_count": fact.gpu_count,
                        "amount_sized": fact.amount_sized,
                        "amount": fact.amount,
                        "from_bonded": fact.from_bonded,
                        "offence_at": fact.offence_at,
                        "slashed_at": fact.slashed_at,
                    },
                )
            else:
                assert isinstance(fact, PayoutClaimed)
                row = provider(fact.provider_id, position)
                row["claimed"] += fact.amount
                row["claims_count"] += 1
                row["claimed_cumulative"] = max(row["claimed_cumulative"], fact.cumulative)
                self._insert_once(
                    curs,
                    CLAIMS_TABLE_NAME,
                    position,
                    {
                        "position": position,
                        "provider_id": fact.provider_id,
                        "epoch": fact.epoch,
                        "cumulative": fact.cumulative,
                        "amount": fact.amount,
                        "reference": fact.reference,
                        "claimed_at": fact.claimed_at,
                    },
                )
        lease_sums = (*CHARGE_SUMS, "refunded", "refunds_count")
        opened = [r for r in leases.values() if r["opened_at"] is not None]
        self.merge(curs, LEASES_TABLE_NAME, opened, add=lease_sums)
        self.add_to(
            curs,
            LEASES_TABLE_NAME,
            [r for r in leases.values() if r["opened_at"] is None],
            lease_sums,
        )
        self.merge(curs, LEASE_EPOCHS_TABLE_NAME, list(lease_epochs.values()), add=CHARGE_SUMS)
        self.merge(
            curs, PROVIDER_EPOCHS_TABLE_NAME, list(provider_epochs.values()), add=CHARGE_SUMS
        )
        self.merge(
            curs,
            PROVIDERS_TABLE_NAME,
            list(providers.values()),
            add=(
                "bonded",
                "unbonding",
                "unbonded",
                "slashed",
                "slashes_count",
                "claimed",
                "claims_count",
                *CHARGE_SUMS,
            ),
            greatest=("claimed_cumulative",),
            keep=("operator_address", "registered_at"),
        )

    def _insert_once(
        self, curs: Cursor[DictRow], name: str, position: int, row: Mapping[str, Any]
    ) -> None:
        if not self.insert(curs, name, row):
            raise MarketProjectionError(f"notification {position}: {name} row stored twice")


class EarningsProjection(MarketProjection[EarningsRecorder]):
    """Keeps the marketplace side of earnings up to date with the marketplace log."""

    name = VIEW_NAME

    @classmethod
    def recorder_class(cls) -> type[EarningsRecorder]:
        return EarningsRecorder


# -- the settlement log -----------------------------------------------------------------------


class EarningsSettlementRecorder(EarningsRecorderBase):
    """The settlement side of earnings (see the module docstring); every write is tracked."""

    view_name = SETTLEMENT_VIEW_NAME
    fact_types = (EpochPlanned, EpochSettled, PayoutRootPosted)
    tables = (
        table(
            EPOCHS_TABLE_NAME,
            ("epoch",),
            epoch="bigint NOT NULL",
            epoch_start="timestamptz NOT NULL",
            epoch_end="timestamptz NOT NULL",
            planned_at="timestamptz NOT NULL",
            leases_count="int NOT NULL",
            charged=_AMOUNT,
            withheld=_AMOUNT,
            fee=_AMOUNT,
            provider_share=_AMOUNT,
            checker_rewards_total=_AMOUNT,
            treasury_net=_AMOUNT,
            unknown_lease_usage="int NOT NULL",
            settled_at="timestamptz",
            drawn="numeric(78,0)",
            uncovered="numeric(78,0)",
            payout_root="text",
            payout_total="numeric(78,0)",
            payout_new="numeric(78,0)",
            rewards_paid="numeric(78,0)",
            posted_at="timestamptz",
            posted_funded="numeric(78,0)",
            posted_transaction="text",
            updated_position="bigint NOT NULL",
        ),
        table(
            EPOCH_CHARGES_TABLE_NAME,
            ("lease_id", "epoch"),
            indexes=(("provider_id", "epoch"), ("consumer_id",), ("epoch",)),
            lease_id="uuid NOT NULL",
            epoch="bigint NOT NULL",
            provider_id="uuid NOT NULL",
            consumer_id="uuid NOT NULL",
            amount=_AMOUNT,
            withheld=_AMOUNT,
            fee=_AMOUNT,
            provider_share=_AMOUNT,
            reports="int NOT NULL",
            first_sequence="bigint NOT NULL",
            last_sequence="bigint NOT NULL",
            billable_s="bigint NOT NULL",
            drawn="numeric(78,0)",
            uncovered="numeric(78,0)",
            updated_position="bigint NOT NULL",
        ),
        table(
            EPOCH_PAYOUTS_TABLE_NAME,
            ("epoch", "provider_id"),
            indexes=(("provider_id", "epoch"),),
            epoch="bigint NOT NULL",
            provider_id="uuid NOT NULL",
            address="text NOT NULL",
            cumulative=_AMOUNT,
        ),
    )

    def _apply_page(self, curs: Cursor[DictRow], events: Page) -> None:
        for position, event in events:
            fact = event.fact
            if isinstance(fact, EpochPlanned):
                row: dict[str, Any] = {
                    "epoch": fact.epoch,
                    "epoch_start": fact.epoch_start,
                    "epoch_end": fact.epoch_end,
                    "planned_at": fact.planned_at,
                    "leases_count": len(fact.charges),
                    "charged": fact.charged,
                    "withheld": fact.withheld,
                    "fee": fact.fee,
                    "provider_share": fact.provider_share,
                    "checker_rewards_total": fact.checker_rewards_total,
                    "treasury_net": fact.treasury_net,
                    "unknown_lease_usage": fact.unknown_lease_usage,
                    "settled_at": None,
                    "drawn": None,
                    "uncovered": None,
                    "payout_root": None,
                    "payout_total": None,
                    "payout_new": None,
                    "rewards_paid": None,
                    "posted_at": None,
                    "posted_funded": None,
                    "posted_transaction": None,
                    "updated_position": position,
                }
                if not self.insert(curs, EPOCHS_TABLE_NAME, row):
                    raise MarketProjectionError(
                        f"notification {position}: epoch {fact.epoch} planned twice"
                    )
                self.upsert(
                    curs,
                    EPOCH_CHARGES_TABLE_NAME,
                    [
                        {
                            "lease_id": c.lease_id,
                            "epoch": fact.epoch,
                            "provider_id": c.provider_id,
                            "consumer_id": c.consumer_id,
                            "amount": c.amount,
                            "withheld": c.withheld,
                            "fee": c.fee,
                            "provider_share": c.provider_share,
                            "reports": len(c.sequences),
                            "first_sequence": min(c.sequences, default=0),
                            "last_sequence": max(c.sequences, default=0),
                            "billable_s": c.billable_s,
                            "drawn": None,
                            "uncovered": None,
                            "updated_position": position,
                        }
                        for c in fact.charges
                    ],
                )
            elif isinstance(fact, EpochSettled):
                self._update(
                    curs,
                    EPOCHS_TABLE_NAME,
                    ("epoch",),
                    (fact.epoch,),
                    settled_at=fact.settled_at,
                    drawn=fact.drawn,
                    uncovered=fact.uncovered,
                    payout_root=fact.payout_root,
                    payout_total=fact.payout_total,
                    payout_new=fact.payout_new,
                    rewards_paid=sum(r.amount for r in fact.rewards),
                    updated_position=position,
                )
                for outcome in fact.outcomes:
                    self._update(
                        curs,
                        EPOCH_CHARGES_TABLE_NAME,
                        ("lease_id", "epoch"),
                        (outcome.lease_id, fact.epoch),
                        drawn=outcome.drawn,
                        uncovered=outcome.uncovered,
                        updated_position=position,
                    )
                self.upsert(
                    curs,
                    EPOCH_PAYOUTS_TABLE_NAME,
                    [
                        {
                            "epoch": fact.epoch,
                            "provider_id": p.provider_id,
                            "address": p.address,
                            "cumulative": p.cumulative,
                        }
                        for p in fact.payouts
                    ],
                )
            else:
                assert isinstance(fact, PayoutRootPosted)
                self._update(
                    curs,
                    EPOCHS_TABLE_NAME,
                    ("epoch",),
                    (fact.epoch,),
                    posted_at=fact.posted_at,
                    posted_funded=fact.funded,
                    posted_transaction=fact.transaction,
                    updated_position=position,
                )

    def _update(
        self,
        curs: Cursor[DictRow],
        name: str,
        key: tuple[str, ...],
        values: tuple[Any, ...],
        **columns: Any,
    ) -> None:
        statement = SQL("UPDATE {table} SET {sets} WHERE {where}").format(
            table=self.table_sql(name),
            sets=SQL(", ").join(SQL("{} = %s").format(Identifier(c)) for c in columns),
            where=SQL(" AND ").join(SQL("{} = %s").format(Identifier(k)) for k in key),
        )
        curs.execute(statement, (*columns.values(), *values))
        if curs.rowcount != 1:
            raise MarketProjectionError(f"{name}: no row {dict(zip(key, values, strict=True))}")


class EarningsSettlementProjection(MarketProjection[EarningsSettlementRecorder]):
    """Keeps the settlement side of earnings up to date with the settlement log."""

    name = SETTLEMENT_VIEW_NAME

    @classmethod
    def recorder_class(cls) -> type[EarningsSettlementRecorder]:
        return EarningsSettlementRecorder


# -- the usage log ----------------------------------------------------------------------------

_USAGE_SUMS = (
    "reports",
    "billable_s",
    "wall_time_us",
    "device_time_us",
    "flops",
    "samples",
    "tokens",
    "steps",
)


class EarningsUsageRecorder(EarningsRecorderBase):
    """The usage side of earnings: recorded usage per lease; every write is tracked.

    Its pages hold `UsageRecorded` facts, either wrapped in a `MarketEvent` (the projection's
    own catch-up) or bare (as a replay decodes the usage log)."""

    view_name = USAGE_VIEW_NAME
    fact_types = (UsageRecorded,)
    tables = (
        table(
            USAGE_TABLE_NAME,
            ("lease_id",),
            lease_id="uuid NOT NULL",
            node_id="uuid NOT NULL",
            reports="bigint NOT NULL",
            last_sequence="bigint NOT NULL",
            interval_first_start="timestamptz NOT NULL",
            interval_last_end="timestamptz NOT NULL",
            billable_s=_AMOUNT,
            wall_time_us=_AMOUNT,
            device_time_us=_AMOUNT,
            flops=_AMOUNT,
            samples=_AMOUNT,
            tokens=_AMOUNT,
            steps=_AMOUNT,
            peak_memory_bytes_max=_AMOUNT,
            updated_position="bigint NOT NULL",
        ),
    )

    def apply_page(self, events: Any, tracking: Tracking, *, after: int | None = None) -> int:
        page: list[tuple[int, MarketEvent]] = [
            (p, e if isinstance(e, MarketEvent) else _wrapped(e)) for p, e in events
        ]
        return super().apply_page(page, tracking, after=after)

    def _apply_page(self, curs: Cursor[DictRow], events: Page) -> None:
        leases: dict[UUID, dict[str, Any]] = {}
        for position, event in events:
            fact: UsageRecorded = event.fact
            billable_s = _whole_seconds(fact)
            row = leases.get(fact.lease_id)
            if row is None:
                row = leases[fact.lease_id] = {
                    "lease_id": fact.lease_id,
                    "node_id": fact.node_id,
                    **dict.fromkeys(_USAGE_SUMS, 0),
                    "last_sequence": fact.sequence,
                    "interval_first_start": fact.interval_start,
                    "interval_last_end": fact.interval_end,
                    "peak_memory_bytes_max": fact.peak_memory_bytes,
                }
            row["reports"] += 1
            row["billable_s"] += billable_s
            row["wall_time_us"] += fact.wall_time_us
            row["device_time_us"] += fact.device_time_us
            row["flops"] += fact.flops
            row["samples"] += fact.samples
            row["tokens"] += fact.tokens
            row["steps"] += fact.steps
            row["last_sequence"] = max(row["last_sequence"], fact.sequence)
            row["interval_first_start"] = min(row["interval_first_start"], fact.interval_start)
            row["interval_last_end"] = max(row["interval_last_end"], fact.interval_end)
            row["peak_memory_bytes_max"] = max(row["peak_memory_bytes_max"], fact.peak_memory_bytes)
            row["updated_position"] = position
        self.merge(
            curs,
            USAGE_TABLE_NAME,
            list(leases.values()),
            add=_USAGE_SUMS,
            greatest=("last_sequence", "interval_last_end", "peak_memory_bytes_max"),
            least=("interval_first_start",),
            keep=("node_id",),
        )


def _whole_seconds(fact: UsageRecorded) -> int:
    """The report's billable seconds as settlement prices them: whole seconds of its interval."""
    delta = fact.interval_end - fact.interval_start
    interval_us = max(
        0, (delta.days * 86_400 + delta.seconds) * MICROSECONDS_PER_SECOND + delta.microseconds
    )
    return interval_us // MICROSECONDS_PER_SECOND


def _wrapped(fact: Any) -> MarketEvent:
    if not isinstance(fact, UsageRecorded):
        raise MarketProjectionError(f"not a usage fact: {type(fact).__name__}")
    return MarketEvent(fact.lease_id, fact.sequence, fact.received_at, fact)


class EarningsUsageProjection(MarketProjection[EarningsUsageRecorder]):
    """Keeps recorded usage per lease up to date with the usage log (`usage_events`)."""

    name = USAGE_VIEW_NAME

    def __init__(
        self,
        app: UsageApplication,
        view: EarningsUsageRecorder | None = None,
        *,
        page_size: int | None = None,
    ) -> None:
        """`view` defaults to the view's tables in the usage store's schema and pool."""
        if view is None:
            view = EarningsUsageRecorder(app.usage_recorder.datastore)
            view.create_table()
        kwargs: dict[str, Any] = {} if page_size is None else {"page_size": page_size}
        super().__init__(cast(MarketplaceApplication, app), view, **kwargs)

    @classmethod
    def recorder_class(cls) -> type[EarningsUsageRecorder]:
        return EarningsUsageRecorder

    def _decode(self, notification: Notification) -> MarketEvent:
        return _wrapped(usage_of_state(notification.state))

    def close(self) -> None:
        """Close the view's pool, unless it is the usage store's own."""
        app = cast(UsageApplication, self.app)
        if self.view.datastore is not app.usage_recorder.datastore:
            self.view.datastore.close()
