import json
from pathlib import Path

import pytest

from pice.scheduler.policy import PolicyConfig, QueryFeatures, decide
from pice.scheduler.suitability import classify

CFG = PolicyConfig(default_max_points=6, words_per_point=5, point_tokens=64)
QUESTIONS = Path(__file__).resolve().parents[2] / "bench" / "questions.jsonl"


def q(text: str = "How can I sleep better?", mode: str = "auto", max_tokens: int = 512,
      max_points: int | None = None, edges: int = 1, prompt_tokens: int = 0,
      max_context: int = 0) -> QueryFeatures:
    return QueryFeatures(text, mode, max_tokens, max_points, edges, prompt_tokens, max_context)


@pytest.mark.parametrize(("features", "mode", "reason_part"), [
    (q(mode="cloud"), "cloud", "requested"),
    (q(mode="progressive"), "progressive", "requested"),
    (q(mode="progressive", edges=0), "cloud", "no edge"),
    (q(), "progressive", "suits"),
    (q("Solve 3x + 5 = 20 for x."), "cloud", "math"),
    (q("Write a Python function that reverses a list."), "cloud", "code"),
    (q("Write a short poem about autumn."), "cloud", "creative"),
    (q("Estimate how many piano tuners work in Chicago."), "cloud", "fermi"),
    (q(max_tokens=16), "cloud", "too small"),
    (q(mode="progressive", prompt_tokens=3900, max_context=4096), "cloud", "prompt too long"),
    (q(mode="progressive", prompt_tokens=300, max_context=4096), "progressive", "requested"),
])
def test_decide(features: QueryFeatures, mode: str, reason_part: str) -> None:
    d = decide(features, CFG)
    assert d.mode == mode
    assert reason_part in d.reason


def test_progressive_budgets() -> None:
    d = decide(q(mode="progressive", max_points=4, max_tokens=200), CFG)
    assert d.max_points == 4
    assert d.point_tokens == 50  # 200 tokens shared by 4 points, under the 64 cap
    assert d.sketch_tokens >= 4 * d.words_per_point
    assert decide(q(mode="progressive"), CFG).max_points == 6


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        decide(q(mode="fast"), CFG)


def test_bad_policy_config_names_value() -> None:
    with pytest.raises(ValueError, match="got 0"):
        PolicyConfig(default_max_points=0)


def test_router_agrees_with_labels_on_question_set() -> None:
    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    agree = sum(classify(r["question"]).suits_sketch == r["suits_sketch"] for r in rows)
    assert len(rows) >= 60
    assert agree / len(rows) >= 0.9, f"router agrees on {agree}/{len(rows)}"
