"""Unit tests of `ledger.merkle`: OpenZeppelin StandardMerkleTree layout, proofs and errors.

Known vectors come from OpenZeppelin's merkle-tree README and from the independent builder in
tests/integration/test_contracts.py (the one the contract tests post on chain); properties
check that every entry's proof verifies and that a changed amount, account or proof fails.
"""

from __future__ import annotations

import pytest

pytest.importorskip("eth_abi", reason="needs the `chain` extra: pip install -e '.[chain]'")

from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import LedgerError
from ledger.merkle import (
    UINT256_MAX,
    MerkleTree,
    MerkleTreeError,
    PayoutTree,
    hash_pair,
    normalize_account,
    payout_leaf,
    process_proof,
    verify,
    verify_leaf,
)
from tests.integration.test_contracts import MerkleTree as ReferenceTree
from tests.integration.test_contracts import leaf_hash as reference_leaf

A1 = "0x1111111111111111111111111111111111111111"
A2 = "0x2222222222222222222222222222222222222222"

# OpenZeppelin merkle-tree README: StandardMerkleTree.of(values, ["address", "uint256"])
OZ_VALUES = [(A1, 5_000_000_000_000_000_000), (A2, 2_500_000_000_000_000_000)]
OZ_ROOT = "0xd4dee0beab2d53f2cc83e567171bd2820e49898130a22622b10ead383e90bd77"
OZ_TREE = [
    OZ_ROOT,
    "0xeb02c421cfa48976e66dfb29120745909ea3a0f843456c263cf8f1253483e283",
    "0xb92c48e9d7abe27fd8dfd6b5dfdbfb1c9a463f80c712b66f3a5180a090cccafc",
]


def _addr(seed: int) -> str:
    return to_checksum_address(keccak(seed.to_bytes(32, "big"))[:20])


# --- known vectors ------------------------------------------------------------------------


def test_openzeppelin_readme_vector() -> None:
    tree = PayoutTree.build(OZ_VALUES)
    assert tree.root_hex == OZ_ROOT
    assert ["0x" + n.hex() for n in tree.tree.nodes] == OZ_TREE
    assert tree.proof(A1) == [bytes.fromhex(OZ_TREE[2][2:])]
    assert tree.proof(A2) == [bytes.fromhex(OZ_TREE[1][2:])]
    assert payout_leaf(A1, OZ_VALUES[0][1]).hex() == OZ_TREE[1][2:]
    for account, amount in OZ_VALUES:
        assert verify(tree.root, account, amount, tree.proof(account))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 13])
def test_matches_reference_builder(n: int) -> None:
    entries = [(_addr(i), (i * 7_919) ** 3) for i in range(n)]
    ours, ref = PayoutTree.build(entries), ReferenceTree(entries)
    assert ours.root == ref.root
    assert list(ours.tree.nodes) == ref.tree
    for i, (account, amount) in enumerate(entries):
        assert payout_leaf(account, amount) == reference_leaf(account, amount)
        assert ours.proof(account) == ref.proof(i)


def test_single_entry_tree() -> None:
    tree = PayoutTree.build([(A1, 10)])
    assert tree.root == payout_leaf(A1, 10) == reference_leaf(A1, 10)
    assert tree.proof(A1) == []
    assert verify(tree.root, A1, 10, [])
    assert not verify(tree.root, A1, 11, [])
    assert len(tree) == 1 and A1 in tree and A2 not in tree


def test_accounts_are_normalized() -> None:
    checksummed = _addr(1)
    tree = PayoutTree.build([(checksummed.lower(), 5), (A2, 6)])
    assert tree.entries[0] == (checksummed, 5)
    assert tree.proof(checksummed) == tree.proof(checksummed.lower())
    assert tree.amount(checksummed.lower()) == 5
    assert verify(tree.root, checksummed.lower(), 5, tree.proof(checksummed))
    assert tree.root == PayoutTree.build([(checksummed, 5), (A2, 6)]).root


