"""The read side the HTTP API and the CLI share: earnings, usage, trial balance, epoch
reconciliation and the event export, as pydantic models read with asyncpg from the views'
tables (`projections.earnings`, `projections.balances`, `projections.reputation`) and the
logs' tables.

Every query takes an asyncpg connection whose search_path is the views' schema (see
`connect`), so one code path answers `GET /v1/providers/{id}/earnings` and `aether
earnings`: their numbers are the same by construction (and by test).

Amounts are integers in the asset's smallest unit; in JSON they are decimal strings
(`Amount`), exact whatever the reader's number type. Counts are JSON numbers.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal
from uuid import UUID

import asyncpg
import orjson
from pydantic import BaseModel, ConfigDict, PlainSerializer

from domain import verdicts
from domain.codes import AccountCode
from domain.orderbook import lease_cost
from domain.stake import SlashKind
from domain.verdicts import ProviderHistory, VerdictRules
from ledger.audit import DEFAULT_LOGS
from projections import earnings as e
from projections import reputation as r
from projections.balances import VIEW_NAME as BALANCES_TABLE_NAME
from projections.view import plain

Amount = Annotated[int, PlainSerializer(str, return_type=str, when_used="json")]
"""An amount in the asset's smallest unit; a decimal string in JSON."""

EXPORT_PAGE_SIZE_MAX = 1_000
"""Most events one page of the export returns."""
EXPORT_PAGE_SIZE_DEFAULT = 100
CURSOR_LENGTH_MAX = 200
LOG_TABLES: dict[str, str] = {log.name: log.table for log in DEFAULT_LOGS}
"""The logs the export serves: name -> events table."""
SCHEMA_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

EpochStatus = Literal["unplanned", "planned", "settled", "posted"]


class QueryError(Exception):
    """A query asked for something that does not exist or is not well formed."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


# -- models -----------------------------------------------------------------------------------


class ChargeSums(_Model):
    charged: Amount
    """Drawn from escrow by the usage charges."""
    withheld: Amount
    """Of charged: usage inside failed windows, not paid to the provider."""
    fee: Amount
    """Of charged: the protocol fee."""
    earned: Amount
    """Of charged: the provider's share, credited to its earnings."""
    uncovered: Amount
    """Priced but not drawn: the escrow was exhausted."""
    charges_count: int


class PendingUsage(_Model):
    """Usage recorded and not yet in any epoch's settlement plan."""

    reports: int
    billable_s: int
    amount_estimate: Amount
    """At the lease price, before withholding and fee (settlement may withhold some)."""


class Stake(_Model):
    bonded: Amount
    unbonding: Amount
    unbonded: Amount
    slashed: Amount
    slashes_count: int


class EpochEarnings(ChargeSums):
    epoch: int
    """-1: charges not made by settlement."""
    status: EpochStatus
    epoch_start: datetime | None
    epoch_end: datetime | None
    planned_provider_share: Amount | None
    """What the epoch's plan gave the provider (before exhausted escrows drew less)."""
    planned_reports: int
    planned_billable_s: int
    payout_cumulative: Amount | None
    """The provider's cumulative amount in the epoch's payout root."""
    payout_root: str | None
    settled_at: datetime | None
    posted_at: datetime | None


class ProviderEarnings(ChargeSums):
    provider_id: UUID
    operator_address: str | None
    settled: Amount
    """Earned in epochs whose settlement is recorded (EpochSettled)."""
    unsettled: Amount
    """Earned and not in a settled epoch: earned - settled."""
    payout_cumulative: Amount
    """In the latest payout root: what the provider may have claimed in all."""
    claimed: Amount
    claimable: Amount
    """payout_cumulative - claimed (never below 0)."""
    claims_count: int
    pending: PendingUsage
    stake: Stake
    epochs: list[EpochEarnings]


class UsageTotals(_Model):
    reports: int
    last_sequence: int
    interval_first_start: datetime | None
    interval_last_end: datetime | None
    billable_s: int
    gpu_seconds: int
    """Device time summed over the lease's GPUs, whole seconds."""
    wall_time_us: int
    device_time_us: int
    flops: int
    samples: int
    tokens: int
    steps: int
    peak_memory_bytes_max: int


