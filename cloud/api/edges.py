"""Edges: the WebSocket that edge agents dial (`/v1/edges/connect`, token in the handshake) and
`GET /v1/edges`, every edge with its state."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, WebSocket
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from pice.cloud.adapter_catalog import AdapterCatalog
from pice.cloud.api.deps import get_catalog, get_pipeline, get_tenant
from pice.cloud.api.errors import error_body
from pice.cloud.edge_hub import POLICY_VIOLATION, RemoteEdge
from pice.cloud.pipeline import Pipeline
from pice.cloud.tenants import Tenant

router = APIRouter(tags=["edges"])

TRY_AGAIN_LATER = 1013


class EdgeView(BaseModel):
    edge_id: str
    kind: Literal["local", "remote"]  # in-process worker, or an agent over the network
    models: list[str]
    adapters: list[str]
    slots: int  # points it runs at once
    inflight: int  # points running on it now
    tokens_per_s: float  # measured decode rate of one stream
    rtt_s: float  # measured round trip (0 for in-process)
    failure_rate: float  # recent share of points it failed to deliver
    healthy: bool  # takes work now
    deadlines_missed: int = 0  # batches whose deadline ran out on it (their points moved)
    suspect: bool = False  # missed a deadline recently: takes no work until that lapses
    draining: bool = False  # remote: shutting down, finishing its work
    connected_for_s: float | None = None  # remote: since registration
    last_seen_s: float | None = None  # remote: since its last frame (the lease runs from it)


class EdgeList(BaseModel):
    object: Literal["list"] = "list"
    remote_enabled: bool  # whether agents may connect (edge tokens configured)
    data: list[EdgeView]


@router.get("/v1/edges", response_model=EdgeList)
async def list_edges(pipeline: Annotated[Pipeline, Depends(get_pipeline)],
                     tenant: Annotated[Tenant, Depends(get_tenant)],
                     catalog: Annotated[AdapterCatalog, Depends(get_catalog)]) -> EdgeList:
    """Needs an API key when keys are configured; a tenant sees only the adapters it may use."""
    views = []
    for edge in pipeline.edges.edges():
        s = edge.state()
        adapters = sorted(a for a in s.adapters if not catalog.hidden_from(tenant, a))
        view = EdgeView(edge_id=s.edge_id, kind="local", models=list(s.models),
                        adapters=adapters, slots=s.slots, inflight=s.inflight,
                        tokens_per_s=s.tokens_per_s, rtt_s=s.rtt_s,
                        failure_rate=s.failure_rate, healthy=s.healthy,
                        deadlines_missed=edge.stats.deadlines_missed,
                        suspect=edge.stats.suspect)
        if isinstance(edge, RemoteEdge):
            view.kind = "remote"
            view.draining = edge.draining
            view.connected_for_s = time.time() - edge.connected_at
            view.last_seen_s = time.monotonic() - edge.last_seen
        views.append(view)
    return EdgeList(remote_enabled=pipeline.edges.hub is not None, data=views)


@router.websocket("/v1/edges/connect")
async def connect(ws: WebSocket) -> None:
    """An edge agent's long-lived connection. Refused (HTTP 401/403/503 in the handshake) when
    the token is missing, unknown or revoked, or remote edges are off."""
    pipeline: Pipeline | None = ws.app.state.pipeline
    hub = pipeline.edges.hub if pipeline is not None else None
    if hub is None:
        if pipeline is None:
            await _refuse(ws, 503, "models are still loading; retry later", TRY_AGAIN_LATER)
        else:
            await _refuse(ws, 403, "remote edge agents are not enabled on this server (set "
                          "PICE_EDGE_TOKENS_FILE)", POLICY_VIOLATION)
        return
    record = hub.authenticate(ws.headers.get("authorization"))
    if record is None:
        await _refuse(ws, 401, "unknown, malformed or revoked edge token", POLICY_VIOLATION)
        return
    await ws.accept()
    await hub.serve(ws, record)


async def _refuse(ws: WebSocket, status: int, message: str, code: int) -> None:
    """Refuse in the handshake: an HTTP error response where the server supports it, else a
    close before accept (HTTP 403). (uvicorn's websockets-sansio also logs a spurious "ASGI
    callable returned without completing handshake" after a denial: Kludex/uvicorn PR #3138.)"""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse(error_body(status, message, "token"),
                                                   status_code=status))
    else:
        await ws.close(code=code, reason=message)
