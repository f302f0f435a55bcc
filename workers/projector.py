"""The projector: keeps every read model up to date with the logs, exactly once.

Each view has its own tracking (its position is written in the same transaction as its
rows), so the projector can stop at any moment, run in several processes at once (a page
one of them applied is refused to the others, which read on), and be restarted: it
continues where the view stands. A view is rebuilt by pointing a projection at an empty
schema (`rebuild_into`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ledger.market.store import MarketplaceApplication
from ledger.settlement import SettlementApplication
from ledger.store import LedgerApplication
from ledger.usage import UsageApplication
from projections.balances import BalancesProjection
from projections.earnings import (
    EarningsProjection,
    EarningsSettlementProjection,
    EarningsUsageProjection,
)
from projections.leases import LeasesProjection
from projections.orderbook import OrderBookProjection
from projections.providers import ProvidersProjection
from projections.reputation import ReputationProjection

log = logging.getLogger(__name__)

FOLLOW_INTERVAL_S = 0.5
"""Pause between two catch-ups when following the logs."""


@dataclass
class Views:
    """Every read model: the ledger's balances and the marketplace's four views."""

    balances: BalancesProjection
    orderbook: OrderBookProjection
    providers: ProvidersProjection
    leases: LeasesProjection
    reputation: ReputationProjection
    earnings: EarningsProjection
    earnings_settlement: EarningsSettlementProjection
    earnings_usage: EarningsUsageProjection

    def all(
        self,
    ) -> dict[
        str,
        BalancesProjection
        | OrderBookProjection
        | ProvidersProjection
        | LeasesProjection
        | ReputationProjection
        | EarningsProjection
        | EarningsSettlementProjection
        | EarningsUsageProjection,
    ]:
        return {
            "balances": self.balances,
            "orderbook": self.orderbook,
            "providers": self.providers,
            "leases": self.leases,
            "reputation": self.reputation,
            "earnings": self.earnings,
            "earnings_settlement": self.earnings_settlement,
            "earnings_usage": self.earnings_usage,
        }

    def catch_up(self) -> dict[str, int]:
        """Apply what each log holds beyond each view's position; events applied per view."""
        return {name: view.catch_up() for name, view in self.all().items()}

    def positions(self) -> dict[str, int]:
        return {name: view.position() for name, view in self.all().items()}

    def state_hashes(self) -> dict[str, str]:
        return {name: view.state_hash() for name, view in self.all().items()}

    def follow(self, *, rounds_max: int | None = None) -> None:
        """Catch up, pause, again (for ever, or `rounds_max` times)."""
        rounds = 0
        while rounds_max is None or rounds < rounds_max:
            applied = self.catch_up()
            if any(applied.values()):
                log.info("projected %s", applied)
            rounds += 1
            time.sleep(FOLLOW_INTERVAL_S)


@contextmanager
def open_views(ledger: LedgerApplication, market: MarketplaceApplication) -> Iterator[Views]:
    """Every view in the logs' own schema (their tables are created if missing)."""
    views = Views(
        balances=BalancesProjection(ledger),
        orderbook=OrderBookProjection(market),
        providers=ProvidersProjection(market),
        leases=LeasesProjection(market),
        reputation=ReputationProjection(market),
        earnings=EarningsProjection(market),
        earnings_settlement=EarningsSettlementProjection(
            SettlementApplication(market.app_recorder.datastore, env=market.env)
        ),
        earnings_usage=EarningsUsageProjection(
            UsageApplication(market.app_recorder.datastore, env=market.env)
        ),
    )
    try:
        yield views
    finally:
        for view in views.all().values():
            view.close()