class Refund(_Model):
    position: int
    lease_id: UUID
    consumer_id: UUID
    provider_id: UUID
    node_id: UUID
    window_start: datetime
    amount: Amount
    owed: Amount
    refunded_at: datetime


class LeaseEpochCharge(ChargeSums):
    epoch: int
    status: EpochStatus
    planned_amount: Amount | None
    planned_reports: int
    planned_billable_s: int


class LeaseAccount(ChargeSums):
    """One lease: its terms, what it metered, what it cost, what is pending, refunds."""

    lease_id: UUID
    provider_id: UUID
    consumer_id: UUID
    node_id: UUID
    gpu_model: str
    gpu_count: int
    price_per_gpu_hour: Amount
    opened_at: datetime
    refunded: Amount
    refunds_count: int
    usage: UsageTotals
    settled_reports: int
    settled_billable_s: int
    pending: PendingUsage
    epochs: list[LeaseEpochCharge]
    refunds: list[Refund]


class Slash(_Model):
    position: int
    kind: str
    gpu_model: str
    gpu_count: int
    amount_sized: Amount
    amount: Amount
    from_bonded: Amount
    offence_at: datetime
    slashed_at: datetime


class ProviderStake(_Model):
    provider_id: UUID
    stake: Stake
    slashes: list[Slash]


class Reputation(_Model):
    """`domain.verdicts.ReputationScore` at `at` (basis points: 0..10,000)."""

    provider_id: UUID
    at: datetime
    score_bps: int
    windows_decided_count: int
    windows_passed_count: int
    uptime_ppm_mean: int
    uptime_points_bps: int
    pass_points_bps: int
    latency_ms_p99_mean: int
    latency_points_bps: int
    age_days: int
    age_points_bps: int
    slashes_count: int
    slash_penalty_bps: int


class AccountBalanceLine(_Model):
    account_id: UUID
    asset: str
    code: int
    code_name: str
    debits_pending: Amount
    debits_posted: Amount
    credits_pending: Amount
    credits_posted: Amount
    balance: Amount
    """credits_posted - debits_posted."""


class AssetTotals(_Model):
    asset: str
    debits_posted: Amount
    credits_posted: Amount
    debits_pending: Amount
    credits_pending: Amount
    balanced: bool


class TrialBalance(_Model):
    balanced: bool
    assets: list[AssetTotals]
    accounts: list[AccountBalanceLine]


class ReconciliationLine(_Model):
    item: str
    ledger: Amount | None
    """What the marketplace log moved (the charges of the epoch, as the ledger posts them)."""
    log: Amount | None
    """What the settlement log says (the plan, the outcome, the payout root)."""
    status: Literal["ok", "MISMATCH"]
    note: str = ""


class EpochReconciliation(_Model):
    epoch: int
    status: EpochStatus
    lines: list[ReconciliationLine]
    flagged: int


class EpochSummary(_Model):
    epoch: int
    status: EpochStatus
    epoch_start: datetime
    epoch_end: datetime
    leases_count: int
    charged: Amount
    fee: Amount
    provider_share: Amount
    payout_root: str | None
    payout_total: Amount | None


class ExportedEvent(_Model):
    log: str
    notification_id: int
    originator_id: str
    originator_version: int
    topic: str
    state: Any
    """The stored state: its JSON when it is JSON, else {"base64": ...}."""


class EventPage(_Model):
    log: str
    events: list[ExportedEvent]
    next_cursor: str | None
    """Pass as `cursor` for the next page; None at the end of the log (for now)."""


# -- connections ------------------------------------------------------------------------------


def check_schema(schema: str) -> str:
    if not SCHEMA_NAME_RE.match(schema):
        raise ValueError(f"not a schema name: {schema!r}")
    return schema


async def connect(dsn: str, schema: str) -> Any:
    """One asyncpg connection whose search_path is `schema` (close it with `close()`)."""
    return await asyncpg.connect(
        dsn, server_settings={"search_path": check_schema(schema)}, timeout=10
    )


async def _keep_session(conn: Any) -> None:
    """A pooled connection's reset on release: nothing. The queries change no session state
    (no SET, LISTEN, advisory locks or cursors), so the default reset's round trip per
    request (RESET ALL, UNLISTEN *, ...) is skipped."""


