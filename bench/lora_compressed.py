"""`pice bench lora --compressed`: n adapters served compressed (one slot per cluster basis, a Σ
per adapter) vs uncompressed at equal adapter memory, on the S-LoRA trace, each relative to a
single adapter's throughput. Writes lora_compressed.json and lora_compressed.png.

Adapters: n rank-`rank` LoRAs drawn from `subspaces` shared subspaces plus noise (the population
Compress then Serve reports for real LoRA collections; each adapter has its own seed). The
compressor picks rank and cluster count itself under the error budget. Memory: the compressed
engine holds one slot per cluster plus the Σ table; the uncompressed engine gets as many slots
as fit in the same bytes. Each system runs in its own process (`pice.bench.lora_worker`)."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pice.bench.lora import LoraBenchConfig, _p, _tiny_model, _worker, make_trace, summarize
from pice.shared.models import DEFAULT_EDGE_MODEL, resolve_model


@dataclass
class CompressedBenchConfig:
    model: str = "small"  # SMALL, or a model spec / directory
    tiny: bool = False
    ns: list[int] = field(default_factory=lambda: [10, 100, 1000, 4000])
    alpha: float = 1.0  # adapter popularity (S-LoRA power law; 1 = uniform)
    requests: int = 32
    rate: float = 20.0  # above what the engine sustains: throughput-bound
    cv: float = 1.0
    input_len: tuple[int, int] = (8, 64)
    output_len: tuple[int, int] = (8, 32)
    rank: int = 16
    subspaces: int = 8
    subspace: int = 16
    noise: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj",
                                                        "o_proj"])
    method: str = "full"
    budget: float = 0.3
    # the candidates the compressor chooses from (kept few: each is a full clustering run)
    ranks: list[int] = field(default_factory=lambda: [16])
    clusters: list[int] = field(default_factory=lambda: [8, 16])
    rounds: int = 2  # reassignment rounds and HOOI iterations per fit
    iters: int = 3
    max_num_seqs: int = 16
    kv_cache_gb: float = 0.25
    slo_ttft_s: float = 6.0
    seed: int = 0
    threads: int = 0
    out_dir: Path = Path("bench-results")
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.tiny:
            self.requests, self.kv_cache_gb = min(self.requests, 24), 0.05


SMALL = "small"  # --model small: a random Qwen2 with real-sized projections, few layers


def _small_model(root: Path) -> Path:
    """Hidden 512 (a rank-16 LoRA on a projection is 32x its 16 x 16 Σ, the regime of real
    models), 2 layers and a 2k vocabulary: a trace of thousands of adapters, and their
    compression, run in minutes on two shared cores."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=2048, hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(root / "small")
    return root / "small"


def _trace_cfg(cfg: CompressedBenchConfig) -> LoraBenchConfig:
    return LoraBenchConfig(ns=[1], alphas=[cfg.alpha], requests=cfg.requests, rate=cfg.rate,
                           cv=cfg.cv, input_len=cfg.input_len, output_len=cfg.output_len,
                           baseline_n=1, baseline_alpha=cfg.alpha, seed=cfg.seed)


