"""The tamper-evident log against real PostgreSQL and the in-process EVM: chaining, checkpoints,
anchoring, verification of every kind of tampering (through a superuser session that
bypasses the append-only triggers), inclusion proofs, and the `aether audit` commands."""

from __future__ import annotations

import argparse
import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

pytest.importorskip("web3", reason="needs the `chain` extra: pip install -e '.[chain]'")
pytest.importorskip("eth_tester", reason="needs the `chain` extra: pip install -e '.[chain]'")

from web3 import EthereumTesterProvider, Web3

from contracts import chain
from contracts.chain import ROLE_ANCHOR
from ledger.audit import (
    AnchorMismatchError,
    AuditedLog,
    AuditError,
    Chainer,
    InclusionProof,
    Tamper,
    Web3Anchor,
    prove,
    verify,
    verify_proof,
)
from ledger.config import Settings
from ledger.money import units
from ledger.store import LedgerApplication
from ledger.usage import UsageApplication
from tests.market import Market, build_market
from workers import audit as audit_cli
from workers.cli import main as aether

CHECKPOINT_SIZE = 7
"""Small, so the test log spans several checkpoints and a partial one."""


# --- fixtures ---------------------------------------------------------------------------------


@contextmanager
def superuser(database_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A session that bypasses every trigger (the append-only guard included)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        yield conn


def table(schema: str, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def trade(market: Market, n: int) -> None:
    """Market activity: a provider, a consumer, asks and bids that open leases, heartbeats."""
    provider = f"provider-{n}"
    market.provider(provider, market.node(f"node-{n}", gpu_count=4), bond=units(400))
    market.deposit(f"consumer-{n}", units(100))
    for k in range(2):
        market.ask(f"ask-{n}-{k}", provider, f"node-{n}", units(2), gpu_count=2)
        market.bid(f"bid-{n}-{k}", f"consumer-{n}", units(3), gpu_count=1, duration_s=600)


@pytest.fixture
def market(ledger_app: LedgerApplication, ledger_env: dict[str, str]) -> Market:
    built = build_market(ledger_app, ledger_env)
    UsageApplication(ledger_app.app_recorder.datastore, env=ledger_env)  # an empty log
    return built


@pytest.fixture
def logged(market: Market, database_url: str, schema: str) -> dict[str, int]:
    """Activity in two logs, with a hole in ledger_events' ids (a rolled-back transaction
    leaves one); returns the hole's id."""
    trade(market, 1)
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT nextval(pg_get_serial_sequence(%s, 'notification_id'))",
            (f"{schema}.ledger_events",),
        ).fetchone()
    assert row is not None
    trade(market, 2)
    return {"ledger_hole": int(row[0])}


@pytest.fixture
def w3() -> Web3:
    return Web3(EthereumTesterProvider())


@pytest.fixture
def anchor(w3: Web3) -> Web3Anchor:
    admin, anchorer = w3.eth.accounts[0], w3.eth.accounts[1]
    contract = chain.deploy(w3, "CheckpointAnchor", admin, sender=admin)
    chain.transact(w3, contract.functions.grantRole(ROLE_ANCHOR, anchorer), admin)
    return Web3Anchor(w3, str(contract.address), sender=anchorer)


@pytest.fixture
def chainer(database_url: str, schema: str) -> Chainer:
    return Chainer(database_url, schema, checkpoint_size=CHECKPOINT_SIZE)


@pytest.fixture
def chained(logged: dict[str, int], chainer: Chainer, anchor: Web3Anchor) -> dict[str, int]:
    """The log chained, checkpointed (the last one partial) and anchored."""
    report = chainer.run(final_checkpoint=True)
    assert report.chained > 3 * CHECKPOINT_SIZE
    assert report.chained_per_log["usage"] == 0 and report.chained_per_log["settlement"] == 0
    chainer.anchor(anchor)
    return {**logged, "chained": report.chained, "checkpoints": len(report.checkpoints)}


def rows(database_url: str, schema: str, name: str) -> list[tuple[int, bytes]]:
    with psycopg.connect(database_url) as conn:
        return [
            (int(nid), bytes(state))
            for nid, state in conn.execute(
                sql.SQL("SELECT notification_id, state FROM {} ORDER BY notification_id").format(
                    table(schema, name)
                )
            )
        ]


def position_of(database_url: str, schema: str, log: str, nid: int) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            sql.SQL("SELECT position FROM {} WHERE log_name = %s AND notification_id = %s").format(
                table(schema, "audit_chain")
            ),
            (log, nid),
        ).fetchone()
    assert row is not None
    return int(row[0])


