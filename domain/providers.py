"""Providers and their nodes: registration, node listing, deregistration. Pure rules.

No I/O and no clock reads: the caller passes `now`. Each decision is a plain function from a
`Provider` (or None, before registration) and the command's fields to a result code and the
facts to record; codes are declared in the order they are checked and never renumbered.
`apply` folds one fact into a new state; `replay` rebuilds a provider from its facts.

The rules
---------

- A provider registers once with its operator address (the account that receives payouts
  on chain: "0x" and 40 hex digits) and at least one node. Registering again with the same
  fields is `ok` and records nothing; with other fields it is `exists_with_different_fields`.
- A node lists a GPU model, a GPU count, GPU memory per GPU (MiB), a region, and the node's
  public key (Ed25519, 32 bytes as 64 hex digits). Usage reports from the node are signed
  with that key; a key may belong to one node only, across the provider's nodes.
- A node may be listed later (`list_node`) and delisted (`delist_node`); a delisted node's
  id is never reused.
- Deregistration ends the provider: nothing else is accepted afterwards. It is refused
  while the provider still has listed nodes (delist them first, so open leases and stake
  are settled node by node).
- Whether the provider has enough stake to place asks is `domain.stake.can_place_asks`,
  over `Provider.listed_nodes()`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import IntEnum
from uuid import UUID

NODES_PER_PROVIDER_MAX = 256
"""Most nodes one provider may have listed at once."""
GPU_COUNT_PER_NODE_MAX = 64
GPU_MEMORY_MIB_MAX = 1024 * 1024
GPU_MODEL_LENGTH_MAX = 64
REGION_LENGTH_MAX = 32

_OPERATOR_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_PUBLIC_KEY = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Node:
    """A machine a provider offers."""

    node_id: UUID
    gpu_model: str
    gpu_count: int
    gpu_memory_mib: int
    """Memory of each GPU, in MiB."""
    region: str
    public_key: str
    """Ed25519 public key that signs the node's usage reports: 64 lowercase hex digits."""


@dataclass(frozen=True, slots=True)
class Provider:
    """A registered provider, its nodes (listed or delisted) and whether it deregistered."""

    provider_id: UUID
    operator_address: str
    registered_at: datetime
    nodes: tuple[Node, ...]
    """Every node ever listed, in listing order."""
    delisted: frozenset[UUID]
    deregistered_at: datetime | None = None

    def listed_nodes(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.node_id not in self.delisted)

    def node(self, node_id: UUID) -> Node | None:
        return next((n for n in self.nodes if n.node_id == node_id), None)


@dataclass(frozen=True, slots=True)
class ProviderRegistered:
    provider_id: UUID
    operator_address: str
    nodes: tuple[Node, ...]
    registered_at: datetime


@dataclass(frozen=True, slots=True)
class NodeListed:
    provider_id: UUID
    node: Node
    listed_at: datetime


@dataclass(frozen=True, slots=True)
class NodeDelisted:
    provider_id: UUID
    node_id: UUID
    delisted_at: datetime


@dataclass(frozen=True, slots=True)
class ProviderDeregistered:
    provider_id: UUID
    deregistered_at: datetime


Fact = ProviderRegistered | NodeListed | NodeDelisted | ProviderDeregistered


class NodeResult(IntEnum):
    """Result of checking one node's fields, in check order. Never renumber."""

    ok = 0
    node_id_must_not_be_zero = 1
    gpu_model_must_not_be_empty = 2
    gpu_model_exceeds_max_length = 3
    gpu_count_must_be_positive = 4
    gpu_count_exceeds_max = 5
    gpu_memory_must_be_positive = 6
    gpu_memory_exceeds_max = 7
    region_must_not_be_empty = 8
    region_exceeds_max_length = 9
    public_key_malformed = 10


class RegisterResult(IntEnum):
    """Result of registering a provider, in check order. Never renumber."""

    ok = 0
    provider_id_must_not_be_zero = 1
    operator_address_malformed = 2
    nodes_must_not_be_empty = 3
    nodes_exceed_max = 4
    node_invalid = 5
    """A node's fields are wrong: the NodeResult says which."""
    node_ids_must_be_distinct = 6
    public_keys_must_be_distinct = 7
    exists_with_different_fields = 8


class ListNodeResult(IntEnum):
    """Result of listing one more node, in check order. Never renumber."""

    ok = 0
    provider_not_found = 1
    provider_deregistered = 2
    node_invalid = 3
    nodes_exceed_max = 4
    node_exists_with_different_fields = 5
    node_was_delisted = 6
    public_key_in_use = 7


class DelistNodeResult(IntEnum):
    """Result of delisting a node, in check order. Never renumber."""

    ok = 0
    provider_not_found = 1
    provider_deregistered = 2
    node_not_found = 3


class DeregisterResult(IntEnum):
    """Result of deregistering a provider, in check order. Never renumber."""

    ok = 0
    provider_not_found = 1
    nodes_still_listed = 2


