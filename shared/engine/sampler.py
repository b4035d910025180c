"""Next-token choice per sequence: greedy, or temperature / top-k / top-p with a per-sequence
seeded generator. Log-probabilities are of the chosen token under the model (temperature 1)."""

from __future__ import annotations

import torch

from pice.shared.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
    """logits: [batch, vocab] float32, one row per sequence."""
    logprobs = logits.log_softmax(-1)  # [batch, vocab]
    chosen = logits.argmax(-1)  # [batch]; greedy rows keep it
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        scores = logits[row] / p.temperature  # [vocab]
        if p.top_k:
            kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = scores.sort(descending=True)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop = cum - sorted_scores.softmax(-1) >= p.top_p  # keep the smallest set >= top_p
            scores = scores.scatter(0, order[drop], float("-inf"))
        probs = scores.softmax(-1)
        chosen[row] = torch.multinomial(probs, 1, generator=seq.generator).item()
    ids = chosen.tolist()
    return ids, logprobs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
