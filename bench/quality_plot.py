"""quality.png: verdicts per variant (both orders), position bias, latency and first text."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = {v: s for v, s in result["summary"]["overall"].items() if s}
    names = list(overall)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    bottom = [0.0] * len(names)
    for kind, color in (("win", "C2"), ("tie", "C7"), ("loss", "C3")):
        vals = [overall[v][kind] for v in names]
        axes[0].bar(names, vals, bottom=bottom, color=color, label=kind)
        bottom = [b + x for b, x in zip(bottom, vals, strict=True)]
    for i, v in enumerate(names):
        axes[0].text(i, 1.02, f"first shown wins {overall[v]['first_shown_wins']:.2f}",
                     ha="center", fontsize=8)
    axes[0].set_ylim(0, 1.12)
    axes[0].set_title("vs full cloud (judged in both orders)", fontsize=9)
    axes[0].legend(fontsize=8, loc="lower right")
    timing = {p: t for p, t in result["summary"]["timing"].items() if "latency_mean_s" in t}
    labels = list(timing)
    colors = ["grey", "C0", "C1"][:len(labels)]
    axes[1].bar(labels, [timing[p]["first_text_mean_s"] for p in labels], color=colors)
    axes[1].set_ylabel("s")
    axes[1].set_title("first text (mean): cloud first token, progressive first section",
                      fontsize=9)
    axes[2].bar(labels, [timing[p]["latency_mean_s"] for p in labels], color=colors)
    axes[2].set_ylabel("s")
    axes[2].set_title("end-to-end latency (client side, mean)", fontsize=9)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    n = next(iter(overall.values()))["questions"]
    fig.suptitle(f"pice bench quality: {n} suitable questions, concurrency "
                 f"{result['config']['concurrency']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
