"""The OpenAPI document, made true: every error status a route can answer is listed with the
error schema (and FastAPI's 422, which this API never returns, is dropped: validation errors are
400s); the streaming responses list `text/event-stream`; `POST /v1/adapters`, which parses its
body by hand, gets its two request bodies (multipart upload, JSON registration)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from pice.cloud.api.adapters import AdapterFields
from pice.cloud.api.schemas import ErrorResponse

_TENANT = (401, 429)  # any tenant route: a bad or missing key; a rate or stream limit
_LOADED = (503,)  # routes that need the models loaded
# (method, path) → the statuses it may answer besides its success (always with an error body)
ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/v1/chat/completions"): (400, 404, 409, *_TENANT, *_LOADED),
    ("post", "/v1/progressive"): (400, 404, 409, *_TENANT, *_LOADED),
    ("get", "/v1/models"): _TENANT,
    ("get", "/v1/edges"): (*_TENANT, *_LOADED),
    ("post", "/v1/adapters"): (400, 403, 409, 413, *_TENANT, *_LOADED),
    ("get", "/v1/adapters"): (*_TENANT, *_LOADED),
    ("get", "/v1/adapters/{ref}"): (404, *_TENANT, *_LOADED),
    ("delete", "/v1/adapters/{ref}"): (403, 404, 409, *_TENANT, *_LOADED),
    ("get", "/ready"): (503,),
}
# a /v1 route not in the table may answer any error the one error handler maps
_ANY_V1 = (400, 401, 403, 404, 409, 413, 429, 503)
_STREAMING = {("post", "/v1/chat/completions"), ("post", "/v1/progressive")}
_SSE = {"schema": {"type": "string", "description": "server-sent events (`stream: true`)"}}
_DESCRIPTIONS = {400: "Bad request: the message names the field", 401: "Missing or invalid API "
                 "key", 403: "Forbidden: another tenant's resource", 404: "Not found",
                 409: "Conflict", 413: "Payload too large", 429: "Too many requests: see "
                 "Retry-After", 503: "Not ready (models loading) or too many connections"}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes,
                               description=app.description)
            patch(spec)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _hoist(spec: dict[str, Any], model: type[Any]) -> dict[str, Any]:
    """`model`'s JSON schema with its nested definitions moved into components."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    components.update(schema.pop("$defs", {}))
    return dict(schema)


def patch(spec: dict[str, Any]) -> None:
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorResponse"] = _hoist(spec, ErrorResponse)
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            default = _ANY_V1 if path.startswith("/v1/") else ()
            for status in ERRORS.get((method, path), default):
                responses[str(status)] = {"description": _DESCRIPTIONS[status],
                                          "content": error}
            if (method, path) in _STREAMING:
                responses["200"].setdefault("content", {})["text/event-stream"] = _SSE
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    _adapter_bodies(spec)


def _adapter_bodies(spec: dict[str, Any]) -> None:
    op = spec.get("paths", {}).get("/v1/adapters", {}).get("post")
    if op is None:
        return
    fields = _hoist(spec, AdapterFields)
    props = {k: v for k, v in fields["properties"].items() if k != "path"}
    upload = {"type": "object", "additionalProperties": False,
              "required": ["name", "adapter_config", "adapter_model"],
              "properties": {**props,
                             "adapter_config": {"type": "string", "format": "binary",
                                                "description": "adapter_config.json (PEFT)"},
                             "adapter_model": {"type": "string", "format": "binary",
                                               "description": "adapter_model.safetensors"}}}
    register = {**fields, "required": ["name", "path"]}
    op["requestBody"] = {"required": True, "content": {
        "multipart/form-data": {"schema": upload},
        "application/json": {"schema": register},
    }}
