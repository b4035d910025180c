"""`pice bench lora --compressed`: n adapters served compressed (one slot per cluster basis, a Σ
per adapter) vs uncompressed at equal adapter memory, on the S-LoRA trace, each relative to a
single adapter's throughput. Writes lora_compressed.json and lora_compressed.png.

Two replays per system, S-LoRA's method: throughput and hit rate at saturation (`sat_requests`
arriving at once: the engine's capacity, not the arrival rate), TTFT (hit vs miss) on an
arrival-bound trace (`requests` at `rate`), replayed first so the pool starts cold.

Adapters: n rank-`rank` LoRAs drawn from `subspaces` shared subspaces plus noise (the population
Compress then Serve reports for real LoRA collections; each adapter has its own seed). The
compressor picks rank and cluster count itself under the error budget. Memory: the compressed
engine holds one slot per cluster plus the Σ table; the uncompressed engine gets as many slots
as fit in the same bytes. Each system runs in its own process (`pice.bench.lora_worker`)."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pice.bench.lora import LoraBenchConfig, _tiny_model, _worker, make_trace
from pice.shared.models import DEFAULT_EDGE_MODEL, resolve_model


@dataclass
class CompressedBenchConfig:
    model: str = "small"  # SMALL, or a model spec / directory
    tiny: bool = False
    ns: list[int] = field(default_factory=lambda: [10, 100, 1000, 4000])
    alpha: float = 1.0  # adapter popularity (S-LoRA power law; 1 = uniform)
    requests: int = 64  # the latency trace (TTFT hit vs miss), arrival-bound
    rate: float = 20.0
    sat_requests: int = 192  # the throughput trace: all arrive at t = 0
    sat_reps: int = 3  # saturated replays per system, each paired with a single-adapter one
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
    clusters: list[int] = field(default_factory=lambda: [8])
    rounds: int = 2  # reassignment rounds and HOOI iterations per fit
    iters: int = 3
    max_num_seqs: int = 16
    kv_cache_gb: float = 0.25
    slo_ttft_s: float = 6.0
    micro_reps: int = 7  # decode-step microbenchmark repetitions (0: none)
    seed: int = 0
    threads: int = 0
    out_dir: Path = Path("bench-results")
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.tiny:
            self.requests, self.kv_cache_gb = min(self.requests, 24), 0.05
            self.sat_requests, self.sat_reps = min(self.sat_requests, 32), 1


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


def _trace_cfg(cfg: CompressedBenchConfig, saturated: bool = False) -> LoraBenchConfig:
    requests, rate = (cfg.sat_requests, 1e9) if saturated else (cfg.requests, cfg.rate)
    return LoraBenchConfig(ns=[1], alphas=[cfg.alpha], requests=requests, rate=rate,
                           cv=cfg.cv, input_len=cfg.input_len, output_len=cfg.output_len,
                           baseline_n=1, baseline_alpha=cfg.alpha,
                           seed=cfg.seed + (7919 if saturated else 0))


def _root(cfg: CompressedBenchConfig, tmp: Path) -> Path:
    """Where the model, adapters and stores live: the cache dir (a rerun reuses them; the
    stores are resumable and fingerprinted), or `tmp` for --tiny."""
    if cfg.tiny:
        return tmp
    from pice.shared.models.cache import default_cache_dir

    key = json.dumps([cfg.model, cfg.rank, cfg.subspaces, cfg.subspace, cfg.noise, cfg.targets,
                      cfg.seed])
    return (cfg.cache_dir or default_cache_dir()) / "bench" / "lora-compressed" / \
        hashlib.sha256(key.encode()).hexdigest()[:12]


def _adapters(cfg: CompressedBenchConfig, root: Path, model: Path, shape: Any) -> Path:
    from pice.bench.lora_adapters import write_shared_adapters

    out, n = root / "adapters", max(cfg.ns)
    mark = out / "written.json"
    if not mark.is_file() or json.loads(mark.read_text())["n"] < n:
        write_shared_adapters(out, shape, n, clusters=cfg.subspaces, rank=cfg.rank,
                              subspace=cfg.subspace, targets=cfg.targets, noise=cfg.noise,
                              seed=cfg.seed, base_model=str(model))
        mark.write_text(json.dumps({"n": n}))
    return out


def run_compressed_bench(cfg: CompressedBenchConfig) -> dict[str, Any]:
    from pice.bench.lora_compressed_report import plot, report
    from pice.shared.lora.compress import CompressConfig, Source, compress
    from pice.shared.lora.compress.serve import shape_from_config

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pice-bench-lora-c-") as tmp:
        root = _root(cfg, Path(tmp))
        root.mkdir(parents=True, exist_ok=True)
        if cfg.tiny:
            model = _tiny_model(root)
        elif cfg.model == SMALL:
            model = root / "small" if (root / "small" / "config.json").is_file() \
                else _small_model(root)
        else:
            model = Path(resolve_model(cfg.model, cfg.cache_dir).path)
        shape = shape_from_config(model)
        vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
        ads = _adapters(cfg, root, model, shape)
        max_rank = max(*cfg.ranks, cfg.rank)
        common = {"model": str(model), "adapter_dir": str(ads), "max_rank": max_rank,
                  "max_num_seqs": cfg.max_num_seqs, "kv_cache_gb": cfg.kv_cache_gb,
                  "threads": cfg.threads, "micro_reps": cfg.micro_reps,
                  "sat_reps": cfg.sat_reps}
        tcfg, scfg = _trace_cfg(cfg), _trace_cfg(cfg, saturated=True)
        raw: dict[str, Any] = {}
        comp: dict[str, Any] = {}
        for n in tqdm(cfg.ns, desc="bench lora --compressed", unit="n"):
            ccfg = CompressConfig(method=cfg.method, budget=cfg.budget,  # type: ignore[arg-type]
                                  ranks=cfg.ranks, clusters=cfg.clusters, max_rank=max_rank,
                                  rounds=cfg.rounds, iters=cfg.iters, seed=cfg.seed)
            t0 = time.perf_counter()
            store = root / f"store-{n}-{cfg.method}"
            manifest = compress([Source(f"lora-{i}", ads / f"lora-{i}") for i in range(n)],
                                shape, store, ccfg, progress=False)
            comp[str(n)] = manifest["totals"] | {"wall_s": time.perf_counter() - t0,
                                                 "errors": sorted(
                a.get("error_max", 0.0) for a in manifest["adapters"].values())}
            trace = make_trace(n, cfg.alpha, tcfg, vocab)
            sat = make_trace(n, cfg.alpha, scfg, vocab)
            # the single adapter's TTFT next to each n, on the same latency trace (arrivals,
            # prompts, lengths) with every request on one adapter; its throughput runs inside
            # each system's process, interleaved with the system's own saturated replays
            raw[f"single/n={n}"] = _worker(common | {
                "kind": "uncompressed", "n": 1, "slots": 1, "micro_reps": 0,
                "trace": [r | {"adapter": 0} for r in trace]}, root)
            # a slot per cluster, and one per adapter the budget left uncompressed up to a batch
            # (fewer slots than adapters running at once would measure queueing for a slot,
            # not the cost of a swap); the uncompressed system gets the same bytes
            k = max(1, manifest["totals"]["clusters"]
                    + min(cfg.max_num_seqs, manifest["totals"]["uncompressed"]))
            c = _worker(common | {"kind": "compressed", "n": n, "slots": k,
                                  "store": str(store), "trace": trace, "sat_trace": sat}, root)
            # the uncompressed engine: as many slots as the compressed one's adapter bytes buy
            slots = max(1, round(c["lora_bytes"] / c["slot_bytes"]))
            u = _worker(common | {"kind": "uncompressed", "n": n, "slots": slots,
                                  "trace": trace, "sat_trace": sat}, root)
            raw[f"compressed/n={n}"], raw[f"uncompressed/n={n}"] = c, u
            (cfg.out_dir / "lora_compressed-raw.json").write_text(json.dumps(raw))
    result = report(cfg, raw, comp)
    (cfg.out_dir / "lora_compressed.json").write_text(json.dumps(result, indent=2, default=str))
    plot(result, cfg.out_dir / "lora_compressed.png")
    return result


def cmd(args: Any) -> int:
    """`pice bench lora --compressed` (flags parsed by pice.bench.lora)."""
    if args.quality:
        from pice.bench.lora_compressed_quality import QualityConfig, run_quality
        from pice.bench.lora_quality_report import quality_table, stores_table

        n, steps = (int(x) for x in args.quality.split(":"))
        real = Path(resolve_model(args.model or DEFAULT_EDGE_MODEL, args.cache_dir).path)
        res = run_quality(QualityConfig(real, args.out, n=n, steps=steps,
                                        cache_dir=args.cache_dir))
        print(quality_table(res) + "\n\n" + stores_table(res))
        return 0
    # the serving bench defaults to the small random model (the packaged one is too slow on
    # two shared cores for thousands of adapters); name another model to run it instead
    kw: dict[str, Any] = {"model": args.model or SMALL, "tiny": args.tiny,
                          "threads": args.threads,
                          "cache_dir": args.cache_dir, "out_dir": args.out,
                          "method": args.method}
    if args.requests:
        kw["requests"] = args.requests
    if args.rate:
        kw["rate"] = args.rate
    if args.sat_requests:
        kw["sat_requests"] = args.sat_requests
    if args.rank:
        kw["rank"] = args.rank
        kw["ranks"] = [args.rank]
    if args.targets:
        kw["targets"] = args.targets.split(",")
    if args.ns:
        kw["ns"] = [int(x) for x in args.ns.split(",")]
    result = run_compressed_bench(CompressedBenchConfig(**kw))
    from pice.bench.lora_compressed_report import table

    print(table(result))
    print(json.dumps({"targets_met": result["targets_met"]}, indent=2))
    return 0
