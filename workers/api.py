"""The HTTP API (FastAPI): providers, consumers, finance and auditors read the views.

Every route but /health and /metrics needs an API key (`Authorization: Bearer <key>` or
`X-API-Key: <key>`, made by `aether api-key create`), which names the caller's party
(`ledger.api_keys`). Who may read what:

| routes | provider | consumer | finance | auditor |
| --- | --- | --- | --- | --- |
| /v1/providers/{id}/... | its own id | no | yes | yes |
| /v1/consumers/{id}/... | no | its own id | yes | yes |
| /v1/leases/{id} | its leases | its leases | yes | yes |
| /v1/finance/... | no | no | yes | yes |
| /v1/audit/... | no | no | yes | yes |

Reading another party's data is refused with 403 (`forbidden`); a lease that is not the
caller's is answered as unknown (404), so ids cannot be probed. Every error is JSON,
``{"error": {"code": ..., "message": ...}}``; a bad parameter (malformed UUID, bad cursor,
out-of-range limit) is a 4xx, never a 500. Reads go through `projections.queries` on an
asyncpg pool; the OpenAPI document is at /openapi.json, its pages at /docs.

`aether api [--host H] [--port P]` runs it with uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

import asyncpg
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ledger import api_keys
from ledger.api_keys import Party, PartyKind
from ledger.audit import AuditError, InclusionProof, prove
from projections import queries as q

API_TITLE = "aether-ledger API"
API_VERSION = "1"
POOL_SIZE_MAX = 16
KEY_CACHE_TTL_S = 5.0
"""How long a checked key is trusted before its row is read again (a revocation takes at
most this long to bite)."""
KEY_CACHE_SIZE_MAX = 10_000
HEALTH_TIMEOUT_S = 2.0
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)

READ_ALL = frozenset({PartyKind.finance, PartyKind.auditor})
"""Parties that read every provider's and consumer's data."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str
    database: str
    views_ready: bool


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message}})


# -- metrics -----------------------------------------------------------------------------------


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "aether_api_requests",
            "HTTP requests answered, by method, route template and status.",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "aether_api_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template.",
            ("method", "route"),
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )


class MetricsMiddleware:
    """Counts requests and times them (a plain ASGI middleware: no per-request task)."""

    def __init__(self, app: AsgiApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - began)


# -- the application ---------------------------------------------------------------------------


@dataclass
class ApiState:
    database_url: str
    schema: str
    pool: Any = None
    keys: dict[UUID, tuple[bytes, Party, float]] = field(default_factory=dict)
    """Key id -> (stored digest, party, when it was read): the key cache."""


def _state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


async def authenticate(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Party:
    """The party of the request's API key; 401 without a valid one."""
    key = x_api_key
    if key is None and authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(401, "invalid_api_key", "Authorization must be 'Bearer <key>'")
        key = value.strip()
    if not key:
        raise ApiError(401, "missing_api_key", "give an API key: Authorization: Bearer <key>")
    key_id = api_keys.parse_key(key)
    if key_id is None:
        raise ApiError(401, "invalid_api_key", "not an API key")
    state = _state(request)
    now = time.monotonic()
    cached = state.keys.get(key_id)
    if cached is None or now - cached[2] > KEY_CACHE_TTL_S:
        row = await state.pool.fetchrow(
            f"SELECT party_kind, party_id, key_sha256 FROM {api_keys.API_KEYS_TABLE_NAME} "  # noqa: S608
            "WHERE key_id = $1 AND revoked_at IS NULL",
            key_id,
        )
        if row is None:
            state.keys.pop(key_id, None)
            raise ApiError(401, "invalid_api_key", "unknown or revoked API key")
        if len(state.keys) >= KEY_CACHE_SIZE_MAX:
            state.keys.clear()
        party = Party(PartyKind(row["party_kind"]), row["party_id"], key_id)
        cached = state.keys[key_id] = (bytes(row["key_sha256"]), party, now)
    if not api_keys.matches(key, cached[0]):
        raise ApiError(401, "invalid_api_key", "unknown or revoked API key")
    return cached[1]


Caller = Annotated[Party, Depends(authenticate)]


def _allow(party: Party, kind: PartyKind, party_id: UUID) -> None:
    if party.kind in READ_ALL or (party.kind is kind and party.id == party_id):
        return
    raise ApiError(
        403, "forbidden", f"a {party.kind.value} key cannot read {kind.value} {party_id}"
    )


def _allow_kinds(party: Party, kinds: frozenset[PartyKind], what: str) -> None:
    if party.kind not in kinds:
        raise ApiError(403, "forbidden", f"a {party.kind.value} key cannot read {what}")


async def _read(
    request: Request, query: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
) -> Any:
    async with _state(request).pool.acquire() as conn:
        return await query(conn, *args, **kwargs)


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 422, 503)
}