async def create_pool(dsn: str, schema: str, *, min_size: int, max_size: int) -> Any:
    """An asyncpg pool whose connections' search_path is `schema`."""
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings={"search_path": check_schema(schema)},
        timeout=10,
        reset=_keep_session,
    )


def _int(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, Decimal):
        as_int = int(value)
        assert as_int == value, value
        return as_int
    return int(value)


def _row(record: Any) -> dict[str, Any]:
    return {k: plain(v) for k, v in dict(record).items()}


def _sums(row: dict[str, Any]) -> dict[str, int]:
    return {name: _int(row.get(name)) for name in e.CHARGE_SUMS}


def _status(row: dict[str, Any] | None) -> EpochStatus:
    if row is None or row.get("planned_at") is None:
        return "unplanned"
    if row.get("posted_at") is not None:
        return "posted"
    if row.get("settled_at") is not None:
        return "settled"
    return "planned"


def _pending(
    gpu_count: int, price: int, recorded: tuple[int, int], settled: tuple[int, int]
) -> PendingUsage:
    reports = max(0, recorded[0] - settled[0])
    billable_s = max(0, recorded[1] - settled[1])
    return PendingUsage(
        reports=reports,
        billable_s=billable_s,
        amount_estimate=lease_cost(gpu_count, price, billable_s),
    )


# -- providers ----------------------------------------------------------------------------------


async def tables_ready(conn: Any) -> bool:
    """Whether the earnings views' tables exist (the projector created them)."""
    found = await conn.fetchval(
        "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() "
        "AND tablename = ANY($1::text[])",
        [e.PROVIDERS_TABLE_NAME, e.EPOCHS_TABLE_NAME, e.USAGE_TABLE_NAME],
    )
    return int(found) == 3


_PROVIDER_EPOCHS = f"""
WITH epochs AS (
    SELECT epoch FROM {e.PROVIDER_EPOCHS_TABLE_NAME} WHERE provider_id = $1
    UNION SELECT epoch FROM {e.EPOCH_CHARGES_TABLE_NAME} WHERE provider_id = $1
), planned AS (
    SELECT epoch, sum(provider_share) AS share, sum(reports) AS reports,
           sum(billable_s) AS billable_s
    FROM {e.EPOCH_CHARGES_TABLE_NAME} WHERE provider_id = $1 GROUP BY epoch
)
SELECT x.epoch, pe.charged, pe.withheld, pe.fee, pe.earned, pe.uncovered, pe.charges_count,
       ep.epoch_start, ep.epoch_end, ep.planned_at, ep.settled_at, ep.posted_at,
       ep.payout_root, pl.share, pl.reports, pl.billable_s, po.cumulative
FROM epochs x
LEFT JOIN {e.PROVIDER_EPOCHS_TABLE_NAME} pe ON pe.provider_id = $1 AND pe.epoch = x.epoch
LEFT JOIN {e.EPOCHS_TABLE_NAME} ep ON ep.epoch = x.epoch
LEFT JOIN planned pl ON pl.epoch = x.epoch
LEFT JOIN {e.EPOCH_PAYOUTS_TABLE_NAME} po ON po.provider_id = $1 AND po.epoch = x.epoch
WHERE ($2::bigint IS NULL OR x.epoch = $2)
ORDER BY x.epoch
"""  # noqa: S608 (table names are constants)

_PROVIDER = f"SELECT * FROM {e.PROVIDERS_TABLE_NAME} WHERE provider_id = $1"  # noqa: S608

