"""Providers, their nodes and their stake: a read model kept from the marketplace log.

Each row is the state the domain's own appliers give: a page loads the providers and stakes
it touches, folds each fact into them with `domain.providers.apply` and `domain.stake.apply`
(their assertions included), and writes back what changed. So a provider's rows equal
`domain.providers.replay(facts)` and `domain.stake.replay(provider_id, facts)` by
construction (the tests compare them).

Tables (schema of the view recorder):

- `market_providers`: one row per registered provider: operator address, registered_at,
  deregistered_at (null while registered).
- `market_provider_nodes`: one row per node ever listed, with its place in the provider's listing
  order and whether it is still listed.
- `market_provider_stakes`: one row per provider with stake facts: bonded, unbonding (the sum of
  the pending entries), released, slashed, bonded_total, unbond requests so far. Stake is
  its own fact stream (`domain.stake`), so a row may exist before registration.
- `market_provider_unbonding`: the pending unbonding entries (what slashes left of them).

Amounts are NUMERIC(78,0), Python ints, in the token's smallest unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Composable, Literal

from domain import providers as provider_rules
from domain import stake as stake_rules
from domain.providers import (
    Node,
    NodeDelisted,
    NodeListed,
    Provider,
    ProviderDeregistered,
    ProviderRegistered,
)
from domain.stake import (
    ProviderStake,
    StakeBonded,
    StakeSlashed,
    UnbondCompleted,
    UnbondingEntry,
    UnbondRequested,
)
from projections.view import (
    ROWS_LISTED_MAX,
    MarketProjection,
    MarketProjectionError,
    MarketViewRecorder,
    Page,
    table,
)

VIEW_NAME = "market_providers"
"""Name of the view: the prefix of its tracking table."""
PROVIDERS_TABLE_NAME = "market_providers"
NODES_TABLE_NAME = "market_provider_nodes"
STAKES_TABLE_NAME = "market_provider_stakes"
UNBONDING_TABLE_NAME = "market_provider_unbonding"

_PROVIDER_FACTS = (ProviderRegistered, NodeListed, NodeDelisted, ProviderDeregistered)
_STAKE_FACTS = (StakeBonded, UnbondRequested, UnbondCompleted, StakeSlashed)


@dataclass(frozen=True, slots=True)
class ProviderRow:
    """A provider with its stake totals (0 without stake facts)."""

    provider_id: UUID
    operator_address: str
    registered_at: datetime
    deregistered_at: datetime | None
    stake_bonded: int
    stake_unbonding: int
    """Sum of the pending unbonding entries (still slashable)."""
    stake_released: int
    stake_slashed: int
    updated_position: int
    """Notification id of the last provider or stake fact that changed these rows."""

    @property
    def deregistered(self) -> bool:
        return self.deregistered_at is not None


@dataclass(frozen=True, slots=True)
class NodeRow:
    """A node a provider listed."""

    provider_id: UUID
    node_id: UUID
    listing_index: int
    """0, 1, 2... in the provider's listing order."""
    gpu_model: str
    gpu_count: int
    gpu_memory_mib: int
    region: str
    public_key: str
    listed: bool
    """False once delisted (a delisted node's id is never reused)."""
    updated_position: int


