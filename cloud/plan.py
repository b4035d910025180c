"""What a request asks for, and the plan made for it once, before anything runs. The path is one
way: the API resolves who answers (direct.resolve), the pipeline plans (admission, the
scheduler's decision) and then runs the plan; nothing runs before the plan is complete, and
nothing is decided while it runs except the fallbacks a failure forces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pice.scheduler.adapter_router import AdapterChoice
from pice.scheduler.policy import Decision, QueryFeatures
from pice.shared.backend import Message

PIPELINE_MODEL = "pice"


@dataclass
class AnswerRequest:
    request_id: str
    messages: list[Message]
    max_tokens: int
    mode: str = "auto"
    max_points: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    endpoint: str = "chat"
    prompt_tokens: int | None = None  # filled in once, when the request is planned
    adapter: str | None = None  # LoRA adapter (engine name) for the edge expansions
    adapter_model: str | None = None  # the edge model that adapter applies to
    priority: str = "interactive"  # "interactive" | "batch": batch yields the cloud queue

    @property
    def question(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass(frozen=True)
class Who:
    """Which model answers and with which adapter (the `model` field and the adapter option)."""

    edge_model: str | None = None  # edge model that answers directly; None → the pipeline
    adapter: Any = None  # AdapterRecord applied (edge answer, or progressive expansions)
    selected_by: str | None = None  # "request" | "aas" (None: no adapter question arose)
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


Route = Literal["edge", "cloud", "progressive"]


@dataclass(frozen=True)
class Plan:
    """One request's plan: the route, and for the pipeline routes the scheduler's decision."""

    req: AnswerRequest
    route: Route
    who: Who
    decision: Decision | None = None  # None: an edge model answers directly
    features: QueryFeatures | None = None  # what the scheduler decided on

    def report(self, mode: str) -> dict[str, Any] | None:
        return self.who.report(mode)
