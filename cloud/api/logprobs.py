"""`logprobs: true` on chat completions (OpenAI's shape): one model writes the whole answer (the
cloud model, or an edge model / adapter named as `model`), in one generation whose per-token
log-probabilities the engine records. A progressive answer is written by several models and
rewritten by the guard, so it has no single token sequence: with logprobs, `auto` answers in
the cloud and an explicit `progressive` is refused. `top_logprobs: N` adds the N likeliest
tokens of each step (the engine's sampler keeps them for the sequences that ask). The answer is
generated first, then streamed (when `stream: true`) one token per chunk."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from pice.cloud.events import DoneEvent
from pice.cloud.pipeline import Pipeline, Plan
from pice.shared.backend import TextGenerator
from pice.shared.errors import BadRequestError
from pice.shared.sampling import Completion, SamplingParams


def check_request(logprobs: bool, top_logprobs: int | None, mode: str) -> str:
    """The mode to plan with (4xx for what cannot be honoured)."""
    if top_logprobs is not None and not logprobs:
        raise BadRequestError("top_logprobs needs logprobs: true", field="top_logprobs")
    if not logprobs:
        return mode
    if mode == "progressive":
        raise BadRequestError("logprobs need one model to write the whole answer; a progressive "
                              "answer is written by several: use pice.mode \"cloud\" or "
                              "\"auto\" (which then answers in the cloud)", field="logprobs")
    return "cloud"


def _top(chat: Any, pairs: list[tuple[int, float]]) -> list[dict[str, Any]]:
    out = []
    for tid, lp in pairs:
        token = chat.decode([tid])
        out.append({"token": token, "logprob": lp, "bytes": list(token.encode())})
    return out


def token_entries(gen: TextGenerator, out: Completion, top_n: int = 0) -> list[dict[str, Any]]:
    """OpenAI's `logprobs.content`: each token's text (a token that ends inside a multi-byte
    character gets "", the one that completes it the character), its bytes and log-probability.
    The end-of-sequence token and anything past a stop string are left out, so the tokens'
    texts join to the answer."""
    chat: Any = getattr(gen, "chat", None)
    if chat is None or len(out.logprobs) != len(out.token_ids) or not (
            out.token_ids or not out.text):  # remote backends (openai, vLLM) report none
        raise BadRequestError(f"model {gen.name} does not report per-token log-probabilities",
                              field="logprobs")
    tops: Any = out.extra.get("top_logprobs", [])
    if top_n and len(tops) != len(out.token_ids):
        raise BadRequestError(f"model {gen.name} does not report top_logprobs",
                              field="top_logprobs")
    ids = list(out.token_ids)
    if ids and ids[-1] in getattr(chat, "eos_ids", ()):
        ids = ids[:-1]
    entries: list[dict[str, Any]] = []
    shown = ""
    for i, (tid, lp) in enumerate(zip(ids, out.logprobs, strict=False)):
        text = chat.decode(ids[:i + 1])
        token = text[len(shown):] if text.startswith(shown) else chat.decode([tid])
        token = token[:max(0, len(out.text) - len(shown))]  # past a stop string: cut
        if not token and len(shown) >= len(out.text):
            break
        shown += token
        entries.append({"token": token, "logprob": lp, "bytes": list(token.encode()),
                        "top_logprobs": _top(chat, tops[i]) if top_n else []})
    return entries


@dataclass
class Answer:
    done: DoneEvent
    content: list[dict[str, Any]]  # logprobs.content


async def answer(pipeline: Pipeline, plan: Plan, asked_auto: bool, top_n: int = 0) -> Answer:
    """Run the plan (route "cloud" or "edge") as one generation that keeps token log-probs
    (and the `top_n` likeliest tokens of each step). `asked_auto`: the request said `auto` and
    logprobs made it `cloud` (the reason says so)."""
    req, who = plan.req, plan.who
    edge = plan.route == "edge"
    assert plan.route in ("cloud", "edge"), plan.route
    gen = pipeline.edge_generator(who.edge_model) if edge and who.edge_model else pipeline.cloud
    adapter = who.adapter.engine_name if edge and who.adapter is not None else None
    params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature,
                            top_p=req.top_p, seed=req.seed, stop=req.stop, top_logprobs=top_n)
    prompt = gen.render_chat(req.messages)
    t0 = time.perf_counter()
    if not edge:
        pipeline.scheduler.cloud.start(req.priority)
    out: Completion | None = None
    try:
        [out] = await asyncio.to_thread(gen.generate, [prompt], params,
                                        [adapter] if adapter else None)
    finally:
        seconds = time.perf_counter() - t0
        if not edge:
            pipeline.scheduler.cloud.finish(req.priority, len(out.token_ids) if out else 0,
                                            seconds)
    assert out is not None
    content = token_entries(gen, out, top_n)
    n = len(content)
    stage = "edge" if edge else "cloud"
    timings = {stage: seconds, "total": seconds, "ttft": seconds}
    pipeline.observe(stage, req.endpoint, timings, cloud_tokens=0 if edge else n,
                     edge_tokens=n if edge else 0)
    if edge:
        reason = f"edge model {who.edge_model} answers directly" + (
            f" with adapter {who.ref}" if who.ref and who.adapter else "")
    else:
        assert plan.decision is not None
        reason = ("logprobs requested: one model (the cloud) writes the whole answer"
                  if asked_auto else plan.decision.reason)
    done = DoneEvent(text=out.text, mode=stage, reason=reason, sketch=[], timings=timings,
                     tokens={"prompt": out.prompt_tokens, "cloud": 0 if edge else n,
                             "edge": n if edge else 0},
                     finish_reason=out.finish_reason)
    return Answer(done, content)
