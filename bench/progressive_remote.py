"""`pice bench progressive --edges remote`: the same progressive questions expanded by an
in-process edge worker and by `pice edge` agent processes over loopback WebSockets, side by side
in one run on one cloud model (each question runs both ways, alternating which goes first). Then
a second agent joins and, on some questions, an agent is killed (-9) part-way through its batch:
its unfinished points move to the other agent; the cost is that request's extra latency over
the same question with both agents alive. Writes progressive_remote.json and .png."""

from __future__ import annotations

import asyncio
import copy
import ctypes
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import uvicorn
from tqdm import tqdm

from pice.bench.progressive import load_questions
from pice.cloud.api.app import create_app
from pice.cloud.edge_hub import EdgeHub
from pice.cloud.edge_pool import EdgePool
from pice.cloud.edge_tokens import EdgeTokenStore
from pice.cloud.events import DoneEvent, SectionEvent
from pice.cloud.metrics import Metrics
from pice.cloud.pipeline import AnswerRequest, Pipeline
from pice.runtime import build_pipeline
from pice.shared.config import ServeSettings

if TYPE_CHECKING:
    from pice.bench.progressive import BenchConfig

T = TypeVar("T")
REGISTER_S = 600.0  # an agent loads torch and the edge model before it registers
KV_CACHE_GB = 0.25  # per model, cloud and agents alike


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the bench process dies (even by SIGKILL)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG (Linux)


@dataclass
class Run:
    id: str
    edges: str  # "in-process" | "agents" | "agents-2" | "agents-2-kill"
    latency: float  # request start → done (s)
    expansion_s: float  # sketch ready → every point in
    points: int
    workers: list[str]  # who wrote each section
    reason: str


class Bench:
    """A live server (its own event loop thread) whose pipeline expands through agents, plus an
    in-process twin of the same pipeline; every request runs on the server's loop."""

    def __init__(self, cfg: BenchConfig, tmp: Path) -> None:
        self.cfg, self.tmp = cfg, tmp
        self.store = EdgeTokenStore(tmp / "tokens.json")
        # guard off: every section is written by the edge path being measured, not repaired
        # by the cloud; a small KV pool per model keeps the cloud process and two agents
        # within a small machine's memory (these prompts need a few thousand tokens)
        settings = ServeSettings(cloud_model=cfg.cloud_model, edge_models=[cfg.edge_model],
                                 cache_dir=cfg.cache_dir, threads=cfg.threads, port=0,
                                 default_max_tokens=cfg.max_tokens, backend=cfg.backend,
                                 quantization=cfg.quantization, guard=False,
                                 kv_cache_gb=KV_CACHE_GB, edge_tokens_file=tmp / "tokens.json")
        self.settings = settings
        built = build_pipeline(settings, Metrics())
        assert isinstance(built.edges.hub, EdgeHub)
        self.hub = built.edges.hub
        self.local = copy.copy(built)  # the same pipeline, two edge pools
        self.local.edges = EdgePool(built.edges.workers)
        self.remote = copy.copy(built)
        self.remote.edges = EdgePool([], hub=self.hub)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        app = create_app(settings, lambda s, m: self.remote)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                    log_level="warning"))
        asyncio.run_coroutine_threadsafe(self.server.serve(), self.loop)
        while not self.server.started:
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}"
        self.agents: dict[str, subprocess.Popen[bytes]] = {}

    def on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def start_agent(self, edge_id: str) -> None:
        _, token = self.store.create(edge_id)
        cmd = [sys.executable, "-m", "pice", "edge", "--cloud", self.url, "--token", token,
               "--edge-id", edge_id, "--model", self.cfg.edge_model,
               "--threads", str(torch.get_num_threads()), "--backend", self.cfg.backend]
        if self.cfg.cache_dir:
            cmd += ["--cache-dir", str(self.cfg.cache_dir)]
        if self.cfg.quantization:
            cmd += ["--quantization", self.cfg.quantization]
        env = {**os.environ, "PICE_KV_CACHE_GB": str(KV_CACHE_GB)}
        with (self.tmp / f"{edge_id}.log").open("ab") as log:
            self.agents[edge_id] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                    env=env, preexec_fn=die_with_parent)
        deadline = time.monotonic() + REGISTER_S
        while not any(e.edge_id == edge_id and e.state().healthy for e in self.hub.edges()):
            if self.agents[edge_id].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent {edge_id} did not register; see "
                                   f"{self.tmp / f'{edge_id}.log'}")
            time.sleep(0.1)

    def ask(self, pipeline: Pipeline, q: dict[str, Any], edges: str) -> Run:
        req = AnswerRequest(request_id=f"bench-{q['id']}-{edges}-{time.monotonic_ns()}",
                            messages=[{"role": "user", "content": q["question"]}],
                            max_tokens=self.cfg.max_tokens, mode="progressive",
                            max_points=self.cfg.max_points, endpoint="bench")

        async def run() -> tuple[DoneEvent, list[str]]:
            done, workers = None, []
            async for ev in pipeline.run(req):
                if isinstance(ev, SectionEvent):
                    workers.append(ev.worker)
                elif isinstance(ev, DoneEvent):
                    done = ev
            assert done is not None
            return done, workers

        done, workers = self.on_loop(run())
        return Run(q["id"], edges, done.timings["total"], done.timings.get("expansion", 0.0),
                   len(done.sketch), workers, done.reason)

    def ask_and_kill(self, q: dict[str, Any]) -> tuple[Run, str | None]:
        """Ask; kill (-9) the first agent seen holding a batch once it has delivered part of it
        (mid-expansion: some points done, the rest lost and re-dispatched). The killed agent's
        id, or None when no batch was seen part-way."""
        victim: list[str] = []
        stop = threading.Event()

        def killer() -> None:
            held: dict[str, int] = {}  # edge id → most points it held at once
            while not stop.is_set():
                for e in self.hub.edges():
                    n = e.gate.inflight
                    if 0 < n < held.get(e.edge_id, 0):
                        self.agents[e.edge_id].send_signal(signal.SIGKILL)
                        victim.append(e.edge_id)
                        return
                    held[e.edge_id] = max(n, held.get(e.edge_id, 0))
                time.sleep(0.002)

        watcher = threading.Thread(target=killer)
        watcher.start()
        try:
            run = self.ask(self.remote, q, "agents-2-kill")
        finally:
            stop.set()
            watcher.join()
        return run, victim[0] if victim else None

    def close(self) -> None:
        for proc in self.agents.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        self.server.should_exit = True


