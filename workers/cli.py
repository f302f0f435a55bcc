"""`aether`: the single entry point for every process and report."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from datetime import datetime

from pydantic import ValidationError

from ledger.config import Settings
from ledger.errors import LedgerError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aether",
        description="aether-ledger: event-sourced settlement and ledger for GPU compute markets.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="run the demo on the embedded default (or DATABASE_URL) and print balances"
    )
    demo.set_defaults(run=_run_demo)

    balances = commands.add_parser(
        "trial-balance", help="print every account and the trial balance"
    )
    balances.add_argument(
        "--as-of-position", type=_position, default=None, metavar="N", help="a log position"
    )
    balances.add_argument(
        "--as-of-time",
        type=_aware_time,
        default=None,
        metavar="TIME",
        help="ISO 8601 time with offset, e.g. 2026-11-23T18:00:00+00:00",
    )
    balances.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="default: table"
    )
    balances.set_defaults(run=_run_trial_balance)

    project = commands.add_parser(
        "project",
        help="bring every read model (balances, order book, providers, leases, reputation, "
        "earnings) "
        "up to date with the logs, exactly once",
    )
    project.add_argument(
        "--follow", action="store_true", help="keep following the logs until interrupted"
    )
    project.set_defaults(run=_run_project)

    from workers.replay import add_parser as add_replay_parser

    add_replay_parser(commands)

    reconcile = commands.add_parser(
        "reconcile",
        help="reconcile a settled epoch: ledger vs settlement log vs chain (ETH_RPC_URL)",
    )
    reconcile.add_argument("--epoch", type=int, required=True, metavar="N")
    reconcile.add_argument("--csv", action="store_true", help="CSV instead of a table")
    reconcile.set_defaults(run=_run_reconcile)

    worker = commands.add_parser(
        "worker",
        help="run a service process: gpu (a lease's workload, metered), checker, ingest, relay, "
        "settle",
        add_help=False,
    )
    worker.add_argument(
        "kind", choices=["gpu", "checker", "ingest", "relay", "settle"], metavar="KIND"
    )
    worker.add_argument("options", nargs=argparse.REMAINDER)
    worker.set_defaults(run=_run_worker)

    from workers.audit import add_parser as add_audit_parser

    add_audit_parser(commands)

    from workers.queries_cli import add_parser as add_queries_parser

    add_queries_parser(commands)

    from workers.up import add_parser as add_up_parser

    add_up_parser(commands)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings()
    except ValidationError as e:
        print(f"aether: invalid configuration:\n{e}", file=sys.stderr)
        return 2
    try:
        code: int = args.run(settings, args)
    except LedgerError as e:
        print(f"aether: {e}", file=sys.stderr)
        return 1
    return code


def _position(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a log position: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a log position is >= 0, got {value}")
    return value


def _aware_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give the time with its offset, e.g. {text}+00:00")
    return value


def _run_demo(settings: Settings, args: argparse.Namespace) -> int:
    from workers.demo import run_demo

    return run_demo(settings)


def _run_trial_balance(settings: Settings, args: argparse.Namespace) -> int:
    from ledger.queries import state_as_of
    from workers.bootstrap import open_ledger
    from workers.report import print_accounts

    with open_ledger(settings) as ledger:
        if args.as_of_position is None and args.as_of_time is None:
            state = ledger.writer.state
        else:
            state = state_as_of(
                ledger.app,
                shard=settings.ledger_shard,
                position=args.as_of_position,
                at=args.as_of_time,
            )
        if args.format != "table":
            from workers.queries_cli import format_trial_balance, trial_balance_of_state

            found = trial_balance_of_state(state)
            sys.stdout.write(format_trial_balance(found, args.format))
            return 0 if found.balanced else 3
        balanced = print_accounts(state, names={})
    return 0 if balanced else 3


def _run_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    from ledger.settlement import SettlementApplication, SettlementLog, ledger_at_settlement
    from workers.bootstrap import open_market
    from workers.reconcile import reconcile

    with open_market(settings) as market:
        datastore = market.ledger.app.app_recorder.datastore
        log = SettlementLog(SettlementApplication(datastore, env=market.ledger.app.env))
        log.refresh()
        record = log.epochs.get(args.epoch)
        if record is None or record.settled is None:
            known = ", ".join(str(n) for n in sorted(log.epochs)) or "none"
            print(f"aether: epoch {args.epoch} is not settled (settled: {known})", file=sys.stderr)
            return 2
        reader = None
        if settings.eth_rpc_url:
            from workers.chain import ChainReader, open_chain

            reader = ChainReader(open_chain(settings))
        else:
            print("(no ETH_RPC_URL: the chain column is left out)", file=sys.stderr)
        at = ledger_at_settlement(market.ledger.app, settings.ledger_shard, record.settled)
        report = reconcile(args.epoch, market.service, log, at, market.ledger.writer.state, reader)
        print(report.csv() if args.csv else report.table(), end="" if args.csv else "\n")
        return 1 if report.flagged else 0


def _run_project(settings: Settings, args: argparse.Namespace) -> int:
    from workers.bootstrap import open_market
    from workers.projector import open_views

    with open_market(settings) as market, open_views(market.ledger.app, market.app) as views:
        if args.follow:
            with contextlib.suppress(KeyboardInterrupt):
                views.follow()
        applied = views.catch_up()
        positions = views.positions()
        hashes = views.state_hashes()
        print(f"{'view':<20} {'applied':>8} {'position':>9}  state hash")
        for name in applied:
            print(f"{name:<20} {applied[name]:>8} {positions[name]:>9}  {hashes[name][:16]}")
    return 0


def _run_worker(settings: Settings, args: argparse.Namespace) -> int:
    if args.kind == "gpu":
        from workers.gpu_worker import main as gpu_main

        return gpu_main(args.options)
    if args.kind == "ingest":
        from workers.ingest import main as ingest_main

        ingest_main(args.options)
        return 0
    from workers.processes import run_checker, run_relay, run_settle

    if args.kind == "relay":
        return run_relay(settings, args.options)
    if args.kind == "settle":
        return run_settle(settings, args.options)
    return run_checker(settings, args.options)


if __name__ == "__main__":
    sys.exit(main())
