"""The service processes `aether worker ...` starts: composition of the pieces from
Settings (the embedded defaults when nothing is configured)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Sequence
from uuid import UUID

from domain.settlement import SettlementRules
from ledger.config import Settings
from ledger.settlement import SettlementApplication, SettlementLog
from ledger.usage import UsageApplication
from workers.bootstrap import open_market
from workers.broker import (
    LEDGER_EVENTS,
    MARKETPLACE_EVENTS,
    SETTLEMENT_EVENTS,
    USAGE_EVENTS,
    kafka_from,
)
from workers.checker import Checker, CheckerRules
from workers.relay import Relay, Source
from workers.spotcheck import SAMPLE_PPM_DEFAULT, SpotChecker

log = logging.getLogger(__name__)


def run_relay(settings: Settings, argv: Sequence[str]) -> int:
    """`aether worker relay`: publish the ledger's, the marketplace's, the usage and the
    settlement logs to Kafka."""
    parser = argparse.ArgumentParser(prog="aether worker relay")
    parser.parse_args(argv)
    with open_market(settings) as market, kafka_from(settings.kafka_bootstrap_servers) as kafka:
        datastore = market.ledger.app.app_recorder.datastore
        usage = UsageApplication(datastore, env=market.ledger.app.env)
        settlement = SettlementApplication(datastore, env=market.ledger.app.env)
        relay = Relay(
            datastore,
            [
                Source(market.ledger.app, LEDGER_EVENTS.name),
                Source(market.app, MARKETPLACE_EVENTS.name),
                Source(usage, USAGE_EVENTS.name),
                Source(settlement, SETTLEMENT_EVENTS.name),
            ],
            kafka,
        )
        log.info(
            "relay: publishing the ledger, marketplace, usage and settlement logs to %s", kafka
        )
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(relay.run())
    return 0


def run_checker(settings: Settings, argv: Sequence[str]) -> int:
    """`aether worker checker --checker-id UUID`: judge every listed node from its reports."""
    parser = argparse.ArgumentParser(prog="aether worker checker")
    parser.add_argument("--checker-id", type=UUID, required=True)
    parser.add_argument("--heartbeat-interval-s", type=int, default=60)
    parser.add_argument("--uptime-ppm-min", type=int, default=900_000)
    parser.add_argument(
        "--spot-check-ppm",
        type=int,
        default=SAMPLE_PPM_DEFAULT,
        help="share of usage reports re-run to check their FLOPs, in parts per million (0: none)",
    )
    args = parser.parse_args(argv)
    with open_market(settings) as market, kafka_from(settings.kafka_bootstrap_servers) as kafka:
        if args.checker_id not in market.service.state.verdicts.checkers:
            parser.error(f"checker {args.checker_id} is not registered")
        nodes = dict(market.service.state.node_provider)
        checker = Checker(
            args.checker_id,
            nodes,
            kafka,
            spot_checker=SpotChecker(args.spot_check_ppm) if args.spot_check_ppm else None,
            rules=CheckerRules(
                heartbeat_interval_s=args.heartbeat_interval_s,
                uptime_ppm_min=args.uptime_ppm_min,
            ),
            verdict_rules=market.service.rules.verdicts,
        )
        log.info("checker %s: judging %d nodes from %s", args.checker_id, len(nodes), kafka)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(checker.run())
    return 0


def run_settle(settings: Settings, argv: Sequence[str]) -> int:
    """`aether worker settle [--epoch N ...] [--follow]`: settle the due epochs (or the given
    ones), safe to re-run; with ETH_RPC_URL, post each epoch's payout root on chain."""
    from workers.settle import Settler, add_arguments, run

    parser = argparse.ArgumentParser(prog="aether worker settle")
    add_arguments(parser)
    args = parser.parse_args(argv)
    gateway = None
    if settings.eth_rpc_url:
        from workers.chain import PayoutGateway, open_chain

        gateway = PayoutGateway(open_chain(settings))
    with open_market(settings) as market:
        datastore = market.ledger.app.app_recorder.datastore
        env = market.ledger.app.env
        settler = Settler(
            market.service,
            UsageApplication(datastore, env=env),
            SettlementLog(SettlementApplication(datastore, env=env)),
            rules=SettlementRules(epoch_s=args.epoch_s, posting=market.service.rules.postings),
            gateway=gateway,
        )
        with contextlib.suppress(KeyboardInterrupt):
            return run(
                settler,
                follow=args.follow,
                poll_s=args.poll_s,
                epochs=args.epoch,
                tick=not args.no_tick,
            )
    return 0
