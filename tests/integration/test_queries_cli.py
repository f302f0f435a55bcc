"""`aether earnings`, `aether usage` and `aether trial-balance --format` on real PostgreSQL:
the same numbers as the HTTP API (JSON compared whole), as a table, CSV or JSON; unknown
ids exit 1 and bad arguments 2; `aether api-key create` prints a key the API takes."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from uuid import uuid4

import pytest
from fastapi.testclient import TestClient

from ledger import api_keys
from ledger.api_keys import PartyKind
from ledger.store import LedgerApplication
from tests.earnings_scenario import Scenario, build_scenario
from tests.market import uid
from workers.api import create_app
from workers.cli import main
from workers.projector import open_views


@pytest.fixture
def scenario(
    ledger_app: LedgerApplication,
    ledger_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    schema: str,
) -> Scenario:
    found = build_scenario(ledger_app, ledger_env)
    with open_views(ledger_app, found.market.app) as views:
        views.catch_up()
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("POSTGRES_SCHEMA", schema)
    return found


@pytest.fixture
def client(scenario: Scenario, database_url: str, schema: str) -> Iterator[TestClient]:
    with TestClient(create_app(database_url, schema, pool_size=2)) as c:
        yield c


@pytest.fixture
def finance(database_url: str, schema: str) -> dict[str, str]:
    key = api_keys.create_key(database_url, schema, PartyKind.finance, uuid4()).key
    return {"Authorization": f"Bearer {key}"}


def out(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().out


def test_earnings_as_json_equal_the_api(
    client: TestClient, finance: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("p1", "p2"):
        code, text = out(capsys, ["earnings", "--provider", str(uid(name)), "--format", "json"])
        assert code == 0
        api = client.get(f"/v1/providers/{uid(name)}/earnings", headers=finance).json()
        assert json.loads(text) == api
    epoch = api["epochs"][0]["epoch"]
    code, text = out(
        capsys,
        ["earnings", "--provider", str(uid("p2")), "--epoch", str(epoch), "--format", "json"],
    )
    api = client.get(
        f"/v1/providers/{uid('p2')}/earnings", params={"epoch": epoch}, headers=finance
    ).json()
    assert code == 0 and json.loads(text) == api


def test_earnings_as_csv_and_table(
    scenario: Scenario,
    client: TestClient,
    finance: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    api = client.get(f"/v1/providers/{uid('p2')}/earnings", headers=finance).json()
    code, text = out(capsys, ["earnings", "--provider", str(uid("p2")), "--format", "csv"])
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [int(r["epoch"]) for r in rows] == [e["epoch"] for e in api["epochs"]]
    assert [r["earned"] for r in rows] == [e["earned"] for e in api["epochs"]]
    code, text = out(capsys, ["earnings", "--provider", str(uid("p2"))])
    assert code == 0 and "claimable" in text and "pending" in text


def test_usage_of_a_consumer_and_of_a_lease_equal_the_api(
    scenario: Scenario,
    client: TestClient,
    finance: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, text = out(capsys, ["usage", "--consumer", str(uid("c1")), "--format", "json"])
    api = client.get(f"/v1/consumers/{uid('c1')}/leases", headers=finance).json()
    assert code == 0 and json.loads(text) == api
    lease = scenario.leases["l2"]
    code, text = out(capsys, ["usage", "--lease", str(lease), "--format", "json"])
    api_lease = client.get(f"/v1/leases/{lease}", headers=finance).json()
    assert code == 0 and json.loads(text) == api_lease
    code, text = out(capsys, ["usage", "--lease", str(lease), "--format", "csv"])
    (row,) = csv.DictReader(io.StringIO(text))
    assert row["charged"] == api_lease["charged"] and row["pending_reports"] == "1"
    code, text = out(capsys, ["usage", "--consumer", str(uid("c1"))])
    assert code == 0 and str(scenario.leases["l1"]) in text


def test_the_trial_balance_as_json_and_csv_equals_the_api(
    client: TestClient, finance: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = out(capsys, ["trial-balance", "--format", "json"])
    api = client.get("/v1/finance/trial-balance", headers=finance).json()
    assert code == 0 and json.loads(text) == api and api["balanced"]
    code, text = out(capsys, ["trial-balance", "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["account_id"]: r["balance"] for r in rows} == {
        a["account_id"]: a["balance"] for a in api["accounts"]
    }


def test_unknown_ids_exit_1_and_bad_arguments_exit_2(
    scenario: Scenario, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["earnings", "--provider", str(uid("nobody"))]) == 1
    assert main(["earnings", "--provider", str(uid("p2")), "--epoch", "3"]) == 1
    assert main(["usage", "--lease", str(uuid4())]) == 1
    for argv in (
        ["earnings", "--provider", "not-a-uuid"],
        ["earnings", "--provider", str(uid("p2")), "--epoch", "x"],
        ["usage"],
        ["usage", "--lease", str(uuid4()), "--consumer", str(uuid4())],
        ["trial-balance", "--format", "xml"],
        ["api-key", "create", "--party", "root", "--id", str(uuid4())],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2, argv
    capsys.readouterr()


def test_an_api_key_printed_once_opens_the_api(
    scenario: Scenario, client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = out(capsys, ["api-key", "create", "--party", "provider", "--id", str(uid("p1"))])
    assert code == 0
    key = next(line.split()[-1] for line in text.splitlines() if line.startswith("key:"))
    headers = {"X-API-Key": key}
    assert client.get(f"/v1/providers/{uid('p1')}/earnings", headers=headers).status_code == 200
    assert client.get(f"/v1/providers/{uid('p2')}/earnings", headers=headers).status_code == 403
