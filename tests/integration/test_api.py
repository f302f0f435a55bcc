"""The HTTP API against the real app and real PostgreSQL (FastAPI's TestClient): each party
reads what it may and nothing else (a provider cannot read another's data, nor finance or
audit routes), the numbers equal the queries', errors are JSON with codes and bad
parameters are 4xx, keys are stored hashed, the export pages every log exactly once, a proof
from the API verifies, health, metrics and OpenAPI are served."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql

from ledger import api_keys
from ledger.api_keys import PartyKind
from ledger.audit import Chainer, InclusionProof, verify_proof
from ledger.store import LedgerApplication
from projections import queries as q
from tests.earnings_scenario import Scenario, build_scenario
from tests.market import uid
from workers.api import create_app
from workers.projector import open_views


@pytest.fixture
def scenario(ledger_app: LedgerApplication, ledger_env: dict[str, str]) -> Scenario:
    found = build_scenario(ledger_app, ledger_env)
    with open_views(ledger_app, found.market.app) as views:
        views.catch_up()
    return found


@pytest.fixture
def client(scenario: Scenario, database_url: str, schema: str) -> Iterator[TestClient]:
    with TestClient(create_app(database_url, schema, pool_size=2)) as c:
        yield c


@pytest.fixture
def keys(database_url: str, schema: str) -> dict[str, str]:
    parties = {
        "p1": (PartyKind.provider, uid("p1")),
        "p2": (PartyKind.provider, uid("p2")),
        "c1": (PartyKind.consumer, uid("c1")),
        "finance": (PartyKind.finance, uuid4()),
        "auditor": (PartyKind.auditor, uuid4()),
    }
    return {
        name: api_keys.create_key(database_url, schema, kind, pid).key
        for name, (kind, pid) in parties.items()
    }


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def query(database_url: str, schema: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    async def go() -> Any:
        conn = await q.connect(database_url, schema)
        try:
            return await fn(conn, *args, **kwargs)
        finally:
            await conn.close()

    return asyncio.run(go())


def error_code(response: Any) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return str(body["error"]["code"])


def test_a_provider_reads_its_earnings_as_the_queries_give_them(
    client: TestClient, keys: dict[str, str], database_url: str, schema: str
) -> None:
    response = client.get(f"/v1/providers/{uid('p2')}/earnings", headers=auth(keys["p2"]))
    assert response.status_code == 200
    expected = query(database_url, schema, q.provider_earnings, uid("p2"))
    assert response.json() == expected.model_dump(mode="json")
    body = response.json()
    assert int(body["claimed"]) > 0 and body["pending"]["reports"] == 1
    epoch = body["epochs"][0]["epoch"]
    one = client.get(
        f"/v1/providers/{uid('p2')}/earnings", params={"epoch": epoch}, headers=auth(keys["p2"])
    )
    assert one.status_code == 200 and [e["epoch"] for e in one.json()["epochs"]] == [epoch]
    for path in ("leases", "stake", "reputation"):
        r = client.get(f"/v1/providers/{uid('p2')}/{path}", headers=auth(keys["p2"]))
        assert r.status_code == 200, (path, r.text)
    stake = client.get(f"/v1/providers/{uid('p1')}/stake", headers=auth(keys["p1"])).json()
    assert len(stake["slashes"]) == 1


def test_a_provider_cannot_read_another_providers_data_nor_finance_or_audit(
    client: TestClient, keys: dict[str, str], scenario: Scenario
) -> None:
    p1 = auth(keys["p1"])
    for path in ("earnings", "leases", "stake", "reputation"):
        r = client.get(f"/v1/providers/{uid('p2')}/{path}", headers=p1)
        assert r.status_code == 403 and error_code(r) == "forbidden", path
    r = client.get(f"/v1/consumers/{uid('c2')}/leases", headers=p1)
    assert r.status_code == 403
    r = client.get(f"/v1/leases/{scenario.leases['l2']}", headers=p1)
    assert r.status_code == 404 and error_code(r) == "unknown_lease"
    """Another's lease is answered as unknown: its existence is not revealed."""
    assert client.get(f"/v1/leases/{scenario.leases['l1']}", headers=p1).status_code == 200
    for path in (
        "/v1/finance/trial-balance",
        "/v1/finance/epochs",
        f"/v1/finance/epochs/{scenario.settled_epochs[0]}/reconciliation",
        "/v1/audit/logs",
        "/v1/audit/logs/marketplace/events",
        "/v1/audit/logs/marketplace/events/1/proof",
    ):
        r = client.get(path, headers=p1)
        assert r.status_code == 403 and error_code(r) == "forbidden", path
    c1 = auth(keys["c1"])
    assert client.get(f"/v1/providers/{uid('p1')}/earnings", headers=c1).status_code == 403
    assert client.get(f"/v1/consumers/{uid('c2')}/leases", headers=c1).status_code == 403


