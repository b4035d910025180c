"""`pice bench aas`: automatic adapter selection on the labeled routing set
(`scheduler/data/`): the embedding router against a lexical-overlap router and a random pick,
side by side, plus the cache-aware effect (how often a near-tie went to a resident adapter and
what it cost in accuracy). Writes aas.json and aas.png."""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
from tqdm import tqdm

from pice.scheduler.adapter_router import RouterConfig, card_vectors, score_cards, select
from pice.shared.embeddings import DEFAULT_EMBEDDER, get_embedder

Scores = dict[str, float]
_WORD = re.compile(r"[a-z0-9]+")
_STOP = ENGLISH_STOP_WORDS


@dataclass
class AASBenchConfig:
    out_dir: Path = Path("bench-results")
    threshold: float = RouterConfig.threshold
    example_weight: float = RouterConfig.example_weight
    margins: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.02, 0.03, 0.05, 0.08])
    resident: int = 3  # adapters resident on the device in each cache trial
    trials: int = 50  # random resident sets per margin
    seed: int = 0
    embedder: str = DEFAULT_EMBEDDER


def load_cards() -> dict[str, dict[str, Any]]:
    text = resources.files("pice.scheduler").joinpath("data/adapter_cards.json").read_text()
    cards: dict[str, dict[str, Any]] = json.loads(text)
    return cards


