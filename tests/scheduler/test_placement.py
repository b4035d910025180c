import random

import pytest

from pice.scheduler.placement import EdgeIndex, PlacementConfig
from pice.scheduler.state import EdgeState


def edge(eid: str, slots: int = 4, inflight: int = 0, rate: float = 16.0, rtt: float = 0.02,
         models: tuple[str, ...] = ("m",), adapters: frozenset[str] = frozenset(),
         healthy: bool = True, failure_rate: float = 0.0) -> EdgeState:
    return EdgeState(eid, models, slots, inflight, rate, rtt, adapters, healthy, failure_rate)


def test_fast_near_edges_first_and_slots_respected() -> None:
    index = EdgeIndex.of([edge("slow", rate=4.0), edge("fast", rate=40.0, slots=2),
                          edge("far", rate=40.0, rtt=2.0)])
    placed, worst = index.place(5)
    assert placed[:2] == ("fast", "fast")  # two free slots, then the next best
    assert placed.count("fast") == 2 and len(placed) == 5
    assert worst > 0


def test_failing_and_down_edges_get_less_work() -> None:
    index = EdgeIndex.of([edge("flaky", failure_rate=0.5, slots=8), edge("ok", slots=8),
                          edge("down", healthy=False, slots=8)])
    placed, _ = index.place(3)
    assert "down" not in placed
    assert placed.count("ok") > placed.count("flaky")


def test_model_filter_and_adapter_residency() -> None:
    index = EdgeIndex.of([edge("a", models=("m",)), edge("b", models=("other",)),
                          edge("c", models=("m",), rate=14.0, adapters=frozenset({"law"}))])
    assert set(index.place(4, model="other")[0]) == {"b"}
    # c is slower, but it holds the adapter: loading it elsewhere costs more
    assert index.place(1, model="m", adapter="law")[0] == ("c",)
    assert index.place(1, model="m")[0] == ("a",)
    assert index.place(1, model="missing")[0] == ()


def test_full_edges_leave_points_unplaced_and_take_updates_the_index() -> None:
    index = EdgeIndex.of([edge("a", slots=2)])
    assert index.free_slots == 2
    index.take("a", 2)
    assert index.free_slots == 0 and index.place(1)[0] == ()
    index.take("a", -1)
    assert index.place(2)[0] == ("a",)
    index.remove("a")
    assert index.place(1)[0] == () and index.healthy == 0


def test_ensemble_needs_room_on_one_edge() -> None:
    index = EdgeIndex.of([edge("small", slots=2, rate=50.0), edge("big", slots=6)])
    assert index.place(2, need=3)[0] == ("big", "big")


def test_matches_a_full_scan_on_random_fleets() -> None:
    rng = random.Random(7)
    cfg = PlacementConfig()
    for trial in range(30):
        fleet = [edge(f"e{i}", slots=rng.randint(1, 4), inflight=rng.randint(0, 3),
                      rate=rng.uniform(2, 40), rtt=rng.uniform(0, 0.5),
                      failure_rate=rng.choice([0.0, 0.0, 0.2]))
                 for i in range(rng.randint(1, 60))]
        index = EdgeIndex.of(fleet, cfg)
        for e in rng.sample(fleet, k=len(fleet) // 3):  # churn: stale heap entries
            index.take(e.edge_id, rng.choice([-1, 1]))
        placed, _ = index.place(1)
        live = [e for e in index.edges.values() if e.free > 0]
        if not live:
            assert placed == ()
            continue
        best = min(index.cost(e) for e in live)
        assert index.cost(index.edges[placed[0]]) == pytest.approx(best), trial


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        PlacementConfig(point_tokens=0)
