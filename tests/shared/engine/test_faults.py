"""A fault in one sequence fails that sequence alone: degenerate sampling values that validation
lets through are sampled safely; non-finite logits (from a finite adapter that overflows) end
their sequence alone, with a clear error, and leave no NaN behind in the KV cache; a sequence
whose forward pass raises is ended alone while the rest of its batch goes on."""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path

import pytest
import torch

from pice.bench.lora_adapters import write_adapter
from pice.shared.engine.generator import EngineGenerator
from pice.shared.engine.sampler import FAULT_TOKEN, sample
from pice.shared.engine.sequence import Sequence, SequenceFaultError
from pice.shared.errors import BadRequestError
from pice.shared.sampling import SamplingParams

pytestmark = pytest.mark.fault

PROMPTS = ["The quick brown fox", "Water boils at", "How can I sleep better at night?",
           "You plan answers."]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def engine(model_dir: Path) -> EngineGenerator:
    return EngineGenerator(str(model_dir), max_context=256, block_size=4, kv_cache_gb=0.01,
                           lora_max_rank=8, lora_slots=2)


@pytest.fixture(scope="module")
def gen(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> EngineGenerator:
    g = engine(tiny_model_dir)
    root = tmp_path_factory.mktemp("fault-adapters")
    shape = g.engine.pool.shape
    g.add_adapter("ok", write_adapter(root / "ok", shape, rank=4, alpha=8,
                                      targets=("q_proj", "v_proj"), seed=1, std=0.3))
    # finite weights (so they pass validation) that overflow float32 in the forward pass
    g.add_adapter("huge", write_adapter(root / "huge", shape, rank=4, alpha=8,
                                        targets=("q_proj", "v_proj"), seed=2, std=1e19,
                                        dtype=torch.float32))
    return g


def solo(gen: EngineGenerator, prompt: str, params: SamplingParams = GREEDY,
         adapter: str | None = None) -> list[int]:
    return gen.generate([prompt], params, adapters=[adapter])[0].token_ids


# ---- the sampler alone --------------------------------------------------------------------------
def seqs(*params: SamplingParams) -> list[Sequence]:
    return [Sequence([1, 2, 3], p) for p in params]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-38, seed=0),
    SamplingParams(temperature=5e-324, seed=0),  # the smallest positive double
    SamplingParams(temperature=1.0, top_p=1e-46, seed=0),  # rounds to 0 in float32
    SamplingParams(temperature=1e-38, top_p=1e-46, top_k=1, seed=0),
    SamplingParams(temperature=2.0, top_k=10**9, seed=0),
    SamplingParams(temperature=2.0, top_p=1.0 - 1e-16, seed=0),
], ids=["t1e-38", "t5e-324", "p1e-46", "all-tiny", "huge-k", "p-just-below-1"])
def test_degenerate_but_valid_params_sample_safely(params: SamplingParams) -> None:
    # logits as large as a real model's (about +-30) and some as large as float32 allows
    logits = torch.tensor([[30.0, -30.0, 29.0, 0.0], [3e38, -3e38, 1e38, 0.0]])
    batch = seqs(params, params)
    ids, lps = sample(logits, batch)
    assert batch[0].fault is None and batch[1].fault is None
    if params.temperature < 1e-30 or params.top_p < 1e-30:  # vanishing: greedy
        assert ids == [0, 0]
    else:
        assert all(0 <= i < 4 for i in ids)
    assert all(math.isfinite(lp) for lp in lps)


@pytest.mark.parametrize("row, why", [
    ([float("nan"), 0.0, 1.0], "NaN"),
    ([float("inf"), 0.0, 1.0], r"\+Inf"),
    ([float("-inf")] * 3, "no finite value"),
])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_a_non_finite_row_is_its_sequence_fault_alone(row: list[float], why: str,
                                                      temperature: float) -> None:
    p = SamplingParams(temperature=temperature, seed=1)
    batch = seqs(p, p, p)
    logits = torch.tensor([[0.0, 5.0, 1.0], row, [float("-inf"), 1.0, 4.0]])  # -inf is fine
    ids, lps = sample(logits, batch)
    assert ids[1] == FAULT_TOKEN and math.isnan(lps[1])
    assert batch[1].fault is not None and re.search(why, batch[1].fault)
    assert batch[0].fault is None and batch[2].fault is None
    if temperature == 0.0:
        assert (ids[0], ids[2]) == (1, 2)
    assert math.isfinite(lps[0]) and math.isfinite(lps[2])


