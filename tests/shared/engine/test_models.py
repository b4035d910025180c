"""Our paged-attention model implementations against transformers, on tiny random models of every
supported architecture (and, marked real_model, on the packaged checkpoints).

Each tiny HF model gets all its parameters perturbed (biases, zero-centred Gemma norms, ...), so
that a missing bias, a wrong norm convention or a wrong rope formula shows up in the logits."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    Qwen2Config,
)

from pice.kernels.paged_attention import build_metadata
from pice.shared.engine.models import CausalLM, build_model
from pice.shared.errors import PiceError, UnsupportedModelError

BLOCK = 4
CPU = torch.device("cpu")
_SMALL: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=300,
                              max_position_embeddings=256)
_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # all three bands
_GEMMA_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
               "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}}
_GEMMA_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]

CONFIGS: dict[str, Callable[[], object]] = {
    "qwen2-tied": lambda: Qwen2Config(**_SMALL, num_hidden_layers=2, tie_word_embeddings=True),
    "qwen2-untied": lambda: Qwen2Config(**_SMALL, num_hidden_layers=2, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default",
                                                         "rope_theta": 1000.0}),
    "llama": lambda: LlamaConfig(**_SMALL, num_hidden_layers=2, tie_word_embeddings=False),
    "llama3-rope-bias": lambda: LlamaConfig(**_SMALL, num_hidden_layers=2,
                                            tie_word_embeddings=True, attention_bias=True,
                                            mlp_bias=True, rope_parameters=dict(_LLAMA3)),
    "gemma3": lambda: Gemma3TextConfig(**_SMALL, num_hidden_layers=3, layer_types=_GEMMA_TYPES,
                                       sliding_window=4, query_pre_attn_scalar=24,
                                       rope_parameters=json.loads(json.dumps(_GEMMA_ROPE))),
    "gemma3-untied-softcap": lambda: Gemma3TextConfig(
        **_SMALL, num_hidden_layers=4, sliding_window=3, tie_word_embeddings=False,
        layer_types=["sliding_attention", "full_attention"] * 2, final_logit_softcapping=1.0),
}


Pair = tuple[Any, CausalLM]  # (transformers model, ours)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny matmuls gain nothing from intra-op threads, and on a busy machine the thread
    # hand-off costs milliseconds per op (a 12x64 @ 64x128 linear took 16 ms on 2 threads).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """(transformers reference, ours loaded from its save_pretrained directory)."""
    torch.manual_seed(0)
    config = CONFIGS[request.param]()
    hf = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, build_model(path)


class PagedCache:
    """Test-side engine: per-layer zeroed caches, blocks handed out from a shuffled pool."""

    def __init__(self, model: CausalLM, num_blocks: int = 64, seed: int = 0) -> None:
        self.model = model
        gen = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=gen).tolist()
        shape = (num_blocks, BLOCK, model.num_kv_heads, model.head_dim)
        dtype = next(model.parameters()).dtype
        self.kv = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                   for _ in range(model.num_layers)]
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    @torch.no_grad()
    def step(self, batch: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Feed each sequence its new tokens (prefill or decode); returns logits [len, vocab]."""
        for seq, toks in batch.items():
            self.lens[seq] = self.lens.get(seq, 0) + len(toks)
            table = self.tables.setdefault(seq, [])
            while len(table) * BLOCK < self.lens[seq]:
                table.append(self.free.pop())
        seqs = list(batch)
        qlens = [len(batch[s]) for s in seqs]
        meta = build_metadata([self.tables[s] for s in seqs], [self.lens[s] for s in seqs],
                              qlens, BLOCK, CPU)
        ids = torch.tensor([t for s in seqs for t in batch[s]], dtype=torch.long)
        logits = self.model.compute_logits(self.model(ids, self.kv, meta))
        assert logits.dtype == torch.float32
        return dict(zip(seqs, logits.split(qlens), strict=True))


def greedy(model: CausalLM, prompt: list[int], n: int) -> list[int]:
    cache = PagedCache(model)
    nxt = int(cache.step({0: prompt})[0][-1].argmax())
    out = [nxt]
    while len(out) < n:
        nxt = int(cache.step({0: [nxt]})[0][-1].argmax())
        out.append(nxt)
    return out


@torch.no_grad()
def hf_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()  # [len, vocab]


def _tokens(n: int, seed: int, vocab: int = 300) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefill_matches_transformers(pair: Pair) -> None:
    hf, ours = pair
    ids = _tokens(12, seed=1)
    got = PagedCache(ours).step({0: ids})[0]
    torch.testing.assert_close(got, hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_batched_prefill_then_decode_matches_transformers(
        pair: Pair) -> None:
    hf, ours = pair
    seqs = {0: _tokens(12, seed=2), 1: _tokens(10, seed=3), 2: _tokens(14, seed=4)}
    prefill = {0: 7, 1: 4, 2: 6}  # different prompt lengths, one batched prefill step
    cache = PagedCache(ours, seed=1)
    got = cache.step({s: seqs[s][:prefill[s]] for s in seqs})
    outs = {s: [got[s]] for s in seqs}
    pos = dict(prefill)
    while live := [s for s in seqs if pos[s] < len(seqs[s])]:  # decode together, batch shrinks
        step = cache.step({s: [seqs[s][pos[s]]] for s in live})
        for s in live:
            outs[s].append(step[s])
            pos[s] += 1
    for s, ids in seqs.items():
        torch.testing.assert_close(torch.cat(outs[s]), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers(pair: Pair) -> None:
    hf, ours = pair
    prompt = _tokens(5, seed=5)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                            dtype=torch.long),
                          do_sample=False, max_new_tokens=16, min_new_tokens=16)
    assert greedy(ours, prompt, 16) == ref[0, len(prompt):].tolist()


