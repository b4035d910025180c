import json
from pathlib import Path

import pytest

from pice.scheduler.length import LengthModel
from pice.scheduler.policy import POLICIES, PolicyConfig, QueryFeatures, make_policy
from pice.scheduler.state import CloudState, ClusterState, EdgeState
from pice.scheduler.suitability import classify

CFG = PolicyConfig(default_max_points=6, words_per_point=5, point_tokens=64)
QUESTIONS = Path(__file__).resolve().parents[2] / "bench" / "questions.jsonl"


def edges(n: int = 4, slots: int = 8, inflight: int = 0, rate: float = 16.0) -> ClusterState:
    return ClusterState(CloudState(), tuple(
        EdgeState(f"e{i}", ("edge-model",), slots, inflight, rate, 0.02) for i in range(n)))


def q(text: str = "How can I sleep better?", mode: str = "auto", max_tokens: int = 512,
      max_points: int | None = None, p: float | None = 0.95, prompt_tokens: int = 0,
      max_context: int = 0, priority: str = "interactive") -> QueryFeatures:
    return QueryFeatures(text, mode, max_tokens, max_points, prompt_tokens, max_context,
                         suitability=p, priority=priority)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize(("features", "cluster", "mode", "reason_part"), [
    (q(mode="cloud"), edges(), "cloud", "requested"),
    (q(mode="progressive"), edges(), "progressive", "requested"),
    (q(mode="progressive"), edges(0), "cloud", "no edge"),
    (q(), edges(0), "cloud", "no edge"),
    (q(max_tokens=16), edges(), "cloud", "too small"),
    (q(mode="progressive", prompt_tokens=3900, max_context=4096), edges(), "cloud",
     "prompt too long"),
    (q(mode="progressive", prompt_tokens=300, max_context=4096), edges(), "progressive",
     "requested"),
])
def test_every_policy_obeys_requests_and_limits(name: str, features: QueryFeatures,
                                                cluster: ClusterState, mode: str,
                                                reason_part: str) -> None:
    d = make_policy(name, CFG).decide(features, cluster)
    assert d.mode == mode
    assert reason_part in d.reason


@pytest.mark.parametrize(("name", "p", "mode", "code"), [
    ("always-cloud", 0.99, "cloud", "static"),
    ("always-progressive", 0.01, "progressive", "static"),
    ("router-only", 0.9, "progressive", "suited"),
    ("router-only", 0.1, "cloud", "unsuited"),
    ("dynamic", 0.9, "progressive", "suited"),
    ("dynamic", 0.1, "cloud", "unsuited"),
])
def test_auto_by_policy(name: str, p: float, mode: str, code: str) -> None:
    d = make_policy(name, CFG).decide(q(p=p), edges())
    assert (d.mode, d.code) == (mode, code)
    if mode == "progressive":
        assert len(d.placement) == d.max_points and set(d.placement) <= {"e0", "e1", "e2", "e3"}


def test_router_is_asked_only_without_a_probability() -> None:
    asked: list[str] = []

    def router(question: str) -> float:
        asked.append(question)
        return 0.2

    policy = make_policy("router-only", CFG, router)
    assert policy.decide(q(p=None), edges()).mode == "cloud"
    assert policy.decide(q(p=0.9), edges()).mode == "progressive"
    assert asked == ["How can I sleep better?"]


def test_progressive_budgets() -> None:
    d = make_policy("router-only", CFG).decide(q(mode="progressive", max_points=4,
                                                 max_tokens=200), edges())
    assert d.max_points == 4
    assert d.point_tokens == 50  # 200 tokens shared by 4 points, under the 64 cap
    assert d.sketch_tokens >= 4 * d.words_per_point


def test_dynamic_shortens_the_sketch_when_the_cloud_is_busy() -> None:
    policy = make_policy("dynamic", CFG)
    idle = policy.decide(q(), edges())
    busy_cloud = ClusterState(CloudState(queue_depth=40, slots=8), edges().edges)
    busy = policy.decide(q(), busy_cloud)
    assert idle.mode == busy.mode == "progressive"
    assert busy.words_per_point < idle.words_per_point
    assert busy.sketch_tokens < idle.sketch_tokens
    assert "cloud busy" in busy.reason


def test_dynamic_ensemble_only_with_room_to_spare() -> None:
    policy = make_policy("dynamic", CFG)
    assert policy.decide(q(), edges(n=8, slots=16)).ensemble == CFG.max_ensemble
    assert policy.decide(q(), edges(n=1, slots=8)).ensemble == 1
    assert policy.decide(q(priority="batch"), edges(n=8, slots=16)).ensemble == 1


