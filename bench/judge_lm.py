"""What the judge reads from a language model: prefill only, no generated text.

`score_answer` runs ONE prefill of a grading prompt that holds the question and the answer, and
then, for every rubric criterion, a short suffix that asks for a 1-9 digit. The suffixes share the
prefix's KV cache (on the engine: one batched step over copies of the prefix's last block), so
four criteria cost about one prefill. From that pass it returns:
- the log-probability of each answer token given the question (how natural the text reads to the
  model: shuffled sentences and non sequiturs lower it);
- per criterion, the probability-weighted expected digit (G-Eval style), never a sampled token.

`pair_logits` is the classic pairwise prompt (both answers, P("A") vs P("B")) kept as a baseline:
its position bias is measured, not trusted. Every function borrows the loaded model's weights and
must run while the engine is idle (the bench's judge phase)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch

from pice.shared.backend import TextGenerator

GRADER = "You are a careful, strict grader of answers to questions."
CRITERIA: dict[str, str] = {
    "completeness": "completeness: it covers the whole question and explains each point it "
                    "makes with a reason or an example, and it is not cut off",
    "coherence": "coherence: its sentences and points are in a sensible order, each one "
                 "following from what comes before",
    "non-repetition": "non-repetition: no point, sentence or list is said twice, and no point "
                      "lists the other points inside it",
    "relevance": "relevance: every part of it answers the question that was asked",
}
DIGITS = tuple(str(d) for d in range(1, 10))
_MARK = "\u0000ANSWER_END\u0000"


@dataclass
class LMScore:
    token_logprobs: list[float]  # each answer token's log-probability given what precedes it
    rubric: dict[str, float]  # criterion → expected digit in [1, 9]

    @property
    def fluency(self) -> float:
        """Mean answer-token log-probability (nats; 0 is the maximum)."""
        lp = self.token_logprobs
        return sum(lp) / len(lp) if lp else 0.0


def _tok(gen: TextGenerator) -> Any:
    return gen.chat  # type: ignore[attr-defined]


def _split_prompt(gen: TextGenerator, question: str, answer: str,
                  criterion: str) -> tuple[list[int], int, list[int]]:
    """(prefix ids ending with the answer, where the answer's ids start, suffix ids)."""
    user = (f"Question: {question}\n\nAnswer:\n{answer}{_MARK}\n\nRate the answer's {criterion}."
            " Score from 1 (very poor) to 9 (excellent). Reply with one digit.")
    text = gen.render_chat([{"role": "system", "content": GRADER},
                            {"role": "user", "content": user}])
    head, suffix = text.split(_MARK)
    before = head[:len(head) - len(answer)]
    tok = _tok(gen)
    pre, ans = tok.encode(before), tok.encode(answer)
    return pre + ans, len(pre), tok.encode(suffix)


def _digit_ids(gen: TextGenerator) -> list[int]:
    return [_tok(gen).encode(d)[-1] for d in DIGITS]


def expected_digit(logits: torch.Tensor, digit_ids: list[int]) -> float:
    """Probability-weighted mean of 1-9 over the digit tokens of `logits` [vocab]."""
    p = torch.softmax(logits[digit_ids].float(), -1)  # [9]
    return float((p * torch.arange(1, 10, dtype=p.dtype)).sum())


def _gather_logprobs(logits: torch.Tensor, targets: list[int]) -> list[float]:
    """logits [n, vocab] predicting `targets` [n] → their log-probabilities."""
    lp = torch.log_softmax(logits.float(), -1)
    return lp[torch.arange(len(targets)), torch.tensor(targets)].tolist()


@contextlib.contextmanager
def dense_weights(gen: TextGenerator, dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """While open, the engine model's quantized linear layers multiply with a dense `dtype` copy
    of their weights (dequantized once): the engine's quantized kernel is built for a few rows at
    a time (decoding), a judge's prefill has hundreds. Restored on exit; only for a judge phase
    with the engine idle (it costs the dense copy's memory: ~3 GB for a 1.5B model in bf16)."""
    engine = getattr(gen, "engine", None)
    if engine is None:
        yield
        return
    from pice.kernels.quant_linear import QuantLinear

    patched: list[torch.nn.Module] = []

    def dense(mod: QuantLinear) -> Any:
        w = mod.dequantized_weight().to(dtype)  # [out, in]
        b = None if mod.bias is None else mod.bias.to(dtype)

        def forward(x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
            return torch.nn.functional.linear(x.to(dtype), w, b).to(x.dtype)
        return forward

    try:
        for mod in engine.runner.model.modules():
            if isinstance(mod, QuantLinear):
                mod.forward = dense(mod)  # type: ignore[method-assign]
                patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.forward  # the class's own forward again


@torch.inference_mode()
def score_answer(gen: TextGenerator, question: str, answer: str,
                 criteria: dict[str, str] | None = None) -> LMScore:
    """`criteria`: None → CRITERIA; {} → the answer's token log-probabilities only (no rubric,
    one prefill)."""
    crit = CRITERIA if criteria is None else criteria
    prompts = {name: _split_prompt(gen, question, answer, text) for name, text in crit.items()}
    prefix, start, _ = (next(iter(prompts.values())) if prompts else
                        _split_prompt(gen, question, answer, next(iter(CRITERIA.values()))))
    suffixes = {name: s for name, (_, _, s) in prompts.items()}
    if getattr(gen, "engine", None) is None:
        answer_logits, last = _score_hf(gen, prefix, start, suffixes)
    else:
        answer_logits, last = _score_engine(gen, prefix, start, suffixes)
    digits = _digit_ids(gen)
    return LMScore(token_logprobs=_gather_logprobs(answer_logits, prefix[start:]),
                   rubric={name: expected_digit(last[name], digits) for name in crit})


def _score_hf(gen: TextGenerator, prefix: list[int], start: int,
              suffixes: dict[str, list[int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """transformers: each criterion's whole prompt on its own (the reference the engine's shared
    prefix must match)."""
    model = gen.model  # type: ignore[attr-defined]
    device = next(model.parameters()).device
    last: dict[str, torch.Tensor] = {}
    if not suffixes:
        out = model(input_ids=torch.tensor([prefix], device=device)).logits[0]
        return out[start - 1:len(prefix) - 1].float().cpu(), last  # [answer, vocab]
    answer_logits = torch.empty(0)
    for name, suffix in suffixes.items():
        out = model(input_ids=torch.tensor([prefix + suffix], device=device)).logits[0]
        last[name] = out[-1].float().cpu()  # [vocab]
        answer_logits = out[start - 1:len(prefix) - 1].float().cpu()  # [answer, vocab]
    return answer_logits, last


def _score_engine(gen: TextGenerator, prefix: list[int], start: int,
                  suffixes: dict[str, list[int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from pice.kernels.paged_attention import build_metadata

    runner = gen.engine.runner  # type: ignore[attr-defined]
    model, bs, dev = runner.model, runner.cfg.block_size, runner.device
    n = len(prefix)
    full, part = divmod(n, bs)
    names = list(suffixes)
    # blocks: the prefix's, then per criterion a copy of the prefix's partial block and its own
    own = [math.ceil((part + len(suffixes[c])) / bs) for c in names]
    nb = math.ceil(n / bs) + sum(own)
    shape = (nb, bs, model.num_kv_heads, model.head_dim)
    kv = [(torch.zeros(shape, dtype=runner.dtype, device=dev),
           torch.zeros(shape, dtype=runner.dtype, device=dev)) for _ in range(model.num_layers)]
    meta = build_metadata([list(range(math.ceil(n / bs)))], [n], [n], bs, dev)
    hidden = model(torch.tensor(prefix, dtype=torch.long, device=dev), kv, meta)  # [n, hidden]
    answer_logits = model.compute_logits(hidden[start - 1:n - 1]).float().cpu()  # [ans, vocab]
    if not names:
        return answer_logits, {}
    tables, nxt = [], math.ceil(n / bs)
    for k in own:
        table = list(range(full)) + list(range(nxt, nxt + k))
        if part:
            for k_cache, v_cache in kv:
                k_cache[nxt].copy_(k_cache[full])
                v_cache[nxt].copy_(v_cache[full])
        tables.append(table)
        nxt += k
    ids = [t for c in names for t in suffixes[c]]
    lens = [len(suffixes[c]) for c in names]
    meta = build_metadata(tables, [n + q for q in lens], lens, bs, dev)
    hidden = model(torch.tensor(ids, dtype=torch.long, device=dev), kv, meta)  # [sum q, hidden]
    ends = torch.tensor(lens).cumsum(0) - 1
    logits = model.compute_logits(hidden[ends.to(dev)]).float().cpu()  # [criteria, vocab]
    return answer_logits, {c: logits[i] for i, c in enumerate(names)}


@torch.inference_mode()
def next_token_logits(gen: TextGenerator, prompt: str) -> torch.Tensor:
    """Logits [vocab] of the token after `prompt`: one prefill of the loaded model (the engine's
    own weights in a private KV cache; call it while the engine is idle)."""
    ids = _tok(gen).encode(prompt)
    if getattr(gen, "engine", None) is None:  # transformers backend
        model = gen.model  # type: ignore[attr-defined]
        device = next(model.parameters()).device
        return cast(torch.Tensor, model(input_ids=torch.tensor([ids], device=device))
                    .logits[0, -1].float().cpu())
    from pice.kernels.paged_attention import build_metadata

    runner = gen.engine.runner  # type: ignore[attr-defined]
    model, bs, dev = runner.model, runner.cfg.block_size, runner.device
    n, nb = len(ids), math.ceil(len(ids) / bs)
    shape = (nb, bs, model.num_kv_heads, model.head_dim)
    kv = [(torch.zeros(shape, dtype=runner.dtype, device=dev),
           torch.zeros(shape, dtype=runner.dtype, device=dev)) for _ in range(model.num_layers)]
    meta = build_metadata([list(range(nb))], [n], [n], bs, dev)
    hidden = model(torch.tensor(ids, dtype=torch.long, device=dev), kv, meta)
    return cast(torch.Tensor, model.compute_logits(hidden[-1:])[0].float().cpu())  # [vocab]


PAIRWISE = ("You are a strict, fair judge of answers. Compare two answers to the same question "
            "for correctness, helpfulness, completeness and clarity. Ignore length unless it "
            "hurts the answer. Reply with a single letter: A or B.")


def pair_logits(gen: TextGenerator, question: str, first: str, second: str) -> float:
    """P(the answer shown first is better), from the logits of "A" and "B" (renormalized)."""
    prompt = gen.render_chat([
        {"role": "system", "content": PAIRWISE},
        {"role": "user", "content": f"Question: {question}\n\n[Answer A]\n{first}\n\n"
                                    f"[Answer B]\n{second}\n\nWhich answer is better, A or B?"}])
    logits = next_token_logits(gen, prompt)
    a, b = _tok(gen).encode("A")[-1], _tok(gen).encode("B")[-1]
    return float(torch.softmax(logits[[a, b]], -1)[0])
