"""`pice bench lora --compressed --quality N:STEPS`: real adapters, compressed vs original.

Trains N LoRAs on the edge model, each from its own seed (A's initialisation, batch order) on
its own small task (`lora_quality_tasks`: 24 datasets built from the shipped question set),
LoRA on the top layers only with the lower layers' states cached (`lora_quality_train`). Then
compresses them jointly, JD-Full and JD-Diag, both under the error budget (its own choice of
rank and clusters; over-budget adapters stay plain) and forced at fixed ranks with one shared
basis, and measures per task on held-out questions: answer loss and greedy (argmax,
teacher-forced) token agreement of the compressed adapter vs the original, the relative
Frobenius error of its ΔW, and base vs trained loss. The compressed adapter is evaluated
materialised (B' = U Σ_i, A' = Vᵀ), which the serving path reproduces exactly
(tests/shared/engine/test_lora_compressed.py). States, adapters and stores are kept under
<cache>/bench/lora-quality/ so a rerun reuses them. Writes lora_compressed_quality.json + .png."""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pice.bench.lora_quality_tasks import MAX_ANSWER, encode, examples, split, tasks
from pice.bench.lora_quality_train import (
    TopStack,
    load_states,
    loss_of,
    lower_states,
    save_states,
    train_one,
)


@dataclass
class QualityConfig:
    model: Path
    out_dir: Path
    n: int = 24
    steps: int = 20
    seed: int = 0
    top: int = 2  # LoRA on the top `top` layers (q_proj, v_proj)
    rank: int = 8
    lr: float = 8e-3
    budget: float = 0.3
    forced_ranks: list[int] = field(default_factory=lambda: [16, 32, 64])
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.n <= len(tasks()):
            raise ValueError(f"n must be 1..{len(tasks())}, got {self.n}")


def _work(cfg: QualityConfig) -> Path:
    from pice.shared.models.cache import default_cache_dir

    key = json.dumps([str(cfg.model.resolve()), cfg.top, MAX_ANSWER, [t[0] for t in tasks()]])
    root = cfg.cache_dir or default_cache_dir()
    return root / "bench" / "lora-quality" / (
        f"{cfg.model.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")


def _run_dir(cfg: QualityConfig) -> Path:
    """Adapters (and the stores made of them) of one training setting."""
    return _work(cfg) / f"steps{cfg.steps}-seed{cfg.seed}-r{cfg.rank}-lr{cfg.lr:g}"


def _load(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                attn_implementation="sdpa").eval()


def prepare(cfg: QualityConfig) -> tuple[Path, list[tuple[str, Path]], dict[str, Any]]:
    """Cached states and trained adapters: (work dir, [(task, adapter dir)], train logs)."""
    from transformers import AutoTokenizer

    work = _work(cfg)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    exs, todo_tasks = examples(), tasks()[:cfg.n]
    state_paths = [work / "states" / f"{name}.safetensors" for name, _ in todo_tasks]
    ads = [(name, _run_dir(cfg) / "adapters" / f"task{i:02d}-{name}")
           for i, (name, _) in enumerate(todo_tasks)]
    missing = [i for i, (_, d) in enumerate(ads)
               if not (d / "adapter_model.safetensors").is_file()]
    base = None
    if any(not p.is_file() for p in state_paths):
        base = _load(cfg.model)
        enc = [encode(tok, exs, t) for t in todo_tasks]
        per_task = lower_states(base, cfg.top, enc[0][0], [a for _, a in enc])
        for p, s in zip(state_paths, per_task, strict=True):
            save_states(p, s)
    train_idx, _ = split(len(exs))
    for i in tqdm(missing, desc="train LoRAs", unit="adapter"):
        base = base if base is not None else _load(cfg.model)
        seqs = load_states(state_paths[i])
        base, _ = train_one(base, cfg.top, [seqs[j] for j in train_idx], ads[i][1],
                            seed=cfg.seed * 1000 + i, steps=cfg.steps, rank=cfg.rank,
                            lr=cfg.lr)
    logs = {name: json.loads((d / "train_log.json").read_text()) for name, d in ads}
    return work, ads, logs


def _stores(cfg: QualityConfig, work: Path, ads: list[tuple[str, Path]]) -> dict[str, Any]:
    """{label: (store dir, manifest)}: budgeted and forced, JD-Full and JD-Diag."""
    from pice.shared.lora.compress import CompressConfig, Source, compress
    from pice.shared.lora.compress.serve import shape_from_config

    shape = shape_from_config(cfg.model)
    sources = [Source(name, path) for name, path in ads]
    top = max(cfg.forced_ranks)
    plans = {f"{m}-budget": CompressConfig(method=m, budget=cfg.budget, ranks=[8, 16, 32, top],
                                           clusters=[1, 2, 4], max_rank=top)
             for m in ("full", "diag")}
    for m in ("full", "diag"):
        for r in cfg.forced_ranks:  # one shared basis at rank r, every adapter compressed
            plans[f"{m}-r{r}"] = CompressConfig(method=m, budget=1e9, ranks=[r], clusters=[1],
                                                max_rank=top, force=True)
    out = {}
    for label, ccfg in tqdm(plans.items(), desc="compress", unit="store"):
        store = _run_dir(cfg) / "stores" / label
        out[label] = (store, compress(sources, shape, store, ccfg, progress=False))
    return out


