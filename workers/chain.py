"""The chain side of the marketplace: the chain watcher, the slash mirror, the payout gateway
and the reads the reconciliation needs.

- `ChainWatcher` reads, block range by block range up to ``head - confirmations``, the logs
  of `DepositVault.Deposited`, `Staking.Bonded` and `PayoutDistributor.Claimed`, and turns
  each into one marketplace command whose ids derive from the log's place on chain,
  ``ref = f"{tx_hash}:{log_index}"``: a re-read, a crash or a restart is an idempotent retry
  of the same command, never a second credit.

  ========================  ==================================================================
  log                        command
  ========================  ==================================================================
  Deposited(consumer,...)    ConfirmDeposit(command_id, deposit_id = uuid5(DEPOSIT_NAMESPACE,
                             ref), consumer_id = UUID(bytes=consumer), amount, reference=ref)
  Bonded(account, amount)    BondStake(command_id, provider of `account`, amount)
  Claimed(epoch, account..)  RecordPayoutClaim(command_id, provider of `account`, epoch,
                             cumulative, amount, reference=ref)
  ========================  ==================================================================

  command_id = uuid5(COMMAND_NAMESPACE, ref). A log the marketplace cannot take (an address
  no provider registered, a command the service refuses) is logged and written to
  ``chain_skipped`` with the reason, and the watcher goes on. Its cursor (the last block
  taken) is in ``chain_cursor``; it advances after the commands of a range were handled, so
  a crash re-reads at most one range, as retries.
- `SlashMirror` sends every `StakeSlashed` of the marketplace log to `Staking.slash` from
  the SLASHER_ROLE account, exactly once: each slash is named on chain by
  ``reason = slash_reason(provider_id, stake stream version)``; before sending it writes an
  intent row (``chain_slashes``, with the block and the slasher's nonce), after the receipt
  it marks the row sent. A row found "sending" at start-up (a crash mid-send) is resolved
  from the chain: a `Slashed` log with that reason means sent; a transaction still pending
  from the slasher means wait; otherwise it is sent again.
- `PayoutGateway.post_payout_root(epoch, root, fund_amount)` funds the distributor from the
  vault (`DepositVault.withdraw`, memo = `payout_memo(epoch)`, at most once per epoch) and
  posts the root (POSTER_ROLE); both steps are skipped when already done, and a different
  root (or funding) for the epoch is `PayoutConflictError`.
- `ChainReader`: posted roots, claims, deposits per consumer, stake per address, slashes.

Tables (in POSTGRES_SCHEMA): ``chain_cursor``, ``chain_skipped``, ``chain_slashes``, every
row keyed by the chain's identity (`Chain.key`: chain id, genesis hash, vault address), so a
fresh in-process chain never inherits the cursor of an earlier one.

Configuration (`ledger.config.Settings`, from the environment):

- ``ETH_RPC_URL``: an http(s) JSON-RPC node. Unset: the embedded default, an in-process
  chain (eth-tester with py-evm) with every contract deployed at start (`embedded_chain`)
  and the role accounts taken from its unlocked accounts.
- With ``ETH_RPC_URL``: ``CHAIN_TOKEN_ADDRESS``, ``CHAIN_STAKING_ADDRESS``,
  ``CHAIN_DISTRIBUTOR_ADDRESS``, ``CHAIN_VAULT_ADDRESS``, ``CHAIN_ANCHOR_ADDRESS`` (all
  required), and the private keys ``CHAIN_SLASHER_KEY`` (Staking SLASHER_ROLE),
  ``CHAIN_POSTER_KEY`` (PayoutDistributor POSTER_ROLE), ``CHAIN_WITHDRAWER_KEY``
  (DepositVault WITHDRAWER_ROLE); transactions are signed locally. A key left unset makes
  only the operation that needs it fail, with a clear error.
- ``CHAIN_CONFIRMATIONS`` (default 12), ``CHAIN_START_BLOCK`` (the deployment's block,
  default 0), ``CHAIN_POLL_INTERVAL_S`` (default 2).

Run as a process: ``python -m workers.chain`` (watcher and mirror in one loop).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4, uuid5

from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from eventsourcing.postgres import PostgresDatastore
from eventsourcing.utils import get_topic
from hexbytes import HexBytes
from psycopg.sql import SQL, Identifier
from web3 import EthereumTesterProvider, HTTPProvider, Web3
from web3.contract import Contract
from web3.types import EventData, FilterParams, LogReceipt

from contracts import chain as c
from contracts.chain import ROLE_POSTER, ROLE_SLASHER, ROLE_WITHDRAWER, ContractRevert, Deployment
from domain.stake import StakeRules, StakeSlashed
from ledger.config import Settings
from ledger.errors import ConfigurationError
from ledger.market import service as m
from ledger.market.store import MarketplaceApplication

log = logging.getLogger(__name__)

DEPOSIT_NAMESPACE = UUID("7d1f2c4e-6a8b-5c3d-9e0f-1a2b3c4d5e6f")
"""deposit_id = uuid5(DEPOSIT_NAMESPACE, "<tx hash>:<log index>"). Never change."""
COMMAND_NAMESPACE = UUID("2e9a7b1c-3d4f-5a6b-8c7d-9e0f1a2b3c4d")
"""command_id of a watcher command = uuid5(COMMAND_NAMESPACE, "<tx hash>:<log index>")."""

BLOCKS_PER_POLL_MAX = 1_000
"""Most blocks one eth_getLogs asks for (nodes cap the range)."""
SLASHES_PER_PASS_MAX = 256
"""Most slashes one mirror pass sends."""
MARKET_PAGE_SIZE_MAX = 1_000
"""Marketplace log notifications read per query by the mirror."""
COMMAND_ATTEMPTS_MAX = 3
"""Most times the watcher sends one command that lost a race to another writer."""
RETRY_PAUSE_S_MAX = 30.0
"""Longest pause of the run loop after a failed pass (doubles from the poll interval)."""
DETAIL_LENGTH_MAX = 1_000
"""Longest detail stored with a skipped log."""

WATCHER_CURSOR = "watcher"
MIRROR_CURSOR = "slash_mirror"
STAKE_SLASHED_TOPIC = get_topic(StakeSlashed)

NO_ADMIN = "0x" + "00" * 20
"""The admin of a bound deployment: the service makes no admin calls in production."""


class ChainError(Exception):
    """Base of the chain integration's errors."""