def test_model_attributes(pair: Pair) -> None:
    hf, ours = pair
    cfg = hf.config
    assert ours.num_layers == cfg.num_hidden_layers == len(ours.sliding_windows)
    assert (ours.num_kv_heads, ours.head_dim, ours.vocab_size) == (2, 16, 300)
    assert ours.max_position_embeddings == 256
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    expected = [cfg.sliding_window if t == "sliding_attention" else None for t in types]
    assert ours.sliding_windows == expected
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training
    tied = ours.get_parameter("lm_head.weight") is ours.get_parameter("model.embed_tokens.weight")
    assert tied == bool(cfg.tie_word_embeddings)


def test_int8_dynamic_quantization_swaps_every_linear(
        pair: Pair) -> None:
    hf, ours = pair
    n_linear = sum(isinstance(m, nn.Linear) for m in ours.modules())
    q = torch.ao.quantization.quantize_dynamic(ours, {nn.Linear}, dtype=torch.qint8)
    assert sum(isinstance(m, nn.Linear) for m in q.modules()) == 0
    assert sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in q.modules()) \
        == n_linear
    ids = _tokens(12, seed=6)
    got = PagedCache(cast(CausalLM, q)).step({0: ids})[0]  # same class, int8 Linears
    ref = hf_logits(hf, ids)
    hf_q = torch.ao.quantization.quantize_dynamic(hf, {nn.Linear}, dtype=torch.qint8)
    err, hf_err = ((x - ref).norm() / ref.norm() for x in (got, hf_logits(hf_q, ids)))
    assert err < 1.5 * hf_err + 0.01  # int8 noise of the same size as transformers' own


def test_bfloat16_close_to_transformers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CONFIGS["gemma3"]())
    hf.save_pretrained(tmp_path)
    hf = hf.to(torch.bfloat16).eval()
    ours = build_model(tmp_path, dtype=torch.bfloat16)
    assert next(ours.parameters()).dtype == torch.bfloat16
    ids = _tokens(12, seed=7)
    got = PagedCache(ours).step({0: ids})[0]
    torch.testing.assert_close(got, hf_logits(hf, ids), atol=2e-2, rtol=2e-2)


def _write_config(path: Path, **fields: object) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(fields))


def test_unknown_architecture_is_rejected_before_loading(tmp_path: Path) -> None:
    # No weights in the directory: only the architecture check can produce this message.
    _write_config(tmp_path / "mamba", architectures=["MambaForCausalLM"], model_type="mamba")
    with pytest.raises(UnsupportedModelError, match=r"'MambaForCausalLM'.*supported: .*Qwen2"):
        build_model(tmp_path / "mamba")
    _write_config(tmp_path / "vlm", architectures=["Gemma3ForConditionalGeneration"],
                  model_type="gemma3")
    with pytest.raises(UnsupportedModelError, match="Gemma3ForConditionalGeneration"):
        build_model(tmp_path / "vlm")


def test_incomplete_or_foreign_checkpoint_is_rejected(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = tmp_path / "src"
    AutoModelForCausalLM.from_config(CONFIGS["qwen2-untied"]()).save_pretrained(src)
    weights = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    for name, change in [("missing", "drop"), ("foreign", "add")]:
        bad = dict(weights)
        if change == "drop":
            del bad["model.layers.1.self_attn.k_proj.weight"]
        else:
            bad["model.layers.0.self_attn.qweight"] = torch.zeros(2)
        _write_config(tmp_path / name, **config)
        save_file(bad, tmp_path / name / "model.safetensors")
        with pytest.raises(UnsupportedModelError, match=name if name == "missing" else "unexp"):
            build_model(tmp_path / name)


# --------------------------------------------------------------------------------------------
# The packaged real models (slow: ~1 GB each in float32).

PROMPT = [{"role": "user", "content": "Write a Python function that reverses a string."}]


def _real(alias: str) -> str:
    from pice.shared.models import resolve_model

    try:
        return resolve_model(alias).path
    except PiceError as e:  # the packaged model is not installed here
        pytest.skip(f"{alias} unavailable: {e}")


@pytest.mark.real_model
@pytest.mark.parametrize("alias", ["qwen2.5-coder-0.5b-instruct", "gemma-3-270m"])
def test_real_model_matches_transformers(alias: str) -> None:
    from transformers import AutoTokenizer

    path = _real(alias)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.chat_template:
        enc: Any = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True)
        ids: list[int] = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    else:  # the packaged gemma-3-270m is the base model: no chat template
        ids = tok(f"Question: {PROMPT[0]['content']}\nAnswer:")["input_ids"]
    assert 15 <= len(ids) <= 40
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = build_model(path)
    expected = hf_logits(hf, ids)
    got = PagedCache(ours, num_blocks=64).step({0: ids})[0]
    diff = (got - expected).abs().max().item()
    print(f"{alias}: prefill logits max |diff| = {diff:.2e}")
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                          dtype=torch.long),
                          do_sample=False, max_new_tokens=32, min_new_tokens=32)
    assert greedy(ours, ids, 32) == ref[0, len(ids):].tolist()
