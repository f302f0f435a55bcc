"""The service processes `aether worker ...` starts: composition of the pieces from
Settings (the embedded defaults when nothing is configured)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Sequence
from uuid import UUID

from ledger.config import Settings
from ledger.usage import UsageApplication
from workers.bootstrap import open_market
from workers.broker import LEDGER_EVENTS, MARKETPLACE_EVENTS, USAGE_EVENTS, kafka_from
from workers.checker import Checker, CheckerRules
from workers.relay import Relay, Source

log = logging.getLogger(__name__)


def run_relay(settings: Settings, argv: Sequence[str]) -> int:
    """`aether worker relay`: publish the ledger's, the marketplace's and the usage logs to
    Kafka."""
    parser = argparse.ArgumentParser(prog="aether worker relay")
    parser.parse_args(argv)
    with open_market(settings) as market, kafka_from(settings.kafka_bootstrap_servers) as kafka:
        datastore = market.ledger.app.app_recorder.datastore
        usage = UsageApplication(datastore, env=market.ledger.app.env)
        relay = Relay(
            datastore,
            [
                Source(market.ledger.app, LEDGER_EVENTS.name),
                Source(market.app, MARKETPLACE_EVENTS.name),
                Source(usage, USAGE_EVENTS.name),
            ],
            kafka,
        )
        log.info("relay: publishing the ledger, marketplace and usage logs to %s", kafka)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(relay.run())
    return 0


def run_checker(settings: Settings, argv: Sequence[str]) -> int:
    """`aether worker checker --checker-id UUID`: judge every listed node from its reports."""
    parser = argparse.ArgumentParser(prog="aether worker checker")
    parser.add_argument("--checker-id", type=UUID, required=True)
    parser.add_argument("--heartbeat-interval-s", type=int, default=60)
    parser.add_argument("--uptime-ppm-min", type=int, default=900_000)
    args = parser.parse_args(argv)
    with open_market(settings) as market, kafka_from(settings.kafka_bootstrap_servers) as kafka:
        if args.checker_id not in market.service.state.verdicts.checkers:
            parser.error(f"checker {args.checker_id} is not registered")
        nodes = dict(market.service.state.node_provider)
        checker = Checker(
            args.checker_id,
            nodes,
            kafka,
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