class PayoutConflictError(ChainError):
    """The chain already holds another root, or other funding, for the epoch."""


class ChainKeyMissingError(ConfigurationError, ChainError):
    """An operation needs a role's key that is not configured."""


# -- the chain ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainRoles:
    """The accounts that act for the protocol; None: no key configured for the role."""

    slasher: str | None
    poster: str | None
    withdrawer: str | None


@dataclass(frozen=True, slots=True)
class Chain:
    """One chain with the marketplace's contracts, and who acts for the protocol on it."""

    deployment: Deployment
    roles: ChainRoles
    key: str
    """The chain's identity: "<chain id>:<genesis hash>:<vault address>"."""
    start_block: int
    embedded: bool

    @property
    def w3(self) -> Web3:
        return self.deployment.w3

    def role(self, name: str) -> str:
        account: str | None = getattr(self.roles, name)
        if account is None:
            env = f"CHAIN_{name.upper()}_KEY"
            raise ChainKeyMissingError(f"no {name} account: set {env} (its private key)")
        return account


def chain_key(w3: Web3, vault_address: str) -> str:
    genesis = w3.eth.get_block(0)["hash"]
    assert genesis is not None
    return f"{w3.eth.chain_id}:{HexBytes(genesis).to_0x_hex()}:{to_checksum_address(vault_address)}"


def embedded_chain(*, unbond_delay_s: int | None = None) -> Chain:
    """A fresh in-process chain (eth-tester, py-evm) with every contract deployed. Accounts:
    0 admin, 1 insurance pool (slashed stake), 2 slasher, 3 poster, 4 withdrawer; 5.. free.
    `unbond_delay_s`: Staking.unbondDelay (default: the stake rules' default)."""
    if unbond_delay_s is None:
        unbond_delay_s = StakeRules().unbond_delay_s
    w3 = Web3(EthereumTesterProvider())
    accounts = [str(a) for a in w3.eth.accounts]
    admin, pool, slasher, poster, withdrawer = accounts[:5]
    d = c.deploy_all(w3, admin=admin, slash_pool=pool, unbond_delay=unbond_delay_s)
    d.grant(d.staking, ROLE_SLASHER, slasher)
    d.grant(d.distributor, ROLE_POSTER, poster)
    d.grant(d.vault, ROLE_WITHDRAWER, withdrawer)
    roles = ChainRoles(slasher, poster, withdrawer)
    # Two in-process chains made in the same second share a genesis (its hash covers the
    # timestamp): a nonce keeps each fresh chain's cursors its own.
    key = f"{chain_key(w3, d.vault.address)}:embedded-{uuid4().hex}"
    return Chain(d, roles, key, 0, embedded=True)


def open_chain(settings: Settings) -> Chain:
    """ETH_RPC_URL and the CHAIN_* settings (see the module docstring); unset ETH_RPC_URL:
    `embedded_chain()`."""
    if settings.eth_rpc_url is None:
        return embedded_chain()
    addresses = {
        "token": settings.chain_token_address,
        "staking": settings.chain_staking_address,
        "distributor": settings.chain_distributor_address,
        "anchor": settings.chain_anchor_address,
        "vault": settings.chain_vault_address,
    }
    missing = [f"CHAIN_{k.upper()}_ADDRESS" for k, v in addresses.items() if v is None]
    if missing:
        raise ConfigurationError(f"ETH_RPC_URL is set; also set {', '.join(missing)}")
    w3 = Web3(HTTPProvider(settings.eth_rpc_url, request_kwargs={"timeout": 30}))
    keys = {
        "slasher": settings.chain_slasher_key,
        "poster": settings.chain_poster_key,
        "withdrawer": settings.chain_withdrawer_key,
    }
    try:
        signers = c.sign_with(w3, [k.get_secret_value() for k in keys.values() if k is not None])
    except ValueError as e:
        raise ConfigurationError(f"a CHAIN_*_KEY is not a valid private key: {e}") from None
    by_role = iter(signers)
    roles = ChainRoles(**{role: next(by_role) if k else None for role, k in keys.items()})
    d = c.bind_all(w3, admin=NO_ADMIN, **_present(addresses))
    try:
        key = chain_key(w3, d.vault.address)
    except Exception as e:  # web3 raises several types for a node it cannot reach
        raise ChainError(f"cannot reach the node at ETH_RPC_URL {settings.eth_rpc_url}: {e}") from e
    return Chain(d, roles, key, settings.chain_start_block, embedded=False)


