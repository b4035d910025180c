"""OpenAI-compatible chat completions (plain and `stream: true`), and the model list."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from sse_starlette.sse import EventSourceResponse

from pice.cloud.api.deps import get_pipeline, new_id
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
from pice.cloud.events import DeltaEvent, DoneEvent, SectionEvent
from pice.cloud.pipeline import AnswerRequest, Pipeline

router = APIRouter(tags=["openai"])


def to_answer_request(body: ChatCompletionRequest, rid: str, default_max: int,
                      endpoint: str = "chat") -> AnswerRequest:
    return AnswerRequest(
        request_id=rid,
        messages=[{"role": m.role, "content": m.text()} for m in body.messages],
        max_tokens=body.max_completion_tokens or body.max_tokens or default_max,
        mode=body.pice.mode, max_points=body.pice.max_points, temperature=body.temperature,
        top_p=body.top_p, seed=body.seed, stop=body.stop_tuple(), endpoint=endpoint,
    )


def report(done: DoneEvent) -> PiceReport:
    return PiceReport(mode=done.mode, reason=done.reason, sketch=done.sketch,
                      timings=done.timings, tokens=done.tokens)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           pipeline: Pipeline = Depends(get_pipeline)):  # noqa: B008
    rid = new_id("chatcmpl")
    req = to_answer_request(body, rid, request.app.state.settings.default_max_tokens)
    pipeline.validate(req)  # 4xx now, before any stream starts
    model = body.model or pipeline.cloud.name
    if body.stream:
        return EventSourceResponse(_stream(pipeline, req, model), ping=15)
    done = None
    async for ev in pipeline.run(req):
        if isinstance(ev, DoneEvent):
            done = ev
    assert done is not None, "pipeline ended without a DoneEvent"
    completion = done.tokens["cloud"] + done.tokens["edge"]
    return ChatCompletionResponse(
        id=rid, created=int(time.time()), model=model,
        choices=[Choice(message=AssistantMessage(content=done.text),
                        finish_reason=done.finish_reason)],
        usage=Usage(prompt_tokens=done.tokens["prompt"], completion_tokens=completion,
                    total_tokens=done.tokens["prompt"] + completion),
        pice=report(done),
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


async def _stream(pipeline: Pipeline, req: AnswerRequest, model: str) -> AsyncIterator[str]:
    rid = req.request_id
    yield _chunk(rid, model, {"role": "assistant", "content": ""})
    pending: dict[int, SectionEvent] = {}  # sections arrive as they finish; text goes in order
    next_index = 0
    try:
        async for ev in pipeline.run(req):
            if isinstance(ev, DeltaEvent):
                yield _chunk(rid, model, {"content": ev.text})
            elif isinstance(ev, SectionEvent):
                pending[ev.index] = ev
                while next_index in pending:
                    s = pending.pop(next_index)
                    sep = "" if s.index == 0 else "\n"
                    yield _chunk(rid, model, {"content": f"{sep}{s.index + 1}. {s.text}"})
                    next_index += 1
            elif isinstance(ev, DoneEvent):
                yield _chunk(rid, model, {}, ev.finish_reason,
                             {"pice": report(ev).model_dump()})
    except Exception as exc:  # the stream has begun: report in-band, then end it
        _, body = exception_to_response(exc)
        yield json.dumps(body)
    yield "[DONE]"


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    settings = request.app.state.settings
    ids = [settings.cloud_model, *settings.edge_models]
    return ModelList(data=[ModelCard(id=i) for i in dict.fromkeys(ids)])
