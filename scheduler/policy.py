"""Per-query decision: full cloud or progressive, the sketch's shape, an edge per point. Pure code:
plain inputs (the query, a ClusterState snapshot), a plain Decision out; no tensors, no I/O
(DESIGN.md §6 rule 2). Policies sit behind `Policy` and `make_policy` (rule 3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from pice.scheduler.state import ClusterState

if TYPE_CHECKING:
    from pice.scheduler.length import LengthModel

Mode = Literal["auto", "cloud", "progressive"]
MODES: tuple[str, ...] = ("auto", "cloud", "progressive")
Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[str, ...] = ("interactive", "batch")
POLICIES: tuple[str, ...] = ("always-cloud", "always-progressive", "router-only", "dynamic")


@dataclass(frozen=True)
class QueryFeatures:
    question: str  # last user message
    requested_mode: str = "auto"  # "auto" | "cloud" | "progressive"
    max_tokens: int = 512  # client's cap on the whole answer
    max_points: int | None = None  # client's cap on sketch points (None → policy default)
    prompt_tokens: int = 0  # tokens of the conversation as the cloud model sees it (0: unknown)
    max_context: int = 0  # the models' context limit (0: unknown)
    suitability: float | None = None  # router's P(answer = independent points); None → ask it
    priority: str = "interactive"  # "interactive" | "batch" (batch yields the cloud queue)
    latency_slo_s: float = 0.0  # the client's latency objective (0: none)
    model: str | None = None  # edge model the points must run on (None: any)
    adapter: str | None = None  # LoRA adapter the points use (resident edges preferred)
    words: int = -1  # words in the question (-1: count them; the simulator passes it)


@dataclass(frozen=True)
class PolicyConfig:
    default_max_points: int = 6
    words_per_point: int = 5
    min_words_per_point: int = 3  # floor when a busy cloud shortens the sketch
    point_tokens: int = 64  # edge tokens per point
    min_answer_tokens: int = 48  # below this a sketch cannot pay for itself
    prompt_overhead_tokens: int = 160  # sketch/expansion instructions around the question
    max_ensemble: int = 3  # candidates per point when edges have room to spare
    threshold: float = 0.5  # router-only: sketch at or above this probability
    min_probability: float = 0.35  # dynamic: never sketch below this probability
    cloud_tokens_per_s: float = 5.6  # unmeasured cloud: progressive.json, 1.5B on 2 cores
    sketch_fill: float = 0.6  # share of the sketch budget a sketch uses (progressive.json)
    point_fill: float = 0.5  # share of the point budget an expansion uses (progressive.json)

    def __post_init__(self) -> None:
        if not 1 <= self.default_max_points <= 10:
            raise ValueError(
                f"default_max_points must be in [1, 10], got {self.default_max_points}")
        if self.point_tokens < 8:
            raise ValueError(f"point_tokens must be >= 8, got {self.point_tokens}")
        if not 1 <= self.min_words_per_point <= self.words_per_point:
            raise ValueError(f"min_words_per_point must be in [1, words_per_point], got "
                             f"{self.min_words_per_point}")
        if self.max_ensemble < 1:
            raise ValueError(f"max_ensemble must be >= 1, got {self.max_ensemble}")
        if not 0 < self.min_probability <= self.threshold < 1:
            raise ValueError(f"need 0 < min_probability <= threshold < 1, got "
                             f"{self.min_probability}, {self.threshold}")
        if self.cloud_tokens_per_s <= 0:
            raise ValueError(f"cloud_tokens_per_s must be > 0, got {self.cloud_tokens_per_s}")


@dataclass(frozen=True)
class Decision:
    mode: Literal["cloud", "progressive"]
    reason: str  # for people: logged and returned in the `done` event
    max_points: int = 0  # sketch points asked of the cloud model
    words_per_point: int = 0
    sketch_tokens: int = 0  # cloud token budget for the sketch
    point_tokens: int = 0  # edge token budget per point
    ensemble: int = 1  # candidates per point (1 under pressure)
    placement: tuple[str, ...] = ()  # edge id per point, in point order (may be shorter)
    priority: str = "interactive"
    probability: float | None = None  # router's P(suits a sketch), when it was asked
    code: str = ""  # reason category, a /metrics label: requested, unsuited, edges-busy, ...
    predicted_tokens: int = 0  # length model's full-cloud answer estimate (0: not asked)


class Policy(Protocol):
    name: str

    def decide(self, q: QueryFeatures, cluster: ClusterState) -> Decision: ...


Router = Callable[[str], float]  # question → P(suits a sketch)


def sketch_budget(points: int, words_per_point: int) -> int:
    return 8 + points * (words_per_point * 2 + 4)


def point_budget(cfg: PolicyConfig, q: QueryFeatures, points: int) -> int:
    """Each point's expansion shares the client's budget, under the per-point cap."""
    return max(8, min(cfg.point_tokens, q.max_tokens // max(points, 1)))


def too_long(cfg: PolicyConfig, q: QueryFeatures, sketch_tokens: int, point_tokens: int
             ) -> Decision | None:
    # an expansion prompt holds the question, the instructions and the whole sketch
    needed = q.prompt_tokens + cfg.prompt_overhead_tokens + sketch_tokens + point_tokens
    if q.max_context and needed > q.max_context:
        return Decision("cloud", f"prompt too long to sketch ({needed} > {q.max_context} tokens)",
                        priority=q.priority, code="prompt-too-long")
    return None


def precheck(q: QueryFeatures, cfg: PolicyConfig, cluster: ClusterState) -> Decision | None:
    """What every policy obeys: a requested mode, no edge, a cap too small to sketch."""
    if q.requested_mode not in MODES:
        raise ValueError(f"unknown mode {q.requested_mode!r}; expected one of {MODES}")
    if q.priority not in PRIORITIES:
        raise ValueError(f"unknown priority {q.priority!r}; expected one of {PRIORITIES}")
    if q.requested_mode == "cloud":
        return Decision("cloud", "requested", priority=q.priority, code="requested")
    if cluster.healthy_edges == 0:
        return Decision("cloud", "no edge worker available", priority=q.priority, code="no-edge")
    if q.requested_mode == "auto" and q.max_tokens < cfg.min_answer_tokens:
        return Decision("cloud", f"max_tokens {q.max_tokens} too small to sketch",
                        priority=q.priority, code="too-small")
    return None


def make_policy(name: str, cfg: PolicyConfig | None = None, router: Router | None = None,
                lengths: LengthModel | None = None) -> Policy:
    """One of POLICIES. `router` scores questions that arrive without a probability;
    `lengths` is the dynamic policy's LengthModel (a fresh one when None)."""
    from pice.scheduler.length import LengthModel
    from pice.scheduler.policies import AlwaysCloud, AlwaysProgressive, DynamicPolicy, RouterOnly

    cfg = cfg or PolicyConfig()
    if name == "always-cloud":
        return AlwaysCloud(cfg)
    if name == "always-progressive":
        return AlwaysProgressive(cfg)
    if name == "router-only":
        return RouterOnly(cfg, router)
    if name == "dynamic":
        return DynamicPolicy(cfg, router, lengths or LengthModel())
    raise ValueError(f"unknown policy {name!r}; expected one of {POLICIES}")
