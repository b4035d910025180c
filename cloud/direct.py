"""Which model answers a chat completion (vLLM's convention for the `model` field), and the
direct edge path of the multi-tenant LoRA server:

- `model` omitted, "pice" or the cloud model → the pipeline (full cloud or sketch + edge);
  `pice.adapter` names an adapter for the edge expansions ("auto": AAS picks one);
- `model` = an edge model → that edge model answers directly; AAS picks an adapter among the
  tenant's visible ones (or none), unless `pice.adapter` names one or says "none";
- `model` = an adapter → its edge model answers directly with that adapter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

from pice.cloud.adapter_catalog import AdapterCatalog, AdapterRecord
from pice.cloud.events import DeltaEvent, DoneEvent, Event
from pice.cloud.pipeline import AnswerRequest, Pipeline
from pice.cloud.tenants import Tenant
from pice.scheduler.adapter_router import AdapterChoice
from pice.shared.aio import iterate_in_thread
from pice.shared.backend import TextGenerator
from pice.shared.errors import BadRequestError
from pice.shared.sampling import SamplingParams

PIPELINE_MODEL = "pice"


@dataclass(frozen=True)
class Plan:
    """What answers one request."""

    edge_model: str | None  # edge model that answers directly; None → the pipeline
    adapter: AdapterRecord | None  # adapter applied (edge answer, or progressive expansions)
    selected_by: str | None  # "request" | "aas" (None: no adapter question arose)
    choice: AdapterChoice | None = None  # AAS's decision, when it ran
    ref: str | None = None  # the adapter as the caller names it

    def report(self, mode: str) -> dict[str, Any] | None:
        """The `adapter` part of the pice report, given what ran."""
        if self.selected_by is None:
            return None
        applied = self.adapter is not None and (self.edge_model is not None
                                                or mode == "progressive")
        out: dict[str, Any] = {"name": self.ref if applied else None,
                               "selected_by": self.selected_by}
        if self.choice is not None:
            out.update(score=round(self.choice.score, 4), best=self.choice.best,
                       cache_preferred=self.choice.cache_preferred, reason=self.choice.reason)
        return out


async def _auto(catalog: AdapterCatalog, tenant: Tenant, base: str | None,
                question: str) -> tuple[AdapterRecord | None, AdapterChoice | None]:
    recs = {r.engine_name: r for r in catalog.visible(tenant)
            if r.error is None and (base is None or r.base_model == base)}
    if not recs:
        return None, None
    resident = set().union(*(catalog.resident(b) for b in {r.base_model for r in recs.values()}))
    choice = await asyncio.to_thread(catalog.router.route, question, list(recs), resident)
    return (recs[choice.adapter] if choice.adapter else None), choice


async def plan_answer(model: str | None, adapter: str | None, question: str, tenant: Tenant,
                      catalog: AdapterCatalog, pipeline: Pipeline,
                      field: str = "pice.adapter") -> Plan:
    """Resolve `model` and the adapter option (`field` names it in errors); unknown or
    invisible names are a 404."""
    edges = pipeline.edge_generators
    if model in (None, PIPELINE_MODEL, pipeline.cloud.name):
        if adapter is None or adapter == "none":
            return Plan(None, None, None)
        if adapter == "auto":
            rec, choice = await _auto(catalog, tenant, None, question)
            return Plan(None, rec, "aas", choice, rec.ref(tenant) if rec else None)
        rec = catalog.usable(tenant, adapter, field=field)
        return Plan(None, rec, "request", ref=rec.ref(tenant))
    if model in edges:
        if adapter == "none":
            return Plan(model, None, "request")
        if adapter is None or adapter == "auto":
            rec, choice = await _auto(catalog, tenant, model, question)
            return Plan(model, rec, "aas", choice, rec.ref(tenant) if rec else None)
        rec = catalog.usable(tenant, adapter, field=field)
        if rec.base_model != model:
            raise BadRequestError(f"adapter {adapter!r} applies to {rec.base_model}, not "
                                  f"{model}", field=field)
        return Plan(model, rec, "request", ref=rec.ref(tenant))
    assert model is not None
    rec = catalog.usable(tenant, model, field="model")
    if adapter is not None and adapter != model:
        raise BadRequestError(f"model names adapter {model!r}; pice.adapter {adapter!r} "
                              "conflicts with it", field=field)
    return Plan(rec.base_model, rec, "request", ref=rec.ref(tenant))


def edge_generator(pipeline: Pipeline, plan: Plan) -> TextGenerator:
    assert plan.edge_model is not None
    gen = pipeline.edge_generators.get(plan.edge_model)
    if gen is None:
        raise BadRequestError(f"edge model {plan.edge_model} is not served in-process here",
                              field="model")
    return gen


def validate_edge(gen: TextGenerator, req: AnswerRequest) -> None:
    """Admission on the edge model's own tokenizer and context (4xx before any stream)."""
    req.prompt_tokens = gen.count_tokens(gen.render_chat(req.messages))
    gen.check_fits(req.prompt_tokens, req.max_tokens)
    SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p)


async def answer_on_edge(pipeline: Pipeline, plan: Plan,
                         req: AnswerRequest) -> AsyncIterator[Event]:
    """The edge model answers in full (with the plan's adapter), streamed as deltas."""
    gen = edge_generator(pipeline, plan)
    params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature,
                            top_p=req.top_p, seed=req.seed, stop=req.stop)
    prompt = gen.render_chat(req.messages)
    name = plan.adapter.engine_name if plan.adapter is not None else None
    # only an engine with adapters takes `adapter` (the catalog holds only such models)
    source = cast(Any, gen).stream(prompt, params, adapter=name) if name else gen.stream(
        prompt, params)
    start = time.perf_counter()
    ttft: float | None = None
    pieces: list[str] = []
    async for delta in iterate_in_thread(source):
        ttft = ttft if ttft is not None else time.perf_counter() - start
        pieces.append(delta)
        yield DeltaEvent(delta)
    text = "".join(pieces)
    total = time.perf_counter() - start
    out_tokens = gen.count_tokens(text)
    m = pipeline.metrics
    m.requests.labels("edge", req.endpoint).inc()
    m.stage_seconds.labels("edge").observe(total)
    m.tokens.labels("edge").inc(out_tokens)
    reason = (f"edge model {plan.edge_model} answers directly"
              + (f" with adapter {plan.ref}" if plan.ref and plan.adapter else ""))
    yield DoneEvent(text=text, mode="edge", reason=reason, sketch=[],
                    timings={"edge": total, "total": total, "ttft": ttft or total},
                    tokens={"prompt": req.prompt_tokens or 0, "cloud": 0, "edge": out_tokens},
                    finish_reason="length" if out_tokens >= req.max_tokens else "stop")


def run(pipeline: Pipeline, plan: Plan, req: AnswerRequest) -> AsyncIterator[Event]:
    if plan.edge_model is not None:
        return answer_on_edge(pipeline, plan, req)
    if plan.adapter is not None:  # the progressive path applies it to the edge expansions
        req.adapter = plan.adapter.engine_name
        req.adapter_model = plan.adapter.base_model
    return pipeline.run(req)


def validate(pipeline: Pipeline, plan: Plan, req: AnswerRequest) -> None:
    if plan.edge_model is not None:
        validate_edge(edge_generator(pipeline, plan), req)
    else:
        pipeline.validate(req)