def run_compressed_bench(cfg: CompressedBenchConfig) -> dict[str, Any]:
    from pice.bench.lora_adapters import write_shared_adapters
    from pice.shared.lora.compress import CompressConfig, Source, compress
    from pice.shared.lora.compress.serve import shape_from_config

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pice-bench-lora-c-") as tmp:
        root = Path(tmp)
        model = _tiny_model(root) if cfg.tiny else _small_model(root) \
            if cfg.model == SMALL else Path(resolve_model(cfg.model, cfg.cache_dir).path)
        shape = shape_from_config(model)
        vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
        write_shared_adapters(root / "adapters", shape, max(cfg.ns), clusters=cfg.subspaces,
                              rank=cfg.rank, subspace=cfg.subspace, targets=cfg.targets,
                              noise=cfg.noise, seed=cfg.seed, base_model=str(model))
        max_rank = max(*cfg.ranks, cfg.rank)
        common = {"model": str(model), "adapter_dir": str(root / "adapters"),
                  "max_rank": max_rank, "max_num_seqs": cfg.max_num_seqs,
                  "kv_cache_gb": cfg.kv_cache_gb, "threads": cfg.threads}
        tcfg = _trace_cfg(cfg)
        raw: dict[str, Any] = {"single": _worker(common | {
            "kind": "uncompressed", "n": 1, "slots": 1,
            "trace": make_trace(1, cfg.alpha, tcfg, vocab)}, root)}
        comp: dict[str, Any] = {}
        for n in tqdm(cfg.ns, desc="bench lora --compressed", unit="n"):
            ccfg = CompressConfig(method=cfg.method, budget=cfg.budget,  # type: ignore[arg-type]
                                  ranks=cfg.ranks, clusters=cfg.clusters, max_rank=max_rank,
                                  rounds=cfg.rounds, iters=cfg.iters, seed=cfg.seed)
            t0 = time.perf_counter()
            store = root / f"store-{n}"
            manifest = compress([Source(f"lora-{i}", root / "adapters" / f"lora-{i}")
                                 for i in range(n)], shape, store, ccfg, progress=False)
            comp[str(n)] = manifest["totals"] | {"wall_s": time.perf_counter() - t0,
                                                 "errors": sorted(
                a.get("error_max", 0.0) for a in manifest["adapters"].values())}
            trace = make_trace(n, cfg.alpha, tcfg, vocab)
            # a slot per cluster, and a few for adapters the budget left uncompressed
            k = max(1, manifest["totals"]["clusters"] + min(4, manifest["totals"]["uncompressed"]))
            c = _worker(common | {"kind": "compressed", "n": n, "slots": k,
                                  "store": str(store), "trace": trace}, root)
            # the uncompressed engine: as many slots as the compressed one's adapter bytes buy
            slots = max(1, round(c["lora_bytes"] / c["slot_bytes"]))
            u = _worker(common | {"kind": "uncompressed", "n": n, "slots": slots,
                                  "trace": trace}, root)
            raw[f"compressed/n={n}"], raw[f"uncompressed/n={n}"] = c, u
            (cfg.out_dir / "lora_compressed-raw.json").write_text(json.dumps(raw))
    result = _report(cfg, raw, comp)
    (cfg.out_dir / "lora_compressed.json").write_text(json.dumps(result, indent=2, default=str))
    _plot(result, cfg.out_dir / "lora_compressed.png")
    return result


def _summary(out: dict[str, Any], slo: float) -> dict[str, Any]:
    recs = out["records"]
    s = summarize(recs, slo)
    hit = [r["ttft"] for r in recs if r.get("hit") is True]
    miss = [r["ttft"] for r in recs if r.get("hit") is False]
    return s | {"slots": out["slots"], "lora_mb": out["lora_bytes"] / 2**20,
                "peak_rss_mb": out["peak_rss_mb"], "pool": out["pool"],
                "ttft_p90_hit_s": _p(hit, 0.9), "ttft_p90_miss_s": _p(miss, 0.9)}


def _report(cfg: CompressedBenchConfig, raw: dict[str, Any],
            comp: dict[str, Any]) -> dict[str, Any]:
    single = _summary(raw["single"], cfg.slo_ttft_s)
    rows = []
    for n in cfg.ns:
        for kind in ("compressed", "uncompressed"):
            s = _summary(raw[f"{kind}/n={n}"], cfg.slo_ttft_s)
            rows.append({"n": n, "system": kind, **s,
                         "throughput_vs_single": s["throughput_tok_s"]
                         / single["throughput_tok_s"]})
    by = {(r["n"], r["system"]): r for r in rows}
    slot_mb = raw["single"]["slot_bytes"] / 2**20
    n_hi = max(cfg.ns)
    targets: dict[str, bool] = {}
    if 1000 in cfg.ns:
        targets["1000 adapters >= 0.9 x single-adapter throughput"] = \
            by[(1000, "compressed")]["throughput_vs_single"] >= 0.9
    targets[f"{n_hi} adapters within the memory of 100 uncompressed"] = \
        by[(n_hi, "compressed")]["lora_mb"] <= 100 * slot_mb
    targets["miss TTFT p90 <= 1.5 x hit (compressed, every n)"] = all(
        not by[(n, "compressed")]["ttft_p90_miss_s"] > 1.5 * by[(n, "compressed")][
            "ttft_p90_hit_s"] for n in cfg.ns)
    return {"config": asdict(cfg) | {"out_dir": str(cfg.out_dir)}, "single": single,
            "slot_mb": slot_mb, "hundred_uncompressed_mb": 100 * slot_mb,
            "compression": comp, "rows": rows, "targets_met": targets}


