"""A group stage as a bare process for tests and `pice bench group`, driven by JSON lines on stdin
(the edge agent drives the same StageNode from hub messages instead):

    {"configure": {StageConfig fields}}   -> {"event": "ready" | "failed", "epoch": N, "error"}
    {"generate": {"id": str, "prompt_ids": [...], "max_tokens": n, "temperature": t,
                  "top_p": p, "top_k": k, "seed": s, "ignore_eos": b, "min_tokens": m}}
                                          -> {"event": "done", "id": ..., "tokens": [...],
                                              "logprobs": [...], "finish_reason": ...,
                                              "error": ..., "replays": n}
    {"stats": true}                       -> {"event": "stats", ...}
    {"exit": true}

It prints {"event": "listening", "addr": "host:port"} first. `python -m pice.edge.group.node_main
--listen 127.0.0.1:0`."""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import threading
import time
from typing import Any

import torch

from pice.edge.group.driver import GroupSeq
from pice.edge.group.node import StageConfig, StageNode
from pice.shared.sampling import SamplingParams

_out_lock = threading.Lock()


def emit(obj: dict[str, Any]) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def _rss_anon_mb() -> float:
    """Anonymous resident memory now (weights, KV, activations), without the clean page-cache
    pages of the mmapped checkpoint that peak RSS also counts."""
    try:
        for line in open("/proc/self/status").read().splitlines():  # noqa: SIM115
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def stats(node: StageNode) -> dict[str, Any]:
    wall = time.perf_counter() - node.started
    out: dict[str, Any] = {"event": "stats", "busy_s": node.busy_s, "wall_s": wall,
                           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                           "rss_anon_mb": _rss_anon_mb(),
                           **node.stats}
    if node.driver is not None:
        out.update(node.driver.stats)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pice-group-stage")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-cpu-kernels", action="store_true")
    p.add_argument("--eos", type=int, action="append", default=[])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    host, port = args.listen.rsplit(":", 1)
    node = StageNode(host, int(port), cpu_kernels=not args.no_cpu_kernels, eos_ids=set(args.eos))
    emit({"event": "listening", "addr": node.addr})

    def done(req_id: str) -> Any:
        def on_done(seq: GroupSeq) -> None:
            emit({"event": "done", "id": req_id, "tokens": seq.completion_ids,
                  "logprobs": seq.logprobs, "finish_reason": seq.finish_reason,
                  "error": seq.error, "replays": seq.replays})
        return on_done

    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if "configure" in msg:
            cfg = StageConfig(**msg["configure"])
            node.configure(cfg)

            def report(epoch: int = cfg.epoch) -> None:
                problem = node.wait_ready(epoch)
                emit({"event": "ready" if problem is None else "failed", "epoch": epoch,
                      "error": problem})
            threading.Thread(target=report, daemon=True).start()
        elif "generate" in msg:
            g = msg["generate"]
            params = SamplingParams(max_tokens=g["max_tokens"],
                                    temperature=g.get("temperature", 0.0),
                                    top_p=g.get("top_p", 1.0), top_k=g.get("top_k", 0),
                                    seed=g.get("seed"),
                                    ignore_eos=g.get("ignore_eos", False),
                                    min_tokens=g.get("min_tokens", 0))
            node.submit(list(g["prompt_ids"]), params, done(str(g["id"])))
        elif "stats" in msg:
            emit(stats(node))
        elif "exit" in msg:
            break
    node.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
