"""One system of `pice bench lora` in its own process (so peak RSS is its own):
`python -m pice.bench.lora_worker '<json spec>'` prints one JSON line.

Systems, all on the same trace of token-id requests (arrival s, adapter, prompt ids, output
length, forced with ignore_eos / min_new_tokens):
- "pice": the engine (continuous batching, adapter pool), plus the decode-step and
  miss/hit microbenchmarks;
- "peft_switch": transformers + peft, one request at a time, the adapter swapped from disk when
  the next request needs another (the llama.cpp-style baseline EdgeLoRA compares with);
- "peft_batch": transformers + peft, static batches of the requests waiting, each row with its
  own adapter (`adapter_names=` in generate), adapters kept loaded up to `slots` (LRU)."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and
    exec, so a worker would report its parent's peak when that is larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _adapter_path(spec: dict[str, Any], i: int) -> Path:
    return Path(spec["adapter_dir"]) / f"lora-{i}"


# ---- pice ---------------------------------------------------------------------------------------
def _engine(spec: dict[str, Any], slots: int) -> Any:
    from pice.shared.engine.config import EngineConfig
    from pice.shared.engine.llm_engine import LLMEngine

    cfg = EngineConfig(model=spec["model"], lora_max_rank=spec["max_rank"], lora_slots=slots,
                       max_num_seqs=spec["max_num_seqs"], kv_cache_gb=spec["kv_cache_gb"],
                       max_model_len=2048, max_num_batched_tokens=4096)
    return LLMEngine(cfg, set(), lambda ids: "")


def run_pice_trace(engine: Any, trace: list[dict[str, Any]], n: int,
                   spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Replay the trace in real time: requests join the running batch when they arrive."""
    from pice.shared.sampling import SamplingParams

    have = {a.name for a in engine.pool.infos()}
    for i in range(n):
        if f"lora-{i}" not in have:
            engine.pool.add(f"lora-{i}", _adapter_path(spec, i))
    pending = list(trace)
    live: dict[int, tuple[Any, dict[str, Any]]] = {}
    out: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    while pending or engine.has_work:
        now = time.perf_counter() - t0
        while pending and pending[0]["arrival"] <= now:
            r = pending.pop(0)
            ad = r["adapter"]
            name = None if ad is None else ad if isinstance(ad, str) else f"lora-{ad}"
            seq = engine.make_sequence(r["prompt"], SamplingParams(max_tokens=r["out_len"],
                                                                   ignore_eos=True), name)
            engine.add(seq)
            live[seq.seq_id] = (seq, {"arrival": r["arrival"], "out_len": r["out_len"]})
        if not engine.has_work:
            time.sleep(max(0.0, pending[0]["arrival"] - now))
            continue
        stepped = engine.step()
        now = time.perf_counter() - t0
        for seq in stepped:
            _, rec = live[seq.seq_id]
            if seq.num_completion_tokens == 1 and "ttft" not in rec:
                rec["ttft"] = now - rec["arrival"]
                rec["hit"] = seq.lora_hit
            if seq.is_finished:
                rec["finish"] = now
                engine.release(seq)
                out.append(rec)
                del live[seq.seq_id]
    return out


def _decode_step_ms(engine: Any, names: list[str | None], steps: int) -> float:
    """Median time of one decode step of len(names) sequences (64-token prompts)."""
    from pice.shared.sampling import SamplingParams

    params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)
    seqs = [engine.make_sequence([100 + 7 * i + t for t in range(64)], params, n)
            for i, n in enumerate(names)]
    for s in seqs:
        engine.add(s)
    while any(s.num_completion_tokens == 0 for s in seqs):
        engine.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    while engine.has_work:
        engine.step()
    for s in seqs:
        engine.release(s)
    return statistics.median(times) * 1e3


def _ttft_s(engine: Any, name: str, prompt: list[int]) -> float:
    from pice.shared.sampling import SamplingParams

    seq = engine.make_sequence(prompt, SamplingParams(max_tokens=1), name)
    engine.add(seq)
    t = time.perf_counter()
    while engine.has_work:
        engine.step()
    engine.release(seq)
    return time.perf_counter() - t


def _warm_up(engine: Any) -> None:
    """One short base-model request: kernels built, threads started, before timing."""
    from pice.shared.sampling import SamplingParams

    engine.generate_ids([list(range(20, 52))], SamplingParams(max_tokens=4, ignore_eos=True))


