"""Small web3.py client for the aether-ledger contracts.

Loads the committed artifacts in ``contracts/artifacts``, deploys them, and wraps the calls
the settlement code and tests need. Reverts are raised as :class:`ContractRevert` with the
custom error decoded against the contract ABI, both for a real node (web3's
``ContractCustomError`` carrying hex data) and for the in-process eth-tester provider.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from uuid import UUID

from eth_abi.abi import decode as abi_decode
from eth_account import Account
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.logs import DISCARD
from web3.middleware import SignAndSendRawMiddlewareBuilder
from web3.types import EventData, TxReceipt

ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"
CONTRACT_NAMES = ("TestToken", "Staking", "PayoutDistributor", "CheckpointAnchor", "DepositVault")

ROLE_SLASHER = keccak(text="SLASHER_ROLE")
ROLE_POSTER = keccak(text="POSTER_ROLE")
ROLE_ANCHOR = keccak(text="ANCHOR_ROLE")
ROLE_WITHDRAWER = keccak(text="WITHDRAWER_ROLE")

_ERROR_STRING = keccak(text="Error(string)")[:4]
_PANIC = keccak(text="Panic(uint256)")[:4]


class ArtifactError(RuntimeError):
    """An artifact is missing or malformed."""


class ContractRevert(RuntimeError):  # noqa: N818 - it is a revert, not an "Error"
    """A call or transaction reverted; ``error`` is the decoded custom error name."""

    def __init__(self, error: str, args: tuple[Any, ...], data: bytes) -> None:
        super().__init__(f"reverted with {error}{args!r}")
        self.error = error
        self.args_ = args
        self.data = data


@cache
def load_artifact(name: str) -> dict[str, Any]:
    path = ARTIFACTS_DIR / f"{name}.json"
    if not path.is_file():
        raise ArtifactError(f"no artifact {path}; run `python contracts/build.py`")
    artifact: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    for key in ("abi", "bytecode"):
        if key not in artifact:
            raise ArtifactError(f"artifact {path} has no {key!r}")
    return artifact


def _error_selectors() -> dict[bytes, tuple[str, list[str]]]:
    """4-byte selector -> (error name, input types) across all artifacts."""
    out: dict[bytes, tuple[str, list[str]]] = {}
    for name in CONTRACT_NAMES:
        for item in load_artifact(name)["abi"]:
            if item.get("type") != "error":
                continue
            types = [i["type"] for i in item["inputs"]]
            sig = f"{item['name']}({','.join(types)})"
            out[keccak(text=sig)[:4]] = (item["name"], types)
    return out


def revert_data(exc: BaseException) -> bytes | None:
    """Raw revert data carried by a web3 or eth-tester exception, if any."""
    data = getattr(exc, "data", None)
    if isinstance(data, str) and data.startswith("0x"):
        return bytes.fromhex(data[2:])
    message = str(exc.args[0]) if exc.args else ""
    prefix = "execution reverted: "
    if message.startswith(prefix) and message[len(prefix) :].startswith(("b'", 'b"')):
        try:
            value = ast.literal_eval(message[len(prefix) :])
        except (ValueError, SyntaxError):
            return None
        return value if isinstance(value, bytes) else None
    return None


def decode_revert(data: bytes) -> tuple[str, tuple[Any, ...]]:
    """Decode revert data into (error name, args)."""
    selector, payload = data[:4], data[4:]
    if selector == _ERROR_STRING:
        return "Error", tuple(abi_decode(["string"], payload))
    if selector == _PANIC:
        return "Panic", tuple(abi_decode(["uint256"], payload))
    known = _error_selectors().get(selector)
    if known is None:
        return f"unknown(0x{selector.hex()})", (payload,)
    name, types = known
    values = abi_decode(types, payload)
    return name, tuple(
        to_checksum_address(v) if t == "address" else v for t, v in zip(types, values, strict=True)
    )


def _raise_decoded(exc: Exception) -> None:
    data = revert_data(exc)
    if data is None or len(data) < 4:
        raise exc
    error, args = decode_revert(data)
    raise ContractRevert(error, args, data) from exc


def transact(w3: Web3, fn: ContractFunction, sender: str | None = None) -> TxReceipt:
    """Send ``fn`` from ``sender`` (default: first account) and wait; decode reverts."""
    frm = sender or w3.eth.accounts[0]
    try:
        tx_hash = fn.transact({"from": frm})
    except Exception as exc:  # web3 / eth-tester raise several types on revert
        _raise_decoded(exc)
        raise
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash)
    if receipt["status"] != 1:
        # a real node may mine a failing tx; replay it as a call to get the reason
        try:
            fn.call({"from": frm}, block_identifier=receipt["blockNumber"])
        except Exception as exc:
            _raise_decoded(exc)
        raise ContractRevert("unknown", (), b"")
    return receipt


def call(fn: ContractFunction, sender: str | None = None) -> Any:
    """Read-only call; decode reverts."""
    try:
        return fn.call({"from": sender} if sender else {})
    except Exception as exc:
        _raise_decoded(exc)
        raise


def deploy(w3: Web3, name: str, *args: Any, sender: str | None = None) -> Contract:
    """Deploy artifact ``name`` with constructor ``args``; returns the bound contract."""
    artifact = load_artifact(name)
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    frm = sender or w3.eth.accounts[0]
    try:
        tx_hash = factory.constructor(*args).transact({"from": frm})
    except Exception as exc:
        _raise_decoded(exc)
        raise
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash)
    address = receipt["contractAddress"]
    if receipt["status"] != 1 or address is None:
        raise ContractRevert("deployment failed", (name,), b"")
    return at(w3, name, address)


def at(w3: Web3, name: str, address: str) -> Contract:
    """Bind artifact ``name`` at an existing ``address``."""
    return w3.eth.contract(address=to_checksum_address(address), abi=load_artifact(name)["abi"])


def events(contract: Contract, event: str, receipt: TxReceipt) -> list[EventData]:
    """Decoded ``event`` logs emitted by ``contract`` in ``receipt``."""
    own = [log for log in receipt["logs"] if log["address"] == contract.address]
    return list(contract.events[event]().process_receipt({**receipt, "logs": own}, errors=DISCARD))


@dataclass(frozen=True)
class Deployment:
    """One deployed set of the marketplace contracts."""

    w3: Web3
    admin: str
    token: Contract
    staking: Contract
    distributor: Contract
    anchor: Contract
    vault: Contract

    # --- token -------------------------------------------------------------
    def mint(self, to: str, amount: int) -> TxReceipt:
        return transact(self.w3, self.token.functions.mint(to, amount), self.admin)

    def approve(self, owner: str, spender: str, amount: int) -> TxReceipt:
        return transact(self.w3, self.token.functions.approve(spender, amount), owner)

    def balance(self, account: str) -> int:
        return int(call(self.token.functions.balanceOf(account)))

    # --- roles -------------------------------------------------------------
    def grant(self, contract: Contract, role: bytes, account: str) -> TxReceipt:
        return transact(self.w3, contract.functions.grantRole(role, account), self.admin)

    # --- staking -----------------------------------------------------------
    def bond(self, account: str, amount: int) -> TxReceipt:
        self.approve(account, self.staking.address, amount)
        return transact(self.w3, self.staking.functions.bond(amount), account)

    def request_unbond(self, account: str, amount: int) -> TxReceipt:
        return transact(self.w3, self.staking.functions.requestUnbond(amount), account)

    def complete_unbond(self, account: str) -> TxReceipt:
        return transact(self.w3, self.staking.functions.completeUnbond(), account)

    def slash(self, slasher: str, account: str, amount: int, reason: bytes) -> TxReceipt:
        return transact(self.w3, self.staking.functions.slash(account, amount, reason), slasher)

    def bonded(self, account: str) -> int:
        return int(call(self.staking.functions.bonded(account)))

    def stake_of(self, account: str) -> int:
        """Slashable stake on chain: bonded + pending unbond."""
        return int(call(self.staking.functions.stakeOf(account)))

    def pending_unbond(self, account: str) -> tuple[int, int]:
        amount, release_at = call(self.staking.functions.pendingUnbond(account))
        return int(amount), int(release_at)

    # --- payouts -----------------------------------------------------------
    def post_root(self, poster: str, epoch: int, root: bytes) -> TxReceipt:
        return transact(self.w3, self.distributor.functions.postRoot(epoch, root), poster)

    def claim(
        self,
        epoch: int,
        account: str,
        cumulative: int,
        proof: Sequence[bytes],
        sender: str | None = None,
    ) -> TxReceipt:
        fn = self.distributor.functions.claim(epoch, account, cumulative, list(proof))
        return transact(self.w3, fn, sender or account)

    def claimed(self, account: str) -> int:
        return int(call(self.distributor.functions.claimed(account)))

    # --- checkpoints -------------------------------------------------------
    def anchor_checkpoint(self, anchorer: str, index: int, root: bytes) -> TxReceipt:
        return transact(self.w3, self.anchor.functions.anchor(index, root), anchorer)

    def checkpoint(self, index: int) -> bytes:
        return bytes(call(self.anchor.functions.rootAt(index)))

    # --- deposits ----------------------------------------------------------
    def deposit(self, sender: str, consumer: UUID | bytes, amount: int) -> TxReceipt:
        """Approve and pay `amount` from `sender` into the vault for `consumer` (its UUID)."""
        consumer_bytes = consumer.bytes if isinstance(consumer, UUID) else consumer
        self.approve(sender, self.vault.address, amount)
        return transact(self.w3, self.vault.functions.deposit(consumer_bytes, amount), sender)

    def set_recipient(self, recipient: str, allowed: bool) -> TxReceipt:
        fn = self.vault.functions.setRecipient(recipient, allowed)
        return transact(self.w3, fn, self.admin)

    def withdraw(self, withdrawer: str, to: str, amount: int, memo: bytes) -> TxReceipt:
        fn = self.vault.functions.withdraw(to, amount, memo)
        return transact(self.w3, fn, withdrawer)


def deploy_all(w3: Web3, *, admin: str, slash_pool: str, unbond_delay: int) -> Deployment:
    """Deploy token, staking, distributor, anchor and deposit vault, all administered by
    ``admin``; the vault may pay out to the distributor (no roles are granted)."""
    token = deploy(w3, "TestToken", "Aether Test", "AETH", admin, sender=admin)
    staking = deploy(w3, "Staking", token.address, unbond_delay, slash_pool, admin, sender=admin)
    distributor = deploy(w3, "PayoutDistributor", token.address, admin, sender=admin)
    anchor = deploy(w3, "CheckpointAnchor", admin, sender=admin)
    vault = deploy(w3, "DepositVault", token.address, admin, sender=admin)
    deployment = Deployment(w3, admin, token, staking, distributor, anchor, vault)
    deployment.set_recipient(distributor.address, True)
    return deployment


def bind_all(
    w3: Web3,
    *,
    admin: str,
    token: str,
    staking: str,
    distributor: str,
    anchor: str,
    vault: str,
) -> Deployment:
    """The deployment already on chain at these addresses (``admin`` may be any address:
    only admin calls use it)."""
    return Deployment(
        w3,
        to_checksum_address(admin),
        at(w3, "TestToken", token),
        at(w3, "Staking", staking),
        at(w3, "PayoutDistributor", distributor),
        at(w3, "CheckpointAnchor", anchor),
        at(w3, "DepositVault", vault),
    )


def sign_with(w3: Web3, private_keys: Sequence[str]) -> list[str]:
    """Sign transactions sent ``from`` these keys' addresses locally (a real node holds no
    keys): web3's SignAndSendRawMiddleware. Returns the keys' addresses, in order."""
    accounts = [Account.from_key(k) for k in private_keys]
    if accounts:
        w3.middleware_onion.inject(
            SignAndSendRawMiddlewareBuilder.build(accounts), name="aether_signing", layer=0
        )
    return [str(a.address) for a in accounts]
