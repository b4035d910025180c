"""Train the suitability router and write its JSON weights (`pice route train`, or
`python -m pice.scheduler.train_router`).

Fixed stratified split of `data/suitability.jsonl` (seed 0): 60% train (logistic regression, C
picked by 5-fold cross-validation on train only), 20% validation (Platt scaling), 20% held out
(reported, never fitted). Two sets it is never trained on are scored too: the composed split
`data/suitability_eval.jsonl` (made by a different method: frames x slot fillers, see
compose_eval.py) and the bench question set (`bench/questions.jsonl`, another author)."""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from pice.scheduler.router import WEIGHTS_FILE, RouterWeights, SuitabilityRouter
from pice.shared.embeddings import DEFAULT_EMBEDDER, get_embedder

DATA_FILE = "suitability.jsonl"
EVAL_FILE = "suitability_eval.jsonl"
SEED = 0


def load_rows(path: Path | None = None) -> list[dict[str, Any]]:
    if path is None:
        text = resources.files("pice.scheduler").joinpath("data", DATA_FILE).read_text()
    else:
        text = path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def split(rows: list[dict[str, Any]], seed: int = SEED) -> dict[str, list[dict[str, Any]]]:
    """Stratified by category: 60/20/20 train/val/test, the same on every run."""
    from sklearn.model_selection import train_test_split

    cats = [r["category"] for r in rows]
    train, rest = train_test_split(rows, test_size=0.4, random_state=seed, stratify=cats)
    val, test = train_test_split(rest, test_size=0.5, random_state=seed,
                                 stratify=[r["category"] for r in rest])
    return {"train": train, "val": val, "test": test}


def scores(y: np.ndarray, p: np.ndarray, threshold: float = 0.5, bins: int = 10
           ) -> dict[str, float]:
    """Accuracy, F1 (positive = suits a sketch), Brier score and expected calibration error."""
    from sklearn.metrics import accuracy_score, brier_score_loss, f1_score

    pred = p >= threshold
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    ece = sum(abs(p[idx == b].mean() - y[idx == b].mean()) * (idx == b).mean()
              for b in range(bins) if (idx == b).any())
    return {"n": len(y), "accuracy": float(accuracy_score(y, pred)),
            "f1": float(f1_score(y, pred)), "brier": float(brier_score_loss(y, p)),
            "ece": float(ece)}


def train(rows: list[dict[str, Any]], bench_rows: list[dict[str, Any]],
          embedder_spec: str = DEFAULT_EMBEDDER) -> RouterWeights:
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    emb = get_embedder(embedder_spec)
    parts = split(rows)

    def xy(sel: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        x = emb.encode([r["question"] for r in sel])  # [n, 384]
        return x, np.array([bool(r["suits_sketch"]) for r in sel], dtype=float)

    (xt, yt), (xv, yv), (xs, ys) = (xy(parts[k]) for k in ("train", "val", "test"))
    lr = LogisticRegressionCV(Cs=[0.1, 0.3, 1, 3, 10, 30, 100], cv=5, max_iter=5000,
                              scoring="neg_log_loss").fit(xt, yt)
    platt = LogisticRegression(C=1e6, max_iter=1000).fit(lr.decision_function(xv)[:, None], yv)
    weights = RouterWeights(
        embedder=embedder_spec, coef=tuple(float(c) for c in lr.coef_[0]),
        intercept=float(lr.intercept_[0]), platt_a=float(platt.coef_[0, 0]),
        platt_b=float(platt.intercept_[0]))
    router = SuitabilityRouter(weights, emb)
    report: dict[str, Any] = {"C": float(lr.C_[0]), "seed": SEED,
                              "split": {k: len(v) for k, v in parts.items()}}
    for name, (x, y) in {"train": (xt, yt), "val": (xv, yv), "test": (xs, ys)}.items():
        report[name] = scores(y, router.probability_from_embeddings(x))
    report["keyword_rule_test"] = _keyword_scores(parts["test"])
    # (probability, label) of questions the classifier never saw: the simulator's workload mix
    mix = [(float(p), bool(y)) for p, y in zip(router.probability_from_embeddings(xs), ys,
                                               strict=True)]
    composed = load_rows_named(EVAL_FILE)
    if composed:
        xc, yc = xy(composed)
        pc = router.probability_from_embeddings(xc)
        report["composed_eval"] = scores(yc, pc)
        report["composed_eval_by_category"] = {
            cat: float(np.mean([(pc[i] >= 0.5) == yc[i] for i, r in enumerate(composed)
                                if r["category"] == cat]))
            for cat in dict.fromkeys(r["category"] for r in composed)}
        report["keyword_rule_composed_eval"] = _keyword_scores(composed)
    if bench_rows:
        xb, yb = xy(bench_rows)
        pb = router.probability_from_embeddings(xb)
        report["bench_questions"] = scores(yb, pb)
        report["keyword_rule_bench_questions"] = _keyword_scores(bench_rows)
        mix += [(float(p), bool(y)) for p, y in zip(pb, yb, strict=True)]
    report["heldout_mix"] = [[round(p, 4), y] for p, y in mix]
    return RouterWeights(**{**weights.__dict__, "report": report})


def load_rows_named(name: str) -> list[dict[str, Any]]:
    """A packaged data file's rows ([] when it is not there)."""
    path = resources.files("pice.scheduler").joinpath("data", name)
    return load_rows(Path(str(path))) if path.is_file() else []


def _keyword_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The earlier keyword rule (suitability.py) on the same rows: the baseline."""
    from pice.scheduler.suitability import classify

    y = np.array([bool(r["suits_sketch"]) for r in rows], dtype=float)
    p = np.array([float(classify(r["question"]).suits_sketch) for r in rows])
    return scores(y, p)


def _bench_rows() -> list[dict[str, Any]]:
    try:
        return load_rows_bench()
    except (FileNotFoundError, ModuleNotFoundError):
        return []


def load_rows_bench() -> list[dict[str, Any]]:
    text = resources.files("pice.bench").joinpath("questions.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pice route train", description=__doc__)
    p.add_argument("--data", type=Path, help=f"labeled JSONL (default: packaged {DATA_FILE})")
    p.add_argument("--out", type=Path,
                   default=Path(__file__).resolve().parent / "data" / WEIGHTS_FILE)
    args = p.parse_args(argv)
    weights = train(load_rows(args.data), _bench_rows())
    weights.save(args.out)
    print(json.dumps(weights.report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
