"""The quality bench's judge, and its validation on pairs whose better answer is known.

Small models asked to write "A" or "B" prefer whatever they see first (the 1.5B cloud model picked
the first-shown answer in 100% of pairs, bench/results/quality_judge.json of the last run). This
judge never shows two answers in one prompt and never samples a token. It profiles each answer
alone, then compares two profiles with a rule that is antisymmetric by construction
(compare(a, b) == -compare(b, a)), so neither answer has a position:

- structure (deterministic, plain text): cut off mid-sentence, repeated sentences, a numbered
  point that echoes or lists the other points (cloud/garbage.py's detectors);
- completeness: how much of the other answer's content this one covers (MiniLM: mean over the
  other answer's sentences of the best cosine with one of this answer's), minus the reverse;
- coherence: how much the answer's own order helps the judge model read it: the mean
  log-probability of its tokens, given the question, less that of the same sentences in reverse
  order (shuffled, disordered text gains nothing from its order);
- rubric: the judge model's expected 1-9 score (probability-weighted over the digit tokens) on
  four criteria (completeness, coherence, non-repetition, relevance), averaged;
- fluency (reported, weight 0): the plain mean log-probability. The judge model also writes the
  full-cloud answers, greedily: its log-probability of its own greedy text is near the maximum
  by construction (-0.26 nats per token on a cloud answer vs -1.39 on a progressive answer of
  the same question, 2026-12-01 run; a greedy answer beats a sample of the same model at
  temperature 0.8 by a margin that `self_preference` reports), so as a verdict signal it
  measures "written by me", not quality. Coherence compares each answer with itself, which
  cancels most of that.

Each signal becomes a preference in [-1, 1] (tanh of the difference over its scale); the verdict
is their weighted mean, a tie within TIE. `validate` checks the judge on full answers against
the same answer truncated, shuffled, with a point removed, a point echoing the list, or a point
duplicated, in both orders, and reports each signal alone beside the combination; the classic
pairwise A/B prompt is measured beside it (position bias, and its average over both orders)."""

from __future__ import annotations

import hashlib
import math
import random
import re
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pice.bench.judge_lm import LMScore, pair_logits, score_answer
from pice.cloud.garbage import _mentions, _repeats, words
from pice.shared.backend import TextGenerator
from pice.shared.embeddings import get_embedder

CORRUPTIONS = ("truncated", "shuffled", "point removed", "echoed", "duplicated")
PASS = 0.9  # a judge is trusted at or above this share of correct verdicts, in both orders
TIE = 0.05  # |preference| below this is a tie
# signal → (weight, scale of a clear difference)
SIGNALS: dict[str, tuple[float, float]] = {
    "structure": (2.0, 1.0),  # defects (count)
    "completeness": (1.0, 0.05),  # coverage difference
    "coherence": (1.0, 0.05),  # nats per token gained from the answer's own order
    "rubric": (1.0, 0.5),  # points on the 1-9 scale
    "fluency": (0.0, 0.05),  # nats per token: reported, not weighed (self-preference, above)
}
_ITEM = re.compile(r"^\s*(\d{1,2})[.)]\s+", re.M)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_INLINE = re.compile(r"\s\d{1,2}[.)]\s+[A-Z]")  # "… tasks 2. Use …": a list inside a point
_END = re.compile(r"""[.!?…)\]"'`*]\s*$""")
_DANGLING = frozenset({"and", "or", "but", "the", "a", "an", "of", "to", "with", "for", "in", "on",
                       "that", "which", "because"})


def items(answer: str) -> tuple[str, list[str]]:
    """(text before the first numbered item, the items)."""
    parts = _ITEM.split(answer)
    if len(parts) < 5:  # fewer than two items
        return answer, []
    head, rest = parts[0], parts[1:]
    return head, [rest[i + 1].strip() for i in range(0, len(rest), 2)]


def _join(head: str, its: list[str]) -> str:
    return (head.rstrip() + "\n\n" if head.strip() else "") + "\n".join(
        f"{i + 1}. {t}" for i, t in enumerate(its))


def sentences(text: str) -> list[str]:
    parts = _SENTENCE.split(text)
    return [re.sub(r"^\s*(?:\d{1,2}[.)]|[-*•])\s*", "", p).strip() for p in parts
            if len(words(p)) >= 2]


