"""Next-token choice per sequence: greedy, or temperature / top-k / top-p with a per-sequence
seeded generator. Log-probabilities are of the chosen token under the model (temperature 1).

Numerically safe for any parameter value validation lets through (a temperature of 1e-38, a
top_p of 1e-46): scores are shifted so their maximum is 0 before dividing by the temperature,
so they stay in [-inf, 0] and the best token always keeps probability > 0; top-p always keeps
the best token. A row the model made non-finite (NaN, +Inf, or no finite score), or whose
sampling raises for any other reason, is that sequence's fault alone: `sample` records why in
the sequence's `fault` and chooses for every other row as usual."""

from __future__ import annotations

import math

import torch

from pice.shared.engine.sequence import Sequence
from pice.shared.sampling import SamplingParams

_F32 = torch.finfo(torch.float32)
FAULT_TOKEN = -1  # the token reported for a faulted row (never appended to a sequence)


def row_fault(row: torch.Tensor) -> str | None:
    """Why one row of logits [vocab] cannot be sampled from, or None. -Inf entries are fine
    (probability zero); NaN, +Inf, or a row with no finite score are not."""
    if bool(torch.isnan(row).any()):
        return "the model's logits became NaN"
    if bool(torch.isposinf(row).any()):
        return "the model's logits became +Inf"
    if not bool(torch.isfinite(row).any()):
        return "the model's logits hold no finite value"
    return None


def _choose(logits: torch.Tensor, p: SamplingParams,
            generator: torch.Generator | None) -> int:
    """One token from a row of finite-max logits [vocab]."""
    # shifted: [vocab] in [-inf, 0], the best token(s) exactly 0, so dividing by any positive
    # temperature (however small) gives no NaN and exp(0) = 1 keeps the best token possible
    shifted = logits - logits.max()
    if not (p.temperature > 0 and math.isfinite(p.temperature)):
        raise ValueError(f"temperature must be a finite number > 0 here, got {p.temperature}")
    # in float32's normal range: 5e-324 would round to 0 (0 / 0 is NaN), 1e300 to inf
    temperature = min(max(p.temperature, _F32.tiny), _F32.max)
    scores = shifted / temperature  # [vocab], in [-inf, 0]
    if p.top_k:
        kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)  # [vocab] each
        probs_sorted = sorted_scores.softmax(-1)
        before = probs_sorted.cumsum(-1) - probs_sorted  # mass strictly ahead of each token
        drop = before >= p.top_p  # keep the smallest set reaching top_p ...
        drop[0] = False  # ... and always the best token (top_p may round to 0)
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = scores.softmax(-1)  # [vocab]; the best token has probability > 0
    return int(torch.multinomial(probs, 1, generator=generator).item())


def held_back(seq: Sequence) -> tuple[int, ...]:
    """The tokens `seq` may not choose now: its ending ones while it is under min_tokens."""
    return seq.ending_ids if seq.num_completion_tokens < seq.params.min_tokens else ()


def sample(logits: torch.Tensor, seqs: list[Sequence],
           held: list[tuple[int, ...]] | None = None) -> tuple[list[int], list[float]]:
    """logits: [batch, vocab] float32, one row per sequence. `held`: per row, tokens that cannot
    be chosen at this step (default: `held_back` of each sequence; an edge group's last stage
    passes its own, as its sequences hold no token history). Returns the chosen token and its
    log-probability per row; a faulted row gets FAULT_TOKEN and NaN, and its sequence's
    `fault` says why (the engine ends that sequence alone)."""
    logits = logits.float()
    # the model's own rows, checked once before min_tokens adds its -inf on purpose (a masked
    # row would otherwise take row_fault's three full-vocabulary passes every step)
    finite = torch.isfinite(logits).all(-1).tolist()  # [batch]
    held = [held_back(s) for s in seqs] if held is None else held
    if any(held):  # min_tokens: those rows cannot end yet (their other tokens renormalize)
        logits = logits.clone()
        for row, masked in enumerate(held):
            if masked:
                logits[row, list(masked)] = float("-inf")
    logprobs = logits.log_softmax(-1)  # [batch, vocab]
    chosen = logits.argmax(-1)  # [batch]; greedy rows keep it
    faulted: set[int] = set()
    for row, seq in enumerate(seqs):
        reason = None if finite[row] else row_fault(logits[row])
        if reason is None and not seq.params.greedy:
            try:
                chosen[row] = _choose(logits[row], seq.params, seq.generator)
            except Exception as exc:  # anything else: this row's fault, never the step's
                reason = f"sampling failed ({type(exc).__name__}: {exc})"
        if reason is not None:
            seq.fault = reason
            faulted.add(row)
    ids = chosen.tolist()
    lps = logprobs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()  # [batch]
    for row, seq in enumerate(seqs):  # the rows that asked for top_logprobs
        if seq.params.top_logprobs and row not in faulted:
            top = logprobs[row].topk(seq.params.top_logprobs)  # [n] values and indices
            seq.top_logprobs.append(list(zip(top.indices.tolist(), top.values.tolist(),
                                             strict=True)))
    for row in faulted:
        ids[row], lps[row] = FAULT_TOKEN, math.nan
    return ids, lps