def test_dynamic_keeps_work_in_the_cloud_when_edges_are_full() -> None:
    d = make_policy("dynamic", CFG).decide(q(), edges(inflight=8))
    assert (d.mode, d.code) == ("cloud", "edges-busy")
    # the static router still sends it to the edges (their queues absorb it)
    assert make_policy("router-only", CFG).decide(q(), edges(inflight=8)).mode == "progressive"


def test_dynamic_sketches_uncertain_questions_only_to_relieve_a_busy_cloud() -> None:
    policy = make_policy("dynamic", CFG)
    fast = edges(rate=60.0).edges
    # p between the floor and the threshold, idle cloud: full answer
    idle = policy.decide(q(p=0.45), ClusterState(CloudState(), fast))
    assert (idle.mode, idle.code) == ("cloud", "uncertain")
    # all cloud slots taken, a short queue: the sketch's expected time (with a (1 - p) chance
    # of a full answer after it) beats waiting for the cloud
    busy = ClusterState(CloudState(queue_depth=9, slots=8), fast)
    d = policy.decide(q(p=0.45), busy)
    assert (d.mode, d.code) == ("progressive", "uncertain-suited")
    # below the floor: never
    assert policy.decide(q(p=0.3), busy).mode == "cloud"


def test_batch_yields_a_busy_cloud_and_interactive_passes_batch() -> None:
    policy = make_policy("dynamic", CFG)
    slow_edges = edges(rate=0.5)
    busy = CloudState(queue_depth=30, slots=8, batch_depth=25)
    batch = policy.decide(q(priority="batch"), ClusterState(busy, slow_edges.edges))
    assert batch.mode == "progressive" and "batch yields the cloud" in batch.reason
    # interactive waits only behind 5 requests, all running: no queue, the cloud is faster
    inter = policy.decide(q(), ClusterState(busy, slow_edges.edges))
    assert inter.mode == "cloud" and inter.code == "cloud-faster"


def test_length_model_sets_points_and_learns() -> None:
    lengths = LengthModel()
    policy = make_policy("dynamic", CFG, lengths=lengths)
    assert policy.decide(q(max_tokens=120), edges()).max_points == 3
    assert policy.decide(q(), edges()).max_points == 6
    for _ in range(50):  # answers to such questions turn out short
        lengths.observe("How can I sleep better?", 0.95, 80, 512)
    d = policy.decide(q(), edges())
    assert d.predicted_tokens < 120 and d.max_points < 6


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        make_policy("dynamic", CFG).decide(q(mode="fast"), edges())
    with pytest.raises(ValueError, match="unknown priority 'urgent'"):
        make_policy("dynamic", CFG).decide(q(priority="urgent"), edges())
    with pytest.raises(ValueError, match="unknown policy 'greedy'"):
        make_policy("greedy")


def test_bad_policy_config_names_value() -> None:
    with pytest.raises(ValueError, match="got 0"):
        PolicyConfig(default_max_points=0)
    with pytest.raises(ValueError, match="max_ensemble must be >= 1, got 0"):
        PolicyConfig(max_ensemble=0)


def test_keyword_rule_agrees_with_labels_on_question_set() -> None:
    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    agree = sum(classify(r["question"]).suits_sketch == r["suits_sketch"] for r in rows)
    assert len(rows) >= 60
    assert agree / len(rows) >= 0.9, f"router agrees on {agree}/{len(rows)}"


@pytest.mark.parametrize("mode", ["auto", "progressive"])
def test_ensemble_runs_whenever_edges_have_room(mode: str) -> None:
    """Explicit progressive requests too (the native endpoint's default): with free slots for
    every candidate of every point, each point gets max_ensemble candidates."""
    for name in ("dynamic", "always-progressive"):
        d = make_policy(name, CFG).decide(q(mode=mode), edges(n=2, slots=64))
        assert d.mode == "progressive" and d.ensemble == CFG.max_ensemble, (name, d)
    # room for two candidates per point only
    d = make_policy("dynamic", CFG).decide(q(mode=mode, max_points=4), edges(n=1, slots=8))
    assert d.ensemble == 2 and len(d.placement) == 4
    # no room to spare, a busy cloud or a batch request: one candidate
    assert make_policy("dynamic", CFG).decide(q(mode=mode), edges(n=1, slots=6)).ensemble == 1
    busy = ClusterState(CloudState(queue_depth=4, slots=4), edges(n=2, slots=64).edges)
    assert make_policy("dynamic", CFG).decide(q(mode=mode), busy).ensemble == 1
    assert make_policy("dynamic", CFG).decide(q(mode=mode, priority="batch"),
                                              edges(n=2, slots=64)).ensemble == 1