# --- chaining ---------------------------------------------------------------------------------


def test_an_untampered_log_verifies_clean_against_its_checkpoints_and_the_anchor(
    chained: dict[str, int], database_url: str, schema: str, anchor: Web3Anchor
) -> None:
    report = verify(database_url, schema, anchor=anchor)
    assert report.finding is None
    assert report.events_checked == chained["chained"]
    assert report.checkpoints_checked == chained["checkpoints"] == anchor.count()
    assert report.anchors_checked == anchor.count()
    assert report.unanchored_entries == 0
    assert dict(report.unchained) == {"ledger": 0, "marketplace": 0, "usage": 0, "settlement": 0}
    ledger_rows = rows(database_url, schema, "ledger_events")
    market_rows = rows(database_url, schema, "marketplace_events")
    assert chained["chained"] == len(ledger_rows) + len(market_rows)


def test_checkpoints_cut_every_n_entries_with_a_final_partial_one(
    chained: dict[str, int], database_url: str, schema: str
) -> None:
    with psycopg.connect(database_url) as conn:
        cps = conn.execute(
            sql.SQL(
                "SELECT checkpoint_index, first_position, last_position FROM {} ORDER BY 1"
            ).format(table(schema, "audit_checkpoints"))
        ).fetchall()
    n = chained["chained"]
    full, rest = divmod(n, CHECKPOINT_SIZE)
    expected = [(i, i * CHECKPOINT_SIZE + 1, (i + 1) * CHECKPOINT_SIZE) for i in range(full)]
    if rest:
        expected.append((full, full * CHECKPOINT_SIZE + 1, n))
    assert cps == expected


def test_chaining_again_appends_only_new_events_and_a_missing_table_is_skipped(
    chained: dict[str, int], market: Market, chainer: Chainer, database_url: str, schema: str
) -> None:
    again = chainer.run()
    assert again.chained == 0 and again.checkpoints == ()
    trade(market, 3)
    pending = verify(database_url, schema)
    assert pending.clean and sum(pending.unchained.values()) > 0
    more = chainer.run(final_checkpoint=True)
    assert more.chained == sum(pending.unchained.values())
    assert more.head_position == chained["chained"] + more.chained
    after = verify(database_url, schema)
    assert after.clean and sum(after.unchained.values()) == 0
    assert after.events_checked == more.head_position


def test_the_log_list_is_configurable(
    logged: dict[str, int], database_url: str, schema: str
) -> None:
    only_ledger = (AuditedLog("ledger", "ledger_events"),)
    report = Chainer(database_url, schema, logs=only_ledger).run(final_checkpoint=True)
    assert set(report.chained_per_log) == {"ledger"}
    assert report.chained == len(rows(database_url, schema, "ledger_events"))
    assert verify(database_url, schema, logs=only_ledger).clean
    # the full list sees the ledger's entries, and the marketplace as not yet chained
    full = verify(database_url, schema)
    assert full.clean and full.unchained["marketplace"] > 0


