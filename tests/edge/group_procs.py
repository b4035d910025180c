"""Edge-group helpers for tests: tiny models of each architecture, and group stages as real
processes (`python -m pice.edge.group.node_main`) on loopback, driven by JSON lines. Waits use
generous deadlines; no timing is asserted."""

from __future__ import annotations

import json
import queue
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

from pice.bench.progressive_remote import die_with_parent

WAIT_S = 180.0
_SMALL: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=300,
                              max_position_embeddings=512)
ARCHS = {
    "qwen2": lambda: Qwen2Config(**_SMALL, num_hidden_layers=4, tie_word_embeddings=True),
    "llama": lambda: LlamaConfig(**_SMALL, num_hidden_layers=4, tie_word_embeddings=False),
    "gemma3": lambda: Gemma3TextConfig(
        **_SMALL, num_hidden_layers=4, sliding_window=4, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"] * 2),
}


def tiny_arch(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """A tiny random model of `arch` (4 layers), every weight perturbed so that the greedy text
    varies (not one repeated token)."""
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(ARCHS[arch]()).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    hf.save_pretrained(out_dir)
    return out_dir


def prompts(n: int, seed: int = 1, vocab: int = 300) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(5, 40, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


class StageProc:
    """One stage process; its stderr goes to a log file."""

    def __init__(self, log_dir: Path, name: str, taskset: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.name = name
        self.log_path = log_dir / f"stage-{name}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "pice.edge.group.node_main", "--listen", "127.0.0.1:0",
               *extra]
        if taskset is not None:
            cmd = ["taskset", "-c", taskset, *cmd]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True, preexec_fn=die_with_parent)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.addr = self.wait(lambda e: e["event"] == "listening")["addr"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def log(self) -> str:
        return self.log_path.read_text()

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def wait(self, match: Any, timeout: float = WAIT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self.events.empty()):
                raise AssertionError(f"stage {self.name}: no matching event\n{self.log()}")
            try:
                ev = self.events.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if match(ev):
                return ev

    def generate(self, batch: list[list[int]], max_tokens: int, **kw: Any) -> None:
        for i, p in enumerate(batch):
            self.send({"generate": {"id": str(i), "prompt_ids": p, "max_tokens": max_tokens,
                                    "ignore_eos": True, **kw}})

    def results(self, n: int, timeout: float = WAIT_S) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        while len(out) < n:
            ev = self.wait(lambda e: e["event"] == "done", timeout)
            out[ev["id"]] = ev
        return out

    def stats(self) -> dict[str, Any]:
        self.send({"stats": True})
        return self.wait(lambda e: e["event"] == "stats")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def configure(stages: list[StageProc], model: Path, ranges: list[tuple[int, int]], epoch: int,
              num_blocks: int = 128, **kw: Any) -> None:
    """Send one plan (a ring over `stages` in order) and wait until every stage applied it."""
    token = secrets.token_hex(16)
    n = len(stages)
    for i, (s, (start, end)) in enumerate(zip(stages, ranges, strict=True)):
        cfg = dict(group="g", epoch=epoch, model=str(model), index=i, n_stages=n, start=start,
                   end=end, next_addr=stages[(i + 1) % n].addr if n > 1 else None, token=token,
                   num_blocks=num_blocks, block_size=4, max_model_len=512, **kw)
        s.send({"configure": cfg})
    for s in stages:
        s.wait(lambda e, epoch=epoch: e["event"] == "ready" and e["epoch"] == epoch)
