"""The quality bench's markdown tables and figure (`pice bench lora --compressed --quality`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pick(r: dict[str, Any]) -> str:
    """The forced rank the per-task table shows: the middle one measured."""
    ranks = sorted(r["config"]["forced_ranks"])
    return f"r{ranks[len(ranks) // 2]}"


def quality_table(r: dict[str, Any]) -> str:
    """Per task (markdown): base / trained loss, then JD-Full and JD-Diag at the shown forced
    rank (loss, agreement, relative error), then the budgeted stores' status."""
    k = _pick(r)
    f, d = f"full-{k}", f"diag-{k}"
    lines = [f"| task | base loss | LoRA loss | {f} loss | agree | err | {d} loss | agree | err "
             "| full-budget | diag-budget |", "|" + "---|" * 12]
    for x in r["rows"]:
        cells = [x["task"], f"{x['loss_base']:.3f}", f"{x['loss_original']:.3f}"]
        for lab in (f, d):
            cells += [f"{x[lab + '/loss']:.3f}", f"{x[lab + '/agree']:.2f}",
                      f"{x[lab + '/error'] or 0:.2f}"]
        for lab in ("full-budget", "diag-budget"):
            st = x[f"{lab}/status"]
            cells.append(f"{x[lab + '/loss']:.3f}" if st == "compressed" else "plain")
        lines.append("| " + " | ".join(cells) + " |")
    n = len(r["rows"])
    lines.append("| **mean** | " + f"{r['mean_loss_base']:.3f} | {r['mean_loss_original']:.3f}"
                 + "".join(f" | {r['stores'][lab]['mean_loss']:.3f} | "
                           f"{r['stores'][lab]['mean_agree']:.2f} | "
                           f"{r['stores'][lab]['mean_error']:.2f}" for lab in (f, d))
                 + "".join(f" | {r['stores'][lab]['compressed']}/{n} compressed"
                           for lab in ("full-budget", "diag-budget")) + " |")
    return "\n".join(lines)


def stores_table(r: dict[str, Any]) -> str:
    """Per store (markdown): what it compressed, its size, mean loss / agreement / error."""
    lines = ["| store | compressed | clusters | rank | MB before | MB after | mean loss "
             "| mean agree | mean err |", "|" + "---|" * 9]
    for lab, s in r["stores"].items():
        lines.append(f"| {lab} | {s['compressed']}/{len(r['rows'])} | {s['clusters']} | "
                     f"{','.join(map(str, s['ranks'])) or '-'} | "
                     f"{s['bytes_before'] / 2**20:.2f} | {s['bytes_after'] / 2**20:.2f} | "
                     f"{s['mean_loss']:.3f} | {s['mean_agree']:.2f} | {s['mean_error']:.2f} |")
    lines.append(f"| (base model) | | | | | | {r['mean_loss_base']:.3f} | | |")
    lines.append(f"| (original LoRAs) | | | | | | {r['mean_loss_original']:.3f} | 1.00 | 0 |")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, k = r["rows"], _pick(r)
    x = list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    for key, label in (("loss_base", "base model"), ("loss_original", "original LoRA"),
                       (f"full-{k}/loss", f"JD-Full {k}"), (f"diag-{k}/loss", f"JD-Diag {k}")):
        axes[0].plot(x, [row[key] for row in rows], "o-", label=label, ms=4)
    w = 0.4
    axes[1].bar([i - w / 2 for i in x], [row[f"full-{k}/agree"] for row in rows], w,
                label=f"JD-Full {k}")
    axes[1].bar([i + w / 2 for i in x], [row[f"diag-{k}/agree"] for row in rows], w,
                label=f"JD-Diag {k}")
    for ax, title in ((axes[0], "held-out answer loss"),
                      (axes[1], "greedy token agreement with the original LoRA")):
        ax.set_xticks(x, [row["task"] for row in rows], rotation=75, fontsize=6)
        ax.set_title(title)
        ax.legend(fontsize=7)
    ranks = sorted(r["config"]["forced_ranks"])
    for m, style in (("full", "o-"), ("diag", "s--")):
        axes[2].plot(ranks, [r["stores"][f"{m}-r{q}"]["mean_agree"] for q in ranks], style,
                     label=f"JD-{m.title()} agreement")
        axes[2].plot(ranks, [r["stores"][f"{m}-r{q}"]["mean_error"] for q in ranks], style,
                     alpha=0.5, label=f"JD-{m.title()} rel. error (worst module)")
    axes[2].set_xlabel("shared rank (one basis)")
    axes[2].set_title("mean over tasks vs rank")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{len(rows)} real LoRAs (own seeds and tasks) compressed jointly vs original")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