def test_two_chainers_at_once_chain_each_event_exactly_once(
    logged: dict[str, int], database_url: str, schema: str
) -> None:
    errors: list[BaseException] = []
    totals: list[int] = []

    def work() -> None:
        try:
            report = Chainer(database_url, schema, batch_size=3, checkpoint_size=5).run()
            totals.append(report.chained)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    n = len(rows(database_url, schema, "ledger_events")) + len(
        rows(database_url, schema, "marketplace_events")
    )
    assert sum(totals) == n
    report = verify(database_url, schema)
    assert report.clean and report.events_checked == n


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE {t} SET {key} = {key}",
        "DELETE FROM {t}",
        "TRUNCATE {t} CASCADE",
    ],
)
@pytest.mark.parametrize("name", ["audit_chain", "audit_checkpoints", "audit_anchors"])
def test_the_audit_tables_are_append_only(
    chained: dict[str, int], database_url: str, schema: str, name: str, statement: str
) -> None:
    key = "position" if name == "audit_chain" else "checkpoint_index"
    query = statement.format(t=f'"{schema}"."{name}"', key=key)
    with (
        psycopg.connect(database_url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"),
    ):
        conn.execute(query)


# --- tampering --------------------------------------------------------------------------------


def test_one_byte_altered_in_a_state_is_reported_as_altered_at_that_event(
    chained: dict[str, int], database_url: str, schema: str, anchor: Web3Anchor
) -> None:
    ledger = rows(database_url, schema, "ledger_events")
    nid, state = ledger[len(ledger) // 2]
    altered = state[:5] + bytes([state[5] ^ 0x01]) + state[6:]
    with superuser(database_url) as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET state = %s WHERE notification_id = %s").format(
                table(schema, "ledger_events")
            ),
            (altered, nid),
        )
    report = verify(database_url, schema, anchor=anchor)
    assert report.finding is not None
    assert (report.finding.kind, report.finding.log, report.finding.notification_id) == (
        Tamper.event_altered,
        "ledger",
        nid,
    )
    assert report.finding.position == position_of(database_url, schema, "ledger", nid)


def test_a_deleted_row_is_reported_as_deleted(
    chained: dict[str, int], database_url: str, schema: str, anchor: Web3Anchor
) -> None:
    market = rows(database_url, schema, "marketplace_events")
    nid = market[3][0]
    with superuser(database_url) as conn:
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE notification_id = %s").format(
                table(schema, "marketplace_events")
            ),
            (nid,),
        )
    finding = verify(database_url, schema, anchor=anchor).finding
    assert finding is not None
    assert (finding.kind, finding.log, finding.notification_id) == (
        Tamper.event_deleted,
        "marketplace",
        nid,
    )


def test_an_inserted_row_is_reported_as_inserted(
    chained: dict[str, int], database_url: str, schema: str, anchor: Web3Anchor
) -> None:
    hole = chained["ledger_hole"]
    with superuser(database_url) as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (originator_id, originator_version, topic, state, notification_id)"
                " SELECT %s, 1, topic, state, %s FROM {} ORDER BY notification_id LIMIT 1"
            ).format(table(schema, "ledger_events"), table(schema, "ledger_events")),
            (uuid.uuid4(), hole),
        )
    finding = verify(database_url, schema, anchor=anchor).finding
    assert finding is not None
    assert (finding.kind, finding.log, finding.notification_id) == (
        Tamper.event_inserted,
        "ledger",
        hole,
    )


def test_two_rows_swapped_are_reported_as_reordered_at_the_first(
    chained: dict[str, int], database_url: str, schema: str, anchor: Web3Anchor
) -> None:
    market = rows(database_url, schema, "marketplace_events")
    (a, state_a), (b, state_b) = market[2], market[5]
    with superuser(database_url) as conn:
        update = sql.SQL("UPDATE {} SET state = %s WHERE notification_id = %s").format(
            table(schema, "marketplace_events")
        )
        conn.execute(update, (state_b, a))
        conn.execute(update, (state_a, b))
    finding = verify(database_url, schema, anchor=anchor).finding
    assert finding is not None
    assert (finding.kind, finding.log, finding.notification_id) == (
        Tamper.events_reordered,
        "marketplace",
        a,
    )
    assert str(b) in finding.detail


def test_an_altered_checkpoint_root_is_reported_against_the_anchor(
    chained: dict[str, int], database_url: str, schema: str, anchor: Web3Anchor
) -> None:
    with superuser(database_url) as conn:
        conn.execute(
            sql.SQL(
                "UPDATE {} SET merkle_root = sha256(merkle_root) WHERE checkpoint_index = 1"
            ).format(table(schema, "audit_checkpoints"))
        )
    report = verify(database_url, schema, anchor=anchor)
    assert report.finding is not None
    assert (report.finding.kind, report.finding.checkpoint_index) == (Tamper.checkpoint_altered, 1)
    assert "anchored root agrees" in report.finding.detail
    assert report.events_checked == 2 * CHECKPOINT_SIZE


