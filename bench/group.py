"""`pice bench group`: one model as an edge group of stage processes on loopback, each pinned to
its own core with taskset, against the same components as one process on one core.

Reports tokens/s against sequences in flight for 1 stage (the whole model) and 2 stages (split by
the layer planner), the bubble fraction of each stage (1 - compute time / wall time), the peak RSS
of each stage against the single process, and the cost of one failover: the second stage killed
(-9) half-way through a run, a spare loading its range and every sequence replayed, against the
same run without the fault and against re-running the affected requests. Links are plain
loopback (no netem shaping here). Run it under the heavy lock: it loads the model 2-3 times."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pice.edge.group.procs import StageProc, configure
from pice.scheduler.layer_plan import Member, PlanConfig, plan_layers, shape_from_config
from pice.shared.config import DEFAULT_EDGE_MODEL


@dataclass
class GroupBenchConfig:
    model: str = DEFAULT_EDGE_MODEL
    inflight: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    prompt_tokens: int = 32
    decode_tokens: int = 32
    cores: tuple[str, str] = ("0", "1")
    failover_inflight: int = 4
    cache_dir: Path | None = None
    out_dir: Path = Path("bench-results")
    block_size: int = 16
    num_blocks: int = 256  # KV blocks per stage: 4096 tokens


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, min(vocab, 30000)) for _ in range(length)] for _ in range(n)]


def _run(head: StageProc, stages: list[StageProc], batch: list[list[int]], tokens: int,
         tag: str) -> dict[str, Any]:
    """Generate `tokens` per prompt (no EOS stop); wall time, tokens/s, per-stage busy share."""
    before = [s.stats() for s in stages]
    t0 = time.perf_counter()
    for i, p in enumerate(batch):
        head.send({"generate": {"id": f"{tag}-{i}", "prompt_ids": p, "max_tokens": tokens,
                                "ignore_eos": True}})
    done = head.results(len(batch))
    wall = time.perf_counter() - t0
    after = [s.stats() for s in stages]
    busy = [(a["busy_s"] - b["busy_s"]) / wall for a, b in zip(after, before, strict=True)]
    return {"inflight": len(batch), "wall_s": wall,
            "tokens_per_s": len(batch) * tokens / wall,
            "bubble": [max(0.0, 1.0 - x) for x in busy],
            "tokens": {k: v["tokens"] for k, v in done.items()}}


def _model_dir(cfg: GroupBenchConfig) -> Path:
    from pice.shared.models.resolve import resolve_model

    return Path(resolve_model(cfg.model, cfg.cache_dir).path)


def run_group_bench(cfg: GroupBenchConfig) -> dict[str, Any]:
    model = _model_dir(cfg)
    raw = json.loads((model / "config.json").read_text())
    shape = shape_from_config(raw)
    plan = plan_layers(shape, [Member("core0", 8 << 30, 1.0), Member("core1", 8 << 30, 1.0)],
                       PlanConfig(kv_tokens=cfg.num_blocks * cfg.block_size))
    ranges = [(s.start, s.end) for s in plan.stages]
    layers = shape.num_layers
    logs = cfg.out_dir / "group-logs"
    logs.mkdir(parents=True, exist_ok=True)
    kw = dict(num_blocks=cfg.num_blocks, block_size=cfg.block_size, max_model_len=4096)
    result: dict[str, Any] = {"config": {**asdict(cfg), "cache_dir": str(cfg.cache_dir),
                                         "out_dir": str(cfg.out_dir)},
                              "model_dir": str(model), "layers": layers, "plan": plan.describe(),
                              "ranges": ranges}
    batches = {n: _prompts(n, cfg.prompt_tokens, int(raw["vocab_size"]), n)
               for n in cfg.inflight}

    # 1 stage: the whole model in one process on one core
    solo = StageProc(logs, "solo", taskset=cfg.cores[0])
    try:
        configure([solo], model, [(0, layers)], epoch=1, **kw)
        _run(solo, [solo], batches[cfg.inflight[0]][:1], 4, "warm")
        result["one_stage"] = [_run(solo, [solo], batches[n], cfg.decode_tokens, f"s{n}")
                               for n in cfg.inflight]
        st = solo.stats()
        result["one_stage_rss_mb"], result["one_stage_anon_mb"] = st["peak_rss_mb"], \
            st["rss_anon_mb"]
    finally:
        solo.send({"exit": True})
        solo.kill()

    # 2 stages, one core each, plus a spare on the second core for the failover run
    stages = [StageProc(logs, "head", taskset=cfg.cores[0]),
              StageProc(logs, "second", taskset=cfg.cores[1])]
    spare = StageProc(logs, "spare", taskset=cfg.cores[1])
    try:
        configure(stages, model, ranges, epoch=1, **kw)
        _run(stages[0], stages, batches[cfg.inflight[0]][:1], 4, "warm")
        result["two_stages"] = [_run(stages[0], stages, batches[n], cfg.decode_tokens, f"t{n}")
                                for n in cfg.inflight]
        sts = [s.stats() for s in stages]
        result["two_stage_rss_mb"] = [x["peak_rss_mb"] for x in sts]
        result["two_stage_anon_mb"] = [x["rss_anon_mb"] for x in sts]
        result["failover"] = _failover(cfg, model, ranges, stages, spare, batches, kw,
                                       int(raw["vocab_size"]))
    finally:
        for s in [*stages, spare]:
            if s.proc.poll() is None:
                s.send({"exit": True})
            s.kill()
    _summarize(result, cfg)
    return result


def _failover(cfg: GroupBenchConfig, model: Path, ranges: list[tuple[int, int]],
              stages: list[StageProc], spare: StageProc, batches: dict[int, list[list[int]]],
              kw: dict[str, Any], vocab: int) -> dict[str, Any]:
    n = cfg.failover_inflight
    batch = batches.get(n) or _prompts(n, cfg.prompt_tokens, vocab, n)
    base = _run(stages[0], stages, batch, cfg.decode_tokens, "f-base")
    head = stages[0]
    t0 = time.perf_counter()
    for i, p in enumerate(batch):
        head.send({"generate": {"id": f"f-{i}", "prompt_ids": p, "max_tokens": cfg.decode_tokens,
                                "ignore_eos": True}})
    start_tokens = head.stats()["tokens"]
    while head.stats()["tokens"] - start_tokens < n * cfg.decode_tokens // 2:
        time.sleep(0.01)
    t_kill = time.perf_counter() - t0
    stages[1].kill()  # kill -9 mid-run
    t_detect = time.perf_counter()
    configure([head, spare], model, ranges, epoch=2, **kw)  # what the hub's re-plan sends
    replan_s = time.perf_counter() - t_detect
    done = head.results(n)
    wall = time.perf_counter() - t0
    same = all(done[f"f-{i}"]["tokens"] == base["tokens"][f"f-base-{i}"] for i in range(n))
    return {"inflight": n, "no_fault_wall_s": base["wall_s"], "fault_wall_s": wall,
            "killed_at_s": t_kill, "replan_and_load_s": replan_s,
            "failover_cost_s": wall - base["wall_s"],
            # restarting every affected request (all of them) from scratch on the new plan
            # instead: the work done before the kill is lost, the re-plan is paid all the same
            "rerun_affected_s": t_kill + replan_s,
            "tokens_identical": same,
            "replayed": sum(done[f"f-{i}"]["replays"] for i in range(n))}


def _summarize(r: dict[str, Any], cfg: GroupBenchConfig) -> None:
    one = {x["inflight"]: x["tokens_per_s"] for x in r["one_stage"]}
    two = {x["inflight"]: x["tokens_per_s"] for x in r["two_stages"]}
    r["speedup_two_vs_one"] = {n: two[n] / one[n] for n in one if n in two}
    r["rss_share_per_stage"] = [x / r["one_stage_rss_mb"] for x in r["two_stage_rss_mb"]]
    r["anon_share_per_stage"] = [x / r["one_stage_anon_mb"] for x in r["two_stage_anon_mb"]]
    r["targets"] = {
        "rss_per_stage_le_half_plus_10pct": all(s <= 0.6 for s in r["rss_share_per_stage"]),
        "anon_per_stage_le_half_plus_10pct": all(s <= 0.6 for s in r["anon_share_per_stage"]),
        "speedup_ge_1.7_at_2N": max((v for n, v in r["speedup_two_vs_one"].items() if n >= 4),
                                    default=0.0) >= 1.7,
        "failover_cheaper_than_rerun": r["failover"]["failover_cost_s"]
        < r["failover"]["rerun_affected_s"]}
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "group.json").write_text(json.dumps(r, indent=2))
    _plot(r, cfg.out_dir / "group.png")


def _plot(r: dict[str, Any], path: Path) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, label in (("one_stage", "1 stage, 1 core"), ("two_stages", "2 stages, 1 core each")):
        xs = [x["inflight"] for x in r[key]]
        a.plot(xs, [x["tokens_per_s"] for x in r[key]], marker="o", label=label)
    a.set_xlabel("sequences in flight")
    a.set_ylabel("tokens/s")
    a.set_title("throughput")
    a.legend()
    xs = [x["inflight"] for x in r["two_stages"]]
    for i in range(2):
        b.plot(xs, [x["bubble"][i] for x in r["two_stages"]], marker="o", label=f"stage {i + 1}")
    b.plot([x["inflight"] for x in r["one_stage"]], [x["bubble"][0] for x in r["one_stage"]],
           marker="x", linestyle="--", label="1 stage")
    b.set_xlabel("sequences in flight")
    b.set_ylabel("bubble fraction")
    b.set_title("idle share per stage")
    b.legend()
    f = r["failover"]
    names = ["1 process", "stage 1", "stage 2", "no fault", "kill -9 + replay", "rerun"]
    vals = [r["one_stage_rss_mb"], *r["two_stage_rss_mb"]]
    c.bar(names[:3], vals, color=["grey", "tab:blue", "tab:orange"])
    c.set_ylabel("peak RSS (MB)")
    c2 = c.twinx()
    c2.bar(names[3:], [f["no_fault_wall_s"], f["fault_wall_s"],
                       f["no_fault_wall_s"] + f["rerun_affected_s"]], color="tab:green",
           alpha=0.6)
    c2.set_ylabel("wall s (failover run)")
    c.set_title(f"RSS; failover cost {f['failover_cost_s']:.1f}s vs rerun "
                f"{f['rerun_affected_s']:.1f}s")
    c.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
