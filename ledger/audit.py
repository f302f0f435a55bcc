"""The tamper-evident event log: a hash chain over every event table, Merkle checkpoints of the
chain, their roots anchored on chain, verification and inclusion proofs.

The chain. Every event row of the audited logs (`DEFAULT_LOGS`, in that fixed order; a log
whose table does not exist yet is skipped) gets one entry in the append-only table
`audit_chain`, at a gap-free position 1, 2, 3, ...::

    state_digest = sha256(state)
    event_digest = sha256(EVENT_DOMAIN || log || notification_id || originator_id
                          || originator_version || topic || state_digest)   (see `event_digest`)
    chain_hash_i = sha256(chain_hash_{i-1} || event_digest_i),  chain_hash_0 = 32 zero bytes

Within a log, entries follow the notification ids (the log's commit order); a `Chainer` run
appends, per batch and log in order, the rows after the last one chained, so the logs
interleave in the chain in the order they were chained. The chain links the event's digest
rather than its bytes, so a proof need not carry the event's state.

Checkpoints. Every `checkpoint_size` entries (and once more on demand for the rest) a row in
`audit_checkpoints` records positions first..last, the chain hash at last and the root of a
`ledger.merkle.MerkleTree` (OpenZeppelin's layout, keccak pairs) over the leaves
``sha256(LEAF_DOMAIN || position || chain_hash)`` in chain order (a domain-separated sha256 of
32 bytes cannot pass for an inner node, which is a keccak of 64). `anchor` appends the roots
to the CheckpointAnchor contract in index order and records each transaction in
`audit_anchors`. All three tables are append-only, enforced by triggers as the event tables.

Verification (`verify`) recomputes everything from the event tables in one REPEATABLE READ
snapshot and reports the first finding in chain order: an event altered, deleted, inserted
or reordered (with its log and notification id), a chain entry or checkpoint that does not
match the events, or a checkpoint root that differs from the anchored one. Rows after the
last chained one of a log are not yet chained: they are counted, not judged.

SQL lives here, composed with `psycopg.sql`; web3 only in `Web3Anchor`.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import psycopg
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ledger.errors import LedgerError, StoreUnavailableError
from ledger.merkle import MerkleTree, process_proof

if TYPE_CHECKING:
    from web3 import Web3
    from web3.contract import Contract

__all__ = [
    "AUDIT_ANCHORS_TABLE_NAME",
    "AUDIT_CHAIN_TABLE_NAME",
    "AUDIT_CHECKPOINTS_TABLE_NAME",
    "CHAIN_BATCH_SIZE",
    "CHECKPOINT_SIZE",
    "DEFAULT_LOGS",
    "GENESIS_HASH",
    "AnchorClient",
    "AnchorMismatchError",
    "AuditError",
    "AuditedLog",
    "ChainReport",
    "Chainer",
    "Checkpoint",
    "Finding",
    "InclusionProof",
    "ProofCheck",
    "Tamper",
    "VerifyReport",
    "Web3Anchor",
    "chain_link",
    "event_digest",
    "leaf_of",
    "prove",
    "verify",
    "verify_proof",
]

AUDIT_CHAIN_TABLE_NAME = "audit_chain"
AUDIT_CHECKPOINTS_TABLE_NAME = "audit_checkpoints"
AUDIT_ANCHORS_TABLE_NAME = "audit_anchors"

CHAIN_BATCH_SIZE = 10_000
"""Events chained per transaction (and rows read per query)."""
CHAIN_BATCH_SIZE_MAX = 100_000
CHECKPOINT_SIZE = 1_000
"""Chain entries per full checkpoint."""
CHECKPOINT_SIZE_MAX = 1_000_000
VERIFY_PAGE_SIZE = 10_000
"""Rows fetched per round trip by verify's server-side cursors."""
LOG_NAME_LENGTH_MAX = 64

_AUDIT_TABLES = (AUDIT_CHAIN_TABLE_NAME, AUDIT_CHECKPOINTS_TABLE_NAME, AUDIT_ANCHORS_TABLE_NAME)

GENESIS_HASH = bytes(32)
"""The chain hash before the first entry."""
EVENT_DOMAIN = b"aether.audit.event.v1\x00"
LEAF_DOMAIN = b"aether.audit.leaf.v1\x00"
PROOF_VERSION = 1


class AuditError(LedgerError):
    """Bad audit input: an unknown log, an event not chained, a malformed proof or setting."""


class AnchorMismatchError(AuditError):
    """The anchor contract holds another root for a checkpoint index than the log computes:
    the log was rewritten after anchoring, or this is another log's contract."""


@dataclass(frozen=True)
class AuditedLog:
    """One event table under the chain."""

    name: str
    """The log's name in chain entries and proofs (e.g. ``ledger``); never renamed."""
    table: str
    """The events table in the schema (e.g. ``ledger_events``)."""

    def __post_init__(self) -> None:
        for what, value in (("log name", self.name), ("table", self.table)):
            if not value or len(value) > LOG_NAME_LENGTH_MAX or not value.isidentifier():
                raise AuditError(f"{what} must be an identifier of 1..64 characters: {value!r}")


DEFAULT_LOGS: tuple[AuditedLog, ...] = (
    AuditedLog("ledger", "ledger_events"),
    AuditedLog("marketplace", "marketplace_events"),
    AuditedLog("usage", "usage_events"),
    AuditedLog("settlement", "settlement_events"),
)
"""The logs in chain order. A log whose table is missing is skipped until it exists."""


# --- hashing (pure) ----------------------------------------------------------------------------

_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_PRESENT, _ABSENT = b"\x01", b"\x00"


def _field(value: bytes) -> bytes:
    return _U32.pack(len(value)) + value


def event_digest(
    log: str,
    notification_id: int,
    originator_id: str,
    originator_version: int,
    topic: str | None,
    state_digest: bytes | None,
) -> bytes:
    """The digest of one event row. Text fields are UTF-8 with a 4-byte length before them,
    the two integers 8-byte big-endian; a NULL topic or state is marked absent."""
    topic_part = _ABSENT if topic is None else _PRESENT + _field(topic.encode())
    state_part = _ABSENT if state_digest is None else _PRESENT + state_digest
    return hashlib.sha256(
        EVENT_DOMAIN
        + _field(log.encode())
        + _I64.pack(notification_id)
        + _field(originator_id.encode())
        + _I64.pack(originator_version)
        + topic_part
        + state_part
    ).digest()