def corrupt(answer: str, seed: int = 0) -> dict[str, str]:
    """The corruptions of `answer` that apply (the list ones need three numbered items)."""
    rng = random.Random(seed)
    sents = [s for s in re.split(r"(?<=[.!?])\s+", answer.strip()) if s]
    out = {"truncated": " ".join(sents[:max(1, len(sents) * 2 // 5)]).rstrip(".!?") + " and"}
    shuffled = list(sents)
    while len(shuffled) > 2 and shuffled == sents:
        rng.shuffle(shuffled)
    out["shuffled"] = " ".join(shuffled)
    head, its = items(answer)
    if len(its) >= 3:
        mid = len(its) // 2
        out["point removed"] = _join(head, its[:mid] + its[mid + 1:])
        titles = [t.split(":")[0].strip() for t in its]
        k = len(its) - 1
        echo = " ".join(f"{i + 1}. {t}" if i else t for i, t in enumerate(titles[:k]))
        out["echoed"] = _join(head, [*its[:k], f"{titles[k]}: {echo}"])
        j = rng.randrange(len(its) - 1)
        out["duplicated"] = _join(head, [*its[:j + 1], its[j], *its[j + 1:]])
    return out


def reversed_sentences(answer: str) -> str:
    """The answer's sentences (and list items) in reverse order: the coherence control."""
    # a sentence end, not a list number ("4. Move"), or a line break
    parts = [p for p in re.split(r"(?<=[.!?])(?<!\d\.)\s+|\n+", answer.strip()) if p.strip()]
    return " ".join(reversed(parts))


def defects(answer: str) -> dict[str, int]:
    """Structural faults any reader sees: cut off, sentences said twice, points that echo the
    list of points or repeat themselves."""
    text = answer.strip()
    last = words(text[-40:])
    cut = int(bool(text) and (not _END.search(text) or (bool(last) and last[-1] in _DANGLING
                                                           and not _END.search(text[-1:]))))
    norm = [" ".join(words(s)) for s in sentences(text) if len(words(s)) >= 4]
    repeated = len(norm) - len(set(norm))
    _, its = items(text)
    titles = [t.split(":")[0].strip() for t in its]
    echo = 0
    for i, t in enumerate(its):
        body = (t.split(":", 1)[1].strip() if ":" in t else t).split("\n\n")[0]
        others = titles[:i] + titles[i + 1:]
        # a list inside the point, a point repeating itself, or one naming most other points
        # (referring back to one or two of them is ordinary prose; a closing paragraph after
        # the last item is not part of it)
        echo += bool(_INLINE.search(body) or _repeats(body)
                     or sum(_mentions(body, o) >= 0 for o in others) >= 3)
    return {"cut_off": cut, "repeated": repeated, "echo": echo}


@dataclass
class Profile:
    """What the judge knows about one answer alone."""

    answer: str
    fluency: float  # mean token log-probability (nats)
    rubric: dict[str, float]  # criterion → expected 1-9 score
    defects: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    coherence: float = 0.0  # fluency less that of reversed_sentences(answer) (nats)

    @property
    def rubric_mean(self) -> float:
        return statistics.fmean(self.rubric.values()) if self.rubric else 5.0

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "answer"}


def key(question: str, answer: str) -> str:
    return hashlib.sha256(f"{question}\x00{answer}".encode()).hexdigest()[:24]


def profile(gen: TextGenerator, question: str, answer: str,
            cache: dict[str, dict[str, Any]] | None = None) -> Profile:
    """The answer's profile; `cache` (key → profile dict) is read and filled."""
    k = key(question, answer)
    if cache is not None and "coherence" in cache.get(k, {}):
        d = cache[k]
        return Profile(answer, d["fluency"], d["rubric"], defects(answer), d.get("tokens", 0),
                       d["coherence"])
    lm: LMScore = score_answer(gen, question, answer)
    rev = reversed_sentences(answer)
    control = lm.fluency if rev == answer else score_answer(gen, question, rev, {}).fluency
    p = Profile(answer, lm.fluency, lm.rubric, defects(answer), len(lm.token_logprobs),
                lm.fluency - control)
    if cache is not None:
        cache[k] = p.as_dict()
    return p


def coverage(of: str, by: str) -> float:
    """How much of `of`'s content `by` says: mean over `of`'s sentences of the best cosine with a
    sentence of `by` (1.0: every sentence is there)."""
    ref, ans = sentences(of), sentences(by)
    if not ref:
        return 1.0
    if not ans:
        return 0.0
    sims = get_embedder().similarity(ref, ans)  # [ref, ans]
    return float(sims.max(axis=1).clip(0, 1).mean())


@dataclass
class Comparison:
    preference: float  # > 0: the first answer is better; antisymmetric in the two answers
    signals: dict[str, float]  # each signal's preference in [-1, 1]
    verdict: str  # "first" | "second" | "tie"


def compare(a: Profile, b: Profile) -> Comparison:
    """a vs b from their profiles (and a coverage of each by the other)."""
    diffs = {
        "structure": sum(b.defects.values()) - sum(a.defects.values()),
        "completeness": coverage(b.answer, a.answer) - coverage(a.answer, b.answer),
        "coherence": a.coherence - b.coherence,
        "rubric": a.rubric_mean - b.rubric_mean,
        "fluency": a.fluency - b.fluency,
    }
    signals = {s: math.tanh(d / SIGNALS[s][1]) for s, d in diffs.items()}
    pref = sum(SIGNALS[s][0] * v for s, v in signals.items()) / sum(
        w for w, _ in SIGNALS.values())
    return Comparison(pref, signals, "first" if pref > TIE else "second" if pref < -TIE
                      else "tie")


def _share(xs: list[bool]) -> float:
    return statistics.fmean(xs) if xs else 0.0


def validate(gen: TextGenerator, pairs_from: list[tuple[str, str]],
             cache: dict[str, dict[str, Any]] | None = None, pairwise_pairs: int = 0,
             on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """`pairs_from`: (question, full answer). Every corruption of each answer is judged against
    it in both orders (full first, then second). `pairwise_pairs`: how many of those pairs the
    A/B prompt also judges (two long prefills each). `on_row(report so far)` after every
    answer."""
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    for n, (question, full) in enumerate(pairs_from):
        pf = profile(gen, question, full, cache)
        for kind, bad in corrupt(full, seed=n).items():
            pb = profile(gen, question, bad, cache)
            fwd, rev = compare(pf, pb), compare(pb, pf)
            row: dict[str, Any] = {
                "item": n, "corruption": kind,
                "full_first": fwd.verdict == "first", "full_second": rev.verdict == "second",
                "preference": fwd.preference, "signals": fwd.signals,
                "defects_full": pf.defects, "defects_corrupt": pb.defects}
            if len([r for r in rows if "p_full_first" in r]) < pairwise_pairs:
                p1 = pair_logits(gen, question, full, bad)  # P(full better), full shown first
                p2 = 1 - pair_logits(gen, question, bad, full)  # ... full shown second
                row.update(p_full_first=p1, p_full_second=p2)
            rows.append(row)
        report = summarize(rows)
        if on_row is not None:
            on_row(report)
    return report or summarize(rows)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {c: [r for r in rows if r["corruption"] == c] for c in CORRUPTIONS}
    by = {c: rs for c, rs in by.items() if rs}

    def acc(pred: Callable[[dict[str, Any]], bool], sel: list[dict[str, Any]]) -> float:
        return _share([pred(r) for r in sel])

    both = [r["full_first"] and r["full_second"] for r in rows]
    firsts = [r["full_first"] for r in rows] + [not r["full_second"] for r in rows]
    composite = {
        "correct_both_orders": _share(both),
        "correct_full_first": acc(lambda r: r["full_first"], rows),
        "correct_full_second": acc(lambda r: r["full_second"], rows),
        "by_corruption": {c: {"full_first": acc(lambda r: r["full_first"], rs),
                              "full_second": acc(lambda r: r["full_second"], rs)}
                          for c, rs in by.items()},
        # share of verdicts that went to the answer shown first (0.5 with no bias, ties count
        # as not first)
        "first_shown_wins": _share(firsts),
        # correct in both orders on at least PASS of all pairs
        "passed": bool(rows) and _share(both) >= PASS,
    }

    def signal_right(s: str, sel: list[dict[str, Any]]) -> float:
        return _share([r["signals"][s] > 0 for r in sel])

    # each signal alone (a preference > 0 for the full answer counts as correct)
    alone = {s: {"correct": signal_right(s, rows),
                 "by_corruption": {c: signal_right(s, rs) for c, rs in by.items()}}
             for s in SIGNALS}
    report: dict[str, Any] = {"pairs": len(rows), "pass_at": PASS, "judge": composite,
                              "signals_alone": alone, "weights": SIGNALS, "tie_below": TIE}
    pw = [r for r in rows if "p_full_first" in r]
    if pw:
        report["pairwise_ab"] = {
            "pairs": len(pw),
            "correct_both_orders": acc(lambda r: r["p_full_first"] > 0.5
                                       and r["p_full_second"] > 0.5, pw),
            "correct_averaged_orders": acc(lambda r: r["p_full_first"] + r["p_full_second"]
                                           > 1.0, pw),
            "first_shown_wins": _share([r["p_full_first"] > 0.5 for r in pw]
                                       + [r["p_full_second"] <= 0.5 for r in pw]),
        }
    report["trusted"] = "profile" if composite["passed"] else None
    report["rows"] = rows
    return report


def self_preference(gen: TextGenerator, greedy: list[tuple[str, str]], sampled: list[str],
                    cache: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The judge model's own greedy answers (`greedy`: question, answer) against samples of the
    same model on the same questions (`sampled`, e.g. temperature 0.8): each signal's mean gap
    and the share of pairs where it prefers the greedy text. A signal that always prefers the
    greedy text by a wide margin measures "the judge's own mode", and would hand every
    comparison with the greedy full-cloud answer to it; the verdicts are reported too."""
    rows: list[dict[str, Any]] = []
    for (question, g), s in zip(greedy, sampled, strict=True):
        pg, ps = profile(gen, question, g, cache), profile(gen, question, s, cache)
        c = compare(pg, ps)
        rows.append({"fluency_gap": pg.fluency - ps.fluency,
                     "coherence_gap": pg.coherence - ps.coherence,
                     "rubric_gap": pg.rubric_mean - ps.rubric_mean,
                     "signals": c.signals, "verdict": c.verdict})
    if not rows:
        return {"pairs": 0}
    return {
        "pairs": len(rows),
        "mean_gap": {k: statistics.fmean(r[f"{k}_gap"] for r in rows)
                     for k in ("fluency", "coherence", "rubric")},
        "prefers_greedy": {s: _share([r["signals"][s] > TIE for r in rows]) for s in SIGNALS},
        "verdict": {v: _share([r["verdict"] == w for r in rows])
                    for v, w in (("greedy", "first"), ("sampled", "second"), ("tie", "tie"))},
        "rows": rows,
    }
