"""Automatic adapter selection: the selection rule on hand-made scores, the router on the real
MiniLM, and its accuracy on the labeled routing set."""

from __future__ import annotations

import numpy as np
import pytest

from pice.bench.aas import evaluate, lexical_scores, load_cards, load_labeled
from pice.scheduler.adapter_router import (
    AdapterRouter,
    RouterConfig,
    card_vectors,
    score_cards,
    select,
)
from pice.shared.embeddings import get_embedder

CFG = RouterConfig(threshold=0.3, margin=0.05)


@pytest.mark.parametrize(("scores", "resident", "pick", "preferred"), [
    ({"a": 0.9, "b": 0.5}, set(), "a", False),  # clear winner
    ({"a": 0.2, "b": 0.1}, {"a"}, None, False),  # nothing reaches the threshold
    ({"a": 0.62, "b": 0.60}, {"b"}, "b", True),  # near-tie → the resident one
    ({"a": 0.62, "b": 0.60}, {"a", "b"}, "a", False),  # best is resident already
    ({"a": 0.70, "b": 0.60}, {"b"}, "a", False),  # outside the margin: quality wins
    ({"a": 0.32, "b": 0.29}, {"b"}, "a", False),  # resident tie under the threshold: no
    ({"a": 0.6, "b": 0.58, "c": 0.57}, {"c"}, "c", True),  # any resident within the margin
    ({}, {"a"}, None, False),  # no candidates
])
def test_select(scores: dict[str, float], resident: set[str], pick: str | None,
                preferred: bool) -> None:
    choice = select(scores, resident, CFG)
    assert choice.adapter == pick
    assert choice.cache_preferred == preferred
    if scores:
        assert choice.best == max(scores, key=lambda k: scores[k])
        assert [n for n, _ in choice.ranked] == sorted(scores, key=lambda k: -scores[k])


def test_score_mixes_centroid_and_nearest_example() -> None:
    e = np.eye(3, dtype=np.float32)  # three orthogonal unit "texts"
    card = card_vectors(e[[0, 1]])  # description along x, one example along y
    q = e[1]  # exactly the example
    centroid = float(card.centroid @ q)
    assert centroid == pytest.approx(1 / np.sqrt(2))
    assert score_cards(q, {"c": card}, 0.0)["c"] == pytest.approx(centroid)
    assert score_cards(q, {"c": card}, 1.0)["c"] == pytest.approx(1.0)
    assert score_cards(q, {"c": card}, 0.5)["c"] == pytest.approx((centroid + 1) / 2)
    assert score_cards(e[2], {"c": card}, 0.5)["c"] == pytest.approx(0.0)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"threshold": 2.0}, "threshold"),
    ({"margin": -0.1}, "margin"),
    ({"example_weight": 1.5}, "example_weight"),
])
def test_config_refuses_bad_values(kwargs: dict[str, float], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        RouterConfig(**kwargs)


def test_router_on_minilm() -> None:
    embedder = get_embedder()
    calls: list[int] = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return embedder.encode(texts)

    router = AdapterRouter(encode, RouterConfig(threshold=0.2, margin=0.03))
    router.set_card("t/sql", "Writes SQL queries and designs database schemas.",
                    ["Join two tables on customer id", "Why is my query slow?"])
    router.set_card("t/cook", "Recipes and cooking techniques for home cooks.",
                    ["How long do I bake bread?"])
    router.set_card("t/empty", "", [])  # nothing to match: never picked
    assert calls == []  # cards are embedded on first use
    choice = router.route("Write a query that counts orders per customer",
                          ["t/sql", "t/cook", "t/empty"])
    assert choice.adapter == "t/sql" and not choice.cache_preferred
    assert [n for n, _ in choice.ranked] == ["t/sql", "t/cook"]
    assert calls == [5, 1]  # both cards in one batch, then the query
    assert router.route("How do I caramelize onions?", ["t/sql", "t/cook"]).adapter == "t/cook"
    assert router.route("How do I caramelize onions?", ["t/sql"]).adapter is None  # too far
    router.remove("t/cook")
    assert router.route("How do I caramelize onions?", ["t/cook"]).ranked == ()


def test_labeled_set_is_well_formed() -> None:
    cards = load_cards()
    rows = load_labeled()
    assert len(cards) >= 8 and len(rows) >= 150
    assert all(c["description"] and len(c["examples"]) >= 3 for c in cards.values())
    assert {y for _, y in rows} == {*cards, None}
    prompts = [p.strip().lower() for p, _ in rows]
    assert len(set(prompts)) == len(prompts)
    examples = {e.strip().lower() for c in cards.values() for e in c["examples"]}
    assert not examples & set(prompts), "labeled prompts must not copy card examples"


def test_accuracy_on_the_labeled_set_beats_lexical_overlap() -> None:
    """`pice bench aas` measures the same thing; this guards against a regression."""
    cards = load_cards()
    rows = load_labeled()
    embedder = get_embedder()
    vectors = {n: card_vectors(embedder.encode([c["description"], *c["examples"]]))
               for n, c in cards.items()}
    queries = embedder.encode([p for p, _ in rows])  # [n, 384]
    labels = [y for _, y in rows]
    cfg = RouterConfig()
    emb = evaluate([score_cards(q, vectors, cfg.example_weight) for q in queries], labels,
                   cfg.threshold)
    lex = evaluate([lexical_scores(p, cards) for p, _ in rows], labels, 1e-9)
    assert emb["accuracy"] >= 0.75 and emb["top3_in_domain"] >= 0.9
    assert emb["accuracy"] > lex["accuracy"] + 0.15
