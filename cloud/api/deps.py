"""Request-scoped access to the app's runtime."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request

from pice.cloud.adapter_catalog import AdapterCatalog
from pice.cloud.pipeline import Pipeline
from pice.cloud.tenants import Tenant, TenantRegistry
from pice.shared.errors import NotReadyError


def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline | None = request.app.state.pipeline
    if pipeline is None:
        detail = request.app.state.load_error or "models are still loading; poll GET /ready"
        raise NotReadyError(detail)
    return pipeline


def get_tenant(request: Request) -> Tenant:
    """The caller's tenant from its API key (401 when keys are configured and it has none)."""
    tenants: TenantRegistry = request.app.state.tenants
    return tenants.authenticate(request.headers.get("authorization"))


def get_catalog(request: Request) -> AdapterCatalog:
    get_pipeline(request)  # 503 while loading; the catalog is set before the pipeline
    catalog: AdapterCatalog = request.app.state.adapters
    return catalog


def access_note(request: Request) -> dict[str, Any]:
    """This request's access-log fields: handlers add what only they know (mode, timings);
    the RequestLimits middleware writes the line when the response has ended."""
    note = request.scope.get("state", {}).get("access")
    return note if isinstance(note, dict) else {}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
