"""One measurement of `pice bench engine`, in its own process so its peak RSS is its own.
Usage: python -m pice.bench.engine_worker '<json spec>'; prints one JSON object."""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

import torch

from pice.shared.engine.generator import EngineGenerator
from pice.shared.hf_backend import HFGenerator
from pice.shared.sampling import SamplingParams

TOPICS = ["sleep", "vaccines", "remote work", "volcanoes", "saving money", "learning a language",
          "bread baking", "solar power", "chess openings", "city cycling", "coffee", "memory"]


def distinct_prompts(gen: HFGenerator | EngineGenerator, n: int) -> list[str]:
    return [gen.render_chat([{"role": "user", "content":
                              f"Write a few facts about {TOPICS[i % len(TOPICS)]} ({i})."}])
            for i in range(n)]


def weight_bytes(model: torch.nn.Module, tied: bool) -> int:
    """Bytes read per decode step: every weight, except the embedding table (one row is read)
    unless it doubles as the output layer."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name and not tied:
            continue
        total += p.numel() * p.element_size()
    for name, buf in model.named_buffers():  # int8 packed weights live in buffers/params
        if "_packed_params" in name:
            total += buf.numel() * buf.element_size()
    return total


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def throughput(spec: dict[str, Any]) -> dict[str, Any]:
    gen: HFGenerator | EngineGenerator
    if spec["backend"] == "hf":
        gen = hf = HFGenerator(spec["model"], max_context=2048)
        model: torch.nn.Module = hf.model
    else:
        gen = eng = EngineGenerator(spec["model"], max_context=2048, kv_cache_gb=2.0,
                                    prefix_caching=False, quantization=spec.get("quantization"))
        model = eng.engine.runner.model
    n = spec["decode_tokens"]
    gen.generate(distinct_prompts(gen, 1), SamplingParams(max_tokens=4, ignore_eos=True))  # warm
    rows = []
    for b in spec["batch_sizes"]:
        prompts = distinct_prompts(gen, b)
        t1 = _timed(lambda p=prompts: gen.generate(p, SamplingParams(max_tokens=1,
                                                                      ignore_eos=True)))
        tn = _timed(lambda p=prompts: gen.generate(p, SamplingParams(max_tokens=n,
                                                                      ignore_eos=True)))
        rows.append({"batch": b, "ttft_s": t1, "total_s": tn,
                     "decode_tok_s": b * (n - 1) / max(tn - t1, 1e-9)})
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False)) or \
        bool(getattr(model, "tie_word_embeddings", False))
    return {"rows": rows, "weight_bytes": weight_bytes(model, tied),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def prefix(spec: dict[str, Any]) -> dict[str, Any]:
    gen = EngineGenerator(spec["model"], max_context=2048, kv_cache_gb=1.0,
                          prefix_caching=spec["prefix_caching"])
    sketch = ["Keep a fixed schedule", "Make the room dark", "Avoid late caffeine",
              "Limit screens at night", "Exercise in the day", "Wind down with reading",
              "Keep naps short", "See a doctor if needed"]
    outline = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(sketch))
    prompts = [gen.render_chat([
        {"role": "system", "content": "You write exactly one point of a fixed outline."},
        {"role": "user", "content": f"Question: How can I sleep better?\n\nOutline:\n{outline}"
                                    f"\n\nWrite point {i + 1} in one or two sentences."}])
        for i in range(len(sketch))]
    gen.generate(distinct_prompts(gen, 1), SamplingParams(max_tokens=2))  # warm
    before = gen.engine.stats["prefill_tokens"]
    seconds = _timed(lambda: gen.generate(prompts, SamplingParams(max_tokens=1)))
    return {"prefill_s": seconds, "prompt_tokens": sum(len(gen.chat.encode(p)) for p in prompts),
            "computed_tokens": gen.engine.stats["prefill_tokens"] - before}


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = {"throughput": throughput, "prefix": prefix}[spec["kind"]](spec)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
