"""The database itself refuses to change or remove a stored event."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from ledger.model import NewAccount, NewTransfer
from ledger.writer import LedgerWriter


@pytest.fixture
def events_table(writer: LedgerWriter, schema: str) -> str:
    a, b = uuid.uuid4(), uuid.uuid4()
    writer.open_accounts([NewAccount(a, "AETH", 1), NewAccount(b, "AETH", 1)])
    assert writer.create_transfers([NewTransfer(uuid.uuid4(), a, b, 5, "AETH", 1)])[0].ok
    return f"{schema}.ledger_events"


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE {table} SET state = convert_to('{{}}', 'UTF8')",
        "UPDATE {table} SET originator_version = originator_version + 100",
        "DELETE FROM {table}",
        "DELETE FROM {table} WHERE originator_version = 1",
        "TRUNCATE {table}",
    ],
)
def test_the_database_refuses_to_update_delete_or_truncate_stored_events(
    events_table: str, database_url: str, statement: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        before = conn.execute(
            f"SELECT count(*), md5(string_agg(state::text, ',' ORDER BY notification_id)) FROM {events_table}"
        ).fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute(statement.format(table=events_table))
        after = conn.execute(
            f"SELECT count(*), md5(string_agg(state::text, ',' ORDER BY notification_id)) FROM {events_table}"
        ).fetchone()
    assert before == after
    # two accounts + their batch record, one transfer + its batch record
    assert before is not None and before[0] == 5


def test_appending_new_events_still_works_after_a_refused_change(
    events_table: str, database_url: str, writer: LedgerWriter
) -> None:
    with (
        psycopg.connect(database_url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(f"DELETE FROM {events_table}")
    new = uuid.uuid4()
    assert writer.open_accounts([NewAccount(new, "AETH", 1)])[0] == 0
    assert new in LedgerWriter(writer.app).state.accounts
    assert len(writer.state.accounts) == 3
