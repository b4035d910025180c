"""HTTP schemas (kept apart from internal state). OpenAI-compatible shapes, plus the `pice`
options and report that ride alongside them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Mode = Literal["auto", "cloud", "progressive"]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class PiceOptions(BaseModel):
    """Per-request options for the scheduler; `extra_body={"pice": {...}}` in the openai client."""

    model_config = ConfigDict(extra="forbid")
    mode: Mode = "auto"  # auto: the scheduler picks; cloud: full answer; progressive: sketch+edge
    max_points: int | None = Field(None, ge=1, le=10)  # cap on sketch points
    # LoRA adapter for the edge: a name (yours, or public), "auto" (AAS picks) or "none"
    adapter: str | None = Field(None, min_length=1, max_length=200)
    # interactive requests pass waiting batch ones; batch work yields a busy cloud to the edges
    priority: Literal["interactive", "batch"] = "interactive"


def _check_messages(messages: list[ChatMessage]) -> list[ChatMessage]:
    if not messages:
        raise ValueError("messages must contain at least one message")
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise ValueError("messages must contain a user message")
    if not users[-1].text().strip():
        raise ValueError("the last user message has empty content")
    return messages


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields are accepted and unused
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1, le=131072)
    max_completion_tokens: int | None = Field(None, ge=1, le=131072)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    # per-token log-probabilities of the answer (then one model writes it: cloud/api/logprobs.py)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)  # the N likeliest tokens per step
    pice: PiceOptions = Field(default_factory=PiceOptions)

    _v_messages = field_validator("messages")(_check_messages)

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class PiceReport(BaseModel):
    mode: str  # what ran: "cloud" | "progressive"
    reason: str  # why
    sketch: list[str]  # sketch points (empty for cloud)
    timings: dict[str, float]  # seconds per stage
    tokens: dict[str, int]  # prompt / cloud / edge
    # adapter: {name (None: base model), selected_by: "request"|"aas", score, best, reason}
    adapter: dict[str, Any] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str  # the token's text ("" for one that ends inside a multi-byte character)
    logprob: float  # log p(token) under the model that wrote it
    bytes: list[int] | None = None  # its UTF-8 bytes


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)  # the N likeliest, best first


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None  # one per answer token, in order
    refusal: list[TokenLogprob] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None  # with `logprobs: true`


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    pice: PiceReport


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "pice"
    parent: str | None = None  # a LoRA adapter's base model (vLLM's convention)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ProgressiveRequest(BaseModel):
    """Native endpoint: a question (or messages), answered as server-sent events."""

    model_config = ConfigDict(extra="forbid")
    question: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int | None = Field(None, ge=1, le=131072)
    mode: Mode = "progressive"
    max_points: int | None = Field(None, ge=1, le=10)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int | None = None
    stream: bool = True  # false → one JSON ProgressiveResponse
    # LoRA adapter for the edge expansions: a name (yours, or public), "auto" or "none"
    adapter: str | None = Field(None, min_length=1, max_length=200)
    priority: Literal["interactive", "batch"] = "interactive"  # as PiceOptions.priority

    @model_validator(mode="after")
    def _one_input(self) -> ProgressiveRequest:
        if (self.question is None) == (self.messages is None):
            raise ValueError("give exactly one of question or messages")
        if self.question is not None and not self.question.strip():
            raise ValueError("question is empty")
        if self.messages is not None:
            _check_messages(self.messages)
        return self


class SectionOut(BaseModel):
    index: int
    text: str
    worker: str
    logprob: float
    tokens: int
    model: str = ""  # edge model of the winning ensemble candidate
    adapter: str | None = None  # its LoRA adapter
    candidate: int = 0  # winning candidate number
    score: float | None = None  # its selection score (None: written by the cloud)
    candidates: list[dict[str, Any]] = Field(default_factory=list)  # every candidate's scores
    repaired: str | None = None  # why the quality guard had the cloud rewrite it


class ProgressiveResponse(PiceReport):
    text: str
    sections: list[SectionOut]
    ensemble: int = 1  # candidates per point
    repaired: list[dict[str, Any]] = Field(default_factory=list)  # the quality guard's points


class ErrorDetail(BaseModel):
    message: str  # what was wrong, naming the field
    type: str  # invalid_request_error, authentication_error, rate_limit_error, …
    param: str | None = None  # the field at fault, where there is one
    code: int  # the HTTP status


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body (OpenAI's error shape)."""

    error: ErrorDetail
