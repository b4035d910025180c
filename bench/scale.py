"""`pice bench scale`: one request mix (cloud answers, fixed concurrency) through plain uvicorn
(`pice serve`) and through Ray Serve (`pice serve --ray`) with 1 and 2 cloud-model replicas, each
a real process on loopback; Serve's overhead is its latency over uvicorn's at p50 and p99. Then
the `openai` cloud backend: the same mix sent straight to an upstream `pice serve` and through a
second pice whose cloud model is that upstream (rounds alternate). Writes scale.json and .png."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from pice.bench.progressive import load_questions
from pice.bench.progressive_remote import die_with_parent

READY_S = 900.0  # a CPU box loading models for several processes at once


@dataclass
class ScaleConfig:
    model: str = "gemma-3-270m"  # cloud model of every system (small: the bench fits a laptop)
    requests: int = 24  # measured requests per system (after warmup)
    concurrency: int = 4
    max_tokens: int = 32
    warmup: int = 4
    threads: int = 1  # torch threads per model process (each Ray replica gets its own)
    cache_dir: Path | None = None
    out_dir: Path = Path("bench-results")
    systems: list[str] = field(default_factory=lambda: ["uvicorn", "ray-1", "ray-2", "openai"])


class Server:
    """One `pice serve` process (its own session: stopping it stops its Ray cluster too)."""

    def __init__(self, name: str, port: int, args: list[str], env: dict[str, str],
                 log_dir: Path) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "pice", "serve", "--port", str(port), *args]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **env}, start_new_session=True,
                                         preexec_fn=die_with_parent)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready in {READY_S}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ray shuts its cluster down on the way out
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_mix(url: str, questions: list[str], cfg: ScaleConfig,
            body_extra: dict[str, Any] | None = None, label: str = "") -> list[float]:
    """Each question once, `concurrency` at a time; seconds per request (client side)."""
    def one(q: str) -> float:
        body = {"messages": [{"role": "user", "content": q}], "max_tokens": cfg.max_tokens,
                **(body_extra or {"pice": {"mode": "cloud"}})}
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0

    with ThreadPoolExecutor(cfg.concurrency) as pool:
        return list(tqdm(pool.map(one, questions), total=len(questions), desc=label,
                         leave=False))


def summary(lat: list[float], wall: float | None = None) -> dict[str, float]:
    q = statistics.quantiles(lat, n=100, method="inclusive")
    out = {"n": len(lat), "p50_s": statistics.median(lat), "p90_s": q[89], "p99_s": q[98],
           "mean_s": statistics.fmean(lat)}
    if wall:
        out["requests_per_s"] = len(lat) / wall
    return out


def _common(cfg: ScaleConfig) -> list[str]:
    args = ["--cloud-model", cfg.model, "--edge-model", cfg.model, "--threads", str(cfg.threads)]
    return args + (["--cache-dir", str(cfg.cache_dir)] if cfg.cache_dir else [])


def measure_system(name: str, cfg: ScaleConfig, questions: list[str],
                   log_dir: Path) -> dict[str, Any]:
    env = {"PICE_GUARD": "false"}
    args = _common(cfg)
    if name.startswith("ray-"):
        replicas = name.split("-")[1]
        args.append("--ray")
        env.update({"PICE_RAY_CLOUD_MIN_REPLICAS": replicas,
                    "PICE_RAY_CLOUD_MAX_REPLICAS": replicas,
                    "PICE_RAY_GATEWAY_MIN_REPLICAS": "1", "PICE_RAY_GATEWAY_MAX_REPLICAS": "1",
                    "PICE_RAY_CLOUD_NUM_CPUS": "0.5", "PICE_RAY_GATEWAY_NUM_CPUS": "0.5",
                    "PICE_RAY_NUM_CPUS": "4"})
    server = Server(name, free_port(), args, env, log_dir)
    try:
        server.wait_ready()
        run_mix(server.url, questions[:cfg.warmup], cfg, label=f"{name} warmup")
        t0 = time.perf_counter()
        lat = run_mix(server.url, questions, cfg, label=name)
        return {"system": name, **summary(lat, time.perf_counter() - t0), "latencies_s": lat}
    finally:
        server.stop()


def measure_openai(cfg: ScaleConfig, questions: list[str], log_dir: Path) -> dict[str, Any]:
    """Upstream `pice serve`; downstream pice on the openai backend; alternating rounds."""
    up = Server("openai-upstream", free_port(), _common(cfg), {"PICE_GUARD": "false"}, log_dir)
    down = None
    try:
        up.wait_ready()
        down = Server("openai-downstream", free_port(), [*_common(cfg), "--cloud-backend",
                                                            "openai"],
                      {"PICE_GUARD": "false", "PICE_OPENAI_BASE_URL": f"{up.url}/v1",
                       "PICE_OPENAI_TOKENIZER": cfg.model,
                       "PICE_OPENAI_EXTRA_BODY": json.dumps({"pice": {"mode": "cloud"}})},
                      log_dir)
        down.wait_ready()
        for url in (up.url, down.url):
            run_mix(url, questions[:cfg.warmup], cfg, label="openai warmup")
        direct: list[float] = []
        via: list[float] = []
        step = cfg.concurrency * 2
        for i in range(0, len(questions), step):  # rounds alternate which goes first
            chunk = questions[i:i + step]
            order = [(up.url, direct), (down.url, via)]
            for url, sink in (order if (i // step) % 2 == 0 else order[::-1]):
                sink += run_mix(url, chunk, cfg, label="openai")
        return {"direct": {**summary(direct), "latencies_s": direct},
                "via_openai_backend": {**summary(via), "latencies_s": via}}
    finally:
        for s in (down, up):
            if s is not None:
                s.stop()


def run_scale_bench(cfg: ScaleConfig) -> dict[str, Any]:
    rows = load_questions(None, 0)
    questions = [rows[i % len(rows)]["question"] for i in range(cfg.requests)]
    log_dir = Path(tempfile.mkdtemp(prefix="pice-bench-scale-"))
    systems = {n: measure_system(n, cfg, questions, log_dir)
               for n in cfg.systems if n != "openai"}
    result: dict[str, Any] = {
        "config": {**asdict(cfg), "out_dir": str(cfg.out_dir),
                   "cache_dir": str(cfg.cache_dir) if cfg.cache_dir else None},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "systems": systems, "logs": str(log_dir)}
    ratios: dict[str, float] = {}
    base = systems.get("uvicorn")
    for n, s in systems.items():
        if base is not None and n != "uvicorn":
            ratios[f"{n}_p50_overhead"] = s["p50_s"] / base["p50_s"] - 1
            ratios[f"{n}_p99_overhead"] = s["p99_s"] / base["p99_s"] - 1
            ratios[f"{n}_throughput_ratio"] = s["requests_per_s"] / base["requests_per_s"]
    if "openai" in cfg.systems:
        o = measure_openai(cfg, questions, log_dir)
        result["openai"] = o
        ratios["openai_backend_p50_overhead"] = (o["via_openai_backend"]["p50_s"]
                                                 / o["direct"]["p50_s"] - 1)
        ratios["openai_backend_p99_overhead"] = (o["via_openai_backend"]["p99_s"]
                                                 / o["direct"]["p99_s"] - 1)
    result["ratios"] = ratios
    result["targets"] = {"serve_p50_overhead_max": 0.05, "openai_p50_overhead_max": 0.03}
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "scale.json").write_text(json.dumps(result, indent=1))
    plot(result, cfg.out_dir / "scale.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(n, s) for n, s in result["systems"].items()]
    if "openai" in result:
        rows += [("openai: direct", result["openai"]["direct"]),
                 ("openai: via backend", result["openai"]["via_openai_backend"])]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [s["p50_s"] for _, s in rows], 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [s["p99_s"] for _, s in rows], 0.4, label="p99")
    ax.set_xticks(list(xs), [n for n, _ in rows], rotation=15)
    ax.set_ylabel("request latency (s)")
    r = result["ratios"]
    notes = ", ".join(f"{k.replace('_overhead', '')} {v:+.1%}" for k, v in r.items()
                      if k.endswith("p50_overhead"))
    cfg = result["config"]
    ax.set_title(f"{cfg['model']}, {cfg['requests']} requests x {cfg['max_tokens']} tokens, "
                 f"concurrency {cfg['concurrency']}\np50 overhead: {notes}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_scale_parser(bsub: Any) -> None:
    s = bsub.add_parser("scale", help="plain uvicorn vs Ray Serve (1 and 2 cloud replicas), and "
                        "the openai backend vs calling its upstream directly")
    d = ScaleConfig()
    s.add_argument("--model", default=d.model, help=f"cloud model (default {d.model})")
    s.add_argument("--requests", type=int, default=d.requests)
    s.add_argument("--concurrency", type=int, default=d.concurrency)
    s.add_argument("--max-tokens", type=int, default=d.max_tokens)
    s.add_argument("--threads", type=int, default=d.threads)
    s.add_argument("--systems", default=",".join(d.systems),
                   help="comma list of uvicorn, ray-1, ray-2, openai")
    s.add_argument("--cache-dir", type=Path)
    s.add_argument("--out", type=Path, default=d.out_dir)
    s.set_defaults(fn=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    cfg = ScaleConfig(model=args.model, requests=args.requests, concurrency=args.concurrency,
                      max_tokens=args.max_tokens, threads=args.threads, cache_dir=args.cache_dir,
                      out_dir=args.out, systems=args.systems.split(","))
    result = run_scale_bench(cfg)
    print(json.dumps(result["ratios"], indent=2))
    return 0
