"""`pice bench engine`: transformers `generate` vs pice's engine on the same model, dtype and
prompts, in one run. Decode throughput per batch size, time to first token, peak RSS, int8 vs
fp32, prefix sharing vs none, and batch-1 decode against the memory-bandwidth limit measured on
this machine in the same run. Writes JSON and a PNG plot."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pice.kernels.membench import read_bandwidth_gb_s
from pice.shared.models import DEFAULT_EDGE_MODEL, resolve_model


@dataclass
class EngineBenchConfig:
    model: str = DEFAULT_EDGE_MODEL
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32])
    decode_tokens: int = 32
    int8_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    out_dir: Path = Path("bench-results")
    cache_dir: Path | None = None
    threads: int = 0


def memory_read_bandwidth(gib: float = 1.0, reps: int = 12, threads: int = 0) -> float:
    """GB/s streaming a buffer far larger than the caches, read the way decode reads weights
    (each of `threads` threads, 0: torch's, sums its share): the limit every system's batch-1
    decode is measured against."""
    return read_bandwidth_gb_s(gib, reps, threads)


def _seconds(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "pice.bench.engine_worker", json.dumps(spec)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench worker {spec['kind']} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_engine_bench(cfg: EngineBenchConfig) -> dict[str, Any]:
    path = resolve_model(cfg.model, cfg.cache_dir).path
    base = {"model": path, "threads": cfg.threads, "decode_tokens": cfg.decode_tokens}
    jobs: list[tuple[str, dict[str, Any]]] = [
        ("hf", {**base, "kind": "throughput", "backend": "hf", "batch_sizes": cfg.batch_sizes}),
        ("engine", {**base, "kind": "throughput", "backend": "engine",
                    "batch_sizes": cfg.batch_sizes}),
        ("engine_int8", {**base, "kind": "throughput", "backend": "engine",
                         "quantization": "int8", "batch_sizes": cfg.int8_batch_sizes}),
        ("int8_accuracy", {**base, "kind": "int8_accuracy"}),
        ("prefix_shared", {**base, "kind": "prefix", "prefix_caching": True}),
        ("prefix_unshared", {**base, "kind": "prefix", "prefix_caching": False}),
    ]
    results: dict[str, Any] = {}
    bar = tqdm(jobs, desc="bench engine", unit="job")
    bw = memory_read_bandwidth(threads=cfg.threads)
    for name, spec in bar:
        bar.set_postfix_str(name)
        results[name] = _worker(spec)
    ratios = _ratios(results, bw)
    report = {"bench": "engine", "config": {**asdict(cfg), "out_dir": str(cfg.out_dir),
                                             "cache_dir": str(cfg.cache_dir or "")},
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": cfg.threads or torch.get_num_threads(),
                          "memory_read_gb_s": bw},
              "results": results, "ratios": ratios}
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "engine.json").write_text(json.dumps(report, indent=2))
    _plot(results, ratios, cfg.out_dir / "engine.png")
    return report


def _by_batch(result: dict[str, Any]) -> dict[int, dict[str, float]]:
    return {r["batch"]: r for r in result["rows"]}


def _ratios(r: dict[str, Any], bw_gb_s: float) -> dict[str, float]:
    hf, eng, q8 = _by_batch(r["hf"]), _by_batch(r["engine"]), _by_batch(r["engine_int8"])
    out = {f"engine_vs_hf_decode_b{b}": eng[b]["decode_tok_s"] / hf[b]["decode_tok_s"]
           for b in eng if b in hf}
    out.update({f"engine_vs_hf_ttft_b{b}": hf[b]["ttft_s"] / eng[b]["ttft_s"]
                for b in eng if b in hf})
    limit = bw_gb_s * 1e9 / r["engine"]["weight_bytes"]  # tok/s if weights stream at full speed
    out["bandwidth_limit_fp32_tok_s"] = limit
    if 1 in eng:
        out["engine_b1_fraction_of_bandwidth_limit"] = eng[1]["decode_tok_s"] / limit
        if 1 in hf:
            out["hf_b1_fraction_of_bandwidth_limit"] = hf[1]["decode_tok_s"] / limit
    if 1 in q8:  # int8's own bytes per step against the same measured bandwidth
        q8_limit = bw_gb_s * 1e9 / r["engine_int8"]["weight_bytes"]
        out["bandwidth_limit_int8_tok_s"] = q8_limit
        out["int8_b1_fraction_of_bandwidth_limit"] = q8[1]["decode_tok_s"] / q8_limit
    out.update({f"int8_vs_fp32_decode_b{b}": q8[b]["decode_tok_s"] / eng[b]["decode_tok_s"]
                for b in q8 if b in eng})
    out["prefix_sharing_prefill_speedup"] = (r["prefix_unshared"]["prefill_s"]
                                             / r["prefix_shared"]["prefill_s"])
    out["int8_top1_agreement_with_fp32"] = r["int8_accuracy"]["top1_agreement"]
    out["int8_mean_kl_vs_fp32"] = r["int8_accuracy"]["mean_kl"]
    out["engine_vs_hf_peak_rss"] = r["engine"]["peak_rss_mb"] / r["hf"]["peak_rss_mb"]
    return out


def _plot(r: dict[str, Any], ratios: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, label in (("hf", "transformers generate"), ("engine", "pice engine fp32"),
                        ("engine_int8", "pice engine int8")):
        rows = r[name]["rows"]
        ax1.plot([x["batch"] for x in rows], [x["decode_tok_s"] for x in rows], "o-",
                 label=label)
    ax1.axhline(ratios["bandwidth_limit_fp32_tok_s"], ls="--", c="grey",
                label="fp32 bandwidth limit (batch 1)")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("decode tokens / s")
    ax1.legend(fontsize=8)
    ax2.bar(["no sharing", "prefix sharing"],
            [r["prefix_unshared"]["prefill_s"], r["prefix_shared"]["prefill_s"]])
    ax2.set_ylabel("prefill of 8 expansions (s)")
    fig.suptitle("pice bench engine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
