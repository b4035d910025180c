"""Compressed serving is exact: in one engine batch mixing compressed adapters (two clusters,
JD-Full and JD-Diag stores), uncompressed adapters and base-only rows, every compressed request
gets the greedy tokens peft gives the same adapter materialised as a plain LoRA
(B' = U Σ_i, A' = Vᵀ)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pice.bench.lora_adapters import materialize, peft_adapter, write_shared_adapters
from pice.shared.engine.generator import EngineGenerator
from pice.shared.lora.compress import CompressConfig, Source, compress
from pice.shared.lora.compress.serve import shape_from_config
from pice.shared.sampling import SamplingParams
from tests.shared.engine.test_lora_exact import PROMPTS, peft_greedy

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def stores(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compressed")
    shape = shape_from_config(tiny_model_dir)
    # 6 adapters in two shared subspaces (two targeting every projection, the rest attention)
    paths = write_shared_adapters(root / "ads", shape, 4, clusters=2, rank=4, subspace=4,
                                  targets=ALL, noise=0.02, std=0.3, seed=1, prefix="all-")
    paths += write_shared_adapters(root / "ads", shape, 2, clusters=2, rank=2, subspace=4,
                                   targets=("q_proj", "v_proj", "o_proj"), noise=0.02, std=0.3,
                                   seed=2, prefix="attn-")
    sources = [Source(p.name, p) for p in paths]
    out = {"__ads__": root / "ads"}
    for method in ("full", "diag"):
        cfg = CompressConfig(method=method, budget=10.0, ranks=[4], clusters=[2], max_rank=16)
        manifest = compress(sources, shape, root / method, cfg, progress=False)
        assert manifest["totals"]["compressed"] == 6, manifest["adapters"]
        assert manifest["totals"]["clusters"] == 2
        out[method] = root / method
    return out


@pytest.mark.parametrize("method", ["full", "diag"])
def test_compressed_batch_matches_peft_materialised(tiny_model_dir: Path,
                                                    stores: dict[str, Path], method: str,
                                                    tmp_path: Path) -> None:
    store, ads = stores[method], stores["__ads__"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    plain = {"plain0": peft_adapter(base, tmp_path / "plain0", rank=3, alpha=6, targets=ALL,
                                    seed=5, std=0.25)}
    # 3 slots: two cluster bases and one plain adapter fit; every request waits for nothing
    gen = EngineGenerator(str(tiny_model_dir), max_context=256, block_size=4,
                          kv_cache_gb=0.01, lora_max_rank=16, lora_slots=3)
    names = sorted(d.name for d in ads.iterdir())
    for name in names:
        gen.add_adapter(name, ads / name)
    gen.add_adapter("plain0", plain["plain0"])
    assert sorted(gen.engine.pool.add_compressed(store)) == names
    infos = {a.name: a for a in gen.adapters()}
    assert all(infos[n].compressed for n in names) and infos["plain0"].compressed is None

    reqs: list[tuple[str, str | None]] = []
    for i, name in enumerate(names):
        reqs.append((PROMPTS[i % 4], name))
        if i % 2 == 0:
            reqs.append((PROMPTS[(i + 1) % 4], None))
            reqs.append((PROMPTS[i % 4], "plain0"))
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    ours = gen.generate([p for p, _ in reqs], params, adapters=[a for _, a in reqs])

    models: dict[str | None, torch.nn.Module] = {None: base}
    models["plain0"] = PeftModel.from_pretrained(copy.deepcopy(base), plain["plain0"]).eval()
    for name in names:
        mat = materialize(store, name, tmp_path / f"mat-{name}")
        models[name] = PeftModel.from_pretrained(copy.deepcopy(base), mat).eval()
    differs = set()
    for (prompt, name), out in zip(reqs, ours, strict=True):
        ids = gen.chat.encode(prompt)
        ref = peft_greedy(models[name], ids, NEW_TOKENS)
        assert out.token_ids == ref, f"{method}: adapter {name} on {prompt!r}"
        if name is not None and ref != peft_greedy(base, ids, NEW_TOKENS):
            differs.add(name)
    assert len(differs) >= 5  # the compressed adapters really change the output


def test_remove_drops_sigma_at_once(tiny_model_dir: Path, stores: dict[str, Path],
                                    tmp_path: Path) -> None:
    import shutil

    from pice.shared.lora.compress.store import load_manifest, sigma_key

    store = tmp_path / "store"
    shutil.copytree(stores["full"], store)
    ads = stores["__ads__"]
    gen = EngineGenerator(str(tiny_model_dir), max_context=256, block_size=4,
                          kv_cache_gb=0.01, lora_max_rank=16, lora_slots=2)
    for d in sorted(ads.iterdir()):
        gen.add_adapter(d.name, d)
    gen.engine.pool.add_compressed(store)
    table = gen.engine.pool.buffers.sigma  # type: ignore[union-attr]
    kind, row = table.rows["all-0"]
    assert table.tables[kind][0]["qkv"][row].abs().sum() > 0
    gen.remove_adapter("all-0")
    assert "all-0" not in table.rows
    assert table.tables[kind][0]["qkv"][row].abs().sum() == 0
    assert not (store / "sigma" / f"{sigma_key('all-0')}.safetensors").exists()
    assert "all-0" not in load_manifest(store)["adapters"]
    assert "all-0" not in {a.name for a in gen.adapters()}
    # the others still serve
    out = gen.generate([PROMPTS[0]], SamplingParams(max_tokens=2), adapters=["all-1"])
    assert out[0].completion_tokens == 2
