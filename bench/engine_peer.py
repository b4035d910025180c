"""`pice bench engine --peer llama.cpp`: pice's engine against llama.cpp on the same GGUF, in one
run, each system in its own process, same prompts and token counts: decode tok/s at batch 1,
aggregate tok/s at 8 (and 32) concurrent requests, TTFT, peak RSS, % of the memory-bandwidth
limit (measured in the same run), greedy agreement with llama.cpp. `--quick`: llama.cpp and
pice on the GGUF's own quantization, batch 1 and 8. Writes JSON + PNG."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pice.bench.engine import memory_read_bandwidth
from pice.shared.models import DEFAULT_EDGE_MODEL, resolve_model

FULL = ["llama.cpp", "pice-gguf", "pice-int8", "pice-fp32", "transformers"]
QUICK = ["llama.cpp", "pice-gguf"]
TOPICS = ["sleep", "vaccines", "remote work", "volcanoes", "saving money", "learning a language",
          "bread baking", "solar power", "chess openings", "city cycling", "coffee", "memory"]


@dataclass
class PeerBenchConfig:
    model: str = DEFAULT_EDGE_MODEL
    quick: bool = False
    systems: list[str] = field(default_factory=lambda: list(FULL))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    decode_tokens: int = 64
    threads: int = 0  # 0: torch's default (all cores)
    out_dir: Path = Path("bench-results")
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.quick:
            self.systems, self.batch_sizes = list(QUICK), [1, 8]
            self.decode_tokens = min(self.decode_tokens, 32)


def _prompts(model_dir: str, n: int) -> tuple[list[str], list[list[int]]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts: list[str] = []
    for i in range(n):
        msg = [{"role": "user", "content": f"Write a few facts about {TOPICS[i % len(TOPICS)]}."
                                           f" ({i})"}]
        texts.append(str(tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False))
                     if tok.chat_template else msg[0]["content"])
    return texts, [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _gguf_step_bytes(gguf: str) -> int:
    """Bytes of the GGUF's tensors one decode step reads (token_embd only as a tied head)."""
    from pice.kernels.quant import Fmt, row_bytes
    from pice.shared.engine.models.gguf_file import read_header

    sizes = {t.name: row_bytes(Fmt(t.ggml_type), t.shape[-1]) * (t.shape[0] if len(t.shape) > 1
                                                                else 1)
             for t in read_header(gguf).tensors.values()}
    tied = "output.weight" not in sizes
    return sum(v for k, v in sizes.items() if k != "token_embd.weight" or tied)


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "pice.bench.peer_worker", json.dumps(spec)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench worker {spec['system']} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_peer_bench(cfg: PeerBenchConfig) -> dict[str, Any]:
    threads = cfg.threads or torch.get_num_threads()
    meta = resolve_model(cfg.model, cfg.cache_dir, dense="transformers" in cfg.systems)
    if meta.gguf is None:
        raise ValueError(f"{cfg.model} is not a GGUF model: llama.cpp needs one")
    texts, ids = _prompts(meta.path, max(cfg.batch_sizes))
    base = {"model_dir": meta.path, "dense_dir": meta.path, "gguf": meta.gguf, "threads": threads,
            "prompts": texts, "prompt_ids": ids, "batch_sizes": cfg.batch_sizes,
            "decode_tokens": cfg.decode_tokens}
    bw = memory_read_bandwidth(threads=threads)
    results: dict[str, Any] = {}
    bar = tqdm(cfg.systems, desc="bench engine --peer", unit="system")
    for system in bar:
        bar.set_postfix_str(system)
        results[system] = _worker({**base, "system": system})
    results["llama.cpp"]["weight_bytes_per_step"] = _gguf_step_bytes(meta.gguf)
    report = {"bench": "engine_peer", "config": {**asdict(cfg), "out_dir": str(cfg.out_dir),
                                                 "cache_dir": str(cfg.cache_dir or "")},
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": threads, "memory_read_gb_s": bw},
              "results": results, "table": _table(results, bw)}
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "engine_peer.json").write_text(json.dumps(report, indent=2))
    _plot(report, cfg.out_dir / "engine_peer.png")
    return report


def _table(results: dict[str, Any], bw_gb_s: float) -> list[dict[str, Any]]:
    """One row per system, with ratios to llama.cpp."""
    peer = results.get("llama.cpp")
    peer_rows = {r["batch"]: r for r in peer["rows"]} if peer else {}
    table = []
    for system, res in results.items():
        row: dict[str, Any] = {"system": system, "peak_rss_gb": res["peak_rss_mb"] / 1024,
                               "load_s": res["load_s"]}
        for r in res["rows"]:
            b = r["batch"]
            row[f"decode_tok_s_b{b}"] = r["decode_tok_s"]
            row[f"ttft_s_b{b}"] = r["ttft_s"]
            if b in peer_rows:
                row[f"vs_llama_cpp_b{b}"] = r["decode_tok_s"] / peer_rows[b]["decode_tok_s"]
        step = res.get("weight_bytes_per_step")
        b1 = next((r for r in res["rows"] if r["batch"] == 1), None)
        if step and b1:
            row["bandwidth_limit_tok_s"] = bw_gb_s * 1e9 / step
            row["b1_fraction_of_bandwidth_limit"] = b1["decode_tok_s"] * step / (bw_gb_s * 1e9)
        if peer:
            row["rss_vs_llama_cpp"] = res["peak_rss_mb"] / peer["peak_rss_mb"]
            a, b = res["tokens_b1"], peer["tokens_b1"]
            same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                        min(len(a), len(b)))
            row["greedy_tokens_equal_to_llama_cpp"] = f"{same}/{len(b)}"
        table.append(row)
    return table


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for system, res in report["results"].items():
        rows = res["rows"]
        ax1.plot([r["batch"] for r in rows], [r["decode_tok_s"] for r in rows], "o-",
                 label=system)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("concurrent requests")
    ax1.set_ylabel("aggregate decode tokens / s")
    ax1.legend(fontsize=8)
    names = [r["system"] for r in report["table"]]
    ax2.bar(names, [r["peak_rss_gb"] for r in report["table"]])
    ax2.set_ylabel("peak RSS (GB)")
    ax2.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"pice bench engine --peer llama.cpp ({report['machine']['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