def _present(addresses: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in addresses.items() if v is not None}


def mine_blocks(chain: Chain, count: int) -> None:
    """Mine `count` empty blocks (the in-process chain only; a real one mines itself)."""
    provider = chain.w3.provider
    if not isinstance(provider, EthereumTesterProvider) or provider.ethereum_tester is None:
        raise ChainError("mine_blocks needs the in-process chain")
    provider.ethereum_tester.mine_blocks(count)


def _event_topic(contract: Contract, name: str) -> HexBytes:
    abi: Any
    [abi] = [
        item for item in contract.abi if item.get("type") == "event" and item.get("name") == name
    ]
    types = ",".join(str(i["type"]) for i in abi.get("inputs", ()))
    return HexBytes(keccak(text=f"{name}({types})"))


def _topic_of_address(address: str) -> HexBytes:
    return HexBytes(bytes(12) + bytes.fromhex(to_checksum_address(address)[2:]))


def log_ref(entry: LogReceipt | EventData) -> str:
    """ "0x<tx hash>:<log index>": where a log is on chain."""
    return f"{HexBytes(entry['transactionHash']).to_0x_hex()}:{entry['logIndex']}"


def _hex_topic(topic: Any) -> Any:
    """A topic filter entry as 0x-hex (eth-tester matches hex strings, not bytes)."""
    if topic is None or isinstance(topic, str):
        return topic
    if isinstance(topic, bytes):
        return HexBytes(topic).to_0x_hex()
    return [_hex_topic(t) for t in topic]


def get_logs(
    w3: Web3,
    addresses: Sequence[str],
    topics: Sequence[Any],
    from_block: int,
    to_block: int,
) -> Iterator[LogReceipt]:
    """Logs in [from_block, to_block] in chain order, asked BLOCKS_PER_POLL_MAX at a time."""
    start = from_block
    while start <= to_block:
        end = min(to_block, start + BLOCKS_PER_POLL_MAX - 1)
        params: FilterParams = {
            "fromBlock": start,
            "toBlock": end,
            "address": [to_checksum_address(a) for a in addresses],
            "topics": [_hex_topic(t) for t in topics],
        }
        found = w3.eth.get_logs(params)
        yield from sorted(found, key=lambda e: (e["blockNumber"], e["logIndex"]))
        start = end + 1


# -- storage --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SkippedLog:
    """A chain log (or a slash) the marketplace did not take, and why."""

    ref: str
    kind: str
    """The event: "Deposited", "Bonded", "Claimed", or "StakeSlashed" (the mirror)."""
    reason: str
    """A rule name: "provider_not_found", a MarketError code, a contract error name."""
    detail: str
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class MirroredSlash:
    reason: bytes
    provider_id: UUID
    account: str
    amount: int
    position: int
    """The StakeSlashed's notification id in the marketplace log."""
    status: str
    """"sending" (intent written, receipt not seen), "sent", or "refused" (the contract
    reverted; see chain_skipped)."""
    tx_hash: str | None
    from_block: int
    """The chain head when the intent was written: the slash is at or after it."""
    nonce: int
    """The slasher's pending nonce when the intent was written."""


