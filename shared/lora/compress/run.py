"""`pice adapters compress`: the whole run over the adapters of one base model.

Adapters are split into tenant groups first (a basis is only ever shared inside one group):
adapters that are public, or whose owner the operator opted in, form the shared group; every
other owner's private adapters are a group of their own. Per group, each (rank, cluster count)
candidate is fitted and scored by the serving parameters it needs (bases + Σ of adapters within
the error budget + the untouched LoRA factors of those over it); the cheapest wins, and
'no compression' is always a candidate. The winner is refitted on the adapters within budget;
any still over it stays uncompressed and is reported. Each finished trial and group is written
to work/ so an interrupted run resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pice.shared.lora.adapter import (
    AdapterSpec,
    LoadedAdapter,
    ModelShape,
    load_adapter,
    validate_adapter,
)
from pice.shared.lora.compress.cluster import Stack, cluster, finish, param_count
from pice.shared.lora.compress.jd import Method, sq_norms
from pice.shared.lora.compress.store import (
    MANIFEST,
    read_json,
    sigma_key,
    write_basis,
    write_json,
    write_sigma,
)

SERVER_OWNER = "_server"  # adapters loaded by the operator, not by a tenant


@dataclass(frozen=True)
class Source:
    name: str
    path: Path  # a PEFT adapter directory
    owner: str | None = None  # tenant; None for the operator's own adapters
    public: bool = False


@dataclass
class CompressConfig:
    method: Method = "full"
    budget: float = 0.3  # largest relative Frobenius error of any module's ΔW_i
    ranks: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    clusters: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 25])
    rounds: int = 10
    iters: int = 10
    seed: int = 0
    share_tenants: list[str] = field(default_factory=list)  # opted in to shared bases
    max_rank: int = 64  # the engine's slot rank: no basis is larger
    threads: int = 1  # torch threads while fitting
    force: bool = False  # compress even where it saves no memory (quality studies)

    def __post_init__(self) -> None:
        if self.method not in ("full", "diag"):
            raise ValueError(f"method must be full or diag, got {self.method!r}")
        if not self.budget > 0:
            raise ValueError(f"budget must be > 0, got {self.budget}")
        self.ranks = sorted({r for r in self.ranks if 1 <= r <= self.max_rank})
        self.clusters = sorted({k for k in self.clusters if k >= 1})
        if not self.ranks or not self.clusters:
            raise ValueError("ranks (each 1..max_rank) and clusters (each >= 1) must be "
                             "non-empty")


def group_of(src: Source, share: set[str]) -> str:
    owner = src.owner or SERVER_OWNER
    return "shared" if src.public or owner in share else f"tenant-{owner}"


def _slug(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", group)[:60] + "-" + \
        hashlib.sha256(group.encode()).hexdigest()[:8]


def _stack(names: list[str], loaded: list[LoadedAdapter], shape: ModelShape) -> Stack:
    dtype = torch.float64 if len(names) <= 1000 else torch.float32
    mods = sorted({m for ad in loaded for m in ad.weights})
    big_r = max(ad.spec.rank for ad in loaded)
    stack = Stack(names, {})
    for m in mods:
        fan_in, fan_out = shape.dims[m[1]]
        a = torch.zeros(len(loaded), big_r, fan_in, dtype=dtype)
        b = torch.zeros(len(loaded), fan_out, big_r, dtype=dtype)
        for i, ad in enumerate(loaded):
            if m in ad.weights:
                wa, wb = ad.weights[m]
                a[i, :wa.shape[0]], b[i, :, :wb.shape[1]] = wa, wb
        stack.modules[m] = (a, b)
        stack.norm2[m] = sq_norms(a, b)
    return stack


def _fingerprint(cfg: CompressConfig, specs: list[AdapterSpec]) -> str:
    stat = [(s.name, s.path.stat().st_size, s.path.stat().st_mtime_ns) for s in specs]
    settings = {k: v for k, v in asdict(cfg).items() if k != "threads"}
    body = json.dumps([settings, sorted(stat)], sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def _trials(stack: Stack, cfg: CompressConfig, work: Path, fp: str,
            bar: tqdm) -> dict[str, Any]:
    """Every (rank, clusters) candidate, resumed from work/…trials.json; returns the best."""
    saved = read_json(work)
    trials: dict[str, Any] = saved["trials"] if saved and saved.get("fp") == fp else {}
    n = len(stack.names)
    for r in cfg.ranks:
        for k in cfg.clusters:
            key = f"r{r}-k{k}"
            if key not in trials and k <= max(1, n // 2):
                f = cluster(stack, k, cfg.method, r, rounds=cfg.rounds, iters=cfg.iters,
                            seed=cfg.seed)
                ok = f.worst <= cfg.budget
                before, after = param_count(stack, f, ok)
                trials[key] = {"rank": r, "clusters": len(f.bases), "assign": f.assign,
                               "within": int(ok.sum()), "params_before": before,
                               "params_after": after}
                write_json(work, {"fp": fp, "trials": trials})
            bar.update(1)
    best = min(trials.values(), key=lambda t: (t["params_after"], t["rank"], t["clusters"]),
               default=None)
    saves = best is not None and best["params_after"] < best["params_before"]
    return best if best is not None and (saves or cfg.force) else {}


def _group(names: list[str], specs: dict[str, AdapterSpec], shape: ModelShape,
           cfg: CompressConfig, out: Path, slug: str, bar: tqdm) -> dict[str, Any]:
    work = out / "work"
    fp = _fingerprint(cfg, [specs[n] for n in names])
    done = read_json(work / f"{slug}.done.json")
    if done and done.get("fp") == fp:
        bar.update(len(cfg.ranks) * len(cfg.clusters))
        return dict(done["report"])
    loaded = [load_adapter(specs[n], torch.float32) for n in names]
    stack = _stack(names, loaded, shape)
    best = _trials(stack, cfg, work / f"{slug}.trials.json", fp, bar)
    report: dict[str, Any] = {"clusters": {}, "adapters": {}}
    for n in names:
        report["adapters"][n] = {"status": "uncompressed", "cluster": None,
                                 "reason": "no configuration saves memory"}
    if best:
        full = finish(stack, best["assign"], cfg.method, best["rank"], cfg.iters)
        keep = [i for i, w in enumerate(full.worst.tolist()) if w <= cfg.budget]
        for i, w in enumerate(full.worst.tolist()):
            report["adapters"][names[i]] |= {"error_max": w,
                                             "reason": f"error {w:.3f} over the budget "
                                                       f"{cfg.budget}"}
        if keep:
            sub = finish(stack.subset(keep), [full.assign[i] for i in keep], cfg.method,
                         best["rank"], cfg.iters)
            _write_group(sub, stack.subset(keep), cfg, out, slug, report)
    write_json(work / f"{slug}.done.json", {"fp": fp, "report": report})
    return report


def _write_group(fit_: Any, stack: Stack, cfg: CompressConfig, out: Path, slug: str,
                 report: dict[str, Any]) -> None:
    r = fit_.rank
    worst, mods = fit_.worst.tolist(), list(stack.modules)
    for c, bases in enumerate(fit_.bases):
        cid = f"{slug}-c{c}"
        write_basis(out / "clusters" / cid, bases, r)
        report["clusters"][cid] = {"rank": r, "method": cfg.method,
                                   "members": [n for n, a in zip(stack.names, fit_.assign,
                                                                 strict=True) if a == c]}
    for i, name in enumerate(stack.names):
        cid = f"{slug}-c{fit_.assign[i]}"
        targeted = [m for j, m in enumerate(mods) if float(stack.norm2[m][i]) > 0]
        write_sigma(out / "sigma" / f"{sigma_key(name)}.safetensors",
                    {m: fit_.cores[m][i] for m in targeted}, r, name, cid)
        errs = [float(fit_.rel[i, mods.index(m)]) for m in targeted]
        if worst[i] <= cfg.budget:
            report["adapters"][name] = {
                "status": "compressed", "cluster": cid, "rank": r, "method": cfg.method,
                "sigma": f"sigma/{sigma_key(name)}.safetensors", "error_max": worst[i],
                "error_mean": sum(errs) / max(1, len(errs))}
        else:  # over budget after the refit without the refused ones
            (out / "sigma" / f"{sigma_key(name)}.safetensors").unlink(missing_ok=True)
            report["adapters"][name] |= {"error_max": worst[i],
                                         "reason": f"error {worst[i]:.3f} over the budget"}


def compress(sources: list[Source], shape: ModelShape, out: Path, cfg: CompressConfig,
             progress: bool = True) -> dict[str, Any]:
    """Compress, write the store under `out` (resuming earlier work there); the manifest."""
    threads = torch.get_num_threads()
    # the fits are many small factorisations: one thread each is several times faster than
    # two threads contending on a loaded machine
    torch.set_num_threads(cfg.threads)
    try:
        return _compress(sources, shape, Path(out), cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _compress(sources: list[Source], shape: ModelShape, out: Path, cfg: CompressConfig,
              progress: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    share = set(cfg.share_tenants)
    specs = {s.name: validate_adapter(s.name, s.path, shape, max_rank=128,
                                      max_bytes=2**40) for s in sources}
    groups: dict[str, list[Source]] = {}
    for s in sources:
        groups.setdefault(group_of(s, share), []).append(s)
    manifest: dict[str, Any] = {"version": 1, "method": cfg.method, "budget": cfg.budget,
                                "config": asdict(cfg), "clusters": {}, "adapters": {},
                                "groups": {}}
    total = len(groups) * len(cfg.ranks) * len(cfg.clusters)
    with tqdm(total=total, desc="compress", unit="trial", disable=not progress) as bar:
        for group, members in sorted(groups.items()):
            slug = _slug(group)
            rep = _group(sorted(s.name for s in members), specs, shape, cfg, out, slug, bar)
            manifest["clusters"] |= rep["clusters"]
            manifest["groups"][group] = sorted(rep["clusters"])
            for s in members:
                manifest["adapters"][s.name] = rep["adapters"][s.name] | {
                    "owner": s.owner, "public": s.public, "group": group, "path": str(s.path)}
    _prune(out, manifest)
    manifest["totals"] = _totals(out, manifest, specs, time.perf_counter() - t0)
    write_json(out / MANIFEST, manifest)
    return manifest


def _prune(out: Path, manifest: dict[str, Any]) -> None:
    """Drop clusters and Σ files a previous run left that this store no longer uses."""
    live = set(manifest["clusters"])
    for d in (out / "clusters").glob("*") if (out / "clusters").is_dir() else []:
        if d.name not in live:
            shutil.rmtree(d, ignore_errors=True)
    keep = {Path(a["sigma"]).name for a in manifest["adapters"].values() if a.get("sigma")}
    for f in (out / "sigma").glob("*") if (out / "sigma").is_dir() else []:
        if f.name not in keep:
            f.unlink(missing_ok=True)


def _totals(out: Path, manifest: dict[str, Any], specs: dict[str, AdapterSpec],
            seconds: float) -> dict[str, Any]:
    ads = manifest["adapters"].values()
    comp = [a for a in ads if a["status"] == "compressed"]
    before = sum(s.size_bytes for s in specs.values())
    after = sum(specs[n].size_bytes for n, a in manifest["adapters"].items()
                if a["status"] != "compressed")
    after += sum(f.stat().st_size for f in (out / "clusters").rglob("*.safetensors"))
    after += sum((out / a["sigma"]).stat().st_size for a in comp)
    return {"adapters": len(specs), "compressed": len(comp), "clusters":
            len(manifest["clusters"]), "uncompressed": len(specs) - len(comp),
            "bytes_before": before, "bytes_after": after, "bytes_saved": before - after,
            "seconds": round(seconds, 3)}
