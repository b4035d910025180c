"""The quality bench's judge: corruptions, deterministic structure checks, an antisymmetric
comparison (no position to be biased by), engine scores equal to transformers', and the
validation report's accounting of both orders and position bias."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pice.bench.judge import (
    CORRUPTIONS,
    SIGNALS,
    Profile,
    compare,
    corrupt,
    defects,
    key,
    profile,
    reversed_sentences,
    self_preference,
    summarize,
    validate,
)
from pice.bench.judge_lm import CRITERIA, dense_weights, score_answer
from pice.cloud.garbage import problem
from pice.kernels.quant_linear import QuantLinear
from pice.shared.engine.generator import EngineGenerator
from pice.shared.hf_backend import HFGenerator

FULL = ("Good sleep comes from habits.\n\n"
        "1. Keep a fixed schedule: Go to bed and get up at the same time every day.\n"
        "2. Make the room dark: Curtains and no screens help the body wind down.\n"
        "3. Avoid late caffeine: Coffee after noon keeps many people awake.\n"
        "4. Move every day: Exercise deepens sleep, but not right before bed.")
QUESTION = "How can I sleep better?"


def test_corruptions() -> None:
    out = corrupt(FULL)
    assert set(out) == set(CORRUPTIONS)
    assert out["truncated"].endswith(" and") and len(out["truncated"]) < len(FULL)
    assert sorted(out["shuffled"].split()) == sorted(FULL.split()) and out["shuffled"] != FULL
    assert out["point removed"].count("\n") == FULL.count("\n") - 1
    last = out["echoed"].splitlines()[-1]
    assert last.startswith("4. Move every day: Keep a fixed schedule 2. Make the room dark")
    body = last.split(": ", 1)[1]
    assert problem(body, "Move every day", ["Keep a fixed schedule", "Make the room dark",
                                            "Avoid late caffeine"]) == "echo"
    lines = out["duplicated"].splitlines()
    assert len(lines) == len(FULL.splitlines()) + 1
    assert len({line.split(". ", 1)[1] for line in lines[2:]}) == 4  # one point twice
    assert set(corrupt("One sentence only.")) == {"truncated", "shuffled"}


def test_structure_checks_find_each_defect_and_pass_the_full_answer() -> None:
    assert defects(FULL) == {"cut_off": 0, "repeated": 0, "echo": 0}
    out = corrupt(FULL)
    assert defects(out["truncated"])["cut_off"] == 1
    assert defects(out["echoed"])["echo"] == 1
    assert defects(out["duplicated"])["repeated"] >= 1
    assert defects(FULL + "\n5. Stay calm: Worry keeps the mind busy, so")["cut_off"] == 1
    assert not any(defects(out["point removed"]).values())
    # sub-bullets inside a point are not an echo of the list
    bullets = FULL.replace("every day.\n2.", "every day.\n   - Even at weekends.\n2.")
    assert defects(bullets)["echo"] == 0


def _profile(answer: str, fluency: float = -1.0, rubric: float = 6.0,
             coherence: float = 0.2) -> Profile:
    return Profile(answer, fluency, dict.fromkeys(CRITERIA, rubric), defects(answer),
                   coherence=coherence)


def test_comparison_is_antisymmetric_and_defects_lose() -> None:
    full = _profile(FULL)
    for kind, bad in corrupt(FULL).items():
        pb = _profile(bad)
        fwd, rev = compare(full, pb), compare(pb, full)
        assert fwd.preference == pytest.approx(-rev.preference, abs=1e-6), kind
        assert set(fwd.signals) == set(SIGNALS)
        if kind != "shuffled":  # equal LM scores here: the text alone decides
            assert fwd.verdict == "first" and rev.verdict == "second", kind
    # the language-model signals decide when the text does not
    same = compare(_profile(FULL, coherence=0.3), _profile(FULL, coherence=0.1))
    assert same.verdict == "first" and same.signals["completeness"] == pytest.approx(0)
    same = compare(_profile(FULL, rubric=7.0), _profile(FULL, rubric=5.0))
    assert same.verdict == "first"
    # plain fluency is reported, never weighed: the judge wrote the greedy reference itself
    own = compare(_profile(FULL, fluency=-0.2), _profile(FULL, fluency=-1.4))
    assert own.signals["fluency"] > 0.9 and own.verdict == "tie"
    tie = compare(_profile(FULL), _profile(FULL))
    assert tie.verdict == "tie" and tie.preference == pytest.approx(0, abs=1e-6)


def test_reversed_sentences_is_the_coherence_control() -> None:
    rev = reversed_sentences(FULL)
    assert rev.startswith("4. Move every day") and rev.endswith("Good sleep comes from habits.")
    assert sorted(rev.split()) == sorted(FULL.split())
    assert reversed_sentences("One sentence only.") == "One sentence only."


def test_engine_scores_match_transformers(tiny_model_dir: Path) -> None:
    """The engine path shares one prefill across the criteria (copied partial block, one
    batched step); transformers runs each whole prompt: the same numbers."""
    engine = EngineGenerator(str(tiny_model_dir), max_context=1024)
    hf = HFGenerator(str(tiny_model_dir), max_context=1024)
    for answer in (FULL, "Sleep."):
        ours, ref = score_answer(engine, QUESTION, answer), score_answer(hf, QUESTION, answer)
        assert len(ours.token_logprobs) == len(ref.token_logprobs) > 0
        assert torch.allclose(torch.tensor(ours.token_logprobs),
                              torch.tensor(ref.token_logprobs), atol=1e-3)
        assert set(ours.rubric) == set(CRITERIA)
        for c in CRITERIA:
            assert 1 <= ours.rubric[c] <= 9
            assert ours.rubric[c] == pytest.approx(ref.rubric[c], abs=1e-3)
        # no criteria: the same answer log-probabilities from one prefill, no rubric
        for gen in (engine, hf):
            plain = score_answer(gen, QUESTION, answer, {})
            assert plain.rubric == {}
            assert torch.allclose(torch.tensor(plain.token_logprobs),
                                  torch.tensor(ref.token_logprobs), atol=1e-3)


def test_dense_weights_swap_in_and_restore(tiny_model_dir: Path) -> None:
    gen = EngineGenerator(str(tiny_model_dir), max_context=1024, quantization="int8")
    layers = [m for m in gen.engine.runner.model.modules() if isinstance(m, QuantLinear)]
    assert layers
    before = score_answer(gen, QUESTION, FULL)
    with dense_weights(gen):
        assert all("forward" in vars(m) for m in layers)
        dense = score_answer(gen, QUESTION, FULL)
    assert not any("forward" in vars(m) for m in layers)
    after = score_answer(gen, QUESTION, FULL)
    assert after.token_logprobs == before.token_logprobs
    assert dense.fluency == pytest.approx(before.fluency, abs=0.05)  # bf16 vs int8 kernel


def test_validate_counts_both_orders_and_position(tiny_model_dir: Path) -> None:
    gen = HFGenerator(str(tiny_model_dir), max_context=1024)
    cache: dict[str, dict[str, object]] = {}
    seen: list[int] = []
    report = validate(gen, [(QUESTION, FULL)], cache, pairwise_pairs=2,
                      on_row=lambda r: seen.append(r["pairs"]))
    assert seen == [5] and report["pairs"] == 5 and len(cache) == 6  # full + 5 corruptions
    judge = report["judge"]
    assert set(judge["by_corruption"]) == set(CORRUPTIONS)
    for row in report["rows"]:  # antisymmetric: the order never changes who is better
        assert row["full_first"] == row["full_second"]
    assert judge["correct_full_first"] == judge["correct_full_second"]
    assert judge["first_shown_wins"] == 0.5  # one verdict per order, never the position
    assert set(report["signals_alone"]) == set(SIGNALS)
    ab = report["pairwise_ab"]
    assert ab["pairs"] == 2 and 0 <= ab["first_shown_wins"] <= 1
    assert report["trusted"] in (None, "profile")
    # a cached profile is reused: the same report without the model
    again = validate(gen, [(QUESTION, FULL)], cache)
    assert [r["preference"] for r in again["rows"]] == [r["preference"] for r in report["rows"]]
    assert profile(gen, QUESTION, FULL, cache).fluency == cache[key(QUESTION, FULL)]["fluency"]
    # coherence: the answer's log-probability less its reversed sentences' (random model: any
    # sign, but measured, and cached beside the rest)
    p = profile(gen, QUESTION, FULL, cache)
    assert p.coherence == cache[key(QUESTION, FULL)]["coherence"] != 0.0


def test_self_preference_reports_each_signal_on_greedy_vs_sampled(tiny_model_dir: Path) -> None:
    gen = HFGenerator(str(tiny_model_dir), max_context=1024)
    out = corrupt(FULL)
    report = self_preference(gen, [(QUESTION, FULL), (QUESTION, out["point removed"])],
                             [out["truncated"], FULL])
    assert report["pairs"] == 2 and set(report["prefers_greedy"]) == set(SIGNALS)
    assert set(report["mean_gap"]) == {"fluency", "coherence", "rubric"}
    assert sum(report["verdict"].values()) == pytest.approx(1.0)
    first = report["rows"][0]  # a full answer vs its truncation: structure and verdict agree
    assert first["signals"]["structure"] > 0 and first["verdict"] == "first"
    assert self_preference(gen, [], []) == {"pairs": 0}


def test_summary_position_bias_accounting() -> None:
    """A judge that always picks the answer shown first is right half the time, in neither
    order both, with first_shown_wins 1.0; the A/B baseline is scored the same way."""
    rows = [{"item": 0, "corruption": c, "full_first": True, "full_second": False,
             "preference": 0.5, "signals": dict.fromkeys(SIGNALS, 0.5),
             "p_full_first": 0.8, "p_full_second": 0.3} for c in CORRUPTIONS]
    report = summarize(rows)
    assert report["judge"]["correct_both_orders"] == 0.0
    assert report["judge"]["first_shown_wins"] == 1.0 and not report["judge"]["passed"]
    assert report["pairwise_ab"]["correct_both_orders"] == 0.0
    assert report["pairwise_ab"]["correct_averaged_orders"] == 1.0
    assert report["pairwise_ab"]["first_shown_wins"] == 1.0
    assert report["trusted"] is None