class ChainStore:
    """The chain integration's own tables, on the ledger's datastore (pool and schema)."""

    def __init__(self, datastore: PostgresDatastore, chain_key: str) -> None:
        self.datastore = datastore
        self.chain_key = chain_key
        s = Identifier(datastore.schema)
        self._cursor = SQL("{}.chain_cursor").format(s)
        self._skipped = SQL("{}.chain_skipped").format(s)
        self._slashes = SQL("{}.chain_slashes").format(s)
        self.create_tables()

    def create_tables(self) -> None:
        statements = [
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (chain_key text NOT NULL, name text NOT NULL, "
                "position bigint NOT NULL, updated_at timestamptz NOT NULL, "
                "PRIMARY KEY (chain_key, name))"
            ).format(self._cursor),
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (chain_key text NOT NULL, ref text NOT NULL, "
                "kind text NOT NULL, reason text NOT NULL, detail text NOT NULL, "
                "recorded_at timestamptz NOT NULL, PRIMARY KEY (chain_key, ref))"
            ).format(self._skipped),
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (chain_key text NOT NULL, reason bytea NOT NULL, "
                "provider_id uuid NOT NULL, account text NOT NULL, "
                "amount numeric(78,0) NOT NULL, position bigint NOT NULL, "
                "status text NOT NULL CHECK (status IN ('sending', 'sent', 'refused')), "
                "tx_hash text, "
                "from_block bigint NOT NULL, nonce bigint NOT NULL, "
                "updated_at timestamptz NOT NULL, PRIMARY KEY (chain_key, reason))"
            ).format(self._slashes),
        ]
        with self.datastore.transaction(commit=True) as curs:
            for statement in statements:
                curs.execute(statement)

    def cursor(self, name: str) -> int | None:
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(
                SQL("SELECT position FROM {} WHERE chain_key = %s AND name = %s").format(
                    self._cursor
                ),
                (self.chain_key, name),
            )
            row = curs.fetchone()
        return None if row is None else int(row["position"])

    def _advance(self, curs: Any, name: str, position: int) -> None:
        curs.execute(
            SQL(
                "INSERT INTO {} AS c (chain_key, name, position, updated_at) "
                "VALUES (%s, %s, %s, now()) ON CONFLICT (chain_key, name) DO UPDATE "
                "SET position = EXCLUDED.position, updated_at = now() "
                "WHERE c.position < EXCLUDED.position"
            ).format(self._cursor),
            (self.chain_key, name, position),
        )

    def advance(self, name: str, position: int) -> None:
        """Move cursor `name` forward to `position` (never back)."""
        with self.datastore.transaction(commit=True) as curs:
            self._advance(curs, name, position)

    def skip(self, ref: str, kind: str, reason: str, detail: str) -> None:
        """Record a skipped log once (a re-read keeps the first record)."""
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(
                SQL(
                    "INSERT INTO {} (chain_key, ref, kind, reason, detail, recorded_at) "
                    "VALUES (%s, %s, %s, %s, %s, now()) ON CONFLICT DO NOTHING"
                ).format(self._skipped),
                (self.chain_key, ref, kind, reason, detail[:DETAIL_LENGTH_MAX]),
            )

    def skipped(self) -> list[SkippedLog]:
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(
                SQL(
                    "SELECT ref, kind, reason, detail, recorded_at FROM {} "
                    "WHERE chain_key = %s ORDER BY recorded_at, ref"
                ).format(self._skipped),
                (self.chain_key,),
            )
            rows = curs.fetchall()
        return [
            SkippedLog(r["ref"], r["kind"], r["reason"], r["detail"], r["recorded_at"])
            for r in rows
        ]

    def slash(self, reason: bytes) -> MirroredSlash | None:
        found = self._slash_rows(SQL("AND reason = %s"), (reason,))
        return found[0] if found else None

    def slashes(self) -> list[MirroredSlash]:
        return self._slash_rows(SQL(""), ())

    def _slash_rows(self, where: SQL, params: tuple[Any, ...]) -> list[MirroredSlash]:
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(
                SQL(
                    "SELECT reason, provider_id, account, amount, position, status, tx_hash, "
                    "from_block, nonce FROM {} WHERE chain_key = %s {} ORDER BY position"
                ).format(self._slashes, where),
                (self.chain_key, *params),
            )
            rows = curs.fetchall()
        return [
            MirroredSlash(
                bytes(r["reason"]),
                r["provider_id"],
                r["account"],
                int(r["amount"]),
                int(r["position"]),
                r["status"],
                r["tx_hash"],
                int(r["from_block"]),
                int(r["nonce"]),
            )
            for r in rows
        ]

    def slash_intent(self, s: MirroredSlash) -> None:
        """Write the intent to send `s` (status "sending"); idempotent."""
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(
                SQL(
                    "INSERT INTO {} (chain_key, reason, provider_id, account, amount, position, "
                    "status, tx_hash, from_block, nonce, updated_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, 'sending', NULL, %s, %s, now()) "
                    "ON CONFLICT (chain_key, reason) DO UPDATE SET from_block = "
                    "EXCLUDED.from_block, nonce = EXCLUDED.nonce, updated_at = now() "
                    "WHERE {}.status = 'sending'"
                ).format(self._slashes, Identifier("chain_slashes")),
                (
                    self.chain_key,
                    s.reason,
                    s.provider_id,
                    s.account,
                    s.amount,
                    s.position,
                    s.from_block,
                    s.nonce,
                ),
            )

    def slash_done(self, reason: bytes, status: str, tx_hash: str | None, position: int) -> None:
        """Mark the slash "sent" or "refused" and move the mirror's cursor past it, in one
        transaction."""
        assert status in ("sent", "refused"), status
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(
                SQL(
                    "UPDATE {} SET status = %s, tx_hash = %s, updated_at = now() "
                    "WHERE chain_key = %s AND reason = %s"
                ).format(self._slashes),
                (status, tx_hash, self.chain_key, reason),
            )
            self._advance(curs, MIRROR_CURSOR, position)


# -- the watcher ----------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def deposit_id_of(ref: str) -> UUID:
    return uuid5(DEPOSIT_NAMESPACE, ref)


