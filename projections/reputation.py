"""Provider reputation: the inputs of `domain.verdicts.reputation`, kept from the log.

The view stores what the formula reads, and nothing it computes: each provider's
registration time (`ProviderRegistered`), every decided node-window (`QuorumPassed`,
`QuorumFailed`, with their medians; `QuorumNotReached` counts for nothing and is not
kept), and every stake slash (`StakeSlashed`). A query rebuilds `ProviderHistory` from the
rows and calls the documented formula (`domain.verdicts.reputation`) at the `now` it is
given, so anyone can recompute a score from the log, and the view's state (and its hash)
does not depend on the clock.

Tables (schema of the view recorder):

- `market_reputation_providers`: provider_id, registered_at.
- `market_reputation_decisions`: one row per decided (node_id, window_start): provider, outcome
  (`passed`), window_end, verdicts_count, failure kind and slash kind (failed windows),
  the failing / agreeing / contradicting checker ids, uptime_ppm_median,
  latency_ms_p99_median, decided_at.
- `market_reputation_slashes`: one row per `StakeSlashed`, keyed by its log position, with every
  field of the fact (amounts NUMERIC(78,0)).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Composable

from domain import verdicts
from domain.providers import ProviderRegistered
from domain.stake import SlashKind, StakeSlashed, UnbondingSlash
from domain.verdicts import (
    Decision,
    FailureKind,
    ProviderHistory,
    QuorumFailed,
    QuorumPassed,
    ReputationScore,
    VerdictRules,
)
from projections.view import (
    MarketProjection,
    MarketProjectionError,
    MarketViewRecorder,
    Page,
    table,
)

VIEW_NAME = "market_reputation"
"""Name of the view: the prefix of its tracking table."""
PROVIDERS_TABLE_NAME = "market_reputation_providers"
DECISIONS_TABLE_NAME = "market_reputation_decisions"
SLASHES_TABLE_NAME = "market_reputation_slashes"


class ReputationRecorder(MarketViewRecorder):
    """The reputation view's tables and its tracking table; every write is tracked."""

    view_name = VIEW_NAME
    fact_types = (ProviderRegistered, QuorumPassed, QuorumFailed, StakeSlashed)
    tables = (
        table(
            PROVIDERS_TABLE_NAME,
            ("provider_id",),
            provider_id="uuid NOT NULL",
            registered_at="timestamptz NOT NULL",
            updated_position="bigint NOT NULL",
        ),
        table(
            DECISIONS_TABLE_NAME,
            ("node_id", "window_start"),
            indexes=(("provider_id",),),
            node_id="uuid NOT NULL",
            window_start="timestamptz NOT NULL",
            provider_id="uuid NOT NULL",
            passed="boolean NOT NULL",
            window_end="timestamptz NOT NULL",
            verdicts_count="int NOT NULL",
            kind="smallint",
            slash_kind="smallint",
            failing_checker_ids="uuid[] NOT NULL",
            agreeing_checker_ids="uuid[] NOT NULL",
            contradicting_checker_ids="uuid[] NOT NULL",
            uptime_ppm_median="bigint NOT NULL",
            latency_ms_p99_median="bigint NOT NULL",
            decided_at="timestamptz NOT NULL",
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
            amount_sized="numeric(78,0) NOT NULL",
            amount="numeric(78,0) NOT NULL",
            from_bonded="numeric(78,0) NOT NULL",
            from_unbonding_ids="int[] NOT NULL",
            from_unbonding_amounts="numeric(78,0)[] NOT NULL",
            offence_at="timestamptz NOT NULL",
            slashed_at="timestamptz NOT NULL",
        ),
    )

    # -- writing ----------------------------------------------------------------------------

    def _apply_page(self, curs: Cursor[DictRow], events: Page) -> None:
        for position, event in events:
            fact = event.fact
            if isinstance(fact, ProviderRegistered):
                row: dict[str, Any] = {
                    "provider_id": fact.provider_id,
                    "registered_at": fact.registered_at,
                    "updated_position": position,
                }
                if not self.insert(curs, PROVIDERS_TABLE_NAME, row):
                    raise MarketProjectionError(
                        f"notification {position}: provider {fact.provider_id} registered twice"
                    )
            elif isinstance(fact, QuorumPassed | QuorumFailed):
                failed = isinstance(fact, QuorumFailed)
                row = {
                    "node_id": fact.node_id,
                    "window_start": fact.window_start,
                    "provider_id": fact.provider_id,
                    "passed": not failed,
                    "window_end": fact.window_end,
                    "verdicts_count": fact.verdicts_count,
                    "kind": int(fact.kind) if isinstance(fact, QuorumFailed) else None,
                    "slash_kind": int(fact.slash_kind) if isinstance(fact, QuorumFailed) else None,
                    "failing_checker_ids": list(fact.failing_checker_ids),
                    "agreeing_checker_ids": list(fact.agreeing_checker_ids),
                    "contradicting_checker_ids": list(fact.contradicting_checker_ids),
                    "uptime_ppm_median": fact.uptime_ppm_median,
                    "latency_ms_p99_median": fact.latency_ms_p99_median,
                    "decided_at": fact.decided_at,
                    "updated_position": position,
                }
                if not self.insert(curs, DECISIONS_TABLE_NAME, row):
                    raise MarketProjectionError(
                        f"notification {position}: window {fact.window_start.isoformat()} of "
                        f"node {fact.node_id} decided twice"
                    )
            else:
                assert isinstance(fact, StakeSlashed)
                row = {
                    "position": position,
                    "provider_id": fact.provider_id,
                    "kind": int(fact.kind),
                    "gpu_model": fact.gpu_model,
                    "gpu_count": fact.gpu_count,
                    "amount_sized": fact.amount_sized,
                    "amount": fact.amount,
                    "from_bonded": fact.from_bonded,
                    "from_unbonding_ids": [p.unbond_id for p in fact.from_unbonding],
                    "from_unbonding_amounts": [p.amount for p in fact.from_unbonding],
                    "offence_at": fact.offence_at,
                    "slashed_at": fact.slashed_at,
                }
                if not self.insert(curs, SLASHES_TABLE_NAME, row):
                    raise MarketProjectionError(f"notification {position}: slash stored twice")

    # -- queries ----------------------------------------------------------------------------

    def _histories(
        self, curs: Cursor[DictRow], where: Composable | None, params: Sequence[Any]
    ) -> list[ProviderHistory]:
        providers = self.select(curs, PROVIDERS_TABLE_NAME, where, params)
        decisions = self.select(
            curs, DECISIONS_TABLE_NAME, where, params, order_by=("window_start", "node_id")
        )
        slashes = self.select(curs, SLASHES_TABLE_NAME, where, params)
        by_provider: dict[UUID, tuple[list[Decision], list[StakeSlashed]]] = {
            p["provider_id"]: ([], []) for p in providers
        }
        for d in decisions:
            if d["provider_id"] in by_provider:
                by_provider[d["provider_id"]][0].append(_decision(d))
        for s in slashes:
            if s["provider_id"] in by_provider:
                by_provider[s["provider_id"]][1].append(_slash(s))
        return [
            ProviderHistory(
                provider_id=p["provider_id"],
                registered_at=p["registered_at"],
                decisions=tuple(by_provider[p["provider_id"]][0]),
                slashes=tuple(by_provider[p["provider_id"]][1]),
            )
            for p in providers
        ]

    def history(self, provider_id: UUID) -> ProviderHistory | None:
        """What the provider's reputation is computed from (decisions by window start then
        node, slashes in log order), or None if it never registered."""
        with self.datastore.transaction() as curs:
            found = self._histories(curs, SQL("provider_id = %s"), (provider_id,))
        return found[0] if found else None

    def histories(self) -> list[ProviderHistory]:
        """The history of every registered provider, by provider id."""
        with self.datastore.transaction() as curs:
            return self._histories(curs, None, ())

    def reputation(
        self, provider_id: UUID, now: datetime, rules: VerdictRules | None = None
    ) -> ReputationScore | None:
        """`domain.verdicts.reputation` of the stored history at `now` (None if the provider
        never registered). `rules` defaults to `VerdictRules()`."""
        history = self.history(provider_id)
        if history is None:
            return None
        return verdicts.reputation(history, now, rules or VerdictRules())

    def reputations(
        self, now: datetime, rules: VerdictRules | None = None
    ) -> dict[UUID, ReputationScore]:
        """`domain.verdicts.reputations` of every registered provider at `now`."""
        return verdicts.reputations(self.histories(), now, rules or VerdictRules())


