"""`pice route`: the router's probability and the policy's decision per question, for an idle
cluster of `--edges` edges (no LLM is loaded; only MiniLM)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from pice.scheduler.length import LengthModel
from pice.scheduler.placement import PlacementConfig
from pice.scheduler.policy import PolicyConfig, QueryFeatures, make_policy
from pice.scheduler.router import SuitabilityRouter
from pice.scheduler.state import CloudState, ClusterState, EdgeState
from pice.shared.errors import BadRequestError


@dataclass(frozen=True)
class RouteArgs:
    questions: list[str]  # empty → one per line on stdin
    policy: str = "dynamic"
    max_tokens: int = 512
    edges: int = 1
    slots: int = 8
    json: bool = False


def _questions(args: RouteArgs) -> Iterable[str]:
    if args.questions:
        yield from args.questions
        return
    for line in sys.stdin:
        if line.strip():
            yield line.strip()


def route(args: RouteArgs) -> int:
    if args.edges < 0 or args.slots < 1 or args.max_tokens < 1:
        raise BadRequestError(f"--edges must be >= 0, --slots and --max-tokens >= 1; got "
                         f"{args.edges}, {args.slots}, {args.max_tokens}")
    questions = list(_questions(args))
    router = SuitabilityRouter()
    probs: list[float] = [float(p) for p in router.probability(questions)] if questions else []
    policy = make_policy(args.policy, PolicyConfig(), lengths=LengthModel())
    rate = PlacementConfig().default_tokens_per_s
    cluster = ClusterState(CloudState(), tuple(
        EdgeState(f"edge-{i}", (), args.slots, 0, rate) for i in range(args.edges)))
    for question, p in zip(questions, probs, strict=True):
        d = policy.decide(QueryFeatures(question, max_tokens=args.max_tokens,
                                        suitability=float(p)), cluster)
        if args.json:
            print(json.dumps({"question": question, "probability": round(float(p), 4),
                              "mode": d.mode, "reason": d.reason, "code": d.code,
                              "points": d.max_points, "words_per_point": d.words_per_point,
                              "ensemble": d.ensemble, "placement": list(d.placement)}),
                  flush=True)
        else:
            shape = f" {d.max_points}x{d.words_per_point}w" if d.mode == "progressive" else ""
            print(f"{float(p):.3f}  {d.mode}{shape}  {d.reason}  | {question}", flush=True)
    return 0