def command_id_of(ref: str) -> UUID:
    return uuid5(COMMAND_NAMESPACE, ref)


@dataclass
class PollResult:
    """What one `ChainWatcher.poll` did."""

    from_block: int
    to_block: int
    """The last block taken (from_block - 1 when none was deep enough)."""
    handled: int = 0
    """Commands the marketplace recorded."""
    retried: int = 0
    """Commands it had recorded before (re-read logs)."""
    skipped: list[SkippedLog] = field(default_factory=list)


class ChainWatcher:
    """Turns confirmed chain logs into marketplace commands (see the module docstring)."""

    def __init__(
        self,
        chain: Chain,
        service: m.Marketplace,
        store: ChainStore,
        *,
        confirmations: int,
    ) -> None:
        if confirmations < 0:
            raise ValueError("confirmations must be >= 0")
        self.chain = chain
        self.service = service
        self.store = store
        self.confirmations = confirmations
        d = chain.deployment
        self._events: dict[tuple[str, bytes], tuple[str, Contract]] = {}
        for contract, name in (
            (d.vault, "Deposited"),
            (d.staking, "Bonded"),
            (d.distributor, "Claimed"),
        ):
            self._events[(contract.address, bytes(_event_topic(contract, name)))] = (
                name,
                contract,
            )

    @property
    def cursor(self) -> int:
        """The last block taken."""
        stored = self.store.cursor(WATCHER_CURSOR)
        return self.chain.start_block - 1 if stored is None else stored

    def poll(self) -> PollResult:
        """Take every log up to head - confirmations not taken yet."""
        w3 = self.chain.w3
        safe = w3.eth.block_number - self.confirmations
        start = self.cursor + 1
        result = PollResult(start, start - 1)
        if safe < start:
            return result
        self.service.refresh()
        addresses = sorted({address for address, _ in self._events})
        topics = [[HexBytes(t) for _, t in self._events]]
        while start <= safe:
            end = min(safe, start + BLOCKS_PER_POLL_MAX - 1)
            for entry in get_logs(w3, addresses, topics, start, end):
                self._take(entry, result)
            self.store.advance(WATCHER_CURSOR, end)
            result.to_block = end
            start = end + 1
        return result

    def _take(self, entry: LogReceipt, result: PollResult) -> None:
        key = (to_checksum_address(entry["address"]), bytes(entry["topics"][0]))
        known = self._events.get(key)
        if known is None or entry.get("removed"):
            return
        kind, contract = known
        event = contract.events[kind]().process_log(entry)
        ref = log_ref(entry)
        args = event["args"]
        command: m.Command | None
        if kind == "Deposited":
            command = m.ConfirmDeposit(
                command_id_of(ref),
                deposit_id_of(ref),
                UUID(bytes=bytes(args["consumer"])),
                int(args["amount"]),
                ref,
            )
        else:
            account = str(args["account"])
            provider = self.service.provider_by_address(account)
            if provider is None:
                self._skip(result, ref, kind, "provider_not_found", f"no provider has {account}")
                return
            command = self._provider_command(kind, ref, provider.provider_id, args)
            if command is None:
                return
        for attempt in range(1, COMMAND_ATTEMPTS_MAX + 1):
            try:
                handled = self.service.handle(command)
                break
            except m.ConcurrentUpdateError:
                # another process wrote the same streams first (nothing was written; the
                # service has re-read the log): the retry is decided again
                if attempt == COMMAND_ATTEMPTS_MAX:
                    raise
            except m.MarketError as e:
                self._skip(result, ref, kind, e.code, str(e))
                return
        if handled.retried:
            result.retried += 1
        else:
            result.handled += 1

    def _provider_command(
        self, kind: str, ref: str, provider_id: UUID, args: Any
    ) -> m.Command | None:
        if kind == "Bonded":
            return m.BondStake(command_id_of(ref), provider_id, int(args["amount"]))
        return m.RecordPayoutClaim(
            command_id_of(ref),
            provider_id,
            int(args["epoch"]),
            int(args["cumulativeAmount"]),
            int(args["amount"]),
            ref,
        )

    def _skip(self, result: PollResult, ref: str, kind: str, reason: str, detail: str) -> None:
        log.warning("chain watcher: skipped %s %s: %s (%s)", kind, ref, reason, detail)
        self.store.skip(ref, kind, reason, detail)
        result.skipped.append(SkippedLog(ref, kind, reason, detail, _now()))


# -- the slash mirror -----------------------------------------------------------------------


def slash_reason(provider_id: UUID, stake_version: int) -> bytes:
    """The bytes32 naming a ledger slash on chain: the provider's UUID (16 bytes) and the
    version of the StakeSlashed in the provider's stake stream (16 bytes, big-endian)."""
    return provider_id.bytes + stake_version.to_bytes(16, "big")


def slash_of_reason(reason: bytes) -> tuple[UUID, int]:
    """(provider_id, stake stream version) of a `slash_reason`."""
    return UUID(bytes=reason[:16]), int.from_bytes(reason[16:32], "big")


