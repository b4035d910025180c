"""The simulator runs the real policies and placement; the bench writes JSON and PNG."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pice.bench.sim import SimBenchConfig, run_sim_bench
from pice.scheduler.length import LengthModel
from pice.scheduler.policy import POLICIES, PolicyConfig, make_policy
from pice.scheduler.sim import SimConfig, Simulation, simulate

MIX = ((0.97, True), (0.9, True), (0.6, False), (0.4, True), (0.1, False), (0.02, False))
TINY = SimConfig(requests=400, edges=20, cloud_replicas=2, mix=MIX, edge_mtbf_s=300.0,
                 edge_down_s=30.0, flaky_share=0.2)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_completes_despite_edge_crashes(policy: str) -> None:
    r = simulate(replace(TINY, load=1.0), policy)
    assert r["requests"] == TINY.requests
    assert r["latency_mean_s"] > 0 and r["latency_p99_s"] >= r["latency_mean_s"] * 0.5
    if policy == "always-cloud":
        assert r["progressive_share"] == 0.0 and r["redo_share"] == 0.0
    if policy == "always-progressive":  # sketches of unsuited questions are answered again
        assert r["progressive_share"] == 1.0 and r["redo_share"] > 0.0


def test_the_simulation_calls_the_policy_it_is_given() -> None:
    calls = []
    policy = make_policy("dynamic", PolicyConfig(max_ensemble=1), lengths=LengthModel())
    inner = policy.decide

    def spy(q, cluster):  # type: ignore[no-untyped-def]
        calls.append(cluster.index is not None)
        return inner(q, cluster)

    policy.decide = spy  # type: ignore[method-assign]
    Simulation(replace(TINY, requests=50), policy).run()
    assert len(calls) == 50 and all(calls)


def test_same_seed_same_result_and_overload_hurts_always_cloud() -> None:
    a = simulate(replace(TINY, load=0.5), "router-only")
    b = simulate(replace(TINY, load=0.5), "router-only")
    assert {k: v for k, v in a.items() if "ms" not in k and k != "wall_s"} == \
        {k: v for k, v in b.items() if "ms" not in k and k != "wall_s"}
    low = simulate(replace(TINY, load=0.3), "always-cloud")
    high = simulate(replace(TINY, load=3.0), "always-cloud")
    assert high["latency_mean_s"] > 2 * low["latency_mean_s"]


def test_bad_sim_config() -> None:
    with pytest.raises(ValueError, match="edges must be >= 1, got 0"):
        SimConfig(edges=0)


def test_bench_writes_json_and_png(tmp_path: Path) -> None:
    cfg = SimBenchConfig(loads=[0.5, 2.0], requests=200, edges=20, cloud_replicas=2,
                         decision_edges=200, decision_requests=200, big_requests=300,
                         out_dir=tmp_path)
    summary = run_sim_bench(cfg)
    data = json.loads((tmp_path / "sim.json").read_text())
    assert (tmp_path / "sim.png").stat().st_size > 0
    assert len(data["rows"]) == 2 * len(POLICIES)
    assert {r["policy"] for r in data["rows"]} == set(POLICIES)
    assert data["decision_time"]["edges"] == 200 and data["decision_time"]["p99_ms"] > 0
    assert data["large_run"]["requests"] == 300
    assert set(summary["verdict"]["dynamic_better_than_each_somewhere"]) == {
        "always-cloud", "always-progressive", "router-only"}