def test_amount_bounds_encode() -> None:
    tree = PayoutTree.build([(A1, 0), (A2, UINT256_MAX)])
    assert verify(tree.root, A1, 0, tree.proof(A1))
    assert verify(tree.root, A2, UINT256_MAX, tree.proof(A2))
    assert tree.root == ReferenceTree([(A1, 0), (A2, UINT256_MAX)]).root


# --- properties -----------------------------------------------------------------------------

addresses = st.binary(min_size=20, max_size=20).map(to_checksum_address)
amounts = st.integers(min_value=0, max_value=UINT256_MAX)
payouts = st.lists(st.tuples(addresses, amounts), min_size=1, max_size=24, unique_by=lambda e: e[0])


@settings(max_examples=150, deadline=None)
@given(entries=payouts, data=st.data())
def test_every_proof_verifies_and_tampering_fails(
    entries: list[tuple[str, int]], data: st.DataObject
) -> None:
    tree = PayoutTree.build(entries)
    ref = ReferenceTree(entries)
    assert tree.root == ref.root
    for i, (account, amount) in enumerate(entries):
        proof = tree.proof(account)
        assert proof == ref.proof(i)
        assert verify(tree.root, account, amount, proof)
        assert len(proof) <= len(entries).bit_length()

    i = data.draw(st.integers(0, len(entries) - 1), label="entry")
    account, amount = entries[i]
    proof = tree.proof(account)
    other_amount = data.draw(amounts.filter(lambda v: v != amount), label="amount")
    assert not verify(tree.root, account, other_amount, proof)
    other_account = data.draw(addresses.filter(lambda a: a != account), label="account")
    assert not verify(tree.root, other_account, amount, proof)
    if proof:
        k = data.draw(st.integers(0, len(proof) - 1), label="sibling")
        flipped = bytearray(proof[k])
        flipped[data.draw(st.integers(0, 31), label="byte")] ^= 1
        assert not verify(tree.root, account, amount, [*proof[:k], bytes(flipped), *proof[k + 1 :]])
        assert not verify(tree.root, account, amount, proof[:-1])
    assert not verify(tree.root, account, amount, [*proof, keccak(b"extra")])


@settings(max_examples=100, deadline=None)
@given(
    leaves=st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=33),
    sort_leaves=st.booleans(),
)
def test_generic_tree_proofs(leaves: list[bytes], sort_leaves: bool) -> None:
    tree = MerkleTree.build(leaves, sort_leaves=sort_leaves)
    assert len(tree) == len(leaves) and tree.leaves == tuple(leaves)
    assert len(tree.nodes) == 2 * len(leaves) - 1
    for i, leaf in enumerate(leaves):
        proof = tree.proof(i)
        assert tree.verify(leaf, proof)
        assert process_proof(leaf, proof) == tree.root
        assert verify_leaf(tree.root, leaf, proof)
    if len(set(leaves)) > 1:
        assert not tree.verify(keccak(b"not a leaf"), tree.proof(0))


def test_generic_tree_layout() -> None:
    a, b, c = (keccak(bytes([i])) for i in range(3))
    unsorted = MerkleTree.build([a, b, c], sort_leaves=False)
    # array layout: leaves from the end in input order, node i = H(2i+1, 2i+2)
    assert unsorted.nodes[4] == a and unsorted.nodes[3] == b and unsorted.nodes[2] == c
    assert unsorted.nodes[1] == hash_pair(b, a)
    assert unsorted.root == hash_pair(unsorted.nodes[1], c)
    assert unsorted.proof(0) == [b, c] and unsorted.proof(2) == [unsorted.nodes[1]]
    assert MerkleTree.build([a, b, c]).root == MerkleTree.build([c, a, b]).root
    assert hash_pair(a, b) == hash_pair(b, a) == keccak(min(a, b) + max(a, b))
    assert MerkleTree.build([a]).root == a and MerkleTree.build([a]).proof(0) == []
    assert MerkleTree.build([a, a]).root == hash_pair(a, a)


