"""Tenants' LoRA adapters: `POST /v1/adapters` (multipart upload of the two PEFT files, or JSON
naming a server-local directory under `adapter_import_dirs`), list, get, delete. A tenant sees
its own adapters and public ones; another tenant's private adapter does not exist for it."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from pice.cloud.adapter_catalog import ADAPTER_FILES, AdapterCard, AdapterCatalog, AdapterRecord
from pice.cloud.api.adapter_uploads import CappedParser, body_capped, copy_capped, stage_local
from pice.cloud.api.deps import get_catalog, get_tenant
from pice.cloud.api.errors import json_problem
from pice.cloud.tenants import NAME_RE, Tenant
from pice.shared.errors import BadRequestError, PayloadTooLargeError

router = APIRouter(tags=["adapters"])

_FILE_FIELDS = {"adapter_config": ADAPTER_FILES[0], "adapter_model": ADAPTER_FILES[1]}
_MAX_JSON = 1 << 20  # a JSON registration body (fields and a path) is small


class AdapterFields(BaseModel):
    """Everything but the files (the form fields of an upload, or the JSON body)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_RE.pattern)  # how requests name it (`model` field)
    description: str = Field("", max_length=2000)  # card: what it is for (AAS reads it)
    examples: list[str] = Field(default_factory=list, max_length=32)  # card: typical prompts
    public: bool = False  # every tenant may see and use it
    base_model: str | None = None  # edge model it applies to (default: the first edge model)
    path: str | None = Field(None, max_length=4096)  # JSON only: a server-local PEFT directory


class AdapterOut(BaseModel):
    id: str  # the name to put in `model` (owner/name for another tenant's public adapter)
    object: Literal["adapter"] = "adapter"
    name: str
    owner: str
    public: bool
    description: str
    examples: list[str]
    base_model: str
    created: int
    rank: int | None = None  # from the engine, once loaded
    alpha: float | None = None
    target_modules: list[str] | None = None
    size_bytes: int | None = None
    tier: str | None = None  # where its weights are now: device | host | disk
    error: str | None = None  # why it is unusable (failed to load at startup)


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterOut]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True


def _out(rec: AdapterRecord, tenant: Tenant, infos: dict[str, Any]) -> AdapterOut:
    info = infos.get(rec.engine_name) if rec.error is None else None
    extra: dict[str, Any] = {}
    if info is not None:
        extra = {"rank": info.rank, "alpha": info.alpha,
                 "target_modules": sorted(info.target_modules), "size_bytes": info.size_bytes,
                 "tier": str(getattr(info.tier, "value", info.tier))}
    return AdapterOut(id=rec.ref(tenant), name=rec.name, owner=rec.owner, public=rec.public,
                      description=rec.card.description, examples=rec.card.examples,
                      base_model=rec.base_model, created=rec.created, error=rec.error, **extra)


def _fields(data: dict[str, Any]) -> AdapterFields:
    try:
        return AdapterFields.model_validate(data)
    except ValidationError as exc:  # the same 400 as a bad JSON body
        raise RequestValidationError(exc.errors()) from exc


async def _parse(request: Request, limit: int) -> tuple[AdapterFields, dict[str, UploadFile]]:
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        body = body_capped(request, 2 * limit + (1 << 20))  # both files and the fields
        parser = CappedParser(request, _FILE_FIELDS, body, limit)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise BadRequestError(f"body is not valid multipart/form-data: {exc.message}",
                                  field="body") from None
        files: dict[str, UploadFile] = {}
        data: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in _FILE_FIELDS:
                    raise BadRequestError(f"unexpected file field {key!r}; send "
                                          "adapter_config and adapter_model", field=key)
                files[key] = value
            elif key == "examples":
                data.setdefault("examples", []).append(value)
            elif key == "path":
                raise BadRequestError("path is for JSON registration; upload the files "
                                      "instead", field="path")
            else:
                data[key] = value
        return _fields(data), files
    if ctype.startswith("application/json"):
        raw = b"".join([c async for c in body_capped(request, _MAX_JSON)])
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise BadRequestError(json_problem(exc)) from exc
        except RecursionError as exc:
            raise BadRequestError("body is not valid JSON: nested too deeply") from exc
        if not isinstance(body, dict):
            raise BadRequestError("body must be a JSON object", field="body")
        fields = _fields(body)
        if fields.path is None:
            raise BadRequestError("JSON registration needs path (a server-local PEFT "
                                  "directory); to send the files use multipart/form-data",
                                  field="path")
        return fields, {}
    raise BadRequestError(f"content-type {ctype or 'none'!r}: send multipart/form-data "
                          "(files) or application/json (path)", field="content-type")


