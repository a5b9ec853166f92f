"""FastAPI app factory: `create_app(settings)`. Thin: parse, authenticate, call the
service, map domain errors to HTTP status codes in one place."""

# No `from __future__ import annotations`: FastAPI must resolve the local dependencies.

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from coordinator import logs
from coordinator.auth import same_secret
from coordinator.dashboard import DASHBOARD_HTML, DASHBOARD_JS, SECURITY_HEADERS
from coordinator.errors import (
    BadRequest,
    CoordinatorError,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from coordinator.limits import BodyLimit
from coordinator.metrics import CONTENT_TYPE, UploadOutcomes
from coordinator.protocol import (
    API_PREFIX,
    KIND_HEADER,
    MASK_HEADER,
    MAX_ID,
    MAX_LEVELS,
    NEEDS_HEADER,
    REPORT_HEADER,
    RESHAPE_HEADER,
    VERSION_HEADER,
    AgentPublic,
    EnrollmentTokenCreate,
    EnrollmentTokenIssued,
    EnrollmentTokenPublic,
    EnrollRequest,
    EnrollResponse,
    FederationCreate,
    FederationPublic,
    RoundInFlight,
    TaskDecline,
    UpdateReceipt,
    UpdateReport,
)
from coordinator.round_view import round_in_flight
from coordinator.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.store import AgentRow, EnrollmentTokenRow, FederationRow
from models import __version__

__all__ = ["create_app"]

_OCTETS = "application/octet-stream"
# Path parameters, bounded so nothing reaches SQL that SQL INTEGER cannot hold
FederationId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]
AgentId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]
TokenId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]
RoundNo = Annotated[int, Path(ge=1, le=MAX_ID)]
VersionNo = Annotated[int, Path(ge=0, le=MAX_ID)]
LevelNo = Annotated[int, Path(ge=0, lt=MAX_LEVELS)]