@dataclass
class MirrorResult:
    sent: int = 0
    """Slashes sent to the chain by this pass."""
    found: int = 0
    """Slashes found already on chain (a crash after sending)."""
    skipped: list[SkippedLog] = field(default_factory=list)
    waiting: bool = False
    """A transaction of the slasher is pending: the pass stopped to let it be mined."""


class SlashMirror:
    """Mirrors the ledger's slashes on chain, exactly once (see the module docstring)."""

    def __init__(
        self,
        chain: Chain,
        service: m.Marketplace,
        app: MarketplaceApplication,
        store: ChainStore,
    ) -> None:
        self.chain = chain
        self.service = service
        self.app = app
        self.store = store
        self._slashed_topic = _event_topic(chain.deployment.staking, "Slashed")

    @property
    def position(self) -> int:
        """The marketplace log position mirrored up to."""
        return self.store.cursor(MIRROR_CURSOR) or 0

    def mirror(self) -> MirrorResult:
        """Send the slashes recorded after `position` (at most SLASHES_PER_PASS_MAX)."""
        result = MirrorResult()
        recorder = self.app.recorder
        head = recorder.max_notification_id() or 0
        position = self.position
        self.service.refresh()
        while position < head and result.sent + result.found < SLASHES_PER_PASS_MAX:
            notifications = recorder.select_notifications(
                start=position,
                limit=MARKET_PAGE_SIZE_MAX,
                stop=head,
                topics=[STAKE_SLASHED_TOPIC],
                inclusive_of_start=False,
            )
            for n in notifications:
                event = self.app.market_mapper.to_domain_event(n)
                if not self._mirror_one(n.id, event.originator_version, event.fact, result):
                    return result
                position = n.id
                if result.sent + result.found >= SLASHES_PER_PASS_MAX:
                    return result
            if len(notifications) < MARKET_PAGE_SIZE_MAX:  # none left up to head
                self.store.advance(MIRROR_CURSOR, head)
                position = head
        return result

    def _mirror_one(
        self, position: int, version: int, fact: StakeSlashed, result: MirrorResult
    ) -> bool:
        """Mirror one slash; False: stop the pass (a transaction is pending)."""
        d = self.chain.deployment
        reason = slash_reason(fact.provider_id, version)
        ref = "0x" + reason.hex()
        known = self.store.slash(reason)
        if known is not None and known.status != "sending":
            self.store.advance(MIRROR_CURSOR, position)
            return True
        provider = self.service.provider(fact.provider_id)
        if provider is None:  # the log holds its registration: only a bug gets here
            raise ChainError(f"slash {ref}: provider {fact.provider_id} is not registered")
        try:
            account = to_checksum_address(provider.operator_address)
        except ValueError:
            detail = f"provider {fact.provider_id}: {provider.operator_address!r} is no address"
            self.store.skip(ref, "StakeSlashed", "operator_address_invalid", detail)
            self.store.advance(MIRROR_CURSOR, position)
            result.skipped.append(
                SkippedLog(ref, "StakeSlashed", "operator_address_invalid", detail, _now())
            )
            return True
        slasher = to_checksum_address(self.chain.role("slasher"))
        w3 = self.chain.w3
        if known is not None:  # a crash while sending: did it reach the chain?
            on_chain = list(
                get_logs(
                    w3,
                    [d.staking.address],
                    [self._slashed_topic, _topic_of_address(account), HexBytes(reason)],
                    known.from_block,
                    w3.eth.block_number,
                )
            )
            if on_chain:
                tx_hash = HexBytes(on_chain[0]["transactionHash"]).to_0x_hex()
                self.store.slash_done(reason, "sent", tx_hash, position)
                result.found += 1
                return True
            pending = w3.eth.get_transaction_count(slasher, "pending")
            mined = w3.eth.get_transaction_count(slasher, "latest")
            if mined <= known.nonce < pending:
                log.info("slash mirror: slash %s may still be pending; waiting", ref)
                result.waiting = True
                return False
        intent = MirroredSlash(
            reason,
            fact.provider_id,
            account,
            fact.amount,
            position,
            "sending",
            None,
            w3.eth.block_number,
            w3.eth.get_transaction_count(slasher, "pending"),
        )
        self.store.slash_intent(intent)
        try:
            receipt = d.slash(slasher, account, fact.amount, reason)
        except ContractRevert as e:
            # The chain refuses (its stake is below the ledger's: reconciliation shows it).
            detail = f"Staking.slash({account}, {fact.amount}) reverted: {e}"
            log.error("slash mirror: %s", detail)
            self.store.skip(ref, "StakeSlashed", e.error, detail)
            self.store.slash_done(reason, "refused", None, position)
            result.skipped.append(SkippedLog(ref, "StakeSlashed", e.error, detail, _now()))
            return True
        tx_hash = HexBytes(receipt["transactionHash"]).to_0x_hex()
        self.store.slash_done(reason, "sent", tx_hash, position)
        result.sent += 1
        return True


# -- payouts --------------------------------------------------------------------------------