def chain_link(previous_hash: bytes, digest: bytes) -> bytes:
    """The chain hash of an entry: sha256(previous chain hash || event digest)."""
    return hashlib.sha256(previous_hash + digest).digest()


def leaf_of(position: int, chain_hash: bytes) -> bytes:
    """The Merkle leaf of the chain entry at `position`."""
    return hashlib.sha256(LEAF_DOMAIN + _I64.pack(position) + chain_hash).digest()


def _digest_row(
    log: str, row: tuple[int, str, int, str | None, bytes | None]
) -> tuple[bytes | None, bytes]:
    nid, originator_id, version, topic, state = row
    s = None if state is None else hashlib.sha256(state).digest()
    return s, event_digest(log, nid, originator_id, version, topic, s)


# --- storage -------------------------------------------------------------------------------


def _create_statements(schema: str) -> list[sql.Composed]:
    s = sql.Identifier(schema)
    chain = sql.Identifier(AUDIT_CHAIN_TABLE_NAME)
    checkpoints = sql.Identifier(AUDIT_CHECKPOINTS_TABLE_NAME)
    anchors = sql.Identifier(AUDIT_ANCHORS_TABLE_NAME)
    function = sql.Identifier("audit_refuse_change")
    out = [
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {s}.{chain} ("
            "position bigint PRIMARY KEY CHECK (position >= 1), "
            "log_name text NOT NULL, "
            "notification_id bigint NOT NULL, "
            "state_digest bytea CHECK (length(state_digest) = 32), "
            "event_digest bytea NOT NULL CHECK (length(event_digest) = 32), "
            "chain_hash bytea NOT NULL CHECK (length(chain_hash) = 32), "
            "UNIQUE (log_name, notification_id))"
        ).format(s=s, chain=chain),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {s}.{checkpoints} ("
            "checkpoint_index bigint PRIMARY KEY CHECK (checkpoint_index >= 0), "
            "first_position bigint NOT NULL UNIQUE CHECK (first_position >= 1), "
            "last_position bigint NOT NULL UNIQUE, "
            "merkle_root bytea NOT NULL CHECK (length(merkle_root) = 32), "
            "head_hash bytea NOT NULL CHECK (length(head_hash) = 32), "
            "created_at timestamptz NOT NULL DEFAULT now(), "
            "CHECK (last_position >= first_position))"
        ).format(s=s, checkpoints=checkpoints),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {s}.{anchors} ("
            "checkpoint_index bigint PRIMARY KEY REFERENCES {s}.{checkpoints}, "
            "merkle_root bytea NOT NULL CHECK (length(merkle_root) = 32), "
            "chain_id bigint NOT NULL, "
            "contract_address text NOT NULL, "
            "tx_hash text NOT NULL, "
            "anchored_at timestamptz NOT NULL DEFAULT now())"
        ).format(s=s, anchors=anchors, checkpoints=checkpoints),
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {s}.{function}() RETURNS trigger "
            "LANGUAGE plpgsql AS $BODY$ BEGIN "
            "RAISE EXCEPTION 'the audit log is append-only: % on %.% refused', "
            "TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME "
            "USING ERRCODE = 'insufficient_privilege'; "
            "END; $BODY$"
        ).format(s=s, function=function),
    ]
    for table in (AUDIT_CHAIN_TABLE_NAME, AUDIT_CHECKPOINTS_TABLE_NAME, AUDIT_ANCHORS_TABLE_NAME):
        for suffix, when in (
            ("no_update_delete", "BEFORE UPDATE OR DELETE ON {s}.{t} FOR EACH ROW"),
            ("no_truncate", "BEFORE TRUNCATE ON {s}.{t} FOR EACH STATEMENT"),
        ):
            out.append(
                sql.SQL(
                    "CREATE OR REPLACE TRIGGER {trigger} " + when + " EXECUTE FUNCTION {s}.{f}()"
                ).format(
                    trigger=sql.Identifier(f"{table}_{suffix}"),
                    s=s,
                    t=sql.Identifier(table),
                    f=function,
                )
            )
    return out


def _lock_key(schema: str) -> sql.Composed:
    return sql.SQL("SELECT pg_advisory_xact_lock(hashtext({key}))").format(
        key=sql.Literal(f"aether-audit:{schema}")
    )


def _connect(conninfo: str) -> psycopg.Connection[tuple[Any, ...]]:
    try:
        return psycopg.connect(conninfo, connect_timeout=10)
    except psycopg.OperationalError as e:
        raise StoreUnavailableError(f"cannot reach PostgreSQL for the audit: {e}") from e


def create_tables(conn: psycopg.Connection[Any], schema: str) -> None:
    """Create the audit tables and their append-only triggers (idempotent; one process at a
    time per schema)."""
    with conn.transaction():
        conn.execute(_lock_key(schema))
        for statement in _create_statements(schema):
            conn.execute(statement)


def _existing_tables(conn: psycopg.Connection[Any], schema: str, names: Sequence[str]) -> set[str]:
    rows = conn.execute(
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = %s AND table_name = ANY(%s)",
        (schema, list(names)),
    ).fetchall()
    return {str(r[0]) for r in rows}


def _events_query(schema: str, table: str) -> sql.Composed:
    return sql.SQL(
        "SELECT notification_id, originator_id::text, originator_version, topic, state "
        "FROM {s}.{t} WHERE notification_id > %s ORDER BY notification_id LIMIT %s"
    ).format(s=sql.Identifier(schema), t=sql.Identifier(table))


def _check_logs(logs: Sequence[AuditedLog]) -> tuple[AuditedLog, ...]:
    out = tuple(logs)
    if not out:
        raise AuditError("at least one log must be audited")
    names = [log.name for log in out]
    if len(set(names)) != len(names):
        raise AuditError(f"log names must be unique: {names}")
    if len({log.table for log in out}) != len(out):
        raise AuditError(f"each log needs its own table: {[log.table for log in out]}")
    return out