def test_a_log_rewritten_with_its_chain_and_checkpoints_is_caught_only_by_the_anchor(
    chained: dict[str, int], database_url: str, schema: str, anchor: Web3Anchor, chainer: Chainer
) -> None:
    ledger = rows(database_url, schema, "ledger_events")
    nid, state = ledger[-2]
    position = position_of(database_url, schema, "ledger", nid)
    with superuser(database_url) as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET state = %s WHERE notification_id = %s").format(
                table(schema, "ledger_events")
            ),
            (state.replace(b'"', b"'", 1), nid),
        )
        for name in ("audit_anchors", "audit_checkpoints", "audit_chain"):
            conn.execute(sql.SQL("DELETE FROM {}").format(table(schema, name)))
    chainer.run(final_checkpoint=True)
    assert verify(database_url, schema).clean  # the database alone agrees with itself
    finding = verify(database_url, schema, anchor=anchor).finding
    assert finding is not None
    assert finding.kind is Tamper.anchor_mismatch
    assert finding.checkpoint_index == (position - 1) // CHECKPOINT_SIZE
    with pytest.raises(AnchorMismatchError, match=f"checkpoint {finding.checkpoint_index}"):
        chainer.anchor(anchor)


def test_the_first_tampered_event_in_chain_order_is_the_one_reported(
    chained: dict[str, int], database_url: str, schema: str
) -> None:
    ledger = rows(database_url, schema, "ledger_events")
    market = rows(database_url, schema, "marketplace_events")
    targets = [
        ("ledger_events", "ledger", ledger[-1][0]),
        ("marketplace_events", "marketplace", market[1][0]),
    ]
    with superuser(database_url) as conn:
        for name, _, nid in targets:
            conn.execute(
                sql.SQL("UPDATE {} SET topic = topic || 'x' WHERE notification_id = %s").format(
                    table(schema, name)
                ),
                (nid,),
            )
    first = min(targets, key=lambda t: position_of(database_url, schema, t[1], t[2]))
    finding = verify(database_url, schema).finding
    assert finding is not None
    assert (finding.kind, finding.log, finding.notification_id) == (
        Tamper.event_altered,
        first[1],
        first[2],
    )


def test_an_altered_chain_entry_is_reported(
    chained: dict[str, int], database_url: str, schema: str
) -> None:
    with superuser(database_url) as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET chain_hash = sha256(chain_hash) WHERE position = 4").format(
                table(schema, "audit_chain")
            )
        )
    finding = verify(database_url, schema).finding
    assert finding is not None
    assert (finding.kind, finding.position) == (Tamper.chain_entry_altered, 4)


# --- anchoring --------------------------------------------------------------------------------


def test_anchoring_is_idempotent_and_recovers_a_lost_record_from_the_contract(
    chained: dict[str, int], database_url: str, schema: str, anchor: Web3Anchor, chainer: Chainer
) -> None:
    count = anchor.count()
    assert count == chained["checkpoints"]
    assert chainer.anchor(anchor) == []
    with psycopg.connect(database_url) as conn:
        recorded = conn.execute(
            sql.SQL("SELECT checkpoint_index, tx_hash FROM {} ORDER BY 1").format(
                table(schema, "audit_anchors")
            )
        ).fetchall()
    with superuser(database_url) as conn:  # as if the process died after sending
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE checkpoint_index >= 1").format(
                table(schema, "audit_anchors")
            )
        )
    redone = chainer.anchor(anchor)
    assert [r.index for r in redone] == list(range(1, count))
    assert all(r.already_on_chain for r in redone)
    assert anchor.count() == count
    assert [(r.index, r.tx_hash) for r in redone] == recorded[1:]


# --- proofs -----------------------------------------------------------------------------------


def test_an_inclusion_proof_verifies_against_the_anchored_root_and_an_altered_one_fails(
    chained: dict[str, int], database_url: str, schema: str, anchor: Web3Anchor
) -> None:
    nid = rows(database_url, schema, "marketplace_events")[4][0]
    proof = prove(database_url, schema, "marketplace", nid)
    assert proof.anchor is not None and proof.anchor.contract_address == anchor.address
    parsed = InclusionProof.model_validate_json(proof.model_dump_json())
    anchored_root = anchor.root_at(parsed.checkpoint.index)
    assert verify_proof(parsed, anchored_root).ok

    data = json.loads(proof.model_dump_json())
    data["event"]["originator_version"] += 1
    bad = verify_proof(InclusionProof.model_validate(data), anchored_root)
    assert not bad.ok and "event digest" in bad.reason

    data = json.loads(proof.model_dump_json())
    path = data["checkpoint"]["merkle_path"]
    path[0] = "0x" + bytes(32).hex()
    assert not verify_proof(InclusionProof.model_validate(data), anchored_root).ok

    other = anchor.root_at(parsed.checkpoint.index + 1)
    rejected = verify_proof(parsed, other)
    assert not rejected.ok and "trusted root" in rejected.reason


