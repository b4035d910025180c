"""The `vllm` cloud backend (vLLM's async engine in-process) on the tiny model: greedy text equals
transformers' greedy text, streaming equals the whole answer, results come back in prompt order.
Runs where vLLM is installed (`pip install pice[vllm]`, GPU machines); skipped elsewhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from pice.cloud.backends.vllm_backend import VLLMGenerator, VLLMSettings
from pice.shared.hf_backend import HFGenerator
from pice.shared.sampling import SamplingParams

pytestmark = pytest.mark.vllm
QUESTIONS = ["How can I sleep better?", "What helps me focus at work?"]


@pytest.fixture(scope="module")
def vllm_gen(tiny_model_dir: Path) -> Iterator[VLLMGenerator]:
    cfg = VLLMSettings(gpu_memory_utilization=0.2, enable_lora=False,
                       engine_args={"dtype": "float32", "enforce_eager": True})
    yield VLLMGenerator(tiny_model_dir, str(tiny_model_dir), 1024, cfg)


def test_greedy_text_matches_transformers(vllm_gen: VLLMGenerator,
                                          tiny_generator: HFGenerator) -> None:
    prompts = [vllm_gen.render_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(max_tokens=8)
    got = vllm_gen.generate(prompts, params)
    want = tiny_generator.generate(prompts, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.prompt_tokens for g in got] == [vllm_gen.count_tokens(p) for p in prompts]


def test_stream_equals_generate(vllm_gen: VLLMGenerator) -> None:
    prompt = vllm_gen.render_chat([{"role": "user", "content": QUESTIONS[0]}])
    [whole] = vllm_gen.generate([prompt], SamplingParams(max_tokens=16))
    assert "".join(vllm_gen.stream(prompt, SamplingParams(max_tokens=16))) == whole.text