@router.post("/v1/adapters", response_model=AdapterOut, status_code=201)
async def create_adapter(request: Request, tenant: Tenant = Depends(get_tenant),  # noqa: B008
                         catalog: AdapterCatalog = Depends(get_catalog)) -> AdapterOut:  # noqa: B008
    settings = request.app.state.settings
    limit = settings.adapter_upload_mb << 20
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > 2 * limit + (1 << 20):  # refuse before reading it
        raise PayloadTooLargeError(f"body of {length} bytes is over twice the "
                                   f"{settings.adapter_upload_mb} MiB per-file limit",
                                   field="body")
    fields, files = await _parse(request, limit)
    catalog.check_new(tenant, fields.name, fields.base_model)  # cheap refusals first
    staging = catalog.tmp_dir / uuid.uuid4().hex
    staging.mkdir()
    try:
        if fields.path is not None:
            await asyncio.to_thread(stage_local, fields.path, staging,
                                    settings.adapter_import_dirs, limit)
        else:
            for field, fname in _FILE_FIELDS.items():
                upload = files.get(field)
                if upload is None:
                    raise BadRequestError(f"missing file field {field} ({fname})", field=field)
                if (upload.filename or "").endswith((".bin", ".pt", ".pth", ".pkl")):
                    raise BadRequestError(f"{field}: pickle files ({upload.filename}) are "
                                          "refused; send adapter_model.safetensors", field=field)
                await asyncio.to_thread(copy_capped, upload.file, staging / fname, limit, field)
        card = AdapterCard(description=fields.description, examples=fields.examples)
        rec = await asyncio.to_thread(catalog.register, tenant, fields.name, staging, card,
                                      fields.public, fields.base_model)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # moved away on success
        for upload in files.values():
            await upload.close()
    return _out(rec, tenant, catalog.infos())


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(tenant: Tenant = Depends(get_tenant),  # noqa: B008
                        catalog: AdapterCatalog = Depends(get_catalog)) -> AdapterList:  # noqa: B008
    infos = catalog.infos()
    return AdapterList(data=[_out(r, tenant, infos) for r in catalog.visible(tenant)])


@router.get("/v1/adapters/{ref:path}", response_model=AdapterOut)
async def get_adapter(ref: str, tenant: Tenant = Depends(get_tenant),  # noqa: B008
                      catalog: AdapterCatalog = Depends(get_catalog)) -> AdapterOut:  # noqa: B008
    return _out(catalog.resolve(tenant, ref, field="name"), tenant, catalog.infos())


@router.delete("/v1/adapters/{ref:path}", response_model=AdapterDeleted)
async def delete_adapter(ref: str, tenant: Tenant = Depends(get_tenant),  # noqa: B008
                         catalog: AdapterCatalog = Depends(get_catalog)) -> AdapterDeleted:  # noqa: B008
    await asyncio.to_thread(catalog.delete, tenant, ref)
    return AdapterDeleted(id=ref)


# ---- admin: joint compression (pice.shared.lora.compress) ----------------------------------------
ADMIN_TENANT = "admin"  # the operator's tenant in the keys file (open mode: everyone)


class CompressRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_model: str | None = None  # edge model whose adapters to compress (default: the first)
    method: Literal["full", "diag"] = "full"
    budget: float = Field(0.3, gt=0, le=10)  # largest relative Frobenius error per ΔW_i
    ranks: list[int] = Field(default_factory=lambda: [4, 8, 16, 32], min_length=1,
                             max_length=8)
    clusters: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 25], min_length=1,
                                max_length=8)
    share_tenants: list[str] = Field(default_factory=list, max_length=256)  # opted in


@router.post("/v1/admin/adapters/compress")
async def compress_adapters(body: CompressRequest, request: Request,
                            tenant: Tenant = Depends(get_tenant),  # noqa: B008
                            catalog: AdapterCatalog = Depends(get_catalog),  # noqa: B008
                            ) -> dict[str, Any]:
    """Compress every adapter of one edge model into shared bases (one per cluster, never
    across tenants unless public or opted in) and serve them from it. Admin only."""
    from pice.cloud.tenants import DEFAULT_TENANT
    from pice.shared.errors import ForbiddenError

    if tenant.name != ADMIN_TENANT and not (tenant.name == DEFAULT_TENANT
                                            and request.app.state.tenants.open):
        raise ForbiddenError(f"adapter compression is for the {ADMIN_TENANT!r} tenant",
                             field="authorization")
    manifest = await asyncio.to_thread(
        catalog.compress, body.base_model, method=body.method, budget=body.budget,
        ranks=body.ranks, clusters=body.clusters, share_tenants=body.share_tenants)
    adapters = {name: {k: v for k, v in a.items() if k not in ("path", "sigma")}
                for name, a in manifest["adapters"].items()}
    return {"object": "adapter.compression", "method": manifest["method"],
            "budget": manifest["budget"], "totals": manifest["totals"],
            "clusters": {c: {"rank": v["rank"], "members": len(v["members"])}
                         for c, v in manifest["clusters"].items()}, "adapters": adapters}
