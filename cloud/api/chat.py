"""OpenAI-compatible chat completions (plain and `stream: true`), and the model list."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from sse_starlette.sse import EventSourceResponse

from pice.cloud import direct
from pice.cloud.adapter_catalog import AdapterCatalog
from pice.cloud.api.deps import access_note, get_catalog, get_pipeline, get_tenant, new_id
from pice.cloud.api.errors import exception_to_response
from pice.cloud.api.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ModelCard,
    ModelList,
    PiceReport,
    Usage,
)
from pice.cloud.events import DeltaEvent, DoneEvent, Event, PointEvent, SectionEvent
from pice.cloud.pipeline import AnswerRequest, Pipeline, Plan
from pice.cloud.tenants import Tenant

router = APIRouter(tags=["openai"])


def to_answer_request(body: ChatCompletionRequest, rid: str, default_max: int,
                      endpoint: str = "chat") -> AnswerRequest:
    return AnswerRequest(
        request_id=rid,
        messages=[{"role": m.role, "content": m.text()} for m in body.messages],
        max_tokens=body.max_completion_tokens or body.max_tokens or default_max,
        mode=body.pice.mode, max_points=body.pice.max_points, temperature=body.temperature,
        top_p=body.top_p, seed=body.seed, stop=body.stop_tuple(), endpoint=endpoint,
        priority=body.pice.priority,
    )


def report(done: DoneEvent, plan: Plan | None = None) -> PiceReport:
    return PiceReport(mode=done.mode, reason=done.reason, sketch=done.sketch,
                      timings=done.timings, tokens=done.tokens,
                      adapter=plan.report(done.mode) if plan is not None else None)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           pipeline: Pipeline = Depends(get_pipeline),  # noqa: B008
                           tenant: Tenant = Depends(get_tenant),  # noqa: B008
                           catalog: AdapterCatalog = Depends(get_catalog)):  # noqa: B008
    rid = new_id("chatcmpl")
    req = to_answer_request(body, rid, request.app.state.settings.default_max_tokens)
    question = next(m["content"] for m in reversed(req.messages) if m["role"] == "user")
    who = await direct.resolve(body.model, body.pice.adapter, question, tenant, catalog,
                               pipeline.cloud.name, pipeline.edge_generators)  # who answers
    plan = await pipeline.plan(req, who)  # 4xx now, before any stream starts; then one run
    model = body.model or pipeline.cloud.name
    note = access_note(request)
    note["request_id"] = rid
    if body.stream:
        return EventSourceResponse(_stream(pipeline.execute(plan), plan, req, model,
                                           note), ping=15)
    done = None
    async for ev in pipeline.execute(plan):
        if isinstance(ev, DoneEvent):
            done = ev
    assert done is not None, "pipeline ended without a DoneEvent"
    note.update(mode=done.mode, timings=done.timings)
    completion = done.tokens["cloud"] + done.tokens["edge"]
    return ChatCompletionResponse(
        id=rid, created=int(time.time()), model=model,
        choices=[Choice(message=AssistantMessage(content=done.text),
                        finish_reason=done.finish_reason)],
        usage=Usage(prompt_tokens=done.tokens["prompt"], completion_tokens=completion,
                    total_tokens=done.tokens["prompt"] + completion),
        pice=report(done, plan),
    )


def _chunk(rid: str, model: str, delta: dict[str, str], finish: str | None = None,
           extra: dict[str, object] | None = None) -> str:
    body: dict[str, object] = {
        "id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if extra:
        body.update(extra)
    return json.dumps(body)


class _InOrder:
    """Progressive text in point order: the next point's "N. title" as soon as its sketch line
    is complete, the rest of its section when that is decided."""

    def __init__(self) -> None:
        self.titles: dict[int, str] = {}
        self.sections: dict[int, SectionEvent] = {}
        self.next = 0
        self.titled = False  # the next point's title is out already

    def add(self, ev: PointEvent | SectionEvent) -> list[str]:
        if isinstance(ev, PointEvent):
            self.titles[ev.index] = ev.text
        else:
            self.sections[ev.index] = ev
        out: list[str] = []
        while True:
            i, sep = self.next, "" if self.next == 0 else "\n"
            s = self.sections.pop(i, None)
            if s is not None:
                title = self.titles.get(i, "")
                if self.titled and s.text.startswith(title):
                    out.append(s.text[len(title):])
                else:
                    out.append(f"{' —' if self.titled else f'{sep}{i + 1}.'} {s.text}")
                self.next, self.titled = i + 1, False
            elif i in self.titles and not self.titled:
                out.append(f"{sep}{i + 1}. {self.titles[i]}")
                self.titled = True
            else:
                return out


async def _stream(events: AsyncIterator[Event], plan: Plan, req: AnswerRequest,
                  model: str, note: dict[str, object]) -> AsyncIterator[str]:
    rid = req.request_id
    yield _chunk(rid, model, {"role": "assistant", "content": ""})
    order = _InOrder()  # points and sections arrive as they finish; text goes in order
    try:
        async for ev in events:
            if isinstance(ev, DeltaEvent):
                yield _chunk(rid, model, {"content": ev.text})
            elif isinstance(ev, PointEvent | SectionEvent):
                for text in order.add(ev):
                    yield _chunk(rid, model, {"content": text})
            elif isinstance(ev, DoneEvent):
                note.update(mode=ev.mode, timings=ev.timings)
                yield _chunk(rid, model, {}, ev.finish_reason,
                             {"pice": report(ev, plan).model_dump()})
    except Exception as exc:  # the stream has begun: report in-band, then end it
        _, body = exception_to_response(exc)
        yield json.dumps(body)
    yield "[DONE]"


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request,
                      tenant: Tenant = Depends(get_tenant)) -> ModelList:  # noqa: B008
    settings = request.app.state.settings
    ids = [settings.cloud_model, *settings.edge_models]
    cards = [ModelCard(id=i) for i in dict.fromkeys(ids)]
    catalog: AdapterCatalog | None = request.app.state.adapters
    for rec in catalog.visible(tenant) if catalog is not None else []:  # LoRA adapters
        cards.append(ModelCard(id=rec.ref(tenant), created=rec.created, owned_by=rec.owner,
                               parent=rec.base_model))
    return ModelList(data=cards)
