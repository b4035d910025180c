"""What the pipeline yields while it answers; the API turns these into JSON or SSE."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SketchEvent:
    points: list[str]


@dataclass
class SectionEvent:
    index: int  # 0-based point index
    text: str
    worker: str
    logprob: float  # mean per-token log-probability of the expansion
    tokens: int


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
    timings: dict[str, float]  # seconds: sketch, expansion, cloud, total, ttft
    tokens: dict[str, int]  # prompt, cloud, edge
    finish_reason: str = "stop"
    sections: list[SectionEvent] = field(default_factory=list)


Event = SketchEvent | SectionEvent | DeltaEvent | DoneEvent