def test_proving_an_event_not_chained_or_an_unknown_log_is_a_clear_error(
    chained: dict[str, int], database_url: str, schema: str
) -> None:
    with pytest.raises(AuditError, match="not in the chain"):
        prove(database_url, schema, "ledger", 10**9)
    with pytest.raises(AuditError, match="no log named 'bank'"):
        prove(database_url, schema, "bank", 1)


# --- the commands -----------------------------------------------------------------------------


def cli(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aether")
    audit_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return audit_cli.run(Settings(), parser.parse_args(["audit", *args]))


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch, database_url: str, schema: str) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("POSTGRES_SCHEMA", schema)


def test_the_audit_commands_chain_verify_prove_and_check_a_proof(
    logged: dict[str, int],
    settings_env: None,
    database_url: str,
    schema: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli(["chain", "--checkpoint-size", "5", "--final"]) == 0
    out = capsys.readouterr().out
    assert "chained" in out and "checkpoint 0: positions 1..5" in out
    assert cli(["verify"]) == 0
    out = capsys.readouterr().out
    assert "CLEAN" in out and "events/s" in out
    assert aether(["audit", "verify"]) == 0  # wired into `aether`
    assert "CLEAN" in capsys.readouterr().out

    nid = rows(database_url, schema, "ledger_events")[2][0]
    proof_file = tmp_path / "proof.json"
    assert cli(["prove", "ledger", str(nid), "-o", str(proof_file)]) == 0
    proof = InclusionProof.model_validate_json(proof_file.read_text())
    capsys.readouterr()
    assert cli(["verify-proof", str(proof_file), "--root", proof.checkpoint.merkle_root]) == 0
    assert "VALID" in capsys.readouterr().out
    assert cli(["verify-proof", str(proof_file), "--root", "0x" + "11" * 32]) == 1
    assert "REJECTED" in capsys.readouterr().out

    with superuser(database_url) as conn:
        conn.execute(
            sql.SQL(
                "UPDATE {} SET state = state || '\\x20'::bytea WHERE notification_id = %s"
            ).format(table(schema, "ledger_events")),
            (nid,),
        )
    assert cli(["verify", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["finding"]["kind"] == "altered"
    assert (report["finding"]["log"], report["finding"]["notification_id"]) == ("ledger", nid)


def test_the_audit_commands_refuse_bad_input_with_exit_code_2(
    logged: dict[str, int], settings_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["prove", "ledger", "1"]) == 2
    assert "not chained yet" in capsys.readouterr().err
    assert cli(["chain"]) == 0
    assert cli(["prove", "ledger", "999999"]) == 2
    assert "not in the chain" in capsys.readouterr().err
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"version": 1, "event": {}}')
    assert cli(["verify-proof", str(garbage), "--root", "0x" + "00" * 32]) == 2
    assert "not a valid inclusion proof" in capsys.readouterr().err
    assert cli(["verify-proof", str(tmp_path / "missing.json"), "--root", "0x" + "00" * 32]) == 2
    assert cli(["verify", "--rpc-url", "http://127.0.0.1:1"]) == 2
    assert "both --rpc-url and --anchor-address" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli(["chain", "--checkpoint-size", "0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli(["verify", "--logs", "ledger=bad-table"])
    assert exc.value.code == 2


def test_verify_before_any_chain_run_creates_nothing_and_counts_every_event_unchained(
    logged: dict[str, int], database_url: str, schema: str, anchor: Web3Anchor
) -> None:
    report = verify(database_url, schema, anchor=anchor)
    assert report.clean and report.events_checked == 0
    assert report.unchained["ledger"] == len(rows(database_url, schema, "ledger_events"))
    with psycopg.connect(database_url) as conn:
        found = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s "
            "AND table_name LIKE 'audit%%'",
            (schema,),
        ).fetchone()
    assert found == (0,)
    with pytest.raises(AuditError, match="not chained yet"):
        prove(database_url, schema, "ledger", 1)
