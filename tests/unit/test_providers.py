"""Provider registration, node listing and deregistration (pure rules)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.providers import (
    GPU_COUNT_PER_NODE_MAX,
    GPU_MEMORY_MIB_MAX,
    GPU_MODEL_LENGTH_MAX,
    NODES_PER_PROVIDER_MAX,
    REGION_LENGTH_MAX,
    DelistNodeResult,
    DeregisterResult,
    ListNodeResult,
    Node,
    NodeDelisted,
    NodeListed,
    NodeResult,
    Provider,
    ProviderDeregistered,
    ProviderRegistered,
    RegisterResult,
    apply,
    check_node,
    delist_node,
    deregister,
    list_node,
    register,
    replay,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PROVIDER = UUID(int=1)
ADDRESS = "0x" + "ab" * 20


def node(n: int, **changes) -> Node:
    base = Node(UUID(int=100 + n), "H100", 8, 81_920, "eu-west", f"{n:064x}")
    return replace(base, **changes)


def registered(*nodes: Node) -> Provider:
    result, facts = register(None, PROVIDER, ADDRESS, nodes or (node(1),), T0)
    assert result is RegisterResult.ok
    provider = replay(facts)
    assert provider is not None
    return provider


# -- nodes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({}, NodeResult.ok),
        ({"node_id": UUID(int=0)}, NodeResult.node_id_must_not_be_zero),
        ({"gpu_model": ""}, NodeResult.gpu_model_must_not_be_empty),
        ({"gpu_model": "X" * (GPU_MODEL_LENGTH_MAX + 1)}, NodeResult.gpu_model_exceeds_max_length),
        ({"gpu_count": 0}, NodeResult.gpu_count_must_be_positive),
        ({"gpu_count": 1.0}, NodeResult.gpu_count_must_be_positive),
        ({"gpu_count": GPU_COUNT_PER_NODE_MAX + 1}, NodeResult.gpu_count_exceeds_max),
        ({"gpu_memory_mib": 0}, NodeResult.gpu_memory_must_be_positive),
        ({"gpu_memory_mib": GPU_MEMORY_MIB_MAX + 1}, NodeResult.gpu_memory_exceeds_max),
        ({"region": ""}, NodeResult.region_must_not_be_empty),
        ({"region": "r" * (REGION_LENGTH_MAX + 1)}, NodeResult.region_exceeds_max_length),
        ({"public_key": "00" * 31}, NodeResult.public_key_malformed),
        ({"public_key": "AB" * 32}, NodeResult.public_key_malformed),
        ({"public_key": "zz" * 32}, NodeResult.public_key_malformed),
    ],
)
def test_a_node_is_checked_field_by_field_in_order(changes, code) -> None:
    assert check_node(node(1, **changes)) is code


def test_the_earlier_rule_wins_when_a_node_breaks_two() -> None:
    assert check_node(node(1, gpu_model="", gpu_count=0)) is NodeResult.gpu_model_must_not_be_empty


# -- registration --------------------------------------------------------------------------


def test_a_provider_registers_with_its_operator_address_and_first_nodes() -> None:
    result, facts = register(None, PROVIDER, ADDRESS, [node(1), node(2)], T0)
    assert result is RegisterResult.ok
    assert facts == (ProviderRegistered(PROVIDER, ADDRESS, (node(1), node(2)), T0),)
    provider = replay(facts)
    assert provider is not None
    assert provider.listed_nodes() == (node(1), node(2))
    assert provider.deregistered_at is None


@pytest.mark.parametrize(
    ("provider_id", "address", "nodes", "code"),
    [
        (UUID(int=0), ADDRESS, [node(1)], RegisterResult.provider_id_must_not_be_zero),
        (PROVIDER, "0x1234", [node(1)], RegisterResult.operator_address_malformed),
        (PROVIDER, "ab" * 21, [node(1)], RegisterResult.operator_address_malformed),
        (PROVIDER, ADDRESS, [], RegisterResult.nodes_must_not_be_empty),
        (
            PROVIDER,
            ADDRESS,
            [node(i) for i in range(NODES_PER_PROVIDER_MAX + 1)],
            RegisterResult.nodes_exceed_max,
        ),
        (PROVIDER, ADDRESS, [node(1, gpu_count=0)], RegisterResult.node_invalid),
        (
            PROVIDER,
            ADDRESS,
            [node(1), node(2, node_id=node(1).node_id)],
            RegisterResult.node_ids_must_be_distinct,
        ),
        (
            PROVIDER,
            ADDRESS,
            [node(1), node(2, public_key=node(1).public_key)],
            RegisterResult.public_keys_must_be_distinct,
        ),
    ],
)
def test_a_registration_that_breaks_a_rule_is_refused_and_records_nothing(
    provider_id, address, nodes, code
) -> None:
    assert register(None, provider_id, address, nodes, T0) == (code, ())


def test_registering_again_with_the_same_fields_is_ok_and_records_nothing() -> None:
    provider = registered(node(1))
    later = T0 + timedelta(days=1)
    assert register(provider, PROVIDER, ADDRESS, [node(1)], later) == (RegisterResult.ok, ())


def test_registering_again_with_other_fields_is_refused() -> None:
    provider = registered(node(1))
    other = "0x" + "cd" * 20
    assert register(provider, PROVIDER, other, [node(1)], T0) == (
        RegisterResult.exists_with_different_fields,
        (),
    )
    assert register(provider, PROVIDER, ADDRESS, [node(2)], T0) == (
        RegisterResult.exists_with_different_fields,
        (),
    )


# -- listing and delisting ------------------------------------------------------------------


def test_a_registered_provider_lists_another_node() -> None:
    provider = registered(node(1))
    later = T0 + timedelta(hours=1)
    result, facts = list_node(provider, node(2), later)
    assert result is ListNodeResult.ok
    assert facts == (NodeListed(PROVIDER, node(2), later),)
    assert apply(provider, facts[0]).listed_nodes() == (node(1), node(2))


def test_listing_the_same_node_again_is_ok_and_records_nothing() -> None:
    provider = registered(node(1))
    assert list_node(provider, node(1), T0) == (ListNodeResult.ok, ())


def test_listing_rules_are_checked_in_order() -> None:
    provider = registered(node(1))
    gone = apply(
        apply(provider, NodeDelisted(PROVIDER, node(1).node_id, T0)),
        ProviderDeregistered(PROVIDER, T0),
    )
    assert list_node(None, node(2), T0) == (ListNodeResult.provider_not_found, ())
    assert list_node(gone, node(2), T0) == (ListNodeResult.provider_deregistered, ())
    assert list_node(provider, node(2, region=""), T0) == (ListNodeResult.node_invalid, ())
    assert list_node(provider, node(1, gpu_count=4), T0) == (
        ListNodeResult.node_exists_with_different_fields,
        (),
    )
    delisted = apply(provider, NodeDelisted(PROVIDER, node(1).node_id, T0))
    assert list_node(delisted, node(1), T0) == (ListNodeResult.node_was_delisted, ())
    assert list_node(provider, node(2, public_key=node(1).public_key), T0) == (
        ListNodeResult.public_key_in_use,
        (),
    )


def test_a_provider_cannot_list_more_nodes_than_the_limit() -> None:
    provider = registered(*[node(i) for i in range(NODES_PER_PROVIDER_MAX)])
    assert list_node(provider, node(NODES_PER_PROVIDER_MAX), T0) == (
        ListNodeResult.nodes_exceed_max,
        (),
    )


def test_a_delisted_node_stays_known_and_its_key_stays_taken() -> None:
    provider = registered(node(1), node(2))
    result, facts = delist_node(provider, node(1).node_id, T0)
    assert result is DelistNodeResult.ok
    provider = apply(provider, facts[0])
    assert provider.listed_nodes() == (node(2),)
    assert provider.node(node(1).node_id) == node(1)
    assert delist_node(provider, node(1).node_id, T0) == (DelistNodeResult.ok, ())
    assert list_node(provider, node(3, public_key=node(1).public_key), T0)[0] is (
        ListNodeResult.public_key_in_use
    )


def test_delisting_rules_are_checked_in_order() -> None:
    provider = registered(node(1))
    assert delist_node(None, node(1).node_id, T0) == (DelistNodeResult.provider_not_found, ())
    assert delist_node(provider, UUID(int=999), T0) == (DelistNodeResult.node_not_found, ())
    gone = apply(
        apply(provider, NodeDelisted(PROVIDER, node(1).node_id, T0)),
        ProviderDeregistered(PROVIDER, T0),
    )
    assert delist_node(gone, node(1).node_id, T0) == (DelistNodeResult.provider_deregistered, ())


# -- deregistration -------------------------------------------------------------------------


def test_a_provider_with_listed_nodes_cannot_deregister() -> None:
    assert deregister(registered(node(1)), T0) == (DeregisterResult.nodes_still_listed, ())
    assert deregister(None, T0) == (DeregisterResult.provider_not_found, ())


def test_a_provider_deregisters_once_its_nodes_are_delisted_and_accepts_nothing_after() -> None:
    provider = apply(registered(node(1)), NodeDelisted(PROVIDER, node(1).node_id, T0))
    result, facts = deregister(provider, T0 + timedelta(days=2))
    assert result is DeregisterResult.ok
    assert facts == (ProviderDeregistered(PROVIDER, T0 + timedelta(days=2)),)
    gone = apply(provider, facts[0])
    assert deregister(gone, T0 + timedelta(days=3)) == (DeregisterResult.ok, ())
    assert list_node(gone, node(2), T0)[0] is ListNodeResult.provider_deregistered


# -- properties -----------------------------------------------------------------------------

commands = st.lists(
    st.tuples(st.sampled_from(["list", "delist", "deregister"]), st.integers(1, 12)),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(first=st.integers(1, 4), steps=commands)
def test_any_history_replays_to_the_same_provider_and_keeps_keys_unique(first, steps) -> None:
    provider = registered(*[node(i) for i in range(1, first + 1)])
    facts: list = [ProviderRegistered(PROVIDER, ADDRESS, provider.nodes, T0)]
    now = T0
    ended_at: int | None = None
    for kind, n in steps:
        now += timedelta(minutes=1)
        if kind == "list":
            # Same id and key as an earlier node half the time: refusals must record nothing.
            _result, new = list_node(provider, node(n), now)
        elif kind == "delist":
            _result, new = delist_node(provider, node(n).node_id, now)
        else:
            _result, new = deregister(provider, now)
        for fact in new:
            provider = apply(provider, fact)
            facts.append(fact)
        keys = [x.public_key for x in provider.nodes]
        assert len(keys) == len(set(keys))
        assert len(provider.listed_nodes()) <= NODES_PER_PROVIDER_MAX
        if provider.deregistered_at is not None:
            assert provider.listed_nodes() == ()
            # Nothing is recorded after the deregistration.
            assert isinstance(facts[-1], ProviderDeregistered) or ended_at is not None
            ended_at = ended_at if ended_at is not None else len(facts)
            assert len(facts) == ended_at
    assert replay(facts) == provider
