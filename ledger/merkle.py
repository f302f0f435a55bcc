"""Merkle trees laid out exactly as OpenZeppelin's ``@openzeppelin/merkle-tree`` builds them.

:class:`PayoutTree` is ``StandardMerkleTree.of(entries, ["address", "uint256"])``: each leaf is
``keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount))))`` (what
``PayoutDistributor.leaf`` computes), leaves are sorted by hash and stored from the end of a
"complete binary tree in an array" (node ``i`` has children ``2i+1`` and ``2i+2``; the root is
node 0), and pairs are hashed sorted (``keccak256(min(a, b) ++ max(a, b))``), which is what
``MerkleProof.verify`` expects. :class:`MerkleTree` is the same layout over caller-supplied
32-byte leaves (OpenZeppelin's ``SimpleMerkleTree``), for log checkpoints.

Pure: no I/O, no clock. Needs ``eth-abi`` and ``eth-utils`` (the ``chain`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from ledger.errors import LedgerError

__all__ = [
    "HASH_SIZE",
    "UINT256_MAX",
    "MerkleTree",
    "MerkleTreeError",
    "PayoutTree",
    "hash_pair",
    "normalize_account",
    "payout_leaf",
    "process_proof",
    "verify",
    "verify_leaf",
]

HASH_SIZE = 32
UINT256_MAX = 2**256 - 1
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


class MerkleTreeError(LedgerError, ValueError):
    """Invalid tree input (no leaves, a malformed leaf, account or amount, a duplicate account),
    or a proof asked for something the tree does not hold."""


# --- hashing --------------------------------------------------------------------------------


def _check_hash(value: object, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != HASH_SIZE:
        raise MerkleTreeError(f"{what} must be {HASH_SIZE} bytes, got {value!r}")
    return bytes(value)


def hash_pair(a: bytes, b: bytes) -> bytes:
    """OpenZeppelin's commutative ``Hashes.commutativeKeccak256``: keccak of the sorted pair."""
    return keccak(a + b if a <= b else b + a)