def check_node(node: Node) -> NodeResult:
    """The first rule a node's fields break, or ok."""
    r = NodeResult
    if not node.node_id.int:
        return r.node_id_must_not_be_zero
    if not node.gpu_model:
        return r.gpu_model_must_not_be_empty
    if len(node.gpu_model) > GPU_MODEL_LENGTH_MAX:
        return r.gpu_model_exceeds_max_length
    if type(node.gpu_count) is not int or node.gpu_count <= 0:
        return r.gpu_count_must_be_positive
    if node.gpu_count > GPU_COUNT_PER_NODE_MAX:
        return r.gpu_count_exceeds_max
    if type(node.gpu_memory_mib) is not int or node.gpu_memory_mib <= 0:
        return r.gpu_memory_must_be_positive
    if node.gpu_memory_mib > GPU_MEMORY_MIB_MAX:
        return r.gpu_memory_exceeds_max
    if not node.region:
        return r.region_must_not_be_empty
    if len(node.region) > REGION_LENGTH_MAX:
        return r.region_exceeds_max_length
    if not _PUBLIC_KEY.fullmatch(node.public_key):
        return r.public_key_malformed
    return r.ok


def register(
    existing: Provider | None,
    provider_id: UUID,
    operator_address: str,
    nodes: Sequence[Node],
    now: datetime,
) -> tuple[RegisterResult, tuple[Fact, ...]]:
    """Register a provider with its first nodes."""
    r = RegisterResult
    if not provider_id.int:
        return r.provider_id_must_not_be_zero, ()
    if not _OPERATOR_ADDRESS.fullmatch(operator_address):
        return r.operator_address_malformed, ()
    if not nodes:
        return r.nodes_must_not_be_empty, ()
    if len(nodes) > NODES_PER_PROVIDER_MAX:
        return r.nodes_exceed_max, ()
    if any(check_node(n) is not NodeResult.ok for n in nodes):
        return r.node_invalid, ()
    if len({n.node_id for n in nodes}) != len(nodes):
        return r.node_ids_must_be_distinct, ()
    if len({n.public_key for n in nodes}) != len(nodes):
        return r.public_keys_must_be_distinct, ()
    if existing is not None:
        registered = existing.operator_address == operator_address and existing.nodes[
            : len(nodes)
        ] == tuple(nodes)
        return (r.ok if registered else r.exists_with_different_fields), ()
    return r.ok, (ProviderRegistered(provider_id, operator_address, tuple(nodes), now),)


def list_node(
    provider: Provider | None, node: Node, now: datetime
) -> tuple[ListNodeResult, tuple[Fact, ...]]:
    """List one more node of a registered provider. The same node again is ok."""
    r = ListNodeResult
    if provider is None:
        return r.provider_not_found, ()
    if provider.deregistered_at is not None:
        return r.provider_deregistered, ()
    if check_node(node) is not NodeResult.ok:
        return r.node_invalid, ()
    known = provider.node(node.node_id)
    if known is None and len(provider.listed_nodes()) >= NODES_PER_PROVIDER_MAX:
        return r.nodes_exceed_max, ()
    if known is not None:
        if known != node:
            return r.node_exists_with_different_fields, ()
        if node.node_id in provider.delisted:
            return r.node_was_delisted, ()
        return r.ok, ()
    if any(n.public_key == node.public_key for n in provider.nodes):
        return r.public_key_in_use, ()
    return r.ok, (NodeListed(provider.provider_id, node, now),)


def delist_node(
    provider: Provider | None, node_id: UUID, now: datetime
) -> tuple[DelistNodeResult, tuple[Fact, ...]]:
    """Delist a node: it takes no new leases and needs no stake. Again is ok."""
    r = DelistNodeResult
    if provider is None:
        return r.provider_not_found, ()
    if provider.deregistered_at is not None:
        return r.provider_deregistered, ()
    if provider.node(node_id) is None:
        return r.node_not_found, ()
    if node_id in provider.delisted:
        return r.ok, ()
    return r.ok, (NodeDelisted(provider.provider_id, node_id, now),)


def deregister(
    provider: Provider | None, now: datetime
) -> tuple[DeregisterResult, tuple[Fact, ...]]:
    """End a provider whose nodes are all delisted. Again is ok."""
    r = DeregisterResult
    if provider is None:
        return r.provider_not_found, ()
    if provider.deregistered_at is not None:
        return r.ok, ()
    if provider.listed_nodes():
        return r.nodes_still_listed, ()
    return r.ok, (ProviderDeregistered(provider.provider_id, now),)


def apply(provider: Provider | None, fact: Fact) -> Provider:
    """The provider after a fact (already decided; replay trusts it)."""
    if isinstance(fact, ProviderRegistered):
        assert provider is None, f"provider {fact.provider_id} registered twice"
        return Provider(
            provider_id=fact.provider_id,
            operator_address=fact.operator_address,
            registered_at=fact.registered_at,
            nodes=fact.nodes,
            delisted=frozenset(),
        )
    assert provider is not None and provider.provider_id == fact.provider_id
    if isinstance(fact, NodeListed):
        return replace(provider, nodes=(*provider.nodes, fact.node))
    if isinstance(fact, NodeDelisted):
        return replace(provider, delisted=provider.delisted | {fact.node_id})
    return replace(provider, deregistered_at=fact.deregistered_at)


def replay(facts: Iterable[Fact]) -> Provider | None:
    """Rebuild a provider from its facts in log order."""
    provider: Provider | None = None
    for fact in facts:
        provider = apply(provider, fact)
    return provider