def test_a_consumer_reads_usage_charges_and_refunds_per_lease(
    client: TestClient, keys: dict[str, str], scenario: Scenario, database_url: str, schema: str
) -> None:
    r = client.get(f"/v1/consumers/{uid('c1')}/leases", headers=auth(keys["c1"]))
    assert r.status_code == 200
    (lease,) = r.json()
    assert lease["lease_id"] == str(scenario.leases["l1"])
    assert lease["usage"]["reports"] == len(scenario.reports["l1"])
    assert int(lease["refunded"]) == int(lease["withheld"]) > 0
    assert len(lease["refunds"]) == 1
    expected = query(database_url, schema, q.consumer_leases, uid("c1"))
    assert r.json() == [x.model_dump(mode="json") for x in expected]
    one = client.get(f"/v1/leases/{scenario.leases['l1']}", headers=auth(keys["c1"]))
    assert one.json() == lease


def test_bad_parameters_and_keys_are_4xx_json_errors(
    client: TestClient, keys: dict[str, str], database_url: str, schema: str
) -> None:
    fin, p2 = auth(keys["finance"]), auth(keys["p2"])
    cases: list[tuple[str, dict[str, str], int, str]] = [
        ("/v1/providers/not-a-uuid/earnings", p2, 422, "invalid_parameter"),
        (f"/v1/providers/{uid('p2')}/earnings?epoch=abc", p2, 422, "invalid_parameter"),
        (f"/v1/providers/{uid('p2')}/earnings?epoch=-5", p2, 422, "invalid_parameter"),
        (f"/v1/providers/{uid('p2')}/earnings?epoch=7", p2, 404, "unknown_epoch"),
        (f"/v1/providers/{uid('nobody')}/earnings", fin, 404, "unknown_provider"),
        ("/v1/leases/1234", fin, 422, "invalid_parameter"),
        (f"/v1/leases/{uuid4()}", fin, 404, "unknown_lease"),
        ("/v1/finance/epochs/7/reconciliation", fin, 404, "unknown_epoch"),
        ("/v1/finance/epochs/x/reconciliation", fin, 422, "invalid_parameter"),
        ("/v1/audit/logs/marketplace/events?cursor=%%%", fin, 400, "invalid_cursor"),
        ("/v1/audit/logs/marketplace/events?cursor=bm9wZQ", fin, 400, "invalid_cursor"),
        (
            f"/v1/audit/logs/marketplace/events?cursor={q.encode_cursor('ledger', 3)}",
            fin,
            400,
            "invalid_cursor",
        ),
        ("/v1/audit/logs/marketplace/events?limit=0", fin, 422, "invalid_parameter"),
        ("/v1/audit/logs/marketplace/events?limit=100000", fin, 422, "invalid_parameter"),
        ("/v1/audit/logs/nolog/events", fin, 404, "unknown_log"),
        ("/v1/audit/logs/marketplace/events/0/proof", fin, 422, "invalid_parameter"),
        ("/v1/nothing-here", fin, 404, "not_found"),
        (f"/v1/providers/{uid('p2')}/earnings", {}, 401, "missing_api_key"),
        (f"/v1/providers/{uid('p2')}/earnings", {"X-API-Key": "nope"}, 401, "invalid_api_key"),
        (
            f"/v1/providers/{uid('p2')}/earnings",
            {"Authorization": "Basic x"},
            401,
            "invalid_api_key",
        ),
    ]
    forged = keys["p2"][:-4] + ("AAAA" if not keys["p2"].endswith("AAAA") else "BBBB")
    cases.append((f"/v1/providers/{uid('p2')}/earnings", auth(forged), 401, "invalid_api_key"))
    unknown = api_keys.KEY_PREFIX + uuid4().hex + "_" + "A" * 43
    cases.append((f"/v1/providers/{uid('p2')}/earnings", auth(unknown), 401, "invalid_api_key"))
    for path, headers, status, code in cases:
        r = client.get(path, headers=headers)
        assert (r.status_code, error_code(r)) == (status, code), path
    revoked = api_keys.create_key(database_url, schema, PartyKind.provider, uid("p2"))
    assert api_keys.revoke_key(database_url, schema, revoked.key_id, datetime.now(UTC))
    r = client.get(f"/v1/providers/{uid('p2')}/earnings", headers=auth(revoked.key))
    assert (r.status_code, error_code(r)) == (401, "invalid_api_key")