# --- checkpoints and anchors ------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """One Merkle checkpoint of the chain."""

    index: int
    """0, 1, 2, ...: the anchor contract's index."""
    first_position: int
    last_position: int
    merkle_root: bytes
    head_hash: bytes
    """The chain hash at `last_position`."""

    @property
    def size(self) -> int:
        return self.last_position - self.first_position + 1


class AnchorClient(Protocol):
    """The CheckpointAnchor contract, as the audit uses it."""

    @property
    def chain_id(self) -> int: ...

    @property
    def address(self) -> str: ...

    def count(self) -> int:
        """Number of anchored roots."""
        ...

    def root_at(self, index: int) -> bytes:
        """The root anchored at `index` (< count)."""
        ...

    def anchor(self, index: int, root: bytes) -> str:
        """Append `root` at `index` (== count); returns the transaction hash, 0x hex."""
        ...

    def anchored_tx(self, index: int) -> str | None:
        """The transaction that anchored `index`, found in the contract's events."""
        ...


class Web3Anchor:
    """`AnchorClient` over web3 (any provider: the in-process EVM in tests, RPC in service)."""

    def __init__(self, w3: Web3, address: str, *, sender: str | None = None) -> None:
        from contracts import chain as contracts_chain

        self._chain = contracts_chain
        self._w3 = w3
        self._contract: Contract = contracts_chain.at(w3, "CheckpointAnchor", address)
        self._sender = sender

    @classmethod
    def of(cls, w3: Web3, contract: Contract, *, sender: str | None = None) -> Web3Anchor:
        return cls(w3, str(contract.address), sender=sender)

    @property
    def chain_id(self) -> int:
        return int(self._w3.eth.chain_id)

    @property
    def address(self) -> str:
        return str(self._contract.address)

    def count(self) -> int:
        return int(self._chain.call(self._contract.functions.count()))

    def root_at(self, index: int) -> bytes:
        return bytes(self._chain.call(self._contract.functions.rootAt(index)))

    def anchor(self, index: int, root: bytes) -> str:
        if self._sender is None:
            raise AuditError("anchoring needs a sender account with ANCHOR_ROLE")
        receipt = self._chain.transact(
            self._w3, self._contract.functions.anchor(index, root), self._sender
        )
        return "0x" + bytes(receipt["transactionHash"]).hex()

    def anchored_tx(self, index: int) -> str | None:
        logs = self._contract.events.CheckpointAnchored().get_logs(
            argument_filters={"index": index}, from_block=0
        )
        for entry in logs:
            return "0x" + bytes(entry["transactionHash"]).hex()
        return None


@dataclass(frozen=True)
class Anchored:
    """A checkpoint root recorded as anchored."""

    index: int
    merkle_root: bytes
    tx_hash: str
    already_on_chain: bool
    """True when the contract held the root before this run (a retry after a crash)."""


# --- the chainer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainReport:
    """What one `Chainer.run` did."""

    chained: int
    """Entries appended by this run."""
    chained_per_log: Mapping[str, int]
    checkpoints: tuple[Checkpoint, ...]
    """Checkpoints made by this run."""
    head_position: int
    head_hash: bytes
    elapsed_s: float

    @property
    def events_per_s(self) -> float:
        return self.chained / self.elapsed_s if self.elapsed_s > 0 else 0.0