class ProvidersRecorder(MarketViewRecorder):
    """The providers view's tables and its tracking table; every write is tracked."""

    view_name = VIEW_NAME
    fact_types = (*_PROVIDER_FACTS, *_STAKE_FACTS)
    tables = (
        table(
            PROVIDERS_TABLE_NAME,
            ("provider_id",),
            provider_id="uuid NOT NULL",
            operator_address="text NOT NULL",
            registered_at="timestamptz NOT NULL",
            deregistered_at="timestamptz",
            updated_position="bigint NOT NULL",
        ),
        table(
            NODES_TABLE_NAME,
            ("provider_id", "node_id"),
            indexes=(("node_id",), ("gpu_model",)),
            provider_id="uuid NOT NULL",
            node_id="uuid NOT NULL",
            listing_index="int NOT NULL",
            gpu_model="text NOT NULL",
            gpu_count="int NOT NULL",
            gpu_memory_mib="bigint NOT NULL",
            region="text NOT NULL",
            public_key="text NOT NULL",
            listed="boolean NOT NULL",
            updated_position="bigint NOT NULL",
        ),
        table(
            STAKES_TABLE_NAME,
            ("provider_id",),
            provider_id="uuid NOT NULL",
            bonded="numeric(78,0) NOT NULL",
            unbonding="numeric(78,0) NOT NULL",
            released="numeric(78,0) NOT NULL",
            slashed="numeric(78,0) NOT NULL",
            bonded_total="numeric(78,0) NOT NULL",
            unbond_requests_count="int NOT NULL",
            updated_position="bigint NOT NULL",
        ),
        table(
            UNBONDING_TABLE_NAME,
            ("provider_id", "unbond_id"),
            provider_id="uuid NOT NULL",
            unbond_id="int NOT NULL",
            amount="numeric(78,0) NOT NULL CHECK (amount > 0)",
            requested_at="timestamptz NOT NULL",
            available_at="timestamptz NOT NULL",
        ),
    )

    # -- writing ----------------------------------------------------------------------------

    def _apply_page(self, curs: Cursor[DictRow], events: Page) -> None:
        provider_facts = [(p, e.fact) for p, e in events if isinstance(e.fact, _PROVIDER_FACTS)]
        stake_facts = [(p, e.fact) for p, e in events if isinstance(e.fact, _STAKE_FACTS)]
        if provider_facts:
            self._apply_provider_facts(curs, provider_facts)
        if stake_facts:
            self._apply_stake_facts(curs, stake_facts)

    def _apply_provider_facts(
        self, curs: Cursor[DictRow], facts: Sequence[tuple[int, provider_rules.Fact]]
    ) -> None:
        ids = sorted({f.provider_id for _, f in facts})
        states: dict[UUID, Provider | None] = dict.fromkeys(ids)
        states.update(self._providers(curs, ids))
        changed: dict[UUID, int] = {}
        nodes_changed: dict[tuple[UUID, UUID], int] = {}
        for position, fact in facts:
            try:
                states[fact.provider_id] = provider_rules.apply(states[fact.provider_id], fact)
            except AssertionError as e:
                raise MarketProjectionError(
                    f"notification {position}: {type(fact).__name__} does not apply to "
                    f"provider {fact.provider_id}: {e}"
                ) from e
            changed[fact.provider_id] = position
            if isinstance(fact, ProviderRegistered):
                node_ids = [n.node_id for n in fact.nodes]
            elif isinstance(fact, NodeListed):
                node_ids = [fact.node.node_id]
            elif isinstance(fact, NodeDelisted):
                node_ids = [fact.node_id]
            else:
                node_ids = []
            nodes_changed.update({(fact.provider_id, n): position for n in node_ids})
        provider_rows: list[dict[str, Any]] = []
        for provider_id, position in changed.items():
            state = states[provider_id]
            assert state is not None
            provider_rows.append(
                {
                    "provider_id": provider_id,
                    "operator_address": state.operator_address,
                    "registered_at": state.registered_at,
                    "deregistered_at": state.deregistered_at,
                    "updated_position": position,
                }
            )
        node_rows: list[dict[str, Any]] = []
        for (provider_id, node_id), position in nodes_changed.items():
            state = states[provider_id]
            assert state is not None
            matches = [(i, n) for i, n in enumerate(state.nodes) if n.node_id == node_id]
            if len(matches) != 1:
                raise MarketProjectionError(
                    f"notification {position}: provider {provider_id} lists node {node_id} "
                    f"{len(matches)} times"
                )
            index, node = matches[0]
            node_rows.append(
                {
                    "provider_id": provider_id,
                    "node_id": node_id,
                    "listing_index": index,
                    "gpu_model": node.gpu_model,
                    "gpu_count": node.gpu_count,
                    "gpu_memory_mib": node.gpu_memory_mib,
                    "region": node.region,
                    "public_key": node.public_key,
                    "listed": node_id not in state.delisted,
                    "updated_position": position,
                }
            )
        self.upsert(curs, PROVIDERS_TABLE_NAME, provider_rows)
        self.upsert(curs, NODES_TABLE_NAME, node_rows)

    def _apply_stake_facts(
        self, curs: Cursor[DictRow], facts: Sequence[tuple[int, stake_rules.Fact]]
    ) -> None:
        ids = sorted({f.provider_id for _, f in facts})
        states = {i: ProviderStake(i) for i in ids}
        states.update(self._stakes(curs, ids))
        changed: dict[UUID, int] = {}
        for position, fact in facts:
            try:
                states[fact.provider_id] = stake_rules.apply(states[fact.provider_id], fact)
            except AssertionError as e:
                raise MarketProjectionError(
                    f"notification {position}: {type(fact).__name__} does not apply to the "
                    f"stake of provider {fact.provider_id}: {e}"
                ) from e
            changed[fact.provider_id] = position
        stake_rows: list[dict[str, Any]] = []
        entry_rows: list[dict[str, Any]] = []
        for provider_id, position in changed.items():
            s = states[provider_id]
            stake_rows.append(
                {
                    "provider_id": provider_id,
                    "bonded": s.bonded,
                    "unbonding": s.unbonding_total,
                    "released": s.released,
                    "slashed": s.slashed,
                    "bonded_total": s.bonded_total,
                    "unbond_requests_count": s.unbond_requests_count,
                    "updated_position": position,
                }
            )
            entry_rows.extend(
                {
                    "provider_id": provider_id,
                    "unbond_id": e.unbond_id,
                    "amount": e.amount,
                    "requested_at": e.requested_at,
                    "available_at": e.available_at,
                }
                for e in s.unbonding
            )
        curs.execute(
            SQL("DELETE FROM {} WHERE provider_id = ANY(%s)").format(
                self.table_sql(UNBONDING_TABLE_NAME)
            ),
            (list(changed),),
        )
        self.upsert(curs, STAKES_TABLE_NAME, stake_rows)
        self.upsert(curs, UNBONDING_TABLE_NAME, entry_rows)

    # -- reading the domain's state back --------------------------------------------------

    def _providers(self, curs: Cursor[DictRow], ids: Sequence[UUID]) -> dict[UUID, Provider]:
        where = SQL("provider_id = ANY(%s)")
        rows = self.select(curs, PROVIDERS_TABLE_NAME, where, (list(ids),))
        nodes = self.select(
            curs, NODES_TABLE_NAME, where, (list(ids),), order_by=("provider_id", "listing_index")
        )
        found: dict[UUID, Provider] = {}
        for row in rows:
            mine = [n for n in nodes if n["provider_id"] == row["provider_id"]]
            found[row["provider_id"]] = Provider(
                provider_id=row["provider_id"],
                operator_address=row["operator_address"],
                registered_at=row["registered_at"],
                nodes=tuple(_node(n) for n in mine),
                delisted=frozenset(n["node_id"] for n in mine if not n["listed"]),
                deregistered_at=row["deregistered_at"],
            )
        return found

    def _stakes(self, curs: Cursor[DictRow], ids: Sequence[UUID]) -> dict[UUID, ProviderStake]:
        where = SQL("provider_id = ANY(%s)")
        rows = self.select(curs, STAKES_TABLE_NAME, where, (list(ids),))
        entries = self.select(curs, UNBONDING_TABLE_NAME, where, (list(ids),))
        found: dict[UUID, ProviderStake] = {}
        for row in rows:
            unbonding = tuple(
                UnbondingEntry(e["unbond_id"], e["amount"], e["requested_at"], e["available_at"])
                for e in entries
                if e["provider_id"] == row["provider_id"]
            )
            state = ProviderStake(
                provider_id=row["provider_id"],
                bonded=row["bonded"],
                unbonding=unbonding,
                released=row["released"],
                slashed=row["slashed"],
                bonded_total=row["bonded_total"],
                unbond_requests_count=row["unbond_requests_count"],
            )
            assert state.unbonding_total == row["unbonding"]
            found[row["provider_id"]] = state
        return found

    # -- queries ----------------------------------------------------------------------------

    def provider_state(self, provider_id: UUID) -> Provider | None:
        """The provider as `domain.providers.replay` gives it, or None if not registered."""
        with self.datastore.transaction() as curs:
            return self._providers(curs, [provider_id]).get(provider_id)

    def stake_state(self, provider_id: UUID) -> ProviderStake | None:
        """The stake as `domain.stake.replay` gives it, or None without stake facts."""
        with self.datastore.transaction() as curs:
            return self._stakes(curs, [provider_id]).get(provider_id)

    def providers(self, provider_id: UUID | None = None) -> list[ProviderRow]:
        """Registered providers with their stake totals, by provider id (one, if given; at
        most ROWS_LISTED_MAX)."""
        where = SQL("") if provider_id is None else SQL("WHERE p.provider_id = %s")
        with self.datastore.transaction() as curs:
            curs.execute(
                SQL(
                    "SELECT p.provider_id, p.operator_address, p.registered_at, "
                    "p.deregistered_at, "
                    "COALESCE(s.bonded, 0) AS stake_bonded, "
                    "COALESCE(s.unbonding, 0) AS stake_unbonding, "
                    "COALESCE(s.released, 0) AS stake_released, "
                    "COALESCE(s.slashed, 0) AS stake_slashed, "
                    "GREATEST(p.updated_position, s.updated_position) AS updated_position "
                    "FROM {providers} p LEFT JOIN {stakes} s USING (provider_id) {where} "
                    "ORDER BY p.provider_id LIMIT {limit}"
                ).format(
                    limit=Literal(ROWS_LISTED_MAX),
                    providers=self.table_sql(PROVIDERS_TABLE_NAME),
                    stakes=self.table_sql(STAKES_TABLE_NAME),
                    where=where,
                ),
                () if provider_id is None else (provider_id,),
            )
            rows = curs.fetchall()
        return [
            ProviderRow(
                provider_id=r["provider_id"],
                operator_address=r["operator_address"],
                registered_at=r["registered_at"],
                deregistered_at=r["deregistered_at"],
                stake_bonded=int(r["stake_bonded"]),
                stake_unbonding=int(r["stake_unbonding"]),
                stake_released=int(r["stake_released"]),
                stake_slashed=int(r["stake_slashed"]),
                updated_position=r["updated_position"],
            )
            for r in rows
        ]

    def provider(self, provider_id: UUID) -> ProviderRow | None:
        rows = self.providers(provider_id)
        return rows[0] if rows else None

    def nodes(
        self,
        provider_id: UUID | None = None,
        *,
        gpu_model: str | None = None,
        listed_only: bool = False,
    ) -> list[NodeRow]:
        """Nodes, by provider then listing order; filtered by provider, model, listing (at
        most ROWS_LISTED_MAX)."""
        conditions: list[Composable] = [SQL("TRUE")]
        params: list[Any] = []
        if provider_id is not None:
            conditions.append(SQL("provider_id = %s"))
            params.append(provider_id)
        if gpu_model is not None:
            conditions.append(SQL("gpu_model = %s"))
            params.append(gpu_model)
        if listed_only:
            conditions.append(SQL("listed"))
        rows = self.read(
            NODES_TABLE_NAME,
            SQL(" AND ").join(conditions),
            params,
            order_by=("provider_id", "listing_index"),
        )
        return [NodeRow(**r) for r in rows]