def _bearer(authorization: Annotated[str | None, Header()] = None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def _public(row: FederationRow) -> FederationPublic:
    return FederationPublic(id=row.id, status=row.status, config=FederationCreate.model_validate(row.config),  # type: ignore[arg-type]
                            current_round=row.current_round, model_version=row.model_version, created_at=row.created_at,
                            error=row.error)


def _agent_public(svc: CoordinatorService, a: AgentRow, needs: dict[str, dict[str, int]] | None = None,
                  widths: dict[str, dict[str, float]] | None = None) -> AgentPublic:
    return AgentPublic(id=a.id, name=a.name, enrolled_at=a.enrolled_at, last_seen=a.last_seen,
                       status=svc.agent_status(a), memory_budget_bytes=svc.auth.budget(a),
                       needs_bytes={**(needs.get(a.id, {}) if needs else {}), **svc.unfit(a.id)},
                       widths=widths.get(a.id, {}) if widths else {})


def _token_public(row: EnrollmentTokenRow) -> EnrollmentTokenPublic:
    return EnrollmentTokenPublic(id=row.id, name=row.name, created_at=row.created_at, expires_at=row.expires_at,
                                 status=row.status(time.time()), used_at=row.used_at, agent_id=row.agent_id)


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def create_app(settings: CoordinatorSettings, *, service: CoordinatorService | None = None) -> FastAPI:
    svc = service or CoordinatorService(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        svc.start()
        try:
            yield
        finally:
            await run_in_threadpool(svc.stop)

    app = FastAPI(title="fedslim coordinator", version=__version__, lifespan=lifespan)
    app.state.service = svc
    logs.configure(settings.log_format)
    app.add_middleware(BodyLimit, limits=svc.settings)
    app.add_middleware(UploadOutcomes, metrics=svc.metrics)  # outside the body cap: its 413s count
    app.add_middleware(logs.RequestLog, enabled=settings.log_requests)  # outermost: every request has an id

    def online_agents() -> int:
        with svc.store.tx() as conn:
            return svc.store.count_online(conn, time.time() - svc.settings.agent_timeout_s)

    svc.metrics.watch_online(online_agents)

    @app.exception_handler(CoordinatorError)
    async def _domain_error(_: Request, exc: CoordinatorError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else {}
        if isinstance(exc, TooManyRequests | Unavailable):
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # never echo the input back (a 150 MB body would come back in the 422)
        errors = [{"loc": list(e.get("loc", ()))[:8], "msg": str(e.get("msg", ""))[:300], "type": e.get("type")}
                  for e in exc.errors()[:20]]
        return JSONResponse({"detail": errors, "error": "ValidationError"}, 422)

    @app.exception_handler(OSError)
    async def _storage(_: Request, exc: OSError) -> JSONResponse:
        return JSONResponse({"detail": f"storage unavailable ({type(exc).__name__}: {exc.strerror or exc}); "
                             "nothing was accepted, retry later", "error": "Unavailable"}, 503,
                            headers={"Retry-After": "5"})

    @app.exception_handler(DBAPIError)
    async def _database(_: Request, exc: DBAPIError) -> JSONResponse:
        return JSONResponse({"detail": f"database unavailable ({type(exc.orig).__name__}); nothing was accepted, "
                             "retry later", "error": "Unavailable"}, 503, headers={"Retry-After": "5"})

    def admin(token: Annotated[str | None, Depends(_bearer)]) -> None:
        svc.auth.check_admin(token)

    async def agent(token: Annotated[str | None, Depends(_bearer)]) -> AgentRow:
        # from memory on the event loop when cached; a miss reads the store in a thread
        cached = svc.auth.cached_agent(token)
        return cached if cached is not None else await run_in_threadpool(svc.auth.agent, token)

    Admin = Depends(admin)
    api = APIRouter(prefix=API_PREFIX)

    @api.get("/health")
    async def health() -> dict:
        """Liveness plus what is wrong: federations backing off or failing, a stalled
        scheduler (answered from memory, without the database)."""
        return {**svc.health(), "version": __version__}

    # ---------------------------------------------------------------- federations (admin)
    @api.post("/federations", dependencies=[Admin], status_code=201)
    def create_federation(body: FederationCreate) -> FederationPublic:
        return _public(svc.create_federation(body))

    @api.get("/federations", dependencies=[Admin])
    def list_federations() -> list[FederationPublic]:
        return [_public(r) for r in svc.list_federations()]

    @api.get("/federations/{fid}", dependencies=[Admin])
    def get_federation(fid: FederationId) -> FederationPublic:
        return _public(svc.get_federation(fid))

    @api.post("/federations/{fid}/{action}", dependencies=[Admin])
    def federation_action(fid: FederationId, action: Annotated[str, Path(max_length=16)]) -> FederationPublic:
        return _public(svc.set_status(fid, action))

    @api.get("/federations/{fid}/rounds", dependencies=[Admin])
    def round_metrics(fid: FederationId) -> list[dict]:
        return svc.round_metrics(fid)

    @api.get("/federations/{fid}/live", dependencies=[Admin])
    def live_round(fid: FederationId) -> RoundInFlight:
        """The round in flight: updates received / expected, deadline, who has not answered."""
        return round_in_flight(svc.store, svc.get_federation(fid), time.time())

    @api.get("/agents", dependencies=[Admin])
    def list_agents() -> list[AgentPublic]:
        needs = svc.agent_needs()
        widths = svc.widths()
        return [_agent_public(svc, a, needs, widths) for a in svc.list_agents()]

    @api.delete("/agents/{agent_id}", dependencies=[Admin])
    def revoke_agent(agent_id: AgentId) -> AgentPublic:
        """Revoke an agent's token: it can no longer poll, download or upload."""
        return _agent_public(svc, svc.revoke_agent(agent_id))

    @api.post("/agents/{agent_id}/rotate", dependencies=[Admin])
    def rotate_agent(agent_id: AgentId) -> EnrollResponse:
        """A new token for the agent, shown this once; its old token is refused from now on."""
        token = svc.auth.rotate(agent_id)
        if token is None:
            raise NotFound(f"agent {agent_id} not found")
        return EnrollResponse(agent_id=agent_id, agent_token=token)

    # ---------------------------------------------------------------- one-time enrollment tokens (admin)
    @api.post("/enrollment-tokens", dependencies=[Admin], status_code=201)
    def create_enrollment_token(body: EnrollmentTokenCreate) -> EnrollmentTokenIssued:
        """A token that enrolls one device once, before it expires; the secret is in this answer only."""
        row, token = svc.auth.issue_enrollment_token(body.expires_in_s, body.name)
        return EnrollmentTokenIssued(**_token_public(row).model_dump(), token=token)

    @api.get("/enrollment-tokens", dependencies=[Admin])
    def list_enrollment_tokens() -> list[EnrollmentTokenPublic]:
        return [_token_public(r) for r in svc.auth.enrollment_tokens()]

    @api.delete("/enrollment-tokens/{token_id}", dependencies=[Admin])
    def revoke_enrollment_token(token_id: TokenId) -> EnrollmentTokenPublic:
        """Revoke a token not yet used (a used one stays "used": revoke its agent instead)."""
        row = svc.auth.revoke_enrollment_token(token_id)
        if row is None:
            raise NotFound(f"enrollment token {token_id} not found")
        return _token_public(row)

    # ---------------------------------------------------------------- agents
    @api.post("/agents/enroll", status_code=201)
    def enroll(body: EnrollRequest, request: Request) -> EnrollResponse:
        agent_id, token = svc.auth.enroll(body, _client_ip(request))
        return EnrollResponse(agent_id=agent_id, agent_token=token)

    @api.get("/tasks", responses={204: {"description": "no task within the wait"}})
    async def next_task(who: Annotated[AgentRow, Depends(agent)],
                        wait: Annotated[float, Query(ge=0, le=60)] = 10.0,
                        memory_budget_bytes: Annotated[int | None, Query(gt=0, le=2**50)] = None) -> Response:
        """Long poll (a coroutine: a waiting agent holds no thread). `memory_budget_bytes`
        restates the device's training memory budget (bytes)."""
        if memory_budget_bytes is not None:
            svc.auth.state_budget(who, memory_budget_bytes)
        with svc.metrics.polls_waiting.track_inprogress():
            task = await svc.next_task(who, wait)
        if task is None:
            # a federation whose width levels all exceed this agent's budget says what would fit
            unfit = svc.unfit(who.id)
            headers = {NEEDS_HEADER: json.dumps(unfit, separators=(",", ":"))} if unfit else None
            return Response(status_code=204, headers=headers)
        return Response(task, media_type="application/json")

    # ---------------------------------------------------------------- models (members or admin)
    async def _model_response(fid: str, version: int | None, patch: bool, reshape: bool = False,
                              mask: bool = False) -> Response:
        # from memory on the event loop while a round is open (every agent fetches the same
        # few artifacts at once); else the database and disk, in the thread pool
        served = svc.model_bytes_in_memory(fid, version, patch=patch, reshape=reshape, mask=mask)
        if served is None:
            served = await run_in_threadpool(svc.model_bytes, fid, version, patch=patch, reshape=reshape, mask=mask)
        svc.metrics.served(len(served.data))
        kind = ("mask-patch" if mask and patch else "mask" if mask else "reshape" if reshape
                else "patch" if patch else "model")
        headers = {VERSION_HEADER: str(served.version), KIND_HEADER: kind,
                   RESHAPE_HEADER: "1" if served.reshaped else "0", MASK_HEADER: served.mask_sha256}
        return Response(served.data, media_type="application/json" if reshape else _OCTETS, headers=headers)

    async def reader(fid: FederationId, token: Annotated[str | None, Depends(_bearer)]) -> None:
        if not svc.check_reader_in_memory(token, fid):
            await run_in_threadpool(svc.check_reader, token, fid)

    Reader = Depends(reader)

    @api.get("/federations/{fid}/model", dependencies=[Reader], response_class=Response)
    async def current_model(fid: FederationId) -> Response:
        return await _model_response(fid, None, False)

    @api.get("/federations/{fid}/models/{version}", dependencies=[Reader], response_class=Response)
    async def model_version(fid: FederationId, version: VersionNo) -> Response:
        return await _model_response(fid, version, False)

    @api.get("/federations/{fid}/models/{version}/patch", dependencies=[Reader], response_class=Response)
    async def model_patch(fid: FederationId, version: VersionNo) -> Response:
        """Delta from version-1; apply the reshape first when the RESHAPE header says 1."""
        return await _model_response(fid, version, True)

    @api.get("/federations/{fid}/models/{version}/mask", dependencies=[Reader], response_class=Response)
    async def model_mask(fid: FederationId, version: VersionNo) -> Response:
        """The keep-masks of `version` (sparse_kernels.masks; sha256 = the task's and the
        MASK header's mask_sha256): apply w⊙m after the patch. 404 when it has none."""
        return await _model_response(fid, version, False, mask=True)

    @api.get("/federations/{fid}/models/{version}/mask/patch", dependencies=[Reader], response_class=Response)
    async def model_mask_patch(fid: FederationId, version: VersionNo) -> Response:
        """The flips from version-1's mask to `version`'s (a mask artifact of the XOR): for
        an agent holding version-1's mask. 404 when unchanged or there was none."""
        return await _model_response(fid, version, True, mask=True)

    @api.get("/federations/{fid}/models/{version}/levels/{level}", dependencies=[Reader], response_class=Response)
    def model_level(fid: FederationId, version: VersionNo, level: LevelNo,
                    round: Annotated[int, Query(ge=1, le=MAX_ID)]) -> Response:  # noqa: A002 (the API's word)
        """Width level `level`'s slice of `version` for round `round` (the current version only)."""
        data = svc.level_model_bytes(fid, version, round, level)
        return Response(data, media_type=_OCTETS, headers={VERSION_HEADER: str(version), KIND_HEADER: "model"})

    @api.get("/federations/{fid}/models/{version}/reshape", dependencies=[Reader], response_class=Response)
    async def model_reshape(fid: FederationId, version: VersionNo) -> Response:
        """Kept channel indices per tensor and dimension, from version-1 (JSON)."""
        return await _model_response(fid, version, False, reshape=True)

    @api.get("/federations/{fid}/export/model.onnx", dependencies=[Admin], response_class=Response)
    def export_model(fid: FederationId) -> Response:
        """The current global model, structured-pruned, as ONNX (verified against ORT)."""
        path, _ = svc.export(fid)
        return Response(path.read_bytes(), media_type=_OCTETS)

    @api.get("/federations/{fid}/export/report", dependencies=[Admin])
    def export_report(fid: FederationId) -> dict:
        """MACs dense vs pruned, parity, ORT latency and accuracy of the exported model."""
        return svc.export(fid)[1]

    @api.get("/federations/{fid}/export/{level}/model.onnx", dependencies=[Admin], response_class=Response)
    def export_level_model(fid: FederationId, level: LevelNo) -> Response:
        """Width level `level` of the current global model as ONNX (levels widest first)."""
        path, _ = svc.export(fid, level)
        return Response(path.read_bytes(), media_type=_OCTETS)

    @api.get("/federations/{fid}/export/{level}/report", dependencies=[Admin])
    def export_level_report(fid: FederationId, level: LevelNo) -> dict:
        """MACs, parity, ORT latency and accuracy of width level `level`'s model."""
        return svc.export(fid, level)[1]

    @api.post("/federations/{fid}/rounds/{rnd}/decline")
    def decline(fid: FederationId, rnd: RoundNo, body: TaskDecline, request: Request,
                who: Annotated[AgentRow, Depends(agent)]) -> dict:
        """The agent cannot train this round (its memory budget fits nothing, say): the round
        stops waiting for it, and with `needed_bytes` it is not sampled again for this
        federation until it states a budget that large."""
        svc.auth.check_upload_rate(who, _client_ip(request))
        recorded = svc.decline_task(who, fid, rnd, body)
        return {"federation_id": fid, "round": rnd, "recorded": recorded}

    # ---------------------------------------------------------------- updates
    @api.put("/federations/{fid}/rounds/{rnd}/update")
    async def upload(fid: FederationId, rnd: RoundNo, request: Request, who: Annotated[AgentRow, Depends(agent)],
                     report: Annotated[str | None, Header(alias=REPORT_HEADER)] = None) -> UpdateReceipt:
        if report is None:
            raise BadRequest(f"missing {REPORT_HEADER} header")
        if len(report) > settings.max_json_bytes:
            raise PayloadTooLarge(f"{REPORT_HEADER} exceeds {settings.max_json_bytes} bytes")
        try:
            parsed = UpdateReport.model_validate_json(report)
        except ValidationError as exc:
            errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors(include_url=False)[:10]]
            raise BadRequest(f"bad {REPORT_HEADER}: {errors}") from None
        # refuse what can be refused before reading a byte of the body
        if not svc.check_upload_in_memory(who, fid, rnd, _client_ip(request)):
            await run_in_threadpool(svc.check_upload_in_store, who, fid, rnd)
        body = await _read_capped(request, svc.settings.max_upload_bytes, svc.settings.body_timeout_s)
        accepted, duplicate = await run_in_threadpool(svc.submit_update, who, fid, rnd, body, parsed)
        svc.metrics.update_received(len(body), duplicate=duplicate)
        return UpdateReceipt(federation_id=fid, round=rnd, accepted=accepted, duplicate=duplicate)

    app.include_router(api)

    @app.get("/metrics", include_in_schema=False, response_class=Response)
    def metrics(token: Annotated[str | None, Depends(_bearer)]) -> Response:
        """Prometheus exposition. Bearer: the admin token or `metrics_token`. Not public: it
        tells how many agents are online and how the rounds go, which is the operator's."""
        scrape = svc.settings.metrics_token
        if not (svc.auth.is_admin(token) or (token and scrape and same_secret(token, scrape.get_secret_value()))):
            raise Unauthorized("/metrics needs the admin token or the metrics token")
        return Response(svc.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD_HTML, headers=SECURITY_HEADERS)

    @app.get("/dashboard.js", include_in_schema=False)
    def dashboard_js() -> Response:
        return Response(DASHBOARD_JS, media_type="application/javascript", headers=SECURITY_HEADERS)

    return app


async def _read_capped(request: Request, cap: int, timeout_s: float) -> bytes:
    """The body, at most `cap` bytes, within `timeout_s` (a slow sender is cut off)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise PayloadTooLarge(f"update of {declared} bytes exceeds {cap}")
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise PayloadTooLarge(f"update exceeds {cap} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout=timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"update body not received within {timeout_s:.0f} s") from None
    return b"".join(chunks)