def deltas(adapter: Path) -> dict[tuple[int, str], torch.Tensor]:
    """A PEFT LoRA's ΔW = scaling · B A per (layer, projection) [out, in]."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert not cfg.get("use_rslora"), "rsLoRA scaling not handled here"
    scale = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            m = re.search(r"layers\.(\d+)\..*\.(\w+_proj)\.lora_A", key)
            assert m is not None, key
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[(int(m[1]), m[2])] = (b.float() @ a.float()) * scale
    return out


def _set(model: Any, w0: dict[tuple[int, str], torch.Tensor],
         delta: dict[tuple[int, str], torch.Tensor]) -> None:
    """The top layers' projections as W0 + ΔW (the adapter merged: same function, no peft
    wrapping per variant)."""
    for (layer, proj), w in w0.items():
        mod = getattr(model.model.layers[layer].self_attn, proj)
        mod.weight.data = w + delta[(layer, proj)] if (layer, proj) in delta else w


def run_quality(cfg: QualityConfig) -> dict[str, Any]:
    from pice.bench.lora_adapters import materialize

    t0 = time.perf_counter()
    work, ads, logs = prepare(cfg)
    prep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    stores = _stores(cfg, work, ads)
    compress_s = time.perf_counter() - t0
    _, held = split(len(examples()))
    model = _load(cfg.model)
    layers = model.config.num_hidden_layers
    w0 = {(i, p): getattr(model.model.layers[i].self_attn, p).weight.data
          for i in range(layers - cfg.top, layers) for p in ("q_proj", "k_proj", "v_proj",
                                                              "o_proj")}
    stack = TopStack(model, cfg.top)
    rows = []
    for name, path in tqdm(ads, desc="evaluate", unit="task"):
        seqs = [s for i, s in enumerate(load_states(work / "states" / f"{name}.safetensors"))
                if i in held]
        row: dict[str, Any] = {"task": name} | logs[name]
        _set(model, w0, {})
        row["loss_base"], pred = loss_of(stack, seqs)
        _set(model, w0, deltas(path))
        row["loss_original"], ref = loss_of(stack, seqs)
        row["agree_base"] = float((pred == ref).float().mean())
        for label, (store, manifest) in stores.items():
            entry = manifest["adapters"][name]
            row[f"{label}/status"] = entry["status"]
            row[f"{label}/error"] = entry.get("error_max")
            row[f"{label}/error_mean"] = entry.get("error_mean")
            if entry["status"] != "compressed":  # served as the original adapter
                row[f"{label}/loss"], row[f"{label}/agree"] = row["loss_original"], 1.0
                continue
            _set(model, w0, deltas(materialize(store, name, store.parent / "materialised" /
                                               label / name)))
            row[f"{label}/loss"], pred = loss_of(stack, seqs)
            row[f"{label}/agree"] = float((pred == ref).float().mean())
        rows.append(row)
    summary = {label: {
        "compressed": m["totals"]["compressed"], "clusters": m["totals"]["clusters"],
        "ranks": sorted({c["rank"] for c in m["clusters"].values()}),
        "bytes_before": m["totals"]["bytes_before"], "bytes_after": m["totals"]["bytes_after"],
        "compress_s": m["totals"]["seconds"],
        "mean_loss": sum(r[f"{label}/loss"] for r in rows) / len(rows),
        "mean_agree": sum(r[f"{label}/agree"] for r in rows) / len(rows),
        "mean_error": sum(r[f"{label}/error"] or 0.0 for r in rows) / len(rows)}
        for label, (_, m) in stores.items()}
    result = {"config": asdict(cfg) | {"model": str(cfg.model), "out_dir": str(cfg.out_dir),
                                       "cache_dir": str(cfg.cache_dir)},
              "lora": f"r={cfg.rank} alpha={2 * cfg.rank} q_proj,v_proj on the top {cfg.top} "
                      f"layers, own seed per task", "held_out": len(held),
              "train_examples": len(examples()) - len(held), "prepare_s": prep_s,
              "compress_s": compress_s, "work_dir": str(_run_dir(cfg)),
              "mean_loss_base": sum(r["loss_base"] for r in rows) / len(rows),
              "mean_loss_original": sum(r["loss_original"] for r in rows) / len(rows),
              "stores": summary, "rows": rows}
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "lora_compressed_quality.json").write_text(json.dumps(result, indent=2))
    from pice.bench.lora_quality_report import plot

    plot(result, cfg.out_dir / "lora_compressed_quality.png")
    return result