def run_remote_bench(cfg: BenchConfig) -> dict[str, Any]:
    questions = [q for q in load_questions(cfg.categories, 0) if q["suits_sketch"]]
    questions = questions[: cfg.limit or 6]
    kills = questions[: max(1, len(questions) // 2)]
    with tempfile.TemporaryDirectory(prefix="pice-bench-remote-") as tmp:
        bench = Bench(cfg, Path(tmp))
        try:
            bench.start_agent("bench-edge-0")
            warm = questions[0]  # first requests pay one-time costs; not measured
            bench.ask(bench.local, warm, "warm-up")
            bench.ask(bench.remote, warm, "warm-up")
            runs: list[Run] = []
            bar = tqdm(total=2 * len(questions) + 2 * len(kills), desc="bench progressive "
                       "--edges remote", unit="request")
            for i, q in enumerate(questions):
                pair = [(bench.local, "in-process"), (bench.remote, "agents")]
                for pipeline, name in pair if i % 2 == 0 else pair[::-1]:
                    runs.append(bench.ask(pipeline, q, name))
                    bar.update()
            bench.start_agent("bench-edge-1")
            victims = []
            for q in kills:
                runs.append(bench.ask(bench.remote, q, "agents-2"))
                bar.update()
                run, victim = bench.ask_and_kill(q)
                runs.append(run)
                bar.update()
                victims.append(victim)
                if victim is not None:
                    bench.agents[victim].wait(60)
                    bench.start_agent(victim)
            bar.close()
        finally:
            bench.close()
    summary = _summary(runs)
    result = {
        "bench": "progressive --edges remote",
        "config": {**asdict(cfg), "out_dir": str(cfg.out_dir),
                   "cache_dir": str(cfg.cache_dir) if cfg.cache_dir else None},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "summary": summary, "ratios": summary["ratios"], "killed": victims,
        "runs": [asdict(r) for r in runs],
    }
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "progressive_remote.json").write_text(json.dumps(result, indent=2))
    _plot(runs, summary, cfg.out_dir / "progressive_remote.png")
    return result


def _summary(runs: list[Run]) -> dict[str, Any]:
    def of(edges: str) -> list[Run]:
        return [r for r in runs if r.edges == edges]

    def agg(sel: list[Run]) -> dict[str, float]:
        return {"requests": len(sel),
                "latency_mean_s": statistics.fmean(r.latency for r in sel),
                "expansion_mean_s": statistics.fmean(r.expansion_s for r in sel),
                "cloud_sections": sum(w == "cloud" for r in sel for w in r.workers)}

    out: dict[str, Any] = {e: agg(of(e)) for e in ("in-process", "agents", "agents-2",
                                                      "agents-2-kill")}
    local, remote = out["in-process"], out["agents"]
    base, killed = out["agents-2"], out["agents-2-kill"]
    per_q = [r.latency / lo.latency for lo, r in zip(of("in-process"), of("agents"), strict=True)]
    out["ratios"] = {
        "agent_over_inprocess_latency": remote["latency_mean_s"] / local["latency_mean_s"],
        "agent_over_inprocess_latency_median_per_question": statistics.median(per_q),
        "agent_over_inprocess_expansion": remote["expansion_mean_s"]
        / local["expansion_mean_s"],
        "kill_latency_ratio": killed["latency_mean_s"] / base["latency_mean_s"],
        "kill_extra_latency_s": killed["latency_mean_s"] - base["latency_mean_s"],
    }
    return out


def _plot(runs: list[Run], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2, 1]})
    ids = [r.id for r in runs if r.edges == "in-process"]
    x = range(len(ids))
    for off, edges, label in ((-0.2, "in-process", "in-process worker (baseline)"),
                              (0.2, "agents", "1 agent over loopback WebSocket")):
        ax1.bar([i + off for i in x], [r.latency for r in runs if r.edges == edges], 0.4,
                label=label)
    ax1.set_xticks(list(x), ids, rotation=60, fontsize=7)
    ax1.set_ylabel("latency per request (s)")
    ax1.set_title(f"agent / in-process: "
                  f"{summary['ratios']['agent_over_inprocess_latency']:.3f}x mean latency")
    ax1.legend()
    names = ["agents-2", "agents-2-kill"]
    ax2.bar(["2 agents", "2 agents, one\nkilled mid-run"],
            [summary[n]["latency_mean_s"] for n in names], color=["tab:green", "tab:red"])
    ax2.set_ylabel("mean latency (s)")
    ax2.set_title(f"kill -9 cost: {summary['ratios']['kill_extra_latency_s']:+.2f} s")
    fig.suptitle("pice bench progressive --edges remote")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