class Chainer:
    """Extends the chain from its last entry, in batches, and cuts checkpoints.

    Resumable and idempotent (it always starts from what the tables hold); two chainers at
    once take turns on a per-schema advisory lock, and the tables' unique keys refuse an
    entry written twice whatever happens."""

    def __init__(
        self,
        conninfo: str,
        schema: str,
        *,
        logs: Sequence[AuditedLog] = DEFAULT_LOGS,
        batch_size: int = CHAIN_BATCH_SIZE,
        checkpoint_size: int = CHECKPOINT_SIZE,
    ) -> None:
        if not 1 <= batch_size <= CHAIN_BATCH_SIZE_MAX:
            raise AuditError(f"batch_size must be in 1..{CHAIN_BATCH_SIZE_MAX}, got {batch_size}")
        if not 1 <= checkpoint_size <= CHECKPOINT_SIZE_MAX:
            raise AuditError(
                f"checkpoint_size must be in 1..{CHECKPOINT_SIZE_MAX}, got {checkpoint_size}"
            )
        self.conninfo = conninfo
        self.schema = schema
        self.logs = _check_logs(logs)
        self.batch_size = batch_size
        self.checkpoint_size = checkpoint_size
        s = sql.Identifier(schema)
        self._copy_chain = sql.SQL(
            "COPY {s}.{t} (position, log_name, notification_id, state_digest, event_digest, "
            "chain_hash) FROM STDIN (FORMAT BINARY)"
        ).format(s=s, t=sql.Identifier(AUDIT_CHAIN_TABLE_NAME))
        self._head = sql.SQL(
            "SELECT position, chain_hash FROM {s}.{t} ORDER BY position DESC LIMIT 1"
        ).format(s=s, t=sql.Identifier(AUDIT_CHAIN_TABLE_NAME))
        self._last_of_log = sql.SQL(
            "SELECT max(notification_id) FROM {s}.{t} WHERE log_name = %s"
        ).format(s=s, t=sql.Identifier(AUDIT_CHAIN_TABLE_NAME))
        self._last_checkpoint = sql.SQL(
            "SELECT checkpoint_index, last_position FROM {s}.{t} "
            "ORDER BY checkpoint_index DESC LIMIT 1"
        ).format(s=s, t=sql.Identifier(AUDIT_CHECKPOINTS_TABLE_NAME))
        self._hashes = sql.SQL(
            "SELECT position, chain_hash FROM {s}.{t} "
            "WHERE position BETWEEN %s AND %s ORDER BY position"
        ).format(s=s, t=sql.Identifier(AUDIT_CHAIN_TABLE_NAME))
        self._insert_checkpoint = sql.SQL(
            "INSERT INTO {s}.{t} (checkpoint_index, first_position, last_position, "
            "merkle_root, head_hash) VALUES (%s, %s, %s, %s, %s)"
        ).format(s=s, t=sql.Identifier(AUDIT_CHECKPOINTS_TABLE_NAME))
        self._tables_ready = False

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        conn = _connect(self.conninfo)
        if not self._tables_ready:
            create_tables(conn, self.schema)
            self._tables_ready = True
        return conn

    def run(self, *, final_checkpoint: bool = False) -> ChainReport:
        """Chain every event not chained yet, cut every full checkpoint, and with
        `final_checkpoint` one more over the entries left (if any)."""
        started = time.perf_counter()
        per_log = {log.name: 0 for log in self.logs}
        made: list[Checkpoint] = []
        head_position, head_hash = 0, GENESIS_HASH
        with self._connect() as conn:
            while True:
                with conn.transaction():
                    n, head_position, head_hash = self._chain_batch(conn, per_log)
                    made.extend(self._cut_checkpoints(conn, final=False))
                if n == 0:
                    break
            if final_checkpoint:
                with conn.transaction():
                    conn.execute(_lock_key(self.schema))
                    made.extend(self._cut_checkpoints(conn, final=True))
        return ChainReport(
            chained=sum(per_log.values()),
            chained_per_log=per_log,
            checkpoints=tuple(made),
            head_position=head_position,
            head_hash=head_hash,
            elapsed_s=time.perf_counter() - started,
        )

    def _chain_batch(
        self, conn: psycopg.Connection[tuple[Any, ...]], per_log: dict[str, int]
    ) -> tuple[int, int, bytes]:
        """Append up to `batch_size` entries in the caller's transaction; returns how many,
        and the head after them."""
        conn.execute(_lock_key(self.schema))
        row = conn.execute(self._head).fetchone()
        position, head = (0, GENESIS_HASH) if row is None else (int(row[0]), bytes(row[1]))
        present = _existing_tables(conn, self.schema, [log.table for log in self.logs])
        budget = self.batch_size
        entries: list[tuple[int, str, int, bytes | None, bytes, bytes]] = []
        sha256 = hashlib.sha256
        for log in self.logs:
            if budget == 0:
                break
            if log.table not in present:
                continue
            last = conn.execute(self._last_of_log, (log.name,)).fetchone()
            after = 0 if last is None or last[0] is None else int(last[0])
            with conn.cursor(binary=True) as cur:
                cur.execute(_events_query(self.schema, log.table), (after, budget))
                rows = cur.fetchall()
            name = log.name
            for r in rows:
                s, d = _digest_row(name, r)
                head = sha256(head + d).digest()
                position += 1
                entries.append((position, name, r[0], s, d, head))
            per_log[name] += len(rows)
            budget -= len(rows)
        if entries:
            with conn.cursor() as cur, cur.copy(self._copy_chain) as copy:
                copy.set_types(["int8", "text", "int8", "bytea", "bytea", "bytea"])
                for entry in entries:
                    copy.write_row(entry)
        return len(entries), position, head

    def _cut_checkpoints(
        self, conn: psycopg.Connection[tuple[Any, ...]], *, final: bool
    ) -> list[Checkpoint]:
        """Cut the checkpoints due, in the caller's transaction (which holds the lock)."""
        made: list[Checkpoint] = []
        head_row = conn.execute(self._head).fetchone()
        head_position = 0 if head_row is None else int(head_row[0])
        row = conn.execute(self._last_checkpoint).fetchone()
        index, last = (0, 0) if row is None else (int(row[0]) + 1, int(row[1]))
        while True:
            first = last + 1
            if head_position - last >= self.checkpoint_size:
                end = last + self.checkpoint_size
            elif final and head_position >= first:
                end = head_position
            else:
                return made
            hashes = conn.execute(self._hashes, (first, end)).fetchall()
            assert len(hashes) == end - first + 1, "the chain has a gap"
            leaves = [leaf_of(int(p), bytes(h)) for p, h in hashes]
            root = MerkleTree.build(leaves, sort_leaves=False).root
            checkpoint = Checkpoint(index, first, end, root, bytes(hashes[-1][1]))
            conn.execute(self._insert_checkpoint, (index, first, end, root, checkpoint.head_hash))
            made.append(checkpoint)
            index, last = index + 1, end

    def anchor(self, client: AnchorClient) -> list[Anchored]:
        """Anchor every checkpoint not recorded as anchored, in index order. Idempotent: a root
        the contract already holds at its index is recorded, not sent again; another root
        there raises `AnchorMismatchError`."""
        done: list[Anchored] = []
        s = sql.Identifier(self.schema)
        pending_query = sql.SQL(
            "SELECT c.checkpoint_index, c.merkle_root FROM {s}.{c} c "
            "LEFT JOIN {s}.{a} a USING (checkpoint_index) "
            "WHERE a.checkpoint_index IS NULL ORDER BY c.checkpoint_index"
        ).format(
            s=s,
            c=sql.Identifier(AUDIT_CHECKPOINTS_TABLE_NAME),
            a=sql.Identifier(AUDIT_ANCHORS_TABLE_NAME),
        )
        insert = sql.SQL(
            "INSERT INTO {s}.{a} (checkpoint_index, merkle_root, chain_id, contract_address, "
            "tx_hash) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (checkpoint_index) DO NOTHING"
        ).format(s=s, a=sql.Identifier(AUDIT_ANCHORS_TABLE_NAME))
        with self._connect() as conn:
            with conn.transaction():
                pending = [(int(i), bytes(r)) for i, r in conn.execute(pending_query)]
            if not pending:
                return done
            count = client.count()
            chain_id, address = client.chain_id, client.address
            for index, root in pending:
                already = index < count
                if already:
                    on_chain = client.root_at(index)
                    if on_chain != root:
                        raise AnchorMismatchError(
                            f"checkpoint {index}: the contract at {address} holds root "
                            f"0x{on_chain.hex()}, the log computes 0x{root.hex()}"
                        )
                    tx = client.anchored_tx(index) or "unknown"
                elif index == count:
                    tx = client.anchor(index, root)
                    count += 1
                else:
                    raise AuditError(
                        f"checkpoint {index} cannot be anchored: the contract at {address} "
                        f"holds {count} roots, so checkpoint {count} comes first"
                    )
                with conn.transaction():
                    conn.execute(insert, (index, root, chain_id, address, tx))
                done.append(Anchored(index, root, tx, already))
        return done


# --- verification ----------------------------------------------------------------------------