def _node(row: dict[str, Any]) -> Node:
    return Node(
        node_id=row["node_id"],
        gpu_model=row["gpu_model"],
        gpu_count=row["gpu_count"],
        gpu_memory_mib=row["gpu_memory_mib"],
        region=row["region"],
        public_key=row["public_key"],
    )


class ProvidersProjection(MarketProjection[ProvidersRecorder]):
    """Keeps the providers view up to date with the marketplace log, a page at a time."""

    name = VIEW_NAME

    @classmethod
    def recorder_class(cls) -> type[ProvidersRecorder]:
        return ProvidersRecorder

    def provider(self, provider_id: UUID) -> ProviderRow | None:
        return self.view.provider(provider_id)

    def providers(self) -> list[ProviderRow]:
        return self.view.providers()

    def nodes(
        self,
        provider_id: UUID | None = None,
        *,
        gpu_model: str | None = None,
        listed_only: bool = False,
    ) -> list[NodeRow]:
        return self.view.nodes(provider_id, gpu_model=gpu_model, listed_only=listed_only)

    def provider_state(self, provider_id: UUID) -> Provider | None:
        return self.view.provider_state(provider_id)

    def stake_state(self, provider_id: UUID) -> ProviderStake | None:
        return self.view.stake_state(provider_id)
