"""Request-scoped access to the app's runtime."""

from __future__ import annotations

import uuid

from fastapi import Request

from pice.cloud.pipeline import Pipeline
from pice.shared.errors import NotReadyError


def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline | None = request.app.state.pipeline
    if pipeline is None:
        detail = request.app.state.load_error or "models are still loading; poll GET /ready"
        raise NotReadyError(detail)
    return pipeline


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
