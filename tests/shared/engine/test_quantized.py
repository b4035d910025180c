"""The engine on quantized weights: tiny models of every architecture written into GGUF files
(gguf_factory) with a different format per matrix, loaded kept quantized, against transformers
running the same weights dequantised to fp32. With the portable kernels (fp32 activations) the
logits agree to rounding and greedy tokens are equal; with this CPU's SIMD kernels (int8
activations, as llama.cpp) the logits stay within the activation-quantization error."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

from pice.kernels.quant import Fmt
from pice.kernels.quant_linear import QuantEmbedding, QuantLinear, load_quant_kernel
from pice.shared.engine.models import build_model
from pice.shared.engine.models.quantized import quantized_bytes
from tests.shared.engine.gguf_factory import dequantized_reference, write_gguf
from tests.shared.engine.test_models import PagedCache, greedy, hf_logits

_SMALL: dict[str, Any] = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=64, vocab_size=300,
                              max_position_embeddings=256, num_hidden_layers=2)
CONFIGS: dict[str, tuple[str, Callable[[], Any]]] = {
    "qwen2": ("qwen2", lambda: Qwen2Config(**_SMALL, tie_word_embeddings=True)),
    "llama": ("llama", lambda: LlamaConfig(**_SMALL, tie_word_embeddings=False)),
    "gemma3": ("gemma3", lambda: Gemma3TextConfig(
        **_SMALL, sliding_window=4, query_pre_attn_scalar=64,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters=json.loads(json.dumps({
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6}})))),
}
# every format in one model, as the packaged Q4_K_M files mix them
FORMATS = {"q_proj": Fmt.Q5_0, "k_proj": Fmt.Q4_0, "v_proj": Fmt.Q8_0, "o_proj": Fmt.Q4_K,
           "gate_proj": Fmt.Q5_K, "up_proj": Fmt.Q4_K, "down_proj": Fmt.Q6_K,
           "embed_tokens": Fmt.Q8_0, "lm_head": Fmt.Q6_K}
PROMPT = torch.randint(0, 300, (11,), generator=torch.Generator().manual_seed(5)).tolist()
kernel = load_quant_kernel()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def portable() -> Iterator[None]:
    """Run the portable kernels (fp32 activations: exact to rounding)."""
    if kernel is None:
        yield
        return
    best = kernel.backend()
    kernel.set_backend("portable")
    yield
    kernel.set_backend(best)


@pytest.fixture(scope="module", params=list(CONFIGS))
def gguf_model(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    """(transformers on the dequantised weights, its HF directory, the GGUF)."""
    arch, make = CONFIGS[request.param]
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(make()).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ref = write_gguf(hf, path / "model.gguf", arch, FORMATS)
    return dequantized_reference(hf, ref), path, path / "model.gguf"


def test_gguf_tensors_stay_quantized(gguf_model: tuple[Any, Path, Path]) -> None:
    _, path, gguf = gguf_model
    ours = build_model(path, gguf=gguf, quantization="gguf")
    layer = ours.model.layers[0]
    qkv = layer.self_attn.qkv_proj
    assert isinstance(qkv, QuantLinear)
    assert [s.fmt for s in qkv.segments] == [Fmt.Q5_0, Fmt.Q4_0, Fmt.Q8_0]
    assert isinstance(ours.model.embed_tokens, QuantEmbedding)
    floats = sum(p.numel() for p in ours.parameters())  # norms and biases only
    assert floats < 0.01 * ours.vocab_size * 256 * 2 * ours.num_layers
    assert quantized_bytes(ours) > 0


def test_logits_match_dequantised_reference(gguf_model: tuple[Any, Path, Path],
                                            portable: None) -> None:
    hf, path, gguf = gguf_model
    ours = build_model(path, gguf=gguf, quantization="gguf")
    got = PagedCache(ours).step({0: PROMPT})[0]
    torch.testing.assert_close(got, hf_logits(hf, PROMPT), atol=2e-4, rtol=1e-4)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT),
                                                                              dtype=torch.long),
                          do_sample=False, max_new_tokens=12, min_new_tokens=12)
    assert greedy(ours, PROMPT, 12) == ref[0, len(PROMPT):].tolist()


@pytest.mark.skipif(kernel is None or kernel.backend() == "portable",
                    reason="no SIMD backend on this CPU")
def test_simd_kernels_within_activation_quantization_error(
        gguf_model: tuple[Any, Path, Path]) -> None:
    hf, path, gguf = gguf_model
    ours = build_model(path, gguf=gguf, quantization="gguf")
    cache = PagedCache(ours)
    got = cache.step({0: PROMPT[:-1]})[0]  # prefill: the same int8 kernels, 10 rows
    want = hf_logits(hf, PROMPT)
    decode = cache.step({0: PROMPT[-1:]})[0]  # decode: one row
    got = torch.cat((got, decode))  # [len, vocab]
    err = float((got - want).abs().max()) / float(want.abs().max())
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    print(f"max error {err:.4f} of the largest logit, top-1 agreement {agree:.2f}")
    assert err <= 0.05 and agree >= 0.8


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_weight_only_int8_int4_from_safetensors(gguf_model: tuple[Any, Path, Path],
                                                quantization: str) -> None:
    _, path, _ = gguf_model
    fp32 = build_model(path)
    ours = build_model(path, quantization=quantization)
    down = ours.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear)
    assert down.segments[0].fmt == (Fmt.Q8_0 if quantization == "int8" else Fmt.Q4_K)
    want = PagedCache(fp32).step({0: PROMPT})[0]
    got = PagedCache(ours).step({0: PROMPT})[0]
    rel = float((got - want).norm() / want.norm())  # random weights: 4 bits is the worst case
    print(f"{quantization}: relative logit error {rel:.3f}")
    assert rel <= (0.05 if quantization == "int8" else 0.4)


def test_float_weights_from_a_gguf(gguf_model: tuple[Any, Path, Path], tmp_path: Path) -> None:
    """quantization "none" on a directory with config only (the weights in the GGUF): the
    dequantised fp32 model, that is the reference itself."""
    hf, path, gguf = gguf_model
    shutil.copy(path / "config.json", tmp_path / "config.json")
    ours = build_model(tmp_path, gguf=gguf, quantization="none")
    assert isinstance(ours.model.layers[0].mlp.down_proj, torch.nn.Linear)
    got = PagedCache(ours).step({0: PROMPT})[0]
    torch.testing.assert_close(got, hf_logits(hf, PROMPT), atol=2e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# The packaged edge model: its GGUF tensors kept quantized against the same GGUF dequantised.

@pytest.mark.real_model
def test_real_gguf_matches_its_dequantised_weights(portable: None) -> None:
    from transformers import AutoTokenizer

    from pice.shared.errors import PiceError
    from pice.shared.models import resolve_model

    try:
        resolved = resolve_model("qwen2.5-coder-0.5b-instruct", dense=False)
    except PiceError as e:
        pytest.skip(f"packaged model unavailable: {e}")
    assert resolved.gguf is not None
    tok = AutoTokenizer.from_pretrained(resolved.path)
    ids = tok("def reverse(s: str) -> str:\n    \"\"\"Reverse a string.\"\"\"\n")["input_ids"]
    quant = build_model(resolved.path, gguf=resolved.gguf, quantization="gguf")
    assert quantized_bytes(quant) < 0.6e9  # the Q4_K_M file's tensors, not 2 GB of fp32
    dense = build_model(resolved.path, gguf=resolved.gguf, quantization="none")
    want = PagedCache(dense).step({0: ids})[0]
    got = PagedCache(quant).step({0: ids})[0]  # portable kernels: fp32 activations
    assert float((got - want).abs().max()) <= 1e-3 * float(want.abs().max())
    if kernel is not None and (best := kernel.backend()) != "portable":
        kernel.set_backend(best)  # the SIMD kernels: int8 activations, as llama.cpp
        cont = greedy(dense, ids, 24)
        cache = PagedCache(quant)  # teacher-forced, one decode step (GEMV) per token
        preds = [int(cache.step({0: ids})[0][-1].argmax())]
        preds += [int(cache.step({0: [t]})[0][-1].argmax()) for t in cont[:-1]]
        agree = sum(p == t for p, t in zip(preds, cont, strict=True)) / len(cont)
        print(f"SIMD kernels: teacher-forced top-1 agreement {agree:.2f}")
        assert agree >= 0.8
