"""OpenAI-compatible chat completions (plain and `stream: true`), and the model list."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from sse_starlette.sse import EventSourceResponse

from pice.cloud import direct
from pice.cloud.adapter_catalog import AdapterCatalog
from pice.cloud.api import logprobs
from pice.cloud.api.deps import access_note, get_catalog, get_pipeline, get_tenant, new_id
from pice.cloud.api.errors import exception_to_response
from pice.cloud.api.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ModelCard,
    ModelList,
    PiceReport,
    Usage,
)
from pice.cloud.events import DeltaEvent, DoneEvent, Event, PointEvent, SectionEvent
from pice.cloud.pipeline import AnswerRequest, Pipeline, Plan
from pice.cloud.plan import PIPELINE_MODEL
from pice.cloud.tenants import Tenant
from pice.shared.backend import TextGenerator
from pice.shared.errors import BadRequestError

router = APIRouter(tags=["openai"])


def to_answer_request(body: ChatCompletionRequest, rid: str, default_max: int,
                      endpoint: str = "chat") -> AnswerRequest:
    return AnswerRequest(
        request_id=rid,
        messages=[{"role": m.role, "content": m.text()} for m in body.messages],
        max_tokens=body.max_completion_tokens or body.max_tokens or default_max,
        mode=logprobs.check_request(body.logprobs, body.top_logprobs, body.pice.mode),
        max_points=body.pice.max_points, temperature=body.temperature,
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
    if who.edge_model is not None and who.adapter is None:
        _check_chat_model(who.edge_model, pipeline.edge_generator(who.edge_model))
    plan = await pipeline.plan(req, who)  # 4xx now, before any stream starts; then one run
    model = body.model or pipeline.cloud.name
    note = access_note(request)
    note["request_id"] = rid
    if body.logprobs:
        return await _with_logprobs(pipeline, plan, body, model, note)
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


def _has_chat_template(gen: TextGenerator) -> bool:
    tok = getattr(getattr(gen, "chat", None), "tok", None)
    return tok is None or bool(getattr(tok, "chat_template", None))


def _check_chat_model(spec: str, gen: TextGenerator) -> None:
    """A base model (no chat template, e.g. gemma-3-270m) is not offered for chat: it answers a
    conversation with a transcript continuation. It expands sketch points in the pipeline, where
    its prompt carries a worked example."""
    if not _has_chat_template(gen):
        raise BadRequestError(f"{spec} is a base model without a chat template: it expands "
                              f"sketch points inside the pipeline but does not chat; use model "
                              f"{PIPELINE_MODEL!r}", field="model")


async def _with_logprobs(pipeline: Pipeline, plan: Plan, body: ChatCompletionRequest,
                         model: str, note: dict[str, object]):
    asked_auto = body.pice.mode == "auto" and plan.route == "cloud"
    ans = await logprobs.answer(pipeline, plan, asked_auto, body.top_logprobs or 0)
    done, rid = ans.done, plan.req.request_id
    note.update(mode=done.mode, timings=done.timings)
    if body.stream:
        return EventSourceResponse(_stream_tokens(ans, plan, model), ping=15)
    completion = done.tokens["cloud"] + done.tokens["edge"]
    return ChatCompletionResponse(
        id=rid, created=int(time.time()), model=model,
        choices=[Choice(message=AssistantMessage(content=done.text),
                        finish_reason=done.finish_reason,
                        logprobs=ChoiceLogprobs.model_validate({"content": ans.content}))],
        usage=Usage(prompt_tokens=done.tokens["prompt"], completion_tokens=completion,
                    total_tokens=done.tokens["prompt"] + completion),
        pice=report(done, plan))


async def _stream_tokens(ans: logprobs.Answer, plan: Plan, model: str) -> AsyncIterator[str]:
    """The generated answer, one token (and its log-probability) per chunk."""
    rid = plan.req.request_id
    yield _chunk(rid, model, {"role": "assistant", "content": ""})
    for entry in ans.content:
        yield _chunk(rid, model, {"content": entry["token"]},
                     logprobs={"content": [entry], "refusal": None})
    yield _chunk(rid, model, {}, ans.done.finish_reason,
                 {"pice": report(ans.done, plan).model_dump()})
    yield "[DONE]"


def _chunk(rid: str, model: str, delta: dict[str, str], finish: str | None = None,
           extra: dict[str, object] | None = None,
           logprobs: dict[str, object] | None = None) -> str:
    choice: dict[str, object] = {"index": 0, "delta": delta, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    body: dict[str, object] = {
        "id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [choice],
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
    """`pice` (the pipeline: sketch + edges, or the cloud in full), the cloud model, the edge
    models that chat (base models without a chat template only expand points), and the
    adapters the caller may use. Edge models and adapters are listed once the models are
    loaded (before that, whether one chats is not known)."""
    settings = request.app.state.settings
    pipeline: Pipeline | None = request.app.state.pipeline
    edges = [] if pipeline is None else [s for s, g in pipeline.edge_generators.items()
                                         if _has_chat_template(g)]
    ids = [PIPELINE_MODEL, settings.cloud_model, *edges]
    cards = [ModelCard(id=i) for i in dict.fromkeys(ids)]
    catalog: AdapterCatalog | None = request.app.state.adapters
    for rec in catalog.visible(tenant) if catalog is not None else []:  # LoRA adapters
        cards.append(ModelCard(id=rec.ref(tenant), created=rec.created, owned_by=rec.owner,
                               parent=rec.base_model))
    return ModelList(data=cards)
