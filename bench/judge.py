"""The quality bench's judges, and their validation on pairs whose better answer is known.

Two judges read the cloud model's logits (no free text):
- `pairwise`: both answers in one prompt, P("A") vs P("B"); asked in both orders;
- `rubric`: one answer alone, scored 1-9 on a rubric (covers the question, every point explained,
  in order, no repetition or echoed list, not cut off); the score is the expected value over the
  digit tokens. It sees one answer at a time, so it has no position to be biased by.

`validate` builds, from full answers, four corruptions each (truncated, sentences shuffled, a
point removed, a point's text replaced by an echo of the list) and counts how often each judge
prefers the full answer: the pairwise judge must do so in both orders; its position bias (how
often the answer shown first wins, whatever it is) is reported beside it."""

from __future__ import annotations

import math
import random
import re
import statistics
from typing import Any, cast

import torch

from pice.shared.backend import TextGenerator

CORRUPTIONS = ("truncated", "shuffled", "point removed", "echoed")
PASS = 0.9  # a judge is trusted at or above this share of correct verdicts
RUBRIC = ("You grade answers. Score the answer from 1 (useless) to 9 (excellent). A 9 answers "
          "the whole question; explains every point it makes with a reason or an example; is "
          "complete, not cut off mid-sentence; has its parts in a sensible order; never repeats "
          "itself or lists other points inside a point. Reply with one digit.")
PAIRWISE = ("You are a strict, fair judge of answers. Compare two answers to the same question "
            "for correctness, helpfulness, completeness and clarity. Ignore length unless it "
            "hurts the answer. Reply with a single letter: A or B.")
_ITEM = re.compile(r"^\s*(\d{1,2})[.)]\s+", re.M)


def _items(answer: str) -> tuple[str, list[str]]:
    """(text before the first numbered item, the items)."""
    parts = _ITEM.split(answer)
    if len(parts) < 5:  # fewer than two items
        return answer, []
    head, rest = parts[0], parts[1:]
    return head, [rest[i + 1].strip() for i in range(0, len(rest), 2)]


def _join(head: str, items: list[str]) -> str:
    return (head.rstrip() + "\n\n" if head.strip() else "") + "\n".join(
        f"{i + 1}. {t}" for i, t in enumerate(items))


