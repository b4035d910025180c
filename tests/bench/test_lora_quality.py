"""The real-adapter quality bench's pipeline on a tiny model: the cached lower states plus the
top layers give the full model's logits; the trained adapters are PEFT adapters, reused on a
rerun; compressed JD-Full at a rank covering every adapter reproduces the originals; the compressed
serving path of a trained adapter gives the tokens of the adapter materialised through peft.
Nothing here asserts how well briefly trained weights do (that differs between CPUs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from pice.bench.lora_adapters import materialize
from pice.bench.lora_compressed_quality import QualityConfig, run_quality
from pice.bench.lora_quality_report import quality_table, stores_table
from pice.bench.lora_quality_tasks import encode, examples, split, tasks
from pice.bench.lora_quality_train import TopStack, lower_states


def test_tasks_are_distinct_datasets(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    exs = examples()
    answers = [tuple(map(tuple, encode(tok, exs, t)[1])) for t in tasks()]
    assert len(tasks()) >= 24 and len(set(answers)) == len(answers)
    train, held = split(len(exs))
    assert held and not set(train) & set(held)
    assert len({exs[i][1] for i in held}) == len({c for _, c in exs})  # every topic held out


def test_cached_states_give_full_model_logits(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    exs = examples()[:5]
    enc = [encode(tok, exs, t) for t in tasks()[:3]]
    seqs = lower_states(model, 1, enc[0][0], [a for _, a in enc])
    stack = TopStack(model, 1)
    for task in seqs:
        with torch.no_grad():
            logits, target = stack.logits(task)
        ref, ref_t = [], []
        for _, ids, p in task:
            with torch.no_grad():
                full = model(input_ids=torch.tensor([ids])).logits[0]  # [n, V]
            ref.append(full[p - 1:len(ids) - 1])
            ref_t.append(torch.tensor(ids[p:]))
        assert torch.equal(target, torch.cat(ref_t))
        torch.testing.assert_close(logits, torch.cat(ref), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def result(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("quality")
    cfg = QualityConfig(tiny_model_dir, root / "out", n=3, steps=4, top=1, rank=2,
                        forced_ranks=[2, 8], cache_dir=root / "cache")
    return run_quality(cfg) | {"_cfg": cfg}


def test_quality_pipeline_structure(result: dict) -> None:
    cfg = result["_cfg"]
    saved = json.loads((cfg.out_dir / "lora_compressed_quality.json").read_text())
    assert (cfg.out_dir / "lora_compressed_quality.png").stat().st_size > 0
    assert [r["task"] for r in saved["rows"]] == [t[0] for t in tasks()[:3]]
    assert set(saved["stores"]) == {"full-budget", "diag-budget", "full-r2", "full-r8",
                                    "diag-r2", "diag-r8"}
    for row in saved["rows"]:
        for k in ("loss_base", "loss_original", "train_loss_start", "train_loss_end"):
            assert row[k] > 0
        for lab in ("full-r2", "full-r8", "diag-r2", "diag-r8"):  # forced: all compressed
            assert row[f"{lab}/status"] == "compressed"
            assert 0 <= row[f"{lab}/agree"] <= 1 and row[f"{lab}/error"] >= 0
        # rank 8 >= 3 adapters x rank 2 on one basis: JD-Full holds every ΔW exactly
        assert row["full-r8/error"] < 1e-4
        assert row["full-r8/agree"] >= 0.97  # (a near-tie may flip on another CPU)
        assert abs(row["full-r8/loss"] - row["loss_original"]) < 1e-4
    adapters = sorted(Path(saved["work_dir"], "adapters").iterdir())
    seeds = [json.loads((d / "train_log.json").read_text())["seed"] for d in adapters]
    assert len(set(seeds)) == 3  # each from its own seed
    text = quality_table(saved) + stores_table(saved)
    assert "full-r8" in text and "mean" in text


def test_rerun_reuses_states_and_adapters(result: dict) -> None:
    cfg = result["_cfg"]
    work = Path(result["work_dir"])
    files = sorted(work.glob("adapters/*/adapter_model.safetensors")) + sorted(
        work.parent.glob("states/*.safetensors"))
    assert len(files) == 6
    before = {f: f.stat().st_mtime_ns for f in files}
    again = run_quality(cfg)
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert [r["loss_original"] for r in again["rows"]] == \
        [r["loss_original"] for r in result["rows"]]


def test_compressed_serving_of_a_trained_adapter_matches_peft(tiny_model_dir: Path,
                                                             result: dict,
                                                             tmp_path: Path) -> None:
    from pice.shared.engine.generator import EngineGenerator
    from pice.shared.sampling import SamplingParams
    from tests.shared.engine.test_lora_exact import PROMPTS, peft_greedy

    work = Path(result["work_dir"])
    store = work / "stores" / "full-r2"
    ads = {d.name.split("-", 1)[1]: d for d in (work / "adapters").iterdir()}
    gen = EngineGenerator(str(tiny_model_dir), max_context=256, block_size=4,
                          kv_cache_gb=0.01, lora_max_rank=8, lora_slots=2)
    for name, d in ads.items():
        gen.add_adapter(name, d)
    assert sorted(gen.engine.pool.add_compressed(store)) == sorted(ads)
    names = sorted(ads)
    reqs = [(PROMPTS[i % 4], names[i % 3] if i % 4 else None) for i in range(6)]
    outs = gen.generate([p for p, _ in reqs], SamplingParams(max_tokens=6, ignore_eos=True),
                        adapters=[a for _, a in reqs])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for (prompt, name), out in zip(reqs, outs, strict=True):
        model = base if name is None else PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
            materialize(store, name, tmp_path / name)).eval()
        assert out.token_ids == peft_greedy(model, gen.chat.encode(prompt), 6), (prompt, name)
