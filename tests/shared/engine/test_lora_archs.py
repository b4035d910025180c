"""LoRA on every architecture the engine serves (Llama with biases and llama3 rope, Gemma 3 with
sliding windows): a mixed batch matches peft running each adapter alone."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pice.bench.lora_adapters import ALL_TARGETS, peft_adapter
from pice.shared.engine.config import EngineConfig
from pice.shared.engine.llm_engine import LLMEngine
from pice.shared.sampling import SamplingParams
from tests.shared.engine.test_lora_exact import peft_greedy
from tests.shared.engine.test_models import CONFIGS

SPECS = [(2, 4, ("q_proj", "v_proj"), False), (8, 16, ALL_TARGETS, True),
         (4, 4, ("o_proj", "gate_proj", "down_proj"), False)]


@pytest.mark.parametrize("arch", ["llama3-rope-bias", "gemma3"])
def test_mixed_adapters_match_peft(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()  # type: ignore[arg-type]
    hf.save_pretrained(tmp_path / "base")
    paths = [peft_adapter(hf, tmp_path / f"ad{i}", rank=r, alpha=a, targets=t, rslora=rs,
                          seed=i, std=0.25) for i, (r, a, t, rs) in enumerate(SPECS)]
    engine = LLMEngine(EngineConfig(model=str(tmp_path / "base"), block_size=4,
                                    kv_cache_gb=0.01, max_model_len=128, lora_max_rank=8,
                                    lora_slots=2), set(), lambda ids: "")
    for i, path in enumerate(paths):
        engine.pool.add(f"ad{i}", path)
    names: list[str | None] = ["ad0", None, "ad1", "ad2", "ad1", None]
    prompts = [[(17 * i + 5 * j) % 290 + 5 for j in range(6 + i)] for i in range(len(names))]
    seqs = engine.generate_ids(prompts, SamplingParams(max_tokens=6, ignore_eos=True), names)
    models = {None: hf} | {f"ad{i}": PeftModel.from_pretrained(copy.deepcopy(hf), p).eval()
                           for i, p in enumerate(paths)}
    for seq, prompt, name in zip(seqs, prompts, names, strict=True):
        assert seq.completion_ids == peft_greedy(models[name], prompt, 6), name
    assert seqs[2].completion_ids != peft_greedy(hf, prompts[2], 6)