def payout_memo(epoch: int) -> bytes:
    """The vault withdrawal memo that funds `epoch`'s payouts: b"payout-epoch" padded to 16
    bytes, then the epoch (16 bytes, big-endian)."""
    return b"payout-epoch".ljust(16, b"\0") + epoch.to_bytes(16, "big")


@dataclass(frozen=True, slots=True)
class PostedPayoutRoot:
    """What `post_payout_root` found or did."""

    epoch: int
    root: bytes
    funded_amount: int
    fund_tx: str | None
    """The withdrawal that funded the epoch (None: nothing to fund)."""
    post_tx: str | None
    """The RootPosted transaction (None: the root was posted before this call)."""
    already_funded: bool
    already_posted: bool


class PayoutGateway:
    """Puts each epoch's payouts on chain: funds the distributor, posts the Merkle root."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.reader = ChainReader(chain)

    def post_payout_root(self, epoch: int, root: bytes, fund_amount: int) -> PostedPayoutRoot:
        """Fund the distributor with `fund_amount` (the epoch's new payable total) from the
        vault, then post `root` for `epoch`. Idempotent: a step already done is checked to
        be the same and skipped; a different one is `PayoutConflictError`."""
        if type(epoch) is not int or epoch < 1:
            raise ValueError(f"epoch must be an int >= 1, got {epoch!r}")
        if not isinstance(root, bytes) or len(root) != 32 or root == bytes(32):
            raise ValueError("root must be 32 bytes, not all zero")
        if type(fund_amount) is not int or fund_amount < 0:
            raise ValueError(f"fund_amount must be an int >= 0, got {fund_amount!r}")
        d = self.chain.deployment
        posted = self.reader.posted_root(epoch)
        if posted is not None and posted != root:
            raise PayoutConflictError(
                f"epoch {epoch}: the distributor holds root 0x{posted.hex()}, not 0x{root.hex()}"
            )
        latest = int(c.call(d.distributor.functions.latestEpoch()))
        if posted is None and epoch <= latest:
            raise PayoutConflictError(
                f"epoch {epoch}: the distributor is at epoch {latest}; roots only go forward"
            )
        funding = self.reader.funding(epoch)
        fund_tx: str | None = None
        if funding is not None:
            funded, fund_tx = funding
            if funded != fund_amount:
                raise PayoutConflictError(
                    f"epoch {epoch} was funded with {funded} ({fund_tx}), asked {fund_amount}"
                )
        elif fund_amount > 0:
            receipt = self._send(
                lambda: d.withdraw(
                    self.chain.role("withdrawer"),
                    d.distributor.address,
                    fund_amount,
                    payout_memo(epoch),
                ),
                f"funding epoch {epoch} with {fund_amount}",
            )
            fund_tx = HexBytes(receipt["transactionHash"]).to_0x_hex()
        post_tx: str | None = None
        if posted is None:
            receipt = self._send(
                lambda: d.post_root(self.chain.role("poster"), epoch, root),
                f"posting the root of epoch {epoch}",
            )
            post_tx = HexBytes(receipt["transactionHash"]).to_0x_hex()
        return PostedPayoutRoot(
            epoch,
            root,
            fund_amount,
            fund_tx,
            post_tx,
            already_funded=funding is not None,
            already_posted=posted is not None,
        )

    @staticmethod
    def _send(send: Callable[[], Any], what: str) -> Any:
        try:
            return send()
        except ContractRevert as e:
            raise ChainError(f"{what} failed: {e.error}{e.args_!r}") from e


# -- reads ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainDeposit:
    ref: str
    block: int
    consumer_id: UUID
    sender: str
    amount: int


@dataclass(frozen=True, slots=True)
class ChainClaim:
    ref: str
    block: int
    epoch: int
    account: str
    amount: int
    cumulative: int


@dataclass(frozen=True, slots=True)
class ChainSlash:
    ref: str
    block: int
    account: str
    amount: int
    reason: bytes


class ChainReader:
    """What the chain holds, for the reconciliation (state at the head, or logs up to a
    block)."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain

    @property
    def head(self) -> int:
        return self.chain.w3.eth.block_number

    def _events(self, contract: Contract, name: str, to_block: int | None) -> list[EventData]:
        w3 = self.chain.w3
        last = w3.eth.block_number if to_block is None else to_block
        topic = _event_topic(contract, name)
        return [
            contract.events[name]().process_log(entry)
            for entry in get_logs(w3, [contract.address], [topic], self.chain.start_block, last)
        ]

    def posted_root(self, epoch: int) -> bytes | None:
        root = bytes(c.call(self.chain.deployment.distributor.functions.rootOf(epoch)))
        return None if root == bytes(32) else root

    def posted_roots(self, to_block: int | None = None) -> dict[int, bytes]:
        d = self.chain.deployment
        return {
            int(e["args"]["epoch"]): bytes(e["args"]["root"])
            for e in self._events(d.distributor, "RootPosted", to_block)
        }

    def claimed_total(self, account: str) -> int:
        """What the distributor has paid `account` so far (contract state)."""
        return self.chain.deployment.claimed(to_checksum_address(account))

    def claims(self, to_block: int | None = None) -> list[ChainClaim]:
        d = self.chain.deployment
        return [
            ChainClaim(
                log_ref(e),
                int(e["blockNumber"]),
                int(e["args"]["epoch"]),
                str(e["args"]["account"]),
                int(e["args"]["amount"]),
                int(e["args"]["cumulativeAmount"]),
            )
            for e in self._events(d.distributor, "Claimed", to_block)
        ]

    def claimed_by_account(self, to_block: int | None = None) -> dict[str, int]:
        """Account -> total claimed, from the Claimed logs up to `to_block`."""
        totals: dict[str, int] = {}
        for claim in self.claims(to_block):
            totals[claim.account] = totals.get(claim.account, 0) + claim.amount
        return totals

    def deposits(self, to_block: int | None = None) -> list[ChainDeposit]:
        d = self.chain.deployment
        return [
            ChainDeposit(
                log_ref(e),
                int(e["blockNumber"]),
                UUID(bytes=bytes(e["args"]["consumer"])),
                str(e["args"]["from"]),
                int(e["args"]["amount"]),
            )
            for e in self._events(d.vault, "Deposited", to_block)
        ]

    def deposits_by_consumer(self, to_block: int | None = None) -> dict[UUID, int]:
        """Consumer -> total deposited on chain up to `to_block` (default: the head)."""
        totals: dict[UUID, int] = {}
        for deposit in self.deposits(to_block):
            totals[deposit.consumer_id] = totals.get(deposit.consumer_id, 0) + deposit.amount
        return totals

    def stake_of(self, account: str) -> int:
        """Slashable stake (bonded + pending unbond) of `account` at the head."""
        return self.chain.deployment.stake_of(to_checksum_address(account))

    def bonded(self, account: str) -> int:
        return self.chain.deployment.bonded(to_checksum_address(account))

    def slashes(self, to_block: int | None = None) -> list[ChainSlash]:
        d = self.chain.deployment
        return [
            ChainSlash(
                log_ref(e),
                int(e["blockNumber"]),
                str(e["args"]["account"]),
                int(e["args"]["amount"]),
                bytes(e["args"]["reason"]),
            )
            for e in self._events(d.staking, "Slashed", to_block)
        ]

    def funding(self, epoch: int) -> tuple[int, str] | None:
        """(amount, tx hash) of the vault withdrawal that funded `epoch`, if any."""
        d = self.chain.deployment
        w3 = self.chain.w3
        topics = [
            _event_topic(d.vault, "Withdrawn"),
            _topic_of_address(d.distributor.address),
            HexBytes(payout_memo(epoch)),
        ]
        for entry in get_logs(
            w3, [d.vault.address], topics, self.chain.start_block, w3.eth.block_number
        ):
            event = d.vault.events["Withdrawn"]().process_log(entry)
            return int(event["args"]["amount"]), HexBytes(entry["transactionHash"]).to_0x_hex()
        return None


# -- the process ----------------------------------------------------------------------------


@dataclass
class ChainSide:
    """Everything of the chain integration, wired for one marketplace service."""

    chain: Chain
    store: ChainStore
    watcher: ChainWatcher
    mirror: SlashMirror
    gateway: PayoutGateway

    @property
    def reader(self) -> ChainReader:
        return self.gateway.reader


def connect(
    chain: Chain,
    service: m.Marketplace,
    app: MarketplaceApplication,
    *,
    confirmations: int,
) -> ChainSide:
    """Build the watcher, mirror and gateway on the marketplace's datastore."""
    store = ChainStore(app.app_recorder.datastore, chain.key)
    return ChainSide(
        chain,
        store,
        ChainWatcher(chain, service, store, confirmations=confirmations),
        SlashMirror(chain, service, app, store),
        PayoutGateway(chain),
    )


def run(
    watcher: ChainWatcher,
    mirror: SlashMirror,
    *,
    poll_interval_s: float,
    stop: threading.Event,
) -> None:
    """Poll and mirror until `stop` is set; a failed pass is logged and retried after a
    pause that doubles up to RETRY_PAUSE_S_MAX."""
    pause_s = poll_interval_s
    while not stop.is_set():
        try:
            watcher.poll()
            mirror.mirror()
            pause_s = poll_interval_s
        except Exception:
            log.exception("chain worker: pass failed; retrying in %.1f s", pause_s)
            pause_s = min(pause_s * 2, RETRY_PAUSE_S_MAX)
        stop.wait(pause_s)


def main(argv: list[str] | None = None) -> int:
    from workers.bootstrap import open_market

    parser = argparse.ArgumentParser(description="aether chain watcher and slash mirror")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    chain = open_chain(settings)
    if chain.embedded:
        log.warning(
            "chain worker: ETH_RPC_URL is unset, so this process watches its own private "
            "in-process chain, which no other process can reach (set ETH_RPC_URL)"
        )
    with open_market(settings) as market:
        side = connect(
            chain, market.service, market.app, confirmations=settings.chain_confirmations
        )
        run(side.watcher, side.mirror, poll_interval_s=settings.chain_poll_interval_s, stop=stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