_PROVIDER_WITH_TOTALS = f"""
WITH pending AS (
    SELECT l.gpu_count, l.price_per_gpu_hour,
           greatest(0, coalesce(u.reports, 0) - coalesce(s.reports, 0)) AS reports,
           greatest(0, coalesce(u.billable_s, 0) - coalesce(s.billable_s, 0)) AS billable_s
    FROM {e.LEASES_TABLE_NAME} l
    LEFT JOIN {e.USAGE_TABLE_NAME} u ON u.lease_id = l.lease_id
    LEFT JOIN (
        SELECT lease_id, sum(reports) AS reports, sum(billable_s) AS billable_s
        FROM {e.EPOCH_CHARGES_TABLE_NAME} WHERE provider_id = $1 GROUP BY lease_id
    ) s ON s.lease_id = l.lease_id
    WHERE l.provider_id = $1
)
SELECT p.*,
       (SELECT po.cumulative FROM {e.EPOCH_PAYOUTS_TABLE_NAME} po
        WHERE po.provider_id = $1 ORDER BY po.epoch DESC LIMIT 1) AS payout_cumulative,
       (SELECT coalesce(sum(reports), 0) FROM pending) AS pending_reports,
       (SELECT coalesce(sum(billable_s), 0) FROM pending) AS pending_billable_s,
       (SELECT coalesce(sum(div(gpu_count * price_per_gpu_hour * billable_s + 3599, 3600)), 0)
        FROM pending) AS pending_estimate
FROM {e.PROVIDERS_TABLE_NAME} p WHERE p.provider_id = $1
"""  # noqa: S608
"""The provider's row, its latest payout amount and its pending usage, in one round trip
(the estimate is `lease_cost` per lease: ceil(gpu_count * price * seconds / 3600))."""


def _epoch_earnings(row: dict[str, Any]) -> EpochEarnings:
    return EpochEarnings(
        epoch=row["epoch"],
        status="unplanned" if row["epoch"] == e.NO_EPOCH else _status(row),
        epoch_start=row["epoch_start"],
        epoch_end=row["epoch_end"],
        planned_provider_share=None if row["share"] is None else _int(row["share"]),
        planned_reports=_int(row["reports"]),
        planned_billable_s=_int(row["billable_s"]),
        payout_cumulative=None if row["cumulative"] is None else _int(row["cumulative"]),
        payout_root=row["payout_root"],
        settled_at=row["settled_at"],
        posted_at=row["posted_at"],
        **_sums(row),
    )


async def provider_earnings(
    conn: Any, provider_id: UUID, *, epoch: int | None = None
) -> ProviderEarnings:
    """A provider's earnings (all epochs, or only `epoch`): earned, settled, claimed,
    pending, stake. QueryError 404 for an unknown provider or an epoch it has nothing in."""
    provider = await conn.fetchrow(_PROVIDER_WITH_TOTALS, provider_id)
    if provider is None:
        raise QueryError(404, "unknown_provider", f"no provider {provider_id}")
    p = _row(provider)
    rows = [_row(x) for x in await conn.fetch(_PROVIDER_EPOCHS, provider_id, epoch)]
    epochs = [_epoch_earnings(x) for x in rows]
    if epoch is not None and not epochs:
        raise QueryError(
            404, "unknown_epoch", f"provider {provider_id} has nothing in epoch {epoch}"
        )
    if epoch is None:
        all_epochs = epochs
    else:
        all_epochs = [
            _epoch_earnings(_row(x)) for x in await conn.fetch(_PROVIDER_EPOCHS, provider_id, None)
        ]
    settled = sum(x.earned for x in all_epochs if x.status in ("settled", "posted"))
    payout = _int(p["payout_cumulative"])
    claimed = _int(p["claimed"])
    return ProviderEarnings(
        provider_id=provider_id,
        operator_address=p["operator_address"],
        settled=settled,
        unsettled=_int(p["earned"]) - settled,
        payout_cumulative=payout,
        claimed=claimed,
        claimable=max(0, payout - claimed),
        claims_count=_int(p["claims_count"]),
        pending=PendingUsage(
            reports=_int(p["pending_reports"]),
            billable_s=_int(p["pending_billable_s"]),
            amount_estimate=_int(p["pending_estimate"]),
        ),
        stake=_stake(p),
        epochs=epochs,
        **_sums(p),
    )


def _stake(p: dict[str, Any]) -> Stake:
    return Stake(
        bonded=_int(p["bonded"]),
        unbonding=_int(p["unbonding"]),
        unbonded=_int(p["unbonded"]),
        slashed=_int(p["slashed"]),
        slashes_count=_int(p["slashes_count"]),
    )


