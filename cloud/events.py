"""What the pipeline yields while it answers; the API turns these into JSON or SSE."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PointEvent:
    """One sketch point, the moment its line of the sketch is complete."""

    index: int  # 0-based point index
    text: str


@dataclass
class SketchEvent:
    """The whole sketch, once it is complete (after every PointEvent)."""

    points: list[str]


@dataclass
class SectionEvent:
    index: int  # 0-based point index
    text: str
    worker: str
    logprob: float  # mean per-token log-probability of the expansion
    tokens: int
    model: str = ""  # edge model that wrote the winning candidate
    adapter: str | None = None  # its LoRA adapter (None → base model)
    candidate: int = 0  # winning ensemble candidate number
    score: float | None = None  # its selection score (None: written by the cloud)
    candidates: list[dict[str, object]] = field(default_factory=list)  # every candidate's scores
    repaired: str | None = None  # why the quality guard had the cloud rewrite it, if it did


@dataclass
class DeltaEvent:
    """A piece of a full-cloud answer as it is generated."""

    text: str


@dataclass
class DoneEvent:
    text: str
    mode: str  # "cloud" | "progressive" (what actually ran)
    reason: str  # why the scheduler (or a fallback) chose it
    sketch: list[str]
    # seconds: sketch, expansion, cloud, edge, total, ttft (first text: a point, a section or a
    # delta), first_section (progressive)
    timings: dict[str, float]
    tokens: dict[str, int]  # prompt, cloud, edge
    finish_reason: str = "stop"
    sections: list[SectionEvent] = field(default_factory=list)
    ensemble: int = 1  # candidates per point that ran (progressive)
    repaired: list[dict[str, object]] = field(default_factory=list)  # the quality guard's points


Event = PointEvent | SketchEvent | SectionEvent | DeltaEvent | DoneEvent