# --- errors ---------------------------------------------------------------------------------


def test_error_is_a_ledger_value_error() -> None:
    assert issubclass(MerkleTreeError, LedgerError) and issubclass(MerkleTreeError, ValueError)


def test_empty_trees_refused() -> None:
    with pytest.raises(MerkleTreeError, match="at least one entry"):
        PayoutTree.build([])
    with pytest.raises(MerkleTreeError, match="at least one leaf"):
        MerkleTree.build([])


def test_duplicate_accounts_refused() -> None:
    checksummed = _addr(3)
    with pytest.raises(
        MerkleTreeError, match=rf"duplicate account {checksummed} in entries 0 and 2"
    ):
        PayoutTree.build([(checksummed, 1), (A1, 2), (checksummed.lower(), 3)])


@pytest.mark.parametrize(
    "account",
    [
        "1111111111111111111111111111111111111111",  # no 0x
        "0X1111111111111111111111111111111111111111",
        "0x111111111111111111111111111111111111111",  # 39 digits
        "0x11111111111111111111111111111111111111111",  # 41 digits
        "0x111111111111111111111111111111111111111g",
        "0x" + _addr(5)[2:].swapcase(),  # mixed case, wrong checksum
        b"\x11" * 20,
        0x11,
        None,
    ],
)
def test_bad_accounts_refused(account: object) -> None:
    with pytest.raises(MerkleTreeError, match="account"):
        normalize_account(account)
    with pytest.raises(MerkleTreeError, match="account"):
        PayoutTree.build([(account, 1)])  # type: ignore[list-item]
    assert account not in PayoutTree.build([(A1, 1)])


@pytest.mark.parametrize("amount", [-1, UINT256_MAX + 1, 1.0, "1", True, None])
def test_bad_amounts_refused(amount: object) -> None:
    with pytest.raises(MerkleTreeError, match="amount"):
        PayoutTree.build([(A1, amount)])  # type: ignore[list-item]
    with pytest.raises(MerkleTreeError, match="amount"):
        verify(PayoutTree.build([(A1, 1)]).root, A1, amount, [])  # type: ignore[arg-type]


def test_bad_entry_shape_refused() -> None:
    with pytest.raises(MerkleTreeError, match="entry 1 must be an"):
        PayoutTree.build([(A1, 1), [A2, 2]])  # type: ignore[list-item]
    with pytest.raises(MerkleTreeError, match="entry 0 must be an"):
        PayoutTree.build([(A1, 1, 2)])  # type: ignore[list-item]


def test_unknown_account_proof_refused() -> None:
    tree = PayoutTree.build(OZ_VALUES)
    other = _addr(9)
    with pytest.raises(MerkleTreeError, match=f"account {other} is not in this payout tree"):
        tree.proof(other.lower())
    with pytest.raises(MerkleTreeError, match="not in this payout tree"):
        tree.amount(other)


def test_bad_hashes_refused() -> None:
    tree = MerkleTree.build([keccak(b"a"), keccak(b"b")])
    with pytest.raises(MerkleTreeError, match="leaf 1 must be 32 bytes"):
        MerkleTree.build([keccak(b"a"), b"\x00" * 31])
    with pytest.raises(MerkleTreeError, match="leaf 0 must be 32 bytes"):
        MerkleTree.build(["00" * 32])  # type: ignore[list-item]
    with pytest.raises(MerkleTreeError, match=r"proof\[0\] must be 32 bytes"):
        tree.verify(keccak(b"a"), [b"short"])
    with pytest.raises(MerkleTreeError, match="root must be 32 bytes"):
        verify_leaf(b"", keccak(b"a"), [])
    with pytest.raises(MerkleTreeError, match="no leaf 2 in a tree of 2"):
        tree.proof(2)
    with pytest.raises(MerkleTreeError, match="no leaf -1"):
        tree.proof(-1)
    with pytest.raises(MerkleTreeError, match="leaf index must be an int"):
        tree.proof(True)