async def provider_stake(conn: Any, provider_id: UUID) -> ProviderStake:
    provider = await conn.fetchrow(_PROVIDER, provider_id)
    if provider is None:
        raise QueryError(404, "unknown_provider", f"no provider {provider_id}")
    rows = await conn.fetch(
        f"SELECT * FROM {e.SLASHES_TABLE_NAME} WHERE provider_id = $1 ORDER BY position",  # noqa: S608
        provider_id,
    )
    slashes = []
    for record in rows:
        x = _row(record)
        slashes.append(
            Slash(
                position=x["position"],
                kind=SlashKind(x["kind"]).name,
                gpu_model=x["gpu_model"],
                gpu_count=x["gpu_count"],
                amount_sized=_int(x["amount_sized"]),
                amount=_int(x["amount"]),
                from_bonded=_int(x["from_bonded"]),
                offence_at=x["offence_at"],
                slashed_at=x["slashed_at"],
            )
        )
    return ProviderStake(provider_id=provider_id, stake=_stake(_row(provider)), slashes=slashes)


async def provider_reputation(conn: Any, provider_id: UUID, now: datetime) -> Reputation:
    """`domain.verdicts.reputation` of the reputation view's history of the provider."""
    registered = await conn.fetchrow(
        f"SELECT * FROM {r.PROVIDERS_TABLE_NAME} WHERE provider_id = $1",  # noqa: S608
        provider_id,
    )
    if registered is None:
        raise QueryError(404, "unknown_provider", f"no provider {provider_id}")
    decisions = await conn.fetch(
        f"SELECT * FROM {r.DECISIONS_TABLE_NAME} WHERE provider_id = $1 "  # noqa: S608
        "ORDER BY window_start, node_id",
        provider_id,
    )
    slashes = await conn.fetch(
        f"SELECT * FROM {r.SLASHES_TABLE_NAME} WHERE provider_id = $1 ORDER BY position",  # noqa: S608
        provider_id,
    )
    history = ProviderHistory(
        provider_id=provider_id,
        registered_at=plain(registered["registered_at"]),
        decisions=tuple(r._decision(_row(d)) for d in decisions),
        slashes=tuple(r._slash(_row(s)) for s in slashes),
    )
    score = verdicts.reputation(history, now, VerdictRules())
    return Reputation(at=now, **dataclasses.asdict(score))


# -- leases -------------------------------------------------------------------------------------

_LEASES = f"""
SELECT l.*, u.node_id AS usage_node_id, u.reports AS u_reports, u.last_sequence,
       u.interval_first_start, u.interval_last_end, u.billable_s AS u_billable_s,
       u.wall_time_us, u.device_time_us, u.flops, u.samples, u.tokens, u.steps,
       u.peak_memory_bytes_max
FROM {e.LEASES_TABLE_NAME} l
LEFT JOIN {e.USAGE_TABLE_NAME} u ON u.lease_id = l.lease_id
"""  # noqa: S608

_LEASE_EPOCHS = f"""
WITH epochs AS (
    SELECT lease_id, epoch FROM {e.LEASE_EPOCHS_TABLE_NAME} WHERE lease_id = ANY($1::uuid[])
    UNION SELECT lease_id, epoch FROM {e.EPOCH_CHARGES_TABLE_NAME}
    WHERE lease_id = ANY($1::uuid[])
)
SELECT x.lease_id, x.epoch, le.charged, le.withheld, le.fee, le.earned, le.uncovered,
       le.charges_count, c.amount AS planned_amount, c.reports, c.billable_s,
       ep.planned_at, ep.settled_at, ep.posted_at
FROM epochs x
LEFT JOIN {e.LEASE_EPOCHS_TABLE_NAME} le ON le.lease_id = x.lease_id AND le.epoch = x.epoch
LEFT JOIN {e.EPOCH_CHARGES_TABLE_NAME} c ON c.lease_id = x.lease_id AND c.epoch = x.epoch
LEFT JOIN {e.EPOCHS_TABLE_NAME} ep ON ep.epoch = x.epoch
ORDER BY x.lease_id, x.epoch
"""  # noqa: S608

_LEASE_REFUNDS = f"""
SELECT * FROM {e.REFUNDS_TABLE_NAME} WHERE lease_id = ANY($1::uuid[]) ORDER BY position
"""  # noqa: S608


