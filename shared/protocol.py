"""Every message that passes between the cloud and an edge worker. One file, each field
commented; in-process workers exchange the same objects the network transport will carry."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ExpansionTask(BaseModel):
    """Cloud → edge: expand one point of a sketch."""

    request_id: str  # the client request this point belongs to
    question: str  # the user's question, verbatim (last user message)
    sketch: list[str]  # every point of the sketch, in order (context for the expansion)
    index: int = Field(ge=0)  # which point to expand (0-based into `sketch`)
    max_tokens: int = Field(ge=1)  # token budget for this point's expansion
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # 0 → greedy
    seed: int | None = None  # sampling seed, when the client gave one
    adapter: str | None = None  # LoRA adapter to apply (None → base model)
    model: str | None = None  # model spec that must run it (None → any edge model)
    candidate: int = Field(0, ge=0)  # ensemble candidate number for this point (0 → first)


class ExpansionResult(BaseModel):
    """Edge → cloud: the expansion of one point."""

    request_id: str  # echoes ExpansionTask.request_id
    index: int  # echoes ExpansionTask.index
    candidate: int = 0  # echoes ExpansionTask.candidate
    adapter: str | None = None  # LoRA adapter that was applied (None → base model)
    text: str  # the expanded point (1–2 sentences), without the number
    worker: str  # id of the edge worker that produced it
    model: str  # model spec the worker ran
    tokens: int  # tokens generated for this point
    mean_logprob: float  # mean per-token log-probability (ensemble selection uses it)
    logprobs: list[float] = Field(default_factory=list)  # per-token log-probabilities
    finish_reason: str  # "stop" (natural end) | "length" (hit max_tokens)
    seconds: float  # from the start of its batch until this point finished
