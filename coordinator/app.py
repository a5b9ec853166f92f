"""FastAPI app factory: `create_app(settings)`. Thin: parse, authenticate, call the
service, map domain errors to HTTP status codes in one place."""

# No `from __future__ import annotations`: FastAPI must resolve the local dependencies.

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import ValidationError

from coordinator.dashboard import DASHBOARD_HTML
from coordinator.errors import BadRequest, CoordinatorError, PayloadTooLarge
from coordinator.protocol import (
    API_PREFIX,
    KIND_HEADER,
    REPORT_HEADER,
    RESHAPE_HEADER,
    VERSION_HEADER,
    AgentPublic,
    EnrollRequest,
    EnrollResponse,
    FederationCreate,
    FederationPublic,
    UpdateReceipt,
    UpdateReport,
)
from coordinator.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.store import AgentRow, FederationRow
from models import __version__

__all__ = ["create_app"]

_OCTETS = "application/octet-stream"


def _bearer(authorization: Annotated[str | None, Header()] = None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def _public(row: FederationRow) -> FederationPublic:
    return FederationPublic(id=row.id, status=row.status, config=FederationCreate.model_validate(row.config),  # type: ignore[arg-type]
                            current_round=row.current_round, model_version=row.model_version, created_at=row.created_at)


def create_app(settings: CoordinatorSettings, *, service: CoordinatorService | None = None) -> FastAPI:
    svc = service or CoordinatorService(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        svc.start()
        try:
            yield
        finally:
            svc.stop()

    app = FastAPI(title="fedslim coordinator", version=__version__, lifespan=lifespan)
    app.state.service = svc

    @app.exception_handler(CoordinatorError)
    async def _domain_error(_: Request, exc: CoordinatorError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, exc.status_code, headers=headers)

    def admin(token: Annotated[str | None, Depends(_bearer)]) -> None:
        svc.check_admin(token)

    def agent(token: Annotated[str | None, Depends(_bearer)]) -> AgentRow:
        return svc.authenticate_agent(token)

    Admin = Depends(admin)
    api = APIRouter(prefix=API_PREFIX)

    @api.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    # ---------------------------------------------------------------- federations (admin)
    @api.post("/federations", dependencies=[Admin], status_code=201)
    def create_federation(body: FederationCreate) -> FederationPublic:
        try:
            return _public(svc.create_federation(body))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    @api.get("/federations", dependencies=[Admin])
    def list_federations() -> list[FederationPublic]:
        return [_public(r) for r in svc.list_federations()]

    @api.get("/federations/{fid}", dependencies=[Admin])
    def get_federation(fid: str) -> FederationPublic:
        return _public(svc.get_federation(fid))

    @api.post("/federations/{fid}/{action}", dependencies=[Admin])
    def federation_action(fid: str, action: str) -> FederationPublic:
        return _public(svc.set_status(fid, action))

    @api.get("/federations/{fid}/rounds", dependencies=[Admin])
    def round_metrics(fid: str) -> list[dict]:
        return svc.round_metrics(fid)

    @api.get("/agents", dependencies=[Admin])
    def list_agents() -> list[AgentPublic]:
        return [AgentPublic(id=a.id, name=a.name, enrolled_at=a.enrolled_at, last_seen=a.last_seen,
                            status=svc.agent_status(a), memory_budget_bytes=a.info.get("memory_budget_bytes"))
                for a in svc.list_agents()]

    # ---------------------------------------------------------------- agents
    @api.post("/agents/enroll", status_code=201)
    def enroll(body: EnrollRequest) -> EnrollResponse:
        agent_id, token = svc.enroll(body)
        return EnrollResponse(agent_id=agent_id, agent_token=token)

    @api.get("/tasks", responses={204: {"description": "no task within the wait"}})
    def next_task(who: Annotated[AgentRow, Depends(agent)], wait: Annotated[float, Query(ge=0, le=60)] = 10.0) -> Response:
        task = svc.next_task(who, wait)
        if task is None:
            return Response(status_code=204)
        return Response(task.model_dump_json(), media_type="application/json")

    # ---------------------------------------------------------------- models (agents or admin)
    def _model_response(fid: str, version: int | None, patch: bool, reshape: bool = False) -> Response:
        v, data, has_reshape = svc.model_bytes(fid, version, patch=patch, reshape=reshape)
        kind = "reshape" if reshape else "patch" if patch else "model"
        headers = {VERSION_HEADER: str(v), KIND_HEADER: kind, RESHAPE_HEADER: "1" if has_reshape else "0"}
        return Response(data, media_type="application/json" if reshape else _OCTETS, headers=headers)

    def model_reader(token: Annotated[str | None, Depends(_bearer)]) -> None:
        try:
            svc.authenticate_agent(token)
        except CoordinatorError:
            svc.check_admin(token)

    Reader = Depends(model_reader)

    @api.get("/federations/{fid}/model", dependencies=[Reader], response_class=Response)
    def current_model(fid: str) -> Response:
        return _model_response(fid, None, False)

    @api.get("/federations/{fid}/models/{version}", dependencies=[Reader], response_class=Response)
    def model_version(fid: str, version: int) -> Response:
        return _model_response(fid, version, False)

    @api.get("/federations/{fid}/models/{version}/patch", dependencies=[Reader], response_class=Response)
    def model_patch(fid: str, version: int) -> Response:
        """Delta from version-1; apply the reshape first when the RESHAPE header says 1."""
        return _model_response(fid, version, True)

    @api.get("/federations/{fid}/models/{version}/reshape", dependencies=[Reader], response_class=Response)
    def model_reshape(fid: str, version: int) -> Response:
        """Kept channel indices per tensor and dimension, from version-1 (JSON)."""
        return _model_response(fid, version, False, reshape=True)

    @api.get("/federations/{fid}/export/model.onnx", dependencies=[Reader], response_class=Response)
    def export_model(fid: str) -> Response:
        """The current global model, structured-pruned, as ONNX (verified against ORT)."""
        path, _ = svc.export(fid)
        return Response(path.read_bytes(), media_type=_OCTETS)

    @api.get("/federations/{fid}/export/report", dependencies=[Reader])
    def export_report(fid: str) -> dict:
        """MACs dense vs pruned, parity, ORT latency and accuracy of the exported model."""
        return svc.export(fid)[1]

    # ---------------------------------------------------------------- updates
    @api.put("/federations/{fid}/rounds/{rnd}/update")
    async def upload(fid: str, rnd: int, request: Request, who: Annotated[AgentRow, Depends(agent)],
                     report: Annotated[str | None, Header(alias=REPORT_HEADER)] = None) -> UpdateReceipt:
        if report is None:
            raise BadRequest(f"missing {REPORT_HEADER} header")
        try:
            parsed = UpdateReport.model_validate_json(report)
        except ValidationError as exc:
            raise BadRequest(f"bad {REPORT_HEADER}: {exc.errors(include_url=False)}") from None
        body = await _read_capped(request, settings.max_upload_bytes)
        from starlette.concurrency import run_in_threadpool

        accepted, duplicate = await run_in_threadpool(svc.submit_update, who, fid, rnd, body, parsed)
        return UpdateReceipt(federation_id=fid, round=rnd, accepted=accepted, duplicate=duplicate)

    app.include_router(api)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> str:
        return DASHBOARD_HTML

    return app


async def _read_capped(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise PayloadTooLarge(f"update of {declared} bytes exceeds {cap}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise PayloadTooLarge(f"update exceeds {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