async def _leases(conn: Any, where: str, *args: Any) -> list[LeaseAccount]:
    rows = [
        _row(x)
        for x in await conn.fetch(
            f"{_LEASES} WHERE {where} ORDER BY l.opened_at, l.lease_id", *args
        )
    ]
    ids = [x["lease_id"] for x in rows]
    by_lease: dict[UUID, list[LeaseEpochCharge]] = {i: [] for i in ids}
    refunds: dict[UUID, list[Refund]] = {i: [] for i in ids}
    if ids:
        for record in await conn.fetch(_LEASE_EPOCHS, ids):
            x = _row(record)
            by_lease[x["lease_id"]].append(
                LeaseEpochCharge(
                    epoch=x["epoch"],
                    status="unplanned" if x["epoch"] == e.NO_EPOCH else _status(x),
                    planned_amount=None
                    if x["planned_amount"] is None
                    else _int(x["planned_amount"]),
                    planned_reports=_int(x["reports"]),
                    planned_billable_s=_int(x["billable_s"]),
                    **_sums(x),
                )
            )
        for record in await conn.fetch(_LEASE_REFUNDS, ids):
            x = _row(record)
            refunds[x["lease_id"]].append(
                Refund(**{**x, "amount": _int(x["amount"]), "owed": _int(x["owed"])})
            )
    found = []
    for x in rows:
        epochs = by_lease[x["lease_id"]]
        settled_reports = sum(c.planned_reports for c in epochs)
        settled_s = sum(c.planned_billable_s for c in epochs)
        recorded = (_int(x["u_reports"]), _int(x["u_billable_s"]))
        price = _int(x["price_per_gpu_hour"])
        found.append(
            LeaseAccount(
                lease_id=x["lease_id"],
                provider_id=x["provider_id"],
                consumer_id=x["consumer_id"],
                node_id=x["node_id"],
                gpu_model=x["gpu_model"],
                gpu_count=x["gpu_count"],
                price_per_gpu_hour=price,
                opened_at=x["opened_at"],
                refunded=_int(x["refunded"]),
                refunds_count=_int(x["refunds_count"]),
                usage=UsageTotals(
                    reports=recorded[0],
                    last_sequence=_int(x["last_sequence"]),
                    interval_first_start=x["interval_first_start"],
                    interval_last_end=x["interval_last_end"],
                    billable_s=recorded[1],
                    gpu_seconds=_int(x["device_time_us"]) // e.MICROSECONDS_PER_SECOND,
                    wall_time_us=_int(x["wall_time_us"]),
                    device_time_us=_int(x["device_time_us"]),
                    flops=_int(x["flops"]),
                    samples=_int(x["samples"]),
                    tokens=_int(x["tokens"]),
                    steps=_int(x["steps"]),
                    peak_memory_bytes_max=_int(x["peak_memory_bytes_max"]),
                ),
                settled_reports=settled_reports,
                settled_billable_s=settled_s,
                pending=_pending(x["gpu_count"], price, recorded, (settled_reports, settled_s)),
                epochs=epochs,
                refunds=refunds[x["lease_id"]],
                **_sums(x),
            )
        )
    return found


async def provider_leases(conn: Any, provider_id: UUID) -> list[LeaseAccount]:
    if await conn.fetchrow(_PROVIDER, provider_id) is None:
        raise QueryError(404, "unknown_provider", f"no provider {provider_id}")
    return await _leases(conn, "l.provider_id = $1", provider_id)


async def consumer_leases(conn: Any, consumer_id: UUID) -> list[LeaseAccount]:
    """Every lease of the consumer (an empty list for a consumer with none)."""
    return await _leases(conn, "l.consumer_id = $1", consumer_id)


async def lease_account(conn: Any, lease_id: UUID) -> LeaseAccount:
    found = await _leases(conn, "l.lease_id = $1", lease_id)
    if not found:
        raise QueryError(404, "unknown_lease", f"no lease {lease_id}")
    return found[0]


async def lease_parties(conn: Any, lease_id: UUID) -> tuple[UUID, UUID] | None:
    """(provider id, consumer id) of a lease; None if unknown."""
    row = await conn.fetchrow(
        f"SELECT provider_id, consumer_id FROM {e.LEASES_TABLE_NAME} WHERE lease_id = $1",  # noqa: S608
        lease_id,
    )
    return None if row is None else (row["provider_id"], row["consumer_id"])


# -- finance ------------------------------------------------------------------------------------


