"""`pice bench sim`: the four policies in the discrete-event simulator against offered load
(latency mean/p99, throughput), the dynamic policy's decision time at 10,000 edges, and the wall
time of a large run. Writes JSON and a PNG plot.

The policies and the placement index are the real ones; router probabilities come from the
router's held-out (probability, label) pairs shipped in its weights file."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pice.scheduler.policy import POLICIES
from pice.scheduler.router import RouterWeights
from pice.scheduler.sim import SimConfig, simulate

STATIC = ("always-cloud", "always-progressive", "router-only")


@dataclass
class SimBenchConfig:
    loads: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 1.5, 2.0, 3.0])
    requests: int = 2000  # per policy and load
    edges: int = 100
    cloud_replicas: int = 5
    decision_edges: int = 10_000  # fleet size for the decision-time measurement
    decision_requests: int = 20_000
    big_requests: int = 0  # the large run (dynamic, load 1, decision_edges); 0 → skipped
    seed: int = 0
    out_dir: Path = Path("bench-results")

    def __post_init__(self) -> None:
        if not self.loads or any(x <= 0 for x in self.loads):
            raise ValueError(f"loads must be positive, got {self.loads}")
        if self.requests < 1 or self.decision_requests < 1 or self.big_requests < 0:
            raise ValueError("request counts must be positive")


def _mix() -> tuple[tuple[float, bool], ...]:
    return tuple((float(p), bool(y)) for p, y in RouterWeights.load().report["heldout_mix"])


def _scaled(base: SimConfig, edges: int, requests: int) -> SimConfig:
    """The same fleet shape (edges per cloud replica) at another size."""
    replicas = max(1, round(base.cloud_replicas * edges / base.edges))
    return replace(base, edges=edges, cloud_replicas=replicas, requests=requests, load=1.0)


def _verdict(rows: list[dict[str, Any]], loads: list[float]) -> dict[str, Any]:
    """Dynamic vs the best static policy at each load, on mean latency (lower is better)."""
    per_load = []
    for load in loads:
        at = {r["policy"]: r for r in rows if r["load"] == load}
        best = min(STATIC, key=lambda p: at[p]["latency_mean_s"])
        dyn = at["dynamic"]["latency_mean_s"]
        per_load.append({
            "load": load, "best_static": best,
            "speedup_vs_best_static": at[best]["latency_mean_s"] / dyn,
            "p99_ratio_vs_best_static": at[best]["latency_p99_s"] / at["dynamic"]["latency_p99_s"],
            **{f"speedup_vs_{p}": at[p]["latency_mean_s"] / dyn for p in STATIC}})
    return {
        "per_load": per_load,
        "dynamic_at_least_best_static_every_load": all(
            x["speedup_vs_best_static"] >= 1.0 for x in per_load),
        "dynamic_better_than_each_somewhere": {
            p: any(x[f"speedup_vs_{p}"] > 1.0 for x in per_load) for p in STATIC},
    }


def run_sim_bench(cfg: SimBenchConfig) -> dict[str, Any]:
    base = SimConfig(requests=cfg.requests, edges=cfg.edges, cloud_replicas=cfg.cloud_replicas,
                     seed=cfg.seed, mix=_mix())
    rows: list[dict[str, Any]] = []
    runs = [(load, p) for load in cfg.loads for p in POLICIES]
    for load, policy in tqdm(runs, desc="sim: policy x load", unit="run"):
        rows.append(simulate(replace(base, load=load), policy))
    decision_cfg = _scaled(base, cfg.decision_edges, cfg.decision_requests)
    decision = simulate(decision_cfg, "dynamic")
    summary: dict[str, Any] = {
        "bench": "sim",
        "config": {**asdict(cfg), "out_dir": str(cfg.out_dir)},
        "sim": {k: v for k, v in asdict(base).items() if k not in ("mix", "load", "requests")},
        "mix_size": len(base.mix),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "rows": rows,
        "decision_time": {"edges": cfg.decision_edges, "requests": decision["requests"],
                          "p50_ms": decision["decision_p50_ms"],
                          "p99_ms": decision["decision_p99_ms"],
                          "target_p99_ms": 1.0,
                          "holds": decision["decision_p99_ms"] <= 1.0},
        "verdict": _verdict(rows, cfg.loads),
    }
    if cfg.big_requests:
        big_cfg = _scaled(base, cfg.decision_edges, cfg.big_requests)
        t0 = time.perf_counter()
        big = simulate(big_cfg, "dynamic")
        wall = time.perf_counter() - t0
        summary["large_run"] = {"edges": big_cfg.edges, "cloud_replicas": big_cfg.cloud_replicas,
                                "requests": big["requests"], "wall_s": wall,
                                "target_s": 600.0, "holds": wall <= 600.0, "result": big}
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "sim.json").write_text(json.dumps(summary, indent=1) + "\n")
    _plot(rows, cfg.loads, cfg.out_dir / "sim.png")
    return summary


def _plot(rows: list[dict[str, Any]], loads: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for policy in POLICIES:
        sel = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["load"])
        x = [r["load"] for r in sel]
        axes[0].plot(x, [r["latency_mean_s"] for r in sel], marker="o", label=policy)
        axes[1].plot(x, [r["latency_p99_s"] for r in sel], marker="o", label=policy)
        axes[2].plot(x, [r["throughput_rps"] for r in sel], marker="o", label=policy)
    for ax, title in zip(axes, ("mean latency (s)", "p99 latency (s)", "throughput (req/s)"),
                         strict=True):
        ax.set_xlabel("offered load (x full-cloud capacity)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.suptitle("pice scheduler in the simulator (same policy and placement code)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