# ---- the engine: concurrent sequences of two tenants ------------------------------------------
def test_degenerate_sampling_does_not_touch_other_sequences(gen: EngineGenerator) -> None:
    refs = [solo(gen, p) for p in PROMPTS]
    tiny = [SamplingParams(max_tokens=8, ignore_eos=True, temperature=1e-38, seed=1),
            SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, top_p=1e-46, seed=2)]
    out: dict[str, list[int]] = {}

    def other_tenant() -> None:  # greedy requests sharing the steps
        for i, c in enumerate(gen.generate(PROMPTS, GREEDY)):
            out[f"other{i}"] = c.token_ids

    t = threading.Thread(target=other_tenant)
    t.start()
    for k, p in enumerate(tiny):
        out[f"tiny{k}"] = gen.generate([PROMPTS[0]], p)[0].token_ids
    t.join()
    assert [out[f"other{i}"] for i in range(len(PROMPTS))] == refs
    assert out["tiny0"] == out["tiny1"] == refs[0]  # a vanishing temperature/top_p is greedy


def test_non_finite_logits_end_that_sequence_alone(gen: EngineGenerator) -> None:
    refs = [solo(gen, p) for p in PROMPTS]
    ok_ref = solo(gen, PROMPTS[1], adapter="ok")
    seeded = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.8, seed=7)
    seeded_ref = solo(gen, PROMPTS[2], seeded)
    faults_before = gen.engine.stats["faults"]
    # the faulty sequence comes first (it takes the first free KV blocks); the others share
    # its steps: the base model greedy and sampled, and another adapter
    runs = [(PROMPTS[0], GREEDY, "huge"), (PROMPTS[0], GREEDY, None),
            (PROMPTS[2], seeded, None), (PROMPTS[2], GREEDY, None), (PROMPTS[1], GREEDY, "ok")]
    handles = [gen.submit(p, params, adapter=a) for p, params, a in runs]
    for h in handles:
        h.done.wait()
    with pytest.raises(SequenceFaultError, match=r"with adapter 'huge': the model's logits "
                                                 r"became (NaN|\+Inf).*no other was affected"):
        gen._completion(handles[0])
    assert handles[0].seq.finish_reason == "error"
    assert [gen._completion(h).token_ids for h in handles[1:]] == \
        [refs[0], seeded_ref, refs[2], ok_ref]
    assert gen.engine.stats["faults"] == faults_before + 1
    # nothing non-finite is left in the cache: later steps (with padding) are still exact
    assert all(bool(torch.isfinite(k).all() and torch.isfinite(v).all())
               for k, v in gen.engine.runner.kv_caches)
    assert [c.token_ids for c in gen.generate(PROMPTS, GREEDY)] == refs
    with pytest.raises(SequenceFaultError):  # a stream gets the same error, alone
        list(gen.stream(PROMPTS[3], GREEDY, adapter="huge"))
    assert solo(gen, PROMPTS[3]) == refs[3]
    gen.remove_adapter("huge")  # its uses were dropped when its sequences failed


def test_a_sequence_whose_forward_pass_raises_fails_alone(gen: EngineGenerator) -> None:
    eng = gen.engine
    prompt = gen.chat.encode(PROMPTS[1])
    ref = solo(gen, PROMPTS[1])
    good = eng.make_sequence(prompt, GREEDY)
    # a token id the embedding does not have: admission refuses it ...
    with pytest.raises(BadRequestError, match=r"prompt token ids must be integers in \[0, "):
        eng.make_sequence([1, 10**6], GREEDY)
    # ... and a sequence that got past it anyway (a bug) fails alone: its batch goes on
    bad = Sequence([1, 10**6], GREEDY)
    assert not eng.has_work  # the loop thread is idle: step this engine here
    eng.add(bad)
    eng.add(good)
    while good.finish_reason is None:
        eng.step()
    assert bad.finish_reason == "error" and isinstance(bad.error, SequenceFaultError)
    assert "forward pass failed (IndexError" in str(bad.error)
    assert good.completion_ids == ref and good.finish_reason == "length"


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_seeds_a_generator_cannot_take_are_refused(seed: int) -> None:
    with pytest.raises(BadRequestError, match="seed must be in") as err:
        SamplingParams(temperature=1.0, seed=seed)
    assert err.value.field == "seed"


def test_a_batch_delivers_every_other_point_before_the_fault(gen: EngineGenerator,
                                                             tmp_path: Path) -> None:
    """An edge worker's batch mixes points (of several requests): one point's fault must not
    swallow the others' results."""
    gen.add_adapter("huge2", write_adapter(tmp_path / "huge2", gen.engine.pool.shape, rank=4,
                                           alpha=8, targets=("q_proj", "v_proj"), seed=2,
                                           std=1e19, dtype=torch.float32))
    refs = [solo(gen, p) for p in PROMPTS]
    got: dict[int, list[int]] = {}
    with pytest.raises(SequenceFaultError, match="with adapter 'huge2'"):
        for i, c in gen.generate_iter([PROMPTS[0], *PROMPTS], GREEDY,
                                      adapters=["huge2", None, None, None, None]):
            got[i] = c.token_ids
    assert got == {i + 1: ref for i, ref in enumerate(refs)}
    gen.remove_adapter("huge2")
