import pytest

from pice.scheduler.length import LengthConfig, LengthModel


def test_prior_hints_and_cap() -> None:
    m = LengthModel(LengthConfig(prior_tokens=200))
    assert m.predict("How can I sleep better?", 0.9, 512) == 200
    assert m.predict("Briefly, how can I sleep better?", 0.9, 512) == 80
    assert m.predict("Explain in detail how sleep works", 0.9, 512) == 300
    assert m.predict("How can I sleep better?", 0.9, 64) == 64


def test_learns_per_bucket_and_truncation_only_raises() -> None:
    m = LengthModel(LengthConfig(prior_tokens=200))
    for _ in range(40):
        m.observe("How can I sleep better?", 0.9, 100, 512)
    assert m.predict("How can I sleep better?", 0.9, 512) < 120
    assert m.predict("Solve 3x + 5 = 20 for x.", 0.1, 512) == 200  # other bucket untouched
    before = m.predict("How can I sleep better?", 0.9, 512)
    m.observe("How can I sleep better?", 0.9, 64, 64)  # cut at the cap: says "longer than 64"
    assert m.predict("How can I sleep better?", 0.9, 512) == before


def test_sketch_points() -> None:
    m = LengthModel()
    assert m.sketch_points(400, 6) == 6
    assert m.sketch_points(60, 6) == 3
    assert m.sketch_points(60, 2) == 2


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="positive"):
        LengthConfig(prior_tokens=0)
