"""`SamplingParams.top_logprobs`: the engine keeps each step's N likeliest tokens for the
sequences that ask (OpenAI's top_logprobs), equal to a transformers forward pass; a sequence
that does not ask gets none and the same tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pice.shared.engine.generator import EngineGenerator
from pice.shared.errors import BadRequestError
from pice.shared.sampling import SamplingParams

PROMPT = "Question: how can I sleep better? Outline: 1. Fixed schedule 2. Dark room"


def test_top_logprobs_match_a_forward_pass(tiny_model_dir: Path) -> None:
    gen = EngineGenerator(str(tiny_model_dir), max_context=512, block_size=4, kv_cache_gb=0.01)
    asks = SamplingParams(max_tokens=6, ignore_eos=True, top_logprobs=4)
    [out], [plain] = gen.generate([PROMPT], asks), gen.generate(
        [PROMPT], SamplingParams(max_tokens=6, ignore_eos=True))
    assert plain.extra == {} and out.token_ids == plain.token_ids
    tops = out.extra["top_logprobs"]
    assert isinstance(tops, list) and len(tops) == len(out.token_ids) == 6
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = gen.chat.encode(PROMPT) + out.token_ids
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)  # [seq, vocab]
    start = len(ids) - len(out.token_ids) - 1  # the row that predicts the first new token
    for i, top in enumerate(tops):
        want = logp[start + i].topk(4)
        assert [t for t, _ in top] == want.indices.tolist()
        assert [lp for _, lp in top] == pytest.approx(want.values.tolist(), abs=1e-3)
        assert top[0] == (out.token_ids[i], pytest.approx(out.logprobs[i], abs=1e-6))


def test_top_logprobs_is_bounded() -> None:
    with pytest.raises(BadRequestError, match="top_logprobs"):
        SamplingParams(top_logprobs=21)