def load_labeled() -> list[tuple[str, str | None]]:
    text = resources.files("pice.scheduler").joinpath("data/adapter_routing.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [(r["prompt"], r["adapter"]) for r in rows]


def _words(text: str) -> set[str]:
    return {w.rstrip("s") for w in _WORD.findall(text.lower()) if w not in _STOP}


def lexical_scores(prompt: str, cards: dict[str, dict[str, Any]]) -> Scores:
    """Baseline: share of the prompt's content words found in the card (no model)."""
    words = _words(prompt)
    out: Scores = {}
    for name, card in cards.items():
        vocab = _words(" ".join([card["description"], *card["examples"]]))
        out[name] = len(words & vocab) / max(1, len(words))
    return out


def evaluate(scores: list[Scores], labels: list[str | None], threshold: float) -> dict[str, Any]:
    """Accuracy over every prompt (a null label is right when nothing is picked), top-1 and
    top-3 over the adapter-labeled prompts, and how the null prompts fared."""
    picks = [select(s, frozenset(), RouterConfig(threshold=threshold, margin=0.0)).adapter
             for s in scores]
    ranked = [sorted(s, key=lambda n: (-s[n], n)) for s in scores]
    domain = [i for i, y in enumerate(labels) if y is not None]
    null = [i for i, y in enumerate(labels) if y is None]
    return {
        "accuracy": float(np.mean([p == y for p, y in zip(picks, labels, strict=True)])),
        "top1_in_domain": float(np.mean([ranked[i][0] == labels[i] for i in domain])),
        "top3_in_domain": float(np.mean([labels[i] in ranked[i][:3] for i in domain])),
        "picked_when_labeled": float(np.mean([picks[i] == labels[i] for i in domain])),
        "none_when_null": float(np.mean([picks[i] is None for i in null])) if null else None,
        "n": len(labels), "n_in_domain": len(domain), "n_null": len(null),
    }


def random_scores(names: list[str], n: int, rng: random.Random) -> list[Scores]:
    """Baseline: a random adapter among the visible ones (always picks one)."""
    return [{name: rng.random() for name in names} for _ in range(n)]


def cache_effect(scores: list[Scores], labels: list[str | None], cfg: AASBenchConfig,
                 names: list[str]) -> list[dict[str, float]]:
    """Per margin: accuracy, how often a resident near-tie replaced the top match, and how
    often an adapter pick was already resident, averaged over random resident sets."""
    rng = random.Random(cfg.seed)
    sets = [frozenset(rng.sample(names, cfg.resident)) for _ in range(cfg.trials)]
    rows = []
    for margin in tqdm(cfg.margins, desc="cache-aware margins"):
        rc = RouterConfig(threshold=cfg.threshold, margin=margin,
                          example_weight=cfg.example_weight)
        correct = preferred = picks = resident_picks = 0
        for resident in sets:
            for s, y in zip(scores, labels, strict=True):
                c = select(s, resident, rc)
                correct += c.adapter == y
                preferred += c.cache_preferred
                if c.adapter is not None:
                    picks += 1
                    resident_picks += c.adapter in resident
        total = len(sets) * len(scores)
        rows.append({"margin": margin, "accuracy": correct / total,
                     "cache_preferred_rate": preferred / total,
                     "resident_hit_rate": resident_picks / max(1, picks)})
    return rows


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    methods = list(summary["methods"])
    metrics = ["accuracy", "top1_in_domain", "top3_in_domain"]
    x = np.arange(len(metrics))
    for i, m in enumerate(methods):
        vals = [summary["methods"][m][k] for k in metrics]
        a.bar(x + (i - 1) * 0.27, vals, 0.27, label=m)
    a.set_xticks(x, ["accuracy (all)", "top-1 (in-domain)", "top-3 (in-domain)"])
    a.set_ylim(0, 1.15)
    a.set_title(f"AAS on {summary['methods']['embedding']['n']} labeled prompts")
    a.legend(loc="upper center", ncol=3, fontsize=8)
    rows = summary["cache_aware"]
    margins = [r["margin"] for r in rows]
    b.plot(margins, [r["accuracy"] for r in rows], "o-", label="accuracy")
    b.plot(margins, [r["resident_hit_rate"] for r in rows], "s-", label="pick already resident")
    b.plot(margins, [r["cache_preferred_rate"] for r in rows], "^-", label="near-tie → resident")
    b.set_xlabel("near-tie margin")
    b.set_ylim(0, 1)
    b.set_title(f"cache-aware selection ({summary['config']['resident']} of "
                f"{summary['adapters']} resident)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_aas_bench(cfg: AASBenchConfig) -> dict[str, Any]:
    cards = load_cards()
    rows = load_labeled()
    names = sorted(cards)
    prompts = [p for p, _ in rows]
    labels = [y for _, y in rows]
    embedder = get_embedder(cfg.embedder)
    t0 = time.perf_counter()
    vectors = {n: card_vectors(embedder.encode([cards[n]["description"], *cards[n]["examples"]]))
               for n in tqdm(names, desc="embedding cards")}
    queries = np.concatenate([embedder.encode(prompts[i:i + 64])
                              for i in tqdm(range(0, len(prompts), 64), desc="embedding prompts")])
    embed_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    emb = [score_cards(q, vectors, cfg.example_weight) for q in queries]  # q: [dim]
    score_ms = (time.perf_counter() - t1) / len(prompts) * 1e3
    lex = [lexical_scores(p, cards) for p in prompts]
    rnd = random_scores(names, len(prompts), random.Random(cfg.seed))
    methods = {
        "embedding": evaluate(emb, labels, cfg.threshold),
        "lexical": evaluate(lex, labels, 1e-9),  # picks none only when no word is shared
        "random": evaluate(rnd, labels, -1.0),
    }
    acc = {m: r["accuracy"] for m, r in methods.items()}
    summary: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "adapters": len(names), "methods": methods,
        "ratios": {
            "accuracy_vs_lexical": acc["embedding"] / acc["lexical"],
            "accuracy_vs_random": acc["embedding"] / acc["random"],
        },
        "cache_aware": cache_effect(emb, labels, cfg, names),
        "seconds": {"embed_all": embed_s, "score_per_prompt_ms": score_ms},
    }
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "aas.json").write_text(json.dumps(summary, indent=2))
    _plot(summary, cfg.out_dir / "aas.png")
    return summary