ProviderId = Annotated[UUID, Path(description="The provider's id (a UUID).")]
ConsumerId = Annotated[UUID, Path(description="The consumer's id (a UUID).")]
LeaseId = Annotated[UUID, Path(description="The lease's id (a UUID).")]
Epoch = Annotated[int, Path(ge=0, le=2**62, description="A settlement epoch number.")]
LogName = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[a-z_]+$")]


def create_app(database_url: str, schema: str, *, pool_size: int = 8) -> FastAPI:
    """The API over the views in `schema` of the database at `database_url`."""
    if not 1 <= pool_size <= POOL_SIZE_MAX:
        raise ValueError(f"pool_size must be within 1..{POOL_SIZE_MAX}")
    q.check_schema(schema)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ApiState(database_url, schema)
        state.pool = await q.create_pool(database_url, schema, min_size=1, max_size=pool_size)
        async with state.pool.acquire() as conn:
            await conn.execute(api_keys.create_statement(schema).as_string(None))
        app.state.api = state
        try:
            yield
        finally:
            await state.pool.close()

    app = FastAPI(
        title=API_TITLE,
        version=API_VERSION,
        description=(__doc__ or "").split("\n\n")[0],
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(q.QueryError)
    async def query_error(request: Request, exc: q.QueryError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        ]
        return error_response(422, "invalid_parameter", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(
            exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail)
        )

    @app.exception_handler(asyncpg.UndefinedTableError)
    async def not_ready(request: Request, exc: asyncpg.UndefinedTableError) -> JSONResponse:
        return error_response(503, "views_not_ready", "the views are not built: run aether project")

    # -- operations ------------------------------------------------------------------------

    @app.get("/health", response_model=Health, tags=["operations"])
    async def health(request: Request) -> Any:
        """Whether the database answers (503 when it does not)."""
        try:
            async with _state(request).pool.acquire(timeout=HEALTH_TIMEOUT_S) as conn:
                ready = await asyncio.wait_for(q.tables_ready(conn), HEALTH_TIMEOUT_S)
        except (OSError, TimeoutError, asyncpg.PostgresError) as e:
            return error_response(503, "database_unreachable", f"the database does not answer: {e}")
        return Health(status="ok", database="reachable", views_ready=ready)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus() -> Response:
        """Request counts and latency histograms, Prometheus text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- providers ---------------------------------------------------------------------------

    @app.get(
        "/v1/providers/{provider_id}/earnings",
        response_model=q.ProviderEarnings,
        tags=["providers"],
    )
    async def provider_earnings(
        request: Request,
        party: Caller,
        provider_id: ProviderId,
        epoch: Annotated[int | None, Query(ge=-1, le=2**62)] = None,
    ) -> Any:
        """Earned, withheld, fees, settled, claimed, claimable, pending usage and stake; per
        epoch (all, or `epoch` only: 404 `unknown_epoch` when it has nothing there)."""
        _allow(party, PartyKind.provider, provider_id)
        found: q.ProviderEarnings = await _read(
            request, q.provider_earnings, provider_id, epoch=epoch
        )
        # The hot path: serialized once by its own model (the declared response_model is
        # the same), not validated again by FastAPI.
        return Response(found.model_dump_json(), media_type="application/json")

    @app.get(
        "/v1/providers/{provider_id}/leases",
        response_model=list[q.LeaseAccount],
        tags=["providers"],
    )
    async def provider_leases(request: Request, party: Caller, provider_id: ProviderId) -> Any:
        """Earnings per lease: charges, fees, withheld, usage, pending, per epoch."""
        _allow(party, PartyKind.provider, provider_id)
        return await _read(request, q.provider_leases, provider_id)

    @app.get(
        "/v1/providers/{provider_id}/stake",
        response_model=q.ProviderStake,
        tags=["providers"],
    )
    async def provider_stake(request: Request, party: Caller, provider_id: ProviderId) -> Any:
        """Bonded, unbonding, unbonded and slashed stake, and every slash."""
        _allow(party, PartyKind.provider, provider_id)
        return await _read(request, q.provider_stake, provider_id)

    @app.get(
        "/v1/providers/{provider_id}/reputation",
        response_model=q.Reputation,
        tags=["providers"],
    )
    async def provider_reputation(request: Request, party: Caller, provider_id: ProviderId) -> Any:
        """The reputation score now, and each of its components."""
        _allow(party, PartyKind.provider, provider_id)
        return await _read(request, q.provider_reputation, provider_id, datetime.now(UTC))

    # -- consumers and leases ---------------------------------------------------------------

    @app.get(
        "/v1/consumers/{consumer_id}/leases",
        response_model=list[q.LeaseAccount],
        tags=["consumers"],
    )
    async def consumer_leases(request: Request, party: Caller, consumer_id: ConsumerId) -> Any:
        """Usage and charges per lease, and the refunds after slashes."""
        _allow(party, PartyKind.consumer, consumer_id)
        return await _read(request, q.consumer_leases, consumer_id)

    @app.get("/v1/leases/{lease_id}", response_model=q.LeaseAccount, tags=["consumers"])
    async def lease(request: Request, party: Caller, lease_id: LeaseId) -> Any:
        """One lease's usage, charges, pending usage and refunds (its parties only)."""
        if party.kind not in READ_ALL:
            parties = await _read(request, q.lease_parties, lease_id)
            own = parties is not None and (
                (party.kind is PartyKind.provider and parties[0] == party.id)
                or (party.kind is PartyKind.consumer and parties[1] == party.id)
            )
            if not own:
                raise ApiError(404, "unknown_lease", f"no lease {lease_id}")
        return await _read(request, q.lease_account, lease_id)

    # -- finance -----------------------------------------------------------------------------

    @app.get("/v1/finance/trial-balance", response_model=q.TrialBalance, tags=["finance"])
    async def trial_balance(request: Request, party: Caller) -> Any:
        """Every account's balances and the per-asset trial balance (balances view)."""
        _allow_kinds(party, READ_ALL, "the trial balance")
        return await _read(request, q.trial_balance)

    @app.get("/v1/finance/epochs", response_model=list[q.EpochSummary], tags=["finance"])
    async def epochs(request: Request, party: Caller) -> Any:
        """Every planned epoch: status, totals, payout root."""
        _allow_kinds(party, READ_ALL, "epochs")
        return await _read(request, q.epochs)

    @app.get(
        "/v1/finance/epochs/{epoch}/reconciliation",
        response_model=q.EpochReconciliation,
        tags=["finance"],
    )
    async def reconciliation(request: Request, party: Caller, epoch: Epoch) -> Any:
        """The epoch's charges as posted vs its plan, outcome and payout root; the trial
        balance. (`aether reconcile` adds the chain's side.)"""
        _allow_kinds(party, READ_ALL, "reconciliations")
        return await _read(request, q.epoch_reconciliation, epoch)

    # -- audit -------------------------------------------------------------------------------

    @app.get("/v1/audit/logs", response_model=list[str], tags=["audit"])
    async def logs(party: Caller) -> Any:
        """The logs the export serves."""
        _allow_kinds(party, READ_ALL, "the logs")
        return sorted(q.LOG_TABLES)

    @app.get("/v1/audit/logs/{log}/events", response_model=q.EventPage, tags=["audit"])
    async def events(
        request: Request,
        party: Caller,
        log: LogName,
        cursor: Annotated[str | None, Query(max_length=q.CURSOR_LENGTH_MAX)] = None,
        limit: Annotated[int, Query(ge=1, le=q.EXPORT_PAGE_SIZE_MAX)] = q.EXPORT_PAGE_SIZE_DEFAULT,
    ) -> Any:
        """A page of the log's events in log order (keyset pagination: pass `next_cursor`
        back as `cursor`)."""
        _allow_kinds(party, READ_ALL, "the logs")
        return await _read(request, q.export_events, log, cursor=cursor, limit=limit)

    @app.get(
        "/v1/audit/logs/{log}/events/{notification_id}/proof",
        response_model=InclusionProof,
        tags=["audit"],
    )
    async def proof(
        request: Request,
        party: Caller,
        log: LogName,
        notification_id: Annotated[int, Path(ge=1, le=2**62)],
    ) -> Any:
        """The event's inclusion proof in a checkpoint of the audit chain (`aether audit
        verify-proof` checks it against an anchored root)."""
        _allow_kinds(party, READ_ALL, "proofs")
        if log not in q.LOG_TABLES:
            raise ApiError(404, "unknown_log", f"no log {log!r}")
        state = _state(request)
        try:
            return await asyncio.to_thread(
                prove, state.database_url, state.schema, log, notification_id
            )
        except AuditError as e:
            raise ApiError(404, "not_provable", str(e)) from e

    return app


# -- the process -------------------------------------------------------------------------------


def _database_url(settings: Any) -> tuple[str, Any]:
    from ledger.embedded import start_embedded_postgres

    url: str | None = settings.database_url
    if url is not None:
        return url, None
    return start_embedded_postgres(settings.aether_data_dir)


def run_api(settings: Any, args: argparse.Namespace) -> int:
    import uvicorn

    url, server = _database_url(settings)
    app = create_app(url, settings.postgres_schema, pool_size=args.pool_size)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    del server
    return 0


def run_api_key(settings: Any, args: argparse.Namespace) -> int:
    url, server = _database_url(settings)
    schema = settings.postgres_schema
    if args.api_key_command == "create":
        new = api_keys.create_key(url, schema, PartyKind(args.party), args.party_id)
        print(f"key id: {new.key_id}")
        print(f"party:  {new.party.kind.value} {new.party.id}")
        print(f"key:    {new.key}")
        print("(the key is shown once: only its sha256 is stored)")
        del server
        return 0
    done = api_keys.revoke_key(url, schema, args.key_id, datetime.now(UTC))
    print(f"key {args.key_id} {'revoked' if done else 'not found or already revoked'}")
    del server
    return 0 if done else 1
