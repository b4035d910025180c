"""A request's greedy tokens do not depend on who else is in the batch, for every weight format.

The same prompts run alone, then inside mixed traffic: prompts of other lengths prefilled in the
same step (so a step has more rows than the decode kernels' few-row range), sequences joining
and leaving mid-decode, a batch of 20+ decoding rows, a prompt sharing a prefix with an earlier
one (prefix cache). Tiny random models have tiny argmax margins, so one differently rounded
row anywhere (a per-step activation scale, a kernel chosen by the number of rows, attention
padded to the longest neighbour) flips a token within a few steps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, Qwen2Config

from pice.kernels.quant import Fmt
from pice.shared.engine.config import EngineConfig
from pice.shared.engine.llm_engine import LLMEngine
from pice.shared.engine.sequence import Sequence
from pice.shared.sampling import SamplingParams
from tests.shared.engine.gguf_factory import write_gguf

_SMALL: dict[str, Any] = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=64, vocab_size=300,
                              max_position_embeddings=512, num_hidden_layers=2)
GGUF_FORMATS = [Fmt.Q4_K, Fmt.Q5_K, Fmt.Q6_K, Fmt.Q8_0, Fmt.Q4_0, Fmt.Q5_0, Fmt.F16, Fmt.BF16]
# (quantization, GGUF format or None): every way the engine can hold weights
CASES = [("none", None), ("int8", None), ("int4", None),
         *(("gguf", f) for f in GGUF_FORMATS)]
_gen = torch.Generator().manual_seed(11)
PROMPTS = [torch.randint(0, 300, (n,), generator=_gen).tolist() for n in (5, 12, 37, 3)]
PROMPTS.append([*PROMPTS[2][:30], 7, 8, 9])  # shares 30 tokens (7 blocks) with prompt 2
FILLERS = [torch.randint(0, 300, (n,), generator=_gen).tolist() for n in range(2, 22)]
NEW = 24


@pytest.fixture(scope="module", autouse=True)
def _two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # rows split across threads, as in serving
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["qwen2", "gemma3"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param == "qwen2":
        cfg: Any = Qwen2Config(**_SMALL, tie_word_embeddings=True)
    else:
        cfg = Gemma3TextConfig(**_SMALL, sliding_window=8, query_pre_attn_scalar=64,
                               layer_types=["sliding_attention", "full_attention"],
                               rope_parameters=json.loads(json.dumps({
                                   "sliding_attention": {"rope_type": "default",
                                                         "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "default",
                                                      "rope_theta": 1e6}})))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    for fmt in GGUF_FORMATS:
        write_gguf(hf, path / f"{fmt.name}.gguf", request.param, fmt)
    return path


def make_engine(model_dir: Path, quantization: str, fmt: Fmt | None) -> LLMEngine:
    cfg = EngineConfig(model=str(model_dir), quantization=quantization, block_size=4,
                       num_blocks=600, max_model_len=512, max_num_batched_tokens=512,
                       gguf=None if fmt is None else str(model_dir / f"{fmt.name}.gguf"))
    return LLMEngine(cfg, eos_ids=set(), decode=lambda ids: "")


def run_until(engine: LLMEngine, seqs: list[Sequence], steps: int | None = None) -> None:
    """Step until every seq in `seqs` finished, or `steps` steps."""
    done = 0
    while engine.has_work and (steps is None or done < steps):
        engine.step()
        done += 1
        if steps is None and all(s.is_finished for s in seqs):
            return
    assert steps is not None or all(s.is_finished for s in seqs)


@pytest.mark.parametrize(("quantization", "fmt"), CASES,
                         ids=[q if f is None else f.name for q, f in CASES])
def test_tokens_do_not_depend_on_batch_neighbours(model_dir: Path, quantization: str,
                                                  fmt: Fmt | None) -> None:
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)
    alone_engine = make_engine(model_dir, quantization, fmt)
    alone = [alone_engine.generate_ids([p], params)[0].completion_ids for p in PROMPTS[:4]]

    eng = make_engine(model_dir, quantization, fmt)
    seq = [eng.make_sequence(p, params) for p in PROMPTS]
    short = eng.make_sequence(FILLERS[0], SamplingParams(max_tokens=5, ignore_eos=True))
    eng.add(seq[0])
    eng.add(seq[2])  # 5 + 37 prompt rows in one prefill step
    eng.add(short)  # leaves after 5 tokens, mid-decode
    run_until(eng, [], steps=4)
    eng.add(seq[1])  # joins mid-decode
    fillers = [eng.make_sequence(f, SamplingParams(max_tokens=6, ignore_eos=True))
               for f in FILLERS[1:]]
    for f in fillers:  # 19 more: 20+ rows per decode step for a while
        eng.add(f)
    run_until(eng, [], steps=6)
    eng.add(seq[3])
    eng.add(seq[4])  # prefix-cached: only its last tokens are prefilled
    run_until(eng, seq + fillers + [short])
    for i in range(4):
        assert seq[i].completion_ids == alone[i], f"prompt {i} changed in a batch"
    assert eng.stats["prefill_tokens"] < sum(map(len, PROMPTS + FILLERS))  # prefix hit

    alone4 = make_engine(model_dir, quantization, fmt).generate_ids([PROMPTS[4]], params)[0]
    assert seq[4].completion_ids == alone4.completion_ids, "prefix-cached prompt changed"