class Tamper(enum.StrEnum):
    """What verification found, as the rule the log broke."""

    event_altered = "altered"
    """The row at this notification id is not the event that was chained there."""
    event_deleted = "deleted"
    """A chained event is no longer in its table."""
    event_inserted = "inserted"
    """A row is in the table among chained ones but was never chained."""
    events_reordered = "reordered"
    """Chained events hold each other's content (swapped)."""
    chain_entry_altered = "chain_altered"
    """A chain entry (its digest, hash, position or log) does not follow from the events."""
    checkpoint_altered = "checkpoint_altered"
    """A checkpoint row does not match the chain recomputed from the events."""
    anchor_mismatch = "anchor_mismatch"
    """The root anchored on chain is not the root recomputed from the events."""


@dataclass(frozen=True)
class Finding:
    """The first thing verification found wrong, in chain order."""

    kind: Tamper
    log: str | None
    notification_id: int | None
    position: int | None
    """The chain position concerned, when there is one."""
    checkpoint_index: int | None = None
    detail: str = ""

    def describe(self) -> str:
        where = []
        if self.log is not None:
            where.append(f"log {self.log}")
        if self.notification_id is not None:
            where.append(f"notification id {self.notification_id}")
        if self.position is not None:
            where.append(f"chain position {self.position}")
        if self.checkpoint_index is not None:
            where.append(f"checkpoint {self.checkpoint_index}")
        text = f"{self.kind.value}: " + ", ".join(where)
        return f"{text}: {self.detail}" if self.detail else text


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of `verify`."""

    finding: Finding | None
    events_checked: int
    checkpoints_checked: int
    anchors_checked: int
    unchained: Mapping[str, int]
    """Rows after the last chained one, per log: newer than the chain, not judged."""
    unanchored_entries: int
    """Chain entries after the last checkpoint anchored (or the last one when no chain)."""
    elapsed_s: float

    @property
    def clean(self) -> bool:
        return self.finding is None

    @property
    def events_per_s(self) -> float:
        return self.events_checked / self.elapsed_s if self.elapsed_s > 0 else 0.0


_Row = tuple[int, str, int, str | None, bytes | None]


class _LogRows:
    """A log's rows in notification-id order, from a server-side cursor, with a peek."""

    def __init__(
        self, conn: psycopg.Connection[tuple[Any, ...]], schema: str, log: AuditedLog
    ) -> None:
        self._cur = conn.cursor(name=f"audit_{log.name}", binary=True)
        self._cur.itersize = VERIFY_PAGE_SIZE
        self._cur.execute(
            sql.SQL(
                "SELECT notification_id, originator_id::text, originator_version, topic, state "
                "FROM {s}.{t} ORDER BY notification_id"
            ).format(s=sql.Identifier(schema), t=sql.Identifier(log.table))
        )
        self._page: list[_Row] = []
        self._i = 0
        self._exhausted = False

    def peek(self) -> _Row | None:
        if self._i == len(self._page):
            if self._exhausted:
                return None
            self._page, self._i = self._cur.fetchmany(VERIFY_PAGE_SIZE), 0
            if not self._page:
                self._exhausted = True
                return None
        return self._page[self._i]

    def take(self) -> _Row | None:
        row = self.peek()
        if row is not None:
            self._i += 1
        return row

    def count_rest(self) -> int:
        n = 0
        while self.take() is not None:
            n += 1
        return n

    def close(self) -> None:
        self._cur.close()


