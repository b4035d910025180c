"""`pice bench lora`: multi-LoRA serving on the S-LoRA / EdgeLoRA trace, pice's engine against
two peft baselines in the same run: (a) one request at a time, swapping the adapter per request,
(b) peft's mixed-adapter batch generation. Plus the decode-step microbenchmark (8 distinct
adapters vs the base model) and time to first token on an adapter cache miss vs a hit.

Trace: adapter id = floor(u^(1/alpha) * n), u ~ U[0, 1); gamma inter-arrival times with
coefficient of variation cv (cv = 1: Poisson); input lengths U[8, 128], output U[8, 256] tokens.
Random adapters (seeded, ranks mixed) are written in PEFT format to a temporary directory.
Each system runs in its own process (peak RSS is its own). Writes lora.json and lora.png."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pice.shared.models import DEFAULT_EDGE_MODEL, resolve_model


@dataclass
class LoraBenchConfig:
    model: str = DEFAULT_EDGE_MODEL
    tiny: bool = False  # CI-sized: a tiny random Qwen2 made on the fly, a handful of requests
    ns: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])
    alphas: list[float] = field(default_factory=lambda: [0.1, 1.0])
    requests: int = 16  # per (n, alpha) trace
    rate: float = 2.0  # requests per second (above what any system sustains: throughput)
    cv: float = 1.0
    input_len: tuple[int, int] = (8, 128)
    output_len: tuple[int, int] = (8, 256)
    ranks: list[int] = field(default_factory=lambda: [8, 16])
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj",
                                                        "o_proj"])
    base_fraction: float = 0.0  # share of requests without an adapter
    slots: int = 8
    max_num_seqs: int = 16
    kv_cache_gb: float = 1.0
    slo_ttft_s: float = 6.0
    baseline_n: int = 100  # the trace the peft baselines replay (same one pice replays)
    baseline_alpha: float = 1.0
    micro_steps: int = 8
    micro_reps: int = 3
    micro_ttft_reps: int = 8
    seed: int = 0
    threads: int = 0
    out_dir: Path = Path("bench-results")
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.tiny:
            self.ns, self.alphas, self.requests = [1, 10], [1.0], 5
            self.output_len, self.rate = (8, 24), 4.0
            self.baseline_n, self.micro_steps, self.micro_reps = 10, 3, 1
            self.micro_ttft_reps, self.kv_cache_gb = 2, 0.05
        if self.baseline_n not in self.ns or self.baseline_alpha not in self.alphas:
            raise ValueError(f"baseline trace n={self.baseline_n}, alpha={self.baseline_alpha} "
                             f"must be one of ns={self.ns} x alphas={self.alphas}")


def make_trace(n: int, alpha: float, cfg: LoraBenchConfig, vocab: int) -> list[dict[str, Any]]:
    rng = random.Random(f"{cfg.seed}-{n}-{alpha}")
    k = 1.0 / cfg.cv ** 2  # gamma shape; scale keeps the mean gap 1 / rate
    t, trace = 0.0, []
    for _ in range(cfg.requests):
        t += rng.gammavariate(k, 1.0 / (cfg.rate * k))
        adapter = None if rng.random() < cfg.base_fraction else \
            min(n - 1, int(rng.random() ** (1.0 / alpha) * n))
        length = rng.randint(*cfg.input_len)
        trace.append({"arrival": t, "adapter": adapter, "out_len": rng.randint(*cfg.output_len),
                      "prompt": [rng.randrange(10, vocab - 10) for _ in range(length)]})
    return trace


def _tiny_model(root: Path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(root / "tiny")
    return root / "tiny"


def _write_adapters(model: Path, root: Path, cfg: LoraBenchConfig) -> dict[str, Any]:
    from pice.bench.lora_adapters import ALL_TARGETS, write_adapter
    from pice.shared.engine.models import model_class
    from pice.shared.lora.adapter import ModelShape

    raw = json.loads((model / "config.json").read_text())
    hd = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    h, q, kv, inter = (raw["hidden_size"], raw["num_attention_heads"] * hd,
                       raw["num_key_value_heads"] * hd, raw["intermediate_size"])
    shape = ModelShape(model_class(model).__name__, raw["num_hidden_layers"], {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}, h)
    n = max(max(cfg.ns), cfg.micro_ttft_reps)
    for i in tqdm(range(n), desc="random adapters", unit="adapter", leave=False):
        rank = cfg.ranks[i % len(cfg.ranks)]
        write_adapter(root / "adapters" / f"lora-{i}", shape, rank=rank, alpha=2 * rank,
                      targets=cfg.targets, seed=cfg.seed * 100003 + i, base_model=str(model))
    top = max(cfg.ranks)
    for i in range(8):  # the microbenchmark's: every projection, the largest rank
        write_adapter(root / "micro" / f"micro-{i}", shape, rank=top, alpha=2 * top,
                      targets=ALL_TARGETS, seed=10**6 + i, base_model=str(model))
    return {"vocab": int(raw["vocab_size"])}


def _worker(spec: dict[str, Any], root: Path) -> dict[str, Any]:
    path = root / f"spec-{spec['kind']}.json"
    path.write_text(json.dumps(spec))
    out = subprocess.run([sys.executable, "-m", "pice.bench.lora_worker", str(path)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench worker {spec['kind']} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summarize(records: list[dict[str, Any]], slo: float) -> dict[str, float]:
    ttft = [r["ttft"] for r in records]
    start = min(r["arrival"] for r in records)
    span = max(r["finish"] for r in records) - start
    hits = [r["hit"] for r in records if r.get("hit") is not None]
    return {"requests": len(records), "tokens": sum(r["out_len"] for r in records),
            "throughput_tok_s": sum(r["out_len"] for r in records) / span,
            "ttft_mean_s": statistics.fmean(ttft), "ttft_p50_s": _p(ttft, 0.5),
            "ttft_p90_s": _p(ttft, 0.9),
            "slo_attainment": sum(t <= slo for t in ttft) / len(ttft),
            "cache_hit_rate": sum(hits) / len(hits) if hits else float("nan")}


def run_lora_bench(cfg: LoraBenchConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pice-bench-lora-") as tmp:
        root = Path(tmp)
        model = _tiny_model(root) if cfg.tiny else Path(resolve_model(cfg.model,
                                                                      cfg.cache_dir).path)
        meta = _write_adapters(model, root, cfg)
        traces = {f"n={n}/alpha={a}": make_trace(n, a, cfg, meta["vocab"])
                  for n in cfg.ns for a in cfg.alphas}
        base_key = f"n={cfg.baseline_n}/alpha={cfg.baseline_alpha}"
        common = {"model": str(model), "adapter_dir": str(root / "adapters"),
                  "micro_dir": str(root / "micro"), "max_rank": max(cfg.ranks),
                  "slots": cfg.slots, "max_num_seqs": cfg.max_num_seqs,
                  "kv_cache_gb": cfg.kv_cache_gb, "threads": cfg.threads,
                  "micro_steps": cfg.micro_steps, "micro_reps": cfg.micro_reps,
                  "micro_ttft_reps": cfg.micro_ttft_reps}
        jobs = [{"kind": "pice", "micro": True, "traces": traces},
                {"kind": "peft_switch", "traces": {base_key: traces[base_key]}},
                {"kind": "peft_batch", "traces": {base_key: traces[base_key]}}]
        raw: dict[str, Any] = {}
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        for job in tqdm(jobs, desc="bench lora", unit="system"):
            raw[job["kind"]] = _worker(common | job, root)
            # each system's raw records as soon as it finishes (a later failure keeps them)
            (cfg.out_dir / f"lora-raw-{job['kind']}.json").write_text(json.dumps(raw[job["kind"]]))
    result = _report(cfg, raw, base_key)
    (cfg.out_dir / "lora.json").write_text(json.dumps(result, indent=2, default=str))
    _plot(result, cfg.out_dir / "lora.png")
    return result


def _report(cfg: LoraBenchConfig, raw: dict[str, Any], base_key: str) -> dict[str, Any]:
    systems: dict[str, Any] = {}
    for kind, out in raw.items():
        systems[kind] = {"peak_rss_mb": out["peak_rss_mb"], "traces": {
            key: summarize(t["records"], cfg.slo_ttft_s) | {"pool": t["pool"]}
            for key, t in out["traces"].items()}}
    pice = systems["pice"]["traces"]
    micro = raw["pice"]["micro"]
    records = [r for t in raw["pice"]["traces"].values() for r in t["records"]]
    hit_ttft = [r["ttft"] for r in records if r.get("hit") is True]
    miss_ttft = [r["ttft"] for r in records if r.get("hit") is False]
    ratios = {
        "decode_step_8_adapters_vs_base": micro["decode_step_8_adapters_ms"]
        / micro["decode_step_base_ms"],
        "throughput_vs_peft_switch": pice[base_key]["throughput_tok_s"]
        / systems["peft_switch"]["traces"][base_key]["throughput_tok_s"],
        "throughput_vs_peft_batch": pice[base_key]["throughput_tok_s"]
        / systems["peft_batch"]["traces"][base_key]["throughput_tok_s"],
        "idle_ttft_p90_miss_vs_hit": _p(micro["ttft_miss_s"], 0.9)
        / _p(micro["ttft_hit_s"], 0.9),
        "trace_ttft_p90_miss_vs_hit": _p(miss_ttft, 0.9) / _p(hit_ttft, 0.9)
        if hit_ttft and miss_ttft else float("nan"),
    }
    n_max, n_min = max(cfg.ns), min(cfg.ns)
    for a in cfg.alphas:
        ratios[f"throughput_n{n_max}_vs_n{n_min}_alpha{a}"] = \
            pice[f"n={n_max}/alpha={a}"]["throughput_tok_s"] / \
            pice[f"n={n_min}/alpha={a}"]["throughput_tok_s"]
    targets = {"decode_step_8_adapters_vs_base <= 1.15":
               ratios["decode_step_8_adapters_vs_base"] <= 1.15,
               "throughput_vs_peft_switch >= 3": ratios["throughput_vs_peft_switch"] >= 3,
               f"throughput n={n_max} >= 0.8 x n={n_min} (every alpha)": all(
                   ratios[f"throughput_n{n_max}_vs_n{n_min}_alpha{a}"] >= 0.8
                   for a in cfg.alphas),
               "idle_ttft_p90_miss_vs_hit <= 2": ratios["idle_ttft_p90_miss_vs_hit"] <= 2}
    return {"config": asdict(cfg) | {"out_dir": str(cfg.out_dir)}, "baseline_trace": base_key,
            "systems": systems, "micro": micro, "ratios": ratios, "targets_met": targets}


def _plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    pice = r["systems"]["pice"]["traces"]
    cfg = r["config"]
    for a in cfg["alphas"]:
        keys = [f"n={n}/alpha={a}" for n in cfg["ns"]]
        axes[0].plot(cfg["ns"], [pice[k]["throughput_tok_s"] for k in keys], "o-",
                     label=f"pice, alpha={a}")
        axes[1].plot(cfg["ns"], [pice[k]["ttft_p90_s"] for k in keys], "o-",
                     label=f"pice, alpha={a}")
    key = r["baseline_trace"]
    n_b = int(key.split("/")[0].split("=")[1])
    for kind, marker in (("peft_switch", "s"), ("peft_batch", "^")):
        t = r["systems"][kind]["traces"][key]
        axes[0].plot([n_b], [t["throughput_tok_s"]], marker, ms=9, label=f"{kind} ({key})")
        axes[1].plot([n_b], [t["ttft_p90_s"]], marker, ms=9, label=f"{kind} ({key})")
    for ax, title in ((axes[0], "throughput (output tok/s)"), (axes[1], "TTFT p90 (s)")):
        ax.set_xscale("log")
        ax.set_xlabel("adapters n")
        ax.set_title(title)
        ax.legend(fontsize=7)
    m = r["micro"]
    axes[2].bar(["decode step\nbase", "decode step\n8 adapters"],
                [m["decode_step_base_ms"], m["decode_step_8_adapters_ms"]])
    axes[2].set_ylabel("ms")
    axes[2].set_title(f"decode step, ratio {r['ratios']['decode_step_8_adapters_vs_base']:.2f}")
    fig.suptitle(f"pice bench lora: {cfg['model'] if not cfg['tiny'] else 'tiny'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_lora_parser(bsub: Any) -> None:
    """`pice bench lora` (registered by pice.cli)."""
    p = bsub.add_parser("lora", help="multi-LoRA serving on the S-LoRA trace vs peft baselines")
    p.add_argument("--model", help=f"model spec or directory (default {DEFAULT_EDGE_MODEL}; "
                   "with --compressed: small, a random Qwen2 of real-sized projections)")
    p.add_argument("--tiny", action="store_true",
                   help="CI-sized: tiny random model, a handful of requests")
    p.add_argument("--requests", type=int, help="requests per (n, alpha) trace (default 16)")
    p.add_argument("--rate", type=float, help="arrivals per second (default 2.0)")
    p.add_argument("--ns", help="adapter counts, comma-separated (default 1,10,100,1000)")
    p.add_argument("--slots", type=int, help="device adapter slots (default 8)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--compressed", action="store_true",
                   help="compressed (Compress then Serve) vs uncompressed adapters at equal "
                        "memory, n in --ns (default 10,100,1000,4000)")
    p.add_argument("--method", choices=["full", "diag"], default="full",
                   help="with --compressed: JD-Full or JD-Diag")
    p.add_argument("--sat-requests", type=int,
                   help="with --compressed: requests of the saturation trace (default 192)")
    p.add_argument("--rank", type=int, help="with --compressed: adapters' rank (default 16)")
    p.add_argument("--targets", help="with --compressed: adapters' target projections, "
                   "comma-separated (default q_proj,k_proj,v_proj,o_proj)")
    p.add_argument("--quality", metavar="N:STEPS", help="with --compressed: train N real "
                   "LoRAs (STEPS each) on --model and compare compressed vs original instead")
    p.set_defaults(fn=_cmd)


def _cmd(args: Any) -> int:
    if args.compressed:
        from pice.bench.lora_compressed import cmd

        return cmd(args)
    kw: dict[str, Any] = {"model": args.model or DEFAULT_EDGE_MODEL, "tiny": args.tiny,
                          "threads": args.threads, "cache_dir": args.cache_dir,
                          "out_dir": args.out}
    if args.requests:
        kw["requests"] = args.requests
    if args.rate:
        kw["rate"] = args.rate
    if args.slots:
        kw["slots"] = args.slots
    if args.ns:
        kw["ns"] = [int(x) for x in args.ns.split(",")]
    result = run_lora_bench(LoraBenchConfig(**kw))
    print(json.dumps({"ratios": result["ratios"], "targets_met": result["targets_met"]},
                     indent=2))
    return 0
