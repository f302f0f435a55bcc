"""`aether earnings`, `aether usage`, `aether trial-balance --format`, `aether api`, `aether
api-key`: the questions the HTTP API answers, from the shell, as a table, CSV or JSON.

The numbers come from the same queries as the API's (`projections.queries`, on the views:
bring them up to date with `aether project`), and the JSON is the API's JSON byte for byte
in content (the same pydantic models). Exit status: 0, 1 when the provider, lease or epoch
is unknown, 2 on a bad argument.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

from ledger.config import Settings

if TYPE_CHECKING:
    from ledger.model import LedgerState
    from projections.queries import LeaseAccount, ProviderEarnings, TrialBalance

FORMATS = ("table", "csv", "json")


def _uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def _epoch(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an epoch number: {text!r}") from None
    if not -1 <= value <= 2**62:
        raise argparse.ArgumentTypeError(f"an epoch is within -1..2**62, got {value}")
    return value


def add_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="table", help="default: table")


def add_parser(commands: Any) -> None:
    """The subcommands of this module, on `aether`'s subparsers."""
    earnings = commands.add_parser(
        "earnings", help="a provider's earnings: per epoch, settled, claimed, pending, stake"
    )
    earnings.add_argument("--provider", required=True, type=_uuid, metavar="UUID")
    earnings.add_argument("--epoch", type=_epoch, default=None, metavar="N")
    add_format(earnings)
    earnings.set_defaults(run=run_earnings)

    usage = commands.add_parser(
        "usage", help="usage, charges and refunds of a lease or of a consumer's leases"
    )
    which = usage.add_mutually_exclusive_group(required=True)
    which.add_argument("--lease", type=_uuid, metavar="UUID")
    which.add_argument("--consumer", type=_uuid, metavar="UUID")
    add_format(usage)
    usage.set_defaults(run=run_usage)

    api = commands.add_parser("api", help="run the HTTP API (uvicorn; OpenAPI at /docs)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=_port, default=8000)
    api.add_argument("--pool-size", type=_pool_size, default=8, metavar="N")
    api.set_defaults(run=_run_api)

    keys = commands.add_parser("api-key", help="create or revoke an API key of a party")
    sub = keys.add_subparsers(dest="api_key_command", required=True, metavar="COMMAND")
    create = sub.add_parser("create", help="create a key and print it (once)")
    create.add_argument(
        "--party", required=True, choices=("provider", "consumer", "finance", "auditor")
    )
    create.add_argument("--id", required=True, type=_uuid, dest="party_id", metavar="UUID")
    revoke = sub.add_parser("revoke", help="revoke a key by its key id")
    revoke.add_argument("key_id", type=_uuid, metavar="KEY_ID")
    keys.set_defaults(run=_run_api_key)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65_536:
        raise argparse.ArgumentTypeError(f"not a port (1..65535): {text!r}")
    return int(text)


def _pool_size(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 16:
        raise argparse.ArgumentTypeError(f"a pool size is within 1..16, got {text!r}")
    return int(text)


def _run_api(settings: Settings, args: argparse.Namespace) -> int:
    from workers.api import run_api

    return run_api(settings, args)


def _run_api_key(settings: Settings, args: argparse.Namespace) -> int:
    from workers.api import run_api_key

    return run_api_key(settings, args)


# -- running a query ---------------------------------------------------------------------------


def _query(settings: Settings, query: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one `projections.queries` query on a connection of its own."""
    from ledger.embedded import start_embedded_postgres
    from projections import queries as q

    url = settings.database_url
    server: Any = None
    if url is None:
        url, server = start_embedded_postgres(settings.aether_data_dir)

    async def go() -> Any:
        conn = await q.connect(url, settings.postgres_schema)
        try:
            return await query(conn, *args, **kwargs)
        finally:
            await conn.close()

    try:
        return asyncio.run(go())
    finally:
        del server


def run_earnings(settings: Settings, args: argparse.Namespace) -> int:
    from projections import queries as q

    try:
        found: ProviderEarnings = _query(
            settings, q.provider_earnings, args.provider, epoch=args.epoch
        )
    except q.QueryError as e:
        print(f"aether earnings: {e.message}", file=sys.stderr)
        return 1
    sys.stdout.write(format_earnings(found, args.format))
    return 0


def run_usage(settings: Settings, args: argparse.Namespace) -> int:
    from projections import queries as q

    try:
        if args.lease is not None:
            leases: list[LeaseAccount] = [_query(settings, q.lease_account, args.lease)]
        else:
            leases = _query(settings, q.consumer_leases, args.consumer)
    except q.QueryError as e:
        print(f"aether usage: {e.message}", file=sys.stderr)
        return 1
    sys.stdout.write(format_leases(leases, args.format, single=args.lease is not None))
    return 0


# -- formats -----------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                str(c).ljust(w) if i == 0 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines) + "\n"


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def _amount(value: int | None) -> str:
    from ledger.money import format_amount

    return "-" if value is None else format_amount(value)


EARNINGS_COLUMNS = (
    "epoch",
    "status",
    "charged",
    "withheld",
    "fee",
    "earned",
    "uncovered",
    "charges",
    "planned_share",
    "payout_cumulative",
)


def format_earnings(found: ProviderEarnings, fmt: str) -> str:
    if fmt == "json":
        return found.model_dump_json(indent=2) + "\n"
    raw = [
        (
            e.epoch,
            e.status,
            e.charged,
            e.withheld,
            e.fee,
            e.earned,
            e.uncovered,
            e.charges_count,
            e.planned_provider_share,
            e.payout_cumulative,
        )
        for e in found.epochs
    ]
    if fmt == "csv":
        return _csv(
            ("provider_id", *EARNINGS_COLUMNS),
            [(found.provider_id, *("" if v is None else v for v in r)) for r in raw],
        )
    rows = [
        (str(r[0]), r[1], *(_amount(v) for v in r[2:7]), str(r[7]), _amount(r[8]), _amount(r[9]))
        for r in raw
    ]
    summary = [
        ("earned (provider share credited)", _amount(found.earned)),
        ("withheld (failed windows)", _amount(found.withheld)),
        ("protocol fee", _amount(found.fee)),
        ("settled (epochs settled)", _amount(found.settled)),
        ("in the latest payout root", _amount(found.payout_cumulative)),
        ("claimed", _amount(found.claimed)),
        ("claimable", _amount(found.claimable)),
        (
            "pending (recorded, not settled)",
            f"{found.pending.reports} reports, {found.pending.billable_s} s, "
            f"~{_amount(found.pending.amount_estimate)}",
        ),
        (
            "stake bonded / unbonding / slashed",
            f"{_amount(found.stake.bonded)} / {_amount(found.stake.unbonding)} / "
            f"{_amount(found.stake.slashed)} ({found.stake.slashes_count} slashes)",
        ),
    ]
    width = max(len(k) for k, _ in summary)
    head = f"provider {found.provider_id} ({found.operator_address or 'no address'})\n"
    body = "".join(f"  {k:<{width}}  {v}\n" for k, v in summary)
    return head + body + "\n" + _table(EARNINGS_COLUMNS, rows)


LEASE_COLUMNS = (
    "lease_id",
    "provider_id",
    "consumer_id",
    "reports",
    "billable_s",
    "gpu_seconds",
    "flops",
    "charged",
    "withheld",
    "fee",
    "uncovered",
    "refunded",
    "pending_reports",
    "pending_estimate",
)


def format_leases(leases: Sequence[LeaseAccount], fmt: str, *, single: bool = False) -> str:
    if fmt == "json":
        if single:
            return leases[0].model_dump_json(indent=2) + "\n"
        from pydantic import TypeAdapter

        from projections.queries import LeaseAccount

        adapter = TypeAdapter(list[LeaseAccount])
        return adapter.dump_json(list(leases), indent=2).decode() + "\n"
    raw = [
        (
            x.lease_id,
            x.provider_id,
            x.consumer_id,
            x.usage.reports,
            x.usage.billable_s,
            x.usage.gpu_seconds,
            x.usage.flops,
            x.charged,
            x.withheld,
            x.fee,
            x.uncovered,
            x.refunded,
            x.pending.reports,
            x.pending.amount_estimate,
        )
        for x in leases
    ]
    if fmt == "csv":
        return _csv(LEASE_COLUMNS, raw)
    rows = [
        (
            str(r[0]),
            str(r[1])[:8],
            str(r[2])[:8],
            *(str(v) for v in r[3:7]),
            *(_amount(v) for v in r[7:12]),
            str(r[12]),
            _amount(r[13]),
        )
        for r in raw
    ]
    return _table(LEASE_COLUMNS, rows)


# -- trial balance -------------------------------------------------------------------------------


def trial_balance_of_state(state: LedgerState) -> TrialBalance:
    from projections.queries import account_line, trial_balance_of

    return trial_balance_of(
        [account_line(a.id, a.asset, a.code, *a.balances()) for a in state.accounts.values()]
    )


TRIAL_BALANCE_COLUMNS = (
    "account_id",
    "asset",
    "code",
    "debits_pending",
    "debits_posted",
    "credits_pending",
    "credits_posted",
    "balance",
)


def format_trial_balance(balance: TrialBalance, fmt: str) -> str:
    """`fmt` csv or json (the table is `workers.report.print_accounts`)."""
    if fmt == "json":
        return balance.model_dump_json(indent=2) + "\n"
    return _csv(
        TRIAL_BALANCE_COLUMNS,
        [
            (
                a.account_id,
                a.asset,
                a.code_name,
                a.debits_pending,
                a.debits_posted,
                a.credits_pending,
                a.credits_posted,
                a.balance,
            )
            for a in balance.accounts
        ],
    )
