"""One system of `pice bench lora --compressed` in its own process (peak RSS its own), started by
`python -m pice.bench.lora_worker <spec>`: the engine with n adapters (compressed through a
store, or plain), then in the same process:
- the arrival-bound trace replayed in real time, device slots cold and the trace's adapters read
  into host RAM first (S-LoRA's setting: a miss is a slot write, not a disk read): TTFT of hits
  and misses;
- the saturation trace (throughput), `sat_reps` times, each followed by the same trace with
  every request on one plain adapter (the single-adapter baseline, interleaved so a shared
  machine's drift hits both alike);
- a decode-step microbenchmark, interleaved the same way: 16 sequences of one plain adapter vs
  16 sequences of 16 distinct adapters of this system."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any


def _rss_mb() -> float:
    """Resident memory now (Linux /proc; 0 elsewhere)."""
    import os

    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from pice.bench.lora_worker import (
        _decode_step_ms,
        _engine,
        _peak_rss_mb,
        _warm_up,
        run_pice_trace,
    )
    from pice.shared.lora.slots import slot_bytes

    torch.set_num_threads(spec["threads"]) if spec["threads"] else None
    engine = _engine(spec, slots=spec["slots"])
    n = spec["n"]
    rss0, t0 = _rss_mb(), time.perf_counter()
    for i in range(n):
        engine.pool.add(f"lora-{i}", Path(spec["adapter_dir"]) / f"lora-{i}")
    if spec["kind"] == "compressed":
        engine.pool.add_compressed(Path(spec["store"]))
    register_s, catalog_mb = time.perf_counter() - t0, _rss_mb() - rss0
    _warm_up(engine)
    names = sorted({f"lora-{r['adapter']}" for r in spec["trace"] if r["adapter"] is not None})
    engine.pool.prefetch(names)
    deadline = time.monotonic() + 300.0
    while engine.pool.loads_pending() and time.monotonic() < deadline:
        engine.pool.wait_for_load(1.0)
    records = run_pice_trace(engine, spec["trace"], n, spec)
    pool_stats = dict(engine.pool.stats)
    sat, sat_single = [], []
    if spec.get("sat_trace"):
        engine.pool.add("single", Path(spec["adapter_dir"]) / "lora-0")
        alone = [r | {"adapter": "single"} for r in spec["sat_trace"]]
        for _ in range(spec.get("sat_reps", 3)):
            sat.append(run_pice_trace(engine, spec["sat_trace"], n, spec))
            sat_single.append(run_pice_trace(engine, alone, n, spec))
    buffers = engine.pool.buffers
    out = {"records": records, "sat_records": sat, "sat_single_records": sat_single,
           "pool": pool_stats, "sat_pool": dict(engine.pool.stats), "slots": spec["slots"],
           "lora_bytes": buffers.nbytes + buffers.sigma.nbytes,
           "sigma_bytes": buffers.sigma.nbytes, "register_s": register_s,
           "slot_bytes": slot_bytes(engine.pool.shape, spec["max_rank"],
                                    engine.runner.dtype.itemsize),
           "peak_rss_mb": _peak_rss_mb(),
           "catalog_rss_mb": catalog_mb}
    if spec.get("micro_reps") and spec["slots"] >= 2:
        # the single-adapter baseline: lora-0's own files as a plain adapter
        if "single" not in {a.name for a in engine.pool.infos()}:
            engine.pool.add("single", Path(spec["adapter_dir"]) / "lora-0")
        distinct: list[str | None] = [f"lora-{i}" for i in range(min(16, n))]
        fits = spec["kind"] == "compressed" or len(distinct) <= spec["slots"] - 1
        single, mixed = [], []
        for _ in range(spec["micro_reps"]):
            single.append(_decode_step_ms(engine, ["single"] * len(distinct), 16))
            if fits:
                mixed.append(_decode_step_ms(engine, distinct, 16))
        out["decode_step_ms"] = {"single": statistics.median(single),
                                 "distinct": statistics.median(mixed) if mixed else None,
                                 "batch": len(distinct)}
    return out
