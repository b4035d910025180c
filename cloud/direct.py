"""Which model answers a chat completion (vLLM's convention for the `model` field), resolved
before the pipeline plans the request (the pipeline then runs it, the direct edge answer of the
multi-tenant LoRA server included):

- `model` omitted, "pice" or the cloud model → the pipeline (full cloud or sketch + edge);
  `pice.adapter` names an adapter for the edge expansions ("auto": AAS picks one);
- `model` = an edge model → that edge model answers directly; AAS picks an adapter among the
  tenant's visible ones (or none), unless `pice.adapter` names one or says "none";
- `model` = an adapter → its edge model answers directly with that adapter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from pice.cloud.adapter_catalog import AdapterCatalog, AdapterRecord
from pice.cloud.plan import PIPELINE_MODEL, Who
from pice.cloud.tenants import Tenant
from pice.scheduler.adapter_router import AdapterChoice
from pice.shared.errors import BadRequestError

__all__ = ["PIPELINE_MODEL", "Who", "resolve"]


async def _auto(catalog: AdapterCatalog, tenant: Tenant, base: str | None,
                question: str) -> tuple[AdapterRecord | None, AdapterChoice | None]:
    recs = {r.engine_name: r for r in catalog.visible(tenant)
            if r.error is None and (base is None or r.base_model == base)}
    if not recs:
        return None, None
    resident = set().union(*(catalog.resident(b) for b in {r.base_model for r in recs.values()}))
    choice = await asyncio.to_thread(catalog.router.route, question, list(recs), resident)
    return (recs[choice.adapter] if choice.adapter else None), choice


async def resolve(model: str | None, adapter: str | None, question: str, tenant: Tenant,
                  catalog: AdapterCatalog, cloud_name: str, edge_models: Collection[str],
                  field: str = "pice.adapter") -> Who:
    """Resolve `model` and the adapter option (`field` names it in errors); unknown or
    invisible names are a 404. `edge_models`: the edge models served in-process."""
    if model in (None, PIPELINE_MODEL, cloud_name):
        if adapter is None or adapter == "none":
            return Who()
        if adapter == "auto":
            rec, choice = await _auto(catalog, tenant, None, question)
            return Who(None, rec, "aas", choice, rec.ref(tenant) if rec else None)
        rec = catalog.usable(tenant, adapter, field=field)
        return Who(None, rec, "request", ref=rec.ref(tenant))
    if model in edge_models:
        if adapter == "none":
            return Who(model, None, "request")
        if adapter is None or adapter == "auto":
            rec, choice = await _auto(catalog, tenant, model, question)
            return Who(model, rec, "aas", choice, rec.ref(tenant) if rec else None)
        rec = catalog.usable(tenant, adapter, field=field)
        if rec.base_model != model:
            raise BadRequestError(f"adapter {adapter!r} applies to {rec.base_model}, not "
                                  f"{model}", field=field)
        return Who(model, rec, "request", ref=rec.ref(tenant))
    assert model is not None
    rec = catalog.usable(tenant, model, field="model")
    if adapter is not None and adapter != model:
        raise BadRequestError(f"model names adapter {model!r}; pice.adapter {adapter!r} "
                              "conflicts with it", field=field)
    return Who(rec.base_model, rec, "request", ref=rec.ref(tenant))