def test_keys_are_stored_as_their_sha256_only(
    keys: dict[str, str], database_url: str, schema: str
) -> None:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            sql.SQL("SELECT key_id, party_kind, key_sha256 FROM {}.api_keys").format(
                sql.Identifier(schema)
            )
        ).fetchall()
    assert len(rows) == len(keys)
    stored = {bytes(r[2]) for r in rows}
    for key in keys.values():
        assert hashlib.sha256(key.encode()).digest() in stored
        assert all(key.encode() not in bytes(r[2]) for r in rows)


def test_finance_reads_the_trial_balance_and_every_epoch_reconciles(
    client: TestClient, keys: dict[str, str], scenario: Scenario
) -> None:
    fin = auth(keys["finance"])
    balance = client.get("/v1/finance/trial-balance", headers=fin).json()
    assert balance["balanced"] is True
    state = scenario.market.writer.state
    assert {a["account_id"]: int(a["balance"]) for a in balance["accounts"]} == {
        str(a.id): a.balance for a in state.accounts.values()
    }
    epochs = client.get("/v1/finance/epochs", headers=fin).json()
    assert [e["epoch"] for e in epochs] == scenario.settled_epochs
    for epoch in scenario.settled_epochs:
        r = client.get(f"/v1/finance/epochs/{epoch}/reconciliation", headers=fin)
        assert r.status_code == 200
        body = r.json()
        assert body["flagged"] == 0, body
        assert any(line["item"].startswith("payout ") for line in body["lines"])


def test_the_export_pages_every_log_once_in_order_and_a_proof_verifies(
    client: TestClient, keys: dict[str, str], database_url: str, schema: str
) -> None:
    aud = auth(keys["auditor"])
    logs = client.get("/v1/audit/logs", headers=aud).json()
    assert set(logs) == {"ledger", "marketplace", "usage", "settlement"}
    for log in logs:
        seen: list[int] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 7}
            if cursor is not None:
                params["cursor"] = cursor
            page = client.get(f"/v1/audit/logs/{log}/events", params=params, headers=aud).json()
            seen += [e["notification_id"] for e in page["events"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        with psycopg.connect(database_url) as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    sql.SQL("SELECT notification_id FROM {}.{} ORDER BY 1").format(
                        sql.Identifier(schema), sql.Identifier(q.LOG_TABLES[log])
                    )
                )
            ]
        assert seen == ids and ids, log
    r = client.get("/v1/audit/logs/marketplace/events/1/proof", headers=aud)
    assert (r.status_code, error_code(r)) == (404, "not_provable")
    Chainer(database_url, schema, checkpoint_size=16).run(final_checkpoint=True)
    r = client.get("/v1/audit/logs/marketplace/events/5/proof", headers=aud)
    assert r.status_code == 200
    proof = InclusionProof.model_validate_json(r.text)
    root = bytes.fromhex(proof.checkpoint.merkle_root[2:])
    assert verify_proof(proof, root).ok
    assert not verify_proof(proof, bytes(32)).ok


def test_health_metrics_and_openapi(client: TestClient, keys: dict[str, str]) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["views_ready"] is True
    client.get(f"/v1/providers/{uid('p2')}/earnings", headers=auth(keys["p2"]))
    client.get(f"/v1/providers/{uid('p2')}/earnings", headers=auth(keys["p1"]))
    text = client.get("/metrics").text
    assert (
        'aether_api_requests_total{method="GET",route="/v1/providers/{provider_id}/earnings",status="200"}'
        in text
    )
    assert 'route="/v1/providers/{provider_id}/earnings",status="403"' in text
    assert "aether_api_request_duration_seconds_bucket" in text
    spec = client.get("/openapi.json").json()
    for path in (
        "/v1/providers/{provider_id}/earnings",
        "/v1/consumers/{consumer_id}/leases",
        "/v1/finance/trial-balance",
        "/v1/finance/epochs/{epoch}/reconciliation",
        "/v1/audit/logs/{log}/events",
        "/v1/audit/logs/{log}/events/{notification_id}/proof",
        "/health",
        "/metrics",
    ):
        assert path in spec["paths"], path
    assert client.get("/docs").status_code == 200