def pice_micro(spec: dict[str, Any]) -> dict[str, Any]:
    """Decode step with 8 distinct adapters vs the base model; TTFT of an idle engine for an
    adapter in a device slot (hit) vs one only on disk (miss)."""
    engine = _engine(spec, slots=max(8, spec["slots"]))
    for i in range(8):
        engine.pool.add(f"micro-{i}", Path(spec["micro_dir"]) / f"micro-{i}")
    distinct: list[str | None] = [f"micro-{i}" for i in range(8)]
    steps = spec["micro_steps"]
    _warm_up(engine)
    _decode_step_ms(engine, distinct, 3)  # warm up: slots filled, kernels built
    base, mixed = [], []
    for _ in range(spec["micro_reps"]):
        base.append(_decode_step_ms(engine, [None] * 8, steps))
        mixed.append(_decode_step_ms(engine, distinct, steps))
    prompt = list(range(300, 300 + 64))
    n_cold = spec["micro_ttft_reps"]
    cold = [f"lora-{i}" for i in range(n_cold)]
    for name in cold:
        engine.pool.add(name, _adapter_path(spec, int(name.split("-")[1])))
    hit, miss = [], []
    for name in cold:
        miss.append(_ttft_s(engine, name, prompt))  # on disk only: read, slot write, prefill
        hit.append(_ttft_s(engine, name, prompt))  # now resident
    return {"decode_step_base_ms": statistics.median(base),
            "decode_step_8_adapters_ms": statistics.median(mixed),
            "decode_steps": {"base": base, "8_adapters": mixed},
            "ttft_hit_s": hit, "ttft_miss_s": miss}


def run_pice(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"]) if spec["threads"] else None
    result: dict[str, Any] = {"micro": pice_micro(spec) if spec.get("micro") else None,
                              "traces": {}}
    for key, trace in spec["traces"].items():
        engine = _engine(spec, slots=spec["slots"])  # a fresh pool per trace: cold start
        _warm_up(engine)
        n = int(key.split("/")[0].split("=")[1])
        records = run_pice_trace(engine, trace, n, spec)
        stats = dict(engine.pool.stats)
        result["traces"][key] = {"records": records, "pool": stats}
        del engine
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


# ---- peft baselines ---------------------------------------------------------------------------
class _FirstToken:
    """A stopping criterion that never stops, noting when the first new token exists."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


class _PeftAdapters:
    """A PeftModel whose loaded adapters are an LRU of at most `capacity`."""

    def __init__(self, spec: dict[str, Any], capacity: int) -> None:
        from transformers import AutoModelForCausalLM

        self.spec, self.capacity = spec, capacity
        self.base = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        self.base.eval()
        self.model: Any = None
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.loads = self.hits = 0

    def ensure(self, names: list[str]) -> None:
        from peft import PeftModel

        for name in names:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                self.hits += 1
                continue
            self.loads += 1
            path = str(_adapter_path(self.spec, int(name.split("-")[1])))
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name)
            else:
                self.model.load_adapter(path, adapter_name=name)
            self.loaded[name] = None
            while len(self.loaded) > max(self.capacity, len(set(names))):
                old = next(n for n in self.loaded if n not in names)
                del self.loaded[old]
                self.model.delete_adapter(old)

    def generate(self, prompts: list[list[int]], names: list[str | None],
                 new_tokens: int) -> float | None:
        """Left-padded batch, forced to new_tokens; returns when the first token existed."""
        from transformers import StoppingCriteriaList

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        first = _FirstToken()
        kw: dict[str, Any] = {}
        model = self.base
        if any(n is not None for n in names):
            self.ensure([n for n in names if n is not None])
            model = self.model
            if len(names) > 1 or names[0] is None:
                kw["adapter_names"] = [n if n is not None else "__base__" for n in names]
            else:
                model.set_adapter(names[0])
        elif self.model is not None:
            kw["adapter_names"] = ["__base__"] * len(names)
            model = self.model
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                           stopping_criteria=StoppingCriteriaList([first]), **kw)
        return first.at


def run_peft(spec: dict[str, Any], batched: bool) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"]) if spec["threads"] else None
    result: dict[str, Any] = {"traces": {}}
    for key, trace in spec["traces"].items():
        peft = _PeftAdapters(spec, capacity=spec["slots"] if batched else 1)
        peft.generate([list(range(20, 52))], [None], 4)  # warm up
        pending, records = list(trace), []
        t0 = time.perf_counter()
        while pending:
            now = time.perf_counter() - t0
            if pending[0]["arrival"] > now:
                time.sleep(pending[0]["arrival"] - now)
                now = time.perf_counter() - t0
            size = spec["max_num_seqs"] if batched else 1
            batch = [r for r in pending if r["arrival"] <= now][:size]
            pending = pending[len(batch):]
            names = [None if r["adapter"] is None else f"lora-{r['adapter']}" for r in batch]
            hits_before = peft.hits
            first = peft.generate([r["prompt"] for r in batch], names,
                                  max(r["out_len"] for r in batch))
            done = time.perf_counter() - t0
            for r in batch:
                ttft = (first - t0 if first is not None else done) - r["arrival"]
                records.append({"arrival": r["arrival"], "out_len": r["out_len"], "ttft": ttft,
                                "finish": done, "hit": peft.hits > hits_before})
        result["traces"][key] = {"records": records,
                                 "pool": {"loads": peft.loads, "hits": peft.hits}}
        del peft
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    kind = spec["kind"]
    if kind in ("compressed", "uncompressed"):  # pice bench lora --compressed
        from pice.bench.lora_compressed_worker import run_worker

        print(json.dumps(run_worker(spec)))
        return
    out = run_pice(spec) if kind == "pice" else run_peft(spec, batched=kind == "peft_batch")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