def table(result: dict[str, Any]) -> str:
    head = (f"{'n':>5} {'system':13} {'slots':>5} {'LoRA MB':>8} {'tok/s':>7} {'vs 1':>5} "
            f"{'TTFT p50':>8} {'p90':>6} {'hit':>5} {'clusters':>8} {'compr.':>7}")
    lines = [head]
    for r in result["rows"]:
        c = result["compression"][str(r["n"])]
        extra = f"{c['clusters']:>8} {c['compressed']:>7}" if r["system"] == "compressed" \
            else f"{'':>8} {'':>7}"
        lines.append(f"{r['n']:>5} {r['system']:13} {r['slots']:>5} {r['lora_mb']:>8.2f} "
                     f"{r['throughput_tok_s']:>7.1f} {r['throughput_vs_single']:>5.2f} "
                     f"{r['ttft_p50_s']:>8.3f} {r['ttft_p90_s']:>6.3f} "
                     f"{r['cache_hit_rate']:>5.2f} {extra}")
    s = result["single"]
    lines.append(f"single adapter: {s['throughput_tok_s']:.1f} tok/s; 100 uncompressed "
                 f"adapters: {result['hundred_uncompressed_mb']:.2f} MB")
    return "\n".join(lines)


def _plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ns = r["config"]["ns"]
    for kind, marker in (("compressed", "o-"), ("uncompressed", "s--")):
        rows = [x for x in r["rows"] if x["system"] == kind]
        axes[0].plot(ns, [x["throughput_vs_single"] for x in rows], marker, label=kind)
        axes[1].plot(ns, [x["ttft_p90_s"] for x in rows], marker, label=f"{kind} p90")
        axes[1].plot(ns, [x["ttft_p50_s"] for x in rows], marker, alpha=0.4,
                     label=f"{kind} p50")
        axes[2].plot(ns, [x["cache_hit_rate"] for x in rows], marker, label=kind)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].axhline(0.9, color="green", lw=0.8, ls=":", label="target 0.9")
    for ax, title in ((axes[0], "throughput / single adapter"), (axes[1], "TTFT (s)"),
                      (axes[2], "adapter cache hit rate")):
        ax.set_xscale("log")
        ax.set_xlabel("adapters n (equal adapter memory)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    name = "tiny" if r["config"]["tiny"] else r["config"]["model"]
    fig.suptitle(f"pice bench lora --compressed: {name}, S-LoRA trace, "
                 f"{r['config']['requests']} requests per n")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd(args: Any) -> int:
    """`pice bench lora --compressed` (flags parsed by pice.bench.lora)."""
    if args.quality:
        from pice.bench.lora_compressed_quality import QualityConfig, run_quality
        from pice.bench.lora_quality_report import quality_table, stores_table

        n, steps = (int(x) for x in args.quality.split(":"))
        real = Path(resolve_model(args.model, args.cache_dir).path)
        res = run_quality(QualityConfig(real, args.out, n=n, steps=steps,
                                        cache_dir=args.cache_dir))
        print(quality_table(res) + "\n\n" + stores_table(res))
        return 0
    # the serving bench defaults to the small random model (the packaged one is too slow on
    # two shared cores for thousands of adapters); name another model to run it instead
    model = SMALL if args.model == DEFAULT_EDGE_MODEL else args.model
    kw: dict[str, Any] = {"model": model, "tiny": args.tiny, "threads": args.threads,
                          "cache_dir": args.cache_dir, "out_dir": args.out,
                          "method": args.method}
    if args.requests:
        kw["requests"] = args.requests
    if args.rate:
        kw["rate"] = args.rate
    if args.ns:
        kw["ns"] = [int(x) for x in args.ns.split(",")]
    result = run_compressed_bench(CompressedBenchConfig(**kw))
    print(table(result))
    print(json.dumps({"targets_met": result["targets_met"]}, indent=2))
    return 0


# ---- worker side (python -m pice.bench.lora_worker) ---------------------------------------------
def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from pice.bench.lora_worker import _engine, _peak_rss_mb, _warm_up, run_pice_trace
    from pice.shared.lora.slots import slot_bytes

    torch.set_num_threads(spec["threads"]) if spec["threads"] else None
    engine = _engine(spec, slots=spec["slots"])
    n = spec["n"]
    for i in range(n):
        engine.pool.add(f"lora-{i}", Path(spec["adapter_dir"]) / f"lora-{i}")
    if spec["kind"] == "compressed":
        engine.pool.add_compressed(Path(spec["store"]))
    _warm_up(engine)
    records = run_pice_trace(engine, spec["trace"], n, spec)
    buffers = engine.pool.buffers
    return {"records": records, "pool": dict(engine.pool.stats), "slots": spec["slots"],
            "lora_bytes": buffers.nbytes + buffers.sigma.nbytes,
            "slot_bytes": slot_bytes(engine.pool.shape, spec["max_rank"],
                                     engine.runner.dtype.itemsize),
            "peak_rss_mb": _peak_rss_mb()}
