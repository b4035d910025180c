"""The engine end to end on tiny random models: token-exact against transformers, with prefix
sharing, continuous batching and preemption changing nothing in the output."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pice.shared.engine.generator import EngineGenerator
from pice.shared.errors import ContextLengthError, UnsupportedModelError
from pice.shared.hf_backend import HFGenerator
from pice.shared.sampling import SamplingParams

SHARED = "Question: how can I sleep better? Outline: 1. Fixed schedule 2. Dark room 3. No screens"
PROMPTS = [SHARED + f" Write point {i}." for i in range(1, 9)]
MIXED = ["The quick brown fox", "Water boils at", SHARED, "How can I sleep better at night?"]


def engine(model_dir: Path, **options: object) -> EngineGenerator:
    opts: dict[str, object] = {"block_size": 4, "kv_cache_gb": 0.01}
    opts.update(options)
    return EngineGenerator(str(model_dir), max_context=512, **opts)


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path) -> HFGenerator:
    return HFGenerator(str(tiny_model_dir), max_context=512)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_is_token_exact_against_transformers(tiny_model_dir: Path, hf: HFGenerator,
                                                    prefix_caching: bool) -> None:
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    ours = engine(tiny_model_dir, prefix_caching=prefix_caching).generate(MIXED + PROMPTS, params)
    ref = [hf.generate([p], params)[0] for p in MIXED + PROMPTS]
    assert [o.token_ids for o in ours] == [r.token_ids for r in ref]
    for o, r in zip(ours, ref, strict=True):
        assert o.logprobs == pytest.approx(r.logprobs, abs=1e-3)


def test_shared_prefix_is_prefilled_once(tiny_model_dir: Path) -> None:
    params = SamplingParams(max_tokens=1)
    shared, unshared = engine(tiny_model_dir), engine(tiny_model_dir, prefix_caching=False)
    a = shared.generate(PROMPTS, params)
    b = unshared.generate(PROMPTS, params)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    prefix = len(shared.chat.encode(SHARED))
    computed, total = (shared.engine.stats["prefill_tokens"],
                       unshared.engine.stats["prefill_tokens"])
    assert total == sum(len(shared.chat.encode(p)) for p in PROMPTS)
    # 7 of the 8 prompts reuse (almost) all of the shared prefix's full blocks
    assert total - computed >= 7 * (prefix - 2 * 4)


def test_preemption_by_recompute_changes_nothing(tiny_model_dir: Path) -> None:
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    roomy = engine(tiny_model_dir).generate(MIXED, params)
    tight_engine = engine(tiny_model_dir, num_blocks=40)  # too few for all four at full length
    tight = tight_engine.generate(MIXED, params)
    assert tight_engine.engine.stats["preemptions"] > 0
    assert [t.token_ids for t in tight] == [r.token_ids for r in roomy]
    assert tight_engine.engine.blocks.num_free == 40  # every block came back


def test_concurrent_requests_batch_together_and_match_solo(tiny_model_dir: Path) -> None:
    gen = engine(tiny_model_dir)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    solo = [gen.generate([p], params)[0].token_ids for p in MIXED]
    steps_before = gen.engine.stats["steps"]
    results: dict[int, list[int]] = {}

    def call(i: int) -> None:
        results[i] = gen.generate([MIXED[i]], params)[0].token_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(MIXED))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[i] for i in range(len(MIXED))] == solo
    # four 20-token requests alone would take >= 4 * 20 steps; batched they share steps
    assert gen.engine.stats["steps"] - steps_before < 4 * 20


def test_stream_matches_generate(tiny_model_dir: Path) -> None:
    gen = engine(tiny_model_dir)
    params = SamplingParams(max_tokens=12)
    assert "".join(gen.stream(MIXED[0], params)) == gen.generate([MIXED[0]], params)[0].text


def test_sampling_seed_top_k_and_stop(tiny_model_dir: Path) -> None:
    gen = engine(tiny_model_dir)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    assert gen.generate(MIXED, seeded)[1].token_ids == gen.generate(MIXED, seeded)[1].token_ids
    top1 = SamplingParams(max_tokens=12, temperature=0.7, top_k=1, ignore_eos=True)
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in gen.generate(MIXED, top1)] == \
        [o.token_ids for o in gen.generate(MIXED, greedy)]
    full = gen.generate([MIXED[0]], greedy)[0].text
    stop = full[3:6]
    cut = gen.generate([MIXED[0]], SamplingParams(max_tokens=12, stop=(stop,)))[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"


def test_top_p_restricts_to_the_nucleus(tiny_model_dir: Path) -> None:
    gen = engine(tiny_model_dir)
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-6, seed=0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ids = gen.chat.encode(MIXED[2])
    with torch.no_grad():
        top = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    for seed in range(5):  # a tiny nucleus holds only the most likely token
        out = gen.generate([MIXED[2]], SamplingParams(**{**params.__dict__, "seed": seed}))
        assert out[0].token_ids == [top]


def test_admission_errors_are_clear(tiny_model_dir: Path, tmp_path: Path) -> None:
    gen = engine(tiny_model_dir)
    with pytest.raises(ContextLengthError, match="context limit of 512"):
        gen.generate(["word " * 600], SamplingParams(max_tokens=4))
    with pytest.raises(ContextLengthError, match="max_tokens"):
        gen.generate(["hi"], SamplingParams(max_tokens=600))
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(architectures=["MambaForCausalLM"], model_type="mamba")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM"):
        EngineGenerator(str(tmp_path / "m"))


@pytest.mark.real_model
def test_packaged_edge_model_is_token_exact_against_transformers() -> None:
    from pice.shared.models import DEFAULT_EDGE_MODEL, resolve_model

    path = resolve_model(DEFAULT_EDGE_MODEL).path
    ours = EngineGenerator(path, max_context=1024, kv_cache_gb=0.25)
    questions = ["How do vaccines work?", "Write a Python function that reverses a string.",
                 "What causes the seasons on Earth?", "Give three tips for saving money.",
                 "Explain what a hash table is."]
    prompts = [ours.render_chat([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    batched = ours.generate(prompts, params)  # all five in one continuous batch
    ref = HFGenerator(path, max_context=1024)
    for prompt, got in zip(prompts, batched, strict=True):
        want = ref.generate([prompt], params)[0]
        assert got.token_ids == want.token_ids
        assert got.logprobs == pytest.approx(want.logprobs, abs=2e-3)


def test_closing_a_stream_early_aborts_the_sequence(tiny_model_dir: Path) -> None:
    gen = engine(tiny_model_dir)
    budget = 512 - 32  # as many tokens as the context allows: the abort lands long before
    stream = gen.stream(MIXED[0], SamplingParams(max_tokens=budget, ignore_eos=True))
    next(stream)
    [seq] = [h.seq for h in list(gen._live.values())]
    stream.close()  # the client went away after the first piece
    deadline = time.monotonic() + 300  # only a hang guard: a busy machine is slow, not wrong
    while gen.engine.has_work and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not gen.engine.has_work
    assert gen.engine.blocks.num_free == gen.engine.blocks.num_blocks  # its blocks came back
    assert seq.finish_reason == "abort"  # ended by the close, not by running to max_tokens
    assert seq.num_completion_tokens < budget


def test_min_tokens_holds_back_ending_tokens(tiny_model_dir: Path, hf: HFGenerator) -> None:
    """min_tokens (vLLM's): the tokens that would end a sequence cannot be chosen before it has
    that many; the other rows of the batch are unchanged; transformers agrees."""
    gen = engine(tiny_model_dir)
    free = gen.generate(MIXED, SamplingParams(max_tokens=12, ignore_eos=True))
    # each prompt's own first greedy token ends it at once: made a stop id
    for prompt, out in zip(MIXED, free, strict=True):
        first = out.token_ids[0]
        stop = SamplingParams(max_tokens=12, stop_token_ids=(first,))
        assert gen.generate([prompt], stop)[0].token_ids == [first]
        held = SamplingParams(max_tokens=12, stop_token_ids=(first,), min_tokens=5)
        ids = gen.generate([prompt], held)[0].token_ids
        assert len(ids) >= 5 and first not in ids[:5]
        assert ids == hf.generate([prompt], held)[0].token_ids
    # ignore_eos with min_tokens: nothing to hold back, the same tokens
    again = gen.generate(MIXED, SamplingParams(max_tokens=12, ignore_eos=True, min_tokens=3))
    assert [o.token_ids for o in again] == [o.token_ids for o in free]


def test_min_tokens_is_validated() -> None:
    from pice.shared.errors import BadRequestError

    with pytest.raises(BadRequestError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(BadRequestError, match="min_tokens"):
        SamplingParams(min_tokens=-1)
