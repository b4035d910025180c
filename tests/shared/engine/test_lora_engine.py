"""Adapters through the engine's generator: unknown and bad adapters are refused before
anything runs and the engine keeps serving; removal waits for users and returns memory; more
adapters than slots means waiting, not errors; a file that vanished fails only its request."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pice.bench.lora_adapters import write_adapter
from pice.shared.engine.generator import EngineGenerator
from pice.shared.errors import (
    BadRequestError,
    ConflictError,
    InvalidAdapterError,
    NotFoundError,
)
from pice.shared.hf_backend import HFGenerator
from pice.shared.sampling import SamplingParams

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)
PROMPTS = ["The quick brown fox", "Water boils at", "How can I sleep better at night?"]


def engine(model_dir: Path, slots: int = 2) -> EngineGenerator:
    return EngineGenerator(str(model_dir), max_context=256, block_size=4, kv_cache_gb=0.01,
                           lora_max_rank=8, lora_slots=slots)


def adapter(gen: EngineGenerator, root: Path, name: str, seed: int, rank: int = 4) -> Path:
    path = write_adapter(root / name, gen.engine.pool.shape, rank=rank, alpha=2 * rank,
                         targets=("q_proj", "v_proj", "down_proj"), seed=seed, std=0.3)
    gen.add_adapter(name, path)
    return path


def test_unknown_and_bad_adapters_are_refused_and_serving_goes_on(tiny_model_dir: Path,
                                                                  tmp_path: Path) -> None:
    gen = engine(tiny_model_dir)
    with pytest.raises(NotFoundError, match="'nope' does not exist"):
        gen.generate(PROMPTS[:2], PARAMS, adapters=[None, "nope"])
    with pytest.raises(NotFoundError):
        list(gen.stream(PROMPTS[0], PARAMS, adapter="nope"))
    bad = write_adapter(tmp_path / "bad", gen.engine.pool.shape, rank=16, alpha=8,
                        targets=("q_proj",))
    with pytest.raises(InvalidAdapterError, match=r"rank r must be an integer in \[1, 8\]"):
        gen.add_adapter("bad", bad)
    assert gen.adapters() == []
    assert gen.engine.pool.stats == {"hits": 0, "misses": 0, "disk_loads": 0, "swaps": 0,
                                     "evictions": 0}
    assert len(gen.generate(PROMPTS, PARAMS)) == 3  # still serving


def test_stream_and_batch_agree_and_adapters_wait_for_slots(tiny_model_dir: Path,
                                                            tmp_path: Path) -> None:
    gen = engine(tiny_model_dir, slots=1)
    for i in range(3):
        adapter(gen, tmp_path, f"t{i}", seed=i)
    names: list[str | None] = ["t0", "t1", None, "t2", "t0", "t1", "t2", None]
    prompts = [PROMPTS[i % 3] for i in range(len(names))]
    batch = gen.generate(prompts, PARAMS, adapters=names)  # one slot, three adapters: waits
    alone = [gen.generate([p], PARAMS, adapters=[n])[0] for p, n in zip(prompts, names,
                                                                          strict=True)]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    streamed = "".join(gen.stream(prompts[1], PARAMS, adapter="t1"))
    assert streamed == alone[1].text
    assert {batch[0].text, batch[1].text} != {batch[2].text}  # adapters change the output
    assert gen.resident_adapters() <= {"t0", "t1", "t2"} and len(gen.resident_adapters()) == 1
    stats = gen.engine.pool.stats
    assert stats["hits"] + stats["misses"] == 6 + 6 + 1


def test_remove_waits_for_users_then_returns_memory(tiny_model_dir: Path,
                                                    tmp_path: Path) -> None:
    gen = engine(tiny_model_dir)
    adapter(gen, tmp_path, "r", seed=1)
    release = threading.Event()
    stream = gen.stream(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True), adapter="r")
    next(stream)  # running now
    with pytest.raises(ConflictError, match="in use by 1 request"):
        gen.remove_adapter("r")
    assert gen.resident_adapters() == {"r"}
    stream.close()  # the client goes away: the sequence is aborted (soon: the loop sees it)
    deadline = time.monotonic() + 300  # only a hang guard: a busy machine is slow, not wrong
    while True:
        try:
            gen.remove_adapter("r")
            break
        except ConflictError:
            assert time.monotonic() < deadline, "the aborted sequence never let go"
            release.wait(0.01)
    pool = gen.engine.pool
    assert gen.adapters() == [] and gen.resident_adapters() == set()
    assert pool.host_used == 0 and not pool.on_host()
    with pytest.raises(NotFoundError):
        gen.remove_adapter("r")
    adapter(gen, tmp_path / "again", "r", seed=2)  # the name is free again
    assert len(gen.generate(PROMPTS[:1], PARAMS, adapters=["r"])) == 1


def test_vanished_adapter_file_fails_only_its_request(tiny_model_dir: Path,
                                                      tmp_path: Path) -> None:
    gen = engine(tiny_model_dir)
    path = adapter(gen, tmp_path, "gone", seed=3)
    adapter(gen, tmp_path, "ok", seed=4)
    (path / "adapter_model.safetensors").unlink()
    good = gen.generate([PROMPTS[0]], PARAMS, adapters=["ok"])[0]
    with pytest.raises(InvalidAdapterError, match="'gone' could not be read"):
        gen.generate([PROMPTS[1]], PARAMS, adapters=["gone"])
    assert gen.generate([PROMPTS[0]], PARAMS, adapters=["ok"])[0].token_ids == good.token_ids
    gen.remove_adapter("gone")  # its use was dropped when it failed


def test_hf_backend_refuses_adapters(tiny_generator: HFGenerator, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="hf backend serves no LoRA adapters"):
        tiny_generator.generate(PROMPTS[:1], PARAMS, adapters=["x"])
    with pytest.raises(BadRequestError, match="backend=engine"):
        tiny_generator.add_adapter("x", tmp_path)
    assert tiny_generator.adapters() == [] and tiny_generator.resident_adapters() == set()
