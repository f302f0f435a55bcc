"""Contract tests on the in-process EVM (web3 EthereumTesterProvider + py-evm).

Covers deployment, happy paths, every custom-error revert of Staking, PayoutDistributor,
CheckpointAnchor and DepositVault, emitted events, the Merkle leaf/proof format (built here
in Python the way OpenZeppelin's StandardMerkleTree does), and that committed artifacts match
the sources.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("web3", reason="needs the `chain` extra: pip install -e '.[chain]'")
pytest.importorskip("eth_tester", reason="needs the `chain` extra: pip install -e '.[chain]'")

from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak
from web3 import EthereumTesterProvider, Web3

from contracts import chain
from contracts.chain import (
    ROLE_ANCHOR,
    ROLE_POSTER,
    ROLE_SLASHER,
    ROLE_WITHDRAWER,
    ContractRevert,
    Deployment,
)

REPO = Path(__file__).resolve().parents[2]
CONTRACTS = REPO / "contracts"
UNBOND_DELAY = 3600
ZERO = "0x" + "00" * 20


# --- Merkle tree, as @openzeppelin/merkle-tree StandardMerkleTree(["address", "uint256"]) ---


def leaf_hash(account: str, cumulative: int) -> bytes:
    return keccak(keccak(abi_encode(["address", "uint256"], [account, cumulative])))


def _hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(b"".join(sorted((a, b))))


class MerkleTree:
    """Array-layout tree: leaves sorted by hash, stored from the end; sorted-pair hashing."""

    def __init__(self, entries: list[tuple[str, int]]) -> None:
        assert entries
        self.entries = entries
        hashed = sorted(((leaf_hash(a, v), i) for i, (a, v) in enumerate(entries)))
        n = len(hashed)
        self.tree: list[bytes] = [b""] * (2 * n - 1)
        self.position: dict[int, int] = {}
        for k, (h, entry_index) in enumerate(hashed):
            self.tree[len(self.tree) - 1 - k] = h
            self.position[entry_index] = len(self.tree) - 1 - k
        for i in range(len(self.tree) - 1 - n, -1, -1):
            self.tree[i] = _hash_pair(self.tree[2 * i + 1], self.tree[2 * i + 2])

    @property
    def root(self) -> bytes:
        return self.tree[0]

    def proof(self, entry_index: int) -> list[bytes]:
        i = self.position[entry_index]
        out: list[bytes] = []
        while i > 0:
            out.append(self.tree[i + 1 if i % 2 == 1 else i - 1])
            i = (i - 1) // 2
        return out


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def w3() -> Web3:
    return Web3(EthereumTesterProvider())


@pytest.fixture
def accts(w3: Web3) -> dict[str, str]:
    names = [
        "admin",
        "pool",
        "slasher",
        "poster",
        "anchorer",
        "alice",
        "bob",
        "carol",
        "mallory",
        "withdrawer",
    ]
    return dict(zip(names, w3.eth.accounts, strict=False))


@pytest.fixture
def d(w3: Web3, accts: dict[str, str]) -> Deployment:
    dep = chain.deploy_all(
        w3, admin=accts["admin"], slash_pool=accts["pool"], unbond_delay=UNBOND_DELAY
    )
    dep.grant(dep.staking, ROLE_SLASHER, accts["slasher"])
    dep.grant(dep.distributor, ROLE_POSTER, accts["poster"])
    dep.grant(dep.anchor, ROLE_ANCHOR, accts["anchorer"])
    dep.grant(dep.vault, ROLE_WITHDRAWER, accts["withdrawer"])
    for who in ("alice", "bob"):
        dep.mint(accts[who], 1_000)
    return dep


def reverts(error: str) -> pytest.RaisesExc[ContractRevert]:
    return pytest.raises(ContractRevert, match=rf"reverted with {error}\(")


def now(w3: Web3) -> int:
    return int(w3.eth.get_block("latest")["timestamp"])


def time_travel(w3: Web3, timestamp: int) -> None:
    provider = w3.provider
    assert isinstance(provider, EthereumTesterProvider)
    assert provider.ethereum_tester is not None
    provider.ethereum_tester.time_travel(timestamp)


# --- deployment & token -----------------------------------------------------------------


def test_artifacts_record_pinned_compiler() -> None:
    pins = json.loads((CONTRACTS / "package.json").read_text())["dependencies"]
    for name in chain.CONTRACT_NAMES:
        art = chain.load_artifact(name)
        assert art["compiler"]["npm"] == f"solc@{pins['solc']}"
        assert art["compiler"]["version"].startswith(pins["solc"] + "+commit.")
        assert art["openzeppelin"] == pins["@openzeppelin/contracts"]
        assert art["settings"]["optimizer"]["enabled"] is True
        assert len(art["sourcesSha256"]) == 64
        assert art["bytecode"].startswith("0x60") and len(art["bytecode"]) > 1000


def test_deploy_all_wires_token_and_roles(d: Deployment, accts: dict[str, str]) -> None:
    assert d.staking.functions.token().call() == d.token.address
    assert d.staking.functions.slashPool().call() == accts["pool"]
    assert d.staking.functions.unbondDelay().call() == UNBOND_DELAY
    assert d.distributor.functions.token().call() == d.token.address
    assert d.staking.functions.hasRole(ROLE_SLASHER, accts["slasher"]).call()
    assert d.distributor.functions.hasRole(ROLE_POSTER, accts["poster"]).call()
    assert d.anchor.functions.hasRole(ROLE_ANCHOR, accts["anchorer"]).call()
    assert d.balance(accts["alice"]) == 1_000


def test_constructors_reject_zero_addresses(w3: Web3, d: Deployment, accts: dict[str, str]) -> None:
    with reverts("ZeroAddress"):
        chain.deploy(w3, "Staking", d.token.address, 1, ZERO, accts["admin"])
    with reverts("ZeroAddress"):
        chain.deploy(w3, "PayoutDistributor", ZERO, accts["admin"])
    with reverts("ZeroAddress"):
        chain.deploy(w3, "CheckpointAnchor", ZERO)


def test_token_mint_is_owner_only(d: Deployment, accts: dict[str, str]) -> None:
    with reverts("OwnableUnauthorizedAccount"):
        chain.transact(d.w3, d.token.functions.mint(accts["mallory"], 1), accts["mallory"])


# --- staking --------------------------------------------------------------------------------


def test_bond_unbond_after_delay(w3: Web3, d: Deployment, accts: dict[str, str]) -> None:
    alice = accts["alice"]
    r = d.bond(alice, 600)
    [ev] = chain.events(d.staking, "Bonded", r)
    assert (ev["args"]["account"], ev["args"]["amount"], ev["args"]["totalBonded"]) == (
        alice,
        600,
        600,
    )
    assert d.balance(alice) == 400

    r = d.request_unbond(alice, 250)
    [ev] = chain.events(d.staking, "UnbondRequested", r)
    release_at = ev["args"]["releaseAt"]
    assert ev["args"]["amount"] == 250 and ev["args"]["totalPending"] == 250
    assert release_at == w3.eth.get_block(r["blockNumber"])["timestamp"] + UNBOND_DELAY
    assert d.bonded(alice) == 350
    assert d.pending_unbond(alice) == (250, release_at)

    with reverts("UnbondNotReady") as exc:
        d.complete_unbond(alice)
    assert exc.value.args_[:2] == (alice, release_at)

    time_travel(w3, release_at)
    r = d.complete_unbond(alice)
    [ev] = chain.events(d.staking, "UnbondCompleted", r)
    assert (ev["args"]["account"], ev["args"]["amount"]) == (alice, 250)
    assert d.balance(alice) == 650
    assert d.pending_unbond(alice) == (0, 0)
    with reverts("NoPendingUnbond"):
        d.complete_unbond(alice)


def test_new_unbond_request_restarts_delay(w3: Web3, d: Deployment, accts: dict[str, str]) -> None:
    alice = accts["alice"]
    d.bond(alice, 100)
    d.request_unbond(alice, 10)
    first_release = d.pending_unbond(alice)[1]
    time_travel(w3, first_release - 10)
    d.request_unbond(alice, 5)
    amount, release = d.pending_unbond(alice)
    assert amount == 15 and release > first_release
    time_travel(w3, first_release + 1)
    with reverts("UnbondNotReady"):
        d.complete_unbond(alice)


def test_staking_input_reverts(d: Deployment, accts: dict[str, str]) -> None:
    alice = accts["alice"]
    with reverts("ZeroAmount"):
        d.bond(alice, 0)
    d.bond(alice, 100)
    with reverts("ZeroAmount"):
        d.request_unbond(alice, 0)
    with reverts("InsufficientBond") as exc:
        d.request_unbond(alice, 101)
    assert exc.value.args_ == (alice, 101, 100)
    with reverts("NoPendingUnbond"):
        d.complete_unbond(accts["bob"])


def test_bond_without_allowance_reverts(d: Deployment, accts: dict[str, str]) -> None:
    with reverts("ERC20InsufficientAllowance"):
        chain.transact(d.w3, d.staking.functions.bond(1), accts["alice"])


def test_slash_bonded_then_pending_to_pool(d: Deployment, accts: dict[str, str]) -> None:
    alice, pool, slasher = accts["alice"], accts["pool"], accts["slasher"]
    d.bond(alice, 100)
    d.request_unbond(alice, 40)  # 60 bonded, 40 pending
    reason = keccak(text="verdict-quorum-failed:lease-7")
    r = d.slash(slasher, alice, 80, reason)
    [ev] = chain.events(d.staking, "Slashed", r)
    assert (ev["args"]["account"], ev["args"]["amount"], ev["args"]["reason"]) == (
        alice,
        80,
        reason,
    )
    assert (ev["args"]["pool"], ev["args"]["slasher"]) == (pool, slasher)
    assert d.bonded(alice) == 0
    assert d.pending_unbond(alice)[0] == 20
    assert d.balance(pool) == 80
    assert d.staking.functions.stakeOf(alice).call() == 20


def test_slash_reverts(d: Deployment, accts: dict[str, str]) -> None:
    alice, slasher, mallory = accts["alice"], accts["slasher"], accts["mallory"]
    d.bond(alice, 50)
    with reverts("AccessControlUnauthorizedAccount") as exc:
        d.slash(mallory, alice, 1, b"\x00" * 32)
    assert exc.value.args_ == (mallory, ROLE_SLASHER)
    with reverts("ZeroAmount"):
        d.slash(slasher, alice, 0, b"\x00" * 32)
    with reverts("SlashExceedsStake") as exc:
        d.slash(slasher, alice, 51, b"\x00" * 32)
    assert exc.value.args_ == (alice, 51, 50)
    assert d.bonded(alice) == 50


def test_slash_pool_admin(d: Deployment, accts: dict[str, str]) -> None:
    admin, bob, mallory = accts["admin"], accts["bob"], accts["mallory"]
    fn = d.staking.functions
    with reverts("AccessControlUnauthorizedAccount"):
        chain.transact(d.w3, fn.setSlashPool(mallory), mallory)
    with reverts("ZeroAddress"):
        chain.transact(d.w3, fn.setSlashPool(ZERO), admin)
    r = chain.transact(d.w3, fn.setSlashPool(bob), admin)
    [ev] = chain.events(d.staking, "SlashPoolChanged", r)
    assert (ev["args"]["previousPool"], ev["args"]["newPool"]) == (accts["pool"], bob)


# --- payouts --------------------------------------------------------------------------------


def _fund(d: Deployment, amount: int) -> None:
    d.mint(d.distributor.address, amount)


def test_leaf_matches_contract(d: Deployment, accts: dict[str, str]) -> None:
    for account, value in [(accts["alice"], 0), (accts["bob"], 2**256 - 1), (accts["carol"], 77)]:
        assert d.distributor.functions.leaf(account, value).call() == leaf_hash(account, value)


def test_claim_cumulative_across_epochs(d: Deployment, accts: dict[str, str]) -> None:
    alice, bob, carol, poster = accts["alice"], accts["bob"], accts["carol"], accts["poster"]
    _fund(d, 1_000)
    before = {a: d.balance(a) for a in (alice, bob, carol)}
    e1 = MerkleTree([(alice, 100), (bob, 30), (carol, 5)])
    r = d.post_root(poster, 1, e1.root)
    [ev] = chain.events(d.distributor, "RootPosted", r)
    assert (ev["args"]["epoch"], ev["args"]["root"], ev["args"]["poster"]) == (1, e1.root, poster)
    assert d.distributor.functions.latestEpoch().call() == 1

    r = d.claim(1, alice, 100, e1.proof(0))
    [ev] = chain.events(d.distributor, "Claimed", r)
    assert (
        ev["args"]["epoch"],
        ev["args"]["account"],
        ev["args"]["amount"],
        ev["args"]["cumulativeAmount"],
    ) == (
        1,
        alice,
        100,
        100,
    )

    # epoch 2: cumulative amounts grow; alice gets only the difference
    e2 = MerkleTree([(alice, 160), (bob, 30), (carol, 25)])
    d.post_root(poster, 2, e2.root)
    r = d.claim(2, alice, 160, e2.proof(0))
    assert chain.events(d.distributor, "Claimed", r)[0]["args"]["amount"] == 60
    # bob never claimed epoch 1; his epoch-2 leaf covers it all
    d.claim(2, bob, 30, e2.proof(1))
    # relayed claim: anyone may submit, funds go to the account
    d.claim(2, carol, 25, e2.proof(2), sender=accts["mallory"])

    assert d.balance(alice) - before[alice] == 160
    assert d.balance(bob) - before[bob] == 30
    assert d.balance(carol) - before[carol] == 25
    assert d.claimed(alice) == 160
    assert d.balance(d.distributor.address) == 1_000 - 215

    # the superseded epoch-1 leaf pays nothing more
    with reverts("NothingToClaim"):
        d.claim(1, alice, 100, e1.proof(0))


def test_single_leaf_tree_has_empty_proof(d: Deployment, accts: dict[str, str]) -> None:
    _fund(d, 10)
    tree = MerkleTree([(accts["alice"], 10)])
    assert tree.proof(0) == [] and tree.root == leaf_hash(accts["alice"], 10)
    d.post_root(accts["poster"], 1, tree.root)
    d.claim(1, accts["alice"], 10, [])
    assert d.claimed(accts["alice"]) == 10


def test_post_root_reverts(d: Deployment, accts: dict[str, str]) -> None:
    poster, mallory = accts["poster"], accts["mallory"]
    root = keccak(text="root")
    with reverts("AccessControlUnauthorizedAccount") as exc:
        d.post_root(mallory, 1, root)
    assert exc.value.args_ == (mallory, ROLE_POSTER)
    with reverts("ZeroRoot"):
        d.post_root(poster, 1, b"\x00" * 32)
    with reverts("EpochNotIncreasing"):
        d.post_root(poster, 0, root)
    d.post_root(poster, 3, root)
    with reverts("EpochNotIncreasing") as exc:
        d.post_root(poster, 3, keccak(text="other"))
    assert exc.value.args_ == (3, 3)
    with reverts("EpochNotIncreasing"):
        d.post_root(poster, 2, root)
    assert d.distributor.functions.rootOf(3).call() == root


def test_claim_reverts(d: Deployment, accts: dict[str, str]) -> None:
    alice, bob, poster = accts["alice"], accts["bob"], accts["poster"]
    _fund(d, 1_000)
    tree = MerkleTree([(alice, 100), (bob, 40)])
    with reverts("UnknownEpoch"):
        d.claim(1, alice, 100, tree.proof(0))
    d.post_root(poster, 1, tree.root)

    # bad proof: bob's proof for alice's leaf, a tampered sibling, and an empty proof
    with reverts("InvalidProof"):
        d.claim(1, alice, 100, tree.proof(1))
    with reverts("InvalidProof"):
        d.claim(1, alice, 100, [keccak(text="x")])
    with reverts("InvalidProof"):
        d.claim(1, alice, 100, [])
    # claiming above the committed cumulative amount
    with reverts("InvalidProof") as exc:
        d.claim(1, alice, 101, tree.proof(0))
    assert exc.value.args_ == (1, alice, 101)
    # another account can't claim with alice's leaf
    with reverts("InvalidProof"):
        d.claim(1, bob, 100, tree.proof(0))

    d.claim(1, alice, 100, tree.proof(0))
    with reverts("NothingToClaim") as exc:
        d.claim(1, alice, 100, tree.proof(0))
    assert exc.value.args_ == (alice, 100, 100)
    assert d.claimed(alice) == 100


def test_claim_with_underfunded_distributor(d: Deployment, accts: dict[str, str]) -> None:
    _fund(d, 50)
    tree = MerkleTree([(accts["alice"], 100), (accts["bob"], 40)])
    d.post_root(accts["poster"], 1, tree.root)
    with reverts("InsufficientFunds") as exc:
        d.claim(1, accts["alice"], 100, tree.proof(0))
    assert exc.value.args_ == (100, 50)
    assert d.claimed(accts["alice"]) == 0


# --- checkpoint anchor ------------------------------------------------------------------------


def test_anchor_appends_and_reads(d: Deployment, accts: dict[str, str]) -> None:
    anchorer = accts["anchorer"]
    roots = [keccak(text=f"checkpoint-{i}") for i in range(3)]
    for i, root in enumerate(roots):
        r = d.anchor_checkpoint(anchorer, i, root)
        [ev] = chain.events(d.anchor, "CheckpointAnchored", r)
        assert (ev["args"]["index"], ev["args"]["root"], ev["args"]["anchorer"]) == (
            i,
            root,
            anchorer,
        )
    assert d.anchor.functions.count().call() == 3
    assert [d.checkpoint(i) for i in range(3)] == roots


def test_anchor_reverts(d: Deployment, accts: dict[str, str]) -> None:
    anchorer, mallory = accts["anchorer"], accts["mallory"]
    root = keccak(text="cp")
    with reverts("AccessControlUnauthorizedAccount") as exc:
        d.anchor_checkpoint(mallory, 0, root)
    assert exc.value.args_ == (mallory, ROLE_ANCHOR)
    with reverts("ZeroRoot"):
        d.anchor_checkpoint(anchorer, 0, b"\x00" * 32)
    with reverts("IndexMismatch") as exc:
        d.anchor_checkpoint(anchorer, 1, root)
    assert exc.value.args_ == (0, 1)
    d.anchor_checkpoint(anchorer, 0, root)
    with reverts("IndexMismatch"):
        d.anchor_checkpoint(anchorer, 0, root)
    with reverts("UnknownIndex") as exc:
        d.checkpoint(1)
    assert exc.value.args_ == (1, 1)


# --- deposit vault ----------------------------------------------------------------------------

CONSUMER = uuid.UUID("3f2b8a8e-52a4-4a57-9d7e-0d5b8e1f6a01")


def test_deploy_all_lets_the_vault_pay_the_distributor(d: Deployment) -> None:
    assert d.vault.functions.token().call() == d.token.address
    assert d.vault.functions.allowedRecipient(d.distributor.address).call() is True
    assert d.vault.functions.allowedRecipient(d.staking.address).call() is False


def test_deposit_pulls_the_token_and_names_the_consumer(
    d: Deployment, accts: dict[str, str]
) -> None:
    alice = accts["alice"]
    r = d.deposit(alice, CONSUMER, 300)
    [ev] = chain.events(d.vault, "Deposited", r)
    assert (ev["args"]["consumer"], ev["args"]["from"], ev["args"]["amount"]) == (
        CONSUMER.bytes,
        alice,
        300,
    )
    assert d.balance(alice) == 700 and d.balance(d.vault.address) == 300
    d.deposit(alice, CONSUMER.bytes, 1)  # the raw 16 bytes work as well
    assert d.balance(d.vault.address) == 301


def test_deposit_reverts(d: Deployment, accts: dict[str, str]) -> None:
    alice, mallory = accts["alice"], accts["mallory"]
    with reverts("ZeroConsumer"):
        d.deposit(alice, bytes(16), 1)
    with reverts("ZeroAmount"):
        d.deposit(alice, CONSUMER, 0)
    with reverts("ERC20InsufficientAllowance"):
        chain.transact(d.w3, d.vault.functions.deposit(CONSUMER.bytes, 1), alice)
    with reverts("ERC20InsufficientBalance") as exc:
        d.deposit(mallory, CONSUMER, 5)
    assert exc.value.args_ == (mallory, 0, 5)
    assert d.balance(d.vault.address) == 0


def test_vault_constructor_rejects_zero_addresses(
    w3: Web3, d: Deployment, accts: dict[str, str]
) -> None:
    with reverts("ZeroAddress"):
        chain.deploy(w3, "DepositVault", ZERO, accts["admin"])
    with reverts("ZeroAddress"):
        chain.deploy(w3, "DepositVault", d.token.address, ZERO)


def test_withdraw_to_an_allowed_recipient(d: Deployment, accts: dict[str, str]) -> None:
    withdrawer = accts["withdrawer"]
    d.deposit(accts["alice"], CONSUMER, 500)
    memo = b"payout-epoch".ljust(32, b"\0")
    r = d.withdraw(withdrawer, d.distributor.address, 200, memo)
    [ev] = chain.events(d.vault, "Withdrawn", r)
    assert (ev["args"]["to"], ev["args"]["amount"], ev["args"]["memo"]) == (
        d.distributor.address,
        200,
        memo,
    )
    assert ev["args"]["withdrawer"] == withdrawer
    assert d.balance(d.distributor.address) == 200 and d.balance(d.vault.address) == 300


def test_withdraw_reverts(d: Deployment, accts: dict[str, str]) -> None:
    withdrawer, mallory, bob = accts["withdrawer"], accts["mallory"], accts["bob"]
    memo = bytes(32)
    d.deposit(accts["alice"], CONSUMER, 100)
    with reverts("AccessControlUnauthorizedAccount") as exc:
        d.withdraw(mallory, d.distributor.address, 1, memo)
    assert exc.value.args_ == (mallory, ROLE_WITHDRAWER)
    with reverts("ZeroAmount"):
        d.withdraw(withdrawer, d.distributor.address, 0, memo)
    with reverts("RecipientNotAllowed") as exc:
        d.withdraw(withdrawer, bob, 1, memo)
    assert exc.value.args_ == (bob,)
    with reverts("InsufficientVaultBalance") as exc:
        d.withdraw(withdrawer, d.distributor.address, 101, memo)
    assert exc.value.args_ == (101, 100)
    assert d.balance(d.vault.address) == 100


def test_recipients_are_set_by_the_admin_only(d: Deployment, accts: dict[str, str]) -> None:
    admin, mallory, bob = accts["admin"], accts["mallory"], accts["bob"]
    fn = d.vault.functions
    with reverts("AccessControlUnauthorizedAccount"):
        chain.transact(d.w3, fn.setRecipient(mallory, True), mallory)
    with reverts("ZeroAddress"):
        d.set_recipient(ZERO, True)
    r = chain.transact(d.w3, fn.setRecipient(bob, True), admin)
    [ev] = chain.events(d.vault, "RecipientAllowed", r)
    assert (ev["args"]["recipient"], ev["args"]["allowed"]) == (bob, True)
    d.deposit(accts["alice"], CONSUMER, 10)
    d.withdraw(accts["withdrawer"], bob, 4, bytes(32))
    d.set_recipient(d.distributor.address, False)
    with reverts("RecipientNotAllowed"):
        d.withdraw(accts["withdrawer"], d.distributor.address, 1, bytes(32))


# --- artifacts match sources -------------------------------------------------------------------

needs_solc = pytest.mark.skipif(
    not (CONTRACTS / "node_modules" / "solc").is_dir() or shutil.which("node") is None,
    reason="contracts/node_modules missing (run `npm ci --prefix contracts`) or node not on PATH",
)


def _build(contracts_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(contracts_dir / "build.py"), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


@needs_solc
def test_committed_artifacts_match_sources() -> None:
    proc = _build(CONTRACTS, "--check")
    assert proc.returncode == 0, proc.stderr


@needs_solc
def test_check_detects_stale_artifact(tmp_path: Path) -> None:
    copy = tmp_path / "contracts"
    shutil.copytree(CONTRACTS, copy, ignore=shutil.ignore_patterns("node_modules", "__pycache__"))
    (copy / "node_modules").symlink_to(CONTRACTS / "node_modules")
    src = copy / "src" / "CheckpointAnchor.sol"
    src.write_text(src.read_text().replace("bytes32[] private _roots;", "bytes32[] public _roots;"))
    proc = _build(copy, "--check")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "stale artifact: contracts/artifacts/CheckpointAnchor.json" in proc.stderr
    assert "deployedBytecode" in proc.stderr and "sourcesSha256" in proc.stderr
