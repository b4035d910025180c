"""Judge validation: the corruptions are what they say, and the report has every figure."""

from __future__ import annotations

from pathlib import Path

from pice.bench.judge import CORRUPTIONS, corrupt, validate
from pice.cloud.garbage import problem
from pice.shared.hf_backend import HFGenerator

FULL = ("Good sleep comes from habits.\n\n"
        "1. Keep a fixed schedule: Go to bed and get up at the same time every day.\n"
        "2. Make the room dark: Curtains and no screens help the body wind down.\n"
        "3. Avoid late caffeine: Coffee after noon keeps many people awake.\n"
        "4. Move every day: Exercise deepens sleep, but not right before bed.")


def test_corruptions() -> None:
    out = corrupt(FULL)
    assert set(out) == set(CORRUPTIONS)
    assert out["truncated"].endswith(" and") and len(out["truncated"]) < len(FULL)
    assert sorted(out["shuffled"].split()) == sorted(FULL.split()) and out["shuffled"] != FULL
    assert out["point removed"].count("\n") == FULL.count("\n") - 1
    last = out["echoed"].splitlines()[-1]
    assert last.startswith("4. Move every day: Keep a fixed schedule 2. Make the room dark")
    body = last.split(": ", 1)[1]
    assert problem(body, "Move every day", ["Keep a fixed schedule", "Make the room dark",
                                            "Avoid late caffeine"]) == "echo"
    assert set(corrupt("One sentence only.")) == {"truncated", "shuffled"}


def test_validate_reports_both_judges(tiny_model_dir: Path) -> None:
    gen = HFGenerator(str(tiny_model_dir), max_context=1024)
    report = validate(gen, [("How can I sleep better?", FULL)])
    assert report["pairs"] == 4 and len(report["rows"]) == 4
    for judge in ("pairwise", "rubric"):
        assert 0 <= report[judge]["correct"] <= 1
        assert set(report[judge]["by_corruption"]) == set(CORRUPTIONS)
    assert 0 <= report["pairwise"]["position_bias_first_wins"] <= 1
    assert all(1 <= r["score_full"] <= 9 for r in report["rows"])
    assert report["trusted"] in (None, "pairwise", "rubric")
