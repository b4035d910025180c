"""One system of `pice bench engine --peer llama.cpp`, in its own process (its peak RSS is its
own). Usage: python -m pice.bench.peer_worker '<json spec>'; prints one JSON object.

Every system gets the same prompts (text for pice and transformers, the same token ids for
llama.cpp) and greedy-decodes the same number of tokens. Batch b is b requests at once: pice's
continuous batching; llama.cpp's batched decoding of b sequences in one context (what its
server does with b parallel slots)."""

from __future__ import annotations

import contextlib
import json
import queue
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def peak_rss_mb() -> float:
    """VmHWM: this process's own peak (ru_maxrss would carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LlamaCpp:
    """Greedy batched decoding with llama.cpp's C API (llama-cpp-python's low-level bindings)."""

    def __init__(self, gguf: str, threads: int, max_seqs: int, n_ctx: int) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(gguf.encode(), mp)
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_ctx, 512, max_seqs
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = True
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(n_ctx, 0, max_seqs)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits)."""
        b = self.batch
        for k, (tok, pos, seq, want) in enumerate(items):
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = tok, pos, 1, want
            b.seq_id[k][0] = seq
        b.n_tokens = len(items)
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float]:
        """Greedy tokens per prompt, and the seconds until every prompt had its first one."""
        t0 = time.perf_counter()
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        items, last = [], []
        for s, ids in enumerate(prompts):
            items += [(t, i, s, i == len(ids) - 1) for i, t in enumerate(ids)]
            last.append(len(items) - 1)
        self._decode(items)
        out = [[self._argmax(i)] for i in last]
        first = time.perf_counter() - t0
        for step in range(1, n):
            self._decode([(o[-1], len(p) + step - 1, s, True)
                          for s, (p, o) in enumerate(zip(prompts, out, strict=True))])
            for s, o in enumerate(out):
                o.append(self._argmax(s))
        return out, first


def _system(spec: dict[str, Any]) -> tuple[Any, Any]:
    """A callable (prompt indices, n) -> (token ids per prompt, seconds to the first token of
    every prompt), and the torch model whose weights a decode step reads (None: llama.cpp,
    whose bytes per step are counted from the GGUF by the caller)."""
    system = spec["system"]
    if system == "llama.cpp":
        most = max(spec["batch_sizes"])
        ctx = most * (max(len(p) for p in spec["prompt_ids"]) + spec["decode_tokens"] + 8)
        llama = LlamaCpp(spec["gguf"], spec["threads"], most, max(ctx, 512))
        return lambda idx, n: llama.generate([spec["prompt_ids"][i] for i in idx], n), None
    from pice.shared.sampling import SamplingParams

    if system == "transformers":
        from pice.shared.hf_backend import HFGenerator

        hf = HFGenerator(spec["dense_dir"], max_context=2048)

        def run_hf(idx: list[int], n: int) -> tuple[list[list[int]], float]:
            t0 = time.perf_counter()  # generate has no first-token hook: a 1-token run
            hf.generate([spec["prompts"][i] for i in idx], SamplingParams(max_tokens=1))
            first = time.perf_counter() - t0
            outs = hf.generate([spec["prompts"][i] for i in idx],
                               SamplingParams(max_tokens=n, ignore_eos=True))
            return [list(o.token_ids) for o in outs], first
        return run_hf, hf.model
    from pice.shared.engine.generator import EngineGenerator

    quant = {"pice-gguf": "gguf", "pice-int8": "int8", "pice-fp32": "none"}[system]
    gen = EngineGenerator(spec["model_dir"], max_context=2048, kv_cache_gb=1.0,
                          prefix_caching=False, gguf=spec["gguf"], quantization=quant)

    def run(idx: list[int], n: int) -> tuple[list[list[int]], float]:
        params = SamplingParams(max_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        handles = [gen.submit(spec["prompts"][i], params) for i in idx]
        first = None
        while not all(h.done.is_set() for h in handles):
            with contextlib.suppress(queue.Empty):
                handles[0].updates.get(timeout=0.5)  # one update per engine step
            if first is None and all(h.seq.num_completion_tokens >= 1 for h in handles):
                first = time.perf_counter() - t0
        return [list(h.seq.completion_ids) for h in handles], first or 0.0
    return run, gen.engine.runner.model


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    run, model = _system(spec)
    load_s = time.perf_counter() - t0
    run([0], 4)  # warm up
    n, rows, tokens = spec["decode_tokens"], [], []
    for b in spec["batch_sizes"]:
        t = time.perf_counter()
        out, ttft = run(list(range(b)), n)
        total = time.perf_counter() - t
        if b == 1:
            tokens = out[0]
        rows.append({"batch": b, "ttft_s": ttft, "total_s": total,
                     "decode_tok_s": b * (n - 1) / max(total - ttft, 1e-9)})
    result: dict[str, Any] = {"system": spec["system"], "load_s": load_s, "rows": rows,
                              "tokens_b1": tokens, "peak_rss_mb": peak_rss_mb()}
    if model is not None:  # quantized segments counted at their packed size, fp32 at 4 bytes
        from pice.shared.engine.models.quantized import step_bytes

        result["weight_bytes_per_step"] = step_bytes(model)
    return result


def main() -> None:
    print(json.dumps(measure(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