def process_proof(leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root reached from ``leaf`` by ``proof`` (``MerkleProof.processProof``)."""
    node = _check_hash(leaf, "leaf")
    for i, sibling in enumerate(proof):
        node = hash_pair(node, _check_hash(sibling, f"proof[{i}]"))
    return node


def verify_leaf(root: bytes, leaf: bytes, proof: Sequence[bytes]) -> bool:
    """Whether ``proof`` proves ``leaf`` under ``root``. Malformed (non-32-byte) input raises."""
    return process_proof(leaf, proof) == _check_hash(root, "root")


# --- generic tree -----------------------------------------------------------------------------


def _build_nodes(leaves: Sequence[bytes]) -> tuple[bytes, ...]:
    """The array layout: ``leaves`` (already in tree order) at the end, parents before."""
    n = len(leaves)
    nodes: list[bytes] = [b""] * (2 * n - 1)
    for k, leaf in enumerate(leaves):
        nodes[len(nodes) - 1 - k] = leaf
    for i in range(len(nodes) - 1 - n, -1, -1):
        nodes[i] = hash_pair(nodes[2 * i + 1], nodes[2 * i + 2])
    return tuple(nodes)


@dataclass(frozen=True)
class MerkleTree:
    """A Merkle tree over 32-byte leaves, as OpenZeppelin's ``SimpleMerkleTree``.

    Leaves are used as given, not hashed again: callers must pass domain-separated hashes
    (e.g. a double keccak of the record) so that no leaf can pass for an inner node.
    Duplicate leaves are allowed; :meth:`proof` takes the index into the input order.
    """

    leaves: tuple[bytes, ...]
    """The leaves in input order."""
    nodes: tuple[bytes, ...] = field(repr=False)
    """The whole tree as OpenZeppelin's ``dump().tree``: ``nodes[0]`` is the root."""
    _positions: tuple[int, ...] = field(repr=False)

    @classmethod
    def build(cls, leaves: Sequence[bytes], *, sort_leaves: bool = True) -> MerkleTree:
        """Build from ``leaves``; sorted by value first unless ``sort_leaves`` is false."""
        checked = tuple(_check_hash(leaf, f"leaf {i}") for i, leaf in enumerate(leaves))
        if not checked:
            raise MerkleTreeError("a Merkle tree needs at least one leaf")
        order = list(range(len(checked)))
        if sort_leaves:
            order.sort(key=lambda i: checked[i])  # stable, as JavaScript's Array.sort
        nodes = _build_nodes([checked[i] for i in order])
        positions = [0] * len(checked)
        for k, i in enumerate(order):
            positions[i] = len(nodes) - 1 - k
        return cls(checked, nodes, tuple(positions))

    @property
    def root(self) -> bytes:
        return self.nodes[0]

    @property
    def root_hex(self) -> str:
        return "0x" + self.root.hex()

    def __len__(self) -> int:
        return len(self.leaves)

    def proof(self, index: int) -> list[bytes]:
        """Sibling hashes from leaf ``index`` (input order) up to the root; [] for one leaf."""
        if isinstance(index, bool) or not isinstance(index, int):
            raise MerkleTreeError(f"leaf index must be an int, got {index!r}")
        if not 0 <= index < len(self.leaves):
            raise MerkleTreeError(f"no leaf {index} in a tree of {len(self.leaves)}")
        i = self._positions[index]
        out: list[bytes] = []
        while i > 0:
            out.append(self.nodes[i + 1 if i % 2 == 1 else i - 1])
            i = (i - 1) // 2
        return out

    def verify(self, leaf: bytes, proof: Sequence[bytes]) -> bool:
        """Whether ``proof`` proves ``leaf`` under this tree's root."""
        return verify_leaf(self.root, leaf, proof)


# --- payout tree ------------------------------------------------------------------------------


def normalize_account(account: object) -> str:
    """The EIP-55 checksummed form of ``account``: a ``0x`` address, all lowercase or correctly
    checksummed. Anything else (wrong length, non-hex, bad mixed-case checksum) raises."""
    if not isinstance(account, str):
        raise MerkleTreeError(f"account must be a str, got {account!r}")
    digits = account[2:]
    if not account.startswith("0x") or len(digits) != 40 or not set(digits) <= _HEX_DIGITS:
        raise MerkleTreeError(f"account must be 0x and 40 hex digits, got {account!r}")
    checksummed = to_checksum_address(account)
    if digits != digits.lower() and account != checksummed:
        raise MerkleTreeError(f"account {account!r} fails its EIP-55 checksum")
    return checksummed


def _check_amount(amount: object) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise MerkleTreeError(f"amount must be an int, got {amount!r}")
    if not 0 <= amount <= UINT256_MAX:
        raise MerkleTreeError(f"amount must be in 0..2**256-1, got {amount}")
    return amount


def payout_leaf(account: str, cumulative_amount: int) -> bytes:
    """``PayoutDistributor.leaf``: keccak256(keccak256(abi.encode(account, cumulativeAmount)))."""
    encoded = abi_encode(
        ["address", "uint256"], [normalize_account(account), _check_amount(cumulative_amount)]
    )
    return keccak(keccak(encoded))


def verify(root: bytes, account: str, cumulative_amount: int, proof: Sequence[bytes]) -> bool:
    """Whether ``proof`` proves the leaf (``account``, ``cumulative_amount``) under ``root``,
    exactly as ``PayoutDistributor.claim`` checks it. Malformed input raises MerkleTreeError."""
    return verify_leaf(root, payout_leaf(account, cumulative_amount), proof)


@dataclass(frozen=True)
class PayoutTree:
    """``StandardMerkleTree.of(entries, ["address", "uint256"])`` for one payout epoch."""

    entries: tuple[tuple[str, int], ...]
    """(checksummed account, cumulative amount) in input order."""
    tree: MerkleTree = field(repr=False)
    _index: dict[str, int] = field(repr=False, compare=False)

    @classmethod
    def build(cls, entries: Sequence[tuple[str, int]]) -> PayoutTree:
        """Build from (account, cumulative amount) pairs; one entry per account, at least one."""
        if not entries:
            raise MerkleTreeError("a payout tree needs at least one entry")
        checked: list[tuple[str, int]] = []
        index: dict[str, int] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, tuple) or len(entry) != 2:
                raise MerkleTreeError(f"entry {i} must be an (account, amount) pair: {entry!r}")
            account, amount = normalize_account(entry[0]), _check_amount(entry[1])
            if account in index:
                raise MerkleTreeError(
                    f"duplicate account {account} in entries {index[account]} and {i}"
                )
            index[account] = i
            checked.append((account, amount))
        tree = MerkleTree.build([payout_leaf(a, v) for a, v in checked])
        return cls(tuple(checked), tree, index)

    @property
    def root(self) -> bytes:
        return self.tree.root

    @property
    def root_hex(self) -> str:
        return self.tree.root_hex

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, account: object) -> bool:
        try:
            return normalize_account(account) in self._index
        except MerkleTreeError:
            return False

    def amount(self, account: str) -> int:
        """The cumulative amount committed for ``account``."""
        return self.entries[self._position(account)][1]

    def proof(self, account: str) -> list[bytes]:
        """The proof for ``account``'s leaf, as ``PayoutDistributor.claim`` takes it."""
        return self.tree.proof(self._position(account))

    def _position(self, account: str) -> int:
        normalized = normalize_account(account)
        try:
            return self._index[normalized]
        except KeyError:
            raise MerkleTreeError(f"account {normalized} is not in this payout tree") from None
