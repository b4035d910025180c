"""One measurement of `pice bench engine`, in its own process so its peak RSS is its own.
Usage: python -m pice.bench.engine_worker '<json spec>'; prints one JSON object."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, cast

import torch

from pice.bench.peer_worker import peak_rss_mb
from pice.kernels.paged_attention import build_metadata
from pice.shared.engine.generator import EngineGenerator
from pice.shared.engine.models import CausalLM, build_model
from pice.shared.engine.models.quantized import step_bytes
from pice.shared.hf_backend import HFGenerator
from pice.shared.sampling import SamplingParams

TOPICS = ["sleep", "vaccines", "remote work", "volcanoes", "saving money", "learning a language",
          "bread baking", "solar power", "chess openings", "city cycling", "coffee", "memory"]


def distinct_prompts(gen: HFGenerator | EngineGenerator, n: int) -> list[str]:
    return [gen.render_chat([{"role": "user", "content":
                              f"Write a few facts about {TOPICS[i % len(TOPICS)]} ({i})."}])
            for i in range(n)]


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
    # bytes one decode step reads: quantized matrices at their packed size (int8 is about 1.06
    # bytes a weight), float ones at their dtype's; the embedding only where it is the head
    return {"rows": rows, "weight_bytes": step_bytes(model),
            "peak_rss_mb": peak_rss_mb()}


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


def int8_accuracy(spec: dict[str, Any]) -> dict[str, Any]:
    """Teacher-forced on fp32 greedy continuations: how often int8's top-1 token agrees with
    fp32's, and the mean KL(fp32 || int8) per position."""
    fp32 = EngineGenerator(spec["model"], max_context=2048, kv_cache_gb=0.5)
    prompts = distinct_prompts(fp32, 6)
    outs = fp32.generate(prompts, SamplingParams(max_tokens=48, ignore_eos=True))
    texts = [fp32.chat.encode(p) + o.token_ids for p, o in zip(prompts, outs, strict=True)]
    q8 = build_model(spec["model"], gguf=spec.get("gguf"), quantization="int8")
    ref = fp32.engine.runner.model
    agree = total = 0
    kl_sum = 0.0
    for ids in texts:
        a, b = _logits(ref, ids), _logits(q8, ids)  # [seq, vocab]
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        pa, pb = a.log_softmax(-1), b.log_softmax(-1)
        kl_sum += float((pa.exp() * (pa - pb)).sum(-1).sum())
    return {"top1_agreement": agree / total, "mean_kl": kl_sum / total, "positions": total}


@torch.inference_mode()
def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits at every position of one sequence (a fresh paged cache of one block per token)."""
    m = cast(CausalLM, model)
    shape = (len(ids), 1, m.num_kv_heads, m.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(m.num_layers)]
    meta = build_metadata([list(range(len(ids)))], [len(ids)], [len(ids)], 1, torch.device("cpu"))
    return m.compute_logits(m(torch.tensor(ids), caches, meta))


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    kinds = {"throughput": throughput, "prefix": prefix, "int8_accuracy": int8_accuracy}
    result = kinds[spec["kind"]](spec)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
