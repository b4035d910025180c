"""Edge groups are exact: greedy tokens of a model split over 2 and 3 stage processes on loopback
equal the single-process engine's, for each architecture; and a stage killed with kill -9 costs
nothing but a replay (same tokens) once survivors are re-planned."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pice.shared.engine.config import EngineConfig
from pice.shared.engine.llm_engine import LLMEngine
from pice.shared.sampling import SamplingParams
from tests.edge.group_procs import StageProc, configure, prompts, tiny_arch

MAX_TOKENS = 12
SPLITS = {2: [(0, 2), (2, 4)], 3: [(0, 1), (1, 3), (3, 4)]}


def engine_tokens(model: Path, batch: list[list[int]], max_tokens: int) -> list[list[int]]:
    eng = LLMEngine(EngineConfig(model=str(model), max_model_len=512, max_num_batched_tokens=512,
                                 num_blocks=128, block_size=4), set(), lambda ids: "")
    seqs = eng.generate_ids(batch, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return [s.completion_ids for s in seqs]


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[StageProc]]:
    logs = tmp_path_factory.mktemp("group-logs")
    procs = [StageProc(logs, f"s{i}") for i in range(3)]
    yield procs
    for p in procs:
        p.send({"exit": True}) if p.proc.poll() is None else None
        p.kill()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {a: tiny_arch(a, tmp_path_factory.mktemp(a)) for a in ("qwen2", "llama", "gemma3")}


EPOCH = iter(range(1, 1000))


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
@pytest.mark.parametrize("n", [2, 3])
def test_split_model_matches_single_process(stages: list[StageProc], models: dict[str, Path],
                                            arch: str, n: int) -> None:
    batch = prompts(6, seed=n)
    want = engine_tokens(models[arch], batch, MAX_TOKENS)
    assert len({t for w in want for t in w}) > 3  # a varied reference
    configure(stages[:n], models[arch], SPLITS[n], next(EPOCH))
    head = stages[0]
    head.generate(batch, MAX_TOKENS)
    got = head.results(len(batch))
    assert [got[str(i)]["tokens"] for i in range(len(batch))] == want
    assert all(got[str(i)]["finish_reason"] == "length" for i in range(len(batch)))


def test_seeded_sampling_matches_single_process(stages: list[StageProc],
                                                models: dict[str, Path]) -> None:
    """The last stage samples with each request's own seeded generator, as the engine does."""
    batch = prompts(4, seed=11)
    eng = LLMEngine(EngineConfig(model=str(models["qwen2"]), max_model_len=512,
                                 max_num_batched_tokens=512, num_blocks=128, block_size=4),
                    set(), lambda ids: "")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.95, seed=5,
                            ignore_eos=True)
    want = [s.completion_ids for s in eng.generate_ids(batch, params)]
    configure(stages[:2], models["qwen2"], SPLITS[2], next(EPOCH))
    stages[0].generate(batch, MAX_TOKENS, temperature=0.9, top_p=0.95, seed=5)
    got = stages[0].results(len(batch))
    assert [got[str(i)]["tokens"] for i in range(len(batch))] == want


def test_min_tokens_holds_back_eos_as_the_engine_does(models: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """min_tokens over a group: the first stage flags the records under it and the last stage
    masks EOS for them, so the tokens equal the single-process engine's with the same EOS."""
    batch = prompts(4, seed=3)
    free = engine_tokens(models["qwen2"], batch, MAX_TOKENS)
    eos = next(t for t in free[0][1:] if t != free[0][0])  # an early greedy token, made EOS
    eng = LLMEngine(EngineConfig(model=str(models["qwen2"]), max_model_len=512,
                                 max_num_batched_tokens=512, num_blocks=128, block_size=4),
                    {eos}, lambda ids: "")
    held = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=6)
    want = [s.completion_ids for s in eng.generate_ids(batch, held)]
    early = [s.completion_ids for s in eng.generate_ids(batch, SamplingParams(
        max_tokens=MAX_TOKENS))]
    assert len(early[0]) < 6 <= len(want[0])  # min_tokens changes this reference
    procs = [StageProc(tmp_path, f"m{i}", extra=("--eos", str(eos))) for i in range(2)]
    try:
        configure(procs, models["qwen2"], SPLITS[2], next(EPOCH))
        for i, p in enumerate(batch):
            procs[0].send({"generate": {"id": str(i), "prompt_ids": p, "max_tokens": MAX_TOKENS,
                                        "min_tokens": 6}})
        got = procs[0].results(len(batch))
    finally:
        for p in procs:
            p.kill()
    assert [got[str(i)]["tokens"] for i in range(len(batch))] == want