async def trial_balance(conn: Any) -> TrialBalance:
    """Every account of the balances view and the per-asset trial balance."""
    rows = await conn.fetch(
        f"SELECT account_id, asset, code, debits_pending, debits_posted, credits_pending, "  # noqa: S608
        f"credits_posted FROM {BALANCES_TABLE_NAME} ORDER BY asset, code, account_id"
    )
    lines = [
        account_line(
            x["account_id"],
            x["asset"],
            x["code"],
            _int(x["debits_pending"]),
            _int(x["debits_posted"]),
            _int(x["credits_pending"]),
            _int(x["credits_posted"]),
        )
        for x in rows
    ]
    return trial_balance_of(lines)


def account_line(
    account_id: UUID,
    asset: str,
    code: int,
    debits_pending: int,
    debits_posted: int,
    credits_pending: int,
    credits_posted: int,
) -> AccountBalanceLine:
    try:
        code_name = AccountCode(code).name
    except ValueError:
        code_name = str(code)
    return AccountBalanceLine(
        account_id=account_id,
        asset=asset,
        code=code,
        code_name=code_name,
        debits_pending=debits_pending,
        debits_posted=debits_posted,
        credits_pending=credits_pending,
        credits_posted=credits_posted,
        balance=credits_posted - debits_posted,
    )


def trial_balance_of(lines: Sequence[AccountBalanceLine]) -> TrialBalance:
    """The trial balance of account lines (sorted by asset, code, account id)."""
    ordered = sorted(lines, key=lambda a: (a.asset, a.code, str(a.account_id)))
    assets = []
    for asset in sorted({a.asset for a in ordered}):
        of = [a for a in ordered if a.asset == asset]
        totals = {
            k: sum(getattr(a, k) for a in of)
            for k in ("debits_posted", "credits_posted", "debits_pending", "credits_pending")
        }
        assets.append(
            AssetTotals(
                asset=asset,
                balanced=totals["debits_posted"] == totals["credits_posted"]
                and totals["debits_pending"] == totals["credits_pending"],
                **totals,
            )
        )
    return TrialBalance(
        balanced=all(a.balanced for a in assets), assets=assets, accounts=list(ordered)
    )


_EPOCH = f"SELECT * FROM {e.EPOCHS_TABLE_NAME} WHERE epoch = $1"  # noqa: S608


async def epochs(conn: Any) -> list[EpochSummary]:
    rows = await conn.fetch(f"SELECT * FROM {e.EPOCHS_TABLE_NAME} ORDER BY epoch")  # noqa: S608
    return [
        EpochSummary(
            epoch=x["epoch"],
            status=_status(x),
            epoch_start=x["epoch_start"],
            epoch_end=x["epoch_end"],
            leases_count=x["leases_count"],
            charged=_int(x["charged"]),
            fee=_int(x["fee"]),
            provider_share=_int(x["provider_share"]),
            payout_root=x["payout_root"],
            payout_total=None if x["payout_total"] is None else _int(x["payout_total"]),
        )
        for x in (_row(y) for y in rows)
    ]


