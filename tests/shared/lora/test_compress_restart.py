"""Compressed stores survive restarts: a compression killed with SIGKILL in the middle of its
trials resumes to the store an uninterrupted run writes, and an engine started afresh in another
process serves the store with exactly the tokens the first engine gave."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pice.shared.lora.compress.run as run_mod
from pice.bench.lora_adapters import write_adapter, write_shared_adapters
from pice.shared.lora.compress import CompressConfig, Source, compress
from pice.shared.lora.compress.serve import shape_from_config
from pice.shared.lora.compress.store import load_manifest, read_sigma

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ROOT = Path(__file__).resolve().parents[3]
CFG = {"budget": 0.3, "ranks": [2, 4], "clusters": [1, 2]}


@pytest.fixture(scope="module")
def ads(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ads")
    shape = shape_from_config(tiny_model_dir)
    write_shared_adapters(root, shape, 8, clusters=2, rank=4, subspace=4, targets=ATTN,
                          noise=0.01, std=0.3, seed=3, prefix="s-")
    write_adapter(root / "rand-0", shape, rank=8, alpha=16, targets=ATTN, seed=90)
    return root


def _sources(ads: Path) -> list[Source]:
    return [Source(d.name, d) for d in sorted(ads.iterdir())]


def _run(script: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_killed_compression_resumes_to_the_same_store(tiny_model_dir: Path, ads: Path,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    shape = shape_from_config(tiny_model_dir)
    ref = compress(_sources(ads), shape, tmp_path / "ref", CompressConfig(**CFG),
                   progress=False)
    store = tmp_path / "store"
    # another process, SIGKILLed (no cleanup of any kind) as it starts its third trial
    proc = _run(f"""
        import os, signal
        from pathlib import Path
        import pice.shared.lora.compress.run as run_mod
        from pice.shared.lora.compress import CompressConfig, Source, compress
        from pice.shared.lora.compress.serve import shape_from_config
        real, calls = run_mod.cluster, []
        def dying(*a, **kw):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **kw)
        run_mod.cluster = dying
        ads = Path({str(ads)!r})
        compress([Source(d.name, d) for d in sorted(ads.iterdir())],
                 shape_from_config(Path({str(tiny_model_dir)!r})), Path({str(store)!r}),
                 CompressConfig(**{CFG!r}), progress=False)
    """)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (store / "manifest.json").exists()
    trials = json.loads(next((store / "work").glob("*.trials.json")).read_text())["trials"]
    assert len(trials) == 2
    calls: list[tuple[int, int]] = []
    real = run_mod.cluster

    def counting(stack, k, method, rank, **kw):  # type: ignore[no-untyped-def]
        calls.append((rank, k))
        return real(stack, k, method, rank, **kw)

    monkeypatch.setattr(run_mod, "cluster", counting)
    got = compress(_sources(ads), shape, store, CompressConfig(**CFG), progress=False)
    assert calls == [(4, 1), (4, 2)]  # only what the killed run had not finished
    strip = ("path",)
    assert {n: {k: v for k, v in a.items() if k not in strip} for n, a in
            got["adapters"].items()} == {n: {k: v for k, v in a.items() if k not in strip}
                                         for n, a in ref["adapters"].items()}
    assert got["totals"]["compressed"] >= 8 and got["adapters"]["rand-0"]["status"] == \
        "uncompressed"
    for name, entry in got["adapters"].items():
        if entry["status"] == "compressed":
            a, b = read_sigma(store / entry["sigma"]), read_sigma(tmp_path / "ref" /
                                                                   entry["sigma"])
            assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name


_SERVE = """
    import json, sys
    from pathlib import Path
    from pice.shared.engine.generator import EngineGenerator
    from pice.shared.sampling import SamplingParams
    from tests.shared.engine.test_lora_exact import PROMPTS
    model, ads, store = (Path(p) for p in sys.argv[1:4])
    gen = EngineGenerator(str(model), max_context=256, block_size=4, kv_cache_gb=0.01,
                          lora_max_rank=16, lora_slots=2)
    names = sorted(d.name for d in ads.iterdir())
    for d in sorted(ads.iterdir()):
        gen.add_adapter(d.name, d)
    served = sorted(gen.engine.pool.add_compressed(store))
    reqs = [(PROMPTS[i % 4], names[i % len(names)] if i % 3 else None) for i in range(9)]
    outs = gen.generate([p for p, _ in reqs], SamplingParams(max_tokens=6, ignore_eos=True),
                        adapters=[a for _, a in reqs])
    print(json.dumps({"served": served, "tokens": [o.token_ids for o in outs],
                      "reqs": reqs}))
"""


def _serve(model: Path, ads: Path, store: Path) -> dict:  # type: ignore[type-arg]
    script = textwrap.dedent(_SERVE) + "\n"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, str(model), str(ads), str(store)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_restarted_engine_serves_the_store_identically(tiny_model_dir: Path, ads: Path,
                                                       tmp_path: Path) -> None:
    shape = shape_from_config(tiny_model_dir)
    store = tmp_path / "store"
    manifest = compress(_sources(ads), shape, store, CompressConfig(**CFG), progress=False)
    compressed = sorted(n for n, a in manifest["adapters"].items()
                        if a["status"] == "compressed")
    first = _serve(tiny_model_dir, ads, store)  # one engine process ...
    assert first["served"] == compressed and len(compressed) >= 8
    second = _serve(tiny_model_dir, ads, store)  # ... and a fresh one on the reopened store
    assert second == first
    assert load_manifest(store)["adapters"].keys() == manifest["adapters"].keys()
    base = [t for (_, a), t in zip(first["reqs"], first["tokens"], strict=True) if a is None]
    used = [t for (_, a), t in zip(first["reqs"], first["tokens"], strict=True) if a]
    assert any(t not in base for t in used)  # the adapters change the output
