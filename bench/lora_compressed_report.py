"""`pice bench lora --compressed`: the summary per (n, system), the targets, the table and the
figure (from the raw worker outputs)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from pice.bench.lora import _p, summarize


def _summary(out: dict[str, Any], slo: float) -> dict[str, Any]:
    """TTFT from the arrival-bound replay; throughput, its ratio to the single adapter (the
    median over interleaved pairs of saturated replays) and hit rate from the saturation
    replays."""
    recs = out["records"]
    s: dict[str, Any] = dict(summarize(recs, slo))
    s["latency_cache_hit_rate"] = s["cache_hit_rate"]
    sat, alone = out.get("sat_records") or [], out.get("sat_single_records") or []
    if sat:
        runs = [summarize(r, slo) for r in sat]
        singles = [summarize(r, slo)["throughput_tok_s"] for r in alone]
        s |= {"throughput_tok_s": statistics.median(r["throughput_tok_s"] for r in runs),
              "sat_requests": runs[0]["requests"], "sat_reps": len(runs),
              "sat_ttft_p50_s": statistics.median(r["ttft_p50_s"] for r in runs),
              "cache_hit_rate": statistics.fmean(r["cache_hit_rate"] for r in runs),
              "single_tok_s": statistics.median(singles),
              "throughput_vs_single": statistics.median(
                  r["throughput_tok_s"] / t for r, t in zip(runs, singles, strict=True)),
              "throughput_vs_single_reps": [r["throughput_tok_s"] / t for r, t in
                                            zip(runs, singles, strict=True)]}
    hit = [r["ttft"] for r in recs if r.get("hit") is True]
    miss = [r["ttft"] for r in recs if r.get("hit") is False]
    step = out.get("decode_step_ms") or {}
    return s | {"slots": out["slots"], "lora_mb": out["lora_bytes"] / 2**20,
                "sigma_mb": out.get("sigma_bytes", 0) / 2**20,
                "peak_rss_mb": out["peak_rss_mb"], "catalog_rss_mb": out.get("catalog_rss_mb"),
                "register_s": out.get("register_s"), "pool": out["pool"],
                "ttft_p50_hit_s": _p(hit, 0.5), "ttft_p50_miss_s": _p(miss, 0.5),
                "ttft_p90_hit_s": _p(hit, 0.9), "ttft_p90_miss_s": _p(miss, 0.9),
                "step_ms_single": step.get("single"), "step_ms_distinct": step.get("distinct"),
                "step_vs_single": step["single"] / step["distinct"]
                if step.get("distinct") else None}


def report(cfg: Any, raw: dict[str, Any], comp: dict[str, Any]) -> dict[str, Any]:
    """Rows per (n, system), each relative to the single adapter: in its own process when
    it ran saturated replays (interleaved pairs), else to the single-adapter run next to it."""
    from dataclasses import asdict

    rows = []
    for n in cfg.ns:
        single = _summary(raw[f"single/n={n}"], cfg.slo_ttft_s)
        for kind in ("compressed", "uncompressed"):
            s = _summary(raw[f"{kind}/n={n}"], cfg.slo_ttft_s)
            if "throughput_vs_single" not in s:
                s |= {"single_tok_s": single["throughput_tok_s"],
                      "throughput_vs_single": s["throughput_tok_s"]
                      / single["throughput_tok_s"]}
            rows.append({"n": n, "system": kind, **s})
    by = {(r["n"], r["system"]): r for r in rows}
    slot_mb = raw[f"single/n={cfg.ns[0]}"]["slot_bytes"] / 2**20
    n_hi = max(cfg.ns)
    targets: dict[str, bool] = {}
    if 1000 in cfg.ns:
        targets["1000 adapters >= 0.9 x single-adapter throughput (saturated trace)"] = \
            by[(1000, "compressed")]["throughput_vs_single"] >= 0.9
        step = by[(1000, "compressed")]["step_vs_single"]
        targets["1000 adapters >= 0.9 x single-adapter decode step"] = \
            step is not None and step >= 0.9
    targets[f"{n_hi} adapters within the memory of 100 uncompressed"] = \
        by[(n_hi, "compressed")]["lora_mb"] <= 100 * slot_mb
    targets["miss TTFT p90 <= 1.5 x hit (compressed, every n)"] = all(
        not by[(n, "compressed")]["ttft_p90_miss_s"] > 1.5 * by[(n, "compressed")][
            "ttft_p90_hit_s"] for n in cfg.ns)
    return {"config": asdict(cfg) | {"out_dir": str(cfg.out_dir),
                                     "cache_dir": str(cfg.cache_dir)},
            "slot_mb": slot_mb, "hundred_uncompressed_mb": 100 * slot_mb,
            "compression": comp, "rows": rows, "targets_met": targets}


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per (n, system)."""
    lines = ["| n | system | slots | LoRA MB | tok/s | vs single | step vs single | TTFT p50 "
             "| p90 | p90 hit | p90 miss | hit rate | peak RSS MB | clusters |",
             "|" + "---|" * 14]
    for r in result["rows"]:
        c = result["compression"][str(r["n"])]
        step = f"{r['step_vs_single']:.2f}" if r["step_vs_single"] else "-"
        lines.append(
            f"| {r['n']} | {r['system']} | {r['slots']} | {r['lora_mb']:.2f} | "
            f"{r['throughput_tok_s']:.0f} | {r['throughput_vs_single']:.2f} | {step} | "
            f"{r['ttft_p50_s']:.3f} | {r['ttft_p90_s']:.3f} | {r['ttft_p90_hit_s']:.3f} | "
            f"{r['ttft_p90_miss_s']:.3f} | {r['cache_hit_rate']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | "
            f"{c['clusters'] if r['system'] == 'compressed' else ''} |")
    lines.append(f"\n100 uncompressed adapters: {result['hundred_uncompressed_mb']:.1f} MB of "
                 "slots; compression: " + ", ".join(
                     f"n={n}: {c['compressed']}/{c['adapters']} in {c['clusters']} clusters, "
                     f"{c['wall_s']:.0f} s" for n, c in result["compression"].items()))
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.5))
    ns = r["config"]["ns"]
    for kind, marker in (("compressed", "o-"), ("uncompressed", "s--")):
        rows = [x for x in r["rows"] if x["system"] == kind]
        axes[0].plot(ns, [x["throughput_vs_single"] for x in rows], marker, label=f"{kind} "
                     "(trace)")
        if kind == "compressed":
            axes[0].plot(ns, [x["step_vs_single"] or float("nan") for x in rows], "^:",
                         label="compressed (decode step, 16 distinct)")
        axes[1].plot(ns, [x["ttft_p90_hit_s"] for x in rows], marker, label=f"{kind} p90 hit")
        axes[1].plot(ns, [x["ttft_p90_miss_s"] for x in rows], marker, alpha=0.4,
                     label=f"{kind} p90 miss")
        axes[2].plot(ns, [x["cache_hit_rate"] for x in rows], marker, label=kind)
        axes[3].plot(ns, [x["lora_mb"] for x in rows], marker, label=f"{kind} adapter MB")
    axes[3].axhline(r["hundred_uncompressed_mb"], color="red", lw=0.8, ls=":",
                    label="100 uncompressed")
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].axhline(0.9, color="green", lw=0.8, ls=":", label="target 0.9")
    for ax, title in ((axes[0], "throughput / single adapter"), (axes[1], "TTFT (s)"),
                      (axes[2], "adapter cache hit rate"), (axes[3], "adapter memory (MB)")):
        ax.set_xscale("log")
        ax.set_xlabel("adapters n (equal adapter memory)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    name = "tiny" if r["config"]["tiny"] else r["config"]["model"]
    c = r["config"]
    fig.suptitle(f"pice bench lora --compressed: {name}, S-LoRA traces per n: "
                 f"{c.get('sat_requests', '-')} requests at once (throughput, hit rate), "
                 f"{c['requests']} at {c['rate']:g}/s (TTFT)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
