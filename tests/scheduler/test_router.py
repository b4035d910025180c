"""The shipped suitability router: JSON weights, held-out scores, calibration."""

import json
from pathlib import Path

import numpy as np
import pytest

from pice.scheduler.router import RouterWeights, SuitabilityRouter
from pice.scheduler.train_router import load_rows, scores, split


@pytest.fixture(scope="module")
def router() -> SuitabilityRouter:
    return SuitabilityRouter()


def test_data_set_is_large_balanced_and_labeled_by_category() -> None:
    rows = load_rows()
    assert len(rows) >= 300
    cats: dict[str, set[bool]] = {}
    for r in rows:
        cats.setdefault(r["category"], set()).add(r["suits_sketch"])
    assert len(cats) >= 10 and all(len(labels) == 1 for labels in cats.values())
    positive = sum(r["suits_sketch"] for r in rows) / len(rows)
    assert 0.4 <= positive <= 0.6


def test_split_is_fixed_and_disjoint() -> None:
    rows = load_rows()
    a, b = split(rows), split(rows)
    assert [r["id"] for r in a["test"]] == [r["id"] for r in b["test"]]
    ids = [{r["id"] for r in part} for part in a.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


def test_shipped_weights_score_on_the_held_out_split(router: SuitabilityRouter) -> None:
    test = split(load_rows())["test"]
    p = router.probability([r["question"] for r in test])
    y = np.array([r["suits_sketch"] for r in test], dtype=float)
    s = scores(y, p)
    assert s["accuracy"] >= 0.9 and s["f1"] >= 0.9, s
    assert s["brier"] <= 0.1, s
    assert ((p >= 0) & (p <= 1)).all()


def test_clear_cases(router: SuitabilityRouter) -> None:
    p = router.probability(["What are the pros and cons of working from home?",
                            "Write a Python function that sorts a list of tuples.",
                            "What is the capital of Peru?"])
    assert p[0] > 0.5 > max(p[1], p[2])


def test_weights_round_trip_as_json(tmp_path: Path) -> None:
    w = RouterWeights.load()
    assert len(w.coef) == 384 and w.report["test"]["n"] > 0
    w.save(tmp_path / "w.json")
    assert RouterWeights.load(tmp_path / "w.json") == w
    raw = json.loads((tmp_path / "w.json").read_text())
    raw["threshold"] = 1.5
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\), got 1\.5"):
        RouterWeights.load(tmp_path / "bad.json")
