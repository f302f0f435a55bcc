"""`ledger.merkle.PayoutTree` against the deployed PayoutDistributor on the in-process EVM.

Several providers are paid from a posted root using proofs built by `ledger.merkle`; a later
epoch with higher cumulative amounts pays only the difference.
"""

from __future__ import annotations

import pytest

pytest.importorskip("web3", reason="needs the `chain` extra: pip install -e '.[chain]'")
pytest.importorskip("eth_tester", reason="needs the `chain` extra: pip install -e '.[chain]'")

from web3 import EthereumTesterProvider, Web3

from contracts import chain
from contracts.chain import ROLE_POSTER, ContractRevert, Deployment
from ledger.merkle import PayoutTree, payout_leaf, verify

PROVIDERS = 5


@pytest.fixture
def w3() -> Web3:
    return Web3(EthereumTesterProvider())


@pytest.fixture
def d(w3: Web3) -> Deployment:
    admin, pool, poster = list(w3.eth.accounts)[:3]
    dep = chain.deploy_all(w3, admin=admin, slash_pool=pool, unbond_delay=3600)
    dep.grant(dep.distributor, ROLE_POSTER, poster)
    dep.mint(dep.distributor.address, 10**24)
    return dep


def poster(w3: Web3) -> str:
    return str(list(w3.eth.accounts)[2])


def providers(w3: Web3) -> list[str]:
    return [str(a) for a in w3.eth.accounts][3 : 3 + PROVIDERS]


def test_contract_leaf_matches(d: Deployment, w3: Web3) -> None:
    for i, account in enumerate(providers(w3)):
        for value in (0, 10**18 * i + 1, 2**256 - 1):
            leaf = d.distributor.functions.leaf(account, value).call()
            assert leaf == payout_leaf(account, value)
            assert leaf == payout_leaf(account.lower(), value)


def test_providers_claim_then_claim_difference(d: Deployment, w3: Web3) -> None:
    accounts = providers(w3)
    start = {a: d.balance(a) for a in accounts}
    first = {a: 10**18 * (i + 1) + i for i, a in enumerate(accounts)}
    # lowercase input is fine: the tree checksums it
    e1 = PayoutTree.build([(a.lower(), v) for a, v in first.items()])
    r = d.post_root(poster(w3), 1, e1.root)
    [ev] = chain.events(d.distributor, "RootPosted", r)
    assert ev["args"]["root"] == e1.root
    assert d.distributor.functions.rootOf(1).call().hex() == e1.root_hex[2:]

    for account, amount in first.items():
        proof = e1.proof(account)
        assert verify(e1.root, account, amount, proof)
        r = d.claim(1, account, amount, proof, sender=accounts[0])  # relayed by one provider
        [ev] = chain.events(d.distributor, "Claimed", r)
        assert (ev["args"]["account"], ev["args"]["amount"]) == (account, amount)
        assert d.claimed(account) == amount
    assert {a: d.balance(a) - start[a] for a in accounts} == first

    # epoch 2: cumulative amounts of the odd-numbered providers grow; the others are unchanged
    second = {a: v + (10**17 * i if i % 2 else 0) for i, (a, v) in enumerate(first.items())}
    e2 = PayoutTree.build(list(second.items()))
    assert e2.root != e1.root
    d.post_root(poster(w3), 2, e2.root)

    for account in accounts:
        if second[account] == first[account]:
            with pytest.raises(ContractRevert, match=r"reverted with NothingToClaim\("):
                d.claim(2, account, second[account], e2.proof(account))
            continue
        r = d.claim(2, account, second[account], e2.proof(account))
        [ev] = chain.events(d.distributor, "Claimed", r)
        assert ev["args"]["amount"] == second[account] - first[account]
        assert ev["args"]["cumulativeAmount"] == second[account]
    assert {a: d.balance(a) - start[a] for a in accounts} == second
    assert {a: d.claimed(a) for a in accounts} == second

    # an epoch-1 proof doesn't work against the epoch-2 root, nor an inflated amount
    a1 = accounts[1]
    with pytest.raises(ContractRevert, match=r"reverted with InvalidProof\("):
        d.claim(2, a1, first[a1], e1.proof(a1))
    with pytest.raises(ContractRevert, match=r"reverted with InvalidProof\("):
        d.claim(2, a1, second[a1] + 1, e2.proof(a1))


def test_single_provider_tree_claims_with_empty_proof(d: Deployment, w3: Web3) -> None:
    account = providers(w3)[0]
    tree = PayoutTree.build([(account, 42)])
    assert tree.proof(account) == []
    d.post_root(poster(w3), 1, tree.root)
    before = d.balance(account)
    d.claim(1, account, 42, tree.proof(account))
    assert d.balance(account) - before == 42