class _Verifier:
    def __init__(
        self,
        conn: psycopg.Connection[tuple[Any, ...]],
        schema: str,
        logs: tuple[AuditedLog, ...],
        anchor: AnchorClient | None,
    ) -> None:
        self.conn = conn
        self.schema = schema
        self.logs = {log.name: log for log in logs}
        self.anchor = anchor
        present = _existing_tables(conn, schema, [log.table for log in logs])
        self.audited = len(_existing_tables(conn, schema, _AUDIT_TABLES)) == len(_AUDIT_TABLES)
        """False before the first chain run: no audit tables (verify creates nothing)."""
        self.rows: dict[str, _LogRows | None] = {
            log.name: (_LogRows(conn, schema, log) if log.table in present else None)
            for log in logs
        }
        self.anchored_count = anchor.count() if anchor is not None else 0
        self.events_checked = 0
        self.checkpoints_checked = 0
        self.anchors_checked = 0
        self.last_anchored_position = 0
        self.cursors: list[psycopg.ServerCursor[tuple[Any, ...]]] = []

    def run(self) -> Finding | None:
        """Walk the chain in position order against the tables; the first finding, or None."""
        if not self.audited:
            return self._no_chain()
        schema = sql.Identifier(self.schema)
        checkpoints = [
            Checkpoint(int(i), int(f), int(la), bytes(r), bytes(h))
            for i, f, la, r, h in self.conn.execute(
                sql.SQL(
                    "SELECT checkpoint_index, first_position, last_position, merkle_root, "
                    "head_hash FROM {s}.{t} ORDER BY checkpoint_index"
                ).format(s=schema, t=sql.Identifier(AUDIT_CHECKPOINTS_TABLE_NAME))
            )
        ]
        anchored_rows = {
            int(i): bytes(r)
            for i, r in self.conn.execute(
                sql.SQL("SELECT checkpoint_index, merkle_root FROM {s}.{t}").format(
                    s=schema, t=sql.Identifier(AUDIT_ANCHORS_TABLE_NAME)
                )
            )
        }
        cp_iter = iter(checkpoints)
        cp = next(cp_iter, None)
        if cp is not None and (cp.index != 0 or cp.first_position != 1):
            return self._cp_finding(cp, "the first checkpoint is not index 0 from position 1")
        chain = self.conn.cursor(name="audit_chain_entries", binary=True)
        self.cursors.append(chain)
        chain.itersize = VERIFY_PAGE_SIZE
        chain.execute(
            sql.SQL(
                "SELECT position, log_name, notification_id, state_digest, event_digest, "
                "chain_hash FROM {s}.{t} ORDER BY position"
            ).format(s=schema, t=sql.Identifier(AUDIT_CHAIN_TABLE_NAME))
        )
        leaves: list[bytes] = []
        previous, expected_position = GENESIS_HASH, 1
        sha256 = hashlib.sha256
        entries = (e for page in iter(lambda: chain.fetchmany(VERIFY_PAGE_SIZE), []) for e in page)
        for position, log_name, nid, stored_s, stored_d, stored_h in entries:
            if position != expected_position:
                return Finding(
                    Tamper.chain_entry_altered,
                    log_name,
                    nid,
                    position,
                    detail=f"expected chain position {expected_position}",
                )
            if log_name not in self.rows:
                return Finding(
                    Tamper.chain_entry_altered,
                    log_name,
                    nid,
                    position,
                    detail=f"the chain names a log not audited here: {log_name!r}",
                )
            rows = self.rows[log_name]
            row = None if rows is None else rows.peek()
            if row is not None and row[0] < nid:
                return Finding(
                    Tamper.event_inserted,
                    log_name,
                    row[0],
                    None,
                    detail=f"never chained, before the event chained at position {position}",
                )
            if rows is None or row is None or row[0] != nid:
                where = "its table is missing" if rows is None else "no row has this id"
                return Finding(Tamper.event_deleted, log_name, nid, position, detail=where)
            rows.take()
            state_digest, digest = _digest_row(log_name, row)
            h = sha256(previous + digest).digest()
            if h != stored_h or digest != stored_d:
                return self._diagnose(
                    position,
                    log_name,
                    row,
                    state_digest,
                    digest,
                    None if stored_s is None else bytes(stored_s),
                    bytes(stored_d),
                    bytes(stored_h),
                    h,
                )
            previous = h
            self.events_checked += 1
            expected_position += 1
            if cp is None:
                continue
            leaves.append(leaf_of(position, h))
            if position < cp.last_position:
                continue
            root = MerkleTree.build(leaves, sort_leaves=False).root
            leaves = []
            bad = self._check_checkpoint(cp, root, h, anchored_rows)
            if bad is not None:
                return bad
            self.checkpoints_checked += 1
            if cp.index < self.anchored_count:
                self.anchors_checked += 1
                self.last_anchored_position = cp.last_position
            elif self.anchor is None and cp.index in anchored_rows:
                self.last_anchored_position = cp.last_position
            following = next(cp_iter, None)
            if following is not None and (
                following.index != cp.index + 1 or following.first_position != position + 1
            ):
                return self._cp_finding(following, f"does not follow checkpoint {cp.index}")
            cp = following
        if cp is not None:
            return self._cp_finding(
                cp,
                f"covers positions up to {cp.last_position}, the chain ends at "
                f"{expected_position - 1}",
            )
        if self.anchored_count > self.checkpoints_checked:
            return Finding(
                Tamper.anchor_mismatch,
                None,
                None,
                None,
                self.checkpoints_checked,
                detail=f"the contract holds {self.anchored_count} roots, the log has "
                f"{self.checkpoints_checked} checkpoints",
            )
        return None

    def _no_chain(self) -> Finding | None:
        if self.anchored_count:
            return Finding(
                Tamper.anchor_mismatch,
                None,
                None,
                None,
                0,
                detail=f"the contract holds {self.anchored_count} roots, the schema has no "
                "audit tables",
            )
        return None

    def _cp_finding(
        self, cp: Checkpoint, detail: str, kind: Tamper = Tamper.checkpoint_altered
    ) -> Finding:
        return Finding(kind, None, None, cp.last_position, cp.index, detail)

    def _check_checkpoint(
        self, cp: Checkpoint, root: bytes, head: bytes, anchored_rows: Mapping[int, bytes]
    ) -> Finding | None:
        on_chain: bytes | None = None
        if self.anchor is not None and cp.index < self.anchored_count:
            on_chain = self.anchor.root_at(cp.index)
        if on_chain is not None and on_chain != root:
            return self._cp_finding(
                cp,
                f"anchored root 0x{on_chain.hex()} differs from the root recomputed from the "
                f"events 0x{root.hex()} (positions {cp.first_position}..{cp.last_position})",
                Tamper.anchor_mismatch,
            )
        if cp.merkle_root != root:
            also = " (the anchored root agrees with the events)" if on_chain is not None else ""
            return self._cp_finding(
                cp,
                f"stored root 0x{cp.merkle_root.hex()} differs from the root recomputed from "
                f"the events 0x{root.hex()}{also}",
            )
        if cp.head_hash != head:
            return self._cp_finding(cp, "stored head hash differs from the chain's")
        recorded = anchored_rows.get(cp.index)
        if recorded is not None and recorded != root:
            return self._cp_finding(
                cp, f"the recorded anchor root 0x{recorded.hex()} differs from the events'"
            )
        return None

    def _diagnose(
        self,
        position: int,
        log_name: str,
        row: _Row,
        s: bytes | None,
        d: bytes,
        stored_s: bytes | None,
        stored_d: bytes,
        stored_h: bytes,
        h: bytes,
    ) -> Finding:
        """Name what happened at a chain entry whose event does not match."""
        nid = row[0]
        if d == stored_d:
            return Finding(
                Tamper.chain_entry_altered,
                log_name,
                nid,
                position,
                detail="the event matches its digest but the chain hash does not follow",
            )
        if h == stored_h:
            return Finding(
                Tamper.chain_entry_altered,
                log_name,
                nid,
                position,
                detail="the stored event digest was altered; the event matches the chain",
            )
        table = sql.Identifier(self.logs[log_name].table)
        s_id = sql.Identifier(self.schema)
        chain_t = sql.Identifier(AUDIT_CHAIN_TABLE_NAME)
        # A row other than this one that now holds this entry's chained state, where it was
        # not chained (the content moved).
        original_at = None
        if stored_s is not None and s != stored_s:
            r = self.conn.execute(
                sql.SQL(
                    "SELECT e.notification_id FROM {s}.{t} e LEFT JOIN {s}.{c} c "
                    "ON c.log_name = %s AND c.notification_id = e.notification_id "
                    "WHERE e.notification_id <> %s AND sha256(e.state) = %s "
                    "AND c.state_digest IS DISTINCT FROM %s ORDER BY 1 LIMIT 1"
                ).format(s=s_id, t=table, c=chain_t),
                (log_name, nid, stored_s, stored_s),
            ).fetchone()
            original_at = None if r is None else int(r[0])
        # A chain entry other than this one whose state this row now holds, where that
        # entry's row no longer holds it.
        current_at = None
        if s is not None and s != stored_s:
            r = self.conn.execute(
                sql.SQL(
                    "SELECT c.notification_id FROM {s}.{c} c LEFT JOIN {s}.{t} e "
                    "ON e.notification_id = c.notification_id "
                    "WHERE c.log_name = %s AND c.notification_id <> %s AND c.state_digest = %s "
                    "AND sha256(e.state) IS DISTINCT FROM c.state_digest ORDER BY 1 LIMIT 1"
                ).format(s=s_id, t=table, c=chain_t),
                (log_name, nid, s),
            ).fetchone()
            current_at = None if r is None else int(r[0])
        if original_at is not None and current_at is not None:
            return Finding(
                Tamper.events_reordered,
                log_name,
                nid,
                position,
                detail=f"holds the content chained at notification id {current_at}; its own "
                f"is at {original_at}",
            )
        if original_at is not None:
            return Finding(
                Tamper.event_inserted,
                log_name,
                nid,
                position,
                detail=f"a row never chained is here; the event chained here moved to "
                f"notification id {original_at}",
            )
        if current_at is not None:
            return Finding(
                Tamper.event_deleted,
                log_name,
                nid,
                position,
                detail=f"the event chained here is gone; the rows after it moved up (this row "
                f"was chained at {current_at})",
            )
        changed = []
        if s != stored_s:
            changed.append("state")
        else:
            changed.append("originator id, version or topic")
        return Finding(
            Tamper.event_altered,
            log_name,
            nid,
            position,
            detail=f"its {', '.join(changed)} differs from what was chained",
        )

    def close(self) -> None:
        for rows in self.rows.values():
            if rows is not None:
                rows.close()
        for cursor in self.cursors:
            cursor.close()

    def unchained(self) -> dict[str, int]:
        return {
            name: (0 if rows is None else rows.count_rest()) for name, rows in self.rows.items()
        }


