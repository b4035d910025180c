"""Native progressive endpoint: server-sent events `sketch`, `section`, `delta`, `done`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import asdict

from fastapi import APIRouter, Depends, Request
from sse_starlette.sse import EventSourceResponse

from pice.cloud import direct
from pice.cloud.adapter_catalog import AdapterCatalog
from pice.cloud.api.deps import access_note, get_catalog, get_pipeline, get_tenant, new_id
from pice.cloud.api.errors import exception_to_response
from pice.cloud.api.schemas import ProgressiveRequest, ProgressiveResponse, SectionOut
from pice.cloud.events import (
    DeltaEvent,
    DoneEvent,
    Event,
    PointEvent,
    SectionEvent,
    SketchEvent,
)
from pice.cloud.pipeline import AnswerRequest, Pipeline, Plan
from pice.cloud.tenants import Tenant

router = APIRouter(tags=["progressive"])


def _answer_request(body: ProgressiveRequest, default_max: int) -> AnswerRequest:
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    else:
        messages = [{"role": "user", "content": body.question or ""}]
    return AnswerRequest(request_id=new_id("prog"), messages=messages,
                         max_tokens=body.max_tokens or default_max, mode=body.mode,
                         max_points=body.max_points, temperature=body.temperature,
                         seed=body.seed, endpoint="progressive", priority=body.priority)


@router.post("/v1/progressive", response_model=ProgressiveResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def progressive(body: ProgressiveRequest, request: Request,
                      pipeline: Pipeline = Depends(get_pipeline),  # noqa: B008
                      tenant: Tenant = Depends(get_tenant),  # noqa: B008
                      catalog: AdapterCatalog = Depends(get_catalog)):  # noqa: B008
    req = _answer_request(body, request.app.state.settings.default_max_tokens)
    question = next(m["content"] for m in reversed(req.messages) if m["role"] == "user")
    who = await direct.resolve(None, body.adapter, question, tenant, catalog,
                               pipeline.cloud.name, pipeline.edge_generators, field="adapter")
    plan = await pipeline.plan(req, who)  # admission (4xx) and the scheduler's decision
    note = access_note(request)
    note["request_id"] = req.request_id
    if body.stream:
        return EventSourceResponse(_events(pipeline.execute(plan), plan, note),
                                   ping=15)
    done = None
    async for ev in pipeline.execute(plan):
        if isinstance(ev, DoneEvent):
            done = ev
    assert done is not None, "pipeline ended without a DoneEvent"
    note.update(mode=done.mode, timings=done.timings)
    return ProgressiveResponse(mode=done.mode, reason=done.reason, sketch=done.sketch,
                               timings=done.timings, tokens=done.tokens, text=done.text,
                               sections=[SectionOut(**asdict(s)) for s in done.sections],
                               ensemble=done.ensemble, repaired=done.repaired,
                               adapter=plan.report(done.mode))


async def _events(events: AsyncIterator[Event], plan: Plan,
                  note: dict[str, object]) -> AsyncIterator[dict[str, str]]:
    try:
        async for ev in events:
            if isinstance(ev, PointEvent):
                yield {"event": "point", "data": json.dumps({"index": ev.index,
                                                             "text": ev.text})}
            elif isinstance(ev, SketchEvent):
                yield {"event": "sketch", "data": json.dumps({"points": ev.points})}
            elif isinstance(ev, SectionEvent):
                yield {"event": "section", "data": json.dumps(asdict(ev))}
            elif isinstance(ev, DeltaEvent):
                yield {"event": "delta", "data": json.dumps({"text": ev.text})}
            elif isinstance(ev, DoneEvent):
                note.update(mode=ev.mode, timings=ev.timings)
                data = {k: v for k, v in asdict(ev).items() if k != "sections"}
                data["adapter"] = plan.report(ev.mode)
                yield {"event": "done", "data": json.dumps(data)}
    except Exception as exc:  # the stream has begun: report in-band, then end it
        _, body = exception_to_response(exc)
        yield {"event": "error", "data": json.dumps(body)}
