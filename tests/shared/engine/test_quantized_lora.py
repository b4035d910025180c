"""LoRA over a quantized base, exactly as over fp32: the engine serving a tiny Qwen2 from a GGUF
(its matrices kept in Q4_K / Q5_0 / Q6_K / Q8_0 blocks) with peft-made adapters in one mixed
batch gives every request the greedy tokens peft gives on the dequantised base model."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, Qwen2Config

from pice.bench.lora_adapters import peft_adapter
from pice.kernels.quant import Fmt
from pice.kernels.quant_linear import QuantLinear, load_quant_kernel
from pice.shared.engine.generator import EngineGenerator
from pice.shared.sampling import SamplingParams
from tests.factories import tiny_tokenizer
from tests.shared.engine.gguf_factory import dequantized_reference, write_gguf
from tests.shared.engine.test_lora_exact import peft_greedy

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FORMATS = {"q_proj": Fmt.Q5_0, "k_proj": Fmt.Q5_0, "v_proj": Fmt.Q8_0, "o_proj": Fmt.Q4_K,
           "gate_proj": Fmt.Q4_K, "up_proj": Fmt.Q4_K, "down_proj": Fmt.Q6_K,
           "embed_tokens": Fmt.Q8_0, "lm_head": Fmt.Q8_0}
PROMPTS = ["The quick brown fox", "How can I sleep better at night?", "Water boils at"]
NEW_TOKENS = 8
kernel = load_quant_kernel()


@pytest.fixture
def portable() -> Iterator[None]:
    """The portable kernels compute in fp32 activations: exact to rounding, so greedy tokens
    can be compared with peft's (the SIMD kernels' int8 activations are tested against the
    same reference within their error in test_quantized.py)."""
    if kernel is None:
        yield
        return
    best = kernel.backend()
    kernel.set_backend("portable")
    yield
    kernel.set_backend(best)


@pytest.fixture(scope="module")
def quantized_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("tiny-gguf-qwen2")
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    ref = write_gguf(hf, path / "model.gguf", "qwen2", FORMATS)
    return path, path / "model.gguf", dequantized_reference(hf, ref)


def test_adapters_over_gguf_base_match_peft(quantized_base: tuple[Path, Path, object],
                                            tmp_path: Path, portable: None) -> None:
    path, gguf, base = quantized_base
    specs = [(2, 4, ALL), (8, 16, ("q_proj", "v_proj", "down_proj")), (4, 8, ("gate_proj",))]
    adapters = {f"ad{i}": peft_adapter(base, tmp_path / f"ad{i}", rank=r, alpha=a, targets=t,
                                       seed=i, std=0.3)
                for i, (r, a, t) in enumerate(specs)}
    gen = EngineGenerator(str(path), gguf=str(gguf), max_context=256, block_size=4,
                          kv_cache_gb=0.01, lora_max_rank=8, lora_slots=2,
                          kv_cache_dtype="float32")
    assert isinstance(gen.engine.runner.model.model.layers[0].mlp.down_proj, QuantLinear)
    for name, p in adapters.items():
        gen.add_adapter(name, p)
    reqs = [(PROMPTS[i % 3], n) for i, n in enumerate(["ad0", None, "ad1", "ad2", "ad0", "ad1"])]
    outs = gen.generate([p for p, _ in reqs], SamplingParams(max_tokens=NEW_TOKENS,
                                                             ignore_eos=True),
                        adapters=[a for _, a in reqs])
    models = {None: base} | {n: PeftModel.from_pretrained(copy.deepcopy(base), p).eval()
                             for n, p in adapters.items()}
    changed = 0
    for (prompt, name), out in zip(reqs, outs, strict=True):
        ids = gen.chat.encode(prompt)
        want = peft_greedy(models[name], ids, NEW_TOKENS)
        assert out.token_ids == want, f"adapter {name} on {prompt!r}"
        changed += name is not None and want != peft_greedy(base, ids, NEW_TOKENS)
    assert changed >= 3  # the adapters really change the output