def corrupt(answer: str, seed: int = 0) -> dict[str, str]:
    """The four corruptions of `answer` (those that apply: a list needs two items or more)."""
    rng = random.Random(seed)
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", answer.strip()) if s]
    out = {"truncated": " ".join(sentences[:max(1, len(sentences) * 2 // 5)]).rstrip(".!?")
           + " and"}
    shuffled = list(sentences)
    while len(shuffled) > 2 and shuffled == sentences:
        rng.shuffle(shuffled)
    out["shuffled"] = " ".join(shuffled)
    head, items = _items(answer)
    if len(items) >= 3:
        out["point removed"] = _join(head, items[:len(items) // 2] + items[len(items) // 2 + 1:])
        titles = [t.split(":")[0].strip() for t in items]
        k = len(items) - 1
        echo = " ".join(f"{i + 1}. {t}" if i else t for i, t in enumerate(titles[:k]))
        out["echoed"] = _join(head, [*items[:k], f"{titles[k]}: {echo}"])
    return out


@torch.inference_mode()
def next_token_logits(gen: TextGenerator, prompt: str) -> torch.Tensor:
    """Logits [vocab] of the token after `prompt`: one prefill of the loaded model (the engine's
    own weights in a private KV cache; call it while the engine is idle)."""
    engine = getattr(gen, "engine", None)
    if engine is None:  # transformers backend
        model = gen.model  # type: ignore[attr-defined]
        ids = gen.chat.encode(prompt)  # type: ignore[attr-defined]
        return cast(torch.Tensor, model(input_ids=torch.tensor([ids])).logits[0, -1].float())
    from pice.kernels.paged_attention import build_metadata

    runner = engine.runner
    model, bs = runner.model, runner.cfg.block_size
    ids = gen.chat.encode(prompt)  # type: ignore[attr-defined]
    n, nb = len(ids), math.ceil(len(ids) / bs)
    shape = (nb, bs, model.num_kv_heads, model.head_dim)
    kv = [(torch.zeros(shape, dtype=runner.dtype, device=runner.device),
           torch.zeros(shape, dtype=runner.dtype, device=runner.device))
          for _ in range(model.num_layers)]  # each [blocks, block_size, kv_heads, head_dim]
    meta = build_metadata([list(range(nb))], [n], [n], bs, runner.device)
    hidden = model(torch.tensor(ids, dtype=torch.long, device=runner.device), kv, meta)
    return cast(torch.Tensor, model.compute_logits(hidden[-1:])[0].float().cpu())  # [vocab]


def _prompt(gen: TextGenerator, system: str, user: str) -> str:
    return gen.render_chat([{"role": "system", "content": system},
                            {"role": "user", "content": user}])


def pairwise(gen: TextGenerator, question: str, first: str, second: str) -> float:
    """P(first answer better), from the logits of "A" and "B" (renormalized over the two)."""
    logits = next_token_logits(gen, _prompt(
        gen, PAIRWISE, f"Question: {question}\n\n[Answer A]\n{first}\n\n[Answer B]\n{second}\n\n"
                       "Which answer is better, A or B?"))
    a, b = gen.chat.encode("A")[0], gen.chat.encode("B")[0]  # type: ignore[attr-defined]
    return float(torch.softmax(logits[[a, b]], -1)[0])


def rubric(gen: TextGenerator, question: str, answer: str) -> float:
    """Expected rubric score in [1, 9] from the logits of the digits 1-9."""
    logits = next_token_logits(gen, _prompt(
        gen, RUBRIC, f"Question: {question}\n\n[Answer]\n{answer}\n\nScore (1-9):"))
    ids = [gen.chat.encode(str(d))[0] for d in range(1, 10)]  # type: ignore[attr-defined]
    p = torch.softmax(logits[ids], -1)  # [9]
    return float((p * torch.arange(1, 10, dtype=p.dtype)).sum())


def validate(gen: TextGenerator, items: list[tuple[str, str]], judges: tuple[str, ...] = (
        "pairwise", "rubric"), progress: Any = None,
        on_row: Any = None) -> dict[str, Any]:
    """`items`: (question, full answer). Per judge: share correct overall and per corruption
    (pairwise: in both orders), and the pairwise judge's position bias. `on_row(report)` gets
    the report so far after every pair (a long run keeps what it did)."""
    rows: list[dict[str, Any]] = []
    for n, (question, full) in enumerate(items):
        full_score = rubric(gen, question, full) if "rubric" in judges else None
        for kind, bad in corrupt(full, seed=n).items():
            row: dict[str, Any] = {"item": n, "corruption": kind}
            if "pairwise" in judges:
                first = pairwise(gen, question, full, bad)  # P(full better), full shown first
                second = 1 - pairwise(gen, question, bad, full)  # ... full shown second
                row.update(p_full_first=first, p_full_second=second,
                           correct_pairwise=first > 0.5 and second > 0.5)
            if full_score is not None:
                bad_score = rubric(gen, question, bad)
                row.update(score_full=full_score, score_corrupt=bad_score,
                           correct_rubric=full_score > bad_score)
            rows.append(row)
            if progress is not None:
                progress.update(1)
            if on_row is not None:
                on_row(summarize(rows, judges))
    return summarize(rows, judges)


def summarize(rows: list[dict[str, Any]], judges: tuple[str, ...]) -> dict[str, Any]:
    report: dict[str, Any] = {"pairs": len(rows), "pass_at": PASS, "rows": rows}
    for j in judges:
        key = f"correct_{j}"
        ok = [r[key] for r in rows]
        per = {c: statistics.fmean(r[key] for r in rows if r["corruption"] == c)
               for c in CORRUPTIONS if any(r["corruption"] == c for r in rows)}
        report[j] = {"correct": statistics.fmean(ok) if ok else 0.0, "by_corruption": per,
                     "passed": bool(ok) and statistics.fmean(ok) >= PASS}
    if "pairwise" in judges and rows:
        # how often the answer shown first is preferred, whichever it is (0.5: no bias)
        firsts = [r["p_full_first"] > 0.5 for r in rows] + [r["p_full_second"] <= 0.5
                                                             for r in rows]
        report["pairwise"]["position_bias_first_wins"] = statistics.fmean(firsts)
    passed = [j for j in judges if report[j]["passed"]]
    report["trusted"] = passed[0] if passed else None
    return report