def verify(
    conninfo: str,
    schema: str,
    *,
    logs: Sequence[AuditedLog] = DEFAULT_LOGS,
    anchor: AnchorClient | None = None,
) -> VerifyReport:
    """Recompute the chain and the checkpoints from the event tables (and, with `anchor`,
    compare the roots with the anchored ones); report the first finding in chain order."""
    checked_logs = _check_logs(logs)
    started = time.perf_counter()
    with _connect(conninfo) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            verifier = _Verifier(conn, schema, checked_logs, anchor)
            try:
                finding = verifier.run()
                unchained = verifier.unchained() if finding is None else {}
            finally:
                verifier.close()
            total = (
                conn.execute(
                    sql.SQL("SELECT coalesce(max(position), 0) FROM {s}.{t}").format(
                        s=sql.Identifier(schema), t=sql.Identifier(AUDIT_CHAIN_TABLE_NAME)
                    )
                ).fetchone()
                if verifier.audited
                else (0,)
            )
    assert total is not None
    return VerifyReport(
        finding=finding,
        events_checked=verifier.events_checked,
        checkpoints_checked=verifier.checkpoints_checked,
        anchors_checked=verifier.anchors_checked,
        unchained=unchained,
        unanchored_entries=int(total[0]) - verifier.last_anchored_position,
        elapsed_s=time.perf_counter() - started,
    )


# --- inclusion proofs ------------------------------------------------------------------------

_HEX32_LENGTH = 66


def _hex32(value: str) -> str:
    if not isinstance(value, str) or len(value) != _HEX32_LENGTH or not value.startswith("0x"):
        raise ValueError(f"must be 0x and 64 hex digits, got {value!r}")
    try:
        bytes.fromhex(value[2:])
    except ValueError:
        raise ValueError(f"must be 0x and 64 hex digits, got {value!r}") from None
    return value.lower()


class _ProofModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class ProofEvent(_ProofModel):
    """The event proven, as it is digested (its state by its sha256)."""

    log: str = Field(min_length=1, max_length=LOG_NAME_LENGTH_MAX)
    notification_id: int = Field(ge=1)
    originator_id: str = Field(min_length=1, max_length=256)
    originator_version: int
    topic: str | None
    state_sha256: str | None
    """sha256 of the stored state bytes, 0x hex; anyone holding the event checks it."""
    event_digest: str

    _check = field_validator("event_digest")(_hex32)

    @field_validator("state_sha256")
    @classmethod
    def _check_state(cls, value: str | None) -> str | None:
        return None if value is None else _hex32(value)


class ProofChainEntry(_ProofModel):
    position: int = Field(ge=1)
    previous_hash: str
    chain_hash: str

    _check = field_validator("previous_hash", "chain_hash")(_hex32)


class ProofCheckpoint(_ProofModel):
    index: int = Field(ge=0)
    first_position: int = Field(ge=1)
    last_position: int = Field(ge=1)
    merkle_root: str
    leaf: str
    merkle_path: list[str] = Field(max_length=64)
    """Sibling hashes from the leaf up to the root (OpenZeppelin's MerkleProof order)."""

    _check = field_validator("merkle_root", "leaf")(_hex32)

    @field_validator("merkle_path")
    @classmethod
    def _check_path(cls, value: list[str]) -> list[str]:
        return [_hex32(v) for v in value]


class ProofAnchor(_ProofModel):
    chain_id: int
    contract_address: str = Field(min_length=42, max_length=42)
    tx_hash: str


class InclusionProof(_ProofModel):
    """That one event is in a checkpoint of the chain (JSON: `model_dump_json`)."""

    version: int = PROOF_VERSION
    event: ProofEvent
    chain: ProofChainEntry
    checkpoint: ProofCheckpoint
    anchor: ProofAnchor | None
    """The checkpoint's anchoring transaction, when it was anchored."""


def _b(value: str) -> bytes:
    return bytes.fromhex(value[2:])