def _decision(row: dict[str, Any]) -> Decision:
    checkers = {
        name: tuple(row[name])
        for name in ("failing_checker_ids", "agreeing_checker_ids", "contradicting_checker_ids")
    }
    common: dict[str, Any] = {
        "node_id": row["node_id"],
        "provider_id": row["provider_id"],
        "window_start": row["window_start"],
        "window_end": row["window_end"],
        "verdicts_count": row["verdicts_count"],
        **checkers,
        "uptime_ppm_median": row["uptime_ppm_median"],
        "latency_ms_p99_median": row["latency_ms_p99_median"],
        "decided_at": row["decided_at"],
    }
    if row["passed"]:
        return QuorumPassed(**common)
    return QuorumFailed(
        **common, kind=FailureKind(row["kind"]), slash_kind=SlashKind(row["slash_kind"])
    )


def _slash(row: dict[str, Any]) -> StakeSlashed:
    ids, amounts = row["from_unbonding_ids"], row["from_unbonding_amounts"]
    if len(ids) != len(amounts):
        raise MarketProjectionError(f"slash at {row['position']}: unbonding parts differ")
    return StakeSlashed(
        provider_id=row["provider_id"],
        kind=SlashKind(row["kind"]),
        gpu_model=row["gpu_model"],
        gpu_count=row["gpu_count"],
        amount_sized=row["amount_sized"],
        amount=row["amount"],
        from_bonded=row["from_bonded"],
        from_unbonding=tuple(UnbondingSlash(i, a) for i, a in zip(ids, amounts, strict=True)),
        offence_at=row["offence_at"],
        slashed_at=row["slashed_at"],
    )


class ReputationProjection(MarketProjection[ReputationRecorder]):
    """Keeps the reputation inputs up to date with the marketplace log, a page at a time."""

    name = VIEW_NAME

    @classmethod
    def recorder_class(cls) -> type[ReputationRecorder]:
        return ReputationRecorder

    def history(self, provider_id: UUID) -> ProviderHistory | None:
        return self.view.history(provider_id)

    def histories(self) -> list[ProviderHistory]:
        return self.view.histories()

    def reputation(
        self, provider_id: UUID, now: datetime, rules: VerdictRules | None = None
    ) -> ReputationScore | None:
        return self.view.reputation(provider_id, now, rules)

    def reputations(
        self, now: datetime, rules: VerdictRules | None = None
    ) -> dict[UUID, ReputationScore]:
        return self.view.reputations(now, rules)
