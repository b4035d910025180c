"""`pice adapters compress` end to end on tiny adapters: tenant boundaries, the error budget
refusing incompressible adapters (reported, left uncompressed), resuming an interrupted run,
and the command's report (time, bytes saved)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import pice.shared.lora.compress.run as run_mod
from pice.bench.lora_adapters import write_adapter, write_shared_adapters
from pice.cli import main
from pice.shared.lora.compress import CompressConfig, Source, compress
from pice.shared.lora.compress.serve import shape_from_config

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def ads(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ads")
    shape = shape_from_config(tiny_model_dir)
    write_shared_adapters(root, shape, 8, clusters=2, rank=4, subspace=4, targets=ATTN,
                          noise=0.01, seed=3, prefix="s-")
    for i in range(2):  # independent random adapters: no shared subspace with anything
        write_adapter(root / f"rand-{i}", shape, rank=8, alpha=16, targets=ATTN, seed=90 + i)
    return root


def test_cli_compresses_shared_and_refuses_random(tiny_model_dir: Path, ads: Path,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "store"
    assert main(["adapters", "compress", "--dir", str(ads), "--model", str(tiny_model_dir),
                 "--out", str(out), "--ranks", "4,8", "--clusters", "1,2,4",
                 "--budget", "0.2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "MiB saved" in text and " s; " in text
    m = json.loads((out / "manifest.json").read_text())
    status = {n: a["status"] for n, a in m["adapters"].items()}
    assert all(status[f"s-{i}"] == "compressed" for i in range(8)), m["adapters"]
    for i in range(2):
        a = m["adapters"][f"rand-{i}"]
        assert a["status"] == "uncompressed" and a["error_max"] > 0.2
        assert "over the budget" in a["reason"] and f"rand-{i}" in text
    # clusters never mix the two subspaces
    clusters = {m["adapters"][f"s-{i}"]["cluster"] for i in range(8)}
    assert 2 <= len(clusters) <= 4
    for cid in clusters:
        members = m["clusters"][cid]["members"]
        assert len({int(n.split("-")[1]) % 2 for n in members}) == 1
    assert m["totals"]["bytes_saved"] > 0
    assert all((out / m["adapters"][f"s-{i}"]["sigma"]).is_file() for i in range(8))


def test_tenant_boundaries(tiny_model_dir: Path, ads: Path, tmp_path: Path) -> None:
    shape = shape_from_config(tiny_model_dir)
    # the same subspace population split over tenants: only public / opted-in ones may share
    owners = {0: "acme", 2: "acme", 4: "globex", 6: "globex", 1: "initech", 3: "initech",
              5: "umbrella", 7: "umbrella"}
    sources = [Source(f"s-{i}", ads / f"s-{i}", owner, public=(i == 5))
               for i, owner in owners.items()]
    cfg = CompressConfig(budget=0.3, ranks=[4], clusters=[1, 2], share_tenants=["initech"])
    m = compress(sources, shape, tmp_path / "t", cfg, progress=False)
    groups = {n: a["group"] for n, a in m["adapters"].items()}
    assert groups["s-0"] == groups["s-2"] == "tenant-acme"
    assert groups["s-4"] == groups["s-6"] == "tenant-globex"
    assert groups["s-1"] == groups["s-3"] == groups["s-5"] == "shared"  # opted in + public
    assert groups["s-7"] == "tenant-umbrella"
    for cid, c in m["clusters"].items():
        owners_in = {m["adapters"][n]["owner"] for n in c["members"]}
        shared = all(m["adapters"][n]["public"] or m["adapters"][n]["owner"] == "initech"
                     for n in c["members"])
        assert len(owners_in) == 1 or shared, (cid, c["members"])


def test_resume_skips_finished_trials(tiny_model_dir: Path, ads: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    shape = shape_from_config(tiny_model_dir)
    sources = [Source(f"s-{i}", ads / f"s-{i}") for i in range(8)]
    cfg = CompressConfig(budget=0.3, ranks=[2, 4], clusters=[1, 2])
    calls: list[tuple[int, int]] = []
    real = run_mod.cluster

    def counting(stack, k, method, rank, **kw):  # type: ignore[no-untyped-def]
        calls.append((rank, k))
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted in the middle of the sweep
        return real(stack, k, method, rank, **kw)

    monkeypatch.setattr(run_mod, "cluster", counting)
    with pytest.raises(KeyboardInterrupt):
        compress(sources, shape, tmp_path / "r", cfg, progress=False)
    work = tmp_path / "r" / "work"
    assert len(json.loads(next(work.glob("*.trials.json")).read_text())["trials"]) == 2
    calls.clear()
    first = compress(sources, shape, tmp_path / "r", cfg, progress=False)
    assert calls == [(4, 1), (4, 2)]  # only the trials not done before
    done = next(work.glob("*.done.json"))
    before = os.stat(done).st_mtime_ns
    calls.clear()
    again = compress(sources, shape, tmp_path / "r", cfg, progress=False)
    assert calls == [] and os.stat(done).st_mtime_ns == before  # finished group: reused
    assert again["adapters"] == first["adapters"]