def prove(
    conninfo: str,
    schema: str,
    log: str,
    notification_id: int,
    *,
    logs: Sequence[AuditedLog] = DEFAULT_LOGS,
) -> InclusionProof:
    """The inclusion proof of event `notification_id` of `log`. Raises `AuditError` when the
    event is not chained or not yet in a checkpoint."""
    table = next((x.table for x in _check_logs(logs) if x.name == log), None)
    if table is None:
        raise AuditError(f"no log named {log!r}; the logs are {[x.name for x in logs]}")
    s = sql.Identifier(schema)
    with _connect(conninfo) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            if len(_existing_tables(conn, schema, _AUDIT_TABLES)) < len(_AUDIT_TABLES):
                raise AuditError(f"the log is not chained yet (no audit tables in {schema})")
            entry = conn.execute(
                sql.SQL(
                    "SELECT position, state_digest, event_digest, chain_hash FROM {s}.{t} "
                    "WHERE log_name = %s AND notification_id = %s"
                ).format(s=s, t=sql.Identifier(AUDIT_CHAIN_TABLE_NAME)),
                (log, notification_id),
            ).fetchone()
            if entry is None:
                raise AuditError(f"event {notification_id} of log {log!r} is not in the chain")
            position = int(entry[0])
            previous = conn.execute(
                sql.SQL("SELECT chain_hash FROM {s}.{t} WHERE position = %s").format(
                    s=s, t=sql.Identifier(AUDIT_CHAIN_TABLE_NAME)
                ),
                (position - 1,),
            ).fetchone()
            cp_row = conn.execute(
                sql.SQL(
                    "SELECT checkpoint_index, first_position, last_position, merkle_root "
                    "FROM {s}.{t} WHERE %s BETWEEN first_position AND last_position"
                ).format(s=s, t=sql.Identifier(AUDIT_CHECKPOINTS_TABLE_NAME)),
                (position,),
            ).fetchone()
            if cp_row is None:
                raise AuditError(
                    f"event {notification_id} of log {log!r} (chain position {position}) is not "
                    "in a checkpoint yet: run `aether audit chain --final`"
                )
            index, first, last, root = int(cp_row[0]), int(cp_row[1]), int(cp_row[2]), cp_row[3]
            hashes = conn.execute(
                sql.SQL(
                    "SELECT position, chain_hash FROM {s}.{t} WHERE position BETWEEN %s AND %s "
                    "ORDER BY position"
                ).format(s=s, t=sql.Identifier(AUDIT_CHAIN_TABLE_NAME)),
                (first, last),
            ).fetchall()
            anchor_row = conn.execute(
                sql.SQL(
                    "SELECT chain_id, contract_address, tx_hash FROM {s}.{t} "
                    "WHERE checkpoint_index = %s"
                ).format(s=s, t=sql.Identifier(AUDIT_ANCHORS_TABLE_NAME)),
                (index,),
            ).fetchone()
            event_row = None
            if _existing_tables(conn, schema, [table]):
                event_row = conn.execute(
                    sql.SQL(
                        "SELECT originator_id::text, originator_version, topic FROM {s}.{t} "
                        "WHERE notification_id = %s"
                    ).format(s=s, t=sql.Identifier(table)),
                    (notification_id,),
                ).fetchone()
    if event_row is None:
        raise AuditError(f"event {notification_id} of log {log!r} is not in its table")
    leaves = [leaf_of(int(p), bytes(h)) for p, h in hashes]
    tree = MerkleTree.build(leaves, sort_leaves=False)
    k = position - first
    state_digest = None if entry[1] is None else bytes(entry[1])
    return InclusionProof(
        event=ProofEvent(
            log=log,
            notification_id=notification_id,
            originator_id=str(event_row[0]),
            originator_version=int(event_row[1]),
            topic=None if event_row[2] is None else str(event_row[2]),
            state_sha256=None if state_digest is None else "0x" + state_digest.hex(),
            event_digest="0x" + bytes(entry[2]).hex(),
        ),
        chain=ProofChainEntry(
            position=position,
            previous_hash="0x" + (GENESIS_HASH if previous is None else bytes(previous[0])).hex(),
            chain_hash="0x" + bytes(entry[3]).hex(),
        ),
        checkpoint=ProofCheckpoint(
            index=index,
            first_position=first,
            last_position=last,
            merkle_root="0x" + bytes(root).hex(),
            leaf="0x" + leaves[k].hex(),
            merkle_path=["0x" + p.hex() for p in tree.proof(k)],
        ),
        anchor=None
        if anchor_row is None
        else ProofAnchor(
            chain_id=int(anchor_row[0]),
            contract_address=str(anchor_row[1]),
            tx_hash=str(anchor_row[2]),
        ),
    )


@dataclass(frozen=True)
class ProofCheck:
    """The outcome of `verify_proof`: ok, or the first step that failed."""

    ok: bool
    reason: str = ""
    steps: tuple[str, ...] = field(default=())


def verify_proof(proof: InclusionProof, root: bytes) -> ProofCheck:
    """Check `proof` step by step against `root` (the anchored root of its checkpoint, read
    from the chain, or one given): event fields -> event digest -> chain hash -> leaf ->
    Merkle path -> root."""
    e, c, cp = proof.event, proof.chain, proof.checkpoint
    steps: list[str] = []
    if proof.version != PROOF_VERSION:
        return ProofCheck(False, f"unknown proof version {proof.version}")
    digest = event_digest(
        e.log,
        e.notification_id,
        e.originator_id,
        e.originator_version,
        e.topic,
        None if e.state_sha256 is None else _b(e.state_sha256),
    )
    if digest != _b(e.event_digest):
        return ProofCheck(False, "the event's fields do not give its event digest")
    steps.append("event fields give the event digest")
    if chain_link(_b(c.previous_hash), digest) != _b(c.chain_hash):
        return ProofCheck(False, "the event digest does not give the chain hash", tuple(steps))
    steps.append("previous hash and event digest give the chain hash")
    if not cp.first_position <= c.position <= cp.last_position:
        return ProofCheck(
            False, f"chain position {c.position} is outside checkpoint {cp.index}", tuple(steps)
        )
    leaf = leaf_of(c.position, _b(c.chain_hash))
    if leaf != _b(cp.leaf):
        return ProofCheck(False, "the chain entry does not give the leaf", tuple(steps))
    steps.append("position and chain hash give the leaf")
    reached = process_proof(leaf, [_b(p) for p in cp.merkle_path])
    if reached != _b(cp.merkle_root):
        return ProofCheck(False, "the Merkle path does not reach the proof's root", tuple(steps))
    steps.append("the Merkle path reaches the checkpoint root")
    if reached != root:
        return ProofCheck(
            False,
            f"the checkpoint root 0x{reached.hex()} is not the trusted root 0x{root.hex()}",
            tuple(steps),
        )
    steps.append("the checkpoint root is the trusted root")
    return ProofCheck(True, "", tuple(steps))