async def epoch_reconciliation(conn: Any, epoch: int) -> EpochReconciliation:
    """One epoch, the marketplace's charges (as the ledger posts them) against the
    settlement log's plan, outcome and payout root, from the views. (`aether reconcile`
    adds the chain's side.) QueryError 404 for an epoch never planned."""
    found = await conn.fetchrow(_EPOCH, epoch)
    if found is None:
        raise QueryError(404, "unknown_epoch", f"epoch {epoch} was never planned")
    plan = _row(found)
    status = _status(plan)
    moved = _row(
        await conn.fetchrow(
            f"SELECT coalesce(sum(charged), 0) AS charged, coalesce(sum(withheld), 0) AS withheld, "  # noqa: S608
            f"coalesce(sum(fee), 0) AS fee, coalesce(sum(earned), 0) AS earned, "
            f"coalesce(sum(uncovered), 0) AS uncovered "
            f"FROM {e.LEASE_EPOCHS_TABLE_NAME} WHERE epoch = $1",
            epoch,
        )
    )
    lines: list[ReconciliationLine] = []

    def line(item: str, ledger: int | None, log: int | None, note: str = "") -> None:
        same = ledger == log
        lines.append(
            ReconciliationLine(
                item=item,
                ledger=ledger,
                log=log,
                status="ok" if same else "MISMATCH",
                note="" if same else note,
            )
        )

    charged, uncovered = _int(moved["charged"]), _int(moved["uncovered"])
    line("requested", charged + uncovered, _int(plan["charged"]), "charges priced != the plan's")
    drawn = None if plan["drawn"] is None else _int(plan["drawn"])
    if drawn is not None:
        line("drawn", charged, drawn, "escrow drawn != the outcome's")
    if uncovered == 0:
        line("withheld", _int(moved["withheld"]), _int(plan["withheld"]), "withheld != the plan's")
        line("fee", _int(moved["fee"]), _int(plan["fee"]), "fees posted != the plan's")
        line(
            "provider share",
            _int(moved["earned"]),
            _int(plan["provider_share"]),
            "earnings credited != the plan's",
        )
    if status in ("settled", "posted"):
        payouts = await conn.fetch(
            f"SELECT po.provider_id, po.address, po.cumulative, "  # noqa: S608
            f"(SELECT coalesce(sum(earned), 0) FROM {e.PROVIDER_EPOCHS_TABLE_NAME} pe "
            f"WHERE pe.provider_id = po.provider_id AND pe.epoch <= $1) AS earned "
            f"FROM {e.EPOCH_PAYOUTS_TABLE_NAME} po WHERE po.epoch = $1 ORDER BY po.address",
            epoch,
        )
        for x in (_row(y) for y in payouts):
            line(
                f"payout {x['address']}",
                _int(x["earned"]),
                _int(x["cumulative"]),
                "earned so far != the root's cumulative amount",
            )
    balance = await trial_balance(conn)
    debits = sum(a.debits_posted for a in balance.assets)
    credits = sum(a.credits_posted for a in balance.assets)
    line("trial balance (debits vs credits)", debits, credits, "the ledger is out of balance")
    return EpochReconciliation(
        epoch=epoch,
        status=status,
        lines=lines,
        flagged=sum(1 for x in lines if x.status != "ok"),
    )


# -- audit export -------------------------------------------------------------------------------


def encode_cursor(log: str, after: int) -> str:
    raw = f"v1:{log}:{after}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(log: str, cursor: str) -> int:
    """The position a cursor of `log` continues after; QueryError 400 when it is not one."""
    bad = QueryError(400, "invalid_cursor", f"not a cursor of log {log}: {cursor[:40]!r}")
    if not cursor or len(cursor) > CURSOR_LENGTH_MAX:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    version, _, rest = raw.partition(":")
    name, _, position = rest.rpartition(":")
    if version != "v1" or name != log or not position.isdigit():
        raise bad
    return int(position)


def _state(state: bytes) -> Any:
    try:
        return orjson.loads(state)
    except orjson.JSONDecodeError:
        return {"base64": base64.b64encode(state).decode()}


async def export_events(
    conn: Any, log: str, *, cursor: str | None = None, limit: int = EXPORT_PAGE_SIZE_DEFAULT
) -> EventPage:
    """A page of a log's events in log order, after `cursor` (keyset: notification id)."""
    table = LOG_TABLES.get(log)
    if table is None:
        raise QueryError(404, "unknown_log", f"no log {log!r}; the logs are {sorted(LOG_TABLES)}")
    if not 1 <= limit <= EXPORT_PAGE_SIZE_MAX:
        raise QueryError(400, "invalid_limit", f"limit must be within 1..{EXPORT_PAGE_SIZE_MAX}")
    after = 0 if cursor is None else decode_cursor(log, cursor)
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
    if not exists:
        return EventPage(log=log, events=[], next_cursor=None)
    rows = await conn.fetch(
        f"SELECT notification_id, originator_id::text AS originator_id, originator_version, "  # noqa: S608
        f"topic, state FROM {table} WHERE notification_id > $1 ORDER BY notification_id LIMIT $2",
        after,
        limit,
    )
    events = [
        ExportedEvent(
            log=log,
            notification_id=x["notification_id"],
            originator_id=x["originator_id"],
            originator_version=x["originator_version"],
            topic=x["topic"],
            state=_state(bytes(x["state"])),
        )
        for x in rows
    ]
    next_cursor = encode_cursor(log, events[-1].notification_id) if len(events) == limit else None
    return EventPage(log=log, events=events, next_cursor=next_cursor)
